//! Credentials are a type: each kind a device can present takes the one attestation path and gets its
//! precise answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{Credential, ErrorBody, IdScope, Timestamp};
use dps_core::{run_blocking, AccessPolicy, Engine, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const SCOPE: &str = "0ne00000001";
const NOW: i64 = 1_700_000_000;

struct World {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
}

impl World {
    fn new() -> World {
        let hubs = vec![LinkedHub::new("hub.example.net", None, None).unwrap()];
        let k = SymmetricKey::from_bytes(vec![1; 32]);
        let config = EngineConfig::new(IdScope::parse(SCOPE).unwrap(), "dps.example.net", hubs).with_policy(
            AccessPolicy {
                key_name: "owner".into(),
                primary_key: k.clone(),
                secondary_key: k,
                rights: Rights::ALL,
            },
        );
        let mut w = World {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: ChaCha8Rng::seed_from_u64(7),
        };
        let group = json!({"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": SymmetricKey::from_bytes(vec![5; 32]).to_base64(),
            "secondaryKey": SymmetricKey::from_bytes(vec![6; 32]).to_base64()}}});
        let r = w.run(common::owner_put("/enrollmentGroups/g", &group, NOW + 60));
        assert_eq!(r.status, 200);
        w
    }

    fn run(&mut self, request: HttpRequest) -> Reply {
        let mut flow = self.engine.http(Timestamp::from_unix_seconds(NOW), &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn register(
        &mut self,
        authorization: Option<String>,
        certs: Option<Vec<Vec<u8>>>,
        body: serde_json::Value,
    ) -> (u16, u32, String) {
        let r = self.run(HttpRequest {
            method: "PUT".into(),
            path_and_query: format!("/{SCOPE}/registrations/dev-1/register?api-version=2021-10-01"),
            authorization,
            client_certificates: certs,
            body: serde_json::to_vec(&body).unwrap(),
            ..HttpRequest::default()
        });
        if r.status >= 400 {
            let e: ErrorBody = serde_json::from_slice(&r.body).unwrap();
            (r.status, e.error_code, e.message)
        } else {
            (r.status, 0, String::new())
        }
    }
}

fn device_token() -> String {
    let k = SymmetricKey::from_bytes(vec![5; 32]).derive_device_key("dev-1");
    build_token(&k, &encode_resource(&device_resource(SCOPE, "dev-1")), NOW + 60, Some("registration"))
}

#[test]
fn a_client_certificate_that_is_not_der_gets_401002_saying_which_certificate_is_broken() {
    let mut w = World::new();
    let (status, code, message) =
        w.register(None, Some(vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]]), json!({"registrationId": "dev-1"}));
    assert_eq!((status, code), (401, 401002), "{message}");
    assert!(message.contains("position 0") && message.contains("not valid DER X.509"), "{message}");
    assert!(w.hubs.devices().is_empty());
}

#[test]
fn no_credential_at_all_is_401004_and_a_tpm_body_without_authorization_is_401000() {
    let mut w = World::new();
    let (_, code, message) = w.register(None, None, json!({"registrationId": "dev-1"}));
    assert_eq!(code, 401004, "{message}");
    let (_, code, message) = w.register(
        None,
        None,
        json!({"registrationId": "dev-1", "tpm": {"endorsementKey": "AAE=", "storageRootKey": "AAE="}}),
    );
    assert_eq!(code, 401000, "{message}");
    assert!(message.contains("TPM"), "{message}");
}

#[test]
fn a_sas_token_is_verified_even_when_the_connection_also_has_a_client_certificate() {
    let mut w = World::new();
    let (status, code, message) =
        w.register(Some(device_token()), Some(vec![vec![0x30, 0x00]]), json!({"registrationId": "dev-1"}));
    assert_eq!((status, code), (202, 0), "{message}");
    assert!(w.hubs.device("hub.example.net", "dev-1").is_some());
}

#[test]
fn transports_build_the_credential_the_same_way() {
    assert_eq!(
        Credential::from_transport(Some("SharedAccessSignature sr=x".into()), None).kind(),
        "sasToken"
    );
    assert_eq!(Credential::from_transport(None, Some(vec![vec![1]])).kind(), "x509");
}

/// Every resume can carry `now`: a flow stamps what it produces with the time it is resumed at, not the
/// time it was created (so later effects can own deadlines).
#[test]
fn a_flow_resumed_later_stamps_its_reply_with_the_later_time() {
    use dps_core::store::StoreError;
    use dps_core::{Flow, Input, Step};
    let mut w = World::new();
    let t0 = Timestamp::from_unix_seconds(NOW);
    let mut flow = w.engine.http(
        t0,
        &mut w.rng,
        HttpRequest {
            method: "PUT".into(),
            path_and_query: format!("/{SCOPE}/registrations/dev-1/register?api-version=2021-10-01"),
            authorization: Some(device_token()),
            body: br#"{"registrationId":"dev-1"}"#.to_vec(),
            ..HttpRequest::default()
        },
    );
    let Step::Store(_) = flow.resume_at(t0, Input::Start) else { panic!("expected the context load") };
    let later = Timestamp::from_unix_seconds(NOW + 30);
    let Step::Respond(reply) =
        flow.resume_at(later, Input::Store(Err(StoreError::Backend { message: "disk gone".into() })))
    else {
        panic!("expected the error reply")
    };
    let body: ErrorBody = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body.error_code, 500001);
    assert_eq!(body.timestamp_utc, later.to_iso());
    // A clock that goes back is ignored.
    assert!(matches!(flow.resume_at(t0, Input::Responded), Step::Finished));
}
