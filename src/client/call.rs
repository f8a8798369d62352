//! One turn over an open path: send the signed INPUT, then read and verify every frame
//! of the answer (signer, recipient, session, the request answered, freshness, order).

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::path::{open_path, p2p_error, remember, Path};
use super::socket::Frame;
use super::{Answer, CallError, Remote};
use crate::envelope::{unix_now, Envelope, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::Address;
use crate::proto::{input_frame, ErrorCode, FrameType, Object, RelayError};
use crate::transport::p2p::wire;

/// What arrived for a call.
enum Incoming {
    Signed(Envelope),
    /// An unsigned ERROR from the relay: it can report failure, never a result.
    RelayError(RelayError),
    /// An unsigned frame on a link only the agent can write on (inside a seal it signed,
    /// or HTTP over TLS or loopback): the agent's own. A Python host's OUTPUT, ERROR and
    /// progress events are unsigned.
    Unsigned(Object),
    Other,
}

/// Sends of one INPUT over the swarm, when a new stream dies before any reply.
const P2P_SEND_ATTEMPTS: u32 = 4;

/// A call's stream over the swarm, holding its slot in the per-peer call limit.
struct CallStream {
    stream: libp2p::Stream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Remote {
    /// Sends a prompt; `on_chunk` sees each verified STREAM chunk as it arrives.
    pub async fn input_streaming(
        &mut self,
        prompt: &str,
        mut on_chunk: impl FnMut(&str),
    ) -> Result<Answer, CallError> {
        let mut session_id = self
            .session_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut input = self.sign_input(prompt, &session_id);
        let mut sends = 0;
        let mut stream = loop {
            sends += 1;
            // A socket opens its session with CONNECT first; the agent may put it in
            // another session than asked (a Python host does, for one it does not own).
            let sent = match self.open_session(&session_id).await {
                Ok(Some(assigned)) => {
                    session_id = assigned;
                    input = self.sign_input(prompt, &session_id);
                    self.send(&input).await
                }
                Ok(None) => self.send(&input).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(stream) => break stream,
                // A swarm stream reset while the INPUT was written: try a new one.
                Err(CallError::Disconnected(why))
                    if matches!(self.path, Path::P2p { .. }) && sends < P2P_SEND_ATTEMPTS =>
                {
                    tracing::debug!(%why, sends, "call stream dropped while sending; resending");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(sends))).await;
                }
                // The path broke before the INPUT left: the next path can take it.
                Err(
                    e @ (CallError::Disconnected(_)
                    | CallError::Offline(_)
                    | CallError::Unreachable { .. }),
                ) if !self.fallbacks.is_empty() => {
                    tracing::debug!(error = %e, path = self.via.as_str(), "path failed; falling back");
                    self.fall_back().await?;
                }
                Err(e) => return Err(e),
            }
        };
        let input_id = input.id().unwrap_or_default().to_owned();

        // Over the swarm a new stream can be dropped before the agent reads it (libp2p
        // hands inbound streams over one at a time): resend the same signed INPUT. It
        // cannot run twice; at worst the agent answers `replayed`.
        let mut first = None;
        for attempt in 1..=P2P_SEND_ATTEMPTS {
            match self.next(&mut stream).await {
                Ok(incoming) => {
                    first = Some(incoming);
                    break;
                }
                Err(CallError::Disconnected(why))
                    if matches!(self.path, Path::P2p { .. }) && attempt < P2P_SEND_ATTEMPTS =>
                {
                    tracing::debug!(%why, attempt, "call stream dropped before any reply; resending");
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    stream = self.send(&input).await?;
                }
                Err(e) => return Err(e),
            }
        }
        let mut chunks = Vec::new();
        loop {
            let next = match first.take() {
                Some(incoming) => incoming,
                None => self.next(&mut stream).await?,
            };
            let env = match next {
                Incoming::Signed(env) => env,
                // Unsigned and in the clear: the relay's word, or on a direct socket a host's
                // that does not seal. Either can refuse, never answer.
                Incoming::RelayError(e) if matches!(self.path, Path::Direct(_)) => {
                    return Err(CallError::Refused {
                        code: e.code,
                        message: e.error,
                    })
                }
                Incoming::RelayError(e) => return Err(relay_error(e, self.address)),
                Incoming::Unsigned(obj) => match self.unsigned_reply(&obj, &session_id, &chunks) {
                    Some(done) => return done,
                    None => continue,
                },
                Incoming::Other => continue,
            };
            self.check(&env, &session_id)?;
            match env.kind() {
                Some(Kind::Stream) => {
                    if env.str_field("in_reply_to") != Some(input_id.as_str()) {
                        return Err(CallError::Tampered(
                            "a chunk answers another request".into(),
                        ));
                    }
                    let seq = env.payload.get("seq").and_then(Value::as_u64).unwrap_or(0);
                    let expected = chunks.len() as u64 + 1;
                    if seq != expected {
                        return Err(CallError::Tampered(format!(
                            "chunk {seq} arrived where {expected} was due"
                        )));
                    }
                    let chunk = env.str_field("chunk").unwrap_or_default().to_owned();
                    on_chunk(&chunk);
                    chunks.push(chunk);
                }
                Some(Kind::Output) => {
                    if env.str_field("in_reply_to") != Some(input_id.as_str()) {
                        return Err(CallError::Tampered(
                            "the result answers another request".into(),
                        ));
                    }
                    let sent = env
                        .payload
                        .get("chunks")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    // HTTP carries no stream: only the result, which is whole.
                    let streamed = !matches!(self.path, Path::Http(_));
                    if streamed && sent != chunks.len() as u64 {
                        return Err(CallError::Tampered(format!(
                            "the agent sent {sent} chunks but {} arrived",
                            chunks.len()
                        )));
                    }
                    self.session_id = Some(session_id.clone());
                    self.session_state = env.payload.get("session").cloned();
                    return Ok(Answer {
                        result: env.str_field("result").unwrap_or_default().to_owned(),
                        session_id,
                        chunks,
                        duration_ms: env
                            .payload
                            .get("duration_ms")
                            .and_then(Value::as_u64)
                            .unwrap_or(0),
                        session: env.payload.get("session").cloned().unwrap_or(Value::Null),
                    });
                }
                Some(Kind::Error) => {
                    // A refusal answers this INPUT, or (a frame the node could not read)
                    // none: an old ERROR replayed by a relay answers another.
                    if env
                        .str_field("in_reply_to")
                        .is_some_and(|id| id != input_id)
                    {
                        return Err(CallError::Tampered(
                            "the error answers another request".into(),
                        ));
                    }
                    let code = env
                        .str_field("code")
                        .map_or(ErrorCode::Unknown, ErrorCode::parse);
                    let message = env.str_field("message").unwrap_or("").to_owned();
                    return Err(if code.is_agent_failure() {
                        CallError::Failed { code, message }
                    } else {
                        CallError::Refused { code, message }
                    });
                }
                _ => {}
            }
        }
    }

    /// The signed INPUT of a turn in `session_id`. `nonce` is what a Python host requires
    /// of every signed command (ours uses the id).
    fn sign_input(&self, prompt: &str, session_id: &str) -> Envelope {
        let mut payload = Map::new();
        payload.insert("prompt".into(), json!(prompt));
        // A first turn names its new session with an empty history: over HTTP a session
        // id alone must be one the agent already has.
        let session = match &self.session_id {
            Some(_) => json!({ "session_id": session_id }),
            None => json!({ "session_id": session_id, "messages": [] }),
        };
        payload.insert("session".into(), session);
        payload.insert("nonce".into(), json!(uuid::Uuid::new_v4().to_string()));
        if self.hops > 0 {
            payload.insert("hops".into(), json!(self.hops));
        }
        Envelope::sign(&self.identity, Kind::Input, Some(self.address), payload)
    }

    /// On a WebSocket path, CONNECTs the socket to `session_id` unless it is in it
    /// already; `Some(id)` when the agent put it in another session.
    async fn open_session(&mut self, session_id: &str) -> Result<Option<String>, CallError> {
        let (Path::Direct(link) | Path::Relay(link)) = &mut self.path else {
            return Ok(None);
        };
        if link.connected.as_deref() == Some(session_id) {
            return Ok(None);
        }
        let assigned = link
            .connect(
                &self.identity,
                self.address,
                session_id,
                self.session_state.as_ref(),
                self.reply_timeout,
            )
            .await?;
        Ok((assigned != session_id).then_some(assigned))
    }

    /// A Python host's unsigned OUTPUT or ERROR, read from inside a seal: `Some` when it
    /// ends the turn. Its progress events (`tool_call`, `llm_call`, …) are skipped.
    fn unsigned_reply(
        &mut self,
        obj: &Object,
        session_id: &str,
        chunks: &[String],
    ) -> Option<Result<Answer, CallError>> {
        let str_of = |k: &str| obj.get(k).and_then(Value::as_str);
        match FrameType::of(obj) {
            Some(FrameType::Output) => {
                let session_id = str_of("session_id").unwrap_or(session_id).to_owned();
                self.session_id = Some(session_id.clone());
                self.session_state = obj.get("session").cloned().filter(Value::is_object);
                Some(Ok(Answer {
                    result: str_of("result").unwrap_or_default().to_owned(),
                    session_id,
                    chunks: chunks.to_vec(),
                    duration_ms: obj.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
                    session: obj.get("session").cloned().unwrap_or(Value::Null),
                }))
            }
            Some(FrameType::Error) => {
                let code = str_of("code").map_or(ErrorCode::Unknown, ErrorCode::parse);
                let message = str_of("message")
                    .or(str_of("error"))
                    .unwrap_or("")
                    .to_owned();
                Some(Err(if code.is_agent_failure() {
                    CallError::Failed { code, message }
                } else {
                    CallError::Refused { code, message }
                }))
            }
            _ => None,
        }
    }

    /// Switches to the next path that connects.
    async fn fall_back(&mut self) -> Result<(), CallError> {
        let mut last = CallError::NoPath;
        while !self.fallbacks.is_empty() {
            let via = self.fallbacks.remove(0);
            match open_path(via, self.address, &self.options, &self.identity).await {
                Ok(path) => {
                    self.path = path;
                    self.via = via;
                    remember(self.address, via);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends the INPUT; over the swarm this opens the call's own stream.
    async fn send(&mut self, input: &Envelope) -> Result<Option<CallStream>, CallError> {
        match &mut self.path {
            Path::Direct(link) | Path::Relay(link) => {
                link.send(input_frame(input, &self.address)).await?;
                Ok(None)
            }
            Path::Http(http) => {
                // The session rides at the top level, where a Python host reads it (with
                // the state it returned last, which it merges).
                let mut body = input.to_nested_json();
                let named = input.payload.get("session").cloned();
                let state = self.session_state.clone().filter(|s| {
                    s.get("session_id") == named.as_ref().and_then(|n| n.get("session_id"))
                });
                if let Some(session) = state.or(named) {
                    body["session"] = session;
                }
                let res = http
                    .client
                    .post(http.url.clone())
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_timeout() {
                            CallError::Timeout(self.reply_timeout)
                        } else {
                            CallError::Disconnected(e.to_string())
                        }
                    })?;
                let ok = res.status().is_success();
                let status = res.status().as_u16();
                let mut answer = match res.json::<Value>().await {
                    Ok(Value::Object(obj)) => obj,
                    _ => {
                        return Err(CallError::Disconnected(format!(
                            "HTTP {status} without a JSON answer"
                        )))
                    }
                };
                // A Python host's answer names no type.
                if !answer.contains_key("type") {
                    let kind = if ok {
                        FrameType::Output
                    } else {
                        FrameType::Error
                    };
                    answer.insert("type".into(), json!(kind.as_str()));
                }
                http.answer = Some(answer);
                Ok(None)
            }
            Path::P2p { swarm, .. } => {
                let address = self.address;
                let (mut stream, permit) = swarm
                    .open_call(address)
                    .await
                    .map_err(|e| p2p_error(e, address))?;
                wire::write_frame(&mut stream, input)
                    .await
                    .map_err(|e| CallError::Disconnected(e.to_string()))?;
                Ok(Some(CallStream {
                    stream,
                    _permit: permit,
                }))
            }
        }
    }

    /// The next frame of the call, waiting at most the reply timeout.
    async fn next(&mut self, stream: &mut Option<CallStream>) -> Result<Incoming, CallError> {
        let wait = self.reply_timeout;
        match (&mut self.path, stream) {
            (_, Some(call)) => {
                match tokio::time::timeout(
                    wait,
                    wire::read_frame_within(&mut call.stream, wire::MAX_REPLY_FRAME_BYTES),
                )
                .await
                {
                    Err(_) => Err(CallError::Timeout(wait)),
                    Ok(Ok(Some(env))) => Ok(Incoming::Signed(env)),
                    Ok(Ok(None)) => Err(CallError::Disconnected(
                        "the agent closed the stream without an answer".into(),
                    )),
                    Ok(Err(wire::WireError::Io(e))) => Err(CallError::Disconnected(e.to_string())),
                    Ok(Err(e)) => Err(CallError::Tampered(format!("undecodable reply: {e}"))),
                }
            }
            (Path::Direct(link) | Path::Relay(link), None) => {
                let obj = match link.next(wait).await? {
                    None => return Ok(Incoming::Other),
                    Some(Frame::Sealed(obj)) if !obj.contains_key("signature") => {
                        if FrameType::of(&obj) == Some(FrameType::Ping) {
                            link.send(json!({"type": FrameType::Pong.as_str()}).to_string())
                                .await?;
                            return Ok(Incoming::Other);
                        }
                        return Ok(Incoming::Unsigned(obj));
                    }
                    Some(frame) => frame.into_object(),
                };
                if !obj.contains_key("signature") {
                    return Ok(match FrameType::of(&obj) {
                        Some(FrameType::Error) => {
                            Incoming::RelayError(RelayError::from_object(&obj))
                        }
                        Some(FrameType::Ping) => {
                            link.send(json!({"type": FrameType::Pong.as_str()}).to_string())
                                .await?;
                            Incoming::Other
                        }
                        _ => Incoming::Other,
                    });
                }
                Envelope::from_flat(&obj)
                    .map(Incoming::Signed)
                    .map_err(|e| CallError::Tampered(e.to_string()))
            }
            (Path::Http(http), None) => {
                let Some(obj) = http.answer.take() else {
                    return Err(CallError::Disconnected("no answer".into()));
                };
                if obj.contains_key("signature") {
                    return Envelope::from_flat(&obj)
                        .map(Incoming::Signed)
                        .map_err(|e| CallError::Tampered(e.to_string()));
                }
                if !http.private {
                    return Err(CallError::Tampered(
                        "an unsigned answer over plain HTTP beyond loopback could come from anyone"
                            .into(),
                    ));
                }
                Ok(Incoming::Unsigned(obj))
            }
            (Path::P2p { .. }, None) => Err(CallError::Disconnected("no stream".into())),
        }
    }

    /// Verifies a signed reply: signer, recipient, session, freshness.
    fn check(&self, env: &Envelope, session_id: &str) -> Result<(), CallError> {
        let signer = env
            .verify()
            .map_err(|e| CallError::Tampered(e.to_string()))?;
        if signer != self.address {
            return Err(CallError::Tampered(format!(
                "signed by {}, not by the agent called ({})",
                signer.short(),
                self.address.short()
            )));
        }
        if env.to().ok().flatten() != Some(self.identity.address()) {
            return Err(CallError::Tampered(
                "the answer is addressed to someone else".into(),
            ));
        }
        if env.str_field("session_id") != Some(session_id) {
            return Err(CallError::Tampered(
                "the answer belongs to another session".into(),
            ));
        }
        let ts = env.timestamp().unwrap_or(0);
        if unix_now().abs_diff(ts) > MAX_CLOCK_SKEW_SECS {
            return Err(CallError::Tampered("the answer is stale".into()));
        }
        Ok(())
    }
}

pub(super) fn relay_error(e: RelayError, address: Address) -> CallError {
    match e.code {
        ErrorCode::AgentOffline | ErrorCode::AgentDisconnected => {
            CallError::Offline(address.to_string())
        }
        ErrorCode::UnknownAgent => CallError::Unknown(address.to_string()),
        code => CallError::Relay {
            code,
            message: e.error,
        },
    }
}
