//! `oonode testnet`: a local multi-node network in one command.
//!
//! `up` starts one relay and N nodes as separate processes of this same binary, all on
//! 127.0.0.1: each node has its own co_dir (`DIR/node-I`), a free HTTP port, QUIC and
//! TCP swarm listeners on free ports, announces on the relay, and joins the swarm through
//! the node before it (a chain). Every process is detached (its own process group,
//! stdout and stderr to `DIR/<name>.log`), so the network outlives the command that
//! started it. What was started, with PIDs, is written to `DIR/testnet.json` for
//! `status`, `call`, `logs`, `down` and for scripts.
//!
//! `down` stops exactly the processes that `up` started: the PIDs in `testnet.json`,
//! each checked against its recorded start time so that a reused PID is never signalled.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::BUILTIN_AGENTS;
use crate::client::{connect, CallError, ConnectOptions, Via};
use crate::envelope::unix_now;
use crate::identity::{Address, Identity};
use crate::{P2p, P2pConfig};

/// Where `up` puts everything unless `--dir` (or `OONODE_TESTNET_DIR`) says otherwise.
pub const DEFAULT_DIR: &str = ".oonode-testnet";
/// The file that lists what `up` started.
pub const STATE_FILE: &str = "testnet.json";
/// A file that marks a directory as made by `testnet up` (so `up` and `down` only ever
/// wipe a directory of their own).
const MARKER: &str = ".made-by-oonode-testnet";
/// How long `down` waits after SIGTERM before SIGKILL, by default.
const DEFAULT_GRACE_SECS: u64 = 5;
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;
const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// `oonode testnet …`
#[derive(clap::Subcommand, Debug)]
pub enum TestnetCommand {
    /// Start a relay and N nodes on 127.0.0.1, chained into one swarm and announced on the
    /// relay; print a table and write it to DIR/testnet.json.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for the nodes' co_dirs, the logs and testnet.json.
        #[arg(long, env = "OONODE_TESTNET_DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Built-in agents, given to the nodes in turn (node I hosts agents[I % len]).
        #[arg(long, value_delimiter = ',', default_value = "echo,translator",
              value_parser = clap::builder::PossibleValuesParser::new(BUILTIN_AGENTS))]
        agents: Vec<String>,
        /// The relay's port (0: a free one).
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
        /// auto: the swarm (joined through node FROM), then the relay.
        #[arg(long, value_enum, default_value = "auto")]
        via: CallVia,
        /// Seconds to wait for each reply frame.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print a process's log: a node index or `relay`.
    Logs {
        /// Node index, or `relay`.
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

/// The path `testnet call` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CallVia {
    /// The swarm, falling back to the relay.
    Auto,
    P2p,
    Relay,
}

/// `DIR/testnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestnetState {
    pub dir: PathBuf,
    /// The binary every process runs.
    pub binary: PathBuf,
    /// Unix time `up` began.
    pub started_at: u64,
    /// Milliseconds from `up` starting to every process being ready (0 while starting).
    pub ready_ms: u64,
    pub relay: Option<RelayEntry>,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayEntry {
    pub pid: u32,
    /// The process's start time (clock ticks after boot, /proc/PID/stat field 22): a PID
    /// with another start time is someone else's.
    pub start_ticks: u64,
    /// `ws://127.0.0.1:PORT`
    pub url: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub index: usize,
    pub pid: u32,
    pub start_ticks: u64,
    pub agent: String,
    pub address: String,
    pub peer_id: String,
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// The swarm address the next node bootstraps to (QUIC when there is one).
    pub p2p: String,
    pub p2p_addrs: Vec<String>,
    pub co_dir: PathBuf,
    pub log: PathBuf,
    /// Milliseconds from spawning the process to it being ready.
    pub ready_ms: u64,
}

/// Runs one `oonode testnet` command.
pub async fn run(cmd: TestnetCommand) -> anyhow::Result<()> {
    match cmd {
        TestnetCommand::Up {
            nodes,
            dir,
            agents,
            relay_port,
            http_port_base,
            timeout,
        } => {
            let options = UpOptions {
                nodes,
                agents,
                relay_port,
                http_port_base,
                timeout: Duration::from_secs(timeout),
            };
            up(&absolute(&dir)?, &options).await.map(|_| ())
        }
        TestnetCommand::Status {
            dir,
            no_swarm,
            json,
        } => status(&absolute(&dir)?, !no_swarm, json).await,
        TestnetCommand::Call {
            from,
            to,
            prompt,
            dir,
            via,
            timeout,
        } => {
            let state = load(&absolute(&dir)?)?;
            let answer = call(&state, from, to, &prompt, via, Duration::from_secs(timeout)).await?;
            println!("{answer}");
            Ok(())
        }
        TestnetCommand::Logs {
            which,
            dir,
            lines,
            follow,
        } => logs(&absolute(&dir)?, &which, lines, follow).await,
        TestnetCommand::Down { dir, grace, keep } => {
            down(&absolute(&dir)?, Duration::from_secs(grace), keep).map(|_| ())
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

// ---------------------------------------------------------------------------------------
// up
// ---------------------------------------------------------------------------------------

/// What `testnet up` is asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    pub agents: Vec<String>,
    pub relay_port: u16,
    pub http_port_base: Option<u16>,
    /// How long each process may take to come up.
    pub timeout: Duration,
}

/// Starts the testnet in `dir`; on failure stops whatever it started (the logs stay).
pub async fn up(dir: &Path, options: &UpOptions) -> anyhow::Result<TestnetState> {
    if options.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if options.agents.is_empty() {
        bail!("--agents needs at least one agent");
    }
    for agent in &options.agents {
        if !BUILTIN_AGENTS.contains(&agent.as_str()) {
            bail!(
                "unknown agent {agent:?} (built in: {})",
                BUILTIN_AGENTS.join(", ")
            );
        }
    }
    let binary = std::env::current_exe().context("cannot find this program's own binary")?;
    // Ports asked for explicitly: taken ones stop us before anything starts.
    if options.relay_port != 0 {
        check_port_free(options.relay_port, "the relay")?;
    }
    if let Some(base) = options.http_port_base {
        for i in 0..options.nodes {
            let port = u16::try_from(usize::from(base) + i)
                .map_err(|_| anyhow!("--http-port-base {base} + {i} is past port 65535"))?;
            check_port_free(port, &format!("node {i}"))?;
        }
    }
    prepare_dir(dir)?;
    let started = Instant::now();
    let mut state = TestnetState {
        dir: dir.to_path_buf(),
        binary: binary.clone(),
        started_at: unix_now(),
        ready_ms: 0,
        relay: None,
        nodes: Vec::new(),
    };
    let mut starter = Starter {
        binary,
        dir: dir.to_path_buf(),
        children: Vec::new(),
        timeout: options.timeout,
    };
    let outcome = tokio::select! {
        r = starter.start_all(&mut state, options) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => {
            state.ready_ms = started.elapsed().as_millis() as u64;
            save(&state)?;
            eprintln!(
                "testnet ready: a relay and {} node{} in {:.2} s",
                state.nodes.len(),
                if state.nodes.len() == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            );
            print!("{}", table(&state));
            println!("state: {}", dir.join(STATE_FILE).display());
            Ok(state)
        }
        Err(e) => {
            // The progress line in hand ends here.
            eprintln!("failed");
            eprintln!("testnet up failed; stopping what it started");
            let pids: Vec<Proc> = state.procs();
            let report = stop_procs(&pids, Duration::from_secs(2));
            for (_, child) in &mut starter.children {
                let _ = child.wait();
            }
            state.relay = None;
            state.nodes.clear();
            let _ = save(&state);
            if !report.left.is_empty() {
                eprintln!("warning: still running: {:?}", report.left);
            }
            eprintln!("logs kept in {}", dir.display());
            Err(e)
        }
    }
}

/// Makes `dir` ready for a new testnet: refuses if one is running there, wipes a stale
/// one, refuses a non-empty directory that is not a testnet's.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.join(MARKER).exists() {
        if let Ok(old) = load(dir) {
            let alive: Vec<String> = old
                .procs()
                .iter()
                .filter(|p| p.alive())
                .map(|p| format!("{} (PID {})", p.name, p.pid))
                .collect();
            if !alive.is_empty() {
                bail!(
                    "a testnet is already running in {}: {}; stop it first with `oonode testnet down --dir {}`",
                    dir.display(),
                    alive.join(", "),
                    dir.display()
                );
            }
        }
        fs::remove_dir_all(dir)
            .with_context(|| format!("cannot clear the old testnet in {}", dir.display()))?;
    } else if dir.exists() {
        let mut entries =
            fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not a testnet directory (it has no {MARKER}); give another --dir",
                dir.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(
        dir.join(MARKER),
        "made by `oonode testnet up`; `oonode testnet down` removes this directory\n",
    )?;
    Ok(())
}

fn check_port_free(port: u16, what: &str) -> anyhow::Result<()> {
    TcpListener::bind((LOOPBACK, port))
        .map(drop)
        .with_context(|| format!("port {port} (for {what}) is taken on 127.0.0.1"))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((LOOPBACK, 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

struct Starter {
    binary: PathBuf,
    dir: PathBuf,
    /// Kept so that a process that dies while `up` runs is noticed (and reaped).
    children: Vec<(String, Child)>,
    timeout: Duration,
}

impl Starter {
    async fn start_all(
        &mut self,
        state: &mut TestnetState,
        options: &UpOptions,
    ) -> anyhow::Result<()> {
        let relay_port = match options.relay_port {
            0 => free_port()?,
            p => p,
        };
        let relay_addr = SocketAddr::from((LOOPBACK, relay_port));
        let relay_url = format!("ws://{relay_addr}");
        eprint!("relay on {relay_addr} … ");
        let t = Instant::now();
        let log = self.dir.join("relay.log");
        let (pid, start_ticks) = self.spawn(
            "relay",
            &log,
            &["relay".into(), "--listen".into(), relay_addr.to_string()],
        )?;
        state.relay = Some(RelayEntry {
            pid,
            start_ticks,
            url: relay_url.clone(),
            log: log.clone(),
        });
        save(state)?;
        self.wait_relay(&relay_addr, &log).await?;
        eprintln!("up ({} ms)", t.elapsed().as_millis());

        let total = options.nodes;
        for index in 0..total {
            let agent = options.agents[index % options.agents.len()].clone();
            eprint!("[{}/{total}] node {index} ({agent}) … ", index + 1);
            let t = Instant::now();
            let co_dir = self.dir.join(format!("node-{index}"));
            let log = self.dir.join(format!("node-{index}.log"));
            let port = options
                .http_port_base
                .map_or(0, |base| usize::from(base) + index);
            let mut args: Vec<String> = vec![
                "host".into(),
                "--agent".into(),
                agent.clone(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--co-dir".into(),
                co_dir.display().to_string(),
                "--relay".into(),
                relay_url.clone(),
                "--listen".into(),
                "/ip4/127.0.0.1/udp/0/quic-v1".into(),
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
            ];
            if let Some(prev) = state.nodes.last() {
                args.push("--bootstrap".into());
                args.push(prev.p2p.clone());
            }
            let name = format!("node {index}");
            let (pid, start_ticks) = self.spawn(&name, &log, &args)?;
            let mut entry = NodeEntry {
                index,
                pid,
                start_ticks,
                agent,
                address: String::new(),
                peer_id: String::new(),
                http: String::new(),
                p2p: String::new(),
                p2p_addrs: Vec::new(),
                co_dir,
                log,
                ready_ms: 0,
            };
            // Recorded before it is ready, so that a failure (or an interrupted `up`)
            // still knows the PID to stop.
            state.nodes.push(entry.clone());
            save(state)?;
            let banner = self.wait_banner(&name, &entry.log).await?;
            entry.address = banner.address.to_string();
            entry.peer_id = banner.address.peer_id().to_string();
            entry.http = banner.http.clone().ok_or_else(|| {
                anyhow!(
                    "{name} printed no HTTP endpoint (see {})",
                    entry.log.display()
                )
            })?;
            entry.p2p = banner.primary_p2p().ok_or_else(|| {
                anyhow!(
                    "{name} printed no swarm address (see {})",
                    entry.log.display()
                )
            })?;
            entry.p2p_addrs = banner.p2p;
            self.wait_node_ready(&name, &entry, &relay_addr).await?;
            entry.ready_ms = t.elapsed().as_millis() as u64;
            *state.nodes.last_mut().expect("pushed above") = entry.clone();
            save(state)?;
            eprintln!("up ({} ms) {}", entry.ready_ms, entry.address);
        }
        Ok(())
    }

    /// Starts `args` detached: its own process group, stdin from /dev/null, stdout and
    /// stderr appended to `log`.
    fn spawn(&mut self, name: &str, log: &Path, args: &[String]) -> anyhow::Result<(u32, u64)> {
        use std::os::unix::process::CommandExt;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", self.binary.display()))?;
        let pid = child.id();
        let start_ticks = proc_start_ticks(pid).unwrap_or(0);
        self.children.push((name.to_string(), child));
        Ok((pid, start_ticks))
    }

    /// Fails with the log's tail if the process `name` has exited.
    fn check_alive(&mut self, name: &str, log: &Path) -> anyhow::Result<()> {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}) while starting; the end of {}:\n{}",
                    log.display(),
                    tail_of(log, 15)
                );
            }
        }
        Ok(())
    }

    async fn wait_relay(&mut self, addr: &SocketAddr, log: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.check_alive("relay", log)?;
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("relay listening on") {
                if let Ok((200, _)) = http_get(&addr.to_string(), "/health").await {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the relay did not come up within {:?}; the end of {}:\n{}",
                    self.timeout,
                    log.display(),
                    tail_of(log, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_banner(&mut self, name: &str, log: &Path) -> anyhow::Result<Banner> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.check_alive(name, log)?;
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(banner) = Banner::parse(&text) {
                return Ok(banner);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} printed no banner within {:?}; the end of {}:\n{}",
                    self.timeout,
                    log.display(),
                    tail_of(log, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ready: `/health` answers with the node's address and the relay lists it online.
    async fn wait_node_ready(
        &mut self,
        name: &str,
        node: &NodeEntry,
        relay: &SocketAddr,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let http = host_port(&node.http);
        loop {
            self.check_alive(name, &node.log)?;
            let health = http_get(&http, "/health").await;
            let listed =
                http_get(&relay.to_string(), &format!("/api/agents/{}", node.address)).await;
            let last = match (&health, &listed) {
                (Ok((200, h)), Ok((200, r)))
                    if h["address"] == node.address.as_str() && r["online"] == true =>
                {
                    return Ok(());
                }
                (Ok((200, _)), Ok((code, _))) => {
                    format!("the relay does not list it online yet (HTTP {code})")
                }
                (Ok((200, _)), Err(e)) => format!("the relay's directory: {e}"),
                (Ok((code, _)), _) => format!("/health answered HTTP {code}"),
                (Err(e), _) => format!("/health: {e}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{name} is not ready after {:?} ({last}); the end of {}:\n{}",
                    self.timeout,
                    node.log.display(),
                    tail_of(&node.log, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a node's start-up banner says.
#[derive(Debug, Clone, PartialEq)]
pub struct Banner {
    pub address: Address,
    /// `http://IP:PORT`, when HTTP is on.
    pub http: Option<String>,
    /// Swarm listen addresses (`…/p2p/<PeerId>`).
    pub p2p: Vec<String>,
}

impl Banner {
    /// Parses the first complete banner in a log (it ends with "Waiting for tasks...").
    pub fn parse(log: &str) -> Option<Banner> {
        let end = log.find("Waiting for tasks...")?;
        let text = &log[..end];
        let mut address = None;
        let mut http = None;
        let mut p2p = Vec::new();
        for raw in text.lines() {
            let line = raw.trim().trim_matches('│').trim();
            if let Some(rest) = line.strip_prefix("Address:") {
                address = rest.trim().parse::<Address>().ok();
            } else if let Some(rest) = line.strip_prefix("POST ") {
                if let Some(url) = rest.trim().strip_suffix("/input") {
                    http = Some(url.to_string());
                }
            } else if (line.starts_with("/ip4/") || line.starts_with("/ip6/"))
                && line.contains("/p2p/")
            {
                p2p.push(line.to_string());
            }
        }
        Some(Banner {
            address: address?,
            http,
            p2p,
        })
    }

    /// The swarm address to bootstrap through: QUIC if there is one, else the first.
    pub fn primary_p2p(&self) -> Option<String> {
        self.p2p
            .iter()
            .find(|a| a.contains("/quic-v1/"))
            .or_else(|| self.p2p.first())
            .cloned()
    }
}

// ---------------------------------------------------------------------------------------
// state file and processes
// ---------------------------------------------------------------------------------------

/// Reads `DIR/testnet.json`.
pub fn load(dir: &Path) -> anyhow::Result<TestnetState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "no testnet in {} (no {STATE_FILE}); start one with `oonode testnet up`",
                dir.display()
            )
        } else {
            anyhow!("cannot read {}: {e}", path.display())
        }
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a testnet state", path.display()))
}

/// Writes `DIR/testnet.json` atomically (a temporary file, then a rename).
fn save(state: &TestnetState) -> anyhow::Result<()> {
    let path = state.dir.join(STATE_FILE);
    let tmp = state.dir.join(format!("{STATE_FILE}.tmp"));
    let mut file =
        fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
    file.write_all(b"\n")?;
    drop(file);
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A process `up` started.
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    pid: u32,
    start_ticks: u64,
}

impl Proc {
    /// Alive and still the process `up` started (same start time), not a zombie.
    fn alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, ticks)) => {
                state != 'Z' && state != 'X' && (self.start_ticks == 0 || ticks == self.start_ticks)
            }
            None => false,
        }
    }
}

impl TestnetState {
    fn procs(&self) -> Vec<Proc> {
        let mut procs: Vec<Proc> = self
            .nodes
            .iter()
            .map(|n| Proc {
                name: format!("node {}", n.index),
                pid: n.pid,
                start_ticks: n.start_ticks,
            })
            .collect();
        if let Some(r) = &self.relay {
            procs.push(Proc {
                name: "relay".into(),
                pid: r.pid,
                start_ticks: r.start_ticks,
            });
        }
        procs
    }

    /// All PIDs `up` started (nodes, then the relay).
    pub fn pids(&self) -> Vec<u32> {
        self.procs().iter().map(|p| p.pid).collect()
    }

    fn node(&self, index: usize) -> anyhow::Result<&NodeEntry> {
        self.nodes.get(index).ok_or_else(|| {
            anyhow!(
                "no node {index}: this testnet has nodes 0 to {}",
                self.nodes.len().saturating_sub(1)
            )
        })
    }
}

/// `(state, start time)` from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is the 20th after the name.
    let ticks = fields.get(19)?.parse().ok()?;
    Some((state, ticks))
}

fn proc_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Resident memory of a process in KiB (VmRSS in /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn signal(pid: u32, sig: i32) -> bool {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false; // never a process group or "every process"
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { kill(pid, sig) == 0 }
}

struct StopReport {
    stopped: usize,
    killed: Vec<String>,
    left: Vec<String>,
}

/// SIGTERM to each live process, SIGKILL to those still there after `grace`.
fn stop_procs(procs: &[Proc], grace: Duration) -> StopReport {
    let live: Vec<&Proc> = procs.iter().filter(|p| p.alive()).collect();
    for p in &live {
        signal(p.pid, SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while live.iter().any(|p| p.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = Vec::new();
    for p in live.iter().filter(|p| p.alive()) {
        signal(p.pid, SIGKILL);
        killed.push(format!("{} (PID {})", p.name, p.pid));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while live.iter().any(|p| p.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    StopReport {
        stopped: live.len(),
        killed,
        left: live
            .iter()
            .filter(|p| p.alive())
            .map(|p| format!("{} (PID {})", p.name, p.pid))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// down
// ---------------------------------------------------------------------------------------

/// Stops the testnet in `dir` and (unless `keep`) removes the directory.
pub fn down(dir: &Path, grace: Duration, keep: bool) -> anyhow::Result<()> {
    let state = match load(dir) {
        Ok(s) => s,
        Err(_) if !dir.join(MARKER).exists() => {
            eprintln!("nothing to stop: no testnet in {}", dir.display());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let procs = state.procs();
    let report = stop_procs(&procs, grace);
    if !report.left.is_empty() {
        bail!(
            "could not stop {} (still running after SIGKILL); {} kept",
            report.left.join(", "),
            dir.display()
        );
    }
    let killed = if report.killed.is_empty() {
        String::new()
    } else {
        format!("; SIGKILL was needed for {}", report.killed.join(", "))
    };
    let gone = procs.len() - report.stopped;
    eprintln!(
        "stopped {} process{}{}{killed}",
        report.stopped,
        if report.stopped == 1 { "" } else { "es" },
        if gone > 0 {
            format!(" ({gone} had already exited)")
        } else {
            String::new()
        }
    );
    if keep {
        eprintln!("kept {}", dir.display());
    } else {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        eprintln!("removed {}", dir.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------

async fn status(dir: &Path, swarm: bool, json: bool) -> anyhow::Result<()> {
    let state = load(dir)?;
    let relay = match &state.relay {
        Some(r) => {
            let proc = Proc {
                name: "relay".into(),
                pid: r.pid,
                start_ticks: r.start_ticks,
            };
            let alive = proc.alive();
            let health = match http_get(&host_port(&r.url), "/health").await {
                Ok((200, v)) => Some(v),
                _ => None,
            };
            serde_json::json!({
                "pid": r.pid,
                "alive": alive,
                "rss_kib": if alive { rss_kib(r.pid) } else { None },
                "url": r.url,
                "health": health,
            })
        }
        None => Value::Null,
    };
    let relay_addr = state.relay.as_ref().map(|r| host_port(&r.url));
    let mut nodes = Vec::new();
    for n in &state.nodes {
        let proc = Proc {
            name: format!("node {}", n.index),
            pid: n.pid,
            start_ticks: n.start_ticks,
        };
        let alive = proc.alive();
        let http = host_port(&n.http);
        let health = match http_get(&http, "/health").await {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        let info = match http_get(&http, "/info").await {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        let listed = match &relay_addr {
            Some(a) => match http_get(a, &format!("/api/agents/{}", n.address)).await {
                Ok((200, v)) => v["online"].as_bool(),
                Ok((404, _)) => Some(false),
                _ => None,
            },
            None => None,
        };
        nodes.push(serde_json::json!({
            "index": n.index,
            "pid": n.pid,
            "alive": alive,
            "rss_kib": if alive { rss_kib(n.pid) } else { None },
            "agent": n.agent,
            "address": n.address,
            "http": n.http,
            "healthy": health.as_ref().is_some_and(|h| h["status"] == "healthy"),
            "relay_link": health.as_ref().and_then(|h| h["relay"]["state"].as_str().map(str::to_owned)),
            "relay_lists_online": listed,
            "swarm_peers": info.as_ref().and_then(|i| i["p2p"]["connected_peers"].as_u64()),
        }));
    }
    let swarm_view = if swarm {
        Some(swarm_view(&state).await)
    } else {
        None
    };
    let up = nodes
        .iter()
        .filter(|n| n["alive"] == true && n["healthy"] == true)
        .count();
    let relay_up = relay["alive"] == true && !relay["health"].is_null();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dir": state.dir,
                "relay": relay,
                "nodes": nodes,
                "swarm": swarm_view,
                "nodes_up": up,
                "relay_up": relay_up,
            }))?
        );
    } else {
        println!(
            "relay  {}  PID {}  {}{}",
            relay["url"].as_str().unwrap_or("-"),
            relay["pid"],
            if relay_up { "up" } else { "DOWN" },
            match &relay["health"] {
                Value::Null => String::new(),
                h => format!(
                    "  agents online {} (known {}), sessions {}, RSS {}",
                    h["agents_online"],
                    h["agents_known"],
                    h["sessions"],
                    kib(relay["rss_kib"].as_u64())
                ),
            }
        );
        println!(
            "{:>3}  {:<8}  {:<5}  {:<9}  {:<9}  {:>5}  {:>8}  {:<10}  address",
            "#", "PID", "proc", "/health", "relay", "peers", "RSS", "agent"
        );
        for n in &nodes {
            println!(
                "{:>3}  {:<8}  {:<5}  {:<9}  {:<9}  {:>5}  {:>8}  {:<10}  {}",
                n["index"].as_u64().unwrap_or(0),
                n["pid"].as_u64().unwrap_or(0),
                if n["alive"] == true { "alive" } else { "dead" },
                if n["healthy"] == true { "healthy" } else { "-" },
                match n["relay_lists_online"].as_bool() {
                    Some(true) => "online",
                    Some(false) => "offline",
                    None => "?",
                },
                n["swarm_peers"]
                    .as_u64()
                    .map_or("-".into(), |p| p.to_string()),
                kib(n["rss_kib"].as_u64()),
                n["agent"].as_str().unwrap_or("?"),
                n["address"].as_str().unwrap_or("?"),
            );
        }
        if let Some(view) = &swarm_view {
            match view["joined_through"].as_u64() {
                Some(i) => println!(
                    "swarm  joined through node {i}: it knows {} of the {} testnet nodes ({} besides itself)",
                    view["known"], state.nodes.len(), view["known_others"]
                ),
                None => println!(
                    "swarm  {}",
                    view["error"].as_str().unwrap_or("no view")
                ),
            }
        }
        println!(
            "{up} of {} nodes up; relay {}",
            nodes.len(),
            if relay_up { "up" } else { "down" }
        );
    }
    if up == nodes.len() && relay_up {
        Ok(())
    } else {
        Err(anyhow!(
            "{} of {} nodes down{}",
            nodes.len() - up,
            nodes.len(),
            if relay_up { "" } else { "; the relay is down" }
        ))
    }
}

fn kib(v: Option<u64>) -> String {
    match v {
        Some(k) => format!("{:.1} MiB", k as f64 / 1024.0),
        None => "-".into(),
    }
}

/// Joins the swarm through the first live node (a throwaway caller swarm) and asks which
/// of the testnet's nodes its routing table knows.
async fn swarm_view(state: &TestnetState) -> Value {
    let Some(entry) = state.nodes.iter().find(|n| {
        Proc {
            name: String::new(),
            pid: n.pid,
            start_ticks: n.start_ticks,
        }
        .alive()
    }) else {
        return serde_json::json!({"error": "no live node to join the swarm through"});
    };
    let Ok(addr) = entry.p2p.parse() else {
        return serde_json::json!({"error": format!("bad swarm address {}", entry.p2p)});
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = match P2p::spawn(keypair, P2pConfig::caller(vec![addr]), stop).await {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"error": format!("cannot join the swarm: {e}")}),
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peers = match tokio::time::timeout(Duration::from_secs(15), swarm.peers()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return serde_json::json!({"error": format!("swarm: {e}")}),
        Err(_) => return serde_json::json!({"error": "the swarm did not answer within 15 s"}),
    };
    let known: Vec<&NodeEntry> = state
        .nodes
        .iter()
        .filter(|n| peers.iter().any(|p| p.address == n.address))
        .collect();
    serde_json::json!({
        "joined_through": entry.index,
        "known": known.len(),
        "known_others": known.iter().filter(|n| n.index != entry.index).count(),
        "peers": peers.iter().map(|p| serde_json::json!({
            "address": p.address,
            "connected": p.connected,
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------------
// call
// ---------------------------------------------------------------------------------------

/// Node `from` calls node `to` by address with `from`'s own key; returns the result.
/// The path taken goes to stderr.
pub async fn call(
    state: &TestnetState,
    from: usize,
    to: usize,
    prompt: &str,
    via: CallVia,
    reply_timeout: Duration,
) -> anyhow::Result<String> {
    let caller = state.node(from)?;
    let callee = state.node(to)?;
    let (identity, _) = Identity::load_or_create(&caller.co_dir)
        .with_context(|| format!("cannot load node {from}'s key"))?;
    let relay = state
        .relay
        .as_ref()
        .map(|r| r.url.clone())
        .ok_or_else(|| anyhow!("this testnet has no relay"))?;
    let bootstrap: libp2p::Multiaddr = caller
        .p2p
        .parse()
        .with_context(|| format!("node {from}'s swarm address {:?}", caller.p2p))?;
    let base = ConnectOptions::default()
        .identity(identity)
        .reply_timeout(reply_timeout);
    let paths: &[CallVia] = match via {
        CallVia::Auto => &[CallVia::P2p, CallVia::Relay],
        CallVia::P2p => &[CallVia::P2p],
        CallVia::Relay => &[CallVia::Relay],
    };
    let mut failures = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let options = match path {
            CallVia::P2p => base.clone().bootstrap(bootstrap.clone()).via(Via::P2p),
            _ => base.clone().relay(relay.clone()).via(Via::Relay),
        };
        let name = match path {
            CallVia::P2p => "p2p",
            _ => "relay",
        };
        let t = Instant::now();
        let result = async {
            let mut remote = connect(&callee.address, options).await?;
            remote.input(prompt).await
        }
        .await;
        match result {
            Ok(answer) => {
                eprintln!(
                    "node {from} → node {to} ({}) via {name}: {} ms",
                    short(&callee.address),
                    t.elapsed().as_millis()
                );
                return Ok(answer.result);
            }
            // The agent answered: trying another path would run the prompt twice.
            Err(
                e @ (CallError::Refused { .. } | CallError::Failed { .. } | CallError::Tampered(_)),
            ) => {
                bail!("node {from} → node {to} via {name}: {e}");
            }
            Err(e) => {
                if i + 1 < paths.len() {
                    eprintln!("node {from} → node {to} via {name} failed ({e}); trying the relay");
                }
                failures.push(format!("via {name}: {e}"));
            }
        }
    }
    bail!(
        "node {from} could not call node {to} ({}): {}",
        short(&callee.address),
        failures.join("; ")
    )
}

fn short(address: &str) -> String {
    match address.parse::<Address>() {
        Ok(a) => a.short(),
        Err(_) => address.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// logs
// ---------------------------------------------------------------------------------------

async fn logs(dir: &Path, which: &str, lines: Option<usize>, follow: bool) -> anyhow::Result<()> {
    let path = if which == "relay" {
        dir.join("relay.log")
    } else {
        let index: usize = which
            .parse()
            .map_err(|_| anyhow!("which log? a node index (0, 1, …) or `relay`, not {which:?}"))?;
        let path = dir.join(format!("node-{index}.log"));
        if !path.exists() {
            let state = load(dir)?;
            state.node(index)?;
        }
        path
    };
    let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let start = match lines {
        Some(n) => tail_start(&text, n),
        None => 0,
    };
    let mut out = std::io::stdout();
    out.write_all(&text[start..])?;
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let mut offset = text.len() as u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // truncated or replaced
        }
        if len > offset {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = fs::File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            out.write_all(&buf)?;
            out.flush()?;
        }
    }
}

/// Where the last `n` lines of `text` start.
fn tail_start(text: &[u8], n: usize) -> usize {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    if n == 0 {
        text.len()
    } else {
        0
    }
}

fn tail_of(path: &Path, n: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(&text[tail_start(&text, n)..]).into_owned();
    let tail = tail.trim_end();
    if tail.is_empty() {
        "  (empty)".into()
    } else {
        tail.lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
            .trim_end()
            .to_string()
    }
}

// ---------------------------------------------------------------------------------------
// table and HTTP
// ---------------------------------------------------------------------------------------

/// The table `up` prints.
pub fn table(state: &TestnetState) -> String {
    let mut out = String::new();
    if let Some(r) = &state.relay {
        out.push_str(&format!("relay  {}  (PID {})\n", r.url, r.pid));
    }
    let http_w = state
        .nodes
        .iter()
        .map(|n| n.http.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "{:>3}  {:<10}  {:<66}  {:<http_w$}  p2p\n",
        "#", "agent", "address", "http"
    ));
    for n in &state.nodes {
        out.push_str(&format!(
            "{:>3}  {:<10}  {:<66}  {:<http_w$}  {}\n",
            n.index, n.agent, n.address, n.http, n.p2p
        ));
    }
    out
}

/// `http://host:port/…` or `ws://host:port/…` → `host:port`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A small HTTP/1.1 GET (loopback only, short bodies): `(status, JSON body or Null)`.
async fn http_get(host_port: &str, path: &str) -> Result<(u16, Value), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host_port)
            .await
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| "no answer within 3 s".to_string())??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP response".to_string())?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANNER: &str = "2026-01-01T00:00:00Z  INFO oonode: listening\n\
╭──────────────╮\n\
│ Agent 'echo' is now hosted │\n\
├──────────────┤\n\
│                                │\n\
│ Address: 0x3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29 │\n\
│ Trust:   careful │\n\
│ HTTP Endpoints: │\n\
│   POST http://127.0.0.1:41234/input │\n\
│   GET  http://127.0.0.1:41234/health │\n\
│ P2P Swarm (libp2p): │\n\
│   PeerId 12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN │\n\
│   /ip4/127.0.0.1/tcp/40001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN │\n\
│   /ip4/127.0.0.1/udp/40002/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN │\n\
╰──────────────╯\n\
\n\
Waiting for tasks...\n";

    #[test]
    fn parses_the_banner() {
        let b = Banner::parse(BANNER).expect("a banner");
        assert_eq!(
            b.address.to_string(),
            "0x3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
        );
        assert_eq!(b.http.as_deref(), Some("http://127.0.0.1:41234"));
        assert_eq!(b.p2p.len(), 2);
        assert!(b.primary_p2p().unwrap().contains("/quic-v1/"));
    }

    #[test]
    fn an_unfinished_banner_is_not_parsed() {
        let cut = &BANNER[..BANNER.find("╰").unwrap()];
        assert!(Banner::parse(cut).is_none());
    }

    #[test]
    fn tails() {
        assert_eq!(tail_start(b"a\nb\nc\n", 2), 2);
        assert_eq!(tail_start(b"a\nb\nc", 1), 4);
        assert_eq!(tail_start(b"a\nb\n", 5), 0);
        assert_eq!(host_port("ws://127.0.0.1:9/ws/input"), "127.0.0.1:9");
        assert_eq!(host_port("http://127.0.0.1:80"), "127.0.0.1:80");
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let ticks = proc_start_ticks(pid).expect("own /proc entry");
        let me = Proc {
            name: "me".into(),
            pid,
            start_ticks: ticks,
        };
        assert!(me.alive());
        let impostor = Proc {
            start_ticks: ticks + 1,
            ..me
        };
        assert!(!impostor.alive());
        assert!(rss_kib(pid).unwrap() > 0);
    }
}
