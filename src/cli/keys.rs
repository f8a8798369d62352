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

/// `oonode keys`: the address and PeerId of the key in the co_dir, made if missing.
pub(crate) fn keys(co_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = super::co_dir_or_default(co_dir)?;
    let (identity, created) = Identity::load_or_create(&dir)?;
    if created {
        eprintln!("created {}", Identity::key_path(&dir).display());
    }
    println!("address: {}", identity.address());
    println!("peer_id: {}", identity.address().peer_id());
    Ok(())
}
