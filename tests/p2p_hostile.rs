//! Hostile peers on the swarm, on 127.0.0.0/8 only (Linux routes all of it to loopback;
//! a caller whose QUIC listener is bound to 127.0.0.N dials from that address, so it
//! plays another host):
//!
//! 1. a peer banned for misbehaving cannot come back with a fresh key from the same IP,
//!    while a peer from another IP is still served;
//! 2. one IP gets at most `max_connections_per_ip` inbound connections; the extras are
//!    refused and everyone else is unaffected;
//! 3. presence records that are stale, from the future, oversize or of another type are
//!    not stored, and a replayed older record does not replace a newer one (crafted
//!    records, put and read back with a raw Kademlia client over the network).

mod common;

use std::future::Future;
use std::time::Duration;

use common::{TestNode, QUIC, TCP};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{kad, multiaddr::Protocol, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use oonode::agent::Echo;
use oonode::envelope::{canonical_json, unix_now, MAX_ENVELOPE_BYTES};
use oonode::{
    connect, Address, Answer, CallError, ConnectOptions, Host, Identity, P2p, P2pConfig, Via,
};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// `wire::MAX_FRAME_BYTES` (the `wire` module is not public).
const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + 256;
/// Bound on one call attempt (dialing is bounded by 15 s inside, replies by 10 s a frame).
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// The node's Kademlia protocol.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/oonode/kad/1.0.0");

/// Fails the test when `fut` does not finish within `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

/// An Echo node, swarm only, listening on 127.0.0.1 over QUIC and TCP.
async fn echo_node() -> TestNode {
    TestNode::builder(Host::new(Echo))
        .http(false)
        .swarm(&[QUIC, TCP])
        .start()
        .await
}

/// A one-off caller swarm with a fresh key, whose QUIC listener on `ip` makes it dial
/// `node` (a QUIC address) from `ip`.
async fn caller_from(ip: &str, node: &Multiaddr) -> (P2p, CancellationToken) {
    let stop = CancellationToken::new();
    let mut config = P2pConfig::caller(vec![node.clone()]);
    config.listen = vec![format!("/ip4/{ip}/udp/0/quic-v1").parse().unwrap()];
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let p2p = P2p::spawn(keypair, config, stop.clone())
        .await
        .expect("caller swarm starts");
    (p2p, stop)
}

/// One Echo call through `swarm`.
async fn call(swarm: &P2p, target: Address, prompt: &str) -> Result<Answer, CallError> {
    let options = ConnectOptions::default()
        .swarm(swarm.clone())
        .via(Via::P2p)
        .identity(Identity::generate())
        .reply_timeout(Duration::from_secs(10));
    within(CALL_LIMIT, "a call", async {
        let mut remote = connect(&target.to_string(), options).await?;
        remote.input(prompt).await
    })
    .await
}

async fn assert_served(swarm: &P2p, target: Address, who: &str) {
    let answer = call(swarm, target, who)
        .await
        .unwrap_or_else(|e| panic!("{who} should be served: {e}"));
    assert_eq!(answer.result, who);
}

async fn assert_refused(swarm: &P2p, target: Address, who: &str) {
    match call(swarm, target, who).await {
        Ok(answer) => panic!("{who} should be refused, got {:?}", answer.result),
        Err(e) => eprintln!("  {who}: refused ({e})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_peer_cannot_return_with_a_fresh_key_from_the_same_ip() {
    within(Duration::from_secs(150), "test", async {
        let node = echo_node().await;
        let quic = node.swarm_addr_over("quic-v1");

        // Served at first, then it sends a frame over the size limit and is banned.
        let (bad, stop_bad) = caller_from("127.0.0.3", &quic).await;
        assert_served(&bad, node.address, "the bad peer before").await;
        let mut s = within(Duration::from_secs(20), "open", bad.open(node.address))
            .await
            .expect("stream opens");
        let oversize = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        within(Duration::from_secs(5), "write", s.write_all(&oversize))
            .await
            .unwrap();
        within(Duration::from_secs(5), "flush", s.flush())
            .await
            .unwrap();
        // The node answers with an ERROR and closes (or resets); either way it ends.
        let mut rest = Vec::new();
        let _ = within(
            Duration::from_secs(10),
            "reaction",
            s.read_to_end(&mut rest),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_refused(&bad, node.address, "the banned key").await;

        // A fresh key from the same IP, twice: refused.
        for round in 0..2 {
            let (fresh, stop) = caller_from("127.0.0.3", &quic).await;
            assert_refused(
                &fresh,
                node.address,
                &format!("fresh key {round} from 127.0.0.3"),
            )
            .await;
            stop.cancel();
        }

        // Another IP is served, and so is 127.0.0.1.
        let (good, stop_good) = caller_from("127.0.0.2", &quic).await;
        assert_served(&good, node.address, "a peer from 127.0.0.2").await;
        let (local, stop_local) = caller_from("127.0.0.1", &quic).await;
        assert_served(&local, node.address, "a peer from 127.0.0.1").await;

        for stop in [stop_bad, stop_good, stop_local] {
            stop.cancel();
        }
        node.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_one_ip_are_capped_and_others_unaffected() {
    within(Duration::from_secs(200), "test", async {
        let node = echo_node().await;
        let quic = node.swarm_addr_over("quic-v1");
        let cap = P2pConfig::default().max_connections_per_ip;

        // Up to the cap from 127.0.0.4, each with its own key and connection: all served.
        let mut held = Vec::new();
        for i in 0..cap {
            let (caller, stop) = caller_from("127.0.0.4", &quic).await;
            assert_served(&caller, node.address, &format!("caller {i} from 127.0.0.4")).await;
            held.push((caller, stop));
        }
        let connected = node.p2p().status().connected_peers;
        eprintln!("{cap} callers from 127.0.0.4 connected; the node has {connected} peers");

        // One more from there: refused, twice.
        for extra in 0..2 {
            let (caller, stop) = caller_from("127.0.0.4", &quic).await;
            assert_refused(
                &caller,
                node.address,
                &format!("extra caller {extra} from 127.0.0.4"),
            )
            .await;
            stop.cancel();
        }
        assert!(node.p2p().status().connected_peers <= cap);

        // Everyone else: a caller from another IP, and the ones already in.
        let (other, stop_other) = caller_from("127.0.0.5", &quic).await;
        assert_served(&other, node.address, "a caller from 127.0.0.5").await;
        for (i, (caller, _)) in held.iter().enumerate().step_by(5) {
            assert_served(caller, node.address, &format!("caller {i} again")).await;
        }

        stop_other.cancel();
        for (_, stop) in held {
            stop.cancel();
        }
        node.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Presence records through a raw Kademlia client.

/// A presence record for `id`, signed at `timestamp`, with `edit` applied before signing.
fn presence(
    id: &Identity,
    timestamp: u64,
    edit: impl FnOnce(&mut Map<String, Value>),
) -> kad::Record {
    let me = id.address().to_string();
    let mut p = Map::new();
    p.insert("type".into(), json!("PRESENCE"));
    p.insert("address".into(), json!(me));
    p.insert("from".into(), json!(me));
    p.insert("summary".into(), json!("crafted"));
    p.insert("examples".into(), json!(["hi"]));
    p.insert("endpoints".into(), json!([]));
    p.insert("timestamp".into(), json!(timestamp));
    edit(&mut p);
    let sig = id.sign(&canonical_json(&Value::Object(p.clone())));
    p.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
    let mut key = b"/oonode/presence/".to_vec();
    key.extend_from_slice(id.address().as_bytes());
    kad::Record::new(key, serde_json::to_vec(&p).unwrap())
}

/// A bare Kademlia client swarm that knows one server.
struct RawKad {
    swarm: libp2p::Swarm<kad::Behaviour<kad::store::MemoryStore>>,
    server: PeerId,
}

impl RawKad {
    fn new(server: &Multiaddr) -> RawKad {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|key| {
                let me = key.public().to_peer_id();
                kad::Behaviour::with_config(
                    me,
                    kad::store::MemoryStore::new(me),
                    kad::Config::new(KAD_PROTOCOL),
                )
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.behaviour_mut().set_mode(Some(kad::Mode::Client));
        let mut addr = server.clone();
        let Some(Protocol::P2p(peer)) = addr.pop() else {
            panic!("{server} ends with /p2p/<PeerId>");
        };
        swarm.behaviour_mut().add_address(&peer, addr);
        RawKad {
            swarm,
            server: peer,
        }
    }

    /// Puts `record` on the server only (not in our own store). The server answers even
    /// when it does not store it; an error means the PUT never reached it (Kademlia's
    /// own 16 KiB message limit).
    async fn try_put(&mut self, record: kad::Record) -> Result<(), kad::PutRecordError> {
        let server = self.server;
        let id = self.swarm.behaviour_mut().put_record_to(
            record,
            std::iter::once(server),
            kad::Quorum::One,
        );
        within(Duration::from_secs(10), "put", async {
            loop {
                if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                    id: done,
                    result: kad::QueryResult::PutRecord(result),
                    ..
                }) = self.swarm.select_next_some().await
                {
                    if done == id {
                        return result.map(drop);
                    }
                }
            }
        })
        .await?;
        // Let the server's event loop take the record before we ask for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    async fn put(&mut self, record: kad::Record) {
        self.try_put(record)
            .await
            .expect("the server answers the PUT");
    }

    /// What the server holds under `key`, as the DHT serves it to anyone.
    async fn get(&mut self, key: &kad::RecordKey) -> Option<Vec<u8>> {
        let id = self.swarm.behaviour_mut().get_record(key.clone());
        within(Duration::from_secs(10), "get", async {
            loop {
                if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                    id: done,
                    result: kad::QueryResult::GetRecord(result),
                    step,
                    ..
                }) = self.swarm.select_next_some().await
                {
                    if done != id {
                        continue;
                    }
                    if let Ok(kad::GetRecordOk::FoundRecord(found)) = result {
                        return Some(found.record.value);
                    }
                    if step.last {
                        return None;
                    }
                }
            }
        })
        .await
    }
}

fn timestamp_of(value: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(value).unwrap();
    v["timestamp"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_future_oversize_and_replayed_presence_records_are_not_stored() {
    within(Duration::from_secs(90), "test", async {
        let node = echo_node().await;
        let mut client = RawKad::new(&node.swarm_addr_over("tcp"));
        let now = unix_now();

        // The path works: a valid record ten minutes old is stored and served.
        let id = Identity::generate();
        let older = presence(&id, now - 600, |_| {});
        client.put(older.clone()).await;
        let held = client
            .get(&older.key)
            .await
            .expect("a valid record is stored");
        assert_eq!(timestamp_of(&held), now - 600);
        // A newer one replaces it…
        let newer = presence(&id, now - 10, |p| {
            p.insert("summary".into(), json!("newer"));
        });
        client.put(newer.clone()).await;
        let held = client.get(&newer.key).await.expect("the newer record");
        assert_eq!(
            timestamp_of(&held),
            now - 10,
            "a newer record replaces an older one"
        );
        // …and the older one, replayed, does not come back.
        let mut wrong = Vec::new();
        client.put(older.clone()).await;
        let held = client.get(&newer.key).await.expect("still a record");
        if timestamp_of(&held) != now - 10 {
            wrong.push("a replayed older record replaced the newer one");
        }

        let fresh_key = Identity::generate;
        let set = |field: &'static str, value: Value| {
            move |p: &mut Map<String, Value>| {
                p.insert(field.into(), value);
            }
        };
        let many_endpoints: Vec<String> = (0..17).map(|i| format!("http://10.0.0.{i}")).collect();
        let refused = [
            ("two hours old", presence(&fresh_key(), now - 7200, |_| {})),
            ("an hour ahead", presence(&fresh_key(), now + 3600, |_| {})),
            (
                "another type",
                presence(&fresh_key(), now, set("type", json!("INPUT"))),
            ),
            (
                "a 1001-char summary",
                presence(&fresh_key(), now, set("summary", json!("s".repeat(1001)))),
            ),
            (
                "17 endpoints",
                presence(&fresh_key(), now, set("endpoints", json!(many_endpoints))),
            ),
            (
                "a 501-char example",
                presence(&fresh_key(), now, set("examples", json!(["e".repeat(501)]))),
            ),
            (
                "17 KiB in all",
                presence(
                    &fresh_key(),
                    now,
                    set("padding", json!("p".repeat(17 * 1024))),
                ),
            ),
        ];
        for (what, record) in refused {
            if let Err(e) = client.try_put(record.clone()).await {
                eprintln!("  {what}: the PUT itself failed: {e}");
            }
            let held = client.get(&record.key).await;
            eprintln!(
                "  {what}: {}",
                if held.is_some() { "STORED" } else { "refused" }
            );
            if held.is_some() {
                wrong.push(what);
            }
        }
        assert!(
            wrong.is_empty(),
            "stored when they should not be: {wrong:?}"
        );

        node.stop().await;
    })
    .await;
}
