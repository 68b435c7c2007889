//! The HTTPS and MQTT device clients and the service API client against the real engine (a minimal
//! engine-backed server in `common`), including the check of stored registration states.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests of a network program: they open sockets, files and processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::{EngineServer, SCOPE};
use dps_core::proto::sas::SymmetricKey;
use dps_loadgen::bench::Endpoint;
use dps_loadgen::cpu::ServerCpu;
use dps_loadgen::device::{DeviceSet, DriveOptions, Protocol};
use dps_loadgen::runner::{run_load, LoadOptions};
use dps_loadgen::service::{verify_assignments, ConnectionString, ServiceClient};
use dps_loadgen::stats::Failure;
use dps_loadgen::tls::TlsVersions;
use std::sync::Arc;

fn endpoint(server: &EngineServer) -> Endpoint {
    // The engine-backed test server has no AMQP listener; its MQTT address stands in, as no test here runs
    // AMQP devices.
    Endpoint::new(
        server.https,
        server.mqtt,
        server.mqtt,
        "127.0.0.1",
        server.ca_pem.as_bytes(),
        TlsVersions::Any,
    )
    .unwrap()
}

fn service(server: &EngineServer) -> ServiceClient {
    ServiceClient::new(
        endpoint(server).target(Protocol::Https).unwrap(),
        ConnectionString::parse(&server.connection_string).unwrap(),
    )
}

fn options(devices: usize) -> LoadOptions {
    LoadOptions {
        label: "engine".into(),
        devices,
        concurrency: 4,
        drive: DriveOptions::default(),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_over_https_and_mqtt_and_every_assignment_is_stored() {
    let server = EngineServer::start().await;
    let service = service(&server);
    // A missing group is an error unless asked to create it; then the key is stable.
    assert!(service.group_key("fleet", false).await.is_err());
    let key = service.group_key("fleet", true).await.unwrap();
    assert_eq!(service.group_key("fleet", false).await.unwrap().to_base64(), key.to_base64());

    let endpoint = endpoint(&server);
    let mut all = Vec::new();
    for (protocol, prefix) in [(Protocol::Https, "dev-h"), (Protocol::Mqtt, "dev-m")] {
        let set = Arc::new(DeviceSet::new(SCOPE, key.clone(), prefix).unwrap());
        let target = Arc::new(endpoint.target(protocol).unwrap());
        let out = run_load(protocol, target, set, &options(25), &ServerCpu::Unknown).await;
        assert!(out.report.is_clean(), "{}", out.report);
        assert_eq!(out.assignments.len(), 25);
        assert!(out
            .assignments
            .iter()
            .all(|a| a.assigned_hub.starts_with("hub-") && a.device_id == a.registration_id));
        all.extend(out.assignments);
    }
    let states = service.registration_states("fleet").await.unwrap();
    assert_eq!(states.len(), 50);
    let v = verify_assignments(&all, &states);
    assert!(v.is_ok(), "{}", v.summary());

    // The check does find an assignment the store does not have.
    let mut forged = all[0].clone();
    forged.registration_id = "never-registered".into();
    assert_eq!(verify_assignments(&[forged], &states).missing.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_group_key_is_counted_as_401000_on_both_transports() {
    let server = EngineServer::start().await;
    service(&server).group_key("fleet", true).await.unwrap();
    let wrong = SymmetricKey::from_bytes(vec![0xEE; 64]);
    let set = Arc::new(DeviceSet::new(SCOPE, wrong, "intruder").unwrap());
    let endpoint = endpoint(&server);
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let target = Arc::new(endpoint.target(protocol).unwrap());
        let out = run_load(protocol, target, set.clone(), &options(6), &ServerCpu::Unknown).await;
        assert_eq!(out.report.failed.count(Failure::Code(401000)), 6, "{protocol:?}: {}", out.report);
        assert_eq!(out.report.assigned, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_scope_is_counted_by_its_code() {
    let server = EngineServer::start().await;
    let key = service(&server).group_key("fleet", true).await.unwrap();
    let set = Arc::new(DeviceSet::new("0ne00000FFF", key, "lost").unwrap());
    let target = Arc::new(endpoint(&server).target(Protocol::Https).unwrap());
    let out = run_load(Protocol::Https, target, set, &options(3), &ServerCpu::Unknown).await;
    assert_eq!(out.report.failed.count(Failure::Code(401003)), 3, "{}", out.report);
}
