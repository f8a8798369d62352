//! Inbound calls: the accept loop with its total, per-peer and per-IP limits, and one
//! task per stream that reads the INPUT, dispatches it and writes the replies.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::wire::{self, WireError};
use super::{P2p, P2pConfig, PROTOCOL};
use crate::dispatch::{Dispatcher, Refusal, Submission, Transport};
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
        let open = OpenCalls::new(config.max_streams_per_peer, config.max_streams_per_ip);
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
                let ip = this.peer_ips.first(&peer);
                let slot = match open.enter(peer, ip) {
                    Ok(slot) => slot,
                    Err(Over::Peer(max)) => {
                        warn!(%peer, ?ip, "peer opened more than {max} calls at once; cut off");
                        // Never wait here: streams queue behind this loop one at a time.
                        let this = this.clone();
                        tokio::spawn(async move { this.ban_from(peer, ip).await });
                        continue;
                    }
                    Err(Over::Ip(max)) => {
                        debug!(%peer, ?ip, "over {max} calls from one IP; stream refused");
                        continue;
                    }
                };
                let (this, dispatcher) = (this.clone(), dispatcher.clone());
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        serve_stream(&this, &dispatcher, peer, ip, stream).await;
                        drop(slot);
                    }
                    .instrument(info_span!("p2p_call", %peer)),
                );
            }
        });
    }
}

/// Which limit a new call would go over.
#[derive(Debug, PartialEq, Eq)]
enum Over {
    /// The peer's own: it gets banned.
    Peer(usize),
    /// Its IP's, over all peers there: the call is refused, nobody is banned.
    Ip(usize),
}

/// Calls open at once, per peer and per remote IP.
#[derive(Clone)]
struct OpenCalls {
    counts: Arc<Mutex<Counts>>,
    per_peer: usize,
    per_ip: usize,
}

#[derive(Default)]
struct Counts {
    peers: HashMap<PeerId, usize>,
    ips: HashMap<IpAddr, usize>,
}

/// One open call; counted until dropped.
struct CallSlot {
    counts: Arc<Mutex<Counts>>,
    peer: PeerId,
    ip: Option<IpAddr>,
}

impl OpenCalls {
    fn new(per_peer: usize, per_ip: usize) -> Self {
        OpenCalls {
            counts: Arc::default(),
            per_peer,
            per_ip,
        }
    }

    /// Counts a new call from `peer` at `ip`, unless that goes over a limit (the peer's
    /// is checked first: a peer over its own limit is banned whatever its IP's count).
    fn enter(&self, peer: PeerId, ip: Option<IpAddr>) -> Result<CallSlot, Over> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.peers.get(&peer).copied().unwrap_or(0) >= self.per_peer {
            return Err(Over::Peer(self.per_peer));
        }
        if let Some(ip) = ip {
            if counts.ips.get(&ip).copied().unwrap_or(0) >= self.per_ip {
                return Err(Over::Ip(self.per_ip));
            }
            *counts.ips.entry(ip).or_default() += 1;
        }
        *counts.peers.entry(peer).or_default() += 1;
        Ok(CallSlot {
            counts: self.counts.clone(),
            peer,
            ip,
        })
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut counts.peers, self.peer);
        if let Some(ip) = self.ip {
            decrement(&mut counts.ips, ip);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// One inbound call: read the INPUT, dispatch, write the replies as they come.
async fn serve_stream(
    p2p: &P2p,
    dispatcher: &Dispatcher,
    peer: PeerId,
    ip: Option<IpAddr>,
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
                WireError::TooLarge { len, max } => Refusal::too_large(len, max),
                other => Refusal::BadRequest(other.to_string()),
            };
            dispatcher.refused_early(Transport::P2p, refusal.code(), std::time::Instant::now());
            let err = dispatcher.error_envelope(&refusal.into());
            // Write the reason and close, so it arrives before the ban cuts the connection.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = wire::write_frame(&mut stream, &err).await;
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            })
            .await;
            p2p.ban_from(peer, ip).await;
            return;
        }
    };
    let session_id = session_of(&input.payload);
    let mut submission = Submission::new(input);
    submission.transport = Transport::P2p;
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
        let mut frame = wire::encode(&reply);
        if frame.len() > wire::MAX_REPLY_FRAME_BYTES {
            // Over what callers read: a clear error for this answer, not an unreadable
            // frame.
            let max = wire::MAX_REPLY_FRAME_BYTES;
            frame = wire::encode(&dispatcher.oversize_reply(&reply, frame.len(), max));
        }
        match tokio::time::timeout(WRITE_TIMEOUT, wire::write_encoded(&mut stream, &frame)).await {
            Ok(Ok(())) => {}
            // The caller is gone or too slow; the run goes on and is stored.
            _ => return,
        }
    }
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_capped_per_peer_then_per_ip_and_freed_on_drop() {
        let open = OpenCalls::new(2, 3);
        let ip: IpAddr = "127.0.0.7".parse().unwrap();
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = open.enter(a, Some(ip)).unwrap();
        let _a2 = open.enter(a, Some(ip)).unwrap();
        assert_eq!(open.enter(a, Some(ip)).err(), Some(Over::Peer(2)));
        let _b1 = open.enter(b, Some(ip)).unwrap();
        // The IP is full: another key there is refused, without blame.
        assert_eq!(open.enter(b, Some(ip)).err(), Some(Over::Ip(3)));
        let d = PeerId::random();
        assert_eq!(open.enter(d, Some(ip)).err(), Some(Over::Ip(3)));
        let other: IpAddr = "127.0.0.8".parse().unwrap();
        let _d1 = open.enter(d, Some(other)).unwrap();
        drop(a1);
        let _d2 = open.enter(d, Some(ip)).unwrap();
        // A peer whose IP is unknown still has its own limit.
        let c = PeerId::random();
        let _c = (open.enter(c, None).unwrap(), open.enter(c, None).unwrap());
        assert_eq!(open.enter(c, None).err(), Some(Over::Peer(2)));
    }
}
