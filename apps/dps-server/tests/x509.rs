//! X.509 devices end to end through the server, over real mutual TLS, with the project's device client:
//! a group device whose chain (leaf + intermediate) reaches a root uploaded and verified by proof of
//! possession, over HTTPS and MQTT; a self-signed individual device; and a device that gets its
//! certificate issued from a CSR (symmetric key onboarding) and then provisions again with that
//! certificate through a group on the issuing CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_client::{provision, Auth, ClientIdentity, ProvisionOptions, Transport};
use dps_core::hub::HubAuthentication;
use dps_core::proto::sas::SymmetricKey;
use dps_server::config::IssuanceConfig;
use dps_server::server::RunningServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use serde_json::json;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p
}

fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

fn intermediate(cn: &str, parent: &Ca) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn);
    let pem = params.signed_by(&key, &parent.issuer()).unwrap().pem();
    Ca { params, key, pem }
}

fn leaf_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A device identity: `chain_pem` (leaf first) and its key.
fn identity(chain_pem: &str, key: &KeyPair) -> ClientIdentity {
    ClientIdentity::from_pem_or_der(chain_pem.as_bytes(), key.serialize_pem().as_bytes()).unwrap()
}

fn options(server: &RunningServer, registration_id: &str, transport: Transport) -> ProvisionOptions {
    let endpoint = match transport {
        Transport::Https => server.ready.https,
        Transport::Mqtt => server.ready.mqtt.unwrap(),
        Transport::Amqp => server.ready.amqp.unwrap(),
    };
    ProvisionOptions {
        endpoint: endpoint.to_string(),
        server_name: Some("localhost".into()),
        id_scope: SCOPE.into(),
        registration_id: registration_id.into(),
        transport,
        roots: dps_client::tls::certificates(&std::fs::read(server.data_dir.ca_cert()).unwrap()).unwrap(),
        ..ProvisionOptions::default()
    }
}

async fn verify_by_possession(server: &RunningServer, name: &str, ca: &Ca) {
    let svc = service(server);
    svc.upload_certificate(name, &ca.pem, false, None).await.unwrap();
    let code = svc.generate_verification_code(name, None).await.unwrap()["properties"]["verificationCode"]
        .as_str()
        .unwrap()
        .to_owned();
    let proof = leaf_params(&code).signed_by(&KeyPair::generate().unwrap(), &ca.issuer()).unwrap().pem();
    let verified = svc.verify_certificate(name, &proof, None).await.unwrap();
    assert_eq!(verified["properties"]["isVerified"], true);
}

fn hub_device(server: &RunningServer, hub: &str, device_id: &str) -> dps_core::hub::HubDevice {
    server.state.hubs.device(hub, device_id).unwrap_or_else(|| panic!("no {device_id} on {hub}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_device_with_its_chain_provisions_over_https_and_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let root = root("Fleet Root CA");
    let int = intermediate("Fleet Intermediate", &root);
    verify_by_possession(&server, "fleet-root", &root).await;
    let group = json!({"enrollmentGroupId": "fleet",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "fleet-root"}}},
        "initialTwin": {"tags": {"fleet": "x509"}}});
    service(&server).call("PUT", "/enrollmentGroups/fleet", Some(&group), &[]).await.unwrap();

    for (transport, id) in [(Transport::Https, "x509-fleet-https"), (Transport::Mqtt, "x509-fleet-mqtt")] {
        let key = KeyPair::generate().unwrap();
        let leaf = leaf_params(id).signed_by(&key, &int.issuer()).unwrap().pem();
        let mut o = options(&server, id, transport);
        o.auth = Auth::X509;
        o.client_identity = Some(identity(&format!("{leaf}{}", int.pem), &key));
        let done = provision(o).await.unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        assert_eq!(done.device_id, id);
        let x509 = done.registration.x509.clone().expect("registrationState.x509");
        assert_eq!(x509.enrollment_group_id.as_deref(), Some("fleet"));
        assert_eq!(x509.certificate_info.unwrap().subject_name, format!("CN={id}"));
        assert_eq!(x509.signing_certificate_info.unwrap().subject_name, "CN=Fleet Root CA");
        let device = hub_device(&server, &done.assigned_hub, id);
        assert_eq!(device.identity.authentication, HubAuthentication::CertificateAuthority);
        assert_eq!(device.twin.tags, json!({"fleet": "x509"}));
    }

    // Only the leaf (no intermediate): the chain does not reach the verified root. Over MQTT too the
    // refusal is the request's answer (res/401 with 401002 and the reason), not a bare CONNACK 5.
    for transport in [Transport::Https, Transport::Mqtt] {
        let key = KeyPair::generate().unwrap();
        let leaf = leaf_params("x509-leaf-only").signed_by(&key, &int.issuer()).unwrap().pem();
        let mut o = options(&server, "x509-leaf-only", transport);
        o.client_identity = Some(identity(&leaf, &key));
        match provision(o).await {
            Err(dps_client::ProvisionError::Registration(e)) => {
                assert_eq!((e.status, e.code), (401, 401002), "{transport:?}: {}", e.message);
                assert!(e.message.contains("intermediate"), "{}", e.message);
            }
            other => panic!("{transport:?}: expected 401002, got {other:?}"),
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_individual_device_gets_a_thumbprint_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params("x509-single").self_signed(&key).unwrap();
    let enrollment = json!({"registrationId": "x509-single",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert.pem()}}}}});
    service(&server).call("PUT", "/enrollments/x509-single", Some(&enrollment), &[]).await.unwrap();
    let mut o = options(&server, "x509-single", Transport::Mqtt);
    o.client_identity = Some(identity(&cert.pem(), &key));
    let done = provision(o).await.unwrap();
    let thumbprint = dps_core::attest::x509::sha256_thumbprint(cert.der());
    let device = hub_device(&server, &done.assigned_hub, "x509-single");
    assert_eq!(
        device.identity.authentication,
        HubAuthentication::SelfSigned { primary_thumbprint: thumbprint, secondary_thumbprint: None }
    );
    let x509 = done.registration.x509.unwrap();
    assert!(x509.enrollment_group_id.is_none());
    assert_eq!(x509.certificate_info.unwrap().subject_name, "CN=x509-single");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_attests_the_device_on_its_next_registration() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.certificate_issuance = Some(IssuanceConfig {
        key: dps_host::CaKeyKind::P256,
        validity: std::time::Duration::from_secs(86_400),
    });
    let server = start(cfg).await;
    let svc = service(&server);
    // The server registered its issuing CA as a verified CA certificate.
    let issuer = svc.certificate(dps_server::state::ISSUER_CA_NAME).await.unwrap();
    assert_eq!(issuer["properties"]["isVerified"], true);

    // Onboarding: a symmetric-key group; its device sends a CSR.
    let group_key = SymmetricKey::from_bytes(vec![77; 32]);
    let onboarding = json!({"enrollmentGroupId": "onboarding", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key.to_base64(), "secondaryKey": group_key.to_base64()}}});
    svc.call("PUT", "/enrollmentGroups/onboarding", Some(&onboarding), &[]).await.unwrap();
    let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut csr_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    csr_params.distinguished_name.push(DnType::CommonName, "rolling-dev");
    let csr = csr_params.serialize_request(&device_key).unwrap();
    use base64::Engine as _;
    let mut o = options(&server, "rolling-dev", Transport::Https);
    o.auth = Auth::GroupKey(group_key);
    o.csr = Some(base64::engine::general_purpose::STANDARD.encode(csr.der()));
    let first = provision(o).await.unwrap();
    let chain = first.issued_certificate_chain();
    assert_eq!(chain.len(), 2, "leaf and the issuing CA");
    let leaf_info = dps_core::attest::x509::certificate_info(&chain[0]).unwrap();
    assert_eq!(leaf_info.subject_name, "CN=rolling-dev");
    assert_eq!(
        hub_device(&server, &first.assigned_hub, "rolling-dev").identity.authentication,
        HubAuthentication::CertificateAuthority
    );

    // The operator moves the device to a group on the issuing CA; the device registers with its new
    // certificate (a different enrollment: delete the old registration record first, as Azure requires).
    let x509_group = json!({"enrollmentGroupId": "issued", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": dps_server::state::ISSUER_CA_NAME}}}});
    svc.call("PUT", "/enrollmentGroups/issued", Some(&x509_group), &[]).await.unwrap();
    svc.delete_registration("rolling-dev", None).await.unwrap();
    let pem: String = chain
        .iter()
        .map(|der| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> =
                b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
            format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
        })
        .collect();
    let mut o = options(&server, "rolling-dev", Transport::Mqtt);
    o.client_identity = Some(identity(&pem, &device_key));
    let second = provision(o).await.unwrap();
    assert_eq!(second.registration.x509.unwrap().enrollment_group_id.as_deref(), Some("issued"));
    server.shutdown().await.unwrap();
}

/// `provision-device --cert-out/--key-out/--csr-out` gets a certificate issued; `--cert/--key` then
/// provisions with it (over MQTT), as the README shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_device_gets_a_certificate_issued_and_then_provisions_with_it() {
    use clap::Parser;
    use dps_server::cli::{Cli, Command};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.certificate_issuance = Some(IssuanceConfig {
        key: dps_host::CaKeyKind::P384,
        validity: std::time::Duration::from_secs(86_400),
    });
    let server = start(cfg).await;
    let svc = service(&server);
    let group_key = SymmetricKey::from_bytes(vec![78; 32]);
    let onboarding = json!({"enrollmentGroupId": "onboarding", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key.to_base64(), "secondaryKey": group_key.to_base64()}}});
    svc.call("PUT", "/enrollmentGroups/onboarding", Some(&onboarding), &[]).await.unwrap();
    let issued_group = json!({"enrollmentGroupId": "issued", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": dps_server::state::ISSUER_CA_NAME}}}});
    svc.call("PUT", "/enrollmentGroups/issued", Some(&issued_group), &[]).await.unwrap();

    let out = tempfile::tempdir().unwrap();
    let path = |name: &str| out.path().join(name).display().to_string();
    let ca = server.data_dir.ca_cert().display().to_string();
    let https_port = server.ready.https.port().to_string();
    let mqtt_port = server.ready.mqtt.unwrap().port().to_string();
    let run = |args: Vec<String>| async move {
        let cli = Cli::try_parse_from(args).unwrap();
        let Some(Command::ProvisionDevice(a)) = cli.command else { panic!("not provision-device") };
        dps_server::cli::provision_device(&a).await
    };
    let common = |port: &str| {
        [
            "--registration-id",
            "cli-dev",
            "--id-scope",
            SCOPE,
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--ca",
            &ca,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let mut first = vec!["dps-server".to_owned(), "provision-device".to_owned()];
    first.extend(common(&https_port));
    first.extend(["--group-key".into(), group_key.to_base64()]);
    first.extend(["--cert-out".into(), path("chain.pem"), "--key-out".into(), path("key.pem")]);
    first.extend(["--csr-out".into(), path("req.pem")]);
    let result = run(first).await.unwrap();
    assert_eq!(result["status"], "assigned", "{result}");
    let chain = std::fs::read_to_string(path("chain.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(std::fs::read_to_string(path("req.pem")).unwrap().contains("BEGIN CERTIFICATE REQUEST"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path("key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the new private key is private");
    }

    svc.delete_registration("cli-dev", None).await.unwrap();
    let mut second = vec!["dps-server".to_owned(), "provision-device".to_owned()];
    second.extend(common(&mqtt_port));
    second.extend(["--transport".into(), "mqtt".into(), "--cert".into(), path("chain.pem")]);
    second.extend(["--key".into(), path("key.pem")]);
    let result = run(second).await.unwrap();
    assert_eq!(result["status"], "assigned", "{result}");
    assert_eq!(result["x509"]["enrollmentGroupId"], "issued", "{result}");
    server.shutdown().await.unwrap();
}
