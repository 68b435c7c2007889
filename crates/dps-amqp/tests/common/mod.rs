#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]
#![allow(clippy::disallowed_methods)]
//! A real engine behind the AMQP sessions, and a device speaking AMQP with `fe2o3-amqp`'s client.

use dps_amqp::fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use dps_amqp::fe2o3_amqp::sasl_profile::SaslProfile;
use dps_amqp::fe2o3_amqp::session::SessionHandle;
use dps_amqp::fe2o3_amqp::types::definitions::Error as AmqpErrorFrame;
use dps_amqp::fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use dps_amqp::fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use dps_amqp::fe2o3_amqp::{Connection, Receiver, Sender, Session};
use dps_amqp::{serve_connection_with_peer, AmqpError, AmqpLimits, DeviceHandler};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{IdScope, Timestamp};
use dps_core::{AccessPolicy, DeviceRequest, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_host::Host;
use dps_store::MemoryStore;
use serde_json::{json, Value as Json};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

pub const SCOPE: &str = "0ne0000ABCD";
pub const HOST: &str = "mydps.example.net";
pub const HUB: &str = "hub-1.example.net";
pub const OWNER: &str = "provisioningserviceowner";

pub fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap())
}

/// A device SAS token as the SDKs make it (URL-encoded `sr`, `skn=registration`).
pub fn token(id: &str, k: &SymmetricKey) -> String {
    build_token(
        k,
        &encode_resource(&device_resource(SCOPE, id)),
        now().unix_seconds() + 3600,
        Some("registration"),
    )
}

pub fn address(id: &str) -> String {
    format!("{SCOPE}/registrations/{id}")
}

pub struct EngineHandler {
    pub host: Host,
    pub hubs: Arc<MemoryHubDirectory>,
}

impl EngineHandler {
    pub fn new() -> Arc<EngineHandler> {
        let config = EngineConfig::new(
            IdScope::parse(SCOPE).unwrap(),
            HOST,
            vec![LinkedHub::new(HUB, None, None).unwrap()],
        )
        .with_policy(AccessPolicy {
            key_name: OWNER.into(),
            primary_key: key(100),
            secondary_key: key(101),
            rights: Rights::ALL,
        });
        let hubs = Arc::new(MemoryHubDirectory::new());
        let host =
            Host::builder(config).store(Arc::new(MemoryStore::new())).hubs(hubs.clone()).build().unwrap();
        Arc::new(EngineHandler { host, hubs })
    }

    async fn service(&self, method: &str, path: &str, body: Json) -> Reply {
        let token = build_token(&key(100), HOST, now().unix_seconds() + 600, Some(OWNER));
        let request = HttpRequest {
            method: method.into(),
            path_and_query: format!("{path}?api-version=2021-10-01"),
            authorization: Some(token),
            body: serde_json::to_vec(&body).unwrap(),
            ..HttpRequest::default()
        };
        self.host.http(request).await
    }

    pub async fn enroll(&self, id: &str, primary: &SymmetricKey) {
        let body = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary.to_base64(), "secondaryKey": key(99).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollments/{id}"), body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    pub async fn enroll_group(&self, id: &str, primary: &SymmetricKey) {
        let body = json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary.to_base64(), "secondaryKey": key(98).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollmentGroups/{id}"), body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

impl DeviceHandler for EngineHandler {
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        self.host.device(request)
    }
}

/// Serves one connection on a duplex stream; returns the client's end and the session task.
pub fn spawn_server<H: DeviceHandler>(
    handler: Arc<H>,
    limits: AmqpLimits,
    certificates: Option<Vec<Vec<u8>>>,
) -> (DuplexStream, JoinHandle<Result<(), AmqpError>>) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let task =
        tokio::spawn(async move { serve_connection_with_peer(server, handler, &limits, certificates).await });
    (client, task)
}

/// Opens an AMQP connection as a device SDK does (SASL PLAIN with the SAS, or no SASL).
pub async fn open(io: DuplexStream, sasl: Option<SaslProfile>) -> Result<ConnectionHandle<()>, OpenError> {
    let builder = Connection::builder().container_id("device").hostname(HOST).max_frame_size(65536);
    match sasl {
        Some(profile) => builder.sasl_profile(profile).open_with_stream(io).await,
        None => builder.open_with_stream(io).await,
    }
}

pub fn plain(id: &str, token: &str) -> SaslProfile {
    SaslProfile::Plain { username: address(id), password: token.to_owned() }
}

/// A device's two links on one session, as the SDKs attach them.
pub struct Device {
    pub connection: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
    pub sender: Sender,
    pub receiver: Receiver,
}

impl Device {
    pub async fn attach(mut connection: ConnectionHandle<()>, address: &str) -> Device {
        let mut session = Session::begin(&mut connection).await.unwrap();
        let sender = Sender::attach(&mut session, "sender_link", address).await.unwrap();
        let receiver = Receiver::attach(&mut session, "recv_link", address).await.unwrap();
        Device { connection, session, sender, receiver }
    }

    /// Sends a request; returns the rejection's error, or the response (after accepting it).
    pub async fn request(
        &mut self,
        operation: &str,
        operation_id: Option<&str>,
        body: Option<&[u8]>,
        correlation: Option<&str>,
    ) -> Result<Message<Body<Value>>, Option<AmqpErrorFrame>> {
        let mut props = ApplicationProperties::builder()
            .insert("iotdps-operation-type", SimpleValue::String(operation.into()));
        if let Some(id) = operation_id {
            props = props.insert("iotdps-operation-id", SimpleValue::String(id.into()));
        }
        let message = Message::builder()
            .properties(Properties {
                correlation_id: correlation.map(|c| MessageId::String(c.into())),
                ..Properties::default()
            })
            .application_properties(props.build())
            .data(Data(Binary::from(body.unwrap_or_default().to_vec())))
            .build();
        match tokio::time::timeout(Duration::from_secs(30), self.sender.send(message))
            .await
            .expect("no outcome")
        {
            Ok(Outcome::Accepted(_)) => {}
            Ok(Outcome::Rejected(r)) => return Err(r.error),
            other => panic!("unexpected outcome {other:?}"),
        }
        let delivery = tokio::time::timeout(Duration::from_secs(30), self.receiver.recv::<Body<Value>>())
            .await
            .expect("no response")
            .unwrap();
        self.receiver.accept(&delivery).await.unwrap();
        Ok(delivery.into_message())
    }

    pub async fn close(mut self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

/// The JSON of a response's data section.
pub fn json_body(m: &Message<Body<Value>>) -> Json {
    match &m.body {
        Body::Data(sections) => {
            let bytes: Vec<u8> = sections.iter().flat_map(|d| d.0.to_vec()).collect();
            serde_json::from_slice(&bytes).unwrap()
        }
        other => panic!("the response body is not a data section: {other:?}"),
    }
}

pub fn app_int(m: &Message<Body<Value>>, name: &str) -> Option<i64> {
    match m.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::Int(i) => Some(i64::from(*i)),
        SimpleValue::Long(i) => Some(*i),
        SimpleValue::Uint(i) => Some(i64::from(*i)),
        other => panic!("{name} is {other:?}"),
    }
}

/// The JSON error body carried as a rejection's description.
pub fn error_body(e: &Option<AmqpErrorFrame>) -> Json {
    let e = e.as_ref().expect("a rejection without error");
    serde_json::from_str(e.description.as_deref().expect("no description")).unwrap()
}
