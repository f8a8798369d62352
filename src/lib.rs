//! # oonode
//!
//! Makes an agent reachable on the network with one call. A node's identity is an
//! ed25519 key whose public half is its `0x…` [`Address`]; every message is a signed
//! [`Envelope`] (INPUT, STREAM, OUTPUT, ERROR), and every transport hands envelopes to
//! one [`Dispatcher`] that verifies, applies trust, admits, runs the agent on a fresh
//! instance, persists the session and replies.
//!
//! # Using it as a library
//!
//! oonode is not on crates.io: depend on it by path (or by `git = "…"` with the URL of
//! the repository you cloned), with tokio for the runtime:
//!
//! ```toml
//! [dependencies]
//! oonode = { path = "../oonode" }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! Host an agent of your own (HTTP and `/docs` on port 8000, the libp2p swarm, a relay if
//! `.co/host.yaml` names one), or, given an address and a swarm peer, call an agent by
//! address:
//!
//! ```no_run
//! use oonode::{Agent, AgentError, ConnectOptions, Host, Multiaddr, StreamSink, TrustLevel, Turn};
//!
//! /// Each request gets a fresh clone, so nothing leaks between callers.
//! #[derive(Clone)]
//! struct Shout;
//!
//! #[oonode::async_trait]
//! impl Agent for Shout {
//!     fn name(&self) -> String {
//!         "shout".into()
//!     }
//!
//!     // What /info, /docs, the relay and the swarm say about it.
//!     fn summary(&self) -> Option<String> {
//!         Some("I repeat what you say, louder.".into())
//!     }
//!
//!     fn examples(&self) -> Vec<String> {
//!         vec!["hello there".into(), "is anyone listening?".into()]
//!     }
//!
//!     async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
//!         stream.send("thinking… ").await; // a signed, numbered STREAM chunk
//!         Ok(turn.prompt.to_uppercase())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut args = std::env::args().skip(1);
//!     if let (Some(address), Some(peer)) = (args.next(), args.next()) {
//!         // `shout 0x… /ip4/…/udp/4001/quic-v1/p2p/12D3KooW…`: join the swarm through
//!         // that peer and call the agent with that address (`.relay(url)` works too).
//!         let peer: Multiaddr = peer.parse()?;
//!         let options = ConnectOptions::default().bootstrap(peer);
//!         let mut remote = oonode::connect(&address, options).await?;
//!         let answer = remote.input("Translate hello to Spanish").await?;
//!         println!("{} answered: {}", remote.address(), answer.result);
//!         return Ok(());
//!     }
//!     Host::new(Shout).trust(TrustLevel::Careful).port(8000).serve().await?;
//!     Ok(())
//! }
//! ```
//!
//! `examples/` has more: a custom agent with a tool, the translator of the ConnectOnion
//! `host()` page, and an agent that calls another agent while it answers.
//!
//! # Layout
//!
//! Read top to bottom: each layer depends only on the layers above it.
//!
//! | module | what lives there |
//! | --- | --- |
//! | `identity.rs` | keys, [`Address`], PeerId conversion, key file, co_dir lookup |
//! | `envelope.rs` | envelope shapes, canonical JSON (forms A and B), sign/verify, freshness, replay keys (no I/O) |
//! | `proto/` | the wire (no I/O): typed frames per link (`frame.rs`), [`proto::ErrorCode`] (`error.rs`), ANNOUNCE (`announce.rs`), [`proto::RelayUrl`] and the relay's routes (`relay_url.rs`), signed HTTP reads (`signed_request.rs`) |
//! | `metrics.rs` | what a node and a relay count for `/metrics` (prometheus-client, one registry per instance; libp2p's own metrics and the store's log syncs join the node's), the request's `Transport`, route and outcome labels |
//! | `net.rs` | socket helpers shared by the node and the relay server: TCP_NODELAY, a listener capped per client IP, WebSocket read errors, SIGINT/SIGTERM |
//! | `tls.rs` | rustls for both sides: what a client trusts (public roots plus an optional CA file), what a server presents (PEM chain and key), dialing `wss://`, a failed handshake as one sentence, a listener that handshakes with a timeout |
//! | `agent/` | the [`Agent`] trait (with its own summary and examples), [`AgentFactory`] (a fresh agent per request), [`Turn`] and the `Peers` link through which a turn calls other agents (implemented by `node/`) in `mod.rs`; built-ins `echo`, `translator`, `ticker` in `builtin.rs`; `exec.rs`: a program in any language as the agent, a pool of child processes speaking JSON Lines ([`agent::ExecAgent`], docs/agent-protocol.md); an agent behind an HTTP endpoint (`forward.rs`, `--forward`) and a model behind an OpenAI-compatible API (`llm.rs`, `--agent llm`), sharing SSE decoding, backoff and errors (`upstream.rs`) |
//! | `store/` | sled (`mod.rs`: sessions, seen ids, kept replies, trust state; jobs run one at a time on the callers' own threads, whoever finds the lock free running every queued job; one waiting job syncs the log for every job waiting then (group commit); the `Durability` modes), the in-memory layer over each sled tree that jobs write to and checkpoints move into sled (`layer.rs`), sled trees holding their entries packed in chunks, a sled key per chunk (`packed.rs`), the write-ahead log every change goes to first and that a start replays (`wal.rs`), session histories as appended messages and the hot ones in memory (`history.rs`), the index of session metadata that listings, start-up and the sweeper read instead of the records, and listing cursors (`index.rs`), attached files (`uploads.rs`) |
//! | `trust/` | trust levels, address lists (`lists.rs`), policies (`policy.rs`), the decision, onboarding and admin actions (`engine.rs`), wrong invite codes (`invites.rs`) |
//! | `dispatch/` | the [`Dispatcher`]: verify → trust → admit → run → stream → persist → reply (`mod.rs`); signatures, CONNECT, signed reads, admin (`access.rs`); whose sessions (`scope.rs`); refusals and their answers (`refusal.rs`); one run (`run.rs`); a turn's session state (`turn.rs`); RESUME (`follow.rs`) |
//! | `transport/` | the ways in, each knowing the dispatcher and never the reverse: `http.rs` (the seed's API, `/docs`, origins), `ws.rs` (`/ws`), `relay_link.rs` (the node's outbound link to a relay, moving to its fallbacks), `p2p/` (the libp2p swarm: `handle.rs`, `behaviour.rs`, `event_loop.rs`, `serve.rs`, presence and home-relay records in `record.rs` (checks) and `presence.rs` (publish, look up), per-IP limits in `ip_limits.rs`, NAT traversal (AutoNAT, circuit reservations, DCUtR) and each connection's path in `nat.rs`, bootstrap names in `dns.rs`, the CBOR `wire.rs`) |
//! | `relay_server/` | the relay server (`mod.rs`: state, router, directory, limits): agent connections (`agent.rs`), caller connections (`caller.rs`), what both share (`conn.rs`), federation with other relays through the DHT: home-relay records, passing callers on (`federation.rs`) |
//! | `client/` | [`connect()`]: the ways to an agent and the choice among them (`path.rs`), one verified turn (`call.rs`) |
//! | `config.rs` | `host.yaml` + code parameters → [`HostConfig`] |
//! | `node/` | the [`Host`] builder, [`host()`], [`router()`] (`mod.rs`); opening and starting a [`Node`] (`start.rs`); the running [`NodeHandle`], banner, [`Ready`] line and shutdown (`handle.rs`); agents' calls to other agents with the node's key and paths (`peers.rs`) |
//! | `fuzzing.rs` | hidden hooks for the fuzz targets in `fuzz/` (the decoders the public API does not reach) |
//! | `main.rs`, `cli/` | the binary, not the library: `main.rs` launches, `cli/` holds one file per command and `testnet/` (a relay and N nodes as local processes) |
//!
//! The wire forms and test vectors are in `docs/protocol.md`; what an exec agent (a
//! program hosted with `oonode host --exec`) reads and writes is in
//! `docs/agent-protocol.md`.

pub mod agent;
mod client;
mod config;
mod dispatch;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod metrics;
mod net;
mod node;
pub mod proto;
mod relay_server;
mod store;
mod tls;
mod transport;
pub mod trust;

pub use agent::{Agent, AgentError, AgentFactory, StreamSink, Turn};
/// For implementing [`Agent`] without depending on `async-trait` directly.
pub use async_trait::async_trait;
pub use client::{connect, Answer, CallError, ConnectOptions, Remote, Via};
pub use config::{
    AgentSettings, ConfigError, ForwardSettings, HostConfig, LlmSettings, Settings,
    HOST_YAML_TEMPLATE,
};
pub use dispatch::{
    Accepted, Dispatcher, Origin, Reader, Refusal, Rejected, Scope, SessionSecret, SignedRead,
    Submission, Transport,
};
pub use ed25519_dalek::Signature;
pub use envelope::{Envelope, Kind};
pub use identity::{find_co_dir, Address, AddressError, Identity};
/// The swarm's addresses, as [`ConnectOptions::bootstrap`] takes them.
pub use libp2p::Multiaddr;
pub use node::{host, router, Host, HostError, Node, NodeHandle, Ready};
pub use relay_server::{Relay, RelayConfig, RelayError, RelayHandle, RelayReady};
pub use store::{
    BadCursor, Durability, PageCursor, SessionMeta, SessionPage, SessionRecord, SessionStatus,
    Upload, UploadError,
};
pub use tls::TlsError;
pub use transport::p2p::{
    CircuitLimits, ConnPath, NatMode, P2p, P2pConfig, P2pError, PeerPresence, SwarmStatus,
};
pub use transport::relay_link::{LinkState, RelayStatus};
pub use trust::{Policy, TrustAgent, TrustLevel, TrustQuestion};

/// The README's Rust example, compiled by `cargo test --doc` like the one above.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
