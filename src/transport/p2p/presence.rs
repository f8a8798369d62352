//! Presence and home relays in the DHT: publishing this node's signed presence record, an
//! agent's home-relay record (for a relay), and looking up others' (checked by
//! `record.rs` before use).

use std::time::Duration;

use libp2p::kad;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::event_loop::Command;
use super::{P2p, P2pError, PeerPresence};
use crate::envelope::{canonical_json, unix_now};
use crate::identity::{Address, Identity};
use crate::proto::Announce;

use super::record::*;

impl P2p {
    /// Publishes this node's signed presence (address, summary, examples) in the DHT.
    pub async fn publish_presence(
        &self,
        identity: &Identity,
        summary: Option<&str>,
        examples: &[String],
        endpoints: &[String],
    ) {
        // Within the caps every node checks, or nobody would store it.
        let summary = summary.map(|s| capped(s, MAX_SUMMARY_CHARS));
        let mut examples: Vec<String> = examples
            .iter()
            .take(MAX_EXAMPLES)
            .map(|e| capped(e, MAX_EXAMPLE_CHARS))
            .collect();
        let endpoints: Vec<&String> = endpoints
            .iter()
            .filter(|e| e.len() <= MAX_ENDPOINT_BYTES)
            .take(MAX_ENDPOINTS)
            .collect();
        let value = loop {
            let mut payload = Map::new();
            payload.insert("endpoints".into(), json!(endpoints));
            payload.insert("type".into(), json!("PRESENCE"));
            payload.insert("address".into(), json!(identity.address().to_string()));
            payload.insert("from".into(), json!(identity.address().to_string()));
            payload.insert("summary".into(), json!(summary));
            payload.insert("examples".into(), json!(examples));
            payload.insert("timestamp".into(), json!(unix_now()));
            let sig = identity.sign(&canonical_json(&Value::Object(payload.clone())));
            payload.insert("signature".into(), json!(hex::encode(sig.to_bytes())));
            let value = serde_json::to_vec(&payload).unwrap_or_default();
            // Wide characters can take even capped fields over the record's size.
            if value.len() <= MAX_PRESENCE_BYTES || examples.pop().is_none() {
                break value;
            }
        };
        let _ = self
            .command(Command::PutRecord {
                key: presence_key(&identity.address()),
                value,
                // Ours is fresh; it lives as long as any presence record may.
                expires: std::time::Instant::now() + PRESENCE_MAX_AGE,
            })
            .await;
    }

    /// The agents this swarm knows, with their published summaries (checked signatures).
    pub async fn peers(&self) -> Result<Vec<PeerPresence>, P2pError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Known { reply }).await?;
        let known = rx.await.map_err(|_| P2pError::Stopped)?;
        let lookups = known.into_iter().filter_map(|(peer, addrs, connected)| {
            let address = Address::from_peer_id(&peer).ok()?;
            Some(async move {
                let presence = self.presence(&address).await;
                let circuit = addrs.iter().any(|a| {
                    a.iter()
                        .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
                });
                PeerPresence {
                    address: address.to_string(),
                    peer_id: peer.to_string(),
                    addrs: addrs.iter().map(ToString::to_string).collect(),
                    connected,
                    path: self.path_to(&peer),
                    circuit,
                    summary: presence
                        .as_ref()
                        .and_then(|p| p.get("summary")?.as_str().map(str::to_owned)),
                    examples: presence
                        .as_ref()
                        .and_then(|p| p.get("examples")?.as_array().cloned())
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect(),
                }
            })
        });
        Ok(futures::future::join_all(lookups).await)
    }

    /// The presence record `address` published, if the DHT has one and its signature
    /// is that address's.
    pub async fn presence(&self, address: &Address) -> Option<Map<String, Value>> {
        let record = self.newest_record(presence_key(address)).await?;
        check_presence(&record, unix_now()).ok().map(|p| p.payload)
    }

    /// The newest valid record under `key` the DHT gives within 12 s (the event loop
    /// checks what it finds; callers check again, as the record may have aged since).
    async fn newest_record(&self, key: Vec<u8>) -> Option<kad::Record> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::GetRecord {
            key: key.clone(),
            reply,
        })
        .await
        .ok()?;
        let bytes = tokio::time::timeout(Duration::from_secs(12), rx)
            .await
            .ok()?
            .ok()??;
        Some(kad::Record::new(key, bytes))
    }

    /// Publishes `announce`, an agent's own signed ANNOUNCE as this relay accepted it, as
    /// the agent's home-relay record. Returns at once; the put is queued for the swarm.
    pub(crate) fn publish_home(&self, address: &Address, announce: Vec<u8>, signed_at: u64) {
        let expires = expires_at(
            signed_at,
            HOME_MAX_AGE,
            unix_now(),
            std::time::Instant::now(),
        );
        let put = Command::PutRecord {
            key: home_key(address),
            value: announce,
            expires,
        };
        let swarm = self.clone();
        tokio::spawn(async move { swarm.command(put).await });
    }

    /// The newest home-relay record of `address` in the DHT, checked: the agent signed
    /// it, for the relay it names, within the last [`HOME_MAX_AGE`].
    pub(crate) async fn home(&self, address: &Address) -> Option<Announce> {
        let record = self.newest_record(home_key(address)).await?;
        check_home(&record, unix_now()).ok()
    }
}
