//! What the swarm is made of: the transports, the behaviours and their limits, and how a
//! swarm is built from [`P2pConfig`].

use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, identify, identity::Keypair, kad, mdns,
    multiaddr::Protocol, noise, ping, relay, tcp, yamux, StreamProtocol, Swarm,
};
use tracing::warn;

use super::ip_limits::{IpLimits, PeerIps};
use super::{P2pConfig, P2pError};

pub(super) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/oonode/id/1.0.0";

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) ip_limits: IpLimits,
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    /// Circuit relay v2 service (relays only).
    pub(super) relay: Toggle<relay::Behaviour>,
    /// Dials and listens through relay peers' circuits.
    pub(super) relay_client: relay::client::Behaviour,
    /// Upgrades a circuit to a direct connection by hole punching.
    pub(super) dcutr: dcutr::Behaviour,
    /// Asks peers to dial back (and dials back for them); off for one-off callers.
    pub(super) autonat: Toggle<autonat::Behaviour>,
    pub(super) stream: libp2p_stream::Behaviour,
}

/// Builds the swarm, starts listening and dials the bootstrap peers. `peer_ips` is kept
/// up to date with the IPs of every connection.
pub(super) fn build_swarm(
    keypair: Keypair,
    config: &P2pConfig,
    peer_ips: PeerIps,
) -> Result<Swarm<Behaviour>, P2pError> {
    let mut bootstrap = Vec::new();
    for addr in &config.bootstrap {
        match addr.iter().last() {
            Some(Protocol::P2p(peer)) => bootstrap.push((peer, addr.clone())),
            _ => return Err(P2pError::BootstrapWithoutPeer(addr.clone())),
        }
    }
    let build = |e: &dyn std::fmt::Display| P2pError::Build(e.to_string());
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(128));
    let max_per_ip = config.max_connections_per_ip;
    let mdns_on = config.mdns;
    let dht_server = config.dht_server;
    let circuit_limits = config.circuit_relay.clone();
    let store_config = kad::store::MemoryStoreConfig {
        max_records: config.max_records,
        ..kad::store::MemoryStoreConfig::default()
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_other_transport(tcp_transport)
        .map_err(|e| build(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_behaviour(|key, relay_client| {
            let local = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(10));
            // Any peer may PUT into our store: the event loop gets each record first and
            // keeps only valid presence records.
            kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
            let store = kad::store::MemoryStore::with_config(local, store_config);
            let kad = kad::Behaviour::with_config(local, store, kad_config);
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                ip_limits: IpLimits::new(max_per_ip, peer_ips),
                blocked: allow_block_list::Behaviour::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(format!("oonode/{}", env!("CARGO_PKG_VERSION")))
                        // A circuit reserved behind a NAT is a new listen address:
                        // peers (a relay's routing table) must learn it at once.
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                kad,
                mdns: mdns.into(),
                relay: circuit_limits
                    .map(|l| relay::Behaviour::new(local, l.relay_config()))
                    .into(),
                relay_client,
                dcutr: dcutr::Behaviour::new(local),
                autonat: dht_server
                    .then(|| autonat::Behaviour::new(local, super::nat::autonat_config()))
                    .into(),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    // Loopback and private test networks have no confirmed external address, which
    // would leave Kademlia in client mode: nodes serve the DHT explicitly.
    swarm.behaviour_mut().kad.set_mode(Some(if dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    for addr in &config.listen {
        let taken = port_taken(addr);
        let error = match taken {
            Some(e) => e.to_string(),
            None => match swarm.listen_on(addr.clone()) {
                Ok(_) => continue,
                Err(e) => e.to_string(),
            },
        };
        let any_port = with_any_port(addr);
        if !config.listen_fallback || any_port == *addr {
            return Err(P2pError::Listen {
                addr: addr.clone(),
                reason: error,
            });
        }
        // A second node on the same machine is common: it takes a free port rather than
        // failing, and says so (the banner shows the port it got).
        warn!("swarm port of {addr} is not available ({error}); listening on a free port instead");
        swarm
            .listen_on(any_port.clone())
            .map_err(|e| P2pError::Listen {
                addr: any_port,
                reason: e.to_string(),
            })?;
    }
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    // DNS names are resolved apart (`dns.rs`), then dialed the same way.
    for (peer, addr) in bootstrap.iter().filter(|(_, a)| !super::dns::is_dns(a)) {
        swarm.behaviour_mut().kad.add_address(peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    Ok(swarm)
}

/// How long a TCP dial may take, handshakes included. A NAT that drops what nobody
/// inside asked for leaves a SYN unanswered for two minutes; an AutoNAT server dialing
/// back must give up well within its peer's patience (its `timeout`) for the peer to
/// learn that it is not reachable. QUIC gives up after its own 5 s handshake timeout.
const TCP_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP with Noise and yamux, as the builder's `with_tcp` makes it, with a time limit.
fn tcp_transport(
    key: &Keypair,
) -> Result<
    impl libp2p::Transport<
            Output = (libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox),
            Error: Send + Sync + 'static,
            Dial: Send,
            ListenerUpgrade: Send,
        > + Send
        + Unpin
        + 'static,
    Box<dyn std::error::Error + Send + Sync>,
> {
    use libp2p::core::{muxing::StreamMuxerBox, transport::timeout::TransportTimeout, upgrade};
    use libp2p::Transport;
    let noise = noise::Config::new(key)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    Ok(TransportTimeout::new(tcp, TCP_DIAL_TIMEOUT))
}

/// `addr` with its TCP or UDP port 0: the same interface and transport, any free port.
pub(super) fn with_any_port(addr: &libp2p::Multiaddr) -> libp2p::Multiaddr {
    addr.iter()
        .map(|p| match p {
            Protocol::Tcp(_) => Protocol::Tcp(0),
            Protocol::Udp(_) => Protocol::Udp(0),
            other => other,
        })
        .collect()
}

/// Whether `addr`'s port is already bound on this machine, found by binding it plainly for
/// a moment. libp2p's TCP listeners set SO_REUSEPORT, so without this a second node would
/// share the port with the first (and get half its connections) instead of being told.
fn port_taken(addr: &libp2p::Multiaddr) -> Option<std::io::Error> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(n) if n != 0 => port = Some((n, true)),
            Protocol::Udp(n) if n != 0 => port = Some((n, false)),
            _ => {}
        }
    }
    let (ip, (port, tcp)) = (ip?, port?);
    let probe = if tcp {
        std::net::TcpListener::bind((ip, port)).map(drop)
    } else {
        std::net::UdpSocket::bind((ip, port)).map(drop)
    };
    probe.err()
}
