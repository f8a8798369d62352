//! The task that owns the `Swarm`: it carries out the handle's [`Command`]s and answers
//! swarm events and DHT queries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{identify, identity::Keypair, kad, mdns, multiaddr::Protocol, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::behaviour::{build_swarm, Behaviour, BehaviourEvent};
use super::ip_limits::PeerIps;
use super::record::{check_presence, expires_at};
use super::{P2pConfig, P2pError, SwarmStatus};
use crate::envelope::unix_now;

/// How long a misbehaving peer, and the IPs it came from, stay blocked.
const BAN: Duration = Duration::from_secs(60);
/// How often the node refreshes its routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(30);

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
    },
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    Known {
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>, bool)>>,
    },
}

/// What an outstanding Kademlia query is for.
enum Query {
    Find(PeerId),
    Record(Option<oneshot::Sender<Option<Vec<u8>>>>),
}

pub(super) struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Callers waiting for a connection to a peer.
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), P2pError>>>>,
    queries: HashMap<kad::QueryId, Query>,
    bans: Vec<(Instant, PeerId)>,
    status: Arc<Mutex<SwarmStatus>>,
    bootstrapped: bool,
    /// libp2p's own metrics, when a node's `/metrics` shows them.
    pub(super) metrics: Option<libp2p::metrics::Metrics>,
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
            bans: Vec::new(),
            status,
            bootstrapped: false,
            metrics: None,
        })
    }

    /// Opens and accepts streams of our own protocols on this swarm.
    pub(super) fn stream_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().stream.new_control()
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BOOTSTRAP_EVERY);
        let mut unban = tokio::time::interval(Duration::from_secs(5));
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
                _ = unban.tick() => self.lift_bans(),
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
            Command::PutRecord { key, value } => {
                let mut record = kad::Record::new(key, value);
                // Ours is fresh; it lives as long as any presence record may.
                record.expires = Some(expires_at(unix_now(), unix_now()));
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .put_record(record, kad::Quorum::One)
                {
                    debug!(error = ?e, "storing a record failed");
                }
            }
            Command::GetRecord { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(kad::RecordKey::new(&key));
                self.queries.insert(id, Query::Record(Some(reply)));
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

    fn find(&mut self, peer: PeerId) {
        let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.queries.insert(id, Query::Find(peer));
    }

    /// Answers everyone waiting to reach `peer`.
    fn finish_dial(&mut self, peer: PeerId, result: Result<(), &DialError>) {
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
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected_peers = n;
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(metrics) = &self.metrics {
            record(metrics, &event);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                info!(%full, "swarm listening");
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .listen_addrs
                    .push(full.to_string());
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                self.set_connected();
                self.finish_dial(peer_id, Ok(()));
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed { .. } => self.set_connected(),
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
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        record: Some(record),
                        ..
                    },
            })) => {
                self.store_presence(record);
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
            _ => {}
        }
    }

    /// Stores a presence record another peer put, if it is valid and fresh and newer than
    /// the one we hold for that key: a replayed older record never replaces a newer one.
    fn store_presence(&mut self, mut record: kad::Record) {
        use kad::store::RecordStore;
        let now = unix_now();
        let presence = match check_presence(&record, now) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "refused a DHT record");
                return;
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        if let Some(held) = store.get(&record.key) {
            if let Ok(held) = check_presence(&held, now) {
                if held.timestamp >= presence.timestamp {
                    debug!(
                        held = held.timestamp,
                        offered = presence.timestamp,
                        "refused a presence record no newer than the one held"
                    );
                    return;
                }
            }
        }
        let expires = expires_at(presence.timestamp, now);
        record.expires = Some(record.expires.map_or(expires, |e| e.min(expires)));
        if let Err(e) = store.put(record) {
            debug!(error = ?e, "storing a presence record failed");
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match (self.queries.get_mut(&id), result) {
            (Some(Query::Find(peer)), kad::QueryResult::GetClosestPeers(result)) => {
                let peer = *peer;
                self.queries.remove(&id);
                let found = result
                    .ok()
                    .and_then(|ok| ok.peers.into_iter().find(|p| p.peer_id == peer));
                match found {
                    Some(info) if !info.addrs.is_empty() => {
                        let opts = DialOpts::peer_id(peer).addresses(info.addrs).build();
                        if let Err(e) = self.swarm.dial(opts) {
                            self.finish_dial(peer, Err(&e));
                        }
                    }
                    _ if self.swarm.is_connected(&peer) => self.finish_dial(peer, Ok(())),
                    _ => {
                        for waiter in self.dials.remove(&peer).unwrap_or_default() {
                            let _ = waiter.send(Err(P2pError::NotFound(peer.to_string())));
                        }
                    }
                }
            }
            (Some(Query::Record(reply)), kad::QueryResult::GetRecord(result)) => {
                if let Ok(kad::GetRecordOk::FoundRecord(found)) = result {
                    // Checked when read too: a record may have aged since it was stored,
                    // and peers that do not check may answer.
                    let valid = check_presence(&found.record, unix_now());
                    if let Err(e) = &valid {
                        debug!(error = %e, "ignored a presence record found in the DHT");
                    }
                    if let (Ok(_), Some(reply)) = (valid, reply.take()) {
                        let _ = reply.send(Some(found.record.value));
                    }
                }
                if last {
                    if let Some(Query::Record(Some(reply))) = self.queries.remove(&id) {
                        let _ = reply.send(None);
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
