//! `oonode trust`: trust admin over a node's /admin/trust.

use std::path::PathBuf;

use anyhow::Context;
use oonode::trust::AdminAction;
use oonode::Identity;

#[derive(clap::Args)]
pub(crate) struct TrustArgs {
    /// promote, demote, block, unblock, level, credit (an admin action on the node), or
    /// invite (print a new strong invite code for host.yaml; nothing is sent).
    #[arg(value_parser = parse_action)]
    action: TrustCommand,
    /// The address acted on (not for `invite`).
    address: Option<String>,
    /// Credits to grant (for `credit`).
    amount: Option<u64>,
    /// The node's HTTP URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    node: String,
    /// Directory holding the admin's key (keys/agent.key); the node's own co_dir makes
    /// you the node itself.
    #[arg(long)]
    co_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum TrustCommand {
    Admin(AdminAction),
    Invite,
}

fn parse_action(s: &str) -> Result<TrustCommand, String> {
    if s == "invite" {
        return Ok(TrustCommand::Invite);
    }
    s.parse()
        .map(TrustCommand::Admin)
        .map_err(|e: oonode::trust::AdminError| format!("{e}, or invite"))
}

/// `oonode trust …`: a signed, single-use ADMIN envelope to the node's /admin/trust; or
/// `oonode trust invite`: a new invite code.
pub(crate) async fn trust(args: TrustArgs) -> anyhow::Result<()> {
    let action = match args.action {
        TrustCommand::Invite => {
            println!("{}", oonode::trust::InviteCode::generate());
            return Ok(());
        }
        TrustCommand::Admin(a) => a,
    };
    let Some(address) = &args.address else {
        anyhow::bail!(
            "{} needs an address: oonode trust {} 0x…",
            action.as_str(),
            action.as_str()
        );
    };
    let dir = super::co_dir_or_default(args.co_dir)?;
    let (identity, _) = Identity::load_or_create(&dir)?;
    let target: oonode::Address = address.parse().context("invalid address")?;
    if action == AdminAction::Credit && args.amount.is_none() {
        anyhow::bail!("credit needs an amount: oonode trust credit 0x… 10");
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let base = args.node.trim_end_matches('/');
    let info: serde_json::Value = http
        .get(format!("{base}/info"))
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {base}"))?
        .json()
        .await?;
    let node: oonode::Address = info["address"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .context("the node's /info has no address")?;
    let mut payload = serde_json::Map::new();
    payload.insert("action".into(), action.as_str().into());
    payload.insert("address".into(), target.to_string().into());
    if let Some(n) = args.amount {
        payload.insert("amount".into(), n.into());
    }
    let env = oonode::Envelope::sign(&identity, oonode::Kind::Admin, Some(node), payload);
    let res = http
        .post(format!("{base}/admin/trust"))
        .json(&env.to_nested_json())
        .send()
        .await?;
    let status = res.status();
    let body: serde_json::Value = res.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{} ({})",
            body["error"].as_str().unwrap_or("refused"),
            body["code"].as_str().unwrap_or(status.as_str())
        );
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}
