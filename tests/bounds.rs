//! Bounded work per run under a hostile or runaway agent or caller: STREAM chunks are
//! joined and split so their number and size stay bounded, and a run that writes more
//! than `max_output_bytes` is stopped with a clear error.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::*;
use oonode::agent::Echo;
use oonode::{Agent, AgentError, Host, StreamSink, Turn};
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

/// The measurement: a 100,000-word prompt to echo made 100,000 signed, stored
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
