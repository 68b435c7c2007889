//! CA certificates uploaded to a provisioning service instance (spec §5.7, §7.3).
//!
//! Operators upload root or intermediate CA certificates to the instance and prove possession of each
//! CA's private key (or set it verified on upload). Only a **verified** certificate authorises devices:
//! an X.509 device's presented chain must reach one. Enrollment groups name an uploaded certificate by
//! its name in `caReferences`.

use crate::id::Etag;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The longest certificate name accepted (ARM resource names are at most 64 characters here).
pub const MAX_CERTIFICATE_NAME_LEN: usize = 64;

/// An uploaded CA certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    /// The certificate's name (ASCII alphanumerics, `-`, `.`, `_`; compared case-insensitively).
    pub name: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Whether possession of the CA's private key was proven (or asserted on upload).
    pub is_verified: bool,
    /// The verification code issued by the last "generate verification code", until verified.
    pub verification_code: Option<String>,
    /// When it was uploaded.
    pub created: Timestamp,
    /// When it was last changed.
    pub updated: Timestamp,
    /// Changes on every write.
    pub etag: Etag,
}

impl CaCertificate {
    /// The lowercase key certificates are stored and compared by.
    pub fn key(&self) -> String {
        self.name.to_ascii_lowercase()
    }
}

/// Checks a certificate name: 1 to [`MAX_CERTIFICATE_NAME_LEN`] characters of ASCII alphanumerics, `-`,
/// `.` and `_` (spec §5.7). The error says which rule failed.
pub fn check_certificate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CERTIFICATE_NAME_LEN {
        return Err(format!(
            "certificate name '{name}' must be 1 to {MAX_CERTIFICATE_NAME_LEN} characters long (it has {})",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
        return Err(format!(
            "certificate name '{name}' contains '{c}'; only ASCII letters, digits, '-', '.' and '_' are allowed"
        ));
    }
    Ok(())
}

/// The ARM resource type of a provisioning service's certificate.
pub const CERTIFICATE_RESOURCE_TYPE: &str = "Microsoft.Devices/provisioningServices/Certificates";

/// ARM `CertificateResponse`: one CA certificate as the service API returns it (spec §5.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The certificate's name.
    pub name: String,
    /// Its ETag (also sent as the `ETag` header).
    pub etag: String,
    /// Always [`CERTIFICATE_RESOURCE_TYPE`].
    #[serde(rename = "type")]
    pub resource_type: String,
    /// The certificate's properties.
    pub properties: CertificateProperties,
}

/// ARM `CertificateProperties`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateProperties {
    /// The subject distinguished name (`CN=…`).
    pub subject: String,
    /// When the certificate expires (notAfter), RFC 1123.
    pub expiry: String,
    /// Uppercase hex SHA-1 of the DER.
    pub thumbprint: String,
    /// Whether possession of the private key was proven (or asserted on upload).
    pub is_verified: bool,
    /// When it was uploaded, RFC 1123.
    pub created: String,
    /// When it was last changed, RFC 1123.
    pub updated: String,
    /// The certificate, base64 DER.
    pub certificate: String,
    /// The verification code: only in the answer to "generate verification code".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
}

/// ARM `CertificateListDescription`: the answer to listing the certificates.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CertificateList {
    /// Every certificate, ordered by name (case-insensitively).
    pub value: Vec<CertificateResponse>,
}

/// The body of a certificate upload: ARM's `{"properties": {"certificate": …, "isVerified": …}}`, or the same
/// two fields at the top level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateUpload {
    /// The ARM form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<CertificateUploadProperties>,
    /// The flat form: the certificate, PEM or base64 DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The flat form: set the certificate verified on upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_verified: Option<bool>,
}

/// The `properties` of a [`CertificateUpload`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateUploadProperties {
    /// The certificate, PEM or base64 DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Set the certificate verified on upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_verified: Option<bool>,
}

impl CertificateUpload {
    /// The certificate text and the verified flag (`false` when absent); the `properties` form wins over the
    /// flat one, field by field.
    pub fn into_parts(self) -> (Option<String>, bool) {
        let (nested_cert, nested_verified) =
            self.properties.map(|p| (p.certificate, p.is_verified)).unwrap_or((None, None));
        (nested_cert.or(self.certificate), nested_verified.or(self.is_verified).unwrap_or(false))
    }
}

/// The body of "verify certificate": the verification certificate, PEM or base64 DER.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationCertificate {
    /// The verification certificate.
    pub certificate: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_follow_the_arm_rule() {
        assert!(check_certificate_name("root-ca.v1_2").is_ok());
        assert!(check_certificate_name("").is_err());
        assert!(check_certificate_name("has space").unwrap_err().contains("' '"));
        assert!(check_certificate_name(&"a".repeat(65)).unwrap_err().contains("1 to 64"));
    }

    #[test]
    fn upload_bodies_in_both_shapes() {
        let arm: CertificateUpload =
            crate::strict::from_slice(br#"{"properties": {"certificate": "AAA", "isVerified": true}}"#)
                .unwrap();
        assert_eq!(arm.into_parts(), (Some("AAA".into()), true));
        let flat: CertificateUpload = crate::strict::from_slice(br#"{"certificate": "BBB"}"#).unwrap();
        assert_eq!(flat.into_parts(), (Some("BBB".into()), false));
        assert!(crate::strict::from_slice::<CertificateUpload>(b"[1]").is_err());
    }

    #[test]
    fn the_response_is_arm_shaped() {
        let r = CertificateResponse {
            name: "root".into(),
            etag: "AAAA".into(),
            resource_type: CERTIFICATE_RESOURCE_TYPE.into(),
            properties: CertificateProperties {
                subject: "CN=root".into(),
                expiry: "Thu, 12 Oct 2017 19:23:50 GMT".into(),
                thumbprint: "97388663832D0393C9246CAB4FBA2C8677185A25".into(),
                is_verified: false,
                created: "Thu, 12 Oct 2017 19:23:50 GMT".into(),
                updated: "Thu, 12 Oct 2017 19:23:50 GMT".into(),
                certificate: "MIIB".into(),
                verification_code: None,
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], CERTIFICATE_RESOURCE_TYPE);
        assert_eq!(v["properties"]["isVerified"], false);
        assert!(v["properties"].get("verificationCode").is_none());
    }
}
