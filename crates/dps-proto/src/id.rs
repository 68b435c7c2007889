//! Identifiers of spec §11, constructible only by parsing.
//!
//! Registration IDs, enrollment group IDs and ID scopes are case-insensitive: they keep the string exactly as
//! received (group-derived keys are computed over it, and it is echoed back), and compare, hash and order by a
//! lowercase key. Device IDs are case-sensitive (IoT Hub rules).

use crate::error::{DpsError, ErrorCode};
use std::fmt;
use std::hash::{Hash, Hasher};

fn invalid(what: &str, value: &str, rule: &str) -> DpsError {
    let shown: String = value.chars().take(140).collect();
    DpsError::with_message(ErrorCode::InvalidIdentifier, format!("{what} '{shown}' is not valid: {rule}"))
}

/// Checks the registration/group ID rule: 1-128 characters, alphanumerics plus `- . _ :`, starting with an
/// alphanumeric and ending with an alphanumeric or `-` (spec §11.1 compromise).
fn check_registration_like(what: &str, s: &str) -> Result<(), DpsError> {
    const RULE: &str = "1 to 128 characters of letters, digits and '-', '.', '_', ':', starting with a letter or digit and ending with a letter, digit or '-'";
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 128 {
        return Err(invalid(what, s, RULE));
    }
    let ok_mid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':');
    if !bytes[0].is_ascii_alphanumeric() {
        return Err(invalid(what, s, RULE));
    }
    let last = bytes[bytes.len() - 1];
    if !(last.is_ascii_alphanumeric() || last == b'-') {
        return Err(invalid(what, s, RULE));
    }
    if !bytes.iter().all(|&b| ok_mid(b)) {
        return Err(invalid(what, s, RULE));
    }
    Ok(())
}

/// Implements serde as a string that is parsed on the way in.
macro_rules! serde_as_string {
    ($name:ident) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! case_insensitive_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            original: String,
            key: String,
        }

        impl $name {
            /// Parses and validates an identifier (spec §11.1).
            pub fn parse(s: &str) -> Result<Self, DpsError> {
                check_registration_like($what, s)?;
                Ok($name { original: s.to_owned(), key: s.to_ascii_lowercase() })
            }

            /// The identifier exactly as it was received.
            pub fn as_str(&self) -> &str {
                &self.original
            }

            /// The lowercase form used for lookups and comparisons.
            pub fn key(&self) -> &str {
                &self.key
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.key == other.key
            }
        }
        impl Eq for $name {}
        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.key.hash(state)
            }
        }
        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.key.cmp(&other.key)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.original)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.original)
            }
        }
        impl std::str::FromStr for $name {
            type Err = DpsError;
            fn from_str(s: &str) -> Result<Self, DpsError> {
                Self::parse(s)
            }
        }
        serde_as_string!($name);
    };
}

case_insensitive_id!(
    /// A device registration ID (case-insensitive, spec §11.1).
    RegistrationId,
    "registration ID"
);
case_insensitive_id!(
    /// An enrollment group ID (same rules as registration IDs).
    EnrollmentGroupId,
    "enrollment group ID"
);

/// An ID scope: `0ne` followed by 8 hexadecimal digits (spec §11.3), compared case-insensitively.
#[derive(Clone)]
pub struct IdScope {
    original: String,
    key: String,
}

impl IdScope {
    /// Parses an ID scope.
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        let b = s.as_bytes();
        let ok = b.len() == 11
            && b[..3].eq_ignore_ascii_case(b"0ne")
            && b[3..].iter().all(|c| c.is_ascii_hexdigit());
        if !ok {
            return Err(invalid("ID scope", s, "'0ne' followed by 8 hexadecimal digits"));
        }
        Ok(IdScope { original: s.to_owned(), key: s.to_ascii_lowercase() })
    }

    /// The scope as received.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// Canonical form: `0ne` plus uppercase hex, as Azure prints scopes.
    pub fn canonical(&self) -> String {
        format!("0ne{}", self.key[3..].to_ascii_uppercase())
    }

    /// Lowercase comparison key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl PartialEq for IdScope {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for IdScope {}
impl Hash for IdScope {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}
impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}
impl fmt::Debug for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdScope({:?})", self.original)
    }
}

serde_as_string!(IdScope);
serde_as_string!(DeviceId);
serde_as_string!(OperationId);
serde_as_string!(Etag);

/// An IoT Hub device ID: case-sensitive, 1-128 ASCII characters of alphanumerics and
/// `- . % _ * ? ! ( ) , : = @ $ '` (spec §11.2).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Parses a device ID.
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.%_*?!(),:=@$'".contains(&b));
        if !ok {
            return Err(invalid(
                "device ID",
                s,
                "1 to 128 characters of letters, digits and - . % _ * ? ! ( ) , : = @ $ '",
            ));
        }
        Ok(DeviceId(s.to_owned()))
    }

    /// A registration ID is always a valid device ID (its alphabet is a subset).
    pub fn from_registration_id(id: &RegistrationId) -> Self {
        DeviceId(id.as_str().to_owned())
    }

    /// The device ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({:?})", self.0)
    }
}

/// A registration operation ID: opaque to clients, URL-path and MQTT-topic safe (letters, digits, `-`, `.`,
/// `_`), 1-128 characters. This service issues `<d>.<16 hex>.<uuid>`, like Azure.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationId(String);

impl OperationId {
    /// Parses an operation ID.
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !ok {
            return Err(invalid("operation ID", s, "1 to 128 characters of letters, digits, '-', '.', '_'"));
        }
        Ok(OperationId(s.to_owned()))
    }

    /// Builds the Azure-style operation ID `<d>.<16 hex>.<uuid>` from a partition hash and 16 random bytes.
    pub fn generate(partition: u64, random: [u8; 16]) -> Self {
        OperationId(format!("{}.{:016x}.{}", partition % 10, partition, format_uuid(random)))
    }

    /// The operation ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperationId({:?})", self.0)
    }
}

/// Formats 16 bytes as a version-4 UUID string (the version and variant bits are set).
pub fn format_uuid(mut b: [u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// An entity tag: opaque, compared exactly after stripping `W/` and surrounding quotes (spec §5.5).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Etag(String);

impl Etag {
    /// Parses an ETag as a client sends it (quoted or not, optionally weak).
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        let t = s.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        let t = t.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(t);
        if t.is_empty() || t.len() > 256 || t.chars().any(|c| c.is_control()) {
            return Err(invalid("ETag", s, "a non-empty opaque string of at most 256 characters"));
        }
        Ok(Etag(t.to_owned()))
    }

    /// Builds this service's ETag format, base64 of a quoted GUID (like Azure's Cosmos-backed ETags).
    pub fn generate(random: [u8; 16]) -> Self {
        use base64::Engine as _;
        let quoted = format!("\"{}\"", format_uuid(random));
        Etag(base64::engine::general_purpose::STANDARD.encode(quoted))
    }

    /// The ETag value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Etag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Etag({:?})", self.0)
    }
}

/// A write precondition from `If-Match` (or a bulk item's `etag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: the resource must exist.
    Any,
    /// The resource must exist and have exactly this ETag.
    Etag(Etag),
}

impl IfMatch {
    /// Parses an `If-Match` header value.
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        if s.trim() == "*" {
            Ok(IfMatch::Any)
        } else {
            Etag::parse(s).map(IfMatch::Etag)
        }
    }

    /// Whether a resource whose current ETag is `current` satisfies this precondition.
    pub fn matches(&self, current: &Etag) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Etag(e) => e == current,
        }
    }
}

/// An `api-version` value. Known versions have named variants; any other `YYYY-MM-DD[-suffix]` is kept as
/// [`ApiVersion::Other`] (spec §1.2: accept any version).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiVersion {
    /// 2017-08-31-preview (very old C SDK).
    V2017_08_31Preview,
    /// 2017-11-15.
    V2017_11_15,
    /// 2018-04-01 (last "legacy" version, spec §9.4).
    V2018_04_01,
    /// 2018-09-01-preview (C SDK 1.2.x).
    V2018_09_01Preview,
    /// 2019-03-31 (C#, Python, Node, Java SDKs).
    V2019_03_31,
    /// 2021-06-01 (current C SDK, IoT Edge).
    V2021_06_01,
    /// 2021-10-01 (latest stable spec).
    V2021_10_01,
    /// 2025-07-01-preview (CSR / certificate issuance).
    V2025_07_01Preview,
    /// Any other well-formed version.
    Other(String),
}

impl ApiVersion {
    /// Parses an api-version value: `YYYY-MM-DD` optionally followed by `-suffix`.
    pub fn parse(s: &str) -> Result<Self, DpsError> {
        let known = match s {
            "2017-08-31-preview" => Some(ApiVersion::V2017_08_31Preview),
            "2017-11-15" => Some(ApiVersion::V2017_11_15),
            "2018-04-01" => Some(ApiVersion::V2018_04_01),
            "2018-09-01-preview" => Some(ApiVersion::V2018_09_01Preview),
            "2019-03-31" => Some(ApiVersion::V2019_03_31),
            "2021-06-01" => Some(ApiVersion::V2021_06_01),
            "2021-10-01" => Some(ApiVersion::V2021_10_01),
            "2025-07-01-preview" => Some(ApiVersion::V2025_07_01Preview),
            _ => None,
        };
        if let Some(v) = known {
            return Ok(v);
        }
        let b = s.as_bytes();
        let date_ok = b.len() >= 10
            && b[..10]
                .iter()
                .enumerate()
                .all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
            && (b.len() == 10
                || (b[10] == b'-' && b.len() <= 40 && b[11..].iter().all(|c| c.is_ascii_alphanumeric())));
        if !date_ok {
            return Err(DpsError::with_message(
                ErrorCode::InvalidApiVersion,
                format!(
                    "api-version '{}' is not of the form YYYY-MM-DD[-preview]",
                    s.chars().take(60).collect::<String>()
                ),
            ));
        }
        Ok(ApiVersion::Other(s.to_owned()))
    }

    /// The version string.
    pub fn as_str(&self) -> &str {
        match self {
            ApiVersion::V2017_08_31Preview => "2017-08-31-preview",
            ApiVersion::V2017_11_15 => "2017-11-15",
            ApiVersion::V2018_04_01 => "2018-04-01",
            ApiVersion::V2018_09_01Preview => "2018-09-01-preview",
            ApiVersion::V2019_03_31 => "2019-03-31",
            ApiVersion::V2021_06_01 => "2021-06-01",
            ApiVersion::V2021_10_01 => "2021-10-01",
            ApiVersion::V2025_07_01Preview => "2025-07-01-preview",
            ApiVersion::Other(s) => s,
        }
    }

    /// The date part, comparable as a string (`YYYY-MM-DD`).
    pub fn date(&self) -> &str {
        &self.as_str()[..10]
    }

    /// Versions up to 2018-04-01 get the legacy "sticky hub" reprovisioning behaviour (spec §9.4).
    pub fn is_legacy(&self) -> bool {
        self.date() <= "2018-04-01"
    }

    /// From 2019-04-15 on, re-provisioning to the same hub reports `reprovisionedToInitialAssignment`
    /// (spec §9.2); before that, `initialAssignment`.
    pub fn reports_reprovisioned_substatus(&self) -> bool {
        self.date() >= "2019-04-15"
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules() {
        for ok in ["a", "my-symkey-device", "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "A.b_c:d-", "x-", "0"] {
            assert!(RegistrationId::parse(ok).is_ok(), "{ok}");
        }
        let long_ok = "a".repeat(128);
        assert!(RegistrationId::parse(&long_ok).is_ok());
        for bad in ["", "-a", ".a", "a.", "a_", "a:", "a b", "a/b", "ä", &"a".repeat(129)] {
            let err = RegistrationId::parse(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidIdentifier, "{bad}");
        }
    }

    #[test]
    fn registration_id_is_case_insensitive_but_keeps_original() {
        let a = RegistrationId::parse("MyDev").unwrap();
        let b = RegistrationId::parse("mydev").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "MyDev");
        assert_eq!(a.key(), "mydev");
    }

    #[test]
    fn id_scope_rules() {
        let s = IdScope::parse("0ne000cbd6c").unwrap();
        assert_eq!(s, IdScope::parse("0NE000CBD6C").unwrap());
        assert_eq!(s.canonical(), "0ne000CBD6C");
        for bad in ["", "0ne0000000", "0ne000000000", "1ne00000000", "0ne0000000g"] {
            assert!(IdScope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::parse("dev$1@x'(y)").is_ok());
        assert!(DeviceId::parse("a b").is_err());
        assert!(DeviceId::parse("").is_err());
        assert_ne!(DeviceId::parse("A").unwrap(), DeviceId::parse("a").unwrap());
    }

    #[test]
    fn uuid_format() {
        let u = format_uuid([0xab; 16]);
        assert_eq!(u, "abababab-abab-4bab-abab-abababababab");
    }

    #[test]
    fn operation_id_format() {
        let id = OperationId::generate(0x316aac5bdc130deb, [7; 16]);
        assert!(id.as_str().starts_with("5.316aac5bdc130deb."), "{id}");
        assert!(OperationId::parse(id.as_str()).is_ok());
        assert!(OperationId::parse("a/b").is_err());
        assert!(OperationId::parse("a&b=c").is_err());
    }

    #[test]
    fn etag_and_if_match() {
        let e = Etag::parse("\"abc\"").unwrap();
        assert_eq!(e.as_str(), "abc");
        assert_eq!(Etag::parse("W/\"abc\"").unwrap(), e);
        assert_eq!(Etag::parse("abc").unwrap(), e);
        assert!(IfMatch::parse("*").unwrap().matches(&e));
        assert!(IfMatch::parse("abc").unwrap().matches(&e));
        assert!(!IfMatch::parse("abd").unwrap().matches(&e));
        let g = Etag::generate([1; 16]);
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD.decode(g.as_str()).unwrap();
        assert!(raw.starts_with(b"\"") && raw.ends_with(b"\""));
    }

    #[test]
    fn api_versions() {
        assert_eq!(ApiVersion::parse("2019-03-31").unwrap(), ApiVersion::V2019_03_31);
        assert!(ApiVersion::parse("2018-04-01").unwrap().is_legacy());
        assert!(!ApiVersion::parse("2019-03-31").unwrap().is_legacy());
        assert!(!ApiVersion::parse("2019-03-31").unwrap().reports_reprovisioned_substatus());
        assert!(ApiVersion::parse("2021-06-01").unwrap().reports_reprovisioned_substatus());
        let other = ApiVersion::parse("2026-11-02-preview").unwrap();
        assert_eq!(other.as_str(), "2026-11-02-preview");
        assert!(ApiVersion::parse("latest").is_err());
        assert!(ApiVersion::parse("2019-3-31").is_err());
    }
}
