//! Certificates as text and as facts: PEM or base64 DER in, DER and [`X509CertificateInfo`] out.
//!
//! Enrollments carry certificates as PEM or as base64 DER without armour (the C# SDK sends the latter, the
//! docs the former); the CA-certificate API takes both too. Everything that reads a certificate the
//! service was given goes through [`parse_certificate_text`], so every caller refuses the same bad input
//! with the same message.

use base64::Engine as _;
use der::{Decode, Encode};
use dps_proto::model::X509CertificateInfo;
use dps_proto::Timestamp;
use sha1::Digest as _;
use x509_cert::Certificate;

/// The largest certificate accepted, DER bytes (a 4096-bit RSA certificate with extensions is ~1.5 KB).
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// Decodes a certificate given as PEM (`-----BEGIN CERTIFICATE-----`) or as base64 DER, and checks that it
/// parses as an X.509 certificate. The error says which rule failed.
pub fn parse_certificate_text(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the certificate is empty".into());
    }
    let der = if text.starts_with("-----BEGIN") {
        let (label, der) = der::pem::decode_vec(text.as_bytes())
            .map_err(|e| format!("the certificate is not valid PEM: {e}"))?;
        if label != "CERTIFICATE" {
            return Err(format!("the PEM block is '{label}', not 'CERTIFICATE'"));
        }
        der
    } else {
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| format!("the certificate is neither PEM nor base64 DER: {e}"))?
    };
    parse_der(&der)?;
    Ok(der)
}

/// Parses one DER certificate (at most [`MAX_CERTIFICATE_BYTES`]).
pub fn parse_der(der: &[u8]) -> Result<Certificate, String> {
    if der.len() > MAX_CERTIFICATE_BYTES {
        return Err(format!(
            "the certificate is {} bytes; at most {MAX_CERTIFICATE_BYTES} are accepted",
            der.len()
        ));
    }
    Certificate::from_der(der).map_err(|e| format!("the certificate is not valid DER X.509: {e}"))
}

/// Uppercase hex SHA-1 of the DER (the thumbprint Azure shows).
pub fn sha1_thumbprint(der: &[u8]) -> String {
    hex_upper(&sha1::Sha1::digest(der))
}

/// Uppercase hex SHA-256 of the DER.
pub fn sha256_thumbprint(der: &[u8]) -> String {
    hex_upper(&sha2::Sha256::digest(der))
}

/// Whether `thumbprint` (SHA-1 or SHA-256 hex, any case, `:` separators allowed) names `der`.
pub fn thumbprint_matches(thumbprint: &str, der: &[u8]) -> bool {
    let t: String = thumbprint.chars().filter(|c| *c != ':').collect();
    match t.len() {
        40 => t.eq_ignore_ascii_case(&sha1_thumbprint(der)),
        64 => t.eq_ignore_ascii_case(&sha256_thumbprint(der)),
        _ => false,
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The subject's Common Name (the last CN attribute, as X.509 tools show it), if any.
pub fn common_name(cert: &Certificate) -> Option<String> {
    name_common_name(&cert.tbs_certificate.subject)
}

/// The Common Name of a distinguished name (the last CN attribute), if any.
pub(crate) fn name_common_name(name: &x509_cert::name::Name) -> Option<String> {
    let mut cn = None;
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == const_oid::db::rfc4519::CN {
                cn = directory_string(&atv.value);
            }
        }
    }
    cn
}

fn directory_string(value: &der::Any) -> Option<String> {
    use der::asn1::{PrintableStringRef, TeletexStringRef, Utf8StringRef};
    use der::{Tag, Tagged};
    match value.tag() {
        Tag::Utf8String => value.decode_as::<Utf8StringRef<'_>>().ok().map(|s| s.as_str().to_owned()),
        Tag::PrintableString => {
            value.decode_as::<PrintableStringRef<'_>>().ok().map(|s| s.as_str().to_owned())
        }
        Tag::TeletexString => value.decode_as::<TeletexStringRef<'_>>().ok().map(|s| s.as_str().to_owned()),
        Tag::Ia5String => {
            value.decode_as::<der::asn1::Ia5StringRef<'_>>().ok().map(|s| s.as_str().to_owned())
        }
        _ => None,
    }
}

/// The validity period as timestamps: `(notBefore, notAfter)`.
pub fn validity(cert: &Certificate) -> (Timestamp, Timestamp) {
    let v = &cert.tbs_certificate.validity;
    let secs = |t: &x509_cert::time::Time| {
        i64::try_from(t.to_unix_duration().as_secs())
            .map(Timestamp::from_unix_seconds)
            .unwrap_or(Timestamp::from_unix_seconds(i64::MAX / 1_000_000_000))
    };
    (secs(&v.not_before), secs(&v.not_after))
}

/// Whether the subject and issuer names are equal (a self-issued certificate; its signature is checked
/// separately).
pub fn is_self_issued(cert: &Certificate) -> bool {
    cert.tbs_certificate.subject == cert.tbs_certificate.issuer
}

/// `2017-11-14T12:34:18Z`: ISO-8601 without fractional seconds, as Azure prints certificate dates.
fn iso_seconds(t: Timestamp) -> String {
    let full = t.to_iso();
    match full.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => full,
    }
}

/// The eight-field `X509CertificateInfo` of a DER certificate (spec §5.6; every field is filled, as the
/// Java SDK requires).
pub fn certificate_info(der: &[u8]) -> Result<X509CertificateInfo, String> {
    let cert = parse_der(der)?;
    Ok(info_of(&cert, der))
}

/// [`certificate_info`] of an already parsed certificate.
pub fn info_of(cert: &Certificate, der: &[u8]) -> X509CertificateInfo {
    let tbs = &cert.tbs_certificate;
    let (not_before, not_after) = validity(cert);
    X509CertificateInfo {
        subject_name: tbs.subject.to_string(),
        sha1_thumbprint: sha1_thumbprint(der),
        sha256_thumbprint: sha256_thumbprint(der),
        issuer_name: tbs.issuer.to_string(),
        not_before_utc: iso_seconds(not_before),
        not_after_utc: iso_seconds(not_after),
        serial_number: hex_upper(tbs.serial_number.as_bytes()),
        version: match tbs.version {
            x509_cert::certificate::Version::V1 => 1,
            x509_cert::certificate::Version::V2 => 2,
            x509_cert::certificate::Version::V3 => 3,
        },
    }
}

/// DER of a parsed certificate (for callers that built one).
pub fn to_der(cert: &Certificate) -> Result<Vec<u8>, String> {
    cert.to_der().map_err(|e| format!("encoding the certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec![cn.to_owned()]).unwrap()
    }

    #[test]
    fn pem_and_base64_der_decode_to_the_same_certificate_and_garbage_says_why() {
        let c = cert("dev-1");
        let der = c.cert.der().to_vec();
        assert_eq!(parse_certificate_text(&c.cert.pem()).unwrap(), der);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(parse_certificate_text(&b64).unwrap(), der);
        assert!(parse_certificate_text("").unwrap_err().contains("empty"));
        assert!(parse_certificate_text("not base64!").unwrap_err().contains("neither PEM nor base64"));
        assert!(parse_certificate_text("AAAA").unwrap_err().contains("not valid DER"));
        let key_pem = c.signing_key.serialize_pem();
        assert!(parse_certificate_text(&key_pem).unwrap_err().contains("not 'CERTIFICATE'"));
    }

    #[test]
    fn info_has_all_eight_fields_and_thumbprints_match_either_hash() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "dev-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        let der = c.der().to_vec();
        let info = certificate_info(&der).unwrap();
        assert_eq!(info.subject_name, "CN=dev-7");
        assert_eq!(info.issuer_name, "CN=dev-7");
        assert_eq!(info.sha1_thumbprint.len(), 40);
        assert_eq!(info.sha256_thumbprint.len(), 64);
        assert_eq!(info.version, 3);
        assert!(info.not_before_utc.ends_with('Z') && !info.not_before_utc.contains('.'));
        assert!(!info.serial_number.is_empty());
        assert!(thumbprint_matches(&info.sha1_thumbprint.to_lowercase(), &der));
        assert!(thumbprint_matches(&info.sha256_thumbprint, &der));
        assert!(!thumbprint_matches("00", &der));
        assert_eq!(common_name(&parse_der(&der).unwrap()).as_deref(), Some("dev-7"));
        assert!(is_self_issued(&parse_der(&der).unwrap()));
    }
}
