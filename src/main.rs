//! The `oonode` command line: parses arguments, starts tracing, launches the library.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oonode::{agent, find_co_dir, Host, Identity, TrustLevel};

mod cli;

#[derive(Parser)]
#[command(
    name = "oonode",
    version,
    about = "Make an AI agent reachable on the network with one call"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Host an agent: reachable over HTTP/WebSocket, the libp2p swarm and a relay; identity
    /// and sessions in the co_dir.
    Host(HostArgs),
    /// Run a relay: agents announce on /ws/announce, callers reach them on /ws/input.
    Relay(RelayArgs),
    /// Call an agent by address (direct, over the swarm, or through a relay; the best that
    /// works): chunks stream to stdout, then the result.
    Call(CallArgs),
    /// List the agents a swarm knows, with their summaries (joins through --bootstrap).
    Peers(PeersArgs),
    /// Trust admin: promote, demote, block, unblock, level, credit (signed with the key
    /// in --co-dir; the node accepts its own key and the addresses in its admins.txt).
    Trust(TrustArgs),
    /// Create a .co/ directory: identity key and a commented host.yaml with every key.
    Init {
        /// Where to create .co/ (default: the current directory).
        dir: Option<PathBuf>,
        /// Overwrite an existing host.yaml (the key is never replaced).
        #[arg(long)]
        force: bool,
    },
    /// A local multi-node testnet: a relay and N nodes on 127.0.0.1 (up, status, call,
    /// logs, down).
    Testnet {
        #[command(subcommand)]
        command: cli::testnet::TestnetCommand,
    },
    /// Print this node's address and PeerId, creating the key if needed.
    Keys {
        /// Directory holding keys/agent.key (default: project .co/, else ~/.co).
        #[arg(long)]
        co_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct HostArgs {
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

#[derive(clap::Args)]
struct TrustArgs {
    #[arg(value_enum)]
    action: TrustAction,
    /// The address acted on.
    address: String,
    /// Credits to grant (for `credit`).
    amount: Option<u64>,
    /// The node's HTTP URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    node: String,
    /// Directory holding the admin's key (keys/agent.key); the node's own co_dir makes
    /// you the node itself.
    #[arg(long)]
    co_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TrustAction {
    Promote,
    Demote,
    Block,
    Unblock,
    Level,
    Credit,
}

#[derive(clap::Args)]
struct PeersArgs {
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", required = true)]
    bootstrap: Vec<String>,
    /// Seconds to let the swarm fill its routing table before listing.
    #[arg(long, default_value_t = 3)]
    wait: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8765")]
    listen: std::net::SocketAddr,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_frame_bytes: usize,
    /// Agents online at once.
    #[arg(long, default_value_t = 10_000)]
    max_agents: usize,
    /// Caller connections at once.
    #[arg(long, default_value_t = 10_000)]
    max_callers: usize,
    /// Sessions routed to one agent at once.
    #[arg(long, default_value_t = 1_000)]
    max_sessions_per_agent: usize,
    /// Frames per second per connection (burst: twice that).
    #[arg(long, default_value_t = 100)]
    frames_per_sec: u32,
    /// Seconds of silence after which an agent is dropped.
    #[arg(long, default_value_t = 120)]
    agent_timeout: u64,
    /// Seconds without a frame after which a caller connection is closed.
    #[arg(long, default_value_t = 300)]
    caller_idle: u64,
    /// Print one JSON line to stdout when listening ({"event":"ready","url","announce",
    /// "input","http"}) instead of the human-readable lines.
    #[arg(long)]
    ready_json: bool,
}

#[derive(clap::Args)]
struct CallArgs {
    /// The agent's address (0x + 64 hex).
    address: String,
    /// The prompt to send.
    prompt: String,
    /// Which way to reach it. auto: what worked lately, else a direct endpoint that
    /// proves to be the agent, else the swarm, else the relay.
    #[arg(long, value_enum, default_value = "auto")]
    via: oonode::Via,
    /// Relay to reach the agent through (ws://host:port); its directory also tells the
    /// agent's direct endpoints.
    #[arg(long, env = "OONODE_RELAY")]
    relay: Option<String>,
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// The agent's own HTTP endpoint, if known (repeatable): http://host:port.
    #[arg(long = "endpoint", value_name = "URL")]
    endpoints: Vec<String>,
    /// Use plaintext endpoints on private networks too (not only on loopback).
    #[arg(long)]
    allow_private: bool,
    /// Directory holding the caller's key (keys/agent.key), created if needed.
    #[arg(long)]
    co_dir: Option<PathBuf>,
    /// A file keeping the session between calls: read if present, written after.
    #[arg(long, value_name = "FILE")]
    session: Option<PathBuf>,
    /// Print the answer as JSON (result, session_id, chunks, path, duration_ms).
    #[arg(long)]
    json: bool,
    /// Say on stderr which path was used.
    #[arg(long, short)]
    verbose: bool,
    /// Seconds to wait for each next reply frame.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,libp2p_swarm=warn,libp2p_quic=warn,libp2p_tcp=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = match cli.command {
        Command::Call(args) => return runtime.block_on(call(args)),
        other => other,
    };
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A failed call (`testnet call`) exits as `oonode call` does.
            let call = e
                .chain()
                .find_map(|c| c.downcast_ref::<oonode::CallError>());
            call.map_or(ExitCode::FAILURE, |c| ExitCode::from(c.exit_code()))
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Host(args) => host(args).await,
        Command::Relay(args) => relay(args).await,
        Command::Peers(args) => peers(args).await,
        Command::Init { dir, force } => init(dir, force),
        Command::Trust(args) => trust(args).await,
        Command::Testnet { command } => cli::testnet::run(command).await,
        Command::Call(args) => match call(args).await {
            code if code == ExitCode::SUCCESS => Ok(()),
            _ => Err(anyhow::anyhow!("call failed")),
        },
        Command::Keys { co_dir } => {
            let dir = match co_dir {
                Some(d) => d,
                None => find_co_dir(&std::env::current_dir().context("no working directory")?),
            };
            let (identity, created) = Identity::load_or_create(&dir)?;
            if created {
                eprintln!("created {}", Identity::key_path(&dir).display());
            }
            println!("address: {}", identity.address());
            println!("peer_id: {}", identity.address().peer_id());
            Ok(())
        }
    }
}

async fn host(args: HostArgs) -> anyhow::Result<()> {
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

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let mut config = oonode::RelayConfig::default().listen(args.listen);
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_agents = args.max_agents;
    config.max_callers = args.max_callers;
    config.max_sessions_per_agent = args.max_sessions_per_agent;
    config.frames_per_sec = args.frames_per_sec;
    config.agent_timeout = std::time::Duration::from_secs(args.agent_timeout);
    config.caller_idle = std::time::Duration::from_secs(args.caller_idle);
    let handle = oonode::Relay::spawn(config).await?;
    if args.ready_json {
        let url = handle.url();
        let line = serde_json::json!({
            "event": "ready",
            "url": url,
            "announce": format!("{url}/ws/announce"),
            "input": format!("{url}/ws/input"),
            "http": format!("http://{}", handle.local_addr()),
        });
        println!("{line}");
    } else {
        println!("relay listening on {}", handle.url());
        println!("  agents:  {}/ws/announce", handle.url());
        println!("  callers: {}/ws/input", handle.url());
    }
    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    };
    signal.await.context("waiting for a signal")?;
    handle.shutdown().await;
    Ok(())
}

/// `oonode call`: streams chunks to stdout as they come, then the result; exit 0 on
/// success, else a one-line reason and the error's exit status.
async fn call(args: CallArgs) -> ExitCode {
    use std::io::Write;
    let fail = |msg: String, code: u8| {
        eprintln!("error: {msg}");
        ExitCode::from(code)
    };
    let dir = match args.co_dir {
        Some(d) => d,
        None => find_co_dir(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
    };
    let identity = match Identity::load_or_create(&dir) {
        Ok((id, _)) => id,
        Err(e) => return fail(e.to_string(), 1),
    };
    let mut options = oonode::ConnectOptions::default()
        .identity(identity)
        .allow_private(args.allow_private)
        .reply_timeout(std::time::Duration::from_secs(args.timeout))
        .via(args.via);
    if let Some(relay) = args.relay {
        options = options.relay(relay);
    }
    for url in args.endpoints {
        options = options.endpoint(url);
    }
    for addr in &args.bootstrap {
        match addr.parse() {
            Ok(a) => options = options.bootstrap(a),
            Err(e) => return fail(format!("--bootstrap {addr:?} is not a multiaddr: {e}"), 2),
        }
    }
    let saved = match &args.session {
        Some(file) if file.exists() => match std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            }) {
            Ok(v) => v["session_id"].as_str().map(str::to_owned),
            Err(e) => {
                return fail(
                    format!("cannot read session file {}: {e}", file.display()),
                    2,
                )
            }
        },
        _ => None,
    };
    let mut remote = match oonode::connect(&args.address, options).await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    if args.verbose {
        eprintln!("path: {}", remote.path());
    }
    if let Some(id) = saved {
        remote.set_session_id(id);
    }
    let streaming = !args.json;
    let printed = std::cell::Cell::new(false);
    let answer = remote
        .input_streaming(&args.prompt, |chunk| {
            if streaming {
                let mut out = std::io::stdout();
                let _ = write!(out, "{chunk}");
                let _ = out.flush();
                printed.set(true);
            }
        })
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            if printed.get() {
                println!();
            }
            return fail(e.to_string(), e.exit_code());
        }
    };
    if let Some(file) = &args.session {
        let saved = serde_json::json!({"address": args.address, "session_id": answer.session_id});
        if let Err(e) = std::fs::write(file, saved.to_string()) {
            eprintln!("warning: cannot write session file {}: {e}", file.display());
        }
    }
    if args.json {
        let out = serde_json::json!({
            "result": answer.result,
            "session_id": answer.session_id,
            "chunks": answer.chunks,
            "duration_ms": answer.duration_ms,
            "path": remote.path(),
        });
        println!("{out}");
    } else if answer.chunks.concat() == answer.result {
        println!();
    } else {
        if !answer.chunks.is_empty() {
            println!();
        }
        println!("{}", answer.result);
    }
    ExitCode::SUCCESS
}

async fn peers(args: PeersArgs) -> anyhow::Result<()> {
    let mut bootstrap = Vec::new();
    for addr in &args.bootstrap {
        bootstrap.push(
            addr.parse()
                .with_context(|| format!("--bootstrap {addr:?} is not a multiaddr"))?,
        );
    }
    let config = oonode::P2pConfig::caller(bootstrap);
    let stop = tokio_util::sync::CancellationToken::new();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = oonode::P2p::spawn(keypair, config, stop.clone()).await?;
    tokio::time::sleep(std::time::Duration::from_secs(args.wait)).await;
    let mut peers = swarm.peers().await?;
    peers.sort_by(|a, b| a.address.cmp(&b.address));
    stop.cancel();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no agents found (is the bootstrap peer up?)");
    }
    for p in &peers {
        println!(
            "{}  {}",
            p.address,
            p.summary.as_deref().unwrap_or("(no summary published)")
        );
        for e in &p.examples {
            println!("    e.g. {e}");
        }
    }
    Ok(())
}

/// `oonode init`: what the seed's `co init` gives Python users.
fn init(dir: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let co = dir.unwrap_or_else(|| PathBuf::from(".")).join(".co");
    let yaml = co.join("host.yaml");
    if yaml.exists() && !force {
        anyhow::bail!("{} exists; use --force to overwrite it", yaml.display());
    }
    std::fs::create_dir_all(&co).with_context(|| format!("cannot create {}", co.display()))?;
    let (identity, created) = Identity::load_or_create(&co)?;
    std::fs::write(&yaml, oonode::HOST_YAML_TEMPLATE)
        .with_context(|| format!("cannot write {}", yaml.display()))?;
    println!(
        "{} {}",
        if created { "created key" } else { "kept key" },
        Identity::key_path(&co).display()
    );
    println!("wrote {}", yaml.display());
    println!("address: {}", identity.address());
    Ok(())
}

/// `oonode trust …`: a signed, single-use ADMIN envelope to the node's /admin/trust.
async fn trust(args: TrustArgs) -> anyhow::Result<()> {
    use clap::ValueEnum;
    let dir = match args.co_dir {
        Some(d) => d,
        None => find_co_dir(&std::env::current_dir().context("no working directory")?),
    };
    let (identity, _) = Identity::load_or_create(&dir)?;
    let target: oonode::Address = args.address.parse().context("invalid address")?;
    let action = args
        .action
        .to_possible_value()
        .expect("no skipped values")
        .get_name()
        .to_string();
    if matches!(args.action, TrustAction::Credit) && args.amount.is_none() {
        anyhow::bail!("credit needs an amount: oonode trust credit 0x… 10");
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let base = args.node.trim_end_matches('/');
    let info: serde_json::Value = http
        .get(format!("{base}/info"))
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {base}"))?
        .json()
        .await?;
    let node: oonode::Address = info["address"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .context("the node's /info has no address")?;
    let mut payload = serde_json::Map::new();
    payload.insert("action".into(), action.into());
    payload.insert("address".into(), target.to_string().into());
    if let Some(n) = args.amount {
        payload.insert("amount".into(), n.into());
    }
    let env = oonode::Envelope::sign(&identity, oonode::Kind::Admin, Some(node), payload);
    let res = http
        .post(format!("{base}/admin/trust"))
        .json(&env.to_nested_json())
        .send()
        .await?;
    let status = res.status();
    let body: serde_json::Value = res.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{} ({})",
            body["error"].as_str().unwrap_or("refused"),
            body["code"].as_str().unwrap_or(status.as_str())
        );
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}
