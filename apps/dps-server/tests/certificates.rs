//! CA certificates through the server over HTTPS with the admin client: upload → generate a verification
//! code → verify with a proof made by rcgen, then an X.509 group referencing the verified CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use clap::Parser;
use common::*;
use dps_server::admin::CallError;
use dps_server::cli::{CertificateAction, Cli, Command};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;

fn api_error(r: Result<impl std::fmt::Debug, CallError>) -> (u16, u64) {
    match r {
        Err(CallError::Api(e)) => (e.status, e.body["errorCode"].as_u64().unwrap()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_generate_code_and_verify_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let svc = service(&server);

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = params("Test Root CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();

    let uploaded = svc.upload_certificate("test-root", &ca_pem, false, None).await.unwrap();
    assert_eq!(uploaded["properties"]["subject"], "CN=Test Root CA");
    assert_eq!(uploaded["properties"]["isVerified"], false);
    let listed = svc.certificates().await.unwrap();
    assert_eq!(listed["value"].as_array().unwrap().len(), 1);

    // A leaf is not a CA.
    let leaf = params("leaf").self_signed(&KeyPair::generate().unwrap()).unwrap().pem();
    assert_eq!(api_error(svc.upload_certificate("leaf", &leaf, false, None).await), (400, 400009));

    // The client fetches the ETag itself.
    let generated = svc.generate_verification_code("test-root", None).await.unwrap();
    let code = generated["properties"]["verificationCode"].as_str().unwrap().to_owned();
    // A stale ETag is refused.
    let stale = uploaded["etag"].as_str().unwrap();
    assert_eq!(api_error(svc.generate_verification_code("test-root", Some(stale)).await), (412, 412001));

    // The proof: CN = code, signed by the CA's key (what the README's openssl commands make).
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let wrong = params("not-the-code").signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap().pem();
    assert_eq!(api_error(svc.verify_certificate("test-root", &wrong, None).await), (400, 400009));
    let proof = params(&code).signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap().pem();
    let verified = svc.verify_certificate("test-root", &proof, None).await.unwrap();
    assert_eq!(verified["properties"]["isVerified"], true);
    assert_eq!(svc.certificate("TEST-ROOT").await.unwrap()["properties"]["isVerified"], true);

    // An X.509 group may now reference it.
    let group = json!({"enrollmentGroupId": "x509-group",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "test-root"}}}});
    svc.call("PUT", "/enrollmentGroups/x509-group", Some(&group), &[]).await.unwrap();
    let missing = json!({"enrollmentGroupId": "other",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "nope"}}}});
    assert_eq!(
        api_error(svc.call("PUT", "/enrollmentGroups/other", Some(&missing), &[]).await),
        (400, 400004)
    );

    // Delete with the ETag fetched by the client; then it is gone.
    svc.delete_certificate("test-root", None).await.unwrap();
    assert_eq!(api_error(svc.certificate("test-root").await), (404, 404205));
    server.shutdown().await.unwrap();
}

#[test]
fn the_certificate_subcommands_parse() {
    let cli = Cli::try_parse_from([
        "dps-server",
        "certificate",
        "upload",
        "--name",
        "root",
        "--file",
        "ca.pem",
        "--verified",
    ])
    .unwrap();
    match cli.command {
        Some(Command::Certificate { action: CertificateAction::Upload(a) }) => {
            assert_eq!(a.name, "root");
            assert!(a.verified);
        }
        other => panic!("{other:?}"),
    }
    for args in [
        vec!["dps-server", "certificate", "list"],
        vec!["dps-server", "certificate", "show", "--name", "root"],
        vec!["dps-server", "certificate", "delete", "--name", "root", "--etag", "AAAA"],
        vec!["dps-server", "certificate", "generate-code", "--name", "root"],
        vec!["dps-server", "certificate", "verify", "--name", "root", "--file", "proof.pem"],
    ] {
        Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
}
