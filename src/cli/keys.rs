//! `oonode init` and `oonode keys`: the co_dir and its key.

use std::path::PathBuf;

use anyhow::Context;
use oonode::Identity;

/// `oonode init`: what the seed's `co init` gives Python users.
/// What `oonode init --template` sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Template {
    /// A Python agent of your own, run by the node (`agent: {exec: python3 agent.py}`).
    Exec,
    /// An agent that already answers over HTTP (`forward: {url: …}`).
    Forward,
    /// A model behind an OpenAI-compatible API (`llm: {base_url, model}`).
    Llm,
}

/// The agent.py of `--template exec`: the whole protocol in ten lines.
const EXEC_AGENT_PY: &str = r#"# An oonode agent: one JSON request per line on stdin, JSON lines back on stdout
# (docs/agent-protocol.md). Edit the answer; `oonode host` runs it.
import json, sys

def send(message):
    print(json.dumps(message), flush=True)

send({"ready": True, "name": "my-agent", "summary": "I answer in capitals.", "examples": ["hello"]})
for line in sys.stdin:
    request = json.loads(line)  # id, prompt, session_id, messages (the history), caller, files
    send({"id": request["id"], "chunk": "thinking… "})
    send({"id": request["id"], "result": request["prompt"].upper()})
"#;

impl Template {
    /// The host.yaml block that names the agent, put above the commented template.
    fn block(self) -> &'static str {
        match self {
            Template::Exec => "# The agent: agent.py next to .co/, run by the node (see docs/agent-protocol.md).\nagent:\n  exec: python3 agent.py\n",
            Template::Forward => "# The agent: an endpoint that answers POSTed turns (see the README, --forward).\nforward:\n  url: http://127.0.0.1:9000/agent\n  timeout_secs: 120\n",
            Template::Llm => "# The agent: a model behind an OpenAI-compatible API; the key, if any, from\n# $OPENAI_API_KEY. Ollama's endpoint shown; any compatible server works.\nllm:\n  base_url: http://localhost:11434/v1\n  model: llama3.2\n  system_prompt: You are a helpful assistant.\n",
        }
    }

    fn next_step(self) -> &'static str {
        match self {
            Template::Exec => "edit agent.py, then run: oonode host",
            Template::Forward => {
                "set forward.url in .co/host.yaml to your endpoint, then run: oonode host"
            }
            Template::Llm => {
                "set llm.base_url and llm.model in .co/host.yaml, then run: oonode host"
            }
        }
    }
}

pub(crate) fn init(
    dir: Option<PathBuf>,
    force: bool,
    template: Option<Template>,
) -> anyhow::Result<()> {
    let root = dir.unwrap_or_else(|| PathBuf::from("."));
    let co = root.join(".co");
    let yaml = co.join("host.yaml");
    if yaml.exists() && !force {
        anyhow::bail!("{} exists; use --force to overwrite it", yaml.display());
    }
    std::fs::create_dir_all(&co).with_context(|| format!("cannot create {}", co.display()))?;
    let (identity, created) = Identity::load_or_create(&co)?;
    let text = match template {
        Some(t) => format!("{}\n{}", t.block(), oonode::HOST_YAML_TEMPLATE),
        None => oonode::HOST_YAML_TEMPLATE.to_owned(),
    };
    std::fs::write(&yaml, text).with_context(|| format!("cannot write {}", yaml.display()))?;
    println!(
        "{} {}",
        if created { "created key" } else { "kept key" },
        Identity::key_path(&co).display()
    );
    println!("wrote {}", yaml.display());
    if template == Some(Template::Exec) {
        let script = root.join("agent.py");
        // Someone's own agent is never overwritten, --force or not.
        if script.exists() {
            println!("kept {}", script.display());
        } else {
            std::fs::write(&script, EXEC_AGENT_PY)
                .with_context(|| format!("cannot write {}", script.display()))?;
            println!("wrote {}", script.display());
        }
    }
    println!("address: {}", identity.address());
    if let Some(t) = template {
        println!("next: {}", t.next_step());
    }
    Ok(())
}

/// `oonode keys`: the address and PeerId of the key in the co_dir, made if missing; with
/// `json`, one object with the key file's path too (for scripts).
pub(crate) fn keys(co_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let dir = super::co_dir_or_default(co_dir)?;
    let (identity, created) = Identity::load_or_create(&dir)?;
    let key_file = Identity::key_path(&dir);
    if created {
        eprintln!("created {}", key_file.display());
    }
    if json {
        let out = serde_json::json!({
            "address": identity.address().to_string(),
            "peer_id": identity.address().peer_id().to_string(),
            "key_file": key_file,
        });
        println!("{out}");
        return Ok(());
    }
    println!("address: {}", identity.address());
    println!("peer_id: {}", identity.address().peer_id());
    Ok(())
}
