//! # oonode
//!
//! Makes an agent reachable on the network with one call. A node's identity is an
//! ed25519 key whose public half is its `0x…` [`Address`]; every message is a signed
//! [`Envelope`] (INPUT, STREAM, OUTPUT, ERROR), and every transport hands envelopes to
//! one [`Dispatcher`] that verifies, applies trust, admits, runs the agent on a fresh
//! instance, persists the session and replies.
//!
//! ```no_run
//! # async fn demo() -> Result<(), oonode::HostError> {
//! use oonode::{agent::Translator, Host, TrustLevel};
//! Host::new(Translator).trust(TrustLevel::Careful).port(8000).serve().await
//! # }
//! ```
//!
//! # Layout
//!
//! | file | what lives there |
//! | --- | --- |
//! | `identity.rs` | keys, [`Address`], PeerId conversion, key file, co_dir lookup |
//! | `envelope.rs` | envelope shapes, canonical JSON (form A), sign/verify, freshness, replay keys (no I/O) |
//! | `agent.rs` | the [`Agent`] trait, [`AgentFactory`] (a fresh agent per request), built-in `echo` and `translator` |
//! | `dispatch.rs` | the [`Dispatcher`]: verify → trust → admit → run → stream → persist → reply |
//! | `trust/` | trust levels and address lists; the seam for policies |
//! | `store.rs` | sled: sessions and seen message ids, TTL sweep, restart → `interrupted` |
//! | `config.rs` | `host.yaml` + code parameters → [`HostConfig`] |
//! | `host.rs` | [`Host`] builder, [`host()`], [`router()`], banner, graceful shutdown |
//! | `transport/` | ways in: `http.rs` (the seed's API, `/docs`), `ws.rs` (`/ws`), `relay.rs` (the outbound link to a relay), `p2p/` (the libp2p swarm and its CBOR wire); transports know the dispatcher, never the reverse |
//! | `relay/` | the relay server: announce, routing by address and session, directory, limits |
//! | `client.rs` | [`connect()`]: call a peer by address (direct, swarm or relay), verifying every reply |
//! | `main.rs`, `cli/` | the binary, not the library: `main.rs` launches, `cli/` holds the commands (`oonode host`, `relay`, `call`, `peers`, `trust`, `init`, `keys`, and `testnet/`: a relay and N nodes as local processes, for trying and testing) |
//!
//! The wire forms and test vectors are in `docs/protocol.md`.

pub mod agent;
mod client;
mod config;
mod dispatch;
pub mod envelope;
mod identity;
mod net;
mod node;
pub mod proto;
mod relay_server;
mod store;
mod transport;
pub mod trust;

pub use agent::{Agent, AgentError, AgentFactory, StreamSink, Turn};
/// For implementing [`Agent`] without depending on `async-trait` directly.
pub use async_trait::async_trait;
pub use client::{connect, Answer, CallError, ConnectOptions, Remote, Via};
pub use config::{ConfigError, HostConfig, Settings, HOST_YAML_TEMPLATE};
pub use dispatch::{Accepted, Dispatcher, Refusal, Rejected, SignedRead, Submission};
pub use ed25519_dalek::Signature;
pub use envelope::{Envelope, Kind};
pub use identity::{find_co_dir, Address, AddressError, Identity};
pub use node::{host, router, Host, HostError, Node, NodeHandle, Ready};
pub use relay_server::{Relay, RelayConfig, RelayHandle, RelayReady};
pub use store::{SessionRecord, SessionStatus, Upload, UploadError};
pub use transport::p2p::{P2p, P2pConfig, PeerPresence, SwarmStatus};
pub use transport::relay_link::{LinkState, RelayStatus};
pub use trust::{Policy, TrustAgent, TrustLevel, TrustQuestion};
