//! The DPS device API over AMQP 1.0 (spec §3, §12 items 16-20), on any byte stream.
//!
//! The server owns sockets and TLS; this crate turns one connection's bytes into
//! [`dps_core::DeviceRequest`]s for a [`DeviceHandler`] (normally the engine) and writes the replies back.
//! The AMQP machinery (frame codec, connection, session and link engines, flow control, dispositions) is
//! [`fe2o3_amqp`]'s acceptor side; this crate adds the DPS parts on top of it:
//!
//! - [`serve_connection`] / [`serve_connection_with_peer`]: AMQP over a raw stream (TLS on port 5671).
//! - [`serve_websocket`] / [`serve_websocket_with_peer`]: AMQP over WebSocket (port 443, subprotocol
//!   `AMQPWSB10`, any path): the server answers the HTTP upgrade with [`websocket_upgrade_response`] (after
//!   [`offers_amqp_subprotocol`] chose AMQP over MQTT) and hands the upgraded stream over; binary messages
//!   carry the AMQP bytes.
//!
//! One connection:
//! 1. The first 8 bytes, within [`AmqpLimits::handshake_timeout`], are a protocol header. The SASL header
//!    (`AMQP 3 1 0 0`) starts a SASL layer; the plain AMQP header (`AMQP 0 1 0 0`) skips it, as the C and C#
//!    SDKs do for X.509 devices, whose identity is the TLS client certificate. Anything else (garbage, TLS
//!    header, another version) is answered with the SASL header this server speaks, and the connection is
//!    closed ([`AmqpError::ProtocolHeader`]).
//! 2. SASL offers `PLAIN`, plus `EXTERNAL` and `ANONYMOUS` when the TLS layer captured a client certificate.
//!    `PLAIN`'s authentication ID is `{idScope}/registrations/{registrationId}` and its password the SAS
//!    token: both are checked with the handler ([`dps_core::DeviceCall::Authenticate`], the context load and
//!    attestation of a register) before the outcome, so a wrong SAS gets SASL outcome `auth` (code 1), a
//!    throttled or failing service `sys-temp` (code 4). An unknown mechanism gets `auth`. The `TPM`
//!    mechanism (spec §3.4) is not offered yet: it waits for TPM attestation in the engine; its place is
//!    the `sasl` module's mechanism dispatch.
//! 3. Links may be attached at any of the four address spellings (`amqps://{host}/{scope}/registrations/{id}`,
//!    `/{scope}/…`, `{scope}/…`, and with a trailing `/`). On a SASL `PLAIN` connection the address must
//!    name the authenticated scope and registration ID; on others it names the device whose certificate is
//!    then attested. A link to another device, or to an address that is not a registration, is refused
//!    (detached with `amqp:unauthorized-access` or `amqp:not-found` and the JSON error as description).
//!    The device's sender link is granted [`AmqpLimits::link_credit`] credit, renewed as messages arrive;
//!    responses go out on the device's receiver link.
//! 4. A message on the sender link is a request: application property `iotdps-operation-type` =
//!    `iotdps-register` (optional `iotdps-forceRegistration`), `iotdps-get-operationstatus` (with
//!    `iotdps-operation-id`) or `iotdps-get-registration` (status lookup); the body may be one or more
//!    `data` sections, an `amqp-value` or nothing, and is ignored for status requests. A success is
//!    accepted and answered with a message whose body is one `data` section with the engine's JSON, whose
//!    correlation-id echoes the request's (none when it had none), and whose application properties carry
//!    `retry-after` and `Retry-After` (both, as ints) when the engine gives one. An error is a `rejected`
//!    outcome whose error description is the JSON error body (errorCode, trackingId, message, …) and
//!    whose info carries `Retry-After` when there is one. Requests of a session are answered in order.
//! 5. Anything malformed (bad frames, transfers beyond credit, messages over
//!    [`AmqpLimits::max_message_bytes`], a transfer on a link never attached) ends in an AMQP error close
//!    by the link, session or connection engine; a connection that makes no request for
//!    [`AmqpLimits::request_idle_timeout`] while none is answered is closed with
//!    `amqp:resource-limit-exceeded`. Nothing panics; a request already handed to the handler runs to its
//!    end even if the device goes away.
//!
//! The functions must be called inside a Tokio runtime with the time driver (the AMQP engines run on
//! tasks of their own).
#![forbid(unsafe_code)]
// A transport crate: it drives Tokio timers and reads the clock (idle deadlines).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod address;
mod io;
mod message;
mod sasl;
mod session;
mod websocket;

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub use address::{normalize_address, LinkAddress};
pub use message::{parse_request, AmqpRequest, OPERATION_ID, OPERATION_TYPE};
pub use websocket::{offers_amqp_subprotocol, websocket_upgrade_response, WEBSOCKET_SUBPROTOCOL};

/// The transport-facing contract of the host (it lives in `dps-host`, shared by every transport); a
/// `dps_host::Host` implements it.
pub use dps_host::{default_error_reply, DeviceHandler};

/// The AMQP 1.0 implementation this crate is built on, for callers that need its types.
pub use fe2o3_amqp;

/// Limits of one AMQP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpLimits {
    /// The largest accepted message, in bytes (default 100 000: the engine's 96 KiB body limit plus
    /// properties, so an oversized body reaches the engine and gets `413001`); a larger message detaches
    /// its link with `amqp:link:message-size-exceeded`. Also the link's advertised `max-message-size`.
    pub max_message_bytes: u64,
    /// The largest AMQP frame accepted and advertised in `open` (default 65 536, the C SDK's).
    pub max_frame_bytes: u32,
    /// How long a new connection may take from its first byte to an open connection: protocol header,
    /// SASL exchange and `open` (default 10 s).
    pub handshake_timeout: Duration,
    /// How long a connection may go without a request while none is being answered (default 60 s; zero:
    /// no limit). Set it above the `Retry-After` the service answers with.
    pub request_idle_timeout: Duration,
    /// The AMQP `idle-time-out` announced in `open` (default 120 s; zero: none): a connection from which no
    /// frame (not even an empty heartbeat, which AMQP clients send at half this interval) arrives for that
    /// long is dropped. It also bounds how long a peer that never answers the server's `close` holds its
    /// socket.
    pub idle_timeout: Duration,
    /// The credit granted to the device's sender link, renewed as messages arrive (default 10; 0 counts as
    /// 1).
    pub link_credit: u32,
}

impl Default for AmqpLimits {
    fn default() -> Self {
        AmqpLimits {
            max_message_bytes: 100_000,
            max_frame_bytes: 65_536,
            handshake_timeout: Duration::from_secs(10),
            request_idle_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            link_credit: 10,
        }
    }
}

/// Why a connection ended (other than by the client's `close`, or the stream ending between frames).
///
/// In every case the connection has been closed; the error is for logging and metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// Reading from or writing to the stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The first bytes were not a protocol header this server speaks; the SASL header was sent back.
    #[error("protocol header {0:02x?} is not AMQP 1.0 or its SASL layer")]
    ProtocolHeader(Vec<u8>),
    /// Nothing arrived, or the handshake (header, SASL, `open`) did not complete, within
    /// [`AmqpLimits::handshake_timeout`].
    #[error("the AMQP handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// SASL ended with a failure outcome (code 1 `auth`, 2 `sys`, 3 `sys-perm`, 4 `sys-temp`).
    #[error("SASL refused with outcome code {code}: {reason}")]
    SaslRefused {
        /// The SASL outcome code sent.
        code: u8,
        /// Why.
        reason: String,
    },
    /// The SASL exchange broke the protocol (a frame out of order, a malformed frame).
    #[error("SASL protocol violation: {0}")]
    Sasl(String),
    /// The AMQP connection could not be opened (bad `open`, frame errors before it).
    #[error("AMQP open failed: {0}")]
    Open(String),
    /// The connection, a session or a link ended with an AMQP error (protocol violation, credit or size
    /// exceeded, decode error, …).
    #[error("AMQP error: {0}")]
    Protocol(String),
    /// No request arrived within [`AmqpLimits::request_idle_timeout`] while none was being answered.
    #[error("no request within {0:?}")]
    RequestIdleTimeout(Duration),
    /// The WebSocket layer failed (bad frame, text frame, message over the size limit, …).
    #[error("WebSocket error: {0}")]
    WebSocket(String),
    /// The HTTP request is not a valid AMQP WebSocket upgrade ([`websocket_upgrade_response`]).
    #[error("not a valid WebSocket upgrade request: {0}")]
    InvalidUpgrade(String),
}

/// Serves one AMQP connection on `stream` (already TLS-terminated) until the client closes it or breaks
/// the protocol.
///
/// Returns `Ok(())` after the client's `close` (or the stream ending between frames), and the reason
/// otherwise. Must run inside a Tokio runtime with the time driver.
pub async fn serve_connection<S, H>(stream: S, handler: Arc<H>, limits: &AmqpLimits) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: DeviceHandler,
{
    serve_connection_with_peer(stream, handler, limits, None).await
}

/// [`serve_connection`] for a TLS connection whose client sent a certificate chain (DER, leaf first): every
/// request of a connection without SASL `PLAIN` carries it as its
/// [`Credential`](dps_core::proto::Credential), so X.509 devices on port 5671 are attested by their
/// certificate.
pub async fn serve_connection_with_peer<S, H>(
    stream: S,
    handler: Arc<H>,
    limits: &AmqpLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: DeviceHandler,
{
    session::run(io::Io::new(stream), handler, limits, client_certificates).await
}

/// Serves one AMQP-over-WebSocket connection: `io` is the upgraded stream after the server wrote the `101`
/// ([`websocket_upgrade_response`]). Binary messages carry AMQP bytes (a frame may span messages, a
/// message may hold several frames); pings are answered; a text message ends the connection.
pub async fn serve_websocket<S, H>(io: S, handler: Arc<H>, limits: &AmqpLimits) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: DeviceHandler,
{
    serve_websocket_with_peer(io, handler, limits, None).await
}

/// [`serve_websocket`] for a TLS connection whose client sent a certificate chain (see
/// [`serve_connection_with_peer`]).
pub async fn serve_websocket_with_peer<S, H>(
    io: S,
    handler: Arc<H>,
    limits: &AmqpLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: DeviceHandler,
{
    let ws = websocket::WsIo::new(io, limits).await;
    session::run(io::Io::new(ws), handler, limits, client_certificates).await
}
