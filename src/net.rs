//! Socket helpers shared by the node's transports and the relay server (below both).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Small WebSocket frames and HTTP replies must not wait for Nagle's algorithm (and the
/// peer's delayed ACK): every accepted socket sends at once.
pub(crate) fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// Why reading a WebSocket failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketFailure {
    /// A frame over the size limit.
    TooLarge(String),
    Other(String),
}

impl SocketFailure {
    /// Sorts an axum WebSocket read error.
    pub(crate) fn of(e: axum::Error) -> SocketFailure {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let message = e.to_string();
        match e.into_inner().downcast_ref::<WsError>() {
            Some(WsError::Capacity(_)) => SocketFailure::TooLarge(message),
            _ => SocketFailure::Other(message),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Open connections per client IP, shared by a listener and the connections it hands
/// out (and by the `/ws` slots).
#[derive(Debug, Clone, Default)]
pub(crate) struct IpCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl IpCounts {
    /// One more connection for `ip`, unless it already holds `max`.
    pub(crate) fn take(&self, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            counts: self.clone(),
            ip,
        })
    }
}

/// A connection's place in its IP's count, given back when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    counts: IpCounts,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A TCP listener that lets one client IP hold at most `max_per_ip` open connections:
/// past that, a new connection is closed at once, so that one client cannot take every
/// file descriptor. Sets TCP_NODELAY on what it accepts.
pub(crate) struct CappedListener {
    inner: TcpListener,
    counts: IpCounts,
    max_per_ip: usize,
}

impl CappedListener {
    pub(crate) fn new(inner: TcpListener, max_per_ip: usize) -> Self {
        CappedListener {
            inner,
            counts: IpCounts::default(),
            max_per_ip,
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (mut stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.counts.take(addr.ip(), self.max_per_ip) {
                Some(slot) => {
                    no_delay(&mut stream);
                    return (
                        CappedStream {
                            inner: stream,
                            _slot: slot,
                        },
                        addr,
                    );
                }
                None => {
                    tracing::debug!(ip = %addr.ip(), max = self.max_per_ip, "connection over the per-IP cap closed")
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its IP's slot.
pub(crate) struct CappedStream {
    inner: TcpStream,
    _slot: IpSlot,
}

impl CappedStream {
    /// Waits until the client has sent a byte (or closed), without taking it.
    pub(crate) async fn first_byte(&self) -> std::io::Result<()> {
        self.inner.peek(&mut [0u8; 1]).await.map(|_| ())
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The client's address as the listener saw it (its connection info), whichever
/// listener it was: plain TCP, capped, or TLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub SocketAddr);

/// `PeerAddr` as the connection info of the listeners that `axum::serve` runs.
macro_rules! peer_addr_of {
    ($listener:ty) => {
        impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, $listener>>
            for PeerAddr
        {
            fn connect_info(stream: axum::serve::IncomingStream<'_, $listener>) -> Self {
                PeerAddr(*stream.remote_addr())
            }
        }
    };
}

peer_addr_of!(NoDelayListener);
peer_addr_of!(crate::tls::TlsListener);

/// A plain TCP listener that sets TCP_NODELAY on what it accepts (as `tap_io` would, but
/// with a name, so that it can have [`PeerAddr`] as its connection info).
pub(crate) struct NoDelayListener(pub TcpListener);

impl axum::serve::Listener for NoDelayListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (mut stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        no_delay(&mut stream);
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}
