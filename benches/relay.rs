//! Round-trip latency on loopback, relay vs direct WebSocket: `cargo bench --bench relay`.
//!
//! Starts the real binaries as children, both with `RUST_LOG=warn`:
//!
//! - a relay: `oonode relay --listen 127.0.0.1:0 --ready-json --frames-per-sec <F>`;
//! - a node: `oonode host --ready-json --agent echo --port 0 --bind 127.0.0.1
//!   --relay ws://127.0.0.1:<relay port> --no-p2p --co-dir <tempdir>` (no libp2p
//!   swarm, which would listen on every interface).
//!
//! Ports and the node's address come from their `--ready-json` lines; the bench waits
//! until the relay's directory lists the node online. Then, for each mode below, it
//! sends 50 warm-up requests and N measured ones, one at a time, with the prompt `ping`
//! (the echo agent answers one STREAM frame and one OUTPUT frame). A round trip is timed from just
//! before the request is written to just after the OUTPUT frame (or the HTTP body) has
//! been read and parsed.
//!
//! Modes, fresh session per request (the same work on the node every time):
//! - `http`: `POST /input` `{"prompt":"ping"}` on one keep-alive reqwest client.
//! - `ws`: one socket to the node's `/ws`, `{"type":"INPUT","prompt":"ping",
//!   "session_id":<new>}` (unsigned).
//! - `ws-signed`: the same socket kind, carrying the signed INPUT that `relay-raw`
//!   sends, signed before the timer starts; the node verifies it, the client does not
//!   verify the replies. Against `relay-raw` the only difference is the relay hop.
//! - `relay-raw`: one socket to the relay's `/ws/input`, the signed nested INPUT with
//!   top-level `"type":"INPUT"` and `"to"` (what `connect()` sends), signed before the
//!   timer; replies are not verified. After each answer (untimed) a
//!   `{"type":"close"}` frees the session, as the relay allows 64 per connection.
//! - `client-direct`: `oonode::connect(address, ConnectOptions::default()
//!   .endpoint("http://127.0.0.1:<port>").via(Via::Direct))`, then
//!   `remote.set_session_id(<new>)` and a timed `remote.input("ping")` per request.
//!   This includes signing the INPUT and verifying the signature (and sender,
//!   recipient, session, freshness) of every reply. The handle's `path()` must be
//!   `direct`. A handle serves 60 requests and is then replaced (untimed; connect
//!   times are reported apart), because the relay allows 64 sessions per caller
//!   connection and the client never closes one.
//! - `client-relay`: the same through the relay, `ConnectOptions::default()
//!   .relay(url).via(Via::Relay)`; `path()` must be `relay`. (`Via::Auto` would pick
//!   the node's loopback endpoint and skip the relay.)
//!
//! Modes on ONE session (what a single handle does; the session history grows by two
//! messages a turn and every OUTPUT carries all of it, so later turns cost more):
//! - `ws-1session`: one `/ws` socket, `{"type":"INPUT","prompt":"ping"}` with no
//!   session, which the node continues on the socket's session.
//! - `client-relay-1session`: one `connect()` handle through the relay, N+50 sequential
//!   `input("ping")`.
//!
//! Per mode it prints p50/p90/p99/max/mean in ms, requests/s (= 1000 / mean ms, as the
//! requests are sequential), the p50 of the first and of the last 100 measured requests
//! (to show drift), and the CPU time per request of the node, the relay and this
//! process over the measured loop (from /proc, 10 ms ticks, so ±10 µs/req at N=1000).
//! Afterwards it times client-side signing of an INPUT and verifying an OUTPUT.
//!
//! The relay limits each caller connection to 100 frames per second (burst 200) by
//! default. A sequential loop at several hundred requests per second exhausts that
//! within a second, after which the relay answers `rate_limited` (`relay-raw`, which
//! also sends a `close` per request, fails from about its 100th request with
//! `OONODE_BENCH_RELAY_FPS=100`). So the relay is started with `--frames-per-sec
//! 1000000` unless `OONODE_BENCH_RELAY_FPS` says otherwise.
//!
//! Before commit 0cbcfb8 (TCP_NODELAY on every listener and outbound WebSocket), each
//! WebSocket hop that wrote two frames back to back (STREAM, then OUTPUT) waited ~40 ms
//! for the peer's delayed ACK: `ws` took ~44 ms and `relay-raw` ~88 ms. Rows at those
//! values mean Nagle's algorithm is back on some socket (see BENCHMARKS.md).
//!
//! Every request has a 10 s timeout; a mode stops after 10 failures. Only 127.0.0.1 is
//! contacted. Both children are killed (by PID, `Child::kill`) when the bench ends, also
//! on panic. Linux only (reads /proc).
//!
//! Options (environment variables):
//! - `OONODE_BENCH_N`: measured requests per mode (default 1000).
//! - `OONODE_BENCH_RELAY_FPS`: the relay's `--frames-per-sec` (default 1000000).

mod common;

use std::time::{Duration, Instant};

use common::*;

use futures::{SinkExt, StreamExt};
use oonode::{Address, ConnectOptions, Envelope, Identity, Kind, Remote, Via};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const PROMPT: &str = "ping";
const WARMUP: usize = 50;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A mode stops after this many failed requests.
const MAX_ERRORS: usize = 10;
const DEFAULT_RELAY_FPS: u32 = 1_000_000;
/// Requests (each on its own session) per `connect()` handle in `client-direct` and
/// `client-relay`: the relay allows 64 sessions per caller connection, and the client
/// never closes one.
const SESSIONS_PER_HANDLE: usize = 60;
/// Requests in the "first" and "last" windows used to show drift.
const EDGE: usize = 100;

fn main() {
    let n: usize = env_num("OONODE_BENCH_N", 1000);
    let relay_fps: u32 = env_num("OONODE_BENCH_RELAY_FPS", DEFAULT_RELAY_FPS);
    eprintln!(
        "oonode relay bench: binary {}, N={n} (+{WARMUP} warm-up) per mode, relay --frames-per-sec {relay_fps}, load average {}",
        env!("CARGO_BIN_EXE_oonode"),
        loadavg()
    );
    let load_before = loadavg();

    let fps = relay_fps.to_string();
    let (relay, relay_url) = start_relay(&["--frames-per-sec", &fps], STARTUP_TIMEOUT);

    let dir = co_dir("oonode-relay-bench-");
    let (node, ready) = start_echo_node(
        "node",
        dir.path(),
        true,
        &[
            "--relay", &relay_url,
            // The libp2p swarm would listen on 0.0.0.0; this bench stays on loopback.
            "--no-p2p",
        ],
        "warn",
        STARTUP_TIMEOUT,
    );
    let (node_url, address) = (ready.http.expect("HTTP is on"), ready.address);
    eprintln!(
        "relay pid {} on {relay_url}; node pid {} on {node_url}, address {address}",
        relay.pid(),
        node.pid()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    let results = rt.block_on(async {
        wait_online(&relay_url, &address).await;
        let ctx = Ctx {
            node_url,
            relay_url: relay_url.clone(),
            address,
            identity: Identity::generate(),
            pids: (node.pid(), relay.pid()),
        };
        let mut results = Vec::new();
        for mode in MODES {
            results.push(ctx.run(mode, n).await);
        }
        let crypto = crypto_costs(&ctx, &results);
        (results, crypto)
    });
    let (results, crypto) = results;
    let load_after = loadavg();
    let (node_warn, relay_warn) = (node.log_lines(), relay.log_lines());
    drop(node);
    drop(relay);
    drop(dir);

    println!();
    println!("| mode | ok | errors | p50 ms | p90 ms | p99 ms | max ms | mean ms | req/s | p50 first {EDGE} | p50 last {EDGE} | node µs/req | relay µs/req | client µs/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            r.mode.label(),
            r.lat.len(),
            r.errors,
            latency_cells(&r.lat, EDGE),
            r.cpu_us.0,
            r.cpu_us.1,
            r.cpu_us.2,
        );
    }
    println!();
    for r in &results {
        if let Some(note) = &r.note {
            println!("{}: {note}", r.mode.label());
        }
    }
    println!(
        "client-side crypto (this process, {CRYPTO_REPS} reps): sign an INPUT {:.1} µs, parse + verify an OUTPUT {:.1} µs, parse + verify a STREAM {:.1} µs",
        crypto.0, crypto.1, crypto.2
    );
    println!(
        "log lines on stderr (RUST_LOG=warn): node {node_warn}, relay {relay_warn} (printed above, prefixed, after the node's banner)"
    );
    println!("load average: before {load_before}; after {load_after}");
    println!(
        "(req/s = 1000 / mean ms; CPU µs/req over the measured loop, untimed work such as signing, \
         `close` frames and connect() included)"
    );
}

/// Polls the relay's directory until it lists the node online.
async fn wait_online(relay_url: &str, address: &Address) {
    let url = relay_url
        .parse::<oonode::proto::RelayUrl>()
        .expect("a relay URL")
        .directory(address);
    let http = http_client();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(res) = http.get(&url).send().await {
            if let Ok(v) = res.json::<Value>().await {
                if v["online"] == json!(true) {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            panic!("{url} did not list the node online within {STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("cannot build the HTTP client")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Http,
    Ws,
    WsSigned,
    RelayRaw,
    ClientDirect,
    ClientRelay,
    WsOneSession,
    ClientRelayOneSession,
}

const MODES: [Mode; 8] = [
    Mode::Http,
    Mode::Ws,
    Mode::WsSigned,
    Mode::RelayRaw,
    Mode::ClientDirect,
    Mode::ClientRelay,
    Mode::WsOneSession,
    Mode::ClientRelayOneSession,
];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Ws => "ws",
            Mode::WsSigned => "ws-signed",
            Mode::RelayRaw => "relay-raw",
            Mode::ClientDirect => "client-direct",
            Mode::ClientRelay => "client-relay",
            Mode::WsOneSession => "ws-1session",
            Mode::ClientRelayOneSession => "client-relay-1session",
        }
    }

    /// The path a `connect()` handle of this mode takes.
    fn via(self) -> Via {
        match self {
            Mode::ClientDirect => Via::Direct,
            _ => Via::Relay,
        }
    }
}

struct Ctx {
    /// `http://127.0.0.1:PORT`
    node_url: String,
    relay_url: String,
    address: Address,
    identity: Identity,
    /// (node, relay)
    pids: (u32, u32),
}

impl Ctx {
    /// The node's `/ws`, from its HTTP URL.
    fn node_ws_url(&self) -> String {
        let mut url = reqwest::Url::parse(&self.node_url).expect("the node's HTTP URL");
        url.set_scheme("ws").expect("http becomes ws");
        url.set_path("/ws");
        url.to_string()
    }
}

/// One mode's connection state (one value per mode, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Client {
    Http {
        http: reqwest::Client,
        url: String,
    },
    Ws {
        ws: Ws,
    },
    Remote {
        remote: Option<Remote>,
        connect_ns: Vec<u64>,
        /// Requests made on the current handle.
        turns: usize,
    },
}

struct ModeResult {
    mode: Mode,
    /// Measured round trips in ns, in the order they were made.
    lat: Vec<u64>,
    errors: usize,
    /// CPU µs per measured request: node, relay, this process.
    cpu_us: (f64, f64, f64),
    note: Option<String>,
    /// One OUTPUT and one STREAM frame as received (for the crypto timing).
    samples: Vec<Value>,
}

/// One request's outcome: the round trip and the raw frames that answered it.
struct Trip {
    elapsed: Duration,
    frames: Vec<Value>,
    last_size: usize,
}

impl Ctx {
    async fn open(&self, mode: Mode) -> Client {
        match mode {
            Mode::Http => Client::Http {
                http: http_client(),
                url: format!("{}/input", self.node_url),
            },
            Mode::Ws | Mode::WsSigned | Mode::WsOneSession => Client::Ws {
                ws: ws_connect(&self.node_ws_url()).await,
            },
            Mode::RelayRaw => Client::Ws {
                ws: ws_connect(&format!("{}/ws/input", self.relay_url)).await,
            },
            Mode::ClientDirect | Mode::ClientRelay | Mode::ClientRelayOneSession => {
                Client::Remote {
                    remote: None,
                    connect_ns: Vec::new(),
                    turns: 0,
                }
            }
        }
    }

    async fn connect(&self, via: Via) -> Result<Remote, String> {
        let options = match via {
            Via::Direct => ConnectOptions::default().endpoint(self.node_url.clone()),
            _ => ConnectOptions::default().relay(self.relay_url.clone()),
        };
        let options = options
            .via(via)
            .identity(self.identity.clone())
            .reply_timeout(REQUEST_TIMEOUT);
        let remote = oonode::connect(&self.address.to_string(), options)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if remote.path() != via.as_str() {
            return Err(format!(
                "connect() took the {} path, not {}",
                remote.path(),
                via.as_str()
            ));
        }
        Ok(remote)
    }

    /// The signed INPUT frame `connect()` would send, on a new session.
    fn signed_input(&self, session_id: &str, relayed: bool) -> String {
        let mut payload = Map::new();
        payload.insert("prompt".into(), json!(PROMPT));
        payload.insert("session".into(), json!({ "session_id": session_id }));
        let input = Envelope::sign(&self.identity, Kind::Input, Some(self.address), payload);
        let mut frame = input.to_nested_json();
        frame["type"] = json!("INPUT");
        if relayed {
            frame["to"] = json!(self.address.to_string());
        }
        frame.to_string()
    }

    async fn request(&self, mode: Mode, client: &mut Client) -> Result<Trip, String> {
        let sid = uuid::Uuid::new_v4().to_string();
        match client {
            Client::Http { http, url } => {
                let body = json!({ "prompt": PROMPT }).to_string();
                let t0 = Instant::now();
                let res = http
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("request error: {e:?}"))?;
                let status = res.status();
                let bytes = res.bytes().await.map_err(|e| format!("body: {e:?}"))?;
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let elapsed = t0.elapsed();
                if status != reqwest::StatusCode::OK || v["result"] != json!(PROMPT) {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
                }
                Ok(Trip {
                    elapsed,
                    frames: Vec::new(),
                    last_size: bytes.len(),
                })
            }
            Client::Ws { ws } => {
                let (frame, want_session) = match mode {
                    Mode::Ws => (
                        json!({"type": "INPUT", "prompt": PROMPT, "session_id": sid}).to_string(),
                        Some(sid.as_str()),
                    ),
                    Mode::WsSigned => (self.signed_input(&sid, false), Some(sid.as_str())),
                    Mode::RelayRaw => (self.signed_input(&sid, true), Some(sid.as_str())),
                    _ => (json!({"type": "INPUT", "prompt": PROMPT}).to_string(), None),
                };
                let trip = ws_round_trip(ws, frame, want_session).await;
                if mode == Mode::RelayRaw {
                    // Untimed: free the relay's session slot (64 per connection).
                    let close = json!({"type": "close", "session_id": sid}).to_string();
                    ws.send(Message::text(close))
                        .await
                        .map_err(|e| format!("sending close: {e}"))?;
                }
                trip
            }
            Client::Remote {
                remote,
                connect_ns,
                turns,
            } => {
                let fresh_sessions = mode != Mode::ClientRelayOneSession;
                if fresh_sessions && *turns >= SESSIONS_PER_HANDLE {
                    *remote = None; // Closes its socket.
                }
                // A handle that failed was not put back: connect anew.
                let mut handle = match remote.take() {
                    Some(r) => r,
                    None => {
                        let t = Instant::now();
                        let r = self.connect(mode.via()).await?;
                        connect_ns.push(t.elapsed().as_nanos() as u64);
                        *turns = 0;
                        r
                    }
                };
                if fresh_sessions {
                    handle.set_session_id(sid.as_str());
                }
                *turns += 1;
                let t0 = Instant::now();
                let answer = handle.input(PROMPT).await;
                let elapsed = t0.elapsed();
                let answer = answer.map_err(|e| format!("input: {e}"))?;
                if answer.result != PROMPT {
                    return Err(format!("unexpected result {:?}", answer.result));
                }
                let last_size = answer.session.to_string().len();
                *remote = Some(handle);
                Ok(Trip {
                    elapsed,
                    frames: Vec::new(),
                    last_size,
                })
            }
        }
    }

    async fn run(&self, mode: Mode, n: usize) -> ModeResult {
        eprintln!("--- {}: {WARMUP} warm-up + {n} measured", mode.label());
        let mut client = self.open(mode).await;
        let mut errors = 0;
        let mut lat = Vec::with_capacity(n);
        let mut samples = Vec::new();
        let mut last_size = 0;
        let mut before = None;
        let mut i = 0;
        while i < WARMUP + n && errors < MAX_ERRORS {
            if i == WARMUP {
                before = Some(self.cpu());
            }
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.request(mode, &mut client))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
            i += 1;
            match outcome {
                Ok(trip) => {
                    if i > WARMUP {
                        lat.push(trip.elapsed.as_nanos() as u64);
                    }
                    if samples.is_empty() && !trip.frames.is_empty() {
                        samples = trip.frames;
                    }
                    last_size = trip.last_size;
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("FAILED {} request #{i}: {e}", mode.label());
                }
            }
        }
        let after = self.cpu();
        let cpu_us = match before {
            Some(b) if !lat.is_empty() => {
                let per = |a: u64, b: u64| (a - b) as f64 * 1e6 / clock_ticks() / lat.len() as f64;
                (per(after.0, b.0), per(after.1, b.1), per(after.2, b.2))
            }
            _ => (f64::NAN, f64::NAN, f64::NAN),
        };
        if errors >= MAX_ERRORS {
            eprintln!("{}: stopped after {errors} failures", mode.label());
        }
        let note = match (&client, mode) {
            (Client::Remote { connect_ns, .. }, Mode::ClientDirect | Mode::ClientRelay)
                if !connect_ns.is_empty() =>
            {
                Some(format!(
                    "connect() (untimed above): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} handles",
                    pct(connect_ns, 0.5),
                    pct(connect_ns, 0.99),
                    pct(connect_ns, 1.0),
                    connect_ns.len()
                ))
            }
            (_, Mode::WsOneSession) => Some(format!(
                "the last OUTPUT frame was {last_size} bytes (the session history rides in every OUTPUT)"
            )),
            (_, Mode::ClientRelayOneSession) => Some(format!(
                "the last answer's session history was {last_size} bytes of JSON"
            )),
            _ => None,
        };
        ModeResult {
            mode,
            lat,
            errors,
            cpu_us,
            note,
            samples,
        }
    }

    /// CPU ticks (utime+stime) of the node, the relay and this process.
    fn cpu(&self) -> (u64, u64, u64) {
        (
            cpu_total(&self.pids.0.to_string()),
            cpu_total(&self.pids.1.to_string()),
            cpu_total("self"),
        )
    }
}

async fn ws_connect(url: &str) -> Ws {
    // TCP_NODELAY on the bench's own sockets, so that its back-to-back frames (`close`,
    // then the next INPUT) are not held by Nagle's algorithm.
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    let (ws, _) = tokio::time::timeout(REQUEST_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    ws
}

/// Sends one INPUT and reads until its OUTPUT (STREAM and other frames skipped; with
/// `session`, only that session's OUTPUT counts). The clock covers send to OUTPUT.
async fn ws_round_trip(ws: &mut Ws, frame: String, session: Option<&str>) -> Result<Trip, String> {
    let t0 = Instant::now();
    ws.send(Message::text(frame))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut frames = Vec::new();
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("socket error: {e}")),
            None => return Err("socket closed".into()),
        };
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(c) => return Err(format!("socket closed: {c:?}")),
            _ => continue,
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("bad frame {text:?}: {e}"))?;
        let kind = v["type"].as_str().unwrap_or("");
        let ours = session.is_none_or(|s| v["session_id"].as_str() == Some(s));
        match kind {
            "OUTPUT" if ours => {
                let elapsed = t0.elapsed();
                if v["result"] != json!(PROMPT) {
                    return Err(format!("unexpected OUTPUT {text}"));
                }
                frames.push(v);
                return Ok(Trip {
                    elapsed,
                    frames,
                    last_size: text.len(),
                });
            }
            "ERROR" => return Err(format!("ERROR frame {text}")),
            "STREAM" if ours => frames.push(v),
            _ => {}
        }
    }
}

const CRYPTO_REPS: u32 = 1000;

/// Client-side cost of signing an INPUT and of parsing + verifying a reply, in µs.
fn crypto_costs(ctx: &Ctx, results: &[ModeResult]) -> (f64, f64, f64) {
    let t = Instant::now();
    for _ in 0..CRYPTO_REPS {
        std::hint::black_box(ctx.signed_input("00000000-0000-4000-8000-000000000000", true));
    }
    let sign = t.elapsed().as_secs_f64() * 1e6 / f64::from(CRYPTO_REPS);
    let frames = results
        .iter()
        .find(|r| r.mode == Mode::RelayRaw)
        .map(|r| r.samples.clone())
        .unwrap_or_default();
    let verify = |kind: &str| {
        let Some(Value::Object(obj)) = frames.iter().find(|f| f["type"] == json!(kind)) else {
            return f64::NAN;
        };
        let t = Instant::now();
        for _ in 0..CRYPTO_REPS {
            let env = Envelope::from_flat(std::hint::black_box(obj)).expect("sample parses");
            env.verify().expect("sample verifies");
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(CRYPTO_REPS)
    };
    (sign, verify("OUTPUT"), verify("STREAM"))
}
