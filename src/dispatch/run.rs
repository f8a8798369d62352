//! One accepted run: the agent on a fresh instance, its chunks as signed STREAM replies,
//! then the session stored and the final OUTPUT or ERROR.

use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::scope::SessionSecret;
use super::turn::{session_value, TurnStart};
use super::{Dispatcher, CHUNK_QUEUE, REPLY_SEND_TIMEOUT};
use crate::agent::{Attachment, Message, StreamSink, Turn};
use crate::envelope::{unix_now, Envelope, Kind};
use crate::identity::Address;
use crate::metrics::{Outcome, Transport};
use crate::proto::ErrorCode;
use crate::store::{HistoryWrite, SessionRecord, SessionStatus, FINAL_SEQ};

/// At most one STREAM per window: chunks an agent writes faster are joined, so a flood
/// of tiny chunks costs a bounded number of signatures and stored replies per second.
/// A chunk that comes after a quiet window goes out at once.
const COALESCE_WINDOW: Duration = Duration::from_millis(10);
/// The most text one STREAM carries (larger chunks are split at character boundaries),
/// far under every transport's frame limit.
pub(crate) const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// One accepted run, owned by its task.
pub(super) struct Run {
    pub(super) dispatcher: Dispatcher,
    /// The session's store key (its scope and id).
    pub(super) key: String,
    /// The session as stored when the run was admitted: the run writes a new one at its
    /// end.
    pub(super) record: SessionRecord,
    pub(super) caller: Option<Address>,
    /// An unsigned caller's secret, handed back with the answer.
    pub(super) secret: Option<SessionSecret>,
    pub(super) in_reply_to: Option<String>,
    pub(super) files: Vec<Attachment>,
    /// The submitting transport; dropped once it stops taking replies.
    pub(super) reply_tx: Option<mpsc::Sender<Envelope>>,
    /// Whether it takes STREAMs ([`super::Submission::streams`]).
    pub(super) streams: bool,
    pub(super) live: std::sync::Arc<super::LiveRun>,
    pub(super) transport: Transport,
    /// When the request reached the dispatcher.
    pub(super) began: Instant,
}

impl Run {
    /// Keeps a STREAM for resuming clients (in memory until the turn's end), then hands
    /// it to followers and the submitter; signed only if one of them takes it.
    async fn publish(&mut self, seq: u64, env: Envelope) {
        let sign = self.streams && self.reply_tx.is_some();
        let identity = &self.dispatcher.inner.identity;
        let env = self.live.stream(seq, env, sign, identity);
        if !self.streams {
            return;
        }
        if let Some(tx) = &self.reply_tx {
            match tx.send_timeout(env, REPLY_SEND_TIMEOUT).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    warn!("the caller's transport stopped taking replies; the run goes on");
                    self.reply_tx = None;
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => self.reply_tx = None,
            }
        }
    }

    pub(super) async fn execute(mut self, mut start: TurnStart) {
        let dispatcher = self.dispatcher.clone();
        let inner = &dispatcher.inner;
        let worker = inner.workers.clone().acquire_owned().await;
        let began = Instant::now();

        let (chunk_tx, mut chunk_rx) = mpsc::channel::<String>(CHUNK_QUEUE);
        let sink = StreamSink::new(chunk_tx);
        let mut turn = Turn::new(start.prompt.clone(), start.session_id.clone());
        // The history the turn keeps is planned from the sizes of its messages; the run
        // needs the messages themselves only where it writes or returns them whole.
        let older: Vec<usize> = start.history.iter().map(|m| m.content.len()).collect();
        turn.history = if start.from_store && !start.client_held {
            std::mem::take(&mut start.history)
        } else {
            start.history.clone()
        };
        turn.files = self.files.clone();
        turn.caller = self.caller;
        turn.hops = start.hops;
        turn.peers = inner.peers.get().cloned();
        let factory = inner.factory.clone();
        // Polled by this task (a task of its own would cost a hop between threads per
        // turn); a panic in it is caught here. The sink goes with it, so the chunk
        // channel closes when it ends.
        let agent = std::panic::AssertUnwindSafe(async move {
            let mut agent = factory.make();
            agent.run(turn, &sink).await
        })
        .catch_unwind();
        let mut agent = Box::pin(agent);
        let mut ended = None;

        let max_output = inner.config.max_output_bytes;
        let mut stream = Coalescer::default();
        let mut streamed = 0usize;
        let mut overflowed = false;
        loop {
            let due = stream.due();
            // Chunks first, the window's timer last: a timer is set only while the agent
            // is still writing (setting one wakes the thread that waits on timers, a
            // switch between threads an agent that ends at once need not pay).
            tokio::select! {
                biased;
                chunk = chunk_rx.recv() => match chunk {
                    Some(chunk) => {
                        // With every chunk already written: chunks that come together
                        // go out together, one STREAM (one signature), at no delay.
                        let mut next = Some(chunk);
                        while let Some(chunk) = next {
                            streamed += chunk.len();
                            if streamed > max_output {
                                overflowed = true;
                                break;
                            }
                            stream.push(&chunk);
                            next = chunk_rx.try_recv().ok();
                        }
                        if overflowed {
                            // Stop the agent now: what it would write next is lost anyway.
                            break;
                        }
                    }
                    None => break,
                },
                done = &mut agent, if ended.is_none() => ended = Some(done),
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            }
            for text in stream.ready(false) {
                self.stream(&start.session_id, &mut stream.seq, text).await;
            }
        }
        for text in stream.ready(true) {
            self.stream(&start.session_id, &mut stream.seq, text).await;
        }
        // Stopped, if it has not ended: whatever it would write next is lost anyway.
        drop(agent);
        let seq = stream.seq;
        // The channel closed: the agent has ended (dropping its sink), unless it was
        // stopped for its output.
        let outcome = match ended {
            _ if overflowed => Err((
                ErrorCode::OutputTooLarge,
                format!("the agent streamed more than {max_output} bytes (max_output_bytes); it was stopped"),
            )),
            None => Err((
                ErrorCode::AgentCancelled,
                "the agent run was cancelled".to_string(),
            )),
            Some(Ok(Ok(result))) if result.len() > max_output => Err((
                ErrorCode::OutputTooLarge,
                format!(
                    "the agent's answer of {} bytes is over max_output_bytes ({max_output})",
                    result.len()
                ),
            )),
            Some(Ok(Ok(result))) => Ok(result),
            Some(Ok(Err(e))) => Err((ErrorCode::AgentError, format!("the agent failed: {e}"))),
            Some(Err(_)) => Err((ErrorCode::AgentPanicked, "the agent panicked".to_string())),
        };
        // The agent is done: its worker may take the next turn while this one is stored
        // (in `sync` durability, concurrent turns then share a sync of the log).
        drop(worker);
        let duration_ms = began.elapsed().as_millis() as u64;
        inner.metrics.agent_run(began.elapsed());
        let code = match &outcome {
            Ok(_) => Outcome::Ok,
            Err((code, _)) => Outcome::Error(*code),
        };
        let now = unix_now();
        let mut record = SessionRecord {
            status: SessionStatus::Done,
            expires: Some(now + inner.config.result_ttl),
            duration_ms: Some(duration_ms),
            ..self.record.clone()
        };
        let limits = inner.config.history;
        let (history, reply) = match outcome {
            Ok(result) => {
                let turn = [
                    Message {
                        role: "user".into(),
                        content: start.prompt,
                    },
                    Message {
                        role: "assistant".into(),
                        content: result.clone(),
                    },
                ];
                let keep = limits.kept(&older, &turn);
                // A caller that keeps its own history gets it back, as the node would
                // keep it; the others get the session id and the turn's answer.
                let returned = start.client_held.then(|| {
                    let mut all = start.history.clone();
                    all.extend(turn.iter().cloned());
                    all.split_off(all.len() - keep)
                });
                let write = if start.from_store {
                    HistoryWrite::appending(start.span, turn.into(), keep)
                } else {
                    let mut all = start.history;
                    all.extend(turn);
                    HistoryWrite::replacing(start.span, all, keep)
                };
                record.history = write.result();
                record.session = session_value(&start.session_id, None, &start.extra);
                record.result = Some(result.clone());
                let mut session =
                    session_value(&start.session_id, returned.as_deref(), &start.extra);
                // An unsigned caller needs its secret to read or continue the session; in
                // `session` too, which Python clients pass back as it came.
                if let Some(secret) = &self.secret {
                    session["session_secret"] = json!(secret.as_str());
                }
                let mut body = json!({
                    "session_id": start.session_id,
                    "status": SessionStatus::Done.as_str(),
                    "result": result,
                    "duration_ms": duration_ms,
                    "session": session,
                    "chunks": seq,
                });
                if let Some(secret) = &self.secret {
                    body["session_secret"] = json!(secret.as_str());
                }
                (Some(write), self.reply(Kind::Output, body))
            }
            Err((code, message)) => {
                warn!(%code, %message, "agent run failed");
                record.status = SessionStatus::Failed;
                record.session = session_value(&start.session_id, None, &start.extra);
                record.error = Some(message.clone());
                // A history the caller sent (or a record held inline) is kept as it came.
                let write = (!start.from_store).then(|| {
                    let keep = start.history.len();
                    HistoryWrite::replacing(start.span, start.history, keep)
                });
                if let Some(w) = &write {
                    record.history = w.result();
                }
                let mut body = json!({
                    "session_id": start.session_id,
                    "status": SessionStatus::Failed.as_str(),
                    "code": code.as_str(),
                    "message": message,
                    "error": message,
                    "duration_ms": duration_ms,
                    "chunks": seq,
                });
                if let Some(secret) = &self.secret {
                    body["session_secret"] = json!(secret.as_str());
                }
                (write, self.reply(Kind::Error, body))
            }
        };
        // One job keeps the final reply and marks the session finished (in that order,
        // so a follower that sees it finished finds the reply), answered as the store's
        // durability says: the one store round trip on the answer's path.
        let mut kept = self.live.kept();
        kept.push((FINAL_SEQ, reply.to_flat_string().into_bytes()));
        let reply = match inner
            .store
            .finish_turn(self.key.clone(), history, kept, record)
            .await
        {
            Ok(()) => reply,
            Err(e) => {
                warn!(error = %e, "could not store the session result");
                self.reply(
                    Kind::Error,
                    json!({"session_id": start.session_id, "status": SessionStatus::Failed.as_str(), "code": ErrorCode::Internal.as_str(),
                           "message": "the result could not be stored",
                           "error": "the result could not be stored"}),
                )
            }
        };
        let code = match reply.kind() {
            Some(Kind::Error) if code == Outcome::Ok => Outcome::Error(ErrorCode::Internal),
            _ => code,
        };
        // Counted before the answer goes out, so a caller that reads `/metrics` right
        // after its answer sees its request.
        let took = self.began.elapsed();
        inner
            .metrics
            .request(self.transport, crate::metrics::Route::Input, code, took);
        info!(
            transport = %self.transport,
            caller = %self.caller.map_or_else(|| "anonymous".to_owned(), |a| a.short()),
            session = %start.session_id,
            %code,
            duration_ms = took.as_millis() as u64,
            "request"
        );
        self.live.finish(&reply);
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send_timeout(reply, REPLY_SEND_TIMEOUT).await;
        }
    }

    /// Keeps and sends one STREAM (signed where `publish` says).
    async fn stream(&mut self, session_id: &str, seq: &mut u64, chunk: String) {
        *seq += 1;
        let payload = self.payload(json!({"session_id": session_id, "seq": *seq, "chunk": chunk}));
        let env = Envelope::flat_unsigned(
            &self.dispatcher.inner.identity,
            Kind::Stream,
            self.caller,
            payload,
        );
        self.publish(*seq, env).await;
    }

    fn reply(&self, kind: Kind, body: Value) -> Envelope {
        let payload = self.payload(body);
        Envelope::sign_flat(&self.dispatcher.inner.identity, kind, self.caller, payload)
    }

    fn payload(&self, body: Value) -> serde_json::Map<String, Value> {
        let Value::Object(mut payload) = body else {
            unreachable!("replies are JSON objects")
        };
        if let Some(id) = &self.in_reply_to {
            payload.insert("in_reply_to".into(), id.clone().into());
        }
        payload
    }
}

/// Joins an agent's chunks into STREAMs: at most one per [`COALESCE_WINDOW`], each at
/// most [`MAX_CHUNK_BYTES`].
#[derive(Default)]
struct Coalescer {
    pending: String,
    /// When the last STREAM went out.
    last: Option<tokio::time::Instant>,
    /// STREAMs sent so far.
    seq: u64,
}

impl Coalescer {
    fn push(&mut self, chunk: &str) {
        self.pending.push_str(chunk);
    }

    /// When what is pending is due to go out, if anything is.
    fn due(&self) -> Option<tokio::time::Instant> {
        if self.pending.is_empty() {
            return None;
        }
        Some(
            self.last
                .map_or_else(tokio::time::Instant::now, |t| t + COALESCE_WINDOW),
        )
    }

    /// The STREAM texts to send now: full-size pieces always, the rest once its window
    /// has passed (or at the end, with `all`).
    fn ready(&mut self, all: bool) -> Vec<String> {
        let mut out = Vec::new();
        while self.pending.len() > MAX_CHUNK_BYTES {
            let mut cut = MAX_CHUNK_BYTES;
            while !self.pending.is_char_boundary(cut) {
                cut -= 1;
            }
            let rest = self.pending.split_off(cut);
            out.push(std::mem::replace(&mut self.pending, rest));
        }
        let now = tokio::time::Instant::now();
        let window_over = self.last.is_none_or(|t| t + COALESCE_WINDOW <= now);
        if !self.pending.is_empty() && (all || window_over) {
            out.push(std::mem::take(&mut self.pending));
        }
        if !out.is_empty() {
            self.last = Some(now);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn chunks_faster_than_the_window_are_joined_and_big_ones_split() {
        let mut c = Coalescer::default();
        c.push("a ");
        assert_eq!(c.ready(false), vec!["a "], "the first chunk goes at once");
        c.push("b ");
        c.push("c ");
        assert!(c.ready(false).is_empty(), "within the window: held");
        tokio::time::advance(COALESCE_WINDOW).await;
        assert_eq!(c.ready(false), vec!["b c "]);

        tokio::time::advance(COALESCE_WINDOW).await;
        let big = "é".repeat(MAX_CHUNK_BYTES); // two bytes each
        c.push(&big);
        let pieces = c.ready(true);
        assert!(pieces.iter().all(|p| p.len() <= MAX_CHUNK_BYTES));
        assert_eq!(
            pieces.concat(),
            big,
            "split at character boundaries, nothing lost"
        );
    }
}
