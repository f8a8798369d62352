//! NAT traversal on the swarm, on loopback: a relay started with a swarm serves circuit
//! relay v2; a node that listens on no address at all (as good as behind a NAT: nobody
//! can dial it) reserves a circuit on it and is called through it by address; a relay
//! out of reservations refuses, and says so on `/metrics`. The NAT lab
//! (`testnet/natlab.sh`) shows the same across real masquerading routers, with hole
//! punching.
//!
//! Everything listens on 127.0.0.1; every await is bounded.

mod common;

use std::time::Duration;

use common::{relay_config, start_relay, wait_until, STEP};
use oonode::agent::Echo;
use oonode::{
    CircuitLimits, ConnPath, ConnectOptions, Host, NatMode, NodeHandle, RelayHandle, Via,
};

/// A relay with a swarm on loopback (so a circuit relay v2 server) within `limits`.
async fn relay_with_swarm(limits: CircuitLimits) -> RelayHandle {
    let mut config = relay_config();
    config.swarm_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.circuits = limits;
    start_relay(config).await
}

/// An echo node in the swarm that listens nowhere: its only addresses are circuits.
async fn unlistening_node(relay: &RelayHandle, dir: &std::path::Path) -> NodeHandle {
    let host = Host::new(Echo)
        .co_dir(dir)
        .http(false)
        .p2p(true)
        .listen(Vec::<String>::new())
        .bootstrap(relay.swarm_addrs().iter().cloned())
        .nat(NatMode::Private);
    tokio::time::timeout(STEP, async { host.build().unwrap().spawn().await.unwrap() })
        .await
        .expect("the node starts")
}

fn circuit_addrs(node: &NodeHandle) -> Vec<String> {
    node.p2p()
        .expect("the node is in the swarm")
        .status()
        .listen_addrs
        .into_iter()
        .filter(|a| a.contains("/p2p-circuit/"))
        .collect()
}

/// A counter or gauge on the relay's `/metrics`.
async fn metric(relay: &RelayHandle, name: &str) -> u64 {
    let url = format!("http://{}/metrics", relay.local_addr());
    let text = common::client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is on /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_listens_nowhere_is_called_by_address_through_a_relays_circuit() {
    let relay = relay_with_swarm(CircuitLimits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = unlistening_node(&relay, dir.path()).await;
    wait_until("the node reserves a circuit", STEP, || async {
        !circuit_addrs(&node).is_empty()
    })
    .await;
    let relay_peer = relay.swarm_addrs()[0]
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    for a in circuit_addrs(&node) {
        assert!(
            a.contains(&format!("/p2p/{relay_peer}/p2p-circuit/p2p/")),
            "a circuit through the relay: {a}"
        );
    }
    assert!(metric(&relay, "oonode_relay_circuit_reservations").await >= 1);

    let options = ConnectOptions::default()
        .via(Via::P2p)
        .bootstrap(relay.swarm_addrs()[0].parse().unwrap())
        .reply_timeout(Duration::from_secs(20));
    let mut remote =
        tokio::time::timeout(STEP, oonode::connect(&node.address().to_string(), options))
            .await
            .expect("connect in time")
            .expect("the node is reachable through the circuit");
    let answer = tokio::time::timeout(STEP, remote.input("through the relay"))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(answer.result, "through the relay");
    // The node has no address to dial: the call came through the circuit, or over a
    // connection the node itself dialed back to the caller (DCUtR).
    let path = remote.swarm_path();
    assert!(
        matches!(path, Some(ConnPath::Circuit | ConnPath::HolePunched)),
        "{path:?}"
    );
    assert!(metric(&relay, "oonode_relay_circuits_opened_total").await >= 1);
    let paths = node.p2p().unwrap().status().paths;
    assert!(paths.circuit + paths.hole_punched >= 1, "{paths:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_out_of_reservations_refuses_and_the_node_is_not_reachable() {
    let mut limits = CircuitLimits::default();
    limits.max_reservations = 0;
    let relay = relay_with_swarm(limits).await;
    let dir = tempfile::tempdir().unwrap();
    let node = unlistening_node(&relay, dir.path()).await;
    wait_until("the relay refuses the reservation", STEP, || async {
        metric(&relay, "oonode_relay_circuit_requests_refused_total").await >= 1
    })
    .await;
    assert!(
        circuit_addrs(&node).is_empty(),
        "{:?}",
        circuit_addrs(&node)
    );
    assert_eq!(metric(&relay, "oonode_relay_circuit_reservations").await, 0);
    let options = ConnectOptions::default()
        .via(Via::P2p)
        .bootstrap(relay.swarm_addrs()[0].parse().unwrap());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        oonode::connect(&node.address().to_string(), options),
    )
    .await
    .expect("connect gives up in time")
    .err()
    .expect("no way to a node that listens nowhere and holds no circuit");
    let text = err.to_string();
    assert!(
        text.contains("not reachable") || text.contains("offline"),
        "a clear reason: {text}"
    );
    node.shutdown().await.unwrap();
}
