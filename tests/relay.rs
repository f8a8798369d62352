//! The relay end to end: a node with no open port called by address through the relay,
//! relay restarts (real binary), node kills (real binary), 200 concurrent callers, a
//! man-in-the-middle that alters or drops frames, every relay limit, and the directory.
//!
//! Every await is bounded; everything listens on 127.0.0.1; every process started here is
//! killed by its own handle when its guard drops.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    free_port, get_json, relay_config, start_relay, wait_until, NodeProc, RelayProc, TestNode, STEP,
};
use futures::{Sink, SinkExt, StreamExt};
use oonode::agent::{Echo, Ticker};
use oonode::envelope::unix_now;
use oonode::proto::{signed_announce, RelayUrl, ANNOUNCE_PATH, INPUT_PATH};
use oonode::{Address, Answer, CallError, ConnectOptions, Envelope, Host, Identity, RelayConfig};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use common::{input_frame, ws_connect, ws_recv as recv, ws_send as send, Socket};

// ---------------------------------------------------------------------------------------
// Helpers: relays, nodes, callers
// ---------------------------------------------------------------------------------------

fn relay_url(relay_ws: &str) -> RelayUrl {
    relay_ws.parse().expect("a relay URL")
}

/// Starts `host` with HTTP off, announcing on `relay`, and waits for the link.
async fn start_node(host: Host, relay: &str) -> TestNode {
    TestNode::builder(host)
        .http(false)
        .relay(relay)
        .start()
        .await
}

fn options(relay: &str) -> ConnectOptions {
    ConnectOptions::default()
        .relay(relay)
        .identity(Identity::generate())
        .reply_timeout(STEP)
}

/// One call through `relay` by a fresh caller, bounded.
async fn call(relay: &str, to: Address, prompt: &str) -> Result<Answer, CallError> {
    call_with(options(relay), to, prompt).await
}

async fn call_with(opts: ConnectOptions, to: Address, prompt: &str) -> Result<Answer, CallError> {
    tokio::time::timeout(STEP, async {
        let mut remote = oonode::connect(&to.to_string(), opts).await?;
        remote.input(prompt).await
    })
    .await
    .expect("a call through the relay is bounded")
}

/// A call that must succeed and echo `prompt`.
async fn call_ok(relay: &str, to: Address, prompt: &str) {
    let answer = call(relay, to, prompt)
        .await
        .unwrap_or_else(|e| panic!("a normal call through {relay} fails: {e:?}"));
    assert_eq!(answer.result, prompt);
}

/// Retries a call until it succeeds or `limit` passes; returns how long it took.
async fn call_until_ok(relay: &str, to: Address, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let opts = options(relay).reply_timeout(Duration::from_secs(2));
        match call_with(opts, to, "are you back").await {
            Ok(a) => {
                assert_eq!(a.result, "are you back");
                return start.elapsed();
            }
            Err(e) => assert!(
                start.elapsed() < limit,
                "no successful call within {limit:?}; last error: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads frames until an OUTPUT or an ERROR (signed or not).
async fn until_final(socket: &mut Socket) -> Value {
    loop {
        let frame = recv(socket).await.expect("the socket stays open");
        if matches!(frame["type"].as_str(), Some("OUTPUT") | Some("ERROR")) {
            return frame;
        }
    }
}

/// Asserts the socket closes (after any number of frames) within `STEP`.
async fn assert_closes(socket: &mut Socket) {
    while recv(socket).await.is_some() {}
}

async fn directory(relay: &str, address: &str) -> (u16, Value) {
    get_json(&relay_url(relay).directory(address)).await
}

async fn health(relay: &str) -> Value {
    let (status, body) = get_json(&relay_url(relay).health()).await;
    assert_eq!(status, 200, "{body}");
    body
}

// ---------------------------------------------------------------------------------------
// 1. A node with HTTP off, called by address through the relay
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_node_with_http_off_is_called_by_address_through_the_relay_and_streams() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let node = start_node(
        Host::new(Ticker {
            pause: Duration::from_millis(60),
        }),
        &url,
    )
    .await;
    assert_eq!(node.handle.http_addr(), None, "HTTP is off: no listener");
    assert_eq!(node.handle.http_url(), None);

    // connect() verifies every reply is signed by the address called.
    let caller = Identity::generate();
    let mut remote = oonode::connect(
        &node.address.to_string(),
        ConnectOptions::default()
            .relay(url.clone())
            .identity(caller.clone())
            .reply_timeout(STEP),
    )
    .await
    .expect("connect");
    assert_eq!(remote.address(), node.address);
    assert_eq!(remote.path(), "relay");
    let start = Instant::now();
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let prompt = "alpha beta gamma delta";
    let answer = tokio::time::timeout(
        STEP,
        remote.input_streaming(prompt, |c| seen.push((c.to_string(), start.elapsed()))),
    )
    .await
    .expect("bounded")
    .expect("a verified answer");
    let total = start.elapsed();
    assert_eq!(answer.result, prompt);
    assert_eq!(answer.chunks, ["alpha ", "beta ", "gamma ", "delta"]);
    let streamed: Vec<&str> = seen.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(streamed, ["alpha ", "beta ", "gamma ", "delta"]);
    // Chunks arrive as they are made, not batched with the result.
    assert!(
        seen[0].1 + Duration::from_millis(100) < total,
        "first chunk at {:?}, result at {total:?}",
        seen[0].1
    );
    // A second turn on the same handle continues the session.
    let session = answer.session_id.clone();
    let again = tokio::time::timeout(STEP, remote.input("one more"))
        .await
        .unwrap()
        .expect("second turn");
    assert_eq!(again.session_id, session);
    assert_eq!(again.result, "one more");

    // The same exchange on a raw socket: every reply is signed by the node, to the caller.
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    send(
        &mut ws,
        &input_frame(&caller, node.address, "raw check", "raw-s1"),
    )
    .await;
    let mut kinds = Vec::new();
    loop {
        let frame = recv(&mut ws).await.expect("open");
        let env = Envelope::from_flat(frame.as_object().unwrap()).expect("a flat envelope");
        assert_eq!(env.verify().expect("signed"), node.address, "{frame}");
        assert_eq!(env.to().unwrap(), Some(caller.address()));
        assert_eq!(frame["session_id"], "raw-s1");
        kinds.push(frame["type"].as_str().unwrap().to_string());
        if frame["type"] == "OUTPUT" {
            assert_eq!(frame["result"], "raw check");
            break;
        }
    }
    assert_eq!(kinds, ["STREAM", "STREAM", "OUTPUT"]);

    // The directory lists no endpoint for a node without HTTP.
    let (status, entry) = directory(&url, &node.address.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(entry["online"], true);
    assert_eq!(entry["endpoints"], json!([]));
}

// ---------------------------------------------------------------------------------------
// 2. The relay (real binary) is killed and restarted; the node comes back by itself
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_is_callable_again_within_5_s_of_the_relays_return_after_kill_9() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}");
    let mut relay = RelayProc::start(port).await;
    let node = start_node(Host::new(Echo), &url).await;
    call_ok(&url, node.address, "before the crash").await;

    relay.kill9();
    drop(relay);
    // The node notices and starts retrying; the relay stays down for a while.
    wait_until("the node to see its relay gone", STEP, || async {
        node.handle.relay_status().unwrap().state != oonode::LinkState::Connected
    })
    .await;
    match call(&url, node.address, "while down").await {
        Err(CallError::Unreachable { .. }) => {}
        other => panic!("with the relay down a call is Unreachable, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let relay = RelayProc::start(port).await;
    // From the moment the new relay listens: poll calls until one succeeds.
    let took = call_until_ok(&url, node.address, Duration::from_secs(5)).await;
    println!("relay-return-to-callable: {took:?}");
    assert!(took < Duration::from_secs(5));
    assert_eq!(
        node.handle.relay_status().unwrap().state,
        oonode::LinkState::Connected
    );
    call_ok(&url, node.address, "after the restart").await;
    drop(relay);
}

// ---------------------------------------------------------------------------------------
// 3. The node (real binary) is killed: callers learn it is offline within 1 s
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_reads_offline_to_callers_within_1_s() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::builder(dir.path())
        .args(&["--agent", "ticker"])
        .no_http()
        .relay(&url)
        .log("error")
        .start_async()
        .await;
    let address = node.address;
    wait_until("the binary node to announce", STEP, || async {
        directory(&url, &address.to_string()).await.1["online"] == true
    })
    .await;
    call_ok(&url, address, "alive").await;

    // A caller in the middle of a long stream (50 words, 200 ms apart).
    let (first_chunk_tx, first_chunk) = tokio::sync::oneshot::channel::<()>();
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move {
            let mut tx = Some(first_chunk_tx);
            let mut remote = oonode::connect(&address.to_string(), options(&url)).await?;
            let prompt = vec!["tick"; 50].join(" ");
            let result = remote
                .input_streaming(&prompt, |_| {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                })
                .await;
            Ok::<_, CallError>((result, Instant::now()))
        }
    });
    tokio::time::timeout(STEP, first_chunk)
        .await
        .expect("the long run streams")
        .expect("first chunk");

    let killed = Instant::now();
    node.kill9();
    // A new caller, right after the kill.
    let opts = options(&url).reply_timeout(Duration::from_secs(2));
    let offline_after = match call_with(opts, address, "are you there").await {
        Err(CallError::Offline(a)) => {
            assert_eq!(a, address.to_string());
            killed.elapsed()
        }
        other => panic!("a killed node must read Offline, got {other:?}"),
    };
    let (in_flight_result, at) = tokio::time::timeout(STEP, in_flight)
        .await
        .expect("the in-flight call ends")
        .unwrap()
        .expect("connect worked");
    let in_flight_after = at.duration_since(killed);
    println!(
        "kill-to-offline: new caller {offline_after:?}, caller mid-stream {in_flight_after:?} ({in_flight_result:?})"
    );
    assert!(
        matches!(in_flight_result, Err(CallError::Offline(_))),
        "{in_flight_result:?}"
    );
    assert!(offline_after < Duration::from_secs(1), "{offline_after:?}");
    assert!(
        in_flight_after < Duration::from_secs(1),
        "{in_flight_after:?}"
    );
    let (status, entry) = directory(&url, &address.to_string()).await;
    assert_eq!((status, &entry["online"]), (200, &json!(false)), "{entry}");
}

// ---------------------------------------------------------------------------------------
// 4. 200 concurrent callers, one agent: everyone gets exactly their own answer
// ---------------------------------------------------------------------------------------

/// `callers` concurrent callers, each its own connection and identity, each a unique
/// prompt to one Echo node: returns the wall time and every distinct error.
async fn many_callers(config: RelayConfig, callers: usize) -> (Duration, usize, Vec<String>) {
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo).workers(16).max_queue(1000), &url).await;

    let start = Instant::now();
    let mut calls = JoinSet::new();
    for i in 0..callers {
        let url = url.clone();
        let to = node.address;
        calls.spawn(async move {
            let prompt = format!("caller {i} asks {} for {i}", uuid::Uuid::new_v4());
            let opts = options(&url).reply_timeout(Duration::from_secs(8));
            let mut remote = oonode::connect(&to.to_string(), opts).await?;
            let mut streamed = String::new();
            let answer = remote
                .input_streaming(&prompt, |c| streamed.push_str(c))
                .await?;
            Ok::<_, CallError>((i, prompt, streamed, answer))
        });
    }
    let mut ok = 0;
    let mut errors = Vec::new();
    while let Some(joined) = tokio::time::timeout(STEP, calls.join_next())
        .await
        .expect("all calls end in time")
    {
        match joined.expect("no panic") {
            Ok((i, prompt, streamed, answer)) => {
                // Verified by connect() (signer, recipient, session, in_reply_to), and
                // exactly this caller's words: nothing leaked in or out.
                assert_eq!(streamed, prompt, "caller {i}'s chunks");
                assert_eq!(answer.chunks.concat(), prompt, "caller {i}'s chunks");
                assert_eq!(answer.result, prompt, "caller {i}'s result");
                ok += 1;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let wall = start.elapsed();
    errors.sort();
    errors.dedup();
    (wall, ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_callers_each_get_their_own_answer() {
    let (wall, ok, errors) = many_callers(relay_config(), 200).await;
    println!("200 callers, default relay config: wall {wall:?}, {ok} ok");
    assert!(
        errors.is_empty() && ok == 200,
        "{} of 200 callers failed; distinct errors: {errors:#?}",
        200 - ok
    );
}

/// The same load with the relay's per-connection frame rate out of the way: isolates
/// routing (no leak, no loss) from the rate limit the agent's one connection hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_callers_route_correctly_without_the_frame_rate_limit() {
    let mut config = relay_config();
    config.frames_per_sec = 1_000_000;
    let (wall, ok, errors) = many_callers(config, 200).await;
    println!("200 callers, frames_per_sec 1e6: wall {wall:?}, {ok} ok");
    assert!(
        errors.is_empty() && ok == 200,
        "{} of 200 callers failed; distinct errors: {errors:#?}",
        200 - ok
    );
}

/// The agent's socket carries the replies of all its sessions, yet the relay applies the
/// per-connection `frames_per_sec` to it and silently drops what is over: one answer
/// longer than the burst (2 × frames_per_sec frames) is cut, and the caller sees a
/// "tampered" sequence gap instead of its answer or a clear error.
#[tokio::test]
async fn an_answer_longer_than_the_frame_burst_reaches_the_caller_whole() {
    let mut config = relay_config();
    config.frames_per_sec = 5; // burst 10
    let relay = start_relay(config).await;
    let url = relay.url();
    // Word by word (Echo's words would be joined into fewer STREAMs by the node).
    let node = start_node(Host::new(word_by_word()), &url).await;
    let prompt = vec!["word"; 30].join(" "); // 30 STREAM frames + 1 OUTPUT
    let opts = options(&url).reply_timeout(Duration::from_secs(3));
    match call_with(opts, node.address, &prompt).await {
        Ok(answer) => assert_eq!(answer.chunks.len(), 30),
        Err(e) => panic!("the relay dropped the agent's reply frames: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 5. A man in the middle: altered frames are rejected, dropped ones detected
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// From whoever connected (caller or agent) towards the relay.
    ToRelay,
    /// From the relay back.
    FromRelay,
}

/// Given the request path, direction and a text frame: the frame to pass on, or `None`
/// to drop it.
type Rule = Arc<dyn Fn(&str, Dir, &str) -> Option<String> + Send + Sync>;

/// A WebSocket proxy on 127.0.0.1 in front of a relay, applying `Rule` to text frames.
struct Mitm {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Mitm {
    async fn start(upstream: String, rule: Rule) -> Mitm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) ends every proxied connection.
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(proxy_one(tcp, upstream.clone(), rule.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Mitm { addr, task }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn proxy_one(tcp: TcpStream, upstream: String, rule: Rule) {
    let path = Arc::new(Mutex::new(String::new()));
    let seen = path.clone();
    let callback = move |req: &Request, resp: Response| {
        *seen.lock().unwrap() = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(Ok(down)) =
        tokio::time::timeout(STEP, tokio_tungstenite::accept_hdr_async(tcp, callback)).await
    else {
        return;
    };
    let path = path.lock().unwrap().clone();
    let Ok(Ok((up, _))) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(format!("{upstream}{path}")),
    )
    .await
    else {
        return;
    };
    let (mut down_tx, mut down_rx) = down.split();
    let (mut up_tx, mut up_rx) = up.split();
    loop {
        let ok = tokio::select! {
            m = down_rx.next() => match m {
                Some(Ok(m)) => pass(&rule, &path, Dir::ToRelay, m, &mut up_tx).await,
                _ => false,
            },
            m = up_rx.next() => match m {
                Some(Ok(m)) => pass(&rule, &path, Dir::FromRelay, m, &mut down_tx).await,
                _ => false,
            },
        };
        if !ok {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), down_tx.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), up_tx.close()).await;
}

/// Forwards one message through `rule`; false once the connection should end.
async fn pass<S>(rule: &Rule, path: &str, dir: Dir, msg: Message, sink: &mut S) -> bool
where
    S: Sink<Message> + Unpin,
{
    let out = match msg {
        Message::Text(t) => match rule(path, dir, t.as_str()) {
            Some(t) => Message::text(t),
            None => return true,
        },
        Message::Close(_) => return false,
        other => other,
    };
    matches!(tokio::time::timeout(STEP, sink.send(out)).await, Ok(Ok(())))
}

/// Replaces `from` with `to` (one character apart) in `text`, if present.
fn flip(text: &str, from: &str, to: &str) -> Option<String> {
    debug_assert_eq!(from.len(), to.len());
    text.contains(from).then(|| text.replacen(from, to, 1))
}

/// The tampering proxy's rules, keyed on markers in the prompts.
fn tamper_rule() -> Rule {
    Arc::new(|path: &str, dir: Dir, text: &str| {
        if dir != Dir::ToRelay {
            return Some(text.to_string());
        }
        let is = |kind: &str| text.contains(&format!("\"type\":\"{kind}\""));
        let altered = match path {
            // A relay that breaks every SEAL (a downgrade): the agent refuses it, the
            // caller goes on in the clear on a fresh socket, and what follows shows the
            // signatures alone still protect every frame.
            INPUT_PATH if is("SEAL") => {
                Some(text.replacen("\"signature\":\"", "\"signature\":\"0", 1))
            }
            // (a) caller → relay: one character of the signed prompt.
            INPUT_PATH => flip(
                text,
                "\"prompt\":\"ALTER-PROMPT-A\"",
                "\"prompt\":\"ALTER-PROMPT-B\"",
            ),
            // (b) agent → relay: one character of the result, or of a chunk.
            ANNOUNCE_PATH if is("OUTPUT") => flip(
                text,
                "\"result\":\"ALTER-RESULT-A\"",
                "\"result\":\"ALTER-RESULT-B\"",
            ),
            ANNOUNCE_PATH if is("STREAM") => {
                if text.contains("\"chunk\":\"DROP-ME \"") {
                    // (c) a relay that loses one STREAM frame.
                    return None;
                }
                flip(
                    text,
                    "\"chunk\":\"ALTER-CHUNK-A\"",
                    "\"chunk\":\"ALTER-CHUNK-B\"",
                )
            }
            _ => None,
        };
        Some(altered.unwrap_or_else(|| text.to_string()))
    })
}

/// Streams one word per STREAM: its pause is longer than the node's window for joining
/// chunks.
fn word_by_word() -> oonode::agent::Ticker {
    oonode::agent::Ticker {
        pause: Duration::from_millis(30),
    }
}

#[tokio::test]
async fn frames_altered_or_dropped_in_transit_are_rejected() {
    // The proxy is the relay's public face, as a reverse proxy would be: the relay is told
    // its URL, since agents sign their ANNOUNCE for the URL they dial.
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mitm = Mitm::start(format!("ws://{relay_addr}"), tamper_rule()).await;
    let via = mitm.url();
    let _relay = start_relay(
        relay_config()
            .listen(relay_addr)
            .public_url(via.parse().unwrap()),
    )
    .await;
    // Both the node and its callers go through the proxy; one STREAM per word.
    let node = start_node(Host::new(word_by_word()), &via).await;

    // Untouched frames pass: the proxy itself is transparent.
    let answer = call(&via, node.address, "plain words pass")
        .await
        .expect("a clean call through the proxy");
    assert_eq!(answer.chunks, ["plain ", "words ", "pass"]);

    // (a) The prompt changed on the way to the agent: the node refuses, signed.
    let victim = Identity::generate();
    let opts = options(&via).identity(victim.clone());
    match call_with(opts, node.address, "ALTER-PROMPT-A").await {
        Err(CallError::Refused { code, message }) => {
            assert_eq!(code, "invalid_signature", "{message}");
        }
        other => panic!("an altered INPUT must be refused with invalid_signature: {other:?}"),
    }
    // ... and nothing ran or was stored for that caller.
    let stored = node
        .handle
        .dispatcher()
        .sessions(
            &oonode::Reader::new(oonode::trust::Caller::Verified(victim.address()), None),
            10,
            None,
        )
        .await
        .unwrap();
    assert!(stored.sessions.is_empty(), "{stored:?}");

    // (b) The result changed on the way back: the caller rejects it.
    match call(&via, node.address, "ALTER-RESULT-A").await {
        Err(CallError::Tampered(why)) => println!("altered OUTPUT rejected: {why}"),
        other => panic!("an altered OUTPUT must read Tampered: {other:?}"),
    }
    // (b') A chunk changed on the way back.
    match call(&via, node.address, "ALTER-CHUNK-A").await {
        Err(CallError::Tampered(why)) => println!("altered STREAM rejected: {why}"),
        other => panic!("an altered STREAM must read Tampered: {other:?}"),
    }
    // (c) One chunk lost on the way: a sequence gap.
    match call(&via, node.address, "keep DROP-ME keep").await {
        Err(CallError::Tampered(why)) => {
            assert!(why.contains("chunk 3 arrived where 2 was due"), "{why}");
        }
        other => panic!("a dropped STREAM must read Tampered: {other:?}"),
    }
    // The path still works for honest frames afterwards.
    call_ok(&via, node.address, "still fine").await;
}

/// A relay (or anyone on the path) that delivers a signed INPUT twice does not make the
/// agent run it twice: the node answers the copy with a signed `replayed` refusal.
#[tokio::test]
async fn an_input_delivered_twice_runs_once() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;
    let caller = Identity::generate();
    let frame = input_frame(&caller, node.address, "only once", "once-1");
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    send(&mut ws, &frame).await;
    assert_eq!(until_final(&mut ws).await["result"], "only once");
    send(&mut ws, &frame).await;
    let again = until_final(&mut ws).await;
    let env = Envelope::from_flat(again.as_object().unwrap()).unwrap();
    assert_eq!(env.verify().expect("signed"), node.address);
    assert_eq!(
        (again["type"].as_str(), again["code"].as_str()),
        (Some("ERROR"), Some("replayed")),
        "{again}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Relay limits: each violation gets its clear error, and the relay keeps serving
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_frame_over_max_frame_bytes_is_refused_too_large_and_others_go_on() {
    let mut config = relay_config();
    config.max_frame_bytes = 16 * 1024;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    // A bystander with an open connection.
    let other = Identity::generate();
    let mut bystander = ws_connect(&relay_url(&url).input()).await;
    send(
        &mut bystander,
        &input_frame(&other, node.address, "first", "b-1"),
    )
    .await;
    assert_eq!(until_final(&mut bystander).await["result"], "first");

    let big = "x".repeat(32 * 1024);
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    send(
        &mut ws,
        &input_frame(&Identity::generate(), node.address, &big, "big-1"),
    )
    .await;
    let frame = recv(&mut ws).await;
    let frame = frame.expect("an ERROR frame before the close, not a bare close");
    assert_eq!(frame["type"], "ERROR", "{frame}");
    assert_eq!(frame["code"], "too_large", "{frame}");
    assert_closes(&mut ws).await;

    // What connect() reports for it.
    match call(&url, node.address, &big).await {
        Err(CallError::Relay { code, .. }) if code == "too_large" => {}
        other => panic!("connect() should report the relay's too_large: {other:?}"),
    }

    // The bystander's connection and new callers still work.
    send(
        &mut bystander,
        &input_frame(&other, node.address, "second", "b-1"),
    )
    .await;
    assert_eq!(until_final(&mut bystander).await["result"], "second");
    call_ok(&url, node.address, "after a too-large frame").await;
}

/// The frame limit applies to the agent's socket too, but there one frame too many must
/// not cost every caller the agent: a reply over `max_frame_bytes` (an Echo OUTPUT holds
/// the prompt three times: result and both history messages) should fail that call only.
#[tokio::test]
async fn a_reply_over_max_frame_bytes_does_not_knock_the_agent_off_the_relay() {
    let mut config = relay_config();
    config.max_frame_bytes = 16 * 1024;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;
    let to = node.address;

    // A bystander mid-session.
    let mut bystander = oonode::connect(&to.to_string(), options(&url))
        .await
        .unwrap();
    let answer = tokio::time::timeout(STEP, bystander.input("hello"))
        .await
        .unwrap();
    assert_eq!(answer.unwrap().result, "hello");

    // 10 words of 1000 bytes: the INPUT (~10 KB) fits, each chunk fits, the OUTPUT does not.
    let prompt = vec!["y".repeat(1000); 10].join(" ");
    let opts = options(&url).reply_timeout(Duration::from_secs(3));
    let big = call_with(opts, to, &prompt).await;
    println!("a reply over max_frame_bytes gives the caller: {big:?}");
    assert!(big.is_err());

    // Nobody else should notice.
    let (_, entry) = directory(&url, &to.to_string()).await;
    assert_eq!(
        entry["online"], true,
        "the agent was dropped by the relay: {entry}"
    );
    let next = tokio::time::timeout(STEP, bystander.input("still there"))
        .await
        .unwrap();
    match next {
        Ok(a) => assert_eq!(a.result, "still there"),
        Err(e) => panic!("one caller's big reply cut the agent off for others: {e:?}"),
    }
}

#[tokio::test]
async fn an_agent_over_max_agents_is_refused_relay_full() {
    let mut config = relay_config();
    config.max_agents = 1;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    let second = Identity::generate();
    let mut ws = ws_connect(&relay_url(&url).announce()).await;
    let announce = signed_announce(&second, "second agent", &[], &url, unix_now());
    send(&mut ws, &announce).await;
    let frame = recv(&mut ws).await.expect("an answer to the ANNOUNCE");
    assert_eq!(
        (frame["type"].as_str(), frame["code"].as_str()),
        (Some("ERROR"), Some("relay_full")),
        "{frame}"
    );
    assert_closes(&mut ws).await;
    let (status, _) = directory(&url, &second.address().to_string()).await;
    assert_eq!(status, 404, "a refused agent is not listed");

    call_ok(&url, node.address, "the first agent still serves").await;
    assert_eq!(health(&url).await["agents_online"], 1);
}

#[tokio::test]
async fn a_caller_over_max_callers_gets_503_on_upgrade() {
    let mut config = relay_config();
    config.max_callers = 2;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;
    let input = relay_url(&url).input();

    let held_id = Identity::generate();
    let mut held_a = ws_connect(&input).await;
    let mut held_b = ws_connect(&input).await;
    // The two connections are accepted (they answer a PING).
    for ws in [&mut held_a, &mut held_b] {
        send(ws, &json!({"type": "PING"})).await;
        assert_eq!(recv(ws).await.unwrap()["type"], "PONG");
    }
    assert_eq!(health(&url).await["callers"], 2);

    match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(input.as_str()))
        .await
        .expect("bounded")
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "relay_full", "{body}");
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a third caller was let in past max_callers = 2"),
    }
    // connect() reports it as the relay's own refusal, not as an unreachable relay.
    match call(&url, node.address, "third").await {
        Err(CallError::Relay { code, message }) => {
            assert_eq!(code, "relay_full");
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // The held connections still work...
    send(
        &mut held_a,
        &input_frame(&held_id, node.address, "held", "h-1"),
    )
    .await;
    assert_eq!(until_final(&mut held_a).await["result"], "held");
    // ... and once one leaves, a new caller gets in.
    drop(held_b);
    wait_until("the relay to free the caller slot", STEP, || async {
        health(&url).await["callers"] == 1
    })
    .await;
    call_ok(&url, node.address, "after a slot freed").await;
}

#[tokio::test]
async fn sessions_over_max_sessions_per_agent_read_agent_busy() {
    let mut config = relay_config();
    config.max_sessions_per_agent = 2;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;
    let to = node.address.to_string();

    // Two callers hold a session each (a session lasts as long as its connection).
    let mut a = oonode::connect(&to, options(&url)).await.unwrap();
    let mut b = oonode::connect(&to, options(&url)).await.unwrap();
    for r in [&mut a, &mut b] {
        let answer = tokio::time::timeout(STEP, r.input("hold")).await.unwrap();
        assert_eq!(answer.expect("within the limit").result, "hold");
    }
    assert_eq!(health(&url).await["sessions"], 2);
    match call(&url, node.address, "third session").await {
        Err(CallError::Relay { code, message }) => {
            assert_eq!(code, "agent_busy", "{message}");
        }
        other => panic!("a third session must read agent_busy: {other:?}"),
    }
    // Existing sessions go on.
    let answer = tokio::time::timeout(STEP, a.input("next turn"))
        .await
        .unwrap();
    assert_eq!(answer.unwrap().result, "next turn");
    // When one caller leaves, its session ends and a new one fits.
    drop(b);
    wait_until("the relay to end the session", STEP, || async {
        health(&url).await["sessions"] == 1
    })
    .await;
    call_ok(&url, node.address, "after a session ended").await;
}

#[tokio::test]
async fn sessions_over_max_sessions_per_caller_read_too_many_sessions() {
    let mut config = relay_config();
    config.max_sessions_per_caller = 2;
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    let me = Identity::generate();
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    for s in ["s-1", "s-2"] {
        send(&mut ws, &input_frame(&me, node.address, s, s)).await;
        assert_eq!(until_final(&mut ws).await["result"], s);
    }
    send(&mut ws, &input_frame(&me, node.address, "s-3", "s-3")).await;
    let frame = until_final(&mut ws).await;
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["code"].as_str(),
            frame["session_id"].as_str()
        ),
        (Some("ERROR"), Some("too_many_sessions"), Some("s-3")),
        "{frame}"
    );
    assert!(
        frame.get("signature").is_none(),
        "relay errors are unsigned"
    );
    // The connection stays, and its existing sessions go on.
    send(&mut ws, &input_frame(&me, node.address, "s-1 again", "s-1")).await;
    assert_eq!(until_final(&mut ws).await["result"], "s-1 again");
    call_ok(&url, node.address, "another caller is fine").await;
}

#[tokio::test]
async fn frames_over_frames_per_sec_read_rate_limited() {
    let mut config = relay_config();
    config.frames_per_sec = 5; // burst 10
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    let mut ws = ws_connect(&relay_url(&url).input()).await;
    for _ in 0..30 {
        send(&mut ws, &json!({"type": "PING"})).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..30 {
        let frame = recv(&mut ws).await.expect("one answer per frame");
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("PONG"), _) => pongs += 1,
            (Some("ERROR"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {frame}"),
        }
    }
    println!("frames_per_sec 5: {pongs} PONG, {limited} rate_limited of 30");
    assert!(
        (10..=15).contains(&pongs),
        "a burst of twice the rate (plus what refills meanwhile): {pongs}"
    );
    assert_eq!(pongs + limited, 30);
    // Another connection is not affected...
    call_ok(&url, node.address, "ok").await;
    // ... and this one recovers once it slows down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut ws, &json!({"type": "PING"})).await;
    assert_eq!(recv(&mut ws).await.unwrap()["type"], "PONG");
}

#[tokio::test]
async fn an_idle_caller_gets_error_idle_then_close() {
    let mut config = relay_config();
    config.caller_idle = Duration::from_secs(1);
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    let mut ws = ws_connect(&relay_url(&url).input()).await;
    let start = Instant::now();
    let frame = recv(&mut ws).await.expect("an ERROR before the close");
    let after = start.elapsed();
    assert_eq!(
        (frame["type"].as_str(), frame["code"].as_str()),
        (Some("ERROR"), Some("idle")),
        "{frame}"
    );
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert_closes(&mut ws).await;
    call_ok(&url, node.address, "an active caller is fine").await;
}

/// `RelayConfig::caller_idle` reads "a caller connection with no frame *either way* for
/// this long is closed": a caller receiving a stream is not idle.
#[tokio::test]
async fn a_caller_receiving_a_long_stream_is_not_idle() {
    let mut config = relay_config();
    config.caller_idle = Duration::from_secs(1);
    let relay = start_relay(config).await;
    let url = relay.url();
    let node = start_node(
        Host::new(Ticker {
            pause: Duration::from_millis(250),
        }),
        &url,
    )
    .await;
    // 10 chunks 250 ms apart: 2.5 s of steady traffic towards the caller.
    let prompt = "a b c d e f g h i j";
    match call(&url, node.address, prompt).await {
        Ok(answer) => assert_eq!(answer.result, prompt),
        Err(e) => panic!("a streaming caller was cut as idle: {e:?}"),
    }
}

#[tokio::test]
async fn an_unknown_address_reads_unknown_at_once() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;
    let nobody = Identity::generate().address();
    let start = Instant::now();
    match call(&url, nobody, "anyone?").await {
        Err(CallError::Unknown(a)) => assert_eq!(a, nobody.to_string()),
        other => panic!("expected Unknown, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    call_ok(&url, node.address, "a known one answers").await;
}

#[tokio::test]
async fn a_replayed_announce_is_refused_and_does_not_take_the_address() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let node = start_node(Host::new(Echo), &url).await;

    let agent = Identity::generate();
    let announce = signed_announce(&agent, "the real one", &[], &url, unix_now());
    let mut real = ws_connect(&relay_url(&url).announce()).await;
    send(&mut real, &announce).await;
    assert_eq!(recv(&mut real).await.unwrap()["type"], "ANNOUNCE_OK");

    // The same signed frame, on a new socket: refused.
    let mut thief = ws_connect(&relay_url(&url).announce()).await;
    send(&mut thief, &announce).await;
    let frame = recv(&mut thief).await.expect("an answer");
    assert_eq!(
        (frame["type"].as_str(), frame["code"].as_str()),
        (Some("ERROR"), Some("replayed")),
        "{frame}"
    );
    assert_closes(&mut thief).await;

    // INPUTs for the address still reach the real socket.
    let caller = Identity::generate();
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    send(
        &mut ws,
        &input_frame(&caller, agent.address(), "for the real one", "r-1"),
    )
    .await;
    let routed = recv(&mut real)
        .await
        .expect("the INPUT is routed to the real agent");
    assert_eq!(routed["type"], "INPUT");
    assert_eq!(routed["payload"]["prompt"], "for the real one");
    assert_eq!(routed["session_id"], "r-1");

    // Once the real one left, the replay still cannot bring the address back online.
    drop(real);
    wait_until("the relay to see the agent gone", STEP, || async {
        directory(&url, &agent.address().to_string()).await.1["online"] == false
    })
    .await;
    let mut thief = ws_connect(&relay_url(&url).announce()).await;
    send(&mut thief, &announce).await;
    assert_eq!(
        recv(&mut thief).await.expect("an answer")["code"],
        "replayed"
    );
    assert_eq!(
        directory(&url, &agent.address().to_string()).await.1["online"],
        false
    );

    call_ok(&url, node.address, "others are served").await;
}

// ---------------------------------------------------------------------------------------
// 7. The directory and /health
// ---------------------------------------------------------------------------------------

fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test]
async fn the_directory_lists_agents_and_health_counts() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let h = health(&url).await;
    assert_eq!(
        (
            &h["status"],
            &h["agents_online"],
            &h["agents_known"],
            &h["callers"],
            &h["sessions"]
        ),
        (
            &json!("healthy"),
            &json!(0),
            &json!(0),
            &json!(0),
            &json!(0)
        ),
        "{h}"
    );
    assert!(h["uptime"].is_u64());

    // A node with HTTP on lists its endpoints.
    let node = TestNode::builder(Host::new(Echo).summary("I echo what you say"))
        .relay(&url)
        .start()
        .await;
    let http = node.handle.http_addr().expect("HTTP on");
    let address = node.address.to_string();
    let (status, entry) = directory(&url, &address).await;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["address"], address);
    assert_eq!(entry["online"], true);
    assert_eq!(entry["summary"], "I echo what you say");
    assert_eq!(
        entry["endpoints"],
        json!([format!("http://{http}"), format!("ws://{http}/ws")])
    );
    let seen = entry["last_seen"].as_str().expect("last_seen");
    assert!(is_rfc3339_utc(seen), "{seen}");

    let (status, body) = directory(&url, &Identity::generate().address().to_string()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = directory(&url, "not-an-address").await;
    assert_eq!(status, 400);

    // A caller with one session shows in the counts.
    let caller = Identity::generate();
    let mut ws = ws_connect(&relay_url(&url).input()).await;
    send(
        &mut ws,
        &input_frame(&caller, node.address, "count me", "c-1"),
    )
    .await;
    assert_eq!(until_final(&mut ws).await["result"], "count me");
    let h = health(&url).await;
    assert_eq!(
        (
            &h["agents_online"],
            &h["agents_known"],
            &h["callers"],
            &h["sessions"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{h}"
    );

    // The node stops: offline, still listed.
    tokio::time::timeout(STEP, node.handle.shutdown())
        .await
        .expect("shutdown bounded")
        .expect("clean shutdown");
    wait_until("the directory to say offline", STEP, || async {
        directory(&url, &address).await.1["online"] == false
    })
    .await;
    let (status, entry) = directory(&url, &address).await;
    assert_eq!(status, 200);
    assert_eq!(entry["summary"], "I echo what you say");
    assert!(is_rfc3339_utc(entry["last_seen"].as_str().unwrap()));
    let h = health(&url).await;
    assert_eq!(
        (&h["agents_online"], &h["agents_known"], &h["sessions"]),
        (&json!(0), &json!(1), &json!(0)),
        "{h}"
    );
    drop(ws);
}

/// A relay that answers the first ANNOUNCE and then goes silent on a socket that stays
/// open, like the far side of a partition: the node must notice and reconnect.
#[tokio::test]
async fn a_node_notices_a_silent_relay_and_reconnects() {
    use futures::{SinkExt as _, StreamExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = connections.clone();
    let black_hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            if ws.next().await.is_some() {
                let _ = ws
                    .send(tokio_tungstenite::tungstenite::Message::text(
                        r#"{"type":"ANNOUNCE_OK"}"#,
                    ))
                    .await;
            }
            held.push(ws); // never read or answer again
        }
    });
    let node = TestNode::builder(Host::new(Echo))
        .http(false)
        .relay(&url)
        .relay_wait(Duration::from_secs(10))
        .start()
        .await;
    let started = std::time::Instant::now();
    while connections.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(70),
            "the node kept a silent relay link for over a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "silent relay noticed and replaced after {:?}",
        started.elapsed()
    );
    node.handle.shutdown().await.unwrap();
    black_hole.abort();
}
