//! A custom agent hosted with one call.
//!
//! Run: `cargo run --example custom_agent`, then
//! `curl -X POST localhost:9000/input -d '{"prompt": "hello"}'`.

use oonode::{Agent, AgentError, Host, StreamSink, TrustLevel, Turn};

#[derive(Clone)]
struct Shout;

#[oonode::async_trait]
impl Agent for Shout {
    fn name(&self) -> String {
        "shout".into()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        stream.send("thinking…").await; // a STREAM chunk, signed and numbered
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
