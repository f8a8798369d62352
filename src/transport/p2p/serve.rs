//! Inbound calls: the accept loop with its total and per-peer limits, and one task per
//! stream that reads the INPUT, dispatches it and writes the replies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::wire::{self, WireError};
use super::{P2p, P2pConfig, PROTOCOL};
use crate::dispatch::{Dispatcher, Refusal, Submission};
use crate::proto::session_of;

/// How long a stream may take to send its INPUT.
const INPUT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply frame may take to write (per chunk, not per answer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl P2p {
    /// Serves inbound calls through `dispatcher` until `stop`.
    pub(crate) fn serve(
        &self,
        dispatcher: Dispatcher,
        config: &P2pConfig,
        stop: CancellationToken,
    ) {
        let mut control = self.control.clone();
        let Ok(mut incoming) = control.accept(PROTOCOL) else {
            warn!("the envelope protocol is already being served");
            return;
        };
        let this = self.clone();
        let total = Arc::new(Semaphore::new(config.max_inbound_streams));
        let per_peer_max = config.max_streams_per_peer;
        let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
        tokio::spawn(async move {
            loop {
                let (peer, stream) = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = incoming.next() => match next {
                        Some(s) => s,
                        None => return,
                    },
                };
                let Ok(permit) = total.clone().try_acquire_owned() else {
                    debug!(%peer, "over the inbound stream limit; stream refused");
                    continue;
                };
                let count = {
                    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                    let n = open.entry(peer).or_default();
                    *n += 1;
                    *n
                };
                if count > per_peer_max {
                    warn!(%peer, "peer opened more than {per_peer_max} calls at once; cut off");
                    release(&open, peer);
                    // Never wait here: streams queue behind this loop one at a time.
                    let this = this.clone();
                    tokio::spawn(async move { this.ban(peer).await });
                    continue;
                }
                let (this, dispatcher, open) = (this.clone(), dispatcher.clone(), open.clone());
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        serve_stream(&this, &dispatcher, peer, stream).await;
                        release(&open, peer);
                    }
                    .instrument(info_span!("p2p_call", %peer)),
                );
            }
        });
    }
}

fn release(open: &Mutex<HashMap<PeerId, usize>>, peer: PeerId) {
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = open.get_mut(&peer) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            open.remove(&peer);
        }
    }
}

/// One inbound call: read the INPUT, dispatch, write the replies as they come.
async fn serve_stream(
    p2p: &P2p,
    dispatcher: &Dispatcher,
    peer: PeerId,
    mut stream: libp2p::Stream,
) {
    use futures::AsyncWriteExt;
    let input = match tokio::time::timeout(INPUT_TIMEOUT, wire::read_frame(&mut stream)).await {
        Ok(Ok(Some(env))) => env,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(WireError::Io(e))) => {
            debug!(error = %e, "stream failed before its INPUT");
            return;
        }
        Ok(Err(e)) => {
            // Oversize or undecodable: this peer does not speak the protocol; cut it off.
            warn!(error = %e, "misbehaving peer cut off");
            let refusal = match e {
                WireError::TooLarge(len) => Refusal::too_large(len, wire::MAX_FRAME_BYTES),
                other => Refusal::BadRequest(other.to_string()),
            };
            let err = dispatcher.error_envelope(&refusal.into());
            // Write the reason and close, so it arrives before the ban cuts the connection.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = wire::write_frame(&mut stream, &err).await;
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            })
            .await;
            p2p.ban(peer).await;
            return;
        }
    };
    let session_id = session_of(&input.payload);
    let submission = Submission::new(input);
    let mut accepted = match dispatcher.submit(submission).await {
        Ok(a) => a,
        Err(rejected) => {
            let err = dispatcher.error_envelope(&rejected.or_session(session_id.as_deref()));
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wire::write_frame(&mut stream, &err)).await;
            let _ = stream.close().await;
            return;
        }
    };
    while let Some(reply) = accepted.replies.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, wire::write_frame(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            // The caller is gone or too slow; the run goes on and is stored.
            _ => return,
        }
    }
    let _ = stream.close().await;
}
