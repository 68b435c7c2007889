//! The DPS device API over MQTT 3.1.1 (spec §2, §12 items 11-15), on any byte stream.
//!
//! The server owns sockets and TLS; this crate turns one connection's bytes into
//! [`dps_core::DeviceRequest`]s for a [`DeviceHandler`] (normally the engine) and writes the replies back:
//!
//! - [`serve_connection`]: MQTT over a raw stream (TLS on port 8883).
//! - [`serve_websocket`]: MQTT over WebSocket (port 443, subprotocol `mqtt`, any path): the server answers
//!   the HTTP upgrade with [`websocket_upgrade_response`] (after checking [`is_websocket_upgrade`]) and hands
//!   the upgraded stream over; binary frames carry the MQTT bytes (a packet may span frames, a frame may
//!   hold several packets).
//!
//! One session:
//! 1. The first packet must be a CONNECT within [`MqttLimits::connect_timeout`]. Protocol level 4 only
//!    (CONNACK `0x01` otherwise); the username `{scope}/registrations/{id}/api-version=…` is parsed with
//!    [`dps_core::proto::mqtt::parse_username`] (CONNACK `0x04` when it is missing or bad); the client ID
//!    must be the registration ID (CONNACK `0x02`). The password (a SAS token) is not checked here: it becomes the
//!    `authorization` of every request, and the engine answers `401` on the response topic when it is wrong
//!    or missing. CONNACK always has sessionPresent = 0; CleanSession = 0 is treated as clean; a will message
//!    is accepted and never published.
//! 2. SUBSCRIBE is granted only for `$dps/registrations/res/#` (at most QoS 1); other filters get `0x80`.
//!    UNSUBSCRIBE is acknowledged, PINGREQ answered, PUBACKs of responses accepted (nothing is
//!    redelivered), DISCONNECT ends the session.
//! 3. PUBLISH (QoS 0, or QoS 1 whose PUBACK leaves with the response, or after 10 ms) on `$dps/registrations/PUT/iotdps-register/?$rid=…` or
//!    `$dps/registrations/GET/iotdps-get-operationstatus/?$rid=…&operationId=…` runs one request; the reply
//!    goes back as a QoS 1 PUBLISH on `$dps/registrations/res/{status}/?$rid=…[&retry-after=…]` with the
//!    engine's JSON body, in request order, whether or not the client subscribed. A register body carrying
//!    `tpm` is refused with `400000` (TPM needs HTTPS or AMQP). A topic that is not a request is answered on
//!    the response topic (`404`, or `400` for a bad request topic) when it carries a usable `$rid`;
//!    otherwise the connection is closed, as MQTT has no other error channel.
//! 4. Anything malformed (bad packets, packets before CONNECT, a second CONNECT, QoS 2, packets over
//!    [`MqttLimits::max_packet_bytes`], silence beyond 1.5 × keep-alive, a stream cut inside a packet) ends
//!    the session with a clean close and an [`MqttError`] saying why. Nothing panics.
//!
//! Requests are polled by the session itself, next to its reads, so a slow engine call never stops it
//! from reading PINGREQs; a request still running when its client disconnects is moved to a task of its
//! own and runs to completion (the store is never left half-written because a device went away). The
//! functions must therefore be called inside a Tokio runtime with the time driver enabled.
#![forbid(unsafe_code)]
// A transport crate: it reads the clock (error timestamps, tracking IDs) and drives Tokio timers.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod session;
mod websocket;

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub use websocket::{is_websocket_upgrade, websocket_upgrade_response, WEBSOCKET_SUBPROTOCOL};

/// The transport-facing contract of the host (it lives in `dps-host`, shared by every transport); a
/// `dps_host::Host` implements it.
pub use dps_host::{default_error_reply, DeviceHandler};

/// Limits of one MQTT session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttLimits {
    /// The largest accepted packet, as its MQTT remaining length (variable header + payload) in bytes; a
    /// larger packet ends the session as soon as its fixed header is read. The default (100 000) admits the
    /// engine's 96 KiB body limit plus the topic, so oversized bodies reach the engine and get `413001`.
    pub max_packet_bytes: usize,
    /// How long a new connection may take to send its CONNECT (default 10 s).
    pub connect_timeout: Duration,
    /// The longest keep-alive honoured (default 1200 s, like IoT Hub's ~1177 s). The session ends after
    /// 1.5 × min(client keep-alive, this) without a packet; a client keep-alive of 0 gets this value. Zero
    /// disables the silence check for clients with keep-alive 0. A write to the client that takes longer
    /// than that silence limit (or than `connect_timeout`, whichever is longer) also ends the session.
    pub max_keep_alive: Duration,
    /// How many requests of one connection may be in the hands of the [`DeviceHandler`] at once (default 1;
    /// 0 counts as 1). Replies are always sent in request order. A client that sends more requests while
    /// at the limit is not read from until one completes (TCP back-pressure).
    pub max_inflight_requests: usize,
    /// How long an authenticated session may go without a request (PUBLISH) while none is being answered
    /// (default 60 s; zero: no limit). Keep-alive pings do not count: a session exists to register, and a
    /// client that only pings would otherwise hold a connection slot for as long as it likes. Set it above
    /// the `Retry-After` the service answers with, so a device waiting to poll is not cut off.
    pub request_idle_timeout: Duration,
    /// Check the CONNECT's credential (the SAS password, or the TLS client certificate) with the handler
    /// ([`dps_core::DeviceCall::Authenticate`]) before answering it: a SAS client that fits no enrollment
    /// gets CONNACK 5 (not authorized; 3 when the service is unavailable) and is closed, instead of holding
    /// a session (default true). A client-certificate session (no password) is not checked at CONNECT:
    /// DPS answers certificate problems at the request (`res/401`, 401002 and the rule that failed), and
    /// the TLS handshake already proved the key; its first refused request ends it two seconds later
    /// unless the client leaves first ([`MqttError::CertificateRefused`]).
    pub authenticate_at_connect: bool,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_packet_bytes: 100_000,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: Duration::from_secs(1200),
            max_inflight_requests: 1,
            request_idle_timeout: Duration::from_secs(60),
            authenticate_at_connect: true,
        }
    }
}

/// Why a session ended (other than by the client's DISCONNECT or a close between packets).
///
/// In every case the connection has been closed cleanly; the error is for logging and metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// Reading from or writing to the stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket layer failed (bad frame, text frame, frame or message over the size limit, …).
    #[error("WebSocket error: {0}")]
    WebSocket(String),
    /// No CONNECT arrived within [`MqttLimits::connect_timeout`].
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    /// No packet arrived within 1.5 × the keep-alive.
    #[error("no packet within {0:?} (1.5 × keep-alive)")]
    KeepAliveTimeout(Duration),
    /// No request arrived within [`MqttLimits::request_idle_timeout`] while none was being answered.
    #[error("no request within {0:?}")]
    RequestIdleTimeout(Duration),
    /// The client's certificate fits no enrollment: its request was answered with the refusal (`res/401`,
    /// 401002 and the reason), and the connection was closed two seconds later (or when the client left).
    #[error("the client certificate was refused (answered on the first request)")]
    CertificateRefused,
    /// A write to the client did not complete in time (the client stopped reading).
    #[error("a write to the client did not complete within {0:?}")]
    WriteTimeout(Duration),
    /// The CONNECT was refused with this CONNACK return code, then the connection was closed.
    #[error("CONNECT refused with CONNACK return code {code:#04x}: {reason}")]
    ConnectRefused {
        /// The CONNACK return code (1 protocol version, 2 identifier rejected, 4 bad user name or password).
        code: u8,
        /// Why.
        reason: String,
    },
    /// The client broke the MQTT protocol (packet before CONNECT, second CONNECT, QoS 2, a packet only a
    /// server may send, …).
    #[error("MQTT protocol violation: {0}")]
    Protocol(String),
    /// A packet could not be decoded.
    #[error("malformed MQTT packet: {0}")]
    Malformed(String),
    /// A packet's remaining length exceeds [`MqttLimits::max_packet_bytes`].
    #[error("a packet of {size} bytes exceeds the limit of {max} bytes")]
    PacketTooLarge {
        /// The announced remaining length.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a packet.
    #[error("the connection ended inside a packet ({0} bytes of it received)")]
    Truncated(usize),
    /// A PUBLISH on a topic that is not a request and names no usable `$rid` to answer on.
    #[error("PUBLISH on '{topic}' cannot be answered: {reason}")]
    UnanswerableTopic {
        /// The topic (at most 200 characters of it).
        topic: String,
        /// Why it is not a request.
        reason: String,
    },
    /// The handler's reply asked for the connection to be dropped ([`dps_core::Reply::drop_connection`],
    /// fault injection): the session was closed without answering the request.
    #[error("the connection was dropped without an answer, as the handler asked")]
    Dropped,
    /// The HTTP request is not a valid WebSocket upgrade ([`websocket_upgrade_response`]).
    #[error("not a valid WebSocket upgrade request: {0}")]
    InvalidUpgrade(String),
}

/// Serves one MQTT connection on `stream` (already TLS-terminated) until the client disconnects or breaks
/// the protocol; the stream is shut down cleanly at the end.
///
/// Returns `Ok(())` after a DISCONNECT or when the client closes the stream between packets, and the reason
/// otherwise. Must run inside a Tokio runtime with the time driver.
pub async fn serve_connection<S, H>(stream: S, handler: Arc<H>, limits: &MqttLimits) -> Result<(), MqttError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: DeviceHandler,
{
    serve_connection_with_peer(stream, handler, limits, None).await
}

/// [`serve_connection`] for a TLS connection whose client sent a certificate chain (DER, leaf first): every
/// request of the session carries it as its [`Credential`](dps_core::proto::Credential) when the CONNECT
/// has no password (SAS), so X.509 devices on port 8883 are attested by their certificate.
pub async fn serve_connection_with_peer<S, H>(
    stream: S,
    handler: Arc<H>,
    limits: &MqttLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), MqttError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: DeviceHandler,
{
    let mut transport = session::RawTransport::new(stream);
    session::run(&mut transport, handler, limits, client_certificates).await
}

/// Serves one MQTT-over-WebSocket connection: `io` is the upgraded stream after the server wrote the `101`
/// ([`websocket_upgrade_response`]). Binary frames carry MQTT bytes; a packet may span frames and a frame may
/// hold several packets. Pings are answered; a text frame ends the session. Messages are limited to
/// [`MqttLimits::max_packet_bytes`] plus 4 KiB of room for small packets sharing the frame.
///
/// Returns like [`serve_connection`]; the session ends with a WebSocket close frame (1000 normal, 1002
/// protocol error, 1009 too big, 1001 on timeouts).
pub async fn serve_websocket<S, H>(io: S, handler: Arc<H>, limits: &MqttLimits) -> Result<(), MqttError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: DeviceHandler,
{
    serve_websocket_with_peer(io, handler, limits, None).await
}

/// [`serve_websocket`] for a TLS connection whose client sent a certificate chain (see
/// [`serve_connection_with_peer`]).
pub async fn serve_websocket_with_peer<S, H>(
    io: S,
    handler: Arc<H>,
    limits: &MqttLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), MqttError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: DeviceHandler,
{
    let mut transport = websocket::WsTransport::new(io, limits).await;
    session::run(&mut transport, handler, limits, client_certificates).await
}
