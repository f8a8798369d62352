//! `testnet up`: starts the relays and the nodes, each with `--ready-json`, and waits for
//! each one's ready line (then, for a node, for its relay to list it online). With more
//! than one relay, the relays federate through a swarm of their own (the first relay's
//! is the bootstrap), node I announces on relay I mod M with the others as fallbacks, and
//! `up` waits until every relay finds every node.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use oonode::agent::BUILTIN_AGENTS;
use oonode::proto::RelayUrl;
use oonode::{Ready, RelayReady};

use super::logs::tail_of;
use super::procs::{start_ticks, stop_procs};
use super::state::{load, save, table, NodeEntry, RelayEntry, TestnetState, MARKER, STATE_FILE};
use super::{get_json, loopback_client};

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Lines of a log shown when a process fails to start.
const TAIL_LINES: usize = 15;

/// What `testnet up` is asked for.
#[derive(Debug, Clone)]
pub(super) struct UpOptions {
    pub nodes: usize,
    /// How many relays (at least 1).
    pub relays: usize,
    pub agents: Vec<String>,
    pub relay_port: u16,
    pub http_port_base: Option<u16>,
    /// How long each process may take to come up.
    pub timeout: Duration,
}

/// The swarm address to bootstrap through: QUIC if there is one, else the first.
fn primary_swarm(ready: &Ready) -> Option<&String> {
    ready
        .swarm
        .iter()
        .find(|a| a.contains("/quic-v1/"))
        .or_else(|| ready.swarm.first())
}

/// Starts the testnet in `dir`; on failure stops whatever it started (the logs stay).
pub(super) async fn up(dir: &Path, options: &UpOptions) -> anyhow::Result<()> {
    if options.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if options.relays == 0 {
        bail!("--relays must be at least 1");
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
        started_at: oonode::envelope::unix_now(),
        ready_ms: 0,
        relay: None,
        more_relays: Vec::new(),
        nodes: Vec::new(),
    };
    let mut starter = Starter {
        binary,
        dir: dir.to_path_buf(),
        children: Vec::new(),
        timeout: options.timeout,
        http: loopback_client()?,
    };
    let outcome = tokio::select! {
        r = starter.start_all(&mut state, options) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => {
            state.ready_ms = started.elapsed().as_millis() as u64;
            save(&state)?;
            let relays = match options.relays {
                1 => "a relay".to_string(),
                m => format!("{m} federated relays"),
            };
            eprintln!(
                "testnet ready: {relays} and {} node{} in {:.2} s",
                state.nodes.len(),
                if state.nodes.len() == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            );
            print!("{}", table(&state));
            println!("state: {}", dir.join(STATE_FILE).display());
            Ok(())
        }
        Err(e) => {
            // The progress line in hand ends here.
            eprintln!("failed");
            eprintln!("testnet up failed; stopping what it started");
            let report = stop_procs(&state.procs(), Duration::from_secs(2));
            for (_, child) in &mut starter.children {
                let _ = child.wait();
            }
            state.relay = None;
            state.more_relays.clear();
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

/// A process being started: where its ready line and its log go.
struct Started {
    name: String,
    pid: u32,
    start_ticks: u64,
    /// Its stdout: the one `--ready-json` line.
    ready: PathBuf,
    /// Its stderr.
    log: PathBuf,
}

struct Starter {
    binary: PathBuf,
    dir: PathBuf,
    /// Kept so that a process that dies while `up` runs is noticed (and reaped).
    children: Vec<(String, Child)>,
    timeout: Duration,
    http: reqwest::Client,
}

impl Starter {
    async fn start_all(
        &mut self,
        state: &mut TestnetState,
        options: &UpOptions,
    ) -> anyhow::Result<()> {
        for index in 0..options.relays {
            self.start_relay(state, options, index).await?;
        }
        let relays: Vec<String> = state.relays().iter().map(|r| r.url.clone()).collect();

        let total = options.nodes;
        for index in 0..total {
            let agent = options.agents[index % options.agents.len()].clone();
            eprint!("[{}/{total}] node {index} ({agent}) … ", index + 1);
            let t = Instant::now();
            let co_dir = self.dir.join(format!("node-{index}"));
            // Every node of a testnet dials from 127.0.0.1: lift the per-IP cap on swarm
            // connections, which is there for strangers.
            fs::create_dir_all(&co_dir)
                .with_context(|| format!("cannot create {}", co_dir.display()))?;
            fs::write(co_dir.join("host.yaml"), "max_connections_per_ip: 4096\n")
                .with_context(|| format!("cannot write {}/host.yaml", co_dir.display()))?;
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
                relays[index % relays.len()].clone(),
                "--listen".into(),
                "/ip4/127.0.0.1/udp/0/quic-v1".into(),
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
            ];
            // Its fallbacks: the other relays, from the next one on.
            for k in 1..relays.len() {
                args.push("--relay-fallback".into());
                args.push(relays[(index + k) % relays.len()].clone());
            }
            if let Some(prev) = state.nodes.last() {
                args.push("--bootstrap".into());
                args.push(prev.p2p.clone());
            }
            let node = self.spawn(&format!("node {index}"), &format!("node-{index}"), &args)?;
            let mut entry = NodeEntry {
                index,
                pid: node.pid,
                start_ticks: node.start_ticks,
                agent,
                address: String::new(),
                peer_id: String::new(),
                http: String::new(),
                p2p: String::new(),
                p2p_addrs: Vec::new(),
                co_dir,
                log: node.log.clone(),
                ready_ms: 0,
                relay: index % relays.len(),
            };
            // Recorded before it is ready, so that a failure (or an interrupted `up`)
            // still knows the PID to stop.
            state.nodes.push(entry.clone());
            save(state)?;
            let ready = self.wait_ready_line(&node, Ready::parse).await?;
            let missing = |what: &str| {
                anyhow!(
                    "{} reported no {what} (see {})",
                    node.name,
                    node.ready.display()
                )
            };
            entry.http = ready.http.clone().ok_or_else(|| missing("HTTP endpoint"))?;
            entry.p2p = primary_swarm(&ready)
                .cloned()
                .ok_or_else(|| missing("swarm address"))?;
            entry.address = ready.address;
            entry.peer_id = ready.peer_id;
            entry.p2p_addrs = ready.swarm;
            let relay_url: RelayUrl = relays[entry.relay].parse()?;
            self.wait_node_listed(&node, &entry, &relay_url).await?;
            entry.ready_ms = t.elapsed().as_millis() as u64;
            *state.nodes.last_mut().expect("pushed above") = entry.clone();
            save(state)?;
            eprintln!("up ({} ms) {}", entry.ready_ms, entry.address);
        }
        if relays.len() > 1 {
            self.wait_federated(state).await?;
        }
        Ok(())
    }

    /// Starts relay `index`: the first on `--relay-port`, the rest on free ports. With
    /// more than one, each joins the relays' swarm (through the first) and passes
    /// callers on to the others, which are on loopback.
    async fn start_relay(
        &mut self,
        state: &mut TestnetState,
        options: &UpOptions,
        index: usize,
    ) -> anyhow::Result<()> {
        let port = match (index, options.relay_port) {
            (0, p) if p != 0 => p,
            _ => free_port()?,
        };
        let name = match index {
            0 => "relay".to_string(),
            i => format!("relay-{i}"),
        };
        let addr = SocketAddr::from((LOOPBACK, port));
        eprint!("{name} on {addr} … ");
        let t = Instant::now();
        let mut args = vec!["relay".into(), "--listen".into(), addr.to_string()];
        if options.relays > 1 {
            args.extend(["--swarm-listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
            args.push("--forward-private".into());
            if let Some(first) = &state.relay {
                args.extend(["--bootstrap".into(), first.swarm.clone()]);
            }
        }
        let relay = self.spawn(&name, &name, &args)?;
        let entry = RelayEntry {
            name: name.clone(),
            pid: relay.pid,
            start_ticks: relay.start_ticks,
            url: format!("ws://{addr}"),
            http: String::new(),
            swarm: String::new(),
            log: relay.log.clone(),
        };
        // Recorded before it is ready, so that a failure still knows the PID to stop.
        match index {
            0 => state.relay = Some(entry),
            _ => state.more_relays.push(entry),
        }
        save(state)?;
        let ready = self.wait_ready_line(&relay, RelayReady::parse).await?;
        if options.relays > 1 && ready.swarm.is_empty() {
            bail!(
                "{name} reported no swarm address (see {})",
                relay.ready.display()
            );
        }
        let entry = match index {
            0 => state.relay.as_mut().expect("set above"),
            _ => state.more_relays.last_mut().expect("pushed above"),
        };
        entry.url = ready.url;
        entry.http = ready.http;
        entry.swarm = ready.swarm.first().cloned().unwrap_or_default();
        save(state)?;
        eprintln!("up ({} ms)", t.elapsed().as_millis());
        Ok(())
    }

    /// Waits until every relay's directory finds every node (on it, or homed on another
    /// relay through the DHT).
    async fn wait_federated(&mut self, state: &TestnetState) -> anyhow::Result<()> {
        eprint!("relays finding every node through the DHT … ");
        let t = Instant::now();
        let deadline = t + self.timeout;
        for relay in state.relays() {
            let url: RelayUrl = relay.url.parse()?;
            for node in &state.nodes {
                loop {
                    let listed = get_json(&self.http, &url.directory(&node.address)).await;
                    if matches!(&listed, Ok((200, v)) if v["online"] == true) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "{} does not find node {} ({}) after {:?}; see {}",
                            relay.name,
                            node.index,
                            node.address,
                            self.timeout,
                            relay.log.display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        eprintln!("done ({} ms)", t.elapsed().as_millis());
        Ok(())
    }

    /// Starts `oonode ARGS… --ready-json` detached: its own process group, stdin from
    /// /dev/null, stdout to `DIR/FILE.ready`, stderr appended to `DIR/FILE.log`.
    fn spawn(&mut self, name: &str, file: &str, args: &[String]) -> anyhow::Result<Started> {
        use std::os::unix::process::CommandExt;
        let ready = self.dir.join(format!("{file}.ready"));
        let log = self.dir.join(format!("{file}.log"));
        let out = fs::File::create(&ready)
            .with_context(|| format!("cannot create {}", ready.display()))?;
        let err = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = Command::new(&self.binary)
            .args(args)
            .arg("--ready-json")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", self.binary.display()))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(Started {
            name: name.to_string(),
            pid,
            start_ticks: start_ticks(pid),
            ready,
            log,
        })
    }

    /// Fails, with the end of the process's log, if it has exited or `deadline` has
    /// passed (`waiting` says for what).
    fn still_starting(
        &mut self,
        proc: &Started,
        deadline: Instant,
        waiting: &str,
    ) -> anyhow::Result<()> {
        let exited = self
            .children
            .iter_mut()
            .find(|(n, _)| *n == proc.name)
            .and_then(|(_, child)| child.try_wait().ok().flatten());
        let why = match exited {
            Some(status) => format!("{} exited ({status}) while starting", proc.name),
            None if Instant::now() >= deadline => format!(
                "{} is not ready after {:?} ({waiting})",
                proc.name, self.timeout
            ),
            None => return Ok(()),
        };
        bail!(
            "{why}; the end of {}:\n{}",
            proc.log.display(),
            tail_of(&proc.log, TAIL_LINES)
        )
    }

    /// Waits for the process's ready line (a whole line of JSON with `"event":"ready"`).
    /// The process's ready line, read with the library's own parser of it.
    async fn wait_ready_line<T>(
        &mut self,
        proc: &Started,
        parse: fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let text = fs::read_to_string(&proc.ready).unwrap_or_default();
            if let Some(line) = text.lines().next().filter(|_| text.contains('\n')) {
                return parse(line).ok_or_else(|| {
                    anyhow!(
                        "{}'s first line is not its ready line ({}): {line}",
                        proc.name,
                        proc.ready.display()
                    )
                });
            }
            self.still_starting(proc, deadline, "it printed no ready line")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Up: `/health` answers with the node's address and the relay lists it online.
    async fn wait_node_listed(
        &mut self,
        proc: &Started,
        node: &NodeEntry,
        relay: &RelayUrl,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let health_url = format!("{}/health", node.http);
        let listing_url = relay.directory(&node.address);
        loop {
            let health = get_json(&self.http, &health_url).await;
            let listed = get_json(&self.http, &listing_url).await;
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
            self.still_starting(proc, deadline, &last)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_nodes_ready_line() {
        let line = r#"{"event":"ready","name":"echo","address":"0x3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29","peer_id":"12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN","http":"http://127.0.0.1:41234","swarm":["/ip4/127.0.0.1/tcp/40001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN","/ip4/127.0.0.1/udp/40002/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"],"relay":{"url":"ws://127.0.0.1:9","state":"connected","since":1},"version":"0.1.0"}"#;
        let ready = Ready::parse(line).expect("a ready line");
        assert_eq!(
            ready.address,
            "0x3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
        );
        assert_eq!(ready.http.as_deref(), Some("http://127.0.0.1:41234"));
        assert_eq!(ready.swarm.len(), 2);
        assert!(primary_swarm(&ready).unwrap().contains("/quic-v1/"));
    }

    #[test]
    fn parses_a_relays_ready_line_and_refuses_other_lines() {
        let line = r#"{"event":"ready","url":"ws://127.0.0.1:9","announce":"ws://127.0.0.1:9/ws/announce","input":"ws://127.0.0.1:9/ws/input","http":"http://127.0.0.1:9"}"#;
        let ready = RelayReady::parse(line).expect("a ready line");
        assert_eq!(ready.url, "ws://127.0.0.1:9");
        assert_eq!(ready.http, "http://127.0.0.1:9");
        assert!(RelayReady::parse(r#"{"event":"stopping"}"#).is_none());
        assert!(RelayReady::parse("relay listening on ws://127.0.0.1:9").is_none());
    }
}
