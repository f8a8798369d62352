//! `oonode init` and `oonode keys`: the co_dir and its key.

use std::path::PathBuf;

use anyhow::Context;
use oonode::Identity;

/// `oonode init`: what the seed's `co init` gives Python users.
pub(crate) fn init(dir: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let co = dir.unwrap_or_else(|| PathBuf::from(".")).join(".co");
    let yaml = co.join("host.yaml");
    if yaml.exists() && !force {
        anyhow::bail!("{} exists; use --force to overwrite it", yaml.display());
    }
    std::fs::create_dir_all(&co).with_context(|| format!("cannot create {}", co.display()))?;
    let (identity, created) = Identity::load_or_create(&co)?;
    std::fs::write(&yaml, oonode::HOST_YAML_TEMPLATE)
        .with_context(|| format!("cannot write {}", yaml.display()))?;
    println!(
        "{} {}",
        if created { "created key" } else { "kept key" },
        Identity::key_path(&co).display()
    );
    println!("wrote {}", yaml.display());
    println!("address: {}", identity.address());
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
