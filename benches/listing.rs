//! Listings of a big store against an unrelated request: `cargo bench --bench listing`
//! (issue 14: with ~1.3 GB of sessions, 10 concurrent `GET /sessions` made a 2-byte POST
//! wait 4.8 s, because every listing read every record on the one store thread).
//!
//! It writes `OONODE_BENCH_SESSIONS` sessions of `OONODE_BENCH_RECORD_KB` KiB each straight
//! into a fresh sled store (the sessions tree only, as a store written before the session
//! index existed looks, so the node's one-time index build at start-up is measured too),
//! all in one unsigned caller's scope; starts the real binary on it (`--agent echo`,
//! `RUST_LOG=info`, so the index build's progress shows) and reads how long it took to be
//! ready and its RSS, stops it and starts it again (the start-up of an indexed store, and
//! a node whose memory the one-time build has not touched). Then, for `OONODE_BENCH_SECS`: `OONODE_BENCH_LISTERS` tasks list that caller's
//! sessions back to back, while one more task POSTs `{"prompt":"hi"}` every 100 ms. It
//! prints the POST latencies idle (20 before the listings) and under the listings, the
//! listings' own latencies and count, and the node's RSS before, after and at peak.
//!
//! Defaults (the issue's case): 20 000 × 64 KiB (≈1.3 GB), 10 listers, 10 s. The store
//! lives in a temporary directory removed at the end. Linux only (reads /proc).

mod common;

use std::time::{Duration, Instant};

use common::*;
use oonode::{Scope, SessionRecord, SessionStatus};
use sha2::{Digest, Sha256};

/// The secret of the one caller whose sessions fill the store.
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(1800);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const POST_EVERY: Duration = Duration::from_millis(100);
const IDLE_POSTS: usize = 20;

fn main() {
    let sessions: usize = env_num("OONODE_BENCH_SESSIONS", 20_000);
    let record_kib: usize = env_num("OONODE_BENCH_RECORD_KB", 64);
    let listers: usize = env_num("OONODE_BENCH_LISTERS", 10);
    let secs: f64 = env_num("OONODE_BENCH_SECS", 10.0);
    eprintln!(
        "oonode listing bench: binary {}, {sessions} sessions × {record_kib} KiB, {listers} listers for {secs} s, load average {}",
        env!("CARGO_BIN_EXE_oonode"),
        loadavg()
    );

    let dir = co_dir("oonode-bench-listing-");
    let began = Instant::now();
    fill(&dir.path().join("oonode").join("db"), sessions, record_kib);
    let store_mib = dir_size(dir.path()) / (1024 * 1024);
    eprintln!(
        "store filled: {store_mib} MiB in {:.1} s",
        began.elapsed().as_secs_f64()
    );

    let start = || {
        let began = Instant::now();
        let (node, ready) = start_echo_node(
            "oonode",
            dir.path(),
            true,
            &["--no-relay", "--no-p2p"],
            "info",
            STARTUP_TIMEOUT,
        );
        (node, ready, began.elapsed())
    };
    let (first, _, first_startup) = start();
    let first_rss_kib = proc_status(first.pid(), "VmRSS");
    drop(first);
    let (node, ready, startup) = start();
    let base = ready.http.expect("HTTP is on");
    let pid = node.pid();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    let report = rt.block_on(measure(&base, pid, listers, Duration::from_secs_f64(secs)));
    let peak_rss_kib = proc_status(pid, "VmHWM");
    drop(node);
    drop(dir);

    println!();
    println!("sessions: {sessions} × {record_kib} KiB, store {store_mib} MiB");
    println!(
        "first start-up (ready line, index build included): {:.2} s, then RSS {first_rss_kib} KiB",
        first_startup.as_secs_f64()
    );
    println!(
        "second start-up (indexed store): {:.2} s",
        startup.as_secs_f64()
    );
    println!(
        "unrelated POST, idle:            n={:>4}  p50 {:>8.2} ms  max {:>8.2} ms",
        report.idle.len(),
        pct(&report.idle, 0.5),
        pct(&report.idle, 1.0)
    );
    println!(
        "unrelated POST, {listers:>2} listers:     n={:>4}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        report.loaded.len(),
        pct(&report.loaded, 0.5),
        pct(&report.loaded, 0.99),
        pct(&report.loaded, 1.0)
    );
    println!(
        "GET /sessions (first page):      n={:>4}  p50 {:>8.2} ms  max {:>8.2} ms  ({} listed per page)",
        report.lists.len(),
        pct(&report.lists, 0.5),
        pct(&report.lists, 1.0),
        report.page_len
    );
    println!(
        "node RSS: before {} KiB, after {} KiB, peak {peak_rss_kib} KiB",
        report.rss_before_kib, report.rss_after_kib
    );
}

/// Writes `n` finished sessions of about `kib` KiB each into the sessions tree of a new
/// sled store at `path`, the way the node stores them (scope key, JSON record).
fn fill(path: &std::path::Path, n: usize, kib: usize) {
    let db = sled::Config::new()
        .path(path)
        .open()
        .expect("cannot open the store");
    let tree = db.open_tree("sessions").expect("sessions tree");
    let digest: [u8; 32] = Sha256::digest(SECRET.as_bytes()).into();
    let scope = Scope::Secret(digest);
    let now = oonode::envelope::unix_now();
    let body = "x".repeat(kib * 1024);
    for i in 0..n {
        let id = format!("bench-{i:06}");
        let rec = SessionRecord {
            session_id: id.clone(),
            status: SessionStatus::Done,
            prompt: "hello".into(),
            result: Some(body.clone()),
            session: serde_json::json!({"session_id": id}),
            history: Default::default(),
            // Spread over the past, one second apart, so the listing order is meaningful.
            created: now - (n - i) as u64,
            expires: Some(now + 86_400),
            duration_ms: Some(1),
            owner: None,
            secret_hash: Some(hex::encode(digest)),
            origin: None,
            error: None,
        };
        let bytes = serde_json::to_vec(&rec).expect("a record serializes");
        tree.insert(scope.key(&id).as_bytes(), bytes)
            .expect("cannot write a session");
        if (i + 1) % 5000 == 0 {
            eprintln!("  {} sessions written", i + 1);
        }
    }
    db.flush().expect("cannot flush the store");
}

struct Report {
    idle: Vec<u64>,
    loaded: Vec<u64>,
    lists: Vec<u64>,
    page_len: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

async fn measure(base: &str, pid: u32, listers: usize, measured: Duration) -> Report {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("cannot build the HTTP client");
    let post_url = format!("{base}/input");
    let list_url = format!("{base}/sessions");

    // Warm-up, then the idle latency of the unrelated POST.
    post(&client, &post_url).await;
    let mut idle = Vec::new();
    for _ in 0..IDLE_POSTS {
        idle.push(post(&client, &post_url).await);
        tokio::time::sleep(POST_EVERY).await;
    }
    let page_len = list(&client, &list_url).await.1;
    let rss_before_kib = proc_status(pid, "VmRSS");

    let end = Instant::now() + measured;
    let mut tasks = Vec::new();
    for _ in 0..listers {
        let (client, url) = (client.clone(), list_url.clone());
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < end {
                took.push(list(&client, &url).await.0);
            }
            took
        }));
    }
    let poster = {
        let (client, url) = (client.clone(), post_url.clone());
        tokio::spawn(async move {
            let mut took = Vec::new();
            // Let the listings queue up first.
            tokio::time::sleep(POST_EVERY).await;
            while Instant::now() < end {
                took.push(post(&client, &url).await);
                tokio::time::sleep(POST_EVERY).await;
            }
            took
        })
    };
    let mut lists = Vec::new();
    for t in tasks {
        lists.extend(t.await.expect("a lister panicked"));
    }
    let loaded = poster.await.expect("the poster panicked");
    let rss_after_kib = proc_status(pid, "VmRSS");
    Report {
        idle,
        loaded,
        lists,
        page_len,
        rss_before_kib,
        rss_after_kib,
    }
}

/// One unrelated POST (a 2-byte prompt to the echo agent); its latency in ns.
async fn post(client: &reqwest::Client, url: &str) -> u64 {
    let t0 = Instant::now();
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"prompt":"hi"}"#)
        .send()
        .await
        .expect("POST /input failed");
    let status = res.status();
    let body = res.bytes().await.expect("reading the POST's body failed");
    assert!(
        status.is_success(),
        "POST /input: {status} {}",
        String::from_utf8_lossy(&body)
    );
    t0.elapsed().as_nanos() as u64
}

/// One listing of the bench caller's sessions: its latency in ns and how many it listed.
async fn list(client: &reqwest::Client, url: &str) -> (u64, usize) {
    let t0 = Instant::now();
    let res = client
        .get(url)
        .header("x-co-session-secret", SECRET)
        .send()
        .await
        .expect("GET /sessions failed");
    let status = res.status();
    let body: serde_json::Value = res.json().await.expect("GET /sessions: not JSON");
    assert!(status.is_success(), "GET /sessions: {status} {body}");
    let listed = body["sessions"].as_array().map_or(0, Vec::len);
    (t0.elapsed().as_nanos() as u64, listed)
}
