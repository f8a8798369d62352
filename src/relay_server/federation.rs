//! Relays that federate through the libp2p swarm. With a swarm
//! ([`RelayConfig::swarm_listen`](super::RelayConfig::swarm_listen)) a relay is a
//! Kademlia server; it publishes the signed ANNOUNCE of every agent online on it as that
//! agent's home-relay record, and a caller that names an agent homed on another relay is
//! passed through to it: the relay opens a caller connection of its own to the home
//! relay and splices the two (see `caller.rs`). Nothing is trusted that the agent did not
//! sign: the record is the agent's own ANNOUNCE, for the relay it names, and every frame
//! stays signed end to end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::identity::Address;
use crate::proto::RelayUrl;
use crate::transport::p2p::P2p;

/// How long a resolved home relay is used without asking the DHT again: short, so that
/// an agent that moved is found at its new relay within seconds (an upstream that finds
/// the agent gone forgets it at once).
const HOME_CACHE: Duration = Duration::from_secs(5);
/// Resolved home relays kept at most.
const MAX_CACHED: usize = 10_000;
/// How often an agent's home record is put again while it stays on this relay. It
/// re-announces every 30 s, and a record is valid for the announce's clock skew (300 s).
pub(super) const REPUBLISH_AFTER: Duration = Duration::from_secs(60);
/// Marks a caller connection one relay opened to another: a relay never passes such a
/// connection on again, so two relays with stale records cannot bounce a caller.
pub(super) const FORWARDED_HEADER: &str = "x-oonode-forwarded";
/// How long reaching a home relay may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// DHT lookups of home relays in flight at once: callers naming random addresses must not
/// flood the swarm through this relay. Past it a lookup is not made, and the agent reads
/// as unknown here for that frame.
const MAX_LOOKUPS: usize = 64;

pub(super) type Upstream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where an agent is homed, from its record, for the directory and for passing callers
/// on.
#[derive(Clone)]
pub(super) struct Home {
    pub(super) relay: RelayUrl,
    pub(super) summary: String,
    pub(super) endpoints: Vec<String>,
}

/// Resolved home relays, shared with the upstreams that may find one stale.
#[derive(Clone, Default)]
pub(super) struct Homes(Arc<Mutex<HashMap<Address, (Home, Instant)>>>);

impl Homes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Address, (Home, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops a resolved home relay that did not answer, or answered that the agent is
    /// not there: the next caller asks the DHT, which by then may name the relay the
    /// agent moved to.
    pub(super) fn forget(&self, address: &Address) {
        self.lock().remove(address);
    }
}

pub(super) struct Federation {
    pub(super) p2p: P2p,
    /// Home relays resolved lately: a caller's next session does not wait for the DHT.
    homes: Homes,
    lookups: Arc<tokio::sync::Semaphore>,
    tls: Arc<rustls::ClientConfig>,
    /// Pass callers on to relays on private or loopback addresses (a testnet, a LAN).
    forward_private: bool,
    max_frame_bytes: usize,
}

impl Federation {
    pub(super) fn new(
        p2p: P2p,
        tls: Arc<rustls::ClientConfig>,
        forward_private: bool,
        max_frame_bytes: usize,
    ) -> Self {
        Federation {
            p2p,
            homes: Homes::default(),
            lookups: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)),
            tls,
            forward_private,
            max_frame_bytes,
        }
    }

    /// The relay `address` is homed on, if the DHT names one other than this relay
    /// (`ours`): a record naming this relay is stale, as the agent is not online here.
    pub(super) async fn home_of(&self, address: &Address, ours: &[RelayUrl]) -> Option<Home> {
        if let Some((home, at)) = self.cached().get(address) {
            if at.elapsed() < HOME_CACHE {
                return Some(home.clone());
            }
        }
        let _slot = self.lookups.try_acquire().ok()?;
        let announce = self.p2p.home(address).await?;
        let relay: RelayUrl = announce.relay?.parse().ok()?;
        if ours.iter().any(|u| u.same_relay(&relay)) {
            return None;
        }
        let home = Home {
            relay,
            summary: announce.summary,
            endpoints: announce.endpoints,
        };
        let mut homes = self.cached();
        if homes.len() >= MAX_CACHED {
            homes.retain(|_, (_, at)| at.elapsed() < HOME_CACHE);
            if homes.len() >= MAX_CACHED {
                homes.clear();
            }
        }
        homes.insert(*address, (home.clone(), Instant::now()));
        Some(home)
    }

    pub(super) fn homes(&self) -> &Homes {
        &self.homes
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<Address, (Home, Instant)>> {
        self.homes.lock()
    }

    /// Opens a caller connection to `relay`'s `/ws/input`, marked as forwarded. Its host
    /// must resolve to public addresses unless `forward_private`: a home-relay record is
    /// signed by its agent, and anyone can make an agent key, so a record must not be
    /// able to point this relay at its own private network.
    pub(super) async fn dial(&self, relay: &RelayUrl) -> Result<Upstream, String> {
        let (host, port) = host_port(relay);
        let found = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("resolving {host} timed out"))?
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        let allowed: Vec<SocketAddr> = found
            .filter(|a| self.forward_private || is_public(a.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(format!(
                "relay {} is on a private or loopback address; relays pass callers on \
                 there only with --forward-private",
                relay.base()
            ));
        }
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&allowed[..]))
            .await
            .map_err(|_| format!("connecting to {} timed out", relay.base()))?
            .map_err(|e| format!("cannot connect to {}: {e}", relay.base()))?;
        let _ = tcp.set_nodelay(true);
        let mut request = relay
            .input()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        request
            .headers_mut()
            .insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes));
        let connector = Connector::Rustls(self.tls.clone());
        let handshake = tokio_tungstenite::client_async_tls_with_config(
            request,
            tcp,
            Some(config),
            Some(connector),
        );
        let (socket, _) = tokio::time::timeout(DIAL_TIMEOUT, handshake)
            .await
            .map_err(|_| format!("the WebSocket handshake with {} timed out", relay.base()))?
            .map_err(|e| format!("cannot open {}: {e}", relay.input()))?;
        Ok(socket)
    }
}

/// Host and port of a relay URL (the scheme's port when none is written).
fn host_port(relay: &RelayUrl) -> (&str, u16) {
    let default = if relay.is_secure() { 443 } else { 80 };
    let authority = relay.authority();
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host, port.unwrap_or(default));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().unwrap_or(default)),
        None => (authority, default),
    }
}

/// Whether `ip` is routable on the internet: not loopback, private, link-local,
/// shared (CGNAT), unique-local, multicast, unspecified or documentation space.
fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b))
                || a == 0)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_every_url_shape() {
        let hp = |s: &str| {
            let url: RelayUrl = s.parse().unwrap();
            let (h, p) = host_port(&url);
            (h.to_owned(), p)
        };
        assert_eq!(hp("ws://relay.example"), ("relay.example".into(), 80));
        assert_eq!(hp("wss://relay.example"), ("relay.example".into(), 443));
        assert_eq!(
            hp("ws://127.0.0.1:8765/ws/input"),
            ("127.0.0.1".into(), 8765)
        );
        assert_eq!(hp("ws://[::1]:9000"), ("::1".into(), 9000));
        assert_eq!(hp("wss://[2001:db8::1]"), ("2001:db8::1".into(), 443));
    }

    #[test]
    fn only_internet_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
