//! The task that owns the `Swarm`: it carries out the handle's [`Command`]s and answers
//! swarm events and DHT queries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{
    autonat, dcutr, identify, identity::Keypair, kad, mdns, multiaddr::Protocol, relay, Multiaddr,
    PeerId,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::behaviour::{build_swarm, Behaviour, BehaviourEvent};
use super::ip_limits::PeerIps;
use super::nat::{Punching, Traversal, HOLE_PUNCH_WAIT};
use super::record::check_record;
use super::{P2pConfig, P2pError, SwarmStatus};
use crate::envelope::unix_now;

/// How long a misbehaving peer, and the IPs it came from, stay blocked.
const BAN: Duration = Duration::from_secs(60);
/// How often the node refreshes its routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(30);
/// A record put that reached no peer (say, right after start, before the routing table
/// has any) is tried again this often, this many times in all.
const PUT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a lookup that met an empty routing table (the bootstrap connections still
/// opening) waits for the table to get an entry before it says "not found".
const EMPTY_TABLE_WAIT: Duration = Duration::from_secs(5);
const PUT_ATTEMPTS: u32 = 6;
/// Puts waiting to be tried again, at most (a relay alone in its swarm fails every put).
const MAX_PUT_RETRIES: usize = 4096;

/// What the handle asks of the event loop, which alone owns the `Swarm`.
pub(super) enum Command {
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    Ban {
        peer: PeerId,
        ips: Vec<IpAddr>,
    },
    PutRecord {
        key: Vec<u8>,
        value: Vec<u8>,
        /// When our own copy stops being served.
        expires: Instant,
    },
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    Known {
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>, bool)>>,
    },
    /// A bootstrap peer's addresses, resolved from its DNS multiaddr: known to Kademlia,
    /// and dialed unless connected.
    Bootstrap {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
}

/// What an outstanding Kademlia query is for.
enum Query {
    Find(PeerId),
    /// A record lookup, answered when the query ends with the newest valid record found
    /// (by signed timestamp): a peer still holding an older one (say, the home relay an
    /// agent has left) does not win by answering first.
    Record {
        reply: oneshot::Sender<Option<Vec<u8>>>,
        newest: Option<(u64, Vec<u8>)>,
    },
    /// Our own record being put, and how many times it has been tried.
    Put {
        record: kad::Record,
        attempts: u32,
    },
}

pub(super) struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Callers waiting for a connection to a peer.
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), P2pError>>>>,
    queries: HashMap<kad::QueryId, Query>,
    /// Puts that reached no peer, to try again after the instant given.
    put_retries: Vec<(Instant, kad::Record, u32)>,
    bans: Vec<(Instant, PeerId)>,
    status: Arc<Mutex<SwarmStatus>>,
    bootstrapped: bool,
    /// libp2p's own metrics, when a node's `/metrics` shows them.
    pub(super) metrics: Option<libp2p::metrics::Metrics>,
    /// What became of records others asked for or put (a relay counts them).
    records: Option<crate::metrics::DhtRecordCounters>,
    /// Reachability, circuit reservations and the path of every connection.
    traversal: Traversal,
    /// Callers whose connection came up over a circuit, waiting (until the instant
    /// given) for DCUtR to make a direct one.
    punching: Punching,
    /// This swarm serves circuit relay v2: its listen addresses are its external ones
    /// (a reservation names them).
    serves_circuits: bool,
    circuits: Option<crate::metrics::CircuitCounters>,
    /// A node or relay (a DHT server), not a one-off caller.
    serves: bool,
    /// Peers being looked up a second time (the first lookup found nothing).
    looked_again: std::collections::HashSet<PeerId>,
    /// Peers whose lookup asked nobody (the routing table was empty): looked up again
    /// when the table gets an entry, until the instant given. `true` while a lookup of
    /// it runs.
    awaiting_table: HashMap<PeerId, (Instant, bool)>,
}

impl EventLoop {
    /// Builds the swarm (listening, dialing the bootstrap peers); [`run`](Self::run)
    /// drives it.
    pub(super) fn new(
        keypair: Keypair,
        config: &P2pConfig,
        commands: mpsc::Receiver<Command>,
        status: Arc<Mutex<SwarmStatus>>,
        peer_ips: PeerIps,
    ) -> Result<Self, P2pError> {
        Ok(EventLoop {
            swarm: build_swarm(keypair, config, peer_ips)?,
            commands,
            dials: HashMap::new(),
            queries: HashMap::new(),
            put_retries: Vec::new(),
            bans: Vec::new(),
            status,
            bootstrapped: false,
            metrics: None,
            records: config.record_counters.clone(),
            traversal: Traversal::new(config.nat),
            punching: Punching::new(),
            serves_circuits: config.circuit_relay.is_some(),
            circuits: config.circuit_counters.clone(),
            serves: config.dht_server,
            looked_again: std::collections::HashSet::new(),
            awaiting_table: HashMap::new(),
        })
    }

    /// Opens and accepts streams of our own protocols on this swarm.
    pub(super) fn stream_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().stream.new_control()
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BOOTSTRAP_EVERY);
        let mut unban = tokio::time::interval(PUT_RETRY_AFTER);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = tick.tick() => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = punch_deadline(&self.punching) => self.end_punch_waits(),
                _ = table_deadline(&self.awaiting_table) => self.end_table_waits(),
                _ = unban.tick() => {
                    self.lift_bans();
                    self.retry_puts();
                    self.traversal.reserve(&mut self.swarm);
                }
            }
        }
        debug!("swarm stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { peer, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let first = !self.dials.contains_key(&peer);
                self.dials.entry(peer).or_default().push(reply);
                if first {
                    // Known addresses first (Kademlia supplies them); else ask the DHT.
                    if self.swarm.dial(DialOpts::peer_id(peer).build()).is_err() {
                        self.find(peer);
                    }
                }
            }
            Command::Ban { peer, ips } => {
                let until = Instant::now() + BAN;
                info!(%peer, ?ips, "banned for {BAN:?}");
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                for ip in ips {
                    self.swarm.behaviour_mut().ip_limits.ban(ip, until);
                }
                self.bans.push((until, peer));
            }
            Command::PutRecord {
                key,
                value,
                expires,
            } => {
                let mut record = kad::Record::new(key, value);
                record.expires = Some(expires);
                self.put(record, 1);
            }
            Command::GetRecord { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(kad::RecordKey::new(&key));
                self.queries.insert(
                    id,
                    Query::Record {
                        reply,
                        newest: None,
                    },
                );
            }
            Command::Bootstrap { peer, addrs } => {
                for addr in &addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                if !self.swarm.is_connected(&peer) {
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "cannot dial a bootstrap peer");
                    }
                }
            }
            Command::Known { reply } => {
                let mut known: HashMap<PeerId, (Vec<Multiaddr>, bool)> = HashMap::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        let addrs = entry.node.value.iter().cloned().collect();
                        known.insert(*entry.node.key.preimage(), (addrs, false));
                    }
                }
                // Routing-table entries only: one-off callers (DHT clients) are not agents.
                for peer in self.swarm.connected_peers() {
                    if let Some(entry) = known.get_mut(peer) {
                        entry.1 = true;
                    }
                }
                let _ = reply.send(known.into_iter().map(|(p, (a, c))| (p, a, c)).collect());
            }
        }
    }

    /// Puts our own record in the DHT (attempt number `attempts`).
    fn put(&mut self, record: kad::Record, attempts: u32) {
        match self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record.clone(), kad::Quorum::One)
        {
            Ok(id) => {
                self.queries.insert(id, Query::Put { record, attempts });
            }
            Err(e) => debug!(error = ?e, "storing a record failed"),
        }
    }

    /// Puts again the records whose time has come, unless they expired meanwhile.
    fn retry_puts(&mut self) {
        let now = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.put_retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.put_retries = wait;
        for (_, record, attempts) in due {
            if !record.is_expired(now) {
                self.put(record, attempts);
            }
        }
    }

    fn find(&mut self, peer: PeerId) {
        let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.queries.insert(id, Query::Find(peer));
    }

    /// Answers everyone waiting to reach `peer`.
    fn finish_dial(&mut self, peer: PeerId, result: Result<(), &DialError>) {
        self.looked_again.remove(&peer);
        self.awaiting_table.remove(&peer);
        if let Err(e) = result {
            debug!(%peer, error = %e, "cannot reach a peer");
        }
        for waiter in self.dials.remove(&peer).unwrap_or_default() {
            let _ = waiter.send(result.map_err(|e| P2pError::Unreachable {
                peer: peer.to_string(),
                reason: e.to_string(),
            }));
        }
    }

    fn lift_bans(&mut self) {
        let now = Instant::now();
        let (done, keep): (Vec<_>, Vec<_>) =
            self.bans.drain(..).partition(|(until, _)| *until <= now);
        self.bans = keep;
        for (_, peer) in done {
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        self.swarm.behaviour_mut().ip_limits.lift_bans(now);
    }

    fn set_connected(&self) {
        let n = self.swarm.connected_peers().count();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.connected_peers = n;
        status.reachability = self.traversal.reachability();
        status.paths = self.traversal.counts();
        status.peer_paths = self.traversal.paths();
    }

    /// Lookups that waited long enough for a routing table entry end as "not found".
    fn end_table_waits(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .awaiting_table
            .iter()
            .filter(|(_, (until, looking))| *until <= now && !looking)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            self.not_found(peer);
        }
    }

    /// The routing table got an entry: lookups that met it empty are made again.
    fn table_filled(&mut self) {
        let again: Vec<PeerId> = self
            .awaiting_table
            .iter_mut()
            .filter(|(_, (_, looking))| !*looking)
            .map(|(peer, (_, looking))| {
                *looking = true;
                *peer
            })
            .collect();
        for peer in again {
            debug!(%peer, "the routing table has an entry now; looking again");
            self.find(peer);
        }
    }

    /// Answers everyone waiting to reach `peer`: nobody in the DHT knows it.
    fn not_found(&mut self, peer: PeerId) {
        self.looked_again.remove(&peer);
        self.awaiting_table.remove(&peer);
        for waiter in self.dials.remove(&peer).unwrap_or_default() {
            let _ = waiter.send(Err(P2pError::NotFound(peer.to_string())));
        }
    }

    /// Callers that waited long enough for a hole punch go over the circuit.
    fn end_punch_waits(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .punching
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.punching.remove(&peer);
            debug!(%peer, "no direct connection yet: calling over the circuit");
            self.finish_dial(peer, Ok(()));
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(metrics) = &self.metrics {
            record(metrics, &event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let circuit = address.iter().any(|p| p == Protocol::P2pCircuit);
                if self.serves_circuits && !circuit {
                    self.swarm.add_external_address(address.clone());
                }
                let full = if circuit {
                    address
                } else {
                    address.with(Protocol::P2p(*self.swarm.local_peer_id()))
                };
                let full = full.to_string();
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                // A relay names each of its addresses once per reservation made through
                // it (over TCP and over QUIC): one line each.
                if !status.listen_addrs.contains(&full) {
                    // A one-off caller listens only for hole punches: not news.
                    if self.serves {
                        info!(%full, "swarm listening");
                    } else {
                        debug!(%full, "swarm listening");
                    }
                    status.listen_addrs.push(full);
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(from = %send_back_addr, %error, "refused an inbound connection");
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let gone = address.to_string();
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .listen_addrs
                    .retain(|a| !a.starts_with(&gone));
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.traversal.listener_closed(listener_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                for circuit in self
                    .traversal
                    .established(peer_id, connection_id, &endpoint)
                {
                    // Direct now: the call goes straight, not through the relay.
                    debug!(peer = %peer_id, "closing a circuit: a direct connection stands");
                    self.swarm.close_connection(circuit);
                }
                self.set_connected();
                if endpoint.is_relayed() && self.dials.contains_key(&peer_id) {
                    // The peer will try to punch through (DCUtR): give it a moment.
                    self.punching
                        .entry(peer_id)
                        .or_insert_with(|| Instant::now() + HOLE_PUNCH_WAIT);
                } else {
                    self.punching.remove(&peer_id);
                    self.finish_dial(peer_id, Ok(()));
                }
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.traversal
                    .closed(peer_id, connection_id, num_established);
                self.set_connected();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => {
                match result {
                    Ok(id) => {
                        if self.serves {
                            info!(peer = %remote_peer_id, "hole punched: direct connection");
                        } else {
                            debug!(peer = %remote_peer_id, "hole punched: direct connection");
                        }
                        self.traversal.hole_punched(remote_peer_id, id);
                        self.set_connected();
                    }
                    Err(e) => debug!(peer = %remote_peer_id, error = %e, "hole punch failed"),
                }
                if self.punching.remove(&remote_peer_id).is_some() {
                    self.finish_dial(remote_peer_id, Ok(()));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                self.traversal.autonat(&mut self.swarm, &new);
                self.set_connected();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => self.on_relay(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => {
                debug!(relay = %relay_peer_id, "circuit reservation accepted");
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if self.dials.contains_key(&peer) && !self.swarm.is_connected(&peer) => {
                // The addresses we had did not work: ask the DHT before giving up, unless
                // we already did.
                let searching = self
                    .queries
                    .values()
                    .any(|q| matches!(q, Query::Find(p) if *p == peer));
                if searching {
                    return;
                }
                if matches!(error, DialError::NoAddresses) {
                    self.find(peer);
                } else {
                    self.finish_dial(peer, Err(&error));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Only DHT servers go into the routing table: a one-off caller (a
                // Kademlia client) that lists the ports it listens on would otherwise be
                // handed out in lookups, where it answers no Kademlia request and can
                // crowd out the peers that do.
                let server = info.protocols.contains(&super::behaviour::KAD_PROTOCOL);
                for addr in info.listen_addrs {
                    if server && self.traversal.worth_dialing(&peer_id, &addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                self.traversal
                    .identified(&mut self.swarm, peer_id, &info.protocols);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        record: Some(record),
                        ..
                    },
            })) => {
                let kept = self.store_record(record);
                if let Some(c) = &self.records {
                    if kept { &c.stored } else { &c.refused }.inc();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::GetRecord {
                        present_locally: true,
                        ..
                    },
            })) => {
                if let Some(c) = &self.records {
                    c.served.inc();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => {
                self.on_query(id, result, step.last);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated { .. })) => {
                self.table_filled();
            }
            _ => {}
        }
    }

    /// The circuit relay service's events, counted for a relay's `/metrics`.
    #[allow(deprecated)] // the deprecated variants still arrive; they are ignored
    fn on_relay(&mut self, event: relay::Event) {
        let Some(c) = &self.circuits else { return };
        match event {
            relay::Event::ReservationReqAccepted { renewed: false, .. } => {
                c.reservations.inc();
            }
            relay::Event::ReservationClosed { .. } | relay::Event::ReservationTimedOut { .. } => {
                c.reservations.dec();
            }
            relay::Event::ReservationReqDenied { .. } => {
                c.refused.inc();
            }
            relay::Event::CircuitReqAccepted { .. } => {
                c.circuits.inc();
                c.circuits_total.inc();
            }
            relay::Event::CircuitReqDenied { .. } => {
                c.refused.inc();
            }
            relay::Event::CircuitClosed { .. } => {
                c.circuits.dec();
            }
            _ => {}
        }
    }

    /// Stores a record another peer put, if it is valid and fresh and not older than the
    /// one we hold for that key: a replayed older record never replaces a newer one.
    fn store_record(&mut self, mut record: kad::Record) -> bool {
        use kad::store::RecordStore;
        let (now, from) = (unix_now(), Instant::now());
        let (timestamp, expires) = match check_record(&record, now, from) {
            Ok(checked) => checked,
            Err(e) => {
                debug!(error = %e, "refused a DHT record");
                return false;
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        if let Some(held) = store.get(&record.key) {
            // Timestamps are in seconds: of two records signed in the same second (an
            // agent that moved at once), the one received last wins.
            if let Ok((held_at, _)) = check_record(&held, now, from) {
                if held_at > timestamp || (held_at == timestamp && held.value == record.value) {
                    debug!(
                        held = held_at,
                        offered = timestamp,
                        "refused a record no newer than the one held"
                    );
                    return false;
                }
            }
        }
        record.expires = Some(record.expires.map_or(expires, |e| e.min(expires)));
        match store.put(record) {
            Ok(()) => true,
            Err(e) => {
                debug!(error = ?e, "storing a record failed");
                false
            }
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match (self.queries.get_mut(&id), result) {
            (Some(Query::Find(peer)), kad::QueryResult::GetClosestPeers(result)) => {
                let peer = *peer;
                self.queries.remove(&id);
                if self.swarm.is_connected(&peer) {
                    // The lookup itself reached the peer (over a circuit, say, which
                    // DCUtR may be upgrading: those callers wait for that).
                    if !self.punching.contains_key(&peer) {
                        self.finish_dial(peer, Ok(()));
                    }
                    return;
                }
                // A lookup that timed out asked someone.
                let asked = result.as_ref().map_or(true, |ok| !ok.peers.is_empty());
                let found = result
                    .ok()
                    .and_then(|ok| ok.peers.into_iter().find(|p| p.peer_id == peer));
                let now = Instant::now();
                match found {
                    Some(info) if !info.addrs.is_empty() => {
                        let opts = DialOpts::peer_id(peer).addresses(info.addrs).build();
                        match self.swarm.dial(opts) {
                            // A dial under way (the lookup's own) answers the callers.
                            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
                            Err(e) => self.finish_dial(peer, Err(&e)),
                        }
                    }
                    // A lookup right after start can end before the routing table has
                    // anything in it (the bootstrap connections still opening, which
                    // under load takes a while): it waits for an entry.
                    _ if !asked && self.dials.contains_key(&peer) => {
                        let (until, looking) = self
                            .awaiting_table
                            .entry(peer)
                            .or_insert((now + EMPTY_TABLE_WAIT, false));
                        *looking = false;
                        if *until <= now {
                            self.not_found(peer);
                        } else {
                            debug!(%peer, "the routing table is empty; waiting for an entry");
                        }
                    }
                    // The table may have grown while the lookup ran: once more before
                    // giving up.
                    _ if self.dials.contains_key(&peer) && self.looked_again.insert(peer) => {
                        debug!(%peer, "not found in the DHT; looking once more");
                        self.find(peer);
                    }
                    _ => self.not_found(peer),
                }
            }
            (Some(Query::Record { newest, .. }), kad::QueryResult::GetRecord(result)) => {
                if let Ok(kad::GetRecordOk::FoundRecord(found)) = result {
                    // Checked when read too: a record may have aged since it was stored,
                    // and peers that do not check may answer.
                    match check_record(&found.record, unix_now(), Instant::now()) {
                        Ok((ts, _)) if newest.as_ref().is_none_or(|(best, _)| ts > *best) => {
                            *newest = Some((ts, found.record.value));
                        }
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "ignored a record found in the DHT"),
                    }
                }
                if last {
                    if let Some(Query::Record { reply, newest }) = self.queries.remove(&id) {
                        let _ = reply.send(newest.map(|(_, value)| value));
                    }
                }
            }
            (Some(Query::Put { .. }), kad::QueryResult::PutRecord(result)) => {
                let Some(Query::Put { record, attempts }) = self.queries.remove(&id) else {
                    return;
                };
                match result {
                    Ok(_) => debug!(attempts, "record put in the DHT"),
                    Err(e)
                        if attempts < PUT_ATTEMPTS && self.put_retries.len() < MAX_PUT_RETRIES =>
                    {
                        debug!(error = %e, attempts, "a record put reached no peer; trying again");
                        let at = Instant::now() + PUT_RETRY_AFTER;
                        self.put_retries.push((at, record, attempts + 1));
                    }
                    Err(e) => {
                        debug!(error = %e, attempts, "a record put reached no peer; giving up")
                    }
                }
            }
            _ => {
                if last {
                    self.queries.remove(&id);
                }
            }
        }
    }
}

/// Resolves when the first lookup waiting for a routing table entry has waited enough;
/// never when none waits.
async fn table_deadline(awaiting: &HashMap<PeerId, (Instant, bool)>) {
    match awaiting
        .values()
        .filter(|(_, looking)| !looking)
        .map(|(until, _)| until)
        .min()
    {
        Some(at) => tokio::time::sleep_until((*at).into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the first caller waiting for a hole punch has waited enough; never when
/// none waits.
async fn punch_deadline(punching: &Punching) {
    match punching.values().min() {
        Some(at) => tokio::time::sleep_until((*at).into()).await,
        None => std::future::pending().await,
    }
}

fn record(metrics: &libp2p::metrics::Metrics, event: &SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    metrics.record(event);
    match event {
        SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => metrics.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => metrics.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => metrics.record(e),
        _ => {}
    }
}
