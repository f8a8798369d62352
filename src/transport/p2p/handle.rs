//! [`P2p`]: the cloneable handle that sends commands to the event loop, dials peers and
//! opens call streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{identity::Keypair, PeerId};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use super::event_loop::{Command, EventLoop};
use super::ip_limits::PeerIps;
use super::{P2pConfig, P2pError, SwarmStatus, DIAL_TIMEOUT, MAX_CALLS_PER_PEER, PROTOCOL};
use crate::identity::Address;

/// Handle to a running swarm; cheap to clone.
#[derive(Clone)]
pub struct P2p {
    commands: mpsc::Sender<Command>,
    pub(super) control: libp2p_stream::Control,
    peer_id: PeerId,
    status: Arc<Mutex<SwarmStatus>>,
    /// How many listen addresses were asked for.
    listeners: usize,
    /// Calls this swarm has open to each peer: kept under the peers' per-peer limit, so
    /// a node relaying many callers' calls is never mistaken for a misbehaving peer.
    outbound: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
    /// The IPs each connected peer is connected from.
    pub(super) peer_ips: PeerIps,
}

impl std::fmt::Debug for P2p {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2p")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl P2p {
    /// Builds the swarm, starts listening and dialing the bootstrap peers, and runs the
    /// event loop until `stop`.
    pub async fn spawn(
        keypair: Keypair,
        config: P2pConfig,
        stop: CancellationToken,
    ) -> Result<P2p, P2pError> {
        Self::spawn_recording(keypair, config, None, stop).await
    }

    /// [`spawn`](Self::spawn), recording libp2p's own metrics into `metrics` (a node's
    /// `/metrics`).
    pub(crate) async fn spawn_recording(
        keypair: Keypair,
        config: P2pConfig,
        metrics: Option<libp2p::metrics::Metrics>,
        stop: CancellationToken,
    ) -> Result<P2p, P2pError> {
        let peer_id = keypair.public().to_peer_id();
        let status = Arc::new(Mutex::new(SwarmStatus {
            peer_id: peer_id.to_string(),
            ..SwarmStatus::default()
        }));
        let (commands, rx) = mpsc::channel(256);
        let peer_ips = PeerIps::default();
        let mut event_loop =
            EventLoop::new(keypair, &config, rx, status.clone(), peer_ips.clone())?;
        event_loop.metrics = metrics;
        let control = event_loop.stream_control();
        let dns_bootstrap = config
            .bootstrap
            .iter()
            .filter(|a| super::dns::is_dns(a))
            .filter_map(|a| match a.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some((peer, a.clone())),
                _ => None,
            })
            .collect();
        super::dns::spawn_resolver(dns_bootstrap, commands.clone(), stop.child_token());
        tokio::spawn(
            event_loop
                .run(stop)
                .instrument(info_span!("swarm", peer = %peer_id)),
        );
        Ok(P2p {
            commands,
            control,
            peer_id,
            status,
            listeners: config.listen.len(),
            outbound: Arc::default(),
            peer_ips,
        })
    }

    /// How this swarm is connected to `peer` now (direct, hole-punched, circuit), if it is.
    pub fn path_to(&self, peer: &PeerId) -> Option<super::ConnPath> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peer_paths
            .get(peer)
            .copied()
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn status(&self) -> SwarmStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until every configured listener is up (or `limit` passes).
    pub async fn listening(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let addrs = self.status().listen_addrs;
            if addrs.len() >= self.listeners.max(1) || Instant::now() >= deadline {
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn command(&self, cmd: Command) -> Result<(), P2pError> {
        self.commands.send(cmd).await.map_err(|_| P2pError::Stopped)
    }

    /// Finds `peer` (routing table, then a DHT lookup) and connects to it.
    pub async fn connect(&self, peer: PeerId) -> Result<(), P2pError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Connect { peer, reply }).await?;
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(P2pError::Stopped),
            Err(_) => Err(P2pError::Timeout(peer.to_string())),
        }
    }

    /// Opens a call stream to the agent at `address`.
    pub async fn open(&self, address: Address) -> Result<libp2p::Stream, P2pError> {
        let peer = address.peer_id();
        let mut control = self.control.clone();
        let mut attempt = 0;
        loop {
            self.connect(peer).await?;
            match control.open_stream(peer, PROTOCOL).await {
                Ok(stream) => return Ok(stream),
                // The stream went to a connection on its way out (a circuit closed
                // because DCUtR just made a direct connection): another may stand.
                Err(_) if attempt < 2 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(P2pError::Unreachable {
                        peer: peer.to_string(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// Opens a call stream, waiting while this swarm already has
    /// [`MAX_CALLS_PER_PEER`] calls open to that peer. The permit lasts as long as the call.
    pub(crate) async fn open_call(
        &self,
        address: Address,
    ) -> Result<(libp2p::Stream, OwnedSemaphorePermit), P2pError> {
        let slots = self
            .outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address.peer_id())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CALLS_PER_PEER)))
            .clone();
        let permit = slots.acquire_owned().await.map_err(|_| P2pError::Stopped)?;
        Ok((self.open(address).await?, permit))
    }

    /// Cuts a peer off for a while, and refuses new connections from the IPs it is
    /// connected from for as long: a fresh key from the same place is no way back in.
    pub async fn ban(&self, peer: PeerId) {
        self.ban_from(peer, None).await;
    }

    /// [`ban`](Self::ban), with the IP the misbehaviour was seen from (the peer may have
    /// hung up by the time the ban is carried out).
    pub(super) async fn ban_from(&self, peer: PeerId, seen: Option<IpAddr>) {
        let mut ips = self.peer_ips.all(&peer);
        ips.extend(seen);
        ips.sort();
        ips.dedup();
        let _ = self.command(Command::Ban { peer, ips }).await;
    }
}
