//! Simulated devices: their identities (registration IDs and group-derived keys), the server they talk to,
//! and the driver that runs one device's registration over a transport with
//! [`dps_client::RegistrationClient`].

use crate::stats::{Failure, Incident};
use crate::x509::{DeviceCa, DeviceIdentity};
use crate::Error;
use dps_client::{
    ClientAction, ClientConfig, ClientError, ClientEvent, ClientRequest, RegistrationClient, RequestKind,
};
use dps_core::proto::model::RegistrationStatus;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::{ApiVersion, ErrorBody, IdScope, RegistrationId, Timestamp};
use rustls::ClientConfig as TlsClientConfig;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The device transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// HTTPS (`PUT …/register`, `GET …/operations/{id}`), one keep-alive connection per device.
    Https,
    /// MQTT 3.1.1 over TLS (CONNECT, SUBSCRIBE, PUBLISH register and status requests at QoS 1).
    Mqtt,
    /// X.509 devices over HTTPS: each presents its own leaf certificate (CN = registration ID, signed by the
    /// load generator's root) on a fresh mutual-TLS connection and sends no SAS token.
    X509,
    /// X.509 devices over MQTT (client certificate, username only, no password).
    X509Mqtt,
    /// AMQP 1.0 over TLS (SASL PLAIN with the SAS token, a sender and a receiver link, one message per
    /// request).
    Amqp,
    /// Symmetric-key devices over HTTPS in a custom-allocation group: the server calls a local webhook
    /// (kept alive) for every registration. Compared with `https` (hashed) in the same run.
    Custom,
}

impl Protocol {
    /// `https`, `mqtt`, `x509`, `x509-mqtt`, `amqp` or `custom`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Https => "https",
            Protocol::Mqtt => "mqtt",
            Protocol::X509 => "x509",
            Protocol::X509Mqtt => "x509-mqtt",
            Protocol::Amqp => "amqp",
            Protocol::Custom => "custom",
        }
    }

    /// The wire transport: [`Protocol::Https`], [`Protocol::Mqtt`] or [`Protocol::Amqp`].
    pub fn transport(self) -> Protocol {
        match self {
            Protocol::Https | Protocol::X509 | Protocol::Custom => Protocol::Https,
            Protocol::Mqtt | Protocol::X509Mqtt => Protocol::Mqtt,
            Protocol::Amqp => Protocol::Amqp,
        }
    }

    /// Whether the devices attest with X.509 client certificates (else with group-derived SAS tokens).
    pub fn is_x509(self) -> bool {
        matches!(self, Protocol::X509 | Protocol::X509Mqtt)
    }
}

/// The wall clock as the engine's [`Timestamp`] (SAS tokens are signed with it).
pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

/// Where the devices connect, and how they verify the server.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address for this protocol.
    pub addr: SocketAddr,
    /// The name the server certificate is verified against (an IP SAN or a DNS name).
    pub server_name: ServerName<'static>,
    /// The client TLS configuration (trusting the server's CA; no session resumption).
    pub tls: Arc<TlsClientConfig>,
    /// The HTTP `Host` header value.
    pub host_header: String,
}

impl Target {
    /// The client TLS configuration of one connection: [`Target::tls`], presenting `identity` as the client
    /// certificate if given (a shallow copy of the configuration per X.509 device; its trust roots and
    /// provider are shared).
    pub fn tls_for(&self, identity: Option<&DeviceIdentity>) -> Arc<TlsClientConfig> {
        match identity {
            None => self.tls.clone(),
            Some(identity) => {
                let mut config = (*self.tls).clone();
                config.client_auth_cert_resolver = identity.resolver();
                Arc::new(config)
            }
        }
    }
}

/// A population of devices of one enrollment group: device `i` has the registration ID `{prefix}-{i:06}`
/// and, in a symmetric-key group, the key `HMAC-SHA256(groupKey, registrationId)`; in an X.509 group
/// ([`DeviceSet::x509`]), its own leaf certificate and no key.
#[derive(Debug, Clone)]
pub struct DeviceSet {
    id_scope: IdScope,
    group_key: SymmetricKey,
    prefix: String,
    api_version: ApiVersion,
    x509: Option<Arc<X509Devices>>,
}

/// The certificates of an X.509 device set.
#[derive(Debug)]
pub struct X509Devices {
    /// The root every leaf chains to, PEM.
    pub root_pem: String,
    /// Device `i`'s identity at index `i`.
    pub identities: Vec<DeviceIdentity>,
    /// How long generating the leaves took.
    pub generation: Duration,
}

impl DeviceSet {
    /// A device set; fails if the scope or the prefix cannot make valid identifiers.
    pub fn new(id_scope: &str, group_key: SymmetricKey, prefix: &str) -> Result<DeviceSet, Error> {
        let id_scope = IdScope::parse(id_scope).map_err(|e| Error::Config(format!("--id-scope: {e}")))?;
        RegistrationId::parse(&format!("{prefix}-000000"))
            .map_err(|e| Error::Config(format!("--prefix '{prefix}' makes invalid registration IDs: {e}")))?;
        Ok(DeviceSet {
            id_scope,
            group_key,
            prefix: prefix.to_owned(),
            api_version: ApiVersion::V2021_10_01,
            x509: None,
        })
    }

    /// An X.509 device set of `count` devices: generates every device's leaf (CN = its registration ID)
    /// signed by `root`, now, so that the timed runs only present them.
    pub fn x509(id_scope: &str, prefix: &str, root: &DeviceCa, count: usize) -> Result<DeviceSet, Error> {
        let mut set = DeviceSet::new(id_scope, SymmetricKey::from_bytes(Vec::new()), prefix)?;
        let (identities, generation) = root.leaves((0..count).map(|i| set.registration_id(i)))?;
        set.x509 = Some(Arc::new(X509Devices { root_pem: root.pem().to_owned(), identities, generation }));
        Ok(set)
    }

    /// The certificates, for an X.509 device set.
    pub fn x509_devices(&self) -> Option<&X509Devices> {
        self.x509.as_deref()
    }

    /// Device `i`'s TLS client identity (X.509 sets only; `None` past the generated devices).
    pub fn identity(&self, i: usize) -> Option<&DeviceIdentity> {
        self.x509.as_ref().and_then(|x| x.identities.get(i))
    }

    /// The ID scope.
    pub fn id_scope(&self) -> &IdScope {
        &self.id_scope
    }

    /// The api-version the devices send.
    pub fn api_version(&self) -> &ApiVersion {
        &self.api_version
    }

    /// Device `i`'s registration ID.
    pub fn registration_id(&self, i: usize) -> String {
        format!("{}-{i:06}", self.prefix)
    }

    /// A client state machine for device `i`.
    pub fn client(&self, i: usize) -> Result<RegistrationClient, Incident> {
        let id = self.registration_id(i);
        let registration_id = RegistrationId::parse(&id)
            .map_err(|e| Incident::new(Failure::Protocol, format!("registration ID '{id}': {e}")))?;
        let mut config = if self.x509.is_some() {
            ClientConfig::x509(self.id_scope.clone(), registration_id)
        } else {
            let key = self.group_key.derive_device_key(registration_id.as_str());
            ClientConfig::new(self.id_scope.clone(), registration_id, key)
        };
        config.api_version = self.api_version.clone();
        Ok(RegistrationClient::new(config))
    }
}

/// How devices behave.
#[derive(Debug, Clone, Copy)]
pub struct DriveOptions {
    /// After a `202 assigning` answer, poll at once instead of waiting the Retry-After (a poll that still
    /// answers `assigning` is retried after 20 ms times the number of such answers, capped at the
    /// Retry-After). Throttling (429) and 5xx answers are always waited out as the service asks.
    pub ignore_retry_after: bool,
    /// A registration that has no final answer after this long counts as [`Failure::Timeout`].
    pub timeout: Duration,
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions { ignore_retry_after: true, timeout: Duration::from_secs(60) }
    }
}

/// Where a device ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The registration ID.
    pub registration_id: String,
    /// The IoT hub it was assigned to.
    pub assigned_hub: String,
    /// Its device ID there.
    pub device_id: String,
}

/// Everything measured about one device.
#[derive(Debug, Clone)]
pub struct DeviceResult {
    /// Assigned, or why not.
    pub outcome: Result<Assignment, Incident>,
    /// From the start of the TCP connect to the final answer.
    pub latency: Duration,
    /// TCP connect plus TLS handshake, when the handshake finished.
    pub handshake: Option<Duration>,
    /// What the handshake negotiated (version, cipher suite, key exchange group).
    pub tls: Option<String>,
    /// Requests sent (register, polls, retries).
    pub requests: u32,
    /// Error replies the client retried (429, 5xx).
    pub retried: Vec<Incident>,
}

/// A service answer as the transports deliver it.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status (or the MQTT response topic's status).
    pub status: u16,
    /// Retry-After seconds, if sent.
    pub retry_after: Option<u32>,
    /// The body.
    pub body: Vec<u8>,
}

/// A connected device transport that sends one request and returns its answer.
pub(crate) trait Exchange {
    /// Sends the request and waits for its answer.
    async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, Incident>;
}

/// What [`drive`] learns on the way.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub requests: u32,
    pub retried: Vec<Incident>,
    pub handshake: Option<Duration>,
    pub tls: Option<String>,
    pub finished_at: Option<Instant>,
}

/// The message of an error body, or the body itself.
pub(crate) fn message_of(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.message,
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

/// The failure for a client state machine's final error.
pub(crate) fn incident_of(e: &ClientError) -> Incident {
    let failure = match e.registration_status {
        Some(RegistrationStatus::Disabled) => Failure::Disabled,
        _ if e.code != 0 => Failure::Code(e.code),
        _ if e.status == 0 => Failure::GaveUp,
        _ => Failure::Protocol,
    };
    Incident::new(failure, e.message.clone())
}

/// Runs the client state machine over a connected transport until it ends.
pub(crate) async fn drive<E: Exchange>(
    conn: &mut E,
    client: &mut RegistrationClient,
    first: ClientAction,
    options: &DriveOptions,
    progress: &mut Progress,
) -> Result<Assignment, Incident> {
    let mut action = first;
    let mut last_status = 0u16;
    let mut assigning_polls = 0u32;
    loop {
        action = match action {
            ClientAction::Send(request) => {
                progress.requests += 1;
                let response = conn.exchange(&request).await?;
                if response.status == 429 || response.status >= 500 {
                    progress.retried.push(Incident::new(
                        Failure::from_reply(response.status, &response.body),
                        message_of(&response.body),
                    ));
                }
                if response.status == 202 && matches!(request.kind, RequestKind::OperationStatus(_)) {
                    assigning_polls += 1;
                }
                last_status = response.status;
                client.handle(
                    now(),
                    ClientEvent::Response {
                        status: response.status,
                        retry_after: response.retry_after,
                        body: response.body,
                    },
                )
            }
            ClientAction::Wait { until } => {
                let asked = u64::try_from(until.unix_nanos().saturating_sub(now().unix_nanos())).unwrap_or(0);
                let asked = Duration::from_nanos(asked);
                let delay = if options.ignore_retry_after && (200..300).contains(&last_status) {
                    (Duration::from_millis(20) * assigning_polls).min(asked)
                } else {
                    asked
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                client.handle(now(), ClientEvent::TimerFired)
            }
            ClientAction::Assigned(result) => {
                progress.finished_at = Some(Instant::now());
                return Ok(Assignment {
                    registration_id: result.registration_id.clone(),
                    assigned_hub: result.assigned_hub.clone().unwrap_or_default(),
                    device_id: result.device_id.clone().unwrap_or_default(),
                });
            }
            ClientAction::Failed(e) => {
                progress.finished_at = Some(Instant::now());
                return Err(incident_of(&e));
            }
        }
    }
}

/// Registers device `index` of `set` against `target` over a fresh connection, with a timeout.
pub async fn register_device(
    protocol: Protocol,
    target: &Target,
    set: &DeviceSet,
    index: usize,
    options: &DriveOptions,
) -> DeviceResult {
    let start = Instant::now();
    let mut progress = Progress::default();
    let attempt = async {
        let mut client = set.client(index)?;
        let identity = match (protocol.is_x509(), set.identity(index)) {
            (false, _) => None,
            (true, Some(identity)) => Some(identity),
            (true, None) => {
                return Err(Incident::new(Failure::Protocol, format!("no X.509 identity for device {index}")))
            }
        };
        match protocol.transport() {
            Protocol::Mqtt => {
                crate::mqtt::register(target, identity, &mut client, options, &mut progress, start).await
            }
            Protocol::Amqp => {
                crate::amqp::register(target, identity, &mut client, options, &mut progress, start).await
            }
            _ => crate::https::register(target, identity, &mut client, options, &mut progress, start).await,
        }
    };
    let outcome = match tokio::time::timeout(options.timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Incident::new(
            Failure::Timeout,
            format!("no final answer within {} s", options.timeout.as_secs_f64()),
        )),
    };
    let end = progress.finished_at.unwrap_or_else(Instant::now);
    // The device's own ID (the baseline's fixed replies all name one sample device).
    let outcome = outcome.map(|a| Assignment { registration_id: set.registration_id(index), ..a });
    DeviceResult {
        outcome,
        latency: end.saturating_duration_since(start),
        handshake: progress.handshake,
        tls: progress.tls,
        requests: progress.requests,
        retried: progress.retried,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_identities_are_group_derived() {
        let key = SymmetricKey::from_bytes(vec![9; 32]);
        let set = DeviceSet::new("0ne00000A11", key.clone(), "sensor").unwrap();
        assert_eq!(set.registration_id(7), "sensor-000007");
        assert_eq!(set.registration_id(1_234_567), "sensor-1234567");
        let mut client = set.client(7).unwrap();
        let ClientAction::Send(request) = client.start(now()) else { panic!("no first request") };
        assert!(request
            .http_path_and_query()
            .starts_with("/0ne00000A11/registrations/sensor-000007/register"));
        // The token is signed with the derived key: the engine's own verifier accepts it.
        let token = dps_core::proto::sas::SasToken::parse(&request.authorization).unwrap();
        assert!(token.signature_matches(&key.derive_device_key("sensor-000007")));
        assert!(!token.signature_matches(&key));
    }

    #[test]
    fn bad_prefix_or_scope_is_refused() {
        let key = SymmetricKey::from_bytes(vec![9; 32]);
        assert!(DeviceSet::new("0ne00000A11", key.clone(), "bad prefix").is_err());
        assert!(DeviceSet::new("nope", key, "sensor").is_err());
    }

    #[test]
    fn client_errors_map_to_failures() {
        let mut e = ClientError {
            status: 401,
            code: 401000,
            known: None,
            registration_status: None,
            message: "no".into(),
        };
        assert_eq!(incident_of(&e).failure, Failure::Code(401000));
        e.registration_status = Some(RegistrationStatus::Disabled);
        assert_eq!(incident_of(&e).failure, Failure::Disabled);
        e.registration_status = None;
        e.code = 0;
        e.status = 0;
        assert_eq!(incident_of(&e).failure, Failure::GaveUp);
        e.status = 200;
        assert_eq!(incident_of(&e).failure, Failure::Protocol);
    }
}
