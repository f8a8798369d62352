//! `testnet call`: node FROM calls node TO by address, as `oonode call` would, signing
//! with node FROM's own key.

use std::time::{Duration, Instant};

use anyhow::Context;
use oonode::{connect, Address, ConnectOptions, Identity, Via};

use super::state::TestnetState;

/// Node `from` calls node `to` by address with `from`'s own key; returns the result.
/// The path taken goes to stderr. [`connect`] picks the path (`via`), knowing node TO's
/// HTTP endpoint, the relay and node FROM's swarm address to join through; a failed call
/// keeps its [`oonode::CallError`] in the error's chain.
pub(super) async fn call(
    state: &TestnetState,
    from: usize,
    to: usize,
    prompt: &str,
    via: Via,
    reply_timeout: Duration,
) -> anyhow::Result<String> {
    let caller = state.node(from)?;
    let callee = state.node(to)?;
    let (identity, _) = Identity::load_or_create(&caller.co_dir)
        .with_context(|| format!("cannot load node {from}'s key"))?;
    let bootstrap: libp2p::Multiaddr = caller
        .p2p
        .parse()
        .with_context(|| format!("node {from}'s swarm address {:?}", caller.p2p))?;
    let mut options = ConnectOptions::default()
        .identity(identity)
        .reply_timeout(reply_timeout)
        .via(via)
        .endpoint(callee.http.clone())
        .bootstrap(bootstrap);
    if let Some(relay) = &state.relay {
        options = options.relay(relay.url.clone());
    }
    let t = Instant::now();
    let failed = || {
        format!(
            "node {from} could not call node {to} ({})",
            short(&callee.address)
        )
    };
    let mut remote = connect(&callee.address, options)
        .await
        .with_context(failed)?;
    let answer = remote.input(prompt).await.with_context(failed)?;
    eprintln!(
        "node {from} → node {to} ({}) via {}: {} ms",
        short(&callee.address),
        remote.path(),
        t.elapsed().as_millis()
    );
    Ok(answer.result)
}

fn short(address: &str) -> String {
    match address.parse::<Address>() {
        Ok(a) => a.short(),
        Err(_) => address.to_string(),
    }
}
