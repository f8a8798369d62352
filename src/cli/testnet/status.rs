//! `testnet status`: each process (alive, `/health`, the relay it is on and whether that
//! relay lists it), each relay's view, and the swarm's view.

use oonode::proto::RelayUrl;
use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use oonode::{P2p, P2pConfig};
use serde_json::{json, Value};

use super::state::{load, NodeEntry, TestnetState};
use super::{get_json, loopback_client};

pub(super) async fn status(dir: &Path, swarm: bool, json: bool) -> anyhow::Result<()> {
    let state = load(dir)?;
    let http = loopback_client()?;
    let mut relays = Vec::new();
    for r in state.relays() {
        let proc = r.proc();
        let health = match get_json(&http, &format!("{}/health", r.http)).await {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        relays.push(json!({
            "name": r.name,
            "pid": r.pid,
            "alive": proc.alive(),
            "rss_kib": proc.rss_kib(),
            "url": r.url,
            "health": health,
        }));
    }
    let relay = relays.first().cloned().unwrap_or(Value::Null);
    let mut nodes = Vec::new();
    for n in &state.nodes {
        let proc = n.proc();
        let health = match get_json(&http, &format!("{}/health", n.http)).await {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        let info = match get_json(&http, &format!("{}/info", n.http)).await {
            Ok((200, v)) => Some(v),
            _ => None,
        };
        // The relay it is on now (its first, or a fallback), as its /health says.
        let home = health
            .as_ref()
            .and_then(|h| h["relay"]["url"].as_str().map(str::to_owned));
        let home_index = home.as_ref().and_then(|url| {
            let url = url.parse::<RelayUrl>().ok()?;
            state
                .relays()
                .iter()
                .position(|r| r.url.parse::<RelayUrl>().is_ok_and(|r| r.same_relay(&url)))
        });
        let listed = match home.as_ref().and_then(|u| u.parse::<RelayUrl>().ok()) {
            Some(url) => match get_json(&http, &url.directory(&n.address)).await {
                Ok((200, v)) => v["online"].as_bool(),
                Ok((404, _)) => Some(false),
                _ => None,
            },
            None => None,
        };
        nodes.push(json!({
            "index": n.index,
            "pid": n.pid,
            "alive": proc.alive(),
            "rss_kib": proc.rss_kib(),
            "agent": n.agent,
            "address": n.address,
            "http": n.http,
            "healthy": health.as_ref().is_some_and(|h| h["status"] == "healthy"),
            "relay_link": health.as_ref().and_then(|h| h["relay"]["state"].as_str().map(str::to_owned)),
            "relay_lists_online": listed,
            "home_relay": home,
            "home_relay_index": home_index,
            "swarm_peers": info.as_ref().and_then(|i| i["p2p"]["connected_peers"].as_u64()),
            "swarm_paths": info.as_ref().map(|i| i["p2p"]["paths"].clone()),
            "reachability": info.as_ref().and_then(|i| i["p2p"]["reachability"].as_str().map(str::to_owned)),
        }));
    }
    let swarm_view = if swarm {
        Some(swarm_view(&state).await)
    } else {
        None
    };
    let up = nodes
        .iter()
        .filter(|n| n["alive"] == true && n["healthy"] == true)
        .count();
    let relay_is_up = |r: &Value| r["alive"] == true && !r["health"].is_null();
    let relays_up = relays.iter().filter(|r| relay_is_up(r)).count();
    let relay_up = relays_up == relays.len() && !relays.is_empty();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dir": state.dir,
                "relay": relay,
                "relays": relays,
                "nodes": nodes,
                "swarm": swarm_view,
                "nodes_up": up,
                "relay_up": relay_up,
            }))?
        );
    } else {
        for relay in &relays {
            println!(
                "{:<7}  {}  PID {}  {}{}",
                relay["name"].as_str().unwrap_or("relay"),
                relay["url"].as_str().unwrap_or("-"),
                relay["pid"],
                if relay_is_up(relay) { "up" } else { "DOWN" },
                match &relay["health"] {
                    Value::Null => String::new(),
                    h => format!(
                        "  agents online {} (known {}), sessions {}, RSS {}",
                        h["agents_online"],
                        h["agents_known"],
                        h["sessions"],
                        kib(relay["rss_kib"].as_u64())
                    ),
                }
            );
        }
        println!(
            "{:>3}  {:<8}  {:<5}  {:<9}  {:<5}  {:<9}  {:>9}  {:>8}  {:<10}  address",
            "#", "PID", "proc", "/health", "home", "relay", "peers", "RSS", "agent"
        );
        for n in &nodes {
            println!(
                "{:>3}  {:<8}  {:<5}  {:<9}  {:<5}  {:<9}  {:>9}  {:>8}  {:<10}  {}",
                n["index"].as_u64().unwrap_or(0),
                n["pid"].as_u64().unwrap_or(0),
                if n["alive"] == true { "alive" } else { "dead" },
                if n["healthy"] == true { "healthy" } else { "-" },
                n["home_relay_index"]
                    .as_u64()
                    .map_or("-".into(), |i| i.to_string()),
                match n["relay_lists_online"].as_bool() {
                    Some(true) => "online",
                    Some(false) => "offline",
                    None => "?",
                },
                peers_column(n),
                kib(n["rss_kib"].as_u64()),
                n["agent"].as_str().unwrap_or("?"),
                n["address"].as_str().unwrap_or("?"),
            );
        }
        if let Some(view) = &swarm_view {
            match view["joined_through"].as_u64() {
                Some(i) => println!(
                    "swarm  joined through node {i}: it knows {} of the {} testnet nodes ({} besides itself)",
                    view["known"], state.nodes.len(), view["known_others"]
                ),
                None => println!(
                    "swarm  {}",
                    view["error"].as_str().unwrap_or("no view")
                ),
            }
        }
        match relays.len() {
            1 => println!(
                "{up} of {} nodes up; relay {}",
                nodes.len(),
                if relay_up { "up" } else { "down" }
            ),
            m => println!(
                "{up} of {} nodes up; {relays_up} of {m} relays up",
                nodes.len()
            ),
        }
    }
    if up == nodes.len() && relay_up {
        Ok(())
    } else {
        Err(anyhow!(
            "{} of {} nodes down{}",
            nodes.len() - up,
            nodes.len(),
            match (relays.len(), relay_up) {
                (_, true) => String::new(),
                (1, false) => "; the relay is down".into(),
                (m, false) => format!("; {} of {m} relays down", m - relays_up),
            }
        ))
    }
}

fn kib(v: Option<u64>) -> String {
    match v {
        Some(k) => format!("{:.1} MiB", k as f64 / 1024.0),
        None => "-".into(),
    }
}

/// Joins the swarm through the first live node (a throwaway caller swarm) and asks which
/// of the testnet's nodes its routing table knows.
async fn swarm_view(state: &TestnetState) -> Value {
    let Some(entry) = state.nodes.iter().find(|n| n.proc().alive()) else {
        return json!({"error": "no live node to join the swarm through"});
    };
    let Ok(addr) = entry.p2p.parse() else {
        return json!({"error": format!("bad swarm address {}", entry.p2p)});
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let swarm = match P2p::spawn(keypair, P2pConfig::caller(vec![addr]), stop).await {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("cannot join the swarm: {e}")}),
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peers = match tokio::time::timeout(Duration::from_secs(15), swarm.peers()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return json!({"error": format!("swarm: {e}")}),
        Err(_) => return json!({"error": "the swarm did not answer within 15 s"}),
    };
    let known: Vec<&NodeEntry> = state
        .nodes
        .iter()
        .filter(|n| peers.iter().any(|p| p.address == n.address))
        .collect();
    json!({
        "joined_through": entry.index,
        "known": known.len(),
        "known_others": known.iter().filter(|n| n.index != entry.index).count(),
        "peers": peers.iter().map(|p| json!({
            "address": p.address,
            "connected": p.connected,
        })).collect::<Vec<_>>(),
    })
}

/// A node's swarm peers, and its connections that are not plain direct ones
/// (`h`: hole-punched, `c`: through a relay peer's circuit).
fn peers_column(n: &Value) -> String {
    let Some(peers) = n["swarm_peers"].as_u64() else {
        return "-".into();
    };
    let paths = &n["swarm_paths"];
    match (paths["hole_punched"].as_u64(), paths["circuit"].as_u64()) {
        (Some(h), Some(c)) if h + c > 0 => format!("{peers} {h}h{c}c"),
        _ => peers.to_string(),
    }
}
