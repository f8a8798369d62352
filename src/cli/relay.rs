//! `oonode relay`: a relay with the limits given as flags (each defaults to
//! [`RelayConfig::default`]'s).

use std::time::Duration;

use oonode::proto::RelayUrl;
use oonode::RelayConfig;

#[derive(clap::Args)]
pub(crate) struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = RelayConfig::default().listen)]
    listen: std::net::SocketAddr,
    /// A URL agents reach this relay by, e.g. wss://relay.example (repeat for aliases).
    /// An ANNOUNCE must be signed for one of them. Default: the listen address
    /// (ws://127.0.0.1:PORT and ws://localhost:PORT for a loopback or 0.0.0.0 bind, and
    /// ws://[::1]:PORT for 0.0.0.0; wss:// with --tls-cert); a public relay must set it.
    #[arg(long = "public-url", value_name = "URL")]
    public_urls: Vec<RelayUrl>,
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
    /// Seconds without a frame either way after which a relayed session ends.
    #[arg(long, default_value_t = RelayConfig::default().session_idle.as_secs())]
    session_idle: u64,
    /// Seconds a new caller connection has to name an agent (CONNECT, INPUT or SEAL).
    #[arg(long, default_value_t = RelayConfig::default().first_frame_timeout.as_secs())]
    first_frame_timeout: u64,
    /// Offline agents kept in the directory (the longest offline go first).
    #[arg(long, default_value_t = RelayConfig::default().max_offline)]
    max_offline: usize,
    /// Caller connections from one IP address (IPv6: one /64).
    #[arg(long, default_value_t = RelayConfig::default().max_callers_per_ip)]
    max_callers_per_ip: usize,
    /// Agent connections from one IP address (IPv6: one /64).
    #[arg(long, default_value_t = RelayConfig::default().max_agents_per_ip)]
    max_agents_per_ip: usize,
    /// Sessions callers from one IP address hold with one agent.
    #[arg(long, default_value_t = RelayConfig::default().max_ip_sessions_per_agent)]
    max_ip_sessions_per_agent: usize,
    /// Count clients by the last X-Forwarded-For entry, for the per-IP limits: only behind
    /// a reverse proxy that sets it (otherwise clients could claim any address).
    #[arg(long)]
    trust_forwarded_for: bool,
    /// Serve TLS (wss:// and https://) with this PEM certificate chain (its own
    /// certificate first); needs --tls-key. Agents and callers then use wss://HOST:PORT.
    #[arg(long, value_name = "FILE", requires = "tls_key", value_parser = super::pem_file)]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert", value_parser = super::pem_file)]
    tls_key: Option<std::path::PathBuf>,
    /// Join the libp2p swarm on this multiaddr (repeatable; e.g. /ip4/0.0.0.0/udp/4001/quic-v1
    /// and /ip4/0.0.0.0/tcp/4001) as a DHT server, and federate: this relay publishes its
    /// agents' home-relay records, and passes callers on to the relay an agent is homed on.
    #[arg(long = "swarm-listen", value_name = "MULTIADDR", value_parser = super::multiaddr)]
    swarm_listen: Vec<oonode::Multiaddr>,
    /// A swarm peer to join through, ending in /p2p/<PeerId> (repeatable): another relay's
    /// address from its banner or --ready-json `swarm`; /dns4/, /dns6/ and /dns/ names are
    /// resolved by the system. Needs --swarm-listen.
    #[arg(long, value_name = "MULTIADDR", value_parser = super::peer_multiaddr, requires = "swarm_listen")]
    bootstrap: Vec<oonode::Multiaddr>,
    /// The swarm's key file (a 32-byte seed; created, mode 0600, if missing): the relay
    /// keeps its PeerId, so the --bootstrap addresses others give for it, across restarts.
    /// Without it the relay takes a new key at every start.
    #[arg(long, value_name = "FILE", requires = "swarm_listen")]
    swarm_key: Option<std::path::PathBuf>,
    /// Pass callers on to home relays on private or loopback addresses (a testnet, a LAN).
    /// Off: a home-relay record is signed by its agent, and anyone can make an agent key.
    #[arg(long, requires = "swarm_listen")]
    forward_private: bool,
    /// A CA (PEM) to trust besides the public roots when passing callers on to wss://
    /// relays.
    #[arg(long, value_name = "FILE", value_parser = super::pem_file, requires = "swarm_listen")]
    relay_ca: Option<std::path::PathBuf>,
    /// Circuit relay v2 reservations held at once (nodes behind a NAT reserve one to be
    /// reachable through this relay's swarm). Needs --swarm-listen.
    #[arg(long, default_value_t = 1024, requires = "swarm_listen")]
    max_reservations: usize,
    /// Circuit relay v2 circuits open at once; each is cut after 2 minutes or 1 MiB,
    /// and DCUtR usually replaces it with a direct connection within a second.
    #[arg(long, default_value_t = 256, requires = "swarm_listen")]
    max_circuits: usize,
    /// Print one JSON line to stdout when listening ({"event":"ready","url","announce",
    /// "input","http"}, and "swarm" with --swarm-listen) instead of the human-readable
    /// lines.
    #[arg(long)]
    ready_json: bool,
    /// Log lines on stderr as `text` (for people) or `json` (one object a line, with
    /// the request span's id, for log shippers).
    #[arg(long, value_enum, default_value_t = super::LogFormat::Text)]
    pub(super) log_format: super::LogFormat,
}

pub(crate) async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let mut config = RelayConfig::default().listen(args.listen);
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_agents = args.max_agents;
    config.max_callers = args.max_callers;
    config.max_sessions_per_agent = args.max_sessions_per_agent;
    config.frames_per_sec = args.frames_per_sec;
    config.agent_timeout = Duration::from_secs(args.agent_timeout);
    config.caller_idle = Duration::from_secs(args.caller_idle);
    config.session_idle = Duration::from_secs(args.session_idle);
    config.first_frame_timeout = Duration::from_secs(args.first_frame_timeout);
    config.max_offline = args.max_offline;
    config.max_callers_per_ip = args.max_callers_per_ip;
    config.max_agents_per_ip = args.max_agents_per_ip;
    config.max_ip_sessions_per_agent = args.max_ip_sessions_per_agent;
    config.trust_forwarded_for = args.trust_forwarded_for;
    config.public_urls = args.public_urls;
    config.swarm_listen = args.swarm_listen;
    config.bootstrap = args.bootstrap;
    config.forward_private = args.forward_private;
    config.relay_ca = args.relay_ca;
    config.swarm_key = args.swarm_key;
    config.circuits.max_reservations = args.max_reservations;
    config.circuits.max_circuits = args.max_circuits;
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config = config.tls(cert, key);
    }
    let handle = oonode::Relay::spawn(config).await.map_err(|e| match e {
        oonode::RelayError::Bind { addr, source } => super::Exit::usage(format!(
            "cannot listen on {addr}: {}; choose another with --listen HOST:PORT \
             (port 0 for a free one)",
            if source.kind() == std::io::ErrorKind::AddrInUse {
                "the port is in use".to_string()
            } else {
                source.to_string()
            }
        )),
        e => super::Exit::usage(e.to_string()),
    })?;
    if args.ready_json {
        println!("{}", handle.ready().to_line());
    } else {
        let url = handle.relay_url();
        println!("relay listening on {url}");
        println!("  agents:  {}", url.announce());
        println!("  callers: {}", url.input());
        for addr in handle.swarm_addrs() {
            println!("  swarm:   {addr}");
        }
    }
    handle.run_until_signal().await;
    Ok(())
}
