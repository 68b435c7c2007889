//! The pure parts of the CA-certificate registry and of X.509 enrollment writes: the wire view of a stored
//! certificate, verification codes, and the checks and `info` filling of X.509 attestations (spec §5.6,
//! §5.7, §7.3).

use base64::Engine as _;
use dps_attest::x509::{
    certificate_info, check_ca_certificate, parse_certificate_text, parse_der, sha1_thumbprint, validity,
};
use dps_proto::certificate::{
    check_certificate_name, CaCertificate, CertificateProperties, CertificateResponse,
    CERTIFICATE_RESOURCE_TYPE,
};
use dps_proto::model::{AttestationMechanism, X509CaReferences, X509Certificates};
use dps_proto::{DpsError, ErrorCode};
use rand_core::RngCore;

/// Random bytes in a verification code (printed as twice as many uppercase hex digits).
const VERIFICATION_CODE_BYTES: usize = 16;

/// A `caReferences` entry of an enrollment write: the field it came from and the certificate it names.
pub(crate) type CaReference = (String, String);

fn invalid_enrollment(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidEnrollment, message)
}

/// `400009` with a message.
pub(crate) fn invalid_ca(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidCaCertificate, message)
}

/// Checks a certificate name (`400002`).
pub(crate) fn check_name(name: &str) -> Result<(), DpsError> {
    check_certificate_name(name).map_err(|e| DpsError::with_message(ErrorCode::InvalidIdentifier, e))
}

/// Decodes an uploaded CA certificate and checks that it is one (`400009` naming the rule).
pub(crate) fn parse_ca(text: &str) -> Result<Vec<u8>, DpsError> {
    let der = parse_certificate_text(text).map_err(|e| invalid_ca(format!("The CA certificate: {e}")))?;
    check_ca_certificate(&der).map_err(|e| invalid_ca(format!("The CA certificate: {e}")))?;
    Ok(der)
}

/// Decodes a verification certificate (`400009`).
pub(crate) fn parse_proof(text: &str) -> Result<Vec<u8>, DpsError> {
    parse_certificate_text(text).map_err(|e| invalid_ca(format!("The verification certificate: {e}")))
}

/// A fresh, unguessable verification code: 128 random bits as 32 uppercase hex digits.
pub(crate) fn verification_code(rng: &mut dyn RngCore) -> String {
    let mut bytes = [0u8; VERIFICATION_CODE_BYTES];
    rng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The ARM view of a stored certificate; the verification code only when `with_code`.
pub(crate) fn response(c: &CaCertificate, with_code: bool) -> Result<CertificateResponse, DpsError> {
    let cert = parse_der(&c.der).map_err(|e| {
        DpsError::with_message(
            ErrorCode::InternalError,
            format!("The stored CA certificate '{}': {e}", c.name),
        )
    })?;
    let (_, not_after) = validity(&cert);
    Ok(CertificateResponse {
        name: c.name.clone(),
        etag: c.etag.to_string(),
        resource_type: CERTIFICATE_RESOURCE_TYPE.to_owned(),
        properties: CertificateProperties {
            subject: cert.tbs_certificate.subject.to_string(),
            expiry: not_after.to_rfc1123(),
            thumbprint: sha1_thumbprint(&c.der),
            is_verified: c.is_verified,
            created: c.created.to_rfc1123(),
            updated: c.updated.to_rfc1123(),
            certificate: base64::engine::general_purpose::STANDARD.encode(&c.der),
            verification_code: if with_code { c.verification_code.clone() } else { None },
        },
    })
}

/// Checks the certificates of one `X509Certificates` field and fills each one's `info`.
fn prepare_certificates(field: &str, certs: &mut X509Certificates) -> Result<bool, DpsError> {
    if certs.primary.is_none() {
        return Err(invalid_enrollment(format!("{field}.primary: the primary certificate is required")));
    }
    for (slot, entry) in [("primary", &mut certs.primary), ("secondary", &mut certs.secondary)] {
        let Some(entry) = entry.as_mut() else { continue };
        let at = format!("{field}.{slot}.certificate");
        let text = entry
            .certificate
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| invalid_enrollment(format!("{at}: the certificate is missing")))?;
        let der = parse_certificate_text(text).map_err(|e| invalid_enrollment(format!("{at}: {e}")))?;
        entry.info = Some(certificate_info(&der).map_err(|e| invalid_enrollment(format!("{at}: {e}")))?);
    }
    Ok(true)
}

/// The names a `caReferences` object gives, checked for syntax.
fn prepare_references(refs: &X509CaReferences, out: &mut Vec<CaReference>) -> Result<bool, DpsError> {
    let field = "attestation.x509.caReferences";
    if refs.primary.is_none() {
        return Err(invalid_enrollment(format!("{field}.primary: the primary CA reference is required")));
    }
    for (slot, name) in [("primary", &refs.primary), ("secondary", &refs.secondary)] {
        let Some(name) = name else { continue };
        let at = format!("{field}.{slot}");
        check_certificate_name(name).map_err(|e| invalid_enrollment(format!("{at}: {e}")))?;
        out.push((at, name.clone()));
    }
    Ok(true)
}

/// Validates an X.509 attestation on write (an individual enrollment needs `clientCertificates` or
/// `caReferences`, a group `signingCertificates` or `caReferences`; every certificate must parse), fills
/// each certificate's `info`, drops the other mechanisms, and returns the `caReferences` names, which the
/// caller checks against the uploaded certificates ([`check_references`]).
pub(crate) fn prepare_x509(
    attestation: &mut AttestationMechanism,
    group: bool,
) -> Result<Vec<CaReference>, DpsError> {
    attestation.tpm = None;
    attestation.symmetric_key = None;
    let (wanted, other, what) = if group {
        ("signingCertificates", "clientCertificates", "An X.509 enrollment group")
    } else {
        ("clientCertificates", "signingCertificates", "An X.509 individual enrollment")
    };
    let x509 = attestation.x509.as_mut().ok_or_else(|| {
        invalid_enrollment(format!("attestation.x509: {what} needs {wanted} or caReferences."))
    })?;
    let (mine, theirs) = if group {
        (&mut x509.signing_certificates, &x509.client_certificates)
    } else {
        (&mut x509.client_certificates, &x509.signing_certificates)
    };
    if theirs.is_some() {
        return Err(invalid_enrollment(format!(
            "attestation.x509.{other}: {what} takes {wanted} or caReferences, not {other}."
        )));
    }
    let mut references = Vec::new();
    let mut any = false;
    if let Some(certs) = mine.as_mut() {
        any |= prepare_certificates(&format!("attestation.x509.{wanted}"), certs)?;
    }
    if let Some(refs) = x509.ca_references.as_ref() {
        any |= prepare_references(refs, &mut references)?;
    }
    if !any {
        return Err(invalid_enrollment(format!("attestation.x509: {what} needs {wanted} or caReferences.")));
    }
    Ok(references)
}

/// Checks that every `caReferences` name is an uploaded certificate (`400004` naming the field).
pub(crate) fn check_references(
    references: &[CaReference],
    uploaded: &[CaCertificate],
) -> Result<(), DpsError> {
    for (field, name) in references {
        let key = name.to_ascii_lowercase();
        if !uploaded.iter().any(|c| c.key() == key) {
            return Err(invalid_enrollment(format!("{field} names no uploaded CA certificate '{name}'")));
        }
    }
    Ok(())
}
