//! Persistence in sled, inside co_dir: sessions and the ids of signed messages already
//! seen. Every call runs on the blocking pool, never on the async workers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::Address;

const SESSIONS: &str = "sessions";
const SEEN: &str = "seen";
const CHUNKS: &str = "chunks";

/// The sequence number under which a session's final reply (OUTPUT or ERROR) is kept
/// beside its STREAM chunks.
pub const FINAL_SEQ: u64 = u64::MAX;

/// How many sessions `GET /sessions` lists at most (newest first).
pub const MAX_LISTED_SESSIONS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source} (is another oonode using this co_dir?)")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store: background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Running,
    Done,
    Failed,
    /// Was running when the process stopped; its result is lost, the record is not.
    Interrupted,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Running => "running",
            SessionStatus::Done => "done",
            SessionStatus::Failed => "failed",
            SessionStatus::Interrupted => "interrupted",
        }
    }
}

/// One session as stored and as `GET /sessions/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub status: SessionStatus,
    pub prompt: String,
    pub result: Option<String>,
    /// The state a caller passes back for the next turn (history included).
    pub session: Value,
    pub created: u64,
    /// None while running: running sessions never expire.
    pub expires: Option<u64>,
    pub duration_ms: Option<u64>,
    /// The verified caller that started the session; None for unsigned callers.
    pub owner: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SessionRecord {
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<sled::Db>,
    sessions: sled::Tree,
    seen: sled::Tree,
    /// `session_id 0x00 seq(be)` → the signed reply, for clients that resume.
    chunks: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store and marks sessions left running by a previous process
    /// as interrupted. Returns the store and how many sessions were marked.
    pub fn open(path: &Path, result_ttl: u64, now: u64) -> Result<(Store, usize), StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let store = Store {
            sessions: db.open_tree(SESSIONS)?,
            seen: db.open_tree(SEEN)?,
            chunks: db.open_tree(CHUNKS)?,
            db: Arc::new(db),
        };
        let mut marked = 0;
        for item in store.sessions.iter() {
            let (key, bytes) = item?;
            let mut rec: SessionRecord = serde_json::from_slice(&bytes)?;
            if rec.status == SessionStatus::Running {
                rec.status = SessionStatus::Interrupted;
                rec.expires = Some(now + result_ttl);
                rec.error = Some("the node stopped while this session was running".into());
                store.sessions.insert(key, serde_json::to_vec(&rec)?)?;
                marked += 1;
            }
        }
        store.db.flush()?;
        Ok((store, marked))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store)).await?
    }

    /// Writes a session durably (flushed before returning): what was accepted survives a
    /// crash.
    pub async fn put_session(&self, rec: SessionRecord) -> Result<(), StoreError> {
        self.blocking(move |s| {
            s.sessions
                .insert(rec.session_id.as_bytes(), serde_json::to_vec(&rec)?)?;
            s.db.flush()?;
            Ok(())
        })
        .await
    }

    /// Reads a session; an expired one reads as absent even before the sweeper runs.
    pub async fn get_session(
        &self,
        id: String,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.blocking(move |s| match s.sessions.get(id.as_bytes())? {
            Some(bytes) => {
                let rec: SessionRecord = serde_json::from_slice(&bytes)?;
                Ok((!rec.is_expired(now)).then_some(rec))
            }
            None => Ok(None),
        })
        .await
    }

    /// Sessions owned by `owner` (None = unsigned callers' sessions), newest first.
    pub async fn list_sessions(
        &self,
        owner: Option<Address>,
        now: u64,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        self.blocking(move |s| {
            let mut out = Vec::new();
            for item in s.sessions.iter() {
                let (_, bytes) = item?;
                let rec: SessionRecord = serde_json::from_slice(&bytes)?;
                if rec.owner == owner && !rec.is_expired(now) {
                    out.push(rec);
                }
            }
            out.sort_by_key(|r| std::cmp::Reverse(r.created));
            out.truncate(MAX_LISTED_SESSIONS);
            Ok(out)
        })
        .await
    }

    /// Remembers a signed message's replay key until `expires`. Returns false if it was
    /// already there: the message is a replay. Atomic, and flushed before returning.
    pub async fn record_seen(&self, key: String, expires: u64) -> Result<bool, StoreError> {
        self.blocking(move |s| {
            let fresh = s
                .seen
                .compare_and_swap(
                    key.as_bytes(),
                    None as Option<&[u8]>,
                    Some(&expires.to_be_bytes()[..]),
                )?
                .is_ok();
            if fresh {
                s.db.flush()?;
            }
            Ok(fresh)
        })
        .await
    }

    /// Keeps one signed reply of a session (a STREAM chunk, or the final reply under
    /// [`FINAL_SEQ`]). Not flushed on its own: the session write that follows flushes it.
    pub async fn put_reply(
        &self,
        session_id: String,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.blocking(move |s| {
            s.chunks.insert(chunk_key(&session_id, seq), bytes)?;
            Ok(())
        })
        .await
    }

    /// The kept replies of a session with a sequence number above `after`, in order (the
    /// final reply, if any, last).
    pub async fn replies_after(
        &self,
        session_id: String,
        after: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.blocking(move |s| {
            let start = chunk_key(&session_id, after.saturating_add(1));
            let end = chunk_key(&session_id, FINAL_SEQ);
            let mut out = Vec::new();
            for item in s.chunks.range(start..=end) {
                let (key, bytes) = item?;
                let seq =
                    u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8-byte suffix"));
                out.push((seq, bytes.to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// Deletes expired sessions (with their kept replies) and replay keys. Returns the
    /// ids of the sessions removed and how many replay keys went.
    pub async fn sweep(&self, now: u64) -> Result<(Vec<String>, usize), StoreError> {
        self.blocking(move |s| {
            let mut sessions = Vec::new();
            for item in s.sessions.iter() {
                let (key, bytes) = item?;
                let rec: SessionRecord = serde_json::from_slice(&bytes)?;
                if rec.is_expired(now) {
                    s.sessions.remove(&key)?;
                    let mut prefix = key.to_vec();
                    prefix.push(0);
                    for chunk in s.chunks.scan_prefix(&prefix).keys() {
                        s.chunks.remove(chunk?)?;
                    }
                    sessions.push(rec.session_id);
                }
            }
            let mut keys = 0;
            for item in s.seen.iter() {
                let (key, value) = item?;
                let expires = value
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if expires <= now {
                    s.seen.remove(key)?;
                    keys += 1;
                }
            }
            if !sessions.is_empty() || keys > 0 {
                s.db.flush()?;
            }
            Ok((sessions, keys))
        })
        .await
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.blocking(|s| Ok(s.db.flush().map(|_| ())?)).await
    }
}

fn chunk_key(session_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(session_id.len() + 9);
    key.extend_from_slice(session_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: SessionStatus, expires: Option<u64>) -> SessionRecord {
        SessionRecord {
            session_id: id.into(),
            status,
            prompt: "p".into(),
            result: None,
            session: Value::Null,
            created: 100,
            expires,
            duration_ms: None,
            owner: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn replies_are_kept_in_order_and_read_after_a_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        for seq in [3, 1, FINAL_SEQ, 2] {
            store
                .put_reply("s".into(), seq, seq.to_string().into_bytes())
                .await
                .unwrap();
        }
        // A session whose id extends this one's must not leak in.
        store
            .put_reply("s2".into(), 5, b"other".to_vec())
            .await
            .unwrap();
        let seqs: Vec<u64> = store
            .replies_after("s".into(), 1)
            .await
            .unwrap()
            .into_iter()
            .map(|(q, _)| q)
            .collect();
        assert_eq!(seqs, vec![2, 3, FINAL_SEQ]);
        assert_eq!(store.replies_after("s".into(), 3).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn running_sessions_become_interrupted_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
            store
                .put_session(record("a", SessionStatus::Running, None))
                .await
                .unwrap();
            store
                .put_session(record("b", SessionStatus::Done, Some(1000)))
                .await
                .unwrap();
        }
        let (store, marked) = Store::open(dir.path(), 60, 200).unwrap();
        assert_eq!(marked, 1);
        let a = store.get_session("a".into(), 200).await.unwrap().unwrap();
        assert_eq!(a.status, SessionStatus::Interrupted);
        assert_eq!(a.expires, Some(260));
        let b = store.get_session("b".into(), 200).await.unwrap().unwrap();
        assert_eq!(b.status, SessionStatus::Done);
    }

    #[tokio::test]
    async fn expired_sessions_and_keys_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        store
            .put_session(record("old", SessionStatus::Done, Some(150)))
            .await
            .unwrap();
        store
            .put_session(record("run", SessionStatus::Running, None))
            .await
            .unwrap();
        assert!(store
            .get_session("old".into(), 160)
            .await
            .unwrap()
            .is_none());
        assert!(store.record_seen("k".into(), 150).await.unwrap());
        assert!(!store.record_seen("k".into(), 150).await.unwrap());
        store
            .put_reply("old".into(), 1, b"c1".to_vec())
            .await
            .unwrap();
        store
            .put_reply("run".into(), 1, b"r1".to_vec())
            .await
            .unwrap();
        assert_eq!(
            store.sweep(160).await.unwrap(),
            (vec!["old".to_string()], 1)
        );
        assert!(store
            .replies_after("old".into(), 0)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.replies_after("run".into(), 0).await.unwrap().len(), 1);
        assert!(store
            .get_session("run".into(), 10_000)
            .await
            .unwrap()
            .is_some());
        assert!(store.record_seen("k".into(), 500).await.unwrap());
    }
}
