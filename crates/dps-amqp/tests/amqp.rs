//! AMQP connections against the real engine, the way the device SDKs talk (spec §3), with
//! `fe2o3-amqp`'s client as the device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use dps_amqp::fe2o3_amqp::connection::OpenError;
use dps_amqp::fe2o3_amqp::sasl_profile::SaslProfile;
use dps_amqp::fe2o3_amqp::types::definitions::{AmqpError as Condition, ErrorCondition};
use dps_amqp::fe2o3_amqp::types::messaging::MessageId;
use dps_amqp::fe2o3_amqp::types::sasl::SaslCode;
use dps_amqp::{AmqpError, AmqpLimits, DeviceHandler};
use dps_core::proto::Credential;
use dps_core::{DeviceCall, DeviceRequest, Reply};
use std::future::Future;
use std::sync::{Arc, Mutex};

/// Registers, then polls until the operation is no longer assigning; returns the final body.
async fn provision(device: &mut Device, id: &str) -> serde_json::Value {
    let body = format!(r#"{{"registrationId":"{id}"}}"#);
    let response =
        device.request("iotdps-register", None, Some(body.as_bytes()), Some("corr-1")).await.unwrap();
    assert_eq!(
        response.properties.as_ref().unwrap().correlation_id,
        Some(MessageId::String("corr-1".into()))
    );
    let first = json_body(&response);
    assert_eq!(first["status"], "assigning", "{first}");
    // Both spellings of the delay, as ints.
    assert!(app_int(&response, "retry-after").is_some_and(|s| (1..=300).contains(&s)));
    assert_eq!(app_int(&response, "retry-after"), app_int(&response, "Retry-After"));
    let operation = first["operationId"].as_str().unwrap().to_owned();
    for i in 0..20 {
        let corr = format!("poll-{i}");
        let response =
            device.request("iotdps-get-operationstatus", Some(&operation), None, Some(&corr)).await.unwrap();
        assert_eq!(response.properties.as_ref().unwrap().correlation_id, Some(MessageId::String(corr)));
        let body = json_body(&response);
        if body["status"] != "assigning" {
            return body;
        }
    }
    panic!("still assigning after 20 polls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symmetric_key_device_provisions_over_sasl_plain() {
    let world = EngineHandler::new();
    world.enroll("amqp-dev", &key(1)).await;
    let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
    let connection = open(io, Some(plain("amqp-dev", &token("amqp-dev", &key(1))))).await.unwrap();
    let mut device = Device::attach(connection, &address("amqp-dev")).await;
    // The device's sender link was granted credit; the receiver advertises the message limit.
    assert_eq!(device.sender.max_message_size(), Some(100_000));

    let body = provision(&mut device, "amqp-dev").await;
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!(state["assignedHub"], HUB);
    assert_eq!(state["deviceId"], "amqp-dev");
    assert_eq!(state["substatus"], "initialAssignment");
    assert!(world.hubs.device(HUB, "amqp-dev").is_some());

    // Status lookup (`iotdps-get-registration`) answers the registration state.
    let lookup = device.request("iotdps-get-registration", None, Some(b"{}"), None).await.unwrap();
    assert!(lookup.properties.as_ref().and_then(|p| p.correlation_id.as_ref()).is_none());
    assert_eq!(json_body(&lookup)["assignedHub"], HUB, "{}", json_body(&lookup));

    device.close().await;
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_device_provisions_at_every_address_spelling() {
    let world = EngineHandler::new();
    let group_key = key(7);
    world.enroll_group("amqp-group", &group_key).await;
    for (i, spelling) in [
        format!("amqps://{HOST}/{SCOPE}/registrations/grp-dev-0"),
        format!("{SCOPE}/registrations/grp-dev-1"),
        format!("/{SCOPE}/registrations/grp-dev-2"),
        format!("{SCOPE}/Registrations/grp-dev-3/"),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("grp-dev-{i}");
        let device_key = group_key.derive_device_key(&id);
        let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
        let connection = open(io, Some(plain(&id, &token(&id, &device_key)))).await.unwrap();
        let mut device = Device::attach(connection, spelling).await;
        let body = provision(&mut device, &id).await;
        assert_eq!(body["status"], "assigned", "{spelling}: {body}");
        assert_eq!(body["registrationState"]["symmetricKey"]["enrollmentGroupId"], "amqp-group", "{body}");
        device.close().await;
        server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sas_gets_sasl_outcome_auth() {
    let world = EngineHandler::new();
    world.enroll("amqp-dev", &key(1)).await;
    let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
    let refused = open(io, Some(plain("amqp-dev", &token("amqp-dev", &key(2))))).await.unwrap_err();
    assert!(matches!(refused, OpenError::SaslError { code: SaslCode::Auth, .. }), "{refused:?}");
    match server.await.unwrap() {
        Err(AmqpError::SaslRefused { code: 1, reason }) => assert!(reason.contains("401000"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // An unknown device and a malformed authcid are refused the same way.
    for profile in [
        plain("nobody", &token("nobody", &key(1))),
        SaslProfile::Plain { username: "not-an-address".into(), password: token("amqp-dev", &key(1)) },
    ] {
        let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
        let refused = open(io, Some(profile)).await.unwrap_err();
        assert!(matches!(refused, OpenError::SaslError { code: SaslCode::Auth, .. }), "{refused:?}");
        assert!(matches!(server.await.unwrap(), Err(AmqpError::SaslRefused { code: 1, .. })));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_rejected_outcomes_with_the_json_error() {
    let world = EngineHandler::new();
    world.enroll("amqp-dev", &key(1)).await;
    let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
    let connection = open(io, Some(plain("amqp-dev", &token("amqp-dev", &key(1))))).await.unwrap();
    let mut device = Device::attach(connection, &address("amqp-dev")).await;

    // An operation that does not exist.
    let e = device
        .request(
            "iotdps-get-operationstatus",
            Some("4.0000000000000000.00000000-0000-0000-0000-000000000000"),
            None,
            Some("x"),
        )
        .await
        .unwrap_err();
    let body = error_body(&e);
    assert_eq!(body["errorCode"], 404204, "{body}");
    assert!(body["trackingId"].is_string() && body["message"].is_string());
    assert_eq!(e.unwrap().condition, ErrorCondition::AmqpError(Condition::NotFound));
    // An unknown operation type, a status request without operation ID.
    let e = device.request("iotdps-unregister", None, None, None).await.unwrap_err();
    assert_eq!(error_body(&e)["errorCode"], 400000);
    let e = device.request("iotdps-get-operationstatus", None, None, None).await.unwrap_err();
    assert_eq!(error_body(&e)["errorCode"], 400002);
    // A body that is not a registration.
    let e = device.request("iotdps-register", None, Some(b"[1,2]"), None).await.unwrap_err();
    assert_eq!(error_body(&e)["errorCode"], 400001, "{}", error_body(&e));
    // The session still serves.
    assert_eq!(provision(&mut device, "amqp-dev").await["status"], "assigned");
    device.close().await;
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_another_registration_is_refused() {
    let world = EngineHandler::new();
    world.enroll("amqp-dev", &key(1)).await;
    world.enroll("other-dev", &key(1)).await;
    let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
    let mut connection = open(io, Some(plain("amqp-dev", &token("amqp-dev", &key(1))))).await.unwrap();
    let mut session = dps_amqp::fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
    for addr in [address("other-dev"), "0ne0000FFFF/registrations/amqp-dev".to_owned(), "$cbs".to_owned()] {
        let mut sender =
            dps_amqp::fe2o3_amqp::Sender::attach(&mut session, format!("s-{addr}"), addr.as_str())
                .await
                .unwrap();
        let detach =
            tokio::time::timeout(std::time::Duration::from_secs(10), sender.on_detach()).await.unwrap();
        let text = format!("{detach:?}");
        let expected = if addr == "$cbs" { "404000" } else { "401000" };
        assert!(text.contains(expected), "{addr}: {text}");
    }
    // The connection still serves its own registration.
    let mut device = Device::attach(connection, &address("amqp-dev")).await;
    assert_eq!(provision(&mut device, "amqp-dev").await["status"], "assigned");
    device.close().await;
    server.await.unwrap().unwrap();
}

/// Records the credential of every request and answers `202`.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, Credential)>>,
}

impl DeviceHandler for Recorder {
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        let call = match &request.call {
            DeviceCall::Register { .. } => "register",
            DeviceCall::Authenticate => "authenticate",
            _ => "other",
        };
        self.seen
            .lock()
            .unwrap()
            .push((format!("{call} {}", request.registration_id.as_str()), request.credential));
        async {
            Reply::json(202, &serde_json::json!({"operationId": "op", "status": "assigning"}), "t".into())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sasl_the_client_certificate_is_the_credential() {
    let chain = vec![vec![0x30, 0x03, 0x02, 0x01, 0x01]];
    // No SASL layer (the C and C# SDKs for X.509), and SASL EXTERNAL / ANONYMOUS (rhea-based SDKs).
    for profile in [None, Some(SaslProfile::External), Some(SaslProfile::Anonymous)] {
        let recorder = Arc::new(Recorder::default());
        let (io, server) = spawn_server(Arc::clone(&recorder), AmqpLimits::default(), Some(chain.clone()));
        let connection = match &profile {
            // fe2o3 refuses EXTERNAL on an "amqp" scheme; the server does not care how it was chosen.
            Some(SaslProfile::External) => {
                dps_amqp::fe2o3_amqp::Connection::builder()
                    .container_id("device")
                    .scheme("amqps")
                    .sasl_profile(SaslProfile::External)
                    .open_with_stream(io)
                    .await
            }
            _ => open(io, profile.clone()).await,
        };
        let Ok(connection) = connection else {
            // fe2o3's client cannot do EXTERNAL without its own TLS; covered by the ANONYMOUS case.
            continue;
        };
        let mut device = Device::attach(connection, &address("x509-dev")).await;
        let response = device.request("iotdps-register", None, Some(b"{}"), Some("c")).await.unwrap();
        assert_eq!(json_body(&response)["status"], "assigning");
        device.close().await;
        server.await.unwrap().unwrap();
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, "register x509-dev");
        assert!(matches!(&seen[0].1, Credential::ClientCertificate(c) if c.der == chain), "{:?}", seen[0].1);
    }
    // Without a certificate, ANONYMOUS is refused at SASL; plain AMQP gets 401004 on its requests.
    let recorder = Arc::new(Recorder::default());
    let (io, server) = spawn_server(Arc::clone(&recorder), AmqpLimits::default(), None);
    // (ANONYMOUS is not even offered, so the client gives up before its sasl-init.)
    assert!(open(io, Some(SaslProfile::Anonymous)).await.is_err());
    assert!(server.await.unwrap().is_err());
    let world = EngineHandler::new();
    let (io, server) = spawn_server(Arc::clone(&world), AmqpLimits::default(), None);
    let mut device = Device::attach(open(io, None).await.unwrap(), &address("x509-dev")).await;
    let e = device.request("iotdps-register", None, Some(b"{}"), None).await.unwrap_err();
    assert_eq!(error_body(&e)["errorCode"], 401004, "{}", error_body(&e));
    device.close().await;
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed() {
    let recorder = Arc::new(Recorder::default());
    let limits =
        AmqpLimits { request_idle_timeout: std::time::Duration::from_millis(300), ..AmqpLimits::default() };
    let (io, server) = spawn_server(recorder, limits, Some(vec![vec![1]]));
    let mut connection = open(io, None).await.unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), server).await.unwrap().unwrap();
    assert!(matches!(result, Err(AmqpError::RequestIdleTimeout(_))), "{result:?}");
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), connection.on_close()).await.unwrap();
    assert!(format!("{closed:?}").contains("ResourceLimitExceeded"), "{closed:?}");
}
