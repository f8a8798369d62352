//! The store's write-ahead log: `oonode.wal` beside sled's files.
//!
//! Jobs write to memory (`layer.rs`), and the store appends every job's changes to this
//! file with one `write(2)` before the job returns, so a killed process loses nothing it
//! answered (the bytes are in the kernel), and syncs it when the durability mode asks
//! (once for all jobs waiting, or within a window). A checkpoint sets the log aside as
//! `oonode.wal.old` and starts a new one, moves what the old one said into sled, flushes
//! sled, and only then removes the old log. On open, whatever the log holds is applied to sled
//! again: every change is a blind write (a value, not a delta), so applying it over a
//! sled state that already holds some of it ends in the same state.
//!
//! A record is `len: u32 BE | crc32(body): u32 BE | body`. The first record that is cut
//! short or fails its checksum ends the replay: it can only be the last write, torn by a
//! crash, which nobody was answered for.
//!
//! The file grows by zero-filled steps of [`GROW_BYTES`] and records overwrite the zeros:
//! a sync of a write that does not change the file's size or block map has no metadata to
//! commit (about a third faster on ext4 here, 0.13–0.15 ms against 0.20–0.23 ms). A zero
//! length is where the records end.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The zero-filled step the log file grows by. Once per step, a sync also writes the
/// zeros and the new size (about 400 turns here).
const GROW_BYTES: u64 = 1024 * 1024;

/// One change, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    /// A session record (JSON) under its key; the index follows it. `prev`: the index
    /// meta (JSON) it replaced, if any, for a replay over a half-done write.
    Session {
        key: Vec<u8>,
        record: Vec<u8>,
        prev: Option<Vec<u8>>,
    },
    /// A session and its kept replies removed (the sweeper), with its meta as `prev`.
    RemoveSession { key: Vec<u8>, prev: Option<Vec<u8>> },
    /// A replay key and when it may be forgotten (the `seen_at` tree).
    Seen { key: Vec<u8>, expires: u64 },
    /// A replay key as versions before `Seen` logged it (the legacy `seen` tree).
    LegacySeen { key: Vec<u8>, expires: u64 },
    /// One kept reply of a session: written by versions before `Replies`, read still.
    Reply {
        session: Vec<u8>,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Every kept reply of a session removed.
    ClearReplies { session: Vec<u8> },
    /// A session's kept replies, all in one value (`encode_replies`), in place of any
    /// kept before.
    Replies { session: Vec<u8>, value: Vec<u8> },
    /// A trust entry set to a value, or removed.
    Trust {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    /// A session's history changed (`history.rs`): messages `drop_from..keep_from`
    /// dropped, `messages` (JSON) written as numbers `at..`, those before `keep_from`
    /// skipped.
    History {
        session: Vec<u8>,
        drop_from: u64,
        keep_from: u64,
        at: u64,
        messages: Vec<Vec<u8>>,
    },
}

/// The largest record replay accepts: a session record is bounded by the history
/// limits, a reply by `max_output_bytes`; anything larger is damage.
const MAX_RECORD: u32 = 256 * 1024 * 1024;

impl Op {
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        match self {
            Op::Session { key, record, prev } => {
                out.push(1);
                put_bytes(out, key);
                put_bytes(out, record);
                put_optional(out, prev.as_deref());
            }
            Op::RemoveSession { key, prev } => {
                out.push(2);
                put_bytes(out, key);
                put_optional(out, prev.as_deref());
            }
            Op::Seen { key, expires } => {
                out.push(10);
                put_bytes(out, key);
                out.extend_from_slice(&expires.to_be_bytes());
            }
            Op::LegacySeen { key, expires } => {
                out.push(3);
                put_bytes(out, key);
                out.extend_from_slice(&expires.to_be_bytes());
            }
            Op::Reply {
                session,
                seq,
                bytes,
            } => {
                out.push(5);
                put_bytes(out, session);
                out.extend_from_slice(&seq.to_be_bytes());
                put_bytes(out, bytes);
            }
            Op::ClearReplies { session } => {
                out.push(6);
                put_bytes(out, session);
            }
            Op::Replies { session, value } => {
                out.push(9);
                put_bytes(out, session);
                put_bytes(out, value);
            }
            Op::Trust { key, value } => {
                out.push(7);
                put_bytes(out, key);
                put_optional(out, value.as_deref());
            }
            Op::History {
                session,
                drop_from,
                keep_from,
                at,
                messages,
            } => {
                out.push(8);
                put_bytes(out, session);
                for n in [drop_from, keep_from, at] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
                out.extend_from_slice(&(messages.len() as u32).to_be_bytes());
                for m in messages {
                    put_bytes(out, m);
                }
            }
        }
        let body_len = (out.len() - start - 8) as u32;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&body_len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    }

    fn decode(body: &[u8]) -> Option<Op> {
        let mut r = Reader(body);
        let op = match r.u8()? {
            1 => Op::Session {
                key: r.bytes()?,
                record: r.bytes()?,
                prev: r.optional()?,
            },
            2 => Op::RemoveSession {
                key: r.bytes()?,
                prev: r.optional()?,
            },
            10 => Op::Seen {
                key: r.bytes()?,
                expires: r.u64()?,
            },
            3 => Op::LegacySeen {
                key: r.bytes()?,
                expires: r.u64()?,
            },
            5 => Op::Reply {
                session: r.bytes()?,
                seq: r.u64()?,
                bytes: r.bytes()?,
            },
            6 => Op::ClearReplies {
                session: r.bytes()?,
            },
            9 => Op::Replies {
                session: r.bytes()?,
                value: r.bytes()?,
            },
            7 => Op::Trust {
                key: r.bytes()?,
                value: r.optional()?,
            },
            8 => {
                let session = r.bytes()?;
                let (drop_from, keep_from, at) = (r.u64()?, r.u64()?, r.u64()?);
                let count = r.u32()?;
                // Each message takes at least its 4-byte length: a count the body
                // cannot hold is damage, not a reason to allocate.
                if count as usize > r.0.len() / 4 {
                    return None;
                }
                let mut messages = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    messages.push(r.bytes()?);
                }
                Op::History {
                    session,
                    drop_from,
                    keep_from,
                    at,
                    messages,
                }
            }
            _ => return None,
        };
        r.0.is_empty().then_some(op)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
        None => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
    /// `Some(None)` for an absent value; `None` for damage.
    fn optional(&mut self) -> Option<Option<Vec<u8>>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.bytes()?)),
            _ => None,
        }
    }
}

/// Reads the records of a log, in order, up to the first damaged one. Also returns
/// whether the log ended cleanly (false: a torn or corrupt tail was ignored).
pub(super) fn decode_all(data: &[u8]) -> (Vec<Op>, bool) {
    let (ops, _, clean) = decode_prefix(data);
    (ops, clean)
}

/// [`decode_all`], also returning how many bytes the records read take.
fn decode_prefix(all: &[u8]) -> (Vec<Op>, usize, bool) {
    let mut ops = Vec::new();
    let mut data = all;
    let used = |rest: &[u8]| all.len() - rest.len();
    while !data.is_empty() {
        // The zeros the file was grown by: the records end here, cleanly.
        if data.iter().all(|b| *b == 0) {
            return (ops, used(data), true);
        }
        if data.len() < 8 {
            return (ops, used(data), false);
        }
        let len = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD || data.len() - 8 < len as usize {
            return (ops, used(data), false);
        }
        let body = &data[8..8 + len as usize];
        if crc32fast::hash(body) != crc {
            return (ops, used(data), false);
        }
        match Op::decode(body) {
            Some(op) => ops.push(op),
            None => return (ops, used(data), false),
        }
        data = &data[8 + len as usize..];
    }
    (ops, used(data), true)
}

/// The open log file, and where a checkpoint sets the one before it aside.
pub(super) struct Wal {
    file: File,
    /// Bytes written since the file was started.
    len: u64,
    /// The file's size: zeros from `len` to here.
    grown: u64,
    path: PathBuf,
    /// `<path>.old`: the log a checkpoint is moving into sled, until it is there.
    old: PathBuf,
}

fn open_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Makes the directory's entries (a rename, a new or removed file) durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Wal {
    /// Opens (or creates) the log and reads what it holds: the set-aside log first, if a
    /// checkpoint did not finish, then the log itself. Also returns whether both ended
    /// cleanly.
    pub(super) fn open(path: &Path) -> std::io::Result<(Wal, Vec<Op>, bool)> {
        let mut old_name = path.as_os_str().to_owned();
        old_name.push(".old");
        let old = PathBuf::from(old_name);
        let (mut ops, mut clean) = (Vec::new(), true);
        match std::fs::read(&old) {
            Ok(data) => (ops, clean) = decode_all(&data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = open_file(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (more, used, tail_clean) = decode_prefix(&data);
        ops.extend(more);
        // Whatever follows the records (a torn one, zeros) goes: a later record must
        // never end where an older one, left beyond a torn one, would begin.
        let len = used as u64;
        file.set_len(len)?;
        let wal = Wal {
            file,
            len,
            grown: len,
            path: path.to_path_buf(),
            old,
        };
        Ok((wal, ops, clean && tail_clean))
    }

    /// Appends encoded records in one `write(2)` (or as few as the kernel allows), over
    /// the zeros the file was grown by.
    pub(super) fn append(&mut self, encoded: &[u8]) -> std::io::Result<()> {
        if encoded.is_empty() {
            return Ok(());
        }
        let end = self.len + encoded.len() as u64;
        if end > self.grown {
            // Real zeros, not a hole (`set_len`): writing into a hole changes the block
            // map, which each sync would then commit.
            let grown = end.div_ceil(GROW_BYTES) * GROW_BYTES;
            let zeros = vec![0; (grown - self.grown) as usize];
            self.file.write_all_at(&zeros, self.grown)?;
            self.grown = grown;
        }
        self.file.write_all_at(encoded, self.len)?;
        self.len = end;
        Ok(())
    }

    /// A handle for syncing from another thread.
    pub(super) fn sync_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Sets the log aside as `<path>.old` once synced, and starts an empty one: what the
    /// old one holds stays replayable until [`SetAside::remove`]. There must be
    /// no old log (the last checkpoint finished). Returns a handle of the new one for
    /// syncing from another thread.
    pub(super) fn rotate(&mut self) -> std::io::Result<File> {
        self.file.sync_data()?;
        std::fs::rename(&self.path, &self.old)?;
        let file = match open_file(&self.path).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok(files) => files,
            Err(e) => {
                // Back as it was: appends go on to the same file, under its own name.
                let _ = std::fs::rename(&self.old, &self.path);
                return Err(e);
            }
        };
        // Before a record of the new file is answered as synced, its name must last.
        sync_dir(&self.path)?;
        let (handle, file) = file;
        self.file = file;
        self.len = 0;
        self.grown = 0;
        Ok(handle)
    }

    /// The set-aside log, for [`SetAside::remove`] once sled holds (durably) everything
    /// it said.
    pub(super) fn set_aside(&self) -> SetAside {
        SetAside {
            old: self.old.clone(),
        }
    }

    /// Empties the log and removes the set-aside one, once sled holds (durably)
    /// everything they said.
    pub(super) fn reset(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        self.grown = 0;
        self.file.sync_all()?;
        self.set_aside().remove()
    }
}

/// A log a checkpoint set aside. Removing it syncs the directory (a few ms), so the
/// checkpointer does it without the store's lock; the removal is durable before a later
/// rotation can set another log aside, so that a crash can never bring this one back
/// after it.
pub(super) struct SetAside {
    old: PathBuf,
}

impl SetAside {
    pub(super) fn remove(self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.old) {
            Ok(()) => sync_dir(&self.old),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Op> {
        vec![
            Op::Session {
                key: b"sA/one".to_vec(),
                record: br#"{"a":1}"#.to_vec(),
                prev: None,
            },
            Op::Session {
                key: b"sA/one".to_vec(),
                record: br#"{"a":2}"#.to_vec(),
                prev: Some(b"{}".to_vec()),
            },
            Op::Seen {
                key: b"k".to_vec(),
                expires: 77,
            },
            Op::LegacySeen {
                key: b"k".to_vec(),
                expires: 78,
            },
            Op::Reply {
                session: b"sA/one".to_vec(),
                seq: u64::MAX,
                bytes: vec![0, 1, 2],
            },
            Op::ClearReplies {
                session: b"sA/one".to_vec(),
            },
            Op::Replies {
                session: b"sA/one".to_vec(),
                value: vec![3; 20],
            },
            Op::Trust {
                key: b"credits:0x1".to_vec(),
                value: Some(vec![9; 8]),
            },
            Op::Trust {
                key: b"contact:0x1".to_vec(),
                value: None,
            },
            Op::History {
                session: b"sA/one".to_vec(),
                drop_from: 3,
                keep_from: 5,
                at: 7,
                messages: vec![br#"{"role":"user","content":"q"}"#.to_vec(), vec![]],
            },
            Op::RemoveSession {
                key: b"sA/one".to_vec(),
                prev: Some(b"{}".to_vec()),
            },
        ]
    }

    fn encode(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            op.encode_into(&mut out);
        }
        out
    }

    proptest::proptest! {
        /// Whatever a damaged file holds, reading it neither panics nor invents records:
        /// what it returns is a prefix of what was written before the damage.
        #[test]
        fn any_damage_reads_as_a_prefix(
            cut in 0usize..400,
            flip in proptest::option::of((0usize..400, 1u8..=255)),
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let ops = sample();
            let mut bytes = encode(&ops);
            bytes.truncate(cut.min(bytes.len()));
            if let Some((at, mask)) = flip {
                if at < bytes.len() {
                    bytes[at] ^= mask;
                }
            }
            bytes.extend_from_slice(&junk);
            let (read, _) = decode_all(&bytes);
            proptest::prop_assert!(read.len() <= ops.len());
            proptest::prop_assert_eq!(&read[..], &ops[..read.len()]);
        }
    }

    #[test]
    fn records_read_back_as_written() {
        let ops = sample();
        assert_eq!(decode_all(&encode(&ops)), (ops, true));
        assert_eq!(decode_all(&[]), (vec![], true));
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_nothing_before_it() {
        let ops = sample();
        let all = encode(&ops);
        let before_last = encode(&ops[..ops.len() - 1]).len();
        for cut in before_last + 1..all.len() {
            let (read, clean) = decode_all(&all[..cut]);
            assert_eq!(read, ops[..ops.len() - 1], "cut at {cut}");
            // A torn start that is all zeros reads as the zeros the file grew by.
            let zeros = all[before_last..cut].iter().all(|b| *b == 0);
            assert_eq!(clean, zeros, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_or_zeroed_tail_ends_the_replay_there() {
        let ops = sample();
        let mut all = encode(&ops);
        let first = encode(&ops[..1]).len();
        all[first + 10] ^= 0x40;
        let (read, clean) = decode_all(&all);
        assert_eq!((read, clean), (ops[..1].to_vec(), false));
        // The zeros a file grows by end the records cleanly; a record after them is
        // never read.
        let mut zeroed = encode(&ops);
        zeroed.extend_from_slice(&[0; 64]);
        assert_eq!(decode_all(&zeroed), (ops.clone(), true));
        zeroed.extend_from_slice(&encode(&ops[..1]));
        assert_eq!(decode_all(&zeroed), (ops, false));
    }

    #[test]
    fn the_file_grows_by_zeros_and_records_overwrite_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oonode.wal");
        let ops = sample();
        let one = encode(&ops);
        let (mut wal, _, _) = Wal::open(&path).unwrap();
        wal.append(&one).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(size(), GROW_BYTES, "not grown by a zero-filled step");
        assert_eq!(wal.len(), one.len() as u64);
        // Past the first step: the file grows by whole steps, records stay in order.
        let times = (GROW_BYTES as usize / one.len()) + 2;
        for _ in 1..times {
            wal.append(&one).unwrap();
        }
        assert_eq!(size(), 2 * GROW_BYTES);
        drop(wal);
        let (mut wal, read, clean) = Wal::open(&path).unwrap();
        assert!(clean);
        assert_eq!(read.len(), times * ops.len());
        assert!(read.chunks(ops.len()).all(|c| c == ops));
        // Open cut the zeros: appends go on where the records end.
        assert_eq!(size(), (times * one.len()) as u64);
        wal.append(&one).unwrap();
        drop(wal);
        let (_, read, _) = Wal::open(&path).unwrap();
        assert_eq!(read.len(), (times + 1) * ops.len());
    }

    #[test]
    fn open_cuts_what_follows_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oonode.wal");
        let ops = sample();
        // Record 1, record 2 torn, record 3 whole after it (written back out of order).
        let first = encode(&ops[..1]);
        let mut torn = encode(&ops[1..2]);
        torn[12] ^= 0xff;
        let mut file = first.clone();
        file.extend_from_slice(&torn);
        file.extend_from_slice(&encode(&ops[2..3]));
        std::fs::write(&path, &file).unwrap();
        let (mut wal, read, clean) = Wal::open(&path).unwrap();
        assert_eq!((read, clean), (ops[..1].to_vec(), false));
        // A new record as long as the torn one must not make the third readable.
        wal.append(&encode(&ops[1..2])).unwrap();
        drop(wal);
        let (_, read, _) = Wal::open(&path).unwrap();
        assert_eq!(read, ops[..2].to_vec());
    }

    #[test]
    fn the_file_keeps_records_across_reopen_until_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oonode.wal");
        let ops = sample();
        {
            let (mut wal, read, clean) = Wal::open(&path).unwrap();
            assert!(read.is_empty() && clean);
            wal.append(&encode(&ops[..3])).unwrap();
            wal.append(&encode(&ops[3..])).unwrap();
            wal.sync_handle().unwrap().sync_data().unwrap();
        }
        let (mut wal, read, clean) = Wal::open(&path).unwrap();
        assert_eq!((read, clean), (ops, true));
        wal.reset().unwrap();
        assert_eq!(wal.len(), 0);
        drop(wal);
        let (_, read, _) = Wal::open(&path).unwrap();
        assert!(read.is_empty());
    }
}
