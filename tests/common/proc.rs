//! A child process started by a test or a bench, and the `--ready-json` line it prints.
//!
//! Shared by `tests/common` and `benches/common` (the benches include this file by
//! path), so it uses nothing but the crate's own dependencies.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use oonode::Address;
use serde_json::Value;

/// The `oonode` binary Cargo built for these tests and benches.
pub const BIN: &str = env!("CARGO_BIN_EXE_oonode");

/// How long a killed child may take to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(10);

/// Where a child's stderr goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// Straight to ours (tests: shown when a test fails).
    Inherit,
    Null,
    /// Echoed line by line as `[name pid N stderr] …`, and its log lines counted.
    Echo,
    /// As the command already sets it (a file the test reads afterwards).
    AsSet,
}

/// How much of a child's stderr [`Child::kill_and_read_stderr`] keeps; the rest is
/// still echoed.
const MAX_KEPT_STDERR_BYTES: usize = 4 * 1024 * 1024;

/// A child process; killed (SIGKILL, by its own handle) and reaped when dropped, also
/// when the test or bench panics. Its stdout is read line by line on a thread of its
/// own for its whole life, so it never blocks on a full pipe.
pub struct Child {
    name: String,
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log_lines: Arc<AtomicUsize>,
    /// With [`Stderr::Echo`]: what the child wrote there (up to a limit), and the thread
    /// that reads it.
    stderr_kept: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Child {
    /// Starts `cmd` with stdin closed and stdout piped; `name` labels panics and echoes.
    pub fn spawn(name: &str, cmd: &mut Command, stderr: Stderr) -> Child {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match stderr {
            Stderr::Inherit => cmd.stderr(Stdio::inherit()),
            Stderr::Null => cmd.stderr(Stdio::null()),
            Stderr::Echo => cmd.stderr(Stdio::piped()),
            Stderr::AsSet => cmd,
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {name}: {e}"));
        let pid = child.id();
        let log_lines = Arc::new(AtomicUsize::new(0));
        let stderr_kept = Arc::new(Mutex::new(String::new()));
        let stderr_reader = child.stderr.take().map(|err| {
            let (label, count) = (format!("[{name} pid {pid} stderr]"), log_lines.clone());
            let kept = stderr_kept.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if is_log_line(&line) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut kept = kept.lock().unwrap();
                    if kept.len() + line.len() < MAX_KEPT_STDERR_BYTES {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                    drop(kept);
                    eprintln!("{label} {line}");
                }
            })
        });
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The receiver may be gone; keep draining regardless.
                let _ = tx.send(line);
            }
        });
        Child {
            name: name.to_owned(),
            child,
            lines,
            log_lines,
            stderr_kept,
            stderr_reader,
        }
    }

    /// kill -9, then everything the child wrote to stderr (with [`Stderr::Echo`]; empty
    /// otherwise), read to its end.
    pub fn kill_and_read_stderr(&mut self) -> String {
        self.kill9();
        if let Some(reader) = self.stderr_reader.take() {
            // The child is gone, so its stderr has reached its end.
            reader.join().expect("the stderr reader does not panic");
        }
        self.stderr_kept.lock().unwrap().clone()
    }

    /// The stdout lines the child printed since the last look (the ready line excluded,
    /// once read), without waiting.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines (tracing events) seen on stderr so far, with [`Stderr::Echo`]; the
    /// banner that `--ready-json` sends to stderr does not count.
    pub fn log_lines(&self) -> usize {
        self.log_lines.load(Ordering::Relaxed)
    }

    /// The child's `{"event":"ready",…}` line, waiting (blocking) up to `limit`.
    pub fn ready(&self, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(ready) = ready_line(&line) {
                        return ready;
                    }
                }
                Err(e) => self.no_ready_line(limit, e),
            }
        }
    }

    /// [`Child::ready`] for async code: polls, so the runtime's threads stay free.
    pub async fn ready_async(&self, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            loop {
                match self.lines.try_recv() {
                    Ok(line) => {
                        if let Some(ready) = ready_line(&line) {
                            return ready;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.no_ready_line(limit, mpsc::RecvTimeoutError::Disconnected)
                    }
                }
            }
            if Instant::now() >= deadline {
                self.no_ready_line(limit, mpsc::RecvTimeoutError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn no_ready_line(&self, limit: Duration, e: mpsc::RecvTimeoutError) -> ! {
        let (name, pid) = (&self.name, self.pid());
        match e {
            mpsc::RecvTimeoutError::Timeout => {
                panic!("the {name} (pid {pid}) printed no ready line within {limit:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => panic!(
                "the {name} (pid {pid}) closed its stdout without a ready line (see its stderr)"
            ),
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// kill -9, then reap it (bounded).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + REAP_LIMIT;
        while self.try_wait().is_none() {
            assert!(
                Instant::now() < deadline,
                "the {} (pid {}) was not reaped within {REAP_LIMIT:?} of kill -9",
                self.name,
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `line` as JSON, if it is an object with `"event":"ready"`.
fn ready_line(line: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["event"] == "ready").then_some(v)
}

/// A tracing event as `oonode` writes it without colours: `<time>  WARN target: …`.
fn is_log_line(line: &str) -> bool {
    matches!(
        line.split_whitespace().nth(1),
        Some("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
    )
}

/// What `oonode host --ready-json` says about the node it started.
pub struct NodeReady {
    pub address: Address,
    /// `http://127.0.0.1:PORT` (as bound), `None` with HTTP off.
    pub http: Option<String>,
    /// The swarm's listen multiaddrs, each ending in `/p2p/<PeerId>`.
    pub swarm: Vec<Multiaddr>,
}

impl NodeReady {
    pub fn parse(ready: &Value) -> NodeReady {
        let ready: oonode::Ready = serde_json::from_value(ready.clone())
            .unwrap_or_else(|e| panic!("not a node's ready line ({e}): {ready}"));
        NodeReady {
            address: ready
                .address
                .parse()
                .unwrap_or_else(|e| panic!("no valid address in the ready line: {e}")),
            swarm: ready
                .swarm
                .iter()
                .map(|a| {
                    a.parse()
                        .unwrap_or_else(|_| panic!("{a} is not a multiaddr"))
                })
                .collect(),
            http: ready.http,
        }
    }
}
