//! DNS multiaddrs (`/dns4/`, `/dns6/`, `/dns/`) of bootstrap peers, resolved with the
//! system's resolver (as `getaddrinfo` does: /etc/hosts, then DNS) into `/ip4/` and
//! `/ip6/` addresses. Done here rather than with a DNS transport so that it follows the
//! machine's own resolver configuration, and a name that does not resolve yet (a peer
//! not up, a network not ready) is tried again instead of failing the start.

use std::net::IpAddr;
use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::event_loop::Command;

/// How often a name that did not resolve is tried again.
const RETRY: Duration = Duration::from_secs(10);
/// How often resolved names are resolved again (a peer that moved).
const REFRESH: Duration = Duration::from_secs(300);

/// Whether `addr` names its host by DNS.
pub(super) fn is_dns(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)))
}

/// The IP addresses `addr` resolves to, as multiaddrs: its DNS component replaced by
/// `/ip4/` or `/ip6/` (of the family `/dns4/` or `/dns6/` asks for), the rest kept.
pub(super) async fn resolve(addr: &Multiaddr) -> Result<Vec<Multiaddr>, String> {
    let Some((at, host, family)) = addr.iter().enumerate().find_map(|(i, p)| match p {
        Protocol::Dns(h) => Some((i, h.to_string(), None)),
        Protocol::Dns4(h) => Some((i, h.to_string(), Some(true))),
        Protocol::Dns6(h) => Some((i, h.to_string(), Some(false))),
        _ => None,
    }) else {
        return Ok(vec![addr.clone()]);
    };
    let found = tokio::net::lookup_host((host.as_str(), 0))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut ips: Vec<IpAddr> = found
        .map(|a| a.ip())
        .filter(|ip| family.is_none_or(|v4| ip.is_ipv4() == v4))
        .collect();
    ips.dedup();
    if ips.is_empty() {
        return Err(format!(
            "{host} has no address of the family {addr} asks for"
        ));
    }
    Ok(ips
        .into_iter()
        .map(|ip| {
            addr.iter()
                .enumerate()
                .map(|(i, p)| match (i == at, ip) {
                    (true, IpAddr::V4(v4)) => Protocol::Ip4(v4),
                    (true, IpAddr::V6(v6)) => Protocol::Ip6(v6),
                    (false, _) => p,
                })
                .collect()
        })
        .collect())
}

/// Resolves the DNS bootstrap addresses until `stop`, handing what they resolve to to
/// the event loop: at once, again every 10 s for those that did not resolve, and every
/// 5 minutes for all.
pub(super) fn spawn_resolver(
    peers: Vec<(PeerId, Multiaddr)>,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let mut all = true;
            for (peer, addr) in &peers {
                match resolve(addr).await {
                    Ok(addrs) => {
                        debug!(%addr, ?addrs, "bootstrap address resolved");
                        let cmd = Command::Bootstrap { peer: *peer, addrs };
                        if commands.send(cmd).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        all = false;
                        warn!(%addr, error = %e, "bootstrap peer not resolved; trying again in 10 s");
                    }
                }
            }
            let wait = if all { REFRESH } else { RETRY };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_resolves_to_loopback_in_the_family_asked_for() {
        let peer = PeerId::random();
        let v4: Multiaddr = format!("/dns4/localhost/tcp/4001/p2p/{peer}")
            .parse()
            .unwrap();
        assert!(is_dns(&v4));
        let got = resolve(&v4).await.unwrap();
        assert!(got.contains(
            &format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
                .parse()
                .unwrap()
        ));
        assert!(got.iter().all(|a| !is_dns(a)));
        let plain: Multiaddr = "/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert!(!is_dns(&plain));
        assert_eq!(resolve(&plain).await.unwrap(), vec![plain]);
    }
}
