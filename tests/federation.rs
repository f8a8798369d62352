//! Relays that federate through the libp2p DHT: a caller that knows only relay A reaches
//! an agent homed on relay B; the agent moves to relay C and is found there; the
//! directory of A names the agent's home; and what a hostile caller or agent key could
//! try: a forwarded connection is never passed on again, and a home record that points
//! at a private address is not followed unless the relay allows it.
//!
//! Everything listens on 127.0.0.1; one relay is the real binary; every await is
//! bounded.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    get_json, input_frame, relay_config, start_relay, ws_recv, ws_send, Child, Socket, Stderr,
    TestNode, BIN, STEP,
};
use oonode::agent::Echo;
use oonode::proto::RelayUrl;
use oonode::{Address, ConnectOptions, Host, Identity, Multiaddr, RelayConfig, RelayHandle};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A swarm listener on loopback, any port.
const SWARM: &str = "/ip4/127.0.0.1/tcp/0";

/// A federating relay in-process: swarm on loopback, joined through `bootstrap`.
async fn federated(bootstrap: &[String], forward_private: bool) -> RelayHandle {
    let mut config: RelayConfig = relay_config();
    config.swarm_listen = vec![SWARM.parse().unwrap()];
    config.bootstrap = bootstrap.iter().map(|a| a.parse().unwrap()).collect();
    config.forward_private = forward_private;
    start_relay(config).await
}

/// `oonode relay --swarm-listen … --forward-private --ready-json`, the real binary.
async fn federated_binary() -> (Child, String, Vec<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--ready-json", "--listen", "127.0.0.1:0"])
        .args(["--swarm-listen", SWARM, "--forward-private"])
        .env("RUST_LOG", "error");
    let child = Child::spawn("relay", &mut cmd, Stderr::Inherit);
    let ready = child.ready_async(STEP).await;
    let url = ready["url"].as_str().expect("a url").to_owned();
    let swarm: Vec<String> = ready["swarm"]
        .as_array()
        .expect("the ready line lists the swarm's addresses")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    for a in &swarm {
        let addr: Multiaddr = a.parse().expect("a multiaddr");
        assert!(a.ends_with(&format!("/p2p/{}", peer_of(&addr))), "{a}");
    }
    (child, url, swarm)
}

fn peer_of(addr: &Multiaddr) -> String {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p.to_string(),
        _ => panic!("{addr} ends in /p2p/<PeerId>"),
    }
}

/// An echo node homed on `relay` (HTTP and swarm off: reachable only through a relay).
async fn echo_on(relay: &str, co_dir: Option<&std::path::Path>) -> TestNode {
    let mut b = TestNode::builder(Host::new(Echo)).http(false).relay(relay);
    if let Some(dir) = co_dir {
        b = b.co_dir(dir);
    }
    b.start().await
}

/// The directory entry of `address` on `relay`.
async fn directory(relay: &str, address: Address) -> (u16, Value) {
    let url: RelayUrl = relay.parse().unwrap();
    get_json(&url.directory(address)).await
}

/// Waits until `relay`'s directory says `address` is homed on `home`.
async fn until_homed(relay: &str, address: Address, home: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, body) = directory(relay, address).await;
        if status == 200 && body["home_relay"].as_str() == Some(home) {
            assert_eq!(body["online"], true, "{body}");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{relay} does not name {home} as the home of {address} within {limit:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One call by a fresh caller that knows only `relay`.
async fn call(relay: &str, to: Address, prompt: &str) -> Result<String, String> {
    let opts = ConnectOptions::default()
        .relay(relay)
        .identity(Identity::generate())
        .reply_timeout(Duration::from_secs(5));
    tokio::time::timeout(STEP, async {
        let mut remote = oonode::connect(&to.to_string(), opts).await?;
        remote.input(prompt).await
    })
    .await
    .map_err(|_| "the call timed out".to_string())?
    .map(|a| a.result)
    .map_err(|e| format!("{e:?}"))
}

/// Retries a call through `relay` until it answers, within `limit`.
async fn call_until_ok(relay: &str, to: Address, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match call(relay, to, "where are you").await {
            Ok(r) => {
                assert_eq!(r, "where are you");
                return start.elapsed();
            }
            Err(e) => assert!(
                start.elapsed() < limit,
                "no answer through {relay} within {limit:?}; last error: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter of a relay's `/metrics`.
async fn metric(relay: &str, name: &str) -> f64 {
    let url: RelayUrl = relay.parse().unwrap();
    let text = common::client()
        .get(format!("{}/metrics", url.http_base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A raw caller socket on `relay`'s `/ws/input`, optionally marked as passed on by
/// another relay.
async fn caller_socket(relay: &str, forwarded: bool) -> Socket {
    let url: RelayUrl = relay.parse().unwrap();
    let mut request = url.input().into_client_request().unwrap();
    if forwarded {
        request
            .headers_mut()
            .insert("x-oonode-forwarded", "1".parse().unwrap());
    }
    let (socket, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .expect("connecting is bounded")
        .expect("the relay takes callers");
    socket
}

/// The first OUTPUT or ERROR on `socket`.
async fn until_final(socket: &mut Socket) -> Value {
    loop {
        let frame = ws_recv(socket).await.expect("the socket stays open");
        if matches!(frame["type"].as_str(), Some("OUTPUT") | Some("ERROR")) {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_knows_only_relay_a_reaches_an_agent_homed_on_relay_b() {
    // B is the real binary; A and C join the swarm through it.
    let (_b_proc, b, b_swarm) = federated_binary().await;
    let a = federated(&b_swarm, true).await;
    let c = federated(&b_swarm, true).await;
    assert_eq!(a.ready().swarm.len(), 1, "A reports its swarm address");
    let dir = tempfile::tempdir().unwrap();
    let node = echo_on(&b, Some(dir.path())).await;
    let address = node.address;

    // A and C learn from the DHT where the agent is.
    let took = until_homed(&a.url(), address, &b, STEP).await;
    println!("A resolved the agent's home relay within {took:?}");
    until_homed(&c.url(), address, &b, STEP).await;

    // The client, given only A, gets the agent's signed answer, twice in one session.
    let opts = ConnectOptions::default()
        .relay(a.url())
        .identity(Identity::generate())
        .reply_timeout(Duration::from_secs(5));
    let mut remote = tokio::time::timeout(STEP, oonode::connect(&address.to_string(), opts))
        .await
        .unwrap()
        .expect("connect through A");
    for prompt in ["first turn", "second turn"] {
        let answer = tokio::time::timeout(STEP, remote.input(prompt))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a call through A to an agent on B: {e:?}"));
        assert_eq!(answer.result, prompt);
    }
    assert!(metric(&a.url(), "oonode_relay_forwarded_connections_total").await >= 1.0);
    assert!(metric(&b, "oonode_relay_home_records_published_total").await >= 1.0);
    assert!(metric(&a.url(), "oonode_relay_bytes_relayed_total").await > 0.0);
    assert!(metric(&a.url(), "oonode_relay_dht_records_stored_total").await >= 1.0);
    assert!(metric(&b, "oonode_relay_dht_records_served_total").await >= 1.0);

    // The agent moves to C (same key): A finds it there once C has published. Records
    // carry the announce's timestamp in seconds; the move comes a second later, as a
    // relay's death would be noticed.
    node.stop().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let moved = echo_on(&c.url(), Some(dir.path())).await;
    assert_eq!(moved.address, address);
    until_homed(&a.url(), address, &c.url(), STEP).await;
    let took = call_until_ok(&a.url(), address, Duration::from_secs(10)).await;
    println!("after the move, a call through A answered within {took:?}");
    // B too passes callers on now (its own record of the agent is older than C's).
    call_until_ok(&b, address, Duration::from_secs(10)).await;
    moved.stop().await;
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_another_relay_passed_on_is_never_passed_on_again() {
    let b = federated(&[], true).await;
    let a = federated(&b.ready().swarm, true).await;
    let node = echo_on(&b.url(), None).await;
    until_homed(&a.url(), node.address, &b.url(), STEP).await;
    let caller = Identity::generate();

    // A plain caller on A is passed on to B and answered.
    let mut plain = caller_socket(&a.url(), false).await;
    ws_send(
        &mut plain,
        &input_frame(&caller, node.address, "hi", "s-plain"),
    )
    .await;
    let answer = until_final(&mut plain).await;
    assert_eq!(answer["type"], "OUTPUT", "{answer}");

    // One marked as passed on by another relay is not: A answers for itself.
    let mut marked = caller_socket(&a.url(), true).await;
    ws_send(
        &mut marked,
        &input_frame(&caller, node.address, "hi", "s-marked"),
    )
    .await;
    let refusal = until_final(&mut marked).await;
    assert_eq!(refusal["type"], "ERROR", "{refusal}");
    assert_eq!(refusal["code"], "unknown_agent", "{refusal}");
    node.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_home_record_naming_a_private_address_is_not_followed_by_default() {
    // Any key can sign a home record naming any relay URL: a public relay must not be
    // made to connect into its own network. B is on loopback, so A (defaults) refuses.
    let b = federated(&[], true).await;
    let a = federated(&b.ready().swarm, false).await;
    let node = echo_on(&b.url(), None).await;
    until_homed(&a.url(), node.address, &b.url(), STEP).await;
    let caller = Identity::generate();
    let mut socket = caller_socket(&a.url(), false).await;
    ws_send(&mut socket, &input_frame(&caller, node.address, "hi", "s1")).await;
    let refusal = until_final(&mut socket).await;
    assert_eq!(refusal["type"], "ERROR", "{refusal}");
    let message = refusal["error"].as_str().unwrap_or_default();
    assert!(message.contains("--forward-private"), "{refusal}");
    assert_eq!(
        metric(&a.url(), "oonode_relay_forwarded_connections_total").await,
        0.0
    );
    assert!(metric(&a.url(), "oonode_relay_forward_failures_total").await >= 1.0);
    // B itself still serves the agent.
    assert_eq!(
        call(&b.url(), node.address, "direct").await.unwrap(),
        "direct"
    );
    node.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_without_a_swarm_does_not_know_agents_of_other_relays() {
    let b = federated(&[], true).await;
    let lone = start_relay(relay_config()).await;
    assert!(lone.ready().swarm.is_empty());
    let node = echo_on(&b.url(), None).await;
    let (status, _) = directory(&lone.url(), node.address).await;
    assert_eq!(status, 404);
    let err = call(&lone.url(), node.address, "hi").await.unwrap_err();
    assert!(err.contains("announced") || err.contains("nknown"), "{err}");
    node.stop().await;
    b.shutdown().await;
    lone.shutdown().await;
}

/// `--swarm-key FILE`: the relay keeps its PeerId across restarts (others' `--bootstrap`
/// addresses for it stay right); the file is made on first use, mode 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_keeps_its_peer_id_with_a_swarm_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("keys").join("swarm.key");
    let peer = || async {
        let mut cmd = Command::new(BIN);
        cmd.args(["relay", "--ready-json", "--listen", "127.0.0.1:0"])
            .args(["--swarm-listen", SWARM, "--swarm-key"])
            .arg(&key)
            .env("RUST_LOG", "error");
        let child = Child::spawn("relay", &mut cmd, Stderr::Inherit);
        let ready = child.ready_async(STEP).await;
        let first: Multiaddr = ready["swarm"][0].as_str().unwrap().parse().unwrap();
        drop(child);
        peer_of(&first)
    };
    let once = peer().await;
    let again = peer().await;
    assert_eq!(once, again, "the same key file gives the same PeerId");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::write(&key, b"short").unwrap();
    let out = Command::new(BIN)
        .args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--swarm-listen",
            SWARM,
            "--swarm-key",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("swarm key") && err.contains("swarm.key"),
        "{err}"
    );
}

/// The relay's swarm flags are checked before anything starts.
#[test]
fn the_cli_refuses_bad_swarm_flags() {
    let out = Command::new(BIN)
        .args(["relay", "--swarm-listen", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected a multiaddr"), "{err}");
    // A bootstrap address must name its peer, and needs a swarm to join.
    let out = Command::new(BIN)
        .args([
            "relay",
            "--swarm-listen",
            SWARM,
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/p2p/<PeerId>"), "{err}");
    let peer = libp2p::PeerId::random();
    let out = Command::new(BIN)
        .args([
            "relay",
            "--bootstrap",
            &format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--swarm-listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_in_the_swarm_finds_the_agents_home_relay_itself() {
    let b = federated(&[], true).await;
    let a = federated(&b.ready().swarm, true).await;
    let node = echo_on(&b.url(), None).await;
    let address = node.address;
    until_homed(&a.url(), address, &b.url(), STEP).await;
    // The caller names no relay, only a swarm peer (relay A's swarm address): it looks
    // the agent's record up and calls through the relay the agent signed it for.
    let through_swarm = |allow_private: bool| {
        ConnectOptions::default()
            .via(oonode::Via::Relay)
            .bootstrap(a.ready().swarm[0].parse().unwrap())
            .allow_private(allow_private)
            .identity(Identity::generate())
            .reply_timeout(Duration::from_secs(5))
    };
    let mut remote = tokio::time::timeout(
        STEP,
        oonode::connect(&address.to_string(), through_swarm(true)),
    )
    .await
    .unwrap()
    .expect("the home relay found in the DHT");
    assert_eq!(remote.path(), "relay");
    let answer = tokio::time::timeout(STEP, remote.input("found it"))
        .await
        .unwrap()
        .expect("an answer through the home relay");
    assert_eq!(answer.result, "found it");
    // B served it itself: A passed nothing on.
    assert_eq!(
        metric(&a.url(), "oonode_relay_forwarded_connections_total").await,
        0.0
    );
    // A record names a relay on loopback here: anyone can sign one pointing into the
    // caller's own network, so without --allow-private the caller does not go there.
    let err = tokio::time::timeout(
        STEP,
        oonode::connect(&address.to_string(), through_swarm(false)),
    )
    .await
    .unwrap()
    .err()
    .expect("a home relay on a private address is not followed by default");
    assert!(err.to_string().contains("private address"), "{err}");
    node.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}
