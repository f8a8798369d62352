//! Calling a peer agent by address: `connect(address, options)` → [`Remote`].
//!
//! Every INPUT is signed with the caller's key; every reply must be signed by the
//! address called, addressed to the caller, answer this very INPUT, be fresh, and come in
//! sequence. Anything else is an error, never a silent result: the relay in between can
//! drop frames but cannot forge or alter them.
//!
//! Paths: the agent's own endpoint (direct), the libp2p swarm (`ConnectOptions::bootstrap`
//! or a running node's swarm) and the relay (`ConnectOptions::relay`); in auto mode, the
//! best one that works.
//!
//! `path.rs` opens the ways to an agent (and picks among them); `socket.rs` is one
//! WebSocket to it (sealed when the agent seals, and the CONNECT a Python host needs);
//! `call.rs` runs one turn over the open path and verifies every frame of the answer.
//!
//! Inside a seal (the agent signed its half of the handshake) the agent's unsigned
//! frames are trusted as its own, which is how a Python `host()` answers; outside one,
//! only signed frames are.

mod call;
mod path;
mod socket;

use std::time::Duration;

use serde_json::Value;

use crate::identity::{Address, AddressError, Identity};
use crate::proto::{ErrorCode, RelayUrlError};
use crate::transport::p2p::P2p;
use path::{auto_order, more_telling, open_path, remember, Path};

/// Default wait for each next reply frame (not for the whole answer: long streams are
/// fine as long as chunks keep coming).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("invalid address: {0}")]
    BadAddress(#[from] AddressError),
    #[error("no way to reach the agent: give a relay URL or a bootstrap peer")]
    NoPath,
    #[error("invalid relay URL: {0}")]
    BadRelayUrl(#[from] RelayUrlError),
    /// The CA file of [`ConnectOptions::relay_ca`] cannot be used.
    #[error("relay CA: {0}")]
    Ca(#[from] crate::tls::TlsError),
    #[error("no direct endpoint of the agent is known")]
    NoEndpoint,
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
    Refused { code: ErrorCode, message: String },
    #[error("the agent failed ({code}): {message}")]
    Failed { code: ErrorCode, message: String },
    #[error("the relay could not deliver ({code}): {message}")]
    Relay { code: ErrorCode, message: String },
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
            CallError::BadAddress(_)
            | CallError::NoPath
            | CallError::BadRelayUrl(_)
            | CallError::Ca(_)
            | CallError::Swarm(_) => 2,
            CallError::Offline(_)
            | CallError::Unknown(_)
            | CallError::NotInSwarm(_)
            | CallError::NoEndpoint
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
    /// The libp2p swarm.
    P2p,
    /// A relay the agent announced on.
    Relay,
    /// The agent's own `POST /input` (signed), one request per turn: no stream. Its
    /// answer must be signed, unless the link is TLS or loopback (a Python host's is
    /// not signed).
    Http,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Auto => "auto",
            Via::Direct => "direct",
            Via::P2p => "p2p",
            Via::Relay => "relay",
            Via::Http => "http",
        }
    }
}

/// How to reach and identify to a peer.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    pub relay_url: Option<String>,
    /// A CA to trust, besides the public ones, for `wss://` relays, their `https://`
    /// directory and agents' `https://` endpoints: a PEM file of one or more
    /// certificates (a private CA, or a self-signed server's own certificate).
    pub relay_ca: Option<std::path::PathBuf>,
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
    /// Wait for each next reply frame; default 60 s.
    pub reply_timeout: Option<Duration>,
}

impl ConnectOptions {
    pub fn relay(mut self, url: impl Into<String>) -> Self {
        self.relay_url = Some(url.into());
        self
    }

    /// Trusts the CA certificates in this PEM file too (see [`ConnectOptions::relay_ca`]).
    pub fn relay_ca(mut self, pem_file: impl Into<std::path::PathBuf>) -> Self {
        self.relay_ca = Some(pem_file.into());
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
    /// The session state the agent returned: its id, and its history (`messages`) only if
    /// the request sent one (a first turn does).
    pub session: Value,
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
    /// The session state the last answer returned: a Python host takes it back with the
    /// next CONNECT (and merges it with what it kept).
    session_state: Option<Value>,
    /// Agents the request has passed through before this call (sent as `hops` when > 0).
    hops: u32,
}

/// Connects to the agent at `address` (a `0x…` string), by the path `options.via` names
/// or, in auto mode, the best one that works.
pub async fn connect(address: &str, options: ConnectOptions) -> Result<Remote, CallError> {
    let address: Address = address.parse()?;
    // A CA file that cannot be used is the caller's mistake, said once, before any path.
    if let Some(ca) = &options.relay_ca {
        crate::tls::client_config(Some(ca))?;
    }
    let mut order = match options.via {
        Via::Auto => auto_order(address, &options),
        via => vec![via],
    };
    if order.is_empty() {
        return Err(CallError::NoPath);
    }
    let identity = options.identity.clone().unwrap_or_else(Identity::generate);
    let mut last = None;
    while !order.is_empty() {
        let via = order.remove(0);
        match open_path(via, address, &options, &identity).await {
            Ok(path) => {
                tracing::debug!(agent = %address.short(), path = via.as_str(), "connected");
                if options.via == Via::Auto {
                    remember(address, via);
                }
                return Ok(Remote {
                    address,
                    identity,
                    path,
                    via,
                    fallbacks: order,
                    reply_timeout: options.reply_timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT),
                    options,
                    session_id: None,
                    session_state: None,
                    hops: 0,
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

impl Remote {
    pub fn address(&self) -> Address {
        self.address
    }

    /// How this handle reaches the agent: `direct`, `p2p` or `relay`.
    pub fn path(&self) -> &'static str {
        self.via.as_str()
    }

    /// Over the swarm, how the connection to the agent goes now: `direct`,
    /// `hole-punched` (DCUtR made it) or `circuit` (through a relay peer). `None` on
    /// the other paths, or with no connection at the moment.
    pub fn swarm_path(&self) -> Option<crate::ConnPath> {
        match &self.path {
            Path::P2p { swarm, .. } => swarm.path_to(&self.address.peer_id()),
            _ => None,
        }
    }

    /// Whether the path is sealed end to end (SEAL): a relay in between reads nothing.
    /// The swarm's streams are always encrypted to the agent's key (Noise) and count too.
    pub fn sealed(&self) -> bool {
        match &self.path {
            Path::Direct(link) | Path::Relay(link) => link.is_sealed(),
            Path::P2p { .. } => true,
            // TLS proves a server's name, not the agent: not a seal.
            Path::Http(_) => false,
        }
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

    /// For an agent that calls on while answering a turn: the number of agents the
    /// request has passed through, i.e. the turn's [`hops`](crate::Turn::hops) + 1.
    /// Signed into each INPUT; the callee refuses it past
    /// [`MAX_HOPS`](crate::proto::MAX_HOPS), which ends loops of agents calling agents.
    pub fn set_hops(&mut self, hops: u32) {
        self.hops = hops;
    }

    /// Sends a prompt and returns the verified result.
    pub async fn input(&mut self, prompt: &str) -> Result<Answer, CallError> {
        self.input_streaming(prompt, |_| {}).await
    }
}
