//! The engine: turns requests into flows.

use crate::command::{Principal, ServiceCommand};
use crate::config::EngineConfig;
use crate::device::DeviceFlow;
use crate::flow::{Flow, Input, Step};
use crate::reply::Reply;
use crate::service::ServiceFlow;
use dps_proto::id::format_uuid;
use dps_proto::route::{parse_route, Route};
use dps_proto::{
    ApiVersion, Credential, DpsError, ErrorCode, IdScope, OperationId, RegistrationId, Timestamp,
};
use rand_core::RngCore;
use std::sync::Arc;

/// The device API call being made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCall {
    /// PUT register (HTTPS) / `iotdps-register` (MQTT).
    Register {
        /// `forceRegistration=true` was sent (accepted; every registration re-evaluates anyway).
        force: bool,
    },
    /// GET operation status / `iotdps-get-operationstatus`.
    OperationStatus(OperationId),
    /// POST device registration status lookup.
    StatusLookup,
}

/// A device API request, already addressed (the transport parsed the path or MQTT username and topic).
#[derive(Debug, Clone)]
pub struct DeviceRequest {
    /// ID scope from the path or MQTT username.
    pub id_scope: IdScope,
    /// Registration ID from the path or MQTT username (authoritative over the body).
    pub registration_id: RegistrationId,
    /// The call.
    pub call: DeviceCall,
    /// The api-version, if sent.
    pub api_version: Option<ApiVersion>,
    /// What the device presented: the `Authorization` header or MQTT password as a SAS token, the TLS
    /// client-certificate chain, TPM keys, or nothing (see [`Credential::from_transport`]).
    pub credential: Credential,
    /// The request body (may be empty; ignored for polls).
    pub body: Vec<u8>,
}

/// A service API request.
#[derive(Debug, Clone)]
pub struct ServiceRequest {
    /// The route (a service-API variant of [`Route`]).
    pub route: Route,
    /// The request path (without query), for the SAS audience check.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `If-Match` header.
    pub if_match: Option<String>,
    /// The `x-ms-max-item-count` header.
    pub max_item_count: Option<String>,
    /// The `x-ms-continuation` header.
    pub continuation: Option<String>,
    /// The request body.
    pub body: Vec<u8>,
}

/// An HTTP request as a server sees it, for [`Engine::http`].
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Method.
    pub method: String,
    /// Path and query string.
    pub path_and_query: String,
    /// `Authorization` header.
    pub authorization: Option<String>,
    /// The TLS client-certificate chain of the connection (DER, leaf first), if the client sent one; a
    /// device request without `Authorization` is attested by it.
    pub client_certificates: Option<Vec<Vec<u8>>>,
    /// `If-Match` header.
    pub if_match: Option<String>,
    /// `x-ms-max-item-count` header.
    pub max_item_count: Option<String>,
    /// `x-ms-continuation` header.
    pub continuation: Option<String>,
    /// Body.
    pub body: Vec<u8>,
}

/// Random values a flow needs, drawn once when it is created.
#[derive(Debug, Clone)]
pub(crate) struct Nonces {
    pub op: [u8; 16],
    pub etag: [u8; 16],
    pub etag2: [u8; 16],
    pub tracking: [u8; 16],
}

impl Nonces {
    pub(crate) fn draw(rng: &mut dyn RngCore) -> Nonces {
        let mut b = [0u8; 64];
        rng.fill_bytes(&mut b);
        let part = |i: usize| {
            let mut out = [0u8; 16];
            out.copy_from_slice(&b[i * 16..i * 16 + 16]);
            out
        };
        Nonces { op: part(0), etag: part(1), etag2: part(2), tracking: part(3) }
    }

    pub(crate) fn tracking_id(&self) -> String {
        format_uuid(self.tracking)
    }
}

/// The provisioning engine: configuration plus the constructors of flows. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    config: Arc<EngineConfig>,
}

impl Engine {
    /// Validates the configuration and builds an engine.
    pub fn new(config: EngineConfig) -> Result<Engine, DpsError> {
        config.validate()?;
        Ok(Engine { config: Arc::new(config) })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// A flow for a device API request.
    pub fn device(&self, now: Timestamp, rng: &mut dyn RngCore, request: DeviceRequest) -> DeviceFlow {
        DeviceFlow::new(self.config.clone(), now, Nonces::draw(rng), request)
    }

    /// A flow for a service API request.
    pub fn service(&self, now: Timestamp, rng: &mut dyn RngCore, request: ServiceRequest) -> ServiceFlow {
        ServiceFlow::new(self.config.clone(), now, rng, request)
    }

    /// Executes a typed service command under `principal` (from a verified service SAS, or granted
    /// in-process by an embedder): the same validation, store operations and replies as the HTTP service
    /// API, without tokens or JSON.
    pub fn command(
        &self,
        now: Timestamp,
        rng: &mut dyn RngCore,
        principal: &Principal,
        command: ServiceCommand,
    ) -> ServiceFlow {
        ServiceFlow::from_command(self.config.clone(), now, rng, principal, command)
    }

    /// Routes an HTTP request (device or service API) to its flow. Routing errors become an immediate reply.
    pub fn http(&self, now: Timestamp, rng: &mut dyn RngCore, request: HttpRequest) -> EngineFlow {
        let matched = match parse_route(&request.method, &request.path_and_query) {
            Ok(m) => m,
            Err(e) => {
                let tracking = Nonces::draw(rng).tracking_id();
                return EngineFlow::Immediate(Some(Reply::error(&e, tracking, now)));
            }
        };
        let path = request.path_and_query.split('?').next().unwrap_or_default().to_owned();
        let device = |id_scope: IdScope, registration_id: RegistrationId, call: DeviceCall| DeviceRequest {
            id_scope,
            registration_id,
            call,
            api_version: matched.api_version.clone(),
            credential: Credential::from_transport(
                request.authorization.clone(),
                request.client_certificates.clone(),
            ),
            body: request.body.clone(),
        };
        match matched.route {
            Route::Register { id_scope, registration_id } => EngineFlow::Device(self.device(
                now,
                rng,
                device(id_scope, registration_id, DeviceCall::Register { force: matched.force_registration }),
            )),
            Route::OperationStatus { id_scope, registration_id, operation_id } => {
                EngineFlow::Device(self.device(
                    now,
                    rng,
                    device(id_scope, registration_id, DeviceCall::OperationStatus(operation_id)),
                ))
            }
            Route::StatusLookup { id_scope, registration_id } => EngineFlow::Device(self.device(
                now,
                rng,
                device(id_scope, registration_id, DeviceCall::StatusLookup),
            )),
            route => EngineFlow::Service(self.service(
                now,
                rng,
                ServiceRequest {
                    route,
                    path,
                    authorization: request.authorization,
                    if_match: request.if_match,
                    max_item_count: request.max_item_count,
                    continuation: request.continuation,
                    body: request.body,
                },
            )),
        }
    }
}

/// Any flow the engine makes from an HTTP request.
#[derive(Debug)]
// Results are moved once per step; boxing would add an allocation on the hot path for no gain.
#[allow(clippy::large_enum_variant)]
pub enum EngineFlow {
    /// A device API flow.
    Device(DeviceFlow),
    /// A service API flow.
    Service(ServiceFlow),
    /// A reply known without storage (e.g. unknown route); `None` once taken.
    Immediate(Option<Reply>),
}

impl Flow for EngineFlow {
    fn resume(&mut self, input: Input) -> Step {
        match self {
            EngineFlow::Device(f) => f.resume(input),
            EngineFlow::Service(f) => f.resume(input),
            EngineFlow::Immediate(r) => match r.take() {
                Some(reply) => Step::Respond(reply),
                None => Step::Finished,
            },
        }
    }

    fn resume_at(&mut self, now: Timestamp, input: Input) -> Step {
        match self {
            EngineFlow::Device(f) => f.resume_at(now, input),
            EngineFlow::Service(f) => f.resume_at(now, input),
            EngineFlow::Immediate(_) => self.resume(input),
        }
    }
}

/// The error for a store/flow protocol violation (a backend answered with the wrong result kind).
pub(crate) fn unexpected_store_result() -> DpsError {
    DpsError::with_message(ErrorCode::InternalError, "the store answered with an unexpected result")
}
