//! A custom agent with a tool, hosted with one call.
//!
//! Run: `cargo run --example custom_agent`, then
//! `curl -X POST localhost:9000/input -d '{"prompt": "count the words in to be or not to be"}'`.

use oonode::{Agent, AgentError, Host, StreamSink, TrustLevel, Turn};

/// Answers by shouting, and counts words when asked: a tool the agent decides to use.
#[derive(Clone)]
struct Shout;

impl Shout {
    /// The tool: a plain function the agent calls.
    fn word_count(text: &str) -> usize {
        text.split_whitespace().count()
    }
}

#[oonode::async_trait]
impl Agent for Shout {
    fn name(&self) -> String {
        "shout".into()
    }

    fn tools(&self) -> Vec<String> {
        vec!["word_count".into()]
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        if let Some(text) = turn.prompt.strip_prefix("count the words in ") {
            stream.send("using word_count…").await; // a STREAM chunk, signed and numbered
            return Ok(format!("{} words", Shout::word_count(text)));
        }
        stream.send("thinking…").await;
        Ok(turn.prompt.to_uppercase())
    }
}

#[tokio::main]
async fn main() -> Result<(), oonode::HostError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    Host::new(Shout)
        .trust(TrustLevel::Careful)
        .port(9000)
        .serve()
        .await
}
