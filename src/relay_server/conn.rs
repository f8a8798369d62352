//! One task per relay connection: agents on `/ws/announce`, callers on `/ws/input`.
//! Each socket has a writer task fed by a bounded queue; a reader that lets its queue
//! fill is disconnected rather than buffered for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{Message, WebSocket};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::{AgentEntry, AgentLink, RelayState, Route};
use crate::envelope::unix_now;
use crate::identity::Address;
use crate::net::SocketFailure;
use crate::proto::{
    session_of, verify_announce, AgentToRelay, CallerToRelay, ErrorCode, Object, RelayError,
    RelayToAgent,
};

/// How long an agent has to send its first ANNOUNCE.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);
/// How long one frame may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay ERROR frame. Relay errors are not signed: the relay has no say over results,
/// it can only fail to deliver them.
fn error_frame(code: ErrorCode, message: &str, session_id: Option<&str>) -> String {
    RelayError::new(code, message)
        .in_session(session_id)
        .encode()
}

/// Tells the agent the largest frame the relay takes, so that it can answer a too-large
/// reply with an error for that session instead of losing its link.
fn announce_ok(st: &RelayState) -> String {
    RelayToAgent::announce_ok(st.config.max_frame_bytes)
}

/// Frames per second with a burst allowance.
struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let burst = self.per_sec * 2.0;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a caller connection last saw a frame, either way.
#[derive(Clone)]
pub(super) struct Activity(Arc<std::sync::Mutex<Instant>>);

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(std::sync::Mutex::new(Instant::now())))
    }

    pub(super) fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// Splits a socket into a reader and a bounded writer task; `closed` fires when the
/// writer fails or falls too far behind.
fn split(
    socket: WebSocket,
    queue: usize,
    closed: CancellationToken,
) -> (SplitStream<WebSocket>, mpsc::Sender<String>) {
    let (mut sink, stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(queue);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = closed.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(text) => match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        _ => {
                            closed.cancel();
                            break;
                        }
                    },
                    None => break,
                },
            }
        }
        // Drain what is already queued (e.g. a last ERROR), briefly.
        while let Ok(text) = rx.try_recv() {
            if tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Text(text.into())),
            )
            .await
            .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    (stream, tx)
}

/// What reading one frame gave.
enum Frame {
    Object(Object),
    /// Readable, but not a JSON object: the connection goes on.
    Invalid(String),
    /// The socket failed (e.g. a frame over the size limit): the connection ends.
    Broken(RelayError),
    Closed,
}

/// The next text (or binary) frame as a JSON object.
async fn next_object(stream: &mut SplitStream<WebSocket>) -> Frame {
    loop {
        let msg = match stream.next().await {
            None => return Frame::Closed,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                return Frame::Broken(match SocketFailure::of(e) {
                    SocketFailure::TooLarge(m) => RelayError::new(ErrorCode::TooLarge, m),
                    SocketFailure::Other(m) => RelayError::new(ErrorCode::SocketError, m),
                })
            }
        };
        let bytes = match msg {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            Message::Close(_) => return Frame::Closed,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(o)) => Frame::Object(o),
            Ok(_) => Frame::Invalid("expected a JSON object".into()),
            Err(e) => Frame::Invalid(format!("invalid JSON: {e}")),
        };
    }
}

pub(super) async fn serve_agent(st: Arc<RelayState>, socket: WebSocket) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());

    let first = tokio::time::timeout(ANNOUNCE_WAIT, next_object(&mut stream)).await;
    let refusal = match first {
        Ok(Frame::Object(obj)) => match AgentToRelay::decode(obj) {
            AgentToRelay::Announce(announce) => {
                match register(&st, &announce, conn, &tx, &closed) {
                    Ok(address) => Ok(address),
                    Err(e) => {
                        debug!(code = %e.code, message = %e.error, "announce refused");
                        Err(e)
                    }
                }
            }
            _ => Err(RelayError::new(
                ErrorCode::BadRequest,
                "the first frame must be ANNOUNCE",
            )),
        },
        Ok(Frame::Invalid(e)) => Err(RelayError::new(ErrorCode::InvalidJson, e)),
        Ok(Frame::Broken(e)) => Err(e),
        Ok(Frame::Closed) => return,
        Err(_) => Err(RelayError::new(
            ErrorCode::Timeout,
            "no ANNOUNCE within 10 s",
        )),
    };
    let address = match refusal {
        Ok(a) => a,
        Err(e) => {
            let _ = tx.try_send(e.encode());
            return;
        }
    };
    let span = info_span!("agent", address = %address.short(), conn);
    async {
        info!("agent online");
        let _ = tx.try_send(announce_ok(&st));
        agent_loop(&st, &mut stream, &tx, &closed, address, conn).await;
        drop_agent(&st, address, conn);
        closed.cancel();
        info!("agent offline");
    }
    .instrument(span)
    .await
}

/// Accepts an ANNOUNCE for a new or the same socket. A newer announce on a new socket
/// replaces the old socket; an older or equal one is a replay and is refused.
fn register(
    st: &RelayState,
    msg: &Object,
    conn: u64,
    tx: &mpsc::Sender<String>,
    closed: &CancellationToken,
) -> Result<Address, RelayError> {
    let a = verify_announce(msg, unix_now())
        .map_err(|e| RelayError::new(ErrorCode::of_envelope(&e), e.to_string()))?;
    let mut agents = st.agents();
    let online = agents.values().filter(|e| e.link.is_some()).count();
    let entry = agents.get_mut(&a.address);
    let same_socket = entry
        .as_ref()
        .and_then(|e| e.link.as_ref())
        .is_some_and(|l| l.conn == conn);
    if let Some(e) = &entry {
        let newer = a.timestamp > e.announced_at || (same_socket && a.timestamp == e.announced_at);
        if !newer {
            return Err(RelayError::new(
                ErrorCode::Replayed,
                "an announce as new as this one was already accepted",
            ));
        }
    }
    let replacing = entry.as_ref().is_some_and(|e| e.link.is_some());
    if !replacing && online >= st.config.max_agents {
        return Err(RelayError::new(
            ErrorCode::RelayFull,
            format!(
                "the relay is at its limit of {} agents",
                st.config.max_agents
            ),
        ));
    }
    let link = match entry.as_ref().and_then(|e| e.link.clone()) {
        Some(l) if l.conn == conn => l,
        old => {
            if let Some(old) = old {
                info!(address = %a.address.short(), "a newer announce replaces the agent's older socket");
                old.closed.cancel();
            }
            AgentLink {
                conn,
                tx: tx.clone(),
                sessions: Arc::new(Semaphore::new(st.config.max_sessions_per_agent)),
                closed: closed.clone(),
            }
        }
    };
    agents.insert(
        a.address,
        AgentEntry {
            link: Some(link),
            summary: a.summary,
            endpoints: a.endpoints,
            last_seen: SystemTime::now(),
            announced_at: a.timestamp,
        },
    );
    Ok(a.address)
}

async fn agent_loop(
    st: &RelayState,
    stream: &mut SplitStream<WebSocket>,
    tx: &mpsc::Sender<String>,
    closed: &CancellationToken,
    address: Address,
    conn: u64,
) {
    loop {
        let frame = tokio::select! {
            _ = closed.cancelled() => return,
            f = tokio::time::timeout(st.config.agent_timeout, next_object(stream)) => f,
        };
        let obj = match frame {
            Err(_) => {
                info!("agent silent for {:?}; dropped", st.config.agent_timeout);
                return;
            }
            Ok(Frame::Closed) => return,
            Ok(Frame::Broken(e)) => {
                info!(code = %e.code, message = %e.error, "agent socket failed");
                return;
            }
            Ok(Frame::Invalid(e)) => {
                debug!(%e, "unreadable frame from agent");
                continue;
            }
            Ok(Frame::Object(obj)) => obj,
        };
        if let Some(e) = st.agents().get_mut(&address) {
            e.last_seen = SystemTime::now();
        }
        // No frame-rate limit here: this one socket carries the replies of every session
        // of the agent, and dropping one would read as tampering to its caller.
        let (session_id, frame) = match AgentToRelay::decode(obj) {
            AgentToRelay::Announce(announce) => {
                let same = announce.get("address").and_then(Value::as_str)
                    == Some(address.to_string().as_str());
                match register(st, &announce, conn, tx, closed) {
                    Ok(_) if same => {
                        let _ = tx.try_send(announce_ok(st));
                    }
                    Ok(_) | Err(_) => {
                        let _ = tx.try_send(error_frame(
                            ErrorCode::BadRequest,
                            "re-announce refused",
                            None,
                        ));
                    }
                }
                continue;
            }
            AgentToRelay::Unrouted => {
                debug!("agent frame without session_id dropped");
                continue;
            }
            AgentToRelay::Session { session_id, frame } => (session_id, frame),
        };
        let sessions = st.sessions();
        let Some(route) = sessions.get(&session_id).filter(|r| r.agent_conn == conn) else {
            continue; // The caller is gone.
        };
        if route
            .caller_tx
            .try_send(Value::Object(frame).to_string())
            .is_err()
        {
            // The caller does not read its replies: cut it off.
            route.closed.cancel();
        } else {
            route.caller_activity.touch();
        }
    }
}

fn drop_agent(st: &RelayState, address: Address, conn: u64) {
    if let Some(e) = st.agents().get_mut(&address) {
        if e.link.as_ref().is_some_and(|l| l.conn == conn) {
            e.link = None;
            e.last_seen = SystemTime::now();
        }
    }
    let mut sessions = st.sessions();
    sessions.retain(|id, r| {
        if r.agent_conn != conn {
            return true;
        }
        let _ = r.caller_tx.try_send(error_frame(
            ErrorCode::AgentDisconnected,
            &format!("agent {} disconnected before answering", r.agent.short()),
            Some(id),
        ));
        false
    });
}

pub(super) async fn serve_caller(
    st: Arc<RelayState>,
    socket: WebSocket,
    _permit: OwnedSemaphorePermit,
) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());
    let activity = Activity::new();
    let mut caller = Caller {
        st: &st,
        conn,
        tx: tx.clone(),
        closed: closed.clone(),
        activity: activity.clone(),
        current: HashMap::new(),
        sessions: HashSet::new(),
        rate: RateLimit::new(st.config.frames_per_sec),
    };
    async {
        loop {
            let frame = tokio::select! {
                _ = closed.cancelled() => break,
                f = tokio::time::timeout(
                    st.config.caller_idle.saturating_sub(activity.idle_for()),
                    next_object(&mut stream),
                ) => f,
            };
            match frame {
                // Replies flowing to the caller count as activity too.
                Err(_) if activity.idle_for() < st.config.caller_idle => continue,
                Err(_) => {
                    let _ = tx.try_send(error_frame(
                        ErrorCode::Idle,
                        "no frame for too long; closing",
                        None,
                    ));
                    break;
                }
                Ok(Frame::Closed) => break,
                Ok(Frame::Broken(e)) => {
                    let _ = tx.try_send(e.encode());
                    break;
                }
                Ok(Frame::Invalid(e)) => caller.send(error_frame(ErrorCode::InvalidJson, &e, None)),
                Ok(Frame::Object(obj)) => {
                    activity.touch();
                    caller.on_frame(obj)
                }
            }
        }
        caller.close_all();
        closed.cancel();
    }
    .instrument(info_span!("caller", conn))
    .await
}

struct Caller<'a> {
    st: &'a RelayState,
    conn: u64,
    tx: mpsc::Sender<String>,
    closed: CancellationToken,
    activity: Activity,
    /// The session this socket last used with each agent: an INPUT that names none
    /// continues it.
    current: HashMap<Address, String>,
    sessions: HashSet<String>,
    rate: RateLimit,
}

impl Caller<'_> {
    fn send(&self, frame: String) {
        if self.tx.try_send(frame).is_err() {
            self.closed.cancel();
        }
    }

    fn on_frame(&mut self, obj: Object) {
        if !self.rate.allow() {
            let msg = format!(
                "over {} frames per second; frame dropped",
                self.st.config.frames_per_sec
            );
            return self.send(error_frame(
                ErrorCode::RateLimited,
                &msg,
                session_of(&obj).as_deref(),
            ));
        }
        let (to, named, mut obj) = match CallerToRelay::decode(obj) {
            Ok(CallerToRelay::Ping) => return self.send(CallerToRelay::pong()),
            Ok(CallerToRelay::Pong) => return,
            Ok(CallerToRelay::Close { session_id }) => return self.close_session(session_id),
            Ok(CallerToRelay::Route {
                to,
                session_id,
                frame,
            }) => (to, session_id, frame),
            Err(e) => return self.send(error_frame(e.code(), &e.to_string(), None)),
        };
        let session_id = named
            .or_else(|| self.current.get(&to).cloned())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if let Err(e) = self.route(&session_id, to) {
            return self.send(e.in_session(Some(&session_id)).encode());
        }
        self.current.insert(to, session_id.clone());
        obj.insert("session_id".into(), Value::String(session_id.clone()));
        let agent_tx = {
            let agents = self.st.agents();
            agents
                .get(&to)
                .and_then(|e| e.link.as_ref())
                .map(|l| l.tx.clone())
        };
        let delivered =
            agent_tx.is_some_and(|t| t.try_send(Value::Object(obj).to_string()).is_ok());
        if !delivered {
            self.send(error_frame(
                ErrorCode::AgentBusy,
                &format!(
                    "agent {} is not taking frames right now; try again",
                    to.short()
                ),
                Some(&session_id),
            ));
        }
    }

    /// Finds or creates the route of `session_id` to `to`.
    fn route(&mut self, session_id: &str, to: Address) -> Result<(), RelayError> {
        let mut sessions = self.st.sessions();
        if let Some(r) = sessions.get(session_id) {
            if r.caller_conn != self.conn {
                return Err(RelayError::new(
                    ErrorCode::SessionTaken,
                    format!("session {session_id} belongs to another connection"),
                ));
            }
            if r.agent != to {
                return Err(RelayError::new(
                    ErrorCode::BadRequest,
                    format!("session {session_id} is with another agent"),
                ));
            }
            return Ok(());
        }
        if self.sessions.len() >= self.st.config.max_sessions_per_caller {
            return Err(RelayError::new(
                ErrorCode::TooManySessions,
                format!(
                    "at most {} sessions per connection",
                    self.st.config.max_sessions_per_caller
                ),
            ));
        }
        let agents = self.st.agents();
        let link = match agents.get(&to) {
            None => {
                return Err(RelayError::new(
                    ErrorCode::UnknownAgent,
                    format!("no agent {} has announced on this relay", to.short()),
                ))
            }
            Some(e) => match &e.link {
                None => {
                    return Err(RelayError::new(
                        ErrorCode::AgentOffline,
                        format!("agent {} is offline", to.short()),
                    ))
                }
                Some(l) => l,
            },
        };
        let Ok(permit) = link.sessions.clone().try_acquire_owned() else {
            return Err(RelayError::new(
                ErrorCode::AgentBusy,
                format!(
                    "agent {} has its maximum of {} sessions through this relay",
                    to.short(),
                    self.st.config.max_sessions_per_agent
                ),
            ));
        };
        sessions.insert(
            session_id.to_owned(),
            Route {
                agent: to,
                agent_conn: link.conn,
                caller_conn: self.conn,
                caller_tx: self.tx.clone(),
                caller_activity: self.activity.clone(),
                closed: self.closed.clone(),
                _permit: permit,
            },
        );
        self.sessions.insert(session_id.to_owned());
        Ok(())
    }

    fn close_session(&mut self, session_id: Option<String>) {
        let Some(id) = session_id else { return };
        if !self.sessions.remove(&id) {
            return;
        }
        let route = self.st.sessions().remove(&id);
        if let Some(r) = route {
            self.current.retain(|_, s| *s != id);
            notify_close(self.st, r.agent, &id);
        }
    }

    /// The caller left: its sessions end; agents hear `close` (runs there go on).
    fn close_all(&mut self) {
        let ids: Vec<String> = self.sessions.drain().collect();
        for id in ids {
            let route = self.st.sessions().remove(&id);
            if let Some(r) = route {
                notify_close(self.st, r.agent, &id);
            }
        }
    }
}

fn notify_close(st: &RelayState, agent: Address, session_id: &str) {
    let agents = st.agents();
    if let Some(link) = agents.get(&agent).and_then(|e| e.link.as_ref()) {
        let _ = link.tx.try_send(RelayToAgent::close(session_id));
    }
}
