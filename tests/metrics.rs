//! `/metrics` on a node and on a relay: the counters move with real requests.

mod common;

use std::collections::BTreeMap;

use common::*;
use oonode::agent::Echo;
use oonode::proto::RelayUrl;
use oonode::{Durability, Host, Identity};
use serde_json::json;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text format's sample lines (our label values hold no `,`, `"` or `}`).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`; 0 when absent (a counter that
/// never moved has no series yet).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map_or(0.0, |s| s.value)
}

async fn scrape(url: &str) -> Vec<Sample> {
    let res = tokio::time::timeout(STEP, client().get(url).send())
        .await
        .expect("bounded")
        .expect("GET /metrics");
    assert_eq!(res.status(), 200);
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&res.text().await.expect("a body"))
}

const REQUESTS: &str = "oonode_requests_total";

#[tokio::test]
async fn node_metrics_count_answered_and_refused_requests_per_transport() {
    let dir = tempfile::tempdir().unwrap();
    // `sync` durability: the turn's answer waits for a sync of the store's log, so the
    // counts below are there when the answer is (in `batched` mode they follow within
    // the window).
    let node = TestNode::start(Host::new(Echo).durability(Durability::Sync), dir.path()).await;
    let metrics = format!("{}/metrics", node.url);
    let http_ok = [("transport", "http"), ("route", "input"), ("code", "ok")];
    let http_refused = [
        ("transport", "http"),
        ("route", "input"),
        ("code", "wrong_recipient"),
    ];

    let before = scrape(&metrics).await;
    assert_eq!(value(&before, REQUESTS, &http_ok), 0.0);
    assert_eq!(value(&before, "oonode_in_flight", &[]), 0.0);

    let (status, body) = node.post(&json!({"prompt": "count me"})).await;
    assert_eq!(status, 200, "{body}");
    // Signed for another node: refused by the dispatcher.
    let caller = Identity::generate();
    let elsewhere = Identity::generate().address();
    let (status, body) = node
        .post(&signed_input(&caller, elsewhere, "not for you"))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "wrong_recipient");

    // Not JSON: refused by the transport before the dispatcher, counted all the same.
    let (status, _) = post_raw(&format!("{}/input", node.url), b"{not json".to_vec()).await;
    assert_eq!(status, 400);

    // Reads are counted under their own route.
    assert_eq!(node.get("/sessions").await.0, 200);
    assert_eq!(node.get("/sessions/no-such-one").await.0, 404);

    let after = scrape(&metrics).await;
    assert_eq!(value(&after, REQUESTS, &http_ok), 1.0);
    let list = [("transport", "http"), ("route", "sessions"), ("code", "ok")];
    assert_eq!(value(&after, REQUESTS, &list), 1.0);
    let missing = [
        ("transport", "http"),
        ("route", "session"),
        ("code", "not_found"),
    ];
    assert_eq!(value(&after, REQUESTS, &missing), 1.0);
    assert_eq!(value(&after, REQUESTS, &http_refused), 1.0);
    let invalid = [
        ("transport", "http"),
        ("route", "input"),
        ("code", "invalid_json"),
    ];
    assert_eq!(value(&after, REQUESTS, &invalid), 1.0);
    let latency = "oonode_request_duration_seconds_count";
    assert_eq!(value(&after, latency, &[("transport", "http")]), 5.0);
    assert_eq!(value(&after, "oonode_agent_run_seconds_count", &[]), 1.0);
    // The run's session was made durable: at least one sync, none pending after.
    let flushes = "oonode_store_flushes_total";
    assert!(value(&after, flushes, &[]) > value(&before, flushes, &[]));
    assert!(value(&after, "oonode_store_writes_per_flush_count", &[]) >= 1.0);
    assert_eq!(value(&after, "oonode_store_queue", &[]), 0.0);
    assert!(
        value(&after, "oonode_agent_run_seconds_bucket", &[("le", "+Inf")]) >= 1.0,
        "the run histogram has its +Inf bucket"
    );
    assert_eq!(value(&after, "oonode_in_flight", &[]), 0.0);

    // The same dispatcher counts `/ws` under its own transport.
    let mut ws = ws_connect(&node.ws_url()).await;
    ws_send(&mut ws, &json!({"type": "INPUT", "prompt": "by socket"})).await;
    loop {
        let f = ws_recv(&mut ws).await.expect("the socket stays open");
        if matches!(f["type"].as_str(), Some("OUTPUT" | "ERROR")) {
            assert_eq!(f["type"], "OUTPUT", "{f}");
            break;
        }
    }
    let ws_ok = [("transport", "ws"), ("route", "input"), ("code", "ok")];
    assert_eq!(value(&scrape(&metrics).await, REQUESTS, &ws_ok), 1.0);
    drop(ws);

    // Public like /health: any web page may read it.
    let res = client()
        .get(&metrics)
        .header("origin", "https://dashboard.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    node.stop().await;
}

#[tokio::test]
async fn relay_metrics_count_agents_callers_frames_and_refusals() {
    let relay = start_relay(relay_config()).await;
    let url = relay.url();
    let relay_url: RelayUrl = url.parse().unwrap();
    let metrics = format!("{}/metrics", relay_url.http_base());
    let node = TestNode::builder(Host::new(Echo)).relay(&url).start().await;

    let before = scrape(&metrics).await;
    assert_eq!(value(&before, "oonode_relay_agents_online", &[]), 1.0);
    assert_eq!(
        value(&before, "oonode_relay_frames_relayed_total", &[]),
        0.0
    );

    let caller = Identity::generate();
    let mut ws = ws_connect(&relay_url.input()).await;
    let mut frame = signed_input(&caller, node.address, "through the relay");
    frame["type"] = json!("INPUT");
    frame["to"] = json!(node.address.to_string());
    ws_send(&mut ws, &frame).await;
    let answer = loop {
        let f = ws_recv(&mut ws).await.expect("the socket stays open");
        if matches!(f["type"].as_str(), Some("OUTPUT" | "ERROR")) {
            break f;
        }
    };
    assert_eq!(answer["result"], "through the relay", "{answer}");
    // To an agent the relay never saw: refused.
    let nobody = Identity::generate().address();
    let mut stray = signed_input(&caller, nobody, "anyone?");
    stray["type"] = json!("INPUT");
    stray["to"] = json!(nobody.to_string());
    ws_send(&mut ws, &stray).await;
    let refusal = ws_recv(&mut ws).await.expect("an answer");
    assert_eq!(refusal["code"], "unknown_agent", "{refusal}");

    let after = scrape(&metrics).await;
    assert_eq!(value(&after, "oonode_relay_agents_online", &[]), 1.0);
    assert_eq!(value(&after, "oonode_relay_callers", &[]), 1.0);
    assert_eq!(value(&after, "oonode_relay_sessions", &[]), 1.0);
    // The INPUT one way, at least the OUTPUT the other.
    assert!(value(&after, "oonode_relay_frames_relayed_total", &[]) >= 2.0);
    assert_eq!(
        value(
            &after,
            "oonode_relay_refusals_total",
            &[("code", "unknown_agent")]
        ),
        1.0
    );

    // The node counted the relayed request under its transport.
    let node_metrics = scrape(&format!("{}/metrics", node.url)).await;
    let relayed = [("transport", "relay"), ("route", "input"), ("code", "ok")];
    assert_eq!(value(&node_metrics, REQUESTS, &relayed), 1.0);
    assert!(node_metrics.iter().any(|s| s.name == "oonode_relay_link"
        && s.labels["state"] == "connected"
        && s.value == 1.0));

    drop(ws);
    node.stop().await;
    relay.shutdown().await;
}

/// Kills the child when dropped, also when the test panics.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_logs_one_json_line_per_request_with_its_request_id() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let mut child = Killed(
        Command::new(BIN)
            .args([
                "host",
                "--agent",
                "echo",
                "--ready-json",
                "--log-format",
                "json",
            ])
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--no-relay",
                "--no-p2p",
            ])
            .arg("--co-dir")
            .arg(dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts"),
    );
    let (tx, lines) = std::sync::mpsc::channel::<(bool, String)>();
    for (is_err, pipe) in [
        (
            false,
            Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        (true, Box::new(child.0.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((is_err, line));
            }
        });
    }
    let next = |want_stderr: bool| -> serde_json::Value {
        loop {
            let (is_err, line) = lines.recv_timeout(STEP).expect("a line within a step");
            if is_err != want_stderr {
                continue;
            }
            // The banner on stderr is not JSON; log lines are.
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if want_stderr && v["fields"]["message"] != "request" {
                    continue;
                }
                return v;
            }
        }
    };
    let ready = next(false);
    let url = ready["http"].as_str().expect("http in the ready line");
    let (status, body) = post_json(&format!("{url}/input"), &json!({"prompt": "log me"})).await;
    assert_eq!(status, 200, "{body}");

    let line = next(true);
    assert_eq!(line["level"], "INFO", "{line}");
    let fields = &line["fields"];
    assert_eq!(fields["transport"], "http", "{line}");
    assert_eq!(fields["caller"], "anonymous", "{line}");
    assert_eq!(fields["session"], body["session_id"], "{line}");
    assert_eq!(fields["code"], "ok", "{line}");
    assert!(fields["duration_ms"].is_u64(), "{line}");
    let request = line["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "request"))
        .unwrap_or_else(|| panic!("a request span in {line}"));
    let id = request["id"].as_str().expect("a request id");
    assert_eq!(id.len(), 8, "{line}");
}

/// A node's `/metrics` also shows libp2p's own: a second node joining through it is
/// counted as a connection and an identify exchange.
#[tokio::test]
async fn node_metrics_include_the_swarms_own() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestNode::builder(Host::new(Echo))
        .co_dir(a_dir.path())
        .swarm(&["/ip4/127.0.0.1/tcp/0"])
        .start()
        .await;
    let metrics = format!("{}/metrics", a.url);
    let established = "oonode_libp2p_swarm_connections_established_total";
    let total = |samples: &[Sample], name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(total(&scrape(&metrics).await, established), 0.0);

    let b = TestNode::builder(Host::new(Echo))
        .co_dir(b_dir.path())
        .http(false)
        .swarm(&["/ip4/127.0.0.1/tcp/0"])
        .bootstrap(&[a.swarm_addr_over("tcp")])
        .start()
        .await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let samples = scrape(&metrics).await;
        let identified = total(&samples, "oonode_libp2p_identify_received_total")
            + total(&samples, "oonode_libp2p_identify_pushed_total")
            + total(&samples, "oonode_libp2p_identify_sent_total");
        if total(&samples, established) >= 1.0 && identified >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no libp2p connection or identify counted: {:?}",
            samples
                .iter()
                .filter(|s| s.name.starts_with("oonode_libp2p") && s.value > 0.0)
                .map(|s| &s.name)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    b.stop().await;
    a.stop().await;
}
