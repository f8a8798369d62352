//! The libp2p transport: the node joins a swarm under its own key (PeerId = the `0x`
//! address's key): QUIC and TCP (noise + yamux), identify, ping, Kademlia, and mDNS when
//! asked for. Signed envelopes travel on `/oonode/envelope/1`, one stream per call:
//! INPUT → STREAM… → OUTPUT | ERROR (see `wire.rs`).
//!
//! One task owns the `Swarm` (the event loop); [`P2p`] is its cloneable handle. Inbound
//! calls go through the same dispatcher as every other transport.
//!
//! Layout: this file holds the settings, errors and reported state; `handle.rs` the [`P2p`]
//! handle (spawn, dial, call streams); `behaviour.rs` what the swarm is made of;
//! `event_loop.rs` the task that owns it; `dns.rs` DNS multiaddrs of bootstrap peers;
//! `nat.rs` NAT traversal (AutoNAT, circuit reservations, DCUtR) and the path each
//! connection takes; `ip_limits.rs` connection limits and bans per remote IP; `serve.rs` inbound calls; `presence.rs` presence records in the DHT;
//! `wire.rs` the frame codec.

mod behaviour;
mod dns;
mod event_loop;
mod handle;
mod ip_limits;
mod nat;
mod presence;
mod record;
mod serve;
pub mod wire;

use std::net::Ipv4Addr;
use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr, StreamProtocol};
use serde::Serialize;

pub use handle::P2p;
pub use nat::{CircuitLimits, ConnPath, NatMode, PathCounts, Reachability};
pub(crate) use record::{check_home, check_presence, home_key, presence_key, PRESENCE_REPUBLISH};

/// Our protocol: signed envelopes as length-prefixed CBOR.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode/envelope/1");
/// The most calls this swarm opens to one peer at once. Peers accept twice that
/// ([`P2pConfig::max_streams_per_peer`]), so a conforming caller never trips the limit,
/// not even while a finished call's stream is still being closed.
pub const MAX_CALLS_PER_PEER: usize = 32;
/// The swarm's port, for QUIC-v1 (UDP) and TCP alike, unless `listen` says otherwise:
/// the libp2p convention, so that a firewall rule or a port forward can be written once.
/// Taken (a second node on the machine), the node listens on a free port instead.
pub const DEFAULT_SWARM_PORT: u16 = 4001;
/// How long finding and dialing a peer may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Swarm settings. `host.yaml` keys `listen`, `bootstrap`, `mdns`; CLI `--listen`,
/// `--bootstrap`, `--mdns`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct P2pConfig {
    /// Multiaddrs to listen on (default: QUIC-v1 and TCP on every interface, both on
    /// [`DEFAULT_SWARM_PORT`]).
    pub listen: Vec<Multiaddr>,
    /// When a listen address cannot be had (its port is taken), listen on the same
    /// interface with a free port instead, with a warning. On for the default addresses;
    /// addresses given explicitly (host.yaml `listen`, `--listen`) fail instead.
    pub listen_fallback: bool,
    /// Peers to join through: multiaddrs ending in `/p2p/<PeerId>`; `/dns4/`, `/dns6/`
    /// and `/dns/` names are resolved by the system's resolver (and again every 5
    /// minutes, every 10 s until they resolve).
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses this node is reachable at from outside (a port forward, a public IP the
    /// node cannot see on its interfaces): advertised to peers as its own.
    pub external_addrs: Vec<Multiaddr>,
    /// Find peers on the LAN by multicast DNS (off by default: it sends multicast).
    pub mdns: bool,
    /// Whether this swarm answers DHT queries (nodes) or only asks (one-off callers).
    pub dht_server: bool,
    /// Calls served at once, over all peers.
    pub max_inbound_streams: usize,
    /// Calls one peer may have open at once; more gets the peer cut off (and its IP
    /// banned with it).
    pub max_streams_per_peer: usize,
    /// Calls open at once from one remote IP (an IPv6 /64), over all its peers; more are
    /// refused, without a ban: several honest peers may share an address.
    pub max_streams_per_ip: usize,
    /// Connections at once.
    pub max_connections: u32,
    /// Inbound connections at once from one remote IP (an IPv6 /64), and inbound
    /// handshakes in flight from it; more are refused. Loopback is no exception.
    pub max_connections_per_ip: usize,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// DHT records this peer holds for others at most (presence and home-relay records);
    /// a relay holds one per agent in its part of the key space.
    pub max_records: usize,
    /// Where to count the records served, stored and refused (a relay's `/metrics`).
    pub(crate) record_counters: Option<crate::metrics::DhtRecordCounters>,
    /// Whether to reserve circuits on relay peers (behind a NAT); AutoNAT decides in
    /// [`NatMode::Auto`].
    pub nat: NatMode,
    /// Serve circuit relay v2 within these bounds (relays); `None`: no relay service.
    pub circuit_relay: Option<CircuitLimits>,
    /// Where to count reservations and circuits served (a relay's `/metrics`).
    pub(crate) circuit_counters: Option<crate::metrics::CircuitCounters>,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            listen: vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4(Ipv4Addr::UNSPECIFIED))
                    .with(Protocol::Udp(DEFAULT_SWARM_PORT))
                    .with(Protocol::QuicV1),
                Multiaddr::empty()
                    .with(Protocol::Ip4(Ipv4Addr::UNSPECIFIED))
                    .with(Protocol::Tcp(DEFAULT_SWARM_PORT)),
            ],
            listen_fallback: true,
            bootstrap: Vec::new(),
            external_addrs: Vec::new(),
            mdns: false,
            dht_server: true,
            max_inbound_streams: 256,
            max_streams_per_peer: 2 * MAX_CALLS_PER_PEER,
            max_streams_per_ip: 4 * MAX_CALLS_PER_PEER,
            max_connections: 1024,
            max_connections_per_ip: 16,
            idle_timeout: Duration::from_secs(60),
            max_records: 1024,
            record_counters: None,
            nat: NatMode::Auto,
            circuit_relay: None,
            circuit_counters: None,
        }
    }
}

impl P2pConfig {
    /// A swarm that only calls out (one-off callers, `oonode peers`): DHT client mode,
    /// joined through `bootstrap`, no AutoNAT, no reservations. It listens on free ports
    /// all the same: a hole punch dials from the port peers saw this caller at.
    pub fn caller(bootstrap: Vec<Multiaddr>) -> Self {
        P2pConfig {
            listen: P2pConfig::default()
                .listen
                .iter()
                .map(behaviour::with_any_port)
                .collect(),
            listen_fallback: false,
            bootstrap,
            dht_server: false,
            nat: NatMode::Public,
            ..P2pConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("bootstrap address {0} must end with /p2p/<PeerId>")]
    BootstrapWithoutPeer(Multiaddr),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot build the swarm: {0}")]
    Build(String),
    #[error("peer {0} not found in the swarm")]
    NotFound(String),
    #[error("cannot reach peer {peer}: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("timed out finding peer {0}")]
    Timeout(String),
    #[error("the swarm has stopped")]
    Stopped,
}

/// The swarm's state, for `/info` and the banner.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SwarmStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    /// Whether peers can dial this node, as AutoNAT found.
    pub reachability: Reachability,
    /// Connections by path: direct, hole-punched, through a circuit.
    pub paths: PathCounts,
    /// The best path to each connected peer.
    #[serde(skip)]
    pub(crate) peer_paths: std::collections::HashMap<libp2p::PeerId, ConnPath>,
}

/// An agent the swarm knows, with what it published about itself.
#[derive(Debug, Clone, Serialize)]
pub struct PeerPresence {
    pub address: String,
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// How this swarm is connected to it now, when it is.
    pub path: Option<ConnPath>,
    /// It advertises a `/p2p-circuit` address: reachable through a relay peer.
    pub circuit: bool,
    pub summary: Option<String>,
    pub examples: Vec<String>,
}

/// A string that is no multiaddr (`host.yaml` `listen` / `bootstrap`).
#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not a multiaddr: {source}")]
pub struct MultiaddrError {
    input: String,
    source: libp2p::multiaddr::Error,
}

/// Parses a multiaddr given on the command line or in host.yaml, with a clear error.
pub fn parse_multiaddr(s: &str) -> Result<Multiaddr, MultiaddrError> {
    s.parse::<Multiaddr>().map_err(|source| MultiaddrError {
        input: s.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_multiaddr_names_the_input() {
        assert!(parse_multiaddr("/ip4/127.0.0.1/tcp/4001").is_ok());
        let err = parse_multiaddr("nope").unwrap_err().to_string();
        assert!(err.starts_with("\"nope\" is not a multiaddr: "), "{err}");
    }
}
