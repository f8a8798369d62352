//! Trust levels, lists, and the signature checks (replay, freshness, recipient) over HTTP.

mod common;

use common::*;
use oonode::agent::Echo;
use oonode::envelope::unix_now;
use oonode::{Envelope, Host, Identity, Kind, TrustLevel};
use serde_json::{json, Value};

fn tamper(mut body: Value) -> Value {
    body["payload"]["prompt"] = json!("something else");
    body
}

/// (what is sent, expected status, expected code) per level.
#[tokio::test]
async fn the_level_table() {
    let caller = Identity::from_seed([21; 32]);
    for (level, unsigned, signed, bad_sig) in [
        (TrustLevel::Open, 200, 200, 401),
        (TrustLevel::Careful, 200, 200, 401),
        (TrustLevel::Strict, 401, 200, 401),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let node = TestNode::start(Host::new(Echo).trust(level), dir.path()).await;

        let (status, body) = node.post(&json!({"prompt": "hi"})).await;
        assert_eq!(status, unsigned, "{level}: unsigned → {body}");
        if status == 401 {
            assert_eq!(body["code"], "signature_required");
            assert!(body["error"].as_str().unwrap().contains("signature"));
        }

        let (status, body) = node.post(&signed_input(&caller, node.address, "hi")).await;
        assert_eq!(status, signed, "{level}: signed → {body}");

        let (status, body) = node
            .post(&tamper(signed_input(&caller, node.address, "hi")))
            .await;
        assert_eq!(status, bad_sig, "{level}: bad signature → {body}");
        assert_eq!(body["code"], "invalid_signature");

        // The Python client's shape is accepted as signed too.
        let (status, body) = node
            .post(&python_style_input(&caller, node.address, "hi", unix_now()))
            .await;
        assert_eq!(status, 200, "{level}: python shape → {body}");

        let (_, info) = node.get("/info").await;
        assert_eq!(info["trust"], level.as_str());
        node.stop().await;
    }
}

#[tokio::test]
async fn a_blacklisted_signer_is_refused_at_every_level_even_if_whitelisted() {
    let bad = Identity::from_seed([22; 32]);
    let good = Identity::from_seed([23; 32]);
    for level in [TrustLevel::Open, TrustLevel::Careful, TrustLevel::Strict] {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Echo)
            .trust(level)
            .whitelist([bad.address().to_string(), good.address().to_string()])
            .blacklist([bad.address().to_string()]);
        let node = TestNode::start(host, dir.path()).await;

        let (status, body) = node.post(&signed_input(&bad, node.address, "hi")).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("blocked")),
            "{level}: {body}"
        );
        // Claiming the address without signing is refused the same way.
        let (status, _) = node
            .post(&json!({"prompt": "hi", "from": bad.address().to_string()}))
            .await;
        assert_eq!(status, 403, "{level}");
        // A blocked signer with a broken signature is still just blocked.
        let (status, _) = node
            .post(&tamper(signed_input(&bad, node.address, "hi")))
            .await;
        assert_eq!(status, 403, "{level}");

        let (status, _) = node.post(&signed_input(&good, node.address, "hi")).await;
        assert_eq!(status, 200, "{level}");
        let (status, list) = node.get("/sessions").await;
        if level == TrustLevel::Strict {
            assert_eq!(status, 401, "strict refuses unsigned reads too");
        } else {
            assert_eq!(list["sessions"], json!([]), "nothing stored for refusals");
        }
        let (_, mine) = signed_get(&node.url, node.address, &good, "/sessions").await;
        assert_eq!(mine["sessions"].as_array().unwrap().len(), 1);
        node.stop().await;
    }
}

#[tokio::test]
async fn a_blacklist_file_in_co_dir_is_applied() {
    let bad = Identity::from_seed([24; 32]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("blocklist.txt"),
        format!(
            "# blocked callers\n{}\n",
            bad.address()
                .to_string()
                .to_uppercase()
                .replacen("0X", "0x", 1)
        ),
    )
    .unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let (status, _) = node.post(&signed_input(&bad, node.address, "hi")).await;
    assert_eq!(status, 403);
    node.stop().await;
}

#[tokio::test]
async fn replayed_stale_and_misaddressed_requests_are_refused() {
    let caller = Identity::from_seed([25; 32]);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo).trust(TrustLevel::Strict), dir.path()).await;

    let once = signed_input(&caller, node.address, "pay 10 credits");
    assert_eq!(node.post(&once).await.0, 200);
    let (status, body) = node.post(&once).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("replayed")),
        "{body}"
    );

    // Its signer may sign an id again with another timestamp (nobody else can): that is
    // a new message, since a replay is the same key with the same signed timestamp.
    // Each one's copy is refused, here and after the restart below.
    let again = |ts: u64| {
        let payload = json!({"prompt": "again", "id": "00000000-0000-4000-8000-0000000000aa",
            "timestamp": ts});
        Envelope::sign(&caller, Kind::Input, Some(node.address), obj(payload)).to_nested_json()
    };
    let (earlier, later) = (unix_now() - 20, unix_now() - 10);
    for ts in [earlier, later] {
        assert_eq!(node.post(&again(ts)).await.0, 200);
        assert_eq!(node.post(&again(ts)).await.1["code"], "replayed");
    }
    let copies = [again(earlier), again(later)];

    // Python shape (no id): the signature digest is the replay key.
    let py = python_style_input(&caller, node.address, "hello", unix_now());
    assert_eq!(node.post(&py).await.0, 200);
    assert_eq!(node.post(&py).await.1["code"], "replayed");

    let stale = python_style_input(&caller, node.address, "hello", unix_now() - 400);
    let (status, body) = node.post(&stale).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("stale")),
        "{body}"
    );
    let future = python_style_input(&caller, node.address, "hello", unix_now() + 400);
    assert_eq!(node.post(&future).await.1["code"], "stale");

    let elsewhere = Identity::from_seed([26; 32]).address();
    let (status, body) = node.post(&signed_input(&caller, elsewhere, "hi")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("wrong_recipient")),
        "{body}"
    );
    let no_to =
        Envelope::sign(&caller, Kind::Input, None, obj(json!({"prompt": "hi"}))).to_nested_json();
    assert_eq!(node.post(&no_to).await.1["code"], "wrong_recipient");

    // Replays stay refused after a restart: seen ids are persisted.
    node.stop().await;
    let node = TestNode::start(Host::new(Echo).trust(TrustLevel::Strict), dir.path()).await;
    for message in [&once, &py, &copies[0], &copies[1]] {
        let (status, body) = node.post(message).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("replayed")),
            "{body}"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn the_same_verdicts_through_the_dispatcher_directly() {
    // A transport other than HTTP sees the same decision: call the dispatcher as any
    // transport does.
    let caller = Identity::from_seed([27; 32]);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo).trust(TrustLevel::Strict), dir.path()).await;
    let d = node.handle.dispatcher();
    let unsigned = oonode::Submission::new(Envelope::unsigned(obj(json!({"prompt": "hi"})), None));
    let refusal = d.submit(unsigned).await.unwrap_err();
    assert_eq!(
        (refusal.code(), refusal.http_status()),
        (oonode::proto::ErrorCode::SignatureRequired, 401)
    );

    let env = Envelope::sign(
        &caller,
        Kind::Input,
        Some(node.address),
        obj(json!({"prompt": "a b c"})),
    );
    let mut accepted = d.submit(oonode::Submission::new(env)).await.unwrap();
    let mut seqs = vec![];
    let last = loop {
        let env = accepted.replies.recv().await.expect("a final reply");
        assert_eq!(env.verify().unwrap(), node.address);
        match env.kind() {
            Some(Kind::Stream) => seqs.push(env.payload["seq"].as_u64().unwrap()),
            _ => break env,
        }
    };
    // Numbered 1, 2, … in order (the node joins chunks that come within 10 ms).
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert!(!seqs.is_empty());
    assert_eq!(seqs, expected, "chunks numbered in order");
    assert_eq!(last.kind(), Some(Kind::Output));
    assert_eq!(last.payload["chunks"], seqs.len());
    assert_eq!(last.payload["result"], "a b c");
    node.stop().await;
}
