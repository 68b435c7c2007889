//! The X.509 parsers: a device's TLS client chain (`prepare` with a `Credential::ClientCertificate`), CSRs
//! (`csr::parse_csr`) and CA uploads (`parse_certificate_text`, `check_ca_certificate`,
//! `verify_proof_of_possession`).

use crate::{assert_refusal, NOW};
use dps_attest::x509::{
    certificate_info, check_ca_certificate, csr::parse_csr, parse_certificate_text, parse_der,
    sha1_thumbprint, thumbprint_matches, verify_proof_of_possession, MAX_CHAIN_LEN, MAX_COMMON_NAME_LEN,
};
use dps_attest::{prepare, Presented};
use dps_proto::credential::CertificateChain;
use dps_proto::{Credential, ErrorCode, RegistrationId, Timestamp};

/// Splits concatenated DER into its top-level TLVs (what a chain of certificates looks like on the
/// wire, minus the TLS framing). What does not parse as a TLV header is kept whole as the last element.
pub fn split_der(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let total = tlv_len(data).filter(|&n| n <= data.len()).unwrap_or(data.len());
        out.push(data[..total].to_vec());
        data = &data[total..];
    }
    out
}

/// The length of the TLV at the start of `data` (header included), if its header is complete.
fn tlv_len(data: &[u8]) -> Option<usize> {
    let first = *data.get(1)?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let len = data.get(2..2 + n)?.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Some(2 + n + len)
}

/// A presented client chain (concatenated DER, leaf first): `prepare` accepts it only as 1 to 10
/// certificates whose leaf has a CN of at most 64 characters, and refuses anything else with 401002.
pub fn x509_chain(data: &[u8]) {
    let der = split_der(data);
    let count = der.len();
    let credential = Credential::ClientCertificate(CertificateChain { der: der.clone() });
    match prepare(Timestamp::from_unix_seconds(NOW), &credential) {
        Ok(Presented::ClientCertificate(chain)) => {
            assert_eq!(chain.len(), count);
            assert!((1..=MAX_CHAIN_LEN).contains(&chain.len()));
            assert!(chain.common_name().chars().count() <= MAX_COMMON_NAME_LEN);
            assert_eq!(chain.leaf_der(), der[0].as_slice());
            for (i, d) in der.iter().enumerate() {
                assert_eq!(chain.der(i), Some(d.as_slice()));
                let info = certificate_info(d).unwrap_or_else(|e| panic!("position {i} parsed, but: {e}"));
                assert!(thumbprint_matches(&info.sha1_thumbprint, d));
                assert_eq!(info.sha1_thumbprint, sha1_thumbprint(d));
            }
        }
        Ok(other) => panic!("a client chain prepared as {other:?}"),
        Err(e) => assert_refusal("prepare(ClientCertificate)", &e, &[ErrorCode::InvalidCertificate]),
    }
}

/// A CSR as a device sends it: the first line is the registration ID, the rest the base64 PKCS#10. A CSR
/// accepted for an ID has that ID as CN (ignoring case) and a public key that is DER; every refusal is
/// 400008.
pub fn csr(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (id, csr) = text.split_once('\n').unwrap_or(("fuzz-dev", &text));
    let Ok(id) = RegistrationId::parse(id) else { return };
    match parse_csr(csr, &id) {
        Ok(req) => {
            assert!(
                req.common_name().eq_ignore_ascii_case(id.as_str())
                    || req.common_name().to_lowercase() == id.key()
            );
            assert!(!req.subject_public_key_info_der().is_empty());
            assert_eq!(parse_csr(csr, &id).as_ref(), Ok(&req));
        }
        Err(e) => assert_refusal("parse_csr", &e, &[ErrorCode::InvalidCsr]),
    }
}

/// A CA upload and its proof of possession: `CA text \0 proof text \0 verification code`. What
/// `parse_certificate_text` accepts is DER that parses; a CA that passes `check_ca_certificate` is one; a
/// proof is checked without a panic whatever the inputs.
pub fn ca_upload(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let ca_text = parts.next().unwrap_or("");
    let proof_text = parts.next();
    let code = parts.next().unwrap_or("");
    let ca = match parse_certificate_text(ca_text) {
        Ok(der) => {
            parse_der(&der)
                .unwrap_or_else(|e| panic!("parse_certificate_text accepted what parse_der refuses: {e}"));
            certificate_info(&der).unwrap_or_else(|e| panic!("an accepted certificate has no info: {e}"));
            let _ = check_ca_certificate(&der);
            der
        }
        Err(e) => {
            assert!(!e.is_empty());
            // The raw bytes as DER, too: the store keeps DER and checks it again.
            let _ = check_ca_certificate(data);
            data.to_vec()
        }
    };
    if let Some(proof_text) = proof_text {
        let proof = parse_certificate_text(proof_text).unwrap_or_else(|_| proof_text.as_bytes().to_vec());
        if let Err(e) = verify_proof_of_possession(&ca, &proof, code, Timestamp::from_unix_seconds(NOW)) {
            assert!(!e.is_empty());
        }
    }
}
