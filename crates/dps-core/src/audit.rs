//! The audit log: one [`AuditRecord`] per service write (and per refused service write), appended by the
//! store.
//!
//! A write the engine performs for a service command travels as [`StoreOp::Audited`](crate::store::StoreOp):
//! the store performs the write and appends its record **in the same transaction**, so a committed write
//! always has its record and a failed or crashed one has none. A refused write (no rights, a stale ETag, an
//! invalid body, a write the store refused) is appended on its own ([`StoreOp::AppendAudit`](crate::store::StoreOp))
//! before the refusal is answered. Reads are never audited.
//!
//! A record names who, what, which item, the ETags around the write, the outcome, the tracking ID and the
//! time. It never holds a secret: no keys, no SAS tokens, no certificate material (a certificate is named by
//! its name). Records are built from identifiers and ETags only, never from request bodies.

use dps_proto::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How the audited command reached the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuditTransport {
    /// The HTTPS service API (a shared-access-policy SAS token).
    Https,
    /// A typed command executed in-process under a [`Principal::granted`](crate::Principal::granted).
    InProcess,
}

impl AuditTransport {
    /// The stable name (`https`, `inProcess`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditTransport::Https => "https",
            AuditTransport::InProcess => "inProcess",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<AuditTransport> {
        match s {
            "https" => Some(AuditTransport::Https),
            "inProcess" => Some(AuditTransport::InProcess),
            _ => None,
        }
    }
}

macro_rules! operations {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What an audited write did, by stable name (e.g. `enrollment.put`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[non_exhaustive]
        pub enum AuditOperation {
            $($(#[$doc])* #[serde(rename = $name)] $variant,)*
        }

        impl AuditOperation {
            /// Every operation, in declaration order.
            pub const ALL: &'static [AuditOperation] = &[$(AuditOperation::$variant,)*];

            /// The stable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(AuditOperation::$variant => $name,)*
                }
            }

            /// Parses a stable name.
            pub fn parse(s: &str) -> Option<AuditOperation> {
                match s {
                    $($name => Some(AuditOperation::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

operations! {
    /// Create or replace an individual enrollment.
    EnrollmentPut = "enrollment.put",
    /// Delete an individual enrollment.
    EnrollmentDelete = "enrollment.delete",
    /// Create or replace an enrollment group.
    GroupPut = "group.put",
    /// Delete an enrollment group.
    GroupDelete = "group.delete",
    /// Delete a device registration state.
    RegistrationDelete = "registration.delete",
    /// One item of a bulk operation on individual enrollments.
    BulkEnrollments = "bulk.enrollments",
    /// One item of a bulk operation on enrollment groups.
    BulkGroups = "bulk.groups",
    /// Upload or replace a CA certificate.
    CertificatePut = "certificate.put",
    /// Delete a CA certificate.
    CertificateDelete = "certificate.delete",
    /// Issue a verification code for a CA certificate.
    CertificateGenerateVerificationCode = "certificate.generateVerificationCode",
    /// Prove possession of a CA certificate's key.
    CertificateVerify = "certificate.verify",
}

impl fmt::Display for AuditOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Position in the log, assigned by the store on append (1, 2, …, increasing; 0 before).
    #[serde(default)]
    pub sequence: u64,
    /// When the engine executed the command (ISO 8601 on the wire).
    #[serde(with = "iso")]
    pub time: Timestamp,
    /// Who: the shared access policy that signed the SAS token, or the embedder's
    /// [`Principal::granted`](crate::Principal::granted) name.
    pub principal: String,
    /// How the command arrived.
    pub transport: AuditTransport,
    /// What.
    pub operation: AuditOperation,
    /// The item written: a registration ID, an enrollment group ID or a CA certificate name, as sent (empty
    /// for a refused bulk operation without items).
    pub target: String,
    /// The item's ETag before the write (`None` when the write created it, or for a refusal).
    #[serde(default)]
    pub etag_before: Option<String>,
    /// The item's ETag after the write (`None` after a delete, or for a refusal).
    #[serde(default)]
    pub etag_after: Option<String>,
    /// The outcome as an HTTP status (2xx: written).
    pub status: u16,
    /// The six-digit error code of a refusal.
    #[serde(default)]
    pub error_code: Option<u32>,
    /// The tracking ID of the reply (`x-ms-request-id`).
    pub tracking_id: String,
}

impl AuditRecord {
    /// Whether the write happened.
    pub fn succeeded(&self) -> bool {
        self.error_code.is_none() && self.status < 400
    }

    /// Whether the record passes `filter`.
    pub fn matches(&self, filter: &AuditFilter) -> bool {
        filter.since.is_none_or(|s| self.time >= s)
            && filter.until.is_none_or(|u| self.time < u)
            && filter.principal.as_deref().is_none_or(|p| self.principal.eq_ignore_ascii_case(p))
            && filter.target.as_deref().is_none_or(|t| self.target.eq_ignore_ascii_case(t))
            && filter.operation.is_none_or(|o| self.operation == o)
    }
}

/// Which records a query returns (every condition set must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records at or after this time.
    pub since: Option<Timestamp>,
    /// Records strictly before this time.
    pub until: Option<Timestamp>,
    /// Records of this principal (case-insensitive).
    pub principal: Option<String>,
    /// Records about this item (case-insensitive, as IDs compare).
    pub target: Option<String>,
    /// Records of this operation.
    pub operation: Option<AuditOperation>,
}

/// Serde of a [`Timestamp`] as ISO 8601.
mod iso {
    use dps_proto::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_iso())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse_iso(&text).ok_or_else(|| serde::de::Error::custom("not an ISO 8601 timestamp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_stable_and_round_trip() {
        for op in AuditOperation::ALL {
            assert_eq!(AuditOperation::parse(op.as_str()), Some(*op));
            assert_eq!(serde_json::to_value(op).unwrap(), serde_json::json!(op.as_str()));
        }
        assert_eq!(AuditOperation::EnrollmentPut.as_str(), "enrollment.put");
        assert_eq!(
            AuditOperation::CertificateGenerateVerificationCode.as_str(),
            "certificate.generateVerificationCode"
        );
        assert_eq!(AuditTransport::parse("inProcess"), Some(AuditTransport::InProcess));
    }

    #[test]
    fn a_record_serializes_camel_case_with_an_iso_time() {
        let r = AuditRecord {
            sequence: 3,
            time: Timestamp::from_unix_seconds(1_700_000_000),
            principal: "provisioningserviceowner".into(),
            transport: AuditTransport::Https,
            operation: AuditOperation::GroupDelete,
            target: "g1".into(),
            etag_before: Some("abc".into()),
            etag_after: None,
            status: 412,
            error_code: Some(412_001),
            tracking_id: "t".into(),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.0000000Z");
        assert_eq!(v["operation"], "group.delete");
        assert_eq!(v["etagBefore"], "abc");
        assert_eq!(v["errorCode"], 412_001);
        assert_eq!(serde_json::from_value::<AuditRecord>(v).unwrap(), r);
        assert!(!r.succeeded());
        let filter = AuditFilter { target: Some("G1".into()), ..AuditFilter::default() };
        assert!(r.matches(&filter));
        let filter = AuditFilter { since: Some(Timestamp::from_unix_seconds(1_700_000_001)), ..filter };
        assert!(!r.matches(&filter));
    }
}
