//! WebSocket `/ws`: streaming, multi-turn on one socket, resume after a sequence number,
//! CONNECT/SEAL shapes of the Python client, keep-alive, and many clients at once.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use oonode::agent::{Echo, Ticker, Translator};
use oonode::envelope::unix_now;
use oonode::{Address, Envelope, Host, Identity};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(node: &TestNode) -> Socket {
    let url = node.ws_url();
    let (socket, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    socket
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

/// The next JSON frame, skipping keep-alive PINGs.
async fn recv(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(STEP, socket.next())
            .await
            .expect("no frame within the step timeout")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).expect("JSON frame");
            if v["type"] != "PING" {
                return v;
            }
        }
    }
}

/// Reads STREAM frames until OUTPUT or ERROR; checks every frame is signed by `node`.
async fn collect(socket: &mut Socket, node: Address) -> (Vec<(u64, String)>, Value) {
    let mut chunks = Vec::new();
    loop {
        let frame = recv(socket).await;
        verified_reply(&frame, node);
        match frame["type"].as_str() {
            Some("STREAM") => chunks.push((
                frame["seq"].as_u64().unwrap(),
                frame["chunk"].as_str().unwrap().to_string(),
            )),
            Some("OUTPUT") | Some("ERROR") => return (chunks, frame),
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
}

fn ticker(ms: u64) -> Host {
    Host::new(Ticker {
        pause: Duration::from_millis(ms),
    })
}

#[tokio::test]
async fn streams_chunks_in_order_then_output_and_continues_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(20), dir.path()).await;
    let mut ws = connect(&node).await;

    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "one two three"}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(
        chunks,
        vec![(1, "one ".into()), (2, "two ".into()), (3, "three".into())],
        "each chunk keeps the space after its word"
    );
    assert_eq!(out["type"], "OUTPUT");
    assert_eq!(out["result"], "one two three");
    assert_eq!(out["chunks"], 3);
    let session_id = out["session_id"].as_str().unwrap().to_string();

    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "four five"}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(chunks.len(), 2);
    assert_eq!(
        out["session_id"],
        session_id.as_str(),
        "the second INPUT continues the session"
    );
    assert!(
        out["session"].get("messages").is_none(),
        "the node keeps it: {out}"
    );
    let (_, kept) = node
        .get_with_secret(&format!("/sessions/{session_id}"), SECRET)
        .await;
    assert_eq!(
        kept["session"]["messages"].as_array().unwrap().len(),
        4,
        "{kept}"
    );
    node.stop().await;
}

#[tokio::test]
async fn the_translator_remembers_across_turns_on_one_socket() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Translator), dir.path()).await;
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "Translate hello to Spanish"}),
    )
    .await;
    assert_eq!(collect(&mut ws, node.address).await.1["result"], "Hola");
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "My name is John"}),
    )
    .await;
    collect(&mut ws, node.address).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "What is my name?"}),
    )
    .await;
    assert_eq!(
        collect(&mut ws, node.address).await.1["result"],
        "Your name is John"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_the_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(100), dir.path()).await;
    let words: Vec<String> = (1..=10).map(|i| format!("w{i}")).collect();

    // Read three chunks of a running session, then drop the connection.
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": words.join(" "), "session_id": "resume-me"}),
    )
    .await;
    for expected in 1..=3 {
        let frame = recv(&mut ws).await;
        assert_eq!(frame["seq"], expected);
    }
    drop(ws);

    // While it still runs: everything after 3, then live chunks, then OUTPUT.
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "RESUME", "session_secret": SECRET, "session_id": "resume-me", "after": 3}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    let seqs: Vec<u64> = chunks.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (4..=10).collect::<Vec<_>>(), "no gap, no duplicate");
    assert_eq!(chunks[0].1, "w4 ");
    assert_eq!(out["result"], words.join(" "));

    // After it finished: the same from the store.
    send(
        &mut ws,
        json!({"type": "RESUME", "session_secret": SECRET, "session_id": "resume-me", "after": 7}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(
        chunks.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert_eq!(out["type"], "OUTPUT");

    send(
        &mut ws,
        json!({"type": "RESUME", "session_secret": SECRET, "session_id": "nope", "after": 0}),
    )
    .await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("ERROR"), Some("not_found"))
    );
    node.stop().await;
}

/// An HTTP caller takes no STREAMs, so the node keeps them unsigned until someone reads
/// them: a client that resumes the session gets every one signed, while the turn runs
/// and after it has ended.
#[tokio::test]
async fn streams_of_an_http_turn_come_signed_to_a_resuming_client() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(150), dir.path()).await;
    let words: Vec<String> = (1..=6).map(|i| format!("h{i}")).collect();
    let prompt = words.join(" ");
    let body = json!({"prompt": prompt, "session_secret": SECRET});
    let url = format!("{}/input", node.url);
    let answer = tokio::spawn(async move { post_json(&url, &body).await });
    // While the turn runs: resume from the start.
    let session = loop {
        let (status, page) = node.get_with_secret("/sessions", SECRET).await;
        assert_eq!(status, 200, "{page}");
        if let Some(id) = page["sessions"][0]["session_id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut ws = connect(&node).await;
    let resume = |after: u64| json!({"type": "RESUME", "session_secret": SECRET, "session_id": session, "after": after});
    send(&mut ws, resume(0)).await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(
        chunks.iter().map(|(_, c)| c.as_str()).collect::<String>(),
        prompt
    );
    assert_eq!(out["result"], prompt);
    let (status, answer) = answer.await.unwrap();
    assert_eq!(
        (status, &answer["result"]),
        (200, &json!(prompt)),
        "{answer}"
    );
    // After it has ended: from the store.
    send(&mut ws, resume(2)).await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(chunks.len(), words.len() - 2, "{chunks:?}");
    assert_eq!(out["type"], "OUTPUT");
    node.stop().await;
}

#[tokio::test]
async fn a_closed_socket_cancels_nothing_that_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(50), dir.path()).await;
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "a b c d e f", "session_id": "orphan"}),
    )
    .await;
    let first = recv(&mut ws).await;
    assert_eq!(first["type"], "STREAM");
    ws.close(None).await.ok();
    drop(ws);
    let mut done = Value::Null;
    for _ in 0..100 {
        done = node.get_with_secret("/sessions/orphan", SECRET).await.1;
        if done["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["result"], "a b c d e f");
    node.stop().await;
}

#[tokio::test]
async fn python_client_shapes_connect_seal_ping() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        Host::new(Echo).trust(oonode::TrustLevel::Strict),
        dir.path(),
    )
    .await;
    let caller = Identity::from_seed([41; 32]);
    // A SEAL that does not check out ends its socket: no clear-text retry on it.
    let mut bad = connect(&node).await;
    send(&mut bad, json!({"type": "SEAL", "to": node.address.to_string(), "from": caller.address().to_string()})).await;
    let err = recv(&mut bad).await;
    assert_eq!(err["type"], "ERROR");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("seal refused: SEAL is missing `timestamp`"),
        "{message}"
    );
    assert_eq!(
        ws_recv_within(&mut bad, STEP).await,
        Ok(None),
        "closed after a bad SEAL"
    );

    let mut ws = connect(&node).await;
    send(&mut ws, json!({"type": "PING"})).await;
    assert_eq!(recv(&mut ws).await["type"], "PONG");
    // SEAL after the first frame is refused; the socket goes on in the clear.
    send(
        &mut ws,
        json!({"type": "SEAL", "to": node.address.to_string()}),
    )
    .await;
    let err = recv(&mut ws).await;
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("SEAL must be the socket's first frame"));

    // Signed CONNECT (Python shape), then a signed INPUT.
    let ts = unix_now();
    let payload = json!({"to": node.address.to_string(), "timestamp": ts, "signed_commands": 1});
    let sig = caller.sign(&oonode::envelope::canonical_json(&payload));
    let connect_frame = json!({
        "type": "CONNECT", "timestamp": ts, "to": node.address.to_string(),
        "payload": payload, "from": caller.address().to_string(), "signature": hex_sig(&sig.to_bytes()),
    });
    send(&mut ws, connect_frame.clone()).await;
    let connected = recv(&mut ws).await;
    assert_eq!(
        (connected["type"].as_str(), connected["status"].as_str()),
        (Some("CONNECTED"), Some("new"))
    );
    let session_id = connected["session_id"].as_str().unwrap().to_string();
    // The node chose it, as it chooses an INPUT's: a UUIDv7 (`dispatch::new_session_id`).
    assert_eq!(
        uuid::Uuid::parse_str(&session_id)
            .unwrap()
            .get_version_num(),
        7,
        "{session_id}"
    );

    let mut input = python_style_input(&caller, node.address, "hello there", unix_now());
    input["type"] = json!("INPUT");
    send(&mut ws, input).await;
    let (_, out) = collect(&mut ws, node.address).await;
    assert_eq!(out["result"], "hello there");
    assert_eq!(
        out["session_id"],
        session_id.as_str(),
        "INPUT joins the CONNECTed session"
    );
    let env = Envelope::from_flat(out.as_object().unwrap()).unwrap();
    assert_eq!(env.to().unwrap(), Some(caller.address()));

    // An unsigned INPUT on a strict node is refused; CONNECT signatures are single-use.
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "hi"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "signature_required");
    send(&mut ws, connect_frame).await;
    assert_eq!(recv(&mut ws).await["code"], "replayed");

    // Garbage and unknown frames get an ERROR; the socket keeps working.
    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(recv(&mut ws).await["code"], "invalid_json");
    send(&mut ws, json!({"type": "DANCE"})).await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"type": "PING"})).await;
    assert_eq!(recv(&mut ws).await["type"], "PONG");
    node.stop().await;
}

#[tokio::test]
async fn five_hundred_concurrent_clients_each_get_their_own_output() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo).workers(8).max_queue(1000), dir.path()).await;
    let url = node.ws_url();
    let started = std::time::Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..500 {
        let url = url.clone();
        let address = node.address;
        clients.spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            let prompt = format!("client {i} says hi");
            send(
                &mut ws,
                json!({"type": "INPUT", "session_secret": SECRET, "prompt": prompt}),
            )
            .await;
            let (chunks, out) = collect(&mut ws, address).await;
            assert_eq!(
                out["result"], prompt,
                "client {i} got someone else's answer"
            );
            let streamed: String = chunks.into_iter().map(|(_, c)| c).collect();
            assert_eq!(streamed, prompt);
            i
        });
    }
    let mut done = 0;
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(60), clients.join_next())
        .await
        .expect("500 clients within 60 s")
    {
        joined.expect("client task");
        done += 1;
    }
    assert_eq!(done, 500);
    eprintln!("500 WS clients answered in {:?}", started.elapsed());
    node.stop().await;
}

/// Uploads: a tiny PNG and a text file as data URLs.
fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[tokio::test]
async fn files_within_limits_reach_the_agent_over_http_and_ws() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        Host::new(Echo).max_file_size(1).max_files_per_request(10),
        dir.path(),
    )
    .await;
    let (status, body) = node
        .post(&json!({
            "prompt": "look",
            "files": [{"name": "notes.txt", "data": data_url("text/plain", b"hello file")}],
            "images": [data_url("image/png", &[0x89, b'P', b'N', b'G'])],
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        "look\nfiles: notes.txt (10 bytes), image-0.png (4 bytes)"
    );
    let saved = upload_dir_with(&dir.path().join("oonode/uploads"), "00-notes.txt");
    let mut names: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["00-notes.txt", "01-image-0.png"]);
    assert_eq!(
        std::fs::read(saved.join("00-notes.txt")).unwrap(),
        b"hello file"
    );

    let mut ws = connect(&node).await;
    send(&mut ws, json!({"type": "INPUT", "session_secret": SECRET, "prompt": "ws", "files": [{"name": "../../evil.sh", "data": data_url("text/plain", b"x")}]})).await;
    let (_, out) = collect(&mut ws, node.address).await;
    assert_eq!(out["result"], "ws\nfiles: ../../evil.sh (1 bytes)");
    assert!(
        upload_dir_with(&dir.path().join("oonode/uploads"), "00-evil.sh").is_dir(),
        "the name is made safe"
    );
    node.stop().await;
}

/// The one session folder under `uploads` that holds `file` (folders are named by a
/// digest of the session's scope and id).
fn upload_dir_with(uploads: &std::path::Path, file: &str) -> std::path::PathBuf {
    let dirs: Vec<_> = std::fs::read_dir(uploads)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join(file).exists())
        .collect();
    assert_eq!(dirs.len(), 1, "one session folder holds {file}: {dirs:?}");
    dirs[0].clone()
}

#[tokio::test]
async fn too_many_or_too_large_files_are_refused_naming_the_limit_and_nothing_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        Host::new(Echo).max_file_size(1).max_files_per_request(10),
        dir.path(),
    )
    .await;
    let small = json!({"name": "a.txt", "data": data_url("text/plain", b"a")});
    let eleven: Vec<Value> = (0..11).map(|_| small.clone()).collect();
    let (status, body) = node.post(&json!({"prompt": "x", "files": eleven})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_files")),
        "{body}"
    );
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("max_files_per_request is 10"));

    let big = vec![7u8; 1024 * 1024 + 1];
    let (status, body) = node
        .post(&json!({"prompt": "x", "files": [{"name": "big.bin", "data": data_url("application/octet-stream", &big)}]}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("file_too_large")),
        "{body}"
    );
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("max_file_size (1 MB)"));

    let (status, body) = node
        .post(&json!({"prompt": "x", "files": [{"name": "a", "data": "not a data url"}]}))
        .await;
    assert_eq!(status, 400, "{body}");

    // Over WS the same verdict comes as an ERROR frame.
    let mut ws = connect(&node).await;
    let eleven: Vec<Value> = (0..11).map(|_| small.clone()).collect();
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "x", "files": eleven}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "too_many_files");

    assert!(
        !dir.path().join("oonode/uploads").exists(),
        "nothing saved for refused requests"
    );
    assert_eq!(node.get("/sessions").await.1["sessions"], json!([]));
    node.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_run_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    // An agent that streams far more than any queue holds.
    #[derive(Clone)]
    struct Firehose;
    #[oonode::async_trait]
    impl oonode::Agent for Firehose {
        fn name(&self) -> String {
            "firehose".into()
        }
        async fn run(
            &mut self,
            _: oonode::Turn,
            s: &oonode::StreamSink,
        ) -> Result<String, oonode::AgentError> {
            let chunk = "x".repeat(16 * 1024);
            for _ in 0..1500 {
                s.send(chunk.clone()).await;
            }
            Ok("finished".into())
        }
    }
    // 1500 × 16 KiB: more than the default max_output_bytes allows.
    let host = Host::new(Firehose).max_output_bytes(64 * 1024 * 1024);
    let node = TestNode::start(host, dir.path()).await;
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "go", "session_id": "firehose"}),
    )
    .await;
    // Never read again. The node must not buffer 24 MB for us: it cuts us off and the
    // run completes on its own.
    let mut rec = Value::Null;
    for _ in 0..600 {
        rec = node.get_with_secret("/sessions/firehose", SECRET).await.1;
        if rec["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rec["status"], "done", "{rec}");
    assert_eq!(rec["result"], "finished");
    drop(ws);
    node.stop().await;
}

/// Chunks an agent writes together (echo writes every word at once) go out as one
/// STREAM, at once; chunks that come apart in time (the ticker's) stay apart, as
/// `streams_chunks_in_order_then_output_and_continues_on_the_same_socket` shows.
#[tokio::test]
async fn chunks_written_together_go_out_as_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "one two three", "session_id": "together"}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    assert_eq!(chunks, vec![(1, "one two three".to_string())]);
    assert_eq!(out["chunks"], 1, "{out}");
    assert_eq!(out["result"], "one two three");
    node.stop().await;
}

/// A caller that floods one socket with requests faster than they end: the socket holds
/// at most 16 in flight (INPUTs and RESUMEs alike), refuses the next with a clear error,
/// and takes new ones again as the earlier ones end.
#[tokio::test]
async fn one_socket_holds_at_most_sixteen_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(300).workers(16), dir.path()).await;
    let mut ws = connect(&node).await;
    for i in 0..16 {
        send(
            &mut ws,
            json!({"type": "INPUT", "session_secret": SECRET, "prompt": "a b", "session_id": format!("flood-{i}")}),
        )
        .await;
    }
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "one more", "session_id": "flood-16"}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "RESUME", "session_secret": SECRET, "session_id": "flood-0", "after": 0}),
    )
    .await;
    let (mut outputs, mut refused) = (0, Vec::new());
    while outputs < 16 {
        let frame = recv(&mut ws).await;
        match frame["type"].as_str() {
            Some("STREAM") => {}
            Some("OUTPUT") => outputs += 1,
            Some("ERROR") => refused.push(frame),
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
    assert_eq!(refused.len(), 2, "{refused:?}");
    for r in &refused {
        assert_eq!(r["code"], "bad_request", "{r}");
        let message = r["message"].as_str().unwrap_or_default();
        assert!(message.contains("in flight on this socket (max 16)"), "{r}");
    }
    let (status, rec) = node.get_with_secret("/sessions/flood-16", SECRET).await;
    assert_eq!(status, 404, "the refused INPUT started nothing: {rec}");
    // All ended: the socket takes a request again.
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "after", "session_id": "flood-17"}),
    )
    .await;
    let (_, out) = collect(&mut ws, node.address).await;
    assert_eq!(out["type"], "OUTPUT", "{out}");
    assert_eq!(out["result"], "after");
    node.stop().await;
}

#[tokio::test]
async fn resume_during_a_later_turn_returns_only_that_turns_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(ticker(100), dir.path()).await;
    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "one two three four five six", "session_id": "turns"}),
    )
    .await;
    assert_eq!(
        collect(&mut ws, node.address).await.1["result"],
        "one two three four five six"
    );

    // Turn 2: read two chunks, then drop the connection.
    send(
        &mut ws,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "alpha beta gamma delta"}),
    )
    .await;
    for seq in 1..=2 {
        assert_eq!(recv(&mut ws).await["seq"], seq);
    }
    drop(ws);

    let mut ws = connect(&node).await;
    send(
        &mut ws,
        json!({"type": "RESUME", "session_secret": SECRET, "session_id": "turns", "after": 2}),
    )
    .await;
    let (chunks, out) = collect(&mut ws, node.address).await;
    let words: Vec<&str> = chunks.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        words,
        vec!["gamma ", "delta"],
        "only the running turn's chunks"
    );
    assert_eq!(out["result"], "alpha beta gamma delta");
    node.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_gets_a_clear_error_before_the_socket_closes() {
    let dir = tempfile::tempdir().unwrap();
    // Body (and frame) limit: 1 MiB + 4/3 of 1 MiB.
    let node = TestNode::start(
        Host::new(Echo).max_file_size(1).max_files_per_request(1),
        dir.path(),
    )
    .await;
    let mut ws = connect(&node).await;
    let huge = "x".repeat(3 * 1024 * 1024);
    let _ = ws
        .send(Message::text(
            json!({"type": "INPUT", "session_secret": SECRET, "prompt": huge}).to_string(),
        ))
        .await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("ERROR"), Some("too_large")),
        "{err}"
    );
    // Others are unaffected.
    let mut other = connect(&node).await;
    send(
        &mut other,
        json!({"type": "INPUT", "session_secret": SECRET, "prompt": "still fine"}),
    )
    .await;
    assert_eq!(
        collect(&mut other, node.address).await.1["result"],
        "still fine"
    );
    node.stop().await;
}
