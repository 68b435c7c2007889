//! A whole MQTT session (`serve_connection`, or `serve_websocket` after the upgrade) over an in-memory
//! duplex stream, with the real engine behind `dps_host::Host` on a `MemoryStore` and a fixed clock.

use crate::engine::{group_key, HOST, SCOPE};
use crate::NOW;
use bytes::BytesMut;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_core::proto::{IdScope, Timestamp};
use dps_core::{AccessPolicy, EngineConfig, HttpRequest, LinkedHub, Rights};
use dps_host::{Clock, Host};
use dps_mqtt::{serve_connection, serve_websocket, MqttLimits};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumqttc::mqttbytes::v4::Packet;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// The individually enrolled device of the seeds (its key is derived from the group key, as a group
/// device's would be).
pub const DEVICE: &str = "fuzz-dev";

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_seconds(NOW)
    }
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
    })
}

fn service(host: &Host, method: &str, path: &str, body: serde_json::Value) {
    let owner = SymmetricKey::from_bytes(vec![1; 32]);
    let request = HttpRequest {
        method: method.into(),
        path_and_query: format!("{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&owner, HOST, NOW + 3600, Some("provisioningserviceowner"))),
        body: serde_json::to_vec(&body).unwrap(),
        ..HttpRequest::default()
    };
    let reply = runtime().block_on(host.http(request));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
}

fn host() -> Arc<Host> {
    static HOST_: OnceLock<Arc<Host>> = OnceLock::new();
    HOST_
        .get_or_init(|| {
            let owner = SymmetricKey::from_bytes(vec![1; 32]);
            let config = EngineConfig::new(
                IdScope::parse(SCOPE).unwrap(),
                HOST,
                vec![LinkedHub::new("hub-a.example.net", None, None).unwrap()],
            )
            .with_policy(AccessPolicy {
                key_name: "provisioningserviceowner".into(),
                primary_key: owner.clone(),
                secondary_key: owner,
                rights: Rights::ALL,
            });
            let host = runtime().block_on(async {
                Host::builder(config)
                    .store(Arc::new(MemoryStore::new()))
                    .hubs(Arc::new(MemoryHubDirectory::new()))
                    .clock(Arc::new(FixedClock))
                    .rng(Box::new(ChaCha8Rng::seed_from_u64(42)))
                    .build()
                    .unwrap()
            });
            let k = group_key();
            let device_key = k.derive_device_key(DEVICE).to_base64();
            service(
                &host,
                "PUT",
                &format!("/enrollments/{DEVICE}"),
                serde_json::json!({"registrationId": DEVICE, "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": device_key, "secondaryKey": device_key}}}),
            );
            service(
                &host,
                "PUT",
                "/enrollmentGroups/fuzz-group",
                serde_json::json!({"enrollmentGroupId": "fuzz-group", "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": k.to_base64(), "secondaryKey": k.to_base64()}}}),
            );
            Arc::new(host)
        })
        .clone()
}

/// Everything the server wrote is a sequence of complete, well-formed MQTT packets.
fn assert_mqtt_packets(out: &[u8]) {
    let mut b = BytesMut::from(out);
    while !b.is_empty() {
        if let Err(e) = Packet::read(&mut b, usize::MAX >> 4) {
            panic!("the server wrote a malformed or partial packet ({e:?}): {out:02x?}");
        }
    }
}

/// Server WebSocket frames: unmasked, complete; the binary payloads, joined, are well-formed MQTT.
fn assert_ws_frames(out: &[u8]) {
    let mut rest = out;
    let mut mqtt = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "partial frame header: {out:02x?}");
        assert_eq!(rest[1] & 0x80, 0, "a server frame is masked");
        let (len, header) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&rest[2..10]);
                (usize::try_from(u64::from_be_bytes(n)).unwrap(), 10)
            }
            n => (usize::from(n), 2),
        };
        assert!(rest.len() >= header + len, "partial frame: {out:02x?}");
        if rest[0] & 0x0f == 0x2 {
            mqtt.extend_from_slice(&rest[header..header + len]);
        }
        rest = &rest[header + len..];
    }
    assert_mqtt_packets(&mqtt);
}

/// Input: one byte of flags (bit 0: WebSocket framing; bits 1-7: the write size, 1-128 bytes), then the
/// bytes a client sends (raw MQTT, or masked WebSocket frames). The session must end without a panic and
/// write only well-formed packets (frames).
pub fn mqtt_session(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let websocket = flags & 1 == 1;
    let chunk = usize::from(flags >> 1) + 1;
    let handler = host();
    let out = runtime().block_on(async move {
        let (client, server) = tokio::io::duplex(4096);
        let limits = MqttLimits { max_packet_bytes: 4096, ..MqttLimits::default() };
        let session = tokio::spawn(async move {
            if websocket {
                serve_websocket(server, handler, &limits).await
            } else {
                serve_connection(server, handler, &limits).await
            }
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        for part in bytes.chunks(chunk) {
            if wr.write_all(part).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        // Whatever the outcome (an error is a fine answer to garbage), never a panic.
        let _ = session.await.unwrap_or_else(|e| panic!("the session panicked: {e}"));
        reader.await.unwrap()
    });
    if websocket {
        assert_ws_frames(&out);
    } else {
        assert_mqtt_packets(&out);
    }
}
