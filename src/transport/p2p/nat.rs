//! NAT traversal on the swarm. AutoNAT tells a node whether peers can dial it; a node that
//! cannot be dialed reserves a circuit on relay peers (circuit relay v2) and advertises
//! the `/p2p-circuit` address; when a peer calls over that circuit, DCUtR has both sides
//! dial each other at once (hole punching) and the circuit is closed once a direct
//! connection stands. [`Traversal`] keeps that state, and which path every connection
//! takes, for `/info`, `oonode peers` and the client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, multiaddr::Protocol, Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tracing::{debug, info};

use super::behaviour::Behaviour;

/// A relay whose reservation ended is asked again after this long (the others first).
const RESERVE_RETRY: Duration = Duration::from_secs(30);
/// A direct connection to a peer within this long of a circuit to it is DCUtR's.
const PUNCH_WINDOW: Duration = Duration::from_secs(30);
/// Relays a node keeps a circuit reservation on at once.
const MAX_RESERVATIONS: usize = 2;
/// How long a caller whose connection came up over a circuit waits for DCUtR to punch a
/// direct one before the call goes over the circuit.
pub(super) const HOLE_PUNCH_WAIT: Duration = Duration::from_secs(2);

/// Whether a node reserves circuits on relay peers. `host.yaml` `nat`, CLI `--nat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    /// AutoNAT decides: reserve while peers cannot dial this node.
    #[default]
    Auto,
    /// Dialable (a public address, a port forward): never reserve.
    Public,
    /// Behind a NAT for sure: reserve as soon as a relay peer is known.
    Private,
}

impl std::str::FromStr for NatMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(NatMode::Auto),
            "public" => Ok(NatMode::Public),
            "private" => Ok(NatMode::Private),
            other => Err(format!(
                "{other:?} is not a NAT mode: use auto, public or private"
            )),
        }
    }
}

/// Bounds of a relay's circuit relay v2 service (`oonode relay --swarm-listen`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CircuitLimits {
    /// Reservations held at once, over all peers (`--max-reservations`).
    pub max_reservations: usize,
    /// Circuits open at once, over all peers (`--max-circuits`).
    pub max_circuits: usize,
    /// A circuit is cut after this long (the caller dials again for the next call).
    pub max_circuit_duration: Duration,
    /// A circuit is cut after this many bytes, both ways together.
    pub max_circuit_bytes: u64,
}

impl Default for CircuitLimits {
    fn default() -> Self {
        CircuitLimits {
            max_reservations: 1024,
            max_circuits: 256,
            max_circuit_duration: Duration::from_secs(120),
            max_circuit_bytes: 1 << 20,
        }
    }
}

impl CircuitLimits {
    pub(super) fn relay_config(&self) -> libp2p::relay::Config {
        let n = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        // Token buckets: a burst of `limit`, then one more per `interval`. libp2p's own
        // per-IP circuit rate (a burst of 60, then one a minute) suits a relay for a
        // few long-lived connections; here a circuit is a call's first moments, and the
        // callers behind one NAT share its IP.
        libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: 2,
            reservation_duration: Duration::from_secs(3600),
            reservation_rate_limiters: Vec::new(),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: 8,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
        }
        .reservation_rate_per_peer(n(4), Duration::from_secs(30))
        .reservation_rate_per_ip(n(64), Duration::from_secs(2))
        .circuit_src_per_peer(n(16), Duration::from_secs(4))
        .circuit_src_per_ip(n(64), Duration::from_secs(1))
    }
}

/// The way a connection to a peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnPath {
    /// Dialed straight (or dialed in by the peer).
    Direct,
    /// Direct, after DCUtR punched through the NATs on both sides.
    HolePunched,
    /// Through a relay peer's circuit (relay v2): every byte passes the relay.
    Circuit,
}

impl std::fmt::Display for ConnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnPath::Direct => "direct",
            ConnPath::HolePunched => "hole-punched",
            ConnPath::Circuit => "circuit",
        })
    }
}

/// What AutoNAT last concluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    #[default]
    Unknown,
    Public,
    Private,
}

/// Connections by path, for `/info`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PathCounts {
    pub direct: usize,
    pub hole_punched: usize,
    pub circuit: usize,
}

/// A connection as the traversal state sees it.
struct Conn {
    id: ConnectionId,
    path: ConnPath,
    /// The address we dialed, when we did (a relay peer is reserved on through it).
    dialed: Option<Multiaddr>,
    /// Whether the peer is at a loopback address on this connection.
    loopback: bool,
}

pub(super) struct Traversal {
    mode: NatMode,
    reachability: Reachability,
    /// Peers that offer circuit relay v2 (identify says so), and where we reach them.
    relays: HashMap<PeerId, Multiaddr>,
    reservations: HashMap<PeerId, ListenerId>,
    /// Relays whose reservation ended (refused, or the relay went away), and when to try
    /// them again.
    backoff: HashMap<PeerId, Instant>,
    conns: HashMap<PeerId, Vec<Conn>>,
    /// Connections DCUtR made (reported once the connection is known).
    punched: Vec<ConnectionId>,
    /// When a circuit to a peer last came up: the direct connections DCUtR makes may
    /// land after that circuit is closed (each side dials; both may succeed).
    circuit_seen: HashMap<PeerId, Instant>,
}

impl Traversal {
    pub(super) fn new(mode: NatMode) -> Self {
        Traversal {
            mode,
            reachability: Reachability::Unknown,
            relays: HashMap::new(),
            reservations: HashMap::new(),
            backoff: HashMap::new(),
            conns: HashMap::new(),
            punched: Vec::new(),
            circuit_seen: HashMap::new(),
        }
    }

    pub(super) fn reachability(&self) -> Reachability {
        self.reachability
    }

    fn wants_circuits(&self) -> bool {
        match self.mode {
            NatMode::Private => true,
            NatMode::Public => false,
            NatMode::Auto => self.reachability == Reachability::Private,
        }
    }

    /// A connection came up. Returns the circuits to `peer` that a direct connection
    /// makes unneeded: the caller closes them, so calls stop passing the relay.
    pub(super) fn established(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) -> Vec<ConnectionId> {
        let relayed = endpoint.is_relayed();
        // DCUtR reports the punched connection on one side only (the side whose dial
        // made it); on the other, a direct connection arriving beside a circuit to the
        // same peer is that upgrade.
        let beside_circuit = self
            .conns
            .get(&peer)
            .is_some_and(|c| c.iter().any(|c| c.path == ConnPath::Circuit))
            || self
                .circuit_seen
                .get(&peer)
                .is_some_and(|at| at.elapsed() < PUNCH_WINDOW);
        if relayed {
            self.circuit_seen.insert(peer, Instant::now());
        }
        let path = if relayed {
            ConnPath::Circuit
        } else if self.punched.contains(&id) || beside_circuit {
            ConnPath::HolePunched
        } else {
            ConnPath::Direct
        };
        let dialed = match endpoint {
            ConnectedPoint::Dialer { address, .. } if !relayed => Some(address.clone()),
            _ => None,
        };
        let loopback = !relayed && is_loopback(endpoint.get_remote_address());
        let conns = self.conns.entry(peer).or_default();
        conns.push(Conn {
            id,
            path,
            dialed,
            loopback,
        });
        if relayed {
            return Vec::new();
        }
        conns
            .iter()
            .filter(|c| c.path == ConnPath::Circuit)
            .map(|c| c.id)
            .collect()
    }

    pub(super) fn closed(&mut self, peer: PeerId, id: ConnectionId, remaining: u32) {
        if let Some(conns) = self.conns.get_mut(&peer) {
            conns.retain(|c| c.id != id);
        }
        self.punched.retain(|p| *p != id);
        if remaining == 0 {
            self.conns.remove(&peer);
            self.relays.remove(&peer);
        }
    }

    /// DCUtR made connection `id` to `peer`.
    pub(super) fn hole_punched(&mut self, peer: PeerId, id: ConnectionId) {
        match self
            .conns
            .get_mut(&peer)
            .and_then(|c| c.iter_mut().find(|c| c.id == id))
        {
            Some(conn) => conn.path = ConnPath::HolePunched,
            None => self.punched.push(id),
        }
    }

    /// The best path to `peer` now: a direct connection over a circuit.
    pub(super) fn path(&self, peer: &PeerId) -> Option<ConnPath> {
        let conns = self.conns.get(peer)?;
        [ConnPath::HolePunched, ConnPath::Direct, ConnPath::Circuit]
            .into_iter()
            .find(|p| conns.iter().any(|c| c.path == *p))
    }

    pub(super) fn paths(&self) -> HashMap<PeerId, ConnPath> {
        self.conns
            .keys()
            .filter_map(|p| Some((*p, self.path(p)?)))
            .collect()
    }

    pub(super) fn counts(&self) -> PathCounts {
        let mut counts = PathCounts::default();
        for conn in self.conns.values().flatten() {
            match conn.path {
                ConnPath::Direct => counts.direct += 1,
                ConnPath::HolePunched => counts.hole_punched += 1,
                ConnPath::Circuit => counts.circuit += 1,
            }
        }
        counts
    }

    /// Whether `addr`, which `peer` says it listens on, is worth passing on to Kademlia
    /// (and so to everyone who asks for the peer). A loopback address is, only from a
    /// peer on this machine: from elsewhere it names the dialer's own machine, where
    /// another node may listen, and one dial answered by the wrong peer fails the whole
    /// attempt, circuit addresses included.
    pub(super) fn worth_dialing(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        !is_loopback(addr)
            || self
                .conns
                .get(peer)
                .is_some_and(|c| c.iter().any(|c| c.loopback))
    }

    /// Identify told us what `peer` speaks: a peer offering the relay's hop protocol,
    /// which we dialed, is a relay we can reserve on.
    pub(super) fn identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        protocols: &[libp2p::StreamProtocol],
    ) {
        if !protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME) {
            return;
        }
        let dialed = self
            .conns
            .get(&peer)
            .and_then(|c| c.iter().find_map(|c| c.dialed.clone()));
        if let Some(addr) = dialed {
            let base: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, Protocol::P2p(_)))
                .collect();
            self.relays.insert(peer, base.with(Protocol::P2p(peer)));
            self.reserve(swarm);
        }
    }

    pub(super) fn autonat(&mut self, swarm: &mut Swarm<Behaviour>, new: &autonat::NatStatus) {
        self.reachability = match new {
            autonat::NatStatus::Public(_) => Reachability::Public,
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        info!(reachability = ?self.reachability, "AutoNAT");
        if self.wants_circuits() {
            self.reserve(swarm);
        } else {
            for (relay, listener) in self.reservations.drain() {
                debug!(%relay, "dropping a circuit reservation: dialable now");
                swarm.remove_listener(listener);
            }
        }
    }

    /// A listener ended: a reservation that ends is made again at the next
    /// [`reserve`](Self::reserve).
    pub(super) fn listener_closed(&mut self, listener: ListenerId) {
        let until = Instant::now() + RESERVE_RETRY;
        let backoff = &mut self.backoff;
        self.reservations.retain(|relay, l| {
            if *l == listener {
                backoff.insert(*relay, until);
            }
            *l != listener
        });
    }

    /// Reserves circuits on relay peers, up to [`MAX_RESERVATIONS`], when this node wants
    /// them. Called on changes and every second.
    pub(super) fn reserve(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        self.circuit_seen
            .retain(|_, at| at.elapsed() < PUNCH_WINDOW);
        self.backoff.retain(|_, until| *until > now);
        if !self.wants_circuits() {
            return;
        }
        let free: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reservations.contains_key(p) && !self.backoff.contains_key(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (relay, addr) in free {
            if self.reservations.len() >= MAX_RESERVATIONS {
                break;
            }
            let circuit = addr.with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    info!(%circuit, "reserving a circuit");
                    self.reservations.insert(relay, listener);
                }
                Err(e) => debug!(%circuit, error = %e, "cannot reserve a circuit"),
            }
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// How long after start, and how often, AutoNAT asks peers to dial this node back.
pub(super) fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(20),
        refresh_interval: Duration::from_secs(300),
        throttle_server_period: Duration::from_secs(15),
        confidence_max: 1,
        // A server dials the addresses back one after the other, each for up to 5 s
        // (QUIC's handshake timeout, our TCP dial timeout): a NAT that drops silently
        // takes that long per address to say no.
        timeout: Duration::from_secs(30),
        // Private networks are real networks too (a LAN, a testnet, the NAT lab). A
        // server dials back only the IP it saw the request come from, so this lets no
        // one aim it elsewhere.
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// Deadlines of callers waiting for a hole punch, by peer.
pub(super) type Punching = HashMap<PeerId, Instant>;

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::{transport::PortUse, Endpoint};

    fn dialer(addr: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: addr.parse().unwrap(),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    fn listener(from: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: "/ip4/0.0.0.0/udp/4001/quic-v1".parse().unwrap(),
            send_back_addr: from.parse().unwrap(),
        }
    }

    const CIRCUIT: &str = "/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooWQ6xsqQvJez4iWBMUTyNJcxFW7XfbH1WCHnBEQbLsospe/p2p-circuit";

    #[test]
    fn nat_modes_parse_and_refuse_the_rest_clearly() {
        assert_eq!("auto".parse::<NatMode>(), Ok(NatMode::Auto));
        assert_eq!("private".parse::<NatMode>(), Ok(NatMode::Private));
        assert_eq!("public".parse::<NatMode>(), Ok(NatMode::Public));
        let err = "open".parse::<NatMode>().unwrap_err();
        assert!(err.contains("auto, public or private"), "{err}");
    }

    #[test]
    fn a_direct_connection_beside_a_circuit_is_the_hole_punch_and_closes_the_circuit() {
        let mut t = Traversal::new(NatMode::Auto);
        let peer = PeerId::random();
        let (relayed, direct) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        assert!(t.established(peer, relayed, &dialer(CIRCUIT)).is_empty());
        assert_eq!(t.path(&peer), Some(ConnPath::Circuit));
        // DCUtR's connection arrives: the circuit is to be closed, the path is punched.
        let close = t.established(
            peer,
            direct,
            &listener("/ip4/198.51.100.2/udp/4001/quic-v1"),
        );
        assert_eq!(close, vec![relayed]);
        assert_eq!(t.path(&peer), Some(ConnPath::HolePunched));
        t.closed(peer, relayed, 1);
        assert_eq!(t.path(&peer), Some(ConnPath::HolePunched));
        let counts = t.counts();
        assert_eq!(
            (counts.direct, counts.hole_punched, counts.circuit),
            (0, 1, 0)
        );
        t.closed(peer, direct, 0);
        assert_eq!(t.path(&peer), None);
        // Each side dials in a hole punch: a second direct connection may land after
        // the circuit is gone, and is the punch's too.
        let late = ConnectionId::new_unchecked(3);
        t.established(peer, late, &dialer("/ip4/198.51.100.2/udp/4001/quic-v1"));
        assert_eq!(t.path(&peer), Some(ConnPath::HolePunched));
    }

    #[test]
    fn a_plain_dial_is_direct_and_dcutrs_report_marks_a_connection_punched() {
        let mut t = Traversal::new(NatMode::Auto);
        let (a, b) = (PeerId::random(), PeerId::random());
        let one = ConnectionId::new_unchecked(1);
        t.established(a, one, &dialer("/ip4/198.51.100.2/tcp/4001"));
        assert_eq!(t.path(&a), Some(ConnPath::Direct));
        // DCUtR may report before the swarm does, or after.
        let two = ConnectionId::new_unchecked(2);
        t.hole_punched(b, two);
        t.established(b, two, &dialer("/ip4/198.51.100.3/udp/4001/quic-v1"));
        assert_eq!(t.path(&b), Some(ConnPath::HolePunched));
        t.hole_punched(a, one);
        assert_eq!(t.path(&a), Some(ConnPath::HolePunched));
    }

    #[test]
    fn loopback_addresses_count_only_from_a_peer_on_loopback() {
        let mut t = Traversal::new(NatMode::Auto);
        let (remote, local) = (PeerId::random(), PeerId::random());
        t.established(
            remote,
            ConnectionId::new_unchecked(1),
            &listener("/ip4/198.51.100.2/tcp/5555"),
        );
        t.established(
            local,
            ConnectionId::new_unchecked(2),
            &listener("/ip4/127.0.0.1/tcp/5555"),
        );
        let lo: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let lo6: Multiaddr = "/ip6/::1/udp/4001/quic-v1".parse().unwrap();
        let lan: Multiaddr = "/ip4/10.1.0.2/tcp/4001".parse().unwrap();
        assert!(!t.worth_dialing(&remote, &lo));
        assert!(!t.worth_dialing(&remote, &lo6));
        assert!(t.worth_dialing(&remote, &lan));
        assert!(t.worth_dialing(&local, &lo));
        // Over a circuit, a peer's loopback is not ours either.
        let relayed = PeerId::random();
        t.established(relayed, ConnectionId::new_unchecked(3), &dialer(CIRCUIT));
        assert!(!t.worth_dialing(&relayed, &lo));
    }

    #[test]
    fn circuits_are_wanted_by_mode_and_reachability() {
        let mut t = Traversal::new(NatMode::Auto);
        assert!(!t.wants_circuits());
        t.reachability = Reachability::Private;
        assert!(t.wants_circuits());
        assert!(Traversal::new(NatMode::Private).wants_circuits());
        let mut public = Traversal::new(NatMode::Public);
        public.reachability = Reachability::Private;
        assert!(!public.wants_circuits());
    }
}
