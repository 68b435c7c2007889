//! Interoperability with an independent MQTT client implementation: rumqttc's own client (event loop,
//! keep-alive pings, PUBACKs of our QoS 1 responses) over TCP on loopback, provisioning a device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dps_core::proto::mqtt::{operation_status_topic, parse_response_topic, register_topic};
use dps_mqtt::{serve_connection, MqttLimits};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpListener;

/// Drives the event loop until the next response PUBLISH; returns (status, rid, retry-after, body).
async fn next_response(events: &mut EventLoop) -> (u16, String, Option<u32>, Value) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.poll())
            .await
            .expect("no event")
            .expect("the connection failed");
        if let Event::Incoming(Incoming::Publish(p)) = event {
            let r = parse_response_topic(&p.topic).unwrap();
            return (r.status, r.rid, r.retry_after, serde_json::from_slice(&p.payload).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_client_provisions_over_tcp() {
    let world = EngineHandler::new();
    world.enroll("rumq-dev", &key(40));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handler = world.clone();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve_connection(stream, handler, &MqttLimits::default()).await
    });

    let mut options = MqttOptions::new("rumq-dev", "127.0.0.1", port);
    options.set_credentials(py_username("rumq-dev"), py_token("rumq-dev", &key(40)));
    options.set_keep_alive(Duration::from_secs(5));
    options.set_clean_session(true);
    let (client, mut events) = AsyncClient::new(options, 10);

    client.subscribe("$dps/registrations/res/#", QoS::AtLeastOnce).await.unwrap();
    client
        .publish(register_topic("1"), QoS::AtLeastOnce, false, br#"{"registrationId":"rumq-dev"}"#.to_vec())
        .await
        .unwrap();
    let (status, rid, retry_after, body) = next_response(&mut events).await;
    assert_eq!((status, rid.as_str()), (202, "1"), "{body}");
    assert!(retry_after.is_some());
    let op = body["operationId"].as_str().unwrap().to_owned();

    client.publish(operation_status_topic("2", &op), QoS::AtMostOnce, false, Vec::new()).await.unwrap();
    let (status, rid, _, body) = next_response(&mut events).await;
    assert_eq!((status, rid.as_str()), (200, "2"), "{body}");
    assert_eq!(body["registrationState"]["assignedHub"], HUB);
    assert!(world.hubs.device(HUB, "rumq-dev").is_some());

    client.disconnect().await.unwrap();
    // Drive the loop until the DISCONNECT is out and the server closed.
    while events.poll().await.is_ok() {}
    server.await.unwrap().unwrap();
}
