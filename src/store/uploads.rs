//! Attached files: decoded from their data URLs, checked against the limits, saved one
//! folder per session under the co_dir, and deleted with their session. One owner for
//! their whole life, so that nothing is saved before admission and nothing outlives its
//! session.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

use crate::agent::Attachment;

/// One attached file as received, not yet saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Why attached files were refused or could not be kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    #[error("{0}")]
    Malformed(String),
    #[error("too many files: {count} (max_files_per_request is {max})")]
    TooMany { count: usize, max: usize },
    #[error("file {name:?} is {size} bytes, over max_file_size ({max_mb} MB)")]
    TooLarge {
        name: String,
        size: u64,
        max_mb: u64,
    },
    #[error("the attached files could not be saved")]
    Save(#[source] std::io::Error),
}

impl Upload {
    /// Decodes `files: [{"name", "data": "data:…;base64,…"}]` and `images: ["data:…"]`.
    pub fn from_json(
        files: Option<Value>,
        images: Option<Value>,
    ) -> Result<Vec<Upload>, UploadError> {
        let bad = UploadError::Malformed;
        let list = |v: Option<Value>, key: &str| match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(bad(format!("`{key}` must be a list"))),
        };
        let mut uploads = Vec::new();
        for (i, file) in list(files, "files")?.into_iter().enumerate() {
            let name = file.get("name").and_then(Value::as_str).unwrap_or("");
            let Some(data) = file.get("data").and_then(Value::as_str) else {
                return Err(bad(format!(
                    "files[{i}] needs `name` and `data` (a data URL)"
                )));
            };
            let name = if name.is_empty() {
                format!("file-{i}")
            } else {
                name.to_owned()
            };
            uploads.push(Upload {
                bytes: decode_data_url(data)
                    .map_err(|e| bad(format!("files[{i}] ({name}): {e}")))?,
                name,
            });
        }
        for (i, image) in list(images, "images")?.into_iter().enumerate() {
            let Some(data) = image.as_str() else {
                return Err(bad(format!("images[{i}] must be a data URL string")));
            };
            let ext = data
                .strip_prefix("data:image/")
                .and_then(|rest| rest.split([';', ',']).next())
                .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric()))
                .unwrap_or("bin");
            uploads.push(Upload {
                name: format!("image-{i}.{ext}"),
                bytes: decode_data_url(data).map_err(|e| bad(format!("images[{i}]: {e}")))?,
            });
        }
        Ok(uploads)
    }
}

/// `data:[<mime>];base64,<data>` → bytes.
fn decode_data_url(url: &str) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or("not a data URL (data:…;base64,…)")?;
    let (meta, data) = rest.split_once(',').ok_or("data URL without a comma")?;
    if !meta.ends_with(";base64") {
        return Err("only base64 data URLs are accepted".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("invalid base64: {e}"))
}

/// The node's attached files: limits, saving and deleting, under one folder.
#[derive(Debug, Clone)]
pub struct Uploads {
    dir: PathBuf,
    max_file_size_mb: u64,
    max_files: usize,
}

impl Uploads {
    pub fn new(dir: PathBuf, max_file_size_mb: u64, max_files: usize) -> Self {
        Uploads {
            dir,
            max_file_size_mb,
            max_files,
        }
    }

    /// Checks the limits before anything is saved.
    pub fn check(&self, uploads: &[Upload]) -> Result<(), UploadError> {
        if uploads.len() > self.max_files {
            return Err(UploadError::TooMany {
                count: uploads.len(),
                max: self.max_files,
            });
        }
        let max = self.max_file_size_mb * 1024 * 1024;
        if let Some(big) = uploads.iter().find(|u| u.bytes.len() as u64 > max) {
            return Err(UploadError::TooLarge {
                name: big.name.clone(),
                size: big.bytes.len() as u64,
                max_mb: self.max_file_size_mb,
            });
        }
        Ok(())
    }

    /// Saves accepted files under `<dir>/<session folder>/`, with names made safe.
    /// `session` is the session's store key.
    pub async fn save(
        &self,
        session: &str,
        uploads: Vec<Upload>,
    ) -> Result<Vec<Attachment>, UploadError> {
        if uploads.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.session_dir(session);
        let saved = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Attachment>> {
            std::fs::create_dir_all(&dir)?;
            let mut out = Vec::with_capacity(uploads.len());
            for (i, upload) in uploads.into_iter().enumerate() {
                // The index keeps two files of the same name apart.
                let path = dir.join(format!("{i:02}-{}", safe_file_name(&upload.name)));
                std::fs::write(&path, &upload.bytes)?;
                out.push(Attachment {
                    name: upload.name,
                    size: upload.bytes.len() as u64,
                    path,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| UploadError::Save(std::io::Error::other(e)))?;
        saved.map_err(UploadError::Save)
    }

    /// Deletes the files of sessions that are gone (by their store keys).
    pub async fn remove(&self, sessions: &[String]) {
        for key in sessions {
            let dir = self.session_dir(key);
            if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
                if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                    tracing::warn!(error = %e, dir = %dir.display(), "removing an expired session's files failed");
                }
            }
        }
    }

    /// A session's folder: named by a digest of its store key, which holds characters
    /// a file name should not.
    fn session_dir(&self, session: &str) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(session.as_bytes());
        self.dir.join(hex::encode(&digest[..16]))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The last path component of a caller's file name, with anything but letters, digits,
/// `.`, `-` and `_` replaced, never empty, never `..`.
fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if safe.trim_matches('.').is_empty() {
        safe = "file".into();
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_cannot_leave_their_folder() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name("a b?.txt"), "a_b_.txt");
    }

    #[test]
    fn data_urls_decode_and_bad_ones_say_why() {
        let files = serde_json::json!([{"name": "a.txt", "data": "data:text/plain;base64,aGk="}]);
        let images = serde_json::json!(["data:image/png;base64,aGk="]);
        let up = Upload::from_json(Some(files), Some(images)).unwrap();
        assert_eq!(up[0].bytes, b"hi");
        assert_eq!(up[1].name, "image-0.png");
        let bad = serde_json::json!([{"name": "x", "data": "data:text/plain,hi"}]);
        assert!(Upload::from_json(Some(bad), None).is_err());
    }
}
