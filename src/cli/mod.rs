//! The `oonode` subcommands: flags in, the library's calls, output and exit status out.
//! Code only the CLI uses lives here, in the binary (`testnet/` above all).

mod call;
mod host;
mod keys;
mod peers;
mod relay;
pub(crate) mod testnet;
mod trust;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Host an agent: reachable over HTTP/WebSocket (port 8000), the libp2p swarm (port
    /// 4001, QUIC and TCP) and a relay; identity and sessions in the co_dir. Every flag
    /// and host.yaml value is checked first: a bad one stops it with exit status 2.
    Host(Box<host::HostArgs>),
    /// Run a relay: agents announce on /ws/announce, callers reach them on /ws/input.
    Relay(relay::RelayArgs),
    /// Call an agent by address (direct, over the swarm, or through a relay; the best that
    /// works): chunks stream to stdout, then the result.
    Call(call::CallArgs),
    /// List the agents a swarm knows, with their summaries (joins through --bootstrap;
    /// exit status 3 when no bootstrap peer can be reached).
    Peers(peers::PeersArgs),
    /// Trust admin: promote, demote, block, unblock, level, credit (signed with the key
    /// in --co-dir; the node accepts its own key and the addresses in its admins.txt).
    Trust(trust::TrustArgs),
    /// Create a .co/ directory: identity key and a commented host.yaml with every key;
    /// with --template, set up one kind of agent to host (`oonode host` then runs it).
    Init {
        /// Where to create .co/ (default: the current directory).
        dir: Option<PathBuf>,
        /// Overwrite an existing host.yaml (the key is never replaced).
        #[arg(long)]
        force: bool,
        /// exec: a 10-line Python agent (agent.py) run by the node; forward: an agent
        /// behind an HTTP endpoint; llm: a model behind an OpenAI-compatible API.
        #[arg(long, value_enum)]
        template: Option<keys::Template>,
    },
    /// A local multi-node testnet: a relay and N nodes on 127.0.0.1 (up, status, call,
    /// logs, down).
    Testnet {
        #[command(subcommand)]
        command: testnet::TestnetCommand,
    },
    /// Print this node's address and PeerId (--json: with the key file), creating the key
    /// if needed.
    Keys {
        /// Directory holding keys/agent.key (default: project .co/, else ~/.co).
        #[arg(long)]
        co_dir: Option<PathBuf>,
        /// Print one JSON object: {"address","peer_id","key_file"}.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `oonode completions bash >
    /// ~/.local/share/bash-completion/completions/oonode`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// How this command logs: `host` and `relay` take `--log-format`, the rest log text.
    pub(crate) fn log_format(&self) -> LogFormat {
        match self {
            Command::Host(args) => args.log_format,
            Command::Relay(args) => args.log_format,
            _ => LogFormat::Text,
        }
    }
}

/// The shape of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// What is logged without `RUST_LOG`: our own INFO lines (one per request among them)
/// and only warnings from dependencies (sled, libp2p, hyper are chatty below that).
/// `RUST_LOG=oonode=debug` debugs oonode alone.
const DEFAULT_LOG_FILTER: &str = "oonode=info,warn";

/// Starts tracing on stderr, filtered by `RUST_LOG` (else [`DEFAULT_LOG_FILTER`]).
pub(crate) fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Each line carries the current span and its parents (the request's id).
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Exit status for a refusal to start: a bad flag or host.yaml value, a port in use.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status when the peer asked for cannot be reached (as `call` uses for an agent).
pub(crate) const EXIT_UNREACHABLE: u8 = 3;

/// An error that carries its exit status (see the README's table); printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Exit {
    message: String,
    code: u8,
}

impl Exit {
    /// A refusal before anything starts (exit 2). Newlines in `message` become spaces, so
    /// that it stays one line.
    pub(crate) fn usage(message: impl Into<String>) -> anyhow::Error {
        Exit::with_code(message, EXIT_USAGE)
    }

    /// A peer that could not be reached (exit 3).
    pub(crate) fn unreachable(message: impl Into<String>) -> anyhow::Error {
        Exit::with_code(message, EXIT_UNREACHABLE)
    }

    fn with_code(message: impl Into<String>, code: u8) -> anyhow::Error {
        let message = message.into();
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        anyhow::Error::new(Exit { message, code })
    }
}

/// Reports a command-line parse error. A bad value is one line naming the flag (clap's
/// own lines joined, without the "For more information" footer), exit 2; help, version
/// and the other errors print as clap prints them.
pub(crate) fn parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let text = e.render().to_string();
            let line = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("{line}");
            ExitCode::from(EXIT_USAGE)
        }
        _ => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE))
        }
    }
}

/// `--relay`: a relay URL, checked as the node and the client will read it.
pub(crate) fn relay_url(s: &str) -> Result<String, String> {
    s.parse::<oonode::proto::RelayUrl>()
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e}; expected ws://host:port or wss://host"))
}

/// `--forward`, `--llm-base-url`: an http:// or https:// URL.
pub(crate) fn http_url(s: &str) -> Result<String, String> {
    match s.parse::<reqwest::Url>() {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
            Ok(s.to_owned())
        }
        Ok(_) => Err("expected an http:// or https:// URL".into()),
        Err(e) => Err(format!("{e}; expected an http:// or https:// URL")),
    }
}

/// `--relay-ca`, `--tls-cert`, `--tls-key`: a file that can be read, made absolute (the
/// node would otherwise take a relative path from its co_dir, as host.yaml's are).
pub(crate) fn pem_file(s: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::absolute(s).map_err(|e| format!("{s}: {e}"))?;
    std::fs::File::open(&path)
        .map(|_| path.clone())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A count or a number of seconds that must be at least 1 (`--workers`, `--result-ttl`).
pub(crate) fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(
    s: &str,
) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// `--listen`: a swarm listen multiaddr.
pub(crate) fn multiaddr(s: &str) -> Result<libp2p::Multiaddr, String> {
    s.parse().map_err(|e| {
        format!("expected a multiaddr such as /ip4/0.0.0.0/udp/4001/quic-v1 or /ip4/0.0.0.0/tcp/4001 ({e})")
    })
}

/// `--bootstrap`: a swarm peer's multiaddr, which must name the peer.
pub(crate) fn peer_multiaddr(s: &str) -> Result<libp2p::Multiaddr, String> {
    let expected = "expected a multiaddr ending in /p2p/<PeerId>, such as /ip4/10.0.0.5/tcp/4001/p2p/12D3KooW…";
    let addr: libp2p::Multiaddr = s.parse().map_err(|e| format!("{expected} ({e})"))?;
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(_)) => Ok(addr),
        _ => Err(format!("{expected} (it names no peer)")),
    }
}

/// The PeerId a `--bootstrap` multiaddr ends with.
pub(crate) fn peer_of(addr: &libp2p::Multiaddr) -> Option<libp2p::PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Runs one command. `call` sets its own exit status; the others print one `error: …`
/// line and exit with the status an [`Exit`] or a failed call
/// ([`oonode::CallError::exit_code`], `testnet call`) in the error's chain carries, else 1.
pub(crate) async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Call(args) => return call::call(args).await,
        Command::Host(args) => host::host(*args).await,
        Command::Relay(args) => relay::relay(args).await,
        Command::Peers(args) => peers::peers(args).await,
        Command::Init {
            dir,
            force,
            template,
        } => keys::init(dir, force, template),
        Command::Trust(args) => trust::trust(args).await,
        Command::Testnet { command } => testnet::run(command).await,
        Command::Keys { co_dir, json } => keys::keys(co_dir, json),
        Command::Completions { shell } => {
            completions(shell);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            let code = e.chain().find_map(|c| {
                c.downcast_ref::<Exit>()
                    .map(|x| x.code)
                    .or_else(|| c.downcast_ref::<oonode::CallError>().map(|c| c.exit_code()))
            });
            code.map_or(ExitCode::FAILURE, ExitCode::from)
        }
    }
}

/// `e` and its causes as one line, each cause once: library errors often repeat their
/// source in their own message, which `{:#}` would print twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `oonode completions SHELL`: the script for every subcommand and flag, generated from
/// these same definitions so that it cannot drift from them.
fn completions(shell: clap_complete::Shell) {
    use clap::Subcommand;
    let mut cmd = Command::augment_subcommands(
        clap::Command::new("oonode").version(env!("CARGO_PKG_VERSION")),
    );
    clap_complete::generate(shell, &mut cmd, "oonode", &mut std::io::stdout());
}

/// `--co-dir`, else the project's `.co/` found from the working directory, else `~/.co`.
fn co_dir_or_default(co_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match co_dir {
        Some(d) => Ok(d),
        None => Ok(oonode::find_co_dir(
            &std::env::current_dir().context("no working directory")?,
        )),
    }
}
