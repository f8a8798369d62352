//! `oonode peers`: the agents a swarm knows.

use std::time::Duration;

use super::{peer_of, Exit};

#[derive(clap::Args)]
pub(crate) struct PeersArgs {
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", required = true,
          value_parser = super::peer_multiaddr)]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Seconds to let the swarm fill its routing table before listing.
    #[arg(long, default_value_t = 3)]
    wait: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Joins through the bootstrap peers, lists what the swarm knows. Exit 3 when no
/// bootstrap peer can be reached (a dead peer is never listed as an agent).
pub(crate) async fn peers(args: PeersArgs) -> anyhow::Result<()> {
    let config = oonode::P2pConfig::caller(args.bootstrap.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = oonode::P2p::spawn(keypair, config, stop).await?;
    // Dial each bootstrap peer first: the routing table holds them whether or not they
    // answer, so only a connection tells a live peer from a dead one.
    let dials = args.bootstrap.iter().filter_map(|addr| {
        let peer = peer_of(addr)?;
        let swarm = swarm.clone();
        Some(async move { (addr, peer, swarm.connect(peer).await) })
    });
    let mut dead = Vec::new();
    let mut failures = Vec::new();
    for (addr, peer, result) in futures::future::join_all(dials).await {
        if let Err(e) = result {
            dead.push(peer.to_string());
            let why = match e {
                oonode::P2pError::Unreachable { reason, .. } => reason,
                _ => "no answer".into(),
            };
            failures.push(format!("{addr}: {why}"));
        }
    }
    if dead.len() == args.bootstrap.len() {
        return Err(Exit::unreachable(format!(
            "cannot reach the bootstrap peer {}; is it up, and is the multiaddr right?",
            failures.join("; ")
        )));
    }
    for f in &failures {
        eprintln!("warning: cannot reach the bootstrap peer {f}");
    }
    tokio::time::sleep(Duration::from_secs(args.wait)).await;
    let mut peers = swarm.peers().await?;
    peers.retain(|p| !dead.contains(&p.peer_id));
    peers.sort_by(|a, b| a.address.cmp(&b.address));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no agents found");
    }
    for p in &peers {
        // How this caller reached it, or that only a relay peer's circuit reaches it.
        let path = match (p.path, p.circuit) {
            (Some(path), _) => format!("  [{path}]"),
            (None, true) => "  [behind a NAT: via circuit]".into(),
            (None, false) => String::new(),
        };
        println!(
            "{}  {}{path}",
            p.address,
            p.summary.as_deref().unwrap_or("(no summary published)")
        );
        for e in &p.examples {
            println!("    e.g. {e}");
        }
    }
    Ok(())
}
