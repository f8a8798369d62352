//! `oonode testnet`: a local multi-node network in one command.
//!
//! `up` starts one relay (or M federated ones) and N nodes as separate processes of this same binary, all on
//! 127.0.0.1: each node has its own co_dir (`DIR/node-I`), a free HTTP port, QUIC and
//! TCP swarm listeners on free ports, announces on the relay, and joins the swarm through
//! the node before it (a chain). Every process is detached (its own process group, stderr
//! to `DIR/<name>.log`, its one `--ready-json` line on stdout to `DIR/<name>.ready`), so
//! the network outlives the command that started it. What was started, with PIDs, is
//! written to `DIR/testnet.json` for `status`, `call`, `logs`, `down` and for scripts.
//!
//! `down` stops exactly the processes that `up` started: the PIDs in `testnet.json`,
//! each checked against its recorded start time so that a reused PID is never signalled.
//!
//! | file | what lives there |
//! | --- | --- |
//! | `state.rs` | `testnet.json`: what was started, load/save, the table `up` prints |
//! | `procs.rs` | a started process: alive (start time, not a zombie), RSS, stop |
//! | `up.rs` | starting the relay and the nodes, waiting for their ready lines |
//! | `status.rs` | who is up: processes, `/health`, the relay's and the swarm's view |
//! | `call.rs` | node I calls node J through [`oonode::connect`] |
//! | `logs.rs` | printing and following a process's log |

mod call;
mod logs;
mod procs;
mod state;
mod status;
mod up;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use oonode::agent::BUILTIN_AGENTS;
use oonode::Via;
use serde_json::Value;

/// Where `up` puts everything unless `--dir` (or `OONODE_TESTNET_DIR`) says otherwise.
const DEFAULT_DIR: &str = ".oonode-testnet";
/// How long `down` waits after SIGTERM before SIGKILL, by default.
const DEFAULT_GRACE_SECS: u64 = 5;

/// `oonode testnet …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum TestnetCommand {
    /// Start a relay and N nodes on 127.0.0.1, chained into one swarm and announced on the
    /// relay; print a table and write it to DIR/testnet.json.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How many relays. More than one federate through the libp2p DHT: node I
        /// announces on relay I mod M, with the others as fallbacks, and a caller of any
        /// relay reaches every node.
        #[arg(long, default_value_t = 1)]
        relays: usize,
        /// Directory for the nodes' co_dirs, the logs and testnet.json.
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Built-in agents, given to the nodes in turn (node I hosts agents[I % len]).
        #[arg(long, value_delimiter = ',', default_value = "echo,translator",
              value_parser = clap::builder::PossibleValuesParser::new(BUILTIN_AGENTS))]
        agents: Vec<String>,
        /// The (first) relay's port (0: a free one).
        #[arg(long, default_value_t = 0)]
        relay_port: u16,
        /// Give node I the HTTP port BASE+I instead of a free one.
        #[arg(long, value_name = "BASE")]
        http_port_base: Option<u16>,
        /// Seconds each process may take to come up.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Who is up: each process (PID alive, /health, relay link), the relay's view, and
    /// the swarm's view (joined through the first live node). Exit status 1 if anything
    /// is down.
    Status {
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Skip the swarm view (it joins the swarm for a few seconds).
        #[arg(long)]
        no_swarm: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Node FROM calls node TO by address, signing with node FROM's key; prints the
    /// result on stdout and the path taken on stderr.
    Call {
        /// Index of the calling node.
        from: usize,
        /// Index of the node called.
        to: usize,
        /// The prompt.
        prompt: String,
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Which way to reach node TO. auto: what worked lately, else its HTTP endpoint,
        /// else the swarm (joined through node FROM), else the relay.
        #[arg(long, value_enum, default_value = "auto")]
        via: Via,
        /// Seconds to wait for each reply frame.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print a process's log: a node index, `relay`, or `relay-N`.
    Logs {
        /// Node index, `relay`, or `relay-N` (with `up --relays`).
        which: String,
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
        /// Keep printing what is appended (until Ctrl-C).
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop exactly the processes `up` started (SIGTERM, then SIGKILL after the grace
    /// period) and remove DIR.
    Down {
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = DEFAULT_GRACE_SECS)]
        grace: u64,
        /// Keep DIR (logs, keys, stores) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
}

/// Runs one `oonode testnet` command. A failed call keeps its [`oonode::CallError`] in
/// the error's chain, for the exit status.
pub(crate) async fn run(cmd: TestnetCommand) -> anyhow::Result<()> {
    match cmd {
        TestnetCommand::Up {
            nodes,
            relays,
            dir,
            agents,
            relay_port,
            http_port_base,
            timeout,
        } => {
            let options = up::UpOptions {
                nodes,
                relays,
                agents,
                relay_port,
                http_port_base,
                timeout: Duration::from_secs(timeout),
            };
            up::up(&absolute(&dir)?, &options).await
        }
        TestnetCommand::Status {
            dir,
            no_swarm,
            json,
        } => status::status(&absolute(&dir)?, !no_swarm, json).await,
        TestnetCommand::Call {
            from,
            to,
            prompt,
            dir,
            via,
            timeout,
        } => {
            let state = state::load(&absolute(&dir)?)?;
            let answer =
                call::call(&state, from, to, &prompt, via, Duration::from_secs(timeout)).await?;
            println!("{answer}");
            Ok(())
        }
        TestnetCommand::Logs {
            which,
            dir,
            lines,
            follow,
        } => logs::logs(&absolute(&dir)?, &which, lines, follow).await,
        TestnetCommand::Down { dir, grace, keep } => {
            procs::down(&absolute(&dir)?, Duration::from_secs(grace), keep)
        }
    }
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("no working directory")?
        .join(dir))
}

/// One GET to a process of ours on loopback: `(status, JSON body or Null)`. The client
/// carries the short timeout, so a hung process cannot stall `up` or `status`.
async fn get_json(http: &reqwest::Client, url: &str) -> Result<(u16, Value), String> {
    let res = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

/// The client for [`get_json`]: loopback only, answers within 3 s.
fn loopback_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
        .context("cannot make an HTTP client")
}
