//! Calling a peer agent by address: `connect(address, options)` → [`Remote`].
//!
//! Every INPUT is signed with the caller's key; every reply must be signed by the
//! address called, addressed to the caller, answer this very INPUT, be fresh, and come in
//! sequence. Anything else is an error, never a silent result: the relay in between can
//! drop frames but cannot forge or alter them.
//!
//! Paths: the relay (`ConnectOptions::relay`) or the libp2p swarm
//! (`ConnectOptions::bootstrap`); a direct path and automatic choice come later.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::envelope::{unix_now, Envelope, Kind, MAX_CLOCK_SKEW_SECS};
use crate::identity::{Address, AddressError, Identity};
use crate::transport::p2p::{wire, P2p, P2pConfig, P2pError};
use crate::transport::relay::input_url;

/// Default wait for each next reply frame (not for the whole answer: long streams are
/// fine as long as chunks keep coming).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("invalid address: {0}")]
    BadAddress(#[from] AddressError),
    #[error("no way to reach the agent: give a relay URL or a bootstrap peer")]
    NoPath,
    #[error("cannot join the swarm: {0}")]
    Swarm(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("agent {0} is offline")]
    Offline(String),
    #[error("agent {0} is unknown to the relay (it never announced there)")]
    Unknown(String),
    #[error("agent {0} is not reachable in the swarm (offline, or never joined it)")]
    NotInSwarm(String),
    #[error("refused by the agent ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("the agent failed ({code}): {message}")]
    Failed { code: String, message: String },
    #[error("the relay could not deliver ({code}): {message}")]
    Relay { code: String, message: String },
    #[error("rejected an answer that is not authentic: {0}")]
    Tampered(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection lost: {0}")]
    Disconnected(String),
}

impl CallError {
    /// The process exit status `oonode call` uses for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CallError::BadAddress(_) | CallError::NoPath | CallError::Swarm(_) => 2,
            CallError::Offline(_)
            | CallError::Unknown(_)
            | CallError::NotInSwarm(_)
            | CallError::Unreachable { .. } => 3,
            CallError::Refused { .. } => 4,
            CallError::Timeout(_) => 5,
            CallError::Tampered(_) => 6,
            _ => 1,
        }
    }
}

/// Which way to reach the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Via {
    /// The best that works: what worked last for this address, else a direct endpoint
    /// that proves to be the agent, else the swarm, else the relay.
    #[default]
    Auto,
    /// The agent's own HTTP/WebSocket endpoint.
    Direct,
    P2p,
    Relay,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Auto => "auto",
            Via::Direct => "direct",
            Via::P2p => "p2p",
            Via::Relay => "relay",
        }
    }
}

/// How long a path that worked is tried first for the same address.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

/// What worked per address, process-wide.
fn remembered(
) -> &'static std::sync::Mutex<std::collections::HashMap<Address, (Via, std::time::Instant)>> {
    static PATHS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Address, (Via, std::time::Instant)>>,
    > = std::sync::OnceLock::new();
    PATHS.get_or_init(Default::default)
}

/// How to reach and identify to a peer.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    pub relay_url: Option<String>,
    /// Swarm peers to join through (multiaddrs ending in `/p2p/<PeerId>`).
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// A swarm already running (a node's own, from `NodeHandle::p2p`): calls go through
    /// it instead of a swarm of the caller's own.
    pub swarm: Option<P2p>,
    /// The agent's HTTP endpoints, if known (`http://host:port`). More are learnt from the
    /// relay's directory and the agent's presence record in the swarm.
    pub endpoints: Vec<String>,
    /// Also use plaintext endpoints on private networks (10/8, 172.16/12, 192.168/16),
    /// not only on loopback.
    pub allow_private: bool,
    pub via: Via,
    /// The caller's own key; a fresh one is made when absent (an anonymous caller).
    pub identity: Option<Identity>,
    /// Wait for each next reply frame; default [`DEFAULT_REPLY_TIMEOUT`].
    pub reply_timeout: Option<Duration>,
}

impl ConnectOptions {
    pub fn relay(mut self, url: impl Into<String>) -> Self {
        self.relay_url = Some(url.into());
        self
    }

    pub fn bootstrap(mut self, addr: libp2p::Multiaddr) -> Self {
        self.bootstrap.push(addr);
        self
    }

    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    pub fn allow_private(mut self, on: bool) -> Self {
        self.allow_private = on;
        self
    }

    pub fn swarm(mut self, swarm: P2p) -> Self {
        self.swarm = Some(swarm);
        self
    }

    pub fn via(mut self, via: Via) -> Self {
        self.via = via;
        self
    }

    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    pub fn reply_timeout(mut self, wait: Duration) -> Self {
        self.reply_timeout = Some(wait);
        self
    }
}

/// A verified answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Answer {
    pub result: String,
    pub session_id: String,
    /// The STREAM chunks, in order.
    pub chunks: Vec<String>,
    pub duration_ms: u64,
    /// The session state the agent returned (history for the next turn).
    pub session: Value,
}

/// How a [`Remote`] reaches its agent.
enum Path {
    /// The agent's own `/ws`.
    Direct(Box<Socket>),
    Relay(Box<Socket>),
    /// A swarm given in the options, or one of the caller's own joined through the
    /// bootstrap peers (stopped with the handle).
    P2p {
        swarm: P2p,
        _stop: Option<tokio_util::sync::DropGuard>,
    },
}

/// A connection to one peer agent. Turns on one handle continue one session.
pub struct Remote {
    address: Address,
    identity: Identity,
    path: Path,
    via: Via,
    /// Paths still to try if this one fails to connect (auto mode).
    fallbacks: Vec<Via>,
    options: ConnectOptions,
    reply_timeout: Duration,
    session_id: Option<String>,
}

/// What arrived for a call.
enum Incoming {
    Signed(Envelope),
    /// An unsigned ERROR from the relay: it can report failure, never a result.
    RelayError(Map<String, Value>),
    Other,
}

/// Connects to the agent at `address` (a `0x…` string), by the path `options.via` names
/// or, in auto mode, the best one that works.
pub async fn connect(address: &str, options: ConnectOptions) -> Result<Remote, CallError> {
    let address: Address = address.parse()?;
    let mut order = match options.via {
        Via::Auto => auto_order(address, &options),
        via => vec![via],
    };
    if order.is_empty() {
        return Err(CallError::NoPath);
    }
    let mut last = None;
    while !order.is_empty() {
        let via = order.remove(0);
        match open_path(via, address, &options).await {
            Ok(path) => {
                tracing::debug!(agent = %address.short(), path = via.as_str(), "connected");
                if options.via == Via::Auto {
                    remember(address, via);
                }
                return Ok(Remote {
                    address,
                    identity: options.identity.clone().unwrap_or_else(Identity::generate),
                    path,
                    via,
                    fallbacks: order,
                    reply_timeout: options.reply_timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT),
                    options,
                    session_id: None,
                });
            }
            Err(e) => {
                tracing::debug!(agent = %address.short(), path = via.as_str(), error = %e, "path failed");
                last = Some(match last {
                    Some(prev) => more_telling(prev, e),
                    None => e,
                });
            }
        }
    }
    Err(last.unwrap_or(CallError::NoPath))
}

/// Sends of one INPUT over the swarm, when a new stream dies before any reply.
const P2P_SEND_ATTEMPTS: u32 = 4;

/// A call's stream over the swarm, holding its slot in the per-peer call limit.
struct CallStream {
    stream: libp2p::Stream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Of the errors of several paths, the one that tells most: what the agent is (offline,
/// unknown) over a path we could not use.
fn more_telling(a: CallError, b: CallError) -> CallError {
    let rank = |e: &CallError| match e {
        CallError::Offline(_) | CallError::NotInSwarm(_) | CallError::Unknown(_) => 3,
        CallError::Timeout(_) | CallError::Relay { .. } => 2,
        CallError::Unreachable { reason, .. } if reason == "none known" => 0,
        _ => 1,
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// Auto mode: what worked lately first, then direct, swarm, relay — each only when the
/// options make it possible.
fn auto_order(address: Address, options: &ConnectOptions) -> Vec<Via> {
    let can_swarm = options.swarm.is_some() || !options.bootstrap.is_empty();
    let can_relay = options.relay_url.is_some();
    let can_direct = !options.endpoints.is_empty() || can_swarm || can_relay;
    let mut order: Vec<Via> = [
        (Via::Direct, can_direct),
        (Via::P2p, can_swarm),
        (Via::Relay, can_relay),
    ]
    .into_iter()
    .filter_map(|(v, ok)| ok.then_some(v))
    .collect();
    let recent = remembered()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&address)
        .filter(|(_, at)| at.elapsed() < REMEMBER_FOR)
        .map(|(v, _)| *v);
    if let Some(v) = recent {
        if let Some(i) = order.iter().position(|o| *o == v) {
            order.remove(i);
            order.insert(0, v);
        }
    }
    order
}

fn remember(address: Address, via: Via) {
    remembered()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(address, (via, std::time::Instant::now()));
}

async fn open_path(
    via: Via,
    address: Address,
    options: &ConnectOptions,
) -> Result<Path, CallError> {
    match via {
        Via::Direct => open_direct(address, options).await,
        Via::P2p => {
            let path = join_swarm(options).await?;
            if let Path::P2p { swarm, .. } = &path {
                // Reachable now, or fall back now rather than at the first prompt.
                swarm
                    .connect(address.peer_id())
                    .await
                    .map_err(|e| p2p_error(e, address))?;
            }
            Ok(path)
        }
        Via::Relay => Ok(Path::Relay(Box::new(open_relay(options).await?))),
        Via::Auto => Err(CallError::NoPath),
    }
}

fn p2p_error(e: P2pError, address: Address) -> CallError {
    match e {
        P2pError::NotFound(_) => CallError::NotInSwarm(address.to_string()),
        P2pError::Timeout(_) => CallError::Timeout(crate::transport::p2p::DIAL_TIMEOUT),
        P2pError::Unreachable { .. } => CallError::Offline(address.to_string()),
        other => CallError::Swarm(other.to_string()),
    }
}

/// A direct endpoint that proves to be the agent: its `/info` names the address called.
/// Plaintext only on loopback, or on private networks when allowed.
async fn open_direct(address: Address, options: &ConnectOptions) -> Result<Path, CallError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| CallError::Swarm(e.to_string()))?;
    let mut candidates = options.endpoints.clone();
    if let Some(relay) = &options.relay_url {
        let directory = format!(
            "{}/api/agents/{address}",
            input_url(relay)
                .trim_end_matches("/ws/input")
                .replacen("ws", "http", 1)
        );
        if let Ok(res) = http.get(&directory).send().await {
            if let Ok(entry) = res.json::<Value>().await {
                candidates.extend(strings(&entry["endpoints"]));
            }
        }
    }
    // A swarm that is running anyway can tell the agent's published endpoints.
    if let Some(swarm) = &options.swarm {
        if let Some(presence) = swarm.presence(&address).await {
            candidates.extend(strings(presence.get("endpoints").unwrap_or(&Value::Null)));
        }
    }
    let mut reasons = Vec::new();
    for endpoint in candidates.iter().filter(|e| e.starts_with("http://")) {
        let base = endpoint.trim_end_matches('/');
        if !plaintext_allowed(base, options.allow_private) {
            reasons.push(format!(
                "{base}: plaintext outside loopback (allow_private is off)"
            ));
            continue;
        }
        let info = match http.get(format!("{base}/info")).send().await {
            Ok(res) => res.json::<Value>().await.unwrap_or(Value::Null),
            Err(e) => {
                reasons.push(format!("{base}: {e}"));
                continue;
            }
        };
        if info["address"].as_str() != Some(address.to_string().as_str()) {
            reasons.push(format!("{base}: /info names another address"));
            continue;
        }
        let url = format!("{}/ws", base.replacen("http://", "ws://", 1));
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
        )
        .await
        {
            Ok(Ok((socket, _))) => return Ok(Path::Direct(Box::new(socket))),
            Ok(Err(e)) => reasons.push(format!("{url}: {e}")),
            Err(_) => reasons.push(format!("{url}: timed out")),
        }
    }
    Err(CallError::Unreachable {
        url: "direct endpoints".into(),
        reason: if reasons.is_empty() {
            "none known".into()
        } else {
            reasons.join("; ")
        },
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Plaintext HTTP is used on loopback, and on private networks only when allowed.
fn plaintext_allowed(base: &str, allow_private: bool) -> bool {
    let host = base
        .trim_start_matches("http://")
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => true,
        Ok(std::net::IpAddr::V4(v4)) => allow_private && v4.is_private(),
        _ => false,
    }
}

async fn open_relay(options: &ConnectOptions) -> Result<Socket, CallError> {
    let relay = options.relay_url.as_deref().ok_or(CallError::NoPath)?;
    let url = input_url(relay);
    let unreachable = |reason: String| CallError::Unreachable {
        url: url.clone(),
        reason,
    };
    if url.starts_with("wss://") {
        return Err(unreachable(
            "wss:// needs TLS, which this build does not include; use ws://".into(),
        ));
    }
    let (socket, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(res) if res.status() == 503 => {
            CallError::Relay {
                code: "relay_full".into(),
                message: "the relay is at its limit of callers; try again later".into(),
            }
        }
        e => unreachable(e.to_string()),
    })?;
    Ok(socket)
}

/// Joins the swarm as a caller: a throwaway swarm key (so a running node with the same
/// co_dir keeps its PeerId to itself), DHT client mode, no listening.
async fn join_swarm(options: &ConnectOptions) -> Result<Path, CallError> {
    if let Some(swarm) = &options.swarm {
        return Ok(Path::P2p {
            swarm: swarm.clone(),
            _stop: None,
        });
    }
    if options.bootstrap.is_empty() {
        return Err(CallError::NoPath);
    }
    let config = P2pConfig::caller(options.bootstrap.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let swarm = P2p::spawn(
        libp2p::identity::Keypair::generate_ed25519(),
        config,
        stop.clone(),
    )
    .await
    .map_err(|e| CallError::Swarm(e.to_string()))?;
    Ok(Path::P2p {
        swarm,
        _stop: Some(stop.drop_guard()),
    })
}

impl Remote {
    pub fn address(&self) -> Address {
        self.address
    }

    /// How this handle reaches the agent: `direct`, `p2p` or `relay`.
    pub fn path(&self) -> &'static str {
        self.via.as_str()
    }

    /// Continues an earlier session (e.g. one saved by `oonode call --session`). The
    /// agent keeps the history; only the same caller identity may continue it.
    pub fn set_session_id(&mut self, id: impl Into<String>) {
        self.session_id = Some(id.into());
    }

    /// The session the next turn continues, once there is one.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// Sends a prompt and returns the verified result.
    pub async fn input(&mut self, prompt: &str) -> Result<Answer, CallError> {
        self.input_streaming(prompt, |_| {}).await
    }

    /// Sends a prompt; `on_chunk` sees each verified STREAM chunk as it arrives.
    pub async fn input_streaming(
        &mut self,
        prompt: &str,
        mut on_chunk: impl FnMut(&str),
    ) -> Result<Answer, CallError> {
        let session_id = self
            .session_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut payload = Map::new();
        payload.insert("prompt".into(), json!(prompt));
        payload.insert("session".into(), json!({ "session_id": session_id }));
        let input = Envelope::sign(&self.identity, Kind::Input, Some(self.address), payload);
        let input_id = input.id().unwrap_or_default().to_owned();
        let mut sends = 0;
        let mut stream = loop {
            sends += 1;
            match self.send(&input).await {
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
                Incoming::RelayError(obj) => return Err(relay_error(&obj, self.address)),
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
                    if sent != chunks.len() as u64 {
                        return Err(CallError::Tampered(format!(
                            "the agent sent {sent} chunks but {} arrived",
                            chunks.len()
                        )));
                    }
                    self.session_id = Some(session_id.clone());
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
                    let code = env.str_field("code").unwrap_or("error").to_owned();
                    let message = env.str_field("message").unwrap_or("").to_owned();
                    return Err(match code.as_str() {
                        "agent_error" | "agent_panicked" | "agent_cancelled" | "internal" => {
                            CallError::Failed { code, message }
                        }
                        _ => CallError::Refused { code, message },
                    });
                }
                _ => {}
            }
        }
    }

    /// Switches to the next path that connects.
    async fn fall_back(&mut self) -> Result<(), CallError> {
        let mut last = CallError::NoPath;
        while !self.fallbacks.is_empty() {
            let via = self.fallbacks.remove(0);
            match open_path(via, self.address, &self.options).await {
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
            Path::Direct(socket) | Path::Relay(socket) => {
                let mut frame = input.to_nested_json();
                frame["type"] = json!("INPUT");
                frame["to"] = json!(self.address.to_string());
                socket
                    .send(Message::text(frame.to_string()))
                    .await
                    .map_err(|e| CallError::Disconnected(e.to_string()))?;
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
                match tokio::time::timeout(wait, wire::read_frame(&mut call.stream)).await {
                    Err(_) => Err(CallError::Timeout(wait)),
                    Ok(Ok(Some(env))) => Ok(Incoming::Signed(env)),
                    Ok(Ok(None)) => Err(CallError::Disconnected(
                        "the agent closed the stream without an answer".into(),
                    )),
                    Ok(Err(wire::WireError::Io(e))) => Err(CallError::Disconnected(e.to_string())),
                    Ok(Err(e)) => Err(CallError::Tampered(format!("undecodable reply: {e}"))),
                }
            }
            (Path::Direct(socket) | Path::Relay(socket), None) => {
                let msg = tokio::time::timeout(wait, socket.next())
                    .await
                    .map_err(|_| CallError::Timeout(wait))?;
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(CallError::Disconnected(
                            "the relay closed the connection".into(),
                        ))
                    }
                    Some(Ok(_)) => return Ok(Incoming::Other),
                    Some(Err(e)) => return Err(CallError::Disconnected(e.to_string())),
                };
                let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&text) else {
                    return Ok(Incoming::Other);
                };
                if !obj.contains_key("signature") {
                    return Ok(
                        if obj.get("type").and_then(Value::as_str) == Some("ERROR") {
                            Incoming::RelayError(obj)
                        } else {
                            Incoming::Other
                        },
                    );
                }
                Envelope::from_flat(&obj)
                    .map(Incoming::Signed)
                    .map_err(|e| CallError::Tampered(e.to_string()))
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

fn relay_error(obj: &Map<String, Value>, address: Address) -> CallError {
    let code = obj
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("error")
        .to_owned();
    let message = obj
        .get("error")
        .or_else(|| obj.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    match code.as_str() {
        "agent_offline" | "agent_disconnected" => CallError::Offline(address.to_string()),
        "unknown_agent" => CallError::Unknown(address.to_string()),
        _ => CallError::Relay { code, message },
    }
}
