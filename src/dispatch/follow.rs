//! Following a session from another socket: its kept replies after a sequence number,
//! then the live ones while it runs (RESUME).

use tokio::sync::mpsc;
use tracing::warn;

use super::{decode_kept, reply_seq, Dispatcher, Reader, Refusal, Rejected, REPLY_QUEUE};
use crate::envelope::{unix_now, Envelope};
use crate::store::FINAL_SEQ;

impl Dispatcher {
    /// The replies of a session after sequence `after`, for a client that reconnects:
    /// the kept ones first, then live ones while the session runs, ending with its
    /// OUTPUT or ERROR. `reader` must be allowed to see the session (as for
    /// [`Dispatcher::session`]).
    pub async fn follow(
        &self,
        session_id: &str,
        after: u64,
        reader: &Reader,
    ) -> Result<mpsc::Receiver<Envelope>, Refusal> {
        let unknown = || Refusal::UnknownSession(session_id.to_owned());
        let key = reader.scope().ok_or_else(unknown)?.key(session_id);
        if self
            .inner
            .store
            .get_session(key.clone(), unix_now())
            .await?
            .is_none()
        {
            return Err(unknown());
        }
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        let this = self.clone();
        let session_id = session_id.to_owned();
        self.inner.runs.spawn(async move {
            this.replay_replies(key, session_id, after, tx).await;
        });
        Ok(rx)
    }

    /// Catches up (from the run's memory while it runs, from the store once it has
    /// ended), then follows the live run; a lagging follower catches up again. Ends
    /// after the final reply.
    async fn replay_replies(
        &self,
        key: String,
        session_id: String,
        mut after: u64,
        tx: mpsc::Sender<Envelope>,
    ) {
        loop {
            // Subscribe before reading the store, so nothing falls between the two: a
            // run that ends in between has stored every reply before it goes.
            let live = self.live().get(&key).map(|run| run.follow(after));
            let (in_memory, mut feed) = match live {
                Some((kept, rx)) => (kept, Some(rx)),
                None => (Vec::new(), None),
            };
            let stored = match self.inner.store.replies_after(key.clone(), after).await {
                Ok(k) => k,
                Err(e) => {
                    warn!(error = %e, "reading kept replies failed");
                    return;
                }
            };
            for (seq, bytes) in stored.into_iter().chain(in_memory) {
                if seq <= after {
                    continue;
                }
                let Some(env) = decode_kept(&bytes, &self.inner.identity) else {
                    continue;
                };
                if tx.send(env).await.is_err() || seq == FINAL_SEQ {
                    return;
                }
                after = seq;
            }
            let Some(rx) = feed.as_mut() else {
                // Not running and no final reply kept: a restart cut the run.
                let err = Rejected::from(Refusal::Interrupted(session_id.clone()))
                    .or_session(Some(&session_id));
                let _ = tx.send(self.error_envelope(&err)).await;
                return;
            };
            // Until it lags or the run ends (its replies are in the store by then):
            // then catch up again.
            while let Ok(env) = rx.recv().await {
                let seq = reply_seq(&env);
                if seq <= after {
                    continue;
                }
                if tx.send(env).await.is_err() || seq == FINAL_SEQ {
                    return;
                }
                after = seq;
            }
        }
    }
}
