//! Encryption at rest, end to end: a real server holds enrollments, groups, a
//! provisioned device (so the hub directory holds its keys) and a certificate-issuing CA; once it is
//! stopped, no secret is found in the raw bytes of any file of the data directory (the databases, their
//! WAL files, the key files) except the KEK file itself. A restart with the same KEK works, a wrong KEK is
//! refused at start with a clear message, and a KEK rotation while the server runs keeps everything
//! readable.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use dps_core::proto::sas::SymmetricKey;
use dps_server::admin::{EnrollmentSettings, Kind};
use dps_server::config::{IssuanceConfig, KeyProviderConfig, ServerConfig};
use dps_server::server::RunningServer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dps-server");

fn key(n: u8) -> SymmetricKey {
    SymmetricKey::from_bytes((0u8..32).map(|i| i.wrapping_mul(7).wrapping_add(n)).collect())
}

fn sealed_config(dir: &Path) -> ServerConfig {
    let mut c = config(dir);
    c.certificate_issuance = Some(IssuanceConfig {
        key: dps_host::CaKeyKind::P256,
        validity: std::time::Duration::from_secs(86_400),
    });
    c
}

/// Registers `id` with `key` over HTTPS and polls to the end; returns the final operation status.
async fn provision(server: &RunningServer, id: &str, key: &SymmetricKey) -> Value {
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
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{id} never finished");
}

/// Every regular file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn admin(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["admin"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--data-dir", dir.to_str().unwrap()]);
    all.extend_from_slice(&args[1..]);
    let out = Command::new(BIN).args(&all).env_clear().output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_data_directory_and_kek_handling() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(sealed_config(&data)).await;
    let service = service(&server);

    // An individual enrollment and two groups (webhook URLs are sealed too, see dps-store's tests; this
    // build refuses custom allocation, 400004, so none is stored here).
    let (p1, s1, g1, g2) = (key(1), key(2), key(3), key(4));
    let individual = EnrollmentSettings {
        primary_key: Some(p1.to_base64()),
        secondary_key: Some(s1.to_base64()),
        ..EnrollmentSettings::default()
    };
    service.create(Kind::Enrollment, "dev-1", &individual).await.unwrap();
    let group = EnrollmentSettings {
        primary_key: Some(g1.to_base64()),
        secondary_key: Some(g2.to_base64()),
        ..EnrollmentSettings::default()
    };
    service.create(Kind::Group, "grp-1", &group).await.unwrap();
    let hook_key = key(5);
    let hook = json!({
        "enrollmentGroupId": "grp-hook",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": hook_key.to_base64(), "secondaryKey": key(6).to_base64()}},
    });
    service.call("PUT", "/enrollmentGroups/grp-hook", Some(&hook), &[]).await.unwrap();

    // Provision the individual device and a group device: the hub directory now holds their keys.
    assert_eq!(provision(&server, "dev-1", &p1).await["status"], "assigned");
    let derived = g1.derive_device_key("grp-dev-7");
    assert_eq!(provision(&server, "grp-dev-7", &derived).await["status"], "assigned");
    let mut hub_keys = Vec::new();
    for id in ["dev-1", "grp-dev-7"] {
        let device = server.state.hubs.device("hub-1.localhost", id).unwrap();
        hub_keys.push(device.identity.primary_key().unwrap().to_owned());
    }
    // Reads return the plain keys (the attestation mechanism carries them).
    let shown = service.show(Kind::Enrollment, "dev-1", true).await.unwrap();
    assert_eq!(shown["attestation"]["symmetricKey"]["primaryKey"], p1.to_base64(), "{shown}");
    let owner = server.connection_string.clone();
    server.shutdown().await.unwrap();

    // The raw bytes of every file: no key, base64 or raw.
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, k) in
        [("p1", &p1), ("s1", &s1), ("g1", &g1), ("g2", &g2), ("hook", &hook_key), ("derived", &derived)]
    {
        secrets.push((format!("{name} base64"), k.to_base64().into_bytes()));
        secrets.push((format!("{name} raw"), STANDARD.decode(k.to_base64()).unwrap()));
    }
    for k in &hub_keys {
        secrets.push(("hub key".into(), k.clone().into_bytes()));
    }
    secrets.push(("a PEM private key".into(), b"PRIVATE KEY".to_vec()));
    let owner_key = owner.rsplit("SharedAccessKey=").next().unwrap().trim().to_owned();
    let all = files(&data);
    assert!(all.iter().any(|(p, _)| p.ends_with("dps.sqlite3")));
    assert!(all.iter().any(|(p, _)| p.ends_with("issuer/ca.key")));
    for (path, bytes) in &all {
        if path.ends_with("kek.key") {
            continue;
        }
        for (what, secret) in &secrets {
            assert!(!contains(bytes, secret), "{what} found in {}", path.display());
        }
        // The owner key is sealed in owner.key; connection-string.txt is the operator's copy, in clear.
        if !path.ends_with("connection-string.txt") {
            assert!(!contains(bytes, owner_key.as_bytes()), "the owner key found in {}", path.display());
        }
    }

    // Restart with the same KEK: everything reads, the devices provision again.
    let server = start(sealed_config(&data)).await;
    assert_eq!(provision(&server, "dev-1", &p1).await["status"], "assigned");
    let (ok, out) = admin(&data, &["hub-devices", "--hub", "hub-1.localhost"]);
    assert!(ok && out.contains("grp-dev-7"), "{out}");

    // Rotation while the server runs: the data keys are re-wrapped, the server keeps working.
    let new_kek = dir.path().join("new.key");
    std::fs::write(&new_kek, format!("{}\n", STANDARD.encode([42u8; 32]))).unwrap();
    let old_kek = std::fs::read(data.join("kek.key")).unwrap();
    let (ok, out) = admin(&data, &["rotate-kek", "--new-key-file", new_kek.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(data.join("kek.key")).unwrap(), std::fs::read(&new_kek).unwrap());
    assert_eq!(provision(&server, "grp-dev-7", &derived).await["status"], "assigned");
    service_for(&server).create(Kind::Enrollment, "dev-2", &individual).await.unwrap();
    server.shutdown().await.unwrap();

    // The next start uses the new KEK; what was written before and after the rotation reads.
    let server = start(sealed_config(&data)).await;
    assert_eq!(provision(&server, "dev-1", &p1).await["status"], "assigned");
    assert_eq!(provision(&server, "dev-2", &p1).await["status"], "assigned");
    server.shutdown().await.unwrap();

    // The old KEK (and any other) is refused at start, saying why.
    let wrong = dir.path().join("old.key");
    std::fs::write(&wrong, &old_kek).unwrap();
    let mut c = sealed_config(&data);
    c.key_provider = KeyProviderConfig::File(wrong);
    let err = dps_server::server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("wrong key-encryption key"), "{err}");
    // A missing KEK file next to an existing keyring is not silently replaced.
    let mut c = sealed_config(&data);
    c.key_provider = KeyProviderConfig::File(dir.path().join("absent.key"));
    let err = dps_server::server::start(c).await.unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    assert!(!dir.path().join("absent.key").exists());

    // The environment provider with the new KEK opens the same keyring.
    std::env::set_var("DPS_TEST_SEAL_KEK", STANDARD.encode([42u8; 32]));
    let mut c = sealed_config(&data);
    c.key_provider = KeyProviderConfig::Env("DPS_TEST_SEAL_KEK".into());
    let server = start(c).await;
    assert_eq!(provision(&server, "dev-2", &p1).await["status"], "assigned");
    server.shutdown().await.unwrap();

    // A new data key: old rows stay readable, new writes use it.
    let (ok, out) = admin(&data, &["rotate-data-key"]);
    assert!(ok, "{out}");
    let server = start(sealed_config(&data)).await;
    assert_eq!(provision(&server, "dev-1", &p1).await["status"], "assigned");
    service_for(&server).create(Kind::Enrollment, "dev-3", &individual).await.unwrap();
    assert_eq!(provision(&server, "dev-3", &p1).await["status"], "assigned");
    server.shutdown().await.unwrap();
}

fn service_for(server: &RunningServer) -> dps_server::admin::ServiceClient {
    service(server)
}
