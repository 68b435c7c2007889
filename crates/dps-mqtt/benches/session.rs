//! MQTT transport overhead: a complete device session over an in-memory stream, compared with the same
//! registration handed to the engine directly, in the same run (ratios, not absolute figures, matter).
//!
//! - `direct/register_group_device`: `Engine::device` + `run_async` on `MemoryStore` for a new group device.
//! - `mqtt/register_session`: the same registration through `serve_connection` over `tokio::io::duplex`:
//!   CONNECT/CONNACK, SUBSCRIBE/SUBACK, register PUBLISH/PUBACK, the 202 response PUBLISH, DISCONNECT.
//! - `mqtt/codec_request_response`: decode a register PUBLISH and encode a response PUBLISH (no engine).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// Benchmarks measure wall-clock time with real SAS expiry; the pure-crate bans do not apply.
#![allow(clippy::disallowed_methods)]

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::mqtt::{register_topic, response_topic};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{IdScope, RegistrationId, Timestamp};
use dps_core::{
    run_async, run_blocking, AccessPolicy, DeviceCall, DeviceRequest, Engine, EngineConfig, HttpRequest,
    LinkedHub, Reply, Rights,
};
use dps_mqtt::{serve_connection, DeviceHandler, MqttLimits};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCOPE: &str = "0ne0000ABCD";
const HOST: &str = "mydps.example.net";

fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap())
}

struct World {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: Mutex<ChaCha8Rng>,
    group_key: SymmetricKey,
    next: AtomicU64,
}

impl World {
    fn new() -> Arc<World> {
        let owner = SymmetricKey::from_bytes(vec![100; 32]);
        let config = EngineConfig::new(
            IdScope::parse(SCOPE).unwrap(),
            HOST,
            vec![LinkedHub::new("hub-a.example.net", None, None).unwrap()],
        )
        .with_policy(AccessPolicy {
            key_name: "provisioningserviceowner".into(),
            primary_key: owner.clone(),
            secondary_key: owner.clone(),
            rights: Rights::ALL,
        });
        let world = World {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(1)),
            group_key: SymmetricKey::from_bytes(vec![9; 64]),
            next: AtomicU64::new(0),
        };
        let k = world.group_key.to_base64();
        let body = json!({"enrollmentGroupId": "bench", "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
        let t = now();
        let request = HttpRequest {
            method: "PUT".into(),
            path_and_query: "/enrollmentGroups/bench?api-version=2021-10-01".into(),
            authorization: Some(build_token(
                &owner,
                HOST,
                t.unix_seconds() + 3600,
                Some("provisioningserviceowner"),
            )),
            body: serde_json::to_vec(&body).unwrap(),
            ..HttpRequest::default()
        };
        let mut flow = world.engine.http(t, &mut *world.rng.lock().unwrap(), request);
        assert_eq!(run_blocking(&mut flow, &world.store, &world.hubs).status, 200);
        Arc::new(world)
    }

    /// A fresh device ID and its SAS token.
    fn device(&self) -> (String, String) {
        let id = format!("sensor-{:09}", self.next.fetch_add(1, Ordering::Relaxed));
        let key = self.group_key.derive_device_key(&id);
        let token = build_token(
            &key,
            &encode_resource(&device_resource(SCOPE, &id)),
            now().unix_seconds() + 3600,
            Some("registration"),
        );
        (id, token)
    }
}

impl DeviceHandler for World {
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        let mut flow = self.engine.device(now(), &mut *self.rng.lock().unwrap(), request);
        async move { run_async(&mut flow, &self.store, &self.hubs).await }
    }
}

fn encode(p: Packet, out: &mut Vec<u8>) {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    out.extend_from_slice(&b);
}

async fn mqtt_session(world: &Arc<World>, limits: &MqttLimits) {
    let (id, token) = world.device();
    let (mut client, server) = tokio::io::duplex(16 * 1024);
    let handler = Arc::clone(world);
    let limits = limits.clone();
    let session = tokio::spawn(async move { serve_connection(server, handler, &limits).await });
    let mut out = Vec::new();
    let mut connect = Connect::new(id.clone());
    connect.login = Some(Login::new(format!("{SCOPE}/registrations/{id}/api-version=2021-06-01"), token));
    encode(Packet::Connect(connect), &mut out);
    encode(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)), &mut out);
    let mut register = Publish::new(register_topic("1"), QoS::AtLeastOnce, "");
    register.pkid = 2;
    encode(Packet::Publish(register), &mut out);
    client.write_all(&out).await.unwrap();
    // Read CONNACK, SUBACK, PUBACK and the response.
    let mut buf = BytesMut::new();
    let mut seen = 0;
    while seen < 4 {
        match Packet::read(&mut buf, usize::MAX >> 4) {
            Ok(Packet::Publish(p)) => {
                assert!(p.topic.starts_with("$dps/registrations/res/202/"), "{}", p.topic);
                seen += 1;
            }
            Ok(_) => seen += 1,
            Err(_) => {
                assert!(client.read_buf(&mut buf).await.unwrap() > 0);
            }
        }
    }
    let mut out = Vec::new();
    encode(Packet::Disconnect, &mut out);
    client.write_all(&out).await.unwrap();
    session.await.unwrap().unwrap();
}

fn sessions(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let world = World::new();
    let limits = MqttLimits::default();
    let mut g = c.benchmark_group("direct");
    g.throughput(Throughput::Elements(1));
    g.bench_function("register_group_device", |b| {
        b.iter(|| {
            let (id, token) = world.device();
            let request = DeviceRequest {
                id_scope: IdScope::parse(SCOPE).unwrap(),
                registration_id: RegistrationId::parse(&id).unwrap(),
                call: DeviceCall::Register { force: false },
                api_version: None,
                credential: dps_core::proto::Credential::SasToken(token),
                body: Vec::new(),
                client_address: None,
            };
            let reply = rt.block_on(world.handle(request));
            assert_eq!(reply.status, 202);
        })
    });
    g.finish();
    let mut g = c.benchmark_group("mqtt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("register_session", |b| b.iter(|| rt.block_on(mqtt_session(&world, &limits))));

    let mut request =
        Publish::new(register_topic("a3c9b0f2-4b1e-4f6a-9d3e-2f1c0b9a8e7d"), QoS::AtLeastOnce, {
            br#"{"payload": null, "registrationId": "sensor-000000042"}"#.to_vec()
        });
    request.pkid = 7;
    let mut wire = Vec::new();
    encode(Packet::Publish(request), &mut wire);
    let body = vec![b'x'; 600];
    g.bench_function("codec_request_response", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&wire[..]));
            let Packet::Publish(p) = Packet::read(&mut buf, 100_000).unwrap() else { unreachable!() };
            let parsed = dps_core::proto::mqtt::parse_request_topic(&p.topic).unwrap();
            let mut response =
                Publish::new(response_topic(202, parsed.rid(), Some(2)), QoS::AtLeastOnce, body.clone());
            response.pkid = 1;
            let mut out = BytesMut::new();
            Packet::Publish(response).write(&mut out, usize::MAX).unwrap();
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(benches, sessions);
criterion_main!(benches);
