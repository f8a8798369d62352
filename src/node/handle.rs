//! A running node: its addresses and links, the banner, the ready line, shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::Dispatcher;
use crate::identity::Address;
use crate::transport::p2p::P2p;
use crate::transport::relay_link::{LinkState, RelayLink, RelayStatus};

use super::{HostError, Node, SHUTDOWN_GRACE};

/// The machine-readable line `oonode host --ready-json` prints once the node is ready:
/// `{"event":"ready","name","address","peer_id","http","swarm":[…],"relay","version"}`.
/// `http` is null with HTTP off, `relay` null without a relay; `swarm` lists the swarm's
/// listen multiaddrs (empty with the swarm off).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Ready {
    /// Always `"ready"`.
    pub event: String,
    pub name: String,
    pub address: String,
    pub peer_id: String,
    pub http: Option<String>,
    pub swarm: Vec<String>,
    pub relay: Option<RelayStatus>,
    pub version: String,
}

impl Ready {
    /// Reads a ready line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Ready> {
        serde_json::from_str::<Ready>(line.trim())
            .ok()
            .filter(|r| r.event == "ready")
    }

    /// One line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A running node.
pub struct NodeHandle {
    pub(super) node: Node,
    pub(super) http_addr: Option<SocketAddr>,
    pub(super) relay: Option<RelayLink>,
    pub(super) p2p: Option<P2p>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: JoinSet<Result<(), HostError>>,
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

    /// A URL for reaching the HTTP listener from this machine (`https://` with TLS).
    pub fn http_url(&self) -> Option<String> {
        let scheme = if self.tls() { "https" } else { "http" };
        Some(format!("{scheme}://{}", self.host_port()?))
    }

    /// The node's WebSocket, `/ws`, from this machine (`wss://` with TLS).
    pub fn ws_url(&self) -> Option<String> {
        let scheme = if self.tls() { "wss" } else { "ws" };
        Some(format!("{scheme}://{}/ws", self.host_port()?))
    }

    fn tls(&self) -> bool {
        self.node.config.http_tls.is_some()
    }

    /// `host:port` of the HTTP listener as reached from this machine.
    fn host_port(&self) -> Option<String> {
        let addr = self.http_addr?;
        let ip = addr.ip();
        let host = if ip.is_unspecified() {
            "localhost".to_string()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        Some(format!("{host}:{}", addr.port()))
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
        while relay.status().state != LinkState::Connected {
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
            event: "ready".into(),
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
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// The start-up box: name, address, endpoints, UI and relay.
    pub fn banner(&self) -> String {
        let relay = match self.relay_status() {
            Some(r) if r.state == LinkState::Connected => format!("{} (connected)", r.url),
            Some(r) => format!(
                "{} ({}{})",
                r.url,
                r.state.as_str(),
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
        match (self.http_url(), self.ws_url()) {
            (Some(url), Some(ws)) => {
                lines.extend([
                    "HTTP Endpoints:".to_string(),
                    format!("  POST {url}/input"),
                    format!("  GET  {url}/sessions/{{session_id}}"),
                    format!("  GET  {url}/sessions"),
                    format!("  GET  {url}/health"),
                    format!("  GET  {url}/info"),
                    format!("  GET  {url}/metrics"),
                    format!("  WS   {ws}"),
                    String::new(),
                    "Interactive UI:".to_string(),
                    format!("  {url}/docs"),
                ]);
            }
            _ => lines.push("HTTP: off (no listening port)".to_string()),
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
        if self.http_addr.is_none() && self.p2p.is_none() {
            lines.push(String::new());
            lines.push(match self.relay {
                Some(_) => "No open port: reachable through the relay only".to_string(),
                None => "No open port and no relay: not reachable".to_string(),
            });
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
            _ = crate::net::shutdown_signal() => None,
            e = listeners_failed => e,
        };
        let result = self.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => result,
        }
    }
}
