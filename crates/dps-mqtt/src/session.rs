//! One MQTT 3.1.1 session over a byte transport: CONNECT, then packets until the end.
//!
//! Packets are decoded and encoded with `rumqttc::mqttbytes::v4`; usernames and topics with
//! `dps_proto::mqtt`. The loop waits on three things at once: bytes from the client, the reply to the oldest
//! request in flight, and the keep-alive deadline — so PINGREQs are answered while the engine works.

use crate::{DeviceHandler, MqttError, MqttLimits};
use bytes::{Bytes, BytesMut};
use dps_core::proto::mqtt::{
    parse_request_topic, parse_username, register_topic, response_topic, MqttRequest, MqttUsername,
    RESPONSE_TOPIC_FILTER,
};
use dps_core::proto::{Credential, RegistrationId};
use dps_core::{DeviceCall, DeviceRequest, DpsError, ErrorCode, Reply};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{self, PacketType, QoS};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

/// How many bytes a raw-stream read asks for at least.
const READ_CHUNK: usize = 8 * 1024;

/// How long a PUBACK may wait for the response to its request, so that both leave in one write (one TLS
/// record, one segment, one wakeup of the client) as they normally do; a response that takes longer gets
/// its PUBACK sent alone when this expires.
const PUBACK_HOLD: Duration = Duration::from_millis(10);

/// How long a session whose client certificate was refused stays open after the refusal is answered, for
/// the client to unsubscribe and disconnect on its own.
const CERTIFICATE_REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// How a session ended, so the transport can close accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseKind {
    /// DISCONNECT, end of stream, I/O failure.
    Normal,
    /// The client broke the MQTT or WebSocket protocol.
    ProtocolError,
    /// A packet or message over the size limit.
    TooBig,
    /// A deadline passed.
    Timeout,
}

impl CloseKind {
    fn of(result: &Result<(), MqttError>) -> CloseKind {
        match result {
            Ok(()) | Err(MqttError::Io(_)) => CloseKind::Normal,
            Err(MqttError::PacketTooLarge { .. }) => CloseKind::TooBig,
            Err(
                MqttError::ConnectTimeout(_) | MqttError::KeepAliveTimeout(_) | MqttError::WriteTimeout(_),
            ) => CloseKind::Timeout,
            Err(_) => CloseKind::ProtocolError,
        }
    }
}

/// A byte transport: a raw stream, or WebSocket binary frames.
pub(crate) trait Transport: Send {
    /// Appends received bytes to `buf` and returns how many; `Ok(0)` at the end of the stream.
    /// Must be cancel-safe (it is raced against timers and replies).
    fn read<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = Result<usize, MqttError>> + Send + 'a;

    /// Writes and flushes `bytes`.
    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> impl Future<Output = Result<(), MqttError>> + Send + 'a;

    /// Closes the connection (best effort; the caller bounds it with a timeout).
    fn close(&mut self, kind: CloseKind) -> impl Future<Output = ()> + Send + '_;
}

/// MQTT directly on a stream (TLS-terminated by the server).
pub(crate) struct RawTransport<S> {
    stream: S,
}

impl<S> RawTransport<S> {
    pub(crate) fn new(stream: S) -> Self {
        RawTransport { stream }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for RawTransport<S> {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<usize, MqttError> {
        buf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(buf).await?)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), MqttError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn close(&mut self, _kind: CloseKind) {
        // Errors here mean the peer is already gone, which is what closing wants anyway.
        let _ = self.stream.shutdown().await;
    }
}

/// Runs a session to its end and closes the transport.
pub(crate) async fn run<T: Transport, H: DeviceHandler>(
    transport: &mut T,
    handler: Arc<H>,
    limits: &MqttLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), MqttError> {
    let mut session = Session::new(handler, limits);
    session.client_certificates = client_certificates.filter(|c| !c.is_empty());
    let result = session.serve(transport).await;
    if !matches!(result, Err(MqttError::Io(_) | MqttError::WriteTimeout(_))) {
        // What was answered but not yet written (e.g. the replies before a DISCONNECT) still goes out.
        let _ = session.flush(transport).await;
    }
    let _ = timeout(session.write_limit, transport.close(CloseKind::of(&result))).await;
    result
}

/// A reply being produced: the handler's future (or a reply made here), polled by the session itself.
///
/// Dropped before it completes (the client went away, or the session ended for another reason), the rest
/// of it runs in a task of its own, so a request that reached the engine always runs to completion (the
/// store is never left half-written because a device went away) without a task per request. A panic while
/// polling it is caught and becomes an error reply.
struct Pending {
    /// `None` once it has completed.
    future: Option<Pin<Box<dyn Future<Output = Reply> + Send>>>,
    /// The reply, or the message of the panic that ended the handler, until taken.
    output: Option<Result<Reply, String>>,
}

impl Pending {
    fn new(future: impl Future<Output = Reply> + Send + 'static) -> Self {
        Pending { future: Some(Box::pin(future)), output: None }
    }

    /// Polls the future if it has not completed yet, keeping its output.
    fn advance(&mut self, cx: &mut Context<'_>) {
        let Some(future) = self.future.as_mut() else { return };
        let output = match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(reply)) => Ok(reply),
            Err(panic) => Err(panic
                .downcast_ref::<&str>()
                .map(|m| (*m).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())),
        };
        self.future = None;
        self.output = Some(output);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            // Outside a runtime (it is being torn down) there is nothing left to run the request on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = future.await;
                });
            }
        }
    }
}

/// Work for one request.
enum Job {
    /// Run through the handler.
    Request(DeviceRequest),
    /// Already answered (refused before the engine).
    Ready(Reply),
}

/// What the CONNECT established.
struct Connected {
    username: MqttUsername,
    /// The MQTT password (a SAS token), `None` when absent or empty.
    password: Option<String>,
    /// A client-certificate session (no password): DPS answers certificate problems at the request
    /// (`res/401` with 401002 and the rule that failed), so the CONNECT is accepted unchecked and the
    /// session ends shortly after its first refused request.
    certificate_session: bool,
}

struct Session<H> {
    handler: Arc<H>,
    max_packet: usize,
    connect_timeout: Duration,
    max_keep_alive: Duration,
    max_inflight: usize,
    /// Received bytes not yet decoded.
    buf: BytesMut,
    /// Outgoing packets not yet written, encoded.
    out: BytesMut,
    /// `out` holds a packet that must be written before the session waits again.
    urgent: bool,
    /// When `out` holding only PUBACKs must be written, if no response has taken them along by then.
    flush_by: Option<Instant>,
    /// 1.5 × the effective keep-alive; `None` when silence is allowed.
    idle_limit: Option<Duration>,
    /// How long one write may take.
    write_limit: Duration,
    /// When the last packet arrived (or reading resumed after back-pressure).
    last_packet: Instant,
    /// How long the session may go without a request while none is answered (None: no limit).
    request_idle: Option<Duration>,
    /// When the last request arrived or the last response was queued.
    last_request: Instant,
    /// The last packet ID used for a response.
    pkid: u16,
    /// Requests being answered, oldest first, with their `$rid`.
    queue: VecDeque<(String, Pending)>,
    /// A request that arrived while `queue` was full; reading pauses until it can start.
    parked: Option<(String, Job)>,
    /// The TLS client-certificate chain of the connection (DER, leaf first), if the client sent one.
    client_certificates: Option<Vec<Vec<u8>>>,
    /// Authenticate the CONNECT with the handler.
    authenticate: bool,
    /// A request of a [`Connected::certificate_session`] is being answered: end the session if
    /// the answer is a refusal.
    closing: bool,
    /// When a session whose certificate was refused ends (set once the refusal is answered).
    refused_until: Option<Instant>,
}

impl<H: DeviceHandler> Session<H> {
    fn new(handler: Arc<H>, limits: &MqttLimits) -> Self {
        Session {
            handler,
            max_packet: limits.max_packet_bytes,
            connect_timeout: limits.connect_timeout,
            max_keep_alive: limits.max_keep_alive,
            max_inflight: limits.max_inflight_requests.max(1),
            buf: BytesMut::new(),
            out: BytesMut::new(),
            urgent: false,
            flush_by: None,
            idle_limit: None,
            write_limit: limits.connect_timeout,
            last_packet: Instant::now(),
            request_idle: Some(limits.request_idle_timeout).filter(|d| !d.is_zero()),
            last_request: Instant::now(),
            pkid: 0,
            queue: VecDeque::new(),
            parked: None,
            client_certificates: None,
            authenticate: limits.authenticate_at_connect,
            closing: false,
            refused_until: None,
        }
    }

    async fn serve<T: Transport>(&mut self, t: &mut T) -> Result<(), MqttError> {
        let Some(connect) = self.read_connect(t).await? else {
            return Ok(());
        };
        let connected = self.accept(t, connect).await?;
        self.main_loop(t, &connected).await
    }

    /// Reads the first packet, which must be a CONNECT; `None` when the client closes before sending a byte.
    async fn read_connect<T: Transport>(&mut self, t: &mut T) -> Result<Option<Connect>, MqttError> {
        // A connect timeout too large to represent means none.
        let deadline = Instant::now().checked_add(self.connect_timeout);
        loop {
            // Fail fast on anything that cannot start a CONNECT (TLS or HTTP spoken to the MQTT port, …).
            if let Some(&first) = self.buf.first() {
                if first != 0x10 {
                    return Err(MqttError::Protocol(format!(
                        "the first packet must be CONNECT; got a packet of type {} (first byte {first:#04x})",
                        first >> 4
                    )));
                }
            }
            if let Some((name, level)) = connect_protocol(&self.buf, self.max_packet) {
                if (name == "MQTT" && level != 4) || name == "MQIsdp" {
                    let reason = format!(
                        "protocol '{name}' level {level} is not supported; DPS speaks MQTT 3.1.1 (level 4)"
                    );
                    return Err(self.refuse(t, ConnectReturnCode::RefusedProtocolVersion, reason).await);
                }
            }
            match decode(&mut self.buf, self.max_packet)? {
                Some(Packet::Connect(c)) => return Ok(Some(c)),
                Some(other) => {
                    return Err(MqttError::Protocol(format!(
                        "the first packet must be CONNECT, not {}",
                        packet_name(&other)
                    )))
                }
                None => {}
            }
            let n = tokio::select! {
                n = t.read(&mut self.buf) => n?,
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Err(MqttError::ConnectTimeout(self.connect_timeout))
                }
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(MqttError::Truncated(self.buf.len()))
                };
            }
        }
    }

    /// Writes a refusing CONNACK and returns the error that ends the session.
    async fn refuse<T: Transport>(
        &mut self,
        t: &mut T,
        code: ConnectReturnCode,
        reason: String,
    ) -> MqttError {
        if let Err(e) = self.send(t, Packet::ConnAck(ConnAck::new(code, false))).await {
            return e;
        }
        MqttError::ConnectRefused { code: return_code(code), reason }
    }

    /// Validates the CONNECT (spec §2.2) and answers it.
    async fn accept<T: Transport>(&mut self, t: &mut T, connect: Connect) -> Result<Connected, MqttError> {
        use ConnectReturnCode::{BadClientId, BadUserNamePassword};
        let login = connect.login.filter(|l| !l.username.is_empty());
        let Some(login) = login else {
            let reason = "the CONNECT has no username; it must be \
                          '{idScope}/registrations/{registrationId}/api-version=…'"
                .to_owned();
            return Err(self.refuse(t, BadUserNamePassword, reason).await);
        };
        let username = match parse_username(&login.username) {
            Ok(u) => u,
            Err(e) => return Err(self.refuse(t, BadUserNamePassword, e.message).await),
        };
        if connect.client_id.is_empty() {
            let reason = format!(
                "the client ID is empty; it must be the registration ID '{}'",
                username.registration_id
            );
            return Err(self.refuse(t, BadClientId, reason).await);
        }
        match RegistrationId::parse(&connect.client_id) {
            Ok(id) if id == username.registration_id => {}
            _ => {
                let reason = format!(
                    "the client ID '{}' is not the registration ID '{}' of the username",
                    shown(&connect.client_id),
                    username.registration_id
                );
                return Err(self.refuse(t, BadClientId, reason).await);
            }
        }
        let password = Some(login.password).filter(|p| !p.is_empty());
        // Authenticate now: a client whose credential fits no enrollment is refused before it holds a
        // session (every request is checked again, as the token may expire meanwhile).
        let check = DeviceRequest {
            id_scope: username.id_scope.clone(),
            registration_id: username.registration_id.clone(),
            call: DeviceCall::Authenticate,
            api_version: username.api_version.clone(),
            credential: Credential::from_transport(password.clone(), self.client_certificates.clone()),
            body: Vec::new(),
            client_address: None,
        };
        // A certificate session is not checked here: DPS answers a certificate problem at the request, with
        // the reason (spec §2.6, §7.5), and the TLS handshake already proved the client holds the key. Its
        // first refused request ends it; a good one costs no second chain validation.
        let certificate_session = password.is_none() && self.client_certificates.is_some();
        let verdict = if self.authenticate && !certificate_session {
            Some(self.handler.handle(check).await)
        } else {
            None
        };
        if let Some(verdict) = verdict.filter(|v| v.status >= 300) {
            let code = match verdict.status {
                401 | 403 | 404 => ConnectReturnCode::NotAuthorized,
                _ => ConnectReturnCode::ServiceUnavailable,
            };
            let reason = format!(
                "authentication at CONNECT failed: {} {}",
                verdict.status,
                String::from_utf8_lossy(&verdict.body)
            );
            return Err(self.refuse(t, code, reason).await);
        }

        let keep_alive = match connect.keep_alive {
            0 => self.max_keep_alive,
            secs => Duration::from_secs(u64::from(secs)).min(self.max_keep_alive),
        };
        self.idle_limit = (!keep_alive.is_zero()).then(|| keep_alive.saturating_add(keep_alive / 2));
        self.write_limit = self.idle_limit.unwrap_or(self.connect_timeout).max(self.connect_timeout);
        self.last_packet = Instant::now();
        self.last_request = Instant::now();
        // DPS keeps no sessions: always sessionPresent = 0 (the C# SDK fails otherwise). Written before the
        // session next waits, together with the answers to any packets that came with the CONNECT.
        self.queue(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)), true)?;
        Ok(Connected { username, password, certificate_session })
    }

    async fn main_loop<T: Transport>(&mut self, t: &mut T, c: &Connected) -> Result<(), MqttError> {
        loop {
            // Handle every complete packet already received, unless a request waits for room.
            while self.parked.is_none() {
                let Some(packet) = decode(&mut self.buf, self.max_packet)? else { break };
                self.last_packet = Instant::now();
                if !self.on_packet(c, packet)? {
                    return Ok(());
                }
            }
            // Write what is due before waiting: anything but PUBACKs at once; PUBACKs wait (briefly) for
            // their response unless no response is coming.
            if !self.out.is_empty() && (self.urgent || self.queue.is_empty()) {
                self.flush(t).await?;
            }
            let hold = self.flush_by.filter(|_| !self.out.is_empty());
            let reading = self.parked.is_none();
            // The silence deadline, unless reading is paused (or the limit is too large to represent).
            let silence = self.idle_limit.filter(|_| reading);
            let deadline = silence.and_then(|limit| self.last_packet.checked_add(limit));
            let has_reply = !self.queue.is_empty();
            // Nothing asked and nothing being answered: the session must make a request soon.
            let idle = self.request_idle.filter(|_| !has_reply && self.parked.is_none());
            let idle_deadline = idle.and_then(|limit| self.last_request.checked_add(limit));
            let refused_until = self.refused_until;
            tokio::select! {
                () = sleep_until(refused_until.unwrap_or(self.last_packet)), if refused_until.is_some() => {
                    self.flush(t).await?;
                    return Err(MqttError::CertificateRefused);
                }
                reply = front(&mut self.queue), if has_reply => {
                    let reply = reply.unwrap_or_else(|panic| {
                        self.handler.error_reply(&DpsError::with_message(
                            ErrorCode::InternalError,
                            format!("the request handler failed: {panic}"),
                        ))
                    });
                    if reply.drop_connection {
                        // The handler asked for a dropped connection (fault injection): nothing more is
                        // written, not even what is queued.
                        self.out.clear();
                        return Err(MqttError::Dropped);
                    }
                    let refused = reply.status >= 400;
                    if let Some((rid, _)) = self.queue.pop_front() {
                        self.respond(&rid, reply)?;
                    }
                    if self.closing && refused && self.refused_until.is_none() {
                        // The certificate refusal is answered: the client gets a moment to unsubscribe and
                        // disconnect (the Node SDK's register never completes if the server closes before
                        // its UNSUBACK), then the session ends.
                        self.refused_until = Instant::now().checked_add(CERTIFICATE_REFUSAL_GRACE);
                    }
                    // The client may now wait (Retry-After) before its next request.
                    self.last_request = Instant::now();
                    if let Some((rid, job)) = self.parked.take() {
                        self.enqueue(rid, job);
                        // Reading resumes: the client's silence is counted from now.
                        self.last_packet = Instant::now();
                    }
                }
                n = t.read(&mut self.buf), if reading => {
                    if n? == 0 {
                        return if self.buf.is_empty() {
                            Ok(())
                        } else {
                            Err(MqttError::Truncated(self.buf.len()))
                        };
                    }
                }
                () = sleep_until(deadline.unwrap_or(self.last_packet)), if deadline.is_some() => {
                    return Err(MqttError::KeepAliveTimeout(silence.unwrap_or_default()));
                }
                () = sleep_until(idle_deadline.unwrap_or(self.last_request)), if idle_deadline.is_some() => {
                    return Err(MqttError::RequestIdleTimeout(idle.unwrap_or_default()));
                }
                () = sleep_until(hold.unwrap_or(self.last_packet)), if hold.is_some() => {
                    self.flush(t).await?;
                }
            }
        }
    }

    /// Handles one packet after CONNECT; `false` ends the session cleanly.
    fn on_packet(&mut self, c: &Connected, packet: Packet) -> Result<bool, MqttError> {
        match packet {
            Packet::Publish(p) => {
                self.last_request = Instant::now();
                self.on_publish(c, p)?
            }
            Packet::Subscribe(s) => self.on_subscribe(s)?,
            Packet::Unsubscribe(u) => self.queue(Packet::UnsubAck(UnsubAck::new(u.pkid)), true)?,
            Packet::PingReq => self.queue(Packet::PingResp, true)?,
            // Acknowledgements of our QoS 1 responses: nothing is redelivered, so nothing to track.
            Packet::PubAck(_) => {}
            Packet::Disconnect => return Ok(false),
            Packet::Connect(_) => {
                return Err(MqttError::Protocol("a second CONNECT on the same connection".to_owned()))
            }
            other @ (Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_)) => {
                return Err(MqttError::Protocol(format!(
                    "{} is part of QoS 2, which DPS does not support",
                    packet_name(&other)
                )))
            }
            other @ (Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp) => {
                return Err(MqttError::Protocol(format!(
                    "{} is sent by servers, not clients",
                    packet_name(&other)
                )))
            }
        }
        Ok(true)
    }

    /// SUBSCRIBE: only the response filter is granted, at QoS 1 at most (spec §2.3).
    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), MqttError> {
        let codes = s
            .filters
            .iter()
            .map(|f| {
                if f.path == RESPONSE_TOPIC_FILTER {
                    SubscribeReasonCode::Success(match f.qos {
                        QoS::AtMostOnce => QoS::AtMostOnce,
                        QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
                    })
                } else {
                    SubscribeReasonCode::Failure
                }
            })
            .collect();
        self.queue(Packet::SubAck(SubAck::new(s.pkid, codes)), true)
    }

    /// PUBLISH: a request (spec §2.4, §2.5), acknowledged for QoS 1 (the PUBACK leaves with the response,
    /// or after [`PUBACK_HOLD`]) and queued.
    fn on_publish(&mut self, c: &Connected, p: Publish) -> Result<(), MqttError> {
        if p.qos == QoS::ExactlyOnce {
            return Err(MqttError::Protocol(format!(
                "QoS 2 PUBLISH on '{}'; DPS requests use QoS 0 or 1",
                shown(&p.topic)
            )));
        }
        let (rid, job) = match parse_request_topic(&p.topic) {
            Ok(request) => (request.rid().to_owned(), self.request_job(c, request, p.payload)),
            Err(e) => match salvage_rid(&p.topic) {
                Some(rid) => (rid, Job::Ready(self.handler.error_reply(&e))),
                None => {
                    return Err(MqttError::UnanswerableTopic { topic: shown(&p.topic), reason: e.message })
                }
            },
        };
        if p.qos == QoS::AtLeastOnce {
            self.queue(Packet::PubAck(PubAck::new(p.pkid)), false)?;
        }
        self.enqueue(rid, job);
        Ok(())
    }

    /// The engine request for a recognised topic, addressed by the CONNECT's username and password.
    fn request_job(&mut self, c: &Connected, request: MqttRequest, payload: Bytes) -> Job {
        // The request is attested again (and metered) like any other; a refusal then ends the session.
        self.closing = c.certificate_session;
        let (call, body) = match request {
            MqttRequest::Register { .. } => {
                if let Some(e) = tpm_refusal(&payload) {
                    return Job::Ready(self.handler.error_reply(&e));
                }
                (DeviceCall::Register { force: false }, payload.to_vec())
            }
            // The poll payload is ignored: empty (C#, embedded C), " " (Python) or the register JSON (C).
            MqttRequest::OperationStatus { operation_id, .. } => {
                (DeviceCall::OperationStatus(operation_id), Vec::new())
            }
        };
        Job::Request(DeviceRequest {
            id_scope: c.username.id_scope.clone(),
            registration_id: c.username.registration_id.clone(),
            call,
            api_version: c.username.api_version.clone(),
            credential: Credential::from_transport(c.password.clone(), self.client_certificates.clone()),
            body,
            client_address: None,
        })
    }

    /// Starts a job if there is room, or parks it (which pauses reading).
    fn enqueue(&mut self, rid: String, job: Job) {
        if self.queue.len() < self.max_inflight {
            let pending = self.start(job);
            self.queue.push_back((rid, pending));
        } else {
            self.parked = Some((rid, job));
        }
    }

    /// Starts the handler call. It is polled alongside reading (so it never blocks the session) and
    /// completes even if the client goes away ([`Pending`]).
    fn start(&self, job: Job) -> Pending {
        match job {
            Job::Ready(reply) => Pending::new(std::future::ready(reply)),
            Job::Request(request) => {
                let handler = Arc::clone(&self.handler);
                Pending::new(async move { handler.handle(request).await })
            }
        }
    }

    /// Queues a reply as a QoS 1 PUBLISH on the response topic (spec §2.6).
    fn respond(&mut self, rid: &str, reply: Reply) -> Result<(), MqttError> {
        let topic = response_topic(reply.status, rid, reply.retry_after);
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, reply.body);
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        publish.pkid = self.pkid;
        self.queue(Packet::Publish(publish), true)
    }

    /// Encodes a packet into the output buffer. `urgent` packets are written before the session next waits;
    /// others (PUBACKs) within [`PUBACK_HOLD`], with whatever is written first.
    fn queue(&mut self, packet: Packet, urgent: bool) -> Result<(), MqttError> {
        packet.write(&mut self.out, usize::MAX).map_err(|e| {
            MqttError::Io(std::io::Error::other(format!("cannot encode {}: {e}", packet_name(&packet))))
        })?;
        if urgent {
            self.urgent = true;
        } else if self.flush_by.is_none() {
            self.flush_by = Instant::now().checked_add(PUBACK_HOLD);
        }
        Ok(())
    }

    /// Writes the output buffer within the write limit.
    async fn flush<T: Transport>(&mut self, t: &mut T) -> Result<(), MqttError> {
        self.urgent = false;
        self.flush_by = None;
        if self.out.is_empty() {
            return Ok(());
        }
        let result = match timeout(self.write_limit, t.write(&self.out)).await {
            Ok(result) => result,
            Err(_) => Err(MqttError::WriteTimeout(self.write_limit)),
        };
        self.out.clear();
        result
    }

    /// Encodes and writes one packet (after anything already queued) within the write limit.
    async fn send<T: Transport>(&mut self, t: &mut T, packet: Packet) -> Result<(), MqttError> {
        self.queue(packet, true)?;
        self.flush(t).await
    }
}

/// Drives every request in flight (they run concurrently) and resolves with the oldest one's reply once it
/// is there, leaving its entry at the front of the queue for the caller to remove (never resolves when the
/// queue is empty; the caller guards on that).
async fn front(queue: &mut VecDeque<(String, Pending)>) -> Result<Reply, String> {
    std::future::poll_fn(|cx| {
        for (_, pending) in queue.iter_mut() {
            pending.advance(cx);
        }
        match queue.front_mut().and_then(|(_, pending)| pending.output.take()) {
            Some(output) => Poll::Ready(output),
            None => Poll::Pending,
        }
    })
    .await
}

/// Decodes one packet from the front of `buf`; `None` when more bytes are needed.
fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, MqttError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // Packet types 0 and 15 are reserved: refuse them before waiting for the rest of the packet.
    if matches!(first >> 4, 0 | 15) {
        return Err(MqttError::Malformed(format!("reserved packet type {}", first >> 4)));
    }
    match Packet::read(buf, max) {
        Ok(packet) => Ok(Some(packet)),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => Err(MqttError::PacketTooLarge { size, max }),
        Err(e) => Err(MqttError::Malformed(e.to_string())),
    }
}

/// The protocol name and level of a complete CONNECT at the front of `buf`, read from its variable header
/// before the codec (which refuses anything but "MQTT" 4/5 without saying which) sees it.
fn connect_protocol(buf: &BytesMut, max: usize) -> Option<(String, u8)> {
    let header = mqttbytes::check(buf.iter(), max).ok()?;
    if header.packet_type().ok()? != PacketType::Connect {
        return None;
    }
    let frame = buf.get(..header.frame_length())?;
    // Skip the first byte and the remaining length (a variable-length integer).
    let mut i = 1;
    while frame.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let len = usize::from(u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]));
    let name = frame.get(i + 2..i + 2 + len)?;
    let level = *frame.get(i + 2 + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), level))
}

/// The `$rid` of a topic that is not a valid request, if it has exactly one that could be echoed safely.
fn salvage_rid(topic: &str) -> Option<String> {
    let (_, query) = topic.split_once('?')?;
    let mut rids = query.split('&').filter_map(|p| p.strip_prefix("$rid="));
    let rid = rids.next()?;
    if rids.next().is_some() {
        return None;
    }
    // Validate with the codec's own rules by parsing it as a register topic.
    parse_request_topic(&register_topic(rid)).ok().map(|r| r.rid().to_owned())
}

/// TPM attestation cannot work over MQTT (spec §2.1, §12 item 15): refuse a register body that carries it.
fn tpm_refusal(payload: &[u8]) -> Option<DpsError> {
    if !payload.windows(5).any(|w| w == b"\"tpm\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("tpm").filter(|tpm| !tpm.is_null())?;
    Some(DpsError::with_message(
        ErrorCode::BadRequest,
        "TPM attestation is not supported over MQTT; use HTTPS or AMQP for TPM devices.",
    ))
}

fn return_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// At most 200 characters of a client-supplied string, for messages.
fn shown(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() > MAX {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::proto::mqtt::build_username;
    use rumqttc::mqttbytes::v4::Login;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{DuplexStream, ReadBuf};
    use tokio::sync::Semaphore;

    /// Answers every request with `200 {}`, after a permit from `gate` when `gated`.
    struct TestHandler {
        gated: bool,
        gate: Semaphore,
        entered: Semaphore,
        finished: AtomicBool,
    }

    impl TestHandler {
        fn new(gated: bool) -> Arc<Self> {
            Arc::new(TestHandler {
                gated,
                gate: Semaphore::new(0),
                entered: Semaphore::new(0),
                finished: AtomicBool::new(false),
            })
        }
    }

    impl DeviceHandler for TestHandler {
        async fn handle(&self, _request: DeviceRequest) -> Reply {
            self.entered.add_permits(1);
            if self.gated {
                self.gate.acquire().await.unwrap().forget();
            }
            self.finished.store(true, Ordering::SeqCst);
            Reply::json(200, &serde_json::json!({}), "t".to_owned())
        }
    }

    /// The server's end of the connection, counting how often it is flushed (once per transport write).
    struct CountingIo {
        inner: DuplexStream,
        flushes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountingIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    struct TestClient {
        io: DuplexStream,
        buf: BytesMut,
        flushes: Arc<AtomicUsize>,
        session: tokio::task::JoinHandle<Result<(), MqttError>>,
    }

    impl TestClient {
        /// Starts a session and connects as `dev-1`.
        async fn connect(handler: Arc<TestHandler>) -> TestClient {
            let (io, server) = tokio::io::duplex(64 * 1024);
            let flushes = Arc::new(AtomicUsize::new(0));
            let counting = CountingIo { inner: server, flushes: Arc::clone(&flushes) };
            let session = tokio::spawn(async move {
                let mut transport = RawTransport::new(counting);
                run(
                    &mut transport,
                    handler,
                    &MqttLimits { authenticate_at_connect: false, ..MqttLimits::default() },
                    None,
                )
                .await
            });
            let mut client = TestClient { io, buf: BytesMut::new(), flushes, session };
            let mut connect = Connect::new("dev-1");
            connect.login =
                Some(Login::new(build_username("0ne00000001", "dev-1", "2019-03-31", None), "sas"));
            client.send(Packet::Connect(connect)).await;
            assert!(matches!(client.recv().await, Packet::ConnAck(_)));
            client
        }

        async fn send(&mut self, packet: Packet) {
            let mut b = BytesMut::new();
            packet.write(&mut b, usize::MAX).unwrap();
            self.io.write_all(&b).await.unwrap();
        }

        async fn recv(&mut self) -> Packet {
            loop {
                if let Some(packet) = decode(&mut self.buf, usize::MAX >> 4).unwrap() {
                    return packet;
                }
                assert!(self.io.read_buf(&mut self.buf).await.unwrap() > 0, "the session closed");
            }
        }

        async fn register(&mut self, pkid: u16) {
            let mut publish = Publish::new(register_topic("1"), QoS::AtLeastOnce, "{}");
            publish.pkid = pkid;
            self.send(Packet::Publish(publish)).await;
        }

        fn flushes(&self) -> usize {
            self.flushes.load(Ordering::SeqCst)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_puback_leaves_with_its_response_in_one_write() {
        let mut c = TestClient::connect(TestHandler::new(false)).await;
        assert_eq!(c.flushes(), 1);
        c.register(5).await;
        assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(5)));
        assert!(
            matches!(c.recv().await, Packet::Publish(p) if p.topic.starts_with("$dps/registrations/res/200/"))
        );
        assert_eq!(c.flushes(), 2, "PUBACK and response in one write");
        c.send(Packet::Disconnect).await;
        c.session.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_puback_does_not_wait_long_for_a_slow_response() {
        let handler = TestHandler::new(true);
        let mut c = TestClient::connect(Arc::clone(&handler)).await;
        c.register(6).await;
        // The engine holds the request; the PUBACK goes out on its own.
        assert_eq!(c.recv().await, Packet::PubAck(PubAck::new(6)));
        assert_eq!(c.flushes(), 2);
        assert!(!handler.finished.load(Ordering::SeqCst));
        handler.gate.add_permits(1);
        assert!(matches!(c.recv().await, Packet::Publish(_)));
        assert_eq!(c.flushes(), 3);
        c.send(Packet::Disconnect).await;
        c.session.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_request_whose_client_goes_away_still_completes() {
        let handler = TestHandler::new(true);
        let mut c = TestClient::connect(Arc::clone(&handler)).await;
        c.register(7).await;
        handler.entered.acquire().await.unwrap().forget();
        // The client disconnects while the engine works on its request: the session ends...
        drop(c.io);
        c.session.await.unwrap().unwrap();
        // ...and the request still runs to its end.
        handler.gate.add_permits(1);
        for _ in 0..1000 {
            if handler.finished.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the request was abandoned with its session");
    }

    #[test]
    fn rid_salvage() {
        assert_eq!(salvage_rid("$dps/registrations/PUT/unknown/?$rid=7").as_deref(), Some("7"));
        assert_eq!(salvage_rid("a/b?x=1&$rid=abc-1").as_deref(), Some("abc-1"));
        assert_eq!(salvage_rid("a/b"), None);
        assert_eq!(salvage_rid("a/b?$rid="), None);
        assert_eq!(salvage_rid("a/b?$rid=1&$rid=2"), None);
        assert_eq!(salvage_rid("a/b?$rid=a$b"), None);
        assert_eq!(salvage_rid(&format!("a/b?$rid={}", "9".repeat(129))), None);
    }

    #[test]
    fn tpm_bodies_are_refused() {
        assert!(tpm_refusal(br#"{"registrationId":"d","tpm":{"endorsementKey":"AAAA"}}"#).is_some());
        assert!(tpm_refusal(br#"{"registrationId":"d","tpm":null}"#).is_none());
        assert!(tpm_refusal(br#"{"registrationId":"d","payload":{"note":"tpm"}}"#).is_none());
        assert!(tpm_refusal(br#"{"registrationId":"d","payload":{"tpm":1}}"#).is_none());
        assert!(tpm_refusal(b"").is_none());
        assert!(tpm_refusal(b"\"tpm\" not json").is_none());
    }

    #[test]
    fn connect_protocol_is_read_from_the_variable_header() {
        let mut b = BytesMut::new();
        let mut c = Connect::new("dev");
        c.keep_alive = 30;
        Packet::Connect(c).write(&mut b, usize::MAX).unwrap();
        assert_eq!(connect_protocol(&b, 1000), Some(("MQTT".to_owned(), 4)));
        // MQTT 3.1: "MQIsdp" level 3.
        let v31 = [0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0];
        assert_eq!(connect_protocol(&BytesMut::from(&v31[..]), 1000), Some(("MQIsdp".to_owned(), 3)));
        // Incomplete or not a CONNECT.
        assert_eq!(connect_protocol(&BytesMut::from(&v31[..8]), 1000), None);
        assert_eq!(connect_protocol(&BytesMut::from(&[0xc0u8, 0][..]), 1000), None);
        // A CONNECT too short to hold a protocol name.
        assert_eq!(connect_protocol(&BytesMut::from(&[0x10u8, 1, 0][..]), 1000), None);
        assert_eq!(connect_protocol(&BytesMut::from(&[0x10u8, 3, 0, 9, b'M'][..]), 1000), None);
    }
}
