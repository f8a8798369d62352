//! The session index: a few bytes of metadata per session, kept beside the records so that
//! a listing, the start-up check and the sweeper read only what they need, never every
//! record (issue 14: listing 1.3 GB of records held the one store thread for seconds).
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `session_meta` | session key | [`SessionMeta`]: what the entries below were made from |
//! | `session_list` | scope ‖ `!created` (u64 BE) ‖ id | empty; one scope's sessions, newest first |
//! | `session_expiry` | `expires` (u64 BE) ‖ session key | empty; soonest due first |
//! | `session_running` | session key | empty; the sessions a crash would leave running |
//! | `seen_at` | `expires` (u64 BE) ‖ replay key | empty; soonest due first |
//! | `seen_expiry` | `expires` (u64 BE) ‖ replay key | empty; the order of an older store's `seen` tree |
//!
//! A session key is its scope (`a…/` or `s…/`, see `dispatch::scope`) then its id. Every
//! write or removal of a session changes its record and these entries in one store job,
//! logged as one change in the write-ahead log (see [`put`] for how a
//! replay repairs a half-done write), so they cannot disagree; a store without the
//! [`INDEX_VERSION`] marker (written before the index existed, or whose build was cut
//! short) has them rebuilt from the records once, when it is opened.

use std::ops::Bound;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};

use sled::IVec;

use super::layer::{Entries, Layered};
use super::{SessionStatus, StoreError, Trees};

/// The value of an index entry: the key says it all.
const EMPTY: &[u8] = &[];

/// Sessions listed when the caller names no `limit`.
pub const DEFAULT_PAGE: usize = 50;
/// The most sessions one listing returns.
pub const MAX_PAGE: usize = 200;
/// The longest cursor accepted, checked before decoding it.
const MAX_CURSOR_CHARS: usize = 512;
/// A cursor's first byte: the layout of what follows.
const CURSOR_VERSION: u8 = 1;
/// At most this many sessions (and as many replay keys) go in one sweeping job, so
/// other jobs wait for no more than that.
pub const SWEEP_BATCH: usize = 500;

/// The key (in sled's default tree) that says the index trees are built, and how.
const INDEX_MARKER: &[u8] = b"session_index";
const INDEX_VERSION: u8 = 1;
/// Records written per sled batch while building the index.
const BUILD_BATCH: usize = 1000;
/// How often building the index reports its progress.
const BUILD_PROGRESS: Duration = Duration::from_secs(2);

/// What the index keeps of a session: what a listing shows, and what the sweeper and
/// start-up need. Decodes from a whole record too (its other fields are skipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub session_id: String,
    pub status: SessionStatus,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; None while running.
    pub expires: Option<u64>,
}

impl SessionMeta {
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// One page of a scope's sessions, newest first, and where the next one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    pub sessions: Vec<SessionMeta>,
    /// None when this page reaches the end.
    pub next: Option<PageCursor>,
}

/// A position within one scope's listing: the last session a page showed. It names no
/// scope, so it only ever moves a reader within its own sessions; a cursor made for
/// someone else just positions the reader among its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor(pub(super) Vec<u8>);

/// Why a cursor was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`cursor` is not one this node returned as `next`")]
pub struct BadCursor;

impl PageCursor {
    /// Reads a cursor as [`PageCursor`]'s `Display` wrote it.
    pub fn parse(text: &str) -> Result<PageCursor, BadCursor> {
        if text.is_empty() || text.len() > MAX_CURSOR_CHARS {
            return Err(BadCursor);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| BadCursor)?;
        match bytes.split_first() {
            // The version, the inverted creation time, and an id of at least one byte.
            Some((&CURSOR_VERSION, position)) if position.len() > 8 => {
                Ok(PageCursor(position.to_vec()))
            }
            _ => Err(BadCursor),
        }
    }
}

impl std::fmt::Display for PageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut bytes = Vec::with_capacity(1 + self.0.len());
        bytes.push(CURSOR_VERSION);
        bytes.extend_from_slice(&self.0);
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }
}

/// A session key's scope (up to and including its first `/`; empty for a key without
/// one) and its id.
fn split_key(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().position(|&b| b == b'/') {
        Some(i) => key.split_at(i + 1),
        None => (&[], key),
    }
}

/// A session's place in its scope's listing: newest first, then by id.
fn list_key(key: &[u8], created: u64) -> Vec<u8> {
    let (scope, id) = split_key(key);
    let mut out = Vec::with_capacity(key.len() + 8);
    out.extend_from_slice(scope);
    out.extend_from_slice(&(!created).to_be_bytes());
    out.extend_from_slice(id);
    out
}

/// `expires` ‖ `key`: the sweeper's order.
fn expiry_key(expires: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The first key after every key that starts with `prefix` (None: there is none).
pub(super) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What [`put`] knows of what was stored under the key before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prior {
    /// Whatever is there: read it.
    Read,
    /// Nothing: the node chose the session's id just now.
    New,
    /// Read it, and write every index entry again (see [`put`]).
    Repair,
}

/// Writes a session's record (`body`) and its index entries, replacing the entries of
/// what was stored under `key` before; returns that earlier meta as stored (JSON), for
/// the log. An entry the earlier meta already implies is not written again (a session's
/// place in its listing is written once, when it is created), unless [`Prior::Repair`]: a
/// replay of the log writes every entry, as sled may hold only part of an earlier write.
///
/// Not atomic across the trees, and no sled transaction (each would write sled's log
/// out): the store's write-ahead log makes a change atomic instead. A crash can leave a
/// write half done in sled's files; replaying the log does every logged write again,
/// and `stale` (the meta a logged write replaced) removes entries a half-done write
/// left behind under a meta sled no longer holds.
pub(super) fn put(
    t: &Trees,
    key: &[u8],
    body: &[u8],
    meta: &SessionMeta,
    stale: Option<&SessionMeta>,
    prior: Prior,
) -> Result<Option<sled::IVec>, StoreError> {
    let meta_bytes = serde_json::to_vec(meta)?;
    let repair = prior == Prior::Repair;
    let replaced = match prior {
        Prior::New => {
            t.meta.put(key, meta_bytes.as_slice());
            None
        }
        Prior::Read | Prior::Repair => t.meta.insert(key, meta_bytes.as_slice())?,
    };
    let old: Option<SessionMeta> = replaced
        .as_deref()
        .map(serde_json::from_slice)
        .transpose()?;
    for gone in old.iter().chain(stale) {
        if gone.created != meta.created {
            t.list.delete(list_key(key, gone.created));
        }
        if let Some(e) = gone.expires.filter(|e| Some(*e) != meta.expires) {
            t.expiry.delete(expiry_key(e, key));
        }
    }
    if repair || old.as_ref().map(|o| o.created) != Some(meta.created) {
        t.list.put(list_key(key, meta.created), EMPTY);
    }
    if let Some(e) = meta.expires {
        t.expiry.put(expiry_key(e, key), EMPTY);
    }
    let was_running = old
        .as_ref()
        .is_some_and(|o| o.status == SessionStatus::Running);
    if meta.status == SessionStatus::Running {
        t.running.put(key, EMPTY);
    } else if was_running || repair || stale.is_some() {
        t.running.delete(key);
    }
    t.sessions.put(key, body);
    Ok(replaced)
}

/// Removes a session's record and index entries (and those of `stale`, as in [`put`]);
/// returns the meta it had, as stored.
pub(super) fn remove(
    t: &Trees,
    key: &[u8],
    stale: Option<&SessionMeta>,
) -> Result<Option<sled::IVec>, StoreError> {
    let removed = t.meta.remove(key)?;
    let old: Option<SessionMeta> = removed.as_deref().map(serde_json::from_slice).transpose()?;
    for gone in old.iter().chain(stale) {
        t.list.delete(list_key(key, gone.created));
        if let Some(e) = gone.expires {
            t.expiry.delete(expiry_key(e, key));
        }
    }
    t.running.delete(key);
    t.sessions.delete(key);
    Ok(removed)
}

/// Up to `limit` sessions of the scope `scope` (a session key's prefix, `a…/` or
/// `s…/`), newest first, after `after`. Reads at most `limit + 1` listing entries and
/// the meta of each, no record. Expired sessions the sweeper has not removed yet are
/// skipped but count toward `limit`: a page may be short while `next` is still set.
pub(super) fn page(
    t: &Trees,
    scope: &[u8],
    limit: usize,
    after: Option<&PageCursor>,
    now: u64,
) -> Result<SessionPage, StoreError> {
    let start = match after {
        Some(c) => Bound::Excluded([scope, &c.0].concat()),
        None => Bound::Included(scope.to_vec()),
    };
    let end = prefix_end(scope).map_or(Bound::Unbounded, Bound::Excluded);
    let mut sessions = Vec::new();
    let mut last = None;
    let mut more = false;
    let mut session = scope.to_vec();
    for (read, key) in t.list.range::<Vec<u8>, _>((start, end)).keys().enumerate() {
        if read == limit {
            more = true;
            break;
        }
        let key = key?;
        // The session's key: the listing's without the creation time.
        session.truncate(scope.len());
        session.extend_from_slice(key.get(scope.len() + 8..).unwrap_or_default());
        // (An entry without a meta is left by a write cut short; the next replay of
        // the log or removal of the session removes it.)
        if let Some(bytes) = t.meta.get(&session)? {
            let meta: SessionMeta = serde_json::from_slice(&bytes)?;
            if !meta.is_expired(now) {
                sessions.push(meta);
            }
        }
        last = Some(key);
    }
    let next = match (more, last) {
        (true, Some(key)) => Some(PageCursor(key[scope.len()..].to_vec())),
        _ => None,
    };
    Ok(SessionPage { sessions, next })
}

/// The keys of up to `max` sessions due by `now`, soonest first.
pub(super) fn due_sessions(t: &Trees, now: u64, max: usize) -> Result<Vec<sled::IVec>, StoreError> {
    due(&t.expiry, now, max)
}

fn due(tree: &Layered, now: u64, max: usize) -> Result<Vec<sled::IVec>, StoreError> {
    let end = now.saturating_add(1).to_be_bytes();
    let mut out = Vec::new();
    for key in tree.range(..&end[..]).keys().take(max) {
        let key = key?;
        out.push(key.subslice(8, key.len() - 8));
    }
    Ok(out)
}

/// Records a replay key until `expires`; false if it was there already, and then nothing
/// changes. Keyed by `expires` first: the dispatcher derives it from the message's signed
/// timestamp, so a turn's key lands beside the keys of the turns just before it (in
/// leaves sled has cached, in order), however random the message ids are, and the
/// sweeper removes a run of keys from the front.
pub(super) fn record_seen(t: &Trees, key: &[u8], expires: u64) -> Result<bool, StoreError> {
    let entry = expiry_key(expires, key);
    if t.seen_at.contains_key(&entry)? || (t.legacy_seen.get() && t.seen.contains_key(key)?) {
        return Ok(false);
    }
    t.seen_at.put(entry, EMPTY);
    Ok(true)
}

/// Writes a replay key, whatever is there (a replay of the log).
pub(super) fn put_seen(t: &Trees, key: &[u8], expires: u64) {
    t.seen_at.put(expiry_key(expires, key), EMPTY);
}

/// Writes a replay key as versions before `seen_at` did, with its place in the sweeper's
/// order (a replay of a log such a version wrote).
pub(super) fn put_legacy_seen(t: &Trees, key: &[u8], expires: u64) {
    t.seen_expiry.put(expiry_key(expires, key), EMPTY);
    t.seen.put(key, &expires.to_be_bytes()[..]);
    t.legacy_seen.set(true);
}

/// Removes up to `max` replay keys due by `now`; returns how many went.
pub(super) fn sweep_seen(t: &Trees, now: u64, max: usize) -> Result<usize, StoreError> {
    let end = now.saturating_add(1).to_be_bytes();
    let mut removed = 0;
    for entry in t.seen_at.range(..&end[..]).keys().take(max) {
        t.seen_at.delete(entry?);
        removed += 1;
    }
    if t.legacy_seen.get() && removed < max {
        removed += sweep_legacy_seen(t, &end, max - removed)?;
        let empty = t.seen.iter().next().transpose()?.is_none();
        t.legacy_seen.set(!empty);
    }
    Ok(removed)
}

/// [`sweep_seen`] for an older store's keys. The key goes before its entry in the order,
/// so a crash between the two leaves an entry the next sweep removes, never a key no sweep
/// finds.
fn sweep_legacy_seen(t: &Trees, end: &[u8], max: usize) -> Result<usize, StoreError> {
    let mut removed = 0;
    for entry in t.seen_expiry.range(..end).keys().take(max) {
        let entry = entry?;
        let key = &entry[8..];
        // A key recorded again later has a later expiry: keep it.
        if t.seen.get(key)?.as_deref() == Some(&entry[..8]) {
            t.seen.delete(key);
        }
        t.seen_expiry.delete(&entry);
        removed += 1;
    }
    Ok(removed)
}

/// The keys of the sessions stored as running.
pub(super) fn running(t: &Trees) -> Result<Vec<sled::IVec>, StoreError> {
    Ok(t.running.iter().keys().collect::<Result<_, _>>()?)
}

/// Builds the index trees from the records, once, for a store that has no (complete)
/// index. Returns how many sessions it indexed; None if the index was there already.
pub(super) fn build_if_missing(t: &Trees) -> Result<Option<usize>, StoreError> {
    if t.db.get(INDEX_MARKER)?.as_deref() == Some(&[INDEX_VERSION][..]) {
        return Ok(None);
    }
    for tree in [&t.meta, &t.list, &t.expiry, &t.running, &t.seen_expiry] {
        tree.disk().clear()?;
    }
    let began = Instant::now();
    let mut reported = began;
    let mut indexed = 0;
    let mut batch = IndexBatch::default();
    for item in t.sessions.disk().iter() {
        let (key, bytes) = item?;
        if indexed == 0 {
            tracing::info!("building the session index (once: this store was written without one)");
        }
        let meta: SessionMeta = serde_json::from_slice(&bytes)?;
        batch.add(&key, &meta)?;
        indexed += 1;
        if indexed % BUILD_BATCH == 0 {
            std::mem::take(&mut batch).apply(t)?;
            if reported.elapsed() >= BUILD_PROGRESS {
                reported = Instant::now();
                tracing::info!(indexed, "building the session index");
            }
        }
    }
    batch.apply(t)?;
    let mut order = Entries::new();
    for item in t.seen.disk().iter() {
        let (key, value) = item?;
        let expires = value.as_ref().try_into().map_or(0, u64::from_be_bytes);
        order.insert(expiry_key(expires, &key).into(), Some(EMPTY.into()));
    }
    t.seen_expiry.disk().write(&order)?;
    // The marker goes last: a build cut short starts again from scratch.
    t.db.flush()?;
    t.db.insert(INDEX_MARKER, &[INDEX_VERSION])?;
    t.db.flush()?;
    if indexed > 0 {
        tracing::info!(
            sessions = indexed,
            seconds = began.elapsed().as_secs_f64(),
            "session index built"
        );
    }
    Ok(Some(indexed))
}

#[derive(Default)]
struct IndexBatch {
    meta: Entries,
    list: Entries,
    expiry: Entries,
    running: Entries,
}

impl IndexBatch {
    fn add(&mut self, key: &[u8], meta: &SessionMeta) -> Result<(), StoreError> {
        let empty = || Some(IVec::from(EMPTY));
        self.list
            .insert(list_key(key, meta.created).into(), empty());
        self.meta
            .insert(key.into(), Some(serde_json::to_vec(meta)?.into()));
        if let Some(e) = meta.expires {
            self.expiry.insert(expiry_key(e, key).into(), empty());
        }
        if meta.status == SessionStatus::Running {
            self.running.insert(key.into(), empty());
        }
        Ok(())
    }

    fn apply(self, t: &Trees) -> Result<(), StoreError> {
        t.meta.disk().write(&self.meta)?;
        t.list.disk().write(&self.list)?;
        t.expiry.disk().write(&self.expiry)?;
        t.running.disk().write(&self.running)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_what_no_node_wrote() {
        let c = PageCursor(list_key(b"sabc/id-1", 42)[5..].to_vec());
        assert_eq!(PageCursor::parse(&c.to_string()).unwrap(), c);
        for bad in ["", "!!", "AQ", &"A".repeat(MAX_CURSOR_CHARS + 1)] {
            assert!(PageCursor::parse(bad).is_err(), "{bad:?}");
        }
        // Another version.
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([2; 12]);
        assert!(PageCursor::parse(&other).is_err());
    }

    #[test]
    fn listing_keys_put_a_scope_together_newest_first() {
        let a_old = list_key(b"a1/x", 5);
        let a_new = list_key(b"a1/y", 9);
        let b = list_key(b"a2/z", 7);
        assert!(a_new < a_old && a_old < b);
        assert_eq!(prefix_end(b"a1/").unwrap(), b"a10".to_vec());
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(split_key(b"s9/id/x"), (&b"s9/"[..], &b"id/x"[..]));
        assert_eq!(split_key(b"bare"), (&b""[..], &b"bare"[..]));
    }
}
