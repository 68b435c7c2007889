//! CA certificates of the instance: what an uploaded CA must be, and proof of possession of its private key
//! (spec §5.7, §7.3).
//!
//! Proof of possession: the service hands out a verification code; the operator signs, with the CA's
//! private key, a certificate whose subject CN is that code, and uploads it. Verification certificates may
//! carry any extended key usage (openssl's defaults, none at all, ...), so the signature is checked
//! directly, with the `rustls-webpki` (aws-lc-rs) algorithm that matches both the proof's signature
//! algorithm and the CA's public-key algorithm, instead of through a path validation that would also
//! impose a key usage.

use super::certinfo::{common_name, parse_der, validity};
use der::{Decode, Encode};
use dps_proto::Timestamp;
use rustls_pki_types::SignatureVerificationAlgorithm;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

/// Clock skew allowed around a verification certificate's validity, in seconds.
const SKEW_SECS: i64 = 5 * 60;

/// Checks that `der` can be an instance CA certificate: an X.509 v3 certificate whose basicConstraints
/// extension says `cA = true`. The error names the failed rule.
pub fn check_ca_certificate(der: &[u8]) -> Result<(), String> {
    let cert = parse_der(der)?;
    if cert.tbs_certificate.version != x509_cert::certificate::Version::V3 {
        return Err("the certificate is not an X.509 v3 certificate, so it cannot carry basicConstraints and cannot be a CA".into());
    }
    let constraints = cert
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_BASIC_CONSTRAINTS)
        .ok_or("the certificate has no basicConstraints extension, so it is not a CA certificate")?;
    let constraints = x509_cert::ext::pkix::BasicConstraints::from_der(constraints.extn_value.as_bytes())
        .map_err(|e| format!("the certificate's basicConstraints extension is not valid: {e}"))?;
    if !constraints.ca {
        return Err("the certificate's basicConstraints say cA=false: it is not a CA certificate".into());
    }
    Ok(())
}

/// Verifies a proof of possession of the private key of the CA certificate `ca_der`: `proof_der` must
/// have the subject CN `verification_code`, be issued by the CA's subject name, be signed by the CA's key,
/// and be valid at `now` (five minutes of skew either side). The error names the failed rule.
pub fn verify_proof_of_possession(
    ca_der: &[u8],
    proof_der: &[u8],
    verification_code: &str,
    now: Timestamp,
) -> Result<(), String> {
    let ca = parse_der(ca_der).map_err(|e| format!("the stored CA certificate: {e}"))?;
    let proof = parse_der(proof_der).map_err(|e| format!("the verification certificate: {e}"))?;
    match common_name(&proof) {
        Some(cn) if cn == verification_code => {}
        Some(cn) => {
            return Err(format!(
                "the verification certificate's subject CN is '{cn}', not the verification code"
            ))
        }
        None => {
            return Err(
                "the verification certificate's subject has no CN (it must be the verification code)".into()
            )
        }
    }
    if proof.tbs_certificate.issuer != ca.tbs_certificate.subject {
        return Err(format!(
            "the verification certificate's issuer '{}' is not the CA certificate's subject '{}'",
            proof.tbs_certificate.issuer, ca.tbs_certificate.subject
        ));
    }
    verify_signature(&ca, &proof)?;
    let (not_before, not_after) = validity(&proof);
    let now_secs = now.unix_seconds();
    if now_secs.saturating_add(SKEW_SECS) < not_before.unix_seconds() {
        return Err(format!(
            "the verification certificate is not valid yet (notBefore {})",
            not_before.to_iso()
        ));
    }
    if now_secs.saturating_sub(SKEW_SECS) > not_after.unix_seconds() {
        return Err(format!("the verification certificate has expired (notAfter {})", not_after.to_iso()));
    }
    Ok(())
}

/// The contents of an AlgorithmIdentifier SEQUENCE (OID then parameters), as `rustls-pki-types` compares
/// them.
fn algorithm_id_contents(alg: &AlgorithmIdentifierOwned) -> Result<Vec<u8>, String> {
    let mut out = alg.oid.to_der().map_err(|e| format!("encoding an algorithm identifier: {e}"))?;
    if let Some(params) = &alg.parameters {
        out.extend(params.to_der().map_err(|e| format!("encoding algorithm parameters: {e}"))?);
    }
    Ok(out)
}

/// Checks `cert`'s signature with `issuer`'s public key.
fn verify_signature(issuer: &Certificate, cert: &Certificate) -> Result<(), String> {
    let spki = &issuer.tbs_certificate.subject_public_key_info;
    let key_alg = algorithm_id_contents(&spki.algorithm)?;
    let sig_alg = algorithm_id_contents(&cert.signature_algorithm)?;
    if cert.signature_algorithm != cert.tbs_certificate.signature {
        return Err("the verification certificate's two signature algorithm fields differ".into());
    }
    let algorithm: &dyn SignatureVerificationAlgorithm = webpki::ALL_VERIFICATION_ALGS
        .iter()
        .copied()
        .find(|a| {
            a.public_key_alg_id().as_ref() == key_alg.as_slice()
                && a.signature_alg_id().as_ref() == sig_alg.as_slice()
        })
        .ok_or_else(|| {
            format!(
                "the verification certificate's signature algorithm {} is not supported with the CA's {} key",
                cert.signature_algorithm.oid, spki.algorithm.oid
            )
        })?;
    let tbs = cert.tbs_certificate.to_der().map_err(|e| format!("encoding the signed part: {e}"))?;
    let signature =
        cert.signature.as_bytes().ok_or("the verification certificate's signature is not whole bytes")?;
    let public_key =
        spki.subject_public_key.as_bytes().ok_or("the CA certificate's public key is not whole bytes")?;
    algorithm.verify_signature(public_key, &tbs, signature).map_err(|_| {
        "the verification certificate is not signed by the CA certificate's private key".to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    const NOW: i64 = 1_800_000_000;

    fn now() -> Timestamp {
        Timestamp::from_unix_seconds(NOW)
    }

    fn params(cn: &str, ca: bool) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 3600).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 3600).unwrap();
        p
    }

    struct Ca {
        der: Vec<u8>,
        params: CertificateParams,
        key: KeyPair,
    }

    fn ca(cn: &str, alg: &'static rcgen::SignatureAlgorithm) -> Ca {
        let key = KeyPair::generate_for(alg).unwrap();
        let params = params(cn, true);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca { der, params, key }
    }

    fn proof(ca: &Ca, cn: &str, p: Option<CertificateParams>) -> Vec<u8> {
        let issuer = Issuer::from_params(&ca.params, &ca.key);
        let key = KeyPair::generate().unwrap();
        p.unwrap_or_else(|| params(cn, false)).signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn a_proof_signed_by_the_ca_with_the_code_verifies_for_ecdsa_and_ed25519() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let root = ca("root", alg);
            check_ca_certificate(&root.der).unwrap();
            let p = proof(&root, "ABC123", None);
            verify_proof_of_possession(&root.der, &p, "ABC123", now()).unwrap();
        }
    }

    #[test]
    fn every_broken_rule_is_named() {
        let root = ca("root", &rcgen::PKCS_ECDSA_P256_SHA256);
        let p = proof(&root, "ABC123", None);
        let err = verify_proof_of_possession(&root.der, &p, "OTHER", now()).unwrap_err();
        assert!(err.contains("subject CN is 'ABC123'"), "{err}");

        // Same subject name, another key: the issuer name matches, the signature does not.
        let impostor = ca("root", &rcgen::PKCS_ECDSA_P256_SHA256);
        let forged = proof(&impostor, "ABC123", None);
        let err = verify_proof_of_possession(&root.der, &forged, "ABC123", now()).unwrap_err();
        assert!(err.contains("not signed by the CA"), "{err}");

        let other = ca("other-root", &rcgen::PKCS_ECDSA_P256_SHA256);
        let err = verify_proof_of_possession(&root.der, &proof(&other, "ABC123", None), "ABC123", now())
            .unwrap_err();
        assert!(err.contains("issuer"), "{err}");

        let mut old = params("ABC123", false);
        old.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 7200).unwrap();
        old.not_after = time::OffsetDateTime::from_unix_timestamp(NOW - 3600).unwrap();
        let err =
            verify_proof_of_possession(&root.der, &proof(&root, "", Some(old)), "ABC123", now()).unwrap_err();
        assert!(err.contains("expired"), "{err}");
        let mut early = params("ABC123", false);
        early.not_before = time::OffsetDateTime::from_unix_timestamp(NOW + 3600).unwrap();
        early.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 7200).unwrap();
        let err = verify_proof_of_possession(&root.der, &proof(&root, "", Some(early)), "ABC123", now())
            .unwrap_err();
        assert!(err.contains("not valid yet"), "{err}");
        // Within the skew both ways.
        let at_edge = Timestamp::from_unix_seconds(NOW + 3600 + 299);
        verify_proof_of_possession(&root.der, &p, "ABC123", at_edge).unwrap();

        let err = verify_proof_of_possession(&root.der, b"garbage", "ABC123", now()).unwrap_err();
        assert!(err.contains("verification certificate"), "{err}");
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let key = KeyPair::generate().unwrap();
        let leaf = params("leaf", false).self_signed(&key).unwrap().der().to_vec();
        assert!(check_ca_certificate(&leaf).unwrap_err().contains("basicConstraints"));
        let mut explicit = params("leaf", false);
        explicit.is_ca = IsCa::ExplicitNoCa;
        let leaf = explicit.self_signed(&key).unwrap().der().to_vec();
        assert!(check_ca_certificate(&leaf).unwrap_err().contains("cA=false"));
        assert!(check_ca_certificate(b"nope").unwrap_err().contains("not valid DER"));
    }
}
