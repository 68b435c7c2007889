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

/// Issue 14, defect 6: a data directory that existed with mode 0755 (and a file in it 0644) is made
/// private: directories 0700, every file 0600, the SQLite WAL and shared-memory files included.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_whatever_existed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("notes.txt"), b"left by someone").unwrap();
    std::fs::set_permissions(data.join("notes.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cfg = config(dir.path());
    cfg.data_dir = data.clone();
    let server = start(cfg).await;
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    service(&server).create(Kind::Enrollment, "private-1", &settings).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("tls")), 0o700);
    let mut files = Vec::new();
    for d in [data.clone(), data.join("tls")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.push(e.path());
            }
        }
    }
    assert!(files.iter().any(|f| f.to_string_lossy().ends_with("dps.sqlite3-wal")), "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    server.shutdown().await.unwrap();
}
