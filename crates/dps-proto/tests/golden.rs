//! Golden tests: the worked examples of the spec's Appendix A and §1.6 parse and re-emit unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_proto::model::*;
use serde_json::{json, Value};

fn same_after_round_trip<T: serde::Serialize + for<'de> serde::Deserialize<'de>>(text: &str) -> T {
    let original: Value = serde_json::from_str(text).unwrap();
    let parsed: T = serde_json::from_str(text).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), original, "re-emitted JSON differs for {text}");
    parsed
}

#[test]
fn a1_register_202() {
    let s: RegistrationOperationStatus = same_after_round_trip(
        r#"{"operationId":"5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550","status":"assigning"}"#,
    );
    assert_eq!(s.status, RegistrationStatus::Assigning);
    assert!(s.registration_state.is_none());
}

#[test]
fn a1_assigned_200() {
    let s: RegistrationOperationStatus = same_after_round_trip(
        r#"{"operationId":"5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550","status":"assigned","registrationState":{"registrationId":"my-symkey-device",
 "createdDateTimeUtc":"2022-08-31T22:02:50.5163352Z","assignedHub":"MyExampleHub.azure-devices.net","deviceId":"my-symkey-device",
 "status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2022-08-31T22:02:50.7370676Z",
 "etag":"IjY5MDAzNTUyLTAwMDAtMDMwMC0wMDAwLTYzMGZkYThhMDAwMCI="}}"#,
    );
    let r = s.registration_state.unwrap();
    assert_eq!(r.assigned_hub.as_deref(), Some("MyExampleHub.azure-devices.net"));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::InitialAssignment));
}

#[test]
fn a1_register_request() {
    let r: DeviceRegistration = same_after_round_trip(r#"{"registrationId": "my-symkey-device"}"#);
    assert_eq!(r.registration_id.as_deref(), Some("my-symkey-device"));
}

#[test]
fn a2_mqtt_flow() {
    let _: DeviceRegistration = same_after_round_trip(r#"{"registrationId":"paho-sample-device1"}"#);
    let s: RegistrationOperationStatus = same_after_round_trip(
        r#"{"operationId":"4.d0a671905ea5b2c8.e7173b7b-0e54-4aa0-9d20-aeb1b89e6c7d","status":"assigning","registrationState":{"registrationId":"paho-sample-device1","status":"assigning"}}"#,
    );
    assert_eq!(s.registration_state.unwrap().status, RegistrationStatus::Assigning);
    let s: RegistrationOperationStatus = same_after_round_trip(
        r#"{"operationId":"4.d0a671905ea5b2c8.e7173b7b-0e54-4aa0-9d20-aeb1b89e6c7d","status":"assigned","registrationState":{"x509":{},"registrationId":"paho-sample-device1",
    "createdDateTimeUtc":"2020-04-10T03:11:13.0276997Z","assignedHub":"contoso.azure-devices.net","deviceId":"paho-sample-device1",
    "status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2020-04-10T03:11:13.2096201Z",
    "etag":"IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI="}}"#,
    );
    assert_eq!(s.registration_state.unwrap().x509, Some(X509RegistrationResult::default()));
    let e: dps_proto::ErrorBody = same_after_round_trip(
        r#"{"errorCode":401002,"trackingId":"8ad0463c-0000-0000-0000-000000000000","message":"Invalid certificate.","timestampUtc":"2020-04-10T05:24:22.4718526Z"}"#,
    );
    assert_eq!(e.error_code, 401002);
}

#[test]
fn a3_tpm_request_and_challenge() {
    let r: DeviceRegistration = same_after_round_trip(
        r#"{"registrationId":"6rek5qncnygnkzflohxz4u6zlfly6ktm4klsc7xrbgvesqyllnfa","tpm":{"endorsementKey":"AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEA","storageRootKey":"ARoAAQALAAMEcgAAAAYAgABDABAIAAAAAAABAA"}}"#,
    );
    assert!(r.tpm.unwrap().endorsement_key.unwrap().starts_with("AToAAQALAAMAsgAgg3GX"));
    let _: TpmRegistrationChallenge = same_after_round_trip(
        r#"{"authenticationKey":"ADQAIA==","keyName":"registration","message":"challenge"}"#,
    );
}

#[test]
fn custom_allocation_group_example() {
    let g: EnrollmentGroup = same_after_round_trip(
        r#"{"enrollmentGroupId":"contoso-custom-allocated-devices","attestation":{"type":"symmetricKey"},
 "capabilities":{"iotEdge":false},"etag":"\"13003fea-0000-0300-0000-62d1d5e50000\"","provisioningStatus":"enabled",
 "reprovisionPolicy":{"updateHubAssignment":true,"migrateDeviceData":true},
 "createdDateTimeUtc":"2022-07-05T21:27:16.8123235Z","lastUpdatedDateTimeUtc":"2022-07-05T21:27:16.8123235Z",
 "allocationPolicy":"custom","iotHubs":["contoso-toasters-hub-1098.azure-devices.net","contoso-heatpumps-hub-1098.azure-devices.net"],
 "customAllocationDefinition":{"webhookUrl":"https://example.invalid/api/HttpTrigger1","apiVersion":"2021-10-01"}}"#,
    );
    assert_eq!(g.allocation_policy, Some(AllocationPolicy::Custom));
}

#[test]
fn registration_state_service_view() {
    let _: DeviceRegistrationState = same_after_round_trip(
        r#"{"registrationId":"my-symkey-device","createdDateTimeUtc":"2022-08-31T22:02:50.5163352Z","assignedHub":"MyExampleHub.azure-devices.net","deviceId":"my-symkey-device","status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2022-08-31T22:02:50.7370676Z","etag":"IjY5MDAzNTUyLTAwMDAtMDMwMC0wMDAwLTYzMGZkYThhMDAwMCI=","payload":{"a":1}}"#,
    );
    let failed: DeviceRegistrationResult = serde_json::from_value(json!({
        "registrationId": "d", "status": "failed", "errorCode": 400207, "errorMessage": "Custom allocation failed.",
        "lastUpdatedDateTimeUtc": "2022-08-31T22:02:50.7370676Z"
    }))
    .unwrap();
    assert_eq!(failed.error_code, Some(400207));
}
