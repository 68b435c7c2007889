//! Quotas and fault injection through the real server: 429s with Retry-After on HTTPS and MQTT, fault
//! rules from the configuration and the admin API, and the project's device client recovering from every
//! kind of fault on both transports.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::mqtt::{build_username, parse_response_topic, register_topic};
use dps_core::proto::sas::SymmetricKey;
use dps_server::admin::{CallError, EnrollmentSettings, Kind};
use dps_server::faults::FaultSpec;
use dps_server::server::RunningServer;
use serde_json::{json, Value};

/// Creates the group every test device belongs to and returns its key.
async fn group(server: &RunningServer) -> SymmetricKey {
    let svc = service(server);
    svc.create(Kind::Group, "fleet", &EnrollmentSettings::default()).await.unwrap();
    let g = svc.show(Kind::Group, "fleet", true).await.unwrap();
    SymmetricKey::parse(g["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap()
}

async fn provision(
    server: &RunningServer,
    group_key: &SymmetricKey,
    registration_id: &str,
    transport: dps_client::Transport,
) -> Result<dps_client::Provisioned, dps_client::ProvisionError> {
    let ca = std::fs::read(server.data_dir.ca_cert()).unwrap();
    let endpoint = match transport {
        dps_client::Transport::Https => server.ready.https,
        dps_client::Transport::Mqtt => server.ready.mqtt.unwrap(),
        dps_client::Transport::Amqp => server.ready.amqp.unwrap(),
    };
    dps_client::provision(dps_client::ProvisionOptions {
        endpoint: endpoint.to_string(),
        server_name: Some("localhost".into()),
        id_scope: SCOPE.into(),
        registration_id: registration_id.into(),
        auth: dps_client::Auth::GroupKey(group_key.clone()),
        transport,
        roots: dps_client::tls::certificates(&ca).unwrap(),
        ..dps_client::ProvisionOptions::default()
    })
    .await
}

fn spec(value: Value) -> Value {
    // Every body the tests send is a valid FaultSpec (the CLI sends the same JSON).
    let parsed: FaultSpec = serde_json::from_value(value.clone()).unwrap();
    serde_json::to_value(parsed).unwrap()
}

fn metrics(server: &RunningServer) -> String {
    server.state.refresh_store_metrics();
    server.state.metrics.render()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_client_recovers_from_every_fault_on_https_and_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let key = group(&server).await;
    let svc = service(&server);
    // Each rule fires a limited number of times (or for a limited time), on its own devices: the client
    // must get through regardless.
    let rules = [
        json!({"id": "throttle", "registration_id": "throttle-*", "kind": "throttle", "retry_after_secs": 1, "times": 4}),
        json!({"id": "error", "registration_id": "error-*", "kind": "error", "code": 503000, "times": 2}),
        json!({"id": "error-poll", "registration_id": "poll500-*", "kind": "error", "code": 500000, "requests": "poll", "times": 2}),
        json!({"id": "latency", "registration_id": "latency-*", "kind": "latency", "latency_ms": 300}),
        json!({"id": "stuck", "registration_id": "stuck-*", "kind": "stuck_assigning", "duration_secs": 3}),
        json!({"id": "drop", "registration_id": "drop-*", "kind": "drop_connection", "times": 2}),
    ];
    for rule in &rules {
        let added = svc.call("POST", "/admin/faults", Some(&spec(rule.clone())), &[]).await.unwrap();
        assert_eq!(added["id"], rule["id"]);
        assert_eq!(added["fired"], 0);
    }
    let mut devices = Vec::new();
    for prefix in ["throttle", "error", "poll500", "latency", "stuck", "drop"] {
        for (transport, name) in
            [(dps_client::Transport::Https, "https"), (dps_client::Transport::Mqtt, "mqtt")]
        {
            devices.push((format!("{prefix}-{name}"), transport));
        }
    }
    let runs = devices.iter().map(|(id, transport)| {
        let (server, key) = (&server, &key);
        async move { (id.clone(), provision(server, key, id, *transport).await) }
    });
    for (id, outcome) in futures_util::future::join_all(runs).await {
        let provisioned = outcome.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(provisioned.device_id, id);
        assert_eq!(provisioned.assigned_hub, "hub-1.localhost");
    }
    // Every rule fired (the limited ones their full count: both transports' devices match).
    let listed = svc.call("GET", "/admin/faults", None, &[]).await.unwrap();
    let fired = |id: &str| {
        listed.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap()["fired"].as_u64().unwrap()
    };
    assert_eq!(fired("throttle"), 4);
    assert_eq!(fired("error"), 2);
    assert_eq!(fired("error-poll"), 2);
    assert_eq!(fired("drop"), 2);
    assert!(fired("latency") >= 4, "a register and a poll per device");
    assert_eq!(fired("stuck"), 2, "one per registration");
    let m = metrics(&server);
    for (kind, at_least) in
        [("throttle", 4), ("error", 4), ("latency", 4), ("stuck_assigning", 2), ("drop_connection", 2)]
    {
        let line = m
            .lines()
            .find(|l| l.starts_with(&format!("dps_faults_injected_total{{kind=\"{kind}\"}}")))
            .unwrap();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= at_least, "{line}");
    }
    // Removing the rules restores normal service.
    for rule in &rules {
        let id = rule["id"].as_str().unwrap();
        svc.call("DELETE", &format!("/admin/faults/{id}"), None, &[]).await.unwrap();
    }
    assert_eq!(svc.call("GET", "/admin/faults", None, &[]).await.unwrap(), json!([]));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_https_request_gets_no_response_and_a_dropped_mqtt_request_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.faults = dps_server::faults::rules_from_config(&[FaultSpec {
        registration_id: "gone-*".into(),
        kind: "drop_connection".into(),
        ..FaultSpec::default()
    }])
    .unwrap();
    let server = start(cfg).await;
    let key = group(&server).await;
    let device_key = key.derive_device_key("gone-1");

    // HTTPS: the request is read, then the connection closes without a status line.
    let mut tls = raw_tls(&server).await;
    let body = r#"{"registrationId":"gone-1"}"#;
    let token = device_token(&device_key, SCOPE, "gone-1", 3600);
    let request = format!(
        "PUT /{SCOPE}/registrations/gone-1/register?api-version=2021-10-01 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all(&mut tls, request.as_bytes()).await;
    let answer = read_to_close(&mut tls).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // MQTT: CONNECT is served, the register PUBLISH gets no answer and the session is closed.
    let mut mqtt = raw_tls_to(&server, server.ready.mqtt.unwrap()).await;
    let mut buf = Vec::new();
    let username = build_username(SCOPE, "gone-1", "2019-03-31", None);
    write_all(
        &mut mqtt,
        &mqtt_connect("gone-1", &username, &device_token(&device_key, SCOPE, "gone-1", 3600)),
    )
    .await;
    assert_eq!(mqtt_read(&mut mqtt, &mut buf).await.first, 0x20);
    write_all(&mut mqtt, &mqtt_publish(&register_topic("1"), body.as_bytes())).await;
    let rest = read_to_close(&mut mqtt).await;
    assert!(buf.is_empty() && rest.is_empty(), "nothing is answered: {rest:?}");
    assert_eq!(server.state.host.faults()[0].fired, 2);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_answer_429_with_retry_after_on_https_and_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.quotas = dps_host::Quotas {
        registrations: dps_host::throttle::Rate::per_minute(1),
        ..dps_host::Quotas::none()
    };
    let server = start(cfg).await;
    let key = group(&server).await;
    let http = https(&server);
    let register = |id: &str| {
        let token = device_token(&key.derive_device_key(id), SCOPE, id, 3600);
        let path = format!("/{SCOPE}/registrations/{id}/register?api-version=2021-10-01");
        let body = format!(r#"{{"registrationId":"{id}"}}"#).into_bytes();
        let http = http.clone();
        async move { http.request("PUT", &path, &[("authorization", token)], body).await.unwrap() }
    };
    assert_eq!(register("dev-1").await.status, 202);
    let refused = register("dev-2").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.header("x-ms-error-code"), Some("429001"));
    assert_eq!(refused.json().unwrap()["errorCode"], 429001);

    let mut mqtt = raw_tls_to(&server, server.ready.mqtt.unwrap()).await;
    let mut buf = Vec::new();
    let username = build_username(SCOPE, "dev-3", "2019-03-31", None);
    let token = device_token(&key.derive_device_key("dev-3"), SCOPE, "dev-3", 3600);
    write_all(&mut mqtt, &mqtt_connect("dev-3", &username, &token)).await;
    assert_eq!(mqtt_read(&mut mqtt, &mut buf).await.first, 0x20, "CONNECT is not a registration");
    write_all(&mut mqtt, &mqtt_publish(&register_topic("7"), br#"{"registrationId":"dev-3"}"#)).await;
    let (topic, _, payload) = mqtt_read(&mut mqtt, &mut buf).await.publish();
    assert_eq!(topic, "$dps/registrations/res/429/?$rid=7&retry-after=60");
    let response = parse_response_topic(&topic).unwrap();
    assert_eq!((response.status, response.retry_after), (429, Some(60)));
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap()["errorCode"], 429001);
    assert!(metrics(&server).contains("dps_throttled_total{limit=\"registrations\"} 2"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_checks_rights_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let svc = service(&server);
    let api_error = |r: Result<Value, CallError>| match r {
        Err(CallError::Api(e)) => (e.status, e.body),
        other => panic!("expected an API error, got {other:?}"),
    };
    // No token.
    let anonymous = https(&server).request("GET", "/admin/faults", &[], Vec::new()).await.unwrap();
    assert_eq!(anonymous.status, 401);
    // A bad rule is refused naming it and the problem.
    let (status, body) = api_error(
        svc.call(
            "POST",
            "/admin/faults",
            Some(&json!({"id": "x", "registration_id": "*", "kind": "latency"})),
            &[],
        )
        .await,
    );
    assert_eq!(status, 400);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("'x'") && message.contains("latency_ms"), "{message}");
    let (status, _) = api_error(
        svc.call(
            "POST",
            "/admin/faults",
            Some(&json!({"registration_id": "*", "kind": "error", "code": 7})),
            &[],
        )
        .await,
    );
    assert_eq!(status, 400);
    let (status, _) = api_error(svc.call("POST", "/admin/faults", Some(&json!({"bogus": 1})), &[]).await);
    assert_eq!(status, 400);
    // Generated IDs, duplicates, unknown IDs.
    let added = svc
        .call(
            "POST",
            "/admin/faults",
            Some(&json!({"registration_id": "a*", "kind": "drop_connection"})),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(added["id"], "fault-1");
    assert_eq!(added["probability"], 1.0);
    let (status, _) = api_error(
        svc.call(
            "POST",
            "/admin/faults",
            Some(&json!({"id": "fault-1", "registration_id": "b", "kind": "drop_connection"})),
            &[],
        )
        .await,
    );
    assert_eq!(status, 409);
    let (status, _) = api_error(svc.call("DELETE", "/admin/faults/nope", None, &[]).await);
    assert_eq!(status, 404);
    svc.call("DELETE", "/admin/faults/fault-1", None, &[]).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_cli_adds_lists_and_removes_rules_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let d = dir.path().to_str().unwrap().to_owned();
    let added = tokio::task::spawn_blocking({
        let d = d.clone();
        move || {
            cli_json(&[
                "fault",
                "add",
                "--data-dir",
                &d,
                "--registration-id",
                "cli-*",
                "--kind",
                "throttle",
                "--retry-after-secs",
                "9",
                "--times",
                "3",
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(added["id"], "fault-1");
    assert_eq!(added["retry_after_secs"], 9);
    assert_eq!(server.state.host.faults()[0].rule.times, Some(3));
    let listed = tokio::task::spawn_blocking({
        let d = d.clone();
        move || cli_json(&["fault", "list", "--data-dir", &d])
    })
    .await
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["kind"], "throttle");
    assert_eq!(listed[0]["fired"], 0);
    let (removed, refused) = tokio::task::spawn_blocking(move || {
        let removed = cli(&["fault", "remove", "--data-dir", &d, "--id", "fault-1"]);
        let refused = cli(&["fault", "add", "--data-dir", &d, "--registration-id", "x", "--kind", "latency"]);
        (removed, refused)
    })
    .await
    .unwrap();
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert!(server.state.host.faults().is_empty());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("latency_ms"));
    server.shutdown().await.unwrap();
}
