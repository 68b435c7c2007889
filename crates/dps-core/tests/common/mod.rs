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
        client_address: None,
    }
}

/// A service-API `PUT path` with JSON `body`, signed by the test engines' owner policy (key `[1; 32]`,
/// audience `dps.example.net`) with a token valid until `expiry` (Unix seconds).
pub fn owner_put(path: &str, body: &serde_json::Value, expiry: i64) -> HttpRequest {
    service_request("owner", "PUT", path, Some(body), None, expiry)
}

/// A service-API request (api-version 2021-10-01 added to `path`) signed by `policy` with the test
/// engines' policy key `[1; 32]` and audience `dps.example.net`, valid until `expiry` (Unix seconds).
pub fn service_request(
    policy: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    if_match: Option<&str>,
    expiry: i64,
) -> HttpRequest {
    let sep = if path.contains('?') { '&' } else { '?' };
    HttpRequest {
        method: method.into(),
        path_and_query: format!("{path}{sep}api-version=2021-10-01"),
        authorization: Some(build_token(
            &SymmetricKey::from_bytes(vec![1; 32]),
            "dps.example.net",
            expiry,
            Some(policy),
        )),
        if_match: if_match.map(str::to_owned),
        body: body.map(|b| serde_json::to_vec(b).unwrap_or_default()).unwrap_or_default(),
        ..HttpRequest::default()
    }
}
