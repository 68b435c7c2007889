//! MQTT sessions against the real engine, the way each Azure device SDK talks (spec §2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dps_core::proto::mqtt::{operation_status_topic, register_topic};
use dps_mqtt::{serve_connection, MqttError, MqttLimits};
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use std::sync::Arc;
use tokio::io::DuplexStream;

/// Polls until the operation is no longer assigning; returns the final 200 body.
async fn poll_until_done(
    c: &mut Client<DuplexStream>,
    rid_base: &str,
    op: &str,
    qos: QoS,
    payload: &[u8],
    encode: impl Fn(&str) -> String,
) -> Value {
    for i in 0..10u16 {
        let rid = format!("{rid_base}{i}");
        let topic = format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
            encode(op)
        );
        c.publish(&topic, qos, 100 + i, payload).await;
        let (r, body) = c.expect_response().await;
        assert_eq!(r.rid, rid);
        match r.status {
            202 => {
                assert!(r.retry_after.is_some());
                assert_eq!(body["status"], "assigning");
            }
            200 => return body,
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    panic!("still assigning after 10 polls")
}

fn assert_assigned(world: &EngineHandler, body: &Value, id: &str, op: &str) {
    assert_eq!(body["operationId"], op);
    assert_eq!(body["status"], "assigned");
    let state = &body["registrationState"];
    assert_eq!(state["registrationId"], id);
    assert_eq!(state["assignedHub"], HUB);
    assert_eq!(state["deviceId"], id);
    assert_eq!(state["substatus"], "initialAssignment");
    assert!(state["etag"].is_string() && state["createdDateTimeUtc"].is_string());
    assert!(world.hubs.device(HUB, id).is_some(), "the device exists in its hub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_provisions_a_symmetric_key_device() {
    let world = EngineHandler::new();
    world.enroll("py-dev", &key(1));
    let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());

    c.connect_ok("py-dev", &py_username("py-dev"), Some(&py_token("py-dev", &key(1)))).await;
    c.subscribe_responses().await;

    // Register: QoS 1, uuid4 rid, sorted-keys JSON with "payload": null.
    let rid = "a3c9b0f2-4b1e-4f6a-9d3e-2f1c0b9a8e7d";
    let body = br#"{"payload": null, "registrationId": "py-dev"}"#;
    c.publish(&register_topic(rid), QoS::AtLeastOnce, 2, body).await;
    let (r, reply) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, rid), "{reply}");
    let retry_after = r.retry_after.expect("202 carries retry-after");
    assert!((1..=300).contains(&retry_after));
    assert_eq!(reply["status"], "assigning");
    let op = reply["operationId"].as_str().unwrap().to_owned();

    // Poll: payload " " (not JSON), URL-quoted operationId (here even its dots).
    let done =
        poll_until_done(&mut c, "5f0e4c2a-0000-4000-8000-00000000000", &op, QoS::AtLeastOnce, b" ", |o| {
            o.replace('.', "%2E")
        })
        .await;
    assert_assigned(&world, &done, "py-dev", &op);

    c.send(Packet::Disconnect).await;
    c.expect_closed().await;
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn c_sdk_publishes_qos0_with_numeric_rids() {
    let world = EngineHandler::new();
    world.enroll("c-dev", &key(2));
    let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());
    c.connect_ok("c-dev", &c_username("c-dev"), Some(&sdk_token("c-dev", &key(2)))).await;
    c.subscribe_responses().await;

    let body = br#"{"registrationId":"c-dev"}"#;
    // QoS 0: no PUBACK; the next packet is the response itself.
    c.publish(&register_topic("1"), QoS::AtMostOnce, 0, body).await;
    let (r, reply) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, "1"));
    let op = reply["operationId"].as_str().unwrap().to_owned();
    // The C SDK polls with the register JSON as payload.
    let done = poll_until_done(&mut c, "", &op, QoS::AtMostOnce, body, |o| o.to_owned()).await;
    assert_assigned(&world, &done, "c-dev", &op);

    // Closing the stream between packets is a clean end.
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn csharp_sdk_sends_empty_payloads_and_group_device_is_assigned() {
    let world = EngineHandler::new();
    world.enroll_group("floor-3", &key(3));
    let device_key = key(3).derive_device_key("cs-dev-7");
    let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());
    c.connect_ok("cs-dev-7", &cs_username("cs-dev-7"), Some(&sdk_token("cs-dev-7", &device_key))).await;
    c.subscribe_responses().await;

    c.publish(&register_topic("2"), QoS::AtLeastOnce, 2, b"").await;
    let (r, reply) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, "2"), "{reply}");
    let op = reply["operationId"].as_str().unwrap().to_owned();
    let done = poll_until_done(&mut c, "3", &op, QoS::AtLeastOnce, b"", |o| o.to_owned()).await;
    assert_assigned(&world, &done, "cs-dev-7", &op);
    assert_eq!(done["registrationState"]["symmetricKey"]["enrollmentGroupId"], "floor-3");

    c.send(Packet::Disconnect).await;
    c.expect_closed().await;
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn operation_status_topic_of_the_codec_round_trips() {
    let world = EngineHandler::new();
    world.enroll("dev-ops", &key(4));
    let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());
    c.connect_ok("dev-ops", &py_username("dev-ops"), Some(&py_token("dev-ops", &key(4)))).await;
    c.publish(&register_topic("r"), QoS::AtLeastOnce, 1, b"").await;
    let (_, reply) = c.expect_response().await;
    let op = reply["operationId"].as_str().unwrap();
    c.publish(&operation_status_topic("p", op), QoS::AtLeastOnce, 2, b"").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (200, "p"), "{body}");
    // An operation that does not exist: the engine's 404204 on the response topic.
    c.publish(&operation_status_topic("q", "4.0000000000000000.nope"), QoS::AtLeastOnce, 3, b"").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (404, "q"));
    assert_eq!(error_code(&body), 404204);
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn wrong_key_gets_401_on_the_response_topic_and_the_session_goes_on() {
    let world = EngineHandler::new();
    world.enroll("dev-k", &key(5));
    let (mut c, task) = spawn_server(world.clone(), session_limits());
    // With authentication at CONNECT off (an embedder's choice), the SAS is checked per request.
    c.connect_ok("dev-k", &py_username("dev-k"), Some(&py_token("dev-k", &key(6)))).await;
    c.subscribe_responses().await;
    c.publish(&register_topic("9"), QoS::AtLeastOnce, 2, br#"{"registrationId":"dev-k"}"#).await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str(), r.retry_after), (401, "9", None));
    assert_eq!(error_code(&body), 401000);
    assert!(
        body["trackingId"].is_string() && body["message"].is_string() && body["timestampUtc"].is_string()
    );
    assert!(world.hubs.devices().is_empty());
    c.send(Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn no_password_is_accepted_at_connect_and_refused_per_request() {
    let world = EngineHandler::new();
    world.enroll("x509-dev", &key(7));
    let (mut c, task) = spawn_server(world.clone(), session_limits());
    c.connect_ok("x509-dev", &c_username("x509-dev"), None).await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, b"").await;
    let (r, body) = c.expect_response().await;
    assert_eq!(r.status, 401);
    assert_eq!(error_code(&body), 401004);
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn other_requests_errors_reach_the_device_with_their_codes() {
    let world = EngineHandler::new();
    world.enroll("dev-e", &key(8));
    let (mut c, task) = spawn_server(world.clone(), session_limits());
    c.connect_ok("dev-e", &py_username("dev-e"), Some(&py_token("dev-e", &key(8)))).await;

    // Unknown topic with a $rid: 404000 on the response topic.
    c.publish("$dps/registrations/PUT/iotdps-unregister/?$rid=7", QoS::AtLeastOnce, 1, b"{}").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (404, "7"));
    assert_eq!(error_code(&body), 404000);
    assert!(body["message"].as_str().unwrap().contains("iotdps-unregister"));

    // A poll with an invalid operation ID: 400002.
    c.publish(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId=a%2Fb",
        QoS::AtMostOnce,
        0,
        b"",
    )
    .await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (400, "8"));
    assert_eq!(error_code(&body), 400002);

    // A poll without operationId: 400000.
    c.publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9", QoS::AtLeastOnce, 2, b"").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, error_code(&body)), (400, 400000));

    // Body registration ID disagreeing with the username: the engine's 400003.
    c.publish(&register_topic("10"), QoS::AtLeastOnce, 3, br#"{"registrationId":"someone-else"}"#).await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, error_code(&body)), (400, 400003));

    // Not JSON: 400001.
    c.publish(&register_topic("11"), QoS::AtLeastOnce, 4, b"{not json").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, error_code(&body)), (400, 400001));

    // TPM over MQTT is refused (spec §12 item 15).
    let tpm =
        br#"{"registrationId":"dev-e","tpm":{"endorsementKey":"AToAAQ==","storageRootKey":"ARoAAQ=="}}"#;
    c.publish(&register_topic("12"), QoS::AtLeastOnce, 5, tpm).await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, error_code(&body)), (400, 400000));
    assert!(body["message"].as_str().unwrap().contains("MQTT"), "{body}");

    // A body over 96 KiB that fits the packet limit: the engine's 413001.
    let mut big = br#"{"registrationId":"dev-e","payload":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 99_000));
    big.extend_from_slice(br#""}"#);
    c.publish(&register_topic("13"), QoS::AtLeastOnce, 6, &big).await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, error_code(&body)), (413, 413001));

    // After all that the device still provisions on the same connection.
    c.publish(&register_topic("14"), QoS::AtLeastOnce, 7, b"").await;
    let (r, _) = c.expect_response().await;
    assert_eq!(r.status, 202);
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn unknown_topic_without_rid_closes_the_connection() {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.publish("devices/dev/messages/events/", QoS::AtMostOnce, 0, b"telemetry").await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::UnanswerableTopic { .. })));

    // A request topic whose $rid cannot be echoed safely: closed too.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.send(Packet::Publish(Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=a$b",
        QoS::AtMostOnce,
        "",
    )))
    .await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::UnanswerableTopic { .. })));
}

#[tokio::test]
async fn subscribe_grants_only_the_response_filter_and_at_most_qos1() {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.send(Packet::Subscribe(Subscribe {
        pkid: 17,
        filters: vec![
            SubscribeFilter::new("devices/dev/messages/devicebound/#".into(), QoS::AtLeastOnce),
            SubscribeFilter::new("$dps/registrations/res/#".into(), QoS::ExactlyOnce),
            SubscribeFilter::new("$dps/registrations/res/#".into(), QoS::AtMostOnce),
            SubscribeFilter::new("$dps/#".into(), QoS::AtLeastOnce),
            SubscribeFilter::new("#".into(), QoS::AtMostOnce),
        ],
    }))
    .await;
    match c.expect().await {
        Packet::SubAck(ack) => {
            assert_eq!(ack.pkid, 17);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Failure,
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    c.send(Packet::Unsubscribe(Unsubscribe { pkid: 18, topics: vec!["$dps/registrations/res/#".into()] }))
        .await;
    match c.expect().await {
        Packet::UnsubAck(ack) => assert_eq!(ack.pkid, 18),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    for _ in 0..3 {
        c.send(Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
    }
    c.send(Packet::Disconnect).await;
    c.expect_closed().await;
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn responses_are_sent_even_without_a_subscription() {
    let world = EngineHandler::new();
    world.enroll("dev-ns", &key(9));
    let (mut c, task) = spawn_server(world.clone(), session_limits());
    c.connect_ok("dev-ns", &py_username("dev-ns"), Some(&py_token("dev-ns", &key(9)))).await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, b"").await;
    assert_eq!(c.expect_response().await.0.status, 202);
    drop(c);
    outcome(task).await.unwrap();
}

async fn refused(
    client_id: &str,
    username: Option<&str>,
    code: ConnectReturnCode,
) -> (Client<DuplexStream>, Result<(), MqttError>) {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    match username {
        Some(u) => c.connect(client_id, u, Some("SharedAccessSignature sr=x&sig=y&se=1"), 60).await,
        None => c.send(Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(client_id))).await,
    }
    match c.expect().await {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.code, code);
            assert!(!ack.session_present);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.expect_closed().await;
    let result = outcome(task).await;
    (c, result)
}

#[tokio::test]
async fn connect_refusals_have_the_right_connack_codes() {
    use ConnectReturnCode::{BadClientId, BadUserNamePassword};
    for (client_id, username, code, expected) in [
        ("dev", None, BadUserNamePassword, 4),
        ("dev", Some("not-a-dps-username"), BadUserNamePassword, 4),
        ("dev", Some("bad-scope/registrations/dev/api-version=2019-03-31"), BadUserNamePassword, 4),
        ("dev", Some("0ne0000ABCD/registrations/dev/api-version=soon"), BadUserNamePassword, 4),
        ("other", Some("0ne0000ABCD/registrations/dev/api-version=2019-03-31"), BadClientId, 2),
        ("", Some("0ne0000ABCD/registrations/dev/api-version=2019-03-31"), BadClientId, 2),
    ] {
        let (_, result) = refused(client_id, username, code).await;
        match result {
            Err(MqttError::ConnectRefused { code, reason }) => {
                assert_eq!(code, expected, "{client_id} {username:?}: {reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{client_id} {username:?}: {other:?}"),
        }
    }
    // The client ID is compared like registration IDs: case-insensitively.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("DEV-1", &py_username("dev-1"), None).await;
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn other_protocol_versions_get_connack_1() {
    // MQTT 3.1 ("MQIsdp", level 3).
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    let mut v31 = vec![0x10, 18, 0, 6];
    v31.extend_from_slice(b"MQIsdp");
    v31.extend_from_slice(&[3, 0x02, 0, 60, 0, 4]);
    v31.extend_from_slice(b"dev1");
    c.send_raw(&v31).await;
    match c.expect().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::ConnectRefused { code: 1, .. })));

    // MQTT 5 (level 5, with a properties length byte).
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    let mut v5 = vec![0x10, 14, 0, 4];
    v5.extend_from_slice(b"MQTT");
    v5.extend_from_slice(&[5, 0x02, 0, 60, 0, 0, 3]);
    v5.extend_from_slice(b"dev");
    c.send_raw(&v5).await;
    match c.expect().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::ConnectRefused { code: 1, .. })));
}

#[tokio::test]
async fn packets_before_connect_close_the_connection() {
    let register = Publish::new(register_topic("1"), QoS::AtMostOnce, "");
    for first in [
        Packet::Publish(register),
        Packet::PingReq,
        Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)),
        Packet::Disconnect,
    ] {
        let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
        c.send(first.clone()).await;
        c.expect_closed().await;
        assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))), "{first:?}");
    }
}

#[tokio::test]
async fn a_second_connect_or_qos2_closes_the_connection() {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.connect("dev", &py_username("dev"), None, 60).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))));

    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    let mut p = Publish::new(register_topic("1"), QoS::ExactlyOnce, "");
    p.pkid = 5;
    c.send(Packet::Publish(p)).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))));

    // A packet only servers send.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.send(Packet::PingResp).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))));
}

#[tokio::test]
async fn oversized_packets_close_the_connection() {
    // Before CONNECT: a header announcing 1 MB is enough.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.send_raw(&[0x10, 0x80, 0x80, 0x40]).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::PacketTooLarge { size: 1_048_576, max: 100_000 })));

    // After CONNECT: a real 150 kB PUBLISH (the write may fail once the server hangs up).
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    let big = Client::<DuplexStream>::encode(Packet::Publish(Publish::new(
        register_topic("1"),
        QoS::AtMostOnce,
        vec![b'x'; 150_000],
    )));
    let _ = c.try_send_raw(&big).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::PacketTooLarge { max: 100_000, .. })));

    // A configured limit applies.
    let limits = MqttLimits { max_packet_bytes: 1000, ..session_limits() };
    let (mut c, task) = spawn_server(EngineHandler::new(), limits);
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.publish(&register_topic("1"), QoS::AtMostOnce, 0, &[b' '; 900]).await;
    assert_eq!(c.expect_response().await.0.status, 401);
    let _ = c
        .try_send_raw(&Client::<DuplexStream>::encode(Packet::Publish(Publish::new(
            register_topic("2"),
            QoS::AtMostOnce,
            vec![b' '; 1000],
        ))))
        .await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::PacketTooLarge { max: 1000, .. })));
}

#[tokio::test(start_paused = true)]
async fn garbage_bytes_close_the_connection() {
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: dps\r\n\r\n"[..],
        &[0xff; 16][..],
        &[0x00, 0x00][..],
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01][..],
        // A CONNECT whose strings overrun the packet.
        &[0x10, 0x06, 0x00, 0x04, b'M', b'Q', b'T', b'T'][..],
        // A CONNECT with a non-UTF-8 client ID.
        &[0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x02, 0xc3, 0x28][..],
    ] {
        let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
        let _ = c.try_send_raw(garbage).await;
        c.expect_closed().await;
        let result = outcome(task).await;
        assert!(result.is_err(), "{garbage:?}: {result:?}");
    }
    // After CONNECT.
    for garbage in [&[0xff; 4][..], &[0x30, 0x01, 0x00][..], &[0x82, 0x02, 0x00, 0x01][..]] {
        let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
        c.connect_ok("dev", &py_username("dev"), None).await;
        c.send_raw(garbage).await;
        c.expect_closed().await;
        assert!(matches!(outcome(task).await, Err(MqttError::Malformed(_))), "{garbage:?}");
    }
}

#[tokio::test]
async fn truncated_packets_then_eof_end_the_session() {
    let connect = Client::<DuplexStream>::encode(Packet::Connect({
        let mut c = rumqttc::mqttbytes::v4::Connect::new("dev");
        c.login = Some(rumqttc::mqttbytes::v4::Login::new(py_username("dev"), ""));
        c
    }));
    // Half a CONNECT, then EOF.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.send_raw(&connect[..connect.len() / 2]).await;
    c.io.finish().await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::Truncated(n)) if n == connect.len() / 2));

    // Half a PUBLISH after CONNECT, then EOF.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.send_raw(&connect).await;
    assert!(matches!(c.expect().await, Packet::ConnAck(_)));
    let publish = Client::<DuplexStream>::encode(Packet::Publish(Publish::new(
        register_topic("1"),
        QoS::AtMostOnce,
        "{}",
    )));
    c.send_raw(&publish[..publish.len() - 1]).await;
    c.io.finish().await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::Truncated(_))));

    // EOF with nothing sent at all: a clean end (health checks, port scanners).
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.io.finish().await;
    c.expect_closed().await;
    outcome(task).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keep_alive_silence_closes_the_connection() {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.connect("dev", &py_username("dev"), None, 2).await;
    assert!(matches!(c.expect().await, Packet::ConnAck(_)));
    // Pinging within the keep-alive keeps the session up (virtual time).
    for _ in 0..5 {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        c.send(Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
    }
    // Then silence.
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::KeepAliveTimeout(d)) if d.as_secs() == 3));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_is_capped_and_zero_gets_the_cap() {
    let limits = MqttLimits { max_keep_alive: std::time::Duration::from_secs(10), ..session_limits() };
    for keep_alive in [0u16, 3600] {
        let (mut c, task) = spawn_server(EngineHandler::new(), limits.clone());
        c.connect("dev", &py_username("dev"), None, keep_alive).await;
        assert!(matches!(c.expect().await, Packet::ConnAck(_)));
        c.expect_closed().await;
        assert!(matches!(outcome(task).await, Err(MqttError::KeepAliveTimeout(d)) if d.as_secs() == 15));
    }
}

#[tokio::test(start_paused = true)]
async fn connect_must_arrive_in_time() {
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::ConnectTimeout(_))));
    // Trickling a CONNECT does not extend the deadline.
    let (mut c, task) = spawn_server(EngineHandler::new(), session_limits());
    c.send_raw(&[0x10, 0x20, 0x00]).await;
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::ConnectTimeout(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_engine_call_does_not_block_pings() {
    let world = EngineHandler::new();
    world.enroll("slow-dev", &key(10));
    let gated = GatedHandler::new(world.clone(), b"");
    let (mut c, task) = spawn_server(gated.clone(), session_limits());
    c.connect_ok("slow-dev", &py_username("slow-dev"), Some(&py_token("slow-dev", &key(10)))).await;
    c.subscribe_responses().await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 2, b"").await;
    gated.wait_entered(1).await;
    // The engine is busy with the register; pings are still answered.
    for _ in 0..3 {
        c.send(Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
    }
    gated.gate.add_permits(1);
    let (r, _) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, "1"));
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_with_back_pressure() {
    let world = EngineHandler::new();
    world.enroll("pipe-dev", &key(11));
    let gated = GatedHandler::new(world.clone(), b"");
    let (mut c, task) = spawn_server(gated.clone(), session_limits());
    c.connect_ok("pipe-dev", &py_username("pipe-dev"), Some(&py_token("pipe-dev", &key(11)))).await;
    // Two requests and a ping in one write: with one request in flight, the second waits and so does the
    // ping behind it.
    let mut bytes = Vec::new();
    for rid in ["1", "2"] {
        bytes.extend(Client::<DuplexStream>::encode(Packet::Publish(Publish::new(
            register_topic(rid),
            QoS::AtMostOnce,
            "",
        ))));
    }
    bytes.extend(Client::<DuplexStream>::encode(Packet::PingReq));
    c.send_raw(&bytes).await;
    gated.wait_entered(1).await;
    gated.gate.add_permits(1);
    assert_eq!(c.expect_response().await.0.rid, "1");
    // The second request started only now, and the ping was read after it.
    gated.wait_entered(1).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    gated.gate.add_permits(1);
    let (r, body) = c.expect_response().await;
    assert_eq!((r.rid.as_str(), r.status), ("2", 202), "{body}");
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn concurrent_requests_still_answer_in_request_order() {
    let world = EngineHandler::new();
    world.enroll("conc-dev", &key(12));
    // Only bodies containing "slow" are held.
    let gated = GatedHandler::new(world.clone(), b"slow");
    let limits = MqttLimits { max_inflight_requests: 2, ..session_limits() };
    let (mut c, task) = spawn_server(gated.clone(), limits);
    c.connect_ok("conc-dev", &py_username("conc-dev"), Some(&py_token("conc-dev", &key(12)))).await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, br#"{"payload":"slow"}"#).await;
    c.publish(&operation_status_topic("2", "4.0000000000000000.none"), QoS::AtLeastOnce, 2, b"").await;
    gated.wait_entered(2).await;
    // Both reached the engine; the fast one is done but must wait for the slow one's answer.
    c.send(Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    gated.gate.add_permits(1);
    assert_eq!(c.expect_response().await.0.rid, "1");
    assert_eq!(c.expect_response().await.0.rid, "2");
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn a_failing_handler_answers_500_and_the_session_survives() {
    let (mut c, task) = spawn_server(Arc::new(PanickingHandler), session_limits());
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, b"").await;
    let (r, body) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (500, "1"));
    assert_eq!(error_code(&body), 500000);
    c.send(Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    drop(c);
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn the_session_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (_client, server) = tokio::io::duplex(64);
    let limits = session_limits();
    let fut = serve_connection(server, EngineHandler::new(), &limits);
    assert_send(&fut);
    drop(fut);
}

#[tokio::test]
async fn unbounded_limits_do_not_overflow() {
    let limits = MqttLimits {
        connect_timeout: std::time::Duration::MAX,
        max_keep_alive: std::time::Duration::MAX,
        max_inflight_requests: 0,
        ..session_limits()
    };
    for keep_alive in [0u16, 1, u16::MAX] {
        let (mut c, task) = spawn_server(EngineHandler::new(), limits.clone());
        c.connect("dev", &py_username("dev"), None, keep_alive).await;
        assert!(matches!(c.expect().await, Packet::ConnAck(_)));
        c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, b"").await;
        assert_eq!(c.expect_response().await.0.status, 401);
        c.send(Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
        c.send(Packet::Disconnect).await;
        c.expect_closed().await;
        outcome(task).await.unwrap();
    }
}

/// Issue 14, defect 7: the CONNECT's credential is checked before the session is accepted.
#[tokio::test]
async fn a_connect_whose_credential_fits_no_enrollment_gets_connack_5_and_is_closed() {
    let world = EngineHandler::new();
    world.enroll("dev-a", &key(5));
    for (id, password) in [
        ("dev-a", Some(py_token("dev-a", &key(6)))),          // wrong key
        ("nobody", Some(py_token("nobody", &key(5)))),        // no enrollment
        ("dev-a", None),                                      // no password, no client certificate
        ("dev-a", Some("SharedAccessSignature junk".into())), // not a SAS token
    ] {
        let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());
        c.connect(id, &py_username(id), password.as_deref(), 60).await;
        match c.expect().await {
            Packet::ConnAck(ack) => {
                assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{id} {password:?}")
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c.expect_closed().await;
        match outcome(task).await {
            Err(MqttError::ConnectRefused { code: 5, reason }) => assert!(reason.contains("401"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    // The right key is accepted and provisions as before.
    let (mut c, task) = spawn_server(world.clone(), MqttLimits::default());
    c.connect_ok("dev-a", &py_username("dev-a"), Some(&py_token("dev-a", &key(5)))).await;
    c.subscribe_responses().await;
    c.publish(&register_topic("1"), QoS::AtLeastOnce, 1, br#"{"registrationId":"dev-a"}"#).await;
    let (r, _) = c.expect_response().await;
    assert_eq!(r.status, 202);
    drop(c);
    outcome(task).await.unwrap();
}

/// Issue 14, defect 7: a session that makes no request is closed, pings or not.
#[tokio::test]
async fn a_session_that_only_pings_is_closed_after_the_request_idle_timeout() {
    let limits =
        MqttLimits { request_idle_timeout: std::time::Duration::from_millis(300), ..session_limits() };
    let (mut c, task) = spawn_server(EngineHandler::new(), limits);
    c.connect_ok("idle", &py_username("idle"), None).await;
    // Pings are answered, but do not count as requests: about 300 ms after the CONNECT, the session ends.
    for _ in 0..2 {
        c.send(Packet::PingReq).await;
        assert_eq!(c.expect().await, Packet::PingResp);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    c.expect_closed().await;
    assert!(matches!(outcome(task).await, Err(MqttError::RequestIdleTimeout(_))));
}
