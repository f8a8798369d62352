//! DHT records, as the swarm checks one before storing or serving it: presence records
//! (size, JSON, type, signer and key owner, timestamp window, field caps) and, from the
//! same bytes, home-relay records (an agent's signed ANNOUNCE naming its relay).
//!
//! Properties: any record is accepted or refused, never a panic; a presence record that
//! passes is signed at most an hour ago, a home-relay record within 300 s either way and
//! names a ws:// or wss:// relay; a presence record we sign ourselves fails only on a
//! field cap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::envelope::canonical_json;
use oonode::fuzzing::{check_home, check_presence};
use oonode::Identity;
use serde_json::Value;

/// The clock the target checks against: the timestamp of the seeds.
const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let owner = Identity::from_seed([2; 32]);
    let parsed = serde_json::from_slice::<Value>(data).ok();
    let own_time = parsed
        .as_ref()
        .and_then(|v| v.get("timestamp"))
        .and_then(Value::as_u64);
    for now in [Some(NOW), own_time].into_iter().flatten() {
        if let Some((timestamp, _)) = check_presence(&owner.address(), data, now) {
            assert!(timestamp <= now + 300 && now.saturating_sub(timestamp) <= 3600);
        }
        if let Some((timestamp, relay)) = check_home(&owner.address(), data, now) {
            assert!(timestamp.abs_diff(now) <= 300);
            let relay = relay.trim();
            assert!(relay.starts_with("ws://") || relay.starts_with("wss://"), "{relay}");
        }
    }

    // The payload signed by the key's owner, as a node publishes it.
    let Some(Value::Object(mut payload)) = parsed else {
        return;
    };
    let me = owner.address().to_string();
    payload.remove("signature");
    payload.insert("type".into(), "PRESENCE".into());
    payload.insert("address".into(), me.clone().into());
    payload.insert("from".into(), me.into());
    payload.insert("timestamp".into(), NOW.into());
    let sig = owner.sign(&canonical_json(&Value::Object(payload.clone())));
    let hex: String = sig.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    payload.insert("signature".into(), hex.into());
    let record = serde_json::to_vec(&payload).unwrap();
    if record.len() <= 16 * 1024 && small_fields(&payload) {
        assert!(
            check_presence(&owner.address(), &record, NOW).is_some(),
            "our own presence record was refused"
        );
    }
});

/// Whether the capped fields are within their caps (else a refusal is right).
fn small_fields(p: &serde_json::Map<String, Value>) -> bool {
    let strings = |field: &str, items: usize, fits: &dyn Fn(&str) -> bool| match p.get(field) {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.len() <= items && a.iter().all(|i| i.as_str().is_some_and(fits)),
        _ => false,
    };
    let summary = match p.get("summary") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.chars().count() <= 1000,
        _ => false,
    };
    summary
        && strings("endpoints", 16, &|e| e.len() <= 256)
        && strings("examples", 16, &|e| e.chars().count() <= 500)
}
