//! WebSocket helpers for tests that speak frames themselves (a caller, a relay, an agent).

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::STEP;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket (bounded by [`STEP`]).
pub async fn ws_connect(url: &str) -> Socket {
    tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket connect timed out")
        .expect("WebSocket connect")
        .0
}

/// Sends one JSON frame.
pub async fn ws_send<S>(socket: &mut S, frame: &Value)
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    socket
        .send(Message::text(frame.to_string()))
        .await
        .expect("send a frame");
}

/// The next JSON text frame, skipping PINGs; `None` once the socket is closed.
pub async fn ws_recv<S>(socket: &mut S) -> Option<Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(STEP, socket.next())
            .await
            .expect("no frame within the step timeout");
        match msg {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).expect("a JSON frame");
                if v["type"] == "PING" {
                    continue;
                }
                return Some(v);
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}
