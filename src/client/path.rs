//! The ways to an agent: its own endpoint (direct), the swarm, the relay; which to try
//! first, and remembering what worked.

use std::time::Duration;

use serde_json::Value;

use super::socket::{Offer, Socket, WsLink};
use super::{CallError, ConnectOptions, Via};
use crate::identity::{Address, Identity};
use crate::proto::seal::SEAL_HANDSHAKE_TIMEOUT;
use crate::proto::{ErrorCode, RelayUrl};
use crate::transport::p2p::{P2p, P2pConfig, P2pError};

/// How long a path that worked is tried first for the same address.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

/// What worked per address, process-wide.
fn remembered(
) -> &'static std::sync::Mutex<std::collections::HashMap<Address, (Via, std::time::Instant)>> {
    static PATHS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Address, (Via, std::time::Instant)>>,
    > = std::sync::OnceLock::new();
    PATHS.get_or_init(Default::default)
}

/// How a [`Remote`] reaches its agent.
pub(super) enum Path {
    /// The agent's own `/ws`.
    Direct(Box<WsLink>),
    /// The agent's own `POST /input`: one request per turn, no stream.
    Http(Box<HttpPath>),
    Relay(Box<WsLink>),
    /// A swarm given in the options, or one of the caller's own joined through the
    /// bootstrap peers (stopped with the handle).
    P2p {
        swarm: P2p,
        _stop: Option<tokio_util::sync::DropGuard>,
    },
}

/// Of the errors of several paths, the one that tells most: what the agent is (offline,
/// unknown) over a path we could not use.
pub(super) fn more_telling(a: CallError, b: CallError) -> CallError {
    let rank = |e: &CallError| match e {
        CallError::Offline(_) | CallError::NotInSwarm(_) | CallError::Unknown(_) => 3,
        CallError::Timeout(_) | CallError::Relay { .. } => 2,
        CallError::NoEndpoint => 0,
        _ => 1,
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// Auto mode: what worked lately first, then direct, swarm, relay — each only when the
/// options make it possible.
pub(super) fn auto_order(address: Address, options: &ConnectOptions) -> Vec<Via> {
    let can_swarm = options.swarm.is_some() || !options.bootstrap.is_empty();
    // Without a relay of its own, a caller in the swarm looks up the agent's home relay.
    let can_relay = options.relay_url.is_some() || can_swarm;
    let can_direct = !options.endpoints.is_empty() || can_swarm || can_relay;
    let mut order: Vec<Via> = [
        (Via::Direct, can_direct),
        (Via::P2p, can_swarm),
        (Via::Relay, can_relay),
    ]
    .into_iter()
    .filter_map(|(v, ok)| ok.then_some(v))
    .collect();
    let recent = remembered()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&address)
        .filter(|(_, at)| at.elapsed() < REMEMBER_FOR)
        .map(|(v, _)| *v);
    if let Some(v) = recent {
        if let Some(i) = order.iter().position(|o| *o == v) {
            order.remove(i);
            order.insert(0, v);
        }
    }
    order
}

pub(super) fn remember(address: Address, via: Via) {
    remembered()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(address, (via, std::time::Instant::now()));
}

pub(super) async fn open_path(
    via: Via,
    address: Address,
    options: &ConnectOptions,
    identity: &Identity,
) -> Result<Path, CallError> {
    match via {
        Via::Http => {
            let endpoint = find_endpoint(address, options).await?;
            let mut url = endpoint.base.clone();
            url.set_path("/input");
            // An unsigned answer (a Python host's) is the agent's only where nobody else
            // can have written it: loopback, or TLS to an endpoint the caller named. TLS to
            // an endpoint a directory named proves that server's name, not the agent.
            let base = &endpoint.base;
            let private =
                plaintext_allowed(base, false) || (endpoint.given && base.scheme() == "https");
            let mut client = reqwest::Client::builder().timeout(
                options
                    .reply_timeout
                    .unwrap_or(super::DEFAULT_REPLY_TIMEOUT),
            );
            for root in crate::tls::reqwest_roots(options.relay_ca.as_deref())? {
                client = client.add_root_certificate(root);
            }
            let client = client
                .build()
                .map_err(|e| CallError::Swarm(e.to_string()))?;
            Ok(Path::Http(Box::new(HttpPath {
                url,
                client,
                private,
                answer: None,
            })))
        }
        Via::Direct => {
            let (socket, endpoint) = open_direct(address, options).await?;
            // A host that does not seal gets the call in the clear only on an endpoint the
            // caller named, or on loopback: one a directory named could be anyone's server
            // (its /info proves nothing), and only a SEALED_OK proves the agent.
            let vouched = endpoint.given || plaintext_allowed(&endpoint.base, false);
            let link =
                match WsLink::offer_seal(socket, identity, address, seal_wait(options)).await? {
                    Offer::Sealed(link) => link,
                    Offer::Refused(socket) if vouched => WsLink::clear(socket),
                    Offer::Refused(mut socket) => {
                        let _ = futures::SinkExt::close(&mut socket).await;
                        return Err(CallError::Unreachable {
                            url: endpoint.base.to_string(),
                            reason: "this endpoint (from a directory) does not seal, so \
                                     nothing proves it is the agent; name it with --endpoint \
                                     to use it in the clear"
                                .into(),
                        });
                    }
                };
            Ok(Path::Direct(Box::new(link)))
        }
        Via::P2p => {
            let path = join_swarm(options).await?;
            if let Path::P2p { swarm, .. } = &path {
                // Reachable now, or fall back now rather than at the first prompt.
                swarm
                    .connect(address.peer_id())
                    .await
                    .map_err(|e| p2p_error(e, address))?;
            }
            Ok(path)
        }
        Via::Relay => {
            let options = &relay_for(address, options).await?;
            let socket = open_relay(options).await?;
            let link =
                match WsLink::offer_seal(socket, identity, address, seal_wait(options)).await? {
                    Offer::Sealed(link) => link,
                    // The agent took the SEAL as its session's first frame and refused it: a
                    // fresh socket starts clean (as the Python client does). The relay link
                    // stays TLS to the relay where the URL is wss://.
                    Offer::Refused(mut socket) => {
                        let _ = futures::SinkExt::close(&mut socket).await;
                        WsLink::clear(open_relay(options).await?)
                    }
                };
            Ok(Path::Relay(Box::new(link)))
        }
        Via::Auto => Err(CallError::NoPath),
    }
}

pub(super) fn p2p_error(e: P2pError, address: Address) -> CallError {
    match e {
        P2pError::NotFound(_) => CallError::NotInSwarm(address.to_string()),
        P2pError::Timeout(_) => CallError::Timeout(crate::transport::p2p::DIAL_TIMEOUT),
        P2pError::Unreachable { .. } => CallError::Offline(address.to_string()),
        other => CallError::Swarm(other.to_string()),
    }
}

/// How long to wait for SEALED_OK: the Python client's 10 s, or less when the caller
/// waits less for any reply.
fn seal_wait(options: &ConnectOptions) -> Duration {
    options
        .reply_timeout
        .map_or(SEAL_HANDSHAKE_TIMEOUT, |t| t.min(SEAL_HANDSHAKE_TIMEOUT))
}

/// A turn over `POST /input`: the answer of the last request, read as the next frame.
pub(super) struct HttpPath {
    pub url: reqwest::Url,
    pub client: reqwest::Client,
    /// TLS, or loopback: nobody else on the path, so an unsigned answer is the agent's.
    pub private: bool,
    pub answer: Option<serde_json::Map<String, Value>>,
}

/// A direct endpoint whose `/info` names the agent (see [`find_endpoint`]), and its `/ws`.
async fn open_direct(
    address: Address,
    options: &ConnectOptions,
) -> Result<(Box<Socket>, Endpoint), CallError> {
    let endpoint = find_endpoint(address, options).await?;
    let base = endpoint.base.clone();
    let tls = crate::tls::client_config(options.relay_ca.as_deref())?;
    let mut url = base.clone();
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    if url.set_scheme(scheme).is_err() {
        return Err(CallError::NoEndpoint);
    }
    url.set_path("/ws");
    let url = url.to_string();
    let unreachable = |reason: String| CallError::Unreachable {
        url: url.clone(),
        reason,
    };
    match tokio::time::timeout(
        Duration::from_secs(5),
        crate::tls::dial(url.as_str(), None, tls),
    )
    .await
    {
        Ok(Ok(socket)) => Ok((Box::new(socket), endpoint)),
        Ok(Err(e)) => Err(unreachable(
            crate::tls::failure(&e).unwrap_or_else(|| e.to_string()),
        )),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// An agent's HTTP endpoint, and whether the caller named it (`--endpoint`) rather than a
/// directory or the swarm.
struct Endpoint {
    base: reqwest::Url,
    given: bool,
}

/// A direct HTTP endpoint whose `/info` names the address called (which anyone can
/// claim: a SEALED_OK is what proves the agent). Plaintext only on loopback, or on
/// private networks when allowed; `https://` anywhere.
async fn find_endpoint(address: Address, options: &ConnectOptions) -> Result<Endpoint, CallError> {
    let ca = options.relay_ca.as_deref();
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(3));
    for root in crate::tls::reqwest_roots(ca)? {
        http = http.add_root_certificate(root);
    }
    let http = http.build().map_err(|e| CallError::Swarm(e.to_string()))?;
    let mut candidates = options.endpoints.clone();
    let mut reasons = Vec::new();
    if let Some(relay) = &options.relay_url {
        let directory = relay.parse::<RelayUrl>()?.directory(address);
        match http.get(&directory).send().await {
            Ok(res) => {
                if let Ok(entry) = res.json::<Value>().await {
                    candidates.extend(strings(&entry["endpoints"]));
                }
            }
            // A directory we cannot trust is worth saying; one that is down is not (the
            // relay path says it better).
            Err(e) => {
                if let Some(reason) = crate::tls::failure(&e) {
                    reasons.push(format!("{directory}: {reason}"));
                }
            }
        }
    }
    // A swarm that is running anyway can tell the agent's published endpoints.
    if let Some(swarm) = &options.swarm {
        if let Some(presence) = swarm.presence(&address).await {
            candidates.extend(strings(presence.get("endpoints").unwrap_or(&Value::Null)));
        }
    }
    for endpoint in &candidates {
        // Only the HTTP endpoints: their /info proves the address before /ws is used.
        let Some(base) = reqwest::Url::parse(endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
        else {
            continue;
        };
        if base.scheme() == "http" && !plaintext_allowed(&base, options.allow_private) {
            reasons.push(format!(
                "{base}: plaintext outside loopback (allow_private is off)"
            ));
            continue;
        }
        let mut info_url = base.clone();
        info_url.set_path("/info");
        let info = match http.get(info_url).send().await {
            Ok(res) => res.json::<Value>().await.unwrap_or(Value::Null),
            Err(e) => {
                let reason = crate::tls::failure(&e).unwrap_or_else(|| e.to_string());
                reasons.push(format!("{base}: {reason}"));
                continue;
            }
        };
        if info["address"].as_str() != Some(address.to_string().as_str()) {
            reasons.push(format!("{base}: /info names another address"));
            continue;
        }
        return Ok(Endpoint {
            given: options.endpoints.contains(endpoint),
            base,
        });
    }
    if reasons.is_empty() {
        return Err(CallError::NoEndpoint);
    }
    Err(CallError::Unreachable {
        url: "direct endpoints".into(),
        reason: reasons.join("; "),
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Plaintext HTTP is used on loopback, and on private networks only when allowed.
fn plaintext_allowed(base: &reqwest::Url, allow_private: bool) -> bool {
    let host = base.host_str().unwrap_or_default();
    if host == "localhost" {
        return true;
    }
    match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || (allow_private && ip.is_private()),
        Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// The options to call `address` through a relay with: as given when they name a relay,
/// else with the agent's home relay, from its home-relay record in the DHT (the agent's
/// own signed ANNOUNCE, which a relay published), looked up through the swarm. A home
/// relay on a loopback or private address is used only with `allow_private`: anyone can
/// make an agent key and sign a record pointing into the caller's own network.
async fn relay_for(
    address: Address,
    options: &ConnectOptions,
) -> Result<std::borrow::Cow<'_, ConnectOptions>, CallError> {
    if options.relay_url.is_some() {
        return Ok(std::borrow::Cow::Borrowed(options));
    }
    // `_stop` ends a swarm joined for this lookup when the lookup is done.
    let Path::P2p { swarm, _stop } = join_swarm(options).await? else {
        return Err(CallError::NoPath);
    };
    // A lookup needs a peer to ask: connected to one of the bootstrap peers first.
    let peers = options
        .bootstrap
        .iter()
        .filter_map(|a| match a.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
            _ => None,
        });
    let dials = peers.map(|peer| {
        let swarm = swarm.clone();
        Box::pin(async move { swarm.connect(peer).await })
    });
    if options.swarm.is_none() {
        futures::future::select_ok(dials)
            .await
            .map_err(|e| p2p_error(e, address))?;
    }
    let home = swarm
        .home(&address)
        .await
        .ok_or_else(|| CallError::NotInSwarm(address.to_string()))?;
    let relay: RelayUrl = home.relay.as_deref().ok_or(CallError::NoPath)?.parse()?;
    let url = relay.input();
    let base = reqwest::Url::parse(&url.replacen("ws", "http", 1))
        .map_err(|e| CallError::Swarm(e.to_string()))?;
    let host = base.host_str().unwrap_or_default();
    let private = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback() || ip.is_unique_local(),
        Err(_) => host.is_empty() || host == "localhost",
    };
    if private && !options.allow_private {
        return Err(CallError::Unreachable {
            url,
            reason: "the agent's home relay (from its record in the DHT) is on a private \
                     address; allow private addresses (--allow-private) to use it"
                .into(),
        });
    }
    tracing::debug!(agent = %address.short(), relay = %relay, "home relay found in the DHT");
    let mut found = options.clone();
    found.relay_url = Some(relay.to_string());
    Ok(std::borrow::Cow::Owned(found))
}

async fn open_relay(options: &ConnectOptions) -> Result<Box<Socket>, CallError> {
    let relay: RelayUrl = options
        .relay_url
        .as_deref()
        .ok_or(CallError::NoPath)?
        .parse()?;
    let url = relay.input();
    let unreachable = |reason: String| CallError::Unreachable {
        url: url.clone(),
        reason,
    };
    let tls = crate::tls::client_config(options.relay_ca.as_deref())?;
    let socket = tokio::time::timeout(
        Duration::from_secs(10),
        crate::tls::dial(url.as_str(), None, tls),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| match e {
        // The relay refused the socket and says why in a JSON body: `{"error","code"}`.
        tokio_tungstenite::tungstenite::Error::Http(res)
            if res.status().is_client_error() || res.status().is_server_error() =>
        {
            let body: serde_json::Value = res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            let code = body["code"].as_str().map_or(
                if res.status() == 503 {
                    ErrorCode::RelayFull
                } else {
                    ErrorCode::Unknown
                },
                ErrorCode::parse,
            );
            let message = body["error"]
                .as_str()
                .map_or_else(|| format!("HTTP {}", res.status()), str::to_owned);
            CallError::Relay { code, message }
        }
        e => unreachable(crate::tls::failure(&e).unwrap_or_else(|| e.to_string())),
    })?;
    Ok(Box::new(socket))
}

/// Joins the swarm as a caller: a throwaway swarm key (so a running node with the same
/// co_dir keeps its PeerId to itself), DHT client mode, no listening.
async fn join_swarm(options: &ConnectOptions) -> Result<Path, CallError> {
    if let Some(swarm) = &options.swarm {
        return Ok(Path::P2p {
            swarm: swarm.clone(),
            _stop: None,
        });
    }
    if options.bootstrap.is_empty() {
        return Err(CallError::NoPath);
    }
    let config = P2pConfig::caller(options.bootstrap.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let swarm = P2p::spawn(
        libp2p::identity::Keypair::generate_ed25519(),
        config,
        stop.clone(),
    )
    .await
    .map_err(|e| CallError::Swarm(e.to_string()))?;
    Ok(Path::P2p {
        swarm,
        _stop: Some(stop.drop_guard()),
    })
}
