//! The engine's HTTP adapter end to end (`Engine::http` on a `MemoryStore`), several requests per input.

use crate::NOW;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{ErrorBody, IdScope, Timestamp};
use dps_core::{run_blocking, AccessPolicy, Engine, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

/// The ID scope of the fuzzed instance.
pub const SCOPE: &str = "0ne00000001";
/// The service host name (the audience of service tokens).
pub const HOST: &str = "dps.example.net";
/// The key of the `provisioningserviceowner` policy.
pub fn owner_key() -> SymmetricKey {
    SymmetricKey::from_bytes(vec![1; 32])
}
/// The enrollment-group key seeds use; `$device:<id>` signs with the key derived from it for `<id>`.
pub fn group_key() -> SymmetricKey {
    SymmetricKey::from_bytes(vec![9; 64])
}

/// Separates requests in one input.
pub const NEXT: &str = "\n--next--\n";

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let hubs = vec![
            LinkedHub::new("hub-a.example.net", None, None).unwrap(),
            LinkedHub::new("hub-b.example.net", None, None).unwrap(),
        ];
        Engine::new(EngineConfig::new(IdScope::parse(SCOPE).unwrap(), HOST, hubs).with_policy(AccessPolicy {
            key_name: "provisioningserviceowner".into(),
            primary_key: owner_key(),
            secondary_key: owner_key(),
            rights: Rights::ALL,
        }))
        .unwrap()
    })
}

/// `$owner` stands for a valid service token and `$device:<id>` for a valid device token of `<id>` (with
/// the key derived from [`group_key`]), so that the fuzzer gets past authentication; anything else is sent
/// as written.
fn authorization(line: &str) -> Option<String> {
    if line.is_empty() {
        return None;
    }
    if line == "$owner" {
        return Some(build_token(&owner_key(), HOST, NOW + 3600, Some("provisioningserviceowner")));
    }
    if let Some(id) = line.strip_prefix("$device:") {
        let key = group_key().derive_device_key(id);
        let sr = encode_resource(&device_resource(SCOPE, id));
        return Some(build_token(&key, &sr, NOW + 3600, Some("registration")));
    }
    Some(line.to_owned())
}

/// One request: six header lines (method, path and query, Authorization, If-Match, x-ms-max-item-count,
/// x-ms-continuation; an empty line is an absent header), then the body.
fn request(text: &str) -> HttpRequest {
    let mut parts = text.splitn(7, '\n');
    let mut line = || parts.next().unwrap_or("").to_owned();
    let some = |s: String| (!s.is_empty()).then_some(s);
    let method = line();
    let path_and_query = line();
    let authorization = authorization(&line());
    let if_match = some(line());
    let max_item_count = some(line());
    let continuation = some(line());
    let body = line().into_bytes();
    HttpRequest {
        method,
        path_and_query,
        authorization,
        if_match,
        max_item_count,
        continuation,
        body,
        client_certificates: None,
        client_address: None,
    }
}

/// The reply contract: a status in 200..600, a sane Retry-After, the error body at 400 and above (a
/// six-digit code whose first three digits are the status, the tracking ID of the reply), JSON otherwise.
#[track_caller]
pub fn check_reply(r: &Reply) {
    assert!((200..600).contains(&r.status), "status {}", r.status);
    if let Some(ra) = r.retry_after {
        assert!((1..=300).contains(&ra), "retry-after {ra}");
    }
    if r.status >= 400 {
        let body: ErrorBody = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{}: not an error body: {e}", String::from_utf8_lossy(&r.body)));
        assert!((100_000..1_000_000).contains(&body.error_code), "{}", body.error_code);
        assert_eq!(body.error_code / 1000, u32::from(r.status));
        assert_eq!(body.tracking_id, r.tracking_id);
        assert_eq!(r.error_code.map(|c| c.code()), Some(body.error_code));
    } else if r.status != 204 {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap_or_else(|e| {
            panic!("{}: success reply is not JSON: {e}", String::from_utf8_lossy(&r.body))
        });
    }
}

/// Requests separated by [`NEXT`], on one fresh store, in order.
pub fn engine_http(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let engine = engine();
    let store = MemoryStore::new();
    let hubs = MemoryHubDirectory::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (i, one) in text.split(NEXT).take(8).enumerate() {
        let now = Timestamp::from_unix_seconds(NOW + i as i64);
        let mut flow = engine.http(now, &mut rng, request(one));
        let reply = run_blocking(&mut flow, &store, &hubs);
        check_reply(&reply);
    }
}
