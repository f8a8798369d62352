//! WebSocket helpers for tests that speak frames themselves (a caller, a relay, an agent).
//! Every wait is bounded.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Error, Message};

use super::STEP;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket.
pub async fn ws_connect(url: &str) -> Socket {
    tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket connect timed out")
        .unwrap_or_else(|e| panic!("WebSocket connect to {url}: {e}"))
        .0
}

/// Sends one JSON frame.
pub async fn ws_send<S>(socket: &mut S, frame: &Value)
where
    S: futures::Sink<Message, Error = Error> + Unpin,
{
    tokio::time::timeout(STEP, socket.send(Message::text(frame.to_string())))
        .await
        .expect("send timed out")
        .expect("send");
}

/// The next JSON frame, or `None` once the socket is closed.
pub async fn ws_recv<S>(socket: &mut S) -> Option<Value>
where
    S: futures::Stream<Item = Result<Message, Error>> + Unpin,
{
    ws_recv_within(socket, STEP)
        .await
        .expect("no frame (nor close) within the step timeout")
}

/// `Err` if nothing came within `wait`; `Ok(None)` once the socket is closed.
pub async fn ws_recv_within<S>(socket: &mut S, wait: Duration) -> Result<Option<Value>, ()>
where
    S: futures::Stream<Item = Result<Message, Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Err(()),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Ok(None),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Ok(Some(serde_json::from_str(&t).expect("a JSON frame")))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}
