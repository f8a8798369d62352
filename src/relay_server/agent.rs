//! One task per agent connection on `/ws/announce`: the ANNOUNCE, the registry entry it
//! makes (one address per connection, dropped with it), and the agent's replies routed
//! back to their callers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::WebSocket;
use futures::stream::SplitStream;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::{evict_offline, federation, AgentEntry, AgentLink, IpSlot, RelayState};
use crate::envelope::unix_now;
use crate::identity::Address;
use crate::proto::{
    verify_announce, AgentToRelay, ErrorCode, Object, RelayError, RelayToAgent, RelayUrl,
};

use super::conn::{error_frame, next_object, split, Frame};

/// How long an agent has to send its first ANNOUNCE.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

/// Tells the agent the largest frame the relay takes, so that it can answer a too-large
/// reply with an error for that session instead of losing its link.
fn announce_ok(st: &RelayState) -> String {
    RelayToAgent::announce_ok(st.config.max_frame_bytes)
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
            st.metrics.refused(e.code);
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
    let online = st.online.load(Ordering::Relaxed);
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
    // The home-relay record goes out on a new socket and then once a minute, not at
    // every re-announce.
    let published = entry
        .as_ref()
        .and_then(|e| e.published)
        .filter(|at| same_socket && at.elapsed() < federation::REPUBLISH_AFTER);
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
    let publish = published.is_none() && st.federation.is_some();
    let was_online = agents.insert(
        a.address,
        AgentEntry {
            link: Some(link),
            summary: a.summary,
            endpoints: a.endpoints,
            last_seen: SystemTime::now(),
            announced_at: a.timestamp,
            published: if publish {
                Some(Instant::now())
            } else {
                published
            },
        },
    );
    if was_online.is_none_or(|e| e.link.is_none()) {
        st.online.fetch_add(1, Ordering::Relaxed);
    }
    drop(agents);
    // Outside the registry's lock: every announce takes it.
    if let (true, Some(f)) = (publish, &st.federation) {
        let record = serde_json::to_vec(msg).unwrap_or_default();
        f.p2p.publish_home(&a.address, record, a.timestamp);
        st.metrics.home_record_published();
    }
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
                        st.metrics.refused(e.code);
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
        let text = Value::Object(frame).to_string();
        let bytes = text.len();
        if route.caller_tx.try_send(text).is_err() {
            // The caller does not read its replies: cut it off.
            route.closed.cancel();
        } else {
            st.metrics.frame_relayed(bytes);
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
                st.online.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let online = st.online.load(Ordering::Relaxed);
        evict_offline(&mut agents, st.config.max_offline, online);
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
