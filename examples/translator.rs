//! The seed's quick start: host the translator with one call.
//!
//! Run: `cargo run --example translator`, then
//! `curl -X POST localhost:8000/input -d '{"prompt": "Translate hello to Spanish"}'`
//! (settings come from `.co/host.yaml` if there is one; `oonode init` writes one).

#[tokio::main]
async fn main() -> Result<(), oonode::HostError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    oonode::host(oonode::agent::Translator).await
}
