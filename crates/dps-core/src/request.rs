//! The requests the engine takes (device, service, HTTP) and the values every flow draws when it is made.
//! They live apart from [`crate::engine`] so the flows (`device`, `service`) depend on their inputs without
//! depending on the engine that constructs them.

use dps_proto::id::format_uuid;
use dps_proto::route::Route;
use dps_proto::{ApiVersion, Credential, DpsError, ErrorCode, IdScope, OperationId, RegistrationId};
use rand_core::RngCore;

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
    /// Check the device's credential against its enrollment and answer `204` (or the error a register would
    /// get), without registering: what an MQTT session does at CONNECT, so an unauthenticated client is
    /// refused before it holds a session.
    Authenticate,
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
    /// The client's network address, as the transport saw it (lowest-latency allocation uses it; None:
    /// unknown).
    pub client_address: Option<std::net::IpAddr>,
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
    /// The client's network address (carried into device requests).
    pub client_address: Option<std::net::IpAddr>,
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

/// The error for a store/flow protocol violation (a backend answered with the wrong result kind).
pub(crate) fn unexpected_store_result() -> DpsError {
    DpsError::with_message(ErrorCode::InternalError, "the store answered with an unexpected result")
}
