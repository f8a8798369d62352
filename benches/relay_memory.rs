//! A relay's memory per announced agent: `cargo bench --bench relay_memory`.
//!
//! Starts the real relay (`oonode relay --listen 127.0.0.1:0 --ready-json`, limits raised
//! so that one loopback address may hold every agent) and opens N simulated agents on it:
//! each is a WebSocket to `/ws/announce` that sends one signed ANNOUNCE (its own key, a
//! 60-character summary, one endpoint) and waits for the relay's ANNOUNCE_OK, then stays
//! open and silent. The sockets come from 127.0.0.2…127.0.0.17 in turn, so the ephemeral
//! port range is never the limit. The simulated agents use 4 KiB WebSocket buffers of
//! their own: they are in this process, and only the relay is measured.
//!
//! It prints the relay's RSS at idle, then after every step of agents, and the slope in
//! KB per agent between the first and the last step (the relay's allocator keeps some
//! freed memory, so the slope is the honest figure, not RSS ÷ N). At the end it checks
//! that the directory lists a sample of the agents online and that the relay's `/health`
//! still answers.
//!
//! Environment: `OONODE_BENCH_BIN` (another `oonode` binary to measure, e.g. an older
//! build, for a before/after in one run), `OONODE_BENCH_AGENTS` (default 9000: the file-descriptor limit of the
//! machine it was written on is 20,000 per process, and this process holds one socket
//! per agent too), `OONODE_BENCH_SWARM=1` (the relay also joins a swarm of its own and
//! publishes each agent's home-relay record: federation's share), `OONODE_BENCH_STEPS`
//! (default 4), `OONODE_BENCH_PARALLEL` (announces
//! in flight, default 128). Loopback only; stops by itself.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{env_num, loadavg, proc_status, Child, Stderr, BIN};
use futures::{SinkExt, StreamExt};
use oonode::proto::signed_announce;
use oonode::Identity;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

/// Loopback source addresses the agents' sockets are spread over.
const SOURCES: u8 = 16;

fn main() {
    let agents: usize = env_num("OONODE_BENCH_AGENTS", 9000);
    let steps: usize = env_num("OONODE_BENCH_STEPS", 4);
    let parallel: usize = env_num("OONODE_BENCH_PARALLEL", 128);
    let limit = (agents + 100).to_string();
    let bin = std::env::var("OONODE_BENCH_BIN").unwrap_or_else(|_| BIN.to_owned());
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["relay", "--listen", "127.0.0.1:0", "--ready-json"])
        .args(["--max-agents", &limit, "--max-agents-per-ip", &limit])
        .args(["--agent-timeout", "3600"])
        .env("RUST_LOG", "warn");
    let swarm = std::env::var("OONODE_BENCH_SWARM").is_ok_and(|v| v == "1");
    if swarm {
        cmd.args(["--swarm-listen", "/ip4/127.0.0.1/tcp/0"]);
    }
    let relay = Child::spawn("relay", &mut cmd, Stderr::Echo);
    let url = relay.ready(Duration::from_secs(30))["url"]
        .as_str()
        .expect("the relay's ready line has its url")
        .to_owned();
    let pid = relay.pid();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the relay's URL ends in its port");
    println!(
        "# relay memory per announced agent ({bin}{}): {agents} agents in {steps} steps, load {}",
        if swarm { ", in a swarm" } else { "" },
        loadavg()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = proc_status(pid, "VmRSS");
        println!("| agents | relay RSS MB | KB per agent (from idle) | announce time s |");
        println!("| ---: | ---: | ---: | ---: |");
        println!("| 0 | {:.1} | | |", idle as f64 / 1024.0);
        let mut held: Vec<Socket> = Vec::with_capacity(agents);
        let mut marks = Vec::new();
        let mut addresses = Vec::new();
        for step in 1..=steps {
            let target = agents * step / steps;
            let started = Instant::now();
            let opened = open_agents(port, &url, held.len(), target, parallel).await;
            for (socket, address) in opened {
                held.push(socket);
                if addresses.len() < 20 || held.len() == target {
                    addresses.push(address);
                }
            }
            // Let the relay's tasks settle before reading RSS.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss = proc_status(pid, "VmRSS");
            marks.push((held.len(), rss));
            println!(
                "| {} | {:.1} | {:.2} | {:.1} |",
                held.len(),
                rss as f64 / 1024.0,
                (rss as f64 - idle as f64) / held.len() as f64,
                started.elapsed().as_secs_f64()
            );
        }
        let (n0, r0) = marks[0];
        let (n1, r1) = *marks.last().expect("at least one step");
        if n1 > n0 {
            println!(
                "\nslope from {n0} to {n1} agents: {:.2} KB per agent",
                (r1 as f64 - r0 as f64) / (n1 - n0) as f64
            );
        }
        check_directory(port, &addresses).await;
        drop(held);
    });
    drop(relay);
}

/// Opens agents number `from..to`, `parallel` at a time.
async fn open_agents(
    port: u16,
    url: &str,
    from: usize,
    to: usize,
    parallel: usize,
) -> Vec<(Socket, String)> {
    let results = futures::stream::iter(from..to)
        .map(|i| {
            let url = url.to_owned();
            async move { announce_one(port, &url, i).await }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<_>>()
        .await;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("an agent could not announce: {e}")))
        .collect()
}

async fn announce_one(port: u16, url: &str, i: usize) -> Result<(Socket, String), String> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES as usize) as u8);
    let tcp = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    tcp.bind(SocketAddr::from((source, 0)))
        .map_err(|e| e.to_string())?;
    let stream = tcp
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("{url}/ws/announce"),
        stream,
        Some(config),
    )
    .await
    .map_err(|e| e.to_string())?;
    let id = Identity::generate();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let endpoint = format!("http://127.0.0.1:{}", 20_000 + i % 40_000);
    let announce = signed_announce(
        &id,
        &format!("simulated agent number {i:>6}, for the relay memory bench"),
        &[endpoint],
        url,
        now,
    );
    ws.send(Message::text(announce.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .map_err(|_| "no answer to the ANNOUNCE within 30 s".to_string())?
        .ok_or("the relay closed the socket")?
        .map_err(|e| e.to_string())?;
    let text = reply.into_text().map_err(|e| e.to_string())?;
    if !text.contains("ANNOUNCE_OK") && !text.contains("announce_ok") {
        return Err(format!("the relay answered {text}"));
    }
    Ok((ws, id.address().to_string()))
}

/// The directory lists the sampled agents online, and `/health` answers.
async fn check_directory(port: u16, addresses: &[String]) {
    let http = reqwest::Client::new();
    for address in addresses {
        let body: serde_json::Value = http
            .get(format!("http://127.0.0.1:{port}/api/agents/{address}"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("the directory answers")
            .json()
            .await
            .expect("the directory answers JSON");
        assert_eq!(
            body["online"], true,
            "agent {address} is not listed online: {body}"
        );
    }
    let health = http
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("/health answers");
    println!(
        "\ndirectory: {} sampled agents online; /health {}",
        addresses.len(),
        health.status()
    );
}
