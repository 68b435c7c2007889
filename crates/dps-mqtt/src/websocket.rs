//! MQTT over WebSocket (spec §2.1: port 443, subprotocol `mqtt`, any path): the upgrade answer and the
//! binary-frame transport.

use crate::session::{CloseKind, Transport};
use crate::{MqttError, MqttLimits};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol of MQTT, echoed in `Sec-WebSocket-Protocol` when the client offers it.
pub const WEBSOCKET_SUBPROTOCOL: &str = "mqtt";

/// Room in a WebSocket message beyond [`MqttLimits::max_packet_bytes`], for small packets sharing a frame.
const MESSAGE_SLACK: usize = 4096;

/// The comma-separated tokens of every value of a header.
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

/// Whether a request's headers ask for a WebSocket upgrade: `Upgrade: websocket` and `Connection: upgrade`
/// (any path; the method is the caller's to check). A request that asks but lacks a valid
/// `Sec-WebSocket-Key` is then refused by [`websocket_upgrade_response`] with the reason.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &UPGRADE, "websocket") && has_token(headers, &CONNECTION, "upgrade")
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade request: `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept`, and `Sec-WebSocket-Protocol: mqtt` when the client offered `mqtt` (echoed with
/// the client's spelling).
///
/// Errors ([`MqttError::InvalidUpgrade`]; the server should answer `400`, or `426` with
/// `Sec-WebSocket-Version: 13` for a version problem): not an upgrade, a `Sec-WebSocket-Key` that is not
/// the base64 of 16 bytes or is repeated, a `Sec-WebSocket-Version` other than 13.
pub fn websocket_upgrade_response(headers: &HeaderMap) -> Result<Response<()>, MqttError> {
    let invalid = |m: &str| MqttError::InvalidUpgrade(m.to_owned());
    if !has_token(headers, &UPGRADE, "websocket") {
        return Err(invalid("the request has no 'Upgrade: websocket' header"));
    }
    if !has_token(headers, &CONNECTION, "upgrade") {
        return Err(invalid("the request has no 'Connection: upgrade' header"));
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        (None, _) => return Err(invalid("the request has no Sec-WebSocket-Key header")),
        (Some(_), Some(_)) => return Err(invalid("the request has more than one Sec-WebSocket-Key header")),
    };
    let key_bytes = key.as_bytes();
    match STANDARD.decode(key_bytes.trim_ascii()) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(invalid("the Sec-WebSocket-Key is not the base64 encoding of 16 bytes")),
    }
    if !tokens(headers, &SEC_WEBSOCKET_VERSION).any(|v| v == "13") {
        return Err(invalid("the Sec-WebSocket-Version is missing or not 13"));
    }
    // A client that offers subprotocols but none this server speaks would otherwise get a 101 without a
    // Sec-WebSocket-Protocol header and wait for a protocol that never comes (RFC 6455 §4.2.2: the server
    // may refuse). No offer at all is taken as MQTT, as some MQTT clients send none.
    let offered: Vec<&str> = tokens(headers, &SEC_WEBSOCKET_PROTOCOL).collect();
    if !offered.is_empty() && !offered.iter().any(|p| p.eq_ignore_ascii_case(WEBSOCKET_SUBPROTOCOL)) {
        return Err(MqttError::InvalidUpgrade(format!(
            "the client offers only the WebSocket subprotocol(s) {}; this endpoint speaks '{WEBSOCKET_SUBPROTOCOL}'",
            offered.join(", ")
        )));
    }
    let accept = derive_accept_key(key_bytes.trim_ascii());
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, HeaderValue::from_static("websocket"))
        .header(CONNECTION, HeaderValue::from_static("Upgrade"))
        .header(SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(offered) =
        tokens(headers, &SEC_WEBSOCKET_PROTOCOL).find(|p| p.eq_ignore_ascii_case(WEBSOCKET_SUBPROTOCOL))
    {
        response = response.header(SEC_WEBSOCKET_PROTOCOL, offered);
    }
    response.body(()).map_err(|e| MqttError::InvalidUpgrade(format!("cannot build the 101 response: {e}")))
}

/// MQTT bytes carried in WebSocket binary messages.
pub(crate) struct WsTransport<S> {
    ws: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> WsTransport<S> {
    pub(crate) async fn new(io: S, limits: &MqttLimits) -> Self {
        let max = limits.max_packet_bytes.saturating_add(MESSAGE_SLACK);
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        WsTransport { ws: WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await }
    }
}

fn ws_error(e: WsError) -> Result<usize, MqttError> {
    match e {
        // The peer went away without (or after) the closing handshake: an ordinary end of stream.
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ok(0),
        WsError::Io(e) => Err(MqttError::Io(e)),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Err(MqttError::PacketTooLarge { size, max: max_size })
        }
        other => Err(MqttError::WebSocket(other.to_string())),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for WsTransport<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<usize, MqttError> {
        loop {
            // `next` is cancel-safe, and nothing is awaited between receiving a message and storing it.
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(data))) => {
                    if !data.is_empty() {
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                }
                // Pongs are queued by tungstenite itself and flushed on the next read or write.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(MqttError::WebSocket(
                        "a text frame arrived; MQTT over WebSocket uses binary frames".to_owned(),
                    ))
                }
                Some(Err(e)) => return ws_error(e),
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), MqttError> {
        match self.ws.send(Message::Binary(Bytes::copy_from_slice(bytes))).await {
            Ok(()) => Ok(()),
            Err(e) => match ws_error(e) {
                Err(e) => Err(e),
                Ok(_) => Err(MqttError::Io(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the WebSocket is closed",
                ))),
            },
        }
    }

    async fn close(&mut self, kind: CloseKind) {
        let (code, reason) = match kind {
            CloseKind::Normal => (CloseCode::Normal, ""),
            CloseKind::ProtocolError => (CloseCode::Protocol, "MQTT protocol error"),
            CloseKind::TooBig => (CloseCode::Size, "packet too large"),
            CloseKind::Timeout => (CloseCode::Away, "timeout"),
        };
        let frame = CloseFrame { code, reason: reason.into() };
        if self.ws.close(Some(frame)).await.is_err() {
            // Already closing (the client sent a close frame): flush the automatic close reply.
            let _ = self.ws.flush().await;
        }
        let _ = self.ws.get_mut().shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    #[test]
    fn rfc6455_accept_key_and_mqtt_subprotocol() {
        let h = headers(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", RFC_KEY),
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "wamp, MQTT"),
        ]);
        assert!(is_websocket_upgrade(&h));
        let r = websocket_upgrade_response(&h).unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(r.headers()[SEC_WEBSOCKET_ACCEPT], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(r.headers()[SEC_WEBSOCKET_PROTOCOL], "MQTT");
        assert_eq!(r.headers()[UPGRADE], "websocket");
        assert_eq!(r.headers()[CONNECTION], "Upgrade");
    }

    #[test]
    fn an_offer_without_mqtt_is_refused_and_no_offer_is_taken_as_mqtt() {
        let base = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", RFC_KEY),
            ("sec-websocket-version", "13"),
        ];
        let r = websocket_upgrade_response(&headers(&base)).unwrap();
        assert!(!r.headers().contains_key(SEC_WEBSOCKET_PROTOCOL));
        let mut other = base.to_vec();
        other.push(("sec-websocket-protocol", "AMQPWSB10"));
        match websocket_upgrade_response(&headers(&other)) {
            Err(MqttError::InvalidUpgrade(m)) => {
                assert!(m.contains("AMQPWSB10") && m.contains("mqtt"), "{m}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn invalid_upgrades() {
        let ok = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", RFC_KEY),
            ("sec-websocket-version", "13"),
        ];
        for drop in 0..ok.len() {
            let h: Vec<_> = ok.iter().enumerate().filter(|(i, _)| *i != drop).map(|(_, p)| *p).collect();
            let h = headers(&h);
            assert!(matches!(websocket_upgrade_response(&h), Err(MqttError::InvalidUpgrade(_))), "{drop}");
            // Without a key (2) or version (3) it still asks for an upgrade, and is refused with the reason.
            assert_eq!(is_websocket_upgrade(&h), drop >= 2, "{drop}");
        }
        for (name, value) in [
            ("sec-websocket-key", "c2hvcnQ="),
            ("sec-websocket-key", "not base64 at all!!!!!!!"),
            ("sec-websocket-version", "8"),
            ("upgrade", "h2c"),
            ("connection", "close"),
        ] {
            let mut h: Vec<_> = ok.iter().filter(|(n, _)| *n != name).copied().collect();
            h.push((name, value));
            assert!(websocket_upgrade_response(&headers(&h)).is_err(), "{name}: {value}");
        }
        let mut twice = ok.to_vec();
        twice.push(("sec-websocket-key", RFC_KEY));
        assert!(websocket_upgrade_response(&headers(&twice)).is_err());
        assert!(!is_websocket_upgrade(&HeaderMap::new()));
    }
}
