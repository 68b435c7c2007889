//! The device-side registration state machine (sans I/O), for people building custom device SDKs.
//!
//! It knows the protocol (register, honour Retry-After, poll, result; retry 429 and transient errors) but
//! not the transport: it asks its driver to [`ClientAction::Send`] a [`ClientRequest`] (which renders itself
//! as an HTTPS request or an MQTT topic + payload) or to [`ClientAction::Wait`] until an instant, and it is
//! fed [`ClientEvent`]s. Time is passed in; nothing sleeps.
//!
//! ```
//! use dps_client::machine::{ClientAction, ClientConfig, ClientEvent, RegistrationClient};
//! use dps_client::proto::sas::SymmetricKey;
//! use dps_client::proto::{IdScope, RegistrationId, Timestamp};
//!
//! let config = ClientConfig::new(
//!     IdScope::parse("0ne00000001").unwrap(),
//!     RegistrationId::parse("my-device").unwrap(),
//!     SymmetricKey::from_bytes(vec![7; 32]),
//! );
//! let mut client = RegistrationClient::new(config);
//! let now = Timestamp::from_unix_seconds(1_700_000_000);
//! let ClientAction::Send(request) = client.start(now) else { unreachable!() };
//! assert_eq!(request.http_method(), "PUT");
//! assert!(request.http_path_and_query().starts_with("/0ne00000001/registrations/my-device/register"));
//! // ...send it, then feed the answer back:
//! let action = client.handle(now, ClientEvent::Response {
//!     status: 202,
//!     retry_after: Some(2),
//!     body: br#"{"operationId":"1.2.3","status":"assigning"}"#.to_vec(),
//! });
//! assert!(matches!(action, ClientAction::Wait { .. }));
//! ```

use dps_proto::model::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
};
use dps_proto::mqtt::{build_username, operation_status_topic, register_topic};
use dps_proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_proto::{ApiVersion, ErrorBody, ErrorCode, IdScope, OperationId, RegistrationId, Timestamp};
use serde_json::Value;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The instance's ID scope.
    pub id_scope: IdScope,
    /// This device's registration ID.
    pub registration_id: RegistrationId,
    /// The device key (individual key, or the group-derived key); `None` for X.509 devices, which send no
    /// SAS token.
    pub device_key: Option<SymmetricKey>,
    /// api-version to send.
    pub api_version: ApiVersion,
    /// Lifetime of the SAS tokens it signs, in seconds.
    pub token_ttl_secs: i64,
    /// Custom payload to send with the registration.
    pub payload: Option<Value>,
    /// Delay when the service sends no Retry-After, in seconds.
    pub default_retry_after_secs: u32,
    /// Give up after this many requests in total (register + polls + retries).
    pub max_requests: u32,
    /// A certificate signing request to send with the register (base64 DER PKCS#10, subject CN = the
    /// registration ID): the service issues a device certificate and returns it in
    /// `registrationState.issuedCertificateChain`. Needs api-version 2025-07-01-preview or later.
    pub csr: Option<String>,
}

impl ClientConfig {
    /// Settings for an X.509 device (no SAS token; the TLS client certificate authenticates).
    pub fn x509(id_scope: IdScope, registration_id: RegistrationId) -> Self {
        ClientConfig {
            device_key: None,
            ..ClientConfig::new(id_scope, registration_id, SymmetricKey::from_bytes(Vec::new()))
        }
    }

    /// Settings with defaults: api-version 2021-10-01, one-hour tokens, 2 s default delay, 60 requests.
    pub fn new(id_scope: IdScope, registration_id: RegistrationId, device_key: SymmetricKey) -> Self {
        ClientConfig {
            id_scope,
            registration_id,
            device_key: Some(device_key),
            api_version: ApiVersion::V2021_10_01,
            token_ttl_secs: 3600,
            payload: None,
            default_retry_after_secs: 2,
            max_requests: 60,
            csr: None,
        }
    }
}

/// Which device API call a [`ClientRequest`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `PUT {scope}/registrations/{id}/register` (MQTT `$dps/registrations/PUT/iotdps-register/`).
    Register,
    /// `GET {scope}/registrations/{id}/operations/{op}` (MQTT `…/GET/iotdps-get-operationstatus/`).
    OperationStatus(OperationId),
}

/// What the client asks to send: everything a transport needs (method, path, MQTT topic, body, and the
/// `Authorization` header / MQTT password).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRequest {
    /// Register or poll.
    pub kind: RequestKind,
    /// The `Authorization` header / MQTT password (a SAS token); empty for X.509 devices, which
    /// authenticate with their TLS client certificate.
    pub authorization: String,
    /// The JSON body (empty for polls).
    pub body: Vec<u8>,
    id_scope: IdScope,
    registration_id: RegistrationId,
    api_version: ApiVersion,
}

impl ClientRequest {
    /// HTTP method.
    pub fn http_method(&self) -> &'static str {
        match self.kind {
            RequestKind::Register => "PUT",
            RequestKind::OperationStatus(_) => "GET",
        }
    }

    /// HTTP path and query.
    pub fn http_path_and_query(&self) -> String {
        let base = format!("/{}/registrations/{}", self.id_scope, self.registration_id);
        let v = self.api_version.as_str();
        match &self.kind {
            RequestKind::Register => format!("{base}/register?api-version={v}"),
            RequestKind::OperationStatus(op) => format!("{base}/operations/{op}?api-version={v}"),
        }
    }

    /// MQTT topic for this request with the given request ID.
    pub fn mqtt_topic(&self, rid: &str) -> String {
        match &self.kind {
            RequestKind::OperationStatus(op) => operation_status_topic(rid, op.as_str()),
            RequestKind::Register => register_topic(rid),
        }
    }

    /// The MQTT username (`{scope}/registrations/{id}/api-version=…[&ClientVersion=…]`).
    pub fn mqtt_username(&self, client_version: Option<&str>) -> String {
        build_username(
            self.id_scope.as_str(),
            self.registration_id.as_str(),
            self.api_version.as_str(),
            client_version,
        )
    }

    /// The ID scope the request is for.
    pub fn id_scope(&self) -> &IdScope {
        &self.id_scope
    }

    /// The registration ID the request is for (also the MQTT client ID).
    pub fn registration_id(&self) -> &RegistrationId {
        &self.registration_id
    }

    /// The api-version sent.
    pub fn api_version(&self) -> &ApiVersion {
        &self.api_version
    }
}

/// What happened since the last action.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The service answered the last request.
    Response {
        /// HTTP status (or the MQTT response topic's status).
        status: u16,
        /// Retry-After, if sent.
        retry_after: Option<u32>,
        /// The body.
        body: Vec<u8>,
    },
    /// The transport failed before an answer (connection refused, reset, timeout).
    TransportFailed,
    /// The instant asked for by [`ClientAction::Wait`] has come.
    TimerFired,
}

/// A registration failure, keeping the service's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registration failed: {status} {code}: {message}")]
pub struct ClientError {
    /// HTTP status (0 when the transport failed).
    pub status: u16,
    /// The service's six-digit code (0 when none was sent).
    pub code: u32,
    /// The code in this project's table, when known.
    pub known: Option<ErrorCode>,
    /// The registration status when the operation ended `failed` or `disabled`.
    pub registration_status: Option<RegistrationStatus>,
    /// The message.
    pub message: String,
}

impl ClientError {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        ClientError {
            status,
            code,
            known: ErrorCode::from_code(code),
            registration_status: None,
            message: message.into(),
        }
    }
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAction {
    /// Send this request and feed back its [`ClientEvent::Response`] (or `TransportFailed`).
    Send(ClientRequest),
    /// Wait until this instant, then feed [`ClientEvent::TimerFired`].
    Wait {
        /// When to wake up.
        until: Timestamp,
    },
    /// Finished: the device is assigned.
    Assigned(Box<DeviceRegistrationResult>),
    /// Finished: the registration failed.
    Failed(ClientError),
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    AwaitRegister,
    AwaitPoll(OperationId),
    WaitThenRegister,
    WaitThenPoll(OperationId),
    Done,
}

/// The registration state machine.
#[derive(Debug, Clone)]
pub struct RegistrationClient {
    config: ClientConfig,
    phase: Phase,
    requests: u32,
}

impl RegistrationClient {
    /// A client that has not started.
    pub fn new(config: ClientConfig) -> Self {
        RegistrationClient { config, phase: Phase::Idle, requests: 0 }
    }

    /// Starts the registration: the first action is always a register request.
    pub fn start(&mut self, now: Timestamp) -> ClientAction {
        self.send(now, RequestKind::Register)
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn token(&self, now: Timestamp) -> String {
        let Some(key) = &self.config.device_key else {
            return String::new();
        };
        let resource = device_resource(self.config.id_scope.as_str(), self.config.registration_id.as_str());
        build_token(
            key,
            &encode_resource(&resource),
            now.unix_seconds().saturating_add(self.config.token_ttl_secs),
            Some("registration"),
        )
    }

    fn send(&mut self, now: Timestamp, kind: RequestKind) -> ClientAction {
        if self.requests >= self.config.max_requests {
            self.phase = Phase::Done;
            return ClientAction::Failed(ClientError::new(
                0,
                0,
                format!("gave up after {} requests without a final answer", self.requests),
            ));
        }
        self.requests += 1;
        let body = match kind {
            RequestKind::Register => {
                let reg = DeviceRegistration {
                    registration_id: Some(self.config.registration_id.as_str().to_owned()),
                    tpm: None,
                    payload: self.config.payload.clone(),
                    csr: self.config.csr.clone(),
                };
                serde_json::to_vec(&reg).unwrap_or_default()
            }
            RequestKind::OperationStatus(_) => Vec::new(),
        };
        self.phase = match &kind {
            RequestKind::OperationStatus(op) => Phase::AwaitPoll(op.clone()),
            RequestKind::Register => Phase::AwaitRegister,
        };
        ClientAction::Send(ClientRequest {
            kind,
            authorization: self.token(now),
            body,
            id_scope: self.config.id_scope.clone(),
            registration_id: self.config.registration_id.clone(),
            api_version: self.config.api_version.clone(),
        })
    }

    fn wait(&mut self, now: Timestamp, retry_after: Option<u32>, then: Phase) -> ClientAction {
        let secs =
            retry_after.filter(|s| (1..=300).contains(s)).unwrap_or(self.config.default_retry_after_secs);
        self.phase = then;
        ClientAction::Wait { until: now.plus_millis(i64::from(secs) * 1000) }
    }

    fn fail(&mut self, e: ClientError) -> ClientAction {
        self.phase = Phase::Done;
        ClientAction::Failed(e)
    }

    /// Feeds an event; returns the next action.
    pub fn handle(&mut self, now: Timestamp, event: ClientEvent) -> ClientAction {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, event) {
            (Phase::WaitThenRegister, ClientEvent::TimerFired) => self.send(now, RequestKind::Register),
            (Phase::WaitThenPoll(op), ClientEvent::TimerFired) => {
                self.send(now, RequestKind::OperationStatus(op))
            }
            (Phase::AwaitRegister, ClientEvent::TransportFailed) => {
                self.wait(now, None, Phase::WaitThenRegister)
            }
            (Phase::AwaitPoll(op), ClientEvent::TransportFailed) => {
                self.wait(now, None, Phase::WaitThenPoll(op))
            }
            (
                phase @ (Phase::AwaitRegister | Phase::AwaitPoll(_)),
                ClientEvent::Response { status, retry_after, body },
            ) => self.on_response(now, phase, status, retry_after, &body),
            (phase, _) => {
                self.phase = phase;
                ClientAction::Failed(ClientError::new(0, 0, "event does not fit the client's state"))
            }
        }
    }

    fn on_response(
        &mut self,
        now: Timestamp,
        phase: Phase,
        status: u16,
        retry_after: Option<u32>,
        body: &[u8],
    ) -> ClientAction {
        if status == 429 || status >= 500 {
            let again = match phase {
                Phase::AwaitPoll(op) => Phase::WaitThenPoll(op),
                _ => Phase::WaitThenRegister,
            };
            return self.wait(now, retry_after, again);
        }
        if !(200..300).contains(&status) {
            return self.fail(match serde_json::from_slice::<ErrorBody>(body) {
                Ok(e) => ClientError::new(status, e.error_code, e.message),
                Err(_) => ClientError::new(
                    status,
                    u32::from(status) * 1000,
                    String::from_utf8_lossy(body).into_owned(),
                ),
            });
        }
        let parsed: RegistrationOperationStatus = match serde_json::from_slice(body) {
            Ok(p) => p,
            Err(e) => return self.fail(ClientError::new(status, 0, format!("unparseable answer: {e}"))),
        };
        match parsed.status {
            RegistrationStatus::Assigning | RegistrationStatus::Unassigned => {
                match OperationId::parse(&parsed.operation_id) {
                    Ok(op) => self.wait(now, retry_after, Phase::WaitThenPoll(op)),
                    Err(e) => self.fail(ClientError::new(status, e.code.code(), e.message)),
                }
            }
            RegistrationStatus::Assigned => match parsed.registration_state {
                Some(state) if state.assigned_hub.is_some() && state.device_id.is_some() => {
                    self.phase = Phase::Done;
                    ClientAction::Assigned(Box::new(state))
                }
                _ => self.fail(ClientError::new(status, 0, "assigned without assignedHub and deviceId")),
            },
            s @ (RegistrationStatus::Failed | RegistrationStatus::Disabled) => {
                let state = parsed.registration_state;
                let code = state.as_ref().and_then(|r| r.error_code).unwrap_or(0);
                let message = state
                    .and_then(|r| r.error_message)
                    .unwrap_or_else(|| format!("the registration ended with status {}", s.as_str()));
                let mut e = ClientError::new(status, code, message);
                e.registration_status = Some(s);
                self.fail(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> RegistrationClient {
        let mut c = ClientConfig::new(
            IdScope::parse("0ne00000001").unwrap(),
            RegistrationId::parse("dev-1").unwrap(),
            SymmetricKey::from_bytes(vec![1; 32]),
        );
        c.max_requests = 4;
        RegistrationClient::new(c)
    }

    const T: Timestamp = Timestamp::from_unix_seconds(1_700_000_000);

    fn response(status: u16, retry_after: Option<u32>, body: &str) -> ClientEvent {
        ClientEvent::Response { status, retry_after, body: body.as_bytes().to_vec() }
    }

    #[test]
    fn register_poll_assigned() {
        let mut c = client();
        let ClientAction::Send(r) = c.start(T) else { panic!() };
        assert_eq!(r.http_method(), "PUT");
        assert!(r
            .authorization
            .starts_with("SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev-1&sig="));
        assert_eq!(r.mqtt_topic("7"), "$dps/registrations/PUT/iotdps-register/?$rid=7");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["registrationId"], "dev-1");
        let a = c.handle(T, response(202, Some(3), r#"{"operationId":"1.2.3","status":"assigning"}"#));
        assert_eq!(a, ClientAction::Wait { until: T.plus_millis(3000) });
        let ClientAction::Send(p) = c.handle(T, ClientEvent::TimerFired) else { panic!() };
        assert_eq!(p.http_method(), "GET");
        assert!(p.http_path_and_query().contains("/operations/1.2.3?"));
        let a = c.handle(
            T,
            response(200, None, r#"{"operationId":"1.2.3","status":"assigned","registrationState":{"registrationId":"dev-1","status":"assigned","assignedHub":"h","deviceId":"dev-1"}}"#),
        );
        let ClientAction::Assigned(r) = a else { panic!("{a:?}") };
        assert_eq!(r.assigned_hub.as_deref(), Some("h"));
    }

    #[test]
    fn mqtt_username_and_x509_requests() {
        let mut c = client();
        let ClientAction::Send(r) = c.start(T) else { panic!() };
        assert_eq!(
            r.mqtt_username(Some("sdk/1")),
            "0ne00000001/registrations/dev-1/api-version=2021-10-01&ClientVersion=sdk%2F1"
        );
        let mut x = RegistrationClient::new(ClientConfig::x509(
            IdScope::parse("0ne00000001").unwrap(),
            RegistrationId::parse("dev-x").unwrap(),
        ));
        let ClientAction::Send(r) = x.start(T) else { panic!() };
        assert!(r.authorization.is_empty());
        assert_eq!(r.registration_id().as_str(), "dev-x");
    }

    #[test]
    fn throttling_is_retried_after_the_given_delay() {
        let mut c = client();
        c.start(T);
        let a = c.handle(T, response(429, Some(7), r#"{"errorCode":429001,"message":"slow down"}"#));
        assert_eq!(a, ClientAction::Wait { until: T.plus_millis(7000) });
        let ClientAction::Send(r) = c.handle(T, ClientEvent::TimerFired) else { panic!() };
        assert_eq!(r.http_method(), "PUT");
        // Out-of-range Retry-After values fall back to the default (2 s).
        let a = c.handle(T, response(503, Some(9000), ""));
        assert_eq!(a, ClientAction::Wait { until: T.plus_millis(2000) });
    }

    #[test]
    fn errors_keep_their_code() {
        let mut c = client();
        c.start(T);
        let a = c.handle(
            T,
            response(
                401,
                None,
                r#"{"errorCode":401000,"trackingId":"t","message":"Unauthorized","timestampUtc":"x"}"#,
            ),
        );
        let ClientAction::Failed(e) = a else { panic!() };
        assert_eq!((e.status, e.code, e.known), (401, 401000, Some(ErrorCode::Unauthorized)));
        let mut c = client();
        c.start(T);
        let a = c.handle(T, response(200, None, r#"{"operationId":"o","status":"failed","registrationState":{"registrationId":"dev-1","status":"failed","errorCode":400207,"errorMessage":"Custom allocation failed."}}"#));
        let ClientAction::Failed(e) = a else { panic!() };
        assert_eq!(e.code, 400207);
        assert_eq!(e.registration_status, Some(RegistrationStatus::Failed));
    }

    #[test]
    fn gives_up_after_max_requests() {
        let mut c = client();
        c.start(T);
        let mut last = ClientAction::Wait { until: T };
        for _ in 0..10 {
            last = c.handle(T, ClientEvent::TransportFailed);
            if matches!(last, ClientAction::Failed(_)) {
                break;
            }
            last = c.handle(T, ClientEvent::TimerFired);
            if matches!(last, ClientAction::Failed(_)) {
                break;
            }
        }
        assert!(matches!(last, ClientAction::Failed(_)), "{last:?}");
    }
}
