//! Helpers shared by the engine test suites.
#![allow(dead_code)]

use dps_client::{ClientRequest, RequestKind};
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_core::{DeviceCall, DeviceRequest, HttpRequest};

/// The device client's request (built by `dps-client`) as an in-process engine request.
pub fn device_request(r: &ClientRequest) -> DeviceRequest {
    DeviceRequest {
        id_scope: r.id_scope().clone(),
        registration_id: r.registration_id().clone(),
        call: match &r.kind {
            RequestKind::Register => DeviceCall::Register { force: false },
            RequestKind::OperationStatus(op) => DeviceCall::OperationStatus(op.clone()),
        },
        api_version: Some(r.api_version().clone()),
        credential: dps_core::proto::Credential::SasToken(r.authorization.clone()),
        body: r.body.clone(),
    }
}

/// A service-API `PUT path` with JSON `body`, signed by the test engines' owner policy (key `[1; 32]`,
/// audience `dps.example.net`) with a token valid until `expiry` (Unix seconds).
pub fn owner_put(path: &str, body: &serde_json::Value, expiry: i64) -> HttpRequest {
    HttpRequest {
        method: "PUT".into(),
        path_and_query: format!("{path}?api-version=2021-10-01"),
        authorization: Some(build_token(
            &SymmetricKey::from_bytes(vec![1; 32]),
            "dps.example.net",
            expiry,
            Some("owner"),
        )),
        body: serde_json::to_vec(body).unwrap_or_default(),
        ..HttpRequest::default()
    }
}
