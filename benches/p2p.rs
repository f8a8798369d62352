//! Call latency over the libp2p swarm on loopback, QUIC vs TCP: `cargo bench --bench p2p`.
//!
//! For each transport it starts the real binary as a child, listening on that transport
//! only and on 127.0.0.1 only (`RUST_LOG=warn`):
//!
//!     oonode host --agent echo --no-http --no-relay --co-dir <tempdir>
//!       --listen /ip4/127.0.0.1/udp/0/quic-v1   (or /ip4/127.0.0.1/tcp/0)
//!       --workers 32 --max-queue 4096
//!
//! (with `--ready-json`) and reads its address and its full listen multiaddr
//! (`…/p2p/<PeerId>`) from the ready line. This process is the caller: a swarm of its own,
//! `P2p::spawn(Keypair::generate_ed25519(), P2pConfig::caller(vec![addr]), token)`, on a
//! multi-threaded tokio runtime, and one caller `Identity` for every call.
//!
//! Sequential modes (50 warm-up, then N measured, one at a time):
//! - `call`: a new handle per call, made before the timer (so every call is a new
//!   session and the same work for the node): `oonode::connect(address,
//!   ConnectOptions::default().swarm(caller).via(Via::P2p))`, the swarm path only,
//!   without auto mode's probing of direct endpoints. Then the timed
//!   `remote.input("x")`: open a stream, sign and send the INPUT, read and verify the
//!   STREAM and OUTPUT frames (signature, sender, recipient, session, freshness). The
//!   node checks the signature and replay, persists the session in sled (durable
//!   writes, group-committed flushes), runs the echo agent and signs both replies. The
//!   answer must be `"x"`.
//! - `open`: the timed `caller.open(address)` alone (the swarm's connect check, then a
//!   new stream with multistream-select negotiation of `/oonode/envelope/1`); the
//!   stream is then closed, untimed, and the node reads EOF before any INPUT.
//! - `bare-rr`: a 1-byte request-response without oonode's protocol: two plain swarms
//!   built here from the same transport stack as oonode's (TCP with nodelay + noise +
//!   yamux, or QUIC) and `libp2p_stream` alone, both in this process (the server on a
//!   runtime and threads of its own). Timed: open a stream, write 1 byte, read the 1
//!   byte echoed back.
//! - `bare-open`: the timed `open_stream` alone on those plain swarms.
//!
//! Concurrency: 32 callers, each calling back to back (`call` as above) for 1 s of
//! warm-up (not counted) and 5 s measured. Two variants: all 32 share the one caller
//! swarm (one connection, 32 streams at once), and 32 caller swarms (32 peers, one
//! connection each).
//!
//! Reported: p50/p90/p99/max/mean in ms, calls/s (sequential: 1000 / mean; concurrent:
//! calls completed in the window / window), p50 of the first and last 100 calls (drift),
//! and per call: the CPU time (utime+stime from /proc, 10 ms ticks, so ±10 µs at N=1000)
//! and context switches (voluntary + involuntary, summed over the threads alive at the
//! end) of the node and of this process, and the CPU every other process on the machine
//! used meanwhile (`others %`, from /proc/stat; 100 = one core). For the bare modes the
//! node is idle and this process holds both ends.
//!
//! Afterwards it times ed25519 signing of an INPUT and verifying an OUTPUT-shaped
//! envelope in this process, and groups the concurrent runs' failures by message.
//!
//! Every call has a 10 s timeout; a sequential mode stops after 10 failures; a
//! concurrent run counts its failures (printing the first 20) and goes on. Only
//! 127.0.0.1 is contacted. The node is killed (by PID, `Child::kill`) when its transport
//! is done, also on panic. Linux only (reads /proc).
//!
//! Options (environment variables):
//! - `OONODE_BENCH_N`: measured calls per sequential mode (default 1000).
//! - `OONODE_BENCH_SECS`: measured seconds per concurrent run (default 5).
//! - `OONODE_BENCH_CALLERS`: concurrent callers (default 32).
//! - `OONODE_BENCH_NODE_LOG`: the nodes' `RUST_LOG` (default `warn`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use oonode::{Address, ConnectOptions, Envelope, Identity, Kind, P2p, P2pConfig, Via};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

const PROMPT: &str = "x";
const WARMUP: usize = 50;
const CONC_WARMUP: Duration = Duration::from_secs(1);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A sequential mode stops after this many failed calls.
const MAX_ERRORS: usize = 10;
/// Calls in the "first" and "last" windows used to show drift.
const EDGE: usize = 100;
/// The node's `--workers` (at least the number of concurrent callers) and `--max-queue`.
const MAX_QUEUE: usize = 4096;
const BARE_PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode-bench/echo-byte/1");

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TCP",
        }
    }

    fn listen(self) -> &'static str {
        match self {
            Transport::Quic => "/ip4/127.0.0.1/udp/0/quic-v1",
            Transport::Tcp => "/ip4/127.0.0.1/tcp/0",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Call,
    Open,
    BareRr,
    BareOpen,
}

const MODES: [Mode; 4] = [Mode::Call, Mode::Open, Mode::BareRr, Mode::BareOpen];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Call => "call",
            Mode::Open => "open",
            Mode::BareRr => "bare-rr",
            Mode::BareOpen => "bare-open",
        }
    }

    fn bare(self) -> bool {
        matches!(self, Mode::BareRr | Mode::BareOpen)
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let n: usize = env_num("OONODE_BENCH_N", 1000);
    let secs: f64 = env_num("OONODE_BENCH_SECS", 5.0);
    let callers: usize = env_num("OONODE_BENCH_CALLERS", 32);
    assert!(
        n > 0 && callers > 0 && secs > 0.0,
        "N, SECS and CALLERS must be positive"
    );
    let load_before = loadavg();
    eprintln!(
        "oonode p2p bench: binary {}, N={n} (+{WARMUP} warm-up) per mode, {callers} callers for {secs} s (+{} s warm-up), load average {load_before}",
        env!("CARGO_BIN_EXE_oonode"),
        CONC_WARMUP.as_secs()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");

    let mut seq = Vec::new();
    let mut conc = Vec::new();
    let mut stderr_lines = Vec::new();
    for transport in [Transport::Quic, Transport::Tcp] {
        let (s, c, lines) = rt.block_on(bench_transport(
            transport,
            n,
            callers,
            Duration::from_secs_f64(secs),
        ));
        seq.extend(s);
        conc.extend(c);
        stderr_lines.push((transport, lines));
    }
    let load_after = loadavg();
    let crypto = crypto_costs();

    println!();
    println!("| transport | mode | ok | errors | p50 ms | p90 ms | p99 ms | max ms | mean ms | calls/s | p50 first {EDGE} | p50 last {EDGE} | node µs/call | caller µs/call | node cs/call | caller cs/call | others % |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &seq {
        let node = |v: f64| {
            if r.mode.bare() {
                "–".to_string()
            } else {
                format!("{v:.0}")
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {:.1} | {:.0} |",
            r.transport.label(),
            r.mode.label(),
            r.lat.len(),
            r.errors,
            latency_cells(&r.lat, EDGE),
            node(r.usage.node_us),
            r.usage.caller_us,
            node(r.usage.node_cs),
            r.usage.caller_cs,
            r.usage.others_pct,
        );
    }
    println!();
    println!("| transport | callers | caller swarms | calls | errors | calls/s | p50 ms | p99 ms | max ms | node µs/call | caller µs/call | node cs/call | caller cs/call | others % |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &conc {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
            r.transport.label(),
            r.callers,
            r.swarms,
            r.in_window,
            r.errors,
            r.in_window as f64 / r.secs,
            pct(&r.lat, 0.50),
            pct(&r.lat, 0.99),
            pct(&r.lat, 1.0),
            r.usage.node_us,
            r.usage.caller_us,
            r.usage.node_cs,
            r.usage.caller_cs,
            r.usage.others_pct,
        );
    }
    println!();
    for r in &conc {
        for (kind, count) in &r.failures {
            println!(
                "{} {}×{} failures: {count} × {kind}",
                r.transport.label(),
                r.callers,
                r.swarms
            );
        }
    }
    for t in [Transport::Quic, Transport::Tcp] {
        let p50 = |m: Mode| {
            seq.iter()
                .find(|r| r.transport == t && r.mode == m)
                .map_or(f64::NAN, |r| pct(&r.lat, 0.5))
        };
        println!(
            "{}: stream open is {:.0}% of the call's p50 ({:.3} of {:.3} ms); the bare 1-byte round trip is {:.0}% of it ({:.3} ms)",
            t.label(),
            100.0 * p50(Mode::Open) / p50(Mode::Call),
            p50(Mode::Open),
            p50(Mode::Call),
            100.0 * p50(Mode::BareRr) / p50(Mode::Call),
            p50(Mode::BareRr),
        );
    }
    println!(
        "ed25519 on this machine ({CRYPTO_REPS} reps, one thread): sign an INPUT {:.1} µs, verify an OUTPUT-shaped envelope {:.1} µs (a call: the caller signs 1 and verifies 2, the node verifies 1 and signs 2)",
        crypto.0, crypto.1
    );
    for (t, lines) in &stderr_lines {
        println!(
            "log lines on the {} node's stderr (RUST_LOG=warn): {lines} (printed above, prefixed, after its banner)",
            t.label()
        );
    }
    println!("load average: before {load_before}; after {load_after}");
    println!(
        "(sequential calls/s = 1000 / mean ms; CPU µs and context switches (cs) per call over \
         the measured calls, untimed work included (handle creation, closing streams); in the \
         bare modes this process holds both ends and the node is idle; others %: CPU of every \
         other process on the machine meanwhile, 100 = one core, {} cores here)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

struct SeqResult {
    transport: Transport,
    mode: Mode,
    /// Measured round trips in ns, in the order they were made.
    lat: Vec<u64>,
    errors: usize,
    usage: Usage,
}

struct ConcResult {
    transport: Transport,
    callers: usize,
    swarms: usize,
    /// Latencies of the calls started after the warm-up.
    lat: Vec<u64>,
    /// Calls completed within the measured window.
    in_window: usize,
    /// Failed calls, warm-up included.
    errors: usize,
    /// Failed calls by message (digits masked).
    failures: BTreeMap<String, usize>,
    secs: f64,
    usage: Usage,
}

/// Per call: CPU µs and context switches of the node and of this process.
#[derive(Default)]
struct Usage {
    node_us: f64,
    caller_us: f64,
    node_cs: f64,
    caller_cs: f64,
    /// CPU used by every other process on the machine meanwhile (100 = one core).
    others_pct: f64,
}

/// Starts a node listening on `transport` only; returns it with its address and its
/// full listen multiaddr, both read from its ready line, and its co_dir.
fn start_node(
    transport: Transport,
    workers: usize,
) -> (Child, Address, Multiaddr, tempfile::TempDir) {
    let dir = co_dir("oonode-p2p-bench-");
    let (workers, max_queue) = (workers.to_string(), MAX_QUEUE.to_string());
    let log = std::env::var("OONODE_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into());
    let (node, ready) = start_echo_node(
        &format!("{} node", transport.label()),
        dir.path(),
        false,
        &[
            "--no-relay",
            "--listen",
            transport.listen(),
            "--workers",
            &workers,
            "--max-queue",
            &max_queue,
        ],
        &log,
        STARTUP_TIMEOUT,
    );
    let addr = ready.swarm.into_iter().next().unwrap_or_else(|| {
        panic!(
            "the {} node (pid {}) lists no swarm address",
            transport.label(),
            node.pid()
        )
    });
    (node, ready.address, addr, dir)
}

const CRYPTO_REPS: u32 = 2000;

/// µs to sign an INPUT like `connect()` does, and to verify an OUTPUT-shaped envelope
/// (canonical JSON of the payload + `verify_strict`).
fn crypto_costs() -> (f64, f64) {
    let caller = Identity::generate();
    let node = Identity::generate();
    let sid = "00000000-0000-4000-8000-000000000000";
    let input = |who: &Identity| {
        let mut payload = Map::new();
        payload.insert("prompt".into(), json!(PROMPT));
        payload.insert("session".into(), json!({ "session_id": sid }));
        Envelope::sign(who, Kind::Input, Some(node.address()), payload)
    };
    let t = Instant::now();
    for _ in 0..CRYPTO_REPS {
        std::hint::black_box(input(&caller));
    }
    let sign = t.elapsed().as_secs_f64() * 1e6 / f64::from(CRYPTO_REPS);
    let mut payload = Map::new();
    payload.insert("result".into(), json!(PROMPT));
    payload.insert("session_id".into(), json!(sid));
    payload.insert(
        "in_reply_to".into(),
        json!(input(&caller).id().unwrap_or("")),
    );
    payload.insert("chunks".into(), json!(1));
    payload.insert("duration_ms".into(), json!(0));
    let messages: Vec<Value> = ["user", "assistant"]
        .iter()
        .map(|r| json!({ "role": r, "content": PROMPT }))
        .collect();
    payload.insert(
        "session".into(),
        json!({ "session_id": sid, "messages": messages }),
    );
    let output = Envelope::sign(&node, Kind::Output, Some(caller.address()), payload);
    let t = Instant::now();
    for _ in 0..CRYPTO_REPS {
        std::hint::black_box(&output)
            .verify()
            .expect("the sample verifies");
    }
    let verify = t.elapsed().as_secs_f64() * 1e6 / f64::from(CRYPTO_REPS);
    (sign, verify)
}

/// An error message with its numbers (stream ids, counts) masked, to group failures.
fn failure_kind(e: &str) -> String {
    let masked: String = e
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    // Stream ids such as `27e13d0e/637:` become `#`.
    let word = |w: &str| {
        let id = w.contains('#')
            && w.chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, '#' | '/' | ':'));
        if id {
            "#".to_owned()
        } else {
            w.to_owned()
        }
    };
    masked
        .split_whitespace()
        .map(word)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU ticks and context switches of the node and of this process.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    node_cpu: u64,
    self_cpu: u64,
    node_cs: u64,
    self_cs: u64,
    /// Busy ticks of the whole machine (all cores).
    sys_busy: u64,
}

fn sample(node_pid: u32) -> Sample {
    let pid = node_pid.to_string();
    Sample {
        at: Instant::now(),
        node_cpu: cpu_total(&pid),
        self_cpu: cpu_total("self"),
        node_cs: ctx_switches(&pid),
        self_cs: ctx_switches("self"),
        sys_busy: SysTicks::now().busy(),
    }
}

fn usage(a: Sample, b: Sample, calls: usize) -> Usage {
    let wall = (b.at - a.at).as_secs_f64().max(1e-9);
    let ours = b.node_cpu.saturating_sub(a.node_cpu) + b.self_cpu.saturating_sub(a.self_cpu);
    let others = b.sys_busy.saturating_sub(a.sys_busy).saturating_sub(ours);
    let others_pct = 100.0 * others as f64 / clock_ticks() / wall;
    if calls == 0 {
        return Usage {
            node_us: f64::NAN,
            caller_us: f64::NAN,
            node_cs: f64::NAN,
            caller_cs: f64::NAN,
            others_pct,
        };
    }
    let n = calls as f64;
    let us = |x: u64, y: u64| y.saturating_sub(x) as f64 * 1e6 / clock_ticks() / n;
    Usage {
        node_us: us(a.node_cpu, b.node_cpu),
        caller_us: us(a.self_cpu, b.self_cpu),
        node_cs: b.node_cs.saturating_sub(a.node_cs) as f64 / n,
        caller_cs: b.self_cs.saturating_sub(a.self_cs) as f64 / n,
        others_pct,
    }
}

/// Builds a plain swarm with oonode's transport stack and `libp2p_stream` alone.
fn bare_swarm() -> libp2p::Swarm<libp2p_stream::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("cannot build the TCP transport")
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("cannot build the behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// The bare echo server: its own runtime and threads, echoing one byte per stream.
struct BareServer {
    peer: PeerId,
    addr: Multiaddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareServer {
    fn start(transport: Transport) -> BareServer {
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel();
        let token = stop.clone();
        let listen: Multiaddr = transport.listen().parse().expect("valid multiaddr");
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("cannot build the server runtime");
            rt.block_on(async move {
                let mut swarm = bare_swarm();
                let peer = *swarm.local_peer_id();
                let mut incoming = swarm
                    .behaviour()
                    .new_control()
                    .accept(BARE_PROTOCOL)
                    .expect("the protocol is not served yet");
                swarm.listen_on(listen).expect("cannot listen");
                tokio::spawn(async move {
                    while let Some((_, mut s)) = incoming.next().await {
                        tokio::spawn(async move {
                            let mut b = [0u8; 1];
                            if s.read_exact(&mut b).await.is_ok() {
                                let _ = s.write_all(&b).await;
                                let _ = s.close().await;
                            }
                        });
                    }
                });
                let mut tx = Some(tx);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        event = swarm.select_next_some() => {
                            if let SwarmEvent::NewListenAddr { address, .. } = event {
                                if let Some(tx) = tx.take() {
                                    let _ = tx.send((peer, address));
                                }
                            }
                        }
                    }
                }
            });
        });
        let (peer, addr) = rx
            .recv_timeout(STARTUP_TIMEOUT)
            .expect("the bare server did not start listening");
        BareServer {
            peer,
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bare client swarm, connected to the server; stopped on drop.
struct BareClient {
    control: libp2p_stream::Control,
    server: PeerId,
    _stop: tokio_util::sync::DropGuard,
}

async fn bare_client(server: &BareServer) -> BareClient {
    let mut swarm = bare_swarm();
    let control = swarm.behaviour().new_control();
    swarm
        .dial(server.addr.clone().with(Protocol::P2p(server.peer)))
        .expect("cannot dial the bare server");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Err(error.to_string()));
                        }
                    }
                    _ => {}
                },
            }
        }
    });
    match tokio::time::timeout(STARTUP_TIMEOUT, rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("cannot connect to the bare server: {e}"),
        _ => panic!("no connection to the bare server within {STARTUP_TIMEOUT:?}"),
    }
    BareClient {
        control,
        server: server.peer,
        _stop: stop.drop_guard(),
    }
}

/// A caller swarm joined through `addr`, once connected to the node.
async fn caller_swarm(addr: &Multiaddr) -> (P2p, tokio_util::sync::DropGuard) {
    let stop = CancellationToken::new();
    let p2p = P2p::spawn(
        libp2p::identity::Keypair::generate_ed25519(),
        P2pConfig::caller(vec![addr.clone()]),
        stop.clone(),
    )
    .await
    .expect("cannot start a caller swarm");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while p2p.status().connected_peers == 0 {
        if Instant::now() > deadline {
            panic!("the caller swarm did not connect to {addr} within {STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (p2p, stop.drop_guard())
}

struct Ctx {
    transport: Transport,
    node_pid: u32,
    address: Address,
    caller: P2p,
    identity: Identity,
}

impl Ctx {
    /// One `remote.input("x")` through `swarm` on a new handle; the clock covers the
    /// call only.
    async fn call(&self, swarm: &P2p) -> Result<Duration, String> {
        let options = ConnectOptions::default()
            .swarm(swarm.clone())
            .via(Via::P2p)
            .identity(self.identity.clone())
            .reply_timeout(REQUEST_TIMEOUT);
        let mut remote = oonode::connect(&self.address.to_string(), options)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let t0 = Instant::now();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, remote.input(PROMPT)).await;
        let elapsed = t0.elapsed();
        let answer = answer
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("input: {e}"))?;
        if answer.result != PROMPT {
            return Err(format!("unexpected result {:?}", answer.result));
        }
        Ok(elapsed)
    }

    async fn one(&self, mode: Mode, bare: Option<&BareClient>) -> Result<Duration, String> {
        match mode {
            Mode::Call => self.call(&self.caller).await,
            Mode::Open => {
                let t0 = Instant::now();
                let stream =
                    tokio::time::timeout(REQUEST_TIMEOUT, self.caller.open(self.address)).await;
                let elapsed = t0.elapsed();
                let mut stream = stream
                    .map_err(|_| format!("no stream within {REQUEST_TIMEOUT:?}"))?
                    .map_err(|e| format!("open: {e}"))?;
                let _ = stream.close().await;
                Ok(elapsed)
            }
            Mode::BareRr | Mode::BareOpen => {
                let bare = bare.expect("the bare swarms run");
                let mut control = bare.control.clone();
                let t0 = Instant::now();
                let round_trip = async {
                    let mut s = control
                        .open_stream(bare.server, BARE_PROTOCOL)
                        .await
                        .map_err(|e| format!("open_stream: {e}"))?;
                    if mode == Mode::BareRr {
                        s.write_all(b"x").await.map_err(|e| format!("write: {e}"))?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)
                            .await
                            .map_err(|e| format!("read: {e}"))?;
                        if &b != b"x" {
                            return Err(format!("echoed {b:?}"));
                        }
                    }
                    Ok::<_, String>((t0.elapsed(), s))
                };
                let (elapsed, mut s) =
                    tokio::time::timeout(REQUEST_TIMEOUT, round_trip)
                        .await
                        .map_err(|_| format!("no round trip within {REQUEST_TIMEOUT:?}"))??;
                let _ = s.close().await;
                Ok(elapsed)
            }
        }
    }

    async fn run(&self, mode: Mode, n: usize, bare: Option<&BareClient>) -> SeqResult {
        eprintln!(
            "--- {} {}: {WARMUP} warm-up + {n} measured",
            self.transport.label(),
            mode.label()
        );
        let mut lat = Vec::with_capacity(n);
        let mut errors = 0;
        let mut before = None;
        let mut i = 0;
        while i < WARMUP + n && errors < MAX_ERRORS {
            if i == WARMUP {
                before = Some(sample(self.node_pid));
            }
            let outcome = self.one(mode, bare).await;
            i += 1;
            match outcome {
                Ok(d) if i > WARMUP => lat.push(d.as_nanos() as u64),
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    eprintln!(
                        "FAILED {} {} #{i}: {e}",
                        self.transport.label(),
                        mode.label()
                    );
                }
            }
        }
        if errors >= MAX_ERRORS {
            eprintln!("{}: stopped after {errors} failures", mode.label());
        }
        let after = sample(self.node_pid);
        let usage = match before {
            Some(b) => usage(b, after, lat.len()),
            None => usage(after, after, 0),
        };
        SeqResult {
            transport: self.transport,
            mode,
            lat,
            errors,
            usage,
        }
    }

    /// `callers` tasks calling back to back, over the shared caller swarm or one swarm
    /// each.
    async fn concurrent(
        self: &Arc<Self>,
        callers: usize,
        own_swarms: bool,
        addr: &Multiaddr,
        measured: Duration,
    ) -> ConcResult {
        let swarms = if own_swarms {
            let mut v = Vec::with_capacity(callers);
            for _ in 0..callers {
                v.push(caller_swarm(addr).await);
            }
            v.into_iter().map(|(p, g)| (p, Some(g))).collect::<Vec<_>>()
        } else {
            vec![(self.caller.clone(), None)]
        };
        eprintln!(
            "--- {} concurrent: {callers} callers over {} caller swarm(s), {CONC_WARMUP:?} warm-up + {measured:?}",
            self.transport.label(),
            swarms.len()
        );
        let errors = Arc::new(AtomicUsize::new(0));
        let kinds: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let start = Instant::now();
        let warm_end = start + CONC_WARMUP;
        let end = warm_end + measured;
        let pid = self.node_pid;
        let sampler = sample_window(warm_end, end, move || sample(pid));
        let mut tasks = Vec::with_capacity(callers);
        for c in 0..callers {
            let swarm = swarms[c % swarms.len()].0.clone();
            let (ctx, errors, kinds) = (self.clone(), errors.clone(), kinds.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut in_window = 0usize;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    match ctx.call(&swarm).await {
                        Ok(d) => {
                            let done = Instant::now();
                            if t0 >= warm_end {
                                lat.push(d.as_nanos() as u64);
                            }
                            if done > warm_end && done <= end {
                                in_window += 1;
                            }
                        }
                        Err(e) => {
                            *kinds.lock().unwrap().entry(failure_kind(&e)).or_default() += 1;
                            note_failure(&errors, || {
                                format!(
                                    "FAILED {} concurrent call (caller {c}): {e}",
                                    ctx.transport.label()
                                )
                            });
                        }
                    }
                }
                (lat, in_window)
            }));
        }
        let mut lat = Vec::new();
        let mut in_window = 0;
        for t in tasks {
            let (l, w) = t.await.expect("a caller task panicked");
            lat.extend(l);
            in_window += w;
        }
        let (a, b) = sampler.await.expect("the sampler panicked");
        let errors = errors.load(Ordering::Relaxed);
        let failures = std::mem::take(&mut *kinds.lock().unwrap());
        ConcResult {
            transport: self.transport,
            callers,
            swarms: swarms.len(),
            usage: usage(a, b, in_window),
            lat,
            in_window,
            errors,
            failures,
            secs: measured.as_secs_f64(),
        }
    }
}

async fn bench_transport(
    transport: Transport,
    n: usize,
    callers: usize,
    measured: Duration,
) -> (Vec<SeqResult>, Vec<ConcResult>, usize) {
    eprintln!("=== {}: starting the node", transport.label());
    let (node, address, addr, dir) = start_node(transport, callers);
    eprintln!(
        "{} node pid {} at {addr}, address {address}",
        transport.label(),
        node.pid()
    );
    let (caller, _caller_guard) = caller_swarm(&addr).await;
    let ctx = Arc::new(Ctx {
        transport,
        node_pid: node.pid(),
        address,
        caller,
        identity: Identity::generate(),
    });
    let mut seq = Vec::new();
    for mode in MODES.into_iter().filter(|m| !m.bare()) {
        seq.push(ctx.run(mode, n, None).await);
    }
    {
        let server = BareServer::start(transport);
        let client = bare_client(&server).await;
        for mode in MODES.into_iter().filter(|m| m.bare()) {
            seq.push(ctx.run(mode, n, Some(&client)).await);
        }
        drop(client);
        // Joining the server thread blocks; let the runtime go on meanwhile.
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .expect("stopping the bare server panicked");
    }
    let mut conc = Vec::new();
    for own_swarms in [false, true] {
        conc.push(ctx.concurrent(callers, own_swarms, &addr, measured).await);
    }
    let lines = node.log_lines();
    drop(node);
    drop(dir);
    (seq, conc, lines)
}
