//! Configuration: code parameters > `.co/host.yaml` > defaults.
//!
//! The file takes exactly the seed's keys, plus `bind`, `max_queue`, the swarm's
//! `p2p`, `listen`, `bootstrap`, `mdns`, TLS (`tls_cert`, `tls_key`, `relay_ca`), a
//! program to host as the agent (`agent:`, see [`AgentSettings`]) and the HTTP agents'
//! `forward:` and `llm:` blocks (all documented in the README); an unknown or ill-typed
//! key stops start-up with the file and key named.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::agent::{
    ApiKey, ExecConfig, ForwardConfig, LlmConfig, DEFAULT_API_KEY_ENV, MAX_FORWARD_RETRIES,
};
use crate::proto::RelayUrl;
use crate::store::Durability;
use crate::transport::p2p::{parse_multiaddr, P2pConfig};
use crate::trust::{
    AddressList, InviteCode, ListError, ListFile, ListFiles, Policy, Trust, TrustLevel,
};

pub const DEFAULT_PORT: u16 = 8000;
pub const DEFAULT_WORKERS: usize = 1;
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Open HTTP connections (WebSockets included) one client IP may hold.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 1536;
/// Open WebSockets one client IP may hold (of the node's 4096).
pub const DEFAULT_MAX_SOCKETS_PER_CLIENT: usize = 1024;
pub const DEFAULT_RESULT_TTL: u64 = 86_400;
pub const DEFAULT_MAX_FILE_SIZE_MB: u64 = 10;
pub const DEFAULT_MAX_FILES: usize = 10;
/// Bytes one run may stream, and the most its answer may hold.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Bytes of one prompt (a request's whole envelope is at most 1 MiB).
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 512 * 1024;
/// Messages of a session's history kept (the oldest go first).
pub const DEFAULT_MAX_HISTORY_MESSAGES: usize = 200;
/// Bytes of a session's history kept (the oldest messages go first).
pub const DEFAULT_MAX_HISTORY_BYTES: usize = 1024 * 1024;
/// MB of request bodies read at once (a larger body is read alone).
pub const DEFAULT_MAX_BODY_BUDGET_MB: usize = 48;
/// Room for a data URL's `data:<mime>;base64,` before the file's characters.
const DATA_URL_HEADER_SLACK: usize = 256;

/// The commented host.yaml `oonode init` writes: every key with its default.
pub const HOST_YAML_TEMPLATE: &str = r#"# .co/host.yaml: settings for `oonode host` (code parameters override these).
# Every key is shown with its default; uncomment to change. An unknown key stops start-up.

# Name shown in the banner, /health and /info (default: the agent's own name).
# name: translator

# What /info, the /docs page and the relay/swarm announce say about the agent
# (default: the agent's own summary and examples, if it has any).
# summary: I translate text between a few languages
# examples:
#   - "Translate 'hello' to Spanish"
#   - "What language is 'hola' in?"

# Web pages (origins) that may call this node's API from a browser; its own /docs page
# always may. Requests from any other page are refused (403).
# cors_origins: []

# Trust level: open (accept all), careful (unsigned accepted, a present signature must
# be valid), strict (a valid signature required).
# trust: careful

# Address lists: a file path (relative to this directory) or a list of addresses.
# Without them, whitelist.txt and blocklist.txt/blacklist.txt here are read if present.
# whitelist: whitelist.txt
# blacklist: blacklist.txt

# HTTP/WebSocket listener.
# port: 8000
# bind: 0.0.0.0
# Serve it over TLS (https://, wss://): a PEM certificate chain and its private key
# (paths relative to this directory). Both or neither.
# tls_cert: null
# tls_key: null

# Agent runs at once, and requests that may wait for one before "busy" (503).
# workers: 1
# max_queue: 256
# Open HTTP connections (WebSockets included) and WebSockets one client IP may hold.
# max_connections_per_client: 1536
# max_sockets_per_client: 1024

# Seconds a finished session is kept.
# result_ttl: 86400
# When the store answers: `batched` once a change is written to its log (a killed
# process loses nothing answered; the log is synced within 5 ms, so a machine crash
# can lose those; after one, messages signed before the restart are refused), or
# `sync` after the log's sync, shared by every concurrent turn.
# durability: batched

# Bytes one run may stream and the most its answer may hold; past it the run is
# stopped with an `output_too_large` error.
# max_output_bytes: 1048576
# Bytes of one prompt; a longer one is refused (413 too_large) as it arrives.
# max_prompt_bytes: 524288
# A session's history kept and shown to the agent: its newest messages, at most this
# many and this many bytes (older ones are dropped, oldest first).
# max_history_messages: 200
# max_history_bytes: 1048576
# MB of request bodies read at once: more waits (up to 5 s, then 503 busy); a larger
# body is read alone. Bounds the memory a burst of large uploads takes.
# max_body_budget_mb: 48

# Relay to announce on so the agent is reachable without an open port
# (ws://host:port or wss://host; empty or null: off).
# relay_url: ""
# Relays to move to, in turn, when the current one fails (federated relays find the
# agent wherever it is announced).
# relay_fallbacks: []
# A CA to trust (PEM, relative to this directory) besides the public ones, for a wss://
# relay whose certificate is private or self-signed; also used when this node's agent
# calls other agents.
# relay_ca: null

# Accepted for compatibility; a compiled agent does not reload.
# reload: false

# A program of your own as the agent (`oonode host --exec CMD` does the same): run as
# long-lived child processes that speak JSON Lines on stdin/stdout
# (docs/agent-protocol.md). The command is split into words like a shell would, but no
# shell runs it unless `shell: true`. `workers` (default: the `workers` above) is how
# many processes; `timeout_secs` bounds one turn, calls to other agents included.
# agent:
#   exec: python3 agent.py
#   workers: 1
#   env: {}
#   cwd: .
#   shell: false
#   timeout_secs: 300


# Where the key and the store live (default: this directory).
# co_dir: null

# Attachment limits: size of one file in MB, and files per request.
# max_file_size: 10
# max_files_per_request: 10

# libp2p swarm: join it, where to listen, peers to join through, LAN discovery.
# p2p: true
# Default port 4001 for QUIC and TCP (a free port instead, with a warning, when taken;
# ports given here are used or start-up fails). Port 0: a free port. p2p: false opens none.
# listen:
#   - /ip4/0.0.0.0/udp/4001/quic-v1
#   - /ip4/0.0.0.0/tcp/4001
# bootstrap: []          # multiaddrs ending in /p2p/<PeerId> (/dns4/host/… resolves)
# external_addrs: []     # where peers reach this node from outside (a port forward)
# nat: auto              # auto (AutoNAT decides), private (always reserve a circuit on
#                        # relay peers), public (never)
# mdns: false
# max_connections_per_ip: 16   # inbound swarm connections one IP may hold

# The agent, when `oonode host` names none (no --agent or --forward): a `forward:` or an
# `llm:` block hosts that agent (one of them, not both); without either, `translator`.
# Flags override single keys (--forward URL, --llm-base-url URL, --llm-model NAME).
#
# An agent behind an HTTP endpoint: each turn is POSTed to `url` as JSON
# {"prompt", "session_id", "messages", "caller"}; it answers {"result": "…"} or
# {"error": "…"}, or streams text/event-stream events (see the README).
# forward:
#   url: http://127.0.0.1:9000/agent
#   timeout_secs: 120       # one turn, retries and streaming included
#   retries: 2              # after connection errors only (at most 10)
#   headers: {}             # sent with every request, e.g. {Authorization: "Bearer …"}
#
# A model behind an OpenAI-compatible chat-completions API (OpenAI, Ollama's /v1,
# llama.cpp, vLLM). The API key is read from the environment variable named by
# api_key_env; unset or empty, no Authorization header is sent (local servers).
# llm:
#   base_url: http://localhost:11434/v1
#   model: llama3.2
#   api_key_env: OPENAI_API_KEY
#   system_prompt: ""       # the first message of every request, when not empty
#   temperature: null       # null: the server's default (0 to 2)
#   max_tokens: null        # null: the server's default
#   timeout_secs: 120       # one turn, retries and streaming included
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    List(#[from] ListError),
}

/// An address list given as a file path or inline addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ListSource {
    File(PathBuf),
    Addresses(Vec<String>),
}

/// Every configurable setting, each optional: used for both the code parameters and the
/// file, then resolved into a [`HostConfig`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    pub name: Option<String>,
    pub trust: Option<TrustSetting>,
    pub whitelist: Option<ListSource>,
    pub blacklist: Option<ListSource>,
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub workers: Option<usize>,
    pub max_queue: Option<usize>,
    /// Open HTTP connections (WebSockets included) one client IP may hold.
    pub max_connections_per_client: Option<usize>,
    /// Open WebSockets one client IP may hold.
    pub max_sockets_per_client: Option<usize>,
    pub result_ttl: Option<u64>,
    /// `sync` or `batched` (see [`Durability`]).
    pub durability: Option<String>,
    pub max_output_bytes: Option<usize>,
    pub max_prompt_bytes: Option<usize>,
    pub max_history_messages: Option<usize>,
    pub max_history_bytes: Option<usize>,
    pub max_body_budget_mb: Option<usize>,
    /// `Some(None)`: explicitly off (empty or null in the file).
    #[serde(default, deserialize_with = "relay_url")]
    pub relay_url: Option<Option<String>>,
    /// Relays to move to when the current one fails, in order.
    pub relay_fallbacks: Option<Vec<String>>,
    /// A CA (PEM) to trust for `wss://` relays besides the public roots.
    pub relay_ca: Option<PathBuf>,
    /// Serve HTTP over TLS with this PEM certificate chain (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    pub reload: Option<bool>,
    pub co_dir: Option<PathBuf>,
    pub summary: Option<String>,
    pub examples: Option<Vec<String>>,
    /// Web origins (`https://app.example`) whose pages may call the node's API from a
    /// browser; pages of the node itself always may.
    pub cors_origins: Option<Vec<String>>,
    pub max_file_size: Option<u64>,
    pub max_files_per_request: Option<usize>,
    /// Join the libp2p swarm (default true).
    pub p2p: Option<bool>,
    /// Swarm listen multiaddrs.
    pub listen: Option<Vec<String>>,
    /// Swarm bootstrap peers: multiaddrs ending in `/p2p/<PeerId>`.
    pub bootstrap: Option<Vec<String>>,
    /// Swarm addresses this node is reachable at from outside, advertised to peers.
    pub external_addrs: Option<Vec<String>>,
    /// `auto`, `public` or `private`: whether to reserve circuits on relay peers.
    pub nat: Option<String>,
    /// Find peers on the LAN by mDNS (default false).
    pub mdns: Option<bool>,
    /// Inbound swarm connections one IP may hold (default 16).
    pub max_connections_per_ip: Option<usize>,
    /// An agent behind an HTTP endpoint (`oonode host --forward URL`).
    pub forward: Option<ForwardSettings>,
    /// A model behind an OpenAI-compatible API (`oonode host --agent llm`).
    pub llm: Option<LlmSettings>,
    /// A program to host as the agent.
    pub agent: Option<AgentSettings>,
}

/// The `agent` key: a program of one's own as the agent (`oonode host --exec`), run as a
/// pool of child processes speaking JSON Lines (docs/agent-protocol.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AgentSettings {
    /// The command, split into words like a shell would (run without one).
    pub exec: Option<String>,
    /// Child processes (default: the node's `workers`, the agent runs it allows at once).
    pub workers: Option<usize>,
    /// Variables for the children, on top of the node's environment.
    pub env: Option<BTreeMap<String, String>>,
    /// The children's working directory (default: the node's; a relative one is taken
    /// from there too).
    pub cwd: Option<PathBuf>,
    /// Run `exec` with `sh -c`.
    pub shell: Option<bool>,
    /// Seconds one turn may take, calls to other agents included (default 300).
    pub timeout_secs: Option<u64>,
}

impl AgentSettings {
    /// Fills every unset field of `self` from `lower`.
    pub fn or(self, lower: AgentSettings) -> AgentSettings {
        AgentSettings {
            exec: self.exec.or(lower.exec),
            workers: self.workers.or(lower.workers),
            env: self.env.or(lower.env),
            cwd: self.cwd.or(lower.cwd),
            shell: self.shell.or(lower.shell),
            timeout_secs: self.timeout_secs.or(lower.timeout_secs),
        }
    }

    /// How to run the program, if one is named; `workers` is the node's `workers` setting
    /// (the pool follows it unless `agent.workers` is set). `origin` names where the
    /// settings came from, for errors.
    pub fn exec_config(
        &self,
        workers: Option<usize>,
        origin: &str,
    ) -> Result<Option<ExecConfig>, ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: origin.into(),
            message: format!("key `agent.{key}`: {message}"),
        };
        let Some(command) = &self.exec else {
            return Ok(None);
        };
        if command.trim().is_empty() {
            return Err(invalid("exec", "is empty"));
        }
        if !self.shell.unwrap_or(false) && shlex::split(command).is_none() {
            return Err(invalid(
                "exec",
                "cannot be split into words (an unclosed quote?)",
            ));
        }
        let mut config = ExecConfig::new(command.clone()).shell(self.shell.unwrap_or(false));
        config.workers = match self.workers {
            Some(0) => return Err(invalid("workers", "must be at least 1")),
            Some(n) => n,
            None => workers.unwrap_or(DEFAULT_WORKERS).max(1),
        };
        if let Some(secs) = self.timeout_secs {
            if secs == 0 {
                return Err(invalid("timeout_secs", "must be at least 1"));
            }
            config.timeout = std::time::Duration::from_secs(secs);
        }
        config.env = self.env.clone().unwrap_or_default().into_iter().collect();
        config.cwd = self.cwd.clone();
        Ok(Some(config))
    }
}

/// host.yaml's `forward:` block, each key optional until resolved.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ForwardSettings {
    pub url: Option<String>,
    pub timeout_secs: Option<u64>,
    pub retries: Option<u32>,
    pub headers: Option<BTreeMap<String, String>>,
}

impl ForwardSettings {
    /// Keys set here win over `lower`'s.
    pub fn or(self, lower: ForwardSettings) -> ForwardSettings {
        ForwardSettings {
            url: self.url.or(lower.url),
            timeout_secs: self.timeout_secs.or(lower.timeout_secs),
            retries: self.retries.or(lower.retries),
            headers: self.headers.or(lower.headers),
        }
    }

    /// The agent's configuration; `origin` names where the settings came from in errors.
    pub fn resolve(self, origin: &str) -> Result<ForwardConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.into(),
            message: format!("key `forward.{key}`: {message}"),
        };
        let url = self
            .url
            .ok_or_else(|| invalid("url", "required (the endpoint to POST each turn to)".into()))?;
        let mut config = ForwardConfig::new(http_url(&url).map_err(|e| invalid("url", e))?);
        if let Some(secs) = self.timeout_secs {
            config.timeout = seconds(secs).map_err(|e| invalid("timeout_secs", e))?;
        }
        if let Some(n) = self.retries {
            if n > MAX_FORWARD_RETRIES {
                return Err(invalid("retries", format!("at most {MAX_FORWARD_RETRIES}")));
            }
            config.retries = n;
        }
        for (name, value) in self.headers.unwrap_or_default() {
            config = config
                .header(&name, &value)
                .map_err(|e| invalid("headers", e.to_string()))?;
        }
        Ok(config)
    }
}

/// host.yaml's `llm:` block, each key optional until resolved.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LlmSettings {
    pub base_url: Option<String>,
    pub model: Option<String>,
    /// The environment variable holding the API key (default `OPENAI_API_KEY`); the key
    /// itself never goes in host.yaml.
    pub api_key_env: Option<String>,
    pub system_prompt: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub timeout_secs: Option<u64>,
}

impl LlmSettings {
    /// Keys set here win over `lower`'s.
    pub fn or(self, lower: LlmSettings) -> LlmSettings {
        LlmSettings {
            base_url: self.base_url.or(lower.base_url),
            model: self.model.or(lower.model),
            api_key_env: self.api_key_env.or(lower.api_key_env),
            system_prompt: self.system_prompt.or(lower.system_prompt),
            temperature: self.temperature.or(lower.temperature),
            max_tokens: self.max_tokens.or(lower.max_tokens),
            timeout_secs: self.timeout_secs.or(lower.timeout_secs),
        }
    }

    /// The agent's configuration, with the key read from the environment now;
    /// `origin` names where the settings came from in errors.
    pub fn resolve(self, origin: &str) -> Result<LlmConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.into(),
            message: format!("key `llm.{key}`: {message}"),
        };
        let base_url = self.base_url.ok_or_else(|| {
            invalid(
                "base_url",
                "required (the API base, e.g. http://localhost:11434/v1)".into(),
            )
        })?;
        let model = self
            .model
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| invalid("model", "required (the model's name)".into()))?;
        let mut config = LlmConfig::new(
            http_url(&base_url).map_err(|e| invalid("base_url", e))?,
            model,
        );
        let key_env = self
            .api_key_env
            .unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_owned());
        if key_env.is_empty() || key_env.contains(['=', '\0']) {
            return Err(invalid(
                "api_key_env",
                format!("{key_env:?} is not an environment variable's name"),
            ));
        }
        config.api_key = ApiKey::from_env(&key_env);
        config.system_prompt = self.system_prompt.filter(|p| !p.trim().is_empty());
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid("temperature", "must be between 0 and 2".into()));
            }
            config.temperature = Some(t);
        }
        if let Some(n) = self.max_tokens {
            if n == 0 {
                return Err(invalid("max_tokens", "must be at least 1".into()));
            }
            config.max_tokens = Some(n);
        }
        if let Some(secs) = self.timeout_secs {
            config.timeout = seconds(secs).map_err(|e| invalid("timeout_secs", e))?;
        }
        Ok(config)
    }
}

/// An `http://` or `https://` URL.
fn http_url(text: &str) -> Result<Url, String> {
    let url: Url = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" if url.host_str().is_some() => Ok(url),
        _ => Err(format!("{text:?} is not an http:// or https:// URL")),
    }
}

fn seconds(secs: u64) -> Result<Duration, String> {
    match secs {
        0 => Err("must be at least 1 second".into()),
        n => Ok(Duration::from_secs(n)),
    }
}

/// The `trust` key: a level, a policy (the seed's advanced mapping), or policy text
/// (YAML front matter + natural language) inline or in a file.
#[derive(Debug, Clone, PartialEq)]
pub enum TrustSetting {
    Level(TrustLevel),
    Policy(Policy),
    /// A policy text file, relative to co_dir.
    PolicyFile(PathBuf),
}

impl<'de> Deserialize<'de> for TrustSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_norway::Value::deserialize(d)? {
            serde_norway::Value::String(s) => {
                if let Ok(level) = s.parse() {
                    Ok(TrustSetting::Level(level))
                } else if s.trim().contains('\n') {
                    Policy::from_text(&s)
                        .map(TrustSetting::Policy)
                        .map_err(D::Error::custom)
                } else if s.ends_with(".md")
                    || s.ends_with(".txt")
                    || s.ends_with(".yaml")
                    || s.contains('/')
                {
                    Ok(TrustSetting::PolicyFile(PathBuf::from(s)))
                } else {
                    Err(D::Error::custom(format!(
                        "{s:?} is not a trust level (open, careful, strict), a policy, or a policy file"
                    )))
                }
            }
            v @ serde_norway::Value::Mapping(_) => Policy::from_mapping(v)
                .map(TrustSetting::Policy)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom(
                "expected a trust level, a policy mapping or policy text",
            )),
        }
    }
}

/// Invite codes may also come from the environment (comma-separated), so that they need
/// not sit in host.yaml.
pub const INVITE_CODES_ENV: &str = "OONODE_INVITE_CODES";

fn relay_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(Some(v.filter(|s| !s.trim().is_empty())))
}

impl Settings {
    /// Reads a host.yaml; a missing file is no settings at all.
    pub fn from_file(path: &Path) -> Result<Option<Settings>, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Settings::from_yaml(&text, &path.display().to_string()).map(Some)
    }

    pub fn from_yaml(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = if key == "." {
                e.into_inner().to_string()
            } else {
                // The YAML error may start with the key itself: say it once.
                let inner = e.into_inner().to_string();
                let inner = inner
                    .strip_prefix(&format!("{key}: "))
                    .unwrap_or(&inner)
                    .to_owned();
                format!("key `{key}`: {inner}")
            };
            ConfigError::Invalid {
                path: origin.into(),
                message,
            }
        })
    }

    /// Fills every unset field of `self` from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        // A pair, never half from the code and half from the file.
        let (tls_cert, tls_key) = if self.tls_cert.is_some() || self.tls_key.is_some() {
            (self.tls_cert, self.tls_key)
        } else {
            (lower.tls_cert, lower.tls_key)
        };
        Settings {
            name: self.name.or(lower.name),
            trust: self.trust.or(lower.trust),
            whitelist: self.whitelist.or(lower.whitelist),
            blacklist: self.blacklist.or(lower.blacklist),
            port: self.port.or(lower.port),
            bind: self.bind.or(lower.bind),
            workers: self.workers.or(lower.workers),
            max_queue: self.max_queue.or(lower.max_queue),
            max_connections_per_client: self
                .max_connections_per_client
                .or(lower.max_connections_per_client),
            max_sockets_per_client: self.max_sockets_per_client.or(lower.max_sockets_per_client),
            result_ttl: self.result_ttl.or(lower.result_ttl),
            durability: self.durability.or(lower.durability),
            max_output_bytes: self.max_output_bytes.or(lower.max_output_bytes),
            max_prompt_bytes: self.max_prompt_bytes.or(lower.max_prompt_bytes),
            max_history_messages: self.max_history_messages.or(lower.max_history_messages),
            max_history_bytes: self.max_history_bytes.or(lower.max_history_bytes),
            max_body_budget_mb: self.max_body_budget_mb.or(lower.max_body_budget_mb),
            relay_url: self.relay_url.or(lower.relay_url),
            relay_fallbacks: self.relay_fallbacks.or(lower.relay_fallbacks),
            relay_ca: self.relay_ca.or(lower.relay_ca),
            tls_cert,
            tls_key,
            reload: self.reload.or(lower.reload),
            co_dir: self.co_dir.or(lower.co_dir),
            summary: self.summary.or(lower.summary),
            examples: self.examples.or(lower.examples),
            cors_origins: self.cors_origins.or(lower.cors_origins),
            max_file_size: self.max_file_size.or(lower.max_file_size),
            max_files_per_request: self.max_files_per_request.or(lower.max_files_per_request),
            p2p: self.p2p.or(lower.p2p),
            listen: self.listen.or(lower.listen),
            bootstrap: self.bootstrap.or(lower.bootstrap),
            external_addrs: self.external_addrs.or(lower.external_addrs),
            nat: self.nat.or(lower.nat),
            mdns: self.mdns.or(lower.mdns),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            forward: match (self.forward, lower.forward) {
                (Some(high), Some(low)) => Some(high.or(low)),
                (high, low) => high.or(low),
            },
            llm: match (self.llm, lower.llm) {
                (Some(high), Some(low)) => Some(high.or(low)),
                (high, low) => high.or(low),
            },
            agent: match (self.agent, lower.agent) {
                (Some(a), Some(b)) => Some(a.or(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// The resolved configuration a node runs with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HostConfig {
    pub name: Option<String>,
    pub trust: Trust,
    pub port: u16,
    pub bind: IpAddr,
    pub workers: usize,
    pub max_queue: usize,
    /// Open HTTP connections (WebSockets included) one client IP may hold.
    pub max_connections_per_client: usize,
    /// Open WebSockets one client IP may hold.
    pub max_sockets_per_client: usize,
    pub result_ttl: u64,
    /// When the store answers a write.
    pub durability: Durability,
    /// Bytes one run may stream, and the most its answer may hold.
    pub max_output_bytes: usize,
    /// Bytes of one prompt.
    pub max_prompt_bytes: usize,
    /// A session's history kept: its newest messages, at most this many and this many
    /// bytes.
    pub max_history_messages: usize,
    pub max_history_bytes: usize,
    /// MB of request bodies read at once.
    pub max_body_budget_mb: usize,
    pub relay_url: Option<RelayUrl>,
    /// Relays the link moves to, in turn, when the current one fails (only with
    /// `relay_url`).
    pub relay_fallbacks: Vec<RelayUrl>,
    /// A CA file trusted besides the public roots for `wss://` relays (and the agent's
    /// own calls to other agents).
    pub relay_ca: Option<PathBuf>,
    /// The HTTP listener's certificate chain and key, when it serves TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// What the relay link trusts (public roots, plus `relay_ca`).
    pub(crate) relay_tls: Arc<rustls::ClientConfig>,
    /// The HTTP listener's TLS, loaded from `tls_cert` and `tls_key`.
    pub(crate) http_tls: Option<Arc<rustls::ServerConfig>>,
    pub reload: bool,
    pub co_dir: PathBuf,
    pub summary: Option<String>,
    pub examples: Vec<String>,
    /// Origins allowed to call the API from a browser, as `scheme://host[:port]`.
    pub cors_origins: Vec<String>,
    pub max_file_size_mb: u64,
    pub max_files_per_request: usize,
    /// The swarm's settings; `None` when `p2p: false`.
    pub p2p: Option<P2pConfig>,
}

impl HostConfig {
    /// Resolves settings against defaults. `co_dir` is where host.yaml was looked for;
    /// relative list paths are taken from there, and the default list files
    /// (`whitelist.txt`, `blocklist.txt`, `blacklist.txt`) are read from it when present.
    pub fn resolve(s: Settings, co_dir: &Path, origin: &str) -> Result<HostConfig, ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: origin.into(),
            message: format!("key `{key}`: {message}"),
        };
        let positive = |key: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(key, "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let workers = s.workers.unwrap_or(DEFAULT_WORKERS);
        if workers == 0 {
            return Err(invalid("workers", "must be at least 1"));
        }
        let max_file_size_mb = s.max_file_size.unwrap_or(DEFAULT_MAX_FILE_SIZE_MB);
        if max_file_size_mb == 0 {
            return Err(invalid("max_file_size", "must be at least 1 (MB)"));
        }
        let relay_url = match s.relay_url.flatten() {
            Some(url) => Some(
                url.parse::<RelayUrl>()
                    .map_err(|e| invalid("relay_url", &e.to_string()))?,
            ),
            None => None,
        };
        let relay_fallbacks = s
            .relay_fallbacks
            .unwrap_or_default()
            .iter()
            .map(|url| url.parse::<RelayUrl>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("relay_fallbacks", &e.to_string()))?;
        // Files are read now, so that a missing or bad one stops start-up naming its key.
        let in_co_dir = |p: PathBuf| if p.is_relative() { co_dir.join(p) } else { p };
        let relay_ca = s.relay_ca.map(in_co_dir);
        let relay_tls = crate::tls::client_config(relay_ca.as_deref())
            .map_err(|e| invalid("relay_ca", &e.to_string()))?;
        let (tls_cert, tls_key) = (s.tls_cert.map(in_co_dir), s.tls_key.map(in_co_dir));
        let http_tls = match (&tls_cert, &tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::server_config(cert, key).map_err(|e| {
                    // Name the key whose file is at fault.
                    let key_at_fault = match &e {
                        crate::tls::TlsError::Read { path, .. }
                        | crate::tls::TlsError::BadPem { path, .. } => path == key,
                        crate::tls::TlsError::NoKey { .. } => true,
                        _ => false,
                    };
                    let name = if key_at_fault { "tls_key" } else { "tls_cert" };
                    invalid(name, &e.to_string())
                })?)
            }
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_cert", "needs `tls_key` too")),
            (None, Some(_)) => return Err(invalid("tls_key", "needs `tls_cert` too")),
        };
        let result_ttl = s.result_ttl.unwrap_or(DEFAULT_RESULT_TTL);
        if result_ttl == 0 {
            return Err(invalid("result_ttl", "must be at least 1 second"));
        }
        let durability = match s.durability.as_deref() {
            None => Durability::default(),
            Some(text) => Durability::parse(text)
                .ok_or_else(|| invalid("durability", "must be `batched` or `sync`"))?,
        };
        let p2p =
            if s.p2p.unwrap_or(true) {
                let mut p2p = P2pConfig::default();
                let parse = |key: &str, items: Vec<String>| {
                    items
                        .iter()
                        .map(|a| parse_multiaddr(a).map_err(|e| invalid(key, &e.to_string())))
                        .collect::<Result<Vec<_>, _>>()
                };
                if let Some(listen) = s.listen {
                    p2p.listen = parse("listen", listen)?;
                    p2p.listen_fallback = false;
                }
                if let Some(bootstrap) = s.bootstrap {
                    p2p.bootstrap = parse("bootstrap", bootstrap)?;
                    if let Some(bad) = p2p.bootstrap.iter().find(|a| {
                        !matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_)))
                    }) {
                        return Err(invalid(
                            "bootstrap",
                            &format!("{bad} must end with /p2p/<PeerId>"),
                        ));
                    }
                }
                if let Some(external) = s.external_addrs {
                    p2p.external_addrs = parse("external_addrs", external)?;
                }
                if let Some(nat) = s.nat {
                    p2p.nat = nat.parse().map_err(|e: String| invalid("nat", &e))?;
                }
                p2p.mdns = s.mdns.unwrap_or(false);
                if let Some(n) = s.max_connections_per_ip {
                    if n == 0 {
                        return Err(invalid("max_connections_per_ip", "must be at least 1"));
                    }
                    p2p.max_connections_per_ip = n;
                }
                Some(p2p)
            } else {
                None
            };
        let data_dir = match s.co_dir {
            Some(p) if p.is_relative() => co_dir.join(p),
            Some(p) => p,
            None => co_dir.to_path_buf(),
        };
        let (level, mut policy) = match s.trust {
            None => (TrustLevel::default(), None),
            Some(TrustSetting::Level(l)) => (l, None),
            Some(TrustSetting::Policy(p)) => (TrustLevel::Careful, Some(p)),
            Some(TrustSetting::PolicyFile(path)) => {
                let path = co_dir.join(path);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "trust",
                        &format!("cannot read policy file {}: {e}", path.display()),
                    )
                })?;
                let p = Policy::from_text(&text)
                    .map_err(|e| invalid("trust", &format!("{}: {e}", path.display())))?;
                (TrustLevel::Careful, Some(p))
            }
        };
        if let (Some(p), Ok(codes)) = (policy.as_mut(), std::env::var(INVITE_CODES_ENV)) {
            for code in codes.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let code = InviteCode::new(code).map_err(|e| ConfigError::Invalid {
                    path: INVITE_CODES_ENV.into(),
                    message: e.to_string(),
                })?;
                p.onboard.invite_code.push(code);
            }
        }
        let (whitelist, wl_files, code_whitelist) =
            load_list(s.whitelist, co_dir, &["whitelist.txt"])?;
        let (blacklist, bl_files, code_blacklist) =
            load_list(s.blacklist, co_dir, &["blocklist.txt", "blacklist.txt"])?;
        let optional = |name: &str| {
            vec![ListFile {
                path: co_dir.join(name),
                required: false,
            }]
        };
        let trust = Trust {
            level,
            whitelist,
            blacklist,
            policy,
            files: ListFiles {
                whitelist: wl_files,
                blacklist: bl_files,
                contacts: optional("contacts.txt"),
                admins: optional("admins.txt"),
                code_whitelist,
                code_blacklist,
            },
        };
        Ok(HostConfig {
            name: s.name,
            trust,
            port: s.port.unwrap_or(DEFAULT_PORT),
            bind: s.bind.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            workers,
            max_queue: s.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            max_connections_per_client: positive(
                "max_connections_per_client",
                s.max_connections_per_client,
                DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            )?,
            max_sockets_per_client: positive(
                "max_sockets_per_client",
                s.max_sockets_per_client,
                DEFAULT_MAX_SOCKETS_PER_CLIENT,
            )?,
            result_ttl,
            durability,
            max_output_bytes: positive(
                "max_output_bytes",
                s.max_output_bytes,
                DEFAULT_MAX_OUTPUT_BYTES,
            )?,
            max_prompt_bytes: positive(
                "max_prompt_bytes",
                s.max_prompt_bytes,
                DEFAULT_MAX_PROMPT_BYTES,
            )?,
            max_history_messages: positive(
                "max_history_messages",
                s.max_history_messages,
                DEFAULT_MAX_HISTORY_MESSAGES,
            )?,
            max_history_bytes: positive(
                "max_history_bytes",
                s.max_history_bytes,
                DEFAULT_MAX_HISTORY_BYTES,
            )?,
            max_body_budget_mb: positive(
                "max_body_budget_mb",
                s.max_body_budget_mb,
                DEFAULT_MAX_BODY_BUDGET_MB,
            )?,
            relay_url,
            relay_fallbacks,
            relay_ca,
            tls_cert,
            tls_key,
            relay_tls,
            http_tls,
            reload: s.reload.unwrap_or(false),
            co_dir: data_dir,
            summary: s.summary,
            examples: s.examples.unwrap_or_default(),
            cors_origins: {
                let origins = s.cors_origins.unwrap_or_default();
                if let Some(bad) = origins.iter().find(|o| {
                    !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/')
                }) {
                    return Err(invalid(
                        "cors_origins",
                        &format!("{bad:?} is not an origin (scheme://host[:port], no path)"),
                    ));
                }
                origins
            },
            max_file_size_mb,
            max_files_per_request: s.max_files_per_request.unwrap_or(DEFAULT_MAX_FILES),
            p2p,
        })
    }

    /// What a request body is held to while it arrives.
    pub fn body_limits(&self) -> crate::proto::BodyLimits {
        let file = self.max_file_size_mb as usize * 1024 * 1024;
        crate::proto::BodyLimits {
            envelope_bytes: crate::envelope::MAX_ENVELOPE_BYTES,
            prompt_bytes: self.max_prompt_bytes,
            // base64 is 4/3 of the bytes; the data URL's header is short.
            file_chars: file.div_ceil(3) * 4 + DATA_URL_HEADER_SLACK,
            files: self.max_files_per_request,
        }
    }

    /// Largest POST /input body: the prompt envelope plus the allowed files, as base64
    /// data URLs (4/3 of their size).
    pub fn max_body_bytes(&self) -> usize {
        let files = self.max_file_size_mb as usize * 1024 * 1024 * self.max_files_per_request;
        crate::envelope::MAX_ENVELOPE_BYTES + files / 3 * 4
    }
}

/// A list as configured: its addresses now, the files to watch, and the part given in
/// code or inline. A file named explicitly must be readable; default files are optional.
fn load_list(
    source: Option<ListSource>,
    co_dir: &Path,
    defaults: &[&str],
) -> Result<(AddressList, Vec<ListFile>, AddressList), ConfigError> {
    let (code, files) = match source {
        Some(ListSource::Addresses(items)) => (AddressList::from_patterns(items)?, Vec::new()),
        Some(ListSource::File(path)) => (
            AddressList::default(),
            vec![ListFile {
                path: co_dir.join(path),
                required: true,
            }],
        ),
        None => (
            AddressList::default(),
            defaults
                .iter()
                .map(|name| ListFile {
                    path: co_dir.join(name),
                    required: false,
                })
                .collect(),
        ),
    };
    let mut list = code.clone();
    for f in &files {
        if f.required || f.path.exists() {
            list.extend(AddressList::from_file(&f.path)?);
        }
    }
    Ok((list, files, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_complete_example_parses_except_policy_trust() {
        let yaml = r#"
summary: Production translation service with 100+ languages
examples:
  - "Translate 'hello' to Spanish"
trust: careful
port: 8000
workers: 4
result_ttl: 3600 # 1 hour
relay_url: wss://oo.openonion.ai/ws/announce
max_file_size: 10
max_files_per_request: 10
reload: false
co_dir: null
"#;
        let s = Settings::from_yaml(yaml, "host.yaml").unwrap();
        assert_eq!(s.workers, Some(4));
        assert_eq!(s.trust, Some(TrustSetting::Level(TrustLevel::Careful)));
        assert_eq!(
            s.relay_url,
            Some(Some("wss://oo.openonion.ai/ws/announce".into()))
        );

        let s = Settings::from_yaml(
            "trust:\n  allow: [whitelisted]\n  default: ask\n",
            "host.yaml",
        )
        .unwrap();
        assert!(matches!(s.trust, Some(TrustSetting::Policy(_))));
        let err = Settings::from_yaml("trust:\n  allow: [friends]\n", "host.yaml").unwrap_err();
        assert!(err.to_string().contains("`trust`"), "{err}");
    }

    #[test]
    fn the_init_template_parses_and_uncommented_it_is_the_defaults() {
        let s = Settings::from_yaml(HOST_YAML_TEMPLATE, "template").unwrap();
        assert!(s.port.is_none(), "everything is commented out");
        let is_setting = |rest: &str| {
            let key: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            (!key.is_empty() && rest[key.len()..].starts_with(':')) || rest.starts_with("  - ")
        };
        let uncommented: String = HOST_YAML_TEMPLATE
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|rest| is_setting(rest))
            .map(|rest| format!("{rest}\n"))
            .collect();
        let s = Settings::from_yaml(&uncommented, "uncommented").unwrap();
        assert_eq!(s.port, Some(DEFAULT_PORT));
        assert_eq!(s.workers, Some(DEFAULT_WORKERS));
        assert_eq!(s.result_ttl, Some(DEFAULT_RESULT_TTL));
        assert_eq!(s.max_queue, Some(DEFAULT_MAX_QUEUE));
        assert_eq!(s.durability.as_deref(), Some("batched"));
    }

    #[test]
    fn the_templates_agent_blocks_parse_and_resolve_when_uncommented() {
        let block = |name: &str| -> String {
            HOST_YAML_TEMPLATE
                .lines()
                .skip_while(|l| *l != format!("# {name}:"))
                .take_while(|l| l.starts_with(&format!("# {name}:")) || l.starts_with("#   "))
                .map(|l| format!("{}\n", &l[2..]))
                .collect()
        };
        let forward = Settings::from_yaml(&block("forward"), "t").unwrap();
        let config = forward.forward.unwrap().resolve("t").unwrap();
        assert_eq!(config.url.as_str(), "http://127.0.0.1:9000/agent");
        assert_eq!(config.retries, crate::agent::DEFAULT_FORWARD_RETRIES);
        assert_eq!(config.timeout, crate::agent::DEFAULT_FORWARD_TIMEOUT);
        let llm = Settings::from_yaml(&block("llm"), "t").unwrap();
        let config = llm.llm.unwrap().resolve("t").unwrap();
        assert_eq!(config.model, "llama3.2");
        assert_eq!(config.timeout, crate::agent::DEFAULT_LLM_TIMEOUT);
        assert_eq!(config.system_prompt, None);
        assert_eq!(config.temperature, None);
    }

    #[test]
    fn agent_blocks_name_their_bad_keys_and_flags_beat_the_file() {
        let err = |yaml: &str| {
            let s = Settings::from_yaml(yaml, "h.yaml").unwrap();
            match (s.forward, s.llm) {
                (Some(f), _) => f.resolve("h.yaml").unwrap_err().to_string(),
                (_, Some(l)) => l.resolve("h.yaml").unwrap_err().to_string(),
                _ => panic!("no block in {yaml}"),
            }
        };
        assert!(err("forward: {timeout_secs: 3}").contains("key `forward.url`: required"));
        assert!(err("forward: {url: 'ftp://x/'}").contains("key `forward.url`"));
        assert!(err("forward: {url: 'http://x/', retries: 99}").contains("forward.retries"));
        assert!(err("forward: {url: 'http://x/', headers: {'a b': c}}").contains("headers"));
        assert!(err("llm: {base_url: 'http://x/v1'}").contains("key `llm.model`"));
        assert!(err("llm: {model: m}").contains("key `llm.base_url`"));
        assert!(
            err("llm: {base_url: 'http://x/v1', model: m, temperature: 3}")
                .contains("llm.temperature")
        );
        assert!(
            err("llm: {base_url: 'http://x/v1', model: m, timeout_secs: 0}")
                .contains("llm.timeout_secs")
        );
        assert!(Settings::from_yaml("llm: {modell: m}", "h.yaml")
            .unwrap_err()
            .to_string()
            .contains("modell"));

        let file = Settings::from_yaml(
            "llm: {base_url: 'http://file/v1', model: file-model, max_tokens: 9}",
            "f",
        )
        .unwrap();
        let flags = Settings {
            llm: Some(LlmSettings {
                model: Some("flag-model".into()),
                ..LlmSettings::default()
            }),
            ..Settings::default()
        };
        let config = flags.or(file).llm.unwrap().resolve("f").unwrap();
        assert_eq!(config.model, "flag-model");
        assert_eq!(config.base_url.as_str(), "http://file/v1");
        assert_eq!(config.max_tokens, Some(9));
    }

    #[test]
    fn unknown_and_ill_typed_keys_name_the_file_and_key() {
        let err = Settings::from_yaml("portt: 80\n", "/x/.co/host.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/.co/host.yaml") && err.contains("portt"),
            "{err}"
        );
        let err = Settings::from_yaml("port: eighty\n", "/x/.co/host.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `port`"), "{err}");
    }

    #[test]
    fn tls_files_resolve_from_co_dir_come_in_pairs_and_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key_pair.serialize_pem()).unwrap();
        let resolve = |yaml: &str| {
            Settings::from_yaml(yaml, "host.yaml")
                .and_then(|s| HostConfig::resolve(s, dir.path(), "host.yaml"))
        };
        let cfg = resolve("tls_cert: cert.pem\ntls_key: key.pem\nrelay_ca: cert.pem\n").unwrap();
        assert_eq!(cfg.tls_cert, Some(dir.path().join("cert.pem")));
        assert!(cfg.http_tls.is_some());
        let e = resolve("tls_cert: cert.pem\n").unwrap_err().to_string();
        assert!(e.contains("key `tls_cert`: needs `tls_key` too"), "{e}");
        let e = resolve("tls_cert: cert.pem\ntls_key: cert.pem\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `tls_key`") && e.contains("no PEM private key"),
            "{e}"
        );
        let e = resolve("relay_ca: nope.pem\n").unwrap_err().to_string();
        assert!(
            e.contains("key `relay_ca`: cannot read") && e.contains("nope.pem"),
            "{e}"
        );
        // Code and file never mix halves of a pair: the code's half wins alone.
        let code = Settings {
            tls_key: Some("key.pem".into()),
            ..Settings::default()
        };
        let file = Settings::from_yaml("tls_cert: cert.pem\ntls_key: key.pem\n", "f").unwrap();
        assert_eq!(code.or(file).tls_cert, None);
    }

    #[test]
    fn nat_mode_comes_from_the_file_and_a_bad_one_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |yaml: &str| {
            Settings::from_yaml(yaml, "host.yaml")
                .and_then(|s| HostConfig::resolve(s, dir.path(), "host.yaml"))
        };
        let nat = |yaml: &str| resolve(yaml).unwrap().p2p.unwrap().nat;
        assert_eq!(nat(""), crate::NatMode::Auto);
        assert_eq!(nat("nat: private\n"), crate::NatMode::Private);
        assert_eq!(nat("nat: public\n"), crate::NatMode::Public);
        let e = resolve("nat: open\n").unwrap_err().to_string();
        assert!(
            e.contains("key `nat`") && e.contains("auto, public or private"),
            "{e}"
        );
    }

    #[test]
    fn code_beats_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = Settings::from_yaml("port: 9000\nworkers: 3\nrelay_url: ''\n", "f").unwrap();
        let code = Settings {
            port: Some(9100),
            ..Settings::default()
        };
        let cfg = HostConfig::resolve(code.or(file), dir.path(), "f").unwrap();
        assert_eq!(cfg.port, 9100);
        assert_eq!(cfg.workers, 3);
        assert_eq!(cfg.result_ttl, DEFAULT_RESULT_TTL);
        assert_eq!(cfg.relay_url, None);
        assert_eq!(cfg.trust.level, TrustLevel::Careful);
    }

    #[test]
    fn swarm_keys_parse_and_a_bootstrap_needs_a_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            Settings::from_yaml("listen: [\"/ip4/127.0.0.1/tcp/0\"]\nmdns: true\n", "f").unwrap();
        let p2p = HostConfig::resolve(s, dir.path(), "f")
            .unwrap()
            .p2p
            .unwrap();
        assert_eq!(p2p.listen.len(), 1);
        assert!(p2p.mdns);
        assert!(
            !p2p.listen_fallback,
            "a port given is used or start-up fails"
        );
        let default = HostConfig::resolve(Settings::default(), dir.path(), "f")
            .unwrap()
            .p2p
            .unwrap();
        assert!(default.listen_fallback);
        let listen: Vec<String> = default.listen.iter().map(ToString::to_string).collect();
        assert_eq!(
            listen,
            ["/ip4/0.0.0.0/udp/4001/quic-v1", "/ip4/0.0.0.0/tcp/4001"]
        );
        let s = Settings::from_yaml("bootstrap: [\"/ip4/127.0.0.1/tcp/1\"]\n", "f").unwrap();
        let err = HostConfig::resolve(s, dir.path(), "f")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `bootstrap`") && err.contains("/p2p/"),
            "{err}"
        );
        let s = Settings::from_yaml("listen: [\"not an addr\"]\n", "f").unwrap();
        assert!(HostConfig::resolve(s, dir.path(), "f")
            .unwrap_err()
            .to_string()
            .contains("key `listen`"));
        let s = Settings::from_yaml("p2p: false\n", "f").unwrap();
        assert!(HostConfig::resolve(s, dir.path(), "f")
            .unwrap()
            .p2p
            .is_none());
    }

    #[test]
    fn the_agent_key_names_a_program_and_its_pool_follows_workers() {
        let s = Settings::from_yaml(
            "workers: 3\nagent:\n  exec: python3 'my agent.py'\n  env: {A: b}\n  timeout_secs: 9\n",
            "f",
        )
        .unwrap();
        let agent = s.agent.clone().unwrap();
        let config = agent.exec_config(Some(3), "f").unwrap().unwrap();
        assert_eq!(config.workers, 3);
        assert_eq!(config.timeout, std::time::Duration::from_secs(9));
        assert_eq!(config.env, [("A".to_owned(), "b".to_owned())]);
        assert!(!config.shell);
        let own = AgentSettings {
            workers: Some(5),
            ..AgentSettings::default()
        };
        assert_eq!(
            own.or(agent)
                .exec_config(Some(3), "f")
                .unwrap()
                .unwrap()
                .workers,
            5
        );
        for (yaml, says) in [
            ("agent: {exec: \"x 'y\"}\n", "key `agent.exec`"),
            ("agent: {exec: x, workers: 0}\n", "key `agent.workers`"),
            (
                "agent: {exec: x, timeout_secs: 0}\n",
                "key `agent.timeout_secs`",
            ),
        ] {
            let s = Settings::from_yaml(yaml, "f").unwrap();
            let err = s
                .agent
                .unwrap()
                .exec_config(None, "f")
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
        let err = Settings::from_yaml("agent: {exec: x, shel: true}\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("shel"), "{err}");
        assert!(Settings::from_yaml("agent: {}\n", "f")
            .unwrap()
            .agent
            .unwrap()
            .exec_config(None, "f")
            .unwrap()
            .is_none());
    }

    #[test]
    fn list_files_resolve_against_co_dir_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let addr = crate::identity::Identity::from_seed([1; 32]).address();
        std::fs::write(dir.path().join("blocklist.txt"), format!("{addr}\n")).unwrap();
        let cfg = HostConfig::resolve(Settings::default(), dir.path(), "f").unwrap();
        assert!(cfg.trust.blacklist.contains(&addr));

        let s = Settings::from_yaml("whitelist: missing.txt\n", "f").unwrap();
        assert!(HostConfig::resolve(s, dir.path(), "f").is_err());
    }
}
