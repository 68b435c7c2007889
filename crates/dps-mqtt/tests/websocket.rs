//! MQTT over WebSocket: the upgrade as a server performs it, then sessions with a tokio-tungstenite client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dps_core::proto::mqtt::{operation_status_topic, register_topic};
use dps_mqtt::{MqttError, MqttLimits};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type WsClient = Client<tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>>;

fn encode(p: Packet) -> Vec<u8> {
    WsClient::encode(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_provisions_over_websocket() {
    let world = EngineHandler::new();
    world.enroll("ws-py", &key(20));
    // The Python SDK's path, copied from IoT Hub.
    let (mut c, task) = spawn_ws_server(world.clone(), session_limits(), "/$iothub/websocket", true).await;
    c.connect_ok("ws-py", &py_username("ws-py"), Some(&py_token("ws-py", &key(20)))).await;
    c.subscribe_responses().await;

    let rid = "0b6f3b8e-2d0c-4c55-9a0e-5d2b7f3c9a11";
    c.publish(&register_topic(rid), QoS::AtLeastOnce, 2, br#"{"payload": null, "registrationId": "ws-py"}"#)
        .await;
    let (r, reply) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, rid), "{reply}");
    assert!(r.retry_after.is_some());
    let op = reply["operationId"].as_str().unwrap().to_owned();

    let poll_rid = "7d1e1c52-9b0a-4f4e-8a8e-0c4c3b2a1f00";
    c.publish(&operation_status_topic(poll_rid, &op), QoS::AtLeastOnce, 3, b" ").await;
    let (r, done) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (200, poll_rid), "{done}");
    assert_eq!(done["status"], "assigned");
    assert_eq!(done["registrationState"]["assignedHub"], HUB);
    assert_eq!(done["registrationState"]["deviceId"], "ws-py");
    assert!(world.hubs.device(HUB, "ws-py").is_some());

    c.send(Packet::Disconnect).await;
    c.expect_closed().await;
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn packets_may_span_frames_and_frames_may_hold_several_packets() {
    let world = EngineHandler::new();
    world.enroll("ws-cs", &key(21));
    // The C# SDK's path "/".
    let (mut c, task) = spawn_ws_server(world.clone(), session_limits(), "/", true).await;

    let mut connect = Connect::new("ws-cs");
    connect.login = Some(Login::new(cs_username("ws-cs"), sdk_token("ws-cs", &key(21))));
    let connect = encode(Packet::Connect(connect));
    // CONNECT in three frames, the first one a single byte.
    c.send_raw(&connect[..1]).await;
    c.send_raw(&connect[1..20]).await;
    c.send_raw(&connect[20..]).await;
    assert!(matches!(c.expect().await, Packet::ConnAck(_)));

    // SUBSCRIBE, PINGREQ and a register in one frame.
    let mut frame = encode(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)));
    frame.extend(encode(Packet::PingReq));
    let mut register = rumqttc::mqttbytes::v4::Publish::new(register_topic("1"), QoS::AtLeastOnce, "");
    register.pkid = 7;
    frame.extend(encode(Packet::Publish(register)));
    c.send_raw(&frame).await;
    match c.expect().await {
        Packet::SubAck(ack) => {
            assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.expect().await, Packet::PingResp);
    match c.expect().await {
        Packet::PubAck(ack) => assert_eq!(ack.pkid, 7),
        other => panic!("{other:?}"),
    }
    let (r, _) = c.expect_response().await;
    assert_eq!((r.status, r.rid.as_str()), (202, "1"));

    // The client closes the WebSocket: a clean end.
    c.io.close(None).await.unwrap();
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn the_subprotocol_is_optional_and_pings_are_answered() {
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/any/path", false).await;
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.io.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    match c.io.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
    c.send(Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    c.send(Packet::Disconnect).await;
    // The server ends with a normal close frame.
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    outcome(task).await.unwrap();
}

#[tokio::test]
async fn a_text_frame_ends_the_session_with_a_protocol_close() {
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/", true).await;
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.io.send(Message::text("hello")).await.unwrap();
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Protocol),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::WebSocket(_))));
}

#[tokio::test]
async fn mqtt_errors_over_websocket_close_with_the_matching_code() {
    // A protocol violation.
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/", true).await;
    c.send(Packet::PingReq).await;
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Protocol),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))));

    // A message over the limit.
    let limits = MqttLimits { max_packet_bytes: 1000, ..session_limits() };
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), limits, "/", true).await;
    c.connect_ok("dev", &py_username("dev"), None).await;
    let _ = c.try_send_raw(&vec![0u8; 10_000]).await;
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::PacketTooLarge { .. })));

    // A packet over the limit inside a message that fits.
    let limits = MqttLimits { max_packet_bytes: 1000, ..session_limits() };
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), limits, "/", true).await;
    c.connect_ok("dev", &py_username("dev"), None).await;
    c.send_raw(&encode(Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
        register_topic("1"),
        QoS::AtMostOnce,
        vec![b' '; 2000],
    ))))
    .await;
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::PacketTooLarge { max: 1000, .. })));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_applies_over_websocket() {
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/", true).await;
    c.connect("dev", &py_username("dev"), None, 4).await;
    assert!(matches!(c.expect().await, Packet::ConnAck(_)));
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::KeepAliveTimeout(d)) if d.as_secs() == 6));
}

#[tokio::test]
async fn dropping_the_tcp_stream_mid_session_is_an_ordinary_end() {
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/", true).await;
    c.connect_ok("dev", &py_username("dev"), None).await;
    drop(c);
    outcome(task).await.unwrap();
}

/// Issue 14, defect 9: a client speaking another protocol in its first binary frame (here the AMQP 1.0
/// protocol header) gets a WebSocket close with code 1002 (protocol error), not a hang.
#[tokio::test]
async fn another_protocol_in_the_first_frame_is_closed_with_1002() {
    let (mut c, task) = spawn_ws_server(EngineHandler::new(), session_limits(), "/", true).await;
    c.io.send(Message::binary(b"AMQP\x00\x01\x00\x00".to_vec())).await.unwrap();
    match c.io.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Protocol),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(matches!(outcome(task).await, Err(MqttError::Protocol(_))));
}
