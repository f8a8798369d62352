//! A stand-in for an OpenAI-compatible API on 127.0.0.1, for demos and for the
//! ConnectOnion example's check (`tests/connectonion_agent.sh`): the same mock the tests
//! use (`tests/common/mock_llm.rs`), answering on its own (see that file).
//!
//! ```text
//! cargo run --example mock_llm -- [PORT]      # 0 or nothing: a free port
//! {"event":"ready","base_url":"http://127.0.0.1:PORT/v1"}
//! oonode host --agent llm --llm-base-url http://127.0.0.1:PORT/v1 --llm-model mock
//! ```

#[path = "../tests/common/mock_llm.rs"]
mod mock_llm;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p.parse().map_err(|_| format!("{p:?} is not a port"))?,
        None => 0,
    };
    let mock = mock_llm::MockLlm::start_on(port).await;
    println!(
        "{}",
        serde_json::json!({"event": "ready", "base_url": mock.base_url})
    );
    eprintln!(
        "mock OpenAI-compatible API at {} (Ctrl-C stops it)",
        mock.base_url
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
