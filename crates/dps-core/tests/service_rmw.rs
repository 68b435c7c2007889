//! Read-modify-write service paths (a replace that keeps the stored keys) write with If-Match of the ETag
//! they read, so a concurrent writer's update is never lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::{ErrorBody, IdScope, Timestamp};
use dps_core::store::BlockingStore;
use dps_core::{
    run_blocking, AccessPolicy, Engine, EngineConfig, Flow, HttpRequest, Input, LinkedHub, Rights, Step,
};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const NOW: i64 = 1_700_000_000;

fn engine() -> Engine {
    let hubs = vec![LinkedHub::new("hub.example.net", None, None).unwrap()];
    let k = SymmetricKey::from_bytes(vec![1; 32]);
    Engine::new(
        EngineConfig::new(IdScope::parse("0ne00000001").unwrap(), "dps.example.net", hubs).with_policy(
            AccessPolicy {
                key_name: "owner".into(),
                primary_key: k.clone(),
                secondary_key: k,
                rights: Rights::ALL,
            },
        ),
    )
    .unwrap()
}

/// One engine, store, hub directory, seeded RNG and fixed time: what every test here drives.
struct Rig {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
    now: Timestamp,
}

fn rig(engine: Engine, seed: u64) -> Rig {
    Rig {
        engine,
        store: MemoryStore::new(),
        hubs: MemoryHubDirectory::new(),
        rng: ChaCha8Rng::seed_from_u64(seed),
        now: Timestamp::from_unix_seconds(NOW),
    }
}

fn put(body: Value) -> HttpRequest {
    common::owner_put("/enrollmentGroups/g", &body, NOW + 60)
}

fn group(tag: &str, with_keys: bool) -> Value {
    let mut sk = json!({});
    if with_keys {
        sk = json!({"primaryKey": SymmetricKey::from_bytes(vec![5; 32]).to_base64(),
            "secondaryKey": SymmetricKey::from_bytes(vec![6; 32]).to_base64()});
    }
    json!({"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey", "symmetricKey": sk},
        "initialTwin": {"tags": {"who": tag}}})
}

#[test]
fn a_replace_that_keeps_stored_keys_fails_with_409_when_another_writer_changed_the_item_in_between() {
    let Rig { engine, store, hubs, mut rng, now } = rig(engine(), 1);
    let mut create = engine.http(now, &mut rng, put(group("first", true)));
    assert_eq!(run_blocking(&mut create, &store, &hubs).status, 200);

    // Writer A omits the keys: its flow reads the stored group first.
    let mut a = engine.http(now, &mut rng, put(group("a", false)));
    let Step::Store(read) = a.resume(Input::Start) else { panic!("expected the read of the stored group") };
    let stale = store.execute(read);

    // Writer B replaces the group meanwhile.
    let mut b = engine.http(now, &mut rng, put(group("b", true)));
    assert_eq!(run_blocking(&mut b, &store, &hubs).status, 200);

    // A resumes with what it read before B's write: its guarded write must not overwrite B.
    let Step::Store(write) = a.resume(Input::Store(stale)) else { panic!("expected the write") };
    // The refusal is appended to the audit log before it is answered.
    let Step::Store(append @ dps_core::store::StoreOp::AppendAudit { .. }) =
        a.resume(Input::Store(store.execute(write)))
    else {
        panic!("expected the audit append of the refusal")
    };
    let Step::Respond(reply) = a.resume(Input::Store(store.execute(append))) else {
        panic!("expected a reply")
    };
    assert_eq!(reply.status, 409, "{}", String::from_utf8_lossy(&reply.body));
    let err: ErrorBody = serde_json::from_slice(&reply.body).unwrap();
    assert!(err.message.contains("changed concurrently"), "{}", err.message);

    let mut get =
        engine.http(now, &mut rng, HttpRequest { method: "GET".into(), body: vec![], ..put(json!({})) });
    let stored: Value = serde_json::from_slice(&run_blocking(&mut get, &store, &hubs).body).unwrap();
    assert_eq!(stored["initialTwin"]["tags"]["who"], "b", "B's update survives");
}

#[test]
fn a_replace_without_keys_and_without_a_race_still_keeps_the_stored_keys() {
    let Rig { engine, store, hubs, mut rng, now } = rig(engine(), 2);
    assert_eq!(
        run_blocking(&mut engine.http(now, &mut rng, put(group("first", true))), &store, &hubs).status,
        200
    );
    let r = run_blocking(&mut engine.http(now, &mut rng, put(group("second", false))), &store, &hubs);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Issue 14, defect 3: the kept keys are not echoed to a caller that did not send them (it may hold only
    // EnrollmentWrite); the reply hides them as a GET does.
    let reply: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(reply["attestation"]["symmetricKey"], json!({}), "{reply}");
    assert!(!String::from_utf8_lossy(&r.body).contains(&SymmetricKey::from_bytes(vec![5; 32]).to_base64()));
    let mut att = engine.http(
        now,
        &mut rng,
        HttpRequest {
            method: "POST".into(),
            path_and_query: "/enrollmentGroups/g/attestationmechanism?api-version=2021-10-01".into(),
            body: vec![],
            ..put(json!({}))
        },
    );
    let mech: Value = serde_json::from_slice(&run_blocking(&mut att, &store, &hubs).body).unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], SymmetricKey::from_bytes(vec![5; 32]).to_base64());
}

#[test]
fn a_write_reply_shows_the_keys_the_caller_sent_or_the_service_generated_and_no_others() {
    let Rig { engine, store, hubs, mut rng, now } = rig(engine(), 3);
    // Created without keys: the generated keys are in the reply (SDKs read them from it).
    let r = run_blocking(&mut engine.http(now, &mut rng, put(group("new", false))), &store, &hubs);
    let created: Value = serde_json::from_slice(&r.body).unwrap();
    let primary = created["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    assert_eq!(SymmetricKey::parse(&primary).unwrap().as_bytes().len(), 64);
    // Replaced with only a new secondary key: the reply shows it, and hides the kept primary.
    let secondary = SymmetricKey::from_bytes(vec![7; 32]).to_base64();
    let mut body = group("half", false);
    body["attestation"]["symmetricKey"] = json!({"secondaryKey": secondary});
    let r = run_blocking(&mut engine.http(now, &mut rng, put(body)), &store, &hubs);
    let replaced: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(replaced["attestation"]["symmetricKey"], json!({"secondaryKey": secondary}), "{replaced}");
    assert!(!String::from_utf8_lossy(&r.body).contains(&primary));
}

/// Issue 14, defect 8: the instance's symmetric-key group limit (spec 10.1: 100), so that a register with a
/// wrong key cannot be made to try an unbounded number of groups.
#[test]
fn creating_a_symmetric_key_group_beyond_the_limit_is_403002() {
    let mut config = (*engine().config()).clone();
    config.max_symmetric_key_groups = 2;
    let Rig { engine, store, hubs, mut rng, now } = rig(Engine::new(config).unwrap(), 4);
    let put_named = |id: &str| {
        let mut req = put(json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"}}));
        req.path_and_query = format!("/enrollmentGroups/{id}?api-version=2021-10-01");
        req
    };
    for id in ["g1", "g2"] {
        assert_eq!(run_blocking(&mut engine.http(now, &mut rng, put_named(id)), &store, &hubs).status, 200);
    }
    let r = run_blocking(&mut engine.http(now, &mut rng, put_named("g3")), &store, &hubs);
    let body: ErrorBody = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((r.status, body.error_code), (403, 403002), "{}", body.message);
    assert!(body.message.contains("at most 2 symmetric-key enrollment groups"), "{}", body.message);
    // Replacing an existing one is not a new group.
    assert_eq!(run_blocking(&mut engine.http(now, &mut rng, put_named("g2")), &store, &hubs).status, 200);
}
