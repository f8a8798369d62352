//! Opening a node (key, store, dispatcher) and starting it (HTTP, relay link, swarm,
//! sweeper).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::{AgentFactory, PeerLink};
use crate::client::ConnectOptions;
use crate::config::HostConfig;
use crate::dispatch::{Dispatcher, DispatcherConfig};
use crate::envelope::unix_now;
use crate::identity::{Address, Identity};
use crate::net::{CappedListener, IpCounts};
use crate::store::{Store, Uploads};
use crate::transport::http::{self, HttpState, NodeInfo};
use crate::transport::p2p::{P2p, PRESENCE_REPUBLISH};
use crate::transport::relay_link::{self, RelayLink};
use crate::transport::ws::WsState;
use crate::trust::TrustAgent;

use super::handle::NodeHandle;
use super::peers::NodePeers;
use super::{HostError, MAX_WS_CONNECTIONS};

/// A node that is configured but not yet listening.
pub struct Node {
    pub(super) config: HostConfig,
    pub(super) identity: Identity,
    pub(super) dispatcher: Dispatcher,
    pub(super) store: Store,
    pub(super) info: NodeInfo,
    pub(super) key_created: bool,
    pub(super) background: CancellationToken,
    pub(super) http: bool,
}

impl Node {
    pub(super) fn open(
        factory: AgentFactory,
        config: HostConfig,
        trust_agent: Option<Arc<dyn TrustAgent>>,
    ) -> Result<Node, HostError> {
        std::fs::create_dir_all(&config.co_dir).map_err(|source| HostError::CoDir {
            path: config.co_dir.clone(),
            source,
        })?;
        let (identity, key_created) = Identity::load_or_create(&config.co_dir)?;
        let opened_at = unix_now();
        let (store, opened) = Store::open_with(
            &store_path(&config.co_dir),
            config.result_ttl,
            opened_at,
            config.durability,
        )?;
        let interrupted = opened.interrupted;
        if opened.replayed > 0 {
            info!(
                replayed = opened.replayed,
                "changes written before the last stop read back from the store's log"
            );
        }
        // The log may have lost its last unsynced writes (a machine crash in `batched`
        // mode), replay keys among them: messages signed before now are refused.
        let replay_floor = if opened.unclean {
            warn!("the previous process did not stop cleanly: messages signed before this start are refused");
            opened_at
        } else {
            0
        };
        if interrupted > 0 {
            warn!(
                interrupted,
                "sessions left running by the previous process are marked interrupted"
            );
        }
        let sample = factory.make();
        // host.yaml and the builder win; the agent's own words fill what they leave out.
        let examples = if config.examples.is_empty() {
            sample.examples()
        } else {
            config.examples.clone()
        };
        let info = NodeInfo {
            name: config.name.clone().unwrap_or_else(|| sample.name()),
            tools: sample.tools(),
            summary: config.summary.clone().or_else(|| sample.summary()),
            examples,
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
                replay_floor,
                uploads: uploads(&config),
                max_output_bytes: config.max_output_bytes,
                max_prompt_bytes: config.max_prompt_bytes,
                history: crate::dispatch::HistoryLimits {
                    messages: config.max_history_messages,
                    bytes: config.max_history_bytes,
                },
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
        self.give_agents_peers(None);
        let guard = self.background.clone().drop_guard();
        self.router_with(Some(guard), None, None)
    }

    fn router_with(
        &self,
        guard: Option<tokio_util::sync::DropGuard>,
        relay: Option<RelayLink>,
        p2p: Option<P2p>,
    ) -> Router {
        let max_body_bytes = self.config.max_body_bytes();
        let budget_kib = u32::try_from(self.config.max_body_budget_mb.saturating_mul(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        http::router(Arc::new(HttpState {
            dispatcher: self.dispatcher.clone(),
            info: self.info.clone(),
            max_body_bytes,
            body_limits: self.config.body_limits(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(budget_kib as usize)),
            body_budget_kib: budget_kib,
            cors_origins: self.config.cors_origins.clone(),
            started: Instant::now(),
            ws: WsState {
                dispatcher: self.dispatcher.clone(),
                max_frame_bytes: max_body_bytes,
                connections: Arc::new(tokio::sync::Semaphore::new(MAX_WS_CONNECTIONS)),
                per_ip: IpCounts::default(),
                max_per_ip: self.config.max_sockets_per_client,
            },
            relay,
            p2p,
            _background: guard,
        }))
    }

    /// Lets the agent's turns call other agents as this node: its key, its relay, its
    /// swarm.
    fn give_agents_peers(&self, swarm: Option<P2p>) {
        let mut options = ConnectOptions::default().identity(self.identity.clone());
        options.relay_url = self.config.relay_url.as_ref().map(ToString::to_string);
        options.relay_ca = self.config.relay_ca.clone();
        options.swarm = swarm;
        self.dispatcher
            .set_peers(PeerLink(Arc::new(NodePeers::new(options))));
    }

    /// Expired sessions and replay keys go, and edited list files are re-read, in the
    /// background until the node stops.
    pub(super) fn start_sweeper(&self) {
        self.dispatcher.trust().watch_files(self.background.clone());
        tokio::spawn(sweep_loop(
            self.store.clone(),
            uploads(&self.config),
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
        let shutdown = self.background.clone();
        // Every listener is bound before anything goes out (the relay link, presence):
        // a port that cannot be had stops start-up with nothing begun.
        let p2p = match &self.config.p2p {
            Some(config) => {
                let p2p = P2p::spawn_recording(
                    self.identity.libp2p_keypair(),
                    config.clone(),
                    Some(self.dispatcher.libp2p_metrics()),
                    shutdown.child_token(),
                )
                .await?;
                p2p.serve(self.dispatcher.clone(), config, shutdown.child_token());
                tokio::spawn(publish_presence(
                    p2p.clone(),
                    self.identity.clone(),
                    self.info.summary.clone(),
                    self.info.examples.clone(),
                    self.http_endpoints(http_addr),
                    shutdown.child_token(),
                ));
                Some(p2p)
            }
            None => None,
        };

        self.give_agents_peers(p2p.clone());
        if self.key_created {
            info!(address = %self.address(), "created a new identity key");
        }
        if self.config.reload {
            warn!("`reload: true` has no effect on a compiled agent; restart the node to pick up changes");
        }
        let relay = self.config.relay_url.clone().map(|url| {
            let info = relay_link::AnnounceInfo {
                summary: self.info.summary.clone().unwrap_or_default(),
                endpoints: self.http_endpoints(http_addr),
            };
            let tls = self.config.relay_tls.clone();
            relay_link::spawn(
                url,
                self.config.relay_fallbacks.clone(),
                tls,
                self.dispatcher.clone(),
                info,
                shutdown.child_token(),
            )
        });

        let mut tasks = JoinSet::new();
        if let (Some(listener), Some(addr)) = (listener, http_addr) {
            let tls = self.config.http_tls.clone();
            let scheme = if tls.is_some() { "https" } else { "http" };
            info!(address = %self.address(), http_addr = %addr, "listening on {scheme}://{addr}");
            let router = self.router_with(None, relay.clone(), p2p.clone());
            let stop = shutdown.clone();
            let max_per_client = self.config.max_connections_per_client;
            tasks.spawn(async move {
                let listener = CappedListener::new(listener, max_per_client);
                crate::transport::serve::serve(listener, router, tls, stop).await;
                Ok(())
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

    /// The HTTP endpoints to tell others about: the bound address when it is a specific
    /// one (an unspecified bind has no single address to give), `https`/`wss` with TLS.
    fn http_endpoints(&self, http_addr: Option<SocketAddr>) -> Vec<String> {
        let (http, ws) = match self.config.http_tls {
            Some(_) => ("https", "wss"),
            None => ("http", "ws"),
        };
        match http_addr {
            Some(a) if !a.ip().is_unspecified() => {
                vec![format!("{http}://{a}"), format!("{ws}://{a}/ws")]
            }
            _ => Vec::new(),
        }
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
        let wait = waits.next().map_or(PRESENCE_REPUBLISH, Duration::from_secs);
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

/// Attached files live under `<co_dir>/oonode/uploads/<session>/`.
fn uploads(config: &HostConfig) -> Uploads {
    Uploads::new(
        config.co_dir.join("oonode").join("uploads"),
        config.max_file_size_mb,
        config.max_files_per_request,
    )
}

/// Deletes expired sessions and replay keys, often enough that a session is gone within
/// about a quarter of `result_ttl` after it expires (reads never show expired ones).
async fn sweep_loop(store: Store, uploads: Uploads, result_ttl: u64, stop: CancellationToken) {
    let every = Duration::from_secs((result_ttl / 4).clamp(1, 60));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // One bounded job at a time, so requests queue behind none of them for long.
        loop {
            match store.sweep(unix_now()).await {
                Ok(swept) => {
                    uploads.remove(&swept.sessions).await;
                    if !swept.sessions.is_empty() || swept.keys > 0 {
                        let (sessions, keys) = (swept.sessions.len(), swept.keys);
                        tracing::debug!(sessions, keys, "swept expired records");
                    }
                    if !swept.more || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "sweeping expired records failed");
                    break;
                }
            }
        }
    }
}
