//! Session histories as appended messages: a turn writes its two new messages and drops
//! the ones trimmed off the front, so it costs the same at turn 1 and at turn 10,000.
//!
//! Message `n` of a session lives in the `history` tree under `key 0x00 n(be)`; the
//! record names the numbers it holds ([`HistorySpan`]). Numbers only grow: a turn
//! appends at `span.to`, and a caller that sends its own history has it written after
//! the old one, which is dropped. The store keeps the newest histories it read or
//! wrote in memory ([`HotHistories`]), so a session's next turn reads none of them back.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{wal, Ctx, StoreError, Trees};
use crate::agent::Message;

/// The message numbers a session's history holds in the store: `from..to`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistorySpan {
    pub from: u64,
    pub to: u64,
}

impl HistorySpan {
    pub fn is_empty(&self) -> bool {
        self.from >= self.to
    }

    pub fn len(&self) -> usize {
        self.to.saturating_sub(self.from) as usize
    }
}

/// How a turn changes a session's history, planned by the dispatcher (which knows the
/// history limits) and applied by the store in the turn's one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryWrite {
    /// The stored history it changes.
    pub span: HistorySpan,
    /// Messages written after it, numbered from `span.to`.
    pub append: Vec<Message>,
    /// The first message number kept: those before it are dropped (at least `span.from`,
    /// at most `span.to + append.len()`).
    pub keep_from: u64,
}

impl HistoryWrite {
    /// A turn that adds `append` to the stored history, keeping its newest `keep`
    /// messages in all.
    pub fn appending(span: HistorySpan, append: Vec<Message>, keep: usize) -> HistoryWrite {
        let end = span.to + append.len() as u64;
        HistoryWrite {
            span,
            keep_from: end.saturating_sub(keep as u64).max(span.from),
            append,
        }
    }

    /// A turn whose caller sent the history itself: `history` replaces the stored one,
    /// of which only the newest `keep` messages stay.
    pub fn replacing(span: HistorySpan, history: Vec<Message>, keep: usize) -> HistoryWrite {
        let end = span.to + history.len() as u64;
        HistoryWrite {
            span,
            keep_from: end.saturating_sub(keep as u64).max(span.to),
            append: history,
        }
    }

    /// The span after the write.
    pub fn result(&self) -> HistorySpan {
        HistorySpan {
            from: self.keep_from,
            to: self.span.to + self.append.len() as u64,
        }
    }
}

/// Applies a logged history change to sled: drops `drop_from..keep_from`, writes the
/// messages numbered `at..` that are at or after `keep_from`. Blind, like every logged
/// change: applying it twice ends in the same state.
pub(super) fn apply(
    t: &Trees,
    session: &[u8],
    drop_from: u64,
    keep_from: u64,
    at: u64,
    messages: &[Vec<u8>],
) -> Result<(), StoreError> {
    if drop_from < keep_from {
        let start = super::seq_key(session, drop_from);
        let end = super::seq_key(session, keep_from);
        for key in t.history.range(start..end).keys() {
            t.history.delete(key?);
        }
    }
    for (i, bytes) in messages.iter().enumerate() {
        let n = at + i as u64;
        if n >= keep_from {
            t.history.put(super::seq_key(session, n), &bytes[..]);
        }
    }
    Ok(())
}

/// Writes and logs one turn's history change; the hot copy follows it.
pub(super) fn write(ctx: &mut Ctx, session: &[u8], w: HistoryWrite) -> Result<(), StoreError> {
    let mut messages = Vec::with_capacity(w.append.len());
    for m in &w.append {
        messages.push(serde_json::to_vec(m)?);
    }
    apply(
        ctx.trees,
        session,
        w.span.from,
        w.keep_from,
        w.span.to,
        &messages,
    )?;
    ctx.log(wal::Op::History {
        session: session.to_vec(),
        drop_from: w.span.from,
        keep_from: w.keep_from,
        at: w.span.to,
        messages,
    });
    ctx.hot.update(session, &w);
    Ok(())
}

/// A session's history: from memory if it is hot, else read from sled (and made hot).
pub(super) fn read(
    ctx: &mut Ctx,
    session: &[u8],
    span: HistorySpan,
) -> Result<Vec<Message>, StoreError> {
    if span.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(messages) = ctx.hot.get(session, span) {
        return Ok(messages);
    }
    let start = super::seq_key(session, span.from);
    let end = super::seq_key(session, span.to);
    let mut out = Vec::with_capacity(span.len());
    for item in ctx.trees.history.range(start..end) {
        let (_, bytes) = item?;
        out.push(serde_json::from_slice(&bytes)?);
    }
    ctx.hot.put(session, span, out.iter().cloned().collect());
    Ok(out)
}

/// Bytes of hot histories kept at most (their messages' content).
const HOT_BYTES: usize = 64 * 1024 * 1024;

struct Hot {
    span: HistorySpan,
    messages: VecDeque<Message>,
    bytes: usize,
}

/// The histories of recent sessions, held under the store's lock (whose jobs are the
/// only writers, so a copy is never stale unless its span says so), within
/// [`HOT_BYTES`]. The oldest put goes first.
#[derive(Default)]
pub(super) struct HotHistories {
    map: HashMap<Vec<u8>, Hot>,
    order: VecDeque<Vec<u8>>,
    bytes: usize,
    limit: usize,
}

fn content_bytes<'a>(messages: impl Iterator<Item = &'a Message>) -> usize {
    messages.map(|m| m.content.len() + m.role.len()).sum()
}

impl HotHistories {
    pub(super) fn new() -> HotHistories {
        HotHistories::with_limit(HOT_BYTES)
    }

    fn with_limit(limit: usize) -> HotHistories {
        HotHistories {
            limit,
            ..HotHistories::default()
        }
    }

    fn get(&self, session: &[u8], span: HistorySpan) -> Option<Vec<Message>> {
        let hot = self.map.get(session)?;
        (hot.span == span).then(|| hot.messages.iter().cloned().collect())
    }

    fn put(&mut self, session: &[u8], span: HistorySpan, messages: VecDeque<Message>) {
        self.forget(session);
        let bytes = content_bytes(messages.iter());
        if bytes > self.limit {
            return;
        }
        self.bytes += bytes;
        self.map.insert(
            session.to_vec(),
            Hot {
                span,
                messages,
                bytes,
            },
        );
        self.order.push_back(session.to_vec());
        self.shrink();
    }

    /// Follows a write: a hot copy of the span written over is moved on, any other copy
    /// of that session dropped. A session written and not yet hot becomes hot only when
    /// it starts empty (a new session: nothing to read back).
    fn update(&mut self, session: &[u8], w: &HistoryWrite) {
        let Some(hot) = self.map.get_mut(session) else {
            if w.span.is_empty() {
                let kept = w.append.len() - (w.result().len().min(w.append.len()));
                self.put(
                    session,
                    w.result(),
                    w.append[kept..].iter().cloned().collect(),
                );
            }
            return;
        };
        if hot.span != w.span {
            self.forget(session);
            return;
        }
        let before = hot.bytes;
        hot.bytes += content_bytes(w.append.iter());
        hot.messages.extend(w.append.iter().cloned());
        let mut first = w.span.from;
        while first < w.keep_from {
            if let Some(m) = hot.messages.pop_front() {
                hot.bytes -= m.content.len() + m.role.len();
            }
            first += 1;
        }
        hot.span = w.result();
        self.bytes = self.bytes + hot.bytes - before;
        self.shrink();
    }

    pub(super) fn forget(&mut self, session: &[u8]) {
        if let Some(hot) = self.map.remove(session) {
            self.bytes -= hot.bytes;
        }
    }

    fn shrink(&mut self) {
        while self.bytes > self.limit {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            self.forget(&key);
        }
        // Keys of forgotten sessions stay in `order` until they reach its front; keep it
        // from growing past a few times the map.
        if self.order.len() > 4 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::msgs;

    #[test]
    fn a_turn_appends_after_the_span_and_drops_only_what_the_limit_cuts() {
        let span = HistorySpan { from: 10, to: 14 };
        let w = HistoryWrite::appending(span, msgs(&["q", "a"]), 6);
        assert_eq!(w.keep_from, 10, "six kept: nothing dropped");
        assert_eq!(w.result(), HistorySpan { from: 10, to: 16 });
        let w = HistoryWrite::appending(span, msgs(&["q", "a"]), 4);
        assert_eq!(w.result(), HistorySpan { from: 12, to: 16 });
        let w = HistoryWrite::appending(HistorySpan::default(), msgs(&["q", "a"]), 1);
        assert_eq!(w.result(), HistorySpan { from: 1, to: 2 }, "even a new one");
    }

    #[test]
    fn a_history_the_caller_sent_replaces_the_stored_one_entirely() {
        let span = HistorySpan { from: 10, to: 14 };
        let w = HistoryWrite::replacing(span, msgs(&["a", "b", "c"]), 200);
        assert_eq!(w.keep_from, 14, "all of the old span goes");
        assert_eq!(w.result(), HistorySpan { from: 14, to: 17 });
        let w = HistoryWrite::replacing(span, msgs(&["a", "b", "c"]), 2);
        assert_eq!(w.result(), HistorySpan { from: 15, to: 17 });
    }

    #[test]
    fn hot_copies_follow_writes_and_stay_within_their_bytes() {
        // Bytes count content and role: "ab" as a user message is 6.
        let mut hot = HotHistories::with_limit(20);
        let s = b"k".as_slice();
        let w = HistoryWrite::appending(HistorySpan::default(), msgs(&["ab", "cd"]), 10);
        hot.update(s, &w);
        let span = w.result();
        assert_eq!(hot.get(s, span), Some(msgs(&["ab", "cd"])));
        let w = HistoryWrite::appending(span, msgs(&["ef"]), 2);
        hot.update(s, &w);
        assert_eq!(hot.get(s, w.result()), Some(msgs(&["cd", "ef"])));
        assert_eq!(hot.get(s, span), None, "an old span is not served");
        assert_eq!(hot.bytes, 12);

        hot.put(b"big", span, msgs(&["0123456789abcdefghij"]).into());
        assert_eq!(hot.get(b"big", span), None, "larger than the whole limit");
        hot.put(b"other", span, msgs(&["0"]).into());
        assert_eq!(hot.bytes, 17);
        hot.put(b"third", span, msgs(&["0123456789"]).into());
        assert!(hot.bytes <= 20, "{}", hot.bytes);
        assert_eq!(hot.get(s, w.result()), None, "the oldest went first");
        assert_eq!(hot.get(b"other", span), Some(msgs(&["0"])));
        assert_eq!(hot.get(b"third", span), Some(msgs(&["0123456789"])));
    }
}
