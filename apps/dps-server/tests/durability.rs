//! A committed registration survives a graceful shutdown and a restart on the same data directory, and the
//! generated keys and certificates are reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_server::admin::{EnrollmentSettings, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_shutdown_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let connection_string = server.connection_string.clone();
    let ca = std::fs::read_to_string(server.data_dir.ca_cert()).unwrap();
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    service(&server).create(Kind::Enrollment, "durable-1", &settings).await.unwrap();
    let token = device_token(&device_key(), SCOPE, "durable-1", 3600);
    let put = https(&server)
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/durable-1/register?api-version=2021-10-01"),
            &[("authorization", token.clone())],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 202);
    let op = put.json().unwrap()["operationId"].as_str().unwrap().to_owned();
    assert!(server.data_dir.ready().exists());
    server.shutdown().await.unwrap();
    assert!(!dps_server::datadir::DataDir::new(dir.path()).ready().exists());

    let server = start(config(dir.path())).await;
    assert!(server.generated.is_empty(), "nothing is regenerated: {:?}", server.generated);
    assert_eq!(server.connection_string, connection_string);
    assert_eq!(std::fs::read_to_string(server.data_dir.ca_cert()).unwrap(), ca);

    let state = service(&server).registration("durable-1").await.unwrap();
    assert_eq!(state["status"], "assigned");
    assert_eq!(state["assignedHub"], "hub-1.localhost");
    // The device's late poll after the restart still finds its operation.
    let get = https(&server)
        .request(
            "GET",
            &format!("/{SCOPE}/registrations/durable-1/operations/{op}?api-version=2021-10-01"),
            &[("authorization", token)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(get.status, 200, "{}", String::from_utf8_lossy(&get.body));
    assert_eq!(get.json().unwrap()["registrationState"]["deviceId"], "durable-1");
    server.shutdown().await.unwrap();
}
