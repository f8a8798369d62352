//! `oonode relay`: a relay with the limits given as flags (each defaults to
//! [`RelayConfig::default`]'s).

use oonode::RelayConfig;

#[derive(clap::Args)]
pub(crate) struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = RelayConfig::default().listen)]
    listen: std::net::SocketAddr,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = RelayConfig::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Agents online at once.
    #[arg(long, default_value_t = RelayConfig::default().max_agents)]
    max_agents: usize,
    /// Caller connections at once.
    #[arg(long, default_value_t = RelayConfig::default().max_callers)]
    max_callers: usize,
    /// Sessions routed to one agent at once.
    #[arg(long, default_value_t = RelayConfig::default().max_sessions_per_agent)]
    max_sessions_per_agent: usize,
    /// Frames per second per connection (burst: twice that).
    #[arg(long, default_value_t = RelayConfig::default().frames_per_sec)]
    frames_per_sec: u32,
    /// Seconds of silence after which an agent is dropped.
    #[arg(long, default_value_t = RelayConfig::default().agent_timeout.as_secs())]
    agent_timeout: u64,
    /// Seconds without a frame after which a caller connection is closed.
    #[arg(long, default_value_t = RelayConfig::default().caller_idle.as_secs())]
    caller_idle: u64,
    /// Print one JSON line to stdout when listening ({"event":"ready","url","announce",
    /// "input","http"}) instead of the human-readable lines.
    #[arg(long)]
    ready_json: bool,
}

pub(crate) async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let mut config = RelayConfig::default().listen(args.listen);
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_agents = args.max_agents;
    config.max_callers = args.max_callers;
    config.max_sessions_per_agent = args.max_sessions_per_agent;
    config.frames_per_sec = args.frames_per_sec;
    config.agent_timeout = std::time::Duration::from_secs(args.agent_timeout);
    config.caller_idle = std::time::Duration::from_secs(args.caller_idle);
    let handle = oonode::Relay::spawn(config).await?;
    if args.ready_json {
        println!("{}", handle.ready().to_line());
    } else {
        let url = handle.relay_url();
        println!("relay listening on {url}");
        println!("  agents:  {}", url.announce());
        println!("  callers: {}", url.input());
    }
    handle.run_until_signal().await;
    Ok(())
}
