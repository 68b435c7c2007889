//! Test PKIs generated with rcgen: root → intermediate1 → intermediate2 → leaf, in RSA-2048, ECDSA P-256
//! and ECDSA P-384 variants, plus enrollment and uploaded-certificate builders.

use dps_proto::certificate::CaCertificate;
use dps_proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_proto::{Etag, Timestamp};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// A moment inside every generated certificate's validity (2023-11-14).
pub(crate) const NOW: i64 = 1_700_000_000;

/// A self-signed RSA-1024 device certificate (CN `dev-rsa1024`, clientAuth), made once with OpenSSL for
/// the "key too small" test (rcgen cannot generate RSA keys under 2048 bits).
pub(crate) const RSA1024_PEM: &str = "
-----BEGIN CERTIFICATE-----
MIICGjCCAYOgAwIBAgIUPIC+A8brwY1wexR393pnMeVfaO4wDQYJKoZIhvcNAQEL
BQAwFjEUMBIGA1UEAwwLZGV2LXJzYTEwMjQwHhcNMjYxMjAyMDMyNjIzWhcNNDYx
MTI3MDMyNjIzWjAWMRQwEgYDVQQDDAtkZXYtcnNhMTAyNDCBnzANBgkqhkiG9w0B
AQEFAAOBjQAwgYkCgYEAwGaJ2Kxrs4Hd8yw7JJPV4Zxs5zuhLggk3JfTvSgIuUhb
5kg1DI5tCptLofZtq9DGhHtbeJG+k1OPwS7r1odCes23SvnIV+HwjuZnbokw2gRi
Bc+JUv3g12ntQTOs0idyJpbBxokGWNlyCMOt10I6oEHWHTy6/zWrIekBFFxQ0scC
AwEAAaNlMGMwHQYDVR0OBBYEFOfAH5X4kk2NbqsW43ZJ+UQtAHUoMB8GA1UdIwQY
MBaAFOfAH5X4kk2NbqsW43ZJ+UQtAHUoMBMGA1UdJQQMMAoGCCsGAQUFBwMCMAwG
A1UdEwEB/wQCMAAwDQYJKoZIhvcNAQELBQADgYEABfCOcJPotVNGfxW+kvGKIxMz
18daj+JAbA38Kk1ElSwCdwllEbVv0eH1HOn7TL6F6wRLz06TtTo3PJl/W41biR64
0jwG2Yn4tpagjc7bFkw0yS9hQP7iyZSjCmhJ6FmLaB/cAX1w2m5qSL2F+rJeKPcs
gme4xuZBZQw9oyT4b/w=
-----END CERTIFICATE-----
";

/// A key algorithm for a generated PKI.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alg {
    Rsa2048,
    P256,
    P384,
    Ed25519,
}

pub(crate) fn key(alg: Alg) -> KeyPair {
    match alg {
        Alg::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap(),
        Alg::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        Alg::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        Alg::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
    }
}

/// Parameters with a CN, valid 2020-01-01 to 2040-01-01.
pub(crate) fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2040, 1, 1);
    p
}

/// CA parameters (basicConstraints CA, keyCertSign).
pub(crate) fn ca_params(cn: &str) -> CertificateParams {
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// Device parameters (EKU clientAuth).
pub(crate) fn leaf_params(cn: &str) -> CertificateParams {
    let mut p = params(cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A CA (or any issuer) with its certificate.
pub(crate) struct Ca {
    pub(crate) der: Vec<u8>,
    pub(crate) pem: String,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

/// Issues a certificate from `params` for a new `alg` key, signed by `by` (self-signed when `None`).
pub(crate) fn issue(params: CertificateParams, alg: Alg, by: Option<&Ca>) -> Ca {
    let k = key(alg);
    let cert = match by {
        Some(ca) => params.signed_by(&k, &ca.issuer).unwrap(),
        None => params.self_signed(&k).unwrap(),
    };
    Ca { der: cert.der().to_vec(), pem: cert.pem(), issuer: Issuer::new(params, k) }
}

/// root → intermediate1 → intermediate2, and devices issued by intermediate2.
pub(crate) struct Pki {
    pub(crate) alg: Alg,
    pub(crate) root: Ca,
    pub(crate) int1: Ca,
    pub(crate) int2: Ca,
}

impl Pki {
    pub(crate) fn new(alg: Alg, tag: &str) -> Pki {
        let root = issue(ca_params(&format!("{tag} root")), alg, None);
        let int1 = issue(ca_params(&format!("{tag} intermediate1")), alg, Some(&root));
        let int2 = issue(ca_params(&format!("{tag} intermediate2")), alg, Some(&int1));
        Pki { alg, root, int1, int2 }
    }

    /// A device certificate issued by intermediate2.
    pub(crate) fn device(&self, cn: &str) -> Vec<u8> {
        issue(leaf_params(cn), self.alg, Some(&self.int2)).der
    }

    /// The full chain a well-behaved device sends: leaf, intermediate2, intermediate1 (no root).
    pub(crate) fn chain(&self, leaf: &[u8]) -> Vec<Vec<u8>> {
        vec![leaf.to_vec(), self.int2.der.clone(), self.int1.der.clone()]
    }
}

/// An uploaded CA certificate.
pub(crate) fn uploaded(name: &str, der: &[u8], verified: bool) -> CaCertificate {
    CaCertificate {
        name: name.into(),
        der: der.to_vec(),
        is_verified: verified,
        verification_code: None,
        created: Timestamp::from_unix_seconds(NOW),
        updated: Timestamp::from_unix_seconds(NOW),
        etag: Etag::parse("\"1\"").unwrap(),
    }
}

fn status(disabled: bool) -> &'static str {
    if disabled {
        "disabled"
    } else {
        "enabled"
    }
}

/// An individual X.509 enrollment with client certificates (PEM).
pub(crate) fn individual_certs(
    id: &str,
    primary: &str,
    secondary: Option<&str>,
    disabled: bool,
) -> IndividualEnrollment {
    let mut certs = serde_json::json!({"primary": {"certificate": primary}});
    if let Some(s) = secondary {
        certs["secondary"] = serde_json::json!({"certificate": s});
    }
    serde_json::from_value(serde_json::json!({
        "registrationId": id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": certs}},
        "provisioningStatus": status(disabled),
    }))
    .unwrap()
}

/// An individual X.509 enrollment with CA references.
pub(crate) fn individual_refs(id: &str, primary: &str, disabled: bool) -> IndividualEnrollment {
    serde_json::from_value(serde_json::json!({
        "registrationId": id,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": primary}}},
        "provisioningStatus": status(disabled),
    }))
    .unwrap()
}

/// An individual symmetric-key enrollment.
pub(crate) fn individual_sas(id: &str, disabled: bool) -> IndividualEnrollment {
    serde_json::from_value(serde_json::json!({
        "registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "secondaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
        "provisioningStatus": status(disabled),
    }))
    .unwrap()
}

/// An X.509 group with an inline signing certificate (PEM).
pub(crate) fn group_inline(id: &str, pem: &str, disabled: bool) -> EnrollmentGroup {
    serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pem}}}},
        "provisioningStatus": status(disabled),
    }))
    .unwrap()
}

/// An X.509 group referencing an uploaded certificate.
pub(crate) fn group_ref(id: &str, name: &str, disabled: bool) -> EnrollmentGroup {
    serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": name}}},
        "provisioningStatus": status(disabled),
    }))
    .unwrap()
}
