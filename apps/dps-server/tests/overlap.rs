//! Overlapping registrations of one device never strand it, on every transport: every operation ID the
//! server handed out polls to the registration's final state (staggered re-registers 300 ms apart, as after
//! a reboot or two SDK instances, and a burst of eight before any completes).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::mqtt::{build_username, operation_status_topic, parse_response_topic, register_topic};
use dps_core::proto::sas::SymmetricKey;
use dps_server::admin::{EnrollmentSettings, Kind};
use dps_server::server::RunningServer;
use serde_json::Value;
use std::time::Duration;

async fn enroll(server: &RunningServer, registration_id: &str) {
    let settings = EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        secondary_key: Some(SymmetricKey::from_bytes(vec![9; 32]).to_base64()),
        ..EnrollmentSettings::default()
    };
    service(server).create(Kind::Enrollment, registration_id, &settings).await.unwrap();
}

/// One HTTPS request on a fresh connection: (status, JSON body).
async fn https_call(server: &RunningServer, method: &str, path: &str, id: &str) -> (u16, Value) {
    let mut conn = https(server).connect().await.unwrap();
    let token = device_token(&device_key(), SCOPE, id, 3600);
    let body = format!(r#"{{"registrationId":"{id}"}}"#).into_bytes();
    let r = conn.send(method, path, &[("authorization", token)], body).await.unwrap();
    (r.status, r.json().unwrap_or(Value::Null))
}

/// Registers over HTTPS, retrying a retryable 409203 (the loser of a simultaneous commit), and returns
/// the operation ID the server handed out.
async fn https_register(server: &RunningServer, id: &str) -> String {
    let path = format!("/{SCOPE}/registrations/{id}/register?api-version=2021-06-01");
    for _ in 0..20 {
        let (status, body) = https_call(server, "PUT", &path, id).await;
        if status == 202 {
            return body["operationId"].as_str().unwrap().to_owned();
        }
        assert_eq!((status, body["errorCode"].as_u64()), (409, Some(409203)), "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no 202 after 20 attempts");
}

/// Polls an operation over HTTPS until it is no longer assigning.
async fn https_final(server: &RunningServer, id: &str, op: &str) -> Value {
    let path = format!("/{SCOPE}/registrations/{id}/operations/{op}?api-version=2021-06-01");
    for _ in 0..200 {
        let (status, body) = https_call(server, "GET", &path, id).await;
        assert!(status == 200 || status == 202, "operation {op} answered {status}: {body}");
        if status == 200 {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("operation {op} still assigning");
}

/// A byte stream an MQTT session runs on.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// An MQTT session, over TLS on 8883's listener or over a WebSocket on 443's, connected and subscribed.
struct Mqtt {
    tls: Box<dyn Io>,
    buf: Vec<u8>,
    rid: u32,
    _bridge: Option<WsBridge>,
}

impl Mqtt {
    async fn connect_on(server: &RunningServer, id: &str, client: &str, websocket: bool) -> Mqtt {
        let (mut tls, bridge): (Box<dyn Io>, _) = if websocket {
            let (stream, bridge) = mqtt_websocket(server).await;
            (Box::new(stream), Some(bridge))
        } else {
            (Box::new(raw_tls_to(server, server.ready.mqtt.unwrap()).await), None)
        };
        let mut buf = Vec::new();
        let username = build_username(SCOPE, id, "2019-03-31", None);
        let password = device_token(&device_key(), SCOPE, id, 3600);
        write_all(&mut tls, &mqtt_connect(client, &username, &password)).await;
        assert_eq!(mqtt_read(&mut tls, &mut buf).await.first, 0x20);
        write_all(&mut tls, &mqtt_subscribe(1, "$dps/registrations/res/#")).await;
        assert_eq!(mqtt_read(&mut tls, &mut buf).await.first, 0x90);
        Mqtt { tls, buf, rid: 0, _bridge: bridge }
    }

    async fn call(&mut self, topic: impl Fn(&str) -> String, payload: &[u8]) -> (u16, Value) {
        self.rid += 1;
        let rid = self.rid.to_string();
        write_all(&mut self.tls, &mqtt_publish(&topic(&rid), payload)).await;
        let (topic, packet_id, payload) = mqtt_read(&mut self.tls, &mut self.buf).await.publish();
        if let Some(p) = packet_id {
            write_all(&mut self.tls, &mqtt_puback(p)).await;
        }
        let response = parse_response_topic(&topic).unwrap();
        assert_eq!(response.rid, rid);
        (response.status, serde_json::from_slice(&payload).unwrap_or(Value::Null))
    }

    async fn register(&mut self, id: &str) -> String {
        let payload = format!(r#"{{"registrationId":"{id}"}}"#);
        for _ in 0..20 {
            let (status, body) = self.call(register_topic, payload.as_bytes()).await;
            if status == 202 {
                return body["operationId"].as_str().unwrap().to_owned();
            }
            assert_eq!((status, body["errorCode"].as_u64()), (409, Some(409203)), "{body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no 202 after 20 attempts");
    }

    async fn final_state(&mut self, op: &str) -> Value {
        for _ in 0..200 {
            let (status, body) = self.call(|rid| operation_status_topic(rid, op), b"").await;
            assert!(status == 200 || status == 202, "operation {op} answered {status}: {body}");
            if status == 200 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("operation {op} still assigning");
    }
}

fn assert_all_assigned(results: &[Value], id: &str) {
    for r in results {
        assert_eq!(r["status"], "assigned", "{r}");
        assert_eq!(r["registrationState"]["deviceId"], id, "{r}");
        assert_eq!(r["registrationState"]["assignedHub"], results[0]["registrationState"]["assignedHub"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_staggered_and_burst_registers_all_poll_to_the_final_result() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    enroll(&server, "ov-https").await;

    let first = https_register(&server, "ov-https").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = https_register(&server, "ov-https").await;
    let results =
        vec![https_final(&server, "ov-https", &first).await, https_final(&server, "ov-https", &second).await];
    assert_all_assigned(&results, "ov-https");

    let burst = futures_util::future::join_all((0..8).map(|_| https_register(&server, "ov-https"))).await;
    let mut results = Vec::new();
    for op in &burst {
        results.push(https_final(&server, "ov-https", op).await);
    }
    assert_all_assigned(&results, "ov-https");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_staggered_and_burst_registers_all_poll_to_the_final_result() {
    mqtt_overlaps(false, "ov-mqtt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_staggered_and_burst_registers_all_poll_to_the_final_result() {
    mqtt_overlaps(true, "ov-ws").await;
}

async fn mqtt_overlaps(websocket: bool, id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    enroll(&server, id).await;

    // Two SDK instances of one device, 300 ms apart.
    let mut a = Mqtt::connect_on(&server, id, id, websocket).await;
    let mut b = Mqtt::connect_on(&server, id, id, websocket).await;
    let first = a.register(id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = b.register(id).await;
    let results = vec![a.final_state(&first).await, b.final_state(&second).await];
    assert_all_assigned(&results, id);

    // A burst of eight sessions registering at once.
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(Mqtt::connect_on(&server, id, id, websocket).await);
    }
    let ops = futures_util::future::join_all(sessions.iter_mut().map(|s| s.register(id))).await;
    let mut results = Vec::new();
    for op in &ops {
        results.push(a.final_state(op).await);
    }
    assert_all_assigned(&results, id);
    if websocket {
        let metrics = server.state.metrics.render();
        assert!(metrics.contains("dps_connections_total{transport=\"websocket\"} 10"), "{metrics}");
    }
    server.shutdown().await.unwrap();
}
