//! AMQP over WebSocket (spec §3.1: port 443, subprotocol `AMQPWSB10`, any path): the upgrade answer and
//! a byte stream over binary messages.

use crate::{AmqpError, AmqpLimits};
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Response, StatusCode};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol of AMQP 1.0 (OASIS AMQP WebSocket binding), echoed in
/// `Sec-WebSocket-Protocol`.
pub const WEBSOCKET_SUBPROTOCOL: &str = "AMQPWSB10";

/// Room in a WebSocket message beyond [`AmqpLimits::max_frame_bytes`].
const MESSAGE_SLACK: usize = 4096;

fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether a WebSocket upgrade request offers the `AMQPWSB10` subprotocol (the server then serves AMQP on
/// it; otherwise MQTT).
pub fn offers_amqp_subprotocol(headers: &HeaderMap) -> bool {
    has_token(headers, &SEC_WEBSOCKET_PROTOCOL, WEBSOCKET_SUBPROTOCOL)
}

/// The `101 Switching Protocols` answer to an AMQP WebSocket upgrade: `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept` and `Sec-WebSocket-Protocol: AMQPWSB10`.
///
/// Errors ([`AmqpError::InvalidUpgrade`]; the server should answer `400`): not an upgrade, no or a
/// repeated `Sec-WebSocket-Key`, a key that is not 24 base64 characters (16 bytes), a
/// `Sec-WebSocket-Version` other than 13, no `AMQPWSB10` offer.
pub fn websocket_upgrade_response(headers: &HeaderMap) -> Result<Response<()>, AmqpError> {
    let invalid = |m: &str| AmqpError::InvalidUpgrade(m.to_owned());
    if !has_token(headers, &UPGRADE, "websocket") || !has_token(headers, &CONNECTION, "upgrade") {
        return Err(invalid("the request lacks 'Upgrade: websocket' or 'Connection: upgrade'"));
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key.as_bytes().trim_ascii(),
        (None, _) => return Err(invalid("the request has no Sec-WebSocket-Key header")),
        (Some(_), Some(_)) => return Err(invalid("the request has more than one Sec-WebSocket-Key header")),
    };
    // 16 bytes in base64: 22 characters of the alphabet and "==".
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    if key.len() != 24 || !key[..22].iter().all(base64) || &key[22..] != b"==" {
        return Err(invalid("the Sec-WebSocket-Key is not the base64 encoding of 16 bytes"));
    }
    if !tokens(headers, &SEC_WEBSOCKET_VERSION).any(|v| v == "13") {
        return Err(invalid("the Sec-WebSocket-Version is missing or not 13"));
    }
    if !offers_amqp_subprotocol(headers) {
        return Err(invalid("the request does not offer the WebSocket subprotocol 'AMQPWSB10'"));
    }
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, HeaderValue::from_static("websocket"))
        .header(CONNECTION, HeaderValue::from_static("Upgrade"))
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key))
        .header(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(WEBSOCKET_SUBPROTOCOL))
        .body(())
        .map_err(|e| AmqpError::InvalidUpgrade(format!("cannot build the 101 response: {e}")))
}

/// AMQP bytes carried in WebSocket binary messages, as a byte stream.
pub(crate) struct WsIo<S> {
    ws: WebSocketStream<S>,
    read: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    pub(crate) async fn new(io: S, limits: &AmqpLimits) -> Self {
        let max = usize::try_from(limits.max_frame_bytes).unwrap_or(usize::MAX).saturating_add(MESSAGE_SLACK);
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        WsIo {
            ws: WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await,
            read: Bytes::new(),
        }
    }
}

fn ws_io(e: WsError) -> std::io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => std::io::ErrorKind::BrokenPipe.into(),
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                // End of stream, or the client's close frame (answered by tungstenite): EOF.
                Poll::Ready(None) | Poll::Ready(Some(Ok(Message::Close(_)))) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Ok(Message::Binary(data)))) => self.read = data,
                // Pings are answered by tungstenite on the next write or flush.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a WebSocket text message on an AMQP connection",
                    )))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(ws_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(ws_io(e))),
            Poll::Ready(Ok(())) => {}
        }
        match Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))) {
            Ok(()) => Poll::Ready(Ok(buf.len())),
            Err(e) => Poll::Ready(Err(ws_io(e))),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.ws).poll_close(cx) {
            Poll::Ready(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Poll::Ready(Ok(())),
            other => other.map_err(ws_io),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(protocols: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        if let Some(p) = protocols {
            h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(p).unwrap());
        }
        h
    }

    #[test]
    fn the_upgrade_echoes_the_amqp_subprotocol() {
        let h = upgrade(Some("AMQPWSB10"));
        assert!(offers_amqp_subprotocol(&h));
        let r = websocket_upgrade_response(&h).unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(r.headers()[SEC_WEBSOCKET_PROTOCOL], "AMQPWSB10");
        // RFC 6455's sample key.
        assert_eq!(r.headers()[SEC_WEBSOCKET_ACCEPT], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn other_offers_are_not_amqp() {
        assert!(!offers_amqp_subprotocol(&upgrade(Some("mqtt"))));
        assert!(!offers_amqp_subprotocol(&upgrade(None)));
        assert!(offers_amqp_subprotocol(&upgrade(Some("mqtt, AMQPWSB10"))));
        assert!(websocket_upgrade_response(&upgrade(Some("mqtt"))).is_err());
        let mut bad = upgrade(Some("AMQPWSB10"));
        bad.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("short"));
        assert!(websocket_upgrade_response(&bad).is_err());
    }
}
