//! Agents that are programs of their own, in any language: `oonode host --exec CMD`.
//!
//! The node runs the command as a pool of long-lived child processes and speaks JSON Lines
//! with each, one request at a time (docs/agent-protocol.md): a request line on the
//! child's stdin; on its stdout any number of `chunk` lines, any number of `call` lines
//! (each answered with a `call_result` line on stdin), then one `result` or `error` line.
//! An optional first `{"ready": true, …}` line names the agent.
//!
//! Each child is owned by one worker task (an actor) that takes jobs from a shared,
//! bounded queue. A child that exits, writes something that is not the protocol or
//! overruns the turn's timeout fails that turn only: its worker kills it (its whole
//! process group) and starts a new one after a backoff. Its stderr goes to the node's
//! log, line by line, with its pid.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, info, warn, Instrument};

use super::{Agent, AgentError, Message, PeerCall, PeerLink, StreamSink, Turn};
use crate::proto::ErrorCode;

/// The longest line a child may write on stdout (a chunk, a result, a call), checked
/// before it is kept whole: a child cannot make the node buffer more than this.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
/// Longer stderr lines are cut to this in the log (the rest of the line is skipped).
const MAX_STDERR_LINE: usize = 8 * 1024;
/// How long start-up waits for the first child's first line (its ready line) before the
/// node announces itself without it. Agents that print `{"ready": true}` at once start
/// at once; the wait only costs agents that print nothing before their first request.
const READY_WAIT: Duration = Duration::from_secs(2);
/// Per-turn timeout unless configured: from the request to the final line, calls to
/// other agents included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// After stdin is closed, how long a child may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Waits between restarts of a child that keeps failing: doubling from the first to the
/// last, back to the first after a turn that succeeds.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a worker waits for an exited child's status, for the error message.
const EXIT_STATUS_WAIT: Duration = Duration::from_secs(1);
/// Slack the caller gives its worker beyond the turn's deadline, so that the worker,
/// which kills the child, is the one that reports the timeout.
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// How to run an exec agent. `ExecConfig::new("python3 agent.py")` and defaults: one
/// worker, no shell, the node's environment and working directory, a 300 s turn timeout.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExecConfig {
    /// The command: split into words like a shell would (quotes, backslashes), but run
    /// without one unless `shell` is set.
    pub command: String,
    /// Run `command` with `sh -c` (pipes, `&&`, variables).
    pub shell: bool,
    /// Child processes, each answering one request at a time.
    pub workers: usize,
    /// Variables set for the children, on top of the node's own environment.
    pub env: Vec<(String, String)>,
    /// The children's working directory (default: the node's).
    pub cwd: Option<PathBuf>,
    /// From the request to the final line, calls to other agents included.
    pub timeout: Duration,
}

impl ExecConfig {
    pub fn new(command: impl Into<String>) -> Self {
        ExecConfig {
            command: command.into(),
            shell: false,
            workers: 1,
            env: Vec::new(),
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn shell(mut self, on: bool) -> Self {
        self.shell = on;
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }
}

/// Why an exec agent could not start. Once started, failures are per turn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    #[error("the agent command is empty")]
    Empty,
    #[error("cannot split the agent command {0:?} into words (an unclosed quote?)")]
    Unsplittable(String),
    #[error("the agent needs at least 1 worker")]
    NoWorkers,
    #[error("the agent's turn timeout must be at least 1 second")]
    NoTimeout,
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` exited ({status}) before it was ready; its stderr is in the log")]
    ExitedAtStart { command: String, status: String },
    #[error(
        "`{command}` wrote {line:?} on stdout before any request: stdout is for the \
         protocol's JSON lines only (write logs to stderr); {why}"
    )]
    BadFirstLine {
        command: String,
        line: String,
        why: String,
    },
}

/// An agent run by a pool of child processes (see the module doc). Cheap to clone: every
/// clone, and so every request's fresh agent, shares the pool.
#[derive(Clone)]
pub struct ExecAgent {
    shared: Arc<Shared>,
}

struct Shared {
    jobs: mpsc::Sender<Job>,
    meta: Meta,
    timeout: Duration,
    stop: CancellationToken,
    workers: TaskTracker,
}

/// What the ready line says about the agent.
#[derive(Debug, Clone, Default)]
struct Meta {
    name: String,
    summary: Option<String>,
    examples: Vec<String>,
    tools: Vec<String>,
}

impl ExecAgent {
    /// Starts the pool: the first child at once, waiting (up to 2 s) for its ready line
    /// so that the node announces the agent's own name and summary; the others beside.
    /// A command that cannot start at all is an error here, not at the first request.
    pub async fn start(config: ExecConfig) -> Result<ExecAgent, ExecError> {
        if config.workers == 0 {
            return Err(ExecError::NoWorkers);
        }
        if config.timeout < Duration::from_secs(1) {
            return Err(ExecError::NoTimeout);
        }
        let launcher = Arc::new(Launcher::new(&config)?);
        let mut first = launcher.spawn().map_err(|source| ExecError::Spawn {
            command: config.command.clone(),
            source,
        })?;
        let mut meta = Meta {
            name: default_name(&launcher.words),
            ..Meta::default()
        };
        match tokio::time::timeout(READY_WAIT, first.stdout.next_line()).await {
            Err(_) => info!(
                pid = first.pid,
                "the agent printed no ready line within {READY_WAIT:?}; starting without \
                 its name and summary (print {{\"ready\": true, …}} first to give them)"
            ),
            Ok(Ok(Some(line))) => match parse_line(&line, None) {
                Ok(FromAgent::Ready(ready)) => meta.merge(ready),
                Ok(_) => warn!(pid = first.pid, %line, "ignored a line written before any request"),
                Err(why) => {
                    first.kill().await;
                    return Err(ExecError::BadFirstLine {
                        command: config.command,
                        line: excerpt(&line),
                        why,
                    });
                }
            },
            Ok(Ok(None)) => {
                let status = first.exit_status().await;
                return Err(ExecError::ExitedAtStart {
                    command: config.command,
                    status,
                });
            }
            Ok(Err(e)) => {
                first.kill().await;
                return Err(ExecError::BadFirstLine {
                    command: config.command,
                    line: String::new(),
                    why: e.to_string(),
                });
            }
        }
        info!(
            name = %meta.name,
            workers = config.workers,
            command = %config.command,
            "agent processes started"
        );

        // Bounded by the pool: the dispatcher's own limit keeps it from filling anyway.
        let (jobs, queue) = mpsc::channel(config.workers);
        let queue = Arc::new(Mutex::new(queue));
        let stop = CancellationToken::new();
        let workers = TaskTracker::new();
        let alive = Arc::new(AtomicUsize::new(0));
        let mut first = Some(first);
        for n in 0..config.workers {
            let worker = Worker {
                n,
                launcher: launcher.clone(),
                queue: queue.clone(),
                stop: stop.clone(),
                alive: alive.clone(),
                timeout: config.timeout,
            };
            workers.spawn(worker.run(first.take()));
        }
        workers.close();
        Ok(ExecAgent {
            shared: Arc::new(Shared {
                jobs,
                meta,
                timeout: config.timeout,
                stop,
                workers,
            }),
        })
    }

    /// Stops every child: closes its stdin (a well-behaved agent exits at end of input),
    /// kills it (and its process group) if it is still running after 2 s, and waits
    /// for it. A turn still running is failed. Dropping every clone stops them too, the
    /// same way, in the background.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        self.shared.workers.wait().await;
    }
}

#[async_trait]
impl Agent for ExecAgent {
    fn name(&self) -> String {
        self.shared.meta.name.clone()
    }

    fn tools(&self) -> Vec<String> {
        self.shared.meta.tools.clone()
    }

    fn summary(&self) -> Option<String> {
        self.shared.meta.summary.clone()
    }

    fn examples(&self) -> Vec<String> {
        self.shared.meta.examples.clone()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        let timeout = self.shared.timeout;
        let deadline = Instant::now() + timeout;
        let id = uuid::Uuid::new_v4().to_string();
        let request = request_line(&id, &turn)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id,
            request,
            hops: turn.hops,
            peers: turn.peers,
            sink: stream.clone(),
            deadline,
            reply,
        };
        let stopped = || AgentError::from("the agent's processes are stopped");
        match tokio::time::timeout_at(deadline, self.shared.jobs.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => return Err(no_worker(timeout).into()),
        }
        match tokio::time::timeout_at(deadline + DEADLINE_SLACK, answer).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(message))) => Err(message.into()),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(no_worker(timeout).into()),
        }
    }
}

fn no_worker(timeout: Duration) -> String {
    format!(
        "no agent process took the request within {}s (all busy or restarting)",
        timeout.as_secs()
    )
}

/// One request for a worker.
struct Job {
    id: String,
    /// The request, one line of JSON with its newline.
    request: String,
    hops: u32,
    peers: Option<PeerLink>,
    sink: StreamSink,
    deadline: Instant,
    /// The result, or the message of the turn's `agent_error`.
    reply: oneshot::Sender<Result<String, String>>,
}

impl Job {
    fn finish(self, outcome: Result<String, String>) {
        // The caller may have given up (its timeout, a cancelled run): nothing to do.
        let _ = self.reply.send(outcome);
    }
}

/// The request line, as docs/agent-protocol.md describes it.
fn request_line(id: &str, turn: &Turn) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct File<'a> {
        name: &'a str,
        path: String,
        size: u64,
    }
    #[derive(Serialize)]
    struct Request<'a> {
        id: &'a str,
        prompt: &'a str,
        session_id: &'a str,
        messages: &'a [Message],
        files: Vec<File<'a>>,
        caller: Option<String>,
        hops: u32,
    }
    let files = turn
        .files
        .iter()
        .map(|f| File {
            name: &f.name,
            path: f.path.display().to_string(),
            size: f.size,
        })
        .collect();
    let mut line = serde_json::to_string(&Request {
        id,
        prompt: &turn.prompt,
        session_id: &turn.session_id,
        messages: &turn.history,
        files,
        caller: turn.caller.map(|a| a.to_string()),
        hops: turn.hops,
    })?;
    line.push('\n');
    Ok(line)
}

// ---------------------------------------------------------------------------------------
// Starting children

/// The command as words, and how to run it.
struct Launcher {
    command: String,
    /// The command's words (for the default name), as the user wrote them.
    words: Vec<String>,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
}

impl Launcher {
    fn new(config: &ExecConfig) -> Result<Launcher, ExecError> {
        if config.command.trim().is_empty() {
            return Err(ExecError::Empty);
        }
        let words = shlex::split(&config.command)
            .ok_or_else(|| ExecError::Unsplittable(config.command.clone()))?;
        let (program, args) = if config.shell {
            (
                "sh".to_owned(),
                vec!["-c".to_owned(), config.command.clone()],
            )
        } else {
            let (program, args) = words.split_first().ok_or(ExecError::Empty)?;
            (program.clone(), args.to_vec())
        };
        Ok(Launcher {
            command: config.command.clone(),
            words,
            program,
            args,
            env: config.env.clone(),
            cwd: config.cwd.clone(),
        })
    }

    fn spawn(&self) -> std::io::Result<Process> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            // A Python agent that forgets to flush still answers at once.
            .env("PYTHONUNBUFFERED", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: killing it takes whatever it started with it
            // (`sh -c`, a wrapper script), and a Ctrl-C at the terminal reaches the node
            // alone, which then stops its children in order.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = tokio::spawn(log_stderr(stderr, pid).in_current_span());
        debug!(pid, command = %self.command, "started an agent process");
        Ok(Process {
            child,
            pid,
            stdin,
            stdout: LineReader::new(stdout, MAX_LINE_BYTES),
            reaped: false,
            _log: AbortOnDropHandle::new(log),
        })
    }
}

/// The agent's name when its ready line gives none: the file name of the last word that
/// is not an option (`python3 agents/echo.py` → `echo`).
fn default_name(words: &[String]) -> String {
    words
        .iter()
        .rev()
        .find(|w| !w.starts_with('-'))
        .and_then(|w| std::path::Path::new(w).file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// Logs a child's stderr, a line at a time, with its pid.
async fn log_stderr(stderr: tokio::process::ChildStderr, pid: u32) {
    let mut lines = LineReader::new(stderr, MAX_STDERR_LINE);
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => info!(pid, stderr = %line, "agent process"),
            Err(LineError::TooLong(head)) => {
                info!(pid, stderr = %head, "agent process (line cut)");
            }
            Err(LineError::NotUtf8(bytes)) => {
                info!(pid, stderr = %String::from_utf8_lossy(&bytes), "agent process");
            }
            Ok(None) | Err(LineError::Io(_)) => return,
        }
    }
}

/// One running child.
struct Process {
    child: Child,
    pid: u32,
    /// `None` once closed.
    stdin: Option<ChildStdin>,
    stdout: LineReader<ChildStdout>,
    /// Whether `wait` has returned: its pid (and group id) may belong to another
    /// process by now, so it is never signalled again.
    reaped: bool,
    _log: AbortOnDropHandle<()>,
}

impl Process {
    async fn write(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        stdin.write_all(line.as_bytes()).await
    }

    /// Its exit status, waiting a little for it: "exit status: 1", "signal: 9 (SIGKILL)".
    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(EXIT_STATUS_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.reaped = true;
                status.to_string()
            }
            Ok(Err(e)) => format!("status unknown: {e}"),
            Err(_) => "closed its stdout, still running".into(),
        }
    }

    /// Kills its whole process group and reaps it.
    async fn kill(&mut self) {
        self.kill_group();
        if !self.reaped {
            let _ = self.child.wait().await;
            self.reaped = true;
        }
    }

    fn kill_group(&self) {
        if self.reaped || self.pid == 0 {
            return;
        }
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }

    /// Closes its stdin and lets it exit; kills it after [`STOP_GRACE`].
    async fn stop(&mut self) {
        self.stdin = None;
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(_) => self.reaped = true,
            Err(_) => {
                warn!(pid = self.pid, "the agent process did not exit within {STOP_GRACE:?} of its stdin closing; killing it");
                self.kill().await;
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Also when the runtime goes away without a shutdown (kill_on_drop takes the
        // child alone, not what it started).
        self.kill_group();
    }
}

// ---------------------------------------------------------------------------------------
// Workers

/// Owns one child at a time and serves jobs with it.
struct Worker {
    n: usize,
    launcher: Arc<Launcher>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    stop: CancellationToken,
    /// Workers with a running child, over the pool.
    alive: Arc<AtomicUsize>,
    timeout: Duration,
}

/// Why a worker stopped serving with its child.
enum End {
    /// The node stops, or every handle on the pool is gone.
    Stop,
    /// The child is unusable (it exited, broke the protocol, overran a turn).
    Failed,
}

/// How a turn went wrong.
enum Fault {
    /// The agent answered with `{"error": …}`: its child is fine.
    Agent(String),
    /// The child is unusable: the message for the caller, and more for the log.
    Broken { caller: String, log: String },
}

impl Worker {
    async fn run(self, mut first: Option<Process>) {
        let span = tracing::info_span!("exec_worker", n = self.n);
        async move {
            let mut backoff = BACKOFF_FIRST;
            loop {
                let process = match first.take() {
                    Some(p) => Ok(p),
                    None => self.launcher.spawn(),
                };
                let mut process = match process {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(error = %e, command = %self.launcher.command, "cannot start the agent process; retrying in {backoff:?}");
                        let why = format!("the agent program cannot start: {e}");
                        if self.fail_jobs_for(backoff, &why).await.is_err() {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                };
                self.alive.fetch_add(1, Ordering::Relaxed);
                let end = self.serve(&mut process, &mut backoff).await;
                self.alive.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::Stop => {
                        process.stop().await;
                        return;
                    }
                    End::Failed => {
                        process.kill().await;
                        info!(pid = process.pid, "restarting the agent process in {backoff:?}");
                        drop(process);
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// While no child can be started: waits `wait`, failing the jobs that come meanwhile
    /// with `why` when no other worker has a child to serve them. `Err` when stopping.
    async fn fail_jobs_for(&self, wait: Duration, why: &str) -> Result<(), ()> {
        let until = Instant::now() + wait;
        loop {
            if self.alive.load(Ordering::Relaxed) > 0 {
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(()),
                    _ = tokio::time::sleep_until(until) => return Ok(()),
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(()),
                _ = tokio::time::sleep_until(until) => return Ok(()),
                job = next_job(&self.queue) => match job {
                    Some(job) => job.finish(Err(why.to_owned())),
                    None => return Err(()),
                },
            }
        }
    }

    /// Serves jobs with `process` until it fails or the node stops.
    async fn serve(&self, process: &mut Process, backoff: &mut Duration) -> End {
        loop {
            let job = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return End::Stop,
                job = next_job(&self.queue) => match job {
                    Some(job) => job,
                    None => return End::Stop,
                },
                // Between requests a child has nothing to say; reading keeps its exit
                // (or a stray line) from being blamed on the next request.
                line = process.stdout.next_line() => match line {
                    Ok(Some(line)) => {
                        if !matches!(parse_line(&line, None), Ok(FromAgent::Ready(_))) {
                            warn!(pid = process.pid, line = %excerpt(&line), "ignored a line the agent wrote between requests");
                        }
                        continue;
                    }
                    Ok(None) | Err(_) => {
                        let status = process.exit_status().await;
                        warn!(pid = process.pid, %status, "the agent process exited between requests");
                        return End::Failed;
                    }
                },
            };
            // Given up on while it waited: running it now would only be cut short.
            if job.reply.is_closed() || Instant::now() >= job.deadline {
                continue;
            }
            let deadline = job.deadline;
            let outcome = tokio::select! {
                _ = self.stop.cancelled() => {
                    job.finish(Err("the node is shutting down".into()));
                    return End::Stop;
                }
                outcome = tokio::time::timeout_at(deadline, exchange(process, &job)) => outcome,
            };
            match outcome {
                Ok(Ok(result)) => {
                    *backoff = BACKOFF_FIRST;
                    job.finish(Ok(result));
                }
                Ok(Err(Fault::Agent(message))) => job.finish(Err(message)),
                Ok(Err(Fault::Broken { caller, log })) => {
                    warn!(pid = process.pid, "{log}; restarting it");
                    job.finish(Err(caller));
                    return End::Failed;
                }
                Err(_) => {
                    let secs = self.timeout.as_secs();
                    warn!(
                        pid = process.pid,
                        "the agent process did not answer within {secs}s; killing it"
                    );
                    job.finish(Err(format!(
                        "the agent did not answer within its timeout of {secs}s; its process was restarted"
                    )));
                    return End::Failed;
                }
            }
        }
    }
}

/// The next job from the shared queue; `None` once every [`ExecAgent`] is gone.
async fn next_job(queue: &Mutex<mpsc::Receiver<Job>>) -> Option<Job> {
    queue.lock().await.recv().await
}

/// One request and its answer on `process`.
async fn exchange(process: &mut Process, job: &Job) -> Result<String, Fault> {
    let pid = process.pid;
    let broken = |caller: String, log: String| Fault::Broken { caller, log };
    if let Err(e) = process.write(&job.request).await {
        let status = process.exit_status().await;
        return Err(broken(
            format!("the agent program is not running ({status}); it is being restarted"),
            format!("cannot write the request to the agent process ({e}; {status})"),
        ));
    }
    loop {
        let line = match process.stdout.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = process.exit_status().await;
                return Err(broken(
                    format!("the agent program exited ({status}) before it answered; it is being restarted"),
                    format!("the agent process exited ({status}) during a request"),
                ));
            }
            Err(LineError::TooLong(_)) => {
                return Err(broken(
                    format!("the agent program wrote a line over {MAX_LINE_BYTES} bytes; it is being restarted"),
                    format!("the agent process wrote a line over {MAX_LINE_BYTES} bytes"),
                ))
            }
            Err(LineError::NotUtf8(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                return Err(broken(
                    "the agent program wrote a line that is not UTF-8 text; it is being restarted".into(),
                    format!("the agent process wrote a line that is not UTF-8: {}", excerpt(&text)),
                ));
            }
            Err(LineError::Io(e)) => {
                return Err(broken(
                    "the agent program's output could not be read; it is being restarted".into(),
                    format!("reading the agent process's stdout failed: {e}"),
                ))
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line, Some(&job.id)) {
            Ok(FromAgent::Ready(_)) => {}
            Ok(FromAgent::Chunk(chunk)) => job.sink.send(chunk).await,
            Ok(FromAgent::Result(result)) => return Ok(result),
            Ok(FromAgent::Error(message)) => return Err(Fault::Agent(message)),
            Ok(FromAgent::Call(call)) => {
                let reply = call_result(&job.id, call_peer(job, call).await);
                if let Err(e) = process.write(&reply).await {
                    return Err(broken(
                        "the agent program stopped reading its input; it is being restarted".into(),
                        format!("cannot write a call_result to the agent process (pid {pid}): {e}"),
                    ));
                }
            }
            Err(why) => {
                return Err(broken(
                    format!("the agent program broke the protocol ({why}); it is being restarted"),
                    format!(
                        "the agent process broke the protocol ({why}): {}",
                        excerpt(&line)
                    ),
                ))
            }
        }
    }
}

/// A `call` an agent asked for, as `call`'s fields say.
struct CallRequest {
    to: String,
    prompt: String,
    session_id: Option<String>,
}

/// Makes the call through the node: its answer, or a code and a message.
async fn call_peer(
    job: &Job,
    call: CallRequest,
) -> Result<(String, String, &'static str), (ErrorCode, String)> {
    let Some(peers) = &job.peers else {
        return Err((
            ErrorCode::Internal,
            "this agent runs outside a node, which could make the call".into(),
        ));
    };
    let call = PeerCall {
        to: call.to,
        prompt: call.prompt,
        session_id: call.session_id,
        hops: job.hops.saturating_add(1),
    };
    let to = call.to.clone();
    match peers.0.call(call).await {
        Ok(answer) => {
            debug!(to = %to, via = answer.via, "a call for the agent was answered");
            Ok((answer.result, answer.session_id, answer.via))
        }
        Err(failure) => {
            info!(to = %to, code = %failure.code, message = %failure.message, "a call for the agent failed");
            Err((failure.code, failure.message))
        }
    }
}

/// The `call_result` line for request `id`.
fn call_result(
    id: &str,
    outcome: Result<(String, String, &'static str), (ErrorCode, String)>,
) -> String {
    let result = match outcome {
        Ok((result, session_id, via)) => {
            json!({"result": result, "session_id": session_id, "via": via})
        }
        Err((code, message)) => json!({"error": message, "code": code.as_str()}),
    };
    let mut line = json!({"id": id, "call_result": result}).to_string();
    line.push('\n');
    line
}

// ---------------------------------------------------------------------------------------
// What a child writes

/// One line from a child.
enum FromAgent {
    Ready(Map<String, Value>),
    Chunk(String),
    Result(String),
    Error(String),
    Call(CallRequest),
}

/// Reads one line of the protocol. With `expected`, any line but a ready line must carry
/// that request id. `Err` says what is wrong, for the turn's error and the log.
fn parse_line(line: &str, expected: Option<&str>) -> Result<FromAgent, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|_| "a line that is not JSON".to_owned())?;
    let Value::Object(mut obj) = value else {
        return Err("a JSON line that is not an object".into());
    };
    if obj.get("ready") == Some(&Value::Bool(true)) {
        return Ok(FromAgent::Ready(obj));
    }
    match (obj.get("id").and_then(Value::as_str), expected) {
        (Some(id), Some(expected)) if id != expected => {
            return Err(format!(
                "a line for request {id:?} while {expected:?} was asked"
            ))
        }
        (None, _) => return Err("a line without the request's `id`".into()),
        _ => {}
    }
    let text = |v: Value, key: &str| match v {
        Value::String(s) => Ok(s),
        _ => Err(format!("`{key}` must be a string")),
    };
    if let Some(v) = obj.remove("chunk") {
        return text(v, "chunk").map(FromAgent::Chunk);
    }
    if let Some(v) = obj.remove("result") {
        return text(v, "result").map(FromAgent::Result);
    }
    if let Some(v) = obj.remove("error") {
        // An error is reported whatever its shape; a string reads best.
        return Ok(FromAgent::Error(match v {
            Value::String(s) => s,
            other => other.to_string(),
        }));
    }
    if let Some(v) = obj.remove("call") {
        let Value::Object(mut call) = v else {
            return Err("`call` must be an object".into());
        };
        let mut field = |key: &str| match call.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("`call.{key}` must be a string")),
        };
        let to = field("to")?.ok_or("`call.to` is missing")?;
        let prompt = field("prompt")?.ok_or("`call.prompt` is missing")?;
        let session_id = field("session_id")?;
        return Ok(FromAgent::Call(CallRequest {
            to,
            prompt,
            session_id,
        }));
    }
    Err("a line with none of `chunk`, `result`, `error` or `call`".into())
}

impl Meta {
    /// Takes what a ready line says; fields of the wrong type are ignored, with a warning.
    fn merge(&mut self, mut ready: Map<String, Value>) {
        let mut strings = |key: &str| -> Option<Vec<String>> {
            match ready.remove(key)? {
                Value::Array(items) => Some(
                    items
                        .into_iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                ),
                _ => {
                    warn!("the ready line's `{key}` is not a list of strings; ignored");
                    None
                }
            }
        };
        if let Some(v) = strings("examples") {
            self.examples = v;
        }
        if let Some(v) = strings("tools") {
            self.tools = v;
        }
        match ready.remove("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => self.name = s,
            None | Some(Value::Null) => {}
            Some(_) => warn!("the ready line's `name` is not a string; ignored"),
        }
        match ready.remove("summary") {
            Some(Value::String(s)) if !s.trim().is_empty() => self.summary = Some(s),
            None | Some(Value::Null) => {}
            Some(_) => warn!("the ready line's `summary` is not a string; ignored"),
        }
    }
}

/// The start of a line, for logs and errors.
fn excerpt(line: &str) -> String {
    const MAX: usize = 200;
    match line.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Bounded lines

#[derive(Debug, thiserror::Error)]
enum LineError {
    /// The line's first `max` bytes (as text, lossily); the rest is skipped.
    #[error("a line over the limit")]
    TooLong(String),
    #[error("a line that is not UTF-8")]
    NotUtf8(Vec<u8>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads lines of at most `max` bytes: a longer one is an error as soon as `max` bytes
/// have come, and is skipped to its end. Cancel-safe: a partial line is kept for the
/// next call.
struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
    /// Skipping the rest of a line that was too long.
    skipping: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader: BufReader::new(reader),
            buf: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// The next line without its `\n` (or `\r\n`); `None` at the end of the stream.
    async fn next_line(&mut self) -> Result<Option<String>, LineError> {
        loop {
            // One byte over the limit, for the newline.
            let room = (self.max + 1).saturating_sub(self.buf.len()) as u64;
            let n = (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.buf)
                .await?;
            let complete = self.buf.last() == Some(&b'\n');
            if self.skipping {
                self.buf.clear();
                if complete {
                    self.skipping = false;
                } else if n == 0 {
                    return Ok(None);
                }
                continue;
            }
            if complete || (n == 0 && !self.buf.is_empty() && self.buf.len() <= self.max) {
                let mut line = std::mem::take(&mut self.buf);
                if complete {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                return String::from_utf8(line)
                    .map(Some)
                    .map_err(|e| LineError::NotUtf8(e.into_bytes()));
            }
            if self.buf.len() > self.max {
                let head = String::from_utf8_lossy(&self.buf[..self.max]).into_owned();
                self.buf.clear();
                self.skipping = true;
                return Err(LineError::TooLong(head));
            }
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_a_long_one_is_skipped_to_its_end() {
        let input: &[u8] = b"short\r\n0123456789abc\nnext\nlast-without-newline";
        let mut lines = LineReader::new(input, 10);
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("short"));
        match lines.next_line().await {
            Err(LineError::TooLong(head)) => assert_eq!(head, "0123456789"),
            other => panic!("{other:?}"),
        }
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("next"));
        match lines.next_line().await {
            Err(LineError::TooLong(_)) => {}
            other => panic!("a final line over the limit: {other:?}"),
        }
        assert!(lines.next_line().await.unwrap().is_none());

        let exactly: &[u8] = b"0123456789\n0123456789";
        let mut lines = LineReader::new(exactly, 10);
        assert_eq!(lines.next_line().await.unwrap().unwrap().len(), 10);
        assert_eq!(lines.next_line().await.unwrap().unwrap().len(), 10);
        assert!(lines.next_line().await.unwrap().is_none());
    }

    #[test]
    fn protocol_lines_parse_and_mistakes_are_named() {
        let ok = |l: &str| parse_line(l, Some("r1"));
        assert!(matches!(ok(r#"{"id":"r1","chunk":"a"}"#), Ok(FromAgent::Chunk(c)) if c == "a"));
        assert!(matches!(ok(r#"{"id":"r1","result":"b"}"#), Ok(FromAgent::Result(r)) if r == "b"));
        assert!(matches!(ok(r#"{"id":"r1","error":"c"}"#), Ok(FromAgent::Error(e)) if e == "c"));
        assert!(matches!(
            ok(r#"{"ready":true,"name":"x"}"#),
            Ok(FromAgent::Ready(_))
        ));
        match ok(r#"{"id":"r1","call":{"to":"0xab","prompt":"p"}}"#) {
            Ok(FromAgent::Call(c)) => {
                assert_eq!(
                    (c.to.as_str(), c.prompt.as_str(), c.session_id),
                    ("0xab", "p", None)
                )
            }
            _ => panic!("a call"),
        }
        for (line, says) in [
            ("hello", "not JSON"),
            ("[1]", "not an object"),
            (r#"{"chunk":"a"}"#, "without the request's `id`"),
            (r#"{"id":"r2","result":"a"}"#, "\"r2\" while \"r1\""),
            (r#"{"id":"r1","result":3}"#, "`result` must be a string"),
            (
                r#"{"id":"r1","call":{"prompt":"p"}}"#,
                "`call.to` is missing",
            ),
            (r#"{"id":"r1","answer":"a"}"#, "none of"),
        ] {
            let why = ok(line)
                .err()
                .unwrap_or_else(|| panic!("{line} is refused"));
            assert!(why.contains(says), "{line}: {why}");
        }
    }

    #[test]
    fn the_default_name_is_the_scripts() {
        let name = |c: &str| default_name(&shlex::split(c).unwrap());
        assert_eq!(name("python3 agents/echo_agent.py"), "echo_agent");
        assert_eq!(name("./my-agent --verbose"), "my-agent");
        assert_eq!(name("node 'my agent.js'"), "my agent");
    }

    #[test]
    fn a_ready_line_names_the_agent() {
        let mut meta = Meta {
            name: "fallback".into(),
            ..Meta::default()
        };
        let Ok(FromAgent::Ready(ready)) = parse_line(
            r#"{"ready":true,"name":"shout","summary":"I shout","examples":["hi",3],"tools":"x"}"#,
            None,
        ) else {
            panic!("a ready line")
        };
        meta.merge(ready);
        assert_eq!(meta.name, "shout");
        assert_eq!(meta.summary.as_deref(), Some("I shout"));
        assert_eq!(meta.examples, ["hi"]);
        assert!(meta.tools.is_empty());
    }

    #[test]
    fn the_request_line_has_every_field() {
        let mut turn = Turn::new("hello", "s-1");
        turn.history = vec![Message {
            role: "user".into(),
            content: "before".into(),
        }];
        turn.hops = 2;
        let line = request_line("r1", &turn).unwrap();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"id": "r1", "prompt": "hello", "session_id": "s-1",
                   "messages": [{"role": "user", "content": "before"}],
                   "files": [], "caller": null, "hops": 2})
        );
    }
}
