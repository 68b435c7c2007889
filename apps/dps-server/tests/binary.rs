//! The built `dps-server` binary: configuration precedence (flag > env > file), readiness, the admin CLI,
//! `provision-device`, and a graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_server::datadir::{DataDir, Ready};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Waits (reading the server's stdout, no sleeping) until it printed its summary; returns the summary.
fn wait_ready(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut summary = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        summary.push_str(&line);
        summary.push('\n');
        if line.starts_with("HostName=") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    summary
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

fn write_config(path: &Path, data: &Path) {
    std::fs::write(
        path,
        format!(
            r#"
id_scope = "{SCOPE}"
service_host_name = "file-host"
device_host_name = "file-device"
data_dir = "{}"
retry_after_secs = 1
[listen]
https = "256.0.0.1:1"        # invalid: the environment must win
mqtt = "127.0.0.1:0"
admin = "127.0.0.1:0"
[tls]
subject_alt_names = ["localhost", "127.0.0.1", "flag-host"]
[[linked_hubs]]
host_name = "hub-a.example.net"
[[linked_hubs]]
host_name = "hub-b.example.net"
allocation_weight = 3
"#,
            data.display()
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_config_precedence_cli_and_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("dps.toml");
    write_config(&config, &data);

    let mut child = Command::new(BIN)
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--service-host-name",
            "flag-host",
            "--mqtt-listen",
            "",
        ])
        .env_clear()
        .env("DPS_HTTPS_LISTEN", "127.0.0.1:0")
        .env("DPS_SERVICE_HOST_NAME", "env-host")
        .env("DPS_DEVICE_HOST_NAME", "env-device")
        .env("DPS_MQTT_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let summary = wait_ready(&mut child);
    let data_dir = DataDir::new(&data);
    let ready = Ready::read(&data_dir).expect("ready.json after the summary");
    assert!(ready.https.ip().is_loopback() && ready.https.port() != 0, "{ready:?}");
    assert_eq!(ready.mqtt, None, "the flag disables MQTT over the environment");
    assert!(ready.admin.is_some(), "the file enables the admin listener");
    let connection_string = std::fs::read_to_string(data_dir.connection_string()).unwrap();
    assert!(connection_string.starts_with("HostName=flag-host;SharedAccessKeyName=provisioningserviceowner;"));
    assert!(summary.contains(connection_string.trim()), "{summary}");
    assert!(summary.contains(&ready.https.to_string()), "{summary}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in
            [data_dir.owner_key(), data_dir.ca_key(), data_dir.server_key(), data_dir.connection_string()]
        {
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                key.display()
            );
        }
    }

    // The admin CLI: connection string and CA from the data directory, address from ready.json.
    let d = data.to_str().unwrap();
    let key = device_key().to_base64();
    let created = cli_json(&[
        "enrollment",
        "create",
        "--data-dir",
        d,
        "--registration-id",
        "bin-dev-1",
        "--primary-key",
        &key,
        "--iot-hubs",
        "hub-b.example.net",
        "--initial-twin-tags",
        r#"{"site":"lab"}"#,
    ]);
    assert_eq!(created["iotHubs"][0], "hub-b.example.net");
    let shown =
        cli_json(&["enrollment", "show", "--data-dir", d, "--registration-id", "bin-dev-1", "--show-keys"]);
    assert_eq!(shown["attestation"]["symmetricKey"]["primaryKey"], key.as_str());
    let listed = cli_json(&["enrollment", "list", "--data-dir", d]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let missing = cli(&["enrollment", "show", "--data-dir", d, "--registration-id", "nobody"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404201"));

    // The device client binary.
    let port = ready.https.port().to_string();
    let ca = data_dir.ca_cert();
    let assigned = cli_json(&[
        "provision-device",
        "--registration-id",
        "bin-dev-1",
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
    assert_eq!(assigned["assignedHub"], "hub-b.example.net");
    let state = cli_json(&["registration", "show", "--data-dir", d, "--registration-id", "bin-dev-1"]);
    assert_eq!(state["status"], "assigned");

    // Location uses the device host name from the environment (over the file).
    let tls = dps_server::tls::client_config(&std::fs::read(&ca).unwrap()).unwrap();
    let http = dps_server::client::HttpsClient::new(ready.https.to_string(), "localhost", tls).unwrap();
    let token = device_token(&device_key(), SCOPE, "bin-dev-1", 3600);
    let put = http
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/bin-dev-1/register?api-version=2019-03-31"),
            &[("authorization", token)],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 202);
    assert_eq!(
        put.header("location"),
        Some(format!("https://env-device/{SCOPE}/registrations/bin-dev-1/register").as_str())
    );
    assert_eq!(put.header("retry-after"), Some("1"));

    sigterm(&child);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("store closed"));
    assert!(!data_dir.ready().exists());
}

#[test]
fn configuration_errors_are_reported() {
    let out = Command::new(BIN).args(["--https-listen", "127.0.0.1:0"]).env_clear().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("id_scope is required"));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "id_scope = \"0ne00000001\"\nlisten_https = \"x\"\n").unwrap();
    let out = Command::new(BIN).args(["--config", config.to_str().unwrap()]).env_clear().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_https"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
