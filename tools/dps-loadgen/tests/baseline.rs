//! The in-process baseline servers and the client load, end to end on 127.0.0.1, and the accounting of every
//! kind of error by its DPS code.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests of a network program: they open sockets, files and processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use bytes::Bytes;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::{DpsError, ErrorCode, Timestamp};
use dps_core::Reply;
use dps_loadgen::baseline::{BaselineServer, FixedReplies, FixedReply};
use dps_loadgen::bench::{run_baseline, Endpoint, LoadSettings, BASELINE_HUB, BASELINE_SCOPE};
use dps_loadgen::cpu::ServerCpu;
use dps_loadgen::device::{DeviceSet, DriveOptions, Protocol};
use dps_loadgen::runner::{run_load, LoadOptions, RunOutput};
use dps_loadgen::stats::Failure;
use dps_loadgen::tls::{TestPki, TlsVersions};
use std::sync::Arc;
use std::time::Duration;

const LOCAL: &str = "127.0.0.1";

fn devices(prefix: &str) -> Arc<DeviceSet> {
    Arc::new(DeviceSet::new(BASELINE_SCOPE, SymmetricKey::from_bytes(vec![5; 64]), prefix).unwrap())
}

fn settings(devices: usize, concurrency: usize) -> LoadSettings {
    LoadSettings {
        devices,
        concurrency,
        prefix: "t".into(),
        drive: DriveOptions::default(),
        progress: false,
        tls: TlsVersions::Any.into(),
        baseline_threads: 2,
        baseline_client_auth: false,
        baseline_process: None,
    }
}

fn check_clean(out: &RunOutput, set: &DeviceSet, n: usize) {
    let r = &out.report;
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.assigned, n);
    assert_eq!(r.requests, 2 * n as u64, "one register and one poll per device");
    assert_eq!(r.latency.count, n);
    assert_eq!(r.handshake.count, n);
    assert!(
        r.latency.p50 <= r.latency.p90 && r.latency.p90 <= r.latency.p99 && r.latency.p99 <= r.latency.max
    );
    assert!(r.rate() > 0.0);
    let mut ids: Vec<_> = out.assignments.iter().map(|a| a.registration_id.clone()).collect();
    ids.sort();
    let expected: Vec<_> = (0..n).map(|i| set.registration_id(i)).collect();
    assert_eq!(ids, expected, "every device exactly once");
    assert!(out.assignments.iter().all(|a| a.assigned_hub == BASELINE_HUB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_baseline_end_to_end() {
    let set = devices("base-https");
    let out =
        run_baseline(Protocol::Https, set.clone(), &settings(40, 8), LOCAL.parse().unwrap()).await.unwrap();
    check_clean(&out, &set, 40);
    assert!(out.report.label.contains("baseline https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_in_a_process_of_its_own_serves_both_protocols_and_reports_its_cpu() {
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let set = devices(&format!("proc-{}", protocol.as_str()));
        let mut load = settings(30, 6);
        load.baseline_process = Some(env!("CARGO_BIN_EXE_dps-loadgen").into());
        load.baseline_client_auth = true;
        let out = run_baseline(protocol, set.clone(), &load, LOCAL.parse().unwrap()).await.unwrap();
        check_clean(&out, &set, 30);
        assert!(!out.report.label.contains("in the load generator's process"));
        assert!(
            out.report.server_cpu_per_registration().is_some(),
            "the child's CPU time is read from /proc"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_baseline_end_to_end() {
    let set = devices("base-mqtt");
    let out =
        run_baseline(Protocol::Mqtt, set.clone(), &settings(40, 8), LOCAL.parse().unwrap()).await.unwrap();
    check_clean(&out, &set, 40);
}

#[test]
fn fixed_replies_are_the_engines() {
    let replies = FixedReplies::from_engine(BASELINE_SCOPE, "sensor-https-000000", BASELINE_HUB).unwrap();
    assert_eq!(replies.register.status, 202);
    assert!(replies.register.retry_after.is_some());
    let register: serde_json::Value = serde_json::from_slice(&replies.register.body).unwrap();
    assert_eq!(register["status"], "assigning");
    assert_eq!(replies.poll.status, 200);
    let poll: serde_json::Value = serde_json::from_slice(&replies.poll.body).unwrap();
    assert_eq!(poll["status"], "assigned");
    assert_eq!(poll["registrationState"]["registrationId"], "sensor-https-000000");
    assert_eq!(poll["registrationState"]["assignedHub"], BASELINE_HUB);
    assert!(replies.poll.headers.iter().any(|(k, _)| k == "x-ms-request-id"));
}

/// Runs `n` devices against a baseline server answering with `replies`.
async fn run_against(protocol: Protocol, replies: FixedReplies, n: usize, drive: DriveOptions) -> RunOutput {
    let server = BaselineServer::start(LOCAL.parse().unwrap(), replies, 1).unwrap();
    let endpoint = Endpoint::new(
        server.https_addr(),
        server.mqtt_addr(),
        server.amqp_addr(),
        LOCAL,
        server.ca_pem().as_bytes(),
        TlsVersions::Any,
    )
    .unwrap();
    let options = LoadOptions { label: "errors".into(), devices: n, concurrency: 3, drive, progress: false };
    run_load(protocol, Arc::new(endpoint.target(protocol).unwrap()), devices("err"), &options, &server.cpu())
        .await
}

fn engine_replies() -> FixedReplies {
    FixedReplies::from_engine(BASELINE_SCOPE, "err-000000", BASELINE_HUB).unwrap()
}

fn error_reply(code: ErrorCode, retry_after: Option<u32>) -> FixedReply {
    let mut e = DpsError::with_message(code, "injected by the test");
    if let Some(s) = retry_after {
        e = e.retry_after(s);
    }
    FixedReply::from_reply(&Reply::error(&e, "tracking".into(), Timestamp::from_unix_seconds(1_700_000_000)))
}

fn json_reply(status: u16, body: serde_json::Value) -> FixedReply {
    FixedReply {
        status,
        retry_after: None,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(serde_json::to_vec(&body).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_counted_by_their_code_on_both_transports() {
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let replies =
            FixedReplies { register: error_reply(ErrorCode::Unauthorized, None), ..engine_replies() };
        let out = run_against(protocol, replies, 7, DriveOptions::default()).await;
        let r = &out.report;
        assert_eq!(r.assigned, 0);
        assert_eq!(r.failed.count(Failure::Code(401000)), 7, "{protocol:?}: {r}");
        assert_eq!(r.failed.total(), 7);
        assert!(r.retried.is_empty());
        assert!(!r.is_clean());
        assert!(r.to_string().contains("ERRORS: 7"));
        assert!(r.to_string().contains("401000 Unauthorized"));
        assert_eq!(r.requests, 7, "a 401 is final: one request per device");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_disabled_registrations_are_counted() {
    let failed = json_reply(
        200,
        serde_json::json!({"operationId": "op-1", "status": "failed", "registrationState": {
            "registrationId": "err-000000", "status": "failed", "errorCode": 400210, "errorMessage": "no hub"}}),
    );
    let out = run_against(
        Protocol::Https,
        FixedReplies { poll: failed, ..engine_replies() },
        4,
        DriveOptions::default(),
    )
    .await;
    assert_eq!(out.report.failed.count(Failure::Code(400210)), 4, "{}", out.report);

    let disabled = json_reply(
        200,
        serde_json::json!({"operationId": "op-1", "status": "disabled",
            "registrationState": {"registrationId": "err-000000", "status": "disabled"}}),
    );
    let out = run_against(
        Protocol::Mqtt,
        FixedReplies { poll: disabled, ..engine_replies() },
        4,
        DriveOptions::default(),
    )
    .await;
    assert_eq!(out.report.failed.count(Failure::Disabled), 4, "{}", out.report);

    let garbage = json_reply(200, serde_json::json!({"hello": "world"}));
    let out = run_against(
        Protocol::Https,
        FixedReplies { poll: garbage, ..engine_replies() },
        2,
        DriveOptions::default(),
    )
    .await;
    assert_eq!(out.report.failed.count(Failure::Protocol), 2, "{}", out.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_errors_count_even_when_the_device_keeps_trying() {
    // Every register answer is a 503 with Retry-After 1: the client waits it out (never ignored) and retries
    // until the device's timeout ends it.
    let replies =
        FixedReplies { register: error_reply(ErrorCode::StoreUnavailable, Some(1)), ..engine_replies() };
    let drive = DriveOptions { ignore_retry_after: true, timeout: Duration::from_secs(4) };
    let out = run_against(Protocol::Https, replies, 3, drive).await;
    let r = &out.report;
    assert_eq!(r.failed.count(Failure::Timeout), 3, "{r}");
    assert!(r.retried.count(Failure::Code(500001)) >= 3, "{r}");
    assert_eq!(r.retried.total(), r.retried.count(Failure::Code(500001)));
    assert!(r.errors().total() >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_have_their_own_kinds() {
    // Nothing listens on a port that was just released: connect fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pki = TestPki::generate(&[LOCAL.to_owned()]).unwrap();
    let endpoint =
        Endpoint::new(closed, closed, closed, LOCAL, pki.ca_pem.as_bytes(), TlsVersions::Any).unwrap();
    let options = LoadOptions {
        label: "closed".into(),
        devices: 3,
        concurrency: 2,
        drive: DriveOptions::default(),
        progress: false,
    };
    let target = Arc::new(endpoint.target(Protocol::Https).unwrap());
    let out = run_load(Protocol::Https, target, devices("c"), &options, &ServerCpu::Unknown).await;
    assert_eq!(out.report.failed.count(Failure::Connect), 3, "{}", out.report);

    // A server whose certificate the devices do not trust: the TLS handshake fails.
    let server = BaselineServer::start(LOCAL.parse().unwrap(), engine_replies(), 1).unwrap();
    let endpoint = Endpoint::new(
        server.https_addr(),
        server.mqtt_addr(),
        server.amqp_addr(),
        LOCAL,
        pki.ca_pem.as_bytes(),
        TlsVersions::Any,
    )
    .unwrap();
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let target = Arc::new(endpoint.target(protocol).unwrap());
        let out = run_load(protocol, target, devices("t"), &options, &server.cpu()).await;
        assert_eq!(out.report.failed.count(Failure::Tls), 3, "{}", out.report);
        assert_eq!(out.report.handshake.count, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_requesting_client_certificates_still_serves_devices_without_one() {
    let set = devices("cauth");
    let mut s = settings(10, 2);
    s.baseline_client_auth = true;
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let out = run_baseline(protocol, set.clone(), &s, LOCAL.parse().unwrap()).await.unwrap();
        check_clean(&out, &set, 10);
        assert!(out.report.label.contains("client cert requested"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_devices_work_too() {
    let set = devices("tls12");
    let mut s = settings(10, 2);
    s.tls = TlsVersions::Tls12.into();
    let out = run_baseline(Protocol::Mqtt, set.clone(), &s, LOCAL.parse().unwrap()).await.unwrap();
    check_clean(&out, &set, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_devices_are_assigned_by_the_amqp_baseline() {
    // SASL PLAIN, two links, a register answered `assigning` with both Retry-After spellings, one poll.
    let out = run_against(Protocol::Amqp, engine_replies(), 5, DriveOptions::default()).await;
    let r = &out.report;
    assert_eq!(r.assigned, 5, "{r}");
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.requests, 10, "register + one poll per device");
}
