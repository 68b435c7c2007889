//! Quotas and fault injection in the host: every transport's requests pass them, so they are tested here
//! on the host's HTTP and device entry points with a clock the test moves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{IdScope, RegistrationId};
use dps_core::{
    AccessPolicy, DeviceCall, DeviceRequest, EngineConfig, ErrorCode, HttpRequest, LinkedHub, Principal,
    Reply, Rights, ServiceCommand, Timestamp,
};
use dps_host::fault::{FaultAction, FaultKind, FaultRule, FaultTarget, Glob};
use dps_host::throttle::Rate;
use dps_host::{Host, Limit, Quotas};
use dps_store::MemoryStore;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

const SCOPE: &str = "0ne0000B0A7";
const HOST: &str = "dps.example.net";
const HUB: &str = "hub-1.example.net";

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A clock at the real time plus an offset the test moves.
#[derive(Clone, Default)]
struct Clock(Arc<AtomicI64>);

impl Clock {
    fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    fn as_clock(&self) -> Arc<dyn dps_host::Clock> {
        let offset = Arc::clone(&self.0);
        let base = unix_now();
        Arc::new(move || Timestamp::from_unix_seconds(base + offset.load(Ordering::SeqCst)))
    }
}

fn config() -> EngineConfig {
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
    // Answer registers after the assignment, so a poll right after sees the result.
    c.respond_before_assignment = false;
    c
}

async fn host(quotas: Quotas, faults: Vec<FaultRule>, clock: &Clock) -> Host {
    let host = Host::builder(config())
        .store(Arc::new(MemoryStore::new()))
        .clock(clock.as_clock())
        .quotas(quotas)
        .faults(faults)
        .fault_rng(Box::new(StdRng::seed_from_u64(7)))
        .build()
        .unwrap();
    let group = json!({"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(7).to_base64(), "secondaryKey": key(8).to_base64()}}});
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/g1", group)).await.status, 200);
    host
}

fn service(method: &str, path: &str, body: Value) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path_and_query: format!("{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&key(1), HOST, unix_now() + 3600, Some("owner"))),
        body: if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).unwrap() },
        ..HttpRequest::default()
    }
}

fn token(registration_id: &str) -> String {
    let device_key = key(7).derive_device_key(registration_id);
    let sr = encode_resource(&device_resource(SCOPE, registration_id));
    build_token(&device_key, &sr, unix_now() + 3600, Some("registration"))
}

fn device(method: &str, path: &str, registration_id: &str) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path_and_query: format!("/{SCOPE}/registrations/{registration_id}{path}?api-version=2021-10-01"),
        authorization: Some(token(registration_id)),
        body: serde_json::to_vec(&json!({"registrationId": registration_id})).unwrap(),
        ..HttpRequest::default()
    }
}

fn register(id: &str) -> HttpRequest {
    device("PUT", "/register", id)
}

fn poll(id: &str, op: &str) -> HttpRequest {
    device("GET", &format!("/operations/{op}"), id)
}

fn body(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn operation(r: &Reply) -> String {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    body(r)["operationId"].as_str().unwrap().to_owned()
}

fn assert_throttled(r: &Reply, retry_after: u32) {
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code, Some(ErrorCode::Throttled));
    assert_eq!(body(r)["errorCode"], 429001);
    assert_eq!(r.retry_after, Some(retry_after));
}

fn rule(id: &str, pattern: &str, action: FaultAction) -> FaultRule {
    FaultRule {
        id: id.into(),
        pattern: Glob::parse(pattern).unwrap(),
        target: FaultTarget::Any,
        action,
        probability: 1.0,
        times: None,
    }
}

#[tokio::test]
async fn no_quotas_and_no_faults_by_default() {
    let clock = Clock::default();
    let host = host(Quotas::default(), Vec::new(), &clock).await;
    for i in 0..50 {
        let id = format!("dev-{i}");
        let op = operation(&host.http(register(&id)).await);
        for _ in 0..10 {
            assert_eq!(host.http(poll(&id, &op)).await.status, 200);
        }
    }
    assert_eq!(host.gate_counts(), dps_host::GateCounts::default());
    assert!(host.faults().is_empty());
}

#[tokio::test]
async fn registrations_per_minute_are_limited_per_instance_with_retry_after() {
    let clock = Clock::default();
    let quotas = Quotas { registrations: Rate::per_minute(2), ..Quotas::none() };
    let host = host(quotas, Vec::new(), &clock).await;
    operation(&host.http(register("dev-1")).await);
    operation(&host.http(register("dev-2")).await);
    // The third of the minute, from any device, waits for the next token (30 s at 2 a minute).
    let refused = host.http(register("dev-3")).await;
    assert_throttled(&refused, 30);
    assert!(body(&refused)["message"].as_str().unwrap().contains("2 per 60 s"), "{}", body(&refused));
    // A status lookup counts as a registration (spec §10.2).
    let lookup = host.http(device("POST", "", "dev-1")).await;
    assert_throttled(&lookup, 30);
    // The same over the transport entry point (MQTT, AMQP).
    let mqtt = host
        .device(DeviceRequest {
            id_scope: IdScope::parse(SCOPE).unwrap(),
            registration_id: RegistrationId::parse("dev-3").unwrap(),
            call: DeviceCall::Register { force: false },
            api_version: None,
            credential: dps_core::proto::Credential::from_transport(Some(token("dev-3")), None),
            body: serde_json::to_vec(&json!({"registrationId": "dev-3"})).unwrap(),
            client_address: None,
        })
        .await;
    assert_throttled(&mqtt, 30);
    clock.advance(30);
    let admitted = host.http(register("dev-3")).await;
    assert_eq!(admitted.status, 202);
    assert_eq!(host.gate_counts().throttled(Limit::Registrations), 3);
}

#[tokio::test]
async fn polls_are_limited_per_device() {
    let clock = Clock::default();
    let quotas = Quotas { polls_per_device: Rate::new(2, 10), ..Quotas::none() };
    let host = host(quotas, Vec::new(), &clock).await;
    let a = operation(&host.http(register("dev-a")).await);
    let b = operation(&host.http(register("dev-b")).await);
    assert_eq!(host.http(poll("dev-a", &a)).await.status, 200);
    assert_eq!(host.http(poll("dev-a", &a)).await.status, 200);
    assert_throttled(&host.http(poll("dev-a", &a)).await, 5);
    // Another device has its own budget, and registers are not polls.
    assert_eq!(host.http(poll("dev-b", &b)).await.status, 200);
    operation(&host.http(register("dev-a")).await);
    clock.advance(5);
    assert_eq!(host.http(poll("dev-a", &a)).await.status, 200);
    assert_eq!(host.gate_counts().throttled(Limit::PollsPerDevice), 1);
}

#[tokio::test]
async fn service_operations_are_limited_over_http_and_commands() {
    let clock = Clock::default();
    let quotas = Quotas { service_operations: Rate::per_minute(1), ..Quotas::none() };
    let host = Host::builder(config())
        .store(Arc::new(MemoryStore::new()))
        .clock(clock.as_clock())
        .quotas(quotas)
        .build()
        .unwrap();
    assert_eq!(host.http(service("GET", "/enrollmentGroups/none", Value::Null)).await.status, 404);
    assert_throttled(&host.http(service("GET", "/enrollmentGroups/none", Value::Null)).await, 60);
    let command = ServiceCommand::GetGroup { group_id: "none".parse().unwrap() };
    let reply = host.command(&Principal::granted("backend", Rights::ALL), command).await;
    assert_throttled(&reply, 60);
    // Device requests are not service operations.
    assert_eq!(host.http(register("dev-1")).await.status, 401, "no group exists: refused by the engine");
    assert_eq!(host.gate_counts().throttled(Limit::ServiceOperations), 2);
}

#[tokio::test]
async fn azure_preset_is_spec_10_2() {
    let q = Quotas::azure();
    assert_eq!(q.registrations, Rate::per_minute(1000));
    assert_eq!(q.polls_per_device, Rate::new(5, 10));
    assert_eq!(q.service_operations, Rate::per_minute(1000));
}

#[tokio::test]
async fn an_injected_429_for_matching_devices_then_recovery() {
    let clock = Clock::default();
    let mut r = rule("flaky", "flaky-*", FaultAction::Throttle { retry_after_secs: 7 });
    r.times = Some(2);
    let host = host(Quotas::none(), vec![r], &clock).await;
    let refused = host.http(register("FLAKY-1")).await;
    assert_throttled(&refused, 7);
    assert!(body(&refused)["message"].as_str().unwrap().contains("'flaky'"));
    // Other devices are untouched.
    operation(&host.http(register("steady-1")).await);
    assert_throttled(&host.http(register("flaky-1")).await, 7);
    // The rule fired its two times: the device gets through.
    let op = operation(&host.http(register("flaky-1")).await);
    assert_eq!(host.http(poll("flaky-1", &op)).await.status, 200);
    assert_eq!(host.faults()[0].fired, 2);
    assert_eq!(host.gate_counts().faults(FaultKind::Throttle), 2);
}

#[tokio::test]
async fn injected_errors_and_dropped_connections() {
    let clock = Clock::default();
    let mut poll_error =
        rule("poll-503", "dev-*", FaultAction::Error { code: ErrorCode::ServiceUnavailable });
    poll_error.target = FaultTarget::Poll;
    poll_error.times = Some(1);
    let mut drop = rule("drop", "dev-*", FaultAction::DropConnection);
    drop.target = FaultTarget::Register;
    drop.times = Some(1);
    let host = host(Quotas::none(), vec![poll_error, drop], &clock).await;
    let dropped = host.http(register("dev-1")).await;
    assert!(dropped.drop_connection, "the transport is told to drop");
    assert_eq!(dropped.status, 503);
    let op = operation(&host.http(register("dev-1")).await);
    let failed = host.http(poll("dev-1", &op)).await;
    assert_eq!((failed.status, failed.error_code), (503, Some(ErrorCode::ServiceUnavailable)));
    assert!(!failed.drop_connection);
    assert_eq!(host.http(poll("dev-1", &op)).await.status, 200);
    let counts = host.gate_counts();
    assert_eq!((counts.faults(FaultKind::Error), counts.faults(FaultKind::DropConnection)), (1, 1));
    // A 500 of the table, on every request kind.
    host.add_fault(rule("internal", "dev-2", FaultAction::Error { code: ErrorCode::InternalError })).unwrap();
    let r = host.http(register("dev-2")).await;
    assert_eq!((r.status, body(&r)["errorCode"].clone()), (500, json!(500000)));
}

#[tokio::test]
async fn a_stuck_registration_polls_assigning_until_its_time_is_up() {
    let clock = Clock::default();
    let host = host(
        Quotas::none(),
        vec![rule("stuck", "slow-*", FaultAction::StuckAssigning { secs: Some(20) })],
        &clock,
    )
    .await;
    let op = operation(&host.http(register("slow-1")).await);
    for _ in 0..3 {
        let p = host.http(poll("slow-1", &op)).await;
        assert_eq!(p.status, 202);
        assert_eq!(body(&p)["status"], "assigning");
        assert_eq!(body(&p)["operationId"], op.as_str());
        assert_eq!(body(&p)["registrationState"]["status"], "assigning");
        assert!(p.retry_after.is_some());
    }
    // Errors are not hidden: an unknown operation is still 404.
    assert_eq!(
        host.http(poll("slow-1", "4.0000000000000000.00000000-0000-0000-0000-000000000000")).await.status,
        404
    );
    clock.advance(20);
    let done = host.http(poll("slow-1", &op)).await;
    assert_eq!(done.status, 200);
    assert_eq!(body(&done)["registrationState"]["assignedHub"], HUB);
    assert_eq!(host.gate_counts().faults(FaultKind::StuckAssigning), 1);
}

#[tokio::test]
async fn stuck_forever_ends_when_the_rule_is_removed() {
    let clock = Clock::default();
    let host = host(Quotas::none(), Vec::new(), &clock).await;
    host.add_fault(rule("forever", "*", FaultAction::StuckAssigning { secs: None })).unwrap();
    let op = operation(&host.http(register("dev-1")).await);
    clock.advance(3600);
    assert_eq!(host.http(poll("dev-1", &op)).await.status, 202);
    assert!(host.remove_fault("forever"));
    assert!(!host.remove_fault("forever"));
    assert_eq!(host.http(poll("dev-1", &op)).await.status, 200);
}

#[tokio::test]
async fn added_latency_delays_and_then_runs_the_request() {
    let clock = Clock::default();
    let host =
        host(Quotas::none(), vec![rule("slow", "*", FaultAction::Latency { millis: 30 })], &clock).await;
    let op = operation(&host.http(register("dev-1")).await);
    assert_eq!(host.http(poll("dev-1", &op)).await.status, 200);
    assert_eq!(host.gate_counts().faults(FaultKind::Latency), 2);
}

#[tokio::test]
async fn probabilities_are_rolled_by_the_injected_rng() {
    async fn outcomes(seed: u64) -> (Vec<u16>, u64) {
        let clock = Clock::default();
        let mut r = rule("half", "*", FaultAction::Error { code: ErrorCode::InternalError });
        r.probability = 0.5;
        let host = Host::builder(config())
            .store(Arc::new(MemoryStore::new()))
            .clock(clock.as_clock())
            .faults(vec![r])
            .fault_rng(Box::new(StdRng::seed_from_u64(seed)))
            .build()
            .unwrap();
        let mut statuses = Vec::new();
        for i in 0..200 {
            statuses.push(host.http(register(&format!("dev-{i}"))).await.status);
        }
        (statuses, host.faults()[0].fired)
    }
    let (first, fired) = outcomes(42).await;
    let injected = first.iter().filter(|&&s| s == 500).count() as u64;
    assert_eq!(injected, fired);
    assert!((50..=150).contains(&injected), "{injected} of 200 at p = 0.5");
    // The same seed gives the same faults.
    assert_eq!(outcomes(42).await.0, first);
}

#[tokio::test]
async fn bad_rules_are_refused_with_what_is_wrong() {
    let clock = Clock::default();
    let host = host(Quotas::none(), Vec::new(), &clock).await;
    host.add_fault(rule("a", "*", FaultAction::DropConnection)).unwrap();
    let e = host.add_fault(rule("a", "*", FaultAction::DropConnection)).unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    let e = host.add_fault(rule("b", "*", FaultAction::Throttle { retry_after_secs: 0 })).unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("'b'") && e.message.contains("retry_after_secs"), "{}", e.message);
    // At build time too.
    let built = Host::builder(config())
        .store(Arc::new(MemoryStore::new()))
        .faults(vec![rule("c", "*", FaultAction::Latency { millis: 90_000 })])
        .build();
    assert!(built.unwrap_err().message.contains("'c'"));
    assert_eq!(host.faults().len(), 1);
}
