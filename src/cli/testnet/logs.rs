//! `testnet logs`, and the log tails that `up` shows when a process fails to start.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};

use super::state::load;

pub(super) async fn logs(
    dir: &Path,
    which: &str,
    lines: Option<usize>,
    follow: bool,
) -> anyhow::Result<()> {
    let relay_n = which
        .strip_prefix("relay-")
        .is_some_and(|n| n.parse::<usize>().is_ok());
    let path = if which == "relay" || relay_n {
        dir.join(format!("{which}.log"))
    } else {
        let index: usize = which.parse().map_err(|_| {
            anyhow!("which log? a node index (0, 1, …), `relay` or `relay-N`, not {which:?}")
        })?;
        let path = dir.join(format!("node-{index}.log"));
        if !path.exists() {
            let state = load(dir)?;
            state.node(index)?;
        }
        path
    };
    let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let start = match lines {
        Some(n) => tail_start(&text, n),
        None => 0,
    };
    let mut out = std::io::stdout();
    out.write_all(&text[start..])?;
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let mut offset = text.len() as u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // truncated or replaced
        }
        if len > offset {
            let mut file = fs::File::open(&path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            out.write_all(&buf)?;
            out.flush()?;
        }
    }
}

/// Where the last `n` lines of `text` start.
fn tail_start(text: &[u8], n: usize) -> usize {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    if n == 0 {
        text.len()
    } else {
        0
    }
}

/// The last `n` lines of the log at `path`, indented, for an error message.
pub(super) fn tail_of(path: &Path, n: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(&text[tail_start(&text, n)..]).into_owned();
    let tail = tail.trim_end();
    if tail.is_empty() {
        "  (empty)".into()
    } else {
        tail.lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
            .trim_end()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        assert_eq!(tail_start(b"a\nb\nc\n", 2), 2);
        assert_eq!(tail_start(b"a\nb\nc", 1), 4);
        assert_eq!(tail_start(b"a\nb\n", 5), 0);
    }
}
