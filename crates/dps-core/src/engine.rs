//! The engine: turns requests into flows.

use crate::command::{Principal, ServiceCommand};
use crate::config::EngineConfig;
use crate::device::DeviceFlow;
use crate::flow::{Flow, Input, Step};
use crate::reply::Reply;
use crate::service::ServiceFlow;
use dps_proto::route::{parse_route, Route};
use dps_proto::{Credential, DpsError, IdScope, RegistrationId, Timestamp};

use crate::request::Nonces;
pub use crate::request::{DeviceCall, DeviceRequest, HttpRequest, ServiceRequest};
use rand_core::RngCore;
use std::sync::Arc;

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
            client_address: request.client_address,
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

impl EngineFlow {
    /// The device request, when this is a device API flow.
    pub fn device_request(&self) -> Option<&DeviceRequest> {
        match self {
            EngineFlow::Device(f) => Some(f.request()),
            _ => None,
        }
    }
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
