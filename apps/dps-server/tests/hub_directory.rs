//! The durable hub directory and usage metering: a device's twin survives a server restart and migrates to
//! its new hub (shown by `dps-server admin twin`), and billable operations are counted (Prometheus) and
//! persisted per scope and day (`dps-server admin usage`), a register that ends `failed` as a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::{BillableOperation, LinkedHub};
use dps_server::admin::{EnrollmentSettings, Kind, Reprovision};
use dps_server::server::RunningServer;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dps-server");

fn two_hub_config(dir: &Path) -> dps_server::config::ServerConfig {
    let mut c = config(dir);
    c.linked_hubs = ["hub-1.localhost", "hub-2.localhost"]
        .iter()
        .map(|h| LinkedHub {
            host_name: (*h).to_owned(),
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
        })
        .collect();
    c
}

fn admin(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["admin"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--data-dir", dir.to_str().unwrap()]);
    all.extend_from_slice(&args[1..]);
    let out = Command::new(BIN).args(&all).env_clear().output().unwrap();
    assert!(
        out.status.success(),
        "{all:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Registers `id` over HTTPS and polls to the end; returns the final operation status.
async fn provision(server: &RunningServer, id: &str) -> Value {
    let http = https(server);
    let token = device_token(&device_key(), SCOPE, id, 3600);
    let put = http
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/{id}/register?api-version=2021-10-01"),
            &[("authorization", token.clone())],
            format!(r#"{{"registrationId":"{id}"}}"#).into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 202, "{}", String::from_utf8_lossy(&put.body));
    let op = put.json().unwrap()["operationId"].as_str().unwrap().to_owned();
    for _ in 0..200 {
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
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{id} never finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_survives_restart_and_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(two_hub_config(dir.path())).await;
    let settings = EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        iot_hubs: Some(vec!["hub-1.localhost".into()]),
        allocation_policy: Some("static".into()),
        reprovision: Some(Reprovision::ReprovisionAndMigrateData),
        initial_twin_tags: Some(json!({"site": "north", "floor": 3})),
        initial_twin_properties: Some(json!({"telemetryInterval": 30})),
        edge_enabled: Some(true),
        ..EnrollmentSettings::default()
    };
    service(&server).create(Kind::Enrollment, "mig-1", &settings).await.unwrap();
    let first = provision(&server, "mig-1").await;
    assert_eq!(first["status"], "assigned", "{first}");
    assert_eq!(first["registrationState"]["assignedHub"], "hub-1.localhost");
    assert_eq!(first["registrationState"]["substatus"], "initialAssignment");
    server.shutdown().await.unwrap();

    // After a restart the twin is still on hub-1 and moves to hub-2 with the device.
    let server = start(two_hub_config(dir.path())).await;
    let moved = EnrollmentSettings {
        iot_hubs: Some(vec!["hub-2.localhost".into()]),
        // A different initial twin: migration must carry the device's current twin, not this one.
        initial_twin_tags: Some(json!({"site": "reset"})),
        initial_twin_properties: Some(json!({})),
        edge_enabled: Some(false),
        ..EnrollmentSettings::default()
    };
    service(&server).update(Kind::Enrollment, "mig-1", &moved, None).await.unwrap();
    let second = provision(&server, "mig-1").await;
    assert_eq!(second["status"], "assigned", "{second}");
    assert_eq!(second["registrationState"]["assignedHub"], "hub-2.localhost");
    assert_eq!(second["registrationState"]["substatus"], "deviceDataMigrated");
    assert!(server.state.hubs.device("hub-1.localhost", "mig-1").is_none(), "removed from the old hub");

    // The admin CLI reads the hub database (read-only) while the server runs.
    let twin = admin(dir.path(), &["twin", "--hub", "hub-2.localhost", "--device", "mig-1"]);
    assert_eq!(twin["tags"], json!({"site": "north", "floor": 3}));
    assert_eq!(twin["properties"]["desired"], json!({"telemetryInterval": 30}));
    assert_eq!(twin["capabilities"]["iotEdge"], true);
    let listed = admin(dir.path(), &["hub-devices", "--hub", "hub-2.localhost"]);
    assert_eq!(
        listed,
        json!([{"deviceId": "mig-1", "authentication": {"type": "sas"}, "capabilities": {"iotEdge": true}}])
    );
    assert_eq!(admin(dir.path(), &["hub-devices", "--hub", "hub-1.localhost"]), json!([]));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billable_operations_are_counted_and_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(two_hub_config(dir.path())).await;
    let on = |hub: &str| EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        iot_hubs: Some(vec![hub.to_owned()]),
        ..EnrollmentSettings::default()
    };
    service(&server).create(Kind::Enrollment, "bill-1", &on("hub-1.localhost")).await.unwrap();
    service(&server).create(Kind::Enrollment, "bill-2", &on("hub-2.localhost")).await.unwrap();
    service(&server).show(Kind::Enrollment, "bill-1", false).await.unwrap();
    assert!(service(&server).show(Kind::Enrollment, "nobody", false).await.is_err());
    assert_eq!(provision(&server, "bill-1").await["status"], "assigned");

    let m = &server.state.metrics;
    assert_eq!(m.billable_count(BillableOperation::DeviceRegister, true), 1);
    assert_eq!(m.billable_count(BillableOperation::EnrollmentCreateOrUpdate, true), 2);
    assert_eq!(m.billable_count(BillableOperation::EnrollmentGet, true), 1);
    assert_eq!(m.billable_count(BillableOperation::EnrollmentGet, false), 1);
    let text = m.render();
    assert!(
        text.contains("dps_billable_operations_total{operation=\"device_register\",outcome=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("dps_billable_operations_total{operation=\"enrollment_get\",outcome=\"failure\"} 1"),
        "{text}"
    );
    server.shutdown().await.unwrap();

    // Restarted with hub-2 unlinked: bill-2's register is answered 202 and then ends `failed`, which is
    // billed as a failure, not a success.
    let server = start(config(dir.path())).await;
    assert_eq!(provision(&server, "bill-1").await["status"], "assigned");
    assert_eq!(provision(&server, "bill-2").await["status"], "failed");
    let m = &server.state.metrics;
    assert_eq!(m.billable_count(BillableOperation::DeviceRegister, true), 1);
    assert_eq!(m.billable_count(BillableOperation::DeviceRegister, false), 1);
    server.shutdown().await.unwrap();

    // The usage report survived the restart and adds up across both runs.
    let usage = admin(dir.path(), &["usage", "--days", "1"]);
    let count = |op: &str, field: &str| {
        usage["days"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["operation"] == op && r["idScope"] == SCOPE)
            .map(|r| r[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(count("device_register", "billable"), 2, "{usage}");
    assert_eq!(count("device_register", "failed"), 1, "{usage}");
    assert_eq!(count("enrollment_get", "billable"), 1, "{usage}");
    assert_eq!(count("enrollment_get", "failed"), 1, "{usage}");
    assert_eq!(count("enrollment_create_or_update", "billable"), 2, "{usage}");
    assert_eq!(usage["totals"][0]["billable"], 5, "{usage}");
    assert_eq!(usage["totals"][0]["failed"], 2, "{usage}");
}

/// A device missing from its previous hub (deleted there by someone) has nothing to migrate: Azure
/// documents `deviceDataMigrated` only for data "migrated from the previous hub", so the re-provisioned device
/// gets the enrollment's initial twin and `initialAssignment` (dps-core `DeviceFlow::on_hub`: `ReadTwin` →
/// `Twin(None)` sets the plan's substatus to `InitialAssignment`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_previous_device_is_not_migrated() {
    use dps_core::hub::{BlockingHubDirectory, HubOp};
    let dir = tempfile::tempdir().unwrap();
    let server = start(two_hub_config(dir.path())).await;
    let on = |hub: &str| EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        iot_hubs: Some(vec![hub.to_owned()]),
        reprovision: Some(Reprovision::ReprovisionAndMigrateData),
        initial_twin_tags: Some(json!({"from": "enrollment"})),
        ..EnrollmentSettings::default()
    };
    service(&server).create(Kind::Enrollment, "gone-1", &on("hub-1.localhost")).await.unwrap();
    assert_eq!(provision(&server, "gone-1").await["status"], "assigned");
    let delete = HubOp::DeleteDevice { hub: "hub-1.localhost".into(), device_id: "gone-1".into() };
    BlockingHubDirectory::execute(&*server.state.hubs, delete).unwrap();
    service(&server).update(Kind::Enrollment, "gone-1", &on("hub-2.localhost"), None).await.unwrap();
    let again = provision(&server, "gone-1").await;
    assert_eq!(again["registrationState"]["assignedHub"], "hub-2.localhost");
    assert_eq!(again["registrationState"]["substatus"], "initialAssignment", "{again}");
    let twin = server.state.hubs.device("hub-2.localhost", "gone-1").unwrap().twin;
    assert_eq!(twin.tags, json!({"from": "enrollment"}));
    server.shutdown().await.unwrap();
}
