//! Helpers shared by the engine test suites.
#![allow(dead_code)]

use dps_client::{ClientRequest, RequestKind};
use dps_core::{DeviceCall, DeviceRequest};

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
