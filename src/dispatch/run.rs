//! One accepted run: the agent on a fresh instance, its chunks as signed STREAM replies,
//! then the session stored and the final OUTPUT or ERROR.

use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn, Instrument};

use super::scope::SessionSecret;
use super::turn::{session_value, TurnStart};
use super::{Dispatcher, CHUNK_QUEUE, REPLY_SEND_TIMEOUT};
use crate::agent::{Attachment, Message, StreamSink, Turn};
use crate::envelope::{unix_now, Envelope, Kind};
use crate::identity::Address;
use crate::metrics::{Outcome, Transport};
use crate::proto::ErrorCode;
use crate::store::{SessionRecord, SessionStatus, FINAL_SEQ};

/// One accepted run, owned by its task.
pub(super) struct Run {
    pub(super) dispatcher: Dispatcher,
    /// The session's store key (its scope and id).
    pub(super) key: String,
    /// The session as stored when the run was admitted.
    pub(super) record: SessionRecord,
    pub(super) caller: Option<Address>,
    /// An unsigned caller's secret, handed back with the answer.
    pub(super) secret: Option<SessionSecret>,
    pub(super) in_reply_to: Option<String>,
    pub(super) files: Vec<Attachment>,
    /// The submitting transport; dropped once it stops taking replies.
    pub(super) reply_tx: Option<mpsc::Sender<Envelope>>,
    pub(super) live_tx: broadcast::Sender<Envelope>,
    pub(super) transport: Transport,
    /// When the request reached the dispatcher.
    pub(super) began: Instant,
}

impl Run {
    /// Keeps a reply for resuming clients, then hands it to followers and the submitter.
    async fn publish(&mut self, seq: u64, env: Envelope) {
        let store = &self.dispatcher.inner.store;
        if let Ok(bytes) = serde_json::to_vec(&env.to_flat_json()) {
            if let Err(e) = store.put_reply(self.key.clone(), seq, bytes).await {
                warn!(error = %e, "keeping a reply for resuming clients failed");
            }
        }
        let _ = self.live_tx.send(env.clone());
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

    pub(super) async fn execute(mut self, start: TurnStart) {
        let dispatcher = self.dispatcher.clone();
        let inner = &dispatcher.inner;
        let _worker = inner.workers.clone().acquire_owned().await;
        let began = Instant::now();

        let (chunk_tx, mut chunk_rx) = mpsc::channel::<String>(CHUNK_QUEUE);
        let sink = StreamSink::new(chunk_tx);
        let mut turn = Turn::new(start.prompt.clone(), start.session_id.clone());
        turn.history = start.history.clone();
        turn.files = self.files.clone();
        turn.caller = self.caller;
        turn.hops = start.hops;
        turn.peers = inner.peers.get().cloned();
        let factory = inner.factory.clone();
        // Its own task, so that a panic in the agent is caught as a JoinError; in this
        // run's span, so the agent's own logs carry the request's id.
        let agent_task = tokio::spawn(
            async move {
                let mut agent = factory.make();
                agent.run(turn, &sink).await
            }
            .instrument(tracing::Span::current()),
        );

        let mut seq: u64 = 0;
        while let Some(chunk) = chunk_rx.recv().await {
            seq += 1;
            let env = self.reply(
                Kind::Stream,
                json!({"session_id": start.session_id, "seq": seq, "chunk": chunk}),
            );
            self.publish(seq, env).await;
        }
        let outcome = match agent_task.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err((ErrorCode::AgentError, format!("the agent failed: {e}"))),
            Err(e) if e.is_panic() => {
                Err((ErrorCode::AgentPanicked, "the agent panicked".to_string()))
            }
            Err(_) => Err((
                ErrorCode::AgentCancelled,
                "the agent run was cancelled".to_string(),
            )),
        };
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
        let reply = match outcome {
            Ok(result) => {
                let mut history = start.history;
                history.push(Message {
                    role: "user".into(),
                    content: start.prompt,
                });
                history.push(Message {
                    role: "assistant".into(),
                    content: result.clone(),
                });
                record.session = session_value(&start.session_id, &history, &start.extra);
                record.result = Some(result.clone());
                let mut body = json!({
                    "session_id": start.session_id,
                    "status": SessionStatus::Done.as_str(),
                    "result": result,
                    "duration_ms": duration_ms,
                    "session": record.session,
                    "chunks": seq,
                });
                // An unsigned caller needs its secret to read or continue the session; in
                // `session` too, which Python clients pass back as it came.
                if let Some(secret) = &self.secret {
                    body["session_secret"] = json!(secret.as_str());
                    body["session"]["session_secret"] = json!(secret.as_str());
                }
                self.reply(Kind::Output, body)
            }
            Err((code, message)) => {
                warn!(%code, %message, "agent run failed");
                record.status = SessionStatus::Failed;
                record.session = session_value(&start.session_id, &start.history, &start.extra);
                record.error = Some(message.clone());
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
                self.reply(Kind::Error, body)
            }
        };
        // The final reply is kept before the session is marked finished, so a follower
        // that sees the session finished always finds it.
        if let Ok(bytes) = serde_json::to_vec(&reply.to_flat_json()) {
            if let Err(e) = inner
                .store
                .put_reply(self.key.clone(), FINAL_SEQ, bytes)
                .await
            {
                warn!(error = %e, "keeping the final reply failed");
            }
        }
        let reply = match inner.store.put_session(self.key.clone(), record).await {
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
        inner.metrics.request(self.transport, "input", code, took);
        info!(
            transport = %self.transport,
            caller = %self.caller.map_or_else(|| "anonymous".to_owned(), |a| a.short()),
            session = %start.session_id,
            %code,
            duration_ms = took.as_millis() as u64,
            "request"
        );
        let _ = self.live_tx.send(reply.clone());
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send_timeout(reply, REPLY_SEND_TIMEOUT).await;
        }
    }

    fn reply(&self, kind: Kind, body: Value) -> Envelope {
        let Value::Object(mut payload) = body else {
            unreachable!("replies are JSON objects")
        };
        if let Some(id) = &self.in_reply_to {
            payload.insert("in_reply_to".into(), id.clone().into());
        }
        Envelope::sign_flat(&self.dispatcher.inner.identity, kind, self.caller, payload)
    }
}
