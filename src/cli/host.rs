//! `oonode host`: the builder of the library, from flags.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use oonode::{agent, Host, TrustLevel};

#[derive(clap::Args)]
pub(crate) struct HostArgs {
    /// Built-in agent to host.
    #[arg(long, default_value = "translator", value_parser = clap::builder::PossibleValuesParser::new(agent::BUILTIN_AGENTS))]
    agent: String,
    /// HTTP port (0 picks a free one). Default: host.yaml, else 8000.
    #[arg(long)]
    port: Option<u16>,
    /// Address the HTTP listener binds. Default: host.yaml, else 0.0.0.0.
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Trust level: open, careful or strict. Default: host.yaml, else careful.
    #[arg(long)]
    trust: Option<TrustLevel>,
    /// Directory for the key, host.yaml and the session store.
    #[arg(long)]
    co_dir: Option<PathBuf>,
    /// Agent runs at once.
    #[arg(long)]
    workers: Option<usize>,
    /// Requests that may wait for a worker before the node answers busy (503).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Seconds finished sessions are kept.
    #[arg(long)]
    result_ttl: Option<u64>,
    /// Name shown in /info and the banner (default: the agent's own).
    #[arg(long)]
    name: Option<String>,
    /// Relay to announce on (ws://host:port); overrides host.yaml's relay_url.
    #[arg(long, conflicts_with = "no_relay")]
    relay: Option<String>,
    /// Do not announce on any relay.
    #[arg(long)]
    no_relay: bool,
    /// Open no HTTP/WebSocket port at all (reachable through the relay or the swarm).
    #[arg(long)]
    no_http: bool,
    /// Swarm listen multiaddr (repeatable), e.g. /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Find peers on the LAN by multicast DNS.
    #[arg(long)]
    mdns: bool,
    /// Do not join the libp2p swarm.
    #[arg(long, conflicts_with_all = ["listen", "bootstrap", "mdns"])]
    no_p2p: bool,
    /// Print one JSON line to stdout when ready ({"event":"ready","address","http",
    /// "swarm","relay",…}) and the banner to stderr: for scripts and tests.
    #[arg(long)]
    ready_json: bool,
}

pub(crate) async fn host(args: HostArgs) -> anyhow::Result<()> {
    let factory = agent::builtin(&args.agent).context("unknown agent")?;
    let mut host = Host::with_factory(factory);
    if let Some(p) = args.port {
        host = host.port(p);
    }
    if let Some(ip) = args.bind {
        host = host.bind(ip);
    }
    if let Some(t) = args.trust {
        host = host.trust(t);
    }
    if let Some(d) = args.co_dir {
        host = host.co_dir(d);
    }
    if let Some(n) = args.workers {
        host = host.workers(n);
    }
    if let Some(n) = args.max_queue {
        host = host.max_queue(n);
    }
    if let Some(s) = args.result_ttl {
        host = host.result_ttl(s);
    }
    if let Some(n) = args.name {
        host = host.name(n);
    }
    if args.no_relay {
        host = host.relay_url(None);
    }
    if let Some(url) = args.relay {
        host = host.relay_url(Some(url));
    }
    if args.no_http {
        host = host.http(false);
    }
    if args.no_p2p {
        host = host.p2p(false);
    }
    if !args.listen.is_empty() {
        host = host.listen(args.listen);
    }
    if !args.bootstrap.is_empty() {
        host = host.bootstrap(args.bootstrap);
    }
    if args.mdns {
        host = host.mdns(true);
    }
    host.ready_json(args.ready_json).serve().await?;
    Ok(())
}
