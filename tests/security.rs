//! Hostile relays, callers and web pages against a node: each test plays the attacker of
//! one finding of the security review (the node's side; the relay's is in
//! `relay_hostile.rs`, the swarm's in `p2p_hostile.rs`) and failed on the code before
//! the fix. docs/protocol.md's threat model points here.

mod common;

use common::*;
use oonode::agent::{Echo, Translator};
use oonode::envelope::{canonical_json, unix_now};
use oonode::{connect, CallError, ConnectOptions, Envelope, Host, Identity, Kind, Policy, Via};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A Python client's CONNECT: it signs `{to, timestamp, signed_commands}` and no session.
fn python_connect(caller: &Identity, node: oonode::Address, session_id: &str, at: u64) -> Value {
    let payload = json!({"to": node.to_string(), "timestamp": at, "signed_commands": 1});
    let sig = caller.sign(&canonical_json(&payload));
    json!({
        "type": "CONNECT",
        "to": node.to_string(),
        "session_id": session_id,
        "payload": payload,
        "from": caller.address().to_string(),
        "signature": hex_sig(&sig.to_bytes()),
    })
}

/// A relay of the test's own: it accepts the node's announce, then hands the test the
/// agent's socket to play a hostile relay on.
async fn hostile_relay() -> (
    String,
    tokio::sync::oneshot::Receiver<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let announce = ws_recv(&mut ws).await.expect("the node announces");
        assert_eq!(announce["type"], "ANNOUNCE");
        ws_send(&mut ws, &json!({"type": "ANNOUNCE_OK"})).await;
        let _ = tx.send(ws);
    });
    (url, rx)
}

/// Finding 4: a relay rewrote a caller's CONNECT (whose session id the caller did not
/// sign) to a session the caller had used only directly, sent RESUME, and read that
/// session's OUTPUT.
#[tokio::test]
async fn a_relay_cannot_attach_a_callers_connect_to_a_session_it_never_carried() {
    let (url, agent_socket) = hostile_relay().await;
    let node = TestNode::builder(Host::new(Echo)).relay(&url).start().await;
    let mut relay = tokio::time::timeout(STEP, agent_socket)
        .await
        .unwrap()
        .unwrap();

    // The victim talks to the node directly, in a session of its own.
    let victim = Identity::generate();
    let input = Envelope::sign(
        &victim,
        Kind::Input,
        Some(node.address),
        obj(json!({"prompt": "my private plan", "session": {"session_id": "direct-only", "messages": []}})),
    )
    .to_nested_json();
    let (status, body) = node.post(&input).await;
    assert_eq!(status, 200, "{body}");

    // The relay replays one of the victim's Python-shape CONNECTs into that session.
    let connect = python_connect(&victim, node.address, "direct-only", unix_now());
    ws_send(&mut relay, &connect).await;
    let answer = ws_recv(&mut relay).await.unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("ERROR"), Some("not_found")),
        "no CONNECTED into a session the relay never carried: {answer}"
    );
    ws_send(
        &mut relay,
        &json!({"type": "RESUME", "session_id": "direct-only", "after": 0}),
    )
    .await;
    let answer = ws_recv(&mut relay).await.unwrap();
    assert_eq!(answer["code"], "not_found", "{answer}");
    assert!(!answer.to_string().contains("my private plan"));

    // Such a CONNECT for a new session is fine: Python clients keep working. (Its
    // timestamp differs: the same signature twice would be a replay.)
    let connect = python_connect(&victim, node.address, "fresh-one", unix_now() - 1);
    ws_send(&mut relay, &connect).await;
    let answer = ws_recv(&mut relay).await.unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["status"].as_str()),
        (Some("CONNECTED"), Some("new")),
        "{answer}"
    );
    node.stop().await;
}

/// Finding 4, on `/ws`: an unused signed INPUT sent as a CONNECT was taken as one, and
/// the real INPUT was then refused as a replay.
#[tokio::test]
async fn a_signed_input_is_not_a_connect() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let caller = Identity::generate();
    let input = signed_input(&caller, node.address, "the real question");
    let mut ws = ws_connect(&node.ws_url()).await;
    let mut as_connect = input.clone();
    as_connect["type"] = json!("CONNECT");
    ws_send(&mut ws, &as_connect).await;
    let answer = ws_recv(&mut ws).await.unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("ERROR"), Some("bad_request")),
        "{answer}"
    );
    let mut as_input = input;
    as_input["type"] = json!("INPUT");
    ws_send(&mut ws, &as_input).await;
    loop {
        let frame = ws_recv(&mut ws).await.unwrap();
        match frame["type"].as_str() {
            Some("STREAM") => continue,
            Some("OUTPUT") => {
                assert_eq!(frame["result"], "the real question");
                break;
            }
            _ => panic!("the INPUT must run: {frame}"),
        }
    }
    node.stop().await;
}

/// Finding 5: an unsigned caller listed, read and continued another unsigned caller's
/// session.
#[tokio::test]
async fn anonymous_callers_cannot_see_or_continue_each_others_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Translator), dir.path()).await;
    let (_, ann) = node.post(&json!({"prompt": "My name is Ann"})).await;
    let id = ann["session_id"].as_str().unwrap();
    assert!(ann["session_secret"].as_str().unwrap().len() >= 32);

    assert_eq!(node.get("/sessions").await.1["sessions"], json!([]));
    let (status, _) = node.get(&format!("/sessions/{id}")).await;
    assert_eq!(status, 404);
    let (status, _) = node
        .get_with_secret(&format!("/sessions/{id}"), SECRET)
        .await;
    assert_eq!(status, 404, "another secret reads nothing either");

    // Naming Ann's session without her secret reads as a session that does not exist.
    let (status, other) = node
        .post(&json!({"prompt": "What is my name?", "session": {"session_id": id}}))
        .await;
    assert_eq!(status, 404, "{other}");
    let (_, none) = node
        .post(&json!({"prompt": "What is my name?", "session": {"session_id": "nobodys"}}))
        .await;
    assert_eq!(
        other["error"].as_str().unwrap().replace(id, "X"),
        none["error"].as_str().unwrap().replace("nobodys", "X")
    );
    // With her secret, her conversation goes on.
    let (_, again) = node
        .post(&json!({"prompt": "What is my name?", "session": ann["session"]}))
        .await;
    assert_eq!(again["result"], "Your name is Ann");
    node.stop().await;
}

/// Finding 5: every route answered `Access-Control-Allow-Origin: *`, so any web page a
/// user opened could read the local node's sessions and run its agent.
#[tokio::test]
async fn a_web_page_from_elsewhere_can_neither_read_nor_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("host.yaml"),
        "cors_origins: [\"https://app.example\"]\n",
    )
    .unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let evil = "https://evil.example";

    let res = client()
        .get(format!("{}/sessions", node.url))
        .header("origin", evil)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403);
    assert!(res.headers().get("access-control-allow-origin").is_none());

    let (status, body) = send(
        client()
            .post(format!("{}/input", node.url))
            .header("origin", evil)
            .json(&json!({"prompt": "spend my credits", "session_secret": SECRET})),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (_, mine) = node.get_with_secret("/sessions", SECRET).await;
    assert_eq!(mine["sessions"], json!([]), "the agent did not run");

    // Browsers do not check WebSocket origins: the node does.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        node.ws_url(),
    )
    .unwrap();
    req.headers_mut().insert("origin", evil.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 403)
        }
        other => panic!(
            "a cross-origin socket must be refused: {:?}",
            other.map(|_| ())
        ),
    }

    // A listed origin and the node's own page may; /health and /info are public.
    let res = client()
        .get(format!("{}/sessions", node.url))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let own = node.url.clone();
    let res = client()
        .get(format!("{}/sessions", node.url))
        .header("origin", own)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = client()
        .get(format!("{}/health", node.url))
        .header("origin", evil)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    node.stop().await;
}

/// Finding 6: 7,392 signed guesses in 8.6 s from one key on one connection found an
/// invite code.
#[tokio::test]
async fn invite_codes_cannot_be_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let policy =
        Policy::from_text("---\nonboard:\n  invite_code: [Open-Onion-77]\ndefault: deny\n---\n")
            .unwrap();
    let node = TestNode::start(Host::new(Echo).trust_policy(policy), dir.path()).await;
    let with_code = |who: &Identity, code: &str| {
        Envelope::sign(
            who,
            Kind::Input,
            Some(node.address),
            obj(json!({"prompt": "let me in", "invite_code": code})),
        )
        .to_nested_json()
    };
    let guesser = Identity::generate();
    let mut codes = Vec::new();
    for i in 0..oonode::trust::FREE_INVITE_ATTEMPTS + 3 {
        let (status, body) = node.post(&with_code(&guesser, &format!("guess-{i}"))).await;
        codes.push((status, body["code"].as_str().unwrap_or("").to_owned()));
    }
    let free = oonode::trust::FREE_INVITE_ATTEMPTS as usize;
    assert!(
        codes[..free]
            .iter()
            .all(|(s, c)| *s == 403 && c == "onboarding_required"),
        "{codes:?}"
    );
    assert!(
        codes[free..]
            .iter()
            .all(|(s, c)| *s == 429 && c == "rate_limited"),
        "past the free tries, guesses wait: {codes:?}"
    );
    // Even the right code waits now, and a fresh key from the same address does too.
    let (status, _) = node.post(&with_code(&guesser, "Open-Onion-77")).await;
    assert_eq!(status, 429);
    let (status, body) = node
        .post(&with_code(&Identity::generate(), "Open-Onion-77"))
        .await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    node.stop().await;
}

/// Finding 7: GET headers signed for one node, replayed at another, returned the
/// caller's sessions there; and they could be replayed within ±300 s.
#[tokio::test]
async fn a_signed_read_is_for_one_node_and_one_use() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestNode::start(Host::new(Echo), a_dir.path()).await;
    let b = TestNode::start(Host::new(Echo), b_dir.path()).await;
    let reader = Identity::generate();
    for node in [&a, &b] {
        let (status, _) = node.post(&signed_input(&reader, node.address, "hi")).await;
        assert_eq!(status, 200);
    }
    let headers = signed_get_headers(&reader, a.address, "/sessions");
    let get = |node: &TestNode| {
        let mut req = client().get(format!("{}/sessions", node.url));
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        send(req)
    };
    let (status, body) = get(&a).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1);
    let (status, body) = get(&b).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("wrong_recipient"))
    );
    let (status, body) = get(&a).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("replayed")));

    // The older shape (no node, no nonce) is refused with the headers it lacks.
    let ts = unix_now();
    let payload = json!({"method": "GET", "path": "/sessions", "timestamp": ts});
    let sig = reader.sign(&canonical_json(&payload));
    let (status, body) = send(
        client()
            .get(format!("{}/sessions", a.url))
            .header("x-co-from", reader.address().to_string())
            .header("x-co-signature", hex_sig(&sig.to_bytes()))
            .header("x-co-timestamp", ts.to_string()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("x-co-request-id"));
    a.stop().await;
    b.stop().await;
}

/// Finding 8: continuing another caller's session said 403 "belongs to another caller"
/// where reading it said 404: an oracle for which session ids exist.
#[tokio::test]
async fn someone_elses_session_and_no_session_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let in_session = |who: &Identity, id: &str| {
        Envelope::sign(
            who,
            Kind::Input,
            Some(node.address),
            obj(json!({"prompt": "hello", "session": {"session_id": id, "messages": []}})),
        )
        .to_nested_json()
    };
    for id in ["alices", "alices-private"] {
        let (status, _) = node.post(&in_session(&alice, id)).await;
        assert_eq!(status, 200);
    }

    let taken = node.post(&in_session(&bob, "alices")).await;
    let free = node.post(&in_session(&bob, "nobodys")).await;
    assert_eq!((taken.0, free.0), (200, 200));
    assert_eq!(
        taken.1["session"]["messages"].as_array().unwrap().len(),
        free.1["session"]["messages"].as_array().unwrap().len(),
        "the same fresh conversation either way"
    );
    // Without the history, both are sessions to continue that bob does not have.
    let bare = |id: &str| {
        Envelope::sign(
            &bob,
            Kind::Input,
            Some(node.address),
            obj(json!({"prompt": "hello", "session": {"session_id": id}})),
        )
        .to_nested_json()
    };
    let taken = node.post(&bare("alices-private")).await;
    let free = node.post(&bare("nobody-else")).await;
    assert_eq!((taken.0, free.0), (404, 404));
    assert_eq!(taken.1["code"], free.1["code"]);
    let (s1, b1) = signed_get(&node.url, node.address, &bob, "/sessions/never-used").await;
    let (s2, b2) = signed_get(&node.url, node.address, &bob, "/sessions/alices-private").await;
    assert_eq!((s1, &b1["code"]), (s2, &b2["code"]));
    node.stop().await;
}

/// Finding 8: the client did not check `in_reply_to` on ERROR frames, so a relay (or
/// anyone in the path) could answer a request with an old signed ERROR.
#[tokio::test]
async fn the_client_rejects_an_old_error_replayed_as_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let caller = Identity::generate();

    // A real, signed ERROR of the node for one of the caller's requests in session S.
    let refused = Envelope::sign(
        &caller,
        Kind::Input,
        Some(node.address),
        obj(json!({"prompt": "   ", "session": {"session_id": "s"}})),
    );
    let mut ws = ws_connect(&node.ws_url()).await;
    let mut frame = refused.to_nested_json();
    frame["type"] = json!("INPUT");
    ws_send(&mut ws, &frame).await;
    let old_error = ws_recv(&mut ws).await.unwrap();
    assert_eq!(old_error["type"], "ERROR");
    assert_eq!(old_error["in_reply_to"], refused.id().unwrap());

    // A fake endpoint that proves the node's address and answers with that ERROR.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = format!("http://{}", listener.local_addr().unwrap());
    let address = node.address.to_string();
    let app = axum::Router::new()
        .route(
            "/info",
            axum::routing::get(move || {
                let address = address.clone();
                async move { axum::Json(json!({ "address": address })) }
            }),
        )
        .route(
            "/ws",
            axum::routing::get(move |ws: axum::extract::WebSocketUpgrade| {
                let old_error = old_error.clone();
                async move {
                    ws.on_upgrade(move |mut socket| async move {
                        use axum::extract::ws::Message as M;
                        // A host that does not seal: SEAL refused, CONNECT taken, and the
                        // INPUT answered with the old ERROR.
                        while let Some(Ok(M::Text(text))) = socket.recv().await {
                            let frame: Value = serde_json::from_str(&text).unwrap_or_default();
                            let reply = match frame["type"].as_str() {
                                Some("SEAL") => json!({"type": "ERROR", "message": "cannot seal"}),
                                Some("CONNECT") => json!({"type": "CONNECTED",
                                    "session_id": frame["session_id"], "status": "connected"}),
                                _ => old_error.clone(),
                            };
                            let _ = socket.send(M::Text(reply.to_string().into())).await;
                        }
                    })
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let options = ConnectOptions::default()
        .endpoint(fake)
        .via(Via::Direct)
        .identity(caller)
        .reply_timeout(STEP);
    let mut remote = connect(&node.address.to_string(), options).await.unwrap();
    remote.set_session_id("s");
    match remote.input("a new question").await {
        Err(CallError::Tampered(why)) => assert!(why.contains("another request"), "{why}"),
        other => panic!("an old ERROR must not pass as the answer: {other:?}"),
    }
    node.stop().await;
}

/// Finding 8: one client could hold all of a node's 4,096 `/ws` slots, and (with no cap on
/// HTTP connections) every file descriptor it may open.
#[tokio::test]
async fn one_client_ip_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("host.yaml"),
        "max_sockets_per_client: 3\nmax_connections_per_client: 5\n",
    )
    .unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let addr: std::net::SocketAddr = node.url.trim_start_matches("http://").parse().unwrap();
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((std::net::Ipv4Addr::from(ip), 0).into())
            .unwrap();
        tokio::time::timeout(STEP, socket.connect(addr))
            .await
            .unwrap()
            .unwrap()
    };
    let ws_from = |ip: [u8; 4]| {
        let url = node.ws_url();
        async move { tokio_tungstenite::client_async(url, from(ip).await).await }
    };

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ws_from([127, 0, 0, 1]).await.expect("within the cap").0);
    }
    match ws_from([127, 0, 0, 1]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 429);
            let body: Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["code"], "too_many_connections");
        }
        other => panic!(
            "a 4th socket from one IP must be refused: {:?}",
            other.map(|_| ())
        ),
    }
    let (_other_ip, _) = ws_from([127, 0, 0, 2])
        .await
        .expect("another IP is not affected");

    // HTTP connections: 3 sockets held, 2 more idle connections fill the cap of 5; the
    // next one from that IP is closed at once, while another IP is served.
    let idle = [from([127, 0, 0, 1]).await, from([127, 0, 0, 1]).await];
    let mut extra = from([127, 0, 0, 1]).await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(&mut extra, &mut buf))
        .await
        .expect("the extra connection is closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let (status, _) = send(other.get(format!("{}/health", node.url))).await;
    assert_eq!(status, 200);
    drop((held, idle));
    node.stop().await;
}
