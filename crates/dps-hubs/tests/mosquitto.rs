//! The Mosquitto adapter against a real broker (Debian's `mosquitto` with its dynamic-security plugin) on a
//! free loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read the clock.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use dps_core::hub::{AsyncHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubOp, HubResult};
use dps_hubs::mosquitto::{twin_topic, MosquittoConfig, MosquittoDirectory};
use dps_hubs::testing::{Broker, Device, ADMIN_USER};
use dps_hubs::Secret;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HUB: &str = "broker.local";

fn upsert(id: &str, key: &str, twin: DeviceTwin, replace_twin: bool) -> HubOp {
    HubOp::UpsertDevice {
        hub: HUB.into(),
        identity: DeviceIdentity::with_keys(id, key.into(), format!("{key}-2")),
        twin,
        replace_twin,
    }
}

fn twin(tags: Value, desired: Value) -> DeviceTwin {
    DeviceTwin { tags, desired, iot_edge: false }
}

async fn read_twin(dir: &MosquittoDirectory, id: &str) -> Option<DeviceTwin> {
    match dir.execute(HubOp::ReadTwin { hub: HUB.into(), device_id: id.into() }).await.unwrap() {
        HubResult::Twin(t) => t,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_provisioned_device_connects_publishes_and_reads_its_twin_and_a_moved_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path()).unwrap();
    let dir = MosquittoDirectory::new(HUB, broker.admin_config());
    let initial = twin(json!({"site": "a"}), json!({"interval": 5}));
    let first = dir.execute(upsert("dev-1", "key-one", initial.clone(), true)).await;
    assert_eq!(first.unwrap_or_else(|e| panic!("{e}\n{}", broker.log())), HubResult::Done);
    assert_eq!(
        dir.execute(upsert("dev-2", "key-two", DeviceTwin::default(), true)).await.unwrap(),
        HubResult::Done
    );

    // A watcher (the admin account may read everything) sees what devices publish.
    let mut watcher =
        Device::connect(broker.port, "watcher", ADMIN_USER, &broker.admin_password).await.unwrap();
    assert!(watcher.subscribe("devices/+/messages/events/#").await.unwrap());

    // The device logs in with its primary key, reads its retained twin and publishes telemetry.
    let mut device = Device::connect(broker.port, "dev-1", "dev-1", "key-one").await.unwrap();
    assert!(device.subscribe(&twin_topic("dev-1")).await.unwrap());
    let (topic, payload) = device.next_message(Duration::from_secs(5)).await.unwrap().expect("retained twin");
    assert_eq!(topic, "devices/dev-1/twin");
    let doc: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        doc,
        json!({"tags": {"site": "a"}, "properties": {"desired": {"interval": 5}},
                           "capabilities": {"iotEdge": false}})
    );
    device.publish("devices/dev-1/messages/events/telemetry", b"{\"t\":21}").await.unwrap();
    let (topic, payload) = watcher.next_message(Duration::from_secs(5)).await.unwrap().expect("telemetry");
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/dev-1/messages/events/telemetry", &b"{\"t\":21}"[..])
    );
    // Its role covers its own topics only: another device's telemetry topic is dropped, its twin refused.
    device.publish("devices/dev-2/messages/events/telemetry", b"spoof").await.unwrap();
    assert_eq!(watcher.next_message(Duration::from_millis(500)).await.unwrap(), None);
    assert!(!device.subscribe(&twin_topic("dev-2")).await.unwrap());
    assert!(!device.subscribe("devices/#").await.unwrap());

    // Unprovisioned devices and wrong keys are refused at CONNECT.
    assert!(Device::connect(broker.port, "ghost", "ghost", "key-one").await.is_err());
    assert!(Device::connect(broker.port, "dev-1b", "dev-1", "key-two").await.is_err());

    // The twin reads back for migration; an unknown device has none.
    assert_eq!(read_twin(&dir, "dev-1").await, Some(initial.clone()));
    assert_eq!(read_twin(&dir, "ghost").await, None);

    // Re-provisioned with new keys and without replacing the twin: the twin stays, the old key stops working.
    dir.execute(upsert("dev-1", "key-new", twin(json!({"site": "b"}), json!({})), false)).await.unwrap();
    assert_eq!(read_twin(&dir, "dev-1").await, Some(initial.clone()));
    assert!(Device::connect(broker.port, "dev-1c", "dev-1", "key-one").await.is_err());
    drop(Device::connect(broker.port, "dev-1d", "dev-1", "key-new").await.unwrap());
    // Replacing the twin (reset policy) writes the new one.
    let reset = twin(json!({"site": "c"}), json!({"mode": "reset"}));
    dir.execute(upsert("dev-1", "key-new", reset.clone(), true)).await.unwrap();
    assert_eq!(read_twin(&dir, "dev-1").await, Some(reset));

    // The device moves away: its account goes (a connected session is closed), so does its twin.
    let mut connected = Device::connect(broker.port, "dev-1e", "dev-1", "key-new").await.unwrap();
    assert_eq!(
        dir.execute(HubOp::DeleteDevice { hub: HUB.into(), device_id: "dev-1".into() }).await.unwrap(),
        HubResult::Done
    );
    assert!(connected.closed_within(Duration::from_secs(5)).await, "the moved device is disconnected");
    assert!(Device::connect(broker.port, "dev-1f", "dev-1", "key-new").await.is_err());
    assert_eq!(read_twin(&dir, "dev-1").await, None);
    // Deleting again is not an error.
    dir.execute(HubOp::DeleteDevice { hub: HUB.into(), device_id: "dev-1".into() }).await.unwrap();
    // An X.509 device gets an account without a password (the broker authenticates its certificate).
    let x509 = HubOp::UpsertDevice {
        hub: HUB.into(),
        identity: DeviceIdentity {
            device_id: "cert-dev".into(),
            authentication: HubAuthentication::CertificateAuthority,
        },
        twin: DeviceTwin::default(),
        replace_twin: true,
    };
    dir.execute(x509).await.unwrap();
    assert_eq!(read_twin(&dir, "cert-dev").await, Some(twin(json!({}), json!({}))));
    assert!(Device::connect(broker.port, "cert-dev", "cert-dev", "").await.is_err());
}

#[tokio::test]
async fn a_broker_that_is_down_or_refuses_the_admin_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path()).unwrap();
    // Wrong admin password: refused, nothing written.
    let mut wrong = broker.admin_config();
    wrong.admin_password = Secret::new("not-the-password");
    let dir = MosquittoDirectory::new(HUB, wrong);
    let err = dir.execute(upsert("dev-1", "k", DeviceTwin::default(), true)).await.unwrap_err();
    assert!(err.message.contains("refused the admin credential"), "{err}");
    assert!(!err.message.contains("not-the-password"));
    assert!(Device::connect(broker.port, "dev-1", "dev-1", "k").await.is_err());
    let good = MosquittoDirectory::new(HUB, broker.admin_config());
    assert_eq!(read_twin(&good, "dev-1").await, None, "no half-written identity");

    // Down: nothing listens on the port. The error comes fast and names the broker.
    let port = broker.port;
    drop(broker);
    let down = MosquittoDirectory::new(
        HUB,
        MosquittoConfig {
            host: "127.0.0.1".into(),
            port,
            admin_username: ADMIN_USER.into(),
            admin_password: Secret::new("x"),
            timeout: Duration::from_secs(3),
        },
    );
    let started = Instant::now();
    for op in [
        upsert("dev-1", "k", DeviceTwin::default(), true),
        HubOp::ReadTwin { hub: HUB.into(), device_id: "dev-1".into() },
        HubOp::DeleteDevice { hub: HUB.into(), device_id: "dev-1".into() },
    ] {
        let err = down.execute(op).await.unwrap_err();
        assert_eq!(err.hub, HUB);
        assert!(err.message.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(9));
}
