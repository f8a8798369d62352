//! `host()` and [`Host`]: wires identity, config, store, dispatcher and transports into a
//! running node, prints the banner, and shuts down gracefully.
//!
//! `start.rs` opens a [`Node`] and spawns its listeners and links; `handle.rs` is the
//! running [`NodeHandle`]: status, the banner, the ready line and shutdown.

mod handle;
mod peers;
mod start;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::agent::{Agent, AgentFactory};
use crate::config::{ConfigError, HostConfig, ListSource, Settings, TrustSetting};
use crate::identity::{find_co_dir, KeyFileError};
use crate::store::StoreError;
use crate::transport::p2p::P2pError;
use crate::trust::{Policy, TrustAgent, TrustLevel};

pub use handle::{NodeHandle, Ready};
pub use start::Node;

/// How long shutdown waits for accepted runs before leaving them to be marked
/// `interrupted` on the next start.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How a configuration error in a value given to [`Host`] names where it came from.
const CODE_ORIGIN: &str = "Host builder";
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

    /// Bytes one run may stream, and the most its answer may hold (`max_output_bytes`).
    pub fn max_output_bytes(mut self, n: usize) -> Self {
        self.code.max_output_bytes = Some(n);
        self
    }

    /// Bytes of one prompt (`max_prompt_bytes`): longer ones are refused, 413.
    pub fn max_prompt_bytes(mut self, n: usize) -> Self {
        self.code.max_prompt_bytes = Some(n);
        self
    }

    /// A session's history kept (`max_history_messages`, `max_history_bytes`): its
    /// newest messages, at most this many and this many bytes.
    pub fn max_history(mut self, messages: usize, bytes: usize) -> Self {
        self.code.max_history_messages = Some(messages);
        self.code.max_history_bytes = Some(bytes);
        self
    }

    /// Requests that may wait for a worker; past this the node answers "busy".
    pub fn max_queue(mut self, n: usize) -> Self {
        self.code.max_queue = Some(n);
        self
    }

    /// When the store answers a write (host.yaml `durability`).
    pub fn durability(mut self, d: crate::store::Durability) -> Self {
        self.code.durability = Some(d.as_str().to_owned());
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

    /// Relays to move to, in turn, when the current one fails (host.yaml
    /// `relay_fallbacks`). With federated relays a caller finds the agent on whichever
    /// it is announced.
    pub fn relay_fallbacks(mut self, urls: Vec<String>) -> Self {
        self.code.relay_fallbacks = Some(urls);
        self
    }

    /// Trusts the CA certificates in this PEM file, besides the public roots, for a
    /// `wss://` relay (and the agent's calls to other agents). A relative path is taken
    /// from the co_dir, as host.yaml's `relay_ca`.
    pub fn relay_ca(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.code.relay_ca = Some(pem_file.into());
        self
    }

    /// Serves HTTP and `/ws` over TLS with the PEM certificate chain `cert` and its
    /// private key `key` (relative paths from the co_dir, as host.yaml's). The endpoints
    /// the node announces become `https://` and `wss://`.
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.code.tls_cert = Some(cert.into());
        self.code.tls_key = Some(key.into());
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

    /// One line on what the agent does (default: [`Agent::summary`](crate::Agent::summary)).
    pub fn summary(mut self, text: impl Into<String>) -> Self {
        self.code.summary = Some(text.into());
        self
    }

    /// Example prompts for `/info` and `/docs` (default: [`Agent::examples`](crate::Agent::examples)).
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

    /// Swarm addresses this node is reachable at from outside (a port forward, a public
    /// IP it cannot see), advertised to peers as its own.
    pub fn external_addrs<I: IntoIterator<Item = S>, S: Into<String>>(mut self, addrs: I) -> Self {
        self.code.external_addrs = Some(addrs.into_iter().map(Into::into).collect());
        self
    }

    /// Whether the node reserves circuits on relay peers: [`NatMode::Auto`] (AutoNAT
    /// decides, the default), `Private` (always, behind a NAT), `Public` (never).
    ///
    /// [`NatMode::Auto`]: crate::NatMode::Auto
    pub fn nat(mut self, mode: crate::NatMode) -> Self {
        self.code.nat = Some(
            match mode {
                crate::NatMode::Auto => "auto",
                crate::NatMode::Public => "public",
                crate::NatMode::Private => "private",
            }
            .into(),
        );
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
        // A bad value given in code is the caller's, not host.yaml's: the code parameters
        // are checked alone first, so that the error names them rather than the file.
        HostConfig::resolve(self.code.clone(), &base, CODE_ORIGIN)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_code_parameter_is_blamed_on_the_code_not_on_host_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let factory = || AgentFactory::from_clone(crate::agent::Echo);
        let err = Host::with_factory(factory())
            .co_dir(dir.path())
            .listen(["nope"])
            .build()
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.starts_with("Host builder: key `listen`") && !err.contains("host.yaml"),
            "{err}"
        );
        std::fs::write(dir.path().join("host.yaml"), "relay_url: localhost:1\n").unwrap();
        let err = Host::with_factory(factory())
            .co_dir(dir.path())
            .build()
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("host.yaml: key `relay_url`"), "{err}");
        assert!(!dir.path().join("keys").exists(), "nothing made");
    }
}
