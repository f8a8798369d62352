//! `oonode peers`: the agents a swarm knows.

use anyhow::Context;

#[derive(clap::Args)]
pub(crate) struct PeersArgs {
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", required = true)]
    bootstrap: Vec<String>,
    /// Seconds to let the swarm fill its routing table before listing.
    #[arg(long, default_value_t = 3)]
    wait: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn peers(args: PeersArgs) -> anyhow::Result<()> {
    let mut bootstrap = Vec::new();
    for addr in &args.bootstrap {
        bootstrap.push(
            addr.parse()
                .with_context(|| format!("--bootstrap {addr:?} is not a multiaddr"))?,
        );
    }
    let config = oonode::P2pConfig::caller(bootstrap);
    let stop = tokio_util::sync::CancellationToken::new();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = oonode::P2p::spawn(keypair, config, stop.clone()).await?;
    tokio::time::sleep(std::time::Duration::from_secs(args.wait)).await;
    let mut peers = swarm.peers().await?;
    peers.sort_by(|a, b| a.address.cmp(&b.address));
    stop.cancel();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.is_empty() {
        println!("no agents found (is the bootstrap peer up?)");
    }
    for p in &peers {
        println!(
            "{}  {}",
            p.address,
            p.summary.as_deref().unwrap_or("(no summary published)")
        );
        for e in &p.examples {
            println!("    e.g. {e}");
        }
    }
    Ok(())
}
