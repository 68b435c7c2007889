//! The client crate against the reference server (`dps-server`, started in-process on 127.0.0.1 port 0):
//! provisioning over HTTPS, over MQTT and (feature `amqp`) over AMQP, with an individual key and with a
//! group key, and a refused device keeping the service's error code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dps_client::proto::sas::SymmetricKey;
use dps_client::{provision, Auth, ProvisionError, ProvisionOptions, Transport};
use dps_server::admin::{EnrollmentSettings, Kind, ServiceClient};
use dps_server::client::HttpsClient;
use dps_server::config::ServerConfig;
use dps_server::datadir::ConnectionString;
use dps_server::server::RunningServer;

const SCOPE: &str = "0ne0000C11E";

fn device_key() -> SymmetricKey {
    SymmetricKey::from_bytes((0u8..32).collect())
}

async fn start(dir: &std::path::Path) -> RunningServer {
    dps_server::server::start(ServerConfig::for_tests(SCOPE, dir).unwrap()).await.unwrap()
}

fn service(server: &RunningServer) -> ServiceClient {
    let pem = std::fs::read(server.data_dir.ca_cert()).unwrap();
    let tls = dps_server::tls::client_config(&pem).unwrap();
    let http = HttpsClient::new(server.ready.https.to_string(), "localhost", tls).unwrap();
    let text = std::fs::read_to_string(server.data_dir.connection_string()).unwrap();
    ServiceClient::new(http, ConnectionString::parse(&text).unwrap())
}

async fn enroll(server: &RunningServer, registration_id: &str) {
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    service(server).create(Kind::Enrollment, registration_id, &settings).await.unwrap();
}

fn options(
    server: &RunningServer,
    transport: Transport,
    registration_id: &str,
    auth: Auth,
) -> ProvisionOptions {
    let port = match transport {
        Transport::Https => server.ready.https.port(),
        Transport::Mqtt => server.ready.mqtt.unwrap().port(),
        Transport::Amqp => server.ready.amqp.unwrap().port(),
    };
    let roots = dps_client::tls::certificates(&std::fs::read(server.data_dir.ca_cert()).unwrap()).unwrap();
    ProvisionOptions {
        endpoint: format!("127.0.0.1:{port}"),
        server_name: Some("localhost".into()),
        id_scope: SCOPE.into(),
        registration_id: registration_id.into(),
        auth,
        transport,
        roots,
        ..ProvisionOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_over_https_and_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    for (transport, id) in [(Transport::Https, "client-https-1"), (Transport::Mqtt, "client-mqtt-1")] {
        enroll(&server, id).await;
        let result =
            provision(options(&server, transport, id, Auth::SymmetricKey(device_key()))).await.unwrap();
        assert_eq!(result.assigned_hub, "hub-1.localhost", "{transport:?}");
        assert_eq!(result.device_id, id);
        assert!(result.substatus.is_some());
        // Again: the same hub (the reprovisioning path).
        let again =
            provision(options(&server, transport, id, Auth::SymmetricKey(device_key()))).await.unwrap();
        assert_eq!(again.assigned_hub, result.assigned_hub);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_key_devices_provision_and_bad_keys_keep_the_error_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let svc = service(&server);
    svc.create(Kind::Group, "group-c", &EnrollmentSettings::default()).await.unwrap();
    let group = svc.show(Kind::Group, "group-c", true).await.unwrap();
    let group_key =
        SymmetricKey::parse(group["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    for (transport, id) in [(Transport::Https, "group-https-1"), (Transport::Mqtt, "group-mqtt-1")] {
        let result =
            provision(options(&server, transport, id, Auth::GroupKey(group_key.clone()))).await.unwrap();
        assert_eq!(result.device_id, id, "{transport:?}");
    }
    // A wrong key: HTTPS answers 401 with errorCode 401002 (or similar 401xxx), kept in the error.
    let wrong = SymmetricKey::from_bytes(vec![42; 32]);
    let e = provision(options(&server, Transport::Https, "group-https-2", Auth::GroupKey(wrong.clone())))
        .await
        .unwrap_err();
    let ProvisionError::Registration(ref r) = e else { panic!("{e:?}") };
    assert_eq!(r.status, 401, "{e}");
    assert_eq!(e.error_code().map(|c| c / 1000), Some(401), "{e}");
    // Over MQTT the server refuses the CONNECT (or answers 401 on the response topic).
    let e = provision(options(&server, Transport::Mqtt, "group-mqtt-2", Auth::GroupKey(wrong)))
        .await
        .unwrap_err();
    match &e {
        ProvisionError::Refused { status, .. } => assert_eq!(*status, 401),
        ProvisionError::Registration(r) => assert_eq!(r.status, 401),
        other => panic!("{other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_over_amqp_with_individual_and_group_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    enroll(&server, "client-amqp-1").await;
    let result =
        provision(options(&server, Transport::Amqp, "client-amqp-1", Auth::SymmetricKey(device_key())))
            .await
            .unwrap();
    assert_eq!(result.assigned_hub, "hub-1.localhost");
    assert_eq!(result.device_id, "client-amqp-1");
    assert!(result.substatus.is_some());

    let svc = service(&server);
    svc.create(Kind::Group, "group-amqp", &EnrollmentSettings::default()).await.unwrap();
    let group = svc.show(Kind::Group, "group-amqp", true).await.unwrap();
    let group_key =
        SymmetricKey::parse(group["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap();
    let result = provision(options(&server, Transport::Amqp, "group-amqp-1", Auth::GroupKey(group_key)))
        .await
        .unwrap();
    assert_eq!(result.device_id, "group-amqp-1");
    // A wrong key is refused at SASL (outcome auth), reported as a 401 refusal.
    let wrong = SymmetricKey::from_bytes(vec![42; 32]);
    let e = provision(options(&server, Transport::Amqp, "group-amqp-2", Auth::GroupKey(wrong)))
        .await
        .unwrap_err();
    assert!(matches!(e, ProvisionError::Refused { status: 401, .. }), "{e:?}");
    server.shutdown().await.unwrap();
}
