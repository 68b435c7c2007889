//! Shared test fixtures: a real engine behind a `DeviceHandler`, an MQTT test client speaking through
//! `tokio::io::duplex` (raw or WebSocket), and SDK-style credentials.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]
// Tests run the engine in real time (SAS expiry is checked against the clock).
#![allow(clippy::disallowed_methods)]

use bytes::BytesMut;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::mqtt::{parse_response_topic, MqttResponse};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{IdScope, Timestamp};
use dps_core::{AccessPolicy, DeviceRequest, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_host::Host;
use dps_mqtt::{
    is_websocket_upgrade, serve_connection, serve_websocket, websocket_upgrade_response, DeviceHandler,
    MqttError, MqttLimits,
};
use dps_store::MemoryStore;
use futures_util::{SinkExt, StreamExt};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const SCOPE: &str = "0ne0000ABCD";
pub const HOST: &str = "mydps.example.net";
pub const HUB: &str = "hub-1.example.net";
pub const OWNER: &str = "provisioningserviceowner";

/// The limits of tests about session mechanics (packets, timing, ordering): everything as the default,
/// except that the CONNECT is not authenticated, so a test can connect any username. Tests of
/// authentication, and of whole SDK flows, use [`MqttLimits::default`].
pub fn session_limits() -> MqttLimits {
    MqttLimits { authenticate_at_connect: false, ..MqttLimits::default() }
}

pub fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap())
}

/// The real engine, as a `dps_host::Host` on an in-memory store and in-memory hubs, with a seeded RNG.
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
        let host = Host::builder(config)
            .store(Arc::new(MemoryStore::new()))
            .hubs(hubs.clone())
            .rng(Box::new(ChaCha8Rng::seed_from_u64(42)))
            .build()
            .unwrap();
        Arc::new(EngineHandler { host, hubs })
    }

    fn service(&self, method: &str, path: &str, body: Value) -> Reply {
        let t = now();
        let token = build_token(&key(100), HOST, t.unix_seconds() + 600, Some(OWNER));
        let request = HttpRequest {
            method: method.into(),
            path_and_query: format!("{path}?api-version=2021-10-01"),
            authorization: Some(token),
            body: serde_json::to_vec(&body).unwrap(),
            ..HttpRequest::default()
        };
        // The in-memory store answers at once, so a plain executor can run the host's future.
        futures::executor::block_on(self.host.http(request))
    }

    /// Creates an individual symmetric-key enrollment.
    pub fn enroll(&self, id: &str, primary: &SymmetricKey) {
        let body = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary.to_base64(), "secondaryKey": key(99).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollments/{id}"), body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    /// Creates a symmetric-key enrollment group.
    pub fn enroll_group(&self, id: &str, primary: &SymmetricKey) {
        let body = json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": primary.to_base64(), "secondaryKey": key(98).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollmentGroups/{id}"), body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

impl DeviceHandler for EngineHandler {
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        self.host.device(request)
    }
}

/// The engine behind a gate: requests whose body contains `hold` (all requests when `hold` is empty) wait
/// for a permit; `entered` counts requests that reached the handler.
pub struct GatedHandler {
    pub inner: Arc<EngineHandler>,
    pub gate: Semaphore,
    pub entered: AtomicUsize,
    pub entered_signal: Semaphore,
    hold: &'static [u8],
}

impl GatedHandler {
    pub fn new(inner: Arc<EngineHandler>, hold: &'static [u8]) -> Arc<GatedHandler> {
        Arc::new(GatedHandler {
            inner,
            gate: Semaphore::new(0),
            entered: AtomicUsize::new(0),
            entered_signal: Semaphore::new(0),
            hold,
        })
    }

    /// Waits until `n` more requests have reached the handler.
    pub async fn wait_entered(&self, n: u32) {
        self.entered_signal.acquire_many(n).await.unwrap().forget();
    }
}

impl DeviceHandler for GatedHandler {
    async fn handle(&self, request: DeviceRequest) -> Reply {
        self.entered.fetch_add(1, Ordering::SeqCst);
        self.entered_signal.add_permits(1);
        let held = self.hold.is_empty() || request.body.windows(self.hold.len()).any(|w| w == self.hold);
        if held {
            self.gate.acquire().await.unwrap().forget();
        }
        self.inner.handle(request).await
    }
}

/// A handler that panics: the session must survive it.
pub struct PanickingHandler;

impl DeviceHandler for PanickingHandler {
    async fn handle(&self, _request: DeviceRequest) -> Reply {
        panic!("handler bug")
    }
}

/// A device token as the Python SDK makes it: URL-encoded `sr`, no `skn`.
pub fn py_token(id: &str, k: &SymmetricKey) -> String {
    build_token(k, &encode_resource(&device_resource(SCOPE, id)), now().unix_seconds() + 3600, None)
}

/// A device token as the C and C# SDKs make it: URL-encoded `sr`, `skn=registration`.
pub fn sdk_token(id: &str, k: &SymmetricKey) -> String {
    build_token(
        k,
        &encode_resource(&device_resource(SCOPE, id)),
        now().unix_seconds() + 3600,
        Some("registration"),
    )
}

pub fn py_username(id: &str) -> String {
    format!(
        "{SCOPE}/registrations/{id}/api-version=2019-03-31&ClientVersion=py-azure-iot-device%2F2.13.0%28Python%203.11%3BLinux%29"
    )
}

pub fn c_username(id: &str) -> String {
    format!("{SCOPE}/registrations/{id}/api-version=2021-06-01&ClientVersion=1.15.0")
}

pub fn cs_username(id: &str) -> String {
    format!(
        "{SCOPE}/registrations/{id}/api-version=2019-03-31&ClientVersion=Microsoft.Azure.Devices.Provisioning.Client%2F1.19.0%20%28.NET%206.0%3B%20Linux%3B%20X64%29"
    )
}

/// How the test client moves bytes: raw stream or WebSocket binary messages.
pub trait ClientIo: Send {
    fn send_bytes(&mut self, bytes: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Appends received bytes; 0 when the server closed.
    fn recv_bytes(&mut self, buf: &mut BytesMut) -> impl Future<Output = std::io::Result<usize>> + Send;
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

impl ClientIo for DuplexStream {
    async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes).await
    }
    async fn recv_bytes(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        buf.reserve(4096);
        self.read_buf(buf).await
    }
    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }
}

impl ClientIo for WebSocketStream<DuplexStream> {
    async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.send(Message::Binary(bytes.to_vec().into())).await.map_err(std::io::Error::other)
    }
    async fn recv_bytes(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        loop {
            match self.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(b))) => {
                    buf.extend_from_slice(&b);
                    return Ok(b.len());
                }
                Some(Ok(Message::Text(_))) => panic!("the server sent a text frame"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
    }
    async fn finish(&mut self) {
        let _ = self.close(None).await;
    }
}

/// Generous bound on one receive, so a broken test fails instead of hanging (never a timing assertion).
const RECV_GUARD: Duration = Duration::from_secs(60);

/// An MQTT 3.1.1 test client.
pub struct Client<IO> {
    pub io: IO,
    buf: BytesMut,
}

impl<IO: ClientIo> Client<IO> {
    pub fn new(io: IO) -> Self {
        Client { io, buf: BytesMut::new() }
    }

    pub fn encode(packet: Packet) -> Vec<u8> {
        let mut b = BytesMut::new();
        packet.write(&mut b, usize::MAX).unwrap();
        b.to_vec()
    }

    pub async fn send(&mut self, packet: Packet) {
        self.io.send_bytes(&Self::encode(packet)).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.send_bytes(bytes).await.unwrap();
    }

    /// Sends, ignoring errors (the server may already have closed).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.send_bytes(bytes).await
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        loop {
            if !self.buf.is_empty() {
                match Packet::read(&mut self.buf, usize::MAX >> 4) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the server sent a malformed packet: {e}"),
                }
            }
            let n = tokio::time::timeout(RECV_GUARD, self.io.recv_bytes(&mut self.buf))
                .await
                .expect("the server neither answered nor closed");
            match n {
                Ok(0) | Err(_) => {
                    assert!(self.buf.is_empty(), "the server closed inside a packet");
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    pub async fn expect(&mut self) -> Packet {
        self.recv().await.expect("the server closed the connection")
    }

    /// Asserts that the server closes the connection without sending anything more.
    pub async fn expect_closed(&mut self) {
        if let Some(p) = self.recv().await {
            panic!("expected the connection to close, got {p:?}");
        }
    }

    pub async fn connect(
        &mut self,
        client_id: &str,
        username: &str,
        password: Option<&str>,
        keep_alive: u16,
    ) {
        let mut c = Connect::new(client_id);
        c.keep_alive = keep_alive;
        c.login = Some(Login::new(username, password.unwrap_or("")));
        self.send(Packet::Connect(c)).await;
    }

    /// CONNECT and expect an accepting CONNACK with sessionPresent = 0.
    pub async fn connect_ok(&mut self, client_id: &str, username: &str, password: Option<&str>) {
        self.connect(client_id, username, password, 60).await;
        match self.expect().await {
            Packet::ConnAck(ack) => {
                assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
                assert!(!ack.session_present);
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn subscribe_responses(&mut self) {
        let s = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new("$dps/registrations/res/#".into(), QoS::AtLeastOnce)],
        };
        self.send(Packet::Subscribe(s)).await;
        match self.expect().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, 1);
                assert_eq!(
                    ack.return_codes,
                    vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                );
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// PUBLISH a request; for QoS 1 expect its PUBACK.
    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        if qos != QoS::AtMostOnce {
            p.pkid = pkid;
        }
        self.send(Packet::Publish(p)).await;
        if qos == QoS::AtLeastOnce {
            match self.expect().await {
                Packet::PubAck(ack) => assert_eq!(ack.pkid, pkid),
                other => panic!("expected PUBACK {pkid}, got {other:?}"),
            }
        }
    }

    /// The next packet must be a QoS 1 response PUBLISH; it is acknowledged, parsed and returned.
    pub async fn expect_response(&mut self) -> (MqttResponse, Value) {
        match self.expect().await {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtLeastOnce, "responses are QoS 1");
                assert!(p.pkid != 0);
                assert_eq!(
                    p.topic.matches('$').count(),
                    2,
                    "no other '$' than in $dps and $rid: {}",
                    p.topic
                );
                self.send(Packet::PubAck(PubAck::new(p.pkid))).await;
                let response = parse_response_topic(&p.topic).unwrap();
                let body: Value = serde_json::from_slice(&p.payload).unwrap();
                (response, body)
            }
            other => panic!("expected a response PUBLISH, got {other:?}"),
        }
    }
}

/// Starts `serve_connection` on one end of a duplex pair.
pub fn spawn_server<H: DeviceHandler>(
    handler: Arc<H>,
    limits: MqttLimits,
) -> (Client<DuplexStream>, JoinHandle<Result<(), MqttError>>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move { serve_connection(server, handler, &limits).await });
    (Client::new(client), task)
}

/// Reads an HTTP request head byte by byte (so nothing after it is consumed).
async fn read_head(io: &mut DuplexStream) -> Vec<u8> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(io.read_u8().await.unwrap());
        assert!(head.len() < 16 * 1024);
    }
    head
}

/// A WebSocket server as the reference server would run it: read the upgrade request, answer it with
/// `websocket_upgrade_response`, then `serve_websocket` on the same stream. The client is tokio-tungstenite.
pub async fn spawn_ws_server<H: DeviceHandler>(
    handler: Arc<H>,
    limits: MqttLimits,
    path: &str,
    offer_protocol: bool,
) -> (Client<WebSocketStream<DuplexStream>>, JoinHandle<Result<(), MqttError>>) {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let head = read_head(&mut server).await;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        assert!(request.parse(&head).unwrap().is_complete());
        assert_eq!(request.method, Some("GET"));
        let mut map = http::HeaderMap::new();
        for h in request.headers.iter() {
            map.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        assert!(is_websocket_upgrade(&map));
        let response = websocket_upgrade_response(&map)?;
        let mut text = String::from("HTTP/1.1 101 Switching Protocols\r\n");
        for (name, value) in response.headers() {
            text.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        text.push_str("\r\n");
        server.write_all(text.as_bytes()).await?;
        serve_websocket(server, handler, &limits).await
    });
    let mut request = format!("ws://127.0.0.1:443{path}").into_client_request().unwrap();
    if offer_protocol {
        request.headers_mut().insert("Sec-WebSocket-Protocol", http::HeaderValue::from_static("mqtt"));
    }
    let (ws, response) = tokio_tungstenite::client_async(request, client).await.unwrap();
    if offer_protocol {
        assert_eq!(response.headers()["sec-websocket-protocol"], "mqtt");
    }
    (Client::new(ws), task)
}

/// Joins a server task: it must not have panicked.
pub async fn outcome(task: JoinHandle<Result<(), MqttError>>) -> Result<(), MqttError> {
    task.await.expect("the session task panicked")
}

pub fn error_code(body: &Value) -> u64 {
    body["errorCode"].as_u64().unwrap_or_else(|| panic!("no errorCode in {body}"))
}
