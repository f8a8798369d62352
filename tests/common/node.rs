//! Test nodes, two ways: in-process through [`Host`] (a [`TestNode`]) and as a child
//! process of the real binary (a [`NodeProc`]). Both default to what a test wants: a
//! fresh temporary co_dir, HTTP on 127.0.0.1 port 0, relay off, swarm off; the
//! builders turn on the rest, on loopback only.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use libp2p::Multiaddr;
use oonode::{Address, Host, NodeHandle, P2p};
use serde_json::Value;
use tempfile::TempDir;

use super::proc::{Child, NodeReady, Stderr, BIN};
use super::{get_json, post_json, STEP};

/// Swarm listeners on loopback, port 0.
pub const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
pub const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// How long a swarm may take to report all its listeners.
const LISTEN_LIMIT: Duration = Duration::from_secs(10);
/// A node with a swarm may take longer than a step to close its connections.
const SWARM_STOP_LIMIT: Duration = Duration::from_secs(40);
/// How long the real binary may take to print its ready line.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// A node hosted in-process.
pub struct TestNode {
    pub handle: NodeHandle,
    /// `http://127.0.0.1:PORT`; empty with HTTP off.
    pub url: String,
    pub address: Address,
    /// The swarm's listen multiaddrs (each `…/p2p/<PeerId>` on 127.0.0.1); empty with the
    /// swarm off.
    pub swarm: Vec<Multiaddr>,
    _dir: Option<TempDir>,
}

/// Options for a [`TestNode`]; [`NodeBuilder::start`] starts it.
pub struct NodeBuilder {
    host: Host,
    co_dir: Option<PathBuf>,
    http: bool,
    listen: Vec<String>,
    bootstrap: Vec<Multiaddr>,
    relay: Option<String>,
    relay_wait: Duration,
}

impl NodeBuilder {
    /// Home of the node's key, host.yaml and store (default: a temporary directory that
    /// lives as long as the node).
    pub fn co_dir(mut self, dir: &Path) -> Self {
        self.co_dir = Some(dir.to_owned());
        self
    }

    /// HTTP on 127.0.0.1 port 0 (the default), or no listening port at all.
    pub fn http(mut self, on: bool) -> Self {
        self.http = on;
        self
    }

    /// Joins the swarm, listening on `addrs` (multiaddrs on 127.0.0.1, port 0); `start`
    /// waits until every listener has an address.
    pub fn swarm(mut self, addrs: &[&str]) -> Self {
        self.listen = addrs.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Swarm peers to join through.
    pub fn bootstrap(mut self, peers: &[Multiaddr]) -> Self {
        self.bootstrap = peers.to_vec();
        self
    }

    /// Announces on the relay at `url`; `start` waits (a step) for the link.
    pub fn relay(mut self, url: &str) -> Self {
        self.relay = Some(url.to_owned());
        self
    }

    /// How long `start` waits for the relay link.
    pub fn relay_wait(mut self, limit: Duration) -> Self {
        self.relay_wait = limit;
        self
    }

    pub async fn start(self) -> TestNode {
        let (co_dir, dir) = match self.co_dir {
            Some(path) => (path, None),
            None => {
                let dir = tempfile::tempdir().unwrap();
                (dir.path().to_owned(), Some(dir))
            }
        };
        let swarm_on = !self.listen.is_empty();
        let mut host = self
            .host
            .co_dir(co_dir)
            .http(self.http)
            .relay_url(self.relay.clone())
            .p2p(swarm_on);
        if self.http {
            host = host.port(0).bind(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        if swarm_on {
            host = host
                .listen(self.listen.iter().cloned())
                .bootstrap(self.bootstrap.iter().map(ToString::to_string));
        }
        let handle = tokio::time::timeout(STEP, async {
            host.build()
                .expect("node builds")
                .spawn()
                .await
                .expect("node starts")
        })
        .await
        .expect("node start timed out");
        if self.relay.is_some() {
            assert!(
                handle.wait_for_relay(self.relay_wait).await,
                "the node connects to the relay: {:?}",
                handle.relay_status()
            );
        }
        let swarm = match handle.p2p() {
            Some(p2p) => listening(p2p, self.listen.len()).await,
            None => Vec::new(),
        };
        TestNode {
            url: handle.http_url().unwrap_or_default(),
            address: handle.address(),
            handle,
            swarm,
            _dir: dir,
        }
    }
}

/// The swarm's listen multiaddrs, once there are `count`, checked to be on loopback.
async fn listening(p2p: &P2p, count: usize) -> Vec<Multiaddr> {
    let addrs = tokio::time::timeout(LISTEN_LIMIT, async {
        loop {
            let addrs = p2p.status().listen_addrs;
            if addrs.len() >= count {
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("listening: nothing within {LISTEN_LIMIT:?}"));
    let suffix = format!("/p2p/{}", p2p.peer_id());
    addrs
        .iter()
        .map(|s| {
            assert!(s.starts_with("/ip4/127.0.0."), "{s} is not on loopback");
            assert!(s.ends_with(&suffix), "{s} does not end with /p2p/<PeerId>");
            s.parse().expect("a listen multiaddr")
        })
        .collect()
}

impl TestNode {
    /// GET `path` as an unsigned caller holding `secret` (its sessions' secret).
    pub async fn get_with_secret(&self, path: &str, secret: &str) -> (u16, Value) {
        let req = super::client()
            .get(format!("{}{path}", self.url))
            .header("x-co-session-secret", secret);
        super::send(req).await
    }

    /// The node's listen multiaddr over `transport` ("quic-v1" or "tcp").
    pub fn swarm_addr_over(&self, transport: &str) -> Multiaddr {
        self.swarm
            .iter()
            .find(|a| a.iter().any(|p| p.tag() == transport))
            .unwrap_or_else(|| panic!("the node listens over {transport}"))
            .clone()
    }

    /// The node's `/ws` URL (HTTP must be on).
    pub fn ws_url(&self) -> String {
        self.handle.ws_url().expect("the node's HTTP is on")
    }

    /// A node hosting `host`, with the test defaults; see [`NodeBuilder`].
    pub fn builder(host: Host) -> NodeBuilder {
        NodeBuilder {
            host,
            co_dir: None,
            http: true,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            relay: None,
            relay_wait: STEP,
        }
    }

    /// Starts `host` with HTTP on 127.0.0.1, with `co_dir` as its home.
    pub async fn start(host: Host, co_dir: &Path) -> TestNode {
        TestNode::builder(host).co_dir(co_dir).start().await
    }

    /// The node's own swarm.
    pub fn p2p(&self) -> P2p {
        self.handle
            .p2p()
            .expect("the node joined the swarm")
            .clone()
    }

    pub async fn post(&self, body: &Value) -> (u16, Value) {
        post_json(&format!("{}/input", self.url), body).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&format!("{}{path}", self.url)).await
    }

    pub async fn stop(self) {
        let limit = match self.handle.p2p() {
            Some(_) => SWARM_STOP_LIMIT,
            None => STEP,
        };
        tokio::time::timeout(limit, self.handle.shutdown())
            .await
            .expect("shutdown timed out")
            .expect("clean shutdown");
    }
}

/// `oonode host` as a child process, killed (by its own handle) when dropped.
pub struct NodeProc {
    pub child: Child,
    pub address: Address,
    /// `http://127.0.0.1:PORT`; empty with HTTP off.
    pub url: String,
    /// The swarm's listen multiaddrs; empty with the swarm off.
    pub swarm: Vec<Multiaddr>,
}

/// Options for a [`NodeProc`]: `oonode host --ready-json --co-dir DIR`, by default with
/// `--port 0 --bind 127.0.0.1 --no-relay --no-p2p` and `RUST_LOG=warn`.
pub struct NodeProcBuilder {
    co_dir: PathBuf,
    http: bool,
    relay: Option<String>,
    listen: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stderr: Stderr,
    log: &'static str,
    ready_within: Duration,
}

impl NodeProc {
    pub fn builder(co_dir: &Path) -> NodeProcBuilder {
        NodeProcBuilder {
            co_dir: co_dir.to_owned(),
            http: true,
            relay: None,
            listen: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            stderr: Stderr::Inherit,
            log: "warn",
            ready_within: READY_LIMIT,
        }
    }

    /// kill -9, then reap.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }
}

impl NodeProcBuilder {
    /// More arguments for `oonode host`, e.g. `["--agent", "ticker"]`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// `--no-http`.
    pub fn no_http(mut self) -> Self {
        self.http = false;
        self
    }

    /// `--relay URL` instead of `--no-relay`.
    pub fn relay(mut self, url: &str) -> Self {
        self.relay = Some(url.to_owned());
        self
    }

    /// `--listen ADDR` (on loopback) instead of `--no-p2p`.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen.push(addr.to_owned());
        self
    }

    /// One more environment variable for the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Where the child's stderr goes (default: ours); [`Stderr::Echo`] also keeps it for
    /// [`Child::kill_and_read_stderr`].
    pub fn stderr(mut self, stderr: Stderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// The child's `RUST_LOG`.
    pub fn log(mut self, filter: &'static str) -> Self {
        self.log = filter;
        self
    }

    /// How long to wait for the ready line.
    pub fn ready_within(mut self, limit: Duration) -> Self {
        self.ready_within = limit;
        self
    }

    fn spawn(&self) -> Child {
        let mut cmd = Command::new(BIN);
        cmd.args(["host", "--ready-json", "--co-dir"])
            .arg(&self.co_dir)
            .env("RUST_LOG", self.log);
        if self.http {
            cmd.args(["--port", "0", "--bind", "127.0.0.1"]);
        } else {
            cmd.arg("--no-http");
        }
        match &self.relay {
            Some(url) => cmd.args(["--relay", url]),
            None => cmd.arg("--no-relay"),
        };
        if self.listen.is_empty() {
            cmd.arg("--no-p2p");
        }
        for addr in &self.listen {
            cmd.args(["--listen", addr]);
        }
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        Child::spawn("node", &mut cmd, self.stderr)
    }

    /// Starts the node and waits (blocking) for its ready line.
    pub fn start(self) -> NodeProc {
        let child = self.spawn();
        let ready = child.ready(self.ready_within);
        NodeProc::ready(child, &ready)
    }

    /// Starts the node and waits for its ready line without blocking the runtime.
    pub async fn start_async(self) -> NodeProc {
        let child = self.spawn();
        let ready = child.ready_async(self.ready_within).await;
        NodeProc::ready(child, &ready)
    }
}

impl NodeProc {
    fn ready(child: Child, ready: &Value) -> NodeProc {
        let ready = NodeReady::parse(ready);
        NodeProc {
            child,
            address: ready.address,
            url: ready.http.unwrap_or_default(),
            swarm: ready.swarm,
        }
    }
}
