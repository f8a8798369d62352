//! `oonode host`: the builder of the library, from flags.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use oonode::agent::{self, AgentFactory, ExecAgent, ExecError};
use oonode::{AgentSettings, Host, HostError, P2pError, Settings, TrustLevel};

use super::Exit;

/// The built-in agent hosted when neither `--agent` nor `--exec` nor host.yaml's
/// `agent.exec` names one.
const DEFAULT_AGENT: &str = "translator";

#[derive(clap::Args)]
pub(crate) struct HostArgs {
    /// Built-in agent to host [default: translator, unless host.yaml's agent.exec names
    /// a program].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(agent::BUILTIN_AGENTS))]
    agent: Option<String>,
    /// Host a program of your own: run COMMAND as long-lived child processes (as many as
    /// --workers, or host.yaml's agent.workers) that read one JSON request per line on
    /// stdin and answer in JSON lines on stdout (docs/agent-protocol.md). Split into
    /// words like a shell would, but run without one (see --exec-shell).
    #[arg(long, value_name = "COMMAND", conflicts_with = "agent", value_parser = exec_command)]
    exec: Option<String>,
    /// Run the --exec command (or host.yaml's agent.exec) with `sh -c`: pipes, &&, $VARS.
    #[arg(long)]
    exec_shell: bool,
    /// Seconds one turn of the --exec agent may take, calls to other agents included;
    /// past it the turn fails (agent_error) and the process is restarted. Default:
    /// host.yaml's agent.timeout_secs, else 300.
    #[arg(long, value_name = "SECS", value_parser = super::at_least_one::<u64>)]
    exec_timeout: Option<u64>,
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
    /// Agent runs at once (at least 1).
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    workers: Option<usize>,
    /// Requests that may wait for a worker before the node answers busy (503).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Seconds finished sessions are kept (at least 1).
    #[arg(long, value_parser = super::at_least_one::<u64>)]
    result_ttl: Option<u64>,
    /// Name shown in /info and the banner (default: the agent's own).
    #[arg(long)]
    name: Option<String>,
    /// Relay to announce on (ws://host:port or wss://host); overrides host.yaml's
    /// relay_url.
    #[arg(long, value_name = "URL", conflicts_with = "no_relay", value_parser = super::relay_url)]
    relay: Option<String>,
    /// Do not announce on any relay.
    #[arg(long)]
    no_relay: bool,
    /// Open no HTTP/WebSocket port at all (reachable through the relay or the swarm).
    #[arg(long)]
    no_http: bool,
    /// Swarm listen multiaddr (repeatable). Default: host.yaml, else
    /// /ip4/0.0.0.0/udp/4001/quic-v1 and /ip4/0.0.0.0/tcp/4001 (a free port instead, with
    /// a warning, when 4001 is taken). Port 0 picks a free one; a port given here is used
    /// or start-up fails.
    #[arg(long = "listen", value_name = "MULTIADDR", value_parser = super::multiaddr)]
    listen: Vec<libp2p::Multiaddr>,
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", value_parser = super::peer_multiaddr)]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Find peers on the LAN by multicast DNS.
    #[arg(long)]
    mdns: bool,
    /// Do not join the libp2p swarm: no swarm port. With --no-http and --relay URL the
    /// node opens no port at all (reachable through the relay only).
    #[arg(long, conflicts_with_all = ["listen", "bootstrap", "mdns"])]
    no_p2p: bool,
    /// Print one JSON line to stdout when ready ({"event":"ready","address","http",
    /// "swarm","relay",…}) and the banner to stderr: for scripts and tests.
    #[arg(long)]
    ready_json: bool,
    /// Log lines on stderr as `text` (for people) or `json` (one object a line, with
    /// the request span's id, for log shippers).
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

pub(crate) async fn host(args: HostArgs) -> anyhow::Result<()> {
    let (factory, exec) = agent_factory(&args).await?;
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
        host = host.listen(args.listen.iter().map(ToString::to_string));
    }
    if !args.bootstrap.is_empty() {
        host = host.bootstrap(args.bootstrap.iter().map(ToString::to_string));
    }
    if args.mdns {
        host = host.mdns(true);
    }
    let served = host.ready_json(args.ready_json).serve().await;
    // After the node has drained its runs: the children get their stdin closed and a
    // moment to exit.
    if let Some(exec) = exec {
        exec.shutdown().await;
    }
    served.map_err(refusal)
}

/// The agent the flags and host.yaml name: a built-in, or a program (`--exec`,
/// `agent.exec`) started here, before the node, so that a command that cannot run stops
/// start-up and the node announces the program's own name.
async fn agent_factory(args: &HostArgs) -> anyhow::Result<(AgentFactory, Option<ExecAgent>)> {
    let builtin = |name: &str| agent::builtin(name).context("unknown agent");
    if let Some(name) = &args.agent {
        return Ok((builtin(name)?, None));
    }
    // The same host.yaml the node reads (its `co_dir` key moves the data, not the file).
    let co_dir = super::co_dir_or_default(args.co_dir.clone())?;
    let yaml = co_dir.join("host.yaml");
    let file = Settings::from_file(&yaml)
        .map_err(|e| Exit::usage(e.to_string()))?
        .unwrap_or_default();
    let mut flags = AgentSettings::default();
    flags.exec = args.exec.clone();
    flags.shell = args.exec_shell.then_some(true);
    flags.timeout_secs = args.exec_timeout;
    let settings = flags.or(file.agent.clone().unwrap_or_default());
    let workers = args.workers.or(file.workers);
    let origin = match &args.exec {
        Some(_) => "--exec".to_owned(),
        None => yaml.display().to_string(),
    };
    let Some(config) = settings
        .exec_config(workers, &origin)
        .map_err(|e| Exit::usage(e.to_string()))?
    else {
        return Ok((builtin(DEFAULT_AGENT)?, None));
    };
    let exec = ExecAgent::start(config).await.map_err(|e| match e {
        e @ (ExecError::Empty
        | ExecError::Unsplittable(_)
        | ExecError::NoWorkers
        | ExecError::NoTimeout
        | ExecError::Spawn { .. }) => Exit::usage(e.to_string()),
        e => anyhow::Error::new(e),
    })?;
    Ok((AgentFactory::from_clone(exec.clone()), Some(exec)))
}

/// `--exec`: a command that splits into words (with `--exec-shell`, `sh` would refuse
/// an unclosed quote all the same).
fn exec_command(s: &str) -> Result<String, String> {
    match shlex::split(s) {
        Some(words) if !words.is_empty() => Ok(s.to_owned()),
        Some(_) => Err("the command is empty".into()),
        None => Err(format!(
            "cannot split {s:?} into words (an unclosed quote?)"
        )),
    }
}

/// What stops a node from starting, as one line: a bad host.yaml value (flags were checked
/// by clap already) or a port that cannot be had, with the flag that fixes it, exit 2;
/// anything else as it is, exit 1.
fn refusal(e: HostError) -> anyhow::Error {
    match e {
        HostError::Config(e) => Exit::usage(e.to_string()),
        HostError::Bind { addr, source } if source.kind() == std::io::ErrorKind::AddrInUse => {
            Exit::usage(format!(
                "cannot listen for HTTP on {addr}: the port is in use; \
                 choose another with --port N, or --port 0 for a free one"
            ))
        }
        HostError::Bind { addr, source } => Exit::usage(format!(
            "cannot listen for HTTP on {addr}: {source}; check --bind and --port \
             (--port 0 picks a free one)"
        )),
        HostError::P2p(P2pError::Listen { addr, reason }) => Exit::usage(format!(
            "cannot listen for the swarm on {addr}: {reason}; choose another --listen \
             (port 0 for a free one), or --no-p2p"
        )),
        other => anyhow::Error::new(other),
    }
}
