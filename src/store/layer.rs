//! An in-memory layer over each sled tree (a memtable): jobs write to memory, and
//! checkpoints move what they wrote into sled in bulk, off the store's lock.
//!
//! A turn writes about sixteen keys across nine trees, and sled's cost per write (a copy
//! of a leaf, its own log, its page cache) was most of a turn's store time. In memory a
//! write is a `BTreeMap` insert; writes to one key in one checkpoint window (a record
//! written as running, then as done; a `running` entry added, then removed) reach sled
//! once, packed with the entries beside them (`packed.rs`). The write-ahead log
//! (`wal.rs`) still holds every change before its job is answered, so nothing answered
//! depends on the layer surviving a crash.
//!
//! Each tree has two layers over sled: `fresh`, written since the last freeze, and
//! `frozen`, which a checkpoint is moving into sled at the time. Reads look in `fresh`,
//! then `frozen`, then sled; a removal is a tombstone (`None`) until sled has it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use sled::IVec;

use super::packed::{self, Packed};

/// Keys to their values, `None` for a removal.
pub(super) type Entries = BTreeMap<IVec, Option<IVec>>;

/// What an entry is reckoned to cost in memory beyond its bytes (the map's node share,
/// the two `IVec` headers).
const ENTRY_OVERHEAD: usize = 64;

/// One sled tree and the layers over it. Used under the store's lock only (hence the
/// `RefCell`s); a checkpoint takes the frozen layer's `Arc` out with it.
pub(super) struct Layered {
    disk: Packed,
    fresh: RefCell<Entries>,
    frozen: RefCell<Arc<Entries>>,
    /// What `fresh` is reckoned to hold, in bytes.
    bytes: Cell<usize>,
}

impl Layered {
    pub(super) fn new(disk: Packed) -> Layered {
        Layered {
            disk,
            fresh: RefCell::new(Entries::new()),
            frozen: RefCell::new(Arc::new(Entries::new())),
            bytes: Cell::new(0),
        }
    }

    /// sled's tree itself: for start-up's bulk work, with nothing in memory.
    pub(super) fn disk(&self) -> &Packed {
        debug_assert!(self.fresh.borrow().is_empty() && self.frozen.borrow().is_empty());
        &self.disk
    }

    /// The value in memory, if memory has the key: `Some(None)` for a removal.
    fn in_memory(&self, key: &[u8]) -> Option<Option<IVec>> {
        if let Some(v) = self.fresh.borrow().get(key) {
            return Some(v.clone());
        }
        self.frozen.borrow().get(key).cloned()
    }

    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        match self.in_memory(key.as_ref()) {
            Some(v) => Ok(v),
            None => self.disk.get(key.as_ref()),
        }
    }

    pub(super) fn contains_key(&self, key: impl AsRef<[u8]>) -> sled::Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    fn set(&self, key: &[u8], value: Option<IVec>) {
        let size = key.len() + value.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD;
        self.bytes.set(self.bytes.get() + size);
        self.fresh.borrow_mut().insert(IVec::from(key), value);
    }

    /// Writes `value` under `key`, without reading what was there.
    pub(super) fn put(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) {
        self.set(key.as_ref(), Some(value.into()));
    }

    /// Removes `key`, without reading what was there.
    pub(super) fn delete(&self, key: impl AsRef<[u8]>) {
        self.set(key.as_ref(), None);
    }

    /// Writes `value` under `key`; returns what was there.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> sled::Result<Option<IVec>> {
        let old = self.get(key.as_ref())?;
        self.put(key, value);
        Ok(old)
    }

    /// Removes `key`; returns what was there.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        let old = self.get(key.as_ref())?;
        if old.is_some() {
            self.delete(key);
        }
        Ok(old)
    }

    /// The entries within `range`, in order, as sled's `range` gives them. Written to
    /// while it is read, the iterator sees memory's changes after its position; it holds
    /// no borrow of the layers between items.
    pub(super) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter<'_> {
        let own = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(IVec::from(k.as_ref())),
            Bound::Excluded(k) => Bound::Excluded(IVec::from(k.as_ref())),
            Bound::Unbounded => Bound::Unbounded,
        };
        let (lo, hi) = (own(range.start_bound()), own(range.end_bound()));
        Iter {
            layer: self,
            disk: self.disk.range(lo.clone(), hi.clone()).peekable(),
            lo,
            hi,
        }
    }

    pub(super) fn iter(&self) -> Iter<'_> {
        self.range::<IVec, _>(..)
    }

    /// The entries whose keys start with `prefix`.
    pub(super) fn scan_prefix(&self, prefix: &[u8]) -> Iter<'_> {
        match super::index::prefix_end(prefix) {
            Some(end) => self.range(prefix.to_vec()..end),
            None => self.range(prefix.to_vec()..),
        }
    }

    /// How many keys the tree holds (reads them all: for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.iter().count()
    }

    /// The first entry of memory's layers within `(lo, hi)`; `fresh` wins a tie.
    fn next_in_memory(&self, lo: &Bound<IVec>, hi: &Bound<IVec>) -> Option<(IVec, Option<IVec>)> {
        if is_empty_range(lo, hi) {
            return None;
        }
        let bounds = (as_slice(lo), as_slice(hi));
        let first = |m: &Entries| {
            m.range::<[u8], _>(bounds)
                .next()
                .map(|(k, v)| (k.clone(), v.clone()))
        };
        let fresh = first(&self.fresh.borrow());
        let frozen = first(&self.frozen.borrow());
        match (fresh, frozen) {
            (Some(a), Some(b)) if b.0 < a.0 => Some(b),
            (Some(a), _) => Some(a),
            (None, b) => b,
        }
    }

    /// Moves `fresh` to `frozen` (which must be empty: the last checkpoint finished);
    /// returns it, with sled's tree, for the checkpoint to write.
    pub(super) fn freeze(&self) -> (Packed, Arc<Entries>) {
        let fresh = std::mem::take(&mut *self.fresh.borrow_mut());
        self.bytes.set(0);
        let mut frozen = self.frozen.borrow_mut();
        debug_assert!(frozen.is_empty());
        *frozen = Arc::new(fresh);
        (self.disk.clone(), frozen.clone())
    }

    /// The frozen layer, with sled's tree: what a checkpoint that failed must write again.
    pub(super) fn frozen(&self) -> (Packed, Arc<Entries>) {
        (self.disk.clone(), self.frozen.borrow().clone())
    }

    /// A checkpoint wrote the frozen layer into sled, and flushed it: memory lets it go.
    pub(super) fn thaw(&self) {
        *self.frozen.borrow_mut() = Arc::new(Entries::new());
    }

    /// What `fresh` is reckoned to hold, in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes.get()
    }

    /// Writes both layers into sled and empties them (closing, or opening after a replay
    /// of the log: nobody else uses the store).
    pub(super) fn settle(&self) -> sled::Result<()> {
        let (disk, frozen) = self.frozen();
        write(&disk, &frozen)?;
        self.thaw();
        let (disk, fresh) = self.freeze();
        write(&disk, &fresh)?;
        self.thaw();
        Ok(())
    }
}

/// Writes a layer's entries into sled's tree (packed: see `packed.rs`). Not a sled
/// batch: that would hold sled's lock against every read of every tree until it is all
/// written.
pub(super) fn write(disk: &Packed, entries: &Entries) -> sled::Result<()> {
    disk.write(entries)
}

fn as_slice(b: &Bound<IVec>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(&k[..]),
        Bound::Excluded(k) => Bound::Excluded(&k[..]),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Whether no key lies within `(lo, hi)` (`BTreeMap::range` panics on some of those).
fn is_empty_range(lo: &Bound<IVec>, hi: &Bound<IVec>) -> bool {
    match (lo, hi) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a), Bound::Excluded(b))
        | (Bound::Excluded(a), Bound::Included(b))
        | (Bound::Excluded(a), Bound::Excluded(b)) => a >= b,
        _ => false,
    }
}

/// An ordered walk of a tree's layers and sled's entries within a range; memory's entry
/// wins over sled's for the same key, and tombstones are skipped.
pub(super) struct Iter<'a> {
    layer: &'a Layered,
    disk: std::iter::Peekable<packed::Iter>,
    /// Where the walk stands: past the last key returned.
    lo: Bound<IVec>,
    hi: Bound<IVec>,
}

impl<'a> Iter<'a> {
    pub(super) fn keys(self) -> impl Iterator<Item = sled::Result<IVec>> + 'a {
        self.map(|r| r.map(|(k, _)| k))
    }
}

impl Iterator for Iter<'_> {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let memory = self.layer.next_in_memory(&self.lo, &self.hi);
            let disk_key = match self.disk.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => return self.disk.next(),
                None => None,
            };
            match (memory, disk_key) {
                (None, None) => return None,
                (Some((key, value)), disk) if disk.as_ref().is_none_or(|d| key <= *d) => {
                    if disk.as_ref() == Some(&key) {
                        self.disk.next(); // Shadowed by memory.
                    }
                    self.lo = Bound::Excluded(key.clone());
                    if let Some(value) = value {
                        return Some(Ok((key, value)));
                    }
                }
                _ => {
                    let item = self.disk.next()?;
                    if let Ok((k, _)) = &item {
                        self.lo = Bound::Excluded(k.clone());
                    }
                    return Some(item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Layered) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, Layered::new(Packed::open(&db, "t").unwrap()))
    }

    fn keys(it: Iter<'_>) -> Vec<Vec<u8>> {
        it.keys().map(|k| k.unwrap().to_vec()).collect()
    }

    #[test]
    fn reads_see_fresh_over_frozen_over_sled_and_skip_removals() {
        let (_dir, t) = tree();
        for k in [b"a", b"c", b"e", b"g"] {
            t.disk.insert(k, &b"disk"[..]).unwrap();
        }
        t.put(b"b", &b"frozen"[..]);
        t.delete(b"c");
        t.put(b"e", &b"frozen"[..]);
        t.freeze();
        t.put(b"e", &b"fresh"[..]);
        t.put(b"c", &b"fresh"[..]);
        t.delete(b"g");
        t.put(b"h", &b"fresh"[..]);
        assert_eq!(t.get(b"c").unwrap().as_deref(), Some(&b"fresh"[..]));
        assert_eq!(t.get(b"e").unwrap().as_deref(), Some(&b"fresh"[..]));
        assert_eq!(t.get(b"b").unwrap().as_deref(), Some(&b"frozen"[..]));
        assert_eq!(t.get(b"g").unwrap(), None);
        let all: Vec<(Vec<u8>, Vec<u8>)> = t
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = [
            ("a", "disk"),
            ("b", "frozen"),
            ("c", "fresh"),
            ("e", "fresh"),
            ("h", "fresh"),
        ]
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        assert_eq!(all, want);
        assert_eq!(keys(t.range(&b"b"[..]..&b"h"[..])), [b"b", b"c", b"e"]);
        assert_eq!(keys(t.range(&b"c"[..]..=&b"c"[..])), [b"c"]);
        assert_eq!(keys(t.range(..&b"a"[..])), Vec::<Vec<u8>>::new());
        // Settled, sled alone holds the same.
        t.settle().unwrap();
        let on_disk: Vec<Vec<u8>> = t.disk().iter().map(|r| r.unwrap().0.to_vec()).collect();
        assert_eq!(on_disk, [&b"a"[..], b"b", b"c", b"e", b"h"]);
    }

    #[test]
    fn removing_while_walking_removes_every_key_once() {
        let (_dir, t) = tree();
        for i in 0u8..10 {
            t.disk.insert([1, i], &[i][..]).unwrap();
        }
        for i in 5u8..15 {
            t.put([1, i], &[i][..]);
        }
        let mut seen = Vec::new();
        for key in t.scan_prefix(&[1]).keys() {
            let key = key.unwrap();
            seen.push(key[1]);
            t.delete(key);
        }
        assert_eq!(seen, (0u8..15).collect::<Vec<_>>());
        assert_eq!(t.len(), 0);
    }

    proptest::proptest! {
        /// Whatever the writes and where the freeze falls, the layers read as one map
        /// would, and settling leaves sled holding that map.
        #[test]
        fn layers_read_as_one_map(
            ops in proptest::collection::vec((0u8..24, proptest::option::of(0u8..4), 0u8..3), 0..80),
            lo in 0u8..24,
            hi in 0u8..24,
        ) {
            let (_dir, t) = tree();
            let mut model = BTreeMap::<Vec<u8>, Vec<u8>>::new();
            for (i, (k, v, phase)) in ops.iter().enumerate() {
                let key = vec![*k];
                match v {
                    Some(v) => {
                        model.insert(key.clone(), vec![*v]);
                        match phase {
                            // Straight into sled, where memory does not shadow it.
                            0 if t.in_memory(&key).is_none() => {
                                t.disk.insert(&key, vec![*v]).unwrap();
                            }
                            _ => t.put(&key, vec![*v]),
                        }
                    }
                    None => {
                        model.remove(&key);
                        t.delete(&key);
                    }
                }
                if i == ops.len() / 2 && t.frozen.borrow().is_empty() {
                    t.freeze();
                }
            }
            let read: Vec<(Vec<u8>, Vec<u8>)> = t
                .range(vec![lo]..vec![hi.max(lo)])
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = model
                .range(vec![lo]..vec![hi.max(lo)])
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            proptest::prop_assert_eq!(read, want);
            for k in 0u8..24 {
                proptest::prop_assert_eq!(t.get([k]).unwrap().map(|v| v.to_vec()), model.get(&vec![k]).cloned());
            }
            t.settle().unwrap();
            let on_disk: BTreeMap<Vec<u8>, Vec<u8>> = t
                .disk()
                .iter()
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
            proptest::prop_assert_eq!(on_disk, model);
        }
    }
}
