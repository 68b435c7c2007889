//! CA certificates uploaded to a provisioning service instance (spec §5.7, §7.3).
//!
//! Operators upload root or intermediate CA certificates to the instance and prove possession of each
//! CA's private key (or set it verified on upload). Only a **verified** certificate authorises devices:
//! an X.509 device's presented chain must reach one. Enrollment groups name an uploaded certificate by
//! its name in `caReferences`.

use crate::id::Etag;
use crate::time::Timestamp;

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
}
