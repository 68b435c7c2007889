//! Property tests: whatever bytes a client sends, a session ends without panicking, and everything the
//! server wrote is a sequence of well-formed MQTT packets (raw) or WebSocket frames (WebSocket).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use common::*;
use dps_core::proto::mqtt::{operation_status_topic, register_topic};
use dps_mqtt::{serve_connection, serve_websocket, MqttLimits};
use proptest::prelude::*;
use proptest::sample::Index;
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One engine for all cases, with an enrolled device, so valid prefixes reach it.
fn world() -> Arc<EngineHandler> {
    static WORLD: OnceLock<Arc<EngineHandler>> = OnceLock::new();
    WORLD
        .get_or_init(|| {
            let w = EngineHandler::new();
            w.enroll("prop-dev", &key(30));
            w
        })
        .clone()
}

fn encode(p: Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

/// A complete, valid Python-SDK-style session.
fn valid_session() -> Vec<u8> {
    let mut connect = Connect::new("prop-dev");
    connect.keep_alive = 30;
    connect.login = Some(Login::new(py_username("prop-dev"), py_token("prop-dev", &key(30))));
    let mut out = encode(Packet::Connect(connect));
    out.extend(encode(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))));
    let mut register =
        Publish::new(register_topic("r1"), QoS::AtLeastOnce, br#"{"registrationId":"prop-dev"}"#.to_vec());
    register.pkid = 2;
    out.extend(encode(Packet::Publish(register)));
    out.extend(encode(Packet::PingReq));
    out.extend(encode(Packet::Publish(Publish::new(
        operation_status_topic("r2", "4.0123456789abcdef.00000000-0000-4000-8000-000000000000"),
        QoS::AtMostOnce,
        " ",
    ))));
    out.extend(encode(Packet::Disconnect));
    out
}

fn mutate(mut bytes: Vec<u8>, edits: &[(Index, u8)], cut: Option<Index>) -> Vec<u8> {
    for (at, value) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *value;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

/// A masked binary WebSocket frame, as a client must send it.
fn ws_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[derive(Clone, Copy)]
enum Mode {
    Raw,
    WebSocket,
}

/// Feeds `bytes` in `chunk`-sized writes, then EOF; drains the server's output concurrently. Runs in a
/// paused-clock runtime, so connect and keep-alive timeouts pass instantly when nothing else can happen.
fn feed(mode: Mode, bytes: Vec<u8>, chunk: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(4096);
        let limits = MqttLimits { max_packet_bytes: 2048, ..session_limits() };
        let handler = world();
        let session = tokio::spawn(async move {
            match mode {
                Mode::Raw => serve_connection(server, handler, &limits).await,
                Mode::WebSocket => serve_websocket(server, handler, &limits).await,
            }
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        for part in bytes.chunks(chunk.max(1)) {
            if wr.write_all(part).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        // Never a panic, whatever the outcome.
        let _ = session.await.expect("the session panicked");
        reader.await.unwrap()
    })
}

fn assert_mqtt_packets(out: &[u8]) {
    let mut b = BytesMut::from(out);
    while !b.is_empty() {
        Packet::read(&mut b, usize::MAX >> 4).expect("the server wrote a malformed or partial packet");
    }
}

/// Unmasked server frames: header (2, 4 or 10 bytes) then payload; returns the number of frames.
fn assert_ws_frames(out: &[u8]) -> usize {
    let mut rest = out;
    let mut frames = 0;
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "partial frame header");
        assert_eq!(rest[1] & 0x80, 0, "server frames are not masked");
        let (len, header) = match rest[1] & 0x7f {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        assert!(rest.len() >= header + len, "partial frame");
        rest = &rest[header + len..];
        frames += 1;
    }
    frames
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
    ) {
        assert_mqtt_packets(&feed(Mode::Raw, bytes, chunk));
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_connect_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..400),
        chunk in 1usize..128,
    ) {
        let mut bytes = valid_session();
        let connect_len = {
            let mut b = BytesMut::from(&bytes[..]);
            let before = b.len();
            Packet::read(&mut b, usize::MAX).unwrap();
            before - b.len()
        };
        bytes.truncate(connect_len);
        bytes.extend(tail);
        assert_mqtt_packets(&feed(Mode::Raw, bytes, chunk));
    }

    #[test]
    fn mutated_valid_sessions_never_panic(
        edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<Index>()),
        chunk in 1usize..256,
    ) {
        let out = feed(Mode::Raw, mutate(valid_session(), &edits, cut), chunk);
        assert_mqtt_packets(&out);
    }

    #[test]
    fn arbitrary_websocket_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
    ) {
        assert_ws_frames(&feed(Mode::WebSocket, bytes, chunk));
    }

    #[test]
    fn mutated_sessions_in_websocket_frames_never_panic(
        edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<Index>()),
        frame_size in 1usize..200,
        mask in any::<[u8; 4]>(),
    ) {
        let session = mutate(valid_session(), &edits, cut);
        let framed: Vec<u8> = session.chunks(frame_size).flat_map(|c| ws_frame(c, mask)).collect();
        assert_ws_frames(&feed(Mode::WebSocket, framed, 97));
    }
}

#[test]
fn the_unmutated_session_is_served_completely() {
    // Guards the properties above against vacuity: the valid session really provisions and ends cleanly.
    let out = feed(Mode::Raw, valid_session(), 4096);
    let mut b = BytesMut::from(&out[..]);
    let mut packets = Vec::new();
    while !b.is_empty() {
        packets.push(Packet::read(&mut b, usize::MAX >> 4).unwrap());
    }
    assert!(matches!(packets[0], Packet::ConnAck(_)), "{packets:?}");
    assert!(matches!(packets[1], Packet::SubAck(_)), "{packets:?}");
    assert!(matches!(packets[2], Packet::PubAck(_)), "{packets:?}");
    // The DISCONNECT is read right after the other packets, so the replies may or may not have been sent;
    // what was sent is well-formed. The same bytes framed for WebSocket produce frames too.
    let framed: Vec<u8> = valid_session().chunks(50).flat_map(|c| ws_frame(c, [1, 2, 3, 4])).collect();
    assert!(assert_ws_frames(&feed(Mode::WebSocket, framed, 4096)) >= 3);
}
