//! One task per relay connection: agents on `/ws/announce`, callers on `/ws/input`.
//! Each socket has a writer task fed by a bounded queue; a reader that lets its queue
//! fill is disconnected rather than buffered for.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{Message, WebSocket};
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::{evict_offline, AgentEntry, AgentLink, IpKey, IpSlot, RelayState, Route};
use crate::envelope::unix_now;
use crate::identity::Address;
use crate::net::SocketFailure;
use crate::proto::{
    session_of, verify_announce, AgentToRelay, CallerToRelay, ErrorCode, Object, RelayError,
    RelayToAgent, RelayUrl,
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
        // Parsed in place: a frame may be max_frame_bytes long, and a copy per frame
        // doubles what a hostile peer makes the relay hold.
        let parsed = match &msg {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()),
            Message::Binary(b) => serde_json::from_slice::<Value>(b),
            Message::Close(_) => return Frame::Closed,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        drop(msg);
        return match parsed {
            Ok(Value::Object(o)) => Frame::Object(o),
            Ok(_) => Frame::Invalid("expected a JSON object".into()),
            Err(e) => Frame::Invalid(format!("invalid JSON: {e}")),
        };
    }
}

/// One agent connection: one address, announced by its first frame. `_ip_slot` counts
/// the connection against its IP's `max_agents_per_ip` while it lives.
pub(super) async fn serve_agent(st: Arc<RelayState>, socket: WebSocket, _ip_slot: IpSlot) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());

    let first = tokio::time::timeout(ANNOUNCE_WAIT, next_object(&mut stream)).await;
    let refusal = match first {
        Ok(Frame::Object(obj)) => match AgentToRelay::decode(obj) {
            AgentToRelay::Announce(announce) => {
                match register(&st, &announce, conn, None, &tx, &closed) {
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
/// replaces the old socket; an older or equal one is a replay and is refused. `bound` is
/// the address this connection already announced: a connection carries one address, so
/// an announce for any other is refused and registers nothing. So is one signed for
/// another relay (or for none), which a relay it was sent to could otherwise replay here.
fn register(
    st: &RelayState,
    msg: &Object,
    conn: u64,
    bound: Option<Address>,
    tx: &mpsc::Sender<String>,
    closed: &CancellationToken,
) -> Result<Address, RelayError> {
    let a = verify_announce(msg, unix_now())
        .map_err(|e| RelayError::new(ErrorCode::of_envelope(&e), e.to_string()))?;
    if let Some(bound) = bound.filter(|b| *b != a.address) {
        return Err(RelayError::new(
            ErrorCode::BadRequest,
            format!(
                "one address per connection: this one announced {bound}; announce {} on a \
                 connection of its own",
                a.address
            ),
        ));
    }
    check_relay(st, a.relay.as_deref())?;
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

/// Whether an announce's signed `relay` names this relay.
fn check_relay(st: &RelayState, signed_for: Option<&str>) -> Result<(), RelayError> {
    let ours = st
        .public_urls
        .first()
        .map(RelayUrl::base)
        .unwrap_or_default();
    let Some(signed_for) = signed_for else {
        return Err(RelayError::new(
            ErrorCode::WrongRecipient,
            format!("the announce names no `relay`; sign it for this relay ({ours})"),
        ));
    };
    let this_relay = signed_for
        .parse::<RelayUrl>()
        .is_ok_and(|url| st.public_urls.iter().any(|p| p.same_relay(&url)));
    if this_relay {
        Ok(())
    } else {
        Err(RelayError::new(
            ErrorCode::WrongRecipient,
            format!("the announce is signed for relay {signed_for:?}, not for this one ({ours})"),
        ))
    }
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
                let answer = match register(st, &announce, conn, Some(address), tx, closed) {
                    Ok(_) => announce_ok(st),
                    Err(e) => {
                        debug!(code = %e.code, message = %e.error, "re-announce refused");
                        e.encode()
                    }
                };
                let _ = tx.try_send(answer);
                continue;
            }
            AgentToRelay::Unrouted => {
                debug!("agent frame without session_id dropped");
                continue;
            }
            AgentToRelay::Session { session_id, frame } => (session_id, frame),
        };
        let mut sessions = st.sessions();
        let Some(route) = sessions
            .get_mut(&session_id)
            .filter(|r| r.agent_conn == conn)
        else {
            continue; // The caller is gone.
        };
        route.last_active = Instant::now();
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

/// The agent's connection ended: its address goes offline (unless a newer connection
/// took it over) and every session routed to this connection ends, freeing its slots.
fn drop_agent(st: &RelayState, address: Address, conn: u64) {
    {
        let mut agents = st.agents();
        if let Some(e) = agents.get_mut(&address) {
            if e.link.as_ref().is_some_and(|l| l.conn == conn) {
                e.link = None;
                e.last_seen = SystemTime::now();
            }
        }
        evict_offline(&mut agents, st.config.max_offline);
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

/// One caller connection from `ip`. `_slots` (the relay's caller permit and the IP's)
/// are held while it lives.
pub(super) async fn serve_caller(
    st: Arc<RelayState>,
    socket: WebSocket,
    ip: IpAddr,
    _slots: (OwnedSemaphorePermit, IpSlot),
) {
    let conn = st.conn_id();
    let closed = st.shutdown.child_token();
    let (mut stream, tx) = split(socket, st.config.send_queue, closed.clone());
    let activity = Activity::new();
    let mut caller = Caller {
        st: &st,
        conn,
        ip,
        tx: tx.clone(),
        closed: closed.clone(),
        activity: activity.clone(),
        current: HashMap::new(),
        sessions: HashSet::new(),
        slots: Arc::new(Semaphore::new(st.config.max_sessions_per_caller)),
        rate: RateLimit::new(st.config.frames_per_sec),
        named_an_agent: false,
    };
    let first_frame_by = Instant::now() + st.config.first_frame_timeout;
    async {
        loop {
            let mut wait = st.config.caller_idle.saturating_sub(activity.idle_for());
            if !caller.named_an_agent {
                wait = wait.min(first_frame_by.saturating_duration_since(Instant::now()));
            }
            let frame = tokio::select! {
                _ = closed.cancelled() => break,
                f = tokio::time::timeout(wait, next_object(&mut stream)) => f,
            };
            match frame {
                // A socket that only PINGs (or says nothing) holds a caller slot for
                // nothing.
                Err(_) if !caller.named_an_agent && Instant::now() >= first_frame_by => {
                    let msg = format!(
                        "no CONNECT or INPUT within {} s; closing",
                        st.config.first_frame_timeout.as_secs_f64()
                    );
                    let _ = tx.try_send(error_frame(ErrorCode::Timeout, &msg, None));
                    break;
                }
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
    .instrument(info_span!("caller", conn, %ip))
    .await
}

struct Caller<'a> {
    st: &'a RelayState,
    conn: u64,
    ip: IpAddr,
    tx: mpsc::Sender<String>,
    closed: CancellationToken,
    activity: Activity,
    /// The session this socket last used with each agent: an INPUT that names none
    /// continues it.
    current: HashMap<Address, String>,
    /// Sessions this connection opened; some may have ended since (the agent left, or
    /// they idled out), so a route is removed only if it is still this connection's.
    sessions: HashSet<String>,
    /// `max_sessions_per_caller`: each live route holds one, so a session frees its
    /// slot whichever side ends it.
    slots: Arc<Semaphore>,
    rate: RateLimit,
    /// Whether a frame named an agent yet (see `first_frame_timeout`).
    named_an_agent: bool,
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
        let decoded = CallerToRelay::decode(obj);
        if matches!(decoded, Ok(CallerToRelay::Route { .. })) {
            self.named_an_agent = true;
        }
        let (to, named, mut obj) = match decoded {
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
        let agent_tx = match self.route(&session_id, to) {
            Ok(tx) => tx,
            Err(e) => return self.send(e.in_session(Some(&session_id)).encode()),
        };
        self.current.insert(to, session_id.clone());
        obj.insert("session_id".into(), Value::String(session_id.clone()));
        let delivered = agent_tx.try_send(Value::Object(obj).to_string()).is_ok();
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

    /// Finds or creates the route of `session_id` to `to`; gives the agent's queue.
    fn route(&mut self, session_id: &str, to: Address) -> Result<mpsc::Sender<String>, RelayError> {
        let mut sessions = self.st.sessions();
        if let Some(r) = sessions.get_mut(session_id) {
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
            r.last_active = Instant::now();
            return Ok(r.agent_tx.clone());
        }
        let Ok(caller_slot) = self.slots.clone().try_acquire_owned() else {
            return Err(RelayError::new(
                ErrorCode::TooManySessions,
                format!(
                    "at most {} sessions per connection",
                    self.st.config.max_sessions_per_caller
                ),
            ));
        };
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
        let per_ip = self.st.config.max_ip_sessions_per_agent;
        let Some(ip_slot) = self
            .st
            .per_ip
            .try_take(IpKey::Sessions(self.ip, to), per_ip)
        else {
            return Err(RelayError::new(
                ErrorCode::TooManySessions,
                format!(
                    "at most {per_ip} sessions from one IP address with agent {}",
                    to.short()
                ),
            ));
        };
        let Ok(agent_slot) = link.sessions.clone().try_acquire_owned() else {
            return Err(RelayError::new(
                ErrorCode::AgentBusy,
                format!(
                    "agent {} has its maximum of {} sessions through this relay",
                    to.short(),
                    self.st.config.max_sessions_per_agent
                ),
            ));
        };
        let agent_tx = link.tx.clone();
        sessions.insert(
            session_id.to_owned(),
            Route {
                agent: to,
                agent_conn: link.conn,
                agent_tx: agent_tx.clone(),
                caller_conn: self.conn,
                caller_tx: self.tx.clone(),
                caller_activity: self.activity.clone(),
                closed: self.closed.clone(),
                last_active: Instant::now(),
                _agent_slot: agent_slot,
                _caller_slot: caller_slot,
                _ip_slot: ip_slot,
            },
        );
        // Forget ended sessions once they could outnumber live ones.
        if self.sessions.len() >= 2 * self.st.config.max_sessions_per_caller {
            let conn = self.conn;
            self.sessions
                .retain(|id| sessions.get(id).is_some_and(|r| r.caller_conn == conn));
        }
        self.sessions.insert(session_id.to_owned());
        Ok(agent_tx)
    }

    /// Removes this connection's route of `id`, if it still has one.
    fn take_route(&self, sessions: &mut HashMap<String, Route>, id: &str) -> Option<Route> {
        if sessions.get(id)?.caller_conn != self.conn {
            return None;
        }
        sessions.remove(id)
    }

    fn close_session(&mut self, session_id: Option<String>) {
        let Some(id) = session_id else { return };
        if !self.sessions.remove(&id) {
            return;
        }
        self.current.retain(|_, s| *s != id);
        let route = self.take_route(&mut self.st.sessions(), &id);
        if let Some(r) = route {
            let _ = r.agent_tx.try_send(RelayToAgent::close(&id));
        }
    }

    /// The caller left: its sessions end; agents hear `close` (runs there go on).
    fn close_all(&mut self) {
        let routes: Vec<(String, Route)> = {
            let mut sessions = self.st.sessions();
            self.sessions
                .iter()
                .filter_map(|id| Some((id.clone(), self.take_route(&mut sessions, id)?)))
                .collect()
        };
        self.sessions.clear();
        for (id, r) in routes {
            let _ = r.agent_tx.try_send(RelayToAgent::close(&id));
        }
    }
}

/// Ends relayed sessions with no frame either way for `session_idle`: the caller hears
/// `idle` for the session, the agent `close`.
pub(super) async fn session_idle_loop(st: Arc<RelayState>) {
    let idle = st.config.session_idle;
    let period = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = st.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired: Vec<(String, Route)> = {
            let mut sessions = st.sessions();
            let ids: Vec<String> = sessions
                .iter()
                .filter(|(_, r)| r.last_active.elapsed() >= idle)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| sessions.remove_entry(&id))
                .collect()
        };
        for (id, r) in expired {
            debug!(session = %id, "relayed session idle; ended");
            let msg = format!(
                "no frame in this session for {} s; ended",
                idle.as_secs_f64()
            );
            let _ = r
                .caller_tx
                .try_send(error_frame(ErrorCode::Idle, &msg, Some(&id)));
            let _ = r.agent_tx.try_send(RelayToAgent::close(&id));
        }
    }
}
