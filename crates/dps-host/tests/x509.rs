//! X.509 devices and certificate issuance through the host: a self-signed device provisions with its
//! certificate and gets `registrationState.x509`; a device sending a CSR gets a certificate from the local
//! CA (`issuedCertificateChain`, then a hub identity trusting the CA), and every misuse of `csr` gets
//! 400008 with the rule it broke.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dps_core::hub::{HubAuthentication, MemoryHubDirectory};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{IdScope, Timestamp};
use dps_core::{AccessPolicy, EngineConfig, HttpRequest, LinkedHub, Reply, Rights};
use dps_host::{BlockingHost, CaKeyKind, LocalCa};
use dps_store::MemoryStore;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const SCOPE: &str = "0ne0000C5A1";
const HOST: &str = "dps.example.net";
const HUB: &str = "hub-1.example.net";
const PREVIEW: &str = "2025-07-01-preview";

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn config() -> EngineConfig {
    EngineConfig::new(IdScope::parse(SCOPE).unwrap(), HOST, vec![LinkedHub::new(HUB, None, None).unwrap()])
        .with_policy(AccessPolicy {
            key_name: "owner".into(),
            primary_key: key(1),
            secondary_key: key(2),
            rights: Rights::ALL,
        })
}

type TestHost = BlockingHost<MemoryStore, Arc<MemoryHubDirectory>>;

fn host(issuer: Option<Arc<LocalCa>>) -> (TestHost, Arc<MemoryHubDirectory>) {
    let hubs = Arc::new(MemoryHubDirectory::new());
    let mut host = BlockingHost::new(config(), MemoryStore::new(), Arc::clone(&hubs)).unwrap();
    if let Some(issuer) = issuer {
        host = host.with_issuer(issuer).unwrap();
    }
    (host, hubs)
}

fn service_put(path: &str, body: Value) -> HttpRequest {
    HttpRequest {
        method: "PUT".into(),
        path_and_query: format!("{path}?api-version=2021-10-01"),
        authorization: Some(build_token(&key(1), HOST, unix_now() + 600, Some("owner"))),
        body: serde_json::to_vec(&body).unwrap(),
        ..HttpRequest::default()
    }
}

fn body(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn self_signed(cn: &str) -> (Vec<u8>, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.der().to_vec(), cert.pem())
}

/// A device request: with `certificate` as its TLS client certificate, or a SAS of the group key 7.
fn device(
    method: &str,
    path: &str,
    registration_id: &str,
    certificate: Option<&[u8]>,
    api_version: &str,
    body: Value,
) -> HttpRequest {
    let authorization = match certificate {
        Some(_) => None,
        None => {
            let sr = encode_resource(&device_resource(SCOPE, registration_id));
            let k = key(7).derive_device_key(registration_id);
            Some(build_token(&k, &sr, unix_now() + 600, Some("registration")))
        }
    };
    HttpRequest {
        method: method.into(),
        path_and_query: format!("/{SCOPE}/registrations/{registration_id}{path}?api-version={api_version}"),
        authorization,
        client_certificates: certificate.map(|c| vec![c.to_vec()]),
        body: serde_json::to_vec(&body).unwrap(),
        ..HttpRequest::default()
    }
}

fn register_and_poll(
    host: &TestHost,
    request: HttpRequest,
    registration_id: &str,
    cert: Option<&[u8]>,
) -> Value {
    let api_version = request.path_and_query.rsplit('=').next().unwrap().to_owned();
    let r = host.http(request);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let op = body(&r)["operationId"].as_str().unwrap().to_owned();
    let poll = host.http(device(
        "GET",
        &format!("/operations/{op}"),
        registration_id,
        cert,
        &api_version,
        json!(null),
    ));
    assert_eq!(poll.status, 200, "{}", String::from_utf8_lossy(&poll.body));
    body(&poll)
}

fn sym_group() -> Value {
    json!({"enrollmentGroupId": "g1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(7).to_base64(), "secondaryKey": key(8).to_base64()}}})
}

fn csr_for(cn: &str) -> String {
    csr_with(cn, &rcgen::PKCS_ECDSA_P384_SHA384)
}

fn csr_with(cn: &str, alg: &'static rcgen::SignatureAlgorithm) -> String {
    use base64::Engine as _;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let csr = params.serialize_request(&key).unwrap();
    base64::engine::general_purpose::STANDARD.encode(csr.der())
}

fn local_ca() -> Arc<LocalCa> {
    let now = Timestamp::from_unix_seconds(unix_now());
    Arc::new(LocalCa::generate("test-issuer", CaKeyKind::P384, Duration::from_secs(86_400), now).unwrap())
}

#[test]
fn a_self_signed_device_provisions_with_its_certificate_and_gets_the_x509_result_and_a_thumbprint_identity() {
    let (host, hubs) = host(None);
    let (der, pem) = self_signed("x509-dev-1");
    let info = dps_core::attest::x509::certificate_info(&der).unwrap();
    let enrollment = json!({"registrationId": "x509-dev-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
    let put = host.http(service_put("/enrollments/x509-dev-1", enrollment));
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));

    let request = device(
        "PUT",
        "/register",
        "x509-dev-1",
        Some(&der),
        "2021-10-01",
        json!({"registrationId": "x509-dev-1"}),
    );
    let done = register_and_poll(&host, request, "x509-dev-1", Some(&der));
    assert_eq!(done["status"], "assigned", "{done}");
    let state = &done["registrationState"];
    assert_eq!(state["deviceId"], "x509-dev-1");
    assert!(state.get("symmetricKey").is_none(), "{state}");
    let cert_info = &state["x509"]["certificateInfo"];
    for field in [
        "subjectName",
        "sha1Thumbprint",
        "sha256Thumbprint",
        "issuerName",
        "notBeforeUtc",
        "notAfterUtc",
        "serialNumber",
        "version",
    ] {
        assert!(cert_info.get(field).is_some(), "certificateInfo lacks {field}: {cert_info}");
    }
    assert_eq!(cert_info["sha256Thumbprint"], info.sha256_thumbprint);
    let identity = hubs.device(HUB, "x509-dev-1").unwrap().identity;
    assert_eq!(
        identity.authentication,
        HubAuthentication::SelfSigned {
            primary_thumbprint: info.sha256_thumbprint.clone(),
            secondary_thumbprint: None
        }
    );

    // A poll with the registration's own certificate is answered (without a second chain validation);
    // a poll with another certificate of the same name is attested in full and refused.
    let (other, _) = self_signed("x509-dev-1");
    let op = done["operationId"].as_str().unwrap();
    let own = host.http(device(
        "GET",
        &format!("/operations/{op}"),
        "x509-dev-1",
        Some(&der),
        "2021-10-01",
        json!(null),
    ));
    assert_eq!(own.status, 200);
    let foreign = host.http(device(
        "GET",
        &format!("/operations/{op}"),
        "x509-dev-1",
        Some(&other),
        "2021-10-01",
        json!(null),
    ));
    assert_eq!(body(&foreign)["errorCode"], 401002, "{}", body(&foreign));
    // Another device's certificate, and a certificate whose CN is not the registration ID, are refused.
    let r = host.http(device("PUT", "/register", "x509-dev-1", Some(&other), "2021-10-01", json!({})));
    assert_eq!(
        (r.status, body(&r)["errorCode"].as_u64()),
        (401, Some(401002)),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = host.http(device("PUT", "/register", "someone-else", Some(&der), "2021-10-01", json!({})));
    assert_eq!(body(&r)["errorCode"], 401002);
    assert!(body(&r)["message"].as_str().unwrap().contains("someone-else"), "{}", body(&r));
}

#[test]
fn a_csr_is_answered_with_an_issued_chain_and_the_hub_identity_trusts_the_issuing_ca() {
    let ca = local_ca();
    let (host, hubs) = host(Some(Arc::clone(&ca)));
    assert_eq!(host.http(service_put("/enrollmentGroups/g1", sym_group())).status, 200);

    let request = device(
        "PUT",
        "/register",
        "csr-dev-1",
        None,
        PREVIEW,
        json!({"registrationId": "csr-dev-1", "csr": csr_for("csr-dev-1")}),
    );
    let done = register_and_poll(&host, request, "csr-dev-1", None);
    assert_eq!(done["status"], "assigned", "{done}");
    let chain = done["registrationState"]["issuedCertificateChain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "leaf and the issuing CA");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let leaf = b64.decode(chain[0].as_str().unwrap()).unwrap();
    let root = b64.decode(chain[1].as_str().unwrap()).unwrap();
    assert_eq!(root, ca.certificate_der());
    let leaf_info = dps_core::attest::x509::certificate_info(&leaf).unwrap();
    assert_eq!(leaf_info.subject_name, "CN=csr-dev-1");
    assert_eq!(leaf_info.issuer_name, "CN=test-issuer");
    // The issued certificate verifies against the CA (a real path validation, EKU clientAuth).
    let anchor = webpki_anchor(&root);
    let ee = rustls_pki_types::CertificateDer::from(leaf.as_slice());
    let cert = webpki::EndEntityCert::try_from(&ee).unwrap();
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        hubs.device(HUB, "csr-dev-1").unwrap().identity.authentication,
        HubAuthentication::CertificateAuthority
    );

    // A status lookup does not repeat the chain, and may not carry a csr itself.
    let lookup =
        host.http(device("POST", "", "csr-dev-1", None, PREVIEW, json!({"registrationId": "csr-dev-1"})));
    assert_eq!(lookup.status, 200, "{}", String::from_utf8_lossy(&lookup.body));
    assert!(body(&lookup).get("issuedCertificateChain").is_none(), "{}", body(&lookup));
    let lookup =
        host.http(device("POST", "", "csr-dev-1", None, PREVIEW, json!({"csr": csr_for("csr-dev-1")})));
    assert_eq!(body(&lookup)["errorCode"], 400008);
    assert!(body(&lookup)["message"].as_str().unwrap().contains("status lookup"), "{}", body(&lookup));
}

fn webpki_anchor(der: &[u8]) -> rustls_pki_types::TrustAnchor<'static> {
    let der = rustls_pki_types::CertificateDer::from(der.to_vec());
    webpki::anchor_from_trusted_cert(&der).unwrap().to_owned()
}

#[test]
fn p256_and_rsa_csrs_are_certified_too() {
    let (host, _) = host(Some(local_ca()));
    assert_eq!(host.http(service_put("/enrollmentGroups/g1", sym_group())).status, 200);
    for (id, alg) in [("csr-p256", &rcgen::PKCS_ECDSA_P256_SHA256), ("csr-rsa", &rcgen::PKCS_RSA_SHA256)] {
        let request = device(
            "PUT",
            "/register",
            id,
            None,
            PREVIEW,
            json!({"registrationId": id, "csr": csr_with(id, alg)}),
        );
        let done = register_and_poll(&host, request, id, None);
        assert_eq!(done["status"], "assigned", "{id}: {done}");
        assert_eq!(done["registrationState"]["issuedCertificateChain"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn every_misuse_of_csr_gets_400008_naming_the_rule() {
    let refused = |host: &TestHost, api: &str, csr: String, id: &str| {
        let r =
            host.http(device("PUT", "/register", id, None, api, json!({"registrationId": id, "csr": csr})));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let b = body(&r);
        assert_eq!(b["errorCode"], 400008, "{b}");
        b["message"].as_str().unwrap().to_owned()
    };
    let (plain, _) = host(None);
    assert_eq!(plain.http(service_put("/enrollmentGroups/g1", sym_group())).status, 200);
    assert!(refused(&plain, PREVIEW, csr_for("dev-a"), "dev-a").contains("not configured"));
    let (issuing, hubs) = host(Some(local_ca()));
    assert_eq!(issuing.http(service_put("/enrollmentGroups/g1", sym_group())).status, 200);
    assert!(refused(&issuing, "2021-10-01", csr_for("dev-a"), "dev-a").contains("2025-07-01-preview"));
    assert!(refused(&issuing, PREVIEW, csr_for("someone-else"), "dev-a").contains("someone-else"));
    assert!(refused(&issuing, PREVIEW, "not base64!".into(), "dev-a").to_lowercase().contains("base64"));
    assert!(hubs.devices().is_empty(), "nothing was provisioned");
}
