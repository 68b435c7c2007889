//! Certificate signing requests a device sends with its registration (`csr`: base64 DER PKCS#10 without
//! PEM armour, spec §7.6): parsed with `x509-cert`, the subject CN checked against the registration ID
//! and the request's signature verified with its own public key.

use super::algs::{key_alg, verify_signature, KeyAlg, SignatureError};
use super::certinfo::name_common_name;
use base64::Engine as _;
use der::{Decode, Encode};
use dps_proto::{DpsError, ErrorCode, RegistrationId};
use x509_cert::request::CertReq;

/// The largest CSR accepted, decoded DER bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// The key type of a CSR's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA with a modulus of `bits` bits (at least 2048).
    Rsa {
        /// The modulus length.
        bits: usize,
    },
}

/// A checked certificate signing request: its subject CN is the registration ID and its signature
/// verifies with its own key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    common_name: String,
    spki_der: Vec<u8>,
    key_kind: CsrKeyKind,
}

impl CertificateRequest {
    /// The subject Common Name (equal to the registration ID, ignoring case).
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The whole SubjectPublicKeyInfo, DER: what an issuer puts into the certificate.
    pub fn subject_public_key_info_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key type.
    pub fn key_kind(&self) -> CsrKeyKind {
        self.key_kind
    }
}

fn invalid(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidCsr, message)
}

/// Parses and checks a device's CSR. All failures are `400008 InvalidCsr` with a message naming the rule:
/// not base64, over [`MAX_CSR_BYTES`], not DER PKCS#10, an unsupported key algorithm (accepted: ECDSA
/// P-256/P-384, RSA 2048+), a CN that is not the registration ID, a signature that does not verify.
pub fn parse_csr(csr_b64: &str, registration_id: &RegistrationId) -> Result<CertificateRequest, DpsError> {
    let compact: String = csr_b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(invalid("the CSR is empty"));
    }
    // Refuse an absurdly long text before decoding it (base64 carries 3 bytes per 4 characters).
    let estimated = compact.len() / 4 * 3;
    if estimated > 8 * MAX_CSR_BYTES {
        return Err(invalid(format!("the CSR is about {estimated} bytes; at most {MAX_CSR_BYTES}")));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| invalid(format!("the CSR is not base64 (DER PKCS#10 without PEM armour): {e}")))?;
    if der.len() > MAX_CSR_BYTES {
        return Err(invalid(format!("the CSR is {} bytes; at most {MAX_CSR_BYTES}", der.len())));
    }
    let req = CertReq::from_der(&der).map_err(|e| invalid(format!("the CSR is not DER PKCS#10: {e}")))?;

    let spki = &req.info.public_key;
    let key_kind = match key_alg(spki) {
        Ok(KeyAlg::P256) => CsrKeyKind::EcdsaP256,
        Ok(KeyAlg::P384) => CsrKeyKind::EcdsaP384,
        Ok(KeyAlg::Rsa { bits }) if bits >= 2048 => CsrKeyKind::Rsa { bits },
        Ok(KeyAlg::Rsa { bits }) => {
            return Err(invalid(format!(
                "unsupported key algorithm: the CSR has a {bits}-bit RSA key; at least 2048 bits are required"
            )))
        }
        Err(e) => {
            return Err(invalid(format!(
                "unsupported key algorithm: the CSR has {e} (accepted: ECDSA P-256, ECDSA P-384, RSA 2048+)"
            )))
        }
    };

    let common_name = name_common_name(&req.info.subject).ok_or_else(|| {
        invalid(format!("the CSR has no subject CN; it must be registration ID '{registration_id}'"))
    })?;
    if common_name.to_lowercase() != registration_id.key() {
        return Err(invalid(format!(
            "the CSR's CN '{common_name}' is not registration ID '{registration_id}'"
        )));
    }

    let message = req.info.to_der().map_err(|e| invalid(format!("the CSR is not DER PKCS#10: {e}")))?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or_else(|| invalid("the CSR's signature is not a whole number of bytes"))?;
    match verify_signature(spki, &req.algorithm.oid, &message, signature) {
        Ok(()) => {}
        Err(SignatureError::Bad) => return Err(invalid("the CSR's signature does not verify")),
        Err(SignatureError::Unsupported(what)) => {
            return Err(invalid(format!("unsupported signature algorithm: the CSR uses {what}")))
        }
    }
    let spki_der =
        spki.to_der().map_err(|e| invalid(format!("the CSR's public key cannot be encoded: {e}")))?;
    Ok(CertificateRequest { common_name, spki_der, key_kind })
}
