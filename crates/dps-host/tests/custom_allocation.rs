//! Custom allocation through the host (spec §8.3-8.5): a real HTTPS webhook on loopback (rustls, a test
//! CA), Azure's outcome table, retries while the device polls `assigning`, the request body a webhook
//! receives, keep-alive reuse, and in-process hooks (including one that panics).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dps_core::effect::{AllocationCall, EffectError};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::allocation::AllocationResponse;
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::IdScope;
use dps_core::{AccessPolicy, EngineConfig, ErrorCode, HttpRequest, LinkedHub, Reply, Rights};
use dps_host::{hook_fn, Host, WebhookConfig, Webhooks};
use dps_store::MemoryStore;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCOPE: &str = "0ne0000C0A7";
const HOST: &str = "dps.example.net";
const HUBS: [&str; 3] = ["hub-1.example.net", "hub-2.example.net", "hub-3.example.net"];

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

fn config() -> EngineConfig {
    let mut c = EngineConfig::new(
        IdScope::parse(SCOPE).unwrap(),
        HOST,
        HUBS.iter().map(|h| LinkedHub::new(h, None, None).unwrap()).collect(),
    )
    .with_policy(AccessPolicy {
        key_name: "owner".into(),
        primary_key: key(1),
        secondary_key: key(2),
        rights: Rights::ALL,
    });
    c.respond_before_assignment = true;
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

fn device(method: &str, path: &str, registration_id: &str, body: Value) -> HttpRequest {
    let device_key = key(7).derive_device_key(registration_id);
    let sr = encode_resource(&device_resource(SCOPE, registration_id));
    HttpRequest {
        method: method.into(),
        path_and_query: format!("/{SCOPE}/registrations/{registration_id}{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&device_key, &sr, unix_now() + 600, Some("registration"))),
        body: serde_json::to_vec(&body).unwrap(),
        ..HttpRequest::default()
    }
}

fn body(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// What the test webhook answers to one request.
#[derive(Clone)]
enum Answer {
    Json(u16, Value),
    Raw(u16, Vec<u8>, Vec<(&'static str, String)>),
    Hang,
}

/// A webhook on 127.0.0.1 over real TLS: answers from a queue (the last answer repeats), records every
/// request body and counts TCP connections.
struct TestWebhook {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
    requests: Arc<Mutex<Vec<(String, Value)>>>,
    connections: Arc<AtomicUsize>,
}

impl TestWebhook {
    async fn start(answers: Vec<Answer>) -> TestWebhook {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "webhook test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hook = TestWebhook {
            addr,
            ca: ca_cert.der().clone(),
            answers: Arc::new(Mutex::new(answers.into())),
            requests: Arc::new(Mutex::new(Vec::new())),
            connections: Arc::new(AtomicUsize::new(0)),
        };
        let (answers, requests, connections) =
            (hook.answers.clone(), hook.requests.clone(), hook.connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                let (acceptor, answers, requests) = (acceptor.clone(), answers.clone(), requests.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service =
                        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let (answers, requests) = (answers.clone(), requests.clone());
                            async move {
                                let path = req.uri().to_string();
                                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                                let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                                requests.lock().unwrap().push((path, value));
                                let answer = {
                                    let mut q = answers.lock().unwrap();
                                    if q.len() > 1 {
                                        q.pop_front().unwrap()
                                    } else {
                                        q.front().unwrap().clone()
                                    }
                                };
                                let (status, body, headers) = match answer {
                                    Answer::Json(s, v) => (s, serde_json::to_vec(&v).unwrap(), vec![]),
                                    Answer::Raw(s, b, h) => (s, b, h),
                                    Answer::Hang => {
                                        tokio::time::sleep(Duration::from_secs(3600)).await;
                                        (500, vec![], vec![])
                                    }
                                };
                                let mut response = hyper::Response::builder().status(status);
                                for (k, v) in headers {
                                    response = response.header(k, v);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    response.body(Full::new(Bytes::from(body))).unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        hook
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/api/allocate?code=secret-function-key", self.addr.port())
    }

    fn webhooks(&self) -> Webhooks {
        Webhooks::new(WebhookConfig {
            roots: vec![self.ca.clone()],
            timeout: Duration::from_millis(500),
            attempts: 3,
            initial_interval: Duration::from_millis(20),
            increment: Duration::from_millis(20),
            ..WebhookConfig::default()
        })
        .unwrap()
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().unwrap().clone()
    }
}

async fn host_with(webhooks: Webhooks) -> (Host, Arc<MemoryHubDirectory>) {
    let hubs = Arc::new(MemoryHubDirectory::new());
    let host = Host::builder(config())
        .store(Arc::new(MemoryStore::new()))
        .hubs(hubs.clone())
        .webhooks(webhooks)
        .poll_hold(Duration::ZERO)
        .build()
        .unwrap();
    (host, hubs)
}

fn group(url: &str, extra: Value) -> Value {
    let mut g = json!({"enrollmentGroupId": "tenants", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(7).to_base64(), "secondaryKey": key(8).to_base64()}},
        "allocationPolicy": "custom",
        "iotHubs": [HUBS[0], HUBS[1]],
        "initialTwin": {"tags": {"from": "enrollment"}},
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}});
    for (k, v) in extra.as_object().unwrap() {
        g[k] = v.clone();
    }
    g
}

/// Registers and polls until the registration is terminal; returns the final operation status.
async fn provision(host: &Host, id: &str, payload: Option<Value>) -> Value {
    let mut b = json!({"registrationId": id});
    if let Some(p) = payload {
        b["payload"] = p;
    }
    let registered = host.http(device("PUT", "/register", id, b)).await;
    assert_eq!(registered.status, 202, "{}", String::from_utf8_lossy(&registered.body));
    let op = body(&registered)["operationId"].as_str().unwrap().to_owned();
    for _ in 0..400 {
        let poll = host.http(device("GET", &format!("/operations/{op}"), id, json!({}))).await;
        let v = body(&poll);
        if v["status"] != "assigning" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} still assigning");
}

async fn put_group(host: &Host, g: Value) {
    let r = host.http(service("PUT", "/enrollmentGroups/tenants", g)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_chooses_the_hub_sets_the_twin_and_returns_the_payload_and_sees_azures_request() {
    let webhook = TestWebhook::start(vec![Answer::Json(
        200,
        json!({"iotHubHostName": HUBS[1], "initialTwin": {"tags": {"tenant": "contoso"},
            "properties": {"desired": {"mode": "eco"}}}, "payload": {"welcome": "contoso"}}),
    )])
    .await;
    let (host, hubs) = host_with(webhook.webhooks()).await;
    put_group(&host, group(&webhook.url(), json!({}))).await;

    let done = provision(&host, "toaster-007", Some(json!({"fw": "1.2"}))).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let state = &done["registrationState"];
    assert_eq!(state["assignedHub"], HUBS[1]);
    assert_eq!(state["payload"], json!({"welcome": "contoso"}));
    assert_eq!(state["substatus"], "initialAssignment");
    let twin = hubs.device(HUBS[1], "toaster-007").map(|d| d.twin).unwrap();
    assert_eq!(twin.tags, json!({"tenant": "contoso"}), "a first assignment takes the webhook's twin");
    assert_eq!(twin.desired, json!({"mode": "eco"}));

    let requests = webhook.requests();
    assert_eq!(requests.len(), 1);
    let (path, request) = &requests[0];
    assert_eq!(path, "/api/allocate?code=secret-function-key");
    let ctx = &request["deviceRuntimeContext"];
    assert_eq!(ctx["registrationId"], "toaster-007");
    assert_eq!(ctx["symmetricKey"], json!({}));
    assert_eq!(ctx["payload"], json!({"fw": "1.2"}));
    assert!(ctx.get("currentIotHubHostName").is_none(), "first registration: {ctx}");
    assert_eq!(request["linkedHubs"], json!([HUBS[0], HUBS[1]]), "the enrollment's hubs only");
    let group = &request["enrollmentGroup"];
    assert_eq!(group["enrollmentGroupId"], "tenants");
    assert_eq!(group["attestation"], json!({"type": "symmetricKey"}), "keys are stripped");
    assert!(group["customAllocationDefinition"]["webhookUrl"]
        .as_str()
        .unwrap()
        .ends_with("/api/allocate?****"));
    assert!(!request.to_string().contains("secret-function-key"));
    assert!(!request.to_string().contains(&key(7).to_base64()));
    assert!(request.get("individualEnrollment").is_none());

    // Re-registration: the webhook is called again with the current location and may move the device;
    // under the default migrate policy the twin moves with it (the webhook's twin is ignored).
    webhook.answers.lock().unwrap().clear();
    webhook.answers.lock().unwrap().push_back(Answer::Json(
        200,
        json!({"iotHubHostName": HUBS[0],
        "initialTwin": {"tags": {"ignored": true}}, "payload": {"second": 2}}),
    ));
    let again = provision(&host, "toaster-007", None).await;
    assert_eq!(again["registrationState"]["assignedHub"], HUBS[0]);
    assert_eq!(again["registrationState"]["substatus"], "deviceDataMigrated");
    assert_eq!(again["registrationState"]["payload"], json!({"second": 2}));
    assert_eq!(
        hubs.device(HUBS[0], "toaster-007").map(|d| d.twin).unwrap().tags,
        json!({"tenant": "contoso"})
    );
    assert!(hubs.device(HUBS[1], "toaster-007").map(|d| d.twin).is_none(), "the old identity is deleted");
    let second = &webhook.requests()[1].1["deviceRuntimeContext"];
    assert_eq!(second["currentIotHubHostName"], HUBS[1]);
    assert_eq!(second["currentDeviceId"], "toaster-007");
    // Both requests rode one kept-alive connection.
    assert_eq!(webhook.connections.load(Ordering::SeqCst), 1);
    host.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_uses_the_webhook_twin_on_a_hub_change_and_never_offers_only_the_current_hub() {
    let webhook = TestWebhook::start(vec![Answer::Json(200, json!({"iotHubHostName": HUBS[0]}))]).await;
    let (host, hubs) = host_with(webhook.webhooks()).await;
    let reset = json!({"reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}});
    put_group(&host, group(&webhook.url(), reset)).await;
    assert_eq!(provision(&host, "pump-1", None).await["registrationState"]["assignedHub"], HUBS[0]);
    assert_eq!(hubs.device(HUBS[0], "pump-1").map(|d| d.twin).unwrap().tags, json!({"from": "enrollment"}));

    *webhook.answers.lock().unwrap() = vec![Answer::Json(
        200,
        json!({"iotHubHostName": HUBS[1], "initialTwin": {"tags": {"reset": "webhook"}}}),
    )]
    .into();
    let moved = provision(&host, "pump-1", None).await;
    assert_eq!(moved["registrationState"]["substatus"], "deviceDataReset");
    assert_eq!(hubs.device(HUBS[1], "pump-1").map(|d| d.twin).unwrap().tags, json!({"reset": "webhook"}));

    // Never reprovision: the webhook is still called (for the payload), offered only the current hub.
    let never = json!({"reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": false}});
    let current = host.http(service("GET", "/enrollmentGroups/tenants", json!({}))).await;
    let mut g = group(&webhook.url(), never);
    g["etag"] = body(&current)["etag"].clone();
    put_group(&host, g).await;
    *webhook.answers.lock().unwrap() =
        vec![Answer::Json(200, json!({"iotHubHostName": HUBS[1], "payload": 7}))].into();
    let stayed = provision(&host, "pump-1", None).await;
    assert_eq!(stayed["registrationState"]["assignedHub"], HUBS[1]);
    assert_eq!(stayed["registrationState"]["payload"], 7);
    assert_eq!(webhook.requests().last().unwrap().1["linkedHubs"], json!([HUBS[1]]));
    // A webhook that names another hub under "never" names a hub it was not offered.
    *webhook.answers.lock().unwrap() = vec![Answer::Json(200, json!({"iotHubHostName": HUBS[0]}))].into();
    let refused = provision(&host, "pump-1", None).await;
    assert_eq!(refused["registrationState"]["errorCode"], 400207, "{refused}");
    host.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_table_of_azure() {
    let huge = vec![b' '; 70 * 1024];
    let cases: Vec<(&str, Vec<Answer>, Result<&str, u32>)> = vec![
        ("no-hub", vec![Answer::Json(200, json!({"payload": 1}))], Err(400208)),
        ("empty-hub", vec![Answer::Json(200, json!({"iotHubHostName": ""}))], Err(400208)),
        ("null-hub", vec![Answer::Json(200, json!({"iotHubHostName": null}))], Err(400208)),
        ("unauthorized", vec![Answer::Json(401, json!({}))], Err(400209)),
        ("not-found", vec![Answer::Json(404, json!({}))], Err(400207)),
        ("bad-request", vec![Answer::Json(400, json!({"iotHubHostName": HUBS[0]}))], Err(400207)),
        ("unlinked", vec![Answer::Json(200, json!({"iotHubHostName": "evil.example.net"}))], Err(400207)),
        ("outside-enrollment", vec![Answer::Json(200, json!({"iotHubHostName": HUBS[2]}))], Err(400207)),
        ("garbage", vec![Answer::Raw(200, b"<html>oops".to_vec(), vec![])], Err(400207)),
        ("array", vec![Answer::Json(200, json!([HUBS[0]]))], Err(400207)),
        ("wrong-type", vec![Answer::Json(200, json!({"iotHubHostName": 5}))], Err(400207)),
        ("huge", vec![Answer::Raw(200, huge, vec![])], Err(400207)),
        (
            "redirect",
            vec![Answer::Raw(302, vec![], vec![("location", "https://127.0.0.1:1/elsewhere".into())])],
            Err(400207),
        ),
        (
            "retried-503",
            vec![
                Answer::Json(503, json!({})),
                Answer::Json(429, json!({})),
                Answer::Json(200, json!({"iotHubHostName": HUBS[0].to_uppercase()})),
            ],
            Ok(HUBS[0]),
        ),
        ("always-500", vec![Answer::Json(500, json!({}))], Err(400207)),
        ("hangs", vec![Answer::Hang], Err(400207)),
    ];
    for (name, answers, expected) in cases {
        let webhook = TestWebhook::start(answers).await;
        let (host, hubs) = host_with(webhook.webhooks()).await;
        put_group(&host, group(&webhook.url(), json!({}))).await;
        let id = format!("dev-{name}");
        let done = provision(&host, &id, None).await;
        match expected {
            Ok(hub) => {
                assert_eq!(done["status"], "assigned", "{name}: {done}");
                assert_eq!(done["registrationState"]["assignedHub"], hub, "{name}");
                assert_eq!(webhook.requests().len(), 3, "{name}: two retries");
            }
            Err(code) => {
                assert_eq!(done["status"], "failed", "{name}: {done}");
                assert_eq!(done["registrationState"]["errorCode"], code, "{name}: {done}");
                let message = done["registrationState"]["errorMessage"].as_str().unwrap();
                assert!(!message.contains("secret-function-key"), "{name}: {message}");
                for hub in HUBS {
                    assert!(
                        hubs.device(hub, &id).map(|d| d.twin).is_none(),
                        "{name}: no identity is written on failure"
                    );
                }
            }
        }
        let expected_calls = match name {
            "always-500" | "hangs" => 3,
            "retried-503" => 3,
            _ => 1,
        };
        assert_eq!(webhook.requests().len(), expected_calls, "{name}");
        host.drain().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_webhook_certificate_fails_without_retrying() {
    let webhook = TestWebhook::start(vec![Answer::Json(200, json!({"iotHubHostName": HUBS[0]}))]).await;
    let other = TestWebhook::start(vec![]).await;
    let (host, _) = host_with(other.webhooks()).await; // trusts another CA
    put_group(&host, group(&webhook.url(), json!({}))).await;
    let done = provision(&host, "dev-untrusted", None).await;
    assert_eq!(done["registrationState"]["errorCode"], 400207, "{done}");
    assert!(done["registrationState"]["errorMessage"].as_str().unwrap().contains("not trusted"), "{done}");
    assert_eq!(webhook.requests().len(), 0);
    host.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_with_custom_allocation_are_checked_on_write() {
    let (host, _) = host_with(Webhooks::new(WebhookConfig::default()).unwrap()).await;
    let cases = [
        (json!({"customAllocationDefinition": null}), "needs a customAllocationDefinition"),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "http://h.example/x", "apiVersion": "2021-10-01"}}),
            "https://",
        ),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "ftp://h.example/x", "apiVersion": "2021-10-01"}}),
            "https://",
        ),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "https:///x", "apiVersion": "2021-10-01"}}),
            "host name",
        ),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "https://u:p@h.example/x", "apiVersion": "2021-10-01"}}),
            "user information",
        ),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "https://h.example/x", "apiVersion": "2018-04-01"}}),
            "older than 2018-09-01",
        ),
        (
            json!({"customAllocationDefinition": {"webhookUrl": "https://h.example/x", "apiVersion": "soon"}}),
            "apiVersion",
        ),
    ];
    for (extra, needle) in cases {
        let mut g = group("https://h.example/x", json!({}));
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                g.as_object_mut().unwrap().remove(k);
            } else {
                g[k] = v.clone();
            }
        }
        let r = host.http(service("PUT", "/enrollmentGroups/tenants", g)).await;
        assert_eq!(r.status, 400, "{extra}");
        let v = body(&r);
        assert_eq!(v["errorCode"], 400004, "{extra}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{extra}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_hook_decides_without_a_webhook_and_a_panicking_one_is_contained() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let hook = hook_fn(move |call: &AllocationCall| {
        let id = call.request.device_runtime_context.registration_id.clone();
        log.lock().unwrap().push(call.request.clone());
        if id.starts_with("panic") {
            panic!("the embedder's bug");
        }
        if id.starts_with("refuse") {
            return Err(EffectError::with_code(
                ErrorCode::CustomAllocationUnauthorizedAccess,
                "not a customer",
            ));
        }
        let hub = if id.ends_with("-b") { HUBS[1] } else { HUBS[0] };
        Ok(AllocationResponse { payload: Some(json!({"by": "hook"})), ..AllocationResponse::hub(hub) })
    });
    let hubs = Arc::new(MemoryHubDirectory::new());
    let host = Host::builder(config())
        .store(Arc::new(MemoryStore::new()))
        .hubs(hubs.clone())
        .allocation_hook(hook)
        .poll_hold(Duration::ZERO)
        .build()
        .unwrap();
    // With a hook, custom allocation needs no webhook definition.
    let mut g = group("unused", json!({}));
    g.as_object_mut().unwrap().remove("customAllocationDefinition");
    put_group(&host, g).await;

    let b = provision(&host, "sensor-b", None).await;
    assert_eq!(b["registrationState"]["assignedHub"], HUBS[1]);
    assert_eq!(b["registrationState"]["payload"], json!({"by": "hook"}));
    let panicked = provision(&host, "panic-1", None).await;
    assert_eq!(panicked["registrationState"]["errorCode"], 400207, "{panicked}");
    assert!(panicked["registrationState"]["errorMessage"].as_str().unwrap().contains("panicked"));
    let refused = provision(&host, "refuse-1", None).await;
    assert_eq!(refused["registrationState"]["errorCode"], 400209, "{refused}");
    // The host keeps serving after the panic.
    let a = provision(&host, "sensor-a", None).await;
    assert_eq!(a["registrationState"]["assignedHub"], HUBS[0]);
    assert_eq!(seen.lock().unwrap().len(), 4);
    host.drain().await;
}

#[test]
fn the_blocking_host_waits_for_a_hook() {
    let hook = hook_fn(|_call: &AllocationCall| Ok(AllocationResponse::hub(HUBS[1])));
    let mut c = config();
    c.respond_before_assignment = false;
    let host = dps_host::BlockingHost::new(c, MemoryStore::new(), MemoryHubDirectory::new())
        .unwrap()
        .with_allocation_hook(hook)
        .unwrap();
    let mut g = group("unused", json!({}));
    g.as_object_mut().unwrap().remove("customAllocationDefinition");
    assert_eq!(host.http(service("PUT", "/enrollmentGroups/tenants", g)).status, 200);
    let registered = host.http(device("PUT", "/register", "blocking-1", json!({})));
    assert_eq!(registered.status, 202);
    let op = body(&registered)["operationId"].as_str().unwrap().to_owned();
    let done = host.http(device("GET", &format!("/operations/{op}"), "blocking-1", json!({})));
    assert_eq!(
        body(&done)["registrationState"]["assignedHub"],
        HUBS[1],
        "{}",
        String::from_utf8_lossy(&done.body)
    );
    assert!(host.hubs().device(HUBS[1], "blocking-1").is_some());
}
