//! The `oonode` command line: parses arguments, starts tracing, launches the library.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oonode::{agent, find_co_dir, Host, Identity, TrustLevel};

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
    /// Host an agent: HTTP API on --port, identity and sessions in the co_dir.
    Host(HostArgs),
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
    /// Do not announce on any relay.
    #[arg(long)]
    no_relay: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Host(args) => host(args).await,
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
    host.serve().await?;
    Ok(())
}
