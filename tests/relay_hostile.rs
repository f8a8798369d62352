//! The relay under attack: raw WebSocket frames signed by throwaway keys, as an attacker
//! sends them. Each test is one finding of the security review: the attack is refused
//! with its code, nothing it tried is kept, and a legitimate agent and caller still work.
//!
//! Every await is bounded; everything listens on 127.0.0.1 (a second client IP is
//! 127.0.0.2, which Linux routes on loopback); the one process started here is killed by
//! its guard.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    client, input_frame, wait_until, ws_recv as recv, ws_recv_within as recv_within,
    ws_send as send, TestNode, STEP,
};
use oonode::agent::Echo;
use oonode::envelope::{canonical_json, unix_now};
use oonode::proto::{signed_announce, MAX_ENDPOINTS, MAX_ENDPOINT_BYTES, MAX_SUMMARY_CHARS};
use oonode::{Address, Host, Identity, Relay, RelayConfig, RelayHandle};
use serde_json::{json, Value};

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn loopback_config() -> RelayConfig {
    RelayConfig::default().listen("127.0.0.1:0".parse().unwrap())
}

async fn start_relay(config: RelayConfig) -> RelayHandle {
    tokio::time::timeout(STEP, Relay::spawn(config))
        .await
        .expect("relay start timed out")
        .expect("relay starts")
}

/// A WebSocket to `relay` + `path` from the client IP `from` (127.0.0.x).
async fn try_ws_from(
    from: [u8; 4],
    relay: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.bind(SocketAddr::from((from, 0))).unwrap();
    let stream = tokio::time::timeout(STEP, tcp.connect(relay))
        .await
        .expect("TCP connect timed out")
        .expect("TCP connect");
    let mut req = format!("ws://{relay}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("WebSocket handshake timed out")
        .map(|(ws, _)| ws)
}

async fn ws(relay: &RelayHandle, path: &str) -> Socket {
    ws_from([127, 0, 0, 1], relay, path).await
}

async fn ws_from(from: [u8; 4], relay: &RelayHandle, path: &str) -> Socket {
    try_ws_from(from, relay.local_addr(), path, &[])
        .await
        .unwrap_or_else(|e| panic!("WebSocket to {path}: {e}"))
}

/// The HTTP refusal of an upgrade: (status, body).
fn refusal(result: Result<Socket, tokio_tungstenite::tungstenite::Error>) -> (u16, Value) {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .unwrap_or(Value::Null),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade was accepted"),
    }
}

/// The `(type, code)` of a frame.
fn kind(frame: &Value) -> (Option<&str>, Option<&str>) {
    (frame["type"].as_str(), frame["code"].as_str())
}

async fn get_json(url: String) -> (u16, Value, usize) {
    let res = tokio::time::timeout(STEP, client().get(url).send())
        .await
        .expect("GET timed out")
        .expect("GET failed");
    let status = res.status().as_u16();
    let body = res.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
        body.len(),
    )
}

async fn health(relay: &RelayHandle) -> Value {
    get_json(relay.relay_url().health()).await.1
}

/// An ANNOUNCE by `id` signed for `relay_url`, sent on a new agent socket: the socket
/// and the relay's answer.
async fn announce(
    relay: &RelayHandle,
    id: &Identity,
    relay_url: &str,
    timestamp: u64,
) -> (Socket, Value) {
    let mut agent = ws(relay, "/ws/announce").await;
    send(
        &mut agent,
        &signed_announce(id, "", &[], relay_url, timestamp),
    )
    .await;
    let answer = recv(&mut agent).await.expect("an answer to the ANNOUNCE");
    (agent, answer)
}

/// An agent announced as our node announces (signed for the announce URL it dials).
async fn raw_agent(relay: &RelayHandle, id: &Identity) -> Socket {
    let (agent, answer) = announce(relay, id, &relay.relay_url().announce(), unix_now()).await;
    assert_eq!(kind(&answer), (Some("ANNOUNCE_OK"), None), "{answer}");
    agent
}

/// A caller's INPUT reaches `agent` (which answers it) and the answer comes back.
async fn round_trip(caller: &mut Socket, agent: &mut Socket, to: Address, session_id: &str) {
    let me = Identity::generate();
    send(caller, &input_frame(&me, to, "hello", session_id)).await;
    let routed = recv(agent).await.expect("the agent gets the INPUT");
    assert_eq!(
        (routed["type"].as_str(), routed["session_id"].as_str()),
        (Some("INPUT"), Some(session_id)),
        "{routed}"
    );
    let reply = json!({"type": "OUTPUT", "result": "hi", "session_id": session_id});
    send(agent, &reply).await;
    let back = recv(caller).await.expect("the caller gets the reply");
    assert_eq!(back, reply);
}

async fn call_ok(relay: &RelayHandle, to: Address, prompt: &str) {
    let opts = oonode::ConnectOptions::default()
        .relay(relay.url())
        .identity(Identity::generate())
        .reply_timeout(STEP);
    let answer = tokio::time::timeout(STEP, async {
        oonode::connect(&to.to_string(), opts)
            .await?
            .input(prompt)
            .await
    })
    .await
    .expect("a call is bounded")
    .unwrap_or_else(|e| panic!("a legitimate call fails: {e:?}"));
    assert_eq!(answer.result, prompt);
}

// ---------------------------------------------------------------------------------------
// Finding 1: an ANNOUNCE captured by another relay, replayed here
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_announce_signed_for_another_relay_or_for_none_is_refused_wrong_recipient() {
    let relay = start_relay(loopback_config()).await;
    let node = TestNode::builder(Host::new(Echo))
        .http(false)
        .relay(&relay.url())
        .start()
        .await;

    // The victim announced here 10 s ago, as any agent does.
    let victim = Identity::generate();
    let (mut real, ok) = announce(
        &relay,
        &victim,
        &relay.relay_url().announce(),
        unix_now() - 10,
    )
    .await;
    assert_eq!(kind(&ok), (Some("ANNOUNCE_OK"), None), "{ok}");

    // A fake relay captured a newer announce the victim sent it, and replays it here.
    let captured = signed_announce(
        &victim,
        "",
        &[],
        "ws://127.0.0.1:20201/ws/announce",
        unix_now(),
    );
    let mut thief = ws(&relay, "/ws/announce").await;
    send(&mut thief, &captured).await;
    let answer = recv(&mut thief).await.expect("an answer");
    assert_eq!(
        kind(&answer),
        (Some("ERROR"), Some("wrong_recipient")),
        "{answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("20201"),
        "{answer}"
    );
    assert_eq!(recv(&mut thief).await, None, "the thief's socket is closed");

    // An announce that names no relay at all (form A, as signed by hand) is refused too.
    let mut bare = json!({
        "type": "ANNOUNCE",
        "address": victim.address().to_string(),
        "timestamp": unix_now() + 1,
    });
    bare["signature"] = json!(hex::encode(victim.sign(&canonical_json(&bare)).to_bytes()));
    let mut thief = ws(&relay, "/ws/announce").await;
    send(&mut thief, &bare).await;
    let answer = recv(&mut thief).await.expect("an answer");
    assert_eq!(
        kind(&answer),
        (Some("ERROR"), Some("wrong_recipient")),
        "{answer}"
    );

    // Callers of the victim still reach the real socket.
    let mut caller = ws(&relay, "/ws/input").await;
    round_trip(&mut caller, &mut real, victim.address(), "v-1").await;
    // The real agent's own re-announce (same socket, newer) is still fine.
    send(
        &mut real,
        &signed_announce(&victim, "", &[], &relay.url(), unix_now() + 2),
    )
    .await;
    assert_eq!(recv(&mut real).await.unwrap()["type"], "ANNOUNCE_OK");
    // And our node, which signs for the announce URL it dials, is served.
    call_ok(&relay, node.address, "the node still serves").await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------------
// Finding 2: ghost agents, many addresses on one socket
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_socket_holds_one_address_and_leaves_no_ghosts() {
    let mut config = loopback_config();
    config.max_agents = 5;
    let relay = start_relay(config).await;
    let url = relay.relay_url().announce();

    let first = Identity::generate();
    let mut socket = raw_agent(&relay, &first).await;
    let ghosts: Vec<Identity> = (0..20).map(|_| Identity::generate()).collect();
    for ghost in &ghosts {
        send(
            &mut socket,
            &signed_announce(ghost, "", &[], &url, unix_now()),
        )
        .await;
        let answer = recv(&mut socket).await.expect("an answer");
        assert_eq!(
            kind(&answer),
            (Some("ERROR"), Some("bad_request")),
            "{answer}"
        );
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("one address per connection"),
            "{answer}"
        );
    }
    let h = health(&relay).await;
    assert_eq!(
        (&h["agents_online"], &h["agents_known"]),
        (&json!(1), &json!(1)),
        "{h}"
    );

    drop(socket);
    wait_until("the relay to see the socket gone", STEP, || async {
        health(&relay).await["agents_online"] == 0
    })
    .await;
    assert_eq!(
        health(&relay).await["agents_known"],
        1,
        "no ghost is listed"
    );

    // No ghost is callable, nor reads busy: they are unknown.
    let mut caller = ws(&relay, "/ws/input").await;
    let me = Identity::generate();
    for (i, ghost) in ghosts.iter().enumerate() {
        send(
            &mut caller,
            &input_frame(&me, ghost.address(), "x", &format!("g-{i}")),
        )
        .await;
        let answer = recv(&mut caller).await.expect("an answer");
        assert_eq!(
            kind(&answer),
            (Some("ERROR"), Some("unknown_agent")),
            "{answer}"
        );
    }
    send(&mut caller, &input_frame(&me, first.address(), "x", "f-1")).await;
    let answer = recv(&mut caller).await.expect("an answer");
    assert_eq!(
        kind(&answer),
        (Some("ERROR"), Some("agent_offline")),
        "{answer}"
    );

    // max_agents = 5 legitimate agents still fit.
    let mut agents = Vec::new();
    for _ in 0..5 {
        let id = Identity::generate();
        agents.push((raw_agent(&relay, &id).await, id));
    }
    let (agent, id) = &mut agents[4];
    round_trip(&mut caller, agent, id.address(), "ok-1").await;
}

// ---------------------------------------------------------------------------------------
// Finding 3: unbounded announce data
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oversize_or_odd_endpoints_are_refused_and_the_directory_stays_small() {
    let relay = start_relay(loopback_config()).await;
    let url = relay.relay_url().announce();
    let refused = [
        // One endpoint of 1 MB.
        vec![format!("http://10.0.0.1/{}", "a".repeat(1 << 20))],
        // Just over the per-endpoint limit.
        vec![format!(
            "http://10.0.0.1/{}",
            "a".repeat(MAX_ENDPOINT_BYTES)
        )],
        // Not a URL.
        vec!["hello, I am an endpoint".to_string()],
        vec!["file:///etc/passwd".to_string()],
    ];
    for endpoints in refused {
        let id = Identity::generate();
        let mut agent = ws(&relay, "/ws/announce").await;
        send(
            &mut agent,
            &signed_announce(&id, "", &endpoints, &url, unix_now()),
        )
        .await;
        let answer = recv(&mut agent).await.expect("an answer");
        assert_eq!(
            kind(&answer),
            (Some("ERROR"), Some("bad_request")),
            "{answer}"
        );
        let (status, _, _) = get_json(relay.relay_url().directory(id.address())).await;
        assert_eq!(status, 404, "a refused agent is not listed");
    }

    // The most an announce may carry: 16 endpoints of 256 bytes and 1000 characters.
    let id = Identity::generate();
    let endpoint = |i: usize| {
        let head = format!("http://10.0.0.1:{}/", 8000 + i);
        format!("{head}{}", "e".repeat(MAX_ENDPOINT_BYTES - head.len()))
    };
    let endpoints: Vec<String> = (0..MAX_ENDPOINTS).map(endpoint).collect();
    let summary = "s".repeat(MAX_SUMMARY_CHARS);
    let mut agent = ws(&relay, "/ws/announce").await;
    send(
        &mut agent,
        &signed_announce(&id, &summary, &endpoints, &url, unix_now()),
    )
    .await;
    assert_eq!(recv(&mut agent).await.unwrap()["type"], "ANNOUNCE_OK");
    let (status, entry, bytes) = get_json(relay.relay_url().directory(id.address())).await;
    assert_eq!(status, 200);
    assert_eq!(entry["endpoints"], json!(endpoints));
    assert!(bytes < 8 * 1024, "the directory entry is {bytes} bytes");
}

// ---------------------------------------------------------------------------------------
// Finding 8: callers, sessions and IPs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn caller_connections_from_one_ip_are_capped_and_another_ip_gets_in() {
    let config = loopback_config();
    let per_ip = config.max_callers_per_ip;
    let relay = start_relay(config).await;
    let agent_id = Identity::generate();
    let mut agent = raw_agent(&relay, &agent_id).await;

    // One IP opens its share of caller connections, each naming an agent (so none is
    // closed as silent)...
    let nobody = Identity::generate().address();
    let me = Identity::generate();
    let mut held = Vec::new();
    for i in 0..per_ip {
        let mut c = ws(&relay, "/ws/input").await;
        send(&mut c, &input_frame(&me, nobody, "x", &format!("h-{i}"))).await;
        held.push(c);
    }
    for c in &mut held {
        assert_eq!(kind(&recv(c).await.unwrap()).1, Some("unknown_agent"));
    }
    // ... and one more is refused with a clear code.
    let (status, body) =
        refusal(try_ws_from([127, 0, 0, 1], relay.local_addr(), "/ws/input", &[]).await);
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("too_many_connections")),
        "{body}"
    );

    // Another IP is served.
    let mut other = ws_from([127, 0, 0, 2], &relay, "/ws/input").await;
    round_trip(&mut other, &mut agent, agent_id.address(), "other-ip").await;
}

#[tokio::test]
async fn sessions_from_one_ip_to_one_agent_are_capped_and_another_ip_gets_in() {
    let config = loopback_config();
    let per_ip = config.max_ip_sessions_per_agent;
    let per_conn = config.max_sessions_per_caller;
    let relay = start_relay(config).await;
    let agent_id = Identity::generate();
    let to = agent_id.address();
    let mut agent = raw_agent(&relay, &agent_id).await;

    let me = Identity::generate();
    let mut callers = Vec::new();
    let (mut opened, mut refused) = (0, 0);
    for c in 0..per_ip.div_ceil(per_conn) + 1 {
        let mut caller = ws(&relay, "/ws/input").await;
        for s in 0..per_conn {
            let id = format!("c{c}-s{s}");
            send(&mut caller, &input_frame(&me, to, "x", &id)).await;
        }
        // A refused session answers at once; an opened one reaches the agent.
        while let Ok(Some(answer)) = recv_within(&mut caller, Duration::from_millis(300)).await {
            assert_eq!(
                kind(&answer),
                (Some("ERROR"), Some("too_many_sessions")),
                "{answer}"
            );
            refused += 1;
        }
        opened += per_conn;
        callers.push(caller);
    }
    opened -= refused;
    assert_eq!(
        (opened, refused),
        (per_ip, per_conn),
        "one IP holds at most {per_ip}"
    );
    assert_eq!(health(&relay).await["sessions"], per_ip);
    for _ in 0..per_ip {
        assert_eq!(recv(&mut agent).await.unwrap()["type"], "INPUT");
    }

    let mut other = ws_from([127, 0, 0, 2], &relay, "/ws/input").await;
    round_trip(&mut other, &mut agent, to, "other-ip").await;
}

#[tokio::test]
async fn a_caller_that_names_no_agent_is_closed_after_the_first_frame_timeout() {
    let config = loopback_config();
    let limit = config.first_frame_timeout;
    let relay = start_relay(config).await;
    let mut silent = ws(&relay, "/ws/input").await;
    let start = Instant::now();
    // PINGs keep a connection from idling, but do not count as using the relay.
    let answer = loop {
        send(&mut silent, &json!({"type": "PING"})).await;
        match recv_within(&mut silent, Duration::from_secs(1)).await {
            Ok(Some(f)) if f["type"] == "PONG" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Some(f)) => break f,
            Ok(None) => panic!("closed without an ERROR"),
            Err(()) => panic!("no answer to a PING"),
        }
        assert!(
            start.elapsed() < limit + Duration::from_secs(3),
            "never closed"
        );
    };
    assert_eq!(kind(&answer), (Some("ERROR"), Some("timeout")), "{answer}");
    let after = start.elapsed();
    assert!(after >= limit - Duration::from_millis(100), "{after:?}");
    assert_eq!(recv(&mut silent).await, None, "then closed");
    assert_eq!(health(&relay).await["callers"], 0);
}

#[tokio::test]
async fn an_agent_that_vanishes_frees_its_callers_sessions() {
    let config = loopback_config();
    let per_conn = config.max_sessions_per_caller;
    let relay = start_relay(config).await;
    let (gone_id, live_id) = (Identity::generate(), Identity::generate());
    let mut gone = raw_agent(&relay, &gone_id).await;
    let mut live = raw_agent(&relay, &live_id).await;

    let me = Identity::generate();
    let mut caller = ws(&relay, "/ws/input").await;
    for s in 0..per_conn {
        send(
            &mut caller,
            &input_frame(&me, gone_id.address(), "x", &format!("a-{s}")),
        )
        .await;
    }
    for _ in 0..per_conn {
        assert_eq!(recv(&mut gone).await.unwrap()["type"], "INPUT");
    }
    // Mid-call, the agent vanishes: every session hears it.
    drop(gone);
    for _ in 0..per_conn {
        let frame = recv(&mut caller).await.expect("an ERROR per session");
        assert_eq!(
            kind(&frame),
            (Some("ERROR"), Some("agent_disconnected")),
            "{frame}"
        );
    }
    // The slots are free again: 64 new sessions with a live agent.
    for s in 0..per_conn {
        send(
            &mut caller,
            &input_frame(&me, live_id.address(), "x", &format!("b-{s}")),
        )
        .await;
    }
    for _ in 0..per_conn {
        let frame = recv(&mut live).await.unwrap();
        assert_eq!(frame["type"], "INPUT", "{frame}");
    }
    assert!(
        recv_within(&mut caller, Duration::from_millis(300))
            .await
            .is_err(),
        "no session was refused"
    );
    assert_eq!(health(&relay).await["sessions"], per_conn);
}

// ---------------------------------------------------------------------------------------
// The limits set by hand (tests with knobs the defaults make slow or large)
// ---------------------------------------------------------------------------------------

mod tuned {
    use super::*;

    #[tokio::test]
    async fn a_python_host_behind_wss_is_accepted_for_the_relays_public_url_only() {
        let relay = start_relay(
            loopback_config()
                .public_url("wss://relay.example".parse().unwrap())
                .public_url("ws://127.0.0.1:1".parse().unwrap()),
        )
        .await;
        // A Python host signs `relay` = its relay_url.
        for (i, signed_for) in ["wss://relay.example/ws/announce", "wss://RELAY.example:443"]
            .into_iter()
            .enumerate()
        {
            let id = Identity::generate();
            let (_agent, answer) = announce(&relay, &id, signed_for, unix_now() + i as u64).await;
            assert_eq!(
                kind(&answer),
                (Some("ANNOUNCE_OK"), None),
                "{signed_for}: {answer}"
            );
        }
        // With public URLs set, only they count: not the bound address.
        let id = Identity::generate();
        let (_agent, answer) = announce(&relay, &id, &relay.url(), unix_now()).await;
        assert_eq!(
            kind(&answer),
            (Some("ERROR"), Some("wrong_recipient")),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn offline_entries_past_max_offline_are_evicted_oldest_first() {
        let mut config = loopback_config();
        config.max_offline = 10;
        let relay = start_relay(config).await;
        let ids: Vec<Identity> = (0..30).map(|_| Identity::generate()).collect();
        for id in &ids {
            let agent = raw_agent(&relay, id).await;
            drop(agent);
            let a = id.address();
            wait_until("the agent to go offline", STEP, || async {
                get_json(relay.relay_url().directory(a)).await.1["online"] == false
            })
            .await;
        }
        assert_eq!(health(&relay).await["agents_known"], 10);
        for (i, id) in ids.iter().enumerate() {
            let (status, _, _) = get_json(relay.relay_url().directory(id.address())).await;
            assert_eq!(status, if i < 20 { 404 } else { 200 }, "agent {i}");
        }
        // Online agents do not count against it.
        let id = Identity::generate();
        let _online = raw_agent(&relay, &id).await;
        assert_eq!(health(&relay).await["agents_known"], 11);
    }

    #[tokio::test]
    async fn agent_connections_from_one_ip_are_capped() {
        let mut config = loopback_config();
        config.max_agents_per_ip = 2;
        let relay = start_relay(config).await;
        let _a = raw_agent(&relay, &Identity::generate()).await;
        let _b = raw_agent(&relay, &Identity::generate()).await;
        let (status, body) =
            refusal(try_ws_from([127, 0, 0, 1], relay.local_addr(), "/ws/announce", &[]).await);
        assert_eq!(
            (status, body["code"].as_str()),
            (429, Some("too_many_connections"))
        );
        let mut c = ws_from([127, 0, 0, 2], &relay, "/ws/announce").await;
        let id = Identity::generate();
        send(
            &mut c,
            &signed_announce(&id, "", &[], &relay.url(), unix_now()),
        )
        .await;
        assert_eq!(recv(&mut c).await.unwrap()["type"], "ANNOUNCE_OK");
    }

    #[tokio::test]
    async fn x_forwarded_for_counts_only_when_trusted() {
        let xff = |ip: &'static str| [("x-forwarded-for", ip)];
        for trusted in [true, false] {
            let mut config = loopback_config();
            config.max_callers_per_ip = 1;
            config.trust_forwarded_for = trusted;
            let relay = start_relay(config).await;
            let at = relay.local_addr();
            let lo = [127, 0, 0, 1];
            // The proxy appends the client's address last; earlier entries are the
            // client's own claims.
            let _first = try_ws_from(lo, at, "/ws/input", &xff("9.9.9.9, 1.2.3.4"))
                .await
                .unwrap();
            let same_client = try_ws_from(lo, at, "/ws/input", &xff("8.8.8.8, 1.2.3.4")).await;
            let (status, _) = refusal(same_client);
            assert_eq!(status, 429);
            let another_client = try_ws_from(lo, at, "/ws/input", &xff("1.2.3.4, 5.6.7.8")).await;
            if trusted {
                another_client.expect("another client behind the proxy gets in");
            } else {
                assert_eq!(refusal(another_client).0, 429, "the header is ignored");
            }
        }
    }

    #[tokio::test]
    async fn a_session_nobody_uses_ends_after_session_idle_and_frees_its_slot() {
        let mut config = loopback_config();
        config.session_idle = Duration::from_millis(800);
        config.max_sessions_per_caller = 1;
        let relay = start_relay(config).await;
        let agent_id = Identity::generate();
        let to = agent_id.address();
        let mut agent = raw_agent(&relay, &agent_id).await;

        let mut caller = ws(&relay, "/ws/input").await;
        round_trip(&mut caller, &mut agent, to, "idle-1").await;
        // The connection stays busy (PINGs), the session does not.
        let start = Instant::now();
        let ended = loop {
            send(&mut caller, &json!({"type": "PING"})).await;
            let frame = recv(&mut caller).await.unwrap();
            if frame["type"] != "PONG" {
                break frame;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the session never ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (kind(&ended), ended["session_id"].as_str()),
            ((Some("ERROR"), Some("idle")), Some("idle-1")),
            "{ended}"
        );
        // (The PING sent last is still to be answered.)
        assert_eq!(recv(&mut caller).await.unwrap()["type"], "PONG");
        let close = recv(&mut agent).await.unwrap();
        assert_eq!(close, json!({"type": "close", "session_id": "idle-1"}));
        assert_eq!(health(&relay).await["sessions"], 0);
        // Its slot is free: the one session this connection may hold opens again.
        round_trip(&mut caller, &mut agent, to, "idle-2").await;
    }
}

// ---------------------------------------------------------------------------------------
// Memory: the real binary under all of the above at once
// ---------------------------------------------------------------------------------------

/// `oonode relay` started here; killed (by its own handle) when dropped.
struct RelayProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl RelayProcess {
    /// `oonode relay --listen 127.0.0.1:0 --ready-json`, once its ready line is out.
    fn spawn() -> RelayProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_oonode"))
            .args(["relay", "--listen", "127.0.0.1:0", "--ready-json"])
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("oonode relay starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(STEP).expect("a ready line");
        let ready = oonode::RelayReady::parse(&line).expect("the ready line parses");
        let url: oonode::proto::RelayUrl = ready.url.parse().unwrap();
        let addr = url.authority().parse().unwrap();
        RelayProcess { child, addr }
    }

    /// VmRSS in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent on the relay at `addr`, announced as our node does; `Err` with the answer if
/// refused.
async fn announce_at(
    addr: SocketAddr,
    from: [u8; 4],
    id: &Identity,
    summary: &str,
    endpoints: &[String],
) -> Result<Socket, Value> {
    let relay_url = format!("ws://{addr}/ws/announce");
    let mut agent = try_ws_from(from, addr, "/ws/announce", &[])
        .await
        .map_err(|e| json!({"refused": e.to_string()}))?;
    let frame = signed_announce(id, summary, endpoints, &relay_url, unix_now());
    send(&mut agent, &frame).await;
    match recv(&mut agent).await {
        Some(answer) if answer["type"] == "ANNOUNCE_OK" => Ok(agent),
        other => Err(other.unwrap_or(Value::Null)),
    }
}

/// The bound the relay's resident memory stays under in the test below: measured at
/// 14 MiB idle and 62 MiB at the peak of the load (debug build; most of it the 2,000
/// full-size offline entries, then the 256 held caller connections, ~48 KiB each).
/// Before the fixes, the 40 oversize announces alone took it past 190 MiB.
const RSS_BOUND_KIB: u64 = 96 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_relay_stays_under_its_memory_bound_under_hostile_load() {
    let relay = RelayProcess::spawn();
    let addr = relay.addr;
    let idle_kib = relay.rss_kib();
    let legit_id = Identity::generate();
    let mut legit = announce_at(addr, [127, 0, 0, 3], &legit_id, "legit", &[])
        .await
        .expect("the legitimate agent announces");
    let to = legit_id.address();
    let mut caller = try_ws_from([127, 0, 0, 4], addr, "/ws/input", &[])
        .await
        .unwrap();
    round_trip(&mut caller, &mut legit, to, "before").await;

    // 1. Forty announces with ~4 MB of endpoints each (the finding: +190 MB).
    let huge: Vec<String> = (0..16)
        .map(|i| format!("http://10.0.0.{i}/{}", "x".repeat(240_000)))
        .collect();
    let mut refused = 0;
    for _ in 0..40 {
        if announce_at(addr, [127, 0, 0, 1], &Identity::generate(), "", &huge)
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 40, "every oversize announce is refused");

    println!(
        "relay RSS after phase 1 (oversize announces): {} KiB",
        relay.rss_kib()
    );
    // 2. Two thousand addresses with the most an announce may carry, each announced and
    // gone (offline entries), a hundred at a time.
    let endpoints: Vec<String> = (0..MAX_ENDPOINTS)
        .map(|i| {
            format!(
                "http://10.1.0.{i}:8000/{}",
                "e".repeat(MAX_ENDPOINT_BYTES - 24)
            )
        })
        .collect();
    let summary = "s".repeat(MAX_SUMMARY_CHARS);
    for _ in 0..20 {
        let batch = (0..100).map(|_| {
            let (endpoints, summary) = (endpoints.clone(), summary.clone());
            tokio::spawn(async move {
                announce_at(
                    addr,
                    [127, 0, 0, 1],
                    &Identity::generate(),
                    &summary,
                    &endpoints,
                )
                .await
                .is_ok()
            })
        });
        for ok in futures::future::join_all(batch).await {
            assert!(ok.unwrap(), "a well-formed announce is accepted");
        }
    }

    println!(
        "relay RSS after phase 2 (2,000 full-size addresses): {} KiB",
        relay.rss_kib()
    );
    // 3. One socket claiming five hundred more addresses.
    let mut ghost_host = announce_at(addr, [127, 0, 0, 1], &Identity::generate(), "", &[])
        .await
        .unwrap();
    for _ in 0..500 {
        let frame = signed_announce(
            &Identity::generate(),
            &summary,
            &endpoints,
            &format!("ws://{addr}"),
            unix_now(),
        );
        send(&mut ghost_host, &frame).await;
        assert_eq!(
            kind(&recv(&mut ghost_host).await.unwrap()).1,
            Some("bad_request")
        );
    }

    println!(
        "relay RSS after phase 3 (500 addresses on one socket): {} KiB",
        relay.rss_kib()
    );
    // 4. A flood of caller connections from one IP, each naming agents that do not exist.
    let mut flood = Vec::new();
    let mut turned_away = 0;
    for i in 0..600 {
        match try_ws_from([127, 0, 0, 1], addr, "/ws/input", &[]).await {
            Ok(mut c) => {
                let frame = input_frame(
                    &legit_id,
                    Identity::generate().address(),
                    "x",
                    &format!("f-{i}"),
                );
                send(&mut c, &frame).await;
                flood.push(c);
            }
            Err(_) => turned_away += 1,
        }
    }
    assert!(turned_away > 0 && flood.len() < 600, "the flood is capped");

    // The legitimate agent and caller work during the load...
    round_trip(&mut caller, &mut legit, to, "during").await;
    let peak_kib = relay.rss_kib();
    drop(flood);
    drop(ghost_host);
    // ... and after it.
    round_trip(&mut caller, &mut legit, to, "after").await;
    let after_kib = relay.rss_kib();
    println!(
        "relay RSS: idle {idle_kib} KiB, at the peak of the load {peak_kib} KiB, after {after_kib} KiB \
         (bound {RSS_BOUND_KIB} KiB); {} caller connections held, {turned_away} turned away",
        600 - turned_away
    );
    assert!(peak_kib < RSS_BOUND_KIB, "{peak_kib} KiB at the peak");
    assert!(after_kib < RSS_BOUND_KIB, "{after_kib} KiB after");
}
