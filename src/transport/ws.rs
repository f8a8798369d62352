//! The local WebSocket transport, `/ws`: INPUT → STREAM… → OUTPUT | ERROR, several
//! INPUTs per socket, the Python host's CONNECT/INPUT shapes, RESUME after a sequence
//! number, and PING/PONG keep-alive.
//!
//! One task serves a socket: it reads frames, takes each accepted request's replies
//! straight from its run (a reply crosses no other task, so a turn wakes no other
//! thread) and writes them. A client that stops reading is disconnected when a write
//! stalls; what it started still completes and is stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use crate::dispatch::{
    new_session_id, Dispatcher, Origin, Reader, Refusal, Rejected, Route, Transport,
};
use crate::envelope::unix_now;
use crate::envelope::{decode_object, Envelope};
use crate::identity::Address;
use crate::net::{IpCounts, SocketFailure};
use crate::proto::seal::{self, SealReceiver, SealSender};
use crate::proto::{session_of, ClientFrame, ErrorCode, FrameType, NodeFrame, Object};
use crate::trust::Caller;

/// Frames waiting to be written on one socket before it counts as broken.
const OUTBOUND_QUEUE: usize = 256;
/// What one read of the socket takes at most (see `upgrade`).
pub(crate) const READ_BUFFER_BYTES: usize = 4096;
/// At most this many queued frames go out with one flush.
const WRITE_BATCH: usize = 32;
/// How long one frame may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The node's keep-alive PING, as the Python host does.
const PING_EVERY: Duration = Duration::from_secs(30);
/// A socket that sends nothing (not even PONG) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A socket must send its first frame within this long.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one socket may have in flight at once.
const MAX_IN_FLIGHT_PER_SOCKET: usize = 16;

/// What `/ws` needs from the node (cheap to clone).
#[derive(Clone)]
pub(crate) struct WsState {
    pub dispatcher: Dispatcher,
    /// Largest frame read.
    pub max_frame_bytes: usize,
    /// Caps open WebSocket connections.
    pub connections: Arc<Semaphore>,
    /// Open WebSocket connections per client IP, and how many one IP may hold.
    pub per_ip: IpCounts,
    pub max_per_ip: usize,
}

/// The WebSocket API (frames in docs/protocol.md, "WebSocket `/ws`").
#[utoipa::path(
    get,
    path = "/ws",
    tag = "agent",
    summary = "WebSocket upgrade: INPUT, RESUME and the replies as frames",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade request (plain text)", body = String, content_type = "text/plain"),
        (status = 403, description = "`forbidden`: a web page of another origin", body = super::openapi::ErrorBody),
        (status = 405, description = "Not a GET (plain text)", body = String, content_type = "text/plain"),
        (status = 426, description = "The connection cannot be upgraded (plain text)", body = String, content_type = "text/plain"),
        (status = 429, description = "`too_many_connections` from this address", body = super::openapi::ErrorBody),
        (status = 503, description = "`busy`: too many WebSocket connections", body = super::openapi::ErrorBody),
    )
)]
pub(crate) async fn upgrade(
    State(st): State<WsState>,
    super::PeerIp(peer): super::PeerIp,
    ws: WebSocketUpgrade,
) -> Response {
    let ip_slot = match peer {
        Some(ip) => match st.per_ip.take(ip, st.max_per_ip) {
            Some(slot) => Some(slot),
            None => {
                return super::error_response(
                    ErrorCode::TooManyConnections,
                    &format!(
                        "this address holds {} WebSocket connections already",
                        st.max_per_ip
                    ),
                )
            }
        },
        None => None,
    };
    let Ok(permit) = st.connections.clone().try_acquire_owned() else {
        return super::error_response(
            ErrorCode::Busy,
            "too many WebSocket connections; try again later",
        );
    };
    let max = st.max_frame_bytes;
    // tungstenite zero-fills its whole read buffer (128 KiB by default) on each read it
    // tries: 4 KiB takes a turn's frame in one read and grows for a larger one.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let span = info_span!("ws", conn = %uuid::Uuid::new_v4().simple());
            let _ip_slot = ip_slot;
            Connection::new(st, permit, peer)
                .run(socket)
                .instrument(span)
                .await
        })
}

/// What the socket's task writes next, in order. Every frame after `StartSealing` is
/// sealed, so sealed frames go out numbered in order.
enum Outbound {
    Frame(String),
    StartSealing(SealSender),
}

/// One request's replies, counted in flight until its run ends (or the socket does).
struct Feed {
    replies: mpsc::Receiver<Envelope>,
    _in_flight: InFlight,
}

/// The replies of a socket's requests in flight (at most [`MAX_IN_FLIGHT_PER_SOCKET`]),
/// polled in turn from where the last reply came.
///
/// Not `futures`' `SelectAll`: whenever every stream it polls is pending, it wakes its
/// own task so as to yield, and tokio puts a task woken while it runs back on the queue
/// and wakes the other worker to take it: a hand-off between threads on every turn.
#[derive(Default)]
struct Feeds {
    feeds: Vec<Feed>,
    /// Where the next poll starts, so that no request's replies wait behind another's.
    next: usize,
}

impl Feeds {
    fn push(&mut self, feed: Feed) {
        self.feeds.push(feed);
    }

    fn is_empty(&self) -> bool {
        self.feeds.is_empty()
    }
}

impl futures::Stream for Feeds {
    type Item = Envelope;

    /// The next reply of any feed; ended feeds are dropped (their count with them).
    /// Pending only after every feed was polled, so each one will wake the task.
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Envelope>> {
        use std::task::Poll;
        let this = &mut *self;
        let len = this.feeds.len();
        let mut ended = false;
        let mut reply = None;
        for k in 0..len {
            let i = (this.next + k) % len;
            match this.feeds[i].replies.poll_recv(cx) {
                Poll::Ready(Some(env)) => {
                    this.next = i + 1;
                    reply = Some(env);
                    break;
                }
                Poll::Ready(None) => ended = true,
                Poll::Pending => {}
            }
        }
        if ended {
            // A closed receiver stays closed: dropping it now loses nothing.
            this.feeds
                .retain(|f| !f.replies.is_closed() || !f.replies.is_empty());
        }
        match reply {
            Some(env) => Poll::Ready(Some(env)),
            None if this.feeds.is_empty() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// A request in flight on a socket; the count goes down when it is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more, unless `max` are in flight already.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<InFlight> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One socket, served by one task: it reads frames, copies each request's replies out as
/// they come (a reply goes from its run to this task with no task in between) and writes.
struct Connection {
    st: WsState,
    /// Frames to write before the next read.
    outbox: Vec<Outbound>,
    /// Seals what is written, once the socket is sealed.
    sealer: Option<SealSender>,
    /// The replies of the requests in flight.
    feeds: Feeds,
    /// Cancelled when the socket is done: closed, idle, or too slow.
    closed: CancellationToken,
    /// Who the socket authenticated as with a signed CONNECT, if anyone, and the session
    /// secret it uses when unsigned.
    reader: Reader,
    /// The session this socket continues when an INPUT names none.
    session_id: Option<String>,
    /// Requests whose replies are still coming (counted by their feeds).
    in_flight: Arc<AtomicUsize>,
    /// The client's IP, for per-IP limits.
    peer: Option<std::net::IpAddr>,
    /// Whether a frame was read yet: only the first may be SEAL.
    heard: bool,
    /// A sealed socket: opens every frame, and who sealed it (signed frames inside must
    /// be theirs).
    sealed: Option<(SealReceiver, Address)>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn new(st: WsState, permit: OwnedSemaphorePermit, peer: Option<std::net::IpAddr>) -> Self {
        Connection {
            st,
            outbox: Vec::new(),
            sealer: None,
            feeds: Feeds::default(),
            closed: CancellationToken::new(),
            reader: Reader::new(Caller::Unsigned { claimed: None }, None),
            session_id: None,
            in_flight: Arc::default(),
            peer,
            heard: false,
            sealed: None,
            _permit: permit,
        }
    }

    fn dispatcher(&self) -> &Dispatcher {
        &self.st.dispatcher
    }

    async fn run(mut self, mut socket: WebSocket) {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let mut heard_any = false;
        let first_frame = tokio::time::sleep(FIRST_FRAME_TIMEOUT);
        tokio::pin!(first_frame);
        loop {
            if !self.outbox.is_empty() && !self.write_out(&mut socket).await {
                debug!("closing a socket that does not take what is written");
                break;
            }
            tokio::select! {
                _ = self.closed.cancelled() => {
                    debug!("closing a slow or failed socket");
                    break;
                }
                _ = &mut first_frame, if !heard_any => {
                    debug!("closing a socket that sent nothing");
                    break;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_TIMEOUT {
                        debug!("closing an idle socket");
                        break;
                    }
                    self.send_text(NodeFrame::Ping.encode(None));
                }
                Some(env) = self.feeds.next(), if !self.feeds.is_empty() => {
                    self.send_text(env.to_flat_string());
                    // Every reply ready by now goes out with the same flush: a turn's
                    // STREAMs and its OUTPUT often share one write.
                    while self.outbox.len() < WRITE_BATCH {
                        match self.feeds.next().now_or_never() {
                            Some(Some(env)) => self.send_text(env.to_flat_string()),
                            _ => break,
                        }
                    }
                }
                frame = socket.next() => {
                    last_heard = Instant::now();
                    heard_any = true;
                    match frame {
                        Some(Ok(Message::Text(text))) => self.on_frame(text.as_bytes()).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_frame(&bytes).await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Err(e)) => {
                            // Most often a frame over the size limit: say so before closing.
                            let refusal = match SocketFailure::of(e) {
                                SocketFailure::TooLarge(m) => {
                                    debug!(error = %m, "socket error");
                                    Refusal::too_large(0, self.st.max_frame_bytes)
                                }
                                SocketFailure::Other(m) => {
                                    debug!(error = %m, "socket error");
                                    Refusal::BadRequest(format!("socket error: {m}"))
                                }
                            };
                            self.send_rejected(refusal.into());
                            break;
                        }
                    }
                }
            }
        }
        // Runs already accepted go on and are stored; only their replies stop here.
        self.feeds = Feeds::default();
        if !self.outbox.is_empty() {
            self.write_out(&mut socket).await;
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, socket.close()).await;
    }

    /// Writes the outbox with one flush; false if the socket failed or took longer than
    /// [`WRITE_TIMEOUT`].
    async fn write_out(&mut self, socket: &mut WebSocket) -> bool {
        let sealer = &mut self.sealer;
        let outbox = std::mem::take(&mut self.outbox);
        let sent = async {
            for next in outbox {
                let text = match (next, &mut *sealer) {
                    (Outbound::StartSealing(s), _) => {
                        *sealer = Some(s);
                        continue;
                    }
                    (Outbound::Frame(text), Some(s)) => s.seal(&text, None),
                    (Outbound::Frame(text), None) => text,
                };
                socket.feed(Message::Text(text.into())).await?;
            }
            socket.flush().await
        };
        matches!(tokio::time::timeout(WRITE_TIMEOUT, sent).await, Ok(Ok(())))
    }

    /// Queues a frame; a client whose queue is full is too slow and is closed.
    fn send_text(&mut self, frame: String) {
        self.queue(Outbound::Frame(frame));
    }

    fn queue(&mut self, next: Outbound) {
        if self.outbox.len() >= OUTBOUND_QUEUE {
            self.closed.cancel();
        } else {
            self.outbox.push(next);
        }
    }

    /// Answers a refusal with a signed ERROR, in the socket's session unless it names
    /// its own, to the socket's caller unless the request named its sender.
    fn send_rejected(&mut self, rejected: Rejected) {
        let rejected = rejected
            .or_session(self.session_id.as_deref())
            .or_to(self.reader.caller.verified());
        let env = self.dispatcher().error_envelope(&rejected);
        self.send_text(env.to_flat_string());
    }

    async fn on_frame(&mut self, bytes: &[u8]) {
        let first = !std::mem::replace(&mut self.heard, true);
        let mut obj = match decode_object(bytes, self.st.max_frame_bytes) {
            Ok(o) => o,
            Err(e) => return self.send_rejected(e.into()),
        };
        if let Some((channel, sealed_by)) = &mut self.sealed {
            // Inside a seal every frame must open; one that does not is a break-in or a
            // bug, and the socket ends rather than guess.
            let opened = channel
                .open(&obj)
                .map_err(|e| e.to_string())
                .and_then(|clear| {
                    decode_object(&clear, self.st.max_frame_bytes).map_err(|e| e.to_string())
                });
            obj = match opened {
                Ok(o) => o,
                Err(why) => {
                    self.send_rejected(
                        Refusal::BadRequest(format!("sealed frame rejected: {why}")).into(),
                    );
                    return self.closed.cancel();
                }
            };
            if let Err(r) = check_sealed_signer(&obj, sealed_by) {
                return self.send_rejected(r.into());
            }
        } else if FrameType::of(&obj) == Some(FrameType::Seal) && first {
            return self.on_seal(obj);
        }
        match ClientFrame::decode(obj) {
            Ok(ClientFrame::Input(obj)) => self.on_input(obj).await,
            Ok(ClientFrame::Connect(obj)) => self.on_connect(obj).await,
            Ok(ClientFrame::Resume {
                session_id,
                after,
                session_secret,
            }) => self.on_resume(session_id, after, session_secret).await,
            Ok(ClientFrame::Ping) => self.send_text(NodeFrame::Pong.encode(None)),
            Ok(ClientFrame::Pong | ClientFrame::Close) => {}
            // Only a socket's first frame may seal it.
            Ok(ClientFrame::Seal(_)) => self.send_rejected(
                Refusal::BadRequest("SEAL must be the socket's first frame".into()).into(),
            ),
            Err(e) => self.send_rejected(Refusal::from(e).into()),
        }
    }

    /// The first frame was SEAL: answer SEALED_OK in the clear, then seal every frame
    /// both ways. A SEAL that does not verify ends the socket: no clear-text retry on it.
    fn on_seal(&mut self, obj: Object) {
        match seal::accept(&obj, self.dispatcher().identity(), unix_now()) {
            Ok(accepted) => {
                debug!(caller = %accepted.sealed_by.short(), "socket sealed");
                self.send_text(accepted.reply);
                self.queue(Outbound::StartSealing(accepted.channel.send));
                self.sealed = Some((accepted.channel.recv, accepted.sealed_by));
            }
            Err(e) => {
                self.send_rejected(Refusal::BadRequest(format!("seal refused: {e}")).into());
                self.closed.cancel();
            }
        }
    }

    async fn on_input(&mut self, obj: Object) {
        let in_flight = match self.take_in_flight() {
            Ok(i) => i,
            Err(r) => return self.send_rejected(r.into()),
        };
        // The session named in the frame, else the one this socket is in.
        let named = session_of(&obj);
        let outcome = match super::submission_from_frame(obj, self.session_id.clone()) {
            Ok(mut submission) => {
                submission.peer = self.peer;
                submission.transport = Transport::Ws;
                submission.secret = self.reader.secret.clone();
                self.dispatcher().submit(submission).await
            }
            Err(r) => {
                self.dispatcher()
                    .refused_early(Transport::Ws, r.code(), std::time::Instant::now());
                Err(r.into())
            }
        };
        let outcome = outcome.map_err(|r| r.or_session(named.as_deref()));
        match outcome {
            Ok(accepted) => {
                self.session_id = Some(accepted.session_id.clone());
                // An unsigned socket keeps its secret for later RESUMEs and reads.
                if self.reader.secret.is_none() {
                    self.reader.secret = accepted.secret;
                }
                self.forward(accepted.replies, in_flight);
            }
            Err(rejected) => self.send_rejected(rejected),
        }
    }

    /// `{"type":"CONNECT", "payload":{"to","timestamp",…}, "from", "signature",
    /// "session_id"?, "session"?}` → `{"type":"CONNECTED","session_id","status"}`.
    /// A signed CONNECT is single-use and makes the socket read as its signer.
    async fn on_connect(&mut self, obj: Object) {
        let began = std::time::Instant::now();
        let session_id = ClientFrame::connect_session(&obj).unwrap_or_else(new_session_id);
        let result = self
            .dispatcher()
            .connect(
                &obj,
                &session_id,
                &Origin::Direct,
                self.sealed.as_ref().map(|(_, by)| by),
            )
            .await;
        let refused = result.as_ref().err().map(|r| r.refusal.code());
        self.dispatcher()
            .count(Transport::Ws, Route::Connect, refused, began);
        match result {
            Ok((reader, status)) => {
                self.reader = reader;
                self.session_id = Some(session_id.clone());
                self.send_text(NodeFrame::Connected { session_id, status }.encode(None));
            }
            Err(rejected) => self.send_rejected(rejected),
        }
    }

    /// `{"type":"RESUME","session_id","after":N}`: the replies after sequence N, then
    /// live ones until the final reply.
    async fn on_resume(&mut self, session_id: Option<String>, after: u64, secret: Option<String>) {
        let (session_id, reader) = match super::resume_reader(session_id, secret, &self.reader) {
            Ok(r) => r,
            Err(r) => return self.send_rejected(r.into()),
        };
        let in_flight = match self.take_in_flight() {
            Ok(i) => i,
            Err(r) => return self.send_rejected(Rejected::from(r).or_session(Some(&session_id))),
        };
        let began = std::time::Instant::now();
        let result = self.dispatcher().follow(&session_id, after, &reader).await;
        let refused = result.as_ref().err().map(Refusal::code);
        self.dispatcher()
            .count(Transport::Ws, Route::Resume, refused, began);
        match result {
            Ok(replies) => {
                self.session_id = Some(session_id);
                self.forward(replies, in_flight);
            }
            Err(r) => self.send_rejected(Rejected::from(r).or_session(Some(&session_id))),
        }
    }

    /// Counts a request (an INPUT or a RESUME) in flight, unless the socket has too many.
    fn take_in_flight(&self) -> Result<InFlight, Refusal> {
        InFlight::take(&self.in_flight, MAX_IN_FLIGHT_PER_SOCKET).ok_or_else(|| {
            Refusal::BadRequest(format!(
                "too many requests in flight on this socket (max {MAX_IN_FLIGHT_PER_SOCKET})"
            ))
        })
    }

    /// Copies a request's replies out as they come.
    fn forward(&mut self, replies: mpsc::Receiver<Envelope>, in_flight: InFlight) {
        self.feeds.push(Feed {
            replies,
            _in_flight: in_flight,
        });
    }
}

/// Inside a seal, a signed frame must be signed by whoever sealed the socket: the seal
/// makes it theirs, and a frame of someone else's (captured elsewhere) has no business
/// there. Shared by `/ws` and relayed sessions.
pub(super) fn check_sealed_signer(frame: &Object, sealed_by: &Address) -> Result<(), Refusal> {
    match frame.get("from").and_then(serde_json::Value::as_str) {
        Some(from) if from.parse::<Address>().ok().as_ref() != Some(sealed_by) => {
            Err(Refusal::BadRequest(
                "a signed frame inside a seal must be signed by whoever sealed it".into(),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::Stream;
    use std::task::{Context, Poll, Wake, Waker};

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn reply(n: u64) -> Envelope {
        let mut payload = serde_json::Map::new();
        payload.insert("n".into(), n.into());
        Envelope::unsigned(payload, None)
    }

    fn n_of(env: &Envelope) -> u64 {
        env.payload["n"].as_u64().unwrap()
    }

    #[test]
    fn feeds_deliver_every_reply_wake_only_for_one_and_drop_what_ended() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut feeds = Feeds::default();
        let mut senders = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::channel(4);
            let in_flight = InFlight::take(&count, 16).unwrap();
            feeds.push(Feed {
                replies: rx,
                _in_flight: in_flight,
            });
            senders.push(tx);
        }
        let wakes = Arc::new(Counting::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut poll = |feeds: &mut Feeds| std::pin::Pin::new(feeds).poll_next(&mut cx);

        // Nothing yet: pending, and the task is not woken to come back at once (the
        // self-wake `SelectAll` does, which tokio turns into a hand-off between threads).
        assert!(poll(&mut feeds).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "polling woke its own task"
        );

        // A reply on any feed wakes the task: every feed was polled.
        senders[2].try_send(reply(20)).unwrap();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        senders[0].try_send(reply(0)).unwrap();
        senders[0].try_send(reply(1)).unwrap();
        senders[1].try_send(reply(10)).unwrap();
        let mut got = Vec::new();
        while let Poll::Ready(Some(env)) = poll(&mut feeds) {
            got.push(n_of(&env));
        }
        got.sort();
        assert_eq!(got, [0, 1, 10, 20]);

        // A feed whose run ended goes, and its count with it; the others stay.
        drop(senders.remove(1));
        assert!(poll(&mut feeds).is_pending());
        assert_eq!((feeds.feeds.len(), count.load(Ordering::SeqCst)), (2, 2));
        // One that ended with a reply still queued gives the reply first.
        let last = senders.remove(0);
        last.try_send(reply(2)).unwrap();
        drop(last);
        assert!(matches!(poll(&mut feeds), Poll::Ready(Some(env)) if n_of(&env) == 2));
        assert!(poll(&mut feeds).is_pending());
        assert_eq!((feeds.feeds.len(), count.load(Ordering::SeqCst)), (1, 1));
        drop(senders);
        assert!(matches!(poll(&mut feeds), Poll::Ready(None)));
        assert!(feeds.is_empty());
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn no_feed_waits_behind_a_busy_one() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut feeds = Feeds::default();
        let (busy, rx) = mpsc::channel(64);
        feeds.push(Feed {
            replies: rx,
            _in_flight: InFlight::take(&count, 16).unwrap(),
        });
        let (quiet, rx) = mpsc::channel(4);
        feeds.push(Feed {
            replies: rx,
            _in_flight: InFlight::take(&count, 16).unwrap(),
        });
        for n in 0..32 {
            busy.try_send(reply(n)).unwrap();
        }
        quiet.try_send(reply(100)).unwrap();
        let waker = Waker::from(Arc::new(Counting::default()));
        let mut cx = Context::from_waker(&waker);
        let mut first = Vec::new();
        for _ in 0..2 {
            match std::pin::Pin::new(&mut feeds).poll_next(&mut cx) {
                Poll::Ready(Some(env)) => first.push(n_of(&env)),
                other => panic!("expected a reply, got {:?}", other.map(|_| ())),
            }
        }
        assert!(first.contains(&100), "the quiet feed waited: {first:?}");
    }
}
