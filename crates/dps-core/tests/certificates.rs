//! The CA-certificate registry over the service API: upload, generate a verification code, prove
//! possession, and every refusal; and X.509 enrollment validation on write (caReferences, certificate
//! text, info filled in).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::{IdScope, IfMatch, Timestamp};
use dps_core::{
    run_blocking, AccessPolicy, Engine, EngineConfig, LinkedHub, Principal, Reply, Rights, ServiceCommand,
};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};

const NOW: i64 = 1_700_000_000;

struct Rig {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
    now: Timestamp,
}

impl Rig {
    fn new(max_ca_certificates: usize) -> Rig {
        let hubs = vec![LinkedHub::new("hub.example.net", None, None).unwrap()];
        let k = SymmetricKey::from_bytes(vec![1; 32]);
        let mut config = EngineConfig::new(IdScope::parse("0ne00000001").unwrap(), "dps.example.net", hubs)
            .with_policy(AccessPolicy {
                key_name: "owner".into(),
                primary_key: k.clone(),
                secondary_key: k.clone(),
                rights: Rights::ALL,
            })
            .with_policy(AccessPolicy {
                key_name: "enrollments".into(),
                primary_key: k.clone(),
                secondary_key: k,
                rights: Rights::ENROLLMENT_READ.union(Rights::ENROLLMENT_WRITE),
            });
        config.max_ca_certificates = max_ca_certificates;
        Rig {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: ChaCha8Rng::seed_from_u64(7),
            now: Timestamp::from_unix_seconds(NOW),
        }
    }

    fn http_as(
        &mut self,
        policy: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Reply {
        let expiry = self.now.unix_seconds() + 60;
        let request = common::service_request(policy, method, path, body.as_ref(), if_match, expiry);
        let mut flow = self.engine.http(self.now, &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn http(&mut self, method: &str, path: &str, body: Option<Value>, if_match: Option<&str>) -> Reply {
        self.http_as("owner", method, path, body, if_match)
    }

    fn upload(&mut self, name: &str, pem: &str, verified: bool) -> Reply {
        let body = json!({"properties": {"certificate": pem, "isVerified": verified}});
        self.http("PUT", &format!("/certificates/{name}"), Some(body), None)
    }
}

struct Ca {
    pem: String,
    params: CertificateParams,
    key: KeyPair,
}

fn ca(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { pem, params, key }
}

fn leaf_pem(cn: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.self_signed(&key).unwrap().pem()
}

fn proof(ca: &Ca, cn: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.signed_by(&key, &Issuer::from_params(&ca.params, &ca.key)).unwrap().pem()
}

fn body(r: &Reply) -> Value {
    r.body_json().unwrap()
}

fn code(r: &Reply) -> u32 {
    body(r)["errorCode"].as_u64().unwrap() as u32
}

#[test]
fn upload_generate_code_verify_then_list_and_delete() {
    let mut rig = Rig::new(25);
    let root = ca("Contoso Root");
    let up = rig.upload("Root-1", &root.pem, false);
    assert_eq!(up.status, 200, "{:?}", body(&up));
    let v = body(&up);
    assert_eq!(v["name"], "Root-1");
    assert_eq!(v["type"], "Microsoft.Devices/provisioningServices/Certificates");
    assert_eq!(v["properties"]["subject"], "CN=Contoso Root");
    assert_eq!(v["properties"]["isVerified"], false);
    assert!(v["properties"]["expiry"].as_str().unwrap().ends_with(" GMT"));
    assert_eq!(v["properties"]["created"], "Tue, 14 Nov 2023 22:13:20 GMT");
    let thumbprint = v["properties"]["thumbprint"].as_str().unwrap();
    assert_eq!(thumbprint.len(), 40);
    assert_eq!(thumbprint, thumbprint.to_ascii_uppercase());
    let der =
        base64::engine::general_purpose::STANDARD.decode(v["properties"]["certificate"].as_str().unwrap());
    assert!(der.is_ok());
    assert!(v["properties"].get("verificationCode").is_none());
    let etag = v["etag"].as_str().unwrap().to_owned();
    assert_eq!(up.header("etag"), Some(format!("\"{etag}\"").as_str()));

    // Generate a code: needs If-Match, refuses a stale one.
    let path = "/certificates/root-1/generateVerificationCode";
    assert_eq!(rig.http("POST", path, None, None).status, 412);
    assert_eq!(rig.http("POST", path, None, Some("\"stale\"")).status, 412);
    let gen = rig.http("POST", path, None, Some(&etag));
    assert_eq!(gen.status, 200, "{:?}", body(&gen));
    let g = body(&gen);
    let code1 = g["properties"]["verificationCode"].as_str().unwrap().to_owned();
    assert!(code1.len() >= 32);
    let etag2 = g["etag"].as_str().unwrap().to_owned();
    assert_ne!(etag2, etag);
    // Again: a new code and ETag, the old ETag is now stale.
    assert_eq!(rig.http("POST", path, None, Some(&etag)).status, 412);
    let gen = rig.http("POST", path, None, Some("*"));
    let code2 = body(&gen)["properties"]["verificationCode"].as_str().unwrap().to_owned();
    assert_ne!(code1, code2);
    let etag3 = body(&gen)["etag"].as_str().unwrap().to_owned();
    // GET does not show the code.
    let got = rig.http("GET", "/certificates/ROOT-1", None, None);
    assert_eq!(got.status, 200);
    assert!(body(&got)["properties"].get("verificationCode").is_none());

    // A proof with the superseded code is refused; with the current one it verifies.
    let verify = "/certificates/Root-1/verify";
    let old = rig.http("POST", verify, Some(json!({"certificate": proof(&root, &code1)})), Some(&etag3));
    assert_eq!(old.status, 400);
    assert_eq!(code(&old), 400009);
    assert!(body(&old)["message"].as_str().unwrap().contains("subject CN"), "{:?}", body(&old));
    let ok = rig.http("POST", verify, Some(json!({"certificate": proof(&root, &code2)})), Some(&etag3));
    assert_eq!(ok.status, 200, "{:?}", body(&ok));
    assert_eq!(body(&ok)["properties"]["isVerified"], true);
    let etag4 = body(&ok)["etag"].as_str().unwrap().to_owned();
    // The code is spent: verifying again needs a new one.
    let again = rig.http("POST", verify, Some(json!({"certificate": proof(&root, &code2)})), Some(&etag4));
    assert_eq!(code(&again), 400009);
    assert!(body(&again)["message"].as_str().unwrap().contains("generate one first"));

    // Replacing keeps created, resets isVerified to the request's value.
    rig.now = Timestamp::from_unix_seconds(NOW + 86_400);
    let replaced = rig.upload("root-1", &root.pem, false);
    assert_eq!(replaced.status, 200);
    assert_eq!(body(&replaced)["properties"]["isVerified"], false);
    assert_eq!(body(&replaced)["properties"]["created"], "Tue, 14 Nov 2023 22:13:20 GMT");
    assert_eq!(body(&replaced)["properties"]["updated"], "Wed, 15 Nov 2023 22:13:20 GMT");
    let etag5 = body(&replaced)["etag"].as_str().unwrap().to_owned();

    // Verified on upload, flat body form.
    let other = ca("Other");
    let flat = rig.http(
        "PUT",
        "/certificates/another",
        Some(json!({"certificate": other.pem, "isVerified": true})),
        None,
    );
    assert_eq!(body(&flat)["properties"]["isVerified"], true);
    let list = rig.http("GET", "/certificates", None, None);
    assert_eq!(list.status, 200);
    let names: Vec<_> = body(&list)["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["another", "Root-1"]);

    // Delete: stale ETag 412, right ETag 204, then 404205.
    assert_eq!(rig.http("DELETE", "/certificates/root-1", None, Some(&etag4)).status, 412);
    assert_eq!(rig.http("DELETE", "/certificates/root-1", None, Some(&etag5)).status, 204);
    let gone = rig.http("GET", "/certificates/root-1", None, None);
    assert_eq!((gone.status, code(&gone)), (404, 404205));
    assert_eq!(rig.http("DELETE", "/certificates/another", None, Some("*")).status, 204);
}

#[test]
fn uploads_that_are_refused() {
    let mut rig = Rig::new(2);
    let leaf = rig.upload("leaf", &leaf_pem("dev"), false);
    assert_eq!((leaf.status, code(&leaf)), (400, 400009));
    assert!(body(&leaf)["message"].as_str().unwrap().contains("basicConstraints"));
    let garbage = rig.upload("junk", "not a certificate", false);
    assert_eq!(code(&garbage), 400009);
    let bad_name = rig.upload("has%20space", &ca("x").pem, false);
    assert_eq!(code(&bad_name), 400002);
    let no_cert = rig.http("PUT", "/certificates/x", Some(json!({"properties": {}})), None);
    assert_eq!(code(&no_cert), 400009);
    let not_object = rig.http("PUT", "/certificates/x", Some(json!(["cert"])), None);
    assert_eq!(code(&not_object), 400001);

    // The limit (2 here): a third is refused, replacing one is not.
    assert_eq!(rig.upload("a", &ca("a").pem, false).status, 200);
    assert_eq!(rig.upload("b", &ca("b").pem, false).status, 200);
    let over = rig.upload("c", &ca("c").pem, false);
    assert_eq!((over.status, code(&over)), (403, 403002));
    assert_eq!(rig.upload("B", &ca("b2").pem, true).status, 200);
    // If-Match on an absent certificate.
    let body = json!({"properties": {"certificate": ca("z").pem}});
    let absent = rig.http("PUT", "/certificates/zz", Some(body), Some("*"));
    assert_eq!(code(&absent), 404205);
    // Unknown certificates.
    let missing = rig.http("POST", "/certificates/nope/generateVerificationCode", None, Some("*"));
    assert_eq!(code(&missing), 404205);
}

#[test]
fn proofs_that_are_refused() {
    let mut rig = Rig::new(25);
    let root = ca("Root");
    rig.upload("root", &root.pem, false);
    let gen = rig.http("POST", "/certificates/root/generateVerificationCode", None, Some("*"));
    let code_value = body(&gen)["properties"]["verificationCode"].as_str().unwrap().to_owned();
    let verify = |rig: &mut Rig, cert: String| {
        rig.http("POST", "/certificates/root/verify", Some(json!({"certificate": cert})), Some("*"))
    };
    // Signed by another key with the same subject name.
    let impostor = ca("Root");
    let r = verify(&mut rig, proof(&impostor, &code_value));
    assert_eq!(code(&r), 400009);
    assert!(body(&r)["message"].as_str().unwrap().contains("not signed by the CA"), "{:?}", body(&r));
    // Issued by another CA.
    let r = verify(&mut rig, proof(&ca("Other"), &code_value));
    assert!(body(&r)["message"].as_str().unwrap().contains("issuer"));
    // Garbage.
    let r = verify(&mut rig, "garbage".into());
    assert_eq!(code(&r), 400009);
    // Stale If-Match.
    let r = rig.http(
        "POST",
        "/certificates/root/verify",
        Some(json!({"certificate": proof(&root, &code_value)})),
        Some("\"stale\""),
    );
    assert_eq!(r.status, 412);
    // None of that verified it.
    let got = rig.http("GET", "/certificates/root", None, None);
    assert_eq!(body(&got)["properties"]["isVerified"], false);
    assert_eq!(verify(&mut rig, proof(&root, &code_value)).status, 200);
}

#[test]
fn certificate_operations_need_service_config() {
    let mut rig = Rig::new(25);
    let r = rig.http_as("enrollments", "GET", "/certificates", None, None);
    assert_eq!((r.status, code(&r)), (403, 403001));
    let r = rig.http_as(
        "enrollments",
        "PUT",
        "/certificates/root",
        Some(json!({"certificate": ca("r").pem})),
        None,
    );
    assert_eq!(code(&r), 403001);
    // The typed command, granted in-process without the right.
    let principal = Principal::granted("embedder", Rights::ENROLLMENT_WRITE);
    let command = ServiceCommand::GenerateVerificationCode { name: "root".into(), if_match: IfMatch::Any };
    assert!(!principal.allows(&command));
    let mut flow = rig.engine.command(rig.now, &mut rig.rng, &principal, command);
    let r = run_blocking(&mut flow, &rig.store, &rig.hubs);
    assert_eq!(code(&r), 403001);
    // With it, the typed command works like the HTTP one.
    let admin = Principal::granted("embedder", Rights::SERVICE_CONFIG);
    let put = ServiceCommand::PutCertificate {
        name: "root".into(),
        certificate_text: ca("r").pem,
        is_verified: true,
        if_match: None,
    };
    let mut flow = rig.engine.command(rig.now, &mut rig.rng, &admin, put);
    let r = run_blocking(&mut flow, &rig.store, &rig.hubs);
    assert_eq!(r.status, 200);
    assert!(r.meter.is_none(), "certificate operations are not billable");
    let mut flow = rig.engine.command(rig.now, &mut rig.rng, &admin, ServiceCommand::ListCertificates);
    assert_eq!(body(&run_blocking(&mut flow, &rig.store, &rig.hubs))["value"].as_array().unwrap().len(), 1);
}

#[test]
fn x509_enrollments_are_validated_and_get_info() {
    let mut rig = Rig::new(25);
    let root = ca("Root");
    let device = leaf_pem("dev-1");

    // An individual enrollment with a client certificate: info filled in, GET hides the text, the
    // attestation mechanism keeps it.
    let e = json!({"registrationId": "dev-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": device}}}}});
    let put = rig.http("PUT", "/enrollments/dev-1", Some(e), None);
    assert_eq!(put.status, 200, "{:?}", body(&put));
    let info = &body(&put)["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    assert_eq!(info["subjectName"], "CN=dev-1");
    assert_eq!(info["version"], 3);
    let got = rig.http("GET", "/enrollments/dev-1", None, None);
    let primary = &body(&got)["attestation"]["x509"]["clientCertificates"]["primary"];
    assert!(primary.get("certificate").is_none());
    assert_eq!(primary["info"]["subjectName"], "CN=dev-1");
    let att = rig.http("POST", "/enrollments/dev-1/attestationmechanism", None, None);
    assert_eq!(body(&att)["x509"]["clientCertificates"]["primary"]["certificate"], device);

    // Refusals name the field.
    let bad = json!({"registrationId": "dev-2", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": "AAAA"}}}}});
    let r = rig.http("PUT", "/enrollments/dev-2", Some(bad), None);
    assert_eq!(code(&r), 400004);
    let message = body(&r)["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(
            "attestation.x509.clientCertificates.primary.certificate: the certificate is not valid DER X.509"
        ),
        "{message}"
    );
    let none = json!({"registrationId": "dev-2", "attestation": {"type": "x509", "x509": {}}});
    let r = rig.http("PUT", "/enrollments/dev-2", Some(none), None);
    assert!(body(&r)["message"].as_str().unwrap().contains("needs clientCertificates or caReferences"));
    let group_without = json!({"enrollmentGroupId": "g", "attestation": {"type": "x509", "x509": {}}});
    let r = rig.http("PUT", "/enrollmentGroups/g", Some(group_without), None);
    assert!(body(&r)["message"].as_str().unwrap().contains("needs signingCertificates or caReferences"));
    let secondary_bad = json!({"enrollmentGroupId": "g", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem}, "secondary": {"certificate": "!!"}}}}});
    let r = rig.http("PUT", "/enrollmentGroups/g", Some(secondary_bad), None);
    assert!(body(&r)["message"]
        .as_str()
        .unwrap()
        .starts_with("attestation.x509.signingCertificates.secondary.certificate:"));

    // caReferences must name an uploaded certificate at write time.
    let by_ref = json!({"enrollmentGroupId": "g", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": "root"}}}});
    let r = rig.http("PUT", "/enrollmentGroups/g", Some(by_ref.clone()), None);
    assert_eq!(code(&r), 400004);
    assert_eq!(
        body(&r)["message"],
        "attestation.x509.caReferences.primary names no uploaded CA certificate 'root'"
    );
    rig.upload("Root", &root.pem, true);
    let r = rig.http("PUT", "/enrollmentGroups/g", Some(by_ref), None);
    assert_eq!(r.status, 200, "{:?}", body(&r));
    // In bulk too.
    let bulk = json!({"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": "g2",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "root", "secondary": "gone"}}}}]});
    let r = rig.http("POST", "/enrollmentGroups", Some(bulk), None);
    assert_eq!(code(&r), 400004);
    assert!(body(&r)["message"]
        .as_str()
        .unwrap()
        .contains("caReferences.secondary names no uploaded CA certificate 'gone'"));

    // A group with a signing certificate gets its info.
    let signing = json!({"enrollmentGroupId": "g3", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem}}}}});
    let r = rig.http("PUT", "/enrollmentGroups/g3", Some(signing), None);
    assert_eq!(
        body(&r)["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"],
        "CN=Root"
    );
}
