//! `oonode call`: one call by address, chunks to stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use oonode::{find_co_dir, Identity};

#[derive(clap::Args)]
pub(crate) struct CallArgs {
    /// The agent's address (0x + 64 hex).
    address: String,
    /// The prompt to send.
    prompt: String,
    /// Which way to reach it. auto: what worked lately, else a direct endpoint that
    /// proves to be the agent, else the swarm, else the relay.
    #[arg(long, value_enum, default_value = "auto")]
    via: oonode::Via,
    /// Relay to reach the agent through (ws://host:port); its directory also tells the
    /// agent's direct endpoints.
    #[arg(long, value_name = "URL", env = "OONODE_RELAY", value_parser = super::relay_url)]
    relay: Option<String>,
    /// Trust this CA (a PEM file) besides the public roots, for a wss:// relay, its
    /// https:// directory and the agent's https:// endpoints: a private or self-signed
    /// certificate's.
    #[arg(long, value_name = "FILE", env = "OONODE_RELAY_CA", value_parser = super::pem_file)]
    relay_ca: Option<PathBuf>,
    /// Swarm peer to join through (repeatable): a multiaddr ending in /p2p/<PeerId>.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", value_parser = super::peer_multiaddr)]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// The agent's own HTTP endpoint, if known (repeatable): http://host:port or
    /// https://host:port.
    #[arg(long = "endpoint", value_name = "URL")]
    endpoints: Vec<String>,
    /// Use plaintext endpoints on private networks too (not only on loopback).
    #[arg(long)]
    allow_private: bool,
    /// Directory holding the caller's key (keys/agent.key), created if needed.
    #[arg(long)]
    co_dir: Option<PathBuf>,
    /// A file keeping the session between calls: read if present, written after.
    #[arg(long, value_name = "FILE")]
    session: Option<PathBuf>,
    /// Print the answer as JSON (result, session_id, chunks, path, duration_ms).
    #[arg(long)]
    json: bool,
    /// Say on stderr which path was used.
    #[arg(long, short)]
    verbose: bool,
    /// Seconds to wait for each next reply frame.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// What the chosen `--via` lacks, as the flag that gives it; `None` when there is a way
/// to try.
fn missing_path(args: &CallArgs) -> Option<&'static str> {
    let relay = args.relay.is_some();
    let swarm = !args.bootstrap.is_empty();
    let endpoint = !args.endpoints.is_empty();
    match args.via {
        oonode::Via::P2p if !swarm => Some(
            "--via p2p needs a swarm peer to join through: give --bootstrap MULTIADDR \
             (ending in /p2p/<PeerId>)",
        ),
        oonode::Via::Relay if !(relay || swarm) => Some(
            "--via relay needs a relay: give --relay ws://host:port (or set OONODE_RELAY), \
             or --bootstrap MULTIADDR to look up the agent's home relay in the swarm",
        ),
        oonode::Via::Direct if !(endpoint || relay || swarm) => Some(
            "--via direct needs the agent's endpoint: give --endpoint http://host:port \
             (or --relay / --bootstrap to look it up)",
        ),
        oonode::Via::Http if !(endpoint || relay || swarm) => Some(
            "--via http needs the agent's endpoint: give --endpoint http://host:port \
             (or --relay / --bootstrap to look it up)",
        ),
        oonode::Via::Auto if !(endpoint || relay || swarm) => Some(
            "no way to reach the agent: give --endpoint http://host:port, \
             --bootstrap MULTIADDR or --relay ws://host:port",
        ),
        _ => None,
    }
}

/// `oonode call`: streams chunks to stdout as they come, then the result; exit 0 on
/// success, else a one-line reason and the error's exit status.
pub(crate) async fn call(args: CallArgs) -> ExitCode {
    use std::io::Write;
    let fail = |msg: String, code: u8| {
        eprintln!("error: {msg}");
        ExitCode::from(code)
    };
    if let Some(missing) = missing_path(&args) {
        return fail(missing.into(), super::EXIT_USAGE);
    }
    let dir = match args.co_dir {
        Some(d) => d,
        None => find_co_dir(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))),
    };
    let identity = match Identity::load_or_create(&dir) {
        Ok((id, _)) => id,
        Err(e) => return fail(e.to_string(), 1),
    };
    let mut options = oonode::ConnectOptions::default()
        .identity(identity)
        .allow_private(args.allow_private)
        .reply_timeout(std::time::Duration::from_secs(args.timeout))
        .via(args.via);
    if let Some(relay) = args.relay {
        options = options.relay(relay);
    }
    if let Some(ca) = args.relay_ca {
        options = options.relay_ca(ca);
    }
    for url in args.endpoints {
        options = options.endpoint(url);
    }
    for addr in args.bootstrap.iter().cloned() {
        options = options.bootstrap(addr);
    }
    let saved = match &args.session {
        Some(file) if file.exists() => match std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            }) {
            Ok(v) => v["session_id"].as_str().map(str::to_owned),
            Err(e) => {
                return fail(
                    format!("cannot read session file {}: {e}", file.display()),
                    2,
                )
            }
        },
        _ => None,
    };
    let mut remote = match oonode::connect(&args.address, options).await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string(), e.exit_code()),
    };
    if args.verbose {
        eprintln!(
            "path: {}{}{}",
            remote.path(),
            remote
                .swarm_path()
                .map(|p| format!(", {p}"))
                .unwrap_or_default(),
            if remote.sealed() { " (sealed)" } else { "" }
        );
    }
    if let Some(id) = saved {
        remote.set_session_id(id);
    }
    let streaming = !args.json;
    let printed = std::cell::Cell::new(false);
    let answer = remote
        .input_streaming(&args.prompt, |chunk| {
            if streaming {
                let mut out = std::io::stdout();
                let _ = write!(out, "{chunk}");
                let _ = out.flush();
                printed.set(true);
            }
        })
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            if printed.get() {
                println!();
            }
            return fail(e.to_string(), e.exit_code());
        }
    };
    if let Some(file) = &args.session {
        let saved = serde_json::json!({"address": args.address, "session_id": answer.session_id});
        if let Err(e) = std::fs::write(file, saved.to_string()) {
            eprintln!("warning: cannot write session file {}: {e}", file.display());
        }
    }
    if args.json {
        let out = serde_json::json!({
            "result": answer.result,
            "session_id": answer.session_id,
            "chunks": answer.chunks,
            "duration_ms": answer.duration_ms,
            "path": remote.path(),
            "swarm_path": remote.swarm_path(),
            "sealed": remote.sealed(),
        });
        println!("{out}");
    } else if answer.chunks.concat() == answer.result {
        println!();
    } else {
        if !answer.chunks.is_empty() {
            println!();
        }
        println!("{}", answer.result);
    }
    ExitCode::SUCCESS
}
