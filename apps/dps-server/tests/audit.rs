//! The audit log end to end, on the built binary with debug logging captured to a file: writes through
//! the service API (admin CLI and raw HTTPS) are shown by `GET /audit` and `admin audit`, and neither the
//! log nor the audit records contain any key, derived device key or SAS signature that was used.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::sas::{ConnectionString, SymmetricKey};
use dps_server::admin::ServiceClient;
use dps_server::datadir::{DataDir, Ready};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The `sig` of a SAS token, percent-decoded and as sent.
fn signatures(token: &str) -> Vec<String> {
    let sig = token.split(['&', ' ']).find_map(|p| p.strip_prefix("sig=")).unwrap().to_owned();
    let decoded = percent_encoding::percent_decode_str(&sig).decode_utf8_lossy().into_owned();
    vec![sig, decoded]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_audited_and_no_secret_reaches_the_log_or_the_audit_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("dps.toml");
    std::fs::write(
        &config,
        format!(
            r#"
id_scope = "{SCOPE}"
service_host_name = "localhost"
device_host_name = "localhost"
data_dir = "{}"
retry_after_secs = 1
[listen]
https = "127.0.0.1:0"
mqtt = ""
[tls]
subject_alt_names = ["localhost", "127.0.0.1"]
[[linked_hubs]]
host_name = "hub-a.example.net"
"#,
            data.display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env_clear()
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut summary = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        summary.push_str(&line);
        if line.starts_with("HostName=") {
            break;
        }
    }
    let printer = std::thread::spawn(move || lines.map(|l| l.unwrap_or_default() + "\n").collect::<String>());
    let data_dir = DataDir::new(&data);
    let ready = Ready::read(&data_dir).unwrap();
    let d = data.to_str().unwrap();

    // Keys this test uses: the enrollment's, the group's, the group-derived device key, the owner policy's.
    let individual_key = device_key();
    let group_key = SymmetricKey::from_bytes((100u8..164).collect());
    let secondary = SymmetricKey::from_bytes(vec![7; 32]);
    let derived = group_key.derive_device_key("audit-grp-dev");
    let mut secrets =
        vec![individual_key.to_base64(), group_key.to_base64(), secondary.to_base64(), derived.to_base64()];
    let connection = std::fs::read_to_string(data_dir.connection_string()).unwrap();
    let owner_key = connection.trim().split("SharedAccessKey=").nth(1).unwrap().to_owned();
    secrets.push(owner_key);

    let created = cli_json(&[
        "enrollment",
        "create",
        "--data-dir",
        d,
        "--registration-id",
        "audit-dev-1",
        "--primary-key",
        &individual_key.to_base64(),
        "--secondary-key",
        &secondary.to_base64(),
    ]);
    let etag = created["etag"].as_str().unwrap().to_owned();
    cli_json(&[
        "group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "audit-grp",
        "--primary-key",
        &group_key.to_base64(),
    ]);
    // A refused write: a stale ETag.
    let stale = cli(&[
        "enrollment",
        "update",
        "--data-dir",
        d,
        "--registration-id",
        "audit-dev-1",
        "--etag",
        "00000000-0000-0000-0000-000000000000",
    ]);
    assert!(!stale.status.success());

    // Devices provision with SAS tokens (the CLI's and ours).
    let port = ready.https.port().to_string();
    let ca = data_dir.ca_cert();
    for (id, key) in [("audit-dev-1", individual_key.to_base64()), ("audit-grp-dev", derived.to_base64())] {
        let assigned = cli_json(&[
            "provision-device",
            "--registration-id",
            id,
            "--device-key",
            &key,
            "--id-scope",
            SCOPE,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--ca",
            ca.to_str().unwrap(),
        ]);
        assert_eq!(assigned["assignedHub"], "hub-a.example.net");
    }
    let tls = dps_server::tls::client_config(&std::fs::read(&ca).unwrap()).unwrap();
    let http =
        dps_server::client::HttpsClient::new(ready.https.to_string(), "localhost", tls.clone()).unwrap();
    let token = device_token(&derived, SCOPE, "audit-grp-dev", 3600);
    secrets.extend(signatures(&token));
    let put = http
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/audit-grp-dev/register?api-version=2019-03-31"),
            &[("authorization", token)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 202);

    // A service write over raw HTTPS, and the audit route.
    let service = ServiceClient::new(
        dps_server::client::HttpsClient::new(ready.https.to_string(), "localhost", tls).unwrap(),
        ConnectionString::parse(connection.trim()).unwrap(),
    );
    let owner_token = service.token();
    secrets.extend(signatures(&owner_token));
    let deleted = http
        .request(
            "DELETE",
            "/registrations/audit-grp-dev?api-version=2021-10-01",
            &[("authorization", owner_token.clone())],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    let audit = http
        .request(
            "GET",
            "/audit?api-version=2021-10-01&target=audit-dev-1",
            &[("authorization", owner_token.clone())],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(audit.status, 200, "{}", String::from_utf8_lossy(&audit.body));
    let records: Value = serde_json::from_slice(&audit.body).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["operation"], "enrollment.put");
    assert_eq!(records[0]["errorCode"], 412_001);
    assert_eq!(records[1]["etagAfter"], etag.as_str());
    assert_eq!(records[1]["principal"], "provisioningserviceowner");
    assert_eq!(records[1]["transport"], "https");

    // `admin audit` reads the same table from the data directory, read-only, while the server runs.
    let all = cli_json(&["admin", "audit", "--data-dir", d]);
    let ops: Vec<&str> = all.as_array().unwrap().iter().map(|r| r["operation"].as_str().unwrap()).collect();
    assert_eq!(ops, ["registration.delete", "enrollment.put", "group.put", "enrollment.put"]);
    let refused = cli_json(&[
        "admin",
        "audit",
        "--data-dir",
        d,
        "--target",
        "AUDIT-DEV-1",
        "--since",
        "2000-01-01T00:00:00Z",
    ]);
    assert_eq!(refused.as_array().unwrap().len(), 2);
    let none = cli_json(&["admin", "audit", "--data-dir", d, "--principal", "somebody-else"]);
    assert_eq!(none, Value::Array(Vec::new()));

    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
    let stdout = printer.join().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("DEBUG"), "the log was captured at debug level");
    let events: Vec<&str> = log.lines().filter(|l| l.contains("audited service write")).collect();
    assert_eq!(events.len(), 4, "one structured event per audited write:\n{log}");
    assert!(
        events.iter().any(|l| l.contains("error_code=412001") && l.contains("audit-dev-1")),
        "{events:?}"
    );
    // The raw rows of the audit table, as `admin audit` prints every column.
    let rows = serde_json::to_string(&all).unwrap();
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(!log.contains(secret.as_str()), "a secret reached the server log: {secret}");
        assert!(!stdout.contains(secret.as_str()), "a secret reached the server's stdout: {secret}");
        assert!(!rows.contains(secret.as_str()), "a secret reached the audit table: {secret}");
    }
}
