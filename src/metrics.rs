//! What a node and a relay count, for `/metrics` in the Prometheus text format.
//!
//! Each node and each relay owns its own [`Registry`]: tests run many of them in one
//! process, and a global registry would add their counts together. Counters move where
//! the work happens (the dispatcher for requests, the relay's connection tasks for
//! frames); gauges that mirror state kept elsewhere (in-flight runs, the relay link,
//! swarm peers) are set when `/metrics` is read, so they never drift from `/health`.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proto::ErrorCode;

/// The content type of the Prometheus text format, version 0.0.4.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How a request reached the dispatcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// `POST /input`.
    #[default]
    Http,
    /// An INPUT frame on `/ws`.
    Ws,
    /// An INPUT frame through the relay link.
    Relay,
    /// A request stream on the libp2p swarm.
    P2p,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
            Transport::Relay => "relay",
            Transport::P2p => "p2p",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    /// An INPUT: a turn of the agent.
    Input,
    /// A socket's CONNECT.
    Connect,
    /// A socket's RESUME.
    Resume,
    /// `GET /sessions/{id}`.
    Session,
    /// `GET /sessions`.
    Sessions,
    /// `POST /admin/trust`.
    Admin,
}

impl Route {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Route::Input => "input",
            Route::Connect => "connect",
            Route::Resume => "resume",
            Route::Session => "session",
            Route::Sessions => "sessions",
            Route::Admin => "admin",
        }
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

/// How a request ended: `ok`, or the [`ErrorCode`] it was refused or failed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    Ok,
    Error(ErrorCode),
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(code) => code.as_str(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// Label values are the wire strings, so dashboards match what callers and logs show.
impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

impl EncodeLabelValue for ErrorCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    transport: Transport,
    route: Route,
    code: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabels {
    transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

/// Request latency buckets: 1 ms to ~33 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Agent run buckets: 10 ms to ~5.5 min.
fn run_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// What the store counts: syncs of its write-ahead log (one per batch that waits for
/// one, or one per window in `batched` durability) and how long they take. Cloned into the store; the node's registry reads the same cells.
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    pub(crate) log_writes: Counter,
    pub(crate) flushes: Counter,
    pub(crate) flush_seconds: Histogram,
    pub(crate) writes_per_flush: Histogram,
    pub(crate) behind_waits: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            log_writes: Counter::default(),
            flushes: Counter::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            writes_per_flush: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            behind_waits: Counter::default(),
        }
    }
}

/// A node's metrics (see the README for names and labels).
pub(crate) struct NodeMetrics {
    /// Behind a lock so that the swarm's own metrics can be added when it starts.
    registry: std::sync::Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<TransportLabels, Histogram>,
    run_seconds: Histogram,
    in_flight: Gauge,
    store_queue: Gauge,
    relay_link: Family<StateLabels, Gauge>,
    swarm_peers: Gauge,
    swarm_connections: Family<PathLabels, Gauge>,
}

impl NodeMetrics {
    pub(crate) fn new(store: &StoreMetrics) -> Self {
        let mut registry = Registry::with_prefix("oonode");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handed to the dispatcher, by transport, route and outcome code",
            requests.clone(),
        );
        let latency =
            Family::<TransportLabels, Histogram>::new_with_constructor(latency_histogram as _);
        registry.register(
            "request_duration_seconds",
            "From a request reaching the dispatcher to its answer or refusal",
            latency.clone(),
        );
        let run_seconds = run_histogram();
        registry.register(
            "agent_run_seconds",
            "How long the agent ran, per accepted request",
            run_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Agent runs in flight or queued for a worker",
            in_flight.clone(),
        );
        registry.register(
            "store_log_writes",
            "Writes to the store's write-ahead log (one per batch of store jobs that changed something)",
            store.log_writes.clone(),
        );
        registry.register(
            "store_flushes",
            "Syncs of the store's write-ahead log (each makes every write before it durable)",
            store.flushes.clone(),
        );
        registry.register(
            "store_flush_seconds",
            "How long one sync of the store's log took",
            store.flush_seconds.clone(),
        );
        registry.register(
            "store_writes_per_flush",
            "Writes waiting for durability made durable by one sync (group commit, `sync` durability)",
            store.writes_per_flush.clone(),
        );
        registry.register(
            "store_behind_waits",
            "New work (admissions, replay keys, calls) that waited for a checkpoint because the memory holding changes not yet in sled was full",
            store.behind_waits.clone(),
        );
        let store_queue = Gauge::default();
        registry.register(
            "store_queue",
            "Store jobs queued and not yet run",
            store_queue.clone(),
        );
        let relay_link = Family::<StateLabels, Gauge>::default();
        registry.register(
            "relay_link",
            "1 for the relay link's current state (connecting, connected, disconnected)",
            relay_link.clone(),
        );
        let swarm_peers = Gauge::default();
        registry.register(
            "swarm_connected_peers",
            "Peers the libp2p swarm is connected to",
            swarm_peers.clone(),
        );
        let swarm_connections = Family::<PathLabels, Gauge>::default();
        registry.register(
            "swarm_connections",
            "Swarm connections by path: direct, hole-punched (DCUtR), circuit (through a relay peer)",
            swarm_connections.clone(),
        );
        NodeMetrics {
            registry: std::sync::Mutex::new(registry),
            requests,
            latency,
            run_seconds,
            in_flight,
            store_queue,
            relay_link,
            swarm_peers,
            swarm_connections,
        }
    }
}

impl NodeMetrics {
    /// One request answered or refused.
    pub(crate) fn request(
        &self,
        transport: Transport,
        route: Route,
        code: Outcome,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                transport,
                route,
                code,
            })
            .inc();
        self.latency
            .get_or_create(&TransportLabels { transport })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn agent_run(&self, took: Duration) {
        self.run_seconds.observe(took.as_secs_f64());
    }

    /// The text format, with the gauges set to the state given (`relay_states`: each
    /// link state and whether it is the current one).
    /// libp2p's own metrics (connections, dials, Kademlia, identify, ping), registered
    /// under `oonode_libp2p_`; the swarm's event loop records into what this returns.
    pub(crate) fn libp2p(&self) -> libp2p::metrics::Metrics {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // It adds the `libp2p` prefix itself.
        libp2p::metrics::Metrics::new(&mut registry)
    }

    pub(crate) fn encode(
        &self,
        in_flight: usize,
        store_queue: usize,
        relay_states: Option<&[(&'static str, bool)]>,
        swarm: Option<(usize, crate::transport::p2p::PathCounts)>,
    ) -> String {
        self.in_flight.set(in_flight as i64);
        self.store_queue.set(store_queue as i64);
        for &(state, current) in relay_states.unwrap_or_default() {
            self.relay_link
                .get_or_create(&StateLabels { state })
                .set(i64::from(current));
        }
        if let Some((peers, paths)) = swarm {
            self.swarm_peers.set(peers as i64);
            for (path, n) in [
                ("direct", paths.direct),
                ("hole-punched", paths.hole_punched),
                ("circuit", paths.circuit),
            ] {
                self.swarm_connections
                    .get_or_create(&PathLabels { path })
                    .set(n as i64);
            }
        }
        encode(&self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabels {
    code: ErrorCode,
}

/// A relay server's metrics.
pub(crate) struct RelayMetrics {
    registry: Registry,
    agents: Gauge,
    callers: Gauge,
    sessions: Gauge,
    frames: Counter,
    refusals: Family<CodeLabels, Counter>,
    home_records: Counter,
    forwarded: Counter,
    forward_failures: Counter,
    bytes: Counter,
    pub(crate) dht: DhtRecordCounters,
    pub(crate) circuits: CircuitCounters,
}

/// A relay's circuit relay v2 service (NAT traversal on the swarm).
#[derive(Clone, Default, Debug)]
pub(crate) struct CircuitCounters {
    /// Reservations held now.
    pub(crate) reservations: Gauge,
    /// Circuits open now.
    pub(crate) circuits: Gauge,
    /// Circuits opened since start.
    pub(crate) circuits_total: Counter,
    /// Reservations and circuits refused (over the limits, or no reservation).
    pub(crate) refused: Counter,
}

/// What a swarm did with DHT records others asked for or gave it (a relay's, on its
/// `/metrics`). Cheap to clone: the event loop holds a copy.
#[derive(Clone, Default, Debug)]
pub(crate) struct DhtRecordCounters {
    /// Lookups answered with a record held here.
    pub(crate) served: Counter,
    /// Records another peer put that passed the checks and were kept.
    pub(crate) stored: Counter,
    /// Records another peer put that were refused (invalid, stale, older than held).
    pub(crate) refused: Counter,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("oonode_relay");
        let agents = Gauge::default();
        registry.register("agents_online", "Agents connected", agents.clone());
        let callers = Gauge::default();
        registry.register("callers", "Caller connections open", callers.clone());
        let sessions = Gauge::default();
        registry.register("sessions", "Sessions being routed", sessions.clone());
        let frames = Counter::default();
        registry.register(
            "frames_relayed",
            "Frames passed from a caller to an agent or back",
            frames.clone(),
        );
        let refusals = Family::<CodeLabels, Counter>::default();
        registry.register(
            "refusals",
            "Connections and frames refused, by error code",
            refusals.clone(),
        );
        let home_records = Counter::default();
        registry.register(
            "home_records_published",
            "Home-relay records of this relay's agents put in the DHT (federation)",
            home_records.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "forwarded_connections",
            "Caller connections passed on to the relay an agent is homed on (federation)",
            forwarded.clone(),
        );
        let forward_failures = Counter::default();
        registry.register(
            "forward_failures",
            "Home relays named in the DHT that could not be reached (federation)",
            forward_failures.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "bytes_relayed",
            "Bytes of frames passed from a caller to an agent or back",
            bytes.clone(),
        );
        let dht = DhtRecordCounters::default();
        registry.register(
            "dht_records_served",
            "DHT lookups this relay answered with a record it holds (federation)",
            dht.served.clone(),
        );
        registry.register(
            "dht_records_stored",
            "DHT records other peers put here that passed the checks (federation)",
            dht.stored.clone(),
        );
        registry.register(
            "dht_records_refused",
            "DHT records other peers put here that were refused (federation)",
            dht.refused.clone(),
        );
        let circuits = CircuitCounters::default();
        registry.register(
            "circuit_reservations",
            "Circuit relay v2 reservations held (peers behind a NAT)",
            circuits.reservations.clone(),
        );
        registry.register(
            "circuits",
            "Circuit relay v2 circuits open",
            circuits.circuits.clone(),
        );
        registry.register(
            "circuits_opened",
            "Circuit relay v2 circuits opened since start",
            circuits.circuits_total.clone(),
        );
        registry.register(
            "circuit_requests_refused",
            "Circuit relay v2 reservations and circuits refused",
            circuits.refused.clone(),
        );
        RelayMetrics {
            registry,
            agents,
            callers,
            sessions,
            frames,
            refusals,
            home_records,
            forwarded,
            forward_failures,
            bytes,
            dht,
            circuits,
        }
    }
}

impl RelayMetrics {
    pub(crate) fn frame_relayed(&self, bytes: usize) {
        self.frames.inc();
        self.bytes.inc_by(bytes as u64);
    }

    pub(crate) fn refused(&self, code: ErrorCode) {
        self.refusals.get_or_create(&CodeLabels { code }).inc();
    }

    pub(crate) fn home_record_published(&self) {
        self.home_records.inc();
    }

    pub(crate) fn forwarded(&self) {
        self.forwarded.inc();
    }

    pub(crate) fn forward_failed(&self) {
        self.forward_failures.inc();
    }

    /// The text format, with the gauges set to the state given.
    pub(crate) fn encode(&self, agents: usize, callers: usize, sessions: usize) -> String {
        self.agents.set(agents as i64);
        self.callers.set(callers as i64);
        self.sessions.set(sessions as i64);
        encode(&self.registry)
    }
}
