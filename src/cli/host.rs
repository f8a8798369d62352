//! `oonode host`: the builder of the library, from flags.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use oonode::agent::{ExecAgent, ExecError};
use oonode::{
    agent, find_co_dir, AgentFactory, AgentSettings, ForwardSettings, Host, HostError, LlmSettings,
    P2pError, Settings, TrustLevel,
};

use super::Exit;

#[derive(clap::Args)]
pub(crate) struct HostArgs {
    /// Agent to host: a built-in (echo, translator, ticker), or `llm`, a model behind an
    /// OpenAI-compatible API (see --llm-base-url). Default: what host.yaml's `agent:`,
    /// `forward:` or `llm:` block names, if it has one, else translator.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
        agent::BUILTIN_AGENTS.iter().copied().chain([LLM])))]
    agent: Option<String>,
    /// Host an agent that already runs behind an HTTP endpoint: each turn is POSTed to
    /// URL as JSON {prompt, session_id, messages, caller}, and the answer is a JSON
    /// {"result": …} or a text/event-stream of chunks. Timeout, retries and headers:
    /// host.yaml's `forward:` block.
    #[arg(long, value_name = "URL", conflicts_with = "agent", value_parser = super::http_url)]
    forward: Option<String>,
    /// With --agent llm (implied): the API base URL, to which /chat/completions is
    /// appended, e.g. http://localhost:11434/v1 (Ollama) or https://api.openai.com/v1.
    /// The key comes from $OPENAI_API_KEY (or host.yaml's llm.api_key_env), if set.
    #[arg(long, value_name = "URL", conflicts_with = "forward", value_parser = super::http_url)]
    llm_base_url: Option<String>,
    /// With --agent llm (implied): the model's name, e.g. llama3.2 or gpt-4o-mini.
    #[arg(long, value_name = "NAME", conflicts_with = "forward")]
    llm_model: Option<String>,
    /// Host a program of your own: run COMMAND as long-lived child processes (as many as
    /// --workers, or host.yaml's agent.workers) that read one JSON request per line on
    /// stdin and answer in JSON lines on stdout (docs/agent-protocol.md). Split into
    /// words like a shell would, but run without one (see --exec-shell).
    #[arg(long, value_name = "COMMAND", conflicts_with_all = ["agent", "forward", "llm_base_url", "llm_model"], value_parser = exec_command)]
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
    /// When the store answers a write: `batched` (default; once written to its log,
    /// synced within 5 ms) or `sync` (after the sync, shared by concurrent turns).
    #[arg(long, value_parser = ["batched", "sync"])]
    durability: Option<String>,
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
    /// A relay to move to when the current one fails (repeatable, tried in order after
    /// --relay); overrides host.yaml's relay_fallbacks.
    #[arg(long = "relay-fallback", value_name = "URL", conflicts_with = "no_relay", value_parser = super::relay_url)]
    relay_fallbacks: Vec<String>,
    /// Do not announce on any relay.
    #[arg(long)]
    no_relay: bool,
    /// Trust this CA (a PEM file) for a wss:// relay, besides the public roots: for a
    /// relay whose certificate is private or self-signed. Overrides host.yaml's relay_ca.
    #[arg(long, value_name = "FILE", value_parser = super::pem_file)]
    relay_ca: Option<PathBuf>,
    /// Serve HTTP and /ws over TLS (https://, wss://) with this PEM certificate chain;
    /// needs --tls-key. Overrides host.yaml's tls_cert and tls_key.
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with = "no_http", value_parser = super::pem_file)]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert", value_parser = super::pem_file)]
    tls_key: Option<PathBuf>,
    /// Open no HTTP/WebSocket port at all (reachable through the relay or the swarm).
    #[arg(long)]
    no_http: bool,
    /// Swarm listen multiaddr (repeatable). Default: host.yaml, else
    /// /ip4/0.0.0.0/udp/4001/quic-v1 and /ip4/0.0.0.0/tcp/4001 (a free port instead, with
    /// a warning, when 4001 is taken). Port 0 picks a free one; a port given here is used
    /// or start-up fails.
    #[arg(long = "listen", value_name = "MULTIADDR", value_parser = super::multiaddr)]
    listen: Vec<libp2p::Multiaddr>,
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>;
    /// /dns4/, /dns6/ and /dns/ names are resolved by the system (again until they do).
    #[arg(long = "bootstrap", value_name = "MULTIADDR", value_parser = super::peer_multiaddr)]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// A swarm address peers reach this node at from outside (repeatable): a port
    /// forward, or a public IP the node cannot see on its interfaces. Advertised as its own.
    #[arg(long = "external-addr", value_name = "MULTIADDR", value_parser = super::multiaddr)]
    external_addrs: Vec<libp2p::Multiaddr>,
    /// Whether to reserve a circuit on relay peers (relays started with --swarm-listen)
    /// so that peers can call this node from behind its NAT: auto (AutoNAT decides),
    /// private (always), public (never). Overrides host.yaml's nat.
    #[arg(long, value_name = "MODE", value_parser = ["auto", "public", "private"])]
    nat: Option<String>,
    /// Find peers on the LAN by multicast DNS.
    #[arg(long)]
    mdns: bool,
    /// Do not join the libp2p swarm: no swarm port. With --no-http and --relay URL the
    /// node opens no port at all (reachable through the relay only).
    #[arg(long, conflicts_with_all = ["listen", "bootstrap", "external_addrs", "nat", "mdns"])]
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

/// `--agent llm`.
const LLM: &str = "llm";

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
    if let Some(d) = args
        .durability
        .as_deref()
        .and_then(oonode::Durability::parse)
    {
        host = host.durability(d);
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
    if !args.relay_fallbacks.is_empty() {
        host = host.relay_fallbacks(args.relay_fallbacks);
    }
    if let Some(ca) = args.relay_ca {
        host = host.relay_ca(ca);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        host = host.tls(cert, key);
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
    if !args.external_addrs.is_empty() {
        host = host.external_addrs(args.external_addrs.iter().map(ToString::to_string));
    }
    if !args.bootstrap.is_empty() {
        host = host.bootstrap(args.bootstrap.iter().map(ToString::to_string));
    }
    if let Some(mode) = args.nat.as_deref().and_then(|m| m.parse().ok()) {
        host = host.nat(mode);
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

/// The agent the flags name, else the one host.yaml's `agent:`, `forward:` or `llm:`
/// block describes, else the translator. Flags override the block's single keys. A
/// program (`--exec`, `agent.exec`) is started here, before the node, so that a command
/// that cannot run stops start-up with one clear line.
async fn agent_factory(args: &HostArgs) -> anyhow::Result<(AgentFactory, Option<ExecAgent>)> {
    let co_dir = match &args.co_dir {
        Some(dir) => dir.clone(),
        None => find_co_dir(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
    };
    let yaml = co_dir.join("host.yaml");
    let origin = yaml.display().to_string();
    let file = Settings::from_file(&yaml)
        .map_err(|e| Exit::usage(e.to_string()))?
        .unwrap_or_default();
    let llm_flags = args.llm_base_url.is_some() || args.llm_model.is_some();
    let named_elsewhere = args.agent.is_some() || args.forward.is_some() || llm_flags;
    if !named_elsewhere {
        let mut flags = AgentSettings::default();
        flags.exec = args.exec.clone();
        flags.shell = args.exec_shell.then_some(true);
        flags.timeout_secs = args.exec_timeout;
        let settings = flags.or(file.agent.clone().unwrap_or_default());
        if args.exec.is_none()
            && settings.exec.is_some()
            && (file.forward.is_some() || file.llm.is_some())
        {
            return Err(Exit::usage(format!(
                "{origin} names more than one agent (`agent.exec` and a `forward:` or `llm:` \
                 block): keep one, or choose with --exec, --forward or --agent"
            )));
        }
        let exec_origin = match &args.exec {
            Some(_) => "--exec".to_owned(),
            None => origin.clone(),
        };
        if let Some(config) = settings
            .exec_config(args.workers.or(file.workers), &exec_origin)
            .map_err(|e| Exit::usage(e.to_string()))?
        {
            let exec = ExecAgent::start(config).await.map_err(|e| match e {
                e @ (ExecError::Empty
                | ExecError::Unsplittable(_)
                | ExecError::NoWorkers
                | ExecError::NoTimeout
                | ExecError::Spawn { .. }) => Exit::usage(e.to_string()),
                e => anyhow::Error::new(e),
            })?;
            return Ok((AgentFactory::from_clone(exec.clone()), Some(exec)));
        }
    }
    let kind = match (args.agent.as_deref(), &args.forward) {
        (Some(LLM), _) => LLM,
        (Some(_), _) if llm_flags => {
            return Err(Exit::usage(
                "--llm-base-url and --llm-model go with --agent llm",
            ))
        }
        (Some(name), _) => name,
        (None, Some(_)) => "forward",
        (None, None) if llm_flags => LLM,
        (None, None) => match (&file.forward, &file.llm) {
            (Some(_), Some(_)) => {
                return Err(Exit::usage(format!(
                    "{origin} has both a `forward:` and an `llm:` block: keep one, or choose \
                     with --forward URL or --agent NAME"
                )))
            }
            (Some(_), None) => "forward",
            (None, Some(_)) => LLM,
            (None, None) => DEFAULT_AGENT,
        },
    };
    match kind {
        "forward" => {
            let mut flags = ForwardSettings::default();
            flags.url = args.forward.clone();
            let settings = flags.or(file.forward.unwrap_or_default());
            if settings.url.is_none() {
                return Err(Exit::usage(format!(
                    "no endpoint to forward to: give --forward URL or `url:` in {origin}'s \
                     `forward:` block"
                )));
            }
            let config = settings
                .resolve(&origin)
                .map_err(|e| Exit::usage(e.to_string()))?;
            Ok((AgentFactory::from_clone(agent::Forward::new(config)), None))
        }
        LLM => {
            let mut flags = LlmSettings::default();
            flags.base_url = args.llm_base_url.clone();
            flags.model = args.llm_model.clone();
            let settings = flags.or(file.llm.unwrap_or_default());
            let missing = match (&settings.base_url, &settings.model) {
                (None, _) => Some("an API base URL: --llm-base-url URL or `base_url:`"),
                (_, None) => Some("a model: --llm-model NAME or `model:`"),
                _ => None,
            };
            if let Some(what) = missing {
                return Err(Exit::usage(format!(
                    "--agent llm needs {what} in {origin}'s `llm:` block"
                )));
            }
            let config = settings
                .resolve(&origin)
                .map_err(|e| Exit::usage(e.to_string()))?;
            Ok((AgentFactory::from_clone(agent::Llm::new(config)), None))
        }
        name => Ok((agent::builtin(name).context("unknown agent")?, None)),
    }
}

/// The agent `oonode host` runs when nothing names one.
const DEFAULT_AGENT: &str = "translator";

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
