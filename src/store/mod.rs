//! Persistence in sled, inside co_dir: sessions (with an index of their metadata, see
//! `index.rs`), the ids of signed messages already seen, and the replies kept for resuming
//! clients. One thread owns sled (see [`Store`]).

mod index;
mod uploads;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::Address;
use crate::metrics::StoreMetrics;

pub use index::{BadCursor, PageCursor, SessionMeta, SessionPage, DEFAULT_PAGE, MAX_PAGE};
pub use uploads::{Upload, UploadError, Uploads};

const SESSIONS: &str = "sessions";
const SEEN: &str = "seen";
const CHUNKS: &str = "chunks";
/// Trust state: `contact:<addr>`, `credits:<addr>`, `blocked:<addr>`, `caller:<addr>`.
const TRUST: &str = "trust";
// The index trees (see `index.rs`).
const SESSION_META: &str = "session_meta";
const SESSION_LIST: &str = "session_list";
const SESSION_EXPIRY: &str = "session_expiry";
const SESSION_RUNNING: &str = "session_running";
const SEEN_EXPIRY: &str = "seen_expiry";

/// The sequence number under which a session's final reply (OUTPUT or ERROR) is kept
/// beside its STREAM chunks.
pub const FINAL_SEQ: u64 = u64::MAX;

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
    #[error("store: flushing to disk failed: {0}")]
    Flush(String),
    #[error("store: cannot start the store thread: {0}")]
    Thread(String),
    #[error("store: closed")]
    Closed,
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
    /// For an unsigned caller's session: the hex SHA-256 of its session secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// The relay the session was opened through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SessionRecord {
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// The sled trees, owned by the store thread.
struct Trees {
    db: sled::Db,
    sessions: sled::Tree,
    seen: sled::Tree,
    /// `session_id 0x00 seq(be)` → the signed reply, for clients that resume.
    chunks: sled::Tree,
    trust: sled::Tree,
    /// The session index (`index.rs`).
    meta: sled::Tree,
    list: sled::Tree,
    expiry: sled::Tree,
    running: sled::Tree,
    seen_expiry: sled::Tree,
}

/// What the node knows of a caller, for the trust agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerHistory {
    pub first_seen: u64,
    pub calls: u64,
}

/// A flag the trust state keeps per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Promoted (or onboarded): passes `allow: [contact]`.
    Contact,
    /// Blocked by an admin action.
    Blocked,
}

/// What the trust tree keeps per address, as the key's prefix.
#[derive(Debug, Clone, Copy)]
enum TrustKey {
    Mark(Mark),
    Credits,
    Caller,
}

fn trust_key(kind: TrustKey, address: &Address) -> Vec<u8> {
    let prefix = match kind {
        TrustKey::Mark(Mark::Contact) => "contact",
        TrustKey::Mark(Mark::Blocked) => "blocked",
        TrustKey::Credits => "credits",
        TrustKey::Caller => "caller",
    };
    format!("{prefix}:{address}").into_bytes()
}

/// How a job finishes: answer now, or once the batch it is in has been flushed.
enum Completion {
    Now(Box<dyn FnOnce() + Send>),
    AfterFlush(Box<dyn FnOnce(Result<(), String>) + Send>),
    /// Flush, close sled (releasing its lock on the directory), then answer.
    Close(Box<dyn FnOnce(Result<(), String>) + Send>),
}

type Job = Box<dyn FnOnce(&Trees) -> Completion + Send>;

/// sled's page cache; its default (1 GiB) would let a busy node's memory grow far past
/// what the sessions need.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Jobs waiting for the store thread.
const JOB_QUEUE: usize = 4096;
/// Durable writes that share one flush at most.
const MAX_BATCH: usize = 512;

/// Handle to the store; cheap to clone.
///
/// One thread owns sled and runs jobs in order, so blocking calls never touch the async
/// workers and a read always sees the writes queued before it. Durable writes are
/// answered after a flush that every write of the same batch shares (group commit).
#[derive(Clone)]
pub struct Store {
    jobs: tokio::sync::mpsc::Sender<Job>,
    metrics: StoreMetrics,
}

impl Store {
    /// Opens (or creates) the store and marks sessions left running by a previous process
    /// as interrupted (reading only those, from the index). Returns the store and how
    /// many sessions were marked. A store written before the session index existed has
    /// it built here, once: the only time every record is read.
    pub fn open(path: &Path, result_ttl: u64, now: u64) -> Result<(Store, usize), StoreError> {
        let trees = Trees::open(path)?;
        index::build_if_missing(&trees)?;
        let mut marked = 0;
        for key in index::running(&trees)? {
            let Some(bytes) = trees.sessions.get(&key)? else {
                // Cannot happen (one transaction writes both), but must not stop a start.
                index::remove(&trees, &key)?;
                continue;
            };
            let mut rec: SessionRecord = serde_json::from_slice(&bytes)?;
            rec.status = SessionStatus::Interrupted;
            rec.expires = Some(now + result_ttl);
            rec.error = Some("the node stopped while this session was running".into());
            write_session(&trees, &key, &rec)?;
            marked += 1;
        }
        trees.db.flush()?;
        let (jobs, rx) = tokio::sync::mpsc::channel(JOB_QUEUE);
        let metrics = StoreMetrics::default();
        let counted = metrics.clone();
        std::thread::Builder::new()
            .name("oonode-store".into())
            .spawn(move || run_store(trees, rx, counted))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok((Store { jobs, metrics }, marked))
    }

    /// What the store thread counts, for `/metrics`.
    pub(crate) fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// Jobs waiting for the store thread.
    pub(crate) fn queued(&self) -> usize {
        JOB_QUEUE - self.jobs.capacity()
    }

    /// Runs `f` on the store thread; with `durable`, answers only once it is flushed.
    async fn call<T, F>(&self, durable: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |trees| {
            let result = f(trees);
            if durable && result.is_ok() {
                Completion::AfterFlush(Box::new(move |flushed| {
                    let _ = tx.send(flushed.map_err(StoreError::Flush).and(result));
                }))
            } else {
                Completion::Now(Box::new(move || {
                    let _ = tx.send(result);
                }))
            }
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes a session under `key` (its scope and id) durably (flushed before
    /// returning): what was accepted survives a crash.
    pub async fn put_session(&self, key: String, rec: SessionRecord) -> Result<(), StoreError> {
        self.call(true, move |t| write_session(t, key.as_bytes(), &rec))
            .await
    }

    /// Reads a session; an expired one reads as absent even before the sweeper runs.
    pub async fn get_session(
        &self,
        key: String,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.call(false, move |t| match t.sessions.get(key.as_bytes())? {
            Some(bytes) => {
                let rec: SessionRecord = serde_json::from_slice(&bytes)?;
                Ok((!rec.is_expired(now)).then_some(rec))
            }
            None => Ok(None),
        })
        .await
    }

    /// One page of the sessions of a scope (`scope` is the prefix its session keys
    /// share, `Scope::prefix`), newest first: at most `limit` (1 to [`MAX_PAGE`]), after
    /// `cursor`. Reads the index only, at most `limit + 1` entries of it.
    pub async fn list_sessions(
        &self,
        scope: String,
        limit: usize,
        cursor: Option<PageCursor>,
        now: u64,
    ) -> Result<SessionPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        self.call(false, move |t| {
            index::page(&t.list, scope.as_bytes(), limit, cursor.as_ref(), now)
        })
        .await
    }

    /// Remembers a signed message's replay key until `expires`. Returns false if it was
    /// already there: the message is a replay. Atomic, and flushed before returning.
    pub async fn record_seen(&self, key: String, expires: u64) -> Result<bool, StoreError> {
        self.call(true, move |t| {
            index::record_seen(t, key.as_bytes(), expires)
        })
        .await
    }

    /// Keeps one signed reply of a session (a STREAM chunk, or the final reply under
    /// [`FINAL_SEQ`]). Queued without waiting for it: jobs run in order, so any later
    /// read sees it, and the durable session write that follows flushes it.
    pub async fn put_reply(
        &self,
        session_id: String,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        let job: Job = Box::new(move |t| {
            if let Err(e) = t.chunks.insert(chunk_key(&session_id, seq), bytes) {
                tracing::warn!(error = %e, "keeping a reply failed");
            }
            Completion::Now(Box::new(|| {}))
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Forgets a session's kept replies: a new turn numbers its chunks from 1 again, and
    /// a resuming client must only ever see the latest turn's. Queued like `put_reply`.
    pub async fn clear_replies(&self, session_id: String) -> Result<(), StoreError> {
        let job: Job = Box::new(move |t| {
            let mut prefix = session_id.into_bytes();
            prefix.push(0);
            for key in t.chunks.scan_prefix(&prefix).keys().flatten() {
                let _ = t.chunks.remove(key);
            }
            Completion::Now(Box::new(|| {}))
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// The kept replies of a session with a sequence number above `after`, in order (the
    /// final reply, if any, last).
    pub async fn replies_after(
        &self,
        session_id: String,
        after: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.call(false, move |t| {
            let start = chunk_key(&session_id, after.saturating_add(1));
            let end = chunk_key(&session_id, FINAL_SEQ);
            let mut out = Vec::new();
            for item in t.chunks.range(start..=end) {
                let (key, bytes) = item?;
                let seq =
                    u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8-byte suffix"));
                out.push((seq, bytes.to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// Deletes sessions expired by `now` (with their kept replies) and replay keys, at
    /// most [`SWEEP_BATCH`](index::SWEEP_BATCH) of each, found through the expiry
    /// index (nothing else is read). Call again while [`Swept::more`] says so.
    pub async fn sweep(&self, now: u64) -> Result<Swept, StoreError> {
        self.call(true, move |t| {
            let due = index::due_sessions(t, now, index::SWEEP_BATCH)?;
            let mut sessions = Vec::with_capacity(due.len());
            for key in &due {
                index::remove(t, key)?;
                let mut prefix = key.to_vec();
                prefix.push(0);
                for chunk in t.chunks.scan_prefix(&prefix).keys() {
                    t.chunks.remove(chunk?)?;
                }
                sessions.push(String::from_utf8_lossy(key).into_owned());
            }
            let keys = index::sweep_seen(t, now, index::SWEEP_BATCH)?;
            let more = due.len() == index::SWEEP_BATCH || keys == index::SWEEP_BATCH;
            Ok(Swept {
                sessions,
                keys,
                more,
            })
        })
        .await
    }

    /// Whether a trust mark is set for an address.
    pub async fn has_mark(&self, mark: Mark, address: Address) -> Result<bool, StoreError> {
        self.call(false, move |t| {
            Ok(t.trust
                .contains_key(trust_key(TrustKey::Mark(mark), &address))?)
        })
        .await
    }

    /// Sets or clears a trust mark, durably. Returns whether it changed anything.
    pub async fn set_mark(
        &self,
        mark: Mark,
        address: Address,
        on: bool,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.call(true, move |t| {
            let key = trust_key(TrustKey::Mark(mark), &address);
            Ok(if on {
                t.trust.insert(key, &now.to_be_bytes())?.is_none()
            } else {
                t.trust.remove(key)?.is_some()
            })
        })
        .await
    }

    pub async fn credits(&self, address: Address) -> Result<u64, StoreError> {
        self.call(false, move |t| {
            Ok(read_u64(
                t.trust.get(trust_key(TrustKey::Credits, &address))?,
            ))
        })
        .await
    }

    /// Adds credits, durably; returns the new balance.
    pub async fn add_credits(&self, address: Address, amount: u64) -> Result<u64, StoreError> {
        self.call(true, move |t| {
            let key = trust_key(TrustKey::Credits, &address);
            let balance = read_u64(t.trust.get(&key)?).saturating_add(amount);
            t.trust.insert(key, &balance.to_be_bytes())?;
            Ok(balance)
        })
        .await
    }

    /// Takes `amount` credits if the balance covers it, durably. `Ok(remaining)` or
    /// `Err(balance)` when it does not. Atomic: jobs run one at a time.
    pub async fn charge(
        &self,
        address: Address,
        amount: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        self.call(true, move |t| {
            let key = trust_key(TrustKey::Credits, &address);
            let balance = read_u64(t.trust.get(&key)?);
            if balance < amount {
                return Ok(Err(balance));
            }
            t.trust.insert(key, &(balance - amount).to_be_bytes())?;
            Ok(Ok(balance - amount))
        })
        .await
    }

    /// Counts a call from `address`; returns its history before this call.
    pub async fn record_call(
        &self,
        address: Address,
        now: u64,
    ) -> Result<CallerHistory, StoreError> {
        self.call(false, move |t| {
            let key = trust_key(TrustKey::Caller, &address);
            let before: CallerHistory = match t.trust.get(&key)? {
                Some(bytes) => serde_json::from_slice(&bytes)?,
                None => CallerHistory {
                    first_seen: now,
                    calls: 0,
                },
            };
            let after = CallerHistory {
                calls: before.calls + 1,
                ..before
            };
            t.trust.insert(key, serde_json::to_vec(&after)?)?;
            Ok(before)
        })
        .await
    }

    /// Flushes everything written so far.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(true, |_| Ok(())).await
    }

    /// Flushes and closes the store; later calls on any handle fail with `Closed`. Once
    /// this returns, the directory can be opened again.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |_| {
            Completion::Close(Box::new(move |flushed| {
                let _ = tx.send(flushed.map_err(StoreError::Flush));
            }))
        });
        if self.jobs.send(job).await.is_err() {
            return Ok(()); // Already closed.
        }
        rx.await.unwrap_or(Ok(()))
    }
}

impl Trees {
    fn open(path: &Path) -> Result<Trees, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Trees {
            sessions: db.open_tree(SESSIONS)?,
            seen: db.open_tree(SEEN)?,
            chunks: db.open_tree(CHUNKS)?,
            trust: db.open_tree(TRUST)?,
            meta: db.open_tree(SESSION_META)?,
            list: db.open_tree(SESSION_LIST)?,
            expiry: db.open_tree(SESSION_EXPIRY)?,
            running: db.open_tree(SESSION_RUNNING)?,
            seen_expiry: db.open_tree(SEEN_EXPIRY)?,
            db,
        })
    }
}

/// What one sweeping job removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The keys of the sessions removed.
    pub sessions: Vec<String>,
    /// How many replay keys went.
    pub keys: usize,
    /// Whether more may be due: the job stopped at its bound.
    pub more: bool,
}

/// Writes a session's record and index entries together (see `index.rs`).
fn write_session(t: &Trees, key: &[u8], rec: &SessionRecord) -> Result<(), StoreError> {
    let meta = SessionMeta {
        session_id: rec.session_id.clone(),
        status: rec.status,
        created: rec.created,
        expires: rec.expires,
    };
    index::put(t, key, &serde_json::to_vec(rec)?, &meta)
}

/// The store thread: runs jobs in order; all durable jobs of a batch share one flush.
/// Ends (after a last flush) when every handle is dropped.
fn run_store(trees: Trees, mut jobs: tokio::sync::mpsc::Receiver<Job>, metrics: StoreMetrics) {
    let mut closing = None;
    while let Some(first) = jobs.blocking_recv() {
        let mut waiting = Vec::new();
        // Answers that come after a durable write in the batch wait for its flush, so
        // that nobody sees (and acts on) state a crash could still take back.
        let mut after_flush: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job(&trees) {
                Completion::Now(answer) if waiting.is_empty() => answer(),
                Completion::Now(answer) => after_flush.push(answer),
                Completion::AfterFlush(answer) => waiting.push(answer),
                Completion::Close(answer) => {
                    closing = Some(answer);
                    break;
                }
            }
            if waiting.len() < MAX_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        if !waiting.is_empty() {
            let began = std::time::Instant::now();
            let flushed = trees.db.flush().map(|_| ()).map_err(|e| e.to_string());
            metrics.flushes.inc();
            metrics.flush_seconds.observe(began.elapsed().as_secs_f64());
            metrics.writes_per_flush.observe(waiting.len() as f64);
            for answer in waiting {
                answer(flushed.clone());
            }
        }
        for answer in after_flush {
            answer();
        }
        if closing.is_some() {
            break;
        }
    }
    jobs.close();
    let flushed = trees.db.flush().map(|_| ()).map_err(|e| e.to_string());
    drop(trees);
    if let Some(answer) = closing {
        answer(flushed);
    }
}

fn read_u64(value: Option<sled::IVec>) -> u64 {
    value
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
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
            secret_hash: None,
            origin: None,
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
        store.clear_replies("s2".into()).await.unwrap();
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
    async fn credits_are_charged_only_when_they_cover_the_amount() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let a = crate::identity::Identity::from_seed([1; 32]).address();
        assert_eq!(store.charge(a, 10).await.unwrap(), Err(0));
        assert_eq!(store.add_credits(a, 15).await.unwrap(), 15);
        assert_eq!(store.charge(a, 10).await.unwrap(), Ok(5));
        assert_eq!(store.charge(a, 10).await.unwrap(), Err(5));
        assert!(store.set_mark(Mark::Contact, a, true, 1).await.unwrap());
        assert!(store.has_mark(Mark::Contact, a).await.unwrap());
        assert!(!store.has_mark(Mark::Blocked, a).await.unwrap());
        assert_eq!(store.record_call(a, 7).await.unwrap().calls, 0);
        assert_eq!(
            store.record_call(a, 9).await.unwrap(),
            CallerHistory {
                first_seen: 7,
                calls: 1
            }
        );
    }

    #[tokio::test]
    async fn running_sessions_become_interrupted_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
            store
                .put_session("a".into(), record("a", SessionStatus::Running, None))
                .await
                .unwrap();
            store
                .put_session("b".into(), record("b", SessionStatus::Done, Some(1000)))
                .await
                .unwrap();
            store.close().await.unwrap();
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
            .put_session("old".into(), record("old", SessionStatus::Done, Some(150)))
            .await
            .unwrap();
        store
            .put_session("run".into(), record("run", SessionStatus::Running, None))
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
            Swept {
                sessions: vec!["old".to_string()],
                keys: 1,
                more: false
            }
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

    /// Every index entry, as `(tree, key)`, to compare with what the records imply.
    async fn index_entries(store: &Store) -> Vec<(&'static str, Vec<u8>)> {
        store
            .call(false, |t| {
                let mut out = Vec::new();
                for (name, tree) in [
                    ("meta", &t.meta),
                    ("list", &t.list),
                    ("expiry", &t.expiry),
                    ("running", &t.running),
                ] {
                    for key in tree.iter().keys() {
                        out.push((name, key?.to_vec()));
                    }
                }
                Ok(out)
            })
            .await
            .unwrap()
    }

    fn in_order(expires: u64, key: &str) -> Vec<u8> {
        [&expires.to_be_bytes()[..], key.as_bytes()].concat()
    }

    fn listed(scope: &str, created: u64, id: &str) -> Vec<u8> {
        [scope.as_bytes(), &(!created).to_be_bytes(), id.as_bytes()].concat()
    }

    #[tokio::test]
    async fn the_index_follows_every_write_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let key = "sA/one";
        store
            .put_session(key.into(), record("one", SessionStatus::Running, None))
            .await
            .unwrap();
        assert_eq!(
            index_entries(&store).await,
            vec![
                ("meta", key.as_bytes().to_vec()),
                ("list", listed("sA/", 100, "one")),
                ("running", key.as_bytes().to_vec()),
            ]
        );
        // Done: no longer running, now due at 150; still listed once.
        store
            .put_session(key.into(), record("one", SessionStatus::Done, Some(150)))
            .await
            .unwrap();
        assert_eq!(
            index_entries(&store).await,
            vec![
                ("meta", key.as_bytes().to_vec()),
                ("list", listed("sA/", 100, "one")),
                ("expiry", in_order(150, key)),
            ]
        );
        // Another turn moves its expiry (and, were it ever to change, its creation time).
        let mut later = record("one", SessionStatus::Done, Some(190));
        later.created = 120;
        store.put_session(key.into(), later).await.unwrap();
        assert_eq!(
            index_entries(&store).await,
            vec![
                ("meta", key.as_bytes().to_vec()),
                ("list", listed("sA/", 120, "one")),
                ("expiry", in_order(190, key)),
            ]
        );
        let page = store
            .list_sessions("sA/".into(), 10, None, 100)
            .await
            .unwrap();
        assert_eq!(page.sessions.len(), 1);
        assert_eq!(page.sessions[0].created, 120);
        // Not due yet, then due: the record and every entry go.
        assert!(store.sweep(189).await.unwrap().sessions.is_empty());
        assert_eq!(store.sweep(190).await.unwrap().sessions, vec![key]);
        assert!(index_entries(&store).await.is_empty());
        assert!(store.get_session(key.into(), 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn pages_list_every_session_once_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let mut expected = Vec::new();
        for i in 0..137u64 {
            let id = format!("s{i:03}");
            let mut rec = record(&id, SessionStatus::Done, Some(10_000));
            // Several share a second: those are listed by id.
            rec.created = 1_000 + i / 3;
            expected.push((rec.created, id.clone()));
            store.put_session(format!("sA/{id}"), rec).await.unwrap();
        }
        // Neighbours on both sides of the scope, and an expired session within it.
        for scope in ["a0/", "sB/", "sA0/"] {
            let rec = record("x", SessionStatus::Done, Some(10_000));
            store.put_session(format!("{scope}x"), rec).await.unwrap();
        }
        let mut gone = record("gone", SessionStatus::Done, Some(50));
        gone.created = 5_000;
        store.put_session("sA/gone".into(), gone).await.unwrap();
        expected.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();

        for limit in [1, 10, 50, 137, 200] {
            let mut seen = Vec::new();
            let mut cursor = None;
            let mut pages = 0;
            loop {
                let page = store
                    .list_sessions("sA/".into(), limit, cursor.take(), 100)
                    .await
                    .unwrap();
                assert!(page.sessions.len() <= limit);
                seen.extend(page.sessions.into_iter().map(|m| m.session_id));
                pages += 1;
                match page.next {
                    // Through its text form, as a caller passes it back.
                    Some(next) => cursor = Some(PageCursor::parse(&next.to_string()).unwrap()),
                    None => break,
                }
                assert!(pages <= 200, "the pages never end");
            }
            assert_eq!(seen, expected, "limit {limit}");
        }
    }

    #[tokio::test]
    async fn a_cursor_moves_only_within_the_readers_own_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        for (scope, n) in [("sA/", 3u64), ("sB/", 5)] {
            for i in 0..n {
                let id = format!("{}{i}", &scope[1..2]);
                let mut rec = record(&id, SessionStatus::Done, Some(10_000));
                rec.created = 200 + i;
                store
                    .put_session(format!("{scope}{id}"), rec)
                    .await
                    .unwrap();
            }
        }
        let b_page = store
            .list_sessions("sB/".into(), 2, None, 100)
            .await
            .unwrap();
        let b_cursor = b_page.next.unwrap();
        // B's cursor, presented by A: a position among A's own sessions, never B's.
        let a_page = store
            .list_sessions("sA/".into(), 10, Some(b_cursor), 100)
            .await
            .unwrap();
        let ids: Vec<_> = a_page
            .sessions
            .iter()
            .map(|m| m.session_id.as_str())
            .collect();
        assert_eq!(ids, ["A2", "A1", "A0"]);
        // Whatever bytes a cursor holds, nothing past A's prefix is read.
        for raw in [
            vec![0u8; 9],
            vec![0xff; 40],
            b"\0\0\0\0\0\0\0\0/../sB/B1".to_vec(),
        ] {
            let page = store
                .list_sessions("sA/".into(), 10, Some(PageCursor(raw)), 100)
                .await
                .unwrap();
            assert!(page.sessions.iter().all(|m| m.session_id.starts_with('A')));
        }
        // An empty scope lists nothing, whoever's cursor it is given.
        let none = store
            .list_sessions("sC/".into(), 10, None, 100)
            .await
            .unwrap();
        assert_eq!(
            none,
            SessionPage {
                sessions: vec![],
                next: None
            }
        );
    }

    #[tokio::test]
    async fn a_store_written_without_the_index_is_indexed_once_on_open() {
        let dir = tempfile::tempdir().unwrap();
        // What the code before the index left: records and replay keys, nothing else.
        {
            let db = sled::open(dir.path()).unwrap();
            let sessions = db.open_tree(SESSIONS).unwrap();
            for (key, status, expires, created) in [
                ("sA/run", SessionStatus::Running, None, 300),
                ("sA/done", SessionStatus::Done, Some(1_000), 200),
                ("sA/old", SessionStatus::Done, Some(150), 100),
                ("sB/other", SessionStatus::Failed, Some(1_000), 400),
            ] {
                let mut rec = record(&key[3..], status, expires);
                rec.created = created;
                sessions
                    .insert(key, serde_json::to_vec(&rec).unwrap())
                    .unwrap();
            }
            let seen = db.open_tree(SEEN).unwrap();
            seen.insert("k-old", &150u64.to_be_bytes()).unwrap();
            seen.insert("k-new", &900u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let (store, marked) = Store::open(dir.path(), 60, 200).unwrap();
        assert_eq!(marked, 1);
        let page = store
            .list_sessions("sA/".into(), 10, None, 200)
            .await
            .unwrap();
        let listed: Vec<_> = page
            .sessions
            .iter()
            .map(|m| (m.session_id.as_str(), m.status))
            .collect();
        assert_eq!(
            listed,
            [
                ("run", SessionStatus::Interrupted),
                ("done", SessionStatus::Done)
            ]
        );
        assert_eq!(
            store.sweep(200).await.unwrap(),
            Swept {
                sessions: vec!["sA/old".into()],
                keys: 1,
                more: false
            }
        );
        assert!(!store.record_seen("k-new".into(), 900).await.unwrap());
        store.close().await.unwrap();

        // Built once: opening again reads the marker, not the records (a record the
        // index does not know stays unlisted, which shows nothing was scanned).
        {
            let db = sled::open(dir.path()).unwrap();
            let rec = record("sneaked", SessionStatus::Done, Some(1_000));
            db.open_tree(SESSIONS)
                .unwrap()
                .insert("sA/sneaked", serde_json::to_vec(&rec).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let (store, marked) = Store::open(dir.path(), 60, 250).unwrap();
        assert_eq!(marked, 0);
        let page = store
            .list_sessions("sA/".into(), 10, None, 250)
            .await
            .unwrap();
        let ids: Vec<_> = page
            .sessions
            .iter()
            .map(|m| m.session_id.as_str())
            .collect();
        assert_eq!(ids, ["run", "done"]);
        // The interrupted session now expires, through the index.
        assert_eq!(store.sweep(260).await.unwrap().sessions, vec!["sA/run"]);
    }

    #[tokio::test]
    async fn sweeping_goes_in_bounded_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let n = index::SWEEP_BATCH + 7;
        for i in 0..n {
            let id = format!("e{i}");
            let rec = record(&id, SessionStatus::Done, Some(150));
            store.put_session(format!("sA/{id}"), rec).await.unwrap();
        }
        let first = store.sweep(160).await.unwrap();
        assert_eq!(
            (first.sessions.len(), first.more),
            (index::SWEEP_BATCH, true)
        );
        let second = store.sweep(160).await.unwrap();
        assert_eq!((second.sessions.len(), second.more), (7, false));
        assert!(index_entries(&store).await.is_empty());
    }
}
