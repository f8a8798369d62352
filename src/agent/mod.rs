//! The agent API: what a hosted agent implements, how each request gets a fresh instance,
//! the built-in example agents (`echo`, `translator`, `ticker`, in `builtin.rs`), agents
//! that are programs of their own, spoken to in JSON Lines (`exec.rs`), and agents that
//! live elsewhere: behind an HTTP endpoint (`forward.rs`) or an OpenAI-compatible API
//! (`llm.rs`), with what those two share in `upstream.rs`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::identity::Address;
use crate::proto::ErrorCode;

/// What an agent run returns on failure; any error type converts into it with `?`.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// One message of a session's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A file attached to a request, already saved under the node's co_dir.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub name: String,
    pub size: u64,
    pub path: std::path::PathBuf,
}

/// Everything an agent gets for one turn.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Turn {
    pub prompt: String,
    pub session_id: String,
    /// Earlier turns of this session, oldest first (not including `prompt`).
    pub history: Vec<Message>,
    pub files: Vec<Attachment>,
    /// The verified caller, if the request was signed.
    pub caller: Option<Address>,
    /// How many agents this request has already passed through: 0 from a person or a
    /// script, one more for each agent that called on while answering (the INPUT's
    /// signed `hops`). A call made for this turn carries `hops + 1`; a node refuses a
    /// request past [`MAX_HOPS`](crate::proto::MAX_HOPS), so loops of agents end.
    pub hops: u32,
    /// The node's way to call other agents for this turn; `None` outside a node.
    pub(crate) peers: Option<PeerLink>,
}

impl Turn {
    /// A turn of `prompt` in session `session_id`, with no history, files or caller:
    /// for running an agent outside a node (tests, a REPL of one's own).
    pub fn new(prompt: impl Into<String>, session_id: impl Into<String>) -> Turn {
        Turn {
            prompt: prompt.into(),
            session_id: session_id.into(),
            history: Vec::new(),
            files: Vec::new(),
            caller: None,
            hops: 0,
            peers: None,
        }
    }
}

/// A call to another agent that an agent makes through its node, for one turn.
#[derive(Debug, Clone)]
pub(crate) struct PeerCall {
    pub to: String,
    pub prompt: String,
    /// Continue this session of the callee (one this node opened there before).
    pub session_id: Option<String>,
    /// The calling turn's hops + 1.
    pub hops: u32,
}

/// The callee's verified answer.
#[derive(Debug, Clone)]
pub(crate) struct PeerAnswer {
    pub result: String,
    pub session_id: String,
    /// The path it went by: `direct`, `p2p` or `relay`.
    pub via: &'static str,
}

/// Why a call failed: a wire code (the callee's, or one the node chose) and a message.
#[derive(Debug, Clone)]
pub(crate) struct PeerFailure {
    pub code: ErrorCode,
    pub message: String,
}

/// Calls other agents with the node's own identity, over the node's own paths. Defined
/// here and implemented by the node, so that agents need not know how nodes connect.
#[async_trait]
pub(crate) trait Peers: Send + Sync {
    async fn call(&self, call: PeerCall) -> Result<PeerAnswer, PeerFailure>;
}

/// A shared [`Peers`], as a [`Turn`] carries it.
#[derive(Clone)]
pub(crate) struct PeerLink(pub(crate) Arc<dyn Peers>);

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerLink")
    }
}

/// Where an agent writes STREAM chunks; each becomes a signed, numbered STREAM envelope.
/// Bounded: a slow reader slows the agent down instead of growing a buffer.
#[derive(Clone)]
pub struct StreamSink {
    tx: mpsc::Sender<String>,
}

impl StreamSink {
    /// A sink whose chunks go to `tx`: for running an agent outside a node (a node
    /// makes its own for each run).
    pub fn new(tx: mpsc::Sender<String>) -> Self {
        StreamSink { tx }
    }

    /// Sends one chunk. Never fails: once nobody listens, chunks are dropped.
    pub async fn send(&self, chunk: impl Into<String>) {
        let _ = self.tx.send(chunk.into()).await;
    }
}

/// A hosted agent. Each request runs on a fresh instance (see [`AgentFactory`]), so
/// `&mut self` state never leaks between requests.
#[async_trait]
pub trait Agent: Send + 'static {
    /// Shown in the banner, `/health` and `/info`.
    fn name(&self) -> String;

    /// Tool names listed by `/info`.
    fn tools(&self) -> Vec<String> {
        Vec::new()
    }

    /// One line on what the agent does, for `/info`, the `/docs` page, the relay's
    /// directory and the swarm's presence records (`oonode peers`). A `summary` in
    /// host.yaml or [`Host::summary`](crate::Host::summary) takes its place.
    fn summary(&self) -> Option<String> {
        None
    }

    /// A few prompts that show what the agent can do: `/info` lists them and the `/docs`
    /// page offers them as one-click suggestions. `examples` in host.yaml or
    /// [`Host::examples`](crate::Host::examples) take their place (unless empty).
    fn examples(&self) -> Vec<String> {
        Vec::new()
    }

    /// Answers one turn; chunks sent to `stream` reach streaming callers as they come.
    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError>;
}

/// Makes a fresh agent for every request: the seed's "deep copy per request".
#[derive(Clone)]
pub struct AgentFactory(Arc<dyn Fn() -> Box<dyn Agent> + Send + Sync>);

impl AgentFactory {
    /// A factory from a closure that builds a new agent each call.
    pub fn new<A, F>(make: F) -> Self
    where
        A: Agent,
        F: Fn() -> A + Send + Sync + 'static,
    {
        AgentFactory(Arc::new(move || Box::new(make()) as Box<dyn Agent>))
    }

    /// A factory that clones a template agent for every request.
    pub fn from_clone<A: Agent + Clone + Sync>(template: A) -> Self {
        AgentFactory::new(move || template.clone())
    }

    pub fn make(&self) -> Box<dyn Agent> {
        (self.0)()
    }
}

mod builtin;
mod exec;
mod forward;
mod llm;
mod upstream;

pub use builtin::{builtin, Echo, Ticker, Translator, BUILTIN_AGENTS};
pub use exec::{ExecAgent, ExecConfig, ExecError, MAX_LINE_BYTES};
pub use forward::{
    Forward, ForwardConfig, ForwardConfigError, DEFAULT_FORWARD_RETRIES, DEFAULT_FORWARD_TIMEOUT,
    MAX_FORWARD_RETRIES,
};
pub use llm::{
    ApiKey, Llm, LlmConfig, DEFAULT_API_KEY_ENV, DEFAULT_LLM_TIMEOUT, MAX_LLM_RETRIES,
    MAX_RETRY_AFTER,
};
pub use upstream::{Upstream, UpstreamError, MAX_ANSWER_BYTES};
