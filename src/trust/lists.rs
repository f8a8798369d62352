//! Address lists (whitelist, blacklist): one address or pattern per line, `#` comments,
//! case-insensitive, `*` as a wildcard.

use std::path::{Path, PathBuf};

use crate::identity::Address;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read address list {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {pattern:?} is neither an address (0x + 64 hex) nor a pattern with *")]
    BadEntry { origin: String, pattern: String },
}

/// A set of address patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressList {
    patterns: Vec<String>,
}

impl AddressList {
    /// Builds a list from code parameters (addresses or `*` patterns).
    pub fn from_patterns<I, S>(items: I) -> Result<Self, ListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = AddressList::default();
        for item in items {
            list.push(item.as_ref(), "parameter")?;
        }
        Ok(list)
    }

    /// Reads a list file. A missing or unreadable file is an error: lists fail closed.
    pub fn from_file(path: &Path) -> Result<Self, ListError> {
        let text = std::fs::read_to_string(path).map_err(|source| ListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut list = AddressList::default();
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if !entry.is_empty() {
                list.push(entry, &format!("{}:{}", path.display(), n + 1))?;
            }
        }
        Ok(list)
    }

    pub fn extend(&mut self, other: AddressList) {
        self.patterns.extend(other.patterns);
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    fn push(&mut self, entry: &str, origin: &str) -> Result<(), ListError> {
        let lower = entry.trim().to_ascii_lowercase();
        let valid = if lower.contains('*') {
            lower
                .chars()
                .all(|c| c == '*' || c == 'x' || c.is_ascii_hexdigit())
        } else {
            lower.parse::<Address>().is_ok()
        };
        if !valid {
            return Err(ListError::BadEntry {
                origin: origin.into(),
                pattern: entry.into(),
            });
        }
        self.patterns.push(lower);
        Ok(())
    }

    pub fn contains(&self, address: &Address) -> bool {
        if self.patterns.is_empty() {
            return false; // Checked on every request; most lists are empty.
        }
        let text = address.to_string();
        self.patterns.iter().any(|p| wildcard_match(p, &text))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn files_allow_comments_case_and_wildcards() {
        let a = Identity::from_seed([1; 32]).address().to_string();
        let b = Identity::from_seed([2; 32]).address().to_string();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(
            &path,
            format!(
                "# partners\n{}  # upper case\n\n",
                a.to_uppercase().replacen("0X", "0x", 1)
            ),
        )
        .unwrap();
        let list = AddressList::from_file(&path).unwrap();
        assert!(list.contains(&a.parse().unwrap()));
        assert!(!list.contains(&b.parse().unwrap()));

        let prefix = AddressList::from_patterns([format!("{}*", &b[..10])]).unwrap();
        assert!(prefix.contains(&b.parse().unwrap()));
        assert!(!prefix.contains(&a.parse().unwrap()) || a[..10] == b[..10]);
        assert!(AddressList::from_patterns(["*"])
            .unwrap()
            .contains(&a.parse().unwrap()));
    }

    #[test]
    fn bad_entries_and_missing_files_fail_closed() {
        assert!(AddressList::from_patterns(["0xgood123abc"]).is_err());
        assert!(AddressList::from_file(Path::new("/nonexistent/list.txt")).is_err());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("0xab*", "0xabcd"));
        assert!(wildcard_match("*cd", "0xabcd"));
        assert!(wildcard_match("0x*b*d", "0xabcd"));
        assert!(!wildcard_match("0x*e*", "0xabcd"));
        assert!(!wildcard_match("0xabc", "0xabcd"));
    }
}
