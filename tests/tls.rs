//! TLS on every socket a user may need it on: a relay serving `wss://` and `https://`
//! (in-process and the real binary), a node announcing on it and a caller calling
//! through it with a CA of their own, the node's own HTTPS port, the one-line errors for
//! an untrusted certificate or one for another name, and handshakes that never finish.
//!
//! Certificates are made at test time with rcgen: a test CA, a server certificate for
//! `localhost` and 127.0.0.1 signed by it, one for another name, and a second CA that
//! signed none of them. Everything listens on 127.0.0.1, port 0.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{relay_config, start_relay, Child, Stderr, TestNode, BIN, STEP};
use oonode::{CallError, ConnectOptions, Host, Via};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::AsyncReadExt;

/// How long a server gives a TLS handshake (the crate's 10 s), plus slack for a busy
/// machine.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(14);

/// Answers with the prompt in capitals.
#[derive(Clone)]
struct Shout;

#[oonode::async_trait]
impl oonode::Agent for Shout {
    fn name(&self) -> String {
        "shout".into()
    }

    async fn run(
        &mut self,
        turn: oonode::Turn,
        _: &oonode::StreamSink,
    ) -> Result<String, oonode::AgentError> {
        Ok(turn.prompt.to_uppercase())
    }
}

/// The PEM files of a test PKI, in a directory that lives as long as this.
struct Pki {
    _dir: tempfile::TempDir,
    /// The CA that signed `cert` and `other_name_cert`.
    ca: PathBuf,
    /// A CA that signed nothing here.
    other_ca: PathBuf,
    /// For `localhost` and 127.0.0.1.
    cert: PathBuf,
    key: PathBuf,
    /// For `other.example` only.
    other_name_cert: PathBuf,
    other_name_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap(), key)
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (ca_cert, ca_key) = ca("oonode test CA");
    let (other_ca, _) = ca("another test CA");
    let leaf = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = leaf(&["localhost", "127.0.0.1"]);
    let (other_name_cert, other_name_key) = leaf(&["other.example"]);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        other_ca: write("other-ca.pem", other_ca.pem()),
        cert: write("cert.pem", cert),
        key: write("key.pem", key),
        other_name_cert: write("other-name-cert.pem", other_name_cert),
        other_name_key: write("other-name-key.pem", other_name_key),
        _dir: dir,
    }
}

/// An HTTP client that trusts `ca` too.
fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(STEP)
        .build()
        .unwrap()
}

async fn call(address: &str, options: ConnectOptions) -> Result<(String, String), CallError> {
    tokio::time::timeout(STEP, async {
        let mut remote = oonode::connect(address, options).await?;
        let answer = remote.input("hello over tls").await?;
        Ok((answer.result, remote.path().to_owned()))
    })
    .await
    .expect("the call is bounded")
}

#[tokio::test]
async fn a_node_on_a_wss_relay_is_called_through_it_and_found_by_its_https_directory() {
    let pki = pki();
    let relay = start_relay(relay_config().tls(&pki.cert, &pki.key)).await;
    let url = relay.url();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    assert_eq!(relay.ready().http, url.replacen("wss://", "https://", 1));

    let node = TestNode::builder(Host::new(Shout).relay_ca(&pki.ca))
        .relay(&url)
        .start()
        .await;
    let address = node.address.to_string();

    // Through the relay, over wss://.
    let options = ConnectOptions::default()
        .relay(&url)
        .relay_ca(&pki.ca)
        .via(Via::Relay);
    let (result, path) = call(&address, options).await.expect("a call over wss");
    assert_eq!(
        (result.as_str(), path.as_str()),
        ("HELLO OVER TLS", "relay")
    );

    // The relay's directory over https:// names the node's endpoint, so auto mode goes
    // direct.
    let directory = format!("{}/api/agents/{address}", relay.ready().http);
    let entry: serde_json::Value = https_client(&pki.ca)
        .get(&directory)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(entry["online"], true, "{entry}");
    let options = ConnectOptions::default().relay(&url).relay_ca(&pki.ca);
    let (result, path) = call(&address, options).await.expect("an auto call");
    assert_eq!(
        (result.as_str(), path.as_str()),
        ("HELLO OVER TLS", "direct")
    );

    node.stop().await;
    relay.shutdown().await;
}

#[tokio::test]
async fn the_relays_per_ip_limits_hold_over_tls() {
    let pki = pki();
    let mut config = relay_config().tls(&pki.cert, &pki.key);
    config.max_callers_per_ip = 1;
    let relay = start_relay(config).await;
    // A caller's socket opens with a SEAL to its agent, so the agent must be there.
    let node = TestNode::builder(Host::new(Shout).relay_ca(&pki.ca))
        .http(false)
        .relay(&relay.url())
        .start()
        .await;
    let someone = node.address.to_string();
    let options = || {
        ConnectOptions::default()
            .relay(relay.url())
            .relay_ca(&pki.ca)
            .via(Via::Relay)
    };
    // The relay sees each caller's own address behind TLS: a second socket from this IP
    // is over the limit, and gets in once the first is gone.
    let first = tokio::time::timeout(STEP, oonode::connect(&someone, options()))
        .await
        .unwrap()
        .expect("a first caller socket over wss");
    let refused = tokio::time::timeout(STEP, oonode::connect(&someone, options()))
        .await
        .unwrap()
        .err()
        .expect("a second one is refused");
    assert!(
        matches!(
            refused,
            CallError::Relay {
                code: oonode::proto::ErrorCode::TooManyConnections,
                ..
            }
        ),
        "{refused:?}"
    );
    drop(first);
    common::wait_until("the slot is free", STEP, || async {
        oonode::connect(&someone, options()).await.is_ok()
    })
    .await;
    node.stop().await;
    relay.shutdown().await;
}

/// One line, with every part the user needs.
fn assert_one_line(e: &CallError, parts: &[&str]) {
    let text = e.to_string();
    eprintln!("error: {text}");
    assert!(!text.contains('\n'), "one line: {text}");
    for part in parts {
        assert!(text.contains(part), "{text:?} says {part:?}");
    }
}

#[tokio::test]
async fn an_untrusted_certificate_or_one_for_another_name_is_one_clear_line() {
    let pki = pki();
    let relay = start_relay(relay_config().tls(&pki.cert, &pki.key)).await;
    let url = relay.url();
    let someone = oonode::Identity::generate().address().to_string();
    let unknown_issuer = [
        "wss://127.0.0.1:",
        "TLS: the certificate is not trusted (unknown issuer)",
        "--relay-ca FILE",
    ];

    // A CA that did not sign it, or only the public roots: not trusted.
    for options in [
        ConnectOptions::default()
            .relay(&url)
            .relay_ca(&pki.other_ca),
        ConnectOptions::default().relay(&url),
    ] {
        let e = call(&someone, options.via(Via::Relay)).await.unwrap_err();
        assert_one_line(&e, &unknown_issuer);
        assert_eq!(e.exit_code(), 3, "{e}");
    }
    // Auto mode fails the same way (its https:// directory first, then the relay).
    let options = ConnectOptions::default()
        .relay(&url)
        .relay_ca(&pki.other_ca);
    let e = call(&someone, options).await.unwrap_err();
    assert_one_line(
        &e,
        &["TLS: the certificate is not trusted (unknown issuer)"],
    );

    // Plain ws:// to the TLS port: a hint, not a parser's complaint.
    let plain = url.replacen("wss://", "ws://", 1);
    let options = ConnectOptions::default().relay(&plain).via(Via::Relay);
    let e = call(&someone, options).await.unwrap_err();
    assert_one_line(&e, &["a TLS port? then use wss://"]);

    // A node's link to the relay says the same in its status.
    let home = tempfile::tempdir().unwrap();
    let node = Host::new(Shout)
        .relay_ca(&pki.other_ca)
        .relay_url(Some(url.clone()))
        .co_dir(home.path())
        .http(false)
        .p2p(false)
        .build()
        .unwrap()
        .spawn()
        .await
        .unwrap();
    common::wait_until("the link's error", STEP, || async {
        node.relay_status()
            .and_then(|s| s.last_error)
            .is_some_and(|e| e.contains("TLS: the certificate is not trusted"))
    })
    .await;
    tokio::time::timeout(STEP, node.shutdown())
        .await
        .unwrap()
        .unwrap();

    // A certificate for another name, from the right CA.
    let elsewhere =
        start_relay(relay_config().tls(&pki.other_name_cert, &pki.other_name_key)).await;
    let options = ConnectOptions::default()
        .relay(elsewhere.url())
        .relay_ca(&pki.ca)
        .via(Via::Relay);
    let e = call(&someone, options).await.unwrap_err();
    assert_one_line(
        &e,
        &["TLS: the certificate is for another name (it is for other.example, not 127.0.0.1)"],
    );

    // A CA file that is not there: named, before any path is tried (exit status 2).
    let missing = pki.ca.with_file_name("missing.pem");
    let options = ConnectOptions::default().relay(&url).relay_ca(&missing);
    let e = call(&someone, options).await.unwrap_err();
    assert_one_line(&e, &["cannot read", &missing.display().to_string()]);
    assert_eq!(e.exit_code(), 2);

    relay.shutdown().await;
    elsewhere.shutdown().await;
}

#[tokio::test]
async fn the_nodes_own_https_port_serves_health_and_direct_calls() {
    let pki = pki();
    let node = TestNode::builder(Host::new(Shout).tls(&pki.cert, &pki.key))
        .start()
        .await;
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    assert!(node.ws_url().starts_with("wss://127.0.0.1:"));

    let res = https_client(&pki.ca)
        .get(format!("{}/health", node.url))
        .send()
        .await
        .expect("GET /health over https");
    assert_eq!(res.status(), 200);

    // Without the CA the certificate is not trusted; plain HTTP gets no answer.
    let err = common::client()
        .get(format!("{}/health", node.url))
        .send()
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    let plain = node.url.replacen("https://", "http://", 1);
    assert!(common::client()
        .get(format!("{plain}/health"))
        .send()
        .await
        .is_err());

    // A caller that trusts the CA calls it at its https:// endpoint.
    let options = ConnectOptions::default()
        .endpoint(&node.url)
        .relay_ca(&pki.ca)
        .via(Via::Direct);
    let (result, path) = call(&node.address.to_string(), options)
        .await
        .expect("a direct call over https and wss");
    assert_eq!(
        (result.as_str(), path.as_str()),
        ("HELLO OVER TLS", "direct")
    );
    node.stop().await;
}

/// Opens a TCP connection to `addr`, sends the start of a ClientHello and then nothing;
/// returns how long the server took to close it.
async fn stall_handshake(addr: std::net::SocketAddr) -> Duration {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    // A TLS record header for a handshake message, and no more.
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(HANDSHAKE_LIMIT, tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the server closed a stalled handshake within {HANDSHAKE_LIMIT:?}: {read:?}"
    );
    start.elapsed()
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_closed_and_others_are_served() {
    let pki = pki();
    let node = TestNode::builder(Host::new(Shout).tls(&pki.cert, &pki.key))
        .start()
        .await;
    let relay = start_relay(relay_config().tls(&pki.cert, &pki.key)).await;
    let https = https_client(&pki.ca);

    let node_addr = node.handle.http_addr().unwrap();
    let stalled = tokio::spawn(stall_handshake(node_addr));
    let relay_stalled = tokio::spawn(stall_handshake(relay.local_addr()));
    // A silent one too, that sends no byte at all.
    let silent = tokio::net::TcpStream::connect(node_addr).await.unwrap();

    // Meanwhile both serve everyone else.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for url in [
        format!("{}/health", node.url),
        format!("{}/health", relay.ready().http),
    ] {
        let res = https
            .get(&url)
            .send()
            .await
            .expect("served while one stalls");
        assert_eq!(res.status(), 200, "{url}");
    }

    let took = stalled.await.unwrap();
    assert!(took >= Duration::from_secs(5), "closed after {took:?}");
    relay_stalled.await.unwrap();
    let mut silent = silent;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(HANDSHAKE_LIMIT, silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    // And still serve afterwards.
    let res = https
        .get(format!("{}/health", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    node.stop().await;
    relay.shutdown().await;
}

/// Runs `oonode ARGS` to its end: exit status, stdout, stderr.
async fn oonode(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_binary_relays_over_wss_and_calls_with_relay_ca() {
    let pki = pki();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--ready-json", "--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &path(&pki.cert), "--tls-key", &path(&pki.key)])
        .env("RUST_LOG", "error");
    let relay = Child::spawn("relay", &mut cmd, Stderr::Inherit);
    let ready = relay.ready_async(STEP).await;
    let url = ready["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("wss://127.0.0.1:"), "{ready}");
    assert!(ready["http"].as_str().unwrap().starts_with("https://"));

    // The real binary on both ends: `oonode host --relay wss://… --relay-ca FILE`.
    let node_dir = tempfile::tempdir().unwrap();
    let node = common::NodeProc::builder(node_dir.path())
        .relay(&url)
        .args(&["--agent", "echo", "--relay-ca", &path(&pki.ca)])
        .start_async()
        .await;
    let address = node.address.to_string();
    let co = tempfile::tempdir().unwrap();
    let call_args = |ca: &Path| -> Vec<String> {
        [
            "call",
            &address,
            "hello over tls",
            "--via",
            "relay",
            "--relay",
            &url,
            "--relay-ca",
            &path(ca),
            "--co-dir",
            &path(co.path()),
        ]
        .map(String::from)
        .to_vec()
    };
    let (code, out, err) = oonode(call_args(&pki.ca)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "hello over tls");

    let (code, _, err) = oonode(call_args(&pki.other_ca)).await;
    eprint!("oonode call with another CA: {err}");
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("TLS: the certificate is not trusted (unknown issuer)"),
        "{err}"
    );

    // A CA file that is not there, and half a certificate pair: refused at once (2).
    let mut missing = call_args(&pki.ca);
    missing[8] = path(&pki.ca.with_file_name("missing.pem"));
    let (code, _, err) = oonode(missing).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.pem"), "{err}");
    let (code, _, err) = oonode(
        [
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &path(&pki.cert),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-key"), "{err}");
    drop(node); // kill-on-drop: the child is ended by its own handle
}
