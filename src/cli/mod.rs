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
    /// Host an agent: reachable over HTTP/WebSocket, the libp2p swarm and a relay; identity
    /// and sessions in the co_dir.
    Host(host::HostArgs),
    /// Run a relay: agents announce on /ws/announce, callers reach them on /ws/input.
    Relay(relay::RelayArgs),
    /// Call an agent by address (direct, over the swarm, or through a relay; the best that
    /// works): chunks stream to stdout, then the result.
    Call(call::CallArgs),
    /// List the agents a swarm knows, with their summaries (joins through --bootstrap).
    Peers(peers::PeersArgs),
    /// Trust admin: promote, demote, block, unblock, level, credit (signed with the key
    /// in --co-dir; the node accepts its own key and the addresses in its admins.txt).
    Trust(trust::TrustArgs),
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
        command: testnet::TestnetCommand,
    },
    /// Print this node's address and PeerId, creating the key if needed.
    Keys {
        /// Directory holding keys/agent.key (default: project .co/, else ~/.co).
        #[arg(long)]
        co_dir: Option<PathBuf>,
    },
}

/// Runs one command. `call` sets its own exit status; the others print `error: …` and
/// exit 1, or a failed call's own status ([`oonode::CallError::exit_code`]) when one is in
/// the error's chain (`testnet call`).
pub(crate) async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Call(args) => return call::call(args).await,
        Command::Host(args) => host::host(args).await,
        Command::Relay(args) => relay::relay(args).await,
        Command::Peers(args) => peers::peers(args).await,
        Command::Init { dir, force } => keys::init(dir, force),
        Command::Trust(args) => trust::trust(args).await,
        Command::Testnet { command } => testnet::run(command).await,
        Command::Keys { co_dir } => keys::keys(co_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let call = e
                .chain()
                .find_map(|c| c.downcast_ref::<oonode::CallError>());
            call.map_or(ExitCode::FAILURE, |c| ExitCode::from(c.exit_code()))
        }
    }
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
