//! Real hub adapters through the reference server, and linked hubs changed at run time.
//!
//! A real Mosquitto (Debian's, with its dynamic-security plugin) runs on a free loopback port: a device
//! provisioned through the server connects to it with its key and publishes; an unprovisioned device and
//! a device that moved to another hub are refused; a broker that is down or refuses the admin credential
//! ends the registration `failed` with 500002. Linked hubs are added, changed and removed through
//! `/linkedHubs` and the CLI without a restart, and a restart keeps them.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::sas::{ConnectionString, SymmetricKey};
use dps_core::{AccessPolicy, LinkedHub, Rights};
use dps_hubs::testing::{Broker, Device, ADMIN_USER};
use dps_server::admin::{CallError, EnrollmentSettings, Kind, Reprovision, ServiceClient};
use dps_server::linked::AdapterSettings;
use dps_server::server::RunningServer;
use serde_json::{json, Value};
use std::time::Duration;

const LOCAL: &str = "hub-1.localhost";
const BROKER: &str = "broker.localhost";

/// Registers `id` with `key` over HTTPS and polls to the end; the final operation status.
async fn provision_with(server: &RunningServer, id: &str, key: &SymmetricKey) -> Value {
    let http = https(server);
    let token = device_token(key, SCOPE, id, 3600);
    let put = http
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/{id}/register?api-version=2021-10-01"),
            &[("authorization", token.clone())],
            format!(r#"{{"registrationId":"{id}"}}"#).into_bytes(),
        )
        .await
        .unwrap();
    if put.status != 202 {
        return put.json().unwrap();
    }
    let op = put.json().unwrap()["operationId"].as_str().unwrap().to_owned();
    for _ in 0..500 {
        let get = http
            .request(
                "GET",
                &format!("/{SCOPE}/registrations/{id}/operations/{op}?api-version=2021-10-01"),
                &[("authorization", token.clone())],
                Vec::new(),
            )
            .await
            .unwrap();
        if get.status == 200 {
            return get.json().unwrap();
        }
        assert_eq!(get.status, 202, "{}", String::from_utf8_lossy(&get.body));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} never finished");
}

async fn provision(server: &RunningServer, id: &str) -> Value {
    provision_with(server, id, &device_key()).await
}

fn static_on(hub: &str) -> EnrollmentSettings {
    EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        iot_hubs: Some(vec![hub.into()]),
        allocation_policy: Some("static".into()),
        reprovision: Some(Reprovision::ReprovisionAndMigrateData),
        ..EnrollmentSettings::default()
    }
}

fn mosquitto(broker: &Broker, password: &str) -> AdapterSettings {
    AdapterSettings {
        kind: Some("mosquitto".into()),
        broker: Some(format!("127.0.0.1:{}", broker.port)),
        admin_username: Some(ADMIN_USER.into()),
        admin_password: Some(password.into()),
        timeout_secs: Some(5),
        ..AdapterSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_provisioned_to_mosquitto_connects_and_publishes_and_is_refused_once_moved() {
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(broker_dir.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.linked_hubs =
        vec![LinkedHub::new(LOCAL, None, None).unwrap(), LinkedHub::new(BROKER, None, Some(false)).unwrap()];
    config.hub_adapters.insert(BROKER.into(), mosquitto(&broker, &broker.admin_password));
    assert!(!format!("{config:?}").contains(&broker.admin_password), "the config's Debug hides the password");
    let server = start(config).await;
    let svc = service(&server);

    let mut settings = static_on(BROKER);
    settings.initial_twin_tags = Some(json!({"site": "north"}));
    settings.initial_twin_properties = Some(json!({"interval": 30}));
    svc.create(Kind::Enrollment, "sensor-1", &settings).await.unwrap();
    let first = provision(&server, "sensor-1").await;
    assert_eq!(first["status"], "assigned", "{first}");
    assert_eq!(first["registrationState"]["assignedHub"], BROKER);
    assert_eq!(first["registrationState"]["deviceId"], "sensor-1");

    // The device connects to its broker with the key it provisioned with, reads its twin, publishes.
    let key = device_key().to_base64();
    let mut watcher =
        Device::connect(broker.port, "watcher", ADMIN_USER, &broker.admin_password).await.unwrap();
    assert!(watcher.subscribe("devices/+/messages/events/#").await.unwrap());
    let mut device = Device::connect(broker.port, "sensor-1", "sensor-1", &key).await.unwrap();
    assert!(device.subscribe("devices/sensor-1/twin").await.unwrap());
    let (_, twin) = device.next_message(Duration::from_secs(5)).await.unwrap().expect("the retained twin");
    let twin: Value = serde_json::from_slice(&twin).unwrap();
    assert_eq!(twin["tags"], json!({"site": "north"}));
    assert_eq!(twin["properties"]["desired"], json!({"interval": 30}));
    device.publish("devices/sensor-1/messages/events/", b"21.5").await.unwrap();
    let (topic, body) = watcher.next_message(Duration::from_secs(5)).await.unwrap().expect("the telemetry");
    assert_eq!((topic.as_str(), body.as_slice()), ("devices/sensor-1/messages/events/", &b"21.5"[..]));
    // Not provisioned: refused.
    assert!(Device::connect(broker.port, "ghost", "ghost", &key).await.is_err());

    // The device moves to the local hub: its twin migrates from the broker, its broker account goes.
    svc.update(Kind::Enrollment, "sensor-1", &static_on(LOCAL), None).await.unwrap();
    let moved = provision(&server, "sensor-1").await;
    assert_eq!(moved["registrationState"]["assignedHub"], LOCAL, "{moved}");
    assert_eq!(moved["registrationState"]["substatus"], "deviceDataMigrated");
    let local = server.state.hubs.device(LOCAL, "sensor-1").unwrap();
    assert_eq!(local.twin.tags, json!({"site": "north"}));
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "the broker closed the moved device's session"
    );
    assert!(Device::connect(broker.port, "sensor-1", "sensor-1", &key).await.is_err());

    // A hub whose broker refuses the admin credential (linked at run time): failed, 500002, nothing written.
    svc.set_linked_hub("bad-admin.localhost", &serde_json::to_value(mosquitto(&broker, "wrong")).unwrap())
        .await
        .unwrap();
    svc.create(Kind::Enrollment, "sensor-2", &static_on("bad-admin.localhost")).await.unwrap();
    let refused = provision(&server, "sensor-2").await;
    let code =
        |v: &Value| (v["status"].as_str().map(str::to_owned), v["registrationState"]["errorCode"].as_u64());
    assert_eq!(code(&refused), (Some("failed".into()), Some(500002)), "{refused}");
    assert!(Device::connect(broker.port, "sensor-2", "sensor-2", &key).await.is_err());
    let state = svc.registration("sensor-2").await.unwrap();
    assert_eq!(state["errorCode"], 500002);

    // The broker is down: failed with 500002 too, and the server keeps serving.
    svc.create(Kind::Enrollment, "sensor-3", &static_on(BROKER)).await.unwrap();
    drop(watcher);
    drop(device);
    drop(broker);
    let down = provision(&server, "sensor-3").await;
    assert_eq!(code(&down), (Some("failed".into()), Some(500002)), "{down}");
    // …and a device on the broker can still move off it (its old hub does not have to answer).
    svc.create(Kind::Enrollment, "sensor-4", &static_on(LOCAL)).await.unwrap();
    assert_eq!(provision(&server, "sensor-4").await["status"], "assigned");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_off_a_broker_that_is_down() {
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(broker_dir.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.linked_hubs =
        vec![LinkedHub::new(LOCAL, None, None).unwrap(), LinkedHub::new(BROKER, None, Some(false)).unwrap()];
    config.hub_adapters.insert(BROKER.into(), mosquitto(&broker, &broker.admin_password));
    let server = start(config).await;
    let svc = service(&server);
    let mut settings = static_on(BROKER);
    settings.initial_twin_tags = Some(json!({"v": 1}));
    svc.create(Kind::Enrollment, "mover", &settings).await.unwrap();
    assert_eq!(provision(&server, "mover").await["registrationState"]["assignedHub"], BROKER);
    drop(broker);
    let mut moved = static_on(LOCAL);
    moved.initial_twin_tags = Some(json!({"v": 1}));
    svc.update(Kind::Enrollment, "mover", &moved, None).await.unwrap();
    let r = provision(&server, "mover").await;
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["registrationState"]["assignedHub"], LOCAL);
    // The twin could not be read from the broker: the device starts from the initial twin (a reset).
    assert_eq!(r["registrationState"]["substatus"], "deviceDataReset");
    assert_eq!(server.state.hubs.device(LOCAL, "mover").unwrap().twin.tags, json!({"v": 1}));
    server.shutdown().await.unwrap();
}

fn api_error(e: CallError) -> (u16, u64) {
    match e {
        CallError::Api(e) => (e.status, e.body["errorCode"].as_u64().unwrap_or(0)),
        CallError::Transport(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_hubs_change_at_run_time_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let reader_key = SymmetricKey::from_bytes(vec![5; 32]);
    let make_config = || {
        let mut c = config(dir.path());
        c.access_policies.push(AccessPolicy {
            key_name: "reader".into(),
            primary_key: reader_key.clone(),
            secondary_key: reader_key.clone(),
            rights: Rights::ENROLLMENT_READ,
        });
        c
    };
    let server = start(make_config()).await;
    let svc = service(&server);
    let listed = svc.linked_hubs().await.unwrap();
    assert_eq!(
        listed,
        json!([{"hostName": LOCAL, "allocationWeight": 1, "applyAllocationPolicy": true, "kind": "local"}])
    );

    // A new hub, used by the next registration without a restart.
    let added = svc
        .set_linked_hub("HUB-2.localhost", &json!({"allocationWeight": 5, "location": "westeurope"}))
        .await
        .unwrap();
    assert_eq!(
        added,
        json!({"hostName": "hub-2.localhost", "allocationWeight": 5, "applyAllocationPolicy": true,
                              "location": "westeurope", "kind": "local"})
    );
    svc.create(Kind::Enrollment, "dev-2", &static_on("hub-2.localhost")).await.unwrap();
    assert_eq!(provision(&server, "dev-2").await["registrationState"]["assignedHub"], "hub-2.localhost");
    // An update changes only what it names.
    let updated =
        svc.set_linked_hub("hub-2.localhost", &json!({"applyAllocationPolicy": false})).await.unwrap();
    assert_eq!(
        (updated["allocationWeight"].as_u64(), updated["location"].as_str()),
        (Some(5), Some("westeurope"))
    );
    assert_eq!(updated["applyAllocationPolicy"], false);

    // A mosquitto hub: its password is sealed at rest and never shown.
    let password = "s3cret-admin-pw";
    let shown = svc
        .set_linked_hub(
            "mqtt.localhost",
            &json!({"kind": "mosquitto", "broker": "127.0.0.1:1", "adminUsername": "admin", "adminPassword": password}),
        )
        .await
        .unwrap();
    assert_eq!(shown["credential"], "set");
    assert!(!shown.to_string().contains(password));
    let file = std::fs::read_to_string(dir.path().join("linked-hubs.json")).unwrap();
    assert!(!file.contains(password) && file.contains("sealed:v1:"), "{file}");
    assert!(!svc.linked_hubs().await.unwrap().to_string().contains(password));

    // Bad input is refused with its code, and changes nothing.
    for (host, body) in [
        ("hub-3.localhost", json!({"allocationWeight": 0})),
        ("hub-3.localhost", json!({"weight": 2})),
        ("hub-3.localhost", json!({"kind": "mosquitto"})),
        ("hub-3.localhost", json!({"kind": "iothub", "connectionString": "HostName=x"})),
        ("bad host", json!({})),
        ("hub-3.localhost", json!({"hostName": "other.localhost"})),
    ] {
        let err = svc.set_linked_hub(host, &body).await.unwrap_err();
        assert_eq!(api_error(err), (400, 400000), "{host} {body}");
    }
    assert_eq!(svc.linked_hubs().await.unwrap().as_array().unwrap().len(), 3);
    // A policy without ServiceConfig may not touch them.
    let reader = ServiceClient::new(
        https(&server),
        ConnectionString {
            host_name: "localhost".into(),
            key_name: "reader".into(),
            key: reader_key.clone(),
        },
    );
    assert_eq!(api_error(reader.linked_hubs().await.unwrap_err()), (403, 403001));
    assert_eq!(api_error(reader.set_linked_hub("x.localhost", &json!({})).await.unwrap_err()), (403, 403001));

    // Removed: gone for the next registration.
    svc.remove_linked_hub("hub-2.localhost").await.unwrap();
    assert_eq!(api_error(svc.linked_hub("hub-2.localhost").await.unwrap_err()), (404, 404000));
    assert_eq!(api_error(svc.remove_linked_hub("hub-2.localhost").await.unwrap_err()), (404, 404000));
    let again = provision(&server, "dev-2").await;
    assert_ne!(again["status"], "assigned", "{again}");

    // At most 50 linked hubs.
    for i in 0..48 {
        svc.set_linked_hub(&format!("fill-{i}.localhost"), &json!({})).await.unwrap();
    }
    assert_eq!(
        api_error(svc.set_linked_hub("one-too-many.localhost", &json!({})).await.unwrap_err()),
        (403, 403002)
    );
    let before = svc.linked_hubs().await.unwrap();
    assert_eq!(before.as_array().unwrap().len(), 50);
    server.shutdown().await.unwrap();

    // A restart keeps the set (credential included); the CLI shows it.
    let server = start(make_config()).await;
    assert_eq!(service(&server).linked_hubs().await.unwrap(), before);
    let data_dir = dir.path().to_str().unwrap();
    let mqtt = cli_json(&["hubs", "show", "mqtt.localhost", "--data-dir", data_dir]);
    assert_eq!((mqtt["kind"].as_str(), mqtt["credential"].as_str()), (Some("mosquitto"), Some("set")));
    let removed = cli(&["hubs", "remove", "fill-0.localhost", "--data-dir", data_dir]);
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let set = cli_json(&[
        "hubs",
        "set",
        "hub-2.localhost",
        "--weight",
        "7",
        "--location",
        "northeurope",
        "--data-dir",
        data_dir,
    ]);
    assert_eq!((set["allocationWeight"].as_u64(), set["location"].as_str()), (Some(7), Some("northeurope")));
    let listed = cli_json(&["hubs", "list", "--data-dir", data_dir]);
    assert_eq!(listed.as_array().unwrap().len(), 50);
    assert!(!listed.to_string().contains("fill-0.localhost"));
    // The re-linked hub takes registrations again.
    assert_eq!(provision(&server, "dev-2").await["registrationState"]["assignedHub"], "hub-2.localhost");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_provisioned_to_an_iot_hub_is_registered_there_and_removed_when_it_moves() {
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = dps_hubs::testing::FakeIotHub::start(hub_dir.path(), "my-hub.azure-devices.net").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let svc = service(&server);
    svc.set_linked_hub(
        "my-hub.azure-devices.net",
        &json!({"kind": "iothub", "connectionString": hub.connection_string, "endpoint": hub.addr.to_string(),
                "caFile": hub.ca_file, "applyAllocationPolicy": false}),
    )
    .await
    .unwrap();
    let mut settings = static_on("my-hub.azure-devices.net");
    settings.initial_twin_tags = Some(json!({"fleet": "a"}));
    settings.edge_enabled = Some(true);
    svc.create(Kind::Enrollment, "cloud-1", &settings).await.unwrap();
    let r = provision(&server, "cloud-1").await;
    assert_eq!(r["registrationState"]["assignedHub"], "my-hub.azure-devices.net", "{r}");
    {
        let state = hub.state();
        let device = &state.devices["cloud-1"];
        assert_eq!(device["authentication"]["type"], "sas");
        assert_eq!(device["authentication"]["symmetricKey"]["primaryKey"], device_key().to_base64());
        assert_eq!(device["capabilities"]["iotEdge"], true);
        assert_eq!(state.twins["cloud-1"]["tags"], json!({"fleet": "a"}));
        assert_eq!(state.violations, Vec::<String>::new());
    }
    // Moved to the local hub: the twin migrates from IoT Hub, the identity there is deleted.
    svc.update(Kind::Enrollment, "cloud-1", &static_on(LOCAL), None).await.unwrap();
    let moved = provision(&server, "cloud-1").await;
    assert_eq!(moved["registrationState"]["substatus"], "deviceDataMigrated", "{moved}");
    assert_eq!(server.state.hubs.device(LOCAL, "cloud-1").unwrap().twin.tags, json!({"fleet": "a"}));
    assert!(!hub.state().devices.contains_key("cloud-1"));
    // The hub throttling past the retries: failed with 500002.
    for _ in 0..3 {
        hub.fault("GET", "/devices/cloud-2", dps_hubs::testing::Fault::Busy(0));
    }
    svc.create(Kind::Enrollment, "cloud-2", &static_on("my-hub.azure-devices.net")).await.unwrap();
    let throttled = provision(&server, "cloud-2").await;
    assert_eq!(throttled["registrationState"]["errorCode"], 500002, "{throttled}");
    assert!(!hub.state().devices.contains_key("cloud-2"));
    server.shutdown().await.unwrap();
}
