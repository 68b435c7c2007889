//! The MQTT 3.1.1 transport (the `rumqttc::mqttbytes::v4` packet codec over this crate's TLS stream), as
//! the Azure SDKs speak it: CONNECT (client ID = registration ID, username
//! `{scope}/registrations/{id}/api-version=…`, password = SAS token), SUBSCRIBE `$dps/registrations/res/#`
//! at QoS 1, then PUBLISH each request at QoS 1 and read the response matching its `$rid`.

use crate::machine::ClientRequest;
use crate::{Connector, ProvisionError, RawResponse};
use bytes::BytesMut;
use dps_proto::mqtt::{parse_response_topic, RESPONSE_TOPIC_FILTER};
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The largest MQTT packet accepted or sent.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;

/// Keep-alive announced in CONNECT, in seconds.
pub const KEEP_ALIVE_SECS: u16 = 60;

#[derive(Debug)]
struct Session {
    stream: TlsStream<TcpStream>,
    incoming: BytesMut,
    outgoing: BytesMut,
    next_pkid: u16,
    next_rid: u32,
}

fn protocol(message: impl Into<String>) -> ProvisionError {
    ProvisionError::Transport(message.into())
}

impl Session {
    async fn read(&mut self) -> Result<Packet, ProvisionError> {
        loop {
            match Packet::read(&mut self.incoming, MAX_PACKET_BYTES) {
                Ok(packet) => return Ok(packet),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(protocol(format!("malformed MQTT packet: {e}"))),
            }
            let n = self.stream.read_buf(&mut self.incoming).await.map_err(|e| protocol(e.to_string()))?;
            if n == 0 {
                return Err(protocol("the server closed the MQTT connection"));
            }
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), ProvisionError> {
        self.outgoing.clear();
        packet
            .write(&mut self.outgoing, MAX_PACKET_BYTES)
            .map_err(|e| protocol(format!("cannot encode an MQTT packet: {e}")))?;
        self.stream.write_all(&self.outgoing).await.map_err(|e| protocol(e.to_string()))?;
        self.stream.flush().await.map_err(|e| protocol(e.to_string()))
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
        self.next_pkid
    }
}

/// One device's MQTT session with the service; connects (with the first request's SAS token as password)
/// on the first request and again after a failure.
#[derive(Debug)]
pub struct MqttTransport {
    connector: Connector,
    client_version: Option<String>,
    session: Option<Session>,
}

impl MqttTransport {
    /// A transport that connects on the first request.
    pub fn new(connector: Connector) -> MqttTransport {
        MqttTransport { connector, client_version: Some(crate::USER_AGENT.to_owned()), session: None }
    }

    async fn open(&self, request: &ClientRequest) -> Result<Session, ProvisionError> {
        let stream = self.connector.connect().await?;
        let mut session = Session {
            stream,
            incoming: BytesMut::with_capacity(4096),
            outgoing: BytesMut::new(),
            next_pkid: 0,
            next_rid: 0,
        };
        let mut connect = Connect::new(request.registration_id().as_str());
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = true;
        let username = request.mqtt_username(self.client_version.as_deref());
        // X.509 devices send a username and no password.
        connect.set_login(username, request.authorization.as_str());
        session.send(&Packet::Connect(connect)).await?;
        match session.read().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => {
                let status = match ack.code {
                    ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => 401,
                    ConnectReturnCode::ServiceUnavailable => 503,
                    _ => 400,
                };
                return Err(ProvisionError::Refused { status, reason: format!("CONNACK {:?}", ack.code) });
            }
            other => return Err(protocol(format!("expected CONNACK, got {other:?}"))),
        }
        let pkid = session.pkid();
        let mut subscribe = Subscribe::new(RESPONSE_TOPIC_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        session.send(&Packet::Subscribe(subscribe)).await?;
        match session.read().await? {
            Packet::SubAck(ack) if ack.pkid == pkid => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    return Err(protocol("the server refused the response subscription"));
                }
            }
            other => return Err(protocol(format!("expected SUBACK, got {other:?}"))),
        }
        Ok(session)
    }

    /// Publishes `request` and reads its response.
    pub async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let result = self.try_exchange(request).await;
        if result.is_err() {
            self.session = None;
        }
        result
    }

    async fn try_exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let session = match self.session.as_mut() {
            Some(s) => s,
            None => self.session.insert(self.open(request).await?),
        };
        session.next_rid += 1;
        let rid = session.next_rid.to_string();
        let pkid = session.pkid();
        let mut publish = Publish::new(request.mqtt_topic(&rid), QoS::AtLeastOnce, request.body.clone());
        publish.pkid = pkid;
        session.send(&Packet::Publish(publish)).await?;
        loop {
            match session.read().await? {
                Packet::PubAck(_) | Packet::PingResp => {}
                Packet::Publish(response) => {
                    if response.qos != QoS::AtMostOnce {
                        session.send(&Packet::PubAck(PubAck::new(response.pkid))).await?;
                    }
                    let parsed = parse_response_topic(&response.topic)
                        .map_err(|e| protocol(format!("response topic '{}': {e}", response.topic)))?;
                    if parsed.rid != rid {
                        continue;
                    }
                    return Ok(RawResponse {
                        status: parsed.status,
                        retry_after: parsed.retry_after,
                        body: response.payload.to_vec(),
                    });
                }
                other => return Err(protocol(format!("expected a response PUBLISH, got {other:?}"))),
            }
        }
    }

    /// Sends DISCONNECT and closes the connection, if one is open.
    pub async fn close(&mut self) {
        if let Some(mut session) = self.session.take() {
            let _ = session.send(&Packet::Disconnect).await;
            let _ = session.stream.shutdown().await;
        }
    }
}
