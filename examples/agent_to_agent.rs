//! Agent-to-agent: a node whose agent calls another agent by address while answering.
//! (An agent that is a program of its own does the same with a `call` line: see
//! docs/agent-protocol.md and examples/agents/delegate_agent.py.)
//!
//! Run a relay and the translator, then this node (it asks the translator for help):
//!   cargo run -- relay --listen 127.0.0.1:8765
//!   cargo run -- host --agent translator --relay ws://127.0.0.1:8765 --port 8001 --co-dir /tmp/tr
//!   cargo run --example agent_to_agent -- 0x<translator address> ws://127.0.0.1:8765
//!   curl -X POST localhost:9001/input -d '{"prompt": "Translate hello to Spanish"}'

use oonode::{Agent, AgentError, ConnectOptions, Host, Identity, StreamSink, Turn};

/// Asks a peer agent and reports its answer, signed requests under the node's own key.
#[derive(Clone)]
struct Delegate {
    peer: String,
    options: ConnectOptions,
}

#[oonode::async_trait]
impl Agent for Delegate {
    fn name(&self) -> String {
        "delegate".into()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        stream.send(format!("asking {}…", &self.peer[..10])).await;
        let mut peer = oonode::connect(&self.peer, self.options.clone()).await?;
        // One more agent on the way: a peer that asks us back ends at the hop limit
        // instead of looping.
        peer.set_hops(turn.hops + 1);
        let answer = peer.input(&turn.prompt).await?;
        Ok(format!("my peer says: {}", answer.result))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(peer), Some(relay)) = (args.next(), args.next()) else {
        eprintln!("usage: agent_to_agent <peer address> <relay url>");
        std::process::exit(2);
    };
    let co_dir = std::env::temp_dir().join("oonode-agent-to-agent");
    std::fs::create_dir_all(&co_dir)?;
    let (identity, _) = Identity::load_or_create(&co_dir)?;
    let options = ConnectOptions::default()
        .relay(relay.clone())
        .identity(identity);
    Host::new(Delegate { peer, options })
        .co_dir(co_dir)
        .relay_url(Some(relay))
        .port(9001)
        .serve()
        .await?;
    Ok(())
}
