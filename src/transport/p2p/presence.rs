//! Presence records: each node publishes a signed summary of itself in the DHT under a
//! key derived from its address; nodes store a record only if its signer owns that key.

use std::time::Duration;

use libp2p::kad;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::event_loop::Command;
use super::{P2p, P2pError, PeerPresence};
use crate::envelope::{canonical_json, unix_now, Envelope};
use crate::identity::{Address, Identity};

/// Key prefix of presence records in the DHT.
const PRESENCE_PREFIX: &[u8] = b"/oonode/presence/";

impl P2p {
    /// Publishes this node's signed presence (address, summary, examples) in the DHT.
    pub async fn publish_presence(
        &self,
        identity: &Identity,
        summary: Option<&str>,
        examples: &[String],
        endpoints: &[String],
    ) {
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
        let _ = self
            .command(Command::PutRecord {
                key: presence_key(&identity.address()),
                value,
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
                PeerPresence {
                    address: address.to_string(),
                    peer_id: peer.to_string(),
                    addrs: addrs.iter().map(ToString::to_string).collect(),
                    connected,
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
        let (reply, rx) = oneshot::channel();
        self.command(Command::GetRecord {
            key: presence_key(address),
            reply,
        })
        .await
        .ok()?;
        let bytes = tokio::time::timeout(Duration::from_secs(12), rx)
            .await
            .ok()?
            .ok()??;
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&bytes) else {
            return None;
        };
        let env = Envelope::from_flat(&obj).ok()?;
        (env.verify().ok()? == *address).then_some(env.payload)
    }
}

/// A presence record is stored only under its signer's own key.
pub(super) fn valid_presence(record: &kad::Record) -> bool {
    let key = record.key.as_ref();
    let Some(raw) = key.strip_prefix(PRESENCE_PREFIX) else {
        return false;
    };
    let Ok(bytes) = <[u8; 32]>::try_from(raw) else {
        return false;
    };
    let Ok(address) = Address::from_bytes(bytes) else {
        return false;
    };
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&record.value) else {
        return false;
    };
    Envelope::from_flat(&obj).and_then(|e| e.verify()).ok() == Some(address)
}

fn presence_key(address: &Address) -> Vec<u8> {
    let mut key = PRESENCE_PREFIX.to_vec();
    key.extend_from_slice(address.as_bytes());
    key
}
