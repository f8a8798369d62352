//! The node's HTTP server loop: the axum router on hyper, with the timeouts that
//! `axum::serve` leaves unset. A client that sends a request head too slowly, or keeps a
//! connection open between requests without sending one, is closed after
//! [`HEAD_TIMEOUT`] (and logged at debug); bodies have their own read timeout where they
//! are read. WebSockets, once upgraded, keep their own rules (first frame, PING).
//!
//! With TLS, each connection's handshake runs in that connection's task, bounded by
//! [`HANDSHAKE_TIMEOUT`]: a client that stalls in it delays no one else, and a failed
//! handshake closes only its own connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::net::{CappedListener, CappedStream, PeerAddr};
use crate::tls::HANDSHAKE_TIMEOUT;

/// The most a client may take to send a request head, counted from when the node starts
/// waiting for one (so also the longest an idle keep-alive connection stays open).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutting down waits for requests in flight before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` (over TLS with `tls`) until `stop`; then lets requests
/// in flight finish.
pub(crate) async fn serve(
    mut listener: CappedListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    let tls = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only, as before; `auto` is what lets a connection that upgrades to a
    // WebSocket still be watched for shutdown.
    let mut http = auto::Builder::new(TokioExecutor::new()).http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    loop {
        let (io, addr) = tokio::select! {
            conn = axum::serve::Listener::accept(&mut listener) => conn,
            _ = stop.cancelled() => break,
        };
        let router = router.clone();
        // What `into_make_service_with_connect_info` would add: the client's address.
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
            tower::ServiceExt::oneshot(router.clone(), req)
        });
        let watcher = graceful.watcher();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let io = match tls {
                None => {
                    // hyper's head timeout starts with the first byte of a connection:
                    // one that never sends any is closed here.
                    if tokio::time::timeout(HEAD_TIMEOUT, io.first_byte())
                        .await
                        .is_err()
                    {
                        debug!(%addr, "a connection that sent nothing was closed");
                        return;
                    }
                    Either::Left(io)
                }
                Some(acceptor) => match handshake(&acceptor, io, addr).await {
                    Some(io) => Either::Right(io),
                    None => return,
                },
            };
            let conn = http.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(%addr, error = %e, "HTTP connection closed");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("requests still in flight after the drain timeout were dropped");
    }
}

/// The TLS handshake, bounded by [`HANDSHAKE_TIMEOUT`], then the wait for a first byte of
/// plaintext as on a plain connection; `None` (logged) when either fails.
async fn handshake(
    acceptor: &TlsAcceptor,
    io: CappedStream,
    addr: SocketAddr,
) -> Option<BufReader<TlsStream<CappedStream>>> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!(%addr, "TLS handshake not finished in time; closed");
            return None;
        }
    };
    // A one-byte buffer lets us look at the first byte without taking it; hyper's reads
    // are larger than the buffer, so they bypass it.
    let mut io = BufReader::with_capacity(1, tls);
    if tokio::time::timeout(HEAD_TIMEOUT, io.fill_buf())
        .await
        .is_err()
    {
        debug!(%addr, "a TLS connection that sent nothing was closed");
        return None;
    }
    Some(io)
}
