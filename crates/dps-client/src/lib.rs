//! Device-side client for the Azure IoT Hub Device Provisioning Service (and this project's server).
//!
//! Two layers:
//! - [`machine`]: the transport-free registration state machine ([`RegistrationClient`]): register,
//!   honour Retry-After, poll, retry 429/5xx and transport failures, and report the assignment or a
//!   [`ClientError`] keeping the service's `errorCode`. Custom SDKs with their own I/O drive it directly.
//! - [`provision`]: the whole registration over async HTTPS ([`https`], hyper), MQTT 3.1.1 ([`mqtt`]) or,
//!   with the `amqp` feature, AMQP 1.0 (`amqp`, on `fe2o3-amqp`), on tokio and rustls (aws-lc-rs provider,
//!   passed explicitly).
//!
//! ```no_run
//! # async fn run() -> Result<(), dps_client::ProvisionError> {
//! use dps_client::{provision, Auth, ProvisionOptions, Transport};
//! let roots = dps_client::tls::certificates(&std::fs::read("dps-data/tls/ca.pem").unwrap_or_default())?;
//! let key = dps_client::proto::sas::SymmetricKey::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
//!     .map_err(|e| dps_client::ProvisionError::Config(e.to_string()))?;
//! let result = provision(ProvisionOptions {
//!     endpoint: "localhost:8883".into(),
//!     id_scope: "0ne00000001".into(),
//!     registration_id: "my-device".into(),
//!     auth: Auth::SymmetricKey(key),
//!     transport: Transport::Mqtt,
//!     roots,
//!     ..ProvisionOptions::default()
//! })
//! .await?;
//! println!("{} on {}", result.device_id, result.assigned_hub);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod https;
pub mod machine;
pub mod mqtt;
pub mod tls;

pub use dps_proto as proto;
pub use machine::{
    ClientAction, ClientConfig, ClientError, ClientEvent, ClientRequest, RegistrationClient, RequestKind,
};
pub use tls::ClientIdentity;

use dps_proto::model::{DeviceRegistrationResult, RegistrationSubstatus};
use dps_proto::sas::SymmetricKey;
use dps_proto::{ApiVersion, IdScope, RegistrationId, Timestamp};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The `User-Agent` / MQTT `ClientVersion` this crate sends.
pub const USER_AGENT: &str = concat!("dps-client/", env!("CARGO_PKG_VERSION"));

/// How the device authenticates.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// An individual enrollment's symmetric key (or an already derived group device key).
    SymmetricKey(SymmetricKey),
    /// An enrollment group's key: the device key is derived from it and the registration ID.
    GroupKey(SymmetricKey),
    /// X.509: the TLS client certificate ([`ProvisionOptions::client_identity`]) authenticates; no SAS.
    #[default]
    X509,
}

/// Which device API to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// HTTPS (port 443 on Azure).
    #[default]
    Https,
    /// MQTT 3.1.1 over TLS (port 8883 on Azure).
    Mqtt,
    /// AMQP 1.0 over TLS (port 5671 on Azure). Needs the `amqp` feature; without it [`provision`] answers
    /// [`ProvisionError::Config`].
    Amqp,
}

/// Everything [`provision`] needs.
#[derive(Debug, Clone, Default)]
pub struct ProvisionOptions {
    /// `host:port` of the service (`global.azure-devices-provisioning.net:443`, `localhost:8883`, …).
    pub endpoint: String,
    /// The TLS server name; default: the host part of `endpoint`.
    pub server_name: Option<String>,
    /// The instance's ID scope.
    pub id_scope: String,
    /// This device's registration ID.
    pub registration_id: String,
    /// How the device authenticates.
    pub auth: Auth,
    /// HTTPS or MQTT.
    pub transport: Transport,
    /// Trust roots for the server certificate (see [`tls::certificates`] for PEM/DER input).
    pub roots: Vec<CertificateDer<'static>>,
    /// An optional TLS client certificate and key.
    pub client_identity: Option<ClientIdentity>,
    /// Custom payload sent with the registration.
    pub payload: Option<Value>,
    /// api-version (default 2021-10-01).
    pub api_version: Option<ApiVersion>,
    /// Give up after this many requests (default 60).
    pub max_requests: Option<u32>,
    /// A certificate signing request (base64 DER PKCS#10, CN = the registration ID) to have the service
    /// issue a device certificate ([`Provisioned::issued_certificate_chain`]). Without an explicit
    /// `api_version`, 2025-07-01-preview is sent (the first that carries a CSR).
    pub csr: Option<String>,
}

/// A successful registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioned {
    /// The IoT hub the device is assigned to.
    pub assigned_hub: String,
    /// The device ID on that hub.
    pub device_id: String,
    /// Why this assignment (initial, same hub, migrated, reset).
    pub substatus: Option<RegistrationSubstatus>,
    /// The full registration state the service returned.
    pub registration: DeviceRegistrationResult,
}

impl Provisioned {
    /// The certificate chain issued for the device's CSR, DER, leaf first (empty without a CSR).
    pub fn issued_certificate_chain(&self) -> Vec<Vec<u8>> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.registration
            .issued_certificate_chain
            .iter()
            .flatten()
            .filter_map(|c| b64.decode(c.as_bytes()).ok())
            .collect()
    }
}

/// Why a provisioning failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    /// The options are unusable (bad ID scope, registration ID, certificate…).
    #[error("invalid options: {0}")]
    Config(String),
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection failed (kept only when it is the last word; the client retries these).
    #[error("transport: {0}")]
    Transport(String),
    /// The server refused the MQTT connection (CONNACK), with the matching HTTP status.
    #[error("connection refused ({status}): {reason}")]
    Refused {
        /// 401 for bad credentials, 503 for unavailable, else 400.
        status: u16,
        /// The CONNACK code.
        reason: String,
    },
    /// The service refused the registration; carries its `errorCode`.
    #[error(transparent)]
    Registration(#[from] ClientError),
}

impl ProvisionError {
    /// The service's six-digit error code, when the service sent one.
    pub fn error_code(&self) -> Option<u32> {
        match self {
            ProvisionError::Registration(e) if e.code != 0 => Some(e.code),
            _ => None,
        }
    }
}

/// One answer of the service, whichever the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// HTTP status (or the MQTT response topic's status).
    pub status: u16,
    /// Retry-After, if sent.
    pub retry_after: Option<u32>,
    /// The body.
    pub body: Vec<u8>,
}

/// Opens TLS connections to one endpoint.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
}

impl Connector {
    /// A connector to `endpoint` (`host:port`) verifying the certificate for `server_name` with `tls`.
    pub fn new(
        endpoint: impl Into<String>,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Connector, ProvisionError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| ProvisionError::Config(format!("server name '{server_name}': {e}")))?;
        Ok(Connector { endpoint: endpoint.into(), server_name, tls })
    }

    /// A connector from an already parsed server name.
    pub fn from_parts(
        endpoint: impl Into<String>,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Connector {
        Connector { endpoint: endpoint.into(), server_name, tls }
    }

    /// The TLS server name (also the HTTP `Host`).
    pub fn server_name(&self) -> String {
        match &self.server_name {
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => other.to_str().into_owned(),
        }
    }

    /// A fresh TCP + TLS connection.
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, ProvisionError> {
        let tcp = TcpStream::connect(&self.endpoint)
            .await
            .map_err(|e| ProvisionError::Transport(format!("{}: {e}", self.endpoint)))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => ProvisionError::Tls(e.to_string()),
                _ => ProvisionError::Transport(format!("TLS handshake: {e}")),
            })
    }
}

/// One exchange, reported to the `on_exchange` callback of [`provision_with`].
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `PUT …/register`, `GET …/operations/…`, or the MQTT topic.
    pub request: String,
    /// The answer, or the transport error.
    pub outcome: Result<RawResponse, ProvisionError>,
}

/// The current time as the state machine's [`Timestamp`] (the transports read the clock; the
/// [`machine`] never does).
#[allow(clippy::disallowed_methods)]
pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

enum Link {
    Https(https::HttpsTransport),
    Mqtt(Box<mqtt::MqttTransport>),
    #[cfg(feature = "amqp")]
    Amqp(Box<amqp::AmqpTransport>),
}

/// Provisions the device described by `options`.
pub async fn provision(options: ProvisionOptions) -> Result<Provisioned, ProvisionError> {
    let id_scope = IdScope::parse(&options.id_scope).map_err(|e| ProvisionError::Config(e.to_string()))?;
    let registration_id =
        RegistrationId::parse(&options.registration_id).map_err(|e| ProvisionError::Config(e.to_string()))?;
    let mut config = match &options.auth {
        Auth::SymmetricKey(k) => ClientConfig::new(id_scope, registration_id, k.clone()),
        Auth::GroupKey(g) => {
            let key = g.derive_device_key(registration_id.as_str());
            ClientConfig::new(id_scope, registration_id, key)
        }
        Auth::X509 => {
            if options.client_identity.is_none() {
                return Err(ProvisionError::Config("X.509 authentication needs a client_identity".into()));
            }
            ClientConfig::x509(id_scope, registration_id)
        }
    };
    config.payload = options.payload.clone();
    if options.csr.is_some() {
        config.csr = options.csr.clone();
        config.api_version = ApiVersion::V2025_07_01Preview;
    }
    if let Some(v) = &options.api_version {
        config.api_version = v.clone();
    }
    if let Some(n) = options.max_requests {
        config.max_requests = n;
    }
    let host = match options.endpoint.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => options.endpoint.as_str(),
    };
    let server_name = options.server_name.as_deref().unwrap_or(host);
    let alpn: &[&[u8]] = match options.transport {
        Transport::Https => &[b"http/1.1"],
        Transport::Mqtt | Transport::Amqp => &[],
    };
    let tls = tls::client_config(&options.roots, options.client_identity.as_ref(), alpn)?;
    let connector = Connector::new(options.endpoint.clone(), server_name, tls)?;
    provision_with(config, connector, options.transport, |_| {}).await
}

/// Provisions with an explicit state-machine configuration and connector; `on_exchange` sees every
/// request and its answer (for progress output).
pub async fn provision_with(
    config: ClientConfig,
    connector: Connector,
    transport: Transport,
    mut on_exchange: impl FnMut(&Exchange),
) -> Result<Provisioned, ProvisionError> {
    let mut link = match transport {
        Transport::Https => Link::Https(https::HttpsTransport::new(connector)),
        Transport::Mqtt => Link::Mqtt(Box::new(mqtt::MqttTransport::new(connector))),
        #[cfg(feature = "amqp")]
        Transport::Amqp => Link::Amqp(Box::new(amqp::AmqpTransport::new(connector))),
        #[cfg(not(feature = "amqp"))]
        Transport::Amqp => {
            return Err(ProvisionError::Config("dps-client was built without the `amqp` feature".into()))
        }
    };
    let mut client = RegistrationClient::new(config);
    let mut action = client.start(now());
    let outcome = loop {
        action = match action {
            ClientAction::Send(request) => {
                let (line, outcome) = match &mut link {
                    Link::Https(t) => (
                        format!("{} {}", request.http_method(), request.http_path_and_query()),
                        t.exchange(&request).await,
                    ),
                    Link::Mqtt(t) => (request.mqtt_topic("…"), t.exchange(&request).await),
                    #[cfg(feature = "amqp")]
                    Link::Amqp(t) => (
                        format!("AMQP {} {:?}", amqp::link_address(&request), request.kind),
                        t.exchange(&request).await,
                    ),
                };
                let exchange = Exchange { request: line, outcome };
                on_exchange(&exchange);
                match exchange.outcome {
                    Ok(r) => client.handle(
                        now(),
                        ClientEvent::Response { status: r.status, retry_after: r.retry_after, body: r.body },
                    ),
                    Err(ProvisionError::Transport(_)) | Err(ProvisionError::Refused { status: 503, .. }) => {
                        client.handle(now(), ClientEvent::TransportFailed)
                    }
                    Err(e) => break Err(e),
                }
            }
            ClientAction::Wait { until } => {
                let nanos = until.unix_nanos().saturating_sub(now().unix_nanos()).max(0);
                tokio::time::sleep(Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))).await;
                client.handle(now(), ClientEvent::TimerFired)
            }
            ClientAction::Assigned(state) => {
                let state = *state;
                break Ok(Provisioned {
                    assigned_hub: state.assigned_hub.clone().unwrap_or_default(),
                    device_id: state.device_id.clone().unwrap_or_default(),
                    substatus: state.substatus,
                    registration: state,
                });
            }
            ClientAction::Failed(e) => break Err(ProvisionError::Registration(e)),
        };
    };
    match &mut link {
        Link::Mqtt(t) => t.close().await,
        #[cfg(feature = "amqp")]
        Link::Amqp(t) => t.close().await,
        Link::Https(_) => {}
    }
    outcome
}
