//! The custom allocation contract (spec §8.3-8.5): the `AllocationRequest` DPS POSTs to an enrollment's
//! webhook, and the `AllocationResponse` the webhook answers with. The same two types are what an
//! in-process allocation hook receives and returns, so a hook written in Rust (or, through the bindings,
//! in Python or Node) and an Azure Function see exactly the same decision.
//!
//! Field names are Azure's (`iotHubHostName`, `deviceRuntimeContext`, `currentIotHubHostName`, …);
//! unknown fields in a response are ignored, as Azure does.

use crate::model::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, InitialTwin, X509RegistrationResult,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body DPS sends to a custom allocation webhook (spec §8.3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRequest {
    /// The individual enrollment the device matched (secrets stripped); absent for a group device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub individual_enrollment: Option<Box<IndividualEnrollment>>,
    /// The enrollment group the device matched (secrets stripped); absent for an individual device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group: Option<Box<EnrollmentGroup>>,
    /// What the device presented and where it lives now.
    pub device_runtime_context: DeviceRuntimeContext,
    /// The hubs the webhook may choose from: the enrollment's `iotHubs`, else every linked hub taking
    /// part in allocation; only the current hub when the device is re-registering under "never
    /// reprovision".
    pub linked_hubs: Vec<String>,
}

/// `deviceRuntimeContext` of an [`AllocationRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRuntimeContext {
    /// The device's registration ID.
    pub registration_id: String,
    /// The hub the device is assigned to now (re-registration only).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "currentIoTHubHostName")]
    pub current_iot_hub_host_name: Option<String>,
    /// The device ID it has there (re-registration only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_device_id: Option<String>,
    /// Present (an empty object) for a symmetric-key device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<Value>,
    /// The certificate an X.509 device presented (the `registrationState.x509` shape: `certificateInfo`,
    /// and for a group device `enrollmentGroupId` and `signingCertificateInfo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// The keys a TPM device presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<crate::model::TpmAttestation>,
    /// The payload the device sent with its register, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl DeviceRuntimeContext {
    /// The attestation type the context describes.
    pub fn attestation_type(&self) -> Option<AttestationType> {
        if self.symmetric_key.is_some() {
            Some(AttestationType::SymmetricKey)
        } else if self.x509.is_some() {
            Some(AttestationType::X509)
        } else if self.tpm.is_some() {
            Some(AttestationType::Tpm)
        } else {
            None
        }
    }
}

/// The webhook's (or hook's) answer (spec §8.4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationResponse {
    /// The chosen hub: required, and one of the request's `linkedHubs` (missing or empty: 400208).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "iotHubHostname")]
    pub iot_hub_host_name: Option<String>,
    /// The initial twin for a new device (used on a first assignment, and on a hub change under "reset to
    /// initial config"; otherwise ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    /// Returned to the device as `registrationState.payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl AllocationResponse {
    /// An answer choosing `hub`.
    pub fn hub(hub: impl Into<String>) -> Self {
        AllocationResponse { iot_hub_host_name: Some(hub.into()), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_request_parses_and_reserializes_with_azures_names() {
        // The request body of Azure's custom allocation tutorial (re-registration form).
        let body = r#"{"enrollmentGroup":{"enrollmentGroupId":"contoso-custom-allocated-devices",
            "attestation":{"type":"symmetricKey"},"capabilities":{"iotEdge":false},
            "etag":"\"13003fea-0000-0300-0000-62d1d5e50000\"","provisioningStatus":"enabled",
            "reprovisionPolicy":{"updateHubAssignment":true,"migrateDeviceData":true},
            "allocationPolicy":"custom","iotHubs":["toasters.azure-devices.net","heatpumps.azure-devices.net"],
            "customAllocationDefinition":{"webhookUrl":"https://f.azurewebsites.net/api/H?****","apiVersion":"2021-10-01"}},
            "deviceRuntimeContext":{"registrationId":"breakroom499-contoso-tstrsd-007",
            "currentIotHubHostName":"toasters.azure-devices.net","currentDeviceId":"breakroom499-contoso-tstrsd-007",
            "symmetricKey":{},"payload":{"fw":"1.2"}},
            "linkedHubs":["toasters.azure-devices.net","heatpumps.azure-devices.net"]}"#;
        let r: AllocationRequest = serde_json::from_str(body).unwrap();
        let ctx = &r.device_runtime_context;
        assert_eq!(ctx.current_iot_hub_host_name.as_deref(), Some("toasters.azure-devices.net"));
        assert_eq!(ctx.attestation_type(), Some(AttestationType::SymmetricKey));
        assert_eq!(r.linked_hubs.len(), 2);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["deviceRuntimeContext"]["symmetricKey"], serde_json::json!({}));
        assert_eq!(v["deviceRuntimeContext"]["currentDeviceId"], "breakroom499-contoso-tstrsd-007");
        assert_eq!(v["enrollmentGroup"]["enrollmentGroupId"], "contoso-custom-allocated-devices");
        assert!(v.get("individualEnrollment").is_none());
    }

    #[test]
    fn a_response_reads_the_documented_fields_and_ignores_others() {
        let r: AllocationResponse = serde_json::from_str(
            r#"{"iotHubHostName":"hub-a.azure-devices.net","initialTwin":{"tags":{"t":1},
                "properties":{"desired":{"d":2}}},"payload":{"p":3},"extra":true}"#,
        )
        .unwrap();
        assert_eq!(r.iot_hub_host_name.as_deref(), Some("hub-a.azure-devices.net"));
        assert_eq!(r.payload, Some(serde_json::json!({"p": 3})));
        assert_eq!(r.initial_twin.unwrap().tags, Some(serde_json::json!({"t": 1})));
        let empty: AllocationResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.iot_hub_host_name, None);
    }
}
