//! Devices provision end to end through the server: HTTPS (raw and with the project's device client),
//! MQTT over TLS and MQTT over WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::mqtt::{build_username, operation_status_topic, parse_response_topic, register_topic};
use dps_core::proto::sas::SymmetricKey;
use dps_server::admin::{EnrollmentSettings, Kind};
use serde_json::{json, Value};

async fn enroll(server: &dps_server::server::RunningServer, registration_id: &str) {
    let settings = EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        secondary_key: Some(SymmetricKey::from_bytes(vec![9; 32]).to_base64()),
        ..EnrollmentSettings::default()
    };
    service(server).create(Kind::Enrollment, registration_id, &settings).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_device_provisions_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    enroll(&server, "dev-https-1").await;

    let http = https(&server);
    let mut conn = http.connect().await.unwrap();
    let token = device_token(&device_key(), SCOPE, "dev-https-1", 3600);
    let put = conn
        .send(
            "PUT",
            &format!("/{SCOPE}/registrations/dev-https-1/register?api-version=2021-06-01"),
            &[("authorization", token.clone()), ("UserAgent", "prov_device_client/1.0".into())],
            br#"{"registrationId":"dev-https-1"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 202, "{}", String::from_utf8_lossy(&put.body));
    let retry_after: u32 = put.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry_after));
    assert_eq!(
        put.header("location"),
        Some(format!("https://localhost/{SCOPE}/registrations/dev-https-1/register").as_str())
    );
    assert_eq!(put.header("content-type"), Some("application/json; charset=utf-8"));
    assert!(!put.header("x-ms-request-id").unwrap().is_empty());
    let body = put.json().unwrap();
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"].as_str().unwrap().to_owned();

    // The poll as the Node SDK sends it: a `{}` body on GET, plus the bogus Content-Encoding of the docs.
    // The server answers 202 before the hub work (respond_early), so polls see `assigning` until the
    // final commit, as with Azure.
    let mut get;
    let mut polls = 0;
    loop {
        get = conn
            .send(
                "GET",
                &format!("/{SCOPE}/registrations/dev-https-1/operations/{op}?api-version=2021-06-01"),
                &[("Authorization", token.clone()), ("content-encoding", "utf-8".into())],
                b"{}".to_vec(),
            )
            .await
            .unwrap();
        if get.status != 202 || polls == 100 {
            break;
        }
        assert_eq!(get.json().unwrap()["status"], "assigning");
        polls += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(get.status, 200, "{}", String::from_utf8_lossy(&get.body));
    let body = get.json().unwrap();
    assert_eq!(body["operationId"], op.as_str());
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], "hub-1.localhost");
    assert_eq!(body["registrationState"]["deviceId"], "dev-https-1");
    assert_eq!(body["registrationState"]["substatus"], "initialAssignment");
    assert!(server.state.hubs.device("hub-1.localhost", "dev-https-1").is_some());

    // The service API sees the registration.
    let state = service(&server).registration("dev-https-1").await.unwrap();
    assert_eq!(state["status"], "assigned");

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_device_provisions_with_the_device_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let svc = service(&server);
    svc.create(Kind::Group, "group-a", &EnrollmentSettings::default()).await.unwrap();
    let group = svc.show(Kind::Group, "group-a", true).await.unwrap();
    let group_key =
        SymmetricKey::parse(group["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();

    let config = dps_client::ClientConfig::new(
        dps_core::proto::IdScope::parse(SCOPE).unwrap(),
        dps_core::proto::RegistrationId::parse("group-dev-7").unwrap(),
        group_key.derive_device_key("group-dev-7"),
    );
    let mut exchanges = Vec::new();
    let result = dps_server::provision::provision(&https(&server), config, |x| exchanges.push(x.clone()))
        .await
        .unwrap();
    assert_eq!(result.assigned_hub.as_deref(), Some("hub-1.localhost"));
    assert_eq!(exchanges.first().unwrap().status, 202);
    assert_eq!(exchanges.last().unwrap().status, 200);

    let listed = svc.registrations("group-a", 10, None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["registrationId"], "group-dev-7");
    server.shutdown().await.unwrap();
}

/// Runs register + poll over an MQTT byte stream and returns the final JSON.
async fn mqtt_register<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    registration_id: &str,
) -> Value {
    let mut buf = Vec::new();
    let username = build_username(SCOPE, registration_id, "2019-03-31", None);
    let password = device_token(&device_key(), SCOPE, registration_id, 3600);
    write_all(s, &mqtt_connect(registration_id, &username, &password)).await;
    let connack = mqtt_read(s, &mut buf).await;
    assert_eq!((connack.first, connack.body.as_slice()), (0x20, &[0u8, 0][..]));
    write_all(s, &mqtt_subscribe(1, "$dps/registrations/res/#")).await;
    let suback = mqtt_read(s, &mut buf).await;
    assert_eq!(suback.first, 0x90);

    write_all(
        s,
        &mqtt_publish(
            &register_topic("1"),
            format!(r#"{{"registrationId":"{registration_id}"}}"#).as_bytes(),
        ),
    )
    .await;
    let (topic, id, payload) = mqtt_read(s, &mut buf).await.publish();
    if let Some(id) = id {
        write_all(s, &mqtt_puback(id)).await;
    }
    let response = parse_response_topic(&topic).unwrap();
    assert_eq!((response.status, response.rid.as_str()), (202, "1"), "{}", String::from_utf8_lossy(&payload));
    assert!(response.retry_after.is_some());
    let body: Value = serde_json::from_slice(&payload).unwrap();
    let op = body["operationId"].as_str().unwrap().to_owned();

    // Polls see `assigning` (202) until the early-answered registration's final commit lands.
    let mut rid = 2;
    let (response, payload) = loop {
        write_all(s, &mqtt_publish(&operation_status_topic(&rid.to_string(), &op), b"")).await;
        let (topic, id, payload) = mqtt_read(s, &mut buf).await.publish();
        if let Some(id) = id {
            write_all(s, &mqtt_puback(id)).await;
        }
        let response = parse_response_topic(&topic).unwrap();
        if response.status != 202 || rid == 100 {
            break (response, payload);
        }
        rid += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        (response.status, response.rid.as_str()),
        (200, rid.to_string().as_str()),
        "{}",
        String::from_utf8_lossy(&payload)
    );
    write_all(s, &[0xE0, 0x00]).await; // DISCONNECT
    serde_json::from_slice(&payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_provisions_over_mqtt_on_tls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    enroll(&server, "dev-mqtt-1").await;
    let mut tls = raw_tls_to(&server, server.ready.mqtt.unwrap()).await;
    let result = mqtt_register(&mut tls, "dev-mqtt-1").await;
    assert_eq!(result["status"], "assigned");
    assert_eq!(result["registrationState"]["deviceId"], "dev-mqtt-1");
    server.shutdown().await.unwrap();
}

/// One MQTT registration over a WebSocket on the HTTPS port.
async fn websocket_register(server: &dps_server::server::RunningServer, registration_id: &str) -> Value {
    let (mut stream, bridge) = mqtt_websocket(server).await;
    let result = mqtt_register(&mut stream, registration_id).await;
    drop(stream);
    bridge.finish().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_provisions_over_mqtt_on_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    enroll(&server, "dev-ws-1").await;
    let result = websocket_register(&server, "dev-ws-1").await;
    assert_eq!(result["status"], "assigned");
    let metrics = server.state.metrics.render();
    assert!(
        metrics.contains(
            "dps_registrations_total{transport=\"websocket\",status_class=\"2xx\",error_code=\"\"} 1"
        ),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let health = https(&server).request("GET", "/health", &[], Vec::new()).await.unwrap();
    assert_eq!((health.status, health.json().unwrap()), (200, json!({"status": "ok"})));

    let mut admin = tokio::net::TcpStream::connect(server.ready.admin.unwrap()).await.unwrap();
    write_all(&mut admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, headers, body) = read_response(&mut admin).await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(body).unwrap();
    for name in [
        "dps_registrations_total",
        "dps_registration_duration_seconds_bucket",
        "dps_open_connections{transport=\"https\"}",
        "dps_store_commit_duration_seconds_count",
        "dps_store_batches_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    write_all(&mut admin, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, _, body) = read_response(&mut admin).await;
    assert_eq!((status, body.as_slice()), (200, &br#"{"status":"ok"}"#[..]));
    server.shutdown().await.unwrap();
}

/// Issue 14, defect 4: the owner key is printed when it is created, not on every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_string_is_shown_once_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    assert!(server.summary(false).contains("SharedAccessKey="), "first start shows the new key");
    let secret = server.connection_string.clone();
    server.shutdown().await.unwrap();
    let server = start(config(dir.path())).await;
    let quiet = server.summary(false);
    assert!(!quiet.contains("SharedAccessKey=") && !quiet.contains(&secret), "{quiet}");
    assert!(quiet.contains("connection-string.txt") && quiet.contains("--show-secrets"), "{quiet}");
    assert!(server.summary(true).contains(&secret));
    server.shutdown().await.unwrap();
}
