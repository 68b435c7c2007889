//! Allocation through the reference server: `geoLatency` with the `[[latency]]` table (devices from
//! different client addresses land on their nearest hub, an unknown network is hashed), and custom
//! allocation with a webhook the server calls over the network, answered to a device over MQTT.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use common::*;
use dps_core::proto::model::AllocationPolicy;
use dps_core::LinkedHub;
use dps_server::admin::{EnrollmentSettings, Kind};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const EU: &str = "hub-eu.localhost";
const US: &str = "hub-us.localhost";
const AP: &str = "hub-ap.localhost";

fn hubs() -> Vec<LinkedHub> {
    vec![
        LinkedHub::new(EU, None, None).unwrap().with_location("westeurope"),
        LinkedHub::new(US, None, None).unwrap().with_location("eastus"),
        LinkedHub::new(AP, None, None).unwrap(),
    ]
}

/// Registers `id` from the local address `source` over HTTPS and polls to the end; returns the final
/// registration state.
async fn provision_from(server: &dps_server::server::RunningServer, source: &str, id: &str) -> Value {
    let mut s = tls_from(server, server.ready.https, source).await;
    let token = device_token(&device_key(), SCOPE, id, 3600);
    let send = |method: &str, path: String, body: &'static [u8]| {
        format!(
            "{method} {path}?api-version=2021-10-01 HTTP/1.1\r\nHost: localhost\r\nauthorization: {token}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes()
        .into_iter()
        .chain(body.iter().copied())
        .collect::<Vec<u8>>()
    };
    s.write_all(&send("PUT", format!("/{SCOPE}/registrations/{id}/register"), b"{}")).await.unwrap();
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let op = serde_json::from_slice::<Value>(&body).unwrap()["operationId"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        s.write_all(&send("GET", format!("/{SCOPE}/registrations/{id}/operations/{op}"), b"")).await.unwrap();
        let (_, _, body) = read_response(&mut s).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        if v["status"] != "assigning" {
            return v["registrationState"].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} still assigning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_latency_sends_each_device_to_its_nearest_hub_and_hashes_unknown_networks() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.linked_hubs = hubs();
    cfg.latency = Some(
        dps_core::policy::LatencyTable::new([
            ("127.0.0.0/8", vec![("westeurope".to_owned(), 40), ("eastus".to_owned(), 90)]),
            ("127.0.0.3/32", vec![("eastus".to_owned(), 5), ("westeurope".to_owned(), 70)]),
            ("127.0.0.5/32", vec![(AP.to_owned(), 1)]),
        ])
        .unwrap(),
    );
    let server = start(cfg).await;
    let settings = EnrollmentSettings {
        primary_key: Some(device_key().to_base64()),
        allocation_policy: Some("geoLatency".into()),
        ..EnrollmentSettings::default()
    };
    for id in ["geo-1", "geo-2", "geo-3", "geo-4"] {
        service(&server).create(Kind::Enrollment, id, &settings).await.unwrap();
    }
    assert_eq!(provision_from(&server, "127.0.0.2", "geo-1").await["assignedHub"], EU, "/8 row");
    assert_eq!(provision_from(&server, "127.0.0.3", "geo-2").await["assignedHub"], US, "the /32 refines it");
    assert_eq!(provision_from(&server, "127.0.0.5", "geo-3").await["assignedHub"], AP, "a hub by host name");

    // A table that knows nothing of the client's network: exactly the hashed choice.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.linked_hubs = hubs();
    cfg.latency =
        Some(dps_core::policy::LatencyTable::new([("10.0.0.0/8", vec![(AP.to_owned(), 1)])]).unwrap());
    let server = start(cfg).await;
    service(&server).create(Kind::Enrollment, "geo-4", &settings).await.unwrap();
    let linked = hubs();
    let candidates: Vec<&LinkedHub> = linked.iter().collect();
    let hashed = dps_core::policy::allocate(AllocationPolicy::Hashed, "geo-4", &candidates).unwrap();
    assert_eq!(provision_from(&server, "127.0.0.4", "geo-4").await["assignedHub"], hashed.host_name.as_str());
}

#[test]
fn a_latency_table_is_checked_when_the_configuration_is_read() {
    use dps_server::config::{FileConfig, Overrides, ServerConfig};
    let read = |extra: &str| {
        let text = format!(
            "id_scope = \"{SCOPE}\"\n[[linked_hubs]]\nhost_name = \"{EU}\"\nlocation = \"westeurope\"\n{extra}"
        );
        let file = FileConfig::parse(&text, "test")?;
        ServerConfig::resolve(file, &Overrides::default(), &Overrides::default())
    };
    let ok = read("[[latency]]\nnetwork = \"10.0.0.0/8\"\nhubs = { westeurope = 10 }\n").unwrap();
    assert!(ok.latency.is_some());
    for (extra, needle) in [
        ("[[latency]]\nnetwork = \"10.0.0.1/8\"\nhubs = { westeurope = 10 }\n", "beyond the prefix"),
        ("[[latency]]\nnetwork = \"10.0.0.0/40\"\nhubs = { westeurope = 10 }\n", "prefix length"),
        ("[[latency]]\nnetwork = \"ten/8\"\nhubs = { westeurope = 10 }\n", "malformed"),
        (
            "[[latency]]\nnetwork = \"10.0.0.0/8\"\nhubs = { westeurope = 10 }\n[[latency]]\nnetwork = \"10.0.0.0/8\"\nhubs = { westeurope = 20 }\n",
            "twice",
        ),
        ("[[latency]]\nnetwork = \"10.0.0.0/8\"\nhubs = { mars = 10 }\n", "neither a linked hub"),
        ("[[latency]]\nnetwork = \"10.0.0.0/8\"\nhubs = {}\n", "names no hub"),
    ] {
        let e = read(extra).unwrap_err().to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
}

/// A plain-HTTP webhook on 127.0.0.1 (the server allows http:// here): chooses by the device's payload.
async fn start_webhook() -> (String, tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::Mutex<Vec<Value>>>)
{
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/allocate?code=k", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let request: Value = serde_json::from_slice(&body).unwrap();
                            log.lock().unwrap().push(request.clone());
                            let tenant =
                                request["deviceRuntimeContext"]["payload"]["tenant"].as_str().unwrap_or("");
                            let hub = if tenant == "contoso" { US } else { EU };
                            let answer = json!({"iotHubHostName": hub, "payload": {"tenant": tenant, "hub": hub},
                            "initialTwin": {"tags": {"tenant": tenant}}});
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                hyper::body::Bytes::from(serde_json::to_vec(&answer).unwrap()),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, task, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_allocation_calls_the_webhook_and_the_device_gets_its_payload_over_mqtt() {
    let (url, webhook, seen) = start_webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.linked_hubs = hubs();
    cfg.custom_allocation.allow_http = true;
    let server = start(cfg).await;
    let group = json!({"enrollmentGroupId": "tenants", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": device_key().to_base64(), "secondaryKey": device_key().to_base64()}},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}});
    service(&server).call("PUT", "/enrollmentGroups/tenants", Some(&group), &[]).await.unwrap();

    let derived = device_key().derive_device_key("contoso-toaster");
    let pem = std::fs::read(server.data_dir.ca_cert()).unwrap();
    let provisioned = dps_client::provision(dps_client::ProvisionOptions {
        endpoint: server.ready.mqtt.unwrap().to_string(),
        server_name: Some("localhost".into()),
        id_scope: SCOPE.into(),
        registration_id: "contoso-toaster".into(),
        auth: dps_client::Auth::SymmetricKey(derived),
        transport: dps_client::Transport::Mqtt,
        roots: dps_client::tls::certificates(&pem).unwrap(),
        payload: Some(json!({"tenant": "contoso"})),
        ..dps_client::ProvisionOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(provisioned.assigned_hub, US);
    assert_eq!(provisioned.registration.payload, Some(json!({"tenant": "contoso", "hub": US})));
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["linkedHubs"], json!([EU, US, AP]), "no iotHubs: every linked hub");
    assert_eq!(requests[0]["enrollmentGroup"]["attestation"], json!({"type": "symmetricKey"}));
    // The registration state the service API shows carries the payload too.
    let state = service(&server).registration("contoso-toaster").await.unwrap();
    assert_eq!(state["assignedHub"], US);
    webhook.abort();
}
