//! The relay transport: the node's outbound WebSocket to a relay, so that it is reachable
//! by address with no open port.
//!
//! Announces itself (signed, form B), re-announces every 30 s, and reconnects with
//! capped backoff and jitter. With fallback relays it moves to the next one as soon as
//! the current one fails, and backs off only after a whole round failed. Relayed frames carry a `session_id`; INPUT, CONNECT and
//! RESUME go through the same dispatcher as every other transport, and every reply goes
//! back tagged with its session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dispatch::{Dispatcher, Origin, Reader, Refusal, Rejected, Route, Transport};
use crate::envelope::{unix_now, Envelope};
use crate::identity::Address;
use crate::proto::seal::{self, SealReceiver, SealSender};
use crate::proto::{
    signed_announce, ClientFrame, FrameType, NodeFrame, Object, RelayToAgent, RelayUrl,
};
use crate::trust::Caller;

/// How often the node re-announces (the relay forgets an agent after 120 s of silence).
const REANNOUNCE_EVERY: Duration = Duration::from_secs(30);
/// A re-announce not answered within this long means the link is dead even if TCP has
/// not noticed (a partition leaves a half-open socket): reconnect.
const ANNOUNCE_OK_WITHIN: Duration = Duration::from_secs(15);
/// How long to wait for a connection and its ANNOUNCE_OK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between reconnection attempts: 1, 2, 3, 3, … s, plus up to 1 s of jitter.
/// Short enough that a node is back within 5 s of its relay's return.
const BACKOFF_SECS: [u64; 3] = [1, 2, 3];
/// Frames queued towards the relay.
const OUTBOUND_QUEUE: usize = 1024;
/// How long a reply may wait for room towards the relay before the link counts as dead.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Relayed sessions with CONNECT state kept at once.
const MAX_CONNECTED_SESSIONS: usize = 4096;
/// Largest frame taken from the relay.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Largest frame sent to a relay that does not say its limit in ANNOUNCE_OK (our relay's
/// default).
const DEFAULT_RELAY_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Where the link to the relay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Connecting,
    Connected,
    Disconnected,
}

impl LinkState {
    /// Every state, for the `oonode_relay_link{state}` gauge.
    pub(crate) const ALL: [LinkState; 3] = [
        LinkState::Connecting,
        LinkState::Connected,
        LinkState::Disconnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Disconnected => "disconnected",
        }
    }
}

/// Why one connection to the relay ended before it was accepted.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connection timed out")]
    ConnectTimeout,
    #[error("no answer to ANNOUNCE")]
    NoAnswer,
    #[error("{0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A failed TLS handshake, as one sentence.
    #[error("{0}")]
    Tls(String),
    #[error("relay closed the connection")]
    Closed,
    #[error("unexpected answer to ANNOUNCE: {0}")]
    Unexpected(String),
    #[error("relay refused the announce: {0}")]
    Refused(String),
}

/// The relay link's state, shown in `/health`, `/info` and the banner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    pub url: String,
    pub state: LinkState,
    /// Unix time of the last change of state.
    pub since: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone)]
pub(crate) struct RelayLink {
    status: Arc<Mutex<RelayStatus>>,
}

impl RelayLink {
    pub fn status(&self) -> RelayStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_url(&self, url: &RelayUrl) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).url = url.to_string();
    }

    fn set(&self, state: LinkState, error: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s.state != state {
            s.since = unix_now();
        }
        s.state = state;
        if error.is_some() || state == LinkState::Connected {
            s.last_error = error;
        }
    }
}

/// What the node announces.
pub(crate) struct AnnounceInfo {
    pub summary: String,
    pub endpoints: Vec<String>,
}

/// Starts the relay link in the background; it runs until `stop`. It announces on
/// `url`, and on the `fallbacks` in turn when the one in use fails. A `wss://` relay must
/// present a certificate that `tls` trusts.
pub(crate) fn spawn(
    url: RelayUrl,
    fallbacks: Vec<RelayUrl>,
    tls: Arc<rustls::ClientConfig>,
    dispatcher: Dispatcher,
    info: AnnounceInfo,
    stop: CancellationToken,
) -> RelayLink {
    let link = RelayLink {
        status: Arc::new(Mutex::new(RelayStatus {
            url: url.to_string(),
            state: LinkState::Connecting,
            since: unix_now(),
            last_error: None,
        })),
    };
    let mut relays = vec![url.clone()];
    relays.extend(fallbacks.into_iter().filter(|f| !f.same_relay(&url)));
    let runner = Runner {
        url,
        relays,
        tls,
        dispatcher,
        info,
        link: link.clone(),
    };
    tokio::spawn(async move { runner.run(stop).await });
    link
}

struct Runner {
    /// The relay in use.
    url: RelayUrl,
    /// Every relay the link may use, in order; `url` is one of them.
    relays: Vec<RelayUrl>,
    tls: Arc<rustls::ClientConfig>,
    dispatcher: Dispatcher,
    info: AnnounceInfo,
    link: RelayLink,
}

impl Runner {
    async fn run(mut self, stop: CancellationToken) {
        let mut attempt = 0usize;
        // Relays that failed in a row since the last accepted announce.
        let mut failed_in_a_row = 0usize;
        loop {
            self.link.set(LinkState::Connecting, None);
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.connect_and_serve(&stop) => r,
            };
            match outcome {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => {
                    attempt = 0;
                    failed_in_a_row = 1;
                    warn!(url = %self.url, "relay connection closed; reconnecting");
                    self.link
                        .set(LinkState::Disconnected, Some("connection closed".into()));
                }
                Err(e) => {
                    failed_in_a_row += 1;
                    warn!(url = %self.url, error = %e, "relay unavailable; retrying");
                    self.link.set(LinkState::Disconnected, Some(e.to_string()));
                }
            }
            // Another relay to try: at once (a dead relay's agents reappear on the next
            // within a second or so), until every relay failed in this round.
            if self.relays.len() > 1 && failed_in_a_row % self.relays.len() != 0 {
                self.next_relay();
                let jitter = Duration::from_millis(rand::random::<u64>() % 250);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(jitter) => {}
                }
                continue;
            }
            self.next_relay();
            let base = BACKOFF_SECS[attempt.min(BACKOFF_SECS.len() - 1)];
            attempt += 1;
            let jitter = rand::random::<u64>() % 1000;
            let wait = Duration::from_secs(base) + Duration::from_millis(jitter);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Moves to the next relay of the list (no change with one).
    fn next_relay(&mut self) {
        let at = self
            .relays
            .iter()
            .position(|r| r.same_relay(&self.url))
            .unwrap_or(0);
        let next = self.relays[(at + 1) % self.relays.len()].clone();
        if !next.same_relay(&self.url) {
            info!(from = %self.url, to = %next, "moving to the next relay");
            self.link.set_url(&next);
        }
        self.url = next;
    }

    fn announce(&self) -> String {
        let me = self.dispatcher.identity();
        signed_announce(
            me,
            &self.info.summary,
            &self.info.endpoints,
            &self.url.announce(),
            unix_now(),
        )
        .to_string()
    }

    /// One connection: announce, then serve until it closes. `Ok` after a connection
    /// that was accepted, `Err` if it never got that far.
    async fn connect_and_serve(&self, stop: &CancellationToken) -> Result<(), LinkError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(super::ws::READ_BUFFER_BYTES)
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let url = self.url.announce();
        let connect = crate::tls::dial(url.as_str(), Some(config), self.tls.clone());
        let socket = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| LinkError::ConnectTimeout)?
            .map_err(|e| match crate::tls::failure(&e) {
                Some(reason) => LinkError::Tls(reason),
                None => LinkError::Socket(e),
            })?;
        let (mut sink, mut stream) = socket.split();
        sink.send(Message::text(self.announce())).await?;
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, stream.next())
            .await
            .map_err(|_| LinkError::NoAnswer)?;
        let answer = match answer {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Value>(&t) {
                Ok(Value::Object(obj)) => RelayToAgent::decode(obj),
                _ => return Err(LinkError::Unexpected(t.to_string())),
            },
            Some(Ok(other)) => return Err(LinkError::Unexpected(format!("{other:?}"))),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(LinkError::Closed),
        };
        let max_frame = match answer {
            RelayToAgent::AnnounceOk { max_frame_bytes } => {
                max_frame_bytes.unwrap_or(DEFAULT_RELAY_FRAME_BYTES)
            }
            RelayToAgent::Error(e) if !e.error.is_empty() => {
                return Err(LinkError::Refused(e.error))
            }
            _ => return Err(LinkError::Refused("no reason given".into())),
        };
        info!(url = %self.url, address = %self.dispatcher.address(), "announced on the relay");
        self.link.set(LinkState::Connected, None);

        let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
        let dead = CancellationToken::new();
        let writer_dead = dead.clone();
        let writer = tokio::spawn(async move {
            // Sealed sessions' senders: their frames are sealed here, in queue order.
            let mut sealers: HashMap<String, SealSender> = HashMap::new();
            while let Some(next) = out_rx.recv().await {
                let text = match next {
                    Outbound::StartSealing { session_id, sender } => {
                        sealers.insert(session_id, sender);
                        continue;
                    }
                    Outbound::StopSealing(session_id) => {
                        sealers.remove(&session_id);
                        continue;
                    }
                    Outbound::Frame {
                        session_id,
                        must_seal,
                        text,
                    } => match session_id.and_then(|id| Some((sealers.get_mut(&id)?, id))) {
                        Some((sealer, id)) => sealer.seal(&text, Some(&id)),
                        None if must_seal => continue,
                        None => text,
                    },
                };
                if tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::text(text)))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    writer_dead.cancel();
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let mut session = RelayedSessions {
            dispatcher: self.dispatcher.clone(),
            max_frame,
            out: out_tx.clone(),
            dead: dead.clone(),
            origin: Origin::Relay(self.url.base()),
            readers: HashMap::new(),
            sealed: HashMap::new(),
            forwarders: JoinSet::new(),
            answered: true,
        };
        let mut reannounce = tokio::time::interval(REANNOUNCE_EVERY);
        reannounce.tick().await;
        let mut unanswered_since: Option<tokio::time::Instant> = None;
        loop {
            let deadline = unanswered_since.map(|t| t + ANNOUNCE_OK_WITHIN);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = dead.cancelled() => break,
                _ = reannounce.tick() => {
                    if out_tx.try_send(Outbound::clear(self.announce())).is_err() {
                        break;
                    }
                    session.answered = false;
                    unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    warn!(url = %self.url, "the relay did not answer a re-announce; the link is dead");
                    break;
                }
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => session.on_frame(text.as_bytes()).await,
                    Some(Ok(Message::Binary(bytes))) => session.on_frame(&bytes).await,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "relay socket error");
                        break;
                    }
                },
            }
            if session.answered {
                unanswered_since = None;
            }
            while session.forwarders.try_join_next().is_some() {}
        }
        // Accepted runs go on and are stored; a caller can RESUME them later.
        session.forwarders.abort_all();
        drop(session);
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        Ok(())
    }
}

/// What goes to the relay's writer task. Frames of a sealed session are sealed there, so
/// they leave numbered in the order they were queued.
enum Outbound {
    Frame {
        session_id: Option<String>,
        /// The frame belongs to a sealed session: if its seal is gone (the caller left
        /// or the seal broke) the frame is dropped, never sent in the clear.
        must_seal: bool,
        text: String,
    },
    StartSealing {
        session_id: String,
        sender: SealSender,
    },
    StopSealing(String),
}

impl Outbound {
    fn clear(text: String) -> Outbound {
        Outbound::Frame {
            session_id: None,
            must_seal: false,
            text,
        }
    }
}

/// One sealed relayed session.
struct SealedSession {
    /// Opens the caller's frames.
    recv: SealReceiver,
    /// Who sealed it: signed frames inside must be theirs.
    sealed_by: Address,
    /// The conversation a CONNECT on it named, once the dispatcher let the caller in.
    conversation: Option<String>,
}

/// Where a relayed frame belongs: the relay's session id it came on (replies go back
/// there; per-caller state is kept under it) and the conversation it is part of (the
/// same, except on a sealed route whose CONNECT named one).
#[derive(Clone)]
struct Hop {
    route: String,
    conversation: String,
    /// Who sealed the route, for frames that came out of its seal.
    sealed_by: Option<Address>,
    /// The conversation a sealed CONNECT names (read before the route id replaces it).
    asked: Option<String>,
}

/// The sessions relayed over one relay connection.
struct RelayedSessions {
    dispatcher: Dispatcher,
    /// The relay's frame limit: a bigger reply would cost the whole link.
    max_frame: usize,
    out: mpsc::Sender<Outbound>,
    dead: CancellationToken,
    /// This relay, as the origin of what comes through it.
    origin: Origin,
    /// Who reads each relayed session: the caller a CONNECT authenticated, or an
    /// unsigned caller's secret.
    readers: HashMap<String, Reader>,
    /// Sealed sessions by the relay's session id (the route).
    sealed: HashMap<String, SealedSession>,
    forwarders: JoinSet<()>,
    /// Whether the relay answered the last re-announce.
    answered: bool,
}

impl RelayedSessions {
    /// Queues a frame for the relayed session `route` (sealed by the writer if it is).
    fn send(&self, route: &str, text: String) {
        self.queue(Outbound::Frame {
            session_id: Some(route.to_owned()),
            must_seal: self.sealed.contains_key(route),
            text,
        });
    }

    fn queue(&self, next: Outbound) {
        if self.out.try_send(next).is_err() {
            self.dead.cancel();
        }
    }

    /// Answers a refusal with a signed ERROR in `hop`'s conversation, sent on its route.
    fn send_rejected(&self, rejected: Rejected, hop: &Hop) {
        let rejected = Rejected {
            session_id: Some(hop.conversation.clone()),
            ..rejected
        };
        let env = self.dispatcher.error_envelope(&rejected);
        self.send(&hop.route, env.to_flat_string());
    }

    async fn on_frame(&mut self, bytes: &[u8]) {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(bytes) else {
            debug!("unreadable frame from the relay");
            return;
        };
        let route = obj
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // A route id is echoed in every reply (twice when sealed): bound it like any
        // session id, or one caller could make every reply too large for the relay.
        if route
            .as_deref()
            .is_some_and(|r| !crate::proto::valid_session_id(r))
        {
            debug!("relayed frame with an invalid session_id ignored");
            return;
        }
        let mut hop = None;
        if let Some(route) = route {
            if let Some(sealed) = self.sealed.get_mut(&route) {
                // The relay's own `close` comes in the clear; everything else must open.
                if FrameType::of(&obj) == Some(FrameType::Close) {
                    return self.end_session(&route);
                }
                let conversation = sealed.conversation.clone().unwrap_or_else(|| route.clone());
                let sealed_by = sealed.sealed_by;
                let opened = sealed
                    .recv
                    .open(&obj)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        crate::envelope::decode_object(&c, MAX_FRAME_BYTES)
                            .map_err(|e| e.to_string())
                    });
                let mut hop_here = Hop {
                    route: route.clone(),
                    conversation,
                    sealed_by: Some(sealed_by),
                    asked: None,
                };
                let mut inner = match opened {
                    Ok(inner) => inner,
                    Err(why) => {
                        let msg = format!("sealed frame rejected: {why}");
                        self.send_rejected(Refusal::BadRequest(msg).into(), &hop_here);
                        return self.end_session(&route);
                    }
                };
                if let Err(r) = super::ws::check_sealed_signer(&inner, &sealed_by) {
                    return self.send_rejected(r.into(), &hop_here);
                }
                if FrameType::of(&inner) == Some(FrameType::Connect) {
                    hop_here.asked = ClientFrame::connect_session(&inner);
                }
                // A frame that names no session is in the route's conversation (the
                // route itself until a CONNECT was let into one).
                inner.insert(
                    "session_id".into(),
                    Value::String(hop_here.conversation.clone()),
                );
                obj = inner;
                hop = Some(hop_here);
            } else if FrameType::of(&obj) == Some(FrameType::Seal) {
                return self.on_seal(&obj, route);
            }
        }
        let (route, frame) = match RelayToAgent::decode(obj) {
            RelayToAgent::AnnounceOk { .. } => {
                self.answered = true;
                return;
            }
            RelayToAgent::Error(e) => {
                warn!(code = %e.code, error = %e.error, "the relay reported an error");
                return;
            }
            RelayToAgent::Unrouted(kind) => {
                debug!(?kind, "relayed frame without session_id ignored");
                return;
            }
            RelayToAgent::Session { session_id, frame } => (session_id, frame),
        };
        // A clear session: the relay's route is the conversation.
        let hop = hop.unwrap_or_else(|| Hop {
            conversation: route.clone(),
            route,
            sealed_by: None,
            asked: None,
        });
        match frame {
            Ok(ClientFrame::Input(obj)) => self.on_input(obj, &hop).await,
            Ok(ClientFrame::Connect(obj)) => self.on_connect(&obj, &hop).await,
            Ok(ClientFrame::Resume {
                after,
                session_secret,
                ..
            }) => {
                let resumed = super::resume_reader(
                    Some(hop.conversation.clone()),
                    session_secret,
                    &self.reader(&hop.route),
                );
                let (_, reader) = match resumed {
                    Ok(r) => r,
                    Err(r) => return self.send_rejected(r.into(), &hop),
                };
                match self
                    .dispatcher
                    .follow(&hop.conversation, after, &reader)
                    .await
                {
                    Ok(replies) => self.forward(replies, &hop.route),
                    Err(r) => {
                        self.send_rejected(Rejected::from(r).or_to(reader.caller.verified()), &hop)
                    }
                }
            }
            Ok(ClientFrame::Ping) => {
                self.send(&hop.route, NodeFrame::Pong.encode(Some(&hop.conversation)))
            }
            // The caller left; what it started goes on and stays stored.
            Ok(ClientFrame::Close) => self.end_session(&hop.route),
            Ok(ClientFrame::Pong) => {}
            Ok(ClientFrame::Seal(_)) => self.send_rejected(
                Refusal::BadRequest("SEAL must be the session's first frame".into()).into(),
                &hop,
            ),
            Err(e) => self.send_rejected(Refusal::from(e).into(), &hop),
        }
    }

    /// The caller of `route` left, or its seal broke: forget its state. Its runs go on;
    /// their replies are dropped, never sent in the clear (see `Outbound::Frame`).
    fn end_session(&mut self, route: &str) {
        self.readers.remove(route);
        if self.sealed.remove(route).is_some() {
            self.queue(Outbound::StopSealing(route.to_owned()));
        }
    }

    /// A session's first frame was SEAL: answer SEALED_OK in the clear, then seal the
    /// session's frames both ways. A SEAL that does not verify is answered with an ERROR
    /// and the session gets nothing else.
    fn on_seal(&mut self, obj: &Object, route: String) {
        let hop = Hop {
            conversation: route.clone(),
            route: route.clone(),
            sealed_by: None,
            asked: None,
        };
        if self.readers.contains_key(&route) {
            let msg = "SEAL must be the session's first frame".to_string();
            return self.send_rejected(Refusal::BadRequest(msg).into(), &hop);
        }
        if self.sealed.len() >= MAX_CONNECTED_SESSIONS {
            let msg = "too many relayed sessions at once; try again later".to_string();
            return self.send_rejected(Refusal::BadRequest(msg).into(), &hop);
        }
        match seal::accept(obj, self.dispatcher.identity(), unix_now()) {
            Ok(accepted) => {
                let mut reply: Object = serde_json::from_str(&accepted.reply).unwrap_or_default();
                reply.insert("session_id".into(), Value::String(route.clone()));
                self.send(&route, Value::Object(reply).to_string());
                self.queue(Outbound::StartSealing {
                    session_id: route.clone(),
                    sender: accepted.channel.send,
                });
                let sealed = SealedSession {
                    recv: accepted.channel.recv,
                    sealed_by: accepted.sealed_by,
                    conversation: None,
                };
                self.sealed.insert(route, sealed);
            }
            Err(e) => {
                let msg = format!("seal refused: {e}");
                self.send_rejected(Refusal::BadRequest(msg).into(), &hop);
            }
        }
    }

    fn reader(&self, route: &str) -> Reader {
        self.readers
            .get(route)
            .cloned()
            .unwrap_or_else(|| Reader::new(Caller::Unsigned { claimed: None }, None))
    }

    async fn on_input(&mut self, obj: Object, hop: &Hop) {
        let outcome = match super::submission_from_frame(obj, Some(hop.conversation.clone())) {
            Ok(mut submission) => {
                submission.origin = self.origin.clone();
                submission.transport = Transport::Relay;
                submission.secret = self.readers.get(&hop.route).and_then(|r| r.secret.clone());
                self.dispatcher.submit(submission).await
            }
            Err(r) => {
                self.dispatcher.refused_early(
                    Transport::Relay,
                    r.code(),
                    std::time::Instant::now(),
                );
                Err(r.into())
            }
        };
        match outcome {
            Ok(accepted) => {
                // An unsigned caller may RESUME this session later with the same secret.
                if let Some(secret) = accepted.secret.clone() {
                    if self.readers.len() < MAX_CONNECTED_SESSIONS {
                        let reader = Reader::new(Caller::Unsigned { claimed: None }, Some(secret));
                        self.readers.insert(hop.route.clone(), reader);
                    }
                }
                if accepted.session_id != hop.conversation && hop.sealed_by.is_none() {
                    // The signed payload named another session than the relay routes by:
                    // replies still go back on the route, tagged with the signed session.
                    debug!(relay = %hop.route, signed = %accepted.session_id, "relayed INPUT names a different session");
                }
                self.forward(accepted.replies, &hop.route);
            }
            Err(rejected) => self.send_rejected(rejected, hop),
        }
    }

    /// A CONNECT on a route. On a sealed route it may name the conversation (the relay
    /// chose the route before it could see inside); the route keeps it only once the
    /// dispatcher has let this caller into it, and while no other sealed route holds it.
    /// Everything else stays keyed by the route, so naming a conversation gives a caller
    /// nothing it could not get by the dispatcher's rules.
    async fn on_connect(&mut self, obj: &Object, hop: &Hop) {
        if self.readers.len() >= MAX_CONNECTED_SESSIONS && !self.readers.contains_key(&hop.route) {
            let msg = "too many relayed sessions at once; try again later".to_string();
            return self.send_rejected(Refusal::BadRequest(msg).into(), hop);
        }
        let conversation = match hop.sealed_by {
            Some(_) => hop
                .asked
                .clone()
                .unwrap_or_else(|| hop.conversation.clone()),
            None => hop.conversation.clone(),
        };
        let held_elsewhere = self.sealed.iter().any(|(route, s)| {
            *route != hop.route && s.conversation.as_deref() == Some(conversation.as_str())
        });
        let asked = Hop {
            conversation: conversation.clone(),
            ..hop.clone()
        };
        if held_elsewhere || !crate::proto::valid_session_id(&conversation) {
            let msg = format!("session {conversation} is open on another connection");
            return self.send_rejected(Refusal::BadRequest(msg).into(), &asked);
        }
        let began = std::time::Instant::now();
        let result = self
            .dispatcher
            .connect(obj, &conversation, &self.origin, hop.sealed_by.as_ref())
            .await;
        let refused = result.as_ref().err().map(|r| r.refusal.code());
        self.dispatcher
            .count(Transport::Relay, Route::Connect, refused, began);
        match result {
            Ok((reader, status)) => {
                self.readers.insert(hop.route.clone(), reader);
                if let Some(sealed) = self.sealed.get_mut(&hop.route) {
                    sealed.conversation = Some(conversation.clone());
                }
                let connected = NodeFrame::Connected {
                    session_id: conversation.clone(),
                    status,
                };
                self.send(&hop.route, connected.encode(Some(&conversation)));
            }
            Err(rejected) => self.send_rejected(rejected, &asked),
        }
    }

    /// Copies a run's replies to the relay. A relay link that cannot take them within the
    /// send timeout is dead; the run itself goes on.
    fn forward(&mut self, mut replies: mpsc::Receiver<Envelope>, route: &str) {
        let out = self.out.clone();
        let dead = self.dead.clone();
        let dispatcher = self.dispatcher.clone();
        let max_frame = self.max_frame;
        let route = route.to_owned();
        let sealed = self.sealed.contains_key(&route);
        self.forwarders.spawn(async move {
            while let Some(env) = replies.recv().await {
                let mut frame = env.to_flat_string();
                let on_wire = if sealed {
                    SealSender::sealed_len(frame.len(), route.len())
                } else {
                    frame.len()
                };
                if on_wire > max_frame {
                    // Over the relay's limit: fail this answer, not the link. The session
                    // is stored as usual and can be read over HTTP.
                    frame = dispatcher
                        .oversize_reply(&env, on_wire, max_frame)
                        .to_flat_json()
                        .to_string();
                }
                let next = Outbound::Frame {
                    session_id: Some(route.clone()),
                    must_seal: sealed,
                    text: frame,
                };
                if out.send_timeout(next, SEND_TIMEOUT).await.is_err() {
                    dead.cancel();
                    return;
                }
            }
        });
    }
}
