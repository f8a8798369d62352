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
    // The caller knows only the relay it is on now (its /health says which: its first,
    // or a fallback it moved to); federated relays find the callee wherever it is.
    let now_on = match super::loopback_client() {
        Ok(http) => super::get_json(&http, &format!("{}/health", caller.http))
            .await
            .ok()
            .and_then(|(_, h)| h["relay"]["url"].as_str().map(str::to_owned)),
        Err(_) => None,
    };
    let configured = state.relays().get(caller.relay).map(|r| r.url.clone());
    if let Some(relay) = now_on.or(configured) {
        options = options.relay(relay);
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
