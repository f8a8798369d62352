//! `host()` and [`Host`]: wires identity, config, store, dispatcher and transports into a
//! running node, prints the banner, and shuts down gracefully.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::{Agent, AgentFactory};
use crate::config::{ConfigError, HostConfig, ListSource, Settings, TrustSetting};
use crate::dispatch::{Dispatcher, DispatcherConfig};
use crate::envelope::unix_now;
use crate::identity::{find_co_dir, Address, Identity, KeyFileError};
use crate::store::{Store, StoreError};
use crate::transport::http::{self, HttpState, NodeInfo};
use crate::transport::no_delay;
use crate::transport::p2p::{P2p, P2pError};
use crate::transport::relay::{self, RelayLink, RelayStatus};
use crate::trust::{Policy, TrustAgent, TrustLevel};

/// How long shutdown waits for accepted runs before leaving them to be marked
/// `interrupted` on the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Open WebSocket connections a node accepts at once.
const MAX_WS_CONNECTIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create {path}: {source}")]
    CoDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("swarm: {0}")]
    P2p(#[from] P2pError),
}

/// Builder for a hosted agent, with the seed's parameters. Anything not set here comes
/// from `<co_dir>/host.yaml`, then from the defaults.
pub struct Host {
    factory: AgentFactory,
    code: Settings,
    http: bool,
    trust_agent: Option<Arc<dyn TrustAgent>>,
    ready_json: bool,
}

impl Host {
    /// Hosts `agent`; every request runs on a fresh clone of it.
    pub fn new<A: Agent + Clone + Sync>(agent: A) -> Host {
        Host::with_factory(AgentFactory::from_clone(agent))
    }

    /// Hosts agents made by `factory`, one per request.
    pub fn with_factory(factory: AgentFactory) -> Host {
        Host {
            factory,
            code: Settings::default(),
            http: true,
            trust_agent: None,
            ready_json: false,
        }
    }

    /// With `serve()`: print one [`Ready`] JSON line to stdout when the node is ready,
    /// and the banner to stderr (for scripts, tests and the testnet).
    pub fn ready_json(mut self, on: bool) -> Self {
        self.ready_json = on;
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.code.name = Some(name.into());
        self
    }

    pub fn trust(mut self, level: TrustLevel) -> Self {
        self.code.trust = Some(TrustSetting::Level(level));
        self
    }

    /// A trust policy (the seed's advanced form) instead of a plain level.
    pub fn trust_policy(mut self, policy: Policy) -> Self {
        self.code.trust = Some(TrustSetting::Policy(policy));
        self
    }

    /// The agent that decides about strangers when the policy says `default: ask`. It
    /// sees the caller's address, level and history, never the prompt.
    pub fn trust_agent(mut self, agent: impl TrustAgent) -> Self {
        self.trust_agent = Some(Arc::new(agent));
        self
    }

    /// Addresses (or `*` patterns) always accepted.
    pub fn whitelist<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.code.whitelist = Some(ListSource::Addresses(
            items.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Addresses (or `*` patterns) always refused; beats every other rule.
    pub fn blacklist<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.code.blacklist = Some(ListSource::Addresses(
            items.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// HTTP port; 0 picks a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.code.port = Some(port);
        self
    }

    /// The address the HTTP listener binds (default 0.0.0.0).
    pub fn bind(mut self, ip: IpAddr) -> Self {
        self.code.bind = Some(ip);
        self
    }

    /// Whether to listen for HTTP/WebSocket at all. Without it the node opens no port and
    /// is reachable through the relay only.
    pub fn http(mut self, on: bool) -> Self {
        self.http = on;
        self
    }

    /// Agent runs at once.
    pub fn workers(mut self, n: usize) -> Self {
        self.code.workers = Some(n);
        self
    }

    /// Requests that may wait for a worker; past this the node answers "busy".
    pub fn max_queue(mut self, n: usize) -> Self {
        self.code.max_queue = Some(n);
        self
    }

    /// Seconds a finished session is kept.
    pub fn result_ttl(mut self, secs: u64) -> Self {
        self.code.result_ttl = Some(secs);
        self
    }

    /// The relay to announce on; `None` turns the relay off.
    pub fn relay_url(mut self, url: Option<String>) -> Self {
        self.code.relay_url = Some(url);
        self
    }

    pub fn reload(mut self, on: bool) -> Self {
        self.code.reload = Some(on);
        self
    }

    /// Where the key, host.yaml and the store live (default: project `.co/`, else `~/.co`).
    pub fn co_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.code.co_dir = Some(dir.into());
        self
    }

    pub fn summary(mut self, text: impl Into<String>) -> Self {
        self.code.summary = Some(text.into());
        self
    }

    pub fn examples<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.code.examples = Some(items.into_iter().map(Into::into).collect());
        self
    }

    pub fn max_file_size(mut self, mb: u64) -> Self {
        self.code.max_file_size = Some(mb);
        self
    }

    pub fn max_files_per_request(mut self, n: usize) -> Self {
        self.code.max_files_per_request = Some(n);
        self
    }

    /// Whether to join the libp2p swarm (default: yes).
    pub fn p2p(mut self, on: bool) -> Self {
        self.code.p2p = Some(on);
        self
    }

    /// Swarm listen multiaddrs, e.g. `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub fn listen<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.code.listen = Some(addrs.into_iter().map(Into::into).collect());
        self
    }

    /// Swarm peers to join through: multiaddrs ending in `/p2p/<PeerId>`.
    pub fn bootstrap<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.code.bootstrap = Some(addrs.into_iter().map(Into::into).collect());
        self
    }

    /// Find peers on the LAN by multicast DNS.
    pub fn mdns(mut self, on: bool) -> Self {
        self.code.mdns = Some(on);
        self
    }

    /// Loads config, the key and the store: everything but the listeners.
    pub fn build(self) -> Result<Node, HostError> {
        let base = match &self.code.co_dir {
            Some(dir) => dir.clone(),
            None => find_co_dir(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
        };
        let yaml = base.join("host.yaml");
        let file = Settings::from_file(&yaml)?.unwrap_or_default();
        let config = HostConfig::resolve(self.code.or(file), &base, &yaml.display().to_string())?;
        let mut node = Node::open(self.factory, config, self.trust_agent)?;
        node.http = self.http;
        Ok(node)
    }

    /// Builds and serves until SIGINT/SIGTERM, printing the banner to stdout (after
    /// giving the relay a moment to connect, so the banner can say whether it did).
    pub async fn serve(self) -> Result<(), HostError> {
        let ready_json = self.ready_json;
        let handle = self.build()?.spawn().await?;
        handle.wait_for_relay(Duration::from_secs(5)).await;
        if let Some(p2p) = &handle.p2p {
            p2p.listening(Duration::from_secs(2)).await;
        }
        if ready_json {
            eprintln!("{}", handle.banner());
            println!("{}", handle.ready().to_line());
        } else {
            println!("{}", handle.banner());
        }
        handle.run_until_signal().await
    }
}

/// Hosts `agent` with config from host.yaml and defaults, until SIGINT/SIGTERM.
pub async fn host<A: Agent + Clone + Sync>(agent: A) -> Result<(), HostError> {
    Host::new(agent).serve().await
}

/// The axum Router of `agent` for embedding in another server (the seed's `host.app`).
/// Must be called inside a tokio runtime.
pub fn router<A: Agent + Clone + Sync>(agent: A) -> Result<Router, HostError> {
    Ok(Host::new(agent).build()?.router())
}

/// A node that is configured but not yet listening.
pub struct Node {
    config: HostConfig,
    identity: Identity,
    dispatcher: Dispatcher,
    store: Store,
    info: NodeInfo,
    key_created: bool,
    background: CancellationToken,
    http: bool,
}

impl Node {
    fn open(
        factory: AgentFactory,
        config: HostConfig,
        trust_agent: Option<Arc<dyn TrustAgent>>,
    ) -> Result<Node, HostError> {
        std::fs::create_dir_all(&config.co_dir).map_err(|source| HostError::CoDir {
            path: config.co_dir.clone(),
            source,
        })?;
        let (identity, key_created) = Identity::load_or_create(&config.co_dir)?;
        let (store, interrupted) =
            Store::open(&store_path(&config.co_dir), config.result_ttl, unix_now())?;
        if interrupted > 0 {
            warn!(
                interrupted,
                "sessions left running by the previous process are marked interrupted"
            );
        }
        let sample = factory.make();
        let info = NodeInfo {
            name: config.name.clone().unwrap_or_else(|| sample.name()),
            tools: sample.tools(),
            summary: config.summary.clone(),
            examples: config.examples.clone(),
            max_file_size_mb: config.max_file_size_mb,
            max_files_per_request: config.max_files_per_request,
        };
        let dispatcher = Dispatcher::new(
            identity.clone(),
            factory,
            store.clone(),
            DispatcherConfig {
                trust: config.trust.clone(),
                trust_agent,
                workers: config.workers,
                max_queue: config.max_queue,
                result_ttl: config.result_ttl,
                max_file_size_mb: config.max_file_size_mb,
                max_files_per_request: config.max_files_per_request,
                uploads_dir: uploads_dir(&config.co_dir),
            },
        );
        let background = CancellationToken::new();
        Ok(Node {
            config,
            identity,
            dispatcher,
            store,
            info,
            key_created,
            background,
            http: true,
        })
    }

    pub fn address(&self) -> Address {
        self.identity.address()
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The HTTP router; the node's background tasks stop when the last clone is dropped.
    /// (HTTP and WebSocket only: an embedded router starts no relay link and no swarm.)
    pub fn router(self) -> Router {
        self.start_sweeper();
        let guard = self.background.clone().drop_guard();
        self.router_with(Some(guard), None, None)
    }

    fn router_with(
        &self,
        guard: Option<tokio_util::sync::DropGuard>,
        relay: Option<RelayLink>,
        p2p: Option<P2p>,
    ) -> Router {
        http::router(Arc::new(HttpState {
            dispatcher: self.dispatcher.clone(),
            info: self.info.clone(),
            max_body_bytes: self.config.max_body_bytes(),
            started: Instant::now(),
            ws_connections: Arc::new(tokio::sync::Semaphore::new(MAX_WS_CONNECTIONS)),
            relay,
            p2p,
            _background: guard,
        }))
    }

    /// Expired sessions and replay keys go, and edited list files are re-read, in the
    /// background until the node stops.
    fn start_sweeper(&self) {
        self.dispatcher.trust().watch_files(self.background.clone());
        tokio::spawn(sweep_loop(
            self.store.clone(),
            uploads_dir(&self.config.co_dir),
            self.config.result_ttl,
            self.background.clone(),
        ));
    }

    /// Binds the listeners and starts serving; returns at once with a handle.
    pub async fn spawn(self) -> Result<NodeHandle, HostError> {
        self.start_sweeper();
        let listener = if self.http {
            let addr = SocketAddr::new(self.config.bind, self.config.port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| HostError::Bind { addr, source })?;
            Some(listener)
        } else {
            None
        };
        let http_addr = match &listener {
            Some(l) => Some(l.local_addr().map_err(HostError::Serve)?),
            None => None,
        };
        if self.key_created {
            info!(address = %self.address(), "created a new identity key");
        }
        if self.config.reload {
            warn!("`reload: true` has no effect on a compiled agent; restart the node to pick up changes");
        }
        let shutdown = self.background.clone();
        let relay = self.config.relay_url.clone().map(|url| {
            let info = relay::AnnounceInfo {
                summary: self.config.summary.clone().unwrap_or_default(),
                endpoints: http_endpoints(http_addr),
            };
            relay::spawn(url, self.dispatcher.clone(), info, shutdown.child_token())
        });

        let p2p = match &self.config.p2p {
            Some(config) => {
                let p2p = P2p::spawn(
                    self.identity.libp2p_keypair(),
                    config.clone(),
                    shutdown.child_token(),
                )
                .await?;
                p2p.serve(self.dispatcher.clone(), config, shutdown.child_token());
                tokio::spawn(publish_presence(
                    p2p.clone(),
                    self.identity.clone(),
                    self.config.summary.clone(),
                    self.config.examples.clone(),
                    http_endpoints(http_addr),
                    shutdown.child_token(),
                ));
                Some(p2p)
            }
            None => None,
        };

        let mut tasks = JoinSet::new();
        if let (Some(listener), Some(addr)) = (listener, http_addr) {
            info!(address = %self.address(), http_addr = %addr, "listening on http://{addr}");
            let router = self.router_with(None, relay.clone(), p2p.clone());
            let stop = shutdown.clone();
            tasks.spawn(async move {
                axum::serve(listener.tap_io(no_delay), router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .map_err(HostError::Serve)
            });
        } else {
            info!(address = %self.address(), "HTTP is off: no listening port");
        }
        Ok(NodeHandle {
            node: self,
            http_addr,
            relay,
            p2p,
            shutdown,
            tasks,
        })
    }
}

/// The HTTP endpoints to tell others about: the bound address when it is a specific one
/// (an unspecified bind has no single address to give).
fn http_endpoints(http_addr: Option<SocketAddr>) -> Vec<String> {
    match http_addr {
        Some(a) if !a.ip().is_unspecified() => vec![format!("http://{a}"), format!("ws://{a}/ws")],
        _ => Vec::new(),
    }
}

/// Keeps the node's presence record in the DHT: soon after start (as peers come),
/// then every few minutes.
async fn publish_presence(
    p2p: P2p,
    identity: Identity,
    summary: Option<String>,
    examples: Vec<String>,
    endpoints: Vec<String>,
    stop: CancellationToken,
) {
    let mut waits = [1u64, 3, 10, 30].into_iter();
    loop {
        let wait = Duration::from_secs(waits.next().unwrap_or(300));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        p2p.publish_presence(&identity, summary.as_deref(), &examples, &endpoints)
            .await;
    }
}

fn store_path(co_dir: &Path) -> PathBuf {
    co_dir.join("oonode").join("db")
}

fn uploads_dir(co_dir: &Path) -> PathBuf {
    co_dir.join("oonode").join("uploads")
}

/// Deletes expired sessions and replay keys, often enough that a session is gone within
/// about a quarter of `result_ttl` after it expires (reads never show expired ones).
async fn sweep_loop(store: Store, uploads: PathBuf, result_ttl: u64, stop: CancellationToken) {
    let every = Duration::from_secs((result_ttl / 4).clamp(1, 60));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep(unix_now()).await {
            Ok((sessions, keys)) => {
                for id in &sessions {
                    let dir = uploads.join(id);
                    if dir.exists() {
                        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                            warn!(error = %e, dir = %dir.display(), "removing an expired session's files failed");
                        }
                    }
                }
                if !sessions.is_empty() || keys > 0 {
                    tracing::debug!(sessions = sessions.len(), keys, "swept expired records");
                }
            }
            Err(e) => warn!(error = %e, "sweeping expired records failed"),
        }
    }
}

/// The machine-readable line `oonode host --ready-json` prints once the node is ready:
/// `{"event":"ready","name","address","peer_id","http","swarm":[…],"relay","version"}`.
/// `http` is null with HTTP off, `relay` null without a relay; `swarm` lists the swarm's
/// listen multiaddrs (empty with the swarm off).
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Ready {
    /// Always `"ready"`.
    pub event: &'static str,
    pub name: String,
    pub address: String,
    pub peer_id: String,
    pub http: Option<String>,
    pub swarm: Vec<String>,
    pub relay: Option<RelayStatus>,
    pub version: &'static str,
}

impl Ready {
    /// One line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A running node.
pub struct NodeHandle {
    node: Node,
    http_addr: Option<SocketAddr>,
    relay: Option<RelayLink>,
    p2p: Option<P2p>,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), HostError>>,
}

impl NodeHandle {
    pub fn address(&self) -> Address {
        self.node.address()
    }

    /// Where the HTTP listener is bound (with the real port when 0 was asked); `None`
    /// with HTTP off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// A URL for reaching the HTTP listener from this machine.
    pub fn http_url(&self) -> Option<String> {
        let addr = self.http_addr?;
        let ip = addr.ip();
        let host = if ip.is_unspecified() {
            "localhost".to_string()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        Some(format!("http://{host}:{}", addr.port()))
    }

    /// The swarm, when the node joined one.
    pub fn p2p(&self) -> Option<&P2p> {
        self.p2p.as_ref()
    }

    /// The relay link's state, if a relay is configured.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        self.relay.as_ref().map(RelayLink::status)
    }

    /// Waits (up to `limit`) until the relay link is connected; returns whether it is.
    pub async fn wait_for_relay(&self, limit: Duration) -> bool {
        let Some(relay) = &self.relay else {
            return false;
        };
        let deadline = Instant::now() + limit;
        while relay.status().state != "connected" {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.node.dispatcher
    }

    /// What a script needs to use the node: see [`Ready`].
    pub fn ready(&self) -> Ready {
        let address = self.address();
        Ready {
            event: "ready",
            name: self.node.info.name.clone(),
            address: address.to_string(),
            peer_id: address.peer_id().to_string(),
            http: self.http_url(),
            swarm: self
                .p2p
                .as_ref()
                .map(|p| p.status().listen_addrs)
                .unwrap_or_default(),
            relay: self.relay_status(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// The start-up box: name, address, endpoints, UI and relay.
    pub fn banner(&self) -> String {
        let relay = match self.relay_status() {
            Some(r) if r.state == "connected" => format!("{} (connected)", r.url),
            Some(r) => format!(
                "{} ({}{})",
                r.url,
                r.state,
                r.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
            None => "off".to_string(),
        };
        let mut lines = vec![
            format!("Agent '{}' is now hosted", self.node.info.name),
            String::new(),
            format!("Address: {}", self.address()),
            format!("Trust:   {}", self.node.dispatcher.trust().describe()),
            String::new(),
        ];
        match self.http_url() {
            Some(url) => {
                let ws = url.replacen("http://", "ws://", 1);
                lines.extend([
                    "HTTP Endpoints:".to_string(),
                    format!("  POST {url}/input"),
                    format!("  GET  {url}/sessions/{{session_id}}"),
                    format!("  GET  {url}/sessions"),
                    format!("  GET  {url}/health"),
                    format!("  GET  {url}/info"),
                    format!("  WS   {ws}/ws"),
                    String::new(),
                    "Interactive UI:".to_string(),
                    format!("  {url}/docs"),
                ]);
            }
            None => lines.push("HTTP: off (no listening port)".to_string()),
        }
        lines.extend([
            String::new(),
            "P2P Relay:".to_string(),
            format!("  {relay}"),
            String::new(),
        ]);
        match &self.p2p {
            Some(p2p) => {
                let status = p2p.status();
                lines.push("P2P Swarm (libp2p):".to_string());
                lines.push(format!("  PeerId {}", status.peer_id));
                for addr in &status.listen_addrs {
                    lines.push(format!("  {addr}"));
                }
            }
            None => lines.push("P2P Swarm (libp2p): off".to_string()),
        }
        let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0) + 2;
        let mut out = format!("╭{}╮\n", "─".repeat(width + 2));
        for (i, line) in lines.iter().enumerate() {
            out.push_str(&format!(
                "│ {line}{} │\n",
                " ".repeat(width - line.chars().count())
            ));
            if i == 0 {
                out.push_str(&format!("├{}┤\n", "─".repeat(width + 2)));
            }
        }
        out.push_str(&format!(
            "╰{}╯\n\nWaiting for tasks...",
            "─".repeat(width + 2)
        ));
        out
    }

    /// Stops accepting, lets accepted runs finish (up to a grace period), flushes the
    /// store. Runs still going after the grace period read `interrupted` on next start.
    pub async fn shutdown(mut self) -> Result<(), HostError> {
        info!("shutting down");
        self.node.dispatcher.close();
        self.shutdown.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.node.dispatcher.drained())
            .await
            .is_err()
        {
            warn!("runs still going after {SHUTDOWN_GRACE:?}; they will read as interrupted");
        }
        let mut result = Ok(());
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => match joined {
                    Some(Ok(Err(e))) => result = Err(e),
                    Some(_) => {}
                    None => break,
                },
                _ = &mut deadline => {
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        self.node.store.close().await?;
        result
    }

    /// Serves until SIGINT or SIGTERM (or a listener fails), then shuts down.
    pub async fn run_until_signal(mut self) -> Result<(), HostError> {
        let listeners_failed = async {
            // With HTTP off there is no listener task: only the signal ends the node.
            match self.tasks.join_next().await {
                Some(Ok(Err(e))) => Some(e),
                Some(_) => None,
                None => std::future::pending().await,
            }
        };
        let failed = tokio::select! {
            _ = shutdown_signal() => None,
            e = listeners_failed => e,
        };
        let result = self.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => result,
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
