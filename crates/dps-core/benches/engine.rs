//! Engine benchmarks. Every figure is reported as a ratio to `floor/hmac_json_round_trip`, measured in the
//! same run: an HMAC-SHA256 plus a JSON round trip (parse a register request, build and serialize a
//! ~500-byte result) — the unavoidable work of one registration.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// Benchmarks measure wall-clock time; the pure-crate bans do not apply to them.
#![allow(clippy::disallowed_methods)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::model::{DeviceRegistration, DeviceRegistrationResult, RegistrationStatus};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SasToken, SymmetricKey};
use dps_core::proto::EnrollmentGroupId;
use dps_core::proto::{IdScope, RegistrationId, Timestamp};
use dps_core::run_async;
use dps_core::store::{BlockingStore, StoreOp, StoreResult, WriteCondition};
use dps_core::{
    run_blocking, DeviceCall, DeviceRequest, Engine, EngineConfig, HttpRequest, LinkedHub, Rights,
};
use dps_store::{MemoryStore, SqliteOptions, SqliteStore};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const SCOPE: &str = "0ne0000ABCD";
const NOW: i64 = 1_700_000_000;

fn floor(c: &mut Criterion) {
    let key = SymmetricKey::from_bytes(vec![7; 32]);
    let body = br#"{"registrationId":"sensor-000042","payload":null}"#;
    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hmac_json_round_trip", |b| {
        b.iter(|| {
            let req: DeviceRegistration = serde_json::from_slice(black_box(body)).unwrap();
            let sig = key.sign(black_box("0ne0000ABCD%2Fregistrations%2Fsensor-000042\n1700003600"));
            let id = req.registration_id.unwrap_or_default();
            let mut r = DeviceRegistrationResult::minimal(&id, RegistrationStatus::Assigned);
            r.assigned_hub = Some("hub-a.example.net".into());
            r.device_id = Some(id.clone());
            r.created_date_time_utc = Some("2022-08-31T22:02:50.5163352Z".into());
            r.last_updated_date_time_utc = Some("2022-08-31T22:02:50.5163352Z".into());
            r.etag = Some("IjY5MDAzNTUyLTAwMDAtMDMwMC0wMDAwLTYzMGZkYThhMDAwMCI=".into());
            r.error_message = Some(format!("{sig:?}"));
            black_box(serde_json::to_vec(&r).unwrap())
        })
    });
    g.finish();
}

fn sas(c: &mut Criterion) {
    let key = SymmetricKey::from_bytes(vec![7; 32]);
    let token = build_token(
        &key,
        &encode_resource(&device_resource(SCOPE, "sensor-1")),
        NOW + 3600,
        Some("registration"),
    );
    let group_key = SymmetricKey::from_bytes(vec![9; 64]);
    let derived = group_key.derive_device_key("sensor-1");
    let group_token = build_token(
        &derived,
        &encode_resource(&device_resource(SCOPE, "sensor-1")),
        NOW + 3600,
        Some("registration"),
    );
    let mut g = c.benchmark_group("sas");
    g.throughput(Throughput::Elements(1));
    g.bench_function("device_verify", |b| {
        b.iter(|| {
            let t = SasToken::parse(black_box(&token)).unwrap();
            t.verify(Timestamp::from_unix_seconds(NOW), "0ne0000ABCD/registrations/sensor-1", &[&key])
                .unwrap()
        })
    });
    g.bench_function("group_derive_and_verify", |b| {
        b.iter(|| {
            let t = SasToken::parse(black_box(&group_token)).unwrap();
            let k = group_key.derive_device_key(black_box("sensor-1"));
            t.verify(Timestamp::from_unix_seconds(NOW), "0ne0000ABCD/registrations/sensor-1", &[&k]).unwrap()
        })
    });
    g.finish();
}

/// A root → intermediate → leaf PKI (ECDSA P-256, as most fleets use), the root uploaded and verified.
struct Pki {
    root_der: Vec<u8>,
    chain: Vec<Vec<u8>>,
    self_signed: Vec<u8>,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("bench-root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, &root_key);
    let int_key = KeyPair::generate().unwrap();
    let int_params = ca_params("bench-int");
    let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let int_issuer = Issuer::new(int_params, &int_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.distinguished_name.push(DnType::CommonName, "sensor-1");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &int_issuer).unwrap();
    let self_signed = leaf_params.self_signed(&leaf_key).unwrap();
    Pki {
        root_der: root.der().to_vec(),
        chain: vec![leaf.der().to_vec(), int.der().to_vec()],
        self_signed: self_signed.der().to_vec(),
    }
}

fn x509(c: &mut Criterion) {
    use base64::Engine as _;
    use dps_core::attest::{attest, prepare, Attestation};
    use dps_core::proto::certificate::CaCertificate;
    use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
    use dps_core::proto::{Credential, Etag};
    use std::sync::Arc;
    let pki = pki();
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let now = Timestamp::from_unix_seconds(NOW);
    let scope = IdScope::parse(SCOPE).unwrap();
    let id = RegistrationId::parse("sensor-1").unwrap();
    let group: EnrollmentGroup = serde_json::from_value(json!({"enrollmentGroupId": "fleet",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root"}}}}))
    .unwrap();
    let groups = Arc::new(vec![group]);
    let certificates = vec![CaCertificate {
        name: "root".into(),
        der: pki.root_der.clone(),
        is_verified: true,
        verification_code: None,
        created: now,
        updated: now,
        etag: Etag::generate([1; 16]),
    }];
    let chain = Credential::from_transport(None, Some(pki.chain.clone()));
    let individual: IndividualEnrollment = serde_json::from_value(json!({"registrationId": "sensor-1",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": b64(&pki.self_signed)}}}}}))
    .unwrap();
    let individual = Arc::new(individual);
    let self_signed = Credential::from_transport(None, Some(vec![pki.self_signed.clone()]));
    let mut g = c.benchmark_group("x509");
    g.throughput(Throughput::Elements(1));
    g.bench_function("group_chain_verify", |b| {
        b.iter(|| {
            let presented = prepare(now, black_box(&chain)).unwrap();
            let proof = attest(now, &scope, &id, &presented, None, &groups, None, &certificates).unwrap();
            assert!(matches!(proof, Attestation::Verified(_)));
        })
    });
    g.bench_function("self_signed_individual_verify", |b| {
        b.iter(|| {
            let presented = prepare(now, black_box(&self_signed)).unwrap();
            let proof =
                attest(now, &scope, &id, &presented, Some(Arc::clone(&individual)), &groups, None, &[])
                    .unwrap();
            assert!(matches!(proof, Attestation::Verified(_)));
        })
    });
    g.finish();
}

fn engine_with_group() -> (Engine, MemoryStore, MemoryHubDirectory, SymmetricKey) {
    let hubs = vec![
        LinkedHub::new("hub-a.example.net", None, None).unwrap(),
        LinkedHub::new("hub-b.example.net", None, None).unwrap(),
    ];
    let owner = SymmetricKey::from_bytes(vec![1; 32]);
    let config = EngineConfig::new(IdScope::parse(SCOPE).unwrap(), "dps.example.net", hubs).with_policy(
        dps_core::AccessPolicy {
            key_name: "provisioningserviceowner".into(),
            primary_key: owner.clone(),
            secondary_key: owner.clone(),
            rights: Rights::ALL,
        },
    );
    let engine = Engine::new(config).unwrap();
    let store = MemoryStore::new();
    let hubs = MemoryHubDirectory::new();
    let group_key = SymmetricKey::from_bytes(vec![9; 64]);
    let body = json!({"enrollmentGroupId": "fleet", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key.to_base64(), "secondaryKey": group_key.to_base64()}}});
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut flow = engine.http(
        Timestamp::from_unix_seconds(NOW),
        &mut rng,
        HttpRequest {
            method: "PUT".into(),
            path_and_query: "/enrollmentGroups/fleet?api-version=2021-10-01".into(),
            authorization: Some(build_token(
                &owner,
                "dps.example.net",
                NOW + 3600,
                Some("provisioningserviceowner"),
            )),
            body: serde_json::to_vec(&body).unwrap(),
            ..HttpRequest::default()
        },
    );
    assert_eq!(run_blocking(&mut flow, &store, &hubs).status, 200);
    (engine, store, hubs, group_key)
}

fn register_request(group_key: &SymmetricKey, i: u64) -> DeviceRequest {
    let id = format!("sensor-{i:08}");
    let k = group_key.derive_device_key(&id);
    DeviceRequest {
        id_scope: IdScope::parse(SCOPE).unwrap(),
        registration_id: RegistrationId::parse(&id).unwrap(),
        call: DeviceCall::Register { force: false },
        api_version: None,
        credential: dps_core::proto::Credential::SasToken(build_token(
            &k,
            &encode_resource(&device_resource(SCOPE, &id)),
            NOW + 3600,
            Some("registration"),
        )),
        body: format!(r#"{{"registrationId":"{id}","payload":null}}"#).into_bytes(),
        client_address: None,
    }
}

fn engine(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    // Each sample starts from a fresh store holding one group enrollment and registers `iters` new devices
    // (group-derived keys, hashed over two hubs); setup and teardown are not timed.
    g.bench_function("register_group_device_memory", |b| {
        b.iter_custom(|iters| {
            let (engine, store, hubs, group_key) = engine_with_group();
            let requests: Vec<_> = (0..iters).map(|i| register_request(&group_key, i)).collect();
            let start = std::time::Instant::now();
            for request in requests {
                let mut flow = engine.device(Timestamp::from_unix_seconds(NOW), &mut rng, request);
                let reply = run_blocking(&mut flow, &store, &hubs);
                debug_assert_eq!(reply.status, 202);
                black_box(reply);
            }
            let elapsed = start.elapsed();
            drop((store, hubs));
            elapsed
        })
    });
    g.finish();
}

/// The rate-limit checks the host makes before a device request reaches the engine (`dps_host`'s gate,
/// spec §10.2): the instance's registration bucket behind a mutex (every register), and a device's poll
/// bucket in a map of 10,000 devices behind a mutex (every poll). `engine/register_…_throttled` is the
/// registration benchmark with the registration check in the loop, for a ratio in the same run.
fn throttle(c: &mut Criterion) {
    use dps_policy::throttle::{Bucket, Rate};
    use std::collections::HashMap;
    use std::sync::Mutex;
    // Limits that never refuse, so every check does the full work of an admitted request.
    let rate = Rate::per_minute(u32::MAX).unwrap();
    let mut g = c.benchmark_group("throttle");
    g.throughput(Throughput::Elements(1));
    let instance = Mutex::new(Bucket::default());
    let mut t = NOW * 1_000_000_000;
    g.bench_function("registration_check", |b| {
        b.iter(|| {
            t += 1_000;
            let now = Timestamp::from_unix_nanos(t);
            black_box(instance.lock().unwrap().take(&rate, black_box(now)).is_ok())
        })
    });
    let poll_rate = Rate::new(u32::MAX, 10).unwrap();
    let devices: Mutex<HashMap<String, Bucket>> =
        Mutex::new((0..10_000).map(|i| (format!("sensor-{i:08}"), Bucket::default())).collect());
    let keys: Vec<String> = (0..10_000).map(|i| format!("sensor-{i:08}")).collect();
    let mut i = 0usize;
    g.bench_function("poll_check_10k_devices", |b| {
        b.iter(|| {
            t += 1_000;
            i = (i + 1) % keys.len();
            let now = Timestamp::from_unix_nanos(t);
            let mut map = devices.lock().unwrap();
            black_box(map.get_mut(black_box(keys[i].as_str())).map(|b| b.take(&poll_rate, now).is_ok()))
        })
    });
    g.finish();

    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("register_group_device_memory_throttled", |b| {
        b.iter_custom(|iters| {
            let (engine, store, hubs, group_key) = engine_with_group();
            let requests: Vec<_> = (0..iters).map(|i| register_request(&group_key, i)).collect();
            let bucket = Mutex::new(Bucket::default());
            let start = std::time::Instant::now();
            for request in requests {
                let now = Timestamp::from_unix_seconds(NOW);
                let admitted = bucket.lock().unwrap().take(&rate, now).is_ok();
                debug_assert!(admitted);
                let mut flow = engine.device(now, &mut rng, request);
                let reply = run_blocking(&mut flow, &store, &hubs);
                debug_assert_eq!(reply.status, 202);
                black_box((admitted, reply));
            }
            let elapsed = start.elapsed();
            drop((store, hubs));
            elapsed
        })
    });
    g.finish();
}

/// Durable registrations on SQLite (WAL, synchronous=FULL). `concurrent_512` runs 512 registrations at a
/// time through the async driver, so the store's writer commits them in groups (one fsync per group);
/// `sequential` waits for each registration's own commit (one fsync each) — the floor group commit beats.
/// The `_sealed` variants open the store with encryption at rest (`SqliteStore::open_sealed`): the group's
/// keys are sealed in its row and opened once into the snapshot, so a registration seals and opens nothing
/// (registration records hold no secret); they measure that the hot path stays as it was.
fn sqlite(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut g = c.benchmark_group("sqlite");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    let setup = |dir: &std::path::Path, sealed: bool| {
        let (engine, mem, hubs, group_key) = engine_with_group();
        let sealer = sealed.then(|| {
            let key = dps_store::seal::DataKey::from_bytes([9u8; 32]);
            std::sync::Arc::new(dps_store::seal::Sealer::new(vec![("b1".into(), key)], "b1").unwrap())
        });
        let store =
            SqliteStore::open_sealed(dir.join("bench.sqlite3"), SqliteOptions::default(), sealer).unwrap();
        // Copy the group enrollment into the SQLite store.
        let group = match BlockingStore::execute(
            &mem,
            StoreOp::GetGroup { group_id: EnrollmentGroupId::parse("fleet").unwrap() },
        ) {
            Ok(StoreResult::Group(Some(g))) => g,
            other => panic!("{other:?}"),
        };
        BlockingStore::execute(
            &store,
            StoreOp::PutGroup { group, condition: WriteCondition::Upsert, max_symmetric_key_groups: None },
        )
        .unwrap();
        (engine, store, hubs, group_key)
    };
    for (suffix, sealed) in [("", false), ("_sealed", true)] {
        g.bench_function(format!("register_concurrent_512{suffix}"), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                let (engine, store, hubs, group_key) = setup(dir.path(), sealed);
                let requests: Vec<_> = (0..iters).map(|i| register_request(&group_key, i)).collect();
                let start = std::time::Instant::now();
                for chunk in requests.chunks(512) {
                    let mut flows: Vec<_> = chunk
                        .iter()
                        .map(|r| engine.device(Timestamp::from_unix_seconds(NOW), &mut rng, r.clone()))
                        .collect();
                    let replies = futures::executor::block_on(futures::future::join_all(
                        flows.iter_mut().map(|f| run_async(f, &store, &hubs)),
                    ));
                    debug_assert!(replies.iter().all(|r| r.status == 202));
                    black_box(replies);
                }
                let elapsed = start.elapsed();
                store.close().unwrap();
                elapsed
            })
        });
        g.bench_function(format!("register_sequential{suffix}"), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                let (engine, store, hubs, group_key) = setup(dir.path(), sealed);
                let requests: Vec<_> = (0..iters).map(|i| register_request(&group_key, i)).collect();
                let start = std::time::Instant::now();
                for request in requests {
                    let mut flow = engine.device(Timestamp::from_unix_seconds(NOW), &mut rng, request);
                    black_box(run_blocking(&mut flow, &store, &hubs));
                }
                let elapsed = start.elapsed();
                store.close().unwrap();
                elapsed
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(3));
    targets = floor, sas, x509, engine, throttle, sqlite
}
criterion_main!(benches);
