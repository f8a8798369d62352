//! `DIR/testnet.json`: what `up` started, for the other commands and for scripts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use super::procs::Proc;

/// The file that lists what `up` started.
pub(super) const STATE_FILE: &str = "testnet.json";
/// A file that marks a directory as made by `testnet up` (so `up` and `down` only ever
/// wipe a directory of their own).
pub(super) const MARKER: &str = ".made-by-oonode-testnet";

/// `DIR/testnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TestnetState {
    pub dir: PathBuf,
    /// The binary every process runs.
    pub binary: PathBuf,
    /// Unix time `up` began.
    pub started_at: u64,
    /// Milliseconds from `up` starting to every process being ready (0 while starting).
    pub ready_ms: u64,
    /// The first relay (the only one unless `up --relays M`).
    pub relay: Option<RelayEntry>,
    /// Relays 1 to M-1 of `up --relays M`: federated with the first through the swarm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_relays: Vec<RelayEntry>,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RelayEntry {
    /// `relay`, `relay-1`, …: its name in `logs` and in messages.
    #[serde(default = "first_relay")]
    pub name: String,
    pub pid: u32,
    /// The process's start time (clock ticks after boot, /proc/PID/stat field 22): a PID
    /// with another start time is someone else's.
    pub start_ticks: u64,
    /// `ws://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` (its `/health` and directory), from its ready line; empty
    /// until then, and in a state written before this field existed.
    #[serde(default)]
    pub http: String,
    /// Its swarm address (`…/p2p/<PeerId>`) when relays federate; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub swarm: String,
    pub log: PathBuf,
}

fn first_relay() -> String {
    "relay".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct NodeEntry {
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
    /// The relay it announces on first (index into [`TestnetState::relays`]); the
    /// others are its fallbacks, in turn.
    #[serde(default)]
    pub relay: usize,
}

impl TestnetState {
    /// Every process `up` started: the nodes, then the relays.
    pub fn procs(&self) -> Vec<Proc> {
        let mut procs: Vec<Proc> = self.nodes.iter().map(NodeEntry::proc).collect();
        procs.extend(self.relays().into_iter().map(RelayEntry::proc));
        procs
    }

    /// Every relay, the first one first.
    pub fn relays(&self) -> Vec<&RelayEntry> {
        self.relay.iter().chain(&self.more_relays).collect()
    }

    pub fn node(&self, index: usize) -> anyhow::Result<&NodeEntry> {
        self.nodes.get(index).ok_or_else(|| {
            anyhow!(
                "no node {index}: this testnet has nodes 0 to {}",
                self.nodes.len().saturating_sub(1)
            )
        })
    }
}

impl NodeEntry {
    pub fn proc(&self) -> Proc {
        Proc {
            name: format!("node {}", self.index),
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }
}

impl RelayEntry {
    pub fn proc(&self) -> Proc {
        Proc {
            name: self.name.clone(),
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }
}

/// Reads `DIR/testnet.json`.
pub(super) fn load(dir: &Path) -> anyhow::Result<TestnetState> {
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
pub(super) fn save(state: &TestnetState) -> anyhow::Result<()> {
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

/// The table `up` prints.
pub(super) fn table(state: &TestnetState) -> String {
    let mut out = String::new();
    for r in state.relays() {
        out.push_str(&format!("{:<7}  {}  (PID {})\n", r.name, r.url, r.pid));
    }
    let http_w = state
        .nodes
        .iter()
        .map(|n| n.http.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "{:>3}  {:<10}  {:<66}  {:<http_w$}  {:<5}  p2p\n",
        "#", "agent", "address", "http", "relay"
    ));
    for n in &state.nodes {
        out.push_str(&format!(
            "{:>3}  {:<10}  {:<66}  {:<http_w$}  {:<5}  {}\n",
            n.index, n.agent, n.address, n.http, n.relay, n.p2p
        ));
    }
    out
}
