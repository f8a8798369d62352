//! The processes `up` started: is one still alive (and still ours), how much memory it
//! holds, and stopping them. The only /proc reading of the testnet is here.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::state::{load, MARKER};

/// A process `up` started.
#[derive(Debug, Clone)]
pub(super) struct Proc {
    pub name: String,
    pub pid: u32,
    /// Its start time (see [`start_ticks`]); 0 when it could not be read.
    pub start_ticks: u64,
}

impl Proc {
    /// Alive and still the process `up` started (same start time), not a zombie.
    pub fn alive(&self) -> bool {
        match stat(self.pid) {
            Some(s) => !s.dead && (self.start_ticks == 0 || s.start_ticks == self.start_ticks),
            None => false,
        }
    }

    /// Resident memory in KiB while it is alive.
    pub fn rss_kib(&self) -> Option<u64> {
        if !self.alive() {
            return None;
        }
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Sends `signal` to this PID alone (never a group: a PID that does not fit a
    /// positive pid_t is not signalled).
    fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }
}

/// What /proc/PID/stat tells us.
struct Stat {
    /// A zombie (exited, not yet reaped) or dead process.
    dead: bool,
    /// Clock ticks after boot at which it started (field 22): with the PID, it names one
    /// process, whatever later reuses the PID.
    start_ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is the 20th after the name.
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(Stat {
        dead: state == 'Z' || state == 'X',
        start_ticks,
    })
}

/// The start time of `pid`, to record next to it (0 when /proc cannot tell).
pub(super) fn start_ticks(pid: u32) -> u64 {
    stat(pid).map_or(0, |s| s.start_ticks)
}

pub(super) struct StopReport {
    pub stopped: usize,
    pub killed: Vec<String>,
    pub left: Vec<String>,
}

/// SIGTERM to each live process, SIGKILL to those still there after `grace`.
pub(super) fn stop_procs(procs: &[Proc], grace: Duration) -> StopReport {
    let live: Vec<&Proc> = procs.iter().filter(|p| p.alive()).collect();
    for p in &live {
        p.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while live.iter().any(|p| p.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = Vec::new();
    for p in live.iter().filter(|p| p.alive()) {
        p.signal(Signal::SIGKILL);
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

/// `testnet down`: stops the testnet in `dir` and (unless `keep`) removes the directory.
pub(super) fn down(dir: &Path, grace: Duration, keep: bool) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let ticks = start_ticks(pid);
        assert!(ticks > 0, "own /proc entry");
        let me = Proc {
            name: "me".into(),
            pid,
            start_ticks: ticks,
        };
        assert!(me.alive());
        assert!(me.rss_kib().unwrap() > 0);
        let impostor = Proc {
            start_ticks: ticks + 1,
            ..me
        };
        assert!(!impostor.alive());
        assert_eq!(impostor.rss_kib(), None);
    }
}
