//! The relay server: a public rendezvous that makes nodes reachable by address without
//! any open port.
//!
//! Agents keep an outbound WebSocket to `/ws/announce` and announce themselves; callers
//! connect to `/ws/input` and name the agent in `to`. The relay routes frames by `to`,
//! then by `session_id`. It is untrusted by design: it reads frames but cannot forge
//! them, since every INPUT is signed by its caller and every reply by its agent.
//!
//! `GET /api/agents/{address}` is the directory; `GET /health` counts. With a certificate
//! and key ([`RelayConfig::tls`]) it serves all of it over TLS (`wss://`, `https://`).
//!
//! With a swarm ([`RelayConfig::swarm_listen`]) relays federate: each publishes its
//! agents' home-relay records in the libp2p DHT and passes a caller on to the relay an
//! agent is homed on (`federation.rs`).

mod agent;
mod caller;
mod conn;
mod federation;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::identity::Address;
use crate::metrics::RelayMetrics;
use crate::net::{NoDelayListener, PeerAddr};
use crate::proto::{ErrorCode, RelayUrl, ANNOUNCE_PATH, DIRECTORY_ROUTE, HEALTH_PATH, INPUT_PATH};
use crate::tls::{TlsError, TlsListener};
use crate::transport::p2p::{P2p, P2pConfig, P2pError};
use libp2p::Multiaddr;

/// The relay's limits. Every one has a default; see the README's relay section.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// The URLs agents reach this relay by (aliases included). An ANNOUNCE is accepted
    /// only when its signed `relay` names one of them, so that an announce a node sent to
    /// another relay cannot be replayed here. Empty: the bound address (loopback or
    /// unspecified binds: `ws://127.0.0.1:PORT`, `ws://localhost:PORT`, and
    /// `ws://[::1]:PORT` for an unspecified one; `wss://` with TLS); a public relay must
    /// set them.
    pub public_urls: Vec<RelayUrl>,
    /// Largest frame accepted from anyone.
    pub max_frame_bytes: usize,
    /// Agents online at once.
    pub max_agents: usize,
    /// Caller connections open at once.
    pub max_callers: usize,
    /// Sessions routed to one agent at once.
    pub max_sessions_per_agent: usize,
    /// Sessions one caller connection may open.
    pub max_sessions_per_caller: usize,
    /// Frames per second one caller connection may send (burst: twice that). Agents'
    /// sockets carry every session's replies and are not limited.
    pub frames_per_sec: u32,
    /// An agent that sends nothing (no frame, no re-announce) for this long is dropped.
    pub agent_timeout: Duration,
    /// A caller connection with no frame either way for this long is closed.
    pub caller_idle: Duration,
    /// Frames queued per socket; a reader that lets it fill is disconnected.
    pub send_queue: usize,
    /// How long an offline agent stays in the directory.
    pub forget_after: Duration,
    /// Offline agents kept in the directory at most; past it the longest offline go.
    pub max_offline: usize,
    /// Caller connections from one IP address (IPv6: one /64) at once.
    pub max_callers_per_ip: usize,
    /// Agent connections (hence addresses online) from one IP address at once.
    pub max_agents_per_ip: usize,
    /// Sessions that callers from one IP address hold with one agent at once.
    pub max_ip_sessions_per_agent: usize,
    /// A relayed session with no frame either way for this long ends.
    pub session_idle: Duration,
    /// A caller connection that names no agent (no CONNECT, INPUT or SEAL) within this
    /// is closed.
    pub first_frame_timeout: Duration,
    /// Take the client's IP address from the last `X-Forwarded-For` entry, for a relay
    /// behind a reverse proxy that sets it. Off: anyone could claim any address.
    pub trust_forwarded_for: bool,
    /// Serve TLS (`wss://`, `https://`) with this PEM certificate chain (its own
    /// certificate first) and `tls_key`; both or neither.
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Join the libp2p swarm on these multiaddrs (QUIC and/or TCP) as a Kademlia server,
    /// and federate with the relays found there. Empty: no swarm.
    pub swarm_listen: Vec<Multiaddr>,
    /// Swarm peers to join through (`…/p2p/<PeerId>`), e.g. another relay's.
    pub bootstrap: Vec<Multiaddr>,
    /// Pass callers on to home relays on private or loopback addresses. Off by default:
    /// home-relay records are signed by agents, whose keys anyone can make, and must not
    /// point a public relay at its own network. A testnet or a LAN turns it on.
    pub forward_private: bool,
    /// Trust this CA (PEM) besides the public roots when passing callers on to `wss://`
    /// relays.
    pub relay_ca: Option<PathBuf>,
    /// The swarm's key file (a 32-byte seed, created if missing), so that the relay keeps
    /// its PeerId, and the `--bootstrap` addresses others give for it, across restarts.
    /// None: a new key at every start.
    pub swarm_key: Option<PathBuf>,
    /// With a swarm, the relay also serves circuit relay v2 (nodes behind a NAT reserve
    /// a circuit and are called through it until DCUtR punches through), within these
    /// bounds.
    pub circuits: crate::transport::p2p::CircuitLimits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8765)),
            max_frame_bytes: 4 * 1024 * 1024,
            max_agents: 10_000,
            max_callers: 10_000,
            max_sessions_per_agent: 1_000,
            max_sessions_per_caller: 64,
            frames_per_sec: 100,
            agent_timeout: Duration::from_secs(120),
            caller_idle: Duration::from_secs(300),
            send_queue: 1024,
            forget_after: Duration::from_secs(3600),
            max_offline: 10_000,
            max_callers_per_ip: 256,
            max_agents_per_ip: 256,
            max_ip_sessions_per_agent: 256,
            session_idle: Duration::from_secs(300),
            first_frame_timeout: Duration::from_secs(10),
            trust_forwarded_for: false,
            public_urls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            swarm_listen: Vec::new(),
            bootstrap: Vec::new(),
            forward_private: false,
            relay_ca: None,
            swarm_key: None,
            circuits: crate::transport::p2p::CircuitLimits::default(),
        }
    }
}

impl RelayConfig {
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Adds a URL agents reach this relay by (see [`RelayConfig::public_urls`]).
    pub fn public_url(mut self, url: RelayUrl) -> Self {
        self.public_urls.push(url);
        self
    }

    /// Serves TLS with the PEM certificate chain `cert` and its private key `key`.
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_cert = Some(cert.into());
        self.tls_key = Some(key.into());
        self
    }
}

/// What a relay bound to `local` calls itself when no public URL is configured.
fn default_public_urls(local: SocketAddr, secure: bool) -> Vec<RelayUrl> {
    let port = local.port();
    let ip = local.ip();
    let mut hosts = Vec::new();
    if ip.is_unspecified() {
        hosts.push(SocketAddr::from(([127, 0, 0, 1], port)).to_string());
        hosts.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)).to_string());
    } else {
        hosts.push(local.to_string());
    }
    if ip.is_unspecified() || ip.is_loopback() {
        hosts.push(format!("localhost:{port}"));
    }
    hosts
        .into_iter()
        .filter_map(|h| format!("{}://{h}", ws_scheme(secure)).parse().ok())
        .collect()
}

fn ws_scheme(secure: bool) -> &'static str {
    if secure {
        "wss"
    } else {
        "ws"
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS needs both a certificate and its key")]
    TlsHalf,
    /// The swarm could not be started (a listen address, a bootstrap address).
    #[error("the relay's swarm: {0}")]
    Swarm(#[from] P2pError),
    /// The swarm's key file cannot be read or made.
    #[error("the relay's swarm key: {0}")]
    SwarmKey(#[from] crate::identity::KeyFileError),
}

/// The relay server, for `oonode relay` and for tests.
pub struct Relay;

impl Relay {
    /// Binds `config.listen` and serves in the background.
    pub async fn spawn(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        // The files first: a bad one stops start-up before the port is taken.
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
            (None, None) => None,
            _ => return Err(RelayError::TlsHalf),
        };
        let secure = tls.is_some();
        let listen = config.listen;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
        let shutdown = CancellationToken::new();
        let relay_metrics = RelayMetrics::default();
        let federation = match config.swarm_listen.is_empty() {
            true => None,
            false => Some(federation::Federation::new(
                start_swarm(&config, &relay_metrics, &shutdown).await?,
                crate::tls::client_config(config.relay_ca.as_deref())?,
                config.forward_private,
                config.max_frame_bytes,
            )),
        };
        let swarm = match &federation {
            Some(f) => f.p2p.listening(Duration::from_secs(5)).await,
            None => Vec::new(),
        };
        let public_urls = if config.public_urls.is_empty() {
            default_public_urls(local_addr, secure)
        } else {
            config.public_urls.clone()
        };
        let state = Arc::new(RelayState {
            callers: Arc::new(Semaphore::new(config.max_callers)),
            per_ip: IpCounts::default(),
            public_urls: public_urls.clone(),
            config,
            agents: Mutex::new(HashMap::new()),
            online: AtomicUsize::new(0),
            federation,
            sessions: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            started: Instant::now(),
            shutdown: shutdown.clone(),
            metrics: Arc::new(relay_metrics),
        });
        let router = Router::new()
            .route(ANNOUNCE_PATH, get(announce_socket))
            .route(INPUT_PATH, get(input_socket))
            .route(DIRECTORY_ROUTE, get(directory))
            .route(HEALTH_PATH, get(health))
            .route("/metrics", get(metrics))
            .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))) })
            .with_state(state.clone());
        let stop = shutdown.clone();
        let service = router.into_make_service_with_connect_info::<PeerAddr>();
        let task = match tls {
            Some(tls) => {
                let listener =
                    TlsListener::new(listener, tls).map_err(|source| RelayError::Bind {
                        addr: listen,
                        source,
                    })?;
                tokio::spawn(async move {
                    let _ = axum::serve(listener, service)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await;
                })
            }
            None => tokio::spawn(async move {
                let _ = axum::serve(NoDelayListener(listener), service)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            }),
        };
        tokio::spawn(forget_loop(state.clone()));
        tokio::spawn(caller::session_idle_loop(state.clone()));
        let scheme = ws_scheme(secure);
        info!(%local_addr, "relay listening on {scheme}://{local_addr}{ANNOUNCE_PATH} and {INPUT_PATH}");
        let names: Vec<String> = public_urls.iter().map(RelayUrl::base).collect();
        info!(public_urls = ?names, "agents must sign their ANNOUNCE for one of these");
        if !swarm.is_empty() {
            info!(
                ?swarm,
                "relay in the swarm; other relays and nodes bootstrap from these"
            );
        }
        Ok(RelayHandle {
            local_addr,
            secure,
            public_urls,
            swarm,
            shutdown,
            task,
        })
    }
}

/// The relay's libp2p host: a Kademlia server under a key of its own (from
/// `swarm_key`, else new at every start), holding up to one home-relay record per agent
/// the relay admits.
async fn start_swarm(
    config: &RelayConfig,
    metrics: &crate::metrics::RelayMetrics,
    stop: &CancellationToken,
) -> Result<P2p, RelayError> {
    let keypair = match &config.swarm_key {
        Some(path) => crate::identity::Identity::load_or_create_file(path)?
            .0
            .libp2p_keypair(),
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let p2p_config = P2pConfig {
        listen: config.swarm_listen.clone(),
        listen_fallback: false,
        bootstrap: config.bootstrap.clone(),
        dht_server: true,
        max_records: config.max_agents.max(1024),
        // Many callers and agents can share one public IP (a NAT, a carrier-grade NAT):
        // as many swarm connections from one IP as WebSocket callers.
        max_connections_per_ip: config.max_callers_per_ip.max(16),
        record_counters: Some(metrics.dht.clone()),
        nat: crate::transport::p2p::NatMode::Public,
        circuit_relay: Some(config.circuits.clone()),
        circuit_counters: Some(metrics.circuits.clone()),
        ..P2pConfig::default()
    };
    Ok(P2p::spawn(keypair, p2p_config, stop.child_token()).await?)
}

/// The line `oonode relay --ready-json` prints once listening:
/// `{"event":"ready","url","announce","input","http"}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct RelayReady {
    /// Always `"ready"`.
    pub event: String,
    /// The base both agents and callers take (`ws://host:port`, `wss://` with TLS).
    pub url: String,
    pub announce: String,
    pub input: String,
    /// The directory and health base (`http://host:port`, `https://` with TLS).
    pub http: String,
    /// The swarm's multiaddrs (with `/p2p/<PeerId>`), when the relay is in one: what
    /// other relays and nodes pass to `--bootstrap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swarm: Vec<String>,
}

impl RelayReady {
    /// Reads a ready line; `None` for any other line.
    pub fn parse(line: &str) -> Option<RelayReady> {
        serde_json::from_str::<RelayReady>(line.trim())
            .ok()
            .filter(|r| r.event == "ready")
    }

    /// One line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A running relay.
pub struct RelayHandle {
    local_addr: SocketAddr,
    /// Whether it serves TLS.
    secure: bool,
    public_urls: Vec<RelayUrl>,
    /// The swarm's listen multiaddrs, empty without one.
    swarm: Vec<String>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URLs an ANNOUNCE may name in `relay` (configured, or derived from the bound
    /// address).
    pub fn public_urls(&self) -> &[RelayUrl] {
        &self.public_urls
    }

    /// The swarm's multiaddrs (with `/p2p/<PeerId>`); empty without a swarm.
    pub fn swarm_addrs(&self) -> &[String] {
        &self.swarm
    }

    /// `ws://host:port` (`wss://` with TLS), the base both agents and callers take.
    pub fn url(&self) -> String {
        self.relay_url().base()
    }

    /// The relay's URL, with every route on it.
    pub fn relay_url(&self) -> RelayUrl {
        format!("{}://{}", ws_scheme(self.secure), self.local_addr)
            .parse()
            .expect("a socket address makes a relay URL")
    }

    /// What a script needs to use the relay: see [`RelayReady`].
    pub fn ready(&self) -> RelayReady {
        let url = self.relay_url();
        RelayReady {
            event: "ready".into(),
            announce: url.announce(),
            input: url.input(),
            http: url.http_base(),
            url: url.base(),
            swarm: self.swarm.clone(),
        }
    }

    /// Serves until SIGINT or SIGTERM, then closes every connection.
    pub async fn run_until_signal(self) {
        crate::net::shutdown_signal().await;
        self.shutdown().await;
    }

    /// Closes every connection and stops listening.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Waits until the relay stops (for the CLI).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

pub(crate) struct RelayState {
    config: RelayConfig,
    public_urls: Vec<RelayUrl>,
    callers: Arc<Semaphore>,
    per_ip: IpCounts,
    agents: Mutex<HashMap<Address, AgentEntry>>,
    /// Entries of `agents` with a link: kept as a count, so that an announce does not
    /// walk every agent to check `max_agents`.
    online: AtomicUsize,
    /// The swarm and what federation needs, when the relay is in a swarm.
    federation: Option<federation::Federation>,
    sessions: Mutex<HashMap<String, Route>>,
    next_conn: AtomicU64,
    started: Instant,
    shutdown: CancellationToken,
    /// This relay's own counters (never a global registry: tests run many relays).
    metrics: Arc<RelayMetrics>,
}

/// An agent the relay knows, online or recently seen.
struct AgentEntry {
    link: Option<AgentLink>,
    summary: String,
    endpoints: Vec<String>,
    last_seen: SystemTime,
    /// Timestamp of the newest accepted ANNOUNCE: an older or equal one on a new socket
    /// is a replay and cannot take the address over.
    announced_at: u64,
    /// When this relay last put the agent's home-relay record in the DHT.
    published: Option<Instant>,
}

#[derive(Clone)]
struct AgentLink {
    conn: u64,
    tx: mpsc::Sender<String>,
    sessions: Arc<Semaphore>,
    closed: CancellationToken,
}

/// Where a session's frames go. Dropping it frees every slot it holds: the agent's, the
/// caller connection's and the caller IP's, whichever side ends it.
struct Route {
    agent: Address,
    agent_conn: u64,
    agent_tx: mpsc::Sender<String>,
    caller_conn: u64,
    caller_tx: mpsc::Sender<String>,
    caller_activity: conn::Activity,
    closed: CancellationToken,
    /// The last frame either way, for `session_idle`.
    last_active: Instant,
    _agent_slot: OwnedSemaphorePermit,
    _caller_slot: OwnedSemaphorePermit,
    _ip_slot: IpSlot,
}

/// What one client IP address holds; IPv6 addresses count per /64, as one host
/// usually has a whole /64 to pick from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IpKey {
    Callers(IpAddr),
    Agents(IpAddr),
    Sessions(IpAddr, Address),
}

/// Counts per [`IpKey`]; a count lives as long as its [`IpSlot`].
#[derive(Clone, Default)]
struct IpCounts(Arc<Mutex<HashMap<IpKey, usize>>>);

impl IpCounts {
    fn counts(&self) -> MutexGuard<'_, HashMap<IpKey, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more for `key`, unless it already has `max`.
    fn try_take(&self, key: IpKey, max: usize) -> Option<IpSlot> {
        let mut counts = self.counts();
        let n = counts.get(&key).copied().unwrap_or(0);
        if n >= max {
            return None;
        }
        counts.insert(key, n + 1);
        Some(IpSlot {
            counts: self.clone(),
            key,
        })
    }
}

/// One unit of an IP's count, given back on drop.
struct IpSlot {
    counts: IpCounts,
    key: IpKey,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The client's IP address as the per-IP limits count it: the socket's peer, or the
/// last `X-Forwarded-For` entry (the one our proxy appended) when trusted; IPv4-mapped
/// IPv6 as IPv4; IPv6 cut to its /64.
fn client_ip(peer: SocketAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    let forwarded = trust_forwarded_for
        .then(|| headers.get_all("x-forwarded-for").iter().next_back())
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    match forwarded.unwrap_or(peer.ip()).to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// An HTTP refusal before the upgrade, in the relay's error shape.
fn refuse(st: &RelayState, code: ErrorCode, message: String) -> Response {
    st.metrics.refused(code);
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({"error": message, "message": message, "code": code})),
    )
        .into_response()
}

impl RelayState {
    fn agents(&self) -> MutexGuard<'_, HashMap<Address, AgentEntry>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Route>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

async fn announce_socket(
    State(st): State<Arc<RelayState>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = client_ip(peer, &headers, st.config.trust_forwarded_for);
    let max_per_ip = st.config.max_agents_per_ip;
    let Some(ip_slot) = st.per_ip.try_take(IpKey::Agents(ip), max_per_ip) else {
        return refuse(
            &st,
            ErrorCode::TooManyConnections,
            format!("at most {max_per_ip} agent connections from one IP address"),
        );
    };
    small_buffers(ws, st.config.max_frame_bytes)
        .on_upgrade(move |socket| agent::serve_agent(st, socket, ip_slot))
}

async fn input_socket(
    State(st): State<Arc<RelayState>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok(permit) = st.callers.clone().try_acquire_owned() else {
        return refuse(
            &st,
            ErrorCode::RelayFull,
            "relay is at its caller limit".into(),
        );
    };
    let ip = client_ip(peer, &headers, st.config.trust_forwarded_for);
    let max_per_ip = st.config.max_callers_per_ip;
    let Some(ip_slot) = st.per_ip.try_take(IpKey::Callers(ip), max_per_ip) else {
        return refuse(
            &st,
            ErrorCode::TooManyConnections,
            format!("at most {max_per_ip} caller connections from one IP address"),
        );
    };
    let forwarded = headers.contains_key(federation::FORWARDED_HEADER);
    small_buffers(ws, st.config.max_frame_bytes).on_upgrade(move |socket| {
        caller::serve_caller(st, socket, ip, (permit, ip_slot), forwarded)
    })
}

/// A relay socket's WebSocket settings. tungstenite's default read buffer (128 KiB,
/// zero-filled as it is first used) would be most of what an idle agent costs the relay:
/// a buffer of 4 KiB takes most frames in one read and grows for a larger one. Writes go
/// out frame by frame (the writer task flushes each), so no write buffer is kept.
fn small_buffers(ws: WebSocketUpgrade, max_frame_bytes: usize) -> WebSocketUpgrade {
    ws.max_message_size(max_frame_bytes)
        .max_frame_size(max_frame_bytes)
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn directory(State(st): State<Arc<RelayState>>, Path(address): Path<String>) -> Response {
    let Ok(address) = address.parse::<Address>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "not an address (0x + 64 hex)"})),
        )
            .into_response();
    };
    let online_here = st.agents().get(&address).is_some_and(|e| e.link.is_some());
    // An agent homed on another relay is reachable through this one (callers are passed
    // on): the directory says so, and where.
    if let (false, Some(fed)) = (online_here, &st.federation) {
        if let Some(home) = fed.home_of(&address, &st.public_urls).await {
            return Json(json!({
                "address": address.to_string(),
                "online": true,
                "summary": home.summary,
                "endpoints": home.endpoints,
                "home_relay": home.relay.base(),
            }))
            .into_response();
        }
    }
    let agents = st.agents();
    let Some(entry) = agents.get(&address) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown agent"})),
        )
            .into_response();
    };
    Json(json!({
        "address": address.to_string(),
        "online": entry.link.is_some(),
        "summary": entry.summary,
        "endpoints": entry.endpoints,
        "last_seen": iso_time(entry.last_seen),
    }))
    .into_response()
}

/// Prometheus text format: agents online, callers, sessions (read now), frames relayed
/// and refusals by code.
async fn metrics(State(st): State<Arc<RelayState>>) -> Response {
    let online = st.online.load(Ordering::Relaxed);
    let sessions = st.sessions().len();
    let callers = st.config.max_callers - st.callers.available_permits();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        st.metrics.encode(online, callers, sessions),
    )
        .into_response()
}

async fn health(State(st): State<Arc<RelayState>>) -> Response {
    let online = st.online.load(Ordering::Relaxed);
    let known = st.agents().len();
    let sessions = st.sessions().len();
    let callers = st.config.max_callers - st.callers.available_permits();
    Json(json!({
        "status": "healthy",
        "agents_online": online,
        "agents_known": known,
        "callers": callers,
        "sessions": sessions,
        "uptime": st.started.elapsed().as_secs(),
    }))
    .into_response()
}

/// Drops directory entries of agents offline for longer than `forget_after`.
async fn forget_loop(st: Arc<RelayState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = st.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let horizon = SystemTime::now() - st.config.forget_after;
        st.agents()
            .retain(|_, a| a.link.is_some() || a.last_seen > horizon);
    }
}

/// Keeps at most `max` offline entries, dropping the longest offline first. Online
/// agents are bounded by `max_agents`; this bounds the rest of the directory.
fn evict_offline(agents: &mut HashMap<Address, AgentEntry>, max: usize, online: usize) {
    let offline = agents.len().saturating_sub(online);
    if offline <= max {
        return;
    }
    let mut oldest: Vec<(SystemTime, Address)> = agents
        .iter()
        .filter(|(_, e)| e.link.is_none())
        .map(|(a, e)| (e.last_seen, *a))
        .collect();
    oldest.sort_unstable();
    for (_, address) in oldest.into_iter().take(offline - max) {
        agents.remove(&address);
    }
}

/// RFC 3339 UTC time, second precision, without a date crate.
fn iso_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_is_utc_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(iso_time(t), "2023-11-14T22:13:20Z");
        assert_eq!(iso_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
