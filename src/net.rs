//! Socket helpers shared by the node's transports and the relay server (below both).

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
