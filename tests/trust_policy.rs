//! The seed's whole trust table: levels, allow/deny, onboarding by invite code and by
//! payment, default allow/deny/ask with a trust agent, admin actions and live list
//! files. Every row runs over HTTP and over the WebSocket: one decision for every
//! transport.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use oonode::agent::Echo;
use oonode::{Address, Envelope, Host, Identity, Kind, Policy, TrustAgent, TrustQuestion};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Debug)]
enum Via {
    Http,
    Ws,
}

const BOTH: [Via; 2] = [Via::Http, Via::Ws];

fn policy(yaml: &str) -> Policy {
    Policy::from_mapping(serde_norway::from_str(yaml).unwrap()).unwrap()
}

fn input(caller: &Identity, to: Address, prompt: &str, invite: Option<&str>) -> Value {
    let mut p = Map::new();
    p.insert("prompt".into(), json!(prompt));
    if let Some(code) = invite {
        p.insert("invite_code".into(), json!(code));
    }
    Envelope::sign(caller, Kind::Input, Some(to), p).to_nested_json()
}

/// Sends one INPUT and returns "ok" or the refusal code (and the message).
async fn outcome(node: &TestNode, via: Via, frame: Value) -> (String, String) {
    match via {
        Via::Http => {
            let (status, body) = node.post(&frame).await;
            if status == 200 {
                ("ok".into(), String::new())
            } else {
                (
                    body["code"].as_str().unwrap_or("?").to_string(),
                    body["error"].as_str().unwrap_or("").to_string(),
                )
            }
        }
        Via::Ws => {
            let url = node.ws_url();
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut frame = frame;
            frame["type"] = json!("INPUT");
            ws.send(Message::text(frame.to_string())).await.unwrap();
            loop {
                let msg = tokio::time::timeout(STEP, ws.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).unwrap();
                match v["type"].as_str() {
                    Some("OUTPUT") => return ("ok".into(), String::new()),
                    Some("ERROR") => {
                        return (
                            v["code"].as_str().unwrap_or("?").to_string(),
                            v["message"].as_str().unwrap_or("").to_string(),
                        )
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn admin(
    node: &TestNode,
    admin: &Identity,
    action: &str,
    target: Address,
    amount: Option<u64>,
) -> (u16, Value) {
    let mut p = Map::new();
    p.insert("action".into(), json!(action));
    p.insert("address".into(), json!(target.to_string()));
    if let Some(n) = amount {
        p.insert("amount".into(), json!(n));
    }
    let env = Envelope::sign(admin, Kind::Admin, Some(node.address), p);
    post_json(&format!("{}/admin/trust", node.url), &env.to_nested_json()).await
}

fn node_key(dir: &std::path::Path) -> Identity {
    Identity::load_or_create(dir).unwrap().0
}

#[tokio::test]
async fn allow_deny_and_default_rows_over_both_transports() {
    let friend = Identity::from_seed([71; 32]);
    let contact = Identity::from_seed([72; 32]);
    let stranger = Identity::from_seed([73; 32]);
    let enemy = Identity::from_seed([74; 32]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("contacts.txt"),
        format!("{}\n", contact.address()),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("blocklist.txt"),
        format!("{}\n", enemy.address()),
    )
    .unwrap();

    for (default, stranger_expects, unsigned_expects) in [
        ("deny", "onboarding_required", "signature_required"),
        ("allow", "ok", "ok"),
    ] {
        let p = policy(&format!(
            "allow: [whitelisted, contact]\ndeny: [blocked]\nonboard:\n  invite_code: [SECRET-1]\ndefault: {default}\n"
        ));
        let host = Host::new(Echo)
            .trust_policy(p)
            .whitelist([friend.address().to_string(), enemy.address().to_string()]);
        let node = TestNode::start(host, dir.path()).await;
        let to = node.address;
        type Row<'a> = (&'a str, Box<dyn Fn() -> Value>, &'a str);
        let (f, c, s_, e) = (
            friend.clone(),
            contact.clone(),
            stranger.clone(),
            enemy.clone(),
        );
        let e2 = enemy.clone();
        // Each row signs a fresh INPUT: the same one twice would rightly be a replay.
        let rows: Vec<Row> = vec![
            (
                "whitelisted",
                Box::new(move || input(&f, to, "hi", None)),
                "ok",
            ),
            (
                "contact (contacts.txt)",
                Box::new(move || input(&c, to, "hi", None)),
                "ok",
            ),
            (
                "stranger",
                Box::new(move || input(&s_, to, "hi", None)),
                stranger_expects,
            ),
            (
                "unsigned",
                Box::new(|| json!({"prompt": "hi"})),
                unsigned_expects,
            ),
            (
                "blacklisted beats whitelist",
                Box::new(move || input(&e, to, "hi", None)),
                "blocked",
            ),
            (
                "blacklisted beats invite",
                Box::new(move || input(&e2, to, "hi", Some("SECRET-1"))),
                "blocked",
            ),
        ];
        for via in BOTH {
            for (row, frame, expected) in &rows {
                let (got, message) = outcome(&node, via, frame()).await;
                assert_eq!(
                    &got, expected,
                    "default {default}, {via:?}: {row} ({message})"
                );
                if got == "onboarding_required" {
                    assert!(
                        message.contains("invite_code"),
                        "the refusal names the methods: {message}"
                    );
                    assert!(
                        !message.contains("SECRET-1"),
                        "never the code itself: {message}"
                    );
                }
            }
        }
        let (_, info) = node.get("/info").await;
        assert_eq!(info["trust"], "policy");
        node.stop().await;
    }
}

#[tokio::test]
async fn an_invite_code_makes_a_stranger_a_contact_who_stays_one_after_a_restart() {
    let stranger = Identity::from_seed([75; 32]);
    let dir = tempfile::tempdir().unwrap();
    let host = || {
        Host::new(Echo).trust_policy(policy(
            "onboard:\n  invite_code: [OpenOnion, BETA2024]\ndefault: deny\n",
        ))
    };
    let node = TestNode::start(host(), dir.path()).await;
    let to = node.address;
    for via in BOTH {
        let (got, _) = outcome(&node, via, input(&stranger, to, "hi", Some("wrong"))).await;
        assert_eq!(got, "onboarding_required", "{via:?}");
    }
    assert_eq!(
        outcome(&node, Via::Ws, input(&stranger, to, "hi", Some("BETA2024")))
            .await
            .0,
        "ok"
    );
    // A contact now: no code needed any more.
    assert_eq!(
        outcome(&node, Via::Http, input(&stranger, to, "hi", None))
            .await
            .0,
        "ok"
    );
    node.stop().await;
    let node = TestNode::start(host(), dir.path()).await;
    for via in BOTH {
        assert_eq!(
            outcome(&node, via, input(&stranger, to, "again", None))
                .await
                .0,
            "ok",
            "{via:?} after restart"
        );
    }
    let (_, level) = admin(
        &node,
        &node_key(dir.path()),
        "level",
        stranger.address(),
        None,
    )
    .await;
    assert_eq!(level["level"], "contact");
    node.stop().await;
}

#[tokio::test]
async fn invite_codes_can_come_from_the_environment() {
    // Its own process state: set before any node reads it, and unique to this test.
    std::env::set_var("OONODE_INVITE_CODES", "FROM-ENV-7, other-code");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host.yaml"), "trust:\n  default: deny\n").unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let stranger = Identity::from_seed([76; 32]);
    assert_eq!(
        outcome(
            &node,
            Via::Http,
            input(&stranger, node.address, "hi", Some("FROM-ENV-7"))
        )
        .await
        .0,
        "ok"
    );
    node.stop().await;
}

#[tokio::test]
async fn payment_onboarding_with_enough_and_too_few_credits() {
    let rich = Identity::from_seed([77; 32]);
    let poor = Identity::from_seed([78; 32]);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        Host::new(Echo).trust_policy(policy("onboard:\n  payment: 10\ndefault: deny\n")),
        dir.path(),
    )
    .await;
    let me = node_key(dir.path());
    assert_eq!(
        admin(&node, &me, "credit", rich.address(), Some(25))
            .await
            .0,
        200
    );
    assert_eq!(
        admin(&node, &me, "credit", poor.address(), Some(4)).await.0,
        200
    );

    for via in BOTH {
        let (got, message) = outcome(&node, via, input(&poor, node.address, "hi", None)).await;
        assert_eq!(got, "insufficient_credits", "{via:?}");
        assert!(message.contains("4 held, 10 needed"), "{message}");
    }
    let (status, body) = node.post(&input(&poor, node.address, "hi", None)).await;
    assert_eq!(status, 402, "{body}");

    assert_eq!(
        outcome(&node, Via::Http, input(&rich, node.address, "hi", None))
            .await
            .0,
        "ok"
    );
    // Charged once: a contact now, and 15 credits left.
    assert_eq!(
        outcome(&node, Via::Ws, input(&rich, node.address, "hi", None))
            .await
            .0,
        "ok"
    );
    let (_, level) = admin(&node, &me, "level", rich.address(), None).await;
    assert_eq!(
        (level["level"].as_str(), level["credits"].as_u64()),
        (Some("contact"), Some(15))
    );
    node.stop().await;
}

/// Lets in addresses it was told to, and remembers every question it was asked.
#[derive(Clone, Default)]
struct Gatekeeper {
    allow: Vec<Address>,
    asked: Arc<Mutex<Vec<String>>>,
}

#[oonode::async_trait]
impl TrustAgent for Gatekeeper {
    async fn decide(&self, q: TrustQuestion) -> Result<(), oonode::trust::Denial> {
        self.asked
            .lock()
            .unwrap()
            .push(serde_json::to_string(&q).unwrap());
        match q.caller {
            Some(a) if self.allow.contains(&a) => Ok(()),
            _ => Err("the gatekeeper does not know you".into()),
        }
    }
}

#[tokio::test]
async fn default_ask_consults_the_trust_agent_without_the_prompt_and_caches() {
    let welcome = Identity::from_seed([79; 32]);
    let unwelcome = Identity::from_seed([80; 32]);
    let gate = Gatekeeper {
        allow: vec![welcome.address()],
        ..Gatekeeper::default()
    };
    let asked = gate.asked.clone();
    let dir = tempfile::tempdir().unwrap();
    let p = Policy::from_text(
        "---\ndefault: ask\ncache: 60\n---\nLet in people the gatekeeper knows.\n",
    )
    .unwrap();
    let node = TestNode::start(
        Host::new(Echo).trust_policy(p).trust_agent(gate),
        dir.path(),
    )
    .await;
    let secret_prompt = "the launch code is 0000";
    for via in BOTH {
        assert_eq!(
            outcome(
                &node,
                via,
                input(&welcome, node.address, secret_prompt, None)
            )
            .await
            .0,
            "ok",
            "{via:?}"
        );
        let (got, message) = outcome(
            &node,
            via,
            input(&unwelcome, node.address, secret_prompt, None),
        )
        .await;
        assert_eq!(got, "not_allowed", "{via:?}");
        assert!(
            message.contains("gatekeeper does not know you"),
            "{message}"
        );
    }
    let asked = asked.lock().unwrap().clone();
    assert_eq!(
        asked.len(),
        2,
        "one question per caller; later calls use the cached decision: {asked:?}"
    );
    for q in asked.iter() {
        assert!(
            !q.contains("launch code") && !q.contains("0000"),
            "the prompt never reaches the trust agent: {q}"
        );
        assert!(
            q.contains("stranger") && q.contains("Let in people the gatekeeper knows."),
            "{q}"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn admin_actions_are_signed_single_use_and_only_for_admins() {
    let stranger = Identity::from_seed([81; 32]);
    let helper = Identity::from_seed([82; 32]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admins.txt"),
        format!("# co-admins\n{}\n", helper.address()),
    )
    .unwrap();
    let node = TestNode::start(
        Host::new(Echo).trust_policy(policy("default: deny\n")),
        dir.path(),
    )
    .await;
    let me = node_key(dir.path());

    let (status, body) = admin(&node, &stranger, "promote", stranger.address(), None).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_admin")));
    assert_eq!(
        outcome(&node, Via::Http, input(&stranger, node.address, "hi", None))
            .await
            .0,
        "onboarding_required"
    );

    let (status, body) = admin(&node, &helper, "promote", stranger.address(), None).await;
    assert_eq!(
        (status, body["level"].as_str()),
        (200, Some("contact")),
        "{body}"
    );
    assert_eq!(
        outcome(&node, Via::Ws, input(&stranger, node.address, "hi", None))
            .await
            .0,
        "ok"
    );

    // Block beats contact; unblock restores it.
    assert_eq!(
        admin(&node, &me, "block", stranger.address(), None).await.1["level"],
        "blocked"
    );
    assert_eq!(
        outcome(&node, Via::Http, input(&stranger, node.address, "hi", None))
            .await
            .0,
        "blocked"
    );
    assert_eq!(
        admin(&node, &me, "unblock", stranger.address(), None)
            .await
            .1["level"],
        "contact"
    );
    assert_eq!(
        admin(&node, &me, "demote", stranger.address(), None)
            .await
            .1["level"],
        "stranger"
    );

    // Single-use: the same signed action cannot be sent twice.
    let mut p = Map::new();
    p.insert("action".into(), json!("promote"));
    p.insert("address".into(), json!(stranger.address().to_string()));
    let env = Envelope::sign(&me, Kind::Admin, Some(node.address), p).to_nested_json();
    let url = format!("{}/admin/trust", node.url);
    assert_eq!(post_json(&url, &env).await.0, 200);
    let (status, body) = post_json(&url, &env).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("replayed")));
    // And an INPUT envelope is no admin action.
    let (status, _) = post_json(&url, &input(&me, node.address, "promote", None)).await;
    assert_eq!(status, 400);
    node.stop().await;
}

#[tokio::test]
async fn the_admin_cli_grants_credits() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let someone = Identity::from_seed([83; 32]).address().to_string();
    let (url, co) = (node.url.clone(), dir.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_oonode"))
            .args([
                "trust", "credit", &someone, "10", "--node", &url, "--co-dir",
            ])
            .arg(co)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["credits"], 10);
    node.stop().await;
}

#[tokio::test]
async fn a_whitelist_file_edited_while_the_node_runs_takes_effect_within_2_s() {
    let newcomer = Identity::from_seed([84; 32]);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("whitelist.txt");
    std::fs::write(&list, "# nobody yet\n").unwrap();
    let node = TestNode::start(
        Host::new(Echo).trust_policy(policy("default: deny\n")),
        dir.path(),
    )
    .await;
    assert_eq!(
        outcome(&node, Via::Http, input(&newcomer, node.address, "hi", None))
            .await
            .0,
        "onboarding_required"
    );

    std::fs::write(&list, format!("# partners\n{}\n", newcomer.address())).unwrap();
    let edited = Instant::now();
    loop {
        if outcome(&node, Via::Http, input(&newcomer, node.address, "hi", None))
            .await
            .0
            == "ok"
        {
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(2),
            "not whitelisted 2 s after the edit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("whitelist edit took effect after {:?}", edited.elapsed());

    // A blacklist that becomes unreadable fails closed.
    let bl = dir.path().join("blocklist.txt");
    std::fs::create_dir(&bl).unwrap(); // a directory where a file should be: unreadable
    let broken = Instant::now();
    loop {
        let (code, _) = outcome(&node, Via::Http, input(&newcomer, node.address, "hi", None)).await;
        if code == "list_unreadable" {
            break;
        }
        assert!(
            broken.elapsed() < Duration::from_secs(2),
            "still serving with an unreadable blacklist"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_dir(&bl).unwrap();
    let healed = Instant::now();
    while outcome(&node, Via::Http, input(&newcomer, node.address, "hi", None))
        .await
        .0
        != "ok"
    {
        assert!(
            healed.elapsed() < Duration::from_secs(2),
            "not serving again once the list is readable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn the_levels_table_over_both_transports() {
    let caller = Identity::from_seed([85; 32]);
    for (level, unsigned, signed, bad) in [
        (oonode::TrustLevel::Open, "ok", "ok", "invalid_signature"),
        (oonode::TrustLevel::Careful, "ok", "ok", "invalid_signature"),
        (
            oonode::TrustLevel::Strict,
            "signature_required",
            "ok",
            "invalid_signature",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let node = TestNode::start(Host::new(Echo).trust(level), dir.path()).await;
        for via in BOTH {
            assert_eq!(
                outcome(&node, via, json!({"prompt": "hi"})).await.0,
                unsigned,
                "{level} {via:?} unsigned"
            );
            assert_eq!(
                outcome(&node, via, input(&caller, node.address, "hi", None))
                    .await
                    .0,
                signed,
                "{level} {via:?} signed"
            );
            let mut tampered = input(&caller, node.address, "hi", None);
            tampered["payload"]["prompt"] = json!("changed");
            assert_eq!(
                outcome(&node, via, tampered).await.0,
                bad,
                "{level} {via:?} bad signature"
            );
        }
        node.stop().await;
    }
}
