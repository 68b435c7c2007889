//! Azure IoT Hub as a hub: its registry and twin REST API (`api-version=2021-04-12`), authenticated with a
//! service SAS token signed with the hub's connection string (`HostName=…;SharedAccessKeyName=…;
//! SharedAccessKey=…`, a policy with *RegistryWrite* and *ServiceConnect*, e.g. `iothubowner`).
//!
//! - `UpsertDevice`: `GET /devices/{id}`; then `PUT /devices/{id}` with the device identity
//!   (`deviceId`, `status`, `authentication` = `sas` with `symmetricKey {primaryKey, secondaryKey}`,
//!   `selfSigned` with `x509Thumbprint {primaryThumbprint, secondaryThumbprint}`, or
//!   `certificateAuthority`; `capabilities.iotEdge`), without `If-Match` to create, with the identity's
//!   `etag` to update (a `412` — someone changed it meanwhile — is retried once from the `GET`); then the
//!   twin's `tags` and `properties.desired`: `PATCH /twins/{id}` for a new device, `PUT /twins/{id}` to
//!   replace the twin of an existing one. If the twin step fails, the identity step is undone (a created
//!   device is deleted, an updated one is put back), so no half-written identity stays behind.
//! - `ReadTwin`: `GET /twins/{id}` (`404`: no device); `$`-prefixed metadata is dropped.
//! - `DeleteDevice`: `DELETE /devices/{id}` with `If-Match: *` (`404` is success: absent is not an error).
//!
//! `429` and `503` are retried after their `Retry-After` (seconds, capped), up to
//! [`IotHubConfig::max_attempts`] attempts; any other status or a body that is not the documented JSON is
//! a [`HubError`]. HTTP/1.1 over rustls on aws-lc-rs (provider passed explicitly), every request bounded
//! by [`IotHubConfig::timeout`], idle keep-alive connections pooled up to
//! [`IotHubConfig::max_idle_connections`].

use crate::{hub_error, Secret};
use bytes::Bytes;
use dps_core::hub::{
    AsyncHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubError, HubOp, HubResult,
};
use dps_core::proto::sas::ConnectionString;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The REST api-version sent with every request.
pub const API_VERSION: &str = "2021-04-12";
/// Lifetime of the SAS tokens signed per request, seconds.
pub const TOKEN_TTL_SECS: u64 = 3600;
/// The largest answer read (IoT Hub's documents are a few KB).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Where Debian keeps the system's trusted roots (the default `ca_file`).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Path segments are percent-encoded except RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// How to reach one IoT hub.
#[derive(Debug, Clone, PartialEq)]
pub struct IotHubConfig {
    /// The hub's connection string (its `HostName` is the REST endpoint and the SAS audience).
    pub connection_string: Secret,
    /// Connect to this `host:port` instead of `HostName:443` (a private endpoint, a proxy, a test server);
    /// the TLS certificate is still checked for `HostName`.
    pub endpoint: Option<String>,
    /// PEM file of the CA certificates trusted for the hub's TLS certificate (default [`SYSTEM_ROOTS`]).
    pub ca_file: Option<std::path::PathBuf>,
    /// Bound on one request (connect, TLS, answer).
    pub timeout: Duration,
    /// Attempts per request when the hub answers 429 or 503 (at least 1).
    pub max_attempts: u32,
    /// The longest `Retry-After` honoured; longer ones are waited this long.
    pub max_retry_after: Duration,
    /// Idle keep-alive connections kept.
    pub max_idle_connections: usize,
}

impl IotHubConfig {
    /// A configuration with defaults: 10 s per request, 3 attempts, `Retry-After` capped at 5 s, 8 idle
    /// connections, the system's roots.
    pub fn new(connection_string: Secret) -> IotHubConfig {
        IotHubConfig {
            connection_string,
            endpoint: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
            max_attempts: 3,
            max_retry_after: Duration::from_secs(5),
            max_idle_connections: 8,
        }
    }
}

/// An Azure IoT hub, through its REST API.
pub struct IotHubDirectory {
    hub: String,
    policy: ConnectionString,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    config: IotHubConfig,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for IotHubDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHubDirectory")
            .field("hub", &self.hub)
            .field("host_name", &self.policy.host_name)
            .field("policy", &self.policy.key_name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Reads PEM certificates as a root store.
pub fn root_store(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(roots)
}

impl IotHubDirectory {
    /// An adapter for the linked hub `hub`. Fails (with a message that never contains the key) when the
    /// connection string or the CA file is not usable.
    pub fn new(hub: impl Into<String>, config: IotHubConfig) -> Result<IotHubDirectory, String> {
        let hub = hub.into().to_ascii_lowercase();
        let policy = ConnectionString::parse(config.connection_string.expose()).map_err(|e| {
            if e.message.starts_with("the connection string has no") {
                format!("IoT hub '{hub}': {}", e.message)
            } else {
                format!(
                    "IoT hub '{hub}': the connection string is not HostName=…;SharedAccessKeyName=…;\
                     SharedAccessKey=<base64>"
                )
            }
        })?;
        let server_name = ServerName::try_from(policy.host_name.clone())
            .map_err(|e| format!("IoT hub '{hub}': HostName '{}': {e}", policy.host_name))?;
        let roots = root_store(config.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_ROOTS)))
            .map_err(|e| format!("IoT hub '{hub}': trusted CAs: {e}"))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("IoT hub '{hub}': TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let address = config.endpoint.clone().unwrap_or_else(|| format!("{}:443", policy.host_name));
        Ok(IotHubDirectory {
            hub,
            policy,
            address,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            config,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn err(&self, message: impl Into<String>) -> HubError {
        hub_error(&self.hub, message)
    }

    fn token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.policy.token(i64::try_from(now.saturating_add(TOKEN_TTL_SECS)).unwrap_or(i64::MAX))
    }

    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, HubError> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match pooled {
                Some(mut c) if !c.is_closed() => {
                    if c.ready().await.is_ok() {
                        return Ok(c);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| self.err(format!("cannot connect to {}: {e}", self.address)))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.err(format!("TLS with {}: {e}", self.policy.host_name)))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.err(format!("HTTP with {}: {e}", self.policy.host_name)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn give_back(&self, conn: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !conn.is_closed() && idle.len() < self.config.max_idle_connections {
            idle.push(conn);
        }
    }

    /// One request, answered (status, Retry-After seconds, body).
    async fn once(
        &self,
        method: &Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Option<u64>, Bytes), HubError> {
        let mut conn = self.connection().await?;
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("{path}?api-version={API_VERSION}"))
            .header("host", &self.policy.host_name)
            .header("authorization", self.token())
            .header("accept", "application/json")
            .header("user-agent", concat!("dps-rs/", env!("CARGO_PKG_VERSION")));
        if let Some(m) = if_match {
            builder = builder.header("if-match", m);
        }
        let payload = match body {
            Some(b) => {
                builder = builder.header("content-type", "application/json; charset=utf-8");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder.body(Full::new(payload)).map_err(|e| self.err(format!("request: {e}")))?;
        let response =
            conn.send_request(request).await.map_err(|e| self.err(format!("{method} {path}: {e}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| self.err(format!("{method} {path}: reading the answer: {e}")))?
            .to_bytes();
        self.give_back(conn);
        Ok((status, retry_after, body))
    }

    /// A request with retries on 429 and 503, each attempt bounded by the timeout.
    async fn send(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), HubError> {
        let attempts = self.config.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let answer =
                tokio::time::timeout(self.config.timeout, self.once(&method, path, if_match, body)).await;
            let (status, retry_after, bytes) = match answer {
                Ok(r) => r?,
                Err(_) => {
                    return Err(self.err(format!(
                        "{method} {path}: no answer within {} ms",
                        self.config.timeout.as_millis()
                    )))
                }
            };
            let busy = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
            if !busy || attempt >= attempts {
                return Ok((status, bytes));
            }
            let wait = Duration::from_secs(retry_after.unwrap_or(1)).min(self.config.max_retry_after);
            tracing::debug!(hub = %self.hub, %method, path, status = status.as_u16(), attempt,
                wait_ms = wait.as_millis() as u64, "IoT hub busy; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn unexpected(&self, what: &str, status: StatusCode, body: &[u8]) -> HubError {
        let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
        self.err(format!("{what}: the hub answered {status}: {text}"))
    }

    fn json(&self, what: &str, body: &[u8]) -> Result<Map<String, Value>, HubError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) | Err(_) => {
                let text: String = String::from_utf8_lossy(body).chars().take(120).collect();
                Err(self.err(format!("{what}: the hub answered a body that is not a JSON object: {text}")))
            }
        }
    }

    async fn upsert(
        &self,
        identity: &DeviceIdentity,
        twin: &DeviceTwin,
        replace_twin: bool,
    ) -> Result<HubResult, HubError> {
        let id = &identity.device_id;
        let path = format!("/devices/{}", utf8_percent_encode(id, SEGMENT));
        let mut tries = 0;
        let previous = loop {
            tries += 1;
            let (status, body) = self.send(Method::GET, &path, None, None).await?;
            let existing = match status {
                StatusCode::OK => Some(self.json("reading the device", &body)?),
                StatusCode::NOT_FOUND => None,
                s => return Err(self.unexpected("reading the device", s, &body)),
            };
            let iot_edge = match (&existing, replace_twin) {
                (Some(e), false) => e
                    .get("capabilities")
                    .and_then(|c| c.get("iotEdge"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                _ => twin.iot_edge,
            };
            let mut doc = json!({
                "deviceId": id,
                "status": "enabled",
                "authentication": authentication_json(&identity.authentication),
                "capabilities": {"iotEdge": iot_edge},
            });
            let etag =
                existing.as_ref().and_then(|e| e.get("etag")).and_then(Value::as_str).map(str::to_owned);
            let if_match = match (&existing, &etag) {
                (None, _) => None,
                (Some(_), Some(etag)) => {
                    doc["etag"] = Value::String(etag.clone());
                    Some(format!("\"{}\"", etag.trim_matches('"')))
                }
                (Some(_), None) => Some("*".to_owned()),
            };
            let (status, body) = self.send(Method::PUT, &path, if_match.as_deref(), Some(&doc)).await?;
            match status {
                StatusCode::OK | StatusCode::CREATED => {
                    self.json("writing the device", &body)?;
                    break existing;
                }
                // Changed (or created) meanwhile by someone else: read it again, once.
                StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT if tries < 2 => continue,
                s => return Err(self.unexpected("writing the device", s, &body)),
            }
        };
        if previous.is_none() || replace_twin {
            if let Err(e) = self.write_twin(id, twin, previous.is_some()).await {
                self.undo(&path, previous).await;
                return Err(e);
            }
        }
        Ok(HubResult::Done)
    }

    /// Sets the twin's tags and desired properties (PATCH on a new device, PUT to replace).
    async fn write_twin(&self, id: &str, twin: &DeviceTwin, replace: bool) -> Result<(), HubError> {
        let object = |v: &Value| if v.is_object() { v.clone() } else { json!({}) };
        let tags = object(&twin.tags);
        let desired = object(&twin.desired);
        let empty = |v: &Value| v.as_object().is_some_and(Map::is_empty);
        if !replace && empty(&tags) && empty(&desired) {
            return Ok(());
        }
        let path = format!("/twins/{}", utf8_percent_encode(id, SEGMENT));
        let doc = json!({"tags": tags, "properties": {"desired": desired}});
        let method = if replace { Method::PUT } else { Method::PATCH };
        let (status, body) = self.send(method, &path, Some("*"), Some(&doc)).await?;
        if status != StatusCode::OK {
            return Err(self.unexpected("writing the twin", status, &body));
        }
        self.json("writing the twin", &body)?;
        Ok(())
    }

    /// Undoes an identity write whose twin could not be written: deletes a created device, puts an updated
    /// one back. Best effort (the hub failing again is logged): the registration fails either way.
    async fn undo(&self, path: &str, previous: Option<Map<String, Value>>) {
        let outcome = match previous {
            None => self.send(Method::DELETE, path, Some("*"), None).await,
            Some(mut before) => {
                before.remove("etag");
                self.send(Method::PUT, path, Some("*"), Some(&Value::Object(before))).await
            }
        };
        match outcome {
            Ok((s, _)) if s.is_success() || s == StatusCode::NOT_FOUND => {}
            Ok((s, _)) => {
                tracing::warn!(hub = %self.hub, path, status = s.as_u16(), "undoing a device write")
            }
            Err(e) => tracing::warn!(hub = %self.hub, path, error = %e, "undoing a device write"),
        }
    }

    async fn read_twin(&self, id: &str) -> Result<HubResult, HubError> {
        let path = format!("/twins/{}", utf8_percent_encode(id, SEGMENT));
        let (status, body) = self.send(Method::GET, &path, None, None).await?;
        match status {
            StatusCode::OK => {
                let doc = self.json("reading the twin", &body)?;
                Ok(HubResult::Twin(Some(twin_from_json(&doc))))
            }
            StatusCode::NOT_FOUND => Ok(HubResult::Twin(None)),
            s => Err(self.unexpected("reading the twin", s, &body)),
        }
    }

    async fn delete(&self, id: &str) -> Result<HubResult, HubError> {
        let path = format!("/devices/{}", utf8_percent_encode(id, SEGMENT));
        let (status, body) = self.send(Method::DELETE, &path, Some("*"), None).await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(HubResult::Done),
            s => Err(self.unexpected("deleting the device", s, &body)),
        }
    }
}

/// The `authentication` of an IoT Hub device identity.
pub fn authentication_json(auth: &HubAuthentication) -> Value {
    match auth {
        HubAuthentication::Sas { primary_key, secondary_key } => json!({
            "type": "sas",
            "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key},
        }),
        HubAuthentication::SelfSigned { primary_thumbprint, secondary_thumbprint } => json!({
            "type": "selfSigned",
            "x509Thumbprint": {
                "primaryThumbprint": primary_thumbprint,
                "secondaryThumbprint": secondary_thumbprint.clone().unwrap_or_else(|| primary_thumbprint.clone()),
            },
        }),
        HubAuthentication::CertificateAuthority => json!({"type": "certificateAuthority"}),
    }
}

/// The DPS-managed parts of an IoT Hub twin document (metadata such as `$version` dropped).
pub fn twin_from_json(doc: &Map<String, Value>) -> DeviceTwin {
    fn clean(v: Option<&Value>) -> Value {
        match v {
            Some(Value::Object(m)) => Value::Object(
                m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), v.clone())).collect(),
            ),
            _ => json!({}),
        }
    }
    DeviceTwin {
        tags: clean(doc.get("tags")),
        desired: clean(doc.get("properties").and_then(|p| p.get("desired"))),
        iot_edge: doc
            .get("capabilities")
            .and_then(|c| c.get("iotEdge"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

impl AsyncHubDirectory for IotHubDirectory {
    async fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        match op {
            HubOp::UpsertDevice { identity, twin, replace_twin, .. } => {
                self.upsert(&identity, &twin, replace_twin).await
            }
            HubOp::ReadTwin { device_id, .. } => self.read_twin(&device_id).await,
            HubOp::DeleteDevice { device_id, .. } => self.delete(&device_id).await,
            other => Err(self.err(format!("unsupported hub operation {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_twin_shapes() {
        let a = authentication_json(&HubAuthentication::Sas {
            primary_key: "p".into(),
            secondary_key: "s".into(),
        });
        assert_eq!(a, json!({"type": "sas", "symmetricKey": {"primaryKey": "p", "secondaryKey": "s"}}));
        let a = authentication_json(&HubAuthentication::SelfSigned {
            primary_thumbprint: "AB".into(),
            secondary_thumbprint: None,
        });
        assert_eq!(a["x509Thumbprint"], json!({"primaryThumbprint": "AB", "secondaryThumbprint": "AB"}));
        assert_eq!(
            authentication_json(&HubAuthentication::CertificateAuthority)["type"],
            "certificateAuthority"
        );
        let doc = json!({"deviceId": "d", "tags": {"a": 1}, "capabilities": {"iotEdge": true},
            "properties": {"desired": {"x": 1, "$version": 3, "$metadata": {}}, "reported": {"y": 2}}});
        let t = twin_from_json(doc.as_object().unwrap());
        assert_eq!((t.tags, t.desired, t.iot_edge), (json!({"a": 1}), json!({"x": 1}), true));
    }

    #[test]
    fn bad_connection_strings_never_echo_the_key() {
        let err = IotHubDirectory::new("h", IotHubConfig::new(Secret::new("HostName=h;c2VjcmV0c2VjcmV0")))
            .unwrap_err();
        assert!(!err.contains("c2VjcmV0c2VjcmV0"), "{err}");
        let err = IotHubDirectory::new(
            "h",
            IotHubConfig::new(Secret::new("HostName=h;SharedAccessKeyName=k;SharedAccessKey=!!notbase64!!")),
        )
        .unwrap_err();
        assert!(!err.contains("notbase64"), "{err}");
    }
}
