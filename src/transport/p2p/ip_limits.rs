//! Limits per remote IP, beside libp2p's per-peer ones: a fresh key costs nothing, an
//! address does. [`IpLimits`] refuses inbound connections from a banned IP and beyond
//! [`P2pConfig::max_connections_per_ip`](super::P2pConfig::max_connections_per_ip) from
//! one IP, and keeps [`PeerIps`] (which IPs each peer is connected from) so that the call
//! server can count streams per IP and a ban takes the peer's IPs with it.
//!
//! An IPv6 address counts as its /64: one host usually holds a whole /64, which would
//! otherwise give it 2^64 fresh addresses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::{transport::PortUse, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    behaviour::ConnectionEstablished, dummy, ConnectionClosed, ConnectionDenied, ConnectionId,
    FromSwarm, ListenFailure, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// The IP a limit or a ban applies to, taken from a connection's remote multiaddr: an
/// IPv4 address, or an IPv6 address cut to its /64 (IPv4-mapped ones count as IPv4).
/// None over a circuit: the IP there is the relay's, shared by everyone it relays (the
/// relay bounds circuits per peer and per IP itself; bans by key still apply).
pub(super) fn remote_ip(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & !((1u128 << 64) - 1))),
        }),
        _ => None,
    })
}

/// Which IPs each connected peer is connected from (in the order its connections came);
/// written by [`IpLimits`], read by the call server and by bans.
#[derive(Debug, Clone, Default)]
pub(super) struct PeerIps(Arc<Mutex<ConnectionIps>>);

type ConnectionIps = HashMap<PeerId, Vec<(ConnectionId, IpAddr)>>;

impl PeerIps {
    /// The IP of the peer's oldest open connection: its inbound streams count against it
    /// (libp2p-stream does not say which connection a stream came on).
    pub(super) fn first(&self, peer: &PeerId) -> Option<IpAddr> {
        self.lock().get(peer)?.first().map(|(_, ip)| *ip)
    }

    /// Every IP the peer is connected from.
    pub(super) fn all(&self, peer: &PeerId) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .lock()
            .get(peer)
            .map(|conns| conns.iter().map(|(_, ip)| *ip).collect())
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        ips
    }

    fn add(&self, peer: PeerId, id: ConnectionId, ip: IpAddr) {
        self.lock().entry(peer).or_default().push((id, ip));
    }

    fn remove(&self, peer: &PeerId, id: ConnectionId) {
        let mut map = self.lock();
        if let Some(conns) = map.get_mut(peer) {
            conns.retain(|(c, _)| *c != id);
            if conns.is_empty() {
                map.remove(peer);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionIps> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum IpRefused {
    #[error("{0} is banned for misbehaving")]
    Banned(IpAddr),
    #[error("{ip} already has {max} inbound connections")]
    TooMany { ip: IpAddr, max: usize },
}

/// The behaviour that enforces per-IP connection limits and IP bans.
pub(super) struct IpLimits {
    max_per_ip: usize,
    /// Inbound connections still in their handshake, by IP.
    pending: HashMap<ConnectionId, IpAddr>,
    /// Established inbound connections, by IP.
    inbound: HashMap<ConnectionId, IpAddr>,
    banned: HashMap<IpAddr, Instant>,
    peers: PeerIps,
}

impl IpLimits {
    pub(super) fn new(max_per_ip: usize, peers: PeerIps) -> Self {
        IpLimits {
            max_per_ip,
            pending: HashMap::new(),
            inbound: HashMap::new(),
            banned: HashMap::new(),
            peers,
        }
    }

    /// Refuses new inbound connections from `ip` until `until`. Connections other peers
    /// already have from it stay: they did nothing wrong, and a shared address (a NAT)
    /// should not lose its working sessions to one bad neighbour.
    pub(super) fn ban(&mut self, ip: IpAddr, until: Instant) {
        let entry = self.banned.entry(ip).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Forgets the bans that are over.
    pub(super) fn lift_bans(&mut self, now: Instant) {
        self.banned.retain(|_, until| *until > now);
    }

    fn check_ban(&self, ip: IpAddr) -> Result<(), ConnectionDenied> {
        match self.banned.get(&ip) {
            Some(until) if *until > Instant::now() => {
                Err(ConnectionDenied::new(IpRefused::Banned(ip)))
            }
            _ => Ok(()),
        }
    }

    fn check_count(
        &self,
        conns: &HashMap<ConnectionId, IpAddr>,
        ip: IpAddr,
    ) -> Result<(), ConnectionDenied> {
        if conns.values().filter(|c| **c == ip).count() >= self.max_per_ip {
            return Err(ConnectionDenied::new(IpRefused::TooMany {
                ip,
                max: self.max_per_ip,
            }));
        }
        Ok(())
    }
}

impl NetworkBehaviour for IpLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = remote_ip(remote_addr) else {
            return Ok(());
        };
        // Refused before the handshake costs us anything; handshakes in flight count
        // too, so one IP cannot hold every pending slot.
        self.check_ban(ip)?;
        self.check_count(&self.inbound, ip)?;
        self.check_count(&self.pending, ip)?;
        self.pending.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pending.remove(&connection_id);
        if let Some(ip) = remote_ip(remote_addr) {
            // Checked again: a ban or other connections may have come during the handshake.
            self.check_ban(ip)?;
            self.check_count(&self.inbound, ip)?;
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                if let Some(ip) = remote_ip(endpoint.get_remote_address()) {
                    self.peers.add(peer_id, connection_id, ip);
                    if endpoint.is_listener() {
                        self.inbound.insert(connection_id, ip);
                    }
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                self.peers.remove(&peer_id, connection_id);
                self.inbound.remove(&connection_id);
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.pending.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circuit_has_no_remote_ip_of_its_own() {
        let circuit: Multiaddr = "/ip4/198.51.100.10/udp/4001/quic-v1/p2p/12D3KooWQ6xsqQvJez4iWBMUTyNJcxFW7XfbH1WCHnBEQbLsospe/p2p-circuit/p2p/12D3KooWJ2WH5gvWPcPGTwFtg95GdB3RSk33qc3oG81sc2Y7K2KH"
            .parse()
            .unwrap();
        assert_eq!(remote_ip(&circuit), None);
    }

    #[test]
    fn remote_ip_takes_ipv4_and_the_ipv6_slash_64() {
        let ip = |s: &str| remote_ip(&s.parse().unwrap());
        assert_eq!(
            ip("/ip4/10.1.2.3/udp/4001/quic-v1"),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            ip("/ip6/2001:db8:1:2:aaaa:bbbb:cccc:dddd/tcp/1"),
            Some("2001:db8:1:2::".parse().unwrap())
        );
        assert_eq!(
            ip("/ip6/::ffff:10.0.0.7/tcp/1"),
            Some("10.0.0.7".parse().unwrap())
        );
        assert_eq!(ip("/dns4/example.org/tcp/1"), None);
    }

    #[test]
    fn a_ban_lasts_until_it_is_over() {
        let mut limits = IpLimits::new(2, PeerIps::default());
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let now = Instant::now();
        limits.ban(ip, now + std::time::Duration::from_secs(60));
        assert!(limits.check_ban(ip).is_err());
        assert!(limits.check_ban("127.0.0.8".parse().unwrap()).is_ok());
        limits.lift_bans(now + std::time::Duration::from_secs(61));
        assert!(limits.check_ban(ip).is_ok());
    }
}
