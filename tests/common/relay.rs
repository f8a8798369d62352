//! Test relays, two ways: in-process through [`Relay::spawn`] and as a child process of
//! the real binary (a [`RelayProc`]), both on 127.0.0.1.

use std::process::Command;

use oonode::{Relay, RelayConfig, RelayHandle};

use super::proc::{Child, Stderr, BIN};
use super::STEP;

/// A relay config listening on 127.0.0.1, port 0.
pub fn relay_config() -> RelayConfig {
    RelayConfig::default().listen("127.0.0.1:0".parse().unwrap())
}

/// Starts an in-process relay, bounded by a step.
pub async fn start_relay(config: RelayConfig) -> RelayHandle {
    tokio::time::timeout(STEP, Relay::spawn(config))
        .await
        .expect("relay start timed out")
        .expect("relay starts")
}

/// `oonode relay` as a child process, killed (by its own handle) when dropped.
pub struct RelayProc {
    pub child: Child,
    /// `ws://127.0.0.1:PORT`.
    pub url: String,
}

impl RelayProc {
    /// `oonode relay --listen 127.0.0.1:PORT --ready-json` (`port` 0: any), once ready.
    pub async fn start(port: u16) -> RelayProc {
        let mut cmd = Command::new(BIN);
        cmd.args(["relay", "--ready-json", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "error");
        let child = Child::spawn("relay", &mut cmd, Stderr::Inherit);
        let ready = child.ready_async(STEP).await;
        let url = ready["url"]
            .as_str()
            .expect("the ready line has a url")
            .to_owned();
        RelayProc { child, url }
    }

    /// kill -9, then reap.
    pub fn kill9(&mut self) {
        self.child.kill9();
    }
}
