//! The libp2p transport: the node joins a swarm under its own key (PeerId = the `0x`
//! address's key): QUIC and TCP (noise + yamux), identify, ping, Kademlia, and mDNS when
//! asked for. Signed envelopes travel on `/oonode/envelope/1`, one stream per call:
//! INPUT → STREAM… → OUTPUT | ERROR (see `wire.rs`).
//!
//! One task owns the `Swarm` (the event loop); [`P2p`] is its cloneable handle. Inbound
//! calls go through the same dispatcher as every other transport.

pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identify, identity::Keypair, kad, mdns,
    multiaddr::Protocol, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::dispatch::{Dispatcher, Refusal, Submission};
use crate::envelope::{canonical_json, unix_now, Envelope};
use crate::identity::{Address, Identity};
use crate::proto::session_of;
use wire::WireError;

/// Our protocol: signed envelopes as length-prefixed CBOR.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode/envelope/1");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/oonode/id/1.0.0";
/// How long a stream may take to send its INPUT.
const INPUT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply frame may take to write (per chunk, not per answer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most calls this swarm opens to one peer at once. Peers accept twice that
/// ([`P2pConfig::max_streams_per_peer`]), so a conforming caller never trips the limit,
/// not even while a finished call's stream is still being closed.
pub const MAX_CALLS_PER_PEER: usize = 32;
/// How long a misbehaving peer stays blocked.
const BAN: Duration = Duration::from_secs(60);
/// How often the node refreshes its routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(30);
/// How long finding and dialing a peer may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Key prefix of presence records in the DHT.
const PRESENCE_PREFIX: &[u8] = b"/oonode/presence/";

/// Swarm settings. `host.yaml` keys `listen`, `bootstrap`, `mdns`; CLI `--listen`,
/// `--bootstrap`, `--mdns`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct P2pConfig {
    /// Multiaddrs to listen on (default: QUIC and TCP on every interface, ports chosen
    /// by the system).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through: multiaddrs ending in `/p2p/<PeerId>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Find peers on the LAN by multicast DNS (off by default: it sends multicast).
    pub mdns: bool,
    /// Whether this swarm answers DHT queries (nodes) or only asks (one-off callers).
    pub dht_server: bool,
    /// Calls served at once, over all peers.
    pub max_inbound_streams: usize,
    /// Calls one peer may have open at once; more gets the peer cut off.
    pub max_streams_per_peer: usize,
    /// Connections at once.
    pub max_connections: u32,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            listen: vec![
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            dht_server: true,
            max_inbound_streams: 256,
            max_streams_per_peer: 2 * MAX_CALLS_PER_PEER,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl P2pConfig {
    /// A swarm that only calls out (one-off callers, `oonode peers`): no listening, DHT
    /// client mode, joined through `bootstrap`.
    pub fn caller(bootstrap: Vec<Multiaddr>) -> Self {
        P2pConfig {
            listen: Vec::new(),
            bootstrap,
            dht_server: false,
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
}

/// An agent the swarm knows, with what it published about itself.
#[derive(Debug, Clone, Serialize)]
pub struct PeerPresence {
    pub address: String,
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    pub summary: Option<String>,
    pub examples: Vec<String>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<(), P2pError>>,
    },
    Ban {
        peer: PeerId,
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

/// Handle to a running swarm; cheap to clone.
#[derive(Clone)]
pub struct P2p {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    status: Arc<Mutex<SwarmStatus>>,
    /// How many listen addresses were asked for.
    listeners: usize,
    /// Calls this swarm has open to each peer: kept under the peers' per-peer limit, so
    /// a node relaying many callers' calls is never mistaken for a misbehaving peer.
    outbound: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
}

impl std::fmt::Debug for P2p {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2p")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl P2p {
    /// Builds the swarm, starts listening and dialing the bootstrap peers, and runs the
    /// event loop until `stop`.
    pub async fn spawn(
        keypair: Keypair,
        config: P2pConfig,
        stop: CancellationToken,
    ) -> Result<P2p, P2pError> {
        let peer_id = keypair.public().to_peer_id();
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
        let mdns_on = config.mdns;
        let dht_server = config.dht_server;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| build(&e))?
            .with_quic()
            .with_behaviour(|key| {
                let local = key.public().to_peer_id();
                let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                kad_config.set_query_timeout(Duration::from_secs(10));
                // Records are checked before they are stored: only valid presence records.
                kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
                let kad = kad::Behaviour::with_config(
                    local,
                    kad::store::MemoryStore::new(local),
                    kad_config,
                );
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
                } else {
                    None
                };
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    blocked: allow_block_list::Behaviour::default(),
                    identify: identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                            .with_agent_version(format!("oonode/{}", env!("CARGO_PKG_VERSION"))),
                    ),
                    ping: ping::Behaviour::default(),
                    kad,
                    mdns: mdns.into(),
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
            swarm
                .listen_on(addr.clone())
                .map_err(|e| P2pError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        for (peer, addr) in &bootstrap {
            swarm.behaviour_mut().kad.add_address(peer, addr.clone());
            if let Err(e) = swarm.dial(addr.clone()) {
                warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
        let control = swarm.behaviour().stream.new_control();
        let status = Arc::new(Mutex::new(SwarmStatus {
            peer_id: peer_id.to_string(),
            ..SwarmStatus::default()
        }));
        let (commands, rx) = mpsc::channel(256);
        let event_loop = EventLoop {
            swarm,
            commands: rx,
            dials: HashMap::new(),
            queries: HashMap::new(),
            bans: Vec::new(),
            status: status.clone(),
            bootstrapped: false,
        };
        tokio::spawn(
            event_loop
                .run(stop)
                .instrument(info_span!("swarm", peer = %peer_id)),
        );
        Ok(P2p {
            commands,
            control,
            peer_id,
            status,
            listeners: config.listen.len(),
            outbound: Arc::default(),
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn status(&self) -> SwarmStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until every configured listener is up (or `limit` passes).
    pub async fn listening(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let addrs = self.status().listen_addrs;
            if addrs.len() >= self.listeners.max(1) || Instant::now() >= deadline {
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn command(&self, cmd: Command) -> Result<(), P2pError> {
        self.commands.send(cmd).await.map_err(|_| P2pError::Stopped)
    }

    /// Finds `peer` (routing table, then a DHT lookup) and connects to it.
    pub async fn connect(&self, peer: PeerId) -> Result<(), P2pError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Connect { peer, reply }).await?;
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(P2pError::Stopped),
            Err(_) => Err(P2pError::Timeout(peer.to_string())),
        }
    }

    /// Opens a call stream to the agent at `address`.
    pub async fn open(&self, address: Address) -> Result<libp2p::Stream, P2pError> {
        let peer = address.peer_id();
        self.connect(peer).await?;
        let mut control = self.control.clone();
        control
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| P2pError::Unreachable {
                peer: peer.to_string(),
                reason: e.to_string(),
            })
    }

    /// Opens a call stream, waiting while this swarm already has
    /// [`MAX_CALLS_PER_PEER`] calls open to that peer. The permit lasts as long as the call.
    pub(crate) async fn open_call(
        &self,
        address: Address,
    ) -> Result<(libp2p::Stream, tokio::sync::OwnedSemaphorePermit), P2pError> {
        let slots = self
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address.peer_id())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CALLS_PER_PEER)))
            .clone();
        let permit = slots.acquire_owned().await.map_err(|_| P2pError::Stopped)?;
        Ok((self.open(address).await?, permit))
    }

    /// Cuts a peer off for a while.
    pub async fn ban(&self, peer: PeerId) {
        let _ = self.command(Command::Ban { peer }).await;
    }

    /// Publishes this node's signed presence (address, summary, examples) in the DHT.
    pub async fn publish_presence(
        &self,
        identity: &Identity,
        summary: Option<&str>,
        examples: &[String],
        endpoints: &[String],
    ) {
        let mut payload = Map::new();
        payload.insert("endpoints".into(), json!(endpoints));
        payload.insert("type".into(), json!("PRESENCE"));
        payload.insert("address".into(), json!(identity.address().to_string()));
        payload.insert("from".into(), json!(identity.address().to_string()));
        payload.insert("summary".into(), json!(summary));
        payload.insert("examples".into(), json!(examples));
        payload.insert("timestamp".into(), json!(unix_now()));
        let sig = identity.sign(&canonical_json(&Value::Object(payload.clone())));
        payload.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
        let value = serde_json::to_vec(&payload).unwrap_or_default();
        let _ = self
            .command(Command::PutRecord {
                key: presence_key(&identity.address()),
                value,
            })
            .await;
    }

    /// The agents this swarm knows, with their published summaries (checked signatures).
    pub async fn peers(&self) -> Result<Vec<PeerPresence>, P2pError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Known { reply }).await?;
        let known = rx.await.map_err(|_| P2pError::Stopped)?;
        let lookups = known.into_iter().filter_map(|(peer, addrs, connected)| {
            let address = Address::from_peer_id(&peer).ok()?;
            Some(async move {
                let presence = self.presence(&address).await;
                PeerPresence {
                    address: address.to_string(),
                    peer_id: peer.to_string(),
                    addrs: addrs.iter().map(ToString::to_string).collect(),
                    connected,
                    summary: presence
                        .as_ref()
                        .and_then(|p| p.get("summary")?.as_str().map(str::to_owned)),
                    examples: presence
                        .as_ref()
                        .and_then(|p| p.get("examples")?.as_array().cloned())
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect(),
                }
            })
        });
        Ok(futures::future::join_all(lookups).await)
    }

    /// The presence record `address` published, if the DHT has one and its signature
    /// is that address's.
    pub async fn presence(&self, address: &Address) -> Option<Map<String, Value>> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::GetRecord {
            key: presence_key(address),
            reply,
        })
        .await
        .ok()?;
        let bytes = tokio::time::timeout(Duration::from_secs(12), rx)
            .await
            .ok()?
            .ok()??;
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&bytes) else {
            return None;
        };
        let env = Envelope::from_flat(&obj).ok()?;
        (env.verify().ok()? == *address).then_some(env.payload)
    }

    /// Serves inbound calls through `dispatcher` until `stop`.
    pub(crate) fn serve(
        &self,
        dispatcher: Dispatcher,
        config: &P2pConfig,
        stop: CancellationToken,
    ) {
        let mut control = self.control.clone();
        let Ok(mut incoming) = control.accept(PROTOCOL) else {
            warn!("the envelope protocol is already being served");
            return;
        };
        let this = self.clone();
        let total = Arc::new(Semaphore::new(config.max_inbound_streams));
        let per_peer_max = config.max_streams_per_peer;
        let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
        tokio::spawn(async move {
            loop {
                let (peer, stream) = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = incoming.next() => match next {
                        Some(s) => s,
                        None => return,
                    },
                };
                let Ok(permit) = total.clone().try_acquire_owned() else {
                    debug!(%peer, "over the inbound stream limit; stream refused");
                    continue;
                };
                let count = {
                    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                    let n = open.entry(peer).or_default();
                    *n += 1;
                    *n
                };
                if count > per_peer_max {
                    warn!(%peer, "peer opened more than {per_peer_max} calls at once; cut off");
                    release(&open, peer);
                    // Never wait here: streams queue behind this loop one at a time.
                    let this = this.clone();
                    tokio::spawn(async move { this.ban(peer).await });
                    continue;
                }
                let (this, dispatcher, open) = (this.clone(), dispatcher.clone(), open.clone());
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        serve_stream(&this, &dispatcher, peer, stream).await;
                        release(&open, peer);
                    }
                    .instrument(info_span!("p2p_call", %peer)),
                );
            }
        });
    }
}

fn release(open: &Mutex<HashMap<PeerId, usize>>, peer: PeerId) {
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = open.get_mut(&peer) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            open.remove(&peer);
        }
    }
}

/// A presence record is stored only under its signer's own key.
fn valid_presence(record: &kad::Record) -> bool {
    let key = record.key.as_ref();
    let Some(raw) = key.strip_prefix(PRESENCE_PREFIX) else {
        return false;
    };
    let Ok(bytes) = <[u8; 32]>::try_from(raw) else {
        return false;
    };
    let Ok(address) = Address::from_bytes(bytes) else {
        return false;
    };
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&record.value) else {
        return false;
    };
    Envelope::from_flat(&obj).and_then(|e| e.verify()).ok() == Some(address)
}

fn presence_key(address: &Address) -> Vec<u8> {
    let mut key = PRESENCE_PREFIX.to_vec();
    key.extend_from_slice(address.as_bytes());
    key
}

/// One inbound call: read the INPUT, dispatch, write the replies as they come.
async fn serve_stream(
    p2p: &P2p,
    dispatcher: &Dispatcher,
    peer: PeerId,
    mut stream: libp2p::Stream,
) {
    use futures::AsyncWriteExt;
    let input = match tokio::time::timeout(INPUT_TIMEOUT, wire::read_frame(&mut stream)).await {
        Ok(Ok(Some(env))) => env,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(WireError::Io(e))) => {
            debug!(error = %e, "stream failed before its INPUT");
            return;
        }
        Ok(Err(e)) => {
            // Oversize or undecodable: this peer does not speak the protocol; cut it off.
            warn!(error = %e, "misbehaving peer cut off");
            let refusal = match e {
                WireError::TooLarge(len) => Refusal::too_large(len, wire::MAX_FRAME_BYTES),
                other => Refusal::BadRequest(other.to_string()),
            };
            let err = dispatcher.error_envelope(&refusal.into());
            // Write the reason and close, so it arrives before the ban cuts the connection.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = wire::write_frame(&mut stream, &err).await;
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            })
            .await;
            p2p.ban(peer).await;
            return;
        }
    };
    let session_id = session_of(&input.payload);
    let submission = Submission {
        envelope: input,
        session: None,
        uploads: Vec::new(),
    };
    let mut accepted = match dispatcher.submit(submission).await {
        Ok(a) => a,
        Err(rejected) => {
            let err = dispatcher.error_envelope(&rejected.or_session(session_id.as_deref()));
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wire::write_frame(&mut stream, &err)).await;
            let _ = stream.close().await;
            return;
        }
    };
    while let Some(reply) = accepted.replies.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, wire::write_frame(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            // The caller is gone or too slow; the run goes on and is stored.
            _ => return,
        }
    }
    let _ = stream.close().await;
}

/// What an outstanding Kademlia query is for.
enum Query {
    Find(PeerId),
    Record(Option<oneshot::Sender<Option<Vec<u8>>>>),
}

struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Callers waiting for a connection to a peer.
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), P2pError>>>>,
    queries: HashMap<kad::QueryId, Query>,
    bans: Vec<(Instant, PeerId)>,
    status: Arc<Mutex<SwarmStatus>>,
    bootstrapped: bool,
}

impl EventLoop {
    async fn run(mut self, stop: CancellationToken) {
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
            Command::Ban { peer } => {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.bans.push((Instant::now() + BAN, peer));
            }
            Command::PutRecord { key, value } => {
                let record = kad::Record::new(key, value);
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

    fn finish_dial(&mut self, peer: PeerId, result: Result<(), String>) {
        for waiter in self.dials.remove(&peer).unwrap_or_default() {
            let _ = waiter.send(result.clone().map_err(|reason| P2pError::Unreachable {
                peer: peer.to_string(),
                reason,
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
    }

    fn set_connected(&self) {
        let n = self.swarm.connected_peers().count();
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected_peers = n;
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
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
                if matches!(error, libp2p::swarm::DialError::NoAddresses) {
                    self.find(peer);
                } else {
                    self.finish_dial(peer, Err(error.to_string()));
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
                if valid_presence(&record) {
                    use kad::store::RecordStore;
                    if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record) {
                        debug!(error = ?e, "storing a presence record failed");
                    }
                } else {
                    debug!("refused a DHT record that is no valid presence record");
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
            _ => {}
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
                            self.finish_dial(peer, Err(e.to_string()));
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
                    if let Some(reply) = reply.take() {
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

/// Parses a multiaddr given on the command line or in host.yaml, with a clear error.
pub fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>()
        .map_err(|e| format!("{s:?} is not a multiaddr: {e}"))
}
