//! The IoT Hub adapter against a local HTTPS server (real TLS, a test CA) that checks every request
//! against the registry and twin REST API and misbehaves on demand.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read the clock.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use dps_core::hub::{AsyncHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubOp, HubResult};
use dps_hubs::iothub::IotHubDirectory;
use dps_hubs::testing::{FakeIotHub, Fault};
use dps_hubs::Secret;
use serde_json::json;
use std::time::{Duration, Instant};

const HOST: &str = "test-hub.azure-devices.net";

async fn hub() -> (tempfile::TempDir, FakeIotHub, IotHubDirectory) {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeIotHub::start(tmp.path(), HOST).await.unwrap();
    let mut config = fake.config();
    config.max_retry_after = Duration::from_millis(300);
    let dir = IotHubDirectory::new(HOST, config).unwrap();
    (tmp, fake, dir)
}

fn sas(id: &str, primary: &str) -> DeviceIdentity {
    DeviceIdentity::with_keys(id, primary.into(), format!("{primary}2"))
}

fn upsert(identity: DeviceIdentity, twin: DeviceTwin, replace_twin: bool) -> HubOp {
    HubOp::UpsertDevice { hub: HOST.into(), identity, twin, replace_twin }
}

fn twin(tags: serde_json::Value, desired: serde_json::Value, iot_edge: bool) -> DeviceTwin {
    DeviceTwin { tags, desired, iot_edge }
}

fn calls(fake: &FakeIotHub) -> Vec<String> {
    fake.state()
        .requests
        .iter()
        .map(|r| format!("{} {} {} {}", r.method, r.path, r.if_match.as_deref().unwrap_or("-"), r.status))
        .collect()
}

#[tokio::test]
async fn identities_and_twins_follow_the_rest_api() {
    let (_tmp, fake, dir) = hub().await;
    let initial = twin(json!({"site": "a"}), json!({"interval": 5}), true);
    dir.execute(upsert(sas("dev 1", "cGsx"), initial.clone(), true)).await.unwrap();
    assert_eq!(
        calls(&fake),
        ["GET /devices/dev%201 - 404", "PUT /devices/dev%201 - 200", "PATCH /twins/dev%201 * 200"]
    );
    {
        let s = fake.state();
        let d = &s.devices["dev 1"];
        assert_eq!(
            d["authentication"],
            json!({"type": "sas", "symmetricKey": {"primaryKey": "cGsx", "secondaryKey": "cGsx2"}})
        );
        assert_eq!(d["capabilities"]["iotEdge"], true);
        assert_eq!(d["status"], "enabled");
        assert_eq!(s.twins["dev 1"]["tags"], json!({"site": "a"}));
        assert_eq!(s.twins["dev 1"]["properties"]["desired"]["interval"], 5);
    }
    // Read back for migration: tags, desired (without IoT Hub's `$version`), capabilities.
    let read = dir.execute(HubOp::ReadTwin { hub: HOST.into(), device_id: "dev 1".into() }).await.unwrap();
    assert_eq!(read, HubResult::Twin(Some(initial.clone())));
    let none = dir.execute(HubOp::ReadTwin { hub: HOST.into(), device_id: "ghost".into() }).await.unwrap();
    assert_eq!(none, HubResult::Twin(None));

    // Re-provisioned with new keys, twin kept: the update carries the identity's ETag.
    fake.state().requests.clear();
    dir.execute(upsert(sas("dev 1", "bmV3"), twin(json!({"site": "b"}), json!({}), false), false))
        .await
        .unwrap();
    assert_eq!(calls(&fake), ["GET /devices/dev%201 - 200", "PUT /devices/dev%201 \"ETAG1\" 200"]);
    assert_eq!(fake.state().devices["dev 1"]["authentication"]["symmetricKey"]["primaryKey"], "bmV3");
    assert_eq!(fake.state().twins["dev 1"]["tags"], json!({"site": "a"}));
    // Reset: the twin is replaced.
    fake.state().requests.clear();
    dir.execute(upsert(sas("dev 1", "bmV3"), twin(json!({"v": 2}), json!({}), false), true)).await.unwrap();
    assert_eq!(calls(&fake)[2], "PUT /twins/dev%201 * 200");
    assert_eq!(fake.state().twins["dev 1"]["tags"], json!({"v": 2}));

    // X.509: thumbprints (selfSigned) and CA authentication.
    let thumb = DeviceIdentity {
        device_id: "x1".into(),
        authentication: HubAuthentication::SelfSigned {
            primary_thumbprint: "AB12".into(),
            secondary_thumbprint: None,
        },
    };
    dir.execute(upsert(thumb, DeviceTwin::default(), true)).await.unwrap();
    let ca =
        DeviceIdentity { device_id: "x2".into(), authentication: HubAuthentication::CertificateAuthority };
    dir.execute(upsert(ca, DeviceTwin::default(), true)).await.unwrap();
    {
        let s = fake.state();
        assert_eq!(s.devices["x1"]["authentication"]["type"], "selfSigned");
        assert_eq!(s.devices["x1"]["authentication"]["x509Thumbprint"]["primaryThumbprint"], "AB12");
        assert_eq!(s.devices["x2"]["authentication"], json!({"type": "certificateAuthority"}));
    }

    // Delete with If-Match: *, and again (404) is still success.
    fake.state().requests.clear();
    for _ in 0..2 {
        let r =
            dir.execute(HubOp::DeleteDevice { hub: HOST.into(), device_id: "dev 1".into() }).await.unwrap();
        assert_eq!(r, HubResult::Done);
    }
    assert_eq!(calls(&fake), ["DELETE /devices/dev%201 * 204", "DELETE /devices/dev%201 * 404"]);
    assert!(!fake.state().devices.contains_key("dev 1"));
    assert_eq!(fake.state().violations, Vec::<String>::new());
}

#[tokio::test]
async fn throttling_preconditions_and_garbage() {
    let (_tmp, fake, dir) = hub().await;
    // 429 twice, then success: retried after Retry-After (capped in this test at 300 ms).
    fake.fault("GET", "/devices/", Fault::Busy(1));
    fake.fault("GET", "/devices/", Fault::Busy(1));
    let started = Instant::now();
    dir.execute(upsert(sas("d1", "azE="), DeviceTwin::default(), true)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(
        &calls(&fake)[..3],
        ["GET /devices/d1 - 429", "GET /devices/d1 - 429", "GET /devices/d1 - 404"]
    );
    // 429 on every attempt: the operation fails, naming the status.
    for _ in 0..3 {
        fake.fault("GET", "/twins/", Fault::Busy(1));
    }
    let err = dir.execute(HubOp::ReadTwin { hub: HOST.into(), device_id: "d1".into() }).await.unwrap_err();
    assert!(err.message.contains("429"), "{err}");

    // 412 on the update (someone changed the identity meanwhile): read again, then succeed.
    fake.state().requests.clear();
    fake.fault("PUT", "/devices/d1", Fault::Status(412));
    dir.execute(upsert(sas("d1", "azI="), DeviceTwin::default(), false)).await.unwrap();
    assert_eq!(
        calls(&fake),
        [
            "GET /devices/d1 - 200",
            "PUT /devices/d1 \"ETAG1\" 412",
            "GET /devices/d1 - 200",
            "PUT /devices/d1 \"ETAG1\" 200"
        ]
    );
    assert_eq!(fake.state().devices["d1"]["authentication"]["symmetricKey"]["primaryKey"], "azI=");
    // 412 twice: fails.
    fake.fault("PUT", "/devices/d1", Fault::Status(412));
    fake.fault("PUT", "/devices/d1", Fault::Status(412));
    let err = dir.execute(upsert(sas("d1", "azM="), DeviceTwin::default(), false)).await.unwrap_err();
    assert!(err.message.contains("412"), "{err}");

    // A garbage answer is an error, and nothing was written.
    fake.fault("GET", "/devices/g1", Fault::Garbage);
    let err = dir.execute(upsert(sas("g1", "azE="), DeviceTwin::default(), true)).await.unwrap_err();
    assert!(err.message.contains("not a JSON object"), "{err}");
    assert!(!fake.state().devices.contains_key("g1"));
    fake.fault("GET", "/twins/d1", Fault::Garbage);
    assert!(dir.execute(HubOp::ReadTwin { hub: HOST.into(), device_id: "d1".into() }).await.is_err());

    // The twin cannot be written: the new identity is deleted again (no half-written device).
    fake.fault("PATCH", "/twins/t1", Fault::Status(500));
    let err = dir
        .execute(upsert(sas("t1", "azE="), twin(json!({"a": 1}), json!({}), false), true))
        .await
        .unwrap_err();
    assert!(err.message.contains("500"), "{err}");
    assert!(!fake.state().devices.contains_key("t1"));
    // An updated identity is put back as it was.
    fake.fault("PUT", "/twins/d1", Fault::Status(503));
    fake.fault("PUT", "/twins/d1", Fault::Status(503));
    fake.fault("PUT", "/twins/d1", Fault::Status(503));
    assert!(dir.execute(upsert(sas("d1", "bmV3"), DeviceTwin::default(), true)).await.is_err());
    assert_eq!(fake.state().devices["d1"]["authentication"]["symmetricKey"]["primaryKey"], "azI=");

    // A 404 on delete is success; other failures are errors.
    fake.fault("DELETE", "/devices/d1", Fault::Status(500));
    assert!(dir.execute(HubOp::DeleteDevice { hub: HOST.into(), device_id: "d1".into() }).await.is_err());
    assert_eq!(fake.state().violations, Vec::<String>::new());
}

#[tokio::test]
async fn wrong_key_untrusted_certificate_and_a_hub_that_is_down() {
    let (tmp, fake, _dir) = hub().await;
    // A key the hub does not know: 401, an error that does not show the key.
    let mut config = fake.config();
    config.connection_string =
        Secret::new(format!("HostName={HOST};SharedAccessKeyName=iothubowner;SharedAccessKey=CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="));
    let wrong = IotHubDirectory::new(HOST, config).unwrap();
    let err = wrong.execute(upsert(sas("d1", "azE="), DeviceTwin::default(), true)).await.unwrap_err();
    assert!(err.message.contains("401") && !err.message.contains("CQkJCQkJCQkJCQkJ"), "{err}");
    assert!(fake.state().devices.is_empty());
    assert!(!format!("{wrong:?}").contains("CQkJCQkJCQkJCQkJ"));

    // A certificate from a CA the adapter does not trust: TLS fails.
    let other = tempfile::tempdir().unwrap();
    let stranger = FakeIotHub::start(other.path(), HOST).await.unwrap();
    let mut config = fake.config();
    config.ca_file = Some(stranger.ca_file.clone());
    let untrusted = IotHubDirectory::new(HOST, config).unwrap();
    let err =
        untrusted.execute(HubOp::ReadTwin { hub: HOST.into(), device_id: "d1".into() }).await.unwrap_err();
    assert!(err.message.contains("TLS"), "{err}");

    // Down: nothing listens.
    let port = dps_hubs::testing::free_port().unwrap();
    let mut config = fake.config();
    config.endpoint = Some(format!("127.0.0.1:{port}"));
    let down = IotHubDirectory::new(HOST, config).unwrap();
    let err =
        down.execute(HubOp::DeleteDevice { hub: HOST.into(), device_id: "d1".into() }).await.unwrap_err();
    assert!(err.message.contains("cannot connect"), "{err}");
    drop(tmp);
}
