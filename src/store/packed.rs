//! A sled tree whose entries are packed into chunks: sled holds one key per chunk (its
//! first entry's key), and the chunk holds up to [`CHUNK_ENTRIES`] entries in order.
//!
//! Why: sled 0.34's cost is per key, whatever the value's size. It splits a leaf past 16
//! keys and then copies the parent node (up to 256 children), and a turn wrote about nine
//! keys. A checkpoint writes entries in order, and a turn's keys land beside the last
//! turn's (session ids are time-ordered, replay keys and expiries are keyed by time), so
//! packed, a checkpoint writes one sled key for a run of entries. Measured with the
//! checkpoint writing nothing into sled, a signed request cost 0.12 ms of CPU against 0.20.
//!
//! A chunk covers the keys from its own first key up to the next chunk's first key.
//! Entries of a chunk at or past the next one's first key are stale (a checkpoint cut
//! short left them) and every reader and writer ignores them. A write puts its new chunks
//! into sled last first and removes the chunk they replace after them, so a crash at any
//! point leaves each entry readable with its old or its new value; the store's log then
//! writes again what it holds.

use std::hash::BuildHasher;
use std::ops::Bound;

use sled::IVec;

use super::layer::Entries;

/// At most this many entries in a chunk...
const CHUNK_ENTRIES: usize = 64;
/// ... and about this many bytes: a chunk is rewritten whole when an entry in it changes,
/// and sled rewrites its leaves (up to 17 chunks) every ten changes to them. sled writes a
/// leaf over 128 KiB (its segment size over 4) to a file of its own, created and synced
/// for it: with 8 KiB chunks, full leaves were (131 and 136 KB, seen in a run's `blobs`).
const CHUNK_BYTES: usize = 6 * 1024;
/// What an entry costs in a chunk beyond its key and value.
const ENTRY_OVERHEAD: usize = 12;
/// The suffix of a packed tree's name in sled; the plain tree a version before packing
/// wrote keeps the bare name until it is moved.
const PACKED_SUFFIX: &str = "#packed";
/// Entries moved from a plain tree per write, at most...
const MOVE_BATCH: usize = 50_000;
/// ... and about this many bytes of them.
const MOVE_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// A packed tree; cheap to clone (sled's tree is).
#[derive(Clone)]
pub(super) struct Packed {
    tree: sled::Tree,
    /// What a lookup can know without reading sled. A lookup that reads them just before
    /// a checkpoint changes them finds the checkpoint's entries in the store's frozen
    /// layer, read before sled.
    marks: std::sync::Arc<std::sync::Mutex<Marks>>,
}

/// Which keys sled cannot hold: those past `mark` but not among `recent`. Changed before
/// a write puts keys into sled, never narrowed but by `clear`.
struct Marks {
    /// No key past this one is in sled (None: none at all).
    greatest: Option<IVec>,
    /// Keys past this one in sled are all among `recent` (only `greatest`, without it).
    mark: Option<IVec>,
    /// Digests of keys written past `mark` since it was set. Most lookups are of keys
    /// never stored (a new replay key); keyed by time, they lie past every stored key
    /// but those written in the same second, which the mark alone would send to sled.
    recent: Option<Recent>,
}

#[derive(Default)]
struct Recent {
    keys: std::collections::HashSet<u64>,
    hasher: std::hash::RandomState,
    /// At most this many keys: past it, `mark` is raised to `greatest` and they go.
    cap: usize,
}

impl Marks {
    /// Whether sled may hold `key`.
    fn may_hold(&self, key: &[u8]) -> bool {
        if self.mark.as_ref().is_some_and(|m| key <= &m[..]) {
            return true;
        }
        match &self.recent {
            Some(r) => r.keys.contains(&r.hasher.hash_one(key)),
            None => false,
        }
    }

    /// `entries` are about to go into sled.
    fn writing(&mut self, entries: &Entries) {
        let Some((last, _)) = entries.iter().rev().find(|(_, v)| v.is_some()) else {
            return;
        };
        if self.greatest.as_ref().is_none_or(|g| last > g) {
            self.greatest = Some(last.clone());
        }
        let Some(r) = &mut self.recent else {
            self.mark = self.greatest.clone();
            return;
        };
        let mark = &self.mark;
        let past = |k: &IVec| mark.as_ref().is_none_or(|m| k > m);
        for (key, _) in entries.iter().filter(|(k, v)| v.is_some() && past(k)) {
            r.keys.insert(r.hasher.hash_one(&key[..]));
        }
        if r.keys.len() > r.cap {
            // Nothing is past the greatest key: the rest can go.
            r.keys = Default::default();
            self.mark = self.greatest.clone();
        }
    }
}

impl Packed {
    /// Opens the tree `name`, first moving into it what a version before packing wrote
    /// under that name (then dropping that tree, and flushing).
    pub(super) fn open(db: &sled::Db, name: &str) -> sled::Result<Packed> {
        let tree = db.open_tree(format!("{name}{PACKED_SUFFIX}"))?;
        let greatest = match tree.last()? {
            Some((_, bytes)) => {
                let last = Chunk::new(bytes)?;
                Some(IVec::from(last.key(last.len - 1)))
            }
            None => None,
        };
        let marks = Marks {
            mark: greatest.clone(),
            greatest,
            recent: None,
        };
        let packed = Packed {
            tree,
            marks: std::sync::Arc::new(std::sync::Mutex::new(marks)),
        };
        if db.tree_names().iter().any(|n| n == name.as_bytes()) {
            let plain = db.open_tree(name)?;
            if !plain.is_empty() {
                tracing::info!(
                    tree = name,
                    "packing a store tree an earlier version wrote (once)"
                );
            }
            let began = std::time::Instant::now();
            let mut reported = began;
            let mut moved = 0usize;
            let mut batch = Entries::new();
            let mut batch_bytes = 0;
            for item in plain.iter() {
                let (key, value) = item?;
                batch_bytes += key.len() + value.len();
                batch.insert(key, Some(value));
                if batch.len() == MOVE_BATCH || batch_bytes >= MOVE_BATCH_BYTES {
                    moved += batch.len();
                    batch_bytes = 0;
                    packed.write(&std::mem::take(&mut batch))?;
                    if reported.elapsed() >= std::time::Duration::from_secs(5) {
                        reported = std::time::Instant::now();
                        tracing::info!(tree = name, entries = moved, "packing a store tree");
                    }
                }
            }
            moved += batch.len();
            packed.write(&batch)?;
            // Packed first, durably; a move cut short is done again from the start.
            db.flush()?;
            db.drop_tree(name)?;
            db.flush()?;
            if moved > 0 {
                let seconds = began.elapsed().as_secs_f64();
                tracing::info!(tree = name, entries = moved, seconds, "store tree packed");
            }
        }
        Ok(packed)
    }

    /// Remembers (a digest of) each key written from now on past those in sled, up to
    /// `cap` of them, so that a lookup of a key never written reads nothing from sled.
    /// For a tree looked up mostly for keys it does not hold.
    pub(super) fn remembering(self, cap: usize) -> Packed {
        self.marks().recent = Some(Recent {
            cap,
            ..Default::default()
        });
        self
    }

    pub(super) fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        if !self.marks().may_hold(key) {
            return Ok(None);
        }
        let Some((_, bytes)) = self
            .tree
            .range::<&[u8], _>(..=key)
            .next_back()
            .transpose()?
        else {
            return Ok(None);
        };
        let chunk = Chunk::new(bytes)?;
        Ok(match chunk.find(key) {
            Ok(i) => Some(chunk.value(i)),
            Err(_) => None,
        })
    }

    /// Writes one entry (tests put what sled holds in place with it).
    #[cfg(test)]
    pub(super) fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> sled::Result<()> {
        self.write(&Entries::from([(
            IVec::from(key.as_ref()),
            Some(value.into()),
        )]))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    pub(super) fn clear(&self) -> sled::Result<()> {
        self.tree.clear()?;
        let mut marks = self.marks();
        (marks.greatest, marks.mark) = (None, None);
        if let Some(r) = &mut marks.recent {
            r.keys.clear();
        }
        Ok(())
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        // A panic under it leaves at worst a key too many in `recent`: a read of sled.
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn iter(&self) -> Iter {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// The entries within `(lo, hi)`, in order.
    pub(super) fn range(&self, lo: Bound<IVec>, hi: Bound<IVec>) -> Iter {
        // The walk starts at the chunk holding `lo`, which may begin before it.
        let mut failed = None;
        let start = match &lo {
            Bound::Included(k) | Bound::Excluded(k) => {
                match self.tree.range::<&IVec, _>(..=k).next_back().transpose() {
                    Ok(Some((c, _))) => Bound::Included(c),
                    Ok(None) => Bound::Included(k.clone()),
                    Err(e) => {
                        failed = Some(e);
                        Bound::Included(k.clone())
                    }
                }
            }
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match &hi {
            Bound::Included(k) => Bound::Included(k.clone()),
            Bound::Excluded(k) => Bound::Excluded(k.clone()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let empty = match (&start, &end) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a), Bound::Excluded(b)) => a >= b,
            _ => false,
        };
        Iter {
            chunks: (!empty).then(|| self.tree.range::<IVec, _>((start, end)).peekable()),
            current: None,
            failed,
            lo,
            hi,
        }
    }

    /// Writes `entries` (`None` removes), chunk by chunk.
    pub(super) fn write(&self, entries: &Entries) -> sled::Result<()> {
        self.marks().writing(entries);
        let mut todo = entries.iter().peekable();
        let Some(&(first, _)) = todo.peek() else {
            return Ok(());
        };
        // One walk over the chunks, from the one the first entry falls in (the last one
        // beginning at or before it, else the first one). What the walk has passed may
        // change under it; the chunks ahead of it change only once it reaches them.
        let start = match self.tree.range::<&IVec, _>(..=first).next_back() {
            Some(found) => Bound::Included(found?.0),
            None => Bound::Unbounded,
        };
        let mut walk = self
            .tree
            .range::<IVec, _>((start, Bound::Unbounded))
            .peekable();
        while let Some(&(first, _)) = todo.peek() {
            // The chunk `first` falls in: skip those the next one begins at or before.
            let mut found = walk.next().transpose()?;
            while let Some(Ok((k, _))) = walk.peek() {
                if k > first {
                    break;
                }
                found = walk.next().transpose()?;
            }
            let next = match walk.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => return Err(walk.next().and_then(Result::err).expect("an error")),
                None => None,
            };
            let (old_key, old) = match found {
                Some((k, v)) => (Some(k), Some(Chunk::new(v)?)),
                None => (None, None),
            };
            let below_next = |k: &IVec| next.as_ref().is_none_or(|n| k < n);
            let mut kept = old
                .iter()
                .flat_map(Chunk::entries)
                .take_while(|(k, _)| below_next(k))
                .peekable();
            let mut merged: Vec<(IVec, IVec)> = Vec::new();
            while let Some(&(key, change)) = todo.peek() {
                if !below_next(key) {
                    break;
                }
                todo.next();
                while let Some(entry) = kept.next_if(|(k, _)| k < key) {
                    merged.push(entry);
                }
                kept.next_if(|(k, _)| k == key);
                if let Some(value) = change {
                    merged.push((key.clone(), value.clone()));
                }
            }
            merged.extend(kept);
            let chunks = split(&merged);
            for part in chunks.iter().rev() {
                self.tree.insert(&part[0].0, encode(part))?;
            }
            if let Some(k) = old_key {
                if !chunks.iter().any(|part| part[0].0 == k) {
                    self.tree.remove(k)?;
                }
            }
        }
        Ok(())
    }
}

/// `entries` cut into chunks of about equal size, none over the limits unless one entry
/// is. An entry counts as at most [`CHUNK_BYTES`]: one large entry gets a chunk of its
/// own, and does not cut the small ones around it into chunks of one.
fn split(entries: &[(IVec, IVec)]) -> Vec<&[(IVec, IVec)]> {
    if entries.is_empty() {
        return Vec::new();
    }
    let size = |(k, v): &(IVec, IVec)| (k.len() + v.len() + ENTRY_OVERHEAD).min(CHUNK_BYTES);
    let bytes: usize = entries.iter().map(size).sum();
    let parts = bytes
        .div_ceil(CHUNK_BYTES)
        .max(entries.len().div_ceil(CHUNK_ENTRIES))
        .max(1);
    let (target_bytes, target_len) = (bytes.div_ceil(parts), entries.len().div_ceil(parts));
    let mut out = Vec::with_capacity(parts + 1);
    let (mut start, mut len, mut filled) = (0, 0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let n = size(entry);
        if len > 0 && (len == target_len || filled + n > target_bytes) {
            out.push(&entries[start..i]);
            (start, len, filled) = (i, 0, 0);
        }
        len += 1;
        filled += n;
    }
    out.push(&entries[start..]);
    out
}

/// A chunk: the entry count (u32), each entry's offset (u32), then the entries, each a
/// key and a value with their lengths (u32); little-endian.
fn encode(entries: &[(IVec, IVec)]) -> Vec<u8> {
    let head = 4 + 4 * entries.len();
    let body: usize = entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(head + body);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut at = head;
    for (k, v) in entries {
        out.extend_from_slice(&(at as u32).to_le_bytes());
        at += 8 + k.len() + v.len();
    }
    for (k, v) in entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// A chunk as sled holds it, read in place.
struct Chunk {
    bytes: IVec,
    len: usize,
}

fn corrupt() -> sled::Error {
    sled::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "a packed chunk of the store is damaged",
    ))
}

impl Chunk {
    /// Checks every offset and length once, so that reading it cannot go out of bounds.
    fn new(bytes: IVec) -> sled::Result<Chunk> {
        let u32_at = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
        };
        let len = u32_at(0).ok_or_else(corrupt)?;
        if len == 0 || len > bytes.len() / 4 {
            return Err(corrupt());
        }
        for i in 0..len {
            let ok = (|| {
                let at = u32_at(4 + 4 * i)?;
                let klen = u32_at(at)?;
                let vlen = u32_at(at.checked_add(4 + klen)?)?;
                (at + 8 + klen + vlen <= bytes.len()).then_some(())
            })();
            ok.ok_or_else(corrupt)?;
        }
        Ok(Chunk { bytes, len })
    }

    fn u32_at(&self, at: usize) -> usize {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    fn key(&self, i: usize) -> &[u8] {
        let at = self.u32_at(4 + 4 * i);
        &self.bytes[at + 4..at + 4 + self.u32_at(at)]
    }

    fn value(&self, i: usize) -> IVec {
        let at = self.u32_at(4 + 4 * i);
        let v = at + 4 + self.u32_at(at);
        self.bytes.subslice(v + 4, self.u32_at(v))
    }

    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    fn entry(&self, i: usize) -> (IVec, IVec) {
        (IVec::from(self.key(i)), self.value(i))
    }

    fn entries(&self) -> impl Iterator<Item = (IVec, IVec)> + '_ {
        (0..self.len).map(|i| self.entry(i))
    }
}

/// A walk of a packed tree's entries within a range.
pub(super) struct Iter {
    /// None once the walk is past `hi`.
    chunks: Option<std::iter::Peekable<sled::Iter>>,
    /// The chunk being read, where in it, and the next chunk's first key.
    current: Option<(Chunk, usize, Option<IVec>)>,
    /// Finding where to start failed: the walk's first item.
    failed: Option<sled::Error>,
    /// Past the last entry returned.
    lo: Bound<IVec>,
    hi: Bound<IVec>,
}

impl Iterator for Iter {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.chunks = None;
            return Some(Err(e));
        }
        loop {
            if let Some((chunk, i, next)) = &mut self.current {
                while *i < chunk.len {
                    let key = chunk.key(*i);
                    *i += 1;
                    if next.as_deref().is_some_and(|n| key >= n) {
                        break; // Stale: the next chunk holds this key.
                    }
                    let after_lo = match &self.lo {
                        Bound::Included(l) => key >= &l[..],
                        Bound::Excluded(l) => key > &l[..],
                        Bound::Unbounded => true,
                    };
                    if !after_lo {
                        continue;
                    }
                    let before_hi = match &self.hi {
                        Bound::Included(h) => key <= &h[..],
                        Bound::Excluded(h) => key < &h[..],
                        Bound::Unbounded => true,
                    };
                    if !before_hi {
                        self.chunks = None;
                        self.current = None;
                        return None;
                    }
                    let entry = chunk.entry(*i - 1);
                    self.lo = Bound::Excluded(entry.0.clone());
                    return Some(Ok(entry));
                }
                self.current = None;
            }
            let chunks = self.chunks.as_mut()?;
            let (_, bytes) = match chunks.next()? {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            let next = match chunks.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                _ => None,
            };
            match Chunk::new(bytes) {
                Ok(chunk) => self.current = Some((chunk, 0, next)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    fn entries(kv: &[(&[u8], Option<&[u8]>)]) -> Entries {
        kv.iter()
            .map(|(k, v)| (IVec::from(*k), v.map(IVec::from)))
            .collect()
    }

    fn all(p: &Packed) -> Vec<(Vec<u8>, Vec<u8>)> {
        p.iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect()
    }

    /// A run of keys written in order takes one sled key per chunk, not per entry.
    #[test]
    fn a_run_of_entries_takes_a_sled_key_per_chunk() {
        let (_dir, db) = db();
        let p = Packed::open(&db, "t").unwrap();
        let batch: Entries = (0..1000u32)
            .map(|i| (IVec::from(&i.to_be_bytes()), Some(IVec::from(&b"v"[..]))))
            .collect();
        p.write(&batch).unwrap();
        assert_eq!(all(&p).len(), 1000);
        assert!(p.tree.len() <= 1000 / CHUNK_ENTRIES + 2, "{}", p.tree.len());
        assert_eq!(
            p.get(&7u32.to_be_bytes()).unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(p.get(&1000u32.to_be_bytes()).unwrap(), None);
    }

    /// A large entry takes a chunk of its own; the small ones beside it stay packed.
    #[test]
    fn a_large_entry_is_a_chunk_of_its_own() {
        let mut entries: Vec<(IVec, IVec)> = (0..50u32)
            .map(|i| (IVec::from(&i.to_be_bytes()), IVec::from(&[7u8; 100][..])))
            .collect();
        entries.insert(25, (IVec::from("big"), IVec::from(vec![1u8; 100_000])));
        let parts = split(&entries);
        assert!(parts.len() <= 4, "{} chunks", parts.len());
        assert!(parts.iter().any(|p| p.len() == 1 && p[0].0 == "big"));
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 51);
    }

    /// Entries a chunk holds past the next chunk's first key (a checkpoint cut short
    /// between writing the new chunks and removing the old one) are never read, and the
    /// next write over them drops them.
    #[test]
    fn stale_entries_past_the_next_chunk_are_ignored() {
        let (_dir, db) = db();
        let p = Packed::open(&db, "t").unwrap();
        let old = [
            (IVec::from("a"), IVec::from("old")),
            (IVec::from("c"), IVec::from("old")),
        ];
        p.tree.insert("a", encode(&old)).unwrap();
        p.tree
            .insert("b", encode(&[(IVec::from("b"), IVec::from("new"))]))
            .unwrap();
        assert_eq!(
            all(&p),
            vec![
                (b"a".to_vec(), b"old".to_vec()),
                (b"b".to_vec(), b"new".to_vec())
            ]
        );
        assert_eq!(p.get(b"c").unwrap(), None);
        p.write(&entries(&[(b"a", Some(b"a2"))])).unwrap();
        assert_eq!(
            all(&p),
            vec![
                (b"a".to_vec(), b"a2".to_vec()),
                (b"b".to_vec(), b"new".to_vec())
            ]
        );
    }

    /// A damaged chunk is an error, not a panic or a wrong answer.
    #[test]
    fn a_damaged_chunk_is_an_error() {
        let (_dir, db) = db();
        let p = Packed::open(&db, "t").unwrap();
        p.insert("b", &b"fine"[..]).unwrap();
        let mut bytes = encode(&[(IVec::from("a"), IVec::from("value"))]);
        bytes[8] = 200; // The key's length.
        p.tree.insert("a", bytes.clone()).unwrap();
        assert!(p.get(b"a").is_err());
        assert!(p.iter().next().unwrap().is_err());
        assert_eq!(p.get(b"b").unwrap().as_deref(), Some(&b"fine"[..]));
        // The last chunk damaged: opening the tree says so.
        p.tree.insert("c", bytes).unwrap();
        assert!(Packed::open(&db, "t").is_err());
    }

    /// A lookup past the greatest key reads nothing from sled, and the greatest key is
    /// known again after a reopen and forgotten by `clear`.
    #[test]
    fn lookups_past_the_greatest_key_skip_sled() {
        let (_dir, db) = db();
        let p = Packed::open(&db, "t").unwrap();
        assert!(!p.marks().may_hold(b"a"));
        p.write(&entries(&[
            (b"b", Some(b"1")),
            (b"d", Some(b"2")),
            (b"e", None),
        ]))
        .unwrap();
        assert!(p.marks().may_hold(b"d") && !p.marks().may_hold(b"d0"));
        // Put behind the tree's back, past the mark: unseen, as the mark promises
        // nothing is there.
        p.tree
            .insert("z", encode(&[(IVec::from("z"), IVec::from("3"))]))
            .unwrap();
        assert_eq!(p.get(b"z").unwrap(), None);
        assert_eq!(p.get(b"d").unwrap().as_deref(), Some(&b"2"[..]));
        drop(p);
        let p = Packed::open(&db, "t").unwrap();
        assert_eq!(p.get(b"z").unwrap().as_deref(), Some(&b"3"[..]));
        p.clear().unwrap();
        assert!(!p.marks().may_hold(b"a"));
        assert_eq!(p.get(b"z").unwrap(), None);
    }

    /// A remembering tree knows, without reading sled, that a key past those it held
    /// when opened was never written, even below the greatest one written since; past
    /// its cap it knows only what lies past the greatest key.
    #[test]
    fn a_remembering_tree_skips_sled_for_keys_never_written() {
        let (_dir, db) = db();
        let p = Packed::open(&db, "t").unwrap();
        p.write(&entries(&[(b"a", Some(b"0"))])).unwrap();
        drop(p);
        let p = Packed::open(&db, "t").unwrap().remembering(2);
        p.write(&entries(&[(b"b", Some(b"1")), (b"d", Some(b"2"))]))
            .unwrap();
        // Put behind the tree's back, before the mark: found, as sled may hold it.
        p.tree
            .insert("0", encode(&[(IVec::from("0"), IVec::from("x"))]))
            .unwrap();
        assert_eq!(
            p.get(b"0").unwrap().as_deref(),
            Some(&b"x"[..]),
            "before the mark"
        );
        assert!(
            !p.marks().may_hold(b"c"),
            "below the greatest, never written"
        );
        assert_eq!(p.get(b"c").unwrap(), None);
        for (k, v) in [(&b"a"[..], &b"0"[..]), (b"b", b"1"), (b"d", b"2")] {
            assert_eq!(p.get(k).unwrap().as_deref(), Some(v));
        }
        // A third key written past the mark passes the cap: the greatest is the mark.
        p.write(&entries(&[(b"e", Some(b"3")), (b"f", None)]))
            .unwrap();
        assert!(p.marks().may_hold(b"c"));
        assert_eq!(p.get(b"c").unwrap(), None);
        assert!(!p.marks().may_hold(b"e0"));
        assert_eq!(p.get(b"e").unwrap().as_deref(), Some(&b"3"[..]));
        p.clear().unwrap();
        assert!(!p.marks().may_hold(b"a"));
    }

    /// What a version before packing wrote under the bare name is moved in on open.
    #[test]
    fn a_plain_tree_is_moved_in_on_open() {
        let (_dir, db) = db();
        let plain = db.open_tree("t").unwrap();
        for i in 0..300u32 {
            plain.insert(i.to_be_bytes(), &b"x"[..]).unwrap();
        }
        let p = Packed::open(&db, "t").unwrap();
        assert_eq!(all(&p).len(), 300);
        assert!(!db.tree_names().iter().any(|n| n == b"t"));
        // Opening again moves nothing and loses nothing.
        let p = Packed::open(&db, "t").unwrap();
        assert_eq!(all(&p).len(), 300);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// After any writes, a packed tree reads as a map given the same writes does,
        /// by key and by any range.
        #[test]
        fn reads_as_a_map_does(
            writes in proptest::collection::vec(
                proptest::collection::btree_map(
                    proptest::collection::vec(0u8..6, 0..4),
                    proptest::option::weighted(0.8, proptest::collection::vec(any::<u8>(), 0..3000)),
                    0..120,
                ),
                1..6,
            ),
            lo in proptest::collection::vec(0u8..6, 0..3),
            hi in proptest::collection::vec(0u8..6, 0..3),
            remember in proptest::option::of(1usize..200),
        ) {
            let (_dir, db) = db();
            let mut p = Packed::open(&db, "t").unwrap();
            if let Some(cap) = remember {
                p = p.remembering(cap);
            }
            let mut model = std::collections::BTreeMap::<Vec<u8>, Vec<u8>>::new();
            for batch in &writes {
                let e: Entries = batch
                    .iter()
                    .map(|(k, v)| (IVec::from(&k[..]), v.as_ref().map(|v| IVec::from(&v[..]))))
                    .collect();
                p.write(&e).unwrap();
                for (k, v) in batch {
                    match v {
                        Some(v) => model.insert(k.clone(), v.clone()),
                        None => model.remove(k),
                    };
                }
            }
            // Compared by key, and each value by its length and digest: a failure stays
            // readable.
            let digest = |v: &[u8]| (v.len(), v.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b))));
            let got: Vec<_> = all(&p).iter().map(|(k, v)| (k.clone(), digest(v))).collect();
            let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), digest(v))).collect();
            prop_assert_eq!(got, want);
            for k in model.keys() {
                prop_assert!(p.get(k).unwrap().map(|v| v.to_vec()) == model.get(k).cloned(), "{:?}", k);
            }
            prop_assert_eq!(p.get(&[9, 9]).unwrap(), None);
            for k in [&lo, &hi] {
                prop_assert!(p.get(k).unwrap().map(|v| v.to_vec()) == model.get(k).cloned(), "{:?}", k);
            }
            let got: Vec<Vec<u8>> = p
                .range(Bound::Excluded(IVec::from(&lo[..])), Bound::Included(IVec::from(&hi[..])))
                .map(|r| r.unwrap().0.to_vec())
                .collect();
            let want: Vec<Vec<u8>> = if lo < hi {
                model
                    .range::<Vec<u8>, _>((Bound::Excluded(&lo), Bound::Included(&hi)))
                    .map(|(k, _)| k.clone())
                    .collect()
            } else {
                Vec::new()
            };
            prop_assert_eq!(got, want);
            // Every chunk within its limits, unless one entry is over them alone.
            for item in p.tree.iter() {
                let (_, bytes) = item.unwrap();
                let c = Chunk::new(bytes.clone()).unwrap();
                prop_assert!(c.len <= CHUNK_ENTRIES);
                prop_assert!(c.len == 1 || bytes.len() <= 2 * CHUNK_BYTES);
            }
        }
    }
}
