//! SEAL, played by the attacker: a relay that records or tampers with sealed traffic, a
//! caller that replays or forges sealed frames, an impostor that cannot sign the
//! agent's half of the handshake, and a peer that sends unsigned answers outside a seal.
//!
//! Everything listens on 127.0.0.1 and every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    free_port, relay_config, start_relay, ws_connect, ws_recv, ws_recv_within, ws_send, Socket,
    TestNode, STEP,
};
use futures::SinkExt;
use oonode::agent::Echo;
use oonode::envelope::{canonical_json, unix_now};
use oonode::proto::seal::{self, SealOffer, SealedChannel};
use oonode::{Address, CallError, ConnectOptions, Host, Identity, Via};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A TCP proxy that keeps every byte it passes, both ways: what a relay operator, or
/// anyone on the path, would see.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start(upstream: SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, log.clone()));
                tokio::spawn(pipe(sr, cw, log.clone()));
            }
        });
        Recorder { addr, seen }
    }

    fn saw(&self, needle: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        log.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_relay_in_the_middle_reads_nothing_of_a_sealed_call() {
    // The recorder is the relay's public face: node and callers both go through it.
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tap = Recorder::start(relay_addr).await;
    let public = format!("ws://{}", tap.addr);
    let _relay = start_relay(
        relay_config()
            .listen(relay_addr)
            .public_url(public.parse().unwrap()),
    )
    .await;
    let node = TestNode::builder(Host::new(Echo))
        .http(false)
        .relay(&public)
        .start()
        .await;

    let marker = format!("SEALED-MARKER-{}", uuid::Uuid::new_v4().simple());
    let options = ConnectOptions::default()
        .relay(&public)
        .via(Via::Relay)
        .identity(Identity::generate())
        .reply_timeout(STEP);
    let mut remote =
        tokio::time::timeout(STEP, oonode::connect(&node.address.to_string(), options))
            .await
            .unwrap()
            .unwrap();
    assert!(remote.sealed(), "our node seals relayed sessions");
    let answer = tokio::time::timeout(STEP, remote.input(&marker))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.result, marker);
    // A second turn on the same sealed socket continues the session.
    let again = tokio::time::timeout(STEP, remote.input("second"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.session_id, answer.session_id);
    assert!(
        !tap.saw(&marker) && !tap.saw("second"),
        "a prompt or result went through the relay in the clear"
    );

    // The control: the same relay path without a seal shows the prompt, so the check
    // above can fail.
    let clear = format!("CLEAR-MARKER-{}", uuid::Uuid::new_v4().simple());
    let mut ws = ws_connect(&format!("{public}/ws/input")).await;
    let caller = Identity::generate();
    ws_send(
        &mut ws,
        &common::input_frame(&caller, node.address, &clear, "clear-session"),
    )
    .await;
    loop {
        let frame = ws_recv(&mut ws).await.expect("an answer");
        if frame["type"] == "OUTPUT" {
            assert_eq!(frame["result"], clear.as_str());
            break;
        }
    }
    assert!(tap.saw(&clear), "the recorder sees clear-text calls");
}

/// A raw sealed socket to `url` (a node's `/ws`), as `caller`: the handshake done.
async fn sealed_socket(url: &str, caller: &Identity, node: Address) -> (Socket, SealedChannel) {
    let mut ws = ws_connect(url).await;
    let offer = SealOffer::new(caller, node, unix_now());
    ws.send(Message::text(offer.frame())).await.unwrap();
    let reply = ws_recv(&mut ws).await.expect("SEALED_OK");
    let channel = offer
        .finish(reply.as_object().unwrap())
        .expect("a SEALED_OK signed by the node");
    (ws, channel)
}

fn open(channel: &mut SealedChannel, frame: &Value) -> Value {
    let clear = channel
        .recv
        .open(frame.as_object().unwrap())
        .expect("opens");
    serde_json::from_slice(&clear).unwrap()
}

/// A signed CONNECT (the Python client's shape).
fn connect_frame(caller: &Identity, node: Address) -> Value {
    let payload = json!({"to": node.to_string(), "timestamp": unix_now(), "signed_commands": 1,
        "nonce": uuid::Uuid::new_v4().to_string()});
    let sig = caller.sign(&canonical_json(&payload));
    json!({"type": "CONNECT", "payload": payload, "from": caller.address().to_string(),
        "signature": hex::encode(sig.to_bytes())})
}

#[tokio::test]
async fn replayed_reordered_forged_or_foreign_frames_end_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let url = node.ws_url();
    let me = Identity::generate();

    // A sealed CONNECT, then a signed INPUT: answered inside the seal.
    let (mut ws, mut ch) = sealed_socket(&url, &me, node.address).await;
    let connect = ch
        .send
        .seal(&connect_frame(&me, node.address).to_string(), None);
    ws.send(Message::text(connect.clone())).await.unwrap();
    let connected = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
    assert_eq!(connected["type"], "CONNECTED");
    let input = common::input_frame(&me, node.address, "inside", "sealed-session");
    ws.send(Message::text(ch.send.seal(&input.to_string(), None)))
        .await
        .unwrap();
    let out = loop {
        let f = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
        if f["type"] == "OUTPUT" {
            break f;
        }
    };
    assert_eq!(out["result"], "inside");

    // A signed frame of someone else's inside my seal: refused, the socket goes on.
    let stranger = Identity::generate();
    let foreign = common::input_frame(&stranger, node.address, "not mine", "sealed-session");
    ws.send(Message::text(ch.send.seal(&foreign.to_string(), None)))
        .await
        .unwrap();
    let err = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("signed by whoever sealed it"),
        "{err}"
    );

    // The first sealed frame again (n = 1): a replay ends the socket.
    ws.send(Message::text(connect)).await.unwrap();
    let err = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
    assert!(
        err["message"].as_str().unwrap().contains("out of order"),
        "{err}"
    );
    assert_eq!(ws_recv_within(&mut ws, STEP).await, Ok(None));

    // One bit changed in transit: the frame does not open, the socket ends.
    let (mut ws, mut ch) = sealed_socket(&url, &me, node.address).await;
    let mut frame: Value = serde_json::from_str(
        &ch.send
            .seal(&connect_frame(&me, node.address).to_string(), None),
    )
    .unwrap();
    let c = frame["c"].as_str().unwrap().to_string();
    let flipped = if c.starts_with('A') { "B" } else { "A" };
    frame["c"] = json!(format!("{flipped}{}", &c[1..]));
    ws_send(&mut ws, &frame).await;
    let err = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
    assert!(
        err["message"].as_str().unwrap().contains("does not open"),
        "{err}"
    );
    assert_eq!(ws_recv_within(&mut ws, STEP).await, Ok(None));

    // A clear frame on a sealed socket is not taken either.
    let (mut ws, _ch) = sealed_socket(&url, &me, node.address).await;
    ws_send(&mut ws, &connect_frame(&me, node.address)).await;
    let err = ws_recv(&mut ws).await.unwrap();
    assert_eq!(err["type"], "SEALED", "the refusal is sealed too");
    assert_eq!(ws_recv_within(&mut ws, STEP).await, Ok(None));

    // A stale SEAL, and one for another node: refused, and the socket ends.
    for (offer, why) in [
        (
            SealOffer::new(&me, node.address, unix_now() - 400),
            "SEAL is stale",
        ),
        (
            SealOffer::new(&me, Identity::generate().address(), unix_now()),
            "addressed to another host",
        ),
    ] {
        let mut ws = ws_connect(&url).await;
        ws.send(Message::text(offer.frame())).await.unwrap();
        let err = ws_recv(&mut ws).await.unwrap();
        assert!(err["message"].as_str().unwrap().contains(why), "{err}");
        assert_eq!(ws_recv_within(&mut ws, STEP).await, Ok(None));
    }
}

#[tokio::test]
async fn relayed_sealed_sessions_refuse_replays_too() {
    let relay = start_relay(relay_config()).await;
    let node = TestNode::builder(Host::new(Echo))
        .http(false)
        .relay(&relay.url())
        .start()
        .await;
    let me = Identity::generate();
    let mut ws = ws_connect(&format!("{}/ws/input", relay.url())).await;
    let offer = SealOffer::new(&me, node.address, unix_now());
    ws.send(Message::text(offer.frame())).await.unwrap();
    let reply = ws_recv(&mut ws).await.unwrap();
    assert!(reply["session_id"].is_string(), "the relay routes by it");
    let mut ch = offer.finish(reply.as_object().unwrap()).unwrap();

    // SEALED frames name no agent: the relay forwards them on the socket's session.
    let connect = ch
        .send
        .seal(&connect_frame(&me, node.address).to_string(), None);
    ws.send(Message::text(connect.clone())).await.unwrap();
    assert_eq!(
        open(&mut ch, &ws_recv(&mut ws).await.unwrap())["type"],
        "CONNECTED"
    );
    let input = common::input_frame(&me, node.address, "relayed inside", "relayed-session");
    ws.send(Message::text(ch.send.seal(&input.to_string(), None)))
        .await
        .unwrap();
    let out = loop {
        let f = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
        if f["type"] == "OUTPUT" {
            break f;
        }
    };
    assert_eq!(out["result"], "relayed inside");

    // The relay (or anyone) replays the CONNECT: the node refuses and ends the session.
    ws.send(Message::text(connect)).await.unwrap();
    let err = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
    assert!(
        err["message"].as_str().unwrap().contains("out of order"),
        "{err}"
    );
}

/// A Python-shaped host at `/ws` that seals (or not) and answers with unsigned frames,
/// as a Python `host()` does: its OUTPUT is trusted only inside a seal it signed.
async fn python_shaped_host(me: Identity, seals: bool) -> String {
    use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
    use axum::routing::get;
    let me = Arc::new(me);
    let address = me.address().to_string();
    let app = axum::Router::new()
        .route(
            "/info",
            get(move || async move { axum::Json(json!({"address": address})) }),
        )
        .route(
            "/ws",
            get(move |ws: WebSocketUpgrade| {
                let me = me.clone();
                async move {
                    ws.on_upgrade(move |mut socket| async move {
                        let mut channel: Option<SealedChannel> = None;
                        while let Some(Ok(AxMessage::Text(text))) = socket.recv().await {
                            let mut frame: Value = serde_json::from_str(&text).unwrap();
                            if let Some(ch) = &mut channel {
                                let clear = ch.recv.open(frame.as_object().unwrap()).unwrap();
                                frame = serde_json::from_slice(&clear).unwrap();
                            }
                            let answer = match frame["type"].as_str() {
                                Some("SEAL") if seals => {
                                    let accepted =
                                        seal::accept(frame.as_object().unwrap(), &me, unix_now())
                                            .unwrap();
                                    let _ = socket.send(AxMessage::Text(accepted.reply.into())).await;
                                    channel = Some(accepted.channel);
                                    continue;
                                }
                                Some("SEAL") => json!({"type": "ERROR", "message": "cannot seal"}),
                                Some("CONNECT") => json!({"type": "CONNECTED",
                                    "session_id": "py-session", "status": "new"}),
                                Some("INPUT") => json!({"type": "OUTPUT", "session_id": "py-session",
                                    "result": format!("py:{}", frame["payload"]["prompt"].as_str().unwrap_or("")),
                                    "duration_ms": 3, "session": {"session_id": "py-session", "messages": []}}),
                                _ => continue,
                            };
                            let text = match &mut channel {
                                Some(ch) => ch.send.seal(&answer.to_string(), None),
                                None => answer.to_string(),
                            };
                            let _ = socket.send(AxMessage::Text(text.into())).await;
                        }
                    })
                }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn unsigned_answers_count_inside_a_seal_and_never_outside_one() {
    let host = Identity::generate();
    let address = host.address().to_string();
    let sealed_url = python_shaped_host(host.clone(), true).await;
    let options = ConnectOptions::default()
        .endpoint(sealed_url)
        .via(Via::Direct)
        .reply_timeout(STEP);
    let mut remote = oonode::connect(&address, options).await.unwrap();
    assert!(remote.sealed());
    let answer = tokio::time::timeout(STEP, remote.input("hi"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (answer.result.as_str(), answer.session_id.as_str()),
        ("py:hi", "py-session"),
        "the host's session is adopted"
    );

    // The same unsigned OUTPUT in the clear could come from anyone on the path.
    let clear_url = python_shaped_host(host, false).await;
    let options = ConnectOptions::default()
        .endpoint(clear_url)
        .via(Via::Direct)
        .reply_timeout(Duration::from_secs(2));
    let mut remote = oonode::connect(&address, options).await.unwrap();
    assert!(!remote.sealed());
    match tokio::time::timeout(STEP, remote.input("hi"))
        .await
        .unwrap()
    {
        Err(CallError::Timeout(_)) => {}
        other => panic!("an unsigned answer outside a seal must not be taken: {other:?}"),
    }
}

#[tokio::test]
async fn inside_a_seal_the_python_clients_nonceless_connect_may_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let me = Identity::generate();
    // The Python client's CONNECT: no nonce, so two in one second are the same bytes.
    let payload =
        json!({"to": node.address.to_string(), "timestamp": unix_now(), "signed_commands": 1});
    let sig = me.sign(&canonical_json(&payload));
    let connect = json!({"type": "CONNECT", "payload": payload, "from": me.address().to_string(),
        "signature": hex::encode(sig.to_bytes())})
    .to_string();

    let (mut ws, mut ch) = sealed_socket(&node.ws_url(), &me, node.address).await;
    for _ in 0..2 {
        ws.send(Message::text(ch.send.seal(&connect, None)))
            .await
            .unwrap();
        let answer = open(&mut ch, &ws_recv(&mut ws).await.unwrap());
        assert_eq!(answer["type"], "CONNECTED", "{answer}");
    }
    // In the clear the ledger still refuses it the second time: anyone could have
    // captured it.
    let mut clear = ws_connect(&node.ws_url()).await;
    let frame: Value = serde_json::from_str(&connect).unwrap();
    ws_send(&mut clear, &frame).await;
    assert_eq!(ws_recv(&mut clear).await.unwrap()["type"], "CONNECTED");
    ws_send(&mut clear, &frame).await;
    assert_eq!(ws_recv(&mut clear).await.unwrap()["code"], "replayed");
}

/// A sealed relayed session through our relay, as `caller`: the socket and the channel.
async fn sealed_relayed(relay: &str, caller: &Identity, node: Address) -> (Socket, SealedChannel) {
    let mut ws = ws_connect(&format!("{relay}/ws/input")).await;
    let offer = SealOffer::new(caller, node, unix_now());
    ws.send(Message::text(offer.frame())).await.unwrap();
    let reply = ws_recv(&mut ws).await.expect("SEALED_OK");
    (ws, offer.finish(reply.as_object().unwrap()).unwrap())
}

/// Every frame `ws` gets within `wait`, opened.
async fn drain(ws: &mut Socket, ch: &mut SealedChannel, wait: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    while let Ok(Some(frame)) = ws_recv_within(ws, wait).await {
        seen.push(match frame["type"].as_str() {
            Some("SEALED") => open(ch, &frame),
            _ => frame,
        });
    }
    seen
}

#[tokio::test]
async fn a_sealed_caller_cannot_name_its_way_into_another_callers_conversation() {
    let relay = start_relay(relay_config()).await;
    let node = TestNode::builder(Host::new(Echo).trust(oonode::TrustLevel::Open))
        .http(false)
        .relay(&relay.url())
        .start()
        .await;
    // The victim: a sealed conversation of its own, with a secret in it.
    let victim = Identity::generate();
    let (mut v, mut vch) = sealed_relayed(&relay.url(), &victim, node.address).await;
    let mut connect = connect_frame(&victim, node.address);
    connect["session_id"] = json!("victim-conversation");
    v.send(Message::text(vch.send.seal(&connect.to_string(), None)))
        .await
        .unwrap();
    assert_eq!(
        open(&mut vch, &ws_recv(&mut v).await.unwrap())["type"],
        "CONNECTED"
    );
    let input = common::input_frame(&victim, node.address, "SECRET-42", "victim-conversation");
    v.send(Message::text(vch.send.seal(&input.to_string(), None)))
        .await
        .unwrap();
    let out = drain(&mut v, &mut vch, Duration::from_millis(500)).await;
    assert!(out.iter().any(|f| f["result"] == "SECRET-42"), "{out:?}");

    // The attacker names the victim's conversation: with a CONNECT signed by someone else
    // (refused), then with its own (refused: open on another connection), then reads.
    let attacker = Identity::generate();
    let (mut a, mut ach) = sealed_relayed(&relay.url(), &attacker, node.address).await;
    let mut forged = connect_frame(&Identity::generate(), node.address);
    forged["session_id"] = json!("victim-conversation");
    let mut own = connect_frame(&attacker, node.address);
    own["session_id"] = json!("victim-conversation");
    for frame in [forged, own, json!({"type": "RESUME", "after": 0})] {
        a.send(Message::text(ach.send.seal(&frame.to_string(), None)))
            .await
            .unwrap();
    }
    let seen = drain(&mut a, &mut ach, Duration::from_millis(800)).await;
    let text = serde_json::to_string(&seen).unwrap();
    assert!(
        !text.contains("SECRET-42"),
        "the attacker read the victim: {text}"
    );
    assert!(
        text.contains("open on another connection"),
        "the second CONNECT is refused: {text}"
    );
    // The victim's conversation goes on.
    let input = common::input_frame(&victim, node.address, "still mine", "victim-conversation");
    v.send(Message::text(vch.send.seal(&input.to_string(), None)))
        .await
        .unwrap();
    let out = drain(&mut v, &mut vch, Duration::from_millis(500)).await;
    assert!(out.iter().any(|f| f["result"] == "still mine"), "{out:?}");
}

#[tokio::test]
async fn after_a_relay_ends_a_sealed_session_nothing_of_it_goes_out_in_the_clear() {
    // A relay of our own making: it takes the node's ANNOUNCE, opens a sealed session,
    // starts a long answer, then says the caller left (`close`) and watches.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let relay = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut link = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let announce = ws_recv(&mut link).await.unwrap();
        assert_eq!(announce["type"], "ANNOUNCE");
        ws_send(&mut link, &json!({"type": "ANNOUNCE_OK"})).await;
        link
    });
    let node = TestNode::builder(Host::new(oonode::agent::Ticker {
        pause: Duration::from_millis(40),
    }))
    .http(false)
    .relay(&url)
    .start()
    .await;
    let mut link = tokio::time::timeout(STEP, relay).await.unwrap().unwrap();

    let me = Identity::generate();
    let offer = SealOffer::new(&me, node.address, unix_now());
    let mut seal: Value = serde_json::from_str(&offer.frame()).unwrap();
    seal["session_id"] = json!("r1");
    ws_send(&mut link, &seal).await;
    let reply = ws_recv(&mut link).await.unwrap();
    let mut ch = offer.finish(reply.as_object().unwrap()).unwrap();
    for frame in [
        connect_frame(&me, node.address),
        common::input_frame(&me, node.address, "w1 w2 w3 w4 w5 w6 w7 w8 SECRET7", "c1"),
    ] {
        let mut sealed: Value =
            serde_json::from_str(&ch.send.seal(&frame.to_string(), None)).unwrap();
        sealed["session_id"] = json!("r1");
        ws_send(&mut link, &sealed).await;
    }
    // The first chunks come sealed; then the caller is gone.
    let first = ws_recv(&mut link).await.unwrap();
    assert_eq!(first["type"], "SEALED");
    ws_send(&mut link, &json!({"type": "close", "session_id": "r1"})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(Ok(Some(frame))) =
        tokio::time::timeout_at(deadline, ws_recv_within(&mut link, STEP)).await
    {
        assert!(
            frame["type"] == "SEALED" || frame["type"] == "ANNOUNCE",
            "a frame of a sealed session went out in the clear: {frame}"
        );
        assert!(!frame.to_string().contains("SECRET7"), "{frame}");
    }
}
