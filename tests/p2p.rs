//! The libp2p swarm end to end, on 127.0.0.1 only (no relay, no HTTP, no mDNS):
//!
//! 1. a 5-node chain (node i bootstraps to node i-1 only) where every node calls every
//!    other by address through its own swarm — all 20 ordered pairs — with streamed,
//!    verified answers; over QUIC+TCP, QUIC only and TCP only;
//! 2. peers that send an oversize or undecodable frame, or open too many streams at
//!    once, are cut off while well-behaved callers keep getting answers (from 127.0.0.2:
//!    the ban takes 127.0.0.1 with it; `p2p_hostile.rs` tests the per-IP rules);
//! 3. a killed node gives its caller a clear error in bounded time;
//! 4. a 30 s answer streams through (the timeouts are per frame);
//! 5. presence (summary, examples) is found in the DHT by another swarm;
//! 6. the real binary calls over the swarm through a bootstrap peer that is not the target;
//! 7. a taken default swarm port falls back to a free one; a taken explicit one fails.
//!
//! The last two tests are regressions of bugs these tests found (dropped concurrent
//! streams; auto mode hiding the swarm's error).

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{NodeProc, TestNode, BIN, QUIC, TCP};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::Multiaddr;
use oonode::agent::{Echo, Ticker};
use oonode::envelope::{canonical_json, MAX_ENVELOPE_BYTES};
use oonode::{
    connect, Address, Answer, CallError, ConnectOptions, Envelope, Host, Identity, Kind, P2p,
    P2pConfig, Signature, Via,
};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// `wire::MAX_FRAME_BYTES` (the `wire` module is not public).
const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + 256;
/// How long the DHT may take to let a call through (the brief's warm-up).
const WARM_UP: Duration = Duration::from_secs(10);
/// Bound on one call attempt (dialing is bounded by 15 s inside, replies by 10 s a frame).
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Fails the test when `fut` does not finish within `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

/// A node hosted in-process: swarm only (no HTTP, no relay), its own co_dir.
async fn start(host: Host, listen: &[&str], bootstrap: &[Multiaddr]) -> TestNode {
    TestNode::builder(host)
        .http(false)
        .swarm(listen)
        .bootstrap(bootstrap)
        .start()
        .await
}

/// A swarm of its own (a throwaway key), for raw streams and discovery.
async fn caller_swarm(bootstrap: Vec<Multiaddr>) -> (P2p, CancellationToken) {
    let stop = CancellationToken::new();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let p2p = P2p::spawn(keypair, P2pConfig::caller(bootstrap), stop.clone())
        .await
        .expect("caller swarm starts");
    (p2p, stop)
}

/// One call through `options`: connect, stream, verify. Returns the answer and the chunks
/// seen by the callback, as they arrived.
async fn call_once(
    target: Address,
    options: ConnectOptions,
    prompt: &str,
) -> Result<(Answer, Vec<String>), CallError> {
    let mut remote = connect(&target.to_string(), options).await?;
    assert_eq!(remote.path(), "p2p");
    let mut seen = Vec::new();
    let answer = remote
        .input_streaming(prompt, |c| seen.push(c.to_owned()))
        .await?;
    Ok((answer, seen))
}

/// Asserts an Echo answer: the prompt streamed in order (the node joins chunks that come
/// faster than its window), then the whole prompt.
fn assert_echo(answer: &Answer, seen: &[String], prompt: &str) {
    assert!(!answer.chunks.is_empty(), "streamed");
    assert_eq!(answer.chunks.concat(), prompt, "chunks in order");
    assert_eq!(seen, answer.chunks, "chunks streamed to the callback");
    assert_eq!(answer.result, prompt);
    assert!(!answer.session_id.is_empty());
}

/// Calls `target` through `swarm` (a node's own), retrying for up to `WARM_UP` while the
/// DHT fills. Returns how many attempts it took.
async fn call_via_swarm(swarm: &P2p, caller: &Identity, target: Address, prompt: &str) -> u32 {
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let options = ConnectOptions::default()
            .swarm(swarm.clone())
            .via(Via::P2p)
            .identity(caller.clone())
            .reply_timeout(Duration::from_secs(10));
        let result = within(CALL_LIMIT, "a call", call_once(target, options, prompt)).await;
        match result {
            Ok((answer, seen)) => {
                assert_echo(&answer, &seen, prompt);
                return attempts;
            }
            Err(e) if start.elapsed() < WARM_UP => {
                eprintln!(
                    "  call to {} failed (attempt {attempts}): {e}",
                    target.short()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!(
                "call to {} still failing after {attempts} attempts over {:?}: {e:?}",
                target.short(),
                start.elapsed()
            ),
        }
    }
}

/// Starts `n` Echo nodes listening on `listen`, node i bootstrapping to node i-1 only.
async fn chain(n: usize, listen: &[&str]) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = Vec::new();
    for _ in 0..n {
        let bootstrap = nodes.last().map(|p| p.swarm.clone()).unwrap_or_default();
        nodes.push(start(Host::new(Echo), listen, &bootstrap).await);
    }
    nodes
}

/// Every node calls every other through its own swarm; prints the matrix time.
async fn full_matrix(label: &str, listen: &[&str]) {
    let nodes = chain(5, listen).await;
    for node in &nodes {
        for a in &node.swarm {
            let s = a.to_string();
            match listen {
                [QUIC] => assert!(
                    s.contains("/udp/") && s.contains("/quic-v1/") && !s.contains("/tcp/"),
                    "{s} is not QUIC only"
                ),
                [TCP] => assert!(
                    s.contains("/tcp/") && !s.contains("/udp/") && !s.contains("quic"),
                    "{s} is not TCP only"
                ),
                _ => {}
            }
        }
    }
    let start = Instant::now();
    let mut retried = 0;
    for (i, from) in nodes.iter().enumerate() {
        let swarm = from.p2p();
        let caller = Identity::generate();
        for (j, to) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let prompt = format!("hello node {j} from node {i} over {label}");
            let attempts = call_via_swarm(&swarm, &caller, to.address, &prompt).await;
            retried += attempts - 1;
        }
    }
    let took = start.elapsed();
    eprintln!("[{label}] 5-node chain: 20 ordered pairs answered in {took:?} ({retried} retries)");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_five_every_pair_calls_over_quic_and_tcp() {
    within(
        Duration::from_secs(240),
        "matrix",
        full_matrix("quic+tcp", &[QUIC, TCP]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_five_every_pair_calls_over_quic_only() {
    within(
        Duration::from_secs(240),
        "matrix",
        full_matrix("quic", &[QUIC]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_five_every_pair_calls_over_tcp_only() {
    within(
        Duration::from_secs(240),
        "matrix",
        full_matrix("tcp", &[TCP]),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Misbehaving peers.

/// Reads one raw frame: `Ok(None)` on a clean end, `Err` on a reset.
async fn read_raw_frame(stream: &mut libp2p::Stream) -> Result<Option<Envelope>, String> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_be_bytes(len) as usize;
    assert!(len <= MAX_FRAME_BYTES, "the node sent a {len}-byte frame");
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    let value: ciborium::Value = ciborium::from_reader(&body[..]).expect("the node's CBOR");
    let ciborium::Value::Map(entries) = value else {
        panic!("the node's frame is not a CBOR map");
    };
    let mut env = Envelope::unsigned(Map::new(), None);
    for (k, v) in entries {
        match (k.as_text(), v) {
            (Some("p"), ciborium::Value::Bytes(p)) => {
                env.payload = serde_json::from_slice(&p).expect("payload is a JSON object");
            }
            (Some("f"), ciborium::Value::Bytes(f)) => {
                env.from = Some(Address::from_bytes(f.try_into().unwrap()).unwrap());
            }
            (Some("s"), ciborium::Value::Bytes(s)) => {
                env.signature = Some(Signature::from_bytes(&s.try_into().unwrap()));
            }
            other => panic!("unexpected frame field {other:?}"),
        }
    }
    Ok(Some(env))
}

/// Encodes a frame as `wire::encode` does.
fn encode_frame(env: &Envelope) -> Vec<u8> {
    let p = canonical_json(&Value::Object(env.payload.clone()));
    let mut map = vec![(ciborium::Value::Text("p".into()), ciborium::Value::Bytes(p))];
    if let (Some(from), Some(sig)) = (env.from, env.signature) {
        map.push((
            ciborium::Value::Text("f".into()),
            ciborium::Value::Bytes(from.as_bytes().to_vec()),
        ));
        map.push((
            ciborium::Value::Text("s".into()),
            ciborium::Value::Bytes(sig.to_bytes().to_vec()),
        ));
    }
    let mut body = Vec::new();
    ciborium::into_writer(&ciborium::Value::Map(map), &mut body).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// What the node did with a bad frame: its ERROR code, or how the stream ended.
async fn node_reaction(stream: &mut libp2p::Stream, node: Address) -> String {
    match within(Duration::from_secs(10), "reaction", read_raw_frame(stream)).await {
        Ok(Some(env)) => {
            assert_eq!(env.kind(), Some(Kind::Error), "{:?}", env.payload);
            assert_eq!(env.verify().expect("the ERROR is signed"), node);
            format!("ERROR {}", env.str_field("code").unwrap_or("?"))
        }
        Ok(None) => "stream closed".into(),
        Err(e) => format!("stream reset ({e})"),
    }
}

/// Asserts `swarm` gets no answer from `node` (it was cut off); returns the error.
async fn assert_cut_off(swarm: &P2p, node: Address) -> CallError {
    let options = ConnectOptions::default()
        .swarm(swarm.clone())
        .via(Via::P2p)
        .identity(Identity::generate())
        .reply_timeout(Duration::from_secs(5));
    let start = Instant::now();
    match within(
        CALL_LIMIT,
        "a banned call",
        call_once(node, options, "let me in"),
    )
    .await
    {
        Ok((answer, _)) => panic!("a banned peer still got an answer: {:?}", answer.result),
        Err(e) => {
            eprintln!(
                "  banned peer's call failed after {:?}: {e}",
                start.elapsed()
            );
            e
        }
    }
}

/// A well-behaved one-off caller (its own swarm through `bootstrap`) gets its answer. It
/// calls from 127.0.0.2 (its QUIC listener is bound there): the misbehaving peers of
/// these tests get 127.0.0.1 banned along with their keys.
async fn assert_good_caller(bootstrap: &Multiaddr, node: Address, prompt: &str) {
    let stop = CancellationToken::new();
    let mut config = P2pConfig::caller(vec![bootstrap.clone()]);
    config.listen = vec!["/ip4/127.0.0.2/udp/0/quic-v1".parse().unwrap()];
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = P2p::spawn(keypair, config, stop.clone())
        .await
        .expect("caller swarm starts");
    let options = ConnectOptions::default()
        .swarm(swarm)
        .via(Via::P2p)
        .identity(Identity::generate())
        .reply_timeout(Duration::from_secs(10));
    let (answer, seen) = within(CALL_LIMIT, "a good call", call_once(node, options, prompt))
        .await
        .expect("a well-behaved caller still gets answers");
    assert_echo(&answer, &seen, prompt);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_undecodable_frames_get_the_peer_cut_off() {
    within(Duration::from_secs(120), "test", async {
        let node = start(Host::new(Echo), &[QUIC, TCP], &[]).await;
        // A neighbour node that was already talking to it before the trouble. On
        // 127.0.0.3, out of the ban's way: a dial of its own from 127.0.0.1 would fail,
        // and Kademlia would drop the address it dialed from what it tells others.
        let neighbour = start(
            Host::new(Echo),
            &["/ip4/127.0.0.3/udp/0/quic-v1", "/ip4/127.0.0.3/tcp/0"],
            &node.swarm[..1],
        )
        .await;
        let neighbour_id = Identity::generate();
        call_via_swarm(
            &neighbour.p2p(),
            &neighbour_id,
            node.address,
            "before trouble",
        )
        .await;

        // Four misbehaving peers: an oversize length prefix and an undecodable body,
        // each over QUIC and over TCP. All come from 127.0.0.1, whose ban by the first
        // refuses new connections from there: each connects and opens its stream first.
        let oversize = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes().to_vec();
        let body = b"\xff\x00not cbor at all";
        let mut garbage = (body.len() as u32).to_be_bytes().to_vec();
        garbage.extend_from_slice(body);
        let mut opened = Vec::new();
        for (what, frame, code) in [
            ("oversize", &oversize, "too_large"),
            ("undecodable", &garbage, "bad_request"),
        ] {
            for addr in &node.swarm {
                let transport = if addr.to_string().contains("/quic-v1/") {
                    "quic"
                } else {
                    "tcp"
                };
                let (swarm, stop) = caller_swarm(vec![addr.clone()]).await;
                let s = within(Duration::from_secs(20), "open", swarm.open(node.address))
                    .await
                    .expect("stream opens");
                opened.push((what, transport, frame, code, s, swarm, stop));
            }
        }
        let mut bad = Vec::new();
        for (what, transport, frame, code, mut s, swarm, stop) in opened {
            within(Duration::from_secs(5), "write", s.write_all(frame))
                .await
                .unwrap();
            within(Duration::from_secs(5), "flush", s.flush())
                .await
                .unwrap();
            let reaction = node_reaction(&mut s, node.address).await;
            eprintln!("{what} frame over {transport}: the node answered {reaction}");
            assert!(
                reaction == format!("ERROR {code}") || !reaction.starts_with("ERROR"),
                "{reaction}"
            );
            bad.push((format!("{what}/{transport}"), swarm, stop));
        }

        // All are blocked now, and still a few seconds later (the ban lasts 60 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Three rounds over ~7 s: the ban outlives a tick of the 5 s unban timer.
        let banned = Instant::now();
        for round in 0..3 {
            for (who, swarm, _) in &bad {
                let e = assert_cut_off(swarm, node.address).await;
                eprintln!(
                    "  {:?} after the ban: {who} peer refused: {e:?}",
                    banned.elapsed()
                );
            }
            if round < 2 {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }

        // The others keep working: the old neighbour and a new caller.
        call_via_swarm(
            &neighbour.p2p(),
            &neighbour_id,
            node.address,
            "after trouble",
        )
        .await;
        let quic = node.swarm_addr_over("quic-v1");
        assert_good_caller(&quic, node.address, "still here for good callers").await;
        assert_good_caller(
            &neighbour.swarm[0],
            node.address,
            "found through a neighbour",
        )
        .await;

        for (_, _, stop) in bad {
            stop.cancel();
        }
        neighbour.stop().await;
        node.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_concurrent_streams_get_the_peer_cut_off() {
    within(Duration::from_secs(120), "test", async {
        let node = start(Host::new(Echo), &[TCP, QUIC], &[]).await;
        let (flooder, stop) = caller_swarm(vec![node.swarm_addr_over("tcp")]).await;

        // The limit itself is not over it: hold that many streams without an INPUT.
        let limit = oonode::P2pConfig::default().max_streams_per_peer;
        let mut held = Vec::new();
        for i in 0..limit {
            let s = within(Duration::from_secs(20), "open", flooder.open(node.address))
                .await
                .unwrap_or_else(|e| panic!("stream {i} within the limit: {e}"));
            held.push(s);
            // Paced, so the node's accept loop takes every stream (see
            // `concurrent_calls_from_several_peers_all_get_answers`).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Still served: the first held stream carries a real call.
        let me = Identity::generate();
        let session = uuid_like();
        let input = Envelope::sign(
            &me,
            Kind::Input,
            Some(node.address),
            json!({"prompt": "at the limit", "session": {"session_id": session}})
                .as_object()
                .unwrap()
                .clone(),
        );
        let mut first = held.remove(0);
        within(
            Duration::from_secs(5),
            "write",
            first.write_all(&encode_frame(&input)),
        )
        .await
        .unwrap();
        within(Duration::from_secs(5), "flush", first.flush())
            .await
            .unwrap();
        let mut kinds = Vec::new();
        loop {
            match within(Duration::from_secs(10), "reply", read_raw_frame(&mut first)).await {
                Ok(Some(env)) => {
                    assert_eq!(env.verify().unwrap(), node.address);
                    kinds.push(env.kind().unwrap());
                    if env.kind() == Some(Kind::Output) {
                        assert_eq!(env.str_field("result"), Some("at the limit"));
                        break;
                    }
                }
                other => panic!("a call at the limit got {other:?} after {kinds:?}"),
            }
        }
        let (last, streams) = kinds.split_last().unwrap();
        assert_eq!(*last, Kind::Output, "{kinds:?}");
        assert!(
            !streams.is_empty() && streams.iter().all(|k| *k == Kind::Stream),
            "{kinds:?}"
        );
        drop(first);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Now over the limit: 31 held + a few more.
        let flood = Instant::now();
        let mut refused_at = None;
        for i in 0..40 {
            match within(Duration::from_secs(20), "open", flooder.open(node.address)).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    refused_at = Some((i, e.to_string()));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "flood: {} streams held; opening refused at {refused_at:?}",
            held.len()
        );
        // The held streams die with the connection, well before the node's 10 s wait
        // for their INPUT would end them.
        let mut probe = held.remove(0);
        let mut buf = [0u8; 1];
        let ended = within(
            Duration::from_secs(15),
            "held stream ends",
            probe.read(&mut buf),
        )
        .await;
        let cut_after = flood.elapsed();
        eprintln!("held stream ended after {cut_after:?}: {ended:?}");
        assert!(
            matches!(ended, Ok(0) | Err(_)),
            "a held stream got data: {ended:?}"
        );
        assert!(
            cut_after < Duration::from_secs(8),
            "the flood was not cut off (streams only ended by the INPUT timeout): {cut_after:?}"
        );
        drop(held);

        assert_cut_off(&flooder, node.address).await;
        let quic = node.swarm_addr_over("quic-v1");
        assert_good_caller(&quic, node.address, "others still get answers").await;

        stop.cancel();
        node.stop().await;
    })
    .await;
}

fn uuid_like() -> String {
    let id = Identity::generate().address().to_string();
    format!("s-{}", &id[2..18])
}

// ---------------------------------------------------------------------------------------
// A node that dies.

/// Asserts a call error says the agent cannot be reached (not a hang or garbage).
fn assert_unreachable(e: &CallError) {
    assert!(
        matches!(
            e,
            CallError::Offline(_) | CallError::NotInSwarm(_) | CallError::Timeout(_)
        ),
        "unexpected error for a dead node: {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_binary_node_gives_a_clear_error_in_time() {
    within(Duration::from_secs(150), "test", async {
        let dir = tempfile::tempdir().unwrap();
        let mut node = NodeProc::builder(dir.path())
            .args(&["--agent", "echo"])
            .no_http()
            .listen(TCP)
            .ready_within(Duration::from_secs(60))
            .start_async()
            .await;
        let (target, addrs) = (node.address, node.swarm.clone());
        assert_eq!(addrs.len(), 1, "one TCP listener: {addrs:?}");
        assert!(addrs[0].to_string().starts_with("/ip4/127.0.0.1/tcp/"));

        let caller = start(Host::new(Echo), &[TCP], &addrs).await;
        let me = Identity::generate();
        call_via_swarm(&caller.p2p(), &me, target, "are you alive").await;

        node.kill9(); // and reaps it, bounded
        let killed = Instant::now();
        let options = ConnectOptions::default()
            .swarm(caller.p2p())
            .via(Via::P2p)
            .identity(me.clone())
            .reply_timeout(Duration::from_secs(10));
        let err = match within(
            CALL_LIMIT,
            "call",
            call_once(target, options, "still there?"),
        )
        .await
        {
            Ok((a, _)) => panic!("a killed node answered {:?}", a.result),
            Err(e) => e,
        };
        let took = killed.elapsed();
        eprintln!("killed binary (tcp): caller got {err:?} after {took:?}");
        assert_unreachable(&err);
        assert!(took < Duration::from_secs(16), "took {took:?}");

        // And a second call, once the connection is surely gone, fails the same way.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = Instant::now();
        let options = ConnectOptions::default()
            .swarm(caller.p2p())
            .via(Via::P2p)
            .identity(me)
            .reply_timeout(Duration::from_secs(10));
        let err = call_once(target, options, "hello?").await.unwrap_err();
        eprintln!(
            "killed binary (tcp), second call: {err:?} after {:?}",
            again.elapsed()
        );
        assert_unreachable(&err);
        assert!(again.elapsed() < Duration::from_secs(16));

        caller.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shut_down_quic_node_gives_a_clear_error_in_time() {
    within(Duration::from_secs(150), "test", async {
        let target = start(Host::new(Echo), &[QUIC], &[]).await;
        let caller = start(Host::new(Echo), &[QUIC], &target.swarm).await;
        let address = target.address;
        let me = Identity::generate();
        call_via_swarm(&caller.p2p(), &me, address, "are you alive").await;

        target.stop().await;
        let stopped = Instant::now();
        let options = ConnectOptions::default()
            .swarm(caller.p2p())
            .via(Via::P2p)
            .identity(me)
            .reply_timeout(Duration::from_secs(10));
        let err = match within(
            CALL_LIMIT,
            "call",
            call_once(address, options, "still there?"),
        )
        .await
        {
            Ok((a, _)) => panic!("a stopped node answered {:?}", a.result),
            Err(e) => e,
        };
        let took = stopped.elapsed();
        eprintln!("shut-down node (quic): caller got {err:?} after {took:?}");
        assert_unreachable(&err);
        assert!(took < Duration::from_secs(16), "took {took:?}");
        caller.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// A long answer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_stream_completes_over_the_swarm() {
    within(Duration::from_secs(90), "test", async {
        let ticker = Ticker {
            pause: Duration::from_secs(1),
        };
        let node = start(Host::new(ticker), &[QUIC, TCP], &[]).await;
        let words: Vec<String> = (1..=30).map(|i| format!("w{i:02}")).collect();
        let prompt = words.join(" ");
        // A reply timeout well under the answer's length: it is per frame.
        let options = ConnectOptions::default()
            .bootstrap(node.swarm[0].clone())
            .via(Via::P2p)
            .identity(Identity::generate())
            .reply_timeout(Duration::from_secs(5));
        let start = Instant::now();
        let mut arrivals = Vec::new();
        let mut remote = within(
            Duration::from_secs(20),
            "connect",
            connect(&node.address.to_string(), options),
        )
        .await
        .expect("connects over the swarm");
        assert_eq!(remote.path(), "p2p");
        let answer = within(
            Duration::from_secs(60),
            "the long answer",
            remote.input_streaming(&prompt, |c| {
                arrivals.push((c.to_owned(), start.elapsed()));
            }),
        )
        .await
        .expect("the 30 s answer completes");
        let took = start.elapsed();
        eprintln!("30-chunk answer at 1 chunk/s took {took:?}");
        // Each chunk is a word and the space after it.
        let chunk_words: Vec<&str> = answer.chunks.iter().map(|c| c.trim_end()).collect();
        assert_eq!(chunk_words, words);
        assert_eq!(answer.chunks.concat(), prompt);
        assert_eq!(answer.result, prompt);
        let seen: Vec<&String> = arrivals.iter().map(|(c, _)| c).collect();
        assert_eq!(
            seen,
            answer.chunks.iter().collect::<Vec<_>>(),
            "in order, as they came"
        );
        // Streamed as they came, not buffered until the end.
        assert!(arrivals[0].1 < Duration::from_secs(6), "{:?}", arrivals[0]);
        assert!(
            arrivals[29].1 >= Duration::from_secs(29),
            "{:?}",
            arrivals[29]
        );
        assert!(took >= Duration::from_secs(30));
        drop(remote);
        node.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Presence.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_found_by_another_swarm() {
    within(Duration::from_secs(90), "test", async {
        let started = Instant::now();
        let host = Host::new(Echo)
            .summary("I translate")
            .examples(["Translate hello to Spanish"]);
        let speaker = start(host, &[QUIC, TCP], &[]).await;
        let other = start(Host::new(Echo), &[TCP], &speaker.swarm).await;
        // The observer joins through the other node, not through the speaker.
        let (observer, stop) = caller_swarm(other.swarm.clone()).await;
        let wanted = speaker.address.to_string();
        let found = within(Duration::from_secs(30), "presence", async {
            loop {
                let peers = observer.peers().await.expect("peers");
                if let Some(p) = peers.iter().find(|p| p.address == wanted) {
                    if p.summary.is_some() {
                        return p.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        let took = started.elapsed();
        eprintln!("presence found {took:?} after the speaker started: {found:?}");
        assert_eq!(found.summary.as_deref(), Some("I translate"));
        assert_eq!(found.examples, ["Translate hello to Spanish"]);
        assert_eq!(found.peer_id, speaker.p2p().peer_id().to_string());
        assert!(took < Duration::from_secs(20), "took {took:?}");
        stop.cancel();
        other.stop().await;
        speaker.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The real binary as a caller.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_calls_over_the_swarm_through_another_peer() {
    within(Duration::from_secs(120), "test", async {
        let target = start(Host::new(Echo), &[QUIC, TCP], &[]).await;
        let hub = start(Host::new(Echo), &[TCP], &target.swarm).await;
        let caller_dir = tempfile::tempdir().unwrap();
        let prompt = "hello from the binary";
        let mut last = None;
        for attempt in 1..=3 {
            let start = Instant::now();
            let out = within(
                Duration::from_secs(60),
                "oonode call",
                tokio::process::Command::new(BIN)
                    .arg("call")
                    .arg(target.address.to_string())
                    .arg(prompt)
                    .args(["--via", "p2p", "--timeout", "10", "--bootstrap"])
                    .arg(hub.swarm[0].to_string())
                    .arg("--co-dir")
                    .arg(caller_dir.path())
                    .env("RUST_LOG", "warn")
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("oonode call runs");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!(
                "oonode call attempt {attempt}: {:?} in {:?}",
                out.status,
                start.elapsed()
            );
            if out.status.success() {
                // The result is the last line on stdout (chunks may precede it).
                assert_eq!(
                    stdout.trim_end().lines().last(),
                    Some(prompt),
                    "stdout: {stdout}\nstderr: {stderr}"
                );
                last = None;
                break;
            }
            last = Some(format!(
                "{:?}\nstdout: {stdout}\nstderr: {stderr}",
                out.status
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if let Some(failure) = last {
            panic!("oonode call failed 3 times: {failure}");
        }
        hub.stop().await;
        target.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Regressions: concurrent calls from several peers (libp2p-stream hands inbound streams
// over one at a time; the client resends the same signed INPUT), and auto mode's error.

/// Several well-behaved peers, each under its 32-stream limit, call one node at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_from_several_peers_all_get_answers() {
    within(Duration::from_secs(150), "test", async {
        let node = start(Host::new(Echo), &[QUIC, TCP], &[]).await;
        let mut failures = Vec::new();
        for addr in &node.swarm {
            let mut swarms = Vec::new();
            for _ in 0..4 {
                swarms.push(caller_swarm(vec![addr.clone()]).await);
            }
            let mut calls = Vec::new();
            for (k, (swarm, _)) in swarms.iter().enumerate() {
                for i in 0..20 {
                    let (swarm, target) = (swarm.clone(), node.address);
                    calls.push(tokio::spawn(async move {
                        let options = ConnectOptions::default()
                            .swarm(swarm)
                            .via(Via::P2p)
                            .identity(Identity::generate())
                            .reply_timeout(Duration::from_secs(10));
                        let prompt = format!("peer {k} call {i}");
                        let result =
                            tokio::time::timeout(CALL_LIMIT, call_once(target, options, &prompt))
                                .await;
                        match result {
                            Ok(Ok((answer, seen))) => {
                                assert_echo(&answer, &seen, &prompt);
                                None
                            }
                            Ok(Err(e)) => Some(format!("{e}")),
                            Err(_) => Some("no answer in time".into()),
                        }
                    }));
                }
            }
            let mut failed = Vec::new();
            for call in calls {
                if let Some(e) = within(CALL_LIMIT, "call task", call).await.unwrap() {
                    failed.push(e);
                }
            }
            eprintln!(
                "{addr}: {} of 80 concurrent calls failed, e.g. {:?}",
                failed.len(),
                failed.first()
            );
            failures.extend(failed);
            for (_, stop) in swarms {
                stop.cancel();
            }
        }
        node.stop().await;
        assert!(
            failures.is_empty(),
            "{} of 160 concurrent calls failed",
            failures.len()
        );
    })
    .await;
}

/// In auto mode (the brief's `ConnectOptions::default().swarm(..)`), a call to a node
/// that went away names the swarm's verdict, not a path that never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_reports_the_swarm_error_for_a_dead_node() {
    within(Duration::from_secs(90), "test", async {
        let target = start(Host::new(Echo), &[TCP], &[]).await;
        let caller = start(Host::new(Echo), &[TCP], &target.swarm).await;
        let address = target.address;
        let options = || {
            ConnectOptions::default()
                .swarm(caller.p2p())
                .identity(Identity::generate())
                .reply_timeout(Duration::from_secs(10))
        };
        let (answer, seen) = within(
            CALL_LIMIT,
            "call",
            call_once(address, options(), "hi there"),
        )
        .await
        .expect("auto mode finds the swarm path");
        assert_echo(&answer, &seen, "hi there");

        target.stop().await;
        let err = match within(CALL_LIMIT, "call", call_once(address, options(), "still?")).await {
            Ok((a, _)) => panic!("a stopped node answered {:?}", a.result),
            Err(e) => e,
        };
        eprintln!("auto mode, stopped node: {err:?}");
        caller.stop().await;
        assert_unreachable(&err);
    })
    .await;
}

/// A default listen address whose port is taken falls back to a free port (a second node
/// on one machine); one given explicitly fails, naming it. The port is held by a plain
/// socket, as another node's listener would hold it (libp2p's own set SO_REUSEPORT, which
/// would otherwise let two swarms share a port silently).
#[tokio::test]
async fn a_taken_default_swarm_port_falls_back_and_an_explicit_one_fails() {
    within(Duration::from_secs(30), "test", async {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let taken: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let spawn = |fallback: bool| {
            let mut config = P2pConfig::default();
            config.listen = vec![taken.clone()];
            config.listen_fallback = fallback;
            let stop = CancellationToken::new();
            let keypair = libp2p::identity::Keypair::generate_ed25519();
            async move { (P2p::spawn(keypair, config, stop.clone()).await, stop) }
        };

        let (swarm, stop) = spawn(true).await;
        let swarm = swarm.expect("falls back to a free port");
        let addrs = swarm.listening(Duration::from_secs(5)).await;
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        assert!(addrs[0].starts_with("/ip4/127.0.0.1/tcp/"), "{addrs:?}");
        assert!(!addrs[0].contains(&format!("/tcp/{port}/")), "{addrs:?}");
        stop.cancel();

        let (swarm, _stop) = spawn(false).await;
        let err = swarm.expect_err("an explicit port is used or start-up fails");
        assert!(err.to_string().contains(&taken.to_string()), "{err}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// DNS bootstrap addresses and external addresses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_bootstrap_address_joins_and_an_external_address_is_advertised() {
    within(Duration::from_secs(90), "test", async {
        let a = start(Host::new(Echo), &[TCP], &[]).await;
        // A's TCP address with its IP written as a name the system resolves.
        let by_name: Multiaddr = a
            .swarm_addr_over("tcp")
            .to_string()
            .replace("/ip4/127.0.0.1/", "/dns4/localhost/")
            .parse()
            .unwrap();
        let outside = "/ip4/198.51.100.7/tcp/4001";
        let b = start(
            Host::new(Echo).external_addrs([outside]),
            &[TCP],
            &[by_name],
        )
        .await;
        // B knows A only by that name: a call from B's own swarm finds it.
        let swarm = b.handle.p2p().expect("B has a swarm").clone();
        call_via_swarm(&swarm, &Identity::generate(), a.address, "found by name").await;
        // A learns B's external address from B itself (identify), as its peers would.
        let a_swarm = a.handle.p2p().expect("A has a swarm").clone();
        let start = Instant::now();
        loop {
            let peers = a_swarm.peers().await.expect("A's view");
            let b_view = peers.iter().find(|p| p.address == b.address.to_string());
            if b_view.is_some_and(|p| p.addrs.iter().any(|x| x.starts_with(outside))) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "A never lists {outside} for B: {b_view:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        b.stop().await;
        a.stop().await;
    })
    .await;
}
