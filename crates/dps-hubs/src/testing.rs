//! Test support (feature `testing`): a real Mosquitto broker with the dynamic-security plugin on a free
//! loopback port, and a device-side MQTT client to connect to it as a provisioned device would.
//!
//! The broker comes from the Debian packages `mosquitto` and `mosquitto-clients` (`scripts/mosquitto.sh`
//! installs them); [`Broker::start`] fails with a message saying so when they are missing.

use crate::mosquitto::{MosquittoConfig, DEFAULT_TIMEOUT};
use crate::Secret;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The admin account of a test broker.
pub const ADMIN_USER: &str = "dps-admin";

/// A running Mosquitto, killed when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// The admin password.
    pub admin_password: String,
    dir: PathBuf,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The dynamic-security plugin's shared object, where Debian installs it.
pub fn plugin_path() -> Option<PathBuf> {
    find(&[
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ])
}

/// A free loopback port (bound and released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Broker {
    /// Starts a broker in `dir` (its config, the dynamic-security JSON and its log live there) with an
    /// admin account made by `mosquitto_ctrl dynsec init`.
    pub fn start(dir: &Path) -> Result<Broker, String> {
        let missing = "Mosquitto is not installed: run scripts/mosquitto.sh (apt-get install mosquitto \
                       mosquitto-clients)";
        let mosquitto = find(&["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"])
            .ok_or(missing)?;
        let ctrl = find(&["/usr/bin/mosquitto_ctrl", "/usr/local/bin/mosquitto_ctrl"]).ok_or(missing)?;
        let plugin = plugin_path().ok_or(missing)?;
        let admin_password =
            format!("admin-{}-{}", std::process::id(), free_port().map_err(|e| e.to_string())?);
        let dynsec = dir.join("dynsec.json");
        let status = Command::new(ctrl)
            .arg("dynsec")
            .arg("init")
            .arg(&dynsec)
            .arg(ADMIN_USER)
            .arg(&admin_password)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("mosquitto_ctrl: {e}"))?;
        if !status.success() {
            return Err(format!("mosquitto_ctrl dynsec init failed: {status}"));
        }
        let port = free_port().map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nuser root\nallow_anonymous false\npersistence false\n\
                 listener {port} 127.0.0.1\nplugin {}\nplugin_opt_config_file {}\n\
                 log_dest file {}\nlog_type all\n",
                plugin.display(),
                dynsec.display(),
                dir.join("mosquitto.log").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting mosquitto: {e}"))?;
        let mut broker = Broker { child, port, admin_password, dir: dir.to_owned() };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(broker);
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                return Err(format!("mosquitto exited: {status}; log: {}", broker.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("mosquitto did not listen on {port}; log: {}", broker.log()))
    }

    /// The adapter configuration for this broker's admin account.
    pub fn admin_config(&self) -> MosquittoConfig {
        MosquittoConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            admin_username: ADMIN_USER.into(),
            admin_password: Secret::new(self.admin_password.clone()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device (or watcher) connected to a broker.
pub struct Device {
    /// The client.
    pub client: AsyncClient,
    events: EventLoop,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").finish_non_exhaustive()
    }
}

/// How a connection ended before it was usable.
pub type Refusal = ConnectionError;

impl Device {
    /// Connects with `username` / `password`; the broker's refusal is the error.
    pub async fn connect(
        port: u16,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Device, Refusal> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(username, password).set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 16);
        loop {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => return Ok(Device { client, events }),
                _ => continue,
            }
        }
    }

    /// Subscribes and returns whether the broker granted it.
    pub async fn subscribe(&mut self, filter: &str) -> Result<bool, ConnectionError> {
        let _ = self.client.subscribe(filter, QoS::AtLeastOnce).await;
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) = self.events.poll().await? {
                return Ok(!ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)));
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK (the broker acknowledges a publish it drops by ACL too).
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), ConnectionError> {
        let _ = self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await;
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = self.events.poll().await? {
                return Ok(());
            }
        }
    }

    /// The next message received within `wait` (None: nothing came).
    pub async fn next_message(
        &mut self,
        wait: Duration,
    ) -> Result<Option<(String, Vec<u8>)>, ConnectionError> {
        let next = async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = self.events.poll().await? {
                    return Ok::<_, ConnectionError>((p.topic, p.payload.to_vec()));
                }
            }
        };
        match tokio::time::timeout(wait, next).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Polls until the broker closes the connection (or `wait` passes): whether it closed.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let closed = async {
            loop {
                if self.events.poll().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(wait, closed).await.is_ok()
    }
}

/// A request the fake IoT hub received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// The `If-Match` header.
    pub if_match: Option<String>,
    /// The JSON body, if any.
    pub body: Option<serde_json::Value>,
    /// What it was answered.
    pub status: u16,
}

/// A misbehaviour of the fake hub, consumed by the next request whose method and path start match.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `429` with this `Retry-After` (seconds).
    Busy(u64),
    /// This status with an IoT Hub error body.
    Status(u16),
    /// `200` with a body that is not JSON.
    Garbage,
}

/// The fake hub's registry and twins, and what it saw.
#[derive(Debug, Default)]
pub struct HubState {
    /// Device identities by ID, as IoT Hub answers them.
    pub devices: std::collections::BTreeMap<String, serde_json::Value>,
    /// Twins by device ID.
    pub twins: std::collections::BTreeMap<String, serde_json::Value>,
    /// Every request, in order.
    pub requests: Vec<Recorded>,
    /// Requests that broke the documented API (the test asserts none).
    pub violations: Vec<String>,
    faults: Vec<(String, String, Fault)>,
    etags: u64,
}

/// A local HTTPS server speaking the IoT Hub registry and twin REST API (`api-version=2021-04-12`): it
/// checks every request's method, path, api-version, `Host`, SAS token (signature, audience, policy name,
/// expiry) and body shape against the documented API, keeps a registry, and misbehaves on demand.
#[derive(Debug)]
pub struct FakeIotHub {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its host name (the connection string's `HostName`, its certificate's name).
    pub host_name: String,
    /// PEM of the test CA that issued its certificate.
    pub ca_file: PathBuf,
    /// A connection string for the policy it accepts.
    pub connection_string: String,
    state: std::sync::Arc<std::sync::Mutex<HubState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIotHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test CA and a server certificate it signed for `names`: (CA PEM, chain, key).
pub fn test_tls(
    names: &[&str],
) -> Result<
    (String, Vec<rustls_pki_types::CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>),
    String,
> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.distinguished_name.push(DnType::CommonName, "dps-hubs test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().map_err(e)?;
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).map_err(e)?;
    let cert = params.signed_by(&key, &issuer).map_err(e)?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    Ok((ca.pem(), vec![cert.der().clone()], key))
}

impl FakeIotHub {
    /// Starts the fake hub `host_name` on a free loopback port, its CA written in `dir`.
    pub async fn start(dir: &Path, host_name: &str) -> Result<FakeIotHub, String> {
        use base64::Engine as _;
        let (ca_pem, chain, key) = test_tls(&[host_name])?;
        let ca_file = dir.join("iothub-ca.pem");
        std::fs::write(&ca_file, ca_pem).map_err(|e| e.to_string())?;
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let policy_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let connection_string =
            format!("HostName={host_name};SharedAccessKeyName=iothubowner;SharedAccessKey={policy_key}");
        let state = std::sync::Arc::new(std::sync::Mutex::new(HubState::default()));
        let shared = Handler {
            host_name: host_name.to_owned(),
            key: dps_core::proto::sas::SymmetricKey::from_bytes(vec![7u8; 32]),
            state: state.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let handler = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, std::convert::Infallible>(handler.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(FakeIotHub { addr, host_name: host_name.to_owned(), ca_file, connection_string, state, task })
    }

    /// The adapter configuration reaching this hub.
    pub fn config(&self) -> crate::iothub::IotHubConfig {
        let mut c = crate::iothub::IotHubConfig::new(Secret::new(self.connection_string.clone()));
        c.endpoint = Some(self.addr.to_string());
        c.ca_file = Some(self.ca_file.clone());
        c.timeout = Duration::from_secs(5);
        c
    }

    /// The hub's state.
    pub fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next request with `method` whose path starts with `path` misbehave.
    pub fn fault(&self, method: &str, path: &str, fault: Fault) {
        self.state().faults.push((method.to_owned(), path.to_owned(), fault));
    }
}

#[derive(Clone)]
struct Handler {
    host_name: String,
    key: dps_core::proto::sas::SymmetricKey,
    state: std::sync::Arc<std::sync::Mutex<HubState>>,
}

type FakeResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

fn answer(status: u16, body: &serde_json::Value) -> FakeResponse {
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn hub_error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"Message": format!("ErrorCode:{code};{message}"), "ExceptionMessage": ""})
}

/// Checks an `authentication` object of a device identity; the problem, if any.
fn authentication_problem(auth: Option<&serde_json::Value>) -> Option<String> {
    let Some(auth) = auth.and_then(serde_json::Value::as_object) else {
        return Some("authentication is missing".into());
    };
    let text =
        |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_str).is_some_and(|s| !s.is_empty());
    match auth.get("type").and_then(serde_json::Value::as_str) {
        Some("sas") => {
            let keys = auth.get("symmetricKey");
            (!(text(keys.and_then(|k| k.get("primaryKey")))
                && text(keys.and_then(|k| k.get("secondaryKey")))))
            .then(|| "sas needs symmetricKey.primaryKey and secondaryKey".into())
        }
        Some("selfSigned") => {
            let t = auth.get("x509Thumbprint");
            (!text(t.and_then(|t| t.get("primaryThumbprint"))))
                .then(|| "selfSigned needs x509Thumbprint.primaryThumbprint".into())
        }
        Some("certificateAuthority") => None,
        other => Some(format!("unknown authentication type {other:?}")),
    }
}

impl Handler {
    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> FakeResponse {
        use http_body_util::BodyExt;
        use serde_json::{json, Value};
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (host, auth, if_match) = (header("host"), header("authorization"), header("if-match"));
        let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() { None } else { serde_json::from_slice(&bytes).ok() };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let violation = |state: &mut HubState, m: String| {
            state.violations.push(format!("{method} {path}: {m}"));
        };
        let (status, response) = 'answer: {
            if query != format!("api-version={}", crate::iothub::API_VERSION) {
                violation(&mut state, format!("query '{query}'"));
                break 'answer (400, hub_error_body("InvalidProtocolVersion", "bad api-version"));
            }
            if host.as_deref() != Some(self.host_name.as_str()) {
                violation(&mut state, format!("Host {host:?}"));
            }
            let now = dps_core::proto::Timestamp::from_unix_seconds(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            );
            let verified = auth.as_deref().map(dps_core::proto::sas::SasToken::parse).map(|t| {
                t.and_then(|t| {
                    if t.key_name() != Some("iothubowner") {
                        return Err(dps_core::DpsError::new(dps_core::ErrorCode::Unauthorized));
                    }
                    t.verify(now, &self.host_name, &[&self.key]).map(|_| ())
                })
            });
            if !matches!(verified, Some(Ok(()))) {
                break 'answer (401, hub_error_body("IotHubUnauthorizedAccess", "Unauthorized"));
            }
            if let Some(i) =
                state.faults.iter().position(|(m, p, _)| *m == method && path.starts_with(p.as_str()))
            {
                let (_, _, fault) = state.faults.remove(i);
                match fault {
                    Fault::Busy(secs) => {
                        state.requests.push(Recorded {
                            method: method.clone(),
                            path: path.clone(),
                            if_match: if_match.clone(),
                            body: body.clone(),
                            status: 429,
                        });
                        let mut r = answer(429, &hub_error_body("ThrottlingException", "throttled"));
                        r.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(secs));
                        return r;
                    }
                    Fault::Status(s) => break 'answer (s, hub_error_body("Injected", "injected failure")),
                    Fault::Garbage => {
                        state.requests.push(Recorded {
                            method: method.clone(),
                            path: path.clone(),
                            if_match: if_match.clone(),
                            body: body.clone(),
                            status: 200,
                        });
                        let mut r = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"<html>gateway</html>"),
                        ));
                        *r.status_mut() = hyper::StatusCode::OK;
                        return r;
                    }
                }
            }
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let (kind, id) = match path.split('/').collect::<Vec<_>>().as_slice() {
                ["", "devices", id] => ("devices", decode(id)),
                ["", "twins", id] => ("twins", decode(id)),
                _ => {
                    violation(&mut state, "unknown path".into());
                    break 'answer (404, hub_error_body("NotFound", "no such route"));
                }
            };
            let etag_ok = |current: &str, given: &Option<String>| match given.as_deref() {
                Some("*") => true,
                Some(g) => g.trim_matches('"') == current,
                None => false,
            };
            match (method.as_str(), kind) {
                ("GET", "devices") => match state.devices.get(&id) {
                    Some(d) => (200, d.clone()),
                    None => (404, hub_error_body("DeviceNotFound", "device not found")),
                },
                ("PUT", "devices") => {
                    let Some(doc) = body.clone().filter(Value::is_object) else {
                        violation(&mut state, "body is not a JSON object".into());
                        break 'answer (400, hub_error_body("ArgumentInvalid", "body"));
                    };
                    if doc.get("deviceId").and_then(Value::as_str) != Some(id.as_str()) {
                        violation(&mut state, "deviceId does not match the path".into());
                        break 'answer (400, hub_error_body("ArgumentInvalid", "deviceId"));
                    }
                    if let Some(p) = authentication_problem(doc.get("authentication")) {
                        violation(&mut state, p);
                        break 'answer (400, hub_error_body("ArgumentInvalid", "authentication"));
                    }
                    let edge = doc.pointer("/capabilities/iotEdge");
                    if edge.is_some_and(|e| !e.is_boolean()) {
                        violation(&mut state, "capabilities.iotEdge is not a boolean".into());
                    }
                    let existing_etag =
                        state.devices.get(&id).and_then(|d| d["etag"].as_str().map(str::to_owned));
                    match (&existing_etag, &if_match) {
                        (None, None) => {}
                        (None, Some(_)) => {
                            break 'answer (412, hub_error_body("PreconditionFailed", "no device"))
                        }
                        (Some(_), None) => {
                            break 'answer (409, hub_error_body("DeviceAlreadyExists", "exists"))
                        }
                        (Some(current), given) if !etag_ok(current, given) => {
                            break 'answer (412, hub_error_body("PreconditionFailed", "etag"))
                        }
                        _ => {}
                    }
                    state.etags += 1;
                    let mut stored = doc.clone();
                    stored["etag"] = json!(format!("ETAG{}", state.etags));
                    stored["connectionState"] = json!("Disconnected");
                    if existing_etag.is_none() {
                        state.twins.insert(
                            id.clone(),
                            json!({"tags": {}, "properties": {"desired": {"$version": 1}, "reported": {}}}),
                        );
                    }
                    if let Some(t) = state.twins.get_mut(&id) {
                        t["capabilities"] =
                            json!({"iotEdge": edge.and_then(Value::as_bool).unwrap_or(false)});
                    }
                    state.devices.insert(id.clone(), stored.clone());
                    (200, stored)
                }
                ("DELETE", "devices") => {
                    let Some(current) =
                        state.devices.get(&id).and_then(|d| d["etag"].as_str().map(str::to_owned))
                    else {
                        break 'answer (404, hub_error_body("DeviceNotFound", "device not found"));
                    };
                    if if_match.is_none() {
                        violation(&mut state, "DELETE without If-Match".into());
                        break 'answer (400, hub_error_body("ArgumentInvalid", "If-Match"));
                    }
                    if !etag_ok(&current, &if_match) {
                        break 'answer (412, hub_error_body("PreconditionFailed", "etag"));
                    }
                    state.devices.remove(&id);
                    state.twins.remove(&id);
                    (204, json!(null))
                }
                ("GET", "twins") => match state.twins.get(&id) {
                    Some(t) => {
                        let mut t = t.clone();
                        t["deviceId"] = json!(id);
                        (200, t)
                    }
                    None => (404, hub_error_body("DeviceNotFound", "device not found")),
                },
                ("PATCH" | "PUT", "twins") => {
                    let Some(doc) = body.clone().filter(Value::is_object) else {
                        violation(&mut state, "body is not a JSON object".into());
                        break 'answer (400, hub_error_body("ArgumentInvalid", "body"));
                    };
                    let allowed =
                        doc.as_object().is_some_and(|o| o.keys().all(|k| k == "tags" || k == "properties"))
                            && doc.get("properties").is_none_or(|p| {
                                p.as_object().is_some_and(|o| o.keys().all(|k| k == "desired"))
                            });
                    if !allowed {
                        violation(
                            &mut state,
                            format!("twin body may set only tags and properties.desired: {doc}"),
                        );
                        break 'answer (400, hub_error_body("ArgumentInvalid", "twin"));
                    }
                    let Some(twin) = state.twins.get_mut(&id) else {
                        break 'answer (404, hub_error_body("DeviceNotFound", "device not found"));
                    };
                    let replace = method == "PUT";
                    if let Some(tags) = doc.get("tags").and_then(Value::as_object) {
                        if replace {
                            twin["tags"] = json!({});
                        }
                        for (k, v) in tags {
                            twin["tags"][k] = v.clone();
                        }
                    }
                    if let Some(desired) = doc.pointer("/properties/desired").and_then(Value::as_object) {
                        let version =
                            twin.pointer("/properties/desired/$version").and_then(Value::as_u64).unwrap_or(1);
                        if replace {
                            twin["properties"]["desired"] = json!({});
                        }
                        for (k, v) in desired {
                            twin["properties"]["desired"][k] = v.clone();
                        }
                        twin["properties"]["desired"]["$version"] = json!(version + 1);
                    }
                    (200, twin.clone())
                }
                _ => {
                    violation(&mut state, "method not in the API".into());
                    (405, hub_error_body("MethodNotAllowed", "method"))
                }
            }
        };
        state.requests.push(Recorded { method, path, if_match, body, status });
        if status == 204 {
            let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
            *r.status_mut() = hyper::StatusCode::NO_CONTENT;
            return r;
        }
        answer(status, &response)
    }
}
