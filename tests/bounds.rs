//! Bounded work per run under a hostile or runaway agent or caller: STREAM chunks are
//! joined and split so their number and size stay bounded, and a run that writes more
//! than `max_output_bytes` is stopped with a clear error.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use async_trait::async_trait;
use common::*;
use oonode::agent::Echo;
use oonode::{Agent, AgentError, CallError, ConnectOptions, Host, Identity, StreamSink, Turn, Via};
use serde_json::{json, Value};

/// Reads frames until the final one; returns the STREAM chunks and the final frame.
async fn run_over_ws(node: &TestNode, prompt: &str) -> (Vec<String>, Value) {
    let mut ws = ws_connect(&node.ws_url()).await;
    ws_send(&mut ws, &json!({"type": "INPUT", "prompt": prompt})).await;
    let mut chunks = Vec::new();
    loop {
        let frame = ws_recv(&mut ws).await.expect("a frame before the end");
        match frame["type"].as_str() {
            Some("STREAM") => chunks.push(frame["chunk"].as_str().unwrap().to_owned()),
            Some("PING") => {}
            _ => return (chunks, frame),
        }
    }
}

/// The issue's measurement: a 100,000-word prompt to echo made 100,000 signed, stored
/// chunks. Now they are joined: far fewer STREAMs, each small, nothing lost.
#[tokio::test]
async fn a_flood_of_tiny_chunks_becomes_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let words: Vec<String> = (0..100_000).map(|i| format!("w{}", i % 10)).collect();
    let prompt = words.join(" ");

    let (chunks, out) = run_over_ws(&node, &prompt).await;
    assert_eq!(out["type"], "OUTPUT", "{}", &out.to_string()[..200]);
    assert_eq!(chunks.concat(), prompt, "every byte streamed, in order");
    assert_eq!(out["chunks"].as_u64(), Some(chunks.len() as u64));
    assert!(
        chunks.len() < 2_000,
        "{} STREAMs for 100,000 words: not joined",
        chunks.len()
    );
    assert!(chunks.iter().all(|c| c.len() <= 64 * 1024));
    node.stop().await;
}

/// Streams without end.
#[derive(Clone)]
struct Runaway;

#[async_trait]
impl Agent for Runaway {
    fn name(&self) -> String {
        "runaway".into()
    }

    async fn run(&mut self, _turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        let line = "x".repeat(1000);
        loop {
            stream.send(line.clone()).await;
            tokio::task::yield_now().await;
        }
    }
}

/// Answers with more than the node allows.
#[derive(Clone)]
struct Verbose;

#[async_trait]
impl Agent for Verbose {
    fn name(&self) -> String {
        "verbose".into()
    }

    async fn run(&mut self, _turn: Turn, _stream: &StreamSink) -> Result<String, AgentError> {
        Ok("y".repeat(300_000))
    }
}

#[tokio::test]
async fn a_run_past_max_output_bytes_is_stopped_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Runaway).max_output_bytes(200_000), dir.path()).await;
    let (chunks, end) = tokio::time::timeout(Duration::from_secs(20), run_over_ws(&node, "go"))
        .await
        .expect("the runaway run is stopped");
    assert_eq!(
        (end["type"].as_str(), end["code"].as_str()),
        (Some("ERROR"), Some("output_too_large")),
        "{end}"
    );
    assert!(end["message"]
        .as_str()
        .unwrap()
        .contains("max_output_bytes"));
    let streamed: usize = chunks.iter().map(String::len).sum();
    assert!(streamed <= 200_000, "{streamed} bytes streamed");
    // The node goes on serving; the session is stored as failed.
    let (status, health) = node.get("/health").await;
    assert_eq!(status, 200, "{health}");
    node.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Verbose).max_output_bytes(200_000), dir.path()).await;
    let (status, body) = node.post(&json!({"prompt": "talk"})).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "output_too_large");
    node.stop().await;
}

/// Sends the head of a POST /input that declares `declared` bytes, then only `sent` of
/// them, and returns what the node answers without waiting for the rest (or None).
async fn answer_to_a_partial_body(node: &TestNode, declared: usize, head: &[u8]) -> Option<String> {
    let addr = node.url.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /input HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // The node may stop reading (and answer) before all of this is written.
    let _ = tcp.write_all(head).await;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// The issue's measurement: a 64 MB prompt was read whole, parsed and run. Now it is
/// refused as soon as its prompt passes the limit, without the rest being sent.
#[tokio::test]
async fn a_64_mb_prompt_is_refused_before_the_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let limit = 512 * 1024; // the default max_prompt_bytes
    let mut head = br#"{"prompt": ""#.to_vec();
    head.extend(std::iter::repeat_n(b'p', limit + 10));
    let answer = answer_to_a_partial_body(&node, 64 * 1024 * 1024, &head)
        .await
        .expect("an answer before the 64 MB were sent");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("max_prompt_bytes"), "{answer}");

    // The same prompt over /ws is refused by the dispatcher's own check.
    let mut ws = ws_connect(&node.ws_url()).await;
    let prompt = "p".repeat(limit + 1);
    ws_send(&mut ws, &json!({"type": "INPUT", "prompt": prompt})).await;
    let reply = ws_recv(&mut ws).await.unwrap();
    assert_eq!(reply["code"], "too_large", "{reply}");

    // One at the limit is fine.
    let (status, body) = node.post(&json!({"prompt": "p".repeat(limit)})).await;
    assert_eq!(
        status,
        200,
        "{}",
        &body.to_string()[..200.min(body.to_string().len())]
    );
    node.stop().await;
}

/// A body whose non-file part is over the envelope limit, or a file over its limit, is
/// refused while it arrives; files beyond the count likewise.
#[tokio::test]
async fn oversize_envelopes_files_and_file_counts_are_refused_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo).max_file_size(1), dir.path()).await;
    let mut head =
        br#"{"prompt": "hi", "session": {"messages": [{"role": "user", "content": ""#.to_vec();
    head.extend(std::iter::repeat_n(b'm', 1024 * 1024 + 10));
    let answer = answer_to_a_partial_body(&node, 5 * 1024 * 1024, &head)
        .await
        .expect("an answer before the whole body");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let mut head =
        br#"{"prompt": "hi", "files": [{"name": "a", "data": "data:text/plain;base64,"#.to_vec();
    head.extend(std::iter::repeat_n(b'A', 1024 * 1024 * 4 / 3 + 1024));
    let answer = answer_to_a_partial_body(&node, 12 * 1024 * 1024, &head)
        .await
        .expect("an answer before the whole body");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("file_too_large"), "{answer}");

    let images: Vec<String> = (0..11)
        .map(|_| "data:image/png;base64,aGk=".into())
        .collect();
    let (status, body) = node.post(&json!({"prompt": "hi", "images": images})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_files")),
        "{body}"
    );
    node.stop().await;
}

/// The issue's measurement: session history grew without bound and every OUTPUT repeated
/// it, so the 4th 120 KB turn over the swarm was a frame its caller could not read. Now
/// the history is trimmed to `max_history_bytes`, and ten 400 KB turns read on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_large_turns_are_readable_on_every_path() {
    let relay = start_relay(relay_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::builder(Host::new(Echo))
        .co_dir(dir.path())
        .swarm(&["/ip4/127.0.0.1/tcp/0"])
        .relay(&relay.url())
        .start()
        .await;
    let address = node.address.to_string();
    let swarm: libp2p::Multiaddr = node.handle.p2p().unwrap().status().listen_addrs[0]
        .parse()
        .unwrap();
    let paths = [
        ConnectOptions::default()
            .endpoint(node.url.clone())
            .via(Via::Direct),
        ConnectOptions::default().bootstrap(swarm).via(Via::P2p),
        ConnectOptions::default().relay(relay.url()).via(Via::Relay),
    ];
    for options in paths {
        let me = Identity::generate();
        let options = options
            .identity(me.clone())
            .reply_timeout(Duration::from_secs(30));
        let mut remote = oonode::connect(&address, options).await.expect("connects");
        let path = remote.path().to_string();
        for turn in 0..10 {
            let prompt = format!("{turn}{}", "t".repeat(400 * 1024));
            let answer = tokio::time::timeout(Duration::from_secs(60), remote.input(&prompt))
                .await
                .unwrap_or_else(|_| panic!("{path}: turn {turn} in time"))
                .unwrap_or_else(|e| panic!("{path}: turn {turn}: {e}"));
            assert_eq!(answer.result.len(), prompt.len(), "{path}: turn {turn}");
        }
        // The history the node keeps is within its limit: the last two turns.
        let reader = oonode::Reader::new(oonode::trust::Caller::Verified(me.address()), None);
        let dispatcher = node.handle.dispatcher();
        let page = dispatcher.sessions(&reader, 10, None).await.unwrap();
        assert_eq!(page.sessions.len(), 1, "{path}");
        let record = dispatcher
            .session(&page.sessions[0].session_id, &reader)
            .await
            .unwrap()
            .expect("the session is stored");
        let messages = record.session["messages"].as_array().unwrap();
        let bytes: usize = messages
            .iter()
            .map(|m| m["content"].as_str().unwrap().len())
            .sum();
        assert!(
            bytes <= 1024 * 1024,
            "{path}: {bytes} bytes of history kept"
        );
        assert_eq!(messages.len(), 2, "{path}");
    }
    node.stop().await;
}

/// An answer over the swarm's reply frame limit reaches the caller as a clear signed
/// error, not as a frame it cannot read; HTTP still returns it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_a_transports_frame_limit_is_a_clear_error_there() {
    #[derive(Clone)]
    struct Huge;
    #[async_trait]
    impl Agent for Huge {
        fn name(&self) -> String {
            "huge".into()
        }
        async fn run(&mut self, _turn: Turn, _stream: &StreamSink) -> Result<String, AgentError> {
            Ok("h".repeat(9 * 1024 * 1024))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::builder(Host::new(Huge).max_output_bytes(16 * 1024 * 1024))
        .co_dir(dir.path())
        .swarm(&["/ip4/127.0.0.1/tcp/0"])
        .start()
        .await;
    let swarm: libp2p::Multiaddr = node.handle.p2p().unwrap().status().listen_addrs[0]
        .parse()
        .unwrap();
    let options = ConnectOptions::default()
        .bootstrap(swarm)
        .via(Via::P2p)
        .identity(Identity::generate());
    let mut remote = oonode::connect(&node.address.to_string(), options)
        .await
        .expect("connects");
    match tokio::time::timeout(Duration::from_secs(60), remote.input("big")).await {
        Ok(Err(CallError::Refused { code, message })) => {
            assert_eq!(code, "too_large", "{message}");
        }
        other => panic!("expected a too_large refusal, got {other:?}"),
    }
    let (status, body) = node.post(&json!({"prompt": "big"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"].as_str().unwrap().len(), 9 * 1024 * 1024);
    node.stop().await;
}

/// The issue's measurement: a partial-header connection and a slow-body connection were
/// still open after 150 s, and 300 idle connections made `/health` time out. Now 300 slow
/// connections are closed within the head/body timeouts and `/health` answers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed_and_the_node_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let addr = node.url.trim_start_matches("http://").to_owned();
    let mut sockets = Vec::new();
    for i in 0..300 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let start: &[u8] = match i % 4 {
            // Half a request head, then nothing.
            0 => b"POST /input HTTP/1.1\r\nhost: x\r\n",
            // A whole head and a few bytes of a long body, then nothing.
            1 => b"POST /input HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"pro",
            // One whole request on a keep-alive connection, then silence.
            2 => b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
            // Connected, silent.
            _ => b"",
        };
        tcp.write_all(start).await.unwrap();
        sockets.push(tcp);
    }
    let began = std::time::Instant::now();
    for _ in 0..3 {
        let (status, _) = tokio::time::timeout(Duration::from_secs(2), node.get("/health"))
            .await
            .expect("/health answers while 300 slow connections are open");
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Every one of them is closed by the node (EOF, after a 408 for stalled bodies)
    // within the 15 s timeouts and some slack.
    let mut stalled_bodies = 0;
    for (i, mut tcp) in sockets.into_iter().enumerate() {
        let left = Duration::from_secs(25).saturating_sub(began.elapsed());
        let mut seen = Vec::new();
        let closed = tokio::time::timeout(left, tcp.read_to_end(&mut seen)).await;
        assert!(
            closed.is_ok(),
            "connection {i} still open after {:?}",
            began.elapsed()
        );
        if String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 408") {
            stalled_bodies += 1;
        }
    }
    assert_eq!(stalled_bodies, 75, "each stalled body got a 408");
    assert!(
        began.elapsed() >= Duration::from_secs(10),
        "not closed early"
    );
    assert_eq!(node.get("/health").await.0, 200);
    node.stop().await;
}
