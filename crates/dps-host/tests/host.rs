//! The host as an embedder uses it: one object, real engine, in-memory store, a hub directory whose upsert
//! can be held back to observe the early 202 and the background completion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dps_core::hub::{AsyncHubDirectory, HubError, HubOp, HubResult, MemoryHubDirectory};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::IdScope;
use dps_core::{AccessPolicy, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_host::{BlockingHost, Host};
use dps_store::MemoryStore;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::Semaphore;

const SCOPE: &str = "0ne0000B0A7";
const HOST: &str = "dps.example.net";
const HUB: &str = "hub-1.example.net";

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

fn config(early: bool) -> EngineConfig {
    let mut c = EngineConfig::new(
        IdScope::parse(SCOPE).unwrap(),
        HOST,
        vec![LinkedHub::new(HUB, None, None).unwrap()],
    )
    .with_policy(AccessPolicy {
        key_name: "owner".into(),
        primary_key: key(1),
        secondary_key: key(2),
        rights: Rights::ALL,
    });
    c.respond_before_assignment = early;
    c
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn service(method: &str, path: &str, body: Value) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path_and_query: format!("{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&key(1), HOST, unix_now() + 600, Some("owner"))),
        body: serde_json::to_vec(&body).unwrap(),
        ..HttpRequest::default()
    }
}

fn group_body() -> Value {
    json!({"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(7).to_base64(), "secondaryKey": key(8).to_base64()}}})
}

fn device(method: &str, path: &str, registration_id: &str) -> HttpRequest {
    let device_key = key(7).derive_device_key(registration_id);
    let sr = encode_resource(&device_resource(SCOPE, registration_id));
    HttpRequest {
        method: method.into(),
        path_and_query: format!("/{SCOPE}/registrations/{registration_id}{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&device_key, &sr, unix_now() + 600, Some("registration"))),
        body: serde_json::to_vec(&json!({"registrationId": registration_id})).unwrap(),
        ..HttpRequest::default()
    }
}

fn body(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// A memory hub whose upserts wait for a permit.
struct HeldHubs {
    inner: MemoryHubDirectory,
    gate: Semaphore,
}

impl AsyncHubDirectory for HeldHubs {
    async fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        if matches!(op, HubOp::UpsertDevice { .. }) {
            self.gate.acquire().await.unwrap().forget();
        }
        dps_core::hub::BlockingHubDirectory::execute(&self.inner, op)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answer_returns_202_before_the_hub_work_and_polls_see_assigning_until_commit() {
    let hubs = Arc::new(HeldHubs { inner: MemoryHubDirectory::new(), gate: Semaphore::new(0) });
    let host =
        Host::builder(config(true)).store(Arc::new(MemoryStore::new())).hubs(hubs.clone()).build().unwrap();
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).await.status, 200);

    let registered = host.http(device("PUT", "/register", "dev-1")).await;
    assert_eq!(registered.status, 202, "{}", String::from_utf8_lossy(&registered.body));
    assert_eq!(body(&registered)["status"], "assigning");
    let op = body(&registered)["operationId"].as_str().unwrap().to_owned();
    assert!(hubs.inner.device(HUB, "dev-1").is_none(), "the hub work has not happened yet");
    assert_eq!(host.background_flows(), 1);

    let poll = host.http(device("GET", &format!("/operations/{op}"), "dev-1")).await;
    assert_eq!(poll.status, 202);
    assert_eq!(body(&poll)["status"], "assigning");

    hubs.gate.add_permits(1);
    host.drain().await;
    assert_eq!(host.background_flows(), 0);
    assert!(hubs.inner.device(HUB, "dev-1").is_some());
    let poll = host.http(device("GET", &format!("/operations/{op}"), "dev-1")).await;
    assert_eq!(poll.status, 200);
    assert_eq!(body(&poll)["registrationState"]["assignedHub"], HUB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_during_the_hub_work_is_held_until_the_flow_finishes_and_gets_the_result() {
    let hubs = Arc::new(HeldHubs { inner: MemoryHubDirectory::new(), gate: Semaphore::new(0) });
    let host = Host::builder(config(true))
        .store(Arc::new(MemoryStore::new()))
        .hubs(hubs.clone())
        .poll_hold(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).await.status, 200);
    let registered = host.http(device("PUT", "/register", "dev-1")).await;
    assert_eq!(body(&registered)["status"], "assigning");
    let op = body(&registered)["operationId"].as_str().unwrap().to_owned();

    let poller = host.clone();
    let poll =
        tokio::spawn(async move { poller.http(device("GET", &format!("/operations/{op}"), "dev-1")).await });
    // The poll waits for the running flow rather than answering `assigning` (without the hold it would
    // have answered long before the hub is released).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!poll.is_finished());
    // Another device's request is not held behind it.
    let other = host.http(device("PUT", "/register", "dev-2")).await;
    assert_eq!(other.status, 202);
    hubs.gate.add_permits(2);
    let poll = poll.await.unwrap();
    assert_eq!(poll.status, 200, "{}", String::from_utf8_lossy(&poll.body));
    assert_eq!(body(&poll)["registrationState"]["assignedHub"], HUB);
    host.drain().await;
}

fn stored_status(store: &MemoryStore, id: &str) -> Option<String> {
    use dps_core::store::{BlockingStore, StoreOp, StoreResult};
    let op =
        StoreOp::GetRegistration { registration_id: dps_core::proto::RegistrationId::parse(id).unwrap() };
    match BlockingStore::execute(store, op).unwrap() {
        StoreResult::Registration(r) => {
            r.map(|r| serde_json::to_value(r.status).unwrap().as_str().unwrap().to_owned())
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assigning_record_lives_in_the_host_by_default_and_in_the_store_on_request() {
    for where_ in [dps_host::AssigningRecords::Host, dps_host::AssigningRecords::Store] {
        let hubs = Arc::new(HeldHubs { inner: MemoryHubDirectory::new(), gate: Semaphore::new(0) });
        let store = Arc::new(MemoryStore::new());
        let host = Host::builder(config(true))
            .store(store.clone())
            .hubs(hubs.clone())
            .assigning_records(where_)
            .poll_hold(std::time::Duration::ZERO)
            .build()
            .unwrap();
        assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).await.status, 200);
        let registered = host.http(device("PUT", "/register", "dev-1")).await;
        let op = body(&registered)["operationId"].as_str().unwrap().to_owned();
        // Polls through the host see `assigning` either way; the store holds it only when asked to.
        let poll = host.http(device("GET", &format!("/operations/{op}"), "dev-1")).await;
        assert_eq!((poll.status, body(&poll)["status"].clone()), (202, json!("assigning")), "{where_:?}");
        match where_ {
            dps_host::AssigningRecords::Host => {
                assert_eq!(stored_status(&store, "dev-1"), None);
                assert_eq!(host.assigning_in_memory(), 1);
            }
            dps_host::AssigningRecords::Store => {
                assert_eq!(stored_status(&store, "dev-1").as_deref(), Some("assigning"));
                assert_eq!(host.assigning_in_memory(), 0);
            }
        }
        // An overlapping register of the same device during the hub work keeps the operation ID.
        let again = host.http(device("PUT", "/register", "dev-1")).await;
        assert_eq!(body(&again)["operationId"], op.as_str(), "{where_:?}");
        hubs.gate.add_permits(2);
        host.drain().await;
        assert_eq!(host.assigning_in_memory(), 0);
        assert_eq!(stored_status(&store, "dev-1").as_deref(), Some("assigned"));
        let poll = host.http(device("GET", &format!("/operations/{op}"), "dev-1")).await;
        assert_eq!(poll.status, 200, "{where_:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_someone_else_during_an_in_memory_assignment_is_never_overwritten() {
    let hubs = Arc::new(HeldHubs { inner: MemoryHubDirectory::new(), gate: Semaphore::new(0) });
    let store = Arc::new(MemoryStore::new());
    let host = Host::builder(config(true))
        .store(store.clone())
        .hubs(hubs.clone())
        .poll_hold(std::time::Duration::ZERO)
        .build()
        .unwrap();
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).await.status, 200);
    let registered = host.http(device("PUT", "/register", "dev-1")).await;
    assert_eq!(registered.status, 202);
    // Another process (a second host on the same store) registers the same device to the end meanwhile.
    let other = Host::builder(config(false))
        .store(store.clone())
        .hubs(Arc::new(MemoryHubDirectory::new()))
        .build()
        .unwrap();
    let theirs = other.http(device("PUT", "/register", "dev-1")).await;
    assert_eq!(theirs.status, 202);
    let their_op = body(&theirs)["operationId"].as_str().unwrap().to_owned();
    assert_eq!(stored_status(&store, "dev-1").as_deref(), Some("assigned"));
    // Our final commit expects the store to hold what it held before our register: it conflicts, and the
    // other process's record stays.
    hubs.gate.add_permits(1);
    host.drain().await;
    assert_eq!(host.assigning_in_memory(), 0);
    let poll = other.http(device("GET", &format!("/operations/{their_op}"), "dev-1")).await;
    assert_eq!(poll.status, 200, "{}", String::from_utf8_lossy(&poll.body));
    assert_eq!(body(&poll)["operationId"], their_op.as_str());
}

#[tokio::test]
async fn late_answer_returns_the_assignment_with_the_first_reply_and_leaves_nothing_behind() {
    let hubs = Arc::new(MemoryHubDirectory::new());
    let host =
        Host::builder(config(false)).store(Arc::new(MemoryStore::new())).hubs(hubs.clone()).build().unwrap();
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).await.status, 200);
    let registered = host.http(device("PUT", "/register", "dev-2")).await;
    assert_eq!(registered.status, 202);
    assert_eq!(host.background_flows(), 0);
    assert!(hubs.device(HUB, "dev-2").is_some(), "the device is on its hub when the 202 is returned");
}

#[test]
fn blocking_host_hands_out_the_early_reply_then_finishes_on_the_same_thread() {
    let host = BlockingHost::new(config(true), MemoryStore::new(), MemoryHubDirectory::new()).unwrap();
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group_body())).status, 200);
    let mut seen = None;
    host.http_with(device("PUT", "/register", "dev-3"), |reply| {
        // Delivered before the hub upsert.
        seen = Some((reply.status, host.hubs().device(HUB, "dev-3").is_some()));
    });
    assert_eq!(seen, Some((202, false)));
    assert!(host.hubs().device(HUB, "dev-3").is_some());
    let status = host.http(device("POST", "", "dev-3"));
    assert_eq!(status.status, 200, "{}", String::from_utf8_lossy(&status.body));
    assert_eq!(body(&status)["status"], "assigned");
}

#[tokio::test]
async fn a_host_without_a_store_is_refused_with_a_clear_message() {
    let err = Host::builder(config(false)).build().unwrap_err();
    assert!(err.message.contains("no store"), "{}", err.message);
}

#[tokio::test]
async fn an_embedder_creates_queries_and_deletes_without_tokens_or_json_and_rights_are_enforced() {
    use dps_core::proto::model::EnrollmentGroup;
    use dps_core::proto::{EnrollmentGroupId, RegistrationId};
    use dps_core::{Paging, Principal, ServiceCommand};
    let hubs = Arc::new(MemoryHubDirectory::new());
    let host =
        Host::builder(config(false)).store(Arc::new(MemoryStore::new())).hubs(hubs.clone()).build().unwrap();
    let admin = Principal::granted("backend", Rights::ALL);
    let group: EnrollmentGroup = serde_json::from_value(group_body()).unwrap();
    let created =
        host.command(&admin, ServiceCommand::PutGroup { group: Box::new(group), if_match: None }).await;
    assert_eq!(created.status, 200, "{}", String::from_utf8_lossy(&created.body));
    assert!(created.headers.iter().any(|(k, _)| *k == "etag"));

    // A device of the group provisions against what the embedder created.
    assert_eq!(host.http(device("PUT", "/register", "dev-9")).await.status, 202);
    let state = host
        .command(
            &admin,
            ServiceCommand::GetRegistration { registration_id: RegistrationId::parse("dev-9").unwrap() },
        )
        .await;
    assert_eq!(body(&state)["status"], "assigned");

    let listed = host
        .command(&admin, ServiceCommand::QueryGroups { query: String::new(), paging: Paging::default() })
        .await;
    assert_eq!(body(&listed).as_array().map(Vec::len), Some(1));

    let reader = Principal::granted("reader", Rights::ENROLLMENT_READ);
    let refused = host
        .command(
            &reader,
            ServiceCommand::DeleteGroup { group_id: EnrollmentGroupId::parse("g1").unwrap(), if_match: None },
        )
        .await;
    assert_eq!((refused.status, refused.error_code.map(|c| c.code())), (403, Some(403001)));
    let deleted = host
        .command(
            &admin,
            ServiceCommand::DeleteGroup { group_id: EnrollmentGroupId::parse("g1").unwrap(), if_match: None },
        )
        .await;
    assert_eq!(deleted.status, 204);
}
