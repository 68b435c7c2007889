//! MQTT 3.1.1 over TLS with the `rumqttc::mqttbytes::v4` packet codec (the codec only, over our own TLS
//! stream). A device does what the Azure SDKs do: CONNECT (client ID = registration ID, username
//! `{scope}/registrations/{id}/api-version=…`, password = SAS token), wait for CONNACK, SUBSCRIBE
//! `$dps/registrations/res/#` at QoS 1 and wait for SUBACK, then PUBLISH the register and status requests at
//! QoS 1 and read the responses (acknowledging each), one request at a time; finally DISCONNECT.

use crate::device::{drive, Assignment, DriveOptions, Exchange, Progress, RawResponse, Target};
use crate::https::USER_AGENT;
use crate::stats::{Failure, Incident};
use crate::x509::DeviceIdentity;
use bytes::BytesMut;
use dps_client::{ClientAction, ClientRequest, RegistrationClient};
use dps_core::proto::mqtt::{parse_response_topic, RESPONSE_TOPIC_FILTER};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest MQTT packet accepted or sent.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Keep-alive announced in CONNECT, in seconds.
pub const KEEP_ALIVE_SECS: u16 = 60;

/// Whole MQTT packets over a byte stream.
#[derive(Debug)]
pub struct PacketIo<S> {
    stream: S,
    incoming: BytesMut,
    outgoing: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketIo<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> PacketIo<S> {
        PacketIo { stream, incoming: BytesMut::with_capacity(4096), outgoing: BytesMut::with_capacity(1024) }
    }

    /// Reads the next whole packet; `Ok(None)` when the peer closed the connection between packets.
    pub async fn read(&mut self) -> Result<Option<Packet>, Incident> {
        loop {
            match Packet::read(&mut self.incoming, MAX_PACKET_BYTES) {
                Ok(packet) => return Ok(Some(packet)),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => {
                    return Err(Incident::new(Failure::Protocol, format!("malformed MQTT packet: {e}")))
                }
            }
            let n = self
                .stream
                .read_buf(&mut self.incoming)
                .await
                .map_err(|e| Incident::new(Failure::Connection, e.to_string()))?;
            if n == 0 {
                if self.incoming.is_empty() {
                    return Ok(None);
                }
                return Err(Incident::new(Failure::Connection, "connection closed inside an MQTT packet"));
            }
        }
    }

    /// Reads the next packet; a closed connection is an error.
    pub async fn expect(&mut self, waiting_for: &str) -> Result<Packet, Incident> {
        self.read().await?.ok_or_else(|| {
            Incident::new(
                Failure::Connection,
                format!("the server closed the connection before {waiting_for}"),
            )
        })
    }

    /// Queues a packet (sent by [`PacketIo::flush`]).
    pub fn queue(&mut self, packet: &Packet) -> Result<(), Incident> {
        packet
            .write(&mut self.outgoing, MAX_PACKET_BYTES)
            .map(|_| ())
            .map_err(|e| Incident::new(Failure::Protocol, format!("cannot encode an MQTT packet: {e}")))
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> Result<(), Incident> {
        let out = self.outgoing.split();
        let broken = |e: std::io::Error| Incident::new(Failure::Connection, e.to_string());
        self.stream.write_all(&out).await.map_err(broken)?;
        self.stream.flush().await.map_err(broken)
    }

    /// Queues and sends one packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), Incident> {
        self.queue(packet)?;
        self.flush().await
    }

    /// Shuts the stream down (for TLS: close_notify, then FIN).
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// A device's MQTT session.
#[derive(Debug)]
pub(crate) struct MqttSession {
    io: PacketIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    next_pkid: u16,
    next_rid: u32,
}

fn connack_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

fn unexpected(packet: &Packet, waiting_for: &str) -> Incident {
    Incident::new(Failure::Protocol, format!("expected {waiting_for}, got {packet:?}"))
}

impl MqttSession {
    fn pkid(&mut self) -> u16 {
        self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
        self.next_pkid
    }

    /// CONNECT and CONNACK, then SUBSCRIBE and SUBACK.
    async fn open(
        io: PacketIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<MqttSession, Incident> {
        let mut session = MqttSession { io, next_pkid: 0, next_rid: 0 };
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = true;
        connect.set_login(username, password);
        session.io.send(&Packet::Connect(connect)).await?;
        match session.io.expect("CONNACK").await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => {
                let code = connack_code(ack.code);
                return Err(Incident::new(Failure::ConnAckRefused(code), format!("CONNACK {:?}", ack.code)));
            }
            other => return Err(unexpected(&other, "CONNACK")),
        }
        let pkid = session.pkid();
        let mut subscribe = Subscribe::new(RESPONSE_TOPIC_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        session.io.send(&Packet::Subscribe(subscribe)).await?;
        match session.io.expect("SUBACK").await? {
            Packet::SubAck(ack) if ack.pkid == pkid => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    return Err(Incident::new(
                        Failure::Protocol,
                        "the server refused the response subscription",
                    ));
                }
            }
            other => return Err(unexpected(&other, "SUBACK")),
        }
        Ok(session)
    }

    /// DISCONNECT and close.
    async fn close(mut self) {
        let _ = self.io.send(&Packet::Disconnect).await;
        self.io.shutdown().await;
    }
}

impl Exchange for MqttSession {
    async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, Incident> {
        self.next_rid += 1;
        let rid = self.next_rid.to_string();
        let pkid = self.pkid();
        let mut publish = Publish::new(request.mqtt_topic(&rid), QoS::AtLeastOnce, request.body.clone());
        publish.pkid = pkid;
        self.io.send(&Packet::Publish(publish)).await?;
        loop {
            match self.io.expect("the response").await? {
                // Ours, possibly late (a server may answer before it acknowledges).
                Packet::PubAck(ack) if (1..=self.next_pkid).contains(&ack.pkid) => {}
                Packet::PubAck(ack) => {
                    return Err(Incident::new(
                        Failure::Protocol,
                        format!("PUBACK for unknown packet {}", ack.pkid),
                    ))
                }
                Packet::Publish(response) => {
                    if response.qos != QoS::AtMostOnce {
                        self.io.send(&Packet::PubAck(PubAck::new(response.pkid))).await?;
                    }
                    let parsed = parse_response_topic(&response.topic).map_err(|e| {
                        Incident::new(Failure::Protocol, format!("response topic '{}': {e}", response.topic))
                    })?;
                    if parsed.rid != rid {
                        // Not ours (a duplicate of an earlier answer): the SDKs match on $rid and drop it.
                        continue;
                    }
                    return Ok(RawResponse {
                        status: parsed.status,
                        retry_after: parsed.retry_after,
                        body: response.payload.to_vec(),
                    });
                }
                Packet::PingResp => {}
                other => return Err(unexpected(&other, "PUBACK or a response PUBLISH")),
            }
        }
    }
}

/// One device's registration over a fresh MQTT-over-TLS connection.
pub(crate) async fn register(
    target: &Target,
    identity: Option<&DeviceIdentity>,
    client: &mut RegistrationClient,
    options: &DriveOptions,
    progress: &mut Progress,
    start: Instant,
) -> Result<Assignment, Incident> {
    // The SAS token of the first request is the CONNECT password (empty for X.509 devices, which send a
    // username only and authenticate with their TLS client certificate).
    let first = client.start(crate::device::now());
    let ClientAction::Send(request) = &first else {
        return Err(Incident::new(Failure::Protocol, "the client did not start with a request"));
    };
    let registration_id = request.registration_id().clone();
    let username = request.mqtt_username(Some(USER_AGENT));
    let password = request.authorization.clone();

    let tls = crate::https::connect_tls(target, identity).await?;
    progress.handshake = Some(start.elapsed());
    progress.tls = Some(crate::https::tls_parameters(tls.get_ref().1));
    let mut session =
        MqttSession::open(PacketIo::new(tls), registration_id.as_str(), &username, &password).await?;
    let outcome = drive(&mut session, client, first, options, progress).await;
    session.close().await;
    outcome
}
