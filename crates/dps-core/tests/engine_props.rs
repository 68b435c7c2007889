//! Property tests: whatever arrives, the engine answers with a well-formed reply and never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{ErrorBody, IdScope, Timestamp};
use dps_core::{run_blocking, AccessPolicy, Engine, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_store::MemoryStore;
use proptest::prelude::*;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

const SCOPE: &str = "0ne00000001";
const NOW: i64 = 1_700_000_000;

fn engine() -> Engine {
    let hubs = vec![LinkedHub::new("hub.example.net", None, None).unwrap()];
    let k = SymmetricKey::from_bytes(vec![1; 32]);
    Engine::new(EngineConfig::new(IdScope::parse(SCOPE).unwrap(), "dps.example.net", hubs).with_policy(
        AccessPolicy {
            key_name: "provisioningserviceowner".into(),
            primary_key: k.clone(),
            secondary_key: k,
            rights: Rights::ALL,
        },
    ))
    .unwrap()
}

fn check_reply(r: &Reply) {
    assert!((200..600).contains(&r.status), "status {}", r.status);
    if let Some(ra) = r.retry_after {
        assert!((1..=300).contains(&ra));
    }
    if r.status >= 400 {
        let body: ErrorBody = serde_json::from_slice(&r.body).expect("error replies carry the error body");
        assert_eq!(body.error_code / 1000, u32::from(r.status));
        assert_eq!(body.tracking_id, r.tracking_id);
        assert_eq!(r.error_code.map(|c| c.code()), Some(body.error_code));
    } else if r.status != 204 {
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("success replies are JSON");
    }
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_string()),
        Just("PUT".to_string()),
        Just("POST".to_string()),
        Just("DELETE".to_string()),
        Just("PATCH".to_string()),
        "[A-Za-z]{0,8}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(format!("/{SCOPE}/registrations/dev-1/register?api-version=2021-06-01")),
        Just(format!("/{SCOPE}/registrations/dev-1/operations/1.2.3?api-version=2019-03-31")),
        Just(format!("/{SCOPE}/registrations/dev-1")),
        Just("/enrollments/dev-1?api-version=2021-10-01".to_string()),
        Just("/enrollments/query".to_string()),
        Just("/enrollmentGroups".to_string()),
        Just("/registrations/g/query".to_string()),
        "/[a-zA-Z0-9%/._:?&=-]{0,80}",
        ".{0,120}",
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(br#"{"registrationId":"dev-1","payload":null}"#.to_vec()),
        Just(br#"{"registrationId":"dev-1","attestation":{"type":"symmetricKey"}}"#.to_vec()),
        Just(br#"{"mode":"create","enrollments":[{"registrationId":"a","attestation":{"type":"symmetricKey"}}]}"#.to_vec()),
        Just(br#"{"query":"SELECT * FROM enrollments"}"#.to_vec()),
        "\\PC{0,200}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn authorization() -> impl Strategy<Value = Option<String>> {
    let k = SymmetricKey::from_bytes(vec![1; 32]);
    let service = build_token(&k, "dps.example.net", NOW + 600, Some("provisioningserviceowner"));
    let device =
        build_token(&k, &encode_resource(&device_resource(SCOPE, "dev-1")), NOW + 600, Some("registration"));
    prop_oneof![
        Just(None),
        Just(Some(service)),
        Just(Some(device)),
        ".{0,100}".prop_map(Some),
        "SharedAccessSignature [a-z=&%0-9]{0,80}".prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_http_request_gets_a_well_formed_reply(
        method in method(),
        path in path(),
        body in body(),
        authorization in authorization(),
        if_match in proptest::option::of(".{0,20}"),
        page in proptest::option::of(".{0,6}"),
        continuation in proptest::option::of(".{0,20}"),
    ) {
        let engine = engine();
        let store = MemoryStore::new();
        let hubs = MemoryHubDirectory::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let request = HttpRequest { method, path_and_query: path, authorization, if_match, max_item_count: page, continuation, body, client_certificates: None, client_address: None };
        let mut flow = engine.http(Timestamp::from_unix_seconds(NOW), &mut rng, request);
        let reply = run_blocking(&mut flow, &store, &hubs);
        check_reply(&reply);
    }
}
