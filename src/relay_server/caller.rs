//! One task per caller connection on `/ws/input`: frames routed to agents by `to`, then
//! by session; per-connection, per-IP and per-agent session limits; idle sessions end.
//! Frames for an agent homed on another relay (federation) go to that relay, on a caller
//! connection this one opens there (an upstream), and its answers come straight back.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocket;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use super::federation::{Homes, Upstream};
use super::{IpKey, IpSlot, RelayState, Route};
use crate::identity::Address;
use crate::proto::{
    session_of, valid_session_id, CallerToRelay, ErrorCode, Object, RelayError, RelayToAgent,
    MAX_SESSION_ID_LEN,
};

use super::conn::{error_frame, next_object, split, Activity, Frame, RateLimit};

/// One caller connection from `ip`. `_slots` (the relay's caller permit and the IP's)
/// are held while it lives. A connection another relay `forwarded` here is never passed
/// on again.
pub(super) async fn serve_caller(
    st: Arc<RelayState>,
    socket: WebSocket,
    ip: IpAddr,
    _slots: (OwnedSemaphorePermit, IpSlot),
    forwarded: bool,
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
        may_forward: !forwarded && st.federation.is_some(),
        upstreams: HashMap::new(),
        forwarded: HashMap::new(),
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
                    st.metrics.refused(e.code);
                    let _ = tx.try_send(e.encode());
                    break;
                }
                Ok(Frame::Invalid(e)) => caller.refuse(
                    ErrorCode::InvalidJson,
                    error_frame(ErrorCode::InvalidJson, &e, None),
                ),
                Ok(Frame::Object(obj)) => {
                    activity.touch();
                    caller.on_frame(obj).await
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
    /// Whether frames for agents homed elsewhere may be passed on (the relay federates,
    /// and this connection was not itself passed on by another relay).
    may_forward: bool,
    /// Connections to the home relays of agents this caller reached through them.
    upstreams: HashMap<Address, UpstreamLink>,
    /// Sessions passed on, and to whom: a later frame that names only its session
    /// follows them there.
    forwarded: HashMap<String, Address>,
}

/// This relay's caller connection to an agent's home relay, for one caller connection.
struct UpstreamLink {
    tx: mpsc::Sender<String>,
    closed: CancellationToken,
}

impl Caller<'_> {
    fn send(&self, frame: String) {
        if self.tx.try_send(frame).is_err() {
            self.closed.cancel();
        }
    }

    /// Answers a frame the relay will not route, and counts the refusal.
    fn refuse(&self, code: ErrorCode, frame: String) {
        self.st.metrics.refused(code);
        self.send(frame);
    }

    async fn on_frame(&mut self, obj: Object) {
        if !self.rate.allow() {
            let msg = format!(
                "over {} frames per second; frame dropped",
                self.st.config.frames_per_sec
            );
            return self.refuse(
                ErrorCode::RateLimited,
                error_frame(ErrorCode::RateLimited, &msg, session_of(&obj).as_deref()),
            );
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
            Ok(CallerToRelay::Onward { session_id, frame }) => match self.onward(session_id) {
                Ok((to, id)) => (to, Some(id), frame),
                Err(e) => return self.refuse(e.code, e.encode()),
            },
            Err(e) => return self.refuse(e.code(), error_frame(e.code(), &e.to_string(), None)),
        };
        // Agents echo the id in every reply: an unbounded one could make their replies
        // too large for this relay and cost them the link.
        if named.as_deref().is_some_and(|id| !valid_session_id(id)) {
            let msg = format!(
                "`session_id` must be 1-{MAX_SESSION_ID_LEN} characters of letters, digits, '-' or '_'"
            );
            return self.refuse(
                ErrorCode::BadRequest,
                error_frame(ErrorCode::BadRequest, &msg, None),
            );
        }
        let session_id = named
            .or_else(|| self.current.get(&to).cloned())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if self.upstream(&to).is_some() || self.forwarded.contains_key(&session_id) {
            return self.forward(to, session_id, obj, None).await;
        }
        let agent_tx = match self.route(&session_id, to) {
            Ok(tx) => tx,
            Err(e)
                if self.may_forward
                    && matches!(e.code, ErrorCode::UnknownAgent | ErrorCode::AgentOffline) =>
            {
                return self.forward(to, session_id, obj, Some(e)).await;
            }
            Err(e) => return self.refuse(e.code, e.in_session(Some(&session_id)).encode()),
        };
        self.current.insert(to, session_id.clone());
        obj.insert("session_id".into(), Value::String(session_id.clone()));
        let text = Value::Object(obj).to_string();
        let bytes = text.len();
        if agent_tx.try_send(text).is_ok() {
            self.st.metrics.frame_relayed(bytes);
        } else {
            self.refuse(
                ErrorCode::AgentBusy,
                error_frame(
                    ErrorCode::AgentBusy,
                    &format!(
                        "agent {} is not taking frames right now; try again",
                        to.short()
                    ),
                    Some(&session_id),
                ),
            );
        }
    }

    /// Where a frame that names no agent goes: the session it names, else this socket's
    /// only session (as the Python ecosystem's relay forwards a socket's later frames).
    fn onward(&self, named: Option<String>) -> Result<(Address, String), RelayError> {
        let mut current = self.current.iter();
        let only = match (current.next(), current.next()) {
            (Some((to, id)), None) => Some((*to, id.clone())),
            _ => None,
        };
        let found = match named {
            Some(id) => self
                .st
                .sessions()
                .get(&id)
                .filter(|r| r.caller_conn == self.conn)
                .map(|r| r.agent)
                .or_else(|| self.forwarded.get(&id).copied())
                .map(|agent| (agent, id.clone())),
            None => only,
        };
        found.ok_or_else(|| {
            RelayError::new(
                ErrorCode::BadRequest,
                "name the agent in `to`: this frame continues no session of this connection",
            )
        })
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
        if let Some(agent) = self.forwarded.remove(&id) {
            self.current.retain(|_, s| *s != id);
            if let Some(up) = self.upstream(&agent) {
                let _ = up.try_send(RelayToAgent::close(&id));
            }
            return;
        }
        if !self.sessions.remove(&id) {
            return;
        }
        self.current.retain(|_, s| *s != id);
        let route = self.take_route(&mut self.st.sessions(), &id);
        if let Some(r) = route {
            let _ = r.agent_tx.try_send(RelayToAgent::close(&id));
        }
    }

    /// The open upstream to `agent`'s home relay, if any.
    fn upstream(&self, agent: &Address) -> Option<mpsc::Sender<String>> {
        self.upstreams
            .get(agent)
            .filter(|u| !u.closed.is_cancelled())
            .map(|u| u.tx.clone())
    }

    /// Passes a frame for `to`, not online here, to the relay the DHT says it is homed
    /// on. `local` is why this relay cannot route it itself: what the caller hears if
    /// the agent has no other home either.
    async fn forward(
        &mut self,
        to: Address,
        session_id: String,
        mut obj: Object,
        local: Option<RelayError>,
    ) {
        let refuse = |this: &Self, e: RelayError| {
            this.refuse(e.code, e.in_session(Some(&session_id)).encode())
        };
        let tx = match self.upstream(&to) {
            Some(tx) => tx,
            None => match self.open_upstream(to).await {
                Ok(tx) => tx,
                Err(why) => {
                    let mut e = local.unwrap_or_else(|| {
                        RelayError::new(ErrorCode::AgentOffline, "the agent's home relay left")
                    });
                    if let Some(why) = why {
                        e.error = format!("{}; its home relay: {why}", e.error);
                    }
                    return refuse(self, e);
                }
            },
        };
        if !self.forwarded.contains_key(&session_id) {
            let max = self.st.config.max_sessions_per_caller;
            if self.forwarded.len() >= max {
                // Sessions of home relays that closed are over.
                let upstreams = &self.upstreams;
                self.forwarded
                    .retain(|_, a| upstreams.get(a).is_some_and(|u| !u.closed.is_cancelled()));
            }
            if self.forwarded.len() >= max {
                return refuse(
                    self,
                    RelayError::new(
                        ErrorCode::TooManySessions,
                        format!("at most {max} sessions per connection"),
                    ),
                );
            }
            self.forwarded.insert(session_id.clone(), to);
        }
        self.current.insert(to, session_id.clone());
        obj.insert("session_id".into(), Value::String(session_id.clone()));
        let text = Value::Object(obj).to_string();
        let bytes = text.len();
        if tx.try_send(text).is_ok() {
            self.st.metrics.frame_relayed(bytes);
        } else {
            refuse(
                self,
                RelayError::new(
                    ErrorCode::AgentBusy,
                    format!(
                        "agent {}'s home relay is not taking frames right now; try again",
                        to.short()
                    ),
                ),
            );
        }
    }

    /// Resolves `to`'s home relay and opens an upstream to it. `Err(None)`: the DHT
    /// names no other relay; `Err(Some(why))`: it does, and it could not be reached.
    async fn open_upstream(&mut self, to: Address) -> Result<mpsc::Sender<String>, Option<String>> {
        let Some(fed) = self.st.federation.as_ref().filter(|_| self.may_forward) else {
            return Err(None);
        };
        self.upstreams.retain(|_, u| !u.closed.is_cancelled());
        if self.upstreams.len() >= self.st.config.max_sessions_per_caller {
            return Err(Some("this connection has too many home relays open".into()));
        }
        let home = fed
            .home_of(&to, &self.st.public_urls)
            .await
            .ok_or(None)?
            .relay;
        let socket = match fed.dial(&home).await {
            Ok(s) => s,
            Err(why) => {
                fed.homes().forget(&to);
                self.st.metrics.forward_failed();
                debug!(agent = %to.short(), relay = %home.base(), %why, "home relay unreachable");
                return Err(Some(why));
            }
        };
        debug!(agent = %to.short(), relay = %home.base(), "caller passed on to the agent's home relay");
        self.st.metrics.forwarded();
        let link = self.splice(socket, to, fed.homes().clone());
        let tx = link.tx.clone();
        self.upstreams.insert(to, link);
        Ok(tx)
    }

    /// Runs an upstream: frames queued on its sender are written to it, and every frame
    /// it sends goes to this caller as it came. It ends with the caller's connection, or
    /// when the home relay closes it, or says that `agent` is not there (it moved or
    /// left): then `homes` forgets it, and the caller's next frame finds it anew.
    fn splice(&self, socket: Upstream, agent: Address, homes: Homes) -> UpstreamLink {
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::channel::<String>(self.st.config.send_queue);
        let closed = self.closed.child_token();
        let stop = closed.clone();
        tokio::spawn(async move {
            loop {
                let text = tokio::select! {
                    _ = stop.cancelled() => break,
                    t = rx.recv() => match t { Some(t) => t, None => break },
                };
                let sent =
                    tokio::time::timeout(Duration::from_secs(10), sink.send(Message::text(text)));
                if !matches!(sent.await, Ok(Ok(()))) {
                    break;
                }
            }
            stop.cancel();
            let _ = sink.close().await;
        });
        let (caller, activity, stop) = (self.tx.clone(), self.activity.clone(), closed.clone());
        let relayed = self.st.metrics.clone();
        let caller_closed = self.closed.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.next() => m,
                };
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        let _ = caller.try_send(error_frame(
                            ErrorCode::AgentDisconnected,
                            "the agent's home relay closed the connection",
                            None,
                        ));
                        break;
                    }
                };
                activity.touch();
                let moved = text.contains("\"ERROR\"") && not_there(&text);
                let bytes = text.len();
                if caller.try_send(text).is_err() {
                    caller_closed.cancel();
                    break;
                }
                relayed.frame_relayed(bytes);
                if moved {
                    homes.forget(&agent);
                    break;
                }
            }
            stop.cancel();
        });
        UpstreamLink { tx, closed }
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

/// Whether a home relay's frame is its ERROR saying the agent is not there (any more).
fn not_there(text: &str) -> bool {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let code = obj.get("code").and_then(Value::as_str);
    [
        ErrorCode::UnknownAgent,
        ErrorCode::AgentOffline,
        ErrorCode::AgentDisconnected,
    ]
    .iter()
    .any(|c| code == Some(c.as_str()))
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
