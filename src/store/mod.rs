//! Persistence in sled, inside co_dir: sessions (with an index of their metadata, see
//! `index.rs`), the ids of signed messages already seen, and the replies kept for resuming
//! clients. Callers run their store work under one lock (see [`Store`]), against an
//! in-memory layer over each sled tree that checkpoints move into sled (`layer.rs`).

mod history;
mod index;
mod layer;
mod packed;
mod uploads;
mod wal;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::Message;
use crate::identity::Address;
use crate::metrics::StoreMetrics;
use layer::Layered;

pub use history::{HistorySpan, HistoryWrite};
pub use index::{BadCursor, PageCursor, SessionMeta, SessionPage, DEFAULT_PAGE, MAX_PAGE};
pub use uploads::{Upload, UploadError, Uploads};

const SESSIONS: &str = "sessions";
/// Replay keys as versions before [`SEEN_AT`] kept them (key → when it may go, with its
/// order in [`SEEN_EXPIRY`]): read and swept until empty, never written again.
const SEEN: &str = "seen";
/// Replay keys, `expires` (u64 BE) ‖ key (`index.rs`).
const SEEN_AT: &str = "seen_at";
const REPLIES: &str = "replies";
/// Where stores written before [`REPLIES`] kept one reply per key; moved on open.
const CHUNKS: &str = "chunks";
/// Session histories, a message per entry (`history.rs`).
const HISTORY: &str = "history";
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
    #[error("store: cannot start a store thread: {0}")]
    Thread(String),
    #[error("store: closed")]
    Closed,
    /// The fresh layers reached [`MAX_FRESH_BYTES`] while a checkpoint could not finish
    /// (sled stalled or failing), and it did not finish within [`BEHIND_WAIT`] either.
    #[error("store: writing to disk is behind (a checkpoint has not finished); try again")]
    Behind,
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
    /// The state a caller passes back for the next turn. The history is stored apart
    /// (see `history`); a record written before that holds it here, as `messages`.
    pub session: Value,
    /// Where the session's history lies in the store. Not shown to readers: the
    /// dispatcher puts the messages into `session` for them.
    #[serde(default, skip_serializing_if = "HistorySpan::is_empty")]
    pub history: HistorySpan,
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

/// The sled trees, each with its in-memory layers (`layer.rs`), behind the store's lock.
struct Trees {
    db: sled::Db,
    sessions: Layered,
    /// Replay keys by when they may be forgotten, so that a turn's key lands beside the
    /// last turn's (`index::record_seen`).
    seen_at: Layered,
    /// The replay keys of an older store ([`SEEN`]) and their order ([`SEEN_EXPIRY`]).
    seen: Layered,
    /// session key → its latest turn's kept replies, for clients that resume
    /// ([`encode_replies`]).
    replies: Layered,
    /// `session key 0x00 n(be)` → message `n` of the session's history.
    history: Layered,
    trust: Layered,
    /// The session index (`index.rs`).
    meta: Layered,
    list: Layered,
    expiry: Layered,
    running: Layered,
    seen_expiry: Layered,
    /// Whether `seen` may still hold keys: until a sweep finds it empty, a replay key is
    /// looked for there too.
    legacy_seen: std::cell::Cell<bool>,
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

/// How much of a write must be on disk before its caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Answer after the log is synced (`fdatasync`), one sync shared by every write
    /// waiting when it begins (group commit). Survives a machine crash.
    Sync,
    /// Answer once the log is written (a killed process loses nothing answered); the log
    /// is synced within `window`. A machine crash can lose that window's writes.
    Batched { window: std::time::Duration },
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Batched {
            window: DEFAULT_SYNC_WINDOW,
        }
    }
}

impl Durability {
    /// Reads `sync` or `batched` (host.yaml, `--durability`).
    pub fn parse(text: &str) -> Option<Durability> {
        match text {
            "sync" => Some(Durability::Sync),
            "batched" => Some(Durability::default()),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Batched { .. } => "batched",
        }
    }
}

/// How long a batched write may wait for its sync.
pub const DEFAULT_SYNC_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// What opening the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Sessions left running by the previous process, now marked interrupted.
    pub interrupted: usize,
    /// Changes read back from the write-ahead log (written, not yet in sled's files).
    pub replayed: usize,
    /// The previous process did not close the store (killed, or the machine stopped).
    pub unclean: bool,
}

/// When a job's answer may go: once its batch is written to the log, or synced; or at
/// once, its log records carried to the next write (`Later`, `Trust`).
///
/// An answer also waits for the sync of what it may show, so that no answer shows what
/// a crash could still take back: `Written` and `Later { floor: true }` for the sync any
/// earlier job waits for (the floor), `Trust` only for that of the trust tree's last
/// synced change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Written,
    Durable,
    /// For a change nobody is answered about yet (a turn's start): its records go out
    /// with the next batch that writes (a turn's end writes before it answers, and so
    /// does a read that could see the change), or within [`DEFAULT_SYNC_WINDOW`] (in
    /// both modes). Saves the log write a turn's start made: 0.43 of the 1.55 log writes
    /// a request made at c = 64. Without `floor`, the answer waits for no sync at all:
    /// for a turn that goes on, whose own answer waits for a later sync that covers
    /// whatever it read.
    Later {
        floor: bool,
    },
    /// A read of the trust tree alone. Carried records never change that tree, so it
    /// leaves them carried; and it waits only for the sync of the tree's last change a
    /// synced job made, not for every sync under way (in `sync` mode, a request's trust
    /// check waited for another turn's sync before its own turn began).
    Trust,
}

impl Wait {
    /// Whether a batch of only such jobs may leave its records for the next write.
    fn carries(self) -> bool {
        matches!(self, Wait::Later { .. } | Wait::Trust)
    }
}

/// What the store gives a job: the trees, and the log records of its changes.
struct Ctx<'a> {
    trees: &'a Trees,
    log: Vec<u8>,
    hot: &'a mut history::HotHistories,
    /// The job changed the trust tree (for [`Wait::Trust`]).
    trust: bool,
}

impl Ctx<'_> {
    fn log(&mut self, op: wal::Op) {
        self.trust |= matches!(op, wal::Op::Trust { .. });
        op.encode_into(&mut self.log);
    }
}

/// Replay keys the store remembers written since it opened (about 10 bytes each), so
/// that a new one is known new without reading sled: more than 20 s of turns at the
/// most this machine answers.
const RECENT_REPLAY_KEYS: usize = 1 << 18;
/// sled's page cache; its default (1 GiB) would let a busy node's memory grow far past
/// what the sessions need.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// A checkpoint moves the trees' fresh layers into sled once the log holds this much...
const CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;
/// ... or the fresh layers are reckoned to hold this much (with the frozen ones, about
/// 70 MB of memory at most under a sustained c = 64 load, measured)...
const LAYER_BYTES: usize = 8 * 1024 * 1024;
/// ... or this long after the last checkpoint, whichever comes first.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// While a checkpoint writes (or, failing, is tried again), every change goes to fresh
/// layers. Past this, new work waits for it to finish (a turn's admission, a session
/// written, a replay key or a call recorded: [`Store::room`]); a disk on which sled's
/// flush stalls would otherwise let memory grow for as long as it stalls. An admitted
/// turn's own steps and reads go on: the runs in flight bound what they add. Under a
/// sustained c = 64 load the fresh layers stay near [`LAYER_BYTES`].
const MAX_FRESH_BYTES: usize = 4 * LAYER_BYTES;
/// How long a job waits for such a checkpoint before failing with [`StoreError::Behind`].
const BEHIND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const WAL_FILE: &str = "oonode.wal";
/// Present while a process has the store open: found at open, the last one did not
/// close it.
const OPEN_MARKER: &str = "oonode.open";

/// Handle to the store; cheap to clone.
///
/// Jobs run one at a time, in the order they were queued, so a read sees every write
/// queued before it. No thread of its own runs them: a caller queues its job, and if
/// the store's lock is free it runs every queued job, its own and others', and answers
/// them (flat combining); if not, it waits for the holder to run it. Alone, a job runs
/// on its caller's thread with no hand-over to another thread and back (a pair of
/// wake-ups each); under load, jobs run in batches, as many as queued meanwhile. A
/// batch's changes go to a write-ahead log (`wal.rs`) in one write before any of its
/// jobs is answered; [`Durability`] says whether answers also wait for the log's sync,
/// which one waiting job does, on its own thread, for every job waiting at the time
/// (group commit).
#[derive(Clone)]
pub struct Store {
    shared: std::sync::Arc<Shared>,
    durability: Durability,
}

/// What every handle shares.
struct Shared {
    /// The queue's receiving end, and the store (None once closed). Taken with
    /// `try_lock` by callers, who never block on it.
    state: std::sync::Mutex<(std::sync::mpsc::Receiver<Job>, Option<State>)>,
    /// Jobs for whoever holds `state` next (a lock-free queue).
    pending: std::sync::mpsc::Sender<Job>,
    sync: std::sync::Arc<Syncer>,
    checkpoints: std::sync::Arc<Kick>,
    /// Held while a checkpoint writes its frozen layers into sled, from before it takes
    /// `state`'s lock to freeze them: closing takes it before writing the layers itself, so a
    /// checkpoint's write never lands after (a packed chunk rewritten from what it read
    /// earlier would drop the entries written since).
    writing: std::sync::Mutex<()>,
    /// Jobs queued and not yet run (for `/metrics`); counted after they are sent and
    /// uncounted when taken, so it may dip below zero for a moment.
    queued: std::sync::atomic::AtomicIsize,
    /// The fresh layers passed [`MAX_FRESH_BYTES`] during a checkpoint: new jobs wait
    /// for `caught_up`, told when it ends (or the store closes).
    behind: std::sync::atomic::AtomicBool,
    caught_up: tokio::sync::Notify,
    metrics: StoreMetrics,
}

/// The open store, behind [`Shared::state`]'s lock.
struct State {
    trees: Trees,
    hot: history::HotHistories,
    wal: wal::Wal,
    /// The log records of the running job (kept to reuse its allocation).
    log: Vec<u8>,
    marker: PathBuf,
    checkpointed: std::time::Instant,
    /// The trees' frozen layers are not all in sled yet (a checkpoint is writing them,
    /// or failed to), and the log before them is kept as `oonode.wal.old`.
    frozen: bool,
}

impl Store {
    /// [`Store::open_with`] with the default durability; returns how many sessions were
    /// marked interrupted.
    pub fn open(path: &Path, result_ttl: u64, now: u64) -> Result<(Store, usize), StoreError> {
        let (store, opened) = Store::open_with(path, result_ttl, now, Durability::default())?;
        Ok((store, opened.interrupted))
    }

    /// Opens (or creates) the store: applies what the write-ahead log holds, then marks
    /// sessions left running by a previous process as interrupted (reading only those,
    /// from the index). A store written before the session index existed has it built
    /// here, once: the only time every record is read.
    pub fn open_with(
        path: &Path,
        result_ttl: u64,
        now: u64,
        durability: Durability,
    ) -> Result<(Store, Opened), StoreError> {
        let trees = Trees::open(path)?;
        let marker = path.join(OPEN_MARKER);
        let unclean = marker.exists();
        let (mut wal, ops, _) = wal::Wal::open(&path.join(WAL_FILE)).map_err(io_error)?;
        // Before the log: what it holds is newer than what sled held.
        move_chunks(&trees)?;
        let replayed = ops.len();
        for op in ops {
            apply(&trees, op)?;
        }
        if replayed > 0 {
            trees.settle()?;
        }
        wal.reset().map_err(io_error)?;
        index::build_if_missing(&trees)?;
        let mut marked = 0;
        for key in index::running(&trees)? {
            let Some(bytes) = trees.sessions.get(&key)? else {
                // Only a damaged store has one without the other; it must not stop a start.
                index::remove(&trees, &key, None)?;
                continue;
            };
            let mut rec: SessionRecord = serde_json::from_slice(&bytes)?;
            rec.status = SessionStatus::Interrupted;
            rec.expires = Some(now + result_ttl);
            rec.error = Some("the node stopped while this session was running".into());
            write_session(&trees, &key, &rec)?;
            marked += 1;
        }
        trees.settle()?;
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io_error)?;
        let metrics = StoreMetrics::default();
        let window = match durability {
            Durability::Batched { window } => Some(window),
            Durability::Sync => None,
        };
        let sync = Syncer::new(wal.sync_handle().map_err(io_error)?, window, &metrics);
        let checkpoints = std::sync::Arc::new(Kick::default());
        let (pending, queue) = std::sync::mpsc::channel();
        let shared = std::sync::Arc::new(Shared {
            state: std::sync::Mutex::new((
                queue,
                Some(State {
                    trees,
                    hot: history::HotHistories::new(),
                    wal,
                    log: Vec::new(),
                    marker,
                    checkpointed: std::time::Instant::now(),
                    frozen: false,
                }),
            )),
            pending,
            sync,
            checkpoints: checkpoints.clone(),
            writing: std::sync::Mutex::new(()),
            queued: Default::default(),
            behind: Default::default(),
            caught_up: Default::default(),
            metrics,
        });
        start_checkpointer(std::sync::Arc::downgrade(&shared), checkpoints)?;
        let (sync, weak) = (shared.sync.clone(), std::sync::Arc::downgrade(&shared));
        std::thread::Builder::new()
            .name("oonode-wal-sync".into())
            .spawn(move || sync.serve(weak, window.unwrap_or(DEFAULT_SYNC_WINDOW)))
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok((
            Store { shared, durability },
            Opened {
                interrupted: marked,
                replayed,
                unclean,
            },
        ))
    }

    /// The durability the store was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// What the store counts, for `/metrics`.
    pub(crate) fn metrics(&self) -> &StoreMetrics {
        &self.shared.metrics
    }

    /// Store jobs queued and not yet run.
    pub(crate) fn queued(&self) -> usize {
        self.shared
            .queued
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(0) as usize
    }

    /// Runs `f` as a store job and answers once its batch is written to the log, or
    /// synced with `Wait::Durable`. Also waits for the sync of any write an earlier job
    /// waits for (or less, as [`Wait`] says), so that no answer shows what a crash could
    /// still take back from an answer not yet given.
    async fn call<T, F>(&self, wait: Wait, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx) -> Result<T, StoreError> + Send + 'static,
    {
        self.call_with(move |_| wait, f).await
    }

    /// [`call`](Self::call), with what the answer waits for chosen by the job's result.
    async fn call_with<T, F, W>(&self, wait: W, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx) -> Result<T, StoreError> + Send + 'static,
        W: FnOnce(&Result<T, StoreError>) -> Wait + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.submit(Box::new(move |ctx: Option<&mut Ctx>| {
            let result = ctx.map_or(Err(StoreError::Closed), f);
            let wait = wait(&result);
            let answer: Answer = Box::new(move |stored| {
                let _ = tx.send((result, stored));
            });
            (wait, answer)
        }));
        // Ready at once when this caller ran the batch itself.
        let (result, stored) = rx.await.map_err(|_| StoreError::Closed)?;
        if let Some(position) = stored.map_err(Failed::into_error)? {
            self.shared.sync.wait(position).await?;
        }
        result
    }

    /// Runs `f` without waiting for its answer: a later job sees it, and the turn's end
    /// makes it durable. A failure is logged, not returned.
    async fn queue<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut Ctx) -> Result<(), StoreError> + Send + 'static,
    {
        self.shared.submit(Box::new(move |ctx: Option<&mut Ctx>| {
            if let Err(e) = ctx.map_or(Err(StoreError::Closed), f) {
                tracing::warn!(error = %e, "a queued store write failed");
            }
            let answer: Answer = Box::new(|_| {});
            (Wait::Later { floor: false }, answer)
        }));
        Ok(())
    }

    /// Waits while the store is behind ([`MAX_FRESH_BYTES`]), at most [`BEHIND_WAIT`]:
    /// called where new work enters, before it changes anything.
    async fn room(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let shared = &self.shared;
        if !shared.behind.load(Ordering::Acquire) {
            return Ok(());
        }
        shared.metrics.behind_waits.inc();
        let caught_up = async {
            loop {
                let told = shared.caught_up.notified();
                tokio::pin!(told);
                // Listening before looking: a checkpoint ending in between still wakes us.
                told.as_mut().enable();
                if !shared.behind.load(Ordering::Acquire) {
                    return;
                }
                told.await;
            }
        };
        tokio::time::timeout(BEHIND_WAIT, caught_up)
            .await
            .map_err(|_| StoreError::Behind)
    }

    /// What an answer the caller acts on waits for: the sync in `sync` mode, the write
    /// otherwise.
    fn committed(&self) -> Wait {
        match self.durability {
            Durability::Sync => Wait::Durable,
            Durability::Batched { .. } => Wait::Written,
        }
    }

    /// Writes a session under `key` (its scope and id); answered as [`Durability`] says.
    pub async fn put_session(&self, key: String, rec: SessionRecord) -> Result<(), StoreError> {
        self.room().await?;
        self.call(self.committed(), move |ctx| {
            log_session(ctx, key.as_bytes(), &rec, index::Prior::Read)
        })
        .await
    }

    /// A turn's admission in one job, so that a turn costs one store round trip before its
    /// agent runs: reads the session under `a.key` (with its history, if asked), lets
    /// `decide` judge it, and only if that accepts records the message's replay key and,
    /// when `decide` returns a running record, begins the turn with it (as
    /// [`begin_turn`](Self::begin_turn) does). A refusal changes nothing.
    pub async fn admit<T, E, F>(
        &self,
        a: Admission,
        decide: F,
    ) -> Result<Result<T, Refused<E>>, StoreError>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(Option<(SessionRecord, Vec<Message>)>) -> Result<(T, Option<SessionRecord>), E>
            + Send
            + 'static,
    {
        self.room().await?;
        // Carried: the turn's end writes it before the turn is answered. A kill before
        // then loses the replay key of a message signed before the restart, which the
        // unclean start's floor refuses; a key signed ahead of the clock is synced.
        // A turn that goes on waits for no sync here: its answer waits for a later one,
        // which covers what it read. A refusal is an answer, so it waits for the floor.
        let ahead = matches!(&a.seen, Some((_, _, true)));
        let wait = move |r: &Result<Result<T, Refused<E>>, StoreError>| match r {
            _ if ahead => Wait::Durable,
            Ok(Ok(_)) => Wait::Later { floor: false },
            _ => Wait::Later { floor: true },
        };
        self.call_with(wait, move |ctx| {
            let existing = match a.read {
                true => read_session(ctx, a.key.as_bytes(), a.now, a.with_history)?,
                false => None,
            };
            let (out, running) = match decide(existing) {
                Ok(v) => v,
                Err(e) => return Ok(Err(Refused::Decided(e))),
            };
            if let Some((key, expires, _)) = a.seen {
                if !note_seen(ctx, key, expires)? {
                    return Ok(Err(Refused::Replayed));
                }
            }
            if let Some(rec) = running {
                // An id the node just chose has no replies to forget.
                begin(ctx, a.key.as_bytes(), &rec, a.read)?;
            }
            Ok(Ok(out))
        })
        .await
    }

    /// A turn starts: the session's replies kept from its previous turn are forgotten (a
    /// new turn numbers its chunks from 1 again, and a resuming client must only ever
    /// see the latest turn's) and its record is written as running. Queued without
    /// waiting: a later read sees it, and the turn's end makes it durable.
    pub async fn begin_turn(&self, key: String, rec: SessionRecord) -> Result<(), StoreError> {
        self.queue(move |ctx| begin(ctx, key.as_bytes(), &rec, true))
            .await
    }

    /// A turn ends: its history change (`rec.history` is the span it results in), its
    /// replies (the STREAMs, then the final reply under [`FINAL_SEQ`]; all before the
    /// record says finished, so a follower that sees it finished finds them) and its
    /// record, in one job, answered as [`Durability`] says. The one store round trip on a
    /// turn's answer.
    pub async fn finish_turn(
        &self,
        key: String,
        history: Option<HistoryWrite>,
        replies: Vec<(u64, Vec<u8>)>,
        rec: SessionRecord,
    ) -> Result<(), StoreError> {
        self.call(self.committed(), move |ctx| {
            if let Some(w) = history {
                history::write(ctx, key.as_bytes(), w)?;
            }
            if !replies.is_empty() {
                log_replies(ctx, key.as_bytes(), &replies)?;
            }
            log_session(ctx, key.as_bytes(), &rec, index::Prior::Read)
        })
        .await
    }

    /// Reads a session; an expired one reads as absent even before the sweeper runs.
    pub async fn get_session(
        &self,
        key: String,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.call(Wait::Written, move |ctx| {
            Ok(read_session(ctx, key.as_bytes(), now, false)?.map(|(rec, _)| rec))
        })
        .await
    }

    /// A session and its history (the messages of its span; a record written before
    /// histories were stored apart keeps them in `session`). From memory for a session
    /// the node read or wrote lately.
    /// `with_history` false reads no messages (an empty list).
    pub async fn get_session_with_history(
        &self,
        key: String,
        now: u64,
        with_history: bool,
    ) -> Result<Option<(SessionRecord, Vec<Message>)>, StoreError> {
        self.call(Wait::Written, move |ctx| {
            read_session(ctx, key.as_bytes(), now, with_history)
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
        self.call(Wait::Written, move |ctx| {
            index::page(ctx.trees, scope.as_bytes(), limit, cursor.as_ref(), now)
        })
        .await
    }

    /// Remembers a signed message's replay key until `expires`. Returns false if it was
    /// already there with the same `expires`: the message is a replay. So `expires` must
    /// follow from what the message signs (its timestamp), never from when it came: the
    /// same key with another `expires` is another entry. Atomic; answered once written to
    /// the log, so a killed process still knows it, or with `synced` once the log is
    /// synced.
    ///
    /// A machine crash in `batched` mode can lose the keys of the last unsynced window;
    /// the node then refuses messages signed before its restart (`Opened::unclean`). That
    /// covers every lost key only if each was signed before the crash: a message signed
    /// ahead of the node's clock must have its key recorded `synced`.
    pub async fn record_seen(
        &self,
        key: String,
        expires: u64,
        synced: bool,
    ) -> Result<bool, StoreError> {
        self.room().await?;
        let wait = if synced { Wait::Durable } else { Wait::Written };
        self.call(wait, move |ctx| note_seen(ctx, key, expires))
            .await
    }

    /// The kept replies of a session with a sequence number above `after`, in order (the
    /// final reply, if any, last).
    pub async fn replies_after(
        &self,
        session_id: String,
        after: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.call(Wait::Written, move |ctx| {
            let mut kept = read_replies(ctx.trees, session_id.as_bytes())?;
            kept.retain(|(seq, _)| *seq > after);
            Ok(kept)
        })
        .await
    }

    /// Deletes sessions expired by `now` (with their kept replies) and replay keys, at
    /// most [`SWEEP_BATCH`](index::SWEEP_BATCH) of each, found through the expiry
    /// index (nothing else is read). Call again while [`Swept::more`] says so.
    pub async fn sweep(&self, now: u64) -> Result<Swept, StoreError> {
        self.call(Wait::Written, move |ctx| {
            let t = ctx.trees;
            let due = index::due_sessions(t, now, index::SWEEP_BATCH)?;
            let mut sessions = Vec::with_capacity(due.len());
            for key in &due {
                let prev = remove_session(t, key, None)?;
                ctx.hot.forget(key);
                ctx.log(wal::Op::RemoveSession {
                    key: key.to_vec(),
                    prev: prev.map(|m| m.to_vec()),
                });
                sessions.push(String::from_utf8_lossy(key).into_owned());
            }
            // Not logged: a replay key the log brings back after a crash is only swept
            // again.
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
        self.call(Wait::Trust, move |ctx| {
            Ok(ctx
                .trees
                .trust
                .contains_key(trust_key(TrustKey::Mark(mark), &address))?)
        })
        .await
    }

    /// Sets or clears a trust mark, as [`Durability`] says. Returns whether it changed
    /// anything.
    pub async fn set_mark(
        &self,
        mark: Mark,
        address: Address,
        on: bool,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.call(self.committed(), move |ctx| {
            let key = trust_key(TrustKey::Mark(mark), &address);
            let changed = if on {
                ctx.trees.trust.insert(&key, &now.to_be_bytes())?.is_none()
            } else {
                ctx.trees.trust.remove(&key)?.is_some()
            };
            let value = on.then(|| now.to_be_bytes().to_vec());
            ctx.log(wal::Op::Trust { key, value });
            Ok(changed)
        })
        .await
    }

    pub async fn credits(&self, address: Address) -> Result<u64, StoreError> {
        self.call(Wait::Written, move |ctx| {
            Ok(read_u64(
                ctx.trees
                    .trust
                    .get(trust_key(TrustKey::Credits, &address))?,
            ))
        })
        .await
    }

    /// Adds credits, as [`Durability`] says; returns the new balance.
    pub async fn add_credits(&self, address: Address, amount: u64) -> Result<u64, StoreError> {
        self.call(self.committed(), move |ctx| {
            let key = trust_key(TrustKey::Credits, &address);
            let balance = read_u64(ctx.trees.trust.get(&key)?).saturating_add(amount);
            log_trust(ctx, key, balance.to_be_bytes().to_vec())?;
            Ok(balance)
        })
        .await
    }

    /// Takes `amount` credits if the balance covers it, as [`Durability`] says.
    /// `Ok(remaining)` or `Err(balance)` when it does not. Atomic: jobs run one at a time.
    pub async fn charge(
        &self,
        address: Address,
        amount: u64,
    ) -> Result<Result<u64, u64>, StoreError> {
        self.call(self.committed(), move |ctx| {
            let key = trust_key(TrustKey::Credits, &address);
            let balance = read_u64(ctx.trees.trust.get(&key)?);
            if balance < amount {
                return Ok(Err(balance));
            }
            log_trust(ctx, key, (balance - amount).to_be_bytes().to_vec())?;
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
        self.room().await?;
        self.call(Wait::Written, move |ctx| {
            let key = trust_key(TrustKey::Caller, &address);
            let before: CallerHistory = match ctx.trees.trust.get(&key)? {
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
            log_trust(ctx, key, serde_json::to_vec(&after)?)?;
            Ok(before)
        })
        .await
    }

    /// Makes everything written so far durable (a sync of the log), whatever the mode.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Wait::Durable, |_| Ok(())).await
    }

    /// Checkpoints and closes the store; later calls on any handle fail with `Closed`.
    /// Once this returns, the directory can be opened again, as cleanly closed.
    pub async fn close(&self) -> Result<(), StoreError> {
        let state = self.shared.lock().1.take();
        // Jobs queued meanwhile are answered `Closed` by whoever takes the lock next;
        // those waiting for room are queued now, and answered so too.
        self.shared.caught_up();
        self.shared.run_pending();
        // A checkpoint writing now finishes first.
        let _writing = self.shared.writing();
        match state {
            Some(state) => state.close(&self.shared.sync).map_err(StoreError::Flush),
            None => Ok(()), // Already closed.
        }
    }
}

impl Trees {
    fn open(path: &Path) -> Result<Trees, StoreError> {
        wait_for_sled_unlock(path);
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            // The store decides when sled writes to disk (checkpoints); the
            // write-ahead log keeps what came since.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let tree = |name: &str| packed::Packed::open(&db, name).map(Layered::new);
        let seen = tree(SEEN)?;
        let legacy_seen = std::cell::Cell::new(!seen.disk().is_empty());
        Ok(Trees {
            sessions: tree(SESSIONS)?,
            // Looked up for every signed turn, nearly always for a key it lacks.
            seen_at: packed::Packed::open(&db, SEEN_AT)
                .map(|p| Layered::new(p.remembering(RECENT_REPLAY_KEYS)))?,
            seen,
            replies: tree(REPLIES)?,
            history: tree(HISTORY)?,
            trust: tree(TRUST)?,
            meta: tree(SESSION_META)?,
            list: tree(SESSION_LIST)?,
            expiry: tree(SESSION_EXPIRY)?,
            running: tree(SESSION_RUNNING)?,
            seen_expiry: tree(SEEN_EXPIRY)?,
            legacy_seen,
            db,
        })
    }

    fn all(&self) -> [&Layered; 11] {
        [
            &self.sessions,
            &self.seen_at,
            &self.seen,
            &self.replies,
            &self.history,
            &self.trust,
            &self.meta,
            &self.list,
            &self.expiry,
            &self.running,
            &self.seen_expiry,
        ]
    }

    /// What the fresh layers are reckoned to hold, in bytes.
    fn fresh_bytes(&self) -> usize {
        self.all().iter().map(|t| t.bytes()).sum()
    }

    /// Writes every layer into sled and flushes it (nobody else uses the store).
    fn settle(&self) -> Result<(), StoreError> {
        for tree in self.all() {
            tree.settle()?;
        }
        self.db.flush()?;
        Ok(())
    }
}

/// What [`Store::admit`] does in its one job.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The session's key (its scope and id).
    pub key: String,
    pub now: u64,
    /// Whether to read the session (not for an id the node just chose: nothing is
    /// stored under it).
    pub read: bool,
    /// Whether to read its history too.
    pub with_history: bool,
    /// A signed message's replay key, when it may be forgotten, and whether it must be
    /// synced before the answer (see [`Store::record_seen`]).
    pub seen: Option<(String, u64, bool)>,
}

/// Why [`Store::admit`] refused a turn.
#[derive(Debug)]
pub enum Refused<E> {
    /// Its `decide` did.
    Decided(E),
    /// The replay key was there already.
    Replayed,
}

/// Reads a session (an expired one reads as absent), with its history if asked.
fn read_session(
    ctx: &mut Ctx,
    key: &[u8],
    now: u64,
    with_history: bool,
) -> Result<Option<(SessionRecord, Vec<Message>)>, StoreError> {
    let Some(bytes) = ctx.trees.sessions.get(key)? else {
        return Ok(None);
    };
    let rec: SessionRecord = serde_json::from_slice(&bytes)?;
    if rec.is_expired(now) {
        return Ok(None);
    }
    let messages = match with_history {
        true => history::read(ctx, key, rec.history)?,
        false => Vec::new(),
    };
    Ok(Some((rec, messages)))
}

/// Begins a turn: the replies kept from the session's previous turn forgotten (when it
/// may have had one: `earlier`), its record written as running.
fn begin(ctx: &mut Ctx, key: &[u8], rec: &SessionRecord, earlier: bool) -> Result<(), StoreError> {
    if earlier {
        clear_replies(ctx.trees, key)?;
        ctx.log(wal::Op::ClearReplies {
            session: key.to_vec(),
        });
    }
    let prior = match earlier {
        true => index::Prior::Read,
        false => index::Prior::New,
    };
    log_session(ctx, key, rec, prior)
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

/// Writes a session's record and index entries (see `index.rs`), outside the log: for
/// start-up, before any job runs.
fn write_session(t: &Trees, key: &[u8], rec: &SessionRecord) -> Result<(), StoreError> {
    write_session_bytes(
        t,
        key,
        &serde_json::to_vec(rec)?,
        rec,
        None,
        index::Prior::Read,
    )?;
    Ok(())
}

/// [`write_session`] with the record already serialized (`record` is `rec`'s JSON), the
/// meta a logged write replaced (`stale`) and whether this replays the log (`repair`, see
/// `index::put`); returns the meta it replaced.
fn write_session_bytes(
    t: &Trees,
    key: &[u8],
    record: &[u8],
    rec: &SessionRecord,
    stale: Option<&SessionMeta>,
    prior: index::Prior,
) -> Result<Option<sled::IVec>, StoreError> {
    let meta = SessionMeta {
        session_id: rec.session_id.clone(),
        status: rec.status,
        created: rec.created,
        expires: rec.expires,
    };
    index::put(t, key, record, &meta, stale, prior)
}

/// Writes a session's record and index entries and logs it.
fn log_session(
    ctx: &mut Ctx,
    key: &[u8],
    rec: &SessionRecord,
    prior: index::Prior,
) -> Result<(), StoreError> {
    let record = serde_json::to_vec(rec)?;
    let prev = write_session_bytes(ctx.trees, key, &record, rec, None, prior)?;
    ctx.log(wal::Op::Session {
        key: key.to_vec(),
        record,
        prev: prev.map(|m| m.to_vec()),
    });
    Ok(())
}

/// Records a replay key and logs it; false (and nothing changes) if it was there already.
fn note_seen(ctx: &mut Ctx, key: String, expires: u64) -> Result<bool, StoreError> {
    let fresh = index::record_seen(ctx.trees, key.as_bytes(), expires)?;
    if fresh {
        ctx.log(wal::Op::Seen {
            key: key.into_bytes(),
            expires,
        });
    }
    Ok(fresh)
}

/// Keeps a turn's replies (in order, the final one last) as the session's, in place of
/// any kept before.
fn log_replies(
    ctx: &mut Ctx,
    session: &[u8],
    replies: &[(u64, Vec<u8>)],
) -> Result<(), StoreError> {
    let value = encode_replies(replies);
    ctx.trees.replies.put(session, &value[..]);
    ctx.log(wal::Op::Replies {
        session: session.to_vec(),
        value,
    });
    Ok(())
}

/// A turn's kept replies as one value, so that keeping them is one write and forgetting
/// them one removal: each reply as `seq` (u64 BE) ‖ length (u32 BE) ‖ bytes, in order.
fn encode_replies(replies: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let len = replies.iter().map(|(_, b)| 12 + b.len()).sum();
    let mut out = Vec::with_capacity(len);
    for (seq, bytes) in replies {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Reads [`encode_replies`]' value back; a damaged one is an error, not a panic.
fn decode_replies(mut value: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let damaged = || StoreError::Corrupt(serde::de::Error::custom("damaged kept replies"));
    let mut out = Vec::new();
    while !value.is_empty() {
        let (head, rest) = value.split_at_checked(12).ok_or_else(damaged)?;
        let seq = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        let (bytes, rest) = rest.split_at_checked(len).ok_or_else(damaged)?;
        out.push((seq, bytes.to_vec()));
        value = rest;
    }
    Ok(out)
}

/// A session's kept replies, in order.
fn read_replies(t: &Trees, session: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    match t.replies.get(session)? {
        Some(value) => decode_replies(&value),
        None => Ok(Vec::new()),
    }
}

/// Adds one reply to a session's kept ones (replacing one of the same `seq`): for a log
/// written before turns kept their replies as one value ([`wal::Op::Reply`]).
fn add_reply(t: &Trees, session: &[u8], seq: u64, bytes: Vec<u8>) -> Result<(), StoreError> {
    let kept = with_reply(t, session, seq, bytes)?;
    t.replies.put(session, encode_replies(&kept));
    Ok(())
}

/// A session's kept replies with `bytes` as reply `seq`, in order.
fn with_reply(
    t: &Trees,
    session: &[u8],
    seq: u64,
    bytes: Vec<u8>,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut kept = read_replies(t, session)?;
    kept.retain(|(s, _)| *s != seq);
    let at = kept.partition_point(|(s, _)| *s < seq);
    kept.insert(at, (seq, bytes));
    Ok(kept)
}

/// Moves the replies a store written before [`REPLIES`] kept (`session 0x00 seq(be)` →
/// reply, in the `chunks` tree) to one value per session, once, then drops that tree.
/// Idempotent: cut short, it starts again on the next open.
fn move_chunks(t: &Trees) -> Result<(), StoreError> {
    if !t
        .db
        .tree_names()
        .iter()
        .any(|n| &n[..] == CHUNKS.as_bytes())
    {
        return Ok(());
    }
    let chunks = t.db.open_tree(CHUNKS)?;
    let mut moved = 0usize;
    let mut session: Option<Vec<u8>> = None;
    let mut kept = Vec::new();
    let mut batch = layer::Entries::new();
    for item in chunks.iter() {
        let (key, bytes) = item?;
        // Keys shorter than a separator and a sequence number are damage: skipped.
        let Some(split) = key.len().checked_sub(9) else {
            continue;
        };
        let (owner, seq) = (&key[..split], &key[split + 1..]);
        if session.as_deref() != Some(owner) {
            if let Some(done) = session.replace(owner.to_vec()) {
                let value = encode_replies(&std::mem::take(&mut kept));
                batch.insert(done.into(), Some(value.into()));
                moved += 1;
                if moved % 1000 == 0 {
                    t.replies.disk().write(&std::mem::take(&mut batch))?;
                }
            }
        }
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        kept.push((seq, bytes.to_vec()));
    }
    if let Some(done) = session {
        batch.insert(done.into(), Some(encode_replies(&kept).into()));
        moved += 1;
    }
    t.replies.disk().write(&batch)?;
    t.db.flush()?;
    t.db.drop_tree(CHUNKS)?;
    t.db.flush()?;
    if moved > 0 {
        tracing::info!(
            sessions = moved,
            "kept replies moved to one value per session"
        );
    }
    Ok(())
}

fn log_trust(ctx: &mut Ctx, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
    ctx.trees.trust.put(&key, &value[..]);
    ctx.log(wal::Op::Trust {
        key,
        value: Some(value),
    });
    Ok(())
}

fn clear_replies(t: &Trees, session: &[u8]) -> Result<(), StoreError> {
    t.replies.delete(session);
    Ok(())
}

/// Removes every `session 0x00 …` key of `tree` (a session's replies, or its history).
fn clear_session_keys(tree: &Layered, session: &[u8]) -> Result<(), StoreError> {
    let mut prefix = session.to_vec();
    prefix.push(0);
    for key in tree.scan_prefix(&prefix).keys() {
        tree.delete(key?);
    }
    Ok(())
}

/// Removes a session, its index entries (and those of `stale`, see `index::put`), its
/// kept replies and its history; returns the meta it had.
fn remove_session(
    t: &Trees,
    key: &[u8],
    stale: Option<&SessionMeta>,
) -> Result<Option<sled::IVec>, StoreError> {
    let old = index::remove(t, key, stale)?;
    clear_replies(t, key)?;
    clear_session_keys(&t.history, key)?;
    Ok(old)
}

fn parse_meta(bytes: Option<Vec<u8>>) -> Result<Option<SessionMeta>, StoreError> {
    Ok(bytes.map(|b| serde_json::from_slice(&b)).transpose()?)
}

/// Applies one logged change to sled again (on open). Every change is a blind write,
/// so applying one sled already holds changes nothing.
fn apply(t: &Trees, op: wal::Op) -> Result<(), StoreError> {
    match op {
        wal::Op::Session { key, record, prev } => {
            let rec: SessionRecord = serde_json::from_slice(&record)?;
            let stale = parse_meta(prev)?;
            write_session_bytes(t, &key, &record, &rec, stale.as_ref(), index::Prior::Repair)?;
        }
        wal::Op::RemoveSession { key, prev } => {
            remove_session(t, &key, parse_meta(prev)?.as_ref())?;
        }
        wal::Op::Seen { key, expires } => index::put_seen(t, &key, expires),
        wal::Op::LegacySeen { key, expires } => index::put_legacy_seen(t, &key, expires),
        wal::Op::Reply {
            session,
            seq,
            bytes,
        } => add_reply(t, &session, seq, bytes)?,
        wal::Op::Replies { session, value } => t.replies.put(session, value),
        wal::Op::ClearReplies { session } => clear_replies(t, &session)?,
        wal::Op::History {
            session,
            drop_from,
            keep_from,
            at,
            messages,
        } => history::apply(t, &session, drop_from, keep_from, at, &messages)?,
        wal::Op::Trust { key, value } => match value {
            Some(v) => t.trust.put(key, v),
            None => t.trust.delete(key),
        },
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Flush(e.to_string())
}

/// A store job: runs under the lock and says what its answer waits for.
/// Given no `Ctx` when the store is closed.
type Job = Box<dyn FnOnce(Option<&mut Ctx>) -> (Wait, Answer) + Send>;
/// Answers a job once its batch is written: the log position it must see synced, if any.
type Answer = Box<dyn FnOnce(Result<Option<u64>, Failed>) + Send>;

/// Why a job's batch was not written.
#[derive(Debug, Clone)]
enum Failed {
    Closed,
    Write(std::sync::Arc<str>),
}

impl Failed {
    fn into_error(self) -> StoreError {
        match self {
            Failed::Closed => StoreError::Closed,
            Failed::Write(e) => StoreError::Flush(e.to_string()),
        }
    }
}

/// Jobs that share one write (and one sync) of the log at most.
const MAX_BATCH: usize = 512;

impl Shared {
    #[allow(clippy::type_complexity)]
    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (std::sync::mpsc::Receiver<Job>, Option<State>)> {
        // A job that panicked left sled's trees as sled left them: each change is atomic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A checkpoint ended (or the store closed): jobs waiting for room go on.
    fn caught_up(&self) {
        self.behind
            .store(false, std::sync::atomic::Ordering::Release);
        self.caught_up.notify_waiters();
    }

    /// Queues a job, then runs the queue if nobody else is running it.
    fn submit(&self, job: Job) {
        // The receiver lives as long as `self`.
        let _ = self.pending.send(job);
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.run_pending();
    }

    /// Takes the lock if it is free and runs queued jobs until none is left. Whoever
    /// lets go of the lock looks at the count of queued jobs again: a job queued while
    /// the lock was held is run by its holder, or by the one who queued it (who counts
    /// it only after queueing it, then tries the lock).
    fn run_pending(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let mut guard = match self.state.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let (queue, state) = &mut *guard;
            loop {
                let batch: Vec<Job> = queue.try_iter().take(MAX_BATCH).collect();
                if batch.is_empty() {
                    break;
                }
                self.queued
                    .fetch_sub(batch.len() as isize, Ordering::SeqCst);
                match state.as_mut() {
                    Some(st) => self.run_batch(st, batch),
                    None => {
                        for job in batch {
                            let (_, answer) = job(None);
                            answer(Err(Failed::Closed));
                        }
                    }
                }
            }
            drop(guard);
            if self.queued.load(Ordering::SeqCst) <= 0 {
                return;
            }
        }
    }

    /// Runs a batch of jobs, writes their log records in one write, then answers them.
    fn run_batch(&self, st: &mut State, batch: Vec<Job>) {
        let mut answers = Vec::with_capacity(batch.len());
        let mut durable = 0;
        let mut trust = false;
        let mut log = std::mem::take(&mut st.log);
        for job in batch {
            let mut ctx = Ctx {
                trees: &st.trees,
                log,
                hot: &mut st.hot,
                trust: false,
            };
            let (wait, answer) = job(Some(&mut ctx));
            log = ctx.log;
            trust |= ctx.trust;
            durable += usize::from(wait == Wait::Durable);
            answers.push((wait, answer));
        }
        if !log.is_empty() && answers.iter().all(|(wait, _)| wait.carries()) {
            // Nobody waits for these records: the next write takes them along.
            st.log = log;
            self.sync.carried();
            let floors = self.sync.floors();
            for (wait, answer) in answers {
                answer(Ok(floors.of(wait)));
            }
            return;
        }
        let written = st.wal.append(&log);
        let bytes = log.len() as u64;
        if bytes > 0 {
            self.metrics.log_writes.inc();
        }
        log.clear();
        st.log = log;
        let stored = match written {
            Ok(()) => {
                let position = self.sync.appended(bytes);
                self.sync.wrote(position, bytes > 0, durable, trust);
                Ok(position)
            }
            Err(e) => Err(Failed::Write(e.to_string().into())),
        };
        if st.full() {
            self.checkpoints.kick();
            if st.frozen && st.trees.fresh_bytes() >= MAX_FRESH_BYTES {
                self.behind
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let floors = self.sync.floors();
        for (wait, answer) in answers {
            answer(stored.clone().map(|position| match wait {
                Wait::Durable => Some(position),
                _ => floors.of(wait),
            }));
        }
    }
}

impl State {
    /// Whether the log reached [`CHECKPOINT_BYTES`] or the fresh layers [`LAYER_BYTES`].
    fn full(&self) -> bool {
        self.wal.len() >= CHECKPOINT_BYTES || self.trees.fresh_bytes() >= LAYER_BYTES
    }

    /// Whether the checkpointer should checkpoint now.
    fn checkpoint_due(&self) -> bool {
        self.full() || (self.pending() && self.checkpointed.elapsed() >= CHECKPOINT_EVERY)
    }

    /// Whether anything is not in sled yet: logged changes, or unlogged ones in memory
    /// (the sweeper's removal of replay keys).
    fn pending(&self) -> bool {
        self.wal.len() > 0 || self.trees.fresh_bytes() > 0
    }

    /// A checkpoint's first step, under the lock: the log so far synced and set aside
    /// (`oonode.wal.old`), and the fresh layers frozen, for [`Frozen::write`] to move into
    /// sled without the lock. If the last checkpoint did not finish, its frozen layers
    /// again (nothing is frozen twice); None if there is nothing to do.
    fn freeze(&mut self, sync: &Syncer) -> Result<Option<Frozen>, String> {
        let trees = if self.frozen {
            self.trees.all().map(|t| t.frozen())
        } else if self.pending() {
            let handle = self.wal.rotate().map_err(|e| e.to_string())?;
            // What the set-aside log holds is synced; later syncs sync the new one.
            sync.all_durable();
            sync.switch(handle);
            self.frozen = true;
            self.trees.all().map(|t| t.freeze())
        } else {
            return Ok(None);
        };
        Ok(Some(Frozen {
            db: self.trees.db.clone(),
            trees,
        }))
    }

    /// A checkpoint's last step, under the lock: sled holds the frozen layers, so the
    /// trees let them go. Returns the set-aside log, for the checkpointer to remove
    /// after letting go of the lock (as it frees the layers: both took 2-3 ms under it).
    fn thaw(&mut self) -> wal::SetAside {
        for tree in self.trees.all() {
            tree.thaw();
        }
        self.frozen = false;
        self.checkpointed = std::time::Instant::now();
        self.wal.set_aside()
    }

    /// Every layer moved into sled and flushed, then the logs emptied; then sled is
    /// closed (releasing its lock on the directory) and the marker of an open store
    /// removed.
    fn close(self, sync: &Syncer) -> Result<(), String> {
        let State {
            trees,
            mut wal,
            marker,
            ..
        } = self;
        trees.settle().map_err(|e| e.to_string())?;
        wal.reset().map_err(|e| e.to_string())?;
        sync.all_durable();
        std::fs::remove_file(&marker).map_err(|e| e.to_string())?;
        drop(trees);
        if let Some(dir) = marker.parent() {
            wait_for_sled_unlock(dir);
        }
        Ok(())
    }
}

/// The layers a checkpoint moves into sled, taken from under the lock.
struct Frozen {
    db: sled::Db,
    trees: [(packed::Packed, std::sync::Arc<layer::Entries>); 11],
}

impl Frozen {
    /// Writes the frozen layers into sled and flushes it, without the store's lock.
    fn write(&self) -> Result<(), StoreError> {
        for (disk, entries) in &self.trees {
            layer::write(disk, entries)?;
        }
        self.db.flush()?;
        Ok(())
    }
}

/// sled lets go of its lock on the directory (an `flock` on its `db` file) when the last
/// reference to it goes, and its I/O threads may drop theirs just after the database is
/// dropped: a directory closed a moment ago (in this process) can still be locked. So
/// closing and opening wait, at most a second, until the lock can be taken, and let it
/// go: a closed store opens again at once (with sled itself too), and a directory
/// another live process holds still fails in sled's open, as before.
#[cfg(unix)]
fn wait_for_sled_unlock(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        return;
    };
    for _ in 0..1000 {
        // SAFETY: flock on a descriptor this function owns, open for the whole call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above; the lock was just taken through this descriptor.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    tracing::warn!("sled still holds its lock a second after the store closed");
}

#[cfg(not(unix))]
fn wait_for_sled_unlock(_dir: &Path) {}

impl Drop for Shared {
    /// The last handle gone: closed as [`Store::close`] would.
    fn drop(&mut self) {
        if let Some(state) = self.lock().1.take() {
            if let Err(e) = state.close(&self.sync) {
                tracing::error!(error = %e, "closing the store failed");
            }
        }
        self.sync.stop();
        self.checkpoints.stop();
    }
}

/// A flag a thread sleeps on: set to wake it early, or to stop it.
#[derive(Default)]
struct Kick {
    state: std::sync::Mutex<(bool, bool)>,
    wake: std::sync::Condvar,
}

impl Kick {
    fn kick(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.0 {
            st.0 = true;
            self.wake.notify_one();
        }
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.wake.notify_one();
    }

    /// Sleeps until kicked or `timeout` passed; false once stopped.
    fn sleep(&self, timeout: std::time::Duration) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut st, _) = self
            .wake
            .wait_timeout_while(st, timeout, |(kicked, stop)| !*kicked && !*stop)
            .unwrap_or_else(|e| e.into_inner());
        st.0 = false;
        !st.1
    }
}

/// Checkpoints on a thread of its own, every [`CHECKPOINT_EVERY`] or when the log or
/// the fresh layers are full ([`State::full`]). The lock is held for two short steps:
/// freezing the fresh layers and setting the log aside ([`State::freeze`]), then letting
/// them go ([`State::thaw`]). Between the two, without it, as turns go on, the frozen
/// layers are written into sled and sled flushed. A crash at any point leaves the
/// set-aside log and the new one, which the next open replays in that order.
fn start_checkpointer(
    shared: std::sync::Weak<Shared>,
    kick: std::sync::Arc<Kick>,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("oonode-checkpoint".into())
        .spawn(move || {
            while kick.sleep(CHECKPOINT_EVERY) {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // Taken before the store's lock, never under it: nothing holds that
                // lock while waiting for another.
                let writing = shared.writing();
                let frozen = match shared.lock().1.as_mut() {
                    Some(st) if st.frozen || st.checkpoint_due() => st.freeze(&shared.sync),
                    Some(_) => continue,
                    None => return,
                };
                // Jobs queued during the freeze found the lock taken.
                shared.run_pending();
                let frozen = match frozen {
                    Ok(Some(frozen)) => frozen,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "store checkpoint failed; the log keeps growing");
                        continue;
                    }
                };
                if let Err(e) = frozen.write() {
                    tracing::error!(error = %e, "store checkpoint failed; it is tried again");
                    continue;
                }
                let set_aside = match shared.lock().1.as_mut() {
                    Some(st) => st.thaw(),
                    None => return,
                };
                shared.caught_up();
                shared.run_pending();
                // The layers' last references: freed here, not under the lock.
                drop(frozen);
                // Still holding `writing`, which closing waits for: this never removes
                // the set-aside log of a store opened in the directory after a close.
                if let Err(e) = set_aside.remove() {
                    tracing::error!(error = %e, "removing the checkpointed store log failed");
                }
                drop(writing);
            }
        })
        .map_err(|e| StoreError::Thread(e.to_string()))?;
    Ok(())
}

/// Syncs the log. A job that waits for its records to be durable syncs the log itself,
/// on its own thread, unless a sync is already under way: then it waits for that one and,
/// if that did not cover its records, leads the next (group commit: one sync serves every
/// job waiting when it began). No thread hand-off on a synced answer's path: a wake-up of
/// another thread and one back cost about as much as the sync itself here. A thread of
/// its own writes carried records within a window, and in `batched` mode syncs, within
/// `window`, writes nobody waits for.
///
/// Positions count the log's bytes since the store opened, across checkpoints, so a
/// job can wait for "my records are durable" whatever was reset since.
struct Syncer {
    /// The log file being appended to (a checkpoint sets the old one aside).
    file: std::sync::Mutex<std::sync::Arc<std::fs::File>>,
    state: std::sync::Mutex<SyncState>,
    wake: std::sync::Condvar,
    /// Bytes appended to the log since the store opened.
    appended: std::sync::atomic::AtomicU64,
    /// The highest position a job waits to see synced.
    wanted: std::sync::atomic::AtomicU64,
    /// The same, of the batches among them that changed the trust tree.
    trust_wanted: std::sync::atomic::AtomicU64,
    /// A waiting job is syncing: the others wait for it.
    leading: std::sync::atomic::AtomicBool,
    /// Durable up to here; or failed at the given position.
    synced: tokio::sync::watch::Sender<Synced>,
    batched: bool,
    metrics: StoreMetrics,
}

#[derive(Default)]
struct SyncState {
    /// A write nobody waits for is not synced yet (`batched` mode).
    dirty: bool,
    /// A batch left its records for the next write ([`Wait::Later`]).
    carried: bool,
    /// Jobs waiting for the next sync (for the metrics).
    waiting: usize,
    /// The thread sleeps until there is work: only then does new work wake it. Within
    /// its window it would only go back to sleep (in `sync` mode, where nothing sets
    /// `dirty`, every turn's carried start woke it: 0.6 context switches a request).
    idle: bool,
    /// Times the thread was woken for work (for tests).
    woken: u64,
    stop: bool,
}

impl SyncState {
    /// Wakes the thread if it sleeps until there is work.
    fn wake(&mut self, wake: &std::sync::Condvar) {
        if self.idle {
            self.idle = false;
            self.woken += 1;
            wake.notify_one();
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Synced {
    upto: u64,
    failed: Option<(u64, std::sync::Arc<str>)>,
}

/// What an answer that waits for no sync of its own batch waits for ([`Wait`]).
struct Floors {
    all: Option<u64>,
    trust: Option<u64>,
}

impl Floors {
    fn of(&self, wait: Wait) -> Option<u64> {
        match wait {
            Wait::Trust => self.trust,
            Wait::Later { floor: false } => None,
            Wait::Written | Wait::Durable | Wait::Later { floor: true } => self.all,
        }
    }
}

/// What one sync did: durable up to the first, or failed there.
type SyncOutcome = (u64, std::io::Result<()>);

impl Syncer {
    fn new(
        file: std::fs::File,
        window: Option<std::time::Duration>,
        metrics: &StoreMetrics,
    ) -> std::sync::Arc<Syncer> {
        std::sync::Arc::new(Syncer {
            file: std::sync::Mutex::new(std::sync::Arc::new(file)),
            state: Default::default(),
            wake: Default::default(),
            appended: Default::default(),
            wanted: Default::default(),
            trust_wanted: Default::default(),
            leading: Default::default(),
            synced: tokio::sync::watch::Sender::new(Synced::default()),
            batched: window.is_some(),
            metrics: metrics.clone(),
        })
    }

    /// The thread of its own: writes carried records ([`Wait::Later`]) within `window`
    /// when no batch took them first, and in `batched` mode syncs, within `window`,
    /// writes nobody waits for.
    fn serve(&self, shared: std::sync::Weak<Shared>, window: std::time::Duration) {
        loop {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.idle = true;
            let mut st = self
                .wake
                .wait_while(st, |st| !st.stop && !st.dirty && !st.carried)
                .unwrap_or_else(|e| e.into_inner());
            st.idle = false;
            // Let the window gather more of them.
            let (mut st, _) = self
                .wake
                .wait_timeout_while(st, window, |st| !st.stop)
                .unwrap_or_else(|e| e.into_inner());
            if st.stop {
                return;
            }
            if std::mem::take(&mut st.carried) {
                drop(st);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // Any job that writes takes the carried records along; this one only
                // does that. Run here, or by whoever holds the store.
                shared.submit(Box::new(|_| (Wait::Written, Box::new(|_| {}))));
                drop(shared);
                st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            }
            if !std::mem::take(&mut st.dirty) {
                continue;
            }
            drop(st);
            let outcome = self.sync_once();
            self.publish(outcome);
        }
    }

    /// Syncs the log as far as it was appended when called.
    fn sync_once(&self) -> SyncOutcome {
        use std::sync::atomic::Ordering;
        let waiting =
            std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).waiting);
        let target = self.appended.load(Ordering::Acquire);
        // Taken after `target`: a switch since then synced all of the old file.
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let began = std::time::Instant::now();
        let synced = file.sync_data();
        let m = &self.metrics;
        m.flushes.inc();
        m.flush_seconds.observe(began.elapsed().as_secs_f64());
        if waiting > 0 {
            m.writes_per_flush.observe(waiting as f64);
        }
        (target, synced)
    }

    /// Tells the waiting jobs what a sync did.
    fn publish(&self, (target, synced): SyncOutcome) {
        match synced {
            Ok(()) => self.synced.send_modify(|s| s.upto = s.upto.max(target)),
            Err(e) => {
                tracing::error!(error = %e, "syncing the store's log failed");
                let e: std::sync::Arc<str> = e.to_string().into();
                self.synced.send_modify(|s| s.failed = Some((target, e)));
            }
        }
    }

    /// Counts `bytes` appended (called under the store's lock); returns the log's end.
    fn appended(&self, bytes: u64) -> u64 {
        use std::sync::atomic::Ordering;
        self.appended.fetch_add(bytes, Ordering::AcqRel) + bytes
    }

    /// A batch ending at `position` was written (called under the store's lock):
    /// `durable` of its jobs wait for its sync (they sync it themselves); `wrote` says
    /// whether it wrote anything (for `batched` mode's sync within the window), `trust`
    /// whether it changed the trust tree.
    fn wrote(&self, position: u64, wrote: bool, durable: usize, trust: bool) {
        use std::sync::atomic::Ordering;
        if !wrote && durable == 0 {
            return;
        }
        if durable > 0 {
            self.wanted.fetch_max(position, Ordering::AcqRel);
            if trust {
                self.trust_wanted.fetch_max(position, Ordering::AcqRel);
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.waiting += durable;
        if wrote {
            // Every write takes the carried records along: the thread has none to write.
            st.carried = false;
            if durable == 0 && self.batched && !st.dirty {
                st.dirty = true;
                st.wake(&self.wake);
            }
        }
    }

    /// A batch left its records for the next write (called under the store's lock):
    /// the thread writes them within its window if no batch does first.
    fn carried(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.carried {
            st.carried = true;
            st.wake(&self.wake);
        }
    }

    /// The positions jobs before now wait for and are not synced yet: all of them, and
    /// those of the trust tree's changes.
    fn floors(&self) -> Floors {
        use std::sync::atomic::Ordering;
        let (wanted, trust) = (
            self.wanted.load(Ordering::Acquire),
            self.trust_wanted.load(Ordering::Acquire),
        );
        let upto = self.synced.borrow().upto;
        Floors {
            all: (wanted > upto).then_some(wanted),
            trust: (trust > upto).then_some(trust),
        }
    }

    /// Waits until the log is durable up to `position`, syncing it on this thread when
    /// no other job is.
    async fn wait(&self, position: u64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let mut rx = self.synced.subscribe();
        let mut yielded = false;
        loop {
            {
                let s = rx.borrow_and_update();
                if s.upto >= position {
                    return Ok(());
                }
                if let Some((at, e)) = &s.failed {
                    if *at >= position {
                        return Err(StoreError::Flush(e.to_string()));
                    }
                }
            }
            if !std::mem::replace(&mut yielded, true) {
                // Let the jobs ready on this thread write first, so that one sync
                // covers them too (with a single worker, nothing else would).
                tokio::task::yield_now().await;
                continue;
            }
            if !self.leading.swap(true, Ordering::AcqRel) {
                let outcome = self.sync_once();
                // Let go before telling: a job woken by the news that finds its records
                // not covered must be able to lead the next sync.
                self.leading.store(false, Ordering::Release);
                self.publish(outcome);
                continue;
            }
            rx.changed().await.map_err(|_| StoreError::Closed)?;
        }
    }

    /// Syncs `file` from now on (called under the store's lock, after the old one was
    /// synced and [`all_durable`](Self::all_durable) said so).
    fn switch(&self, file: std::fs::File) {
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(file);
    }

    /// A checkpoint made everything appended so far durable.
    fn all_durable(&self) {
        let end = self.appended.load(std::sync::atomic::Ordering::Acquire);
        self.synced.send_modify(|s| s.upto = s.upto.max(end));
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.wake.notify_one();
    }
}

fn read_u64(value: Option<sled::IVec>) -> u64 {
    value
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0)
}

/// `session 0x00 seq(be)`: the key of a session's message `seq` (in `history`); they
/// sort by `seq` within the session.
fn seq_key(session_id: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(session_id.len() + 9);
    key.extend_from_slice(session_id);
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::store) fn msgs(texts: &[&str]) -> Vec<Message> {
        texts
            .iter()
            .map(|t| Message {
                role: "user".into(),
                content: (*t).into(),
            })
            .collect()
    }

    /// Adds one reply to a session's kept ones, through the log as a turn's end keeps
    /// them.
    async fn put_reply(store: &Store, session: &str, seq: u64, bytes: Vec<u8>) {
        let session = session.to_owned();
        store
            .call(Wait::Written, move |ctx| {
                let kept = with_reply(ctx.trees, session.as_bytes(), seq, bytes)?;
                log_replies(ctx, session.as_bytes(), &kept)
            })
            .await
            .unwrap();
    }

    /// The admission of a new session `sA/{id}` by a signed message with id `id`.
    fn new_turn(id: &str) -> Admission {
        Admission {
            key: format!("sA/{id}"),
            now: 100,
            read: false,
            with_history: false,
            seen: Some((format!("id:{id}"), 700, false)),
        }
    }

    fn record(id: &str, status: SessionStatus, expires: Option<u64>) -> SessionRecord {
        SessionRecord {
            session_id: id.into(),
            status,
            prompt: "p".into(),
            result: None,
            session: Value::Null,
            history: HistorySpan::default(),
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
            put_reply(&store, "s", seq, seq.to_string().into_bytes()).await;
        }
        // A session whose id extends this one's must not leak in.
        put_reply(&store, "s2", 5, b"other".to_vec()).await;
        store
            .begin_turn("s2".into(), record("s2", SessionStatus::Running, None))
            .await
            .unwrap();
        assert!(store
            .replies_after("s2".into(), 0)
            .await
            .unwrap()
            .is_empty());
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
        assert!(store.record_seen("k".into(), 150, false).await.unwrap());
        assert!(!store.record_seen("k".into(), 150, false).await.unwrap());
        put_reply(&store, "old", 1, b"c1".to_vec()).await;
        put_reply(&store, "run", 1, b"r1".to_vec()).await;
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
        assert!(store.record_seen("k".into(), 500, false).await.unwrap());
    }

    /// The replay keys (`seen_at`), then an older store's keys (with their values) and
    /// the sweeper's order of them.
    async fn seen_trees(store: &Store) -> SeenTrees {
        store
            .call(Wait::Written, |ctx| {
                let t = ctx.trees;
                let keys = |tree: &Layered| {
                    tree.iter()
                        .keys()
                        .map(|k| k.map(|k| k.to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                };
                let legacy = t
                    .seen
                    .iter()
                    .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())));
                Ok((
                    keys(&t.seen_at)?,
                    legacy.collect::<Result<_, _>>()?,
                    keys(&t.seen_expiry)?,
                ))
            })
            .await
            .unwrap()
    }

    type SeenTrees = (Vec<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>, Vec<Vec<u8>>);

    /// A replayed key changes nothing; the same key with another expiry (which the
    /// dispatcher derives from a signed timestamp, so only the signer can change it) is
    /// another message.
    #[tokio::test]
    async fn a_replayed_key_leaves_the_seen_trees_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        assert!(store.record_seen("k".into(), 150, false).await.unwrap());
        let first = seen_trees(&store).await;
        assert_eq!(first, (vec![in_order(150, "k")], vec![], vec![]));
        assert!(!store.record_seen("k".into(), 150, false).await.unwrap());
        assert_eq!(seen_trees(&store).await, first);
        assert!(store.record_seen("k".into(), 900, false).await.unwrap());
        assert!(!store.record_seen("k".into(), 900, false).await.unwrap());
        // And each goes when its time comes.
        assert_eq!(store.sweep(160).await.unwrap().keys, 1);
        assert_eq!(
            seen_trees(&store).await,
            (vec![in_order(900, "k")], vec![], vec![])
        );
        assert_eq!(store.sweep(900).await.unwrap().keys, 1);
        assert_eq!(seen_trees(&store).await, (vec![], vec![], vec![]));
    }

    /// The replay keys a version before `seen_at` wrote (in sled, and in a log it did not
    /// checkpoint) still refuse their messages, whatever expiry a replay names, until
    /// the sweeper removes them; then the older trees are no longer read.
    #[tokio::test]
    async fn replay_keys_an_older_version_wrote_still_refuse_until_swept() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        {
            let db = sled::open(&live).unwrap();
            let seen = db.open_tree(SEEN).unwrap();
            let order = db.open_tree(SEEN_EXPIRY).unwrap();
            seen.insert("k-disk", &150u64.to_be_bytes()).unwrap();
            order.insert(in_order(150, "k-disk"), &[]).unwrap();
            db.flush().unwrap();
        }
        let (store, _) = Store::open(&live, 60, 100).unwrap();
        assert!(store.record_seen("fresh".into(), 700, false).await.unwrap());
        // An older version's log record, replayed after a kill.
        store
            .call(Wait::Written, |ctx| {
                ctx.log(wal::Op::LegacySeen {
                    key: b"k-log".to_vec(),
                    expires: 300,
                });
                Ok(())
            })
            .await
            .unwrap();
        let killed = dir.path().join("killed");
        snapshot(&live, &killed);
        store.close().await.unwrap();
        let (store, opened) = Store::open_with(&killed, 60, 100, Durability::default()).unwrap();
        assert!(opened.unclean && opened.replayed >= 2, "{opened:?}");
        for key in ["k-disk", "k-log"] {
            for expires in [150, 300, 700] {
                assert!(
                    !store.record_seen(key.into(), expires, false).await.unwrap(),
                    "{key} {expires}"
                );
            }
        }
        assert_eq!(seen_trees(&store).await.0, vec![in_order(700, "fresh")]);
        assert_eq!(store.sweep(200).await.unwrap().keys, 1);
        assert!(store
            .record_seen("k-disk".into(), 800, false)
            .await
            .unwrap());
        assert!(!store.record_seen("k-log".into(), 800, false).await.unwrap());
        let legacy_read = || store.call(Wait::Written, |ctx| Ok(ctx.trees.legacy_seen.get()));
        assert!(legacy_read().await.unwrap());
        assert_eq!(store.sweep(300).await.unwrap().keys, 1);
        assert!(!legacy_read().await.unwrap());
        assert!(store.record_seen("k-log".into(), 800, false).await.unwrap());
        assert_eq!(
            seen_trees(&store).await,
            (
                vec![
                    in_order(700, "fresh"),
                    in_order(800, "k-disk"),
                    in_order(800, "k-log")
                ],
                vec![],
                vec![]
            )
        );
    }

    /// Every index entry, as `(tree, key)`, to compare with what the records imply.
    async fn index_entries(store: &Store) -> Vec<(&'static str, Vec<u8>)> {
        store
            .call(Wait::Written, |ctx| {
                let t = ctx.trees;
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
        assert!(!store.record_seen("k-new".into(), 900, false).await.unwrap());
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
    async fn replies_an_earlier_version_kept_one_per_key_are_moved_on_open() {
        let dir = tempfile::tempdir().unwrap();
        // What an earlier version left: one key per reply in `chunks`, and in its log a
        // reply of the same kind not yet in sled.
        {
            let db = sled::open(dir.path()).unwrap();
            let chunks = db.open_tree(CHUNKS).unwrap();
            for (session, seq, text) in [
                ("sA/x", 1, "x1"),
                ("sA/x", 3, "x3"),
                ("sA/x", FINAL_SEQ, "xF"),
                ("sA/x2", 5, "other"),
            ] {
                chunks
                    .insert(seq_key(session.as_bytes(), seq), text)
                    .unwrap();
            }
            db.flush().unwrap();
            let (mut wal, _, _) = wal::Wal::open(&dir.path().join(WAL_FILE)).unwrap();
            let mut log = Vec::new();
            wal::Op::Reply {
                session: b"sA/x".to_vec(),
                seq: 2,
                bytes: b"x2".to_vec(),
            }
            .encode_into(&mut log);
            wal.append(&log).unwrap();
        }
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let text = |kept: Vec<(u64, Vec<u8>)>| -> Vec<(u64, String)> {
            kept.into_iter()
                .map(|(q, b)| (q, String::from_utf8(b).unwrap()))
                .collect()
        };
        let x = store.replies_after("sA/x".into(), 0).await.unwrap();
        assert_eq!(
            text(x),
            [
                (1, "x1".into()),
                (2, "x2".into()),
                (3, "x3".into()),
                (FINAL_SEQ, "xF".into())
            ]
        );
        let x = store.replies_after("sA/x".into(), 2).await.unwrap();
        assert_eq!(text(x), [(3, "x3".into()), (FINAL_SEQ, "xF".into())]);
        let other = store.replies_after("sA/x2".into(), 0).await.unwrap();
        assert_eq!(text(other), [(5, "other".into())]);
        store.close().await.unwrap();
        // Moved once: the old tree is gone.
        let db = sled::open(dir.path()).unwrap();
        assert!(!db.tree_names().iter().any(|n| &n[..] == CHUNKS.as_bytes()));
    }

    #[test]
    fn damaged_kept_replies_read_as_an_error() {
        let kept = vec![(1, b"one".to_vec()), (FINAL_SEQ, vec![])];
        let value = encode_replies(&kept);
        assert_eq!(decode_replies(&value).unwrap(), kept);
        for cut in 1..value.len() {
            if cut != 15 {
                assert!(decode_replies(&value[..cut]).is_err(), "{cut}");
            }
        }
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

    /// Copies a store's directory as it is on disk now: what a kill -9 at this moment
    /// would leave (the process's memory, sled's unwritten buffers included, is lost).
    fn snapshot(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                snapshot(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn admission_refused_changes_nothing_and_a_replay_begins_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let admission = || Admission {
            key: "sA/one".into(),
            now: 100,
            read: true,
            with_history: true,
            seen: Some(("replay-key".into(), 500, false)),
        };
        // Refused by its judge: the key is not used up, nothing is written.
        let refused = store
            .admit(admission(), |existing| {
                assert!(existing.is_none());
                Err::<((), Option<SessionRecord>), _>("no")
            })
            .await
            .unwrap();
        assert!(matches!(refused, Err(Refused::Decided("no"))));
        assert!(store
            .get_session("sA/one".into(), 100)
            .await
            .unwrap()
            .is_none());
        // Accepted: the key is recorded and the turn begins.
        let running = record("one", SessionStatus::Running, None);
        let ok = store
            .admit(admission(), move |_| Ok::<_, ()>(((), Some(running))))
            .await
            .unwrap();
        assert!(ok.is_ok());
        let rec = store.get_session("sA/one".into(), 100).await.unwrap();
        assert_eq!(rec.map(|r| r.status), Some(SessionStatus::Running));
        // The same message again: a replay, and the judge's record is not written.
        let mut done = record("one", SessionStatus::Done, Some(1_000));
        done.prompt = "must not be written".into();
        let again = store
            .admit(admission(), move |existing| {
                assert!(existing.is_some(), "the judge sees the session");
                Ok::<_, ()>(((), Some(done)))
            })
            .await
            .unwrap();
        assert!(matches!(again, Err(Refused::Replayed)));
        let rec = store
            .get_session("sA/one".into(), 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (rec.status, rec.prompt.as_str()),
            (SessionStatus::Running, "p")
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_sessions_history_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let w = HistoryWrite::appending(HistorySpan::default(), msgs(&["q", "a"]), 10);
        for key in ["sA/old", "sA/new"] {
            let mut rec = record(key, SessionStatus::Done, Some(150));
            if key == "sA/new" {
                rec.expires = Some(1_000);
            }
            rec.history = w.result();
            store
                .finish_turn(key.into(), Some(w.clone()), Vec::new(), rec)
                .await
                .unwrap();
        }
        let count = |store: Store| async move {
            store
                .call(Wait::Written, |ctx| Ok(ctx.trees.history.len()))
                .await
                .unwrap()
        };
        assert_eq!(count(store.clone()).await, 4);
        let swept = store.sweep(200).await.unwrap();
        assert_eq!(swept.sessions, vec!["sA/old".to_string()]);
        assert_eq!(
            count(store.clone()).await,
            2,
            "only the live session's messages"
        );
        let (_, history) = store
            .get_session_with_history("sA/new".into(), 200, true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(history, msgs(&["q", "a"]));
        store.close().await.unwrap();
    }

    /// A turn's start (its replay key and its running record) costs no log write of its
    /// own: the next write takes it along, or the sync thread within its window.
    #[tokio::test]
    async fn a_turns_start_rides_with_the_next_log_write() {
        let admit = |store: Store, id: &str| {
            let (key, seen) = (format!("sA/{id}"), format!("id:{id}"));
            let rec = record(id, SessionStatus::Running, None);
            async move {
                let a = Admission {
                    key,
                    now: 100,
                    read: false,
                    with_history: false,
                    seen: Some((seen, 700, false)),
                };
                store
                    .admit(a, move |_| Ok::<_, ()>(((), Some(rec))))
                    .await
                    .unwrap()
                    .unwrap();
            }
        };
        let reopened = |live: &Path, to: &Path| {
            snapshot(live, to);
            Store::open_with(to, 60, 200, Durability::default()).unwrap()
        };
        // A window longer than the test: only another write can take the start along.
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let slow = Durability::Batched {
            window: std::time::Duration::from_secs(600),
        };
        let (store, _) = Store::open_with(&live, 60, 100, slow).unwrap();
        admit(store.clone(), "one").await;
        assert_eq!(store.metrics().log_writes.get(), 0, "the start waited");
        let (copy, opened) = reopened(&live, &dir.path().join("before"));
        assert_eq!((opened.replayed, opened.interrupted), (0, 0));
        copy.close().await.unwrap();
        // A read that could see the start writes it first.
        let rec = store.get_session("sA/one".into(), 100).await.unwrap();
        assert_eq!(rec.map(|r| r.status), Some(SessionStatus::Running));
        assert_eq!(store.metrics().log_writes.get(), 1);
        let (copy, opened) = reopened(&live, &dir.path().join("after"));
        assert_eq!(opened.interrupted, 1, "the running session came back");
        assert!(!copy.record_seen("id:one".into(), 700, false).await.unwrap());
        copy.close().await.unwrap();
        store.close().await.unwrap();

        // Alone, it is written within the window, in either durability.
        for durability in [Durability::Sync, Durability::default()] {
            let dir = tempfile::tempdir().unwrap();
            let live = dir.path().join("live");
            let (store, _) = Store::open_with(&live, 60, 100, durability).unwrap();
            admit(store.clone(), "two").await;
            let began = std::time::Instant::now();
            while store.metrics().log_writes.get() == 0 {
                assert!(
                    began.elapsed().as_secs() < 10,
                    "{durability:?}: never written"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let (copy, opened) = reopened(&live, &dir.path().join("killed"));
            assert_eq!(opened.interrupted, 1, "{durability:?}");
            assert!(!copy.record_seen("id:two".into(), 700, false).await.unwrap());
            copy.close().await.unwrap();
            store.close().await.unwrap();
        }
    }

    /// In `sync` mode a sync under way holds back the answers that could show what it
    /// covers, and only those. A trust read with no trust change unsynced and a turn's
    /// admission that goes on answer at once (before, both waited for any sync under
    /// way); a read of sessions, a refused admission and a trust read after an unsynced
    /// trust change wait for it. In either mode a trust read leaves a turn's start
    /// carried.
    #[tokio::test]
    async fn a_sync_under_way_holds_back_only_the_answers_it_could_show() {
        use std::sync::atomic::Ordering;
        let admit = |store: Store, id: &str, accept: bool| {
            let a = new_turn(id);
            let rec = record(id, SessionStatus::Running, None);
            async move {
                let r = store
                    .admit(a, move |_| match accept {
                        true => Ok(((), Some(rec))),
                        false => Err(()),
                    })
                    .await;
                r.unwrap().is_ok()
            }
        };
        // The first checkpoint, 5 s after the open, syncs the log whoever leads: every
        // step below comes before it.
        let at_once = std::time::Duration::from_secs(3);
        let held = std::time::Duration::from_millis(200);
        let a = crate::identity::Identity::from_seed([4; 32]).address();

        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_with(dir.path(), 60, 100, Durability::Sync).unwrap();
        let sync = store.shared.sync.clone();
        // Nobody may lead a sync: a durable write stays unsynced until the test syncs.
        sync.leading.store(true, Ordering::SeqCst);
        let put = tokio::spawn({
            let store = store.clone();
            async move {
                let rec = record("old", SessionStatus::Done, None);
                store.put_session("sA/old".into(), rec).await
            }
        });
        while sync.floors().all.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let blocked = tokio::time::timeout(at_once, store.has_mark(Mark::Blocked, a));
        assert!(!blocked
            .await
            .expect("a trust read waited for a session's sync")
            .unwrap());
        let went_on = tokio::time::timeout(at_once, admit(store.clone(), "new", true));
        assert!(went_on
            .await
            .expect("an admitted turn waited for another's sync"));
        let read = tokio::time::timeout(held, store.get_session("sA/old".into(), 100));
        assert!(
            read.await.is_err(),
            "a read of the unsynced session did not wait"
        );
        let refused = tokio::time::timeout(held, admit(store.clone(), "no", false));
        assert!(refused.await.is_err(), "a refusal did not wait");
        let mark = tokio::spawn({
            let store = store.clone();
            async move { store.set_mark(Mark::Blocked, a, true, 100).await }
        });
        while sync.floors().trust.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let blocked = tokio::time::timeout(held, store.has_mark(Mark::Blocked, a));
        assert!(
            blocked.await.is_err(),
            "a trust read showed an unsynced mark"
        );

        sync.leading.store(false, Ordering::SeqCst);
        sync.publish(sync.sync_once());
        put.await.unwrap().unwrap();
        assert!(mark.await.unwrap().unwrap());
        let blocked = tokio::time::timeout(at_once, store.has_mark(Mark::Blocked, a));
        assert!(blocked.await.unwrap().unwrap());
        store.close().await.unwrap();

        // A window longer than the test: only another write can take the start along.
        let dir = tempfile::tempdir().unwrap();
        let slow = Durability::Batched {
            window: std::time::Duration::from_secs(600),
        };
        let (store, _) = Store::open_with(dir.path(), 60, 100, slow).unwrap();
        store.set_mark(Mark::Contact, a, true, 100).await.unwrap();
        assert_eq!(store.metrics().log_writes.get(), 1);
        assert!(admit(store.clone(), "one", true).await);
        assert!(store.has_mark(Mark::Contact, a).await.unwrap());
        assert_eq!(
            store.metrics().log_writes.get(),
            1,
            "a trust read wrote the carried start"
        );
        store.get_session("sA/one".into(), 100).await.unwrap();
        assert_eq!(store.metrics().log_writes.get(), 2);
        store.close().await.unwrap();
    }

    /// The log's thread is woken for work only while it sleeps for want of any: at most
    /// once a window, however many turns start and end meanwhile (in `sync` mode each
    /// turn's carried start woke it again within its window).
    #[tokio::test]
    async fn the_log_thread_is_woken_at_most_once_a_window() {
        for durability in [Durability::Sync, Durability::default()] {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = Store::open_with(dir.path(), 60, 100, durability).unwrap();
            let began = std::time::Instant::now();
            for i in 0..200 {
                let (key, id) = (format!("sA/t{i}"), format!("t{i}"));
                let running = record(&id, SessionStatus::Running, None);
                store.begin_turn(key.clone(), running).await.unwrap();
                let done = record(&id, SessionStatus::Done, None);
                store
                    .finish_turn(key, None, Vec::new(), done)
                    .await
                    .unwrap();
            }
            let windows = began.elapsed().as_micros() / DEFAULT_SYNC_WINDOW.as_micros() + 2;
            let woken = store.shared.sync.state.lock().unwrap().woken;
            assert!(
                u128::from(woken) <= windows,
                "{durability:?}: woken {woken} times in {windows} windows"
            );
            store.close().await.unwrap();
        }
    }

    /// While a checkpoint cannot finish (here: the test holds it, as a stalled sled
    /// flush would), changes pile up in memory only up to [`MAX_FRESH_BYTES`]: then new
    /// work waits for it, fails [`StoreError::Behind`] after [`BEHIND_WAIT`], and goes on
    /// once it ends; an admitted turn's end and reads never wait.
    #[tokio::test]
    // Holding `writing` across awaits is the point: a checkpoint that never ends.
    #[allow(clippy::await_holding_lock)]
    async fn a_stalled_checkpoint_holds_back_new_work_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let fresh = |store: &Store| store.shared.lock().1.as_ref().unwrap().trees.fresh_bytes();
        let put = |store: &Store, i: usize| {
            let mut rec = record(&format!("p{i}"), SessionStatus::Done, None);
            rec.prompt = "x".repeat(64 * 1024);
            let store = store.clone();
            async move { store.put_session(format!("sA/p{i}"), rec).await }
        };
        put(&store, 0).await.unwrap();
        let a = crate::identity::Identity::from_seed([5; 32]).address();
        let admit = |store: &Store, id: &str| {
            let a = new_turn(id);
            let rec = record(id, SessionStatus::Running, None);
            let store = store.clone();
            async move {
                let r = store.admit(a, move |_| Ok::<_, ()>(((), Some(rec)))).await;
                r.map(|r| r.is_ok())
            }
        };
        // A turn admitted before the disk stalls.
        assert!(admit(&store, "early").await.unwrap());
        let writing = store.shared.writing();
        let frozen = store
            .shared
            .lock()
            .1
            .as_mut()
            .unwrap()
            .freeze(&store.shared.sync)
            .unwrap();
        assert!(frozen.is_some());

        let mut held = None;
        for i in 1..3 * MAX_FRESH_BYTES / (64 * 1024) {
            let a_while = std::time::Duration::from_secs(2);
            match tokio::time::timeout(a_while, put(&store, i)).await {
                Ok(done) => done.unwrap(),
                Err(_) => {
                    held = Some(i);
                    break;
                }
            }
        }
        let held = held.expect("memory grew past three times the bound");
        let bytes = fresh(&store);
        assert!(
            (MAX_FRESH_BYTES..MAX_FRESH_BYTES + 256 * 1024).contains(&bytes),
            "held back at {bytes} bytes, write {held}"
        );
        assert_eq!(store.metrics().behind_waits.get(), 1);
        let a_while = std::time::Duration::from_millis(300);
        let new_turn = tokio::time::timeout(a_while, admit(&store, "late"));
        assert!(new_turn.await.is_err(), "a new turn was admitted");
        let seen = tokio::time::timeout(a_while, store.record_seen("k".into(), 700, false));
        assert!(seen.await.is_err(), "a replay key was recorded");
        let call = tokio::time::timeout(a_while, store.record_call(a, 100));
        assert!(call.await.is_err(), "a call was recorded");
        // What is under way goes on: reads, and the end of the turn admitted before.
        let at_once = std::time::Duration::from_secs(5);
        let read = tokio::time::timeout(at_once, store.get_session("sA/p1".into(), 100));
        assert!(read.await.unwrap().unwrap().is_some());
        let done = record("early", SessionStatus::Done, None);
        let end = store.finish_turn("sA/early".into(), None, Vec::new(), done);
        tokio::time::timeout(at_once, end).await.unwrap().unwrap();

        // Nothing ends it: after BEHIND_WAIT, a clear error (time skips ahead here).
        tokio::time::pause();
        let bytes = fresh(&store);
        let behind = put(&store, held).await;
        assert!(matches!(behind, Err(StoreError::Behind)), "{behind:?}");
        tokio::time::resume();
        assert_eq!(fresh(&store), bytes, "a refused write changed something");
        assert!(store
            .get_session(format!("sA/p{held}"), 100)
            .await
            .unwrap()
            .is_none());

        // The checkpoint ends: the write waiting goes on, and so does new work.
        let waiting = tokio::spawn(put(&store, held));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        drop(writing);
        tokio::time::timeout(at_once, waiting)
            .await
            .expect("still held after the checkpoint ended")
            .unwrap()
            .unwrap();
        assert!(admit(&store, "after").await.unwrap());
        let rec = store.get_session(format!("sA/p{held}"), 100).await.unwrap();
        assert!(rec.is_some());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn what_was_answered_is_read_back_from_the_log_after_a_kill() {
        for durability in [Durability::Sync, Durability::default()] {
            let dir = tempfile::tempdir().unwrap();
            let live = dir.path().join("live");
            let (store, opened) = Store::open_with(&live, 60, 100, durability).unwrap();
            assert_eq!((opened.unclean, opened.replayed), (false, 0));
            let a = crate::identity::Identity::from_seed([2; 32]).address();
            store
                .begin_turn("sA/one".into(), record("one", SessionStatus::Running, None))
                .await
                .unwrap();
            // Two turns of history; the second drops the first turn's question.
            let first = HistoryWrite::appending(HistorySpan::default(), msgs(&["q1", "a1"]), 3);
            let second = HistoryWrite::appending(first.result(), msgs(&["q2", "a2"]), 3);
            let mut done = record("one", SessionStatus::Done, Some(1_000));
            for w in [first, second] {
                done.history = w.result();
                store
                    .finish_turn(
                        "sA/one".into(),
                        Some(w),
                        vec![(1, b"chunk".to_vec()), (FINAL_SEQ, b"final".to_vec())],
                        done.clone(),
                    )
                    .await
                    .unwrap();
            }
            assert!(store.record_seen("k".into(), 500, false).await.unwrap());
            assert_eq!(store.add_credits(a, 7).await.unwrap(), 7);
            assert!(store.set_mark(Mark::Contact, a, true, 1).await.unwrap());

            let killed = dir.path().join("killed");
            snapshot(&live, &killed);
            let (copy, opened) = Store::open_with(&killed, 60, 200, durability).unwrap();
            assert!(opened.unclean, "{durability:?}");
            assert!(opened.replayed >= 6, "{durability:?}: {opened:?}");
            let (rec, history) = copy
                .get_session_with_history("sA/one".into(), 200, true)
                .await
                .unwrap()
                .expect("the session came back");
            assert_eq!(rec.status, SessionStatus::Done);
            assert_eq!(history, msgs(&["a1", "q2", "a2"]), "{durability:?}");
            let kept: Vec<u64> = copy
                .replies_after("sA/one".into(), 0)
                .await
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
            assert_eq!(kept, vec![1, FINAL_SEQ]);
            assert!(!copy.record_seen("k".into(), 500, false).await.unwrap());
            assert_eq!(copy.credits(a).await.unwrap(), 7);
            assert!(copy.has_mark(Mark::Contact, a).await.unwrap());
            // Listed once, through the index the replay rebuilt.
            let page = copy
                .list_sessions("sA/".into(), 10, None, 200)
                .await
                .unwrap();
            assert_eq!(page.sessions.len(), 1);
            copy.close().await.unwrap();

            // Closed cleanly: nothing to replay, and no unclean stop to report.
            let (again, opened) = Store::open_with(&killed, 60, 300, durability).unwrap();
            assert_eq!((opened.unclean, opened.replayed), (false, 0));
            let (_, history) = again
                .get_session_with_history("sA/one".into(), 300, true)
                .await
                .unwrap()
                .expect("the session is there");
            assert_eq!(
                history,
                msgs(&["a1", "q2", "a2"]),
                "read from sled this time"
            );
            again.close().await.unwrap();
            store.close().await.unwrap();
        }
    }

    /// `turns` concurrent turns of `sync` mode, each waiting for its sync: how many
    /// syncs they took, and how many of the log's bytes were left unsynced once all were
    /// answered.
    async fn concurrent_synced_turns(turns: u64) -> (u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_with(dir.path(), 60, 100, Durability::Sync).unwrap();
        let mut tasks = Vec::new();
        for i in 0..turns {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("sA/t{i}");
                let rec = record(&format!("t{i}"), SessionStatus::Done, Some(1_000));
                store.finish_turn(key, None, Vec::new(), rec).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let sync = &store.shared.sync;
        let appended = sync.appended.load(std::sync::atomic::Ordering::Acquire);
        let unsynced = appended - sync.synced.borrow().upto;
        let syncs = store.metrics().flushes.get();
        store.close().await.unwrap();
        (syncs, unsynced)
    }

    #[tokio::test]
    async fn sync_mode_shares_one_sync_among_concurrent_turns() {
        // One thread: the waiting jobs let every ready one write before one of them syncs.
        let turns = 200;
        let (syncs, unsynced) = concurrent_synced_turns(turns).await;
        assert!(syncs >= 1, "sync mode synced nothing");
        assert!(
            syncs < turns / 10,
            "{syncs} syncs for {turns} concurrent turns: no group commit"
        );
        assert_eq!(unsynced, 0, "turns were answered before their sync");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_mode_on_two_threads_answers_every_turn_and_shares_syncs() {
        // Jobs sync on their own threads, one at a time: a job that finds another
        // syncing waits for it, and leads the next one if that did not cover it. A lost
        // wake-up would hang here.
        let turns = 2_000;
        let (syncs, unsynced) = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            concurrent_synced_turns(turns),
        )
        .await
        .expect("a turn waiting for its sync was never answered");
        assert!(
            syncs < turns / 2,
            "{syncs} syncs for {turns} concurrent turns: no group commit"
        );
        assert_eq!(unsynced, 0, "turns were answered before their sync");
    }

    #[tokio::test]
    async fn a_replay_over_a_half_done_write_leaves_no_stale_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let key = "sA/one";
        let first = record("one", SessionStatus::Done, Some(150));
        let mut second = record("one", SessionStatus::Done, Some(190));
        second.created = 120;
        let meta = |r: &SessionRecord| SessionMeta {
            session_id: r.session_id.clone(),
            status: r.status,
            created: r.created,
            expires: r.expires,
        };
        {
            let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
            store.put_session(key.into(), first.clone()).await.unwrap();
            store.close().await.unwrap();
        }
        // A crash in the middle of writing `second`: sled's files got its meta, not the
        // rest; the log holds the whole write.
        {
            let db = sled::open(dir.path()).unwrap();
            let metas = db.open_tree(SESSION_META).unwrap();
            metas
                .insert(key, serde_json::to_vec(&meta(&second)).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let mut log = Vec::new();
        wal::Op::Session {
            key: key.as_bytes().to_vec(),
            record: serde_json::to_vec(&second).unwrap(),
            prev: Some(serde_json::to_vec(&meta(&first)).unwrap()),
        }
        .encode_into(&mut log);
        std::fs::write(dir.path().join(WAL_FILE), log).unwrap();

        let (store, opened) = Store::open(dir.path(), 60, 100).unwrap();
        assert_eq!(opened, 0);
        assert_eq!(
            index_entries(&store).await,
            vec![
                ("meta", key.as_bytes().to_vec()),
                ("list", listed("sA/", 120, "one")),
                ("expiry", in_order(190, key)),
            ]
        );
    }

    /// A full log is checkpointed by its thread (the log set aside, the layers written
    /// into sled and flushed with the lock let go, the old log removed): nothing written
    /// before or after it is lost across a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_of_a_full_log_empties_it_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        let reply = |i: usize| vec![i as u8; 1 << 20];
        let turn = |i: usize| {
            let rec = record(&format!("c{i}"), SessionStatus::Done, Some(u64::MAX / 2));
            store.finish_turn(format!("sB/c{i}"), None, vec![(FINAL_SEQ, reply(i))], rec)
        };
        let full = (CHECKPOINT_BYTES >> 20) as usize + 1;
        for i in 0..full {
            turn(i).await.unwrap();
        }
        let wal = dir.path().join(WAL_FILE);
        let mut len = u64::MAX;
        for _ in 0..200 {
            len = std::fs::metadata(&wal).unwrap().len();
            if len < CHECKPOINT_BYTES {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(
            len < CHECKPOINT_BYTES,
            "the log was not emptied: {len} bytes"
        );
        turn(full).await.unwrap();
        store.close().await.unwrap();

        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        for i in 0..=full {
            let kept = store.replies_after(format!("sB/c{i}"), 0).await.unwrap();
            let intact = kept.len() == 1 && kept[0].0 == FINAL_SEQ && kept[0].1 == reply(i);
            assert!(intact, "session {i}: {} kept replies", kept.len());
            let rec = store.get_session(format!("sB/c{i}"), 100).await.unwrap();
            assert_eq!(
                rec.map(|r| r.status),
                Some(SessionStatus::Done),
                "session {i}"
            );
        }
        store.close().await.unwrap();
    }

    /// Every key of every tree, as the store reads it (memory over sled).
    async fn everything(store: &Store) -> Vec<(usize, Vec<u8>, Vec<u8>)> {
        store
            .call(Wait::Written, |ctx| {
                let mut out = Vec::new();
                for (i, tree) in ctx.trees.all().into_iter().enumerate() {
                    for item in tree.iter() {
                        let (k, v) = item?;
                        out.push((i, k.to_vec(), v.to_vec()));
                    }
                }
                Ok(out)
            })
            .await
            .unwrap()
    }

    /// Closing while a checkpoint writes into sled waits for it before writing the layers
    /// itself: a chunk the checkpoint read before closing wrote it, and rewrote after,
    /// would drop the entries written since the freeze (one packed chunk holds both).
    #[tokio::test]
    async fn closing_waits_for_a_checkpoint_writing_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        for i in 0..40 {
            assert!(store
                .record_seen(format!("a{i:02}"), 5_000, false)
                .await
                .unwrap());
        }
        let frozen = {
            let mut guard = store.shared.lock();
            let st = guard.1.as_mut().unwrap();
            st.freeze(&store.shared.sync).unwrap().unwrap()
        };
        // After the freeze, beside the frozen keys (one chunk holds them all).
        for i in 0..40 {
            assert!(store
                .record_seen(format!("b{i:02}"), 5_000, false)
                .await
                .unwrap());
        }
        // The checkpoint is writing now.
        let writing = store.shared.writing();
        let closing = std::thread::spawn({
            let store = store.clone();
            move || futures::executor::block_on(store.close())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Closing removes the marker of an open store once it has written the layers.
        assert!(
            dir.path().join(OPEN_MARKER).exists(),
            "close went on while the checkpoint was writing"
        );
        frozen.write().unwrap();
        drop(frozen);
        drop(writing);
        closing.join().unwrap().unwrap();
        drop(store);

        let (store, _) = Store::open(dir.path(), 60, 100).unwrap();
        for key in (0..40).flat_map(|i| [format!("a{i:02}"), format!("b{i:02}")]) {
            let fresh = store.record_seen(key.clone(), 5_000, false).await.unwrap();
            assert!(!fresh, "{key} was forgotten");
        }
    }

    /// A checkpoint killed at any of its steps (the log set aside and the layers
    /// frozen; part of them in sled; all of them; the old log removed) loses nothing
    /// answered: a store opened from a copy of the directory taken at each step reads
    /// exactly as the live one did. Between the steps, turns go on and overwrite,
    /// remove and add keys the frozen layers hold.
    #[tokio::test]
    async fn a_checkpoint_cut_short_at_any_step_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let (store, _) = Store::open(&live, 60, 100).unwrap();
        let a = crate::identity::Identity::from_seed([3; 32]).address();
        let turn = |i: usize, status: SessionStatus, expires: u64| {
            let mut rec = record(&format!("c{i}"), status, Some(expires));
            let w = HistoryWrite::appending(HistorySpan::default(), msgs(&["q", "a"]), 10);
            rec.history = w.result();
            let reply = vec![(FINAL_SEQ, format!("final {i} {status:?}").into_bytes())];
            store.finish_turn(format!("sC/c{i}"), Some(w), reply, rec)
        };
        for i in 0..4 {
            turn(i, SessionStatus::Done, 1_000 + i as u64)
                .await
                .unwrap();
        }
        assert!(store.record_seen("k0".into(), 5_000, false).await.unwrap());
        store.add_credits(a, 5).await.unwrap();

        let freeze = || {
            let mut guard = store.shared.lock();
            let st = guard.1.as_mut().unwrap();
            st.freeze(&store.shared.sync).unwrap().unwrap()
        };
        let frozen = freeze();
        assert!(live.join("oonode.wal.old").exists());
        // Turns go on over what is frozen: c1 overwritten, c0 and c2 swept, c4 added.
        turn(1, SessionStatus::Failed, 2_000).await.unwrap();
        assert_eq!(store.sweep(1_002).await.unwrap().sessions.len(), 2);
        turn(4, SessionStatus::Done, 3_000).await.unwrap();
        assert!(store.record_seen("k1".into(), 6_000, false).await.unwrap());
        store.add_credits(a, 2).await.unwrap();
        let want = everything(&store).await;

        let mut copies = Vec::new();
        let mut copy = |step: &str| {
            let to = dir.path().join(step);
            snapshot(&live, &to);
            copies.push((step.to_string(), to));
        };
        copy("frozen");
        for (disk, entries) in &frozen.trees[..5] {
            layer::write(disk, entries).unwrap();
        }
        frozen.db.flush().unwrap();
        copy("half-written");
        frozen.write().unwrap();
        copy("written");
        let set_aside = store.shared.lock().1.as_mut().unwrap().thaw();
        drop(frozen);
        // A crash here: sled holds everything the set-aside log says, and it is still
        // there.
        assert!(live.join("oonode.wal.old").exists());
        copy("thawed-log-kept");
        set_aside.remove().unwrap();
        assert!(!live.join("oonode.wal.old").exists());
        copy("thawed");
        assert_eq!(
            everything(&store).await,
            want,
            "the live store after the checkpoint"
        );
        // And a second checkpoint over the first one's sled.
        let again = freeze();
        again.write().unwrap();
        drop(again);
        let set_aside = store.shared.lock().1.as_mut().unwrap().thaw();
        set_aside.remove().unwrap();
        copy("twice");
        assert_eq!(everything(&store).await, want);
        store.close().await.unwrap();
        copy("closed");

        for (step, path) in copies {
            let (copy, opened) = Store::open_with(&path, 60, 100, Durability::default()).unwrap();
            assert_eq!(opened.interrupted, 0, "{step}");
            assert_eq!(
                everything(&copy).await,
                want,
                "opened after the step {step:?}"
            );
            assert!(
                !copy.record_seen("k0".into(), 5_000, false).await.unwrap(),
                "{step}"
            );
            assert_eq!(copy.credits(a).await.unwrap(), 7, "{step}");
            copy.close().await.unwrap();
        }
    }

    /// Cost flat in stored data (issue 16): opening a store of `OONODE_BENCH_SESSIONS`
    /// (default 1,000,000) sessions, and a turn's writes on it against an empty store.
    /// A measurement, not a check: `cargo test --release --lib -- --ignored
    /// a_million_sessions --nocapture` prints the figures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn a_million_sessions() {
        let n: u64 = std::env::var("OONODE_BENCH_SESSIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        async fn turns(store: &Store, tag: &str) -> Vec<f64> {
            let mut took = Vec::new();
            for i in 0..2_000 {
                let key = format!("sB/{tag}{i}");
                let rec = record(
                    &format!("{tag}{i}"),
                    SessionStatus::Done,
                    Some(u64::MAX / 2),
                );
                // What a turn asks of the store: its admission (read, replay key,
                // running record) and its end (two messages, the reply, the record).
                let began = std::time::Instant::now();
                let admission = Admission {
                    key: key.clone(),
                    now: 100,
                    read: true,
                    with_history: true,
                    seen: Some((format!("seen-{tag}{i}"), u64::MAX / 2, false)),
                };
                let running = record(&key, SessionStatus::Running, None);
                store
                    .admit(admission, move |_| Ok::<_, ()>(((), Some(running))))
                    .await
                    .unwrap()
                    .unwrap();
                let history =
                    HistoryWrite::appending(HistorySpan::default(), msgs(&["q", "a"]), 200);
                let mut rec = rec;
                rec.history = history.result();
                store
                    .finish_turn(key, Some(history), vec![(FINAL_SEQ, vec![7; 300])], rec)
                    .await
                    .unwrap();
                took.push(began.elapsed().as_secs_f64() * 1e6);
            }
            took.sort_by(f64::total_cmp);
            took
        }
        let empty_dir = tempfile::tempdir().unwrap();
        let (empty, _) = Store::open(empty_dir.path(), 60, 100).unwrap();
        let base = turns(&empty, "e").await;
        empty.close().await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        {
            let trees = Trees::open(dir.path()).unwrap();
            index::build_if_missing(&trees).unwrap();
            let began = std::time::Instant::now();
            for i in 0..n {
                let id = format!("{i:016x}");
                let mut rec = record(&id, SessionStatus::Done, Some(u64::MAX / 2));
                rec.created = 1_000 + i;
                write_session(&trees, format!("sA/{id}").as_bytes(), &rec).unwrap();
                // Into sled in steps, as checkpoints would: memory holds one step.
                if i % 10_000 == 9_999 {
                    trees.settle().unwrap();
                }
            }
            trees.settle().unwrap();
            eprintln!(
                "filled {n} sessions in {:.1} s",
                began.elapsed().as_secs_f64()
            );
        }
        let began = std::time::Instant::now();
        let (full, _) = Store::open(dir.path(), 60, 100).unwrap();
        let open_s = began.elapsed().as_secs_f64();
        let loaded = turns(&full, "f").await;
        let p = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q) as usize];
        eprintln!(
            "open with {n} sessions: {open_s:.3} s; turn writes p50 {:.1} us (empty store {:.1} us), p99 {:.1} us (empty {:.1} us)",
            p(&loaded, 0.5),
            p(&base, 0.5),
            p(&loaded, 0.99),
            p(&base, 0.99)
        );
        full.close().await.unwrap();
    }
}
