//! SharedAccessSignature tokens (spec §4 device SAS, §5.1 service SAS).
//!
//! A token looks like
//! `SharedAccessSignature sr={resource}&sig={url-encoded base64}&se={expiry}[&skn={name}]`.
//! The signature is HMAC-SHA256 over `{sr as transmitted}` + `"\n"` + `{se as transmitted}`: clients encode
//! the resource differently (lowercase `%2f`, uppercase `%2F` or not at all, spec §4.2), so the raw `sr` is
//! kept for signing and only decoded for the audience check.
//!
//! Device tokens use the resource `{idScope}/registrations/{registrationId}` ([`device_resource`]); service
//! tokens use the host name as resource and the shared access policy name as `skn`, and are verified against
//! the target `host` or `host/path`.
//!
//! ```
//! use dps_proto::sas::{build_token, device_resource, encode_resource, SasToken, SymmetricKey};
//! use dps_proto::Timestamp;
//!
//! # fn main() -> Result<(), dps_proto::DpsError> {
//! let key = SymmetricKey::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")?;
//! let resource = device_resource("0ne00000000", "mydev");
//! let header = build_token(&key, &encode_resource(&resource), 1_700_000_000, Some("registration"));
//!
//! let token = SasToken::parse(&header)?;
//! let now = Timestamp::from_unix_seconds(1_699_999_000);
//! assert_eq!(token.verify(now, &resource, &[&key])?, 0);
//! # Ok(())
//! # }
//! ```

use crate::error::{DpsError, ErrorCode};
use crate::time::Timestamp;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The word that starts an `Authorization` header carrying a SAS token.
pub const SAS_PREFIX: &str = "SharedAccessSignature";

/// Seconds of clock skew tolerated after a token's expiry (spec §4.2 rule 5).
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Characters left unencoded by [`encode_resource`]: RFC 3986 unreserved `A-Z a-z 0-9 - . _ ~`.
const ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Standard alphabet, padding optional: accepts `sig` values whose `=` was dropped.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The smallest accepted symmetric key, in decoded bytes (spec §4.3).
pub const MIN_KEY_BYTES: usize = 16;
/// The largest accepted symmetric key, in decoded bytes (spec §4.3).
pub const MAX_KEY_BYTES: usize = 64;

/// An HMAC-SHA256 instance keyed with `key`.
///
/// HMAC takes keys of any length (RFC 2104): longer than the 64-byte SHA-256 block they are hashed first,
/// shorter they are zero-padded. Doing that here gives exactly the block-sized key HMAC would use, which
/// lets us call the infallible `KeyInit::new` instead of handling an error `new_from_slice` never returns.
fn keyed_mac(key: &[u8]) -> HmacSha256 {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <HmacSha256 as hmac::digest::KeyInit>::new(&block.into())
}

/// A symmetric key (device key, group key or shared access policy key).
///
/// `Debug` never prints the key material.
#[derive(Clone)]
pub struct SymmetricKey {
    bytes: Vec<u8>,
}

impl SymmetricKey {
    /// Parses a key as stored and exchanged: standard base64 with padding, decoding to 16 to 64 bytes.
    ///
    /// Fails with [`ErrorCode::InvalidEnrollment`] (keys are validated when enrollments are written).
    pub fn parse(b64: &str) -> Result<Self, DpsError> {
        let bytes = STANDARD.decode(b64).map_err(|e| {
            DpsError::with_message(
                ErrorCode::InvalidEnrollment,
                format!("the symmetric key is not valid base64 (standard alphabet with padding): {e}"),
            )
        })?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
            return Err(DpsError::with_message(
                ErrorCode::InvalidEnrollment,
                format!(
                    "the symmetric key decodes to {} bytes; it must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes",
                    bytes.len()
                ),
            ));
        }
        Ok(SymmetricKey { bytes })
    }

    /// Wraps raw key bytes (no length check: HMAC accepts any key length).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        SymmetricKey { bytes }
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The key as standard base64 with padding (the form stored in enrollments).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.bytes)
    }

    /// The device key derived from this enrollment-group key (spec §4.3):
    /// HMAC-SHA256(key = group key bytes, message = UTF-8 registration ID), 32 bytes.
    ///
    /// The registration ID must be passed exactly as the device sent it: the result depends on its case.
    pub fn derive_device_key(&self, registration_id: &str) -> SymmetricKey {
        SymmetricKey { bytes: self.sign(registration_id).to_vec() }
    }

    /// HMAC-SHA256 of `string_to_sign` under this key.
    pub fn sign(&self, string_to_sign: &str) -> [u8; 32] {
        let mut mac = keyed_mac(&self.bytes);
        mac.update(string_to_sign.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SymmetricKey(<{} bytes redacted>)", self.bytes.len())
    }
}

impl PartialEq for SymmetricKey {
    /// Compares keys without an early exit on the first differing byte.
    fn eq(&self, other: &Self) -> bool {
        self.bytes.len() == other.bytes.len()
            && self.bytes.iter().zip(&other.bytes).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}
impl Eq for SymmetricKey {}

/// A parsed SharedAccessSignature token.
///
/// `Debug` shows the resource, expiry and key name but not the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as transmitted (still percent-encoded, if it was).
    resource_raw: String,
    /// `sig` after percent- and base64-decoding.
    signature: [u8; 32],
    /// `se` exactly as transmitted (part of the string to sign).
    expiry_raw: String,
    /// `se` as seconds since the Unix epoch.
    expiry: i64,
    /// `skn`, percent-decoded; `None` when absent or empty.
    key_name: Option<String>,
}

fn malformed(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::MalformedToken, message)
}

/// Shortens client-supplied text for inclusion in an error message.
fn shown(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() > MAX {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    } else {
        s.to_owned()
    }
}

impl SasToken {
    /// Parses a token from an `Authorization` header value or an MQTT password.
    ///
    /// The `SharedAccessSignature` prefix word is optional and matched case-insensitively. Fields are split
    /// on `&` and then on the first `=`; names are case-insensitive and may come in any order; `sr`, `sig`
    /// and `se` are required, `skn` is optional (empty counts as absent), unknown fields are ignored and a
    /// repeated field is an error. Every failure is [`ErrorCode::MalformedToken`].
    pub fn parse(value: &str) -> Result<SasToken, DpsError> {
        let mut words = value.split_whitespace();
        let first = words.next().ok_or_else(|| malformed("the SAS token is empty"))?;
        let fields_text = if first.eq_ignore_ascii_case(SAS_PREFIX) {
            words
                .next()
                .ok_or_else(|| malformed("the SAS token has no fields after 'SharedAccessSignature'"))?
        } else {
            first
        };
        if words.next().is_some() {
            return Err(malformed(
                "the SAS token must be 'SharedAccessSignature sr=…&sig=…&se=…' with no other words",
            ));
        }

        let mut sr: Option<&str> = None;
        let mut sig: Option<&str> = None;
        let mut se: Option<&str> = None;
        let mut skn: Option<&str> = None;
        let mut seen_unknown: Vec<String> = Vec::new();
        for field in fields_text.split('&').filter(|f| !f.is_empty()) {
            let (name, val) = field
                .split_once('=')
                .ok_or_else(|| malformed(format!("the SAS token field '{}' has no '='", shown(field))))?;
            let slot = match name.to_ascii_lowercase().as_str() {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => {
                    if seen_unknown.iter().any(|n| n == other) {
                        return Err(malformed(format!(
                            "the SAS token field '{}' appears more than once",
                            shown(name)
                        )));
                    }
                    seen_unknown.push(other.to_owned());
                    continue;
                }
            };
            if slot.is_some() {
                return Err(malformed(format!(
                    "the SAS token field '{}' appears more than once",
                    shown(name)
                )));
            }
            *slot = Some(val);
        }

        let resource_raw = sr.ok_or_else(|| malformed("the SAS token has no 'sr' (resource) field"))?;
        if resource_raw.is_empty() {
            return Err(malformed("the SAS token's 'sr' (resource) field is empty"));
        }
        let sig = sig.ok_or_else(|| malformed("the SAS token has no 'sig' (signature) field"))?;
        let expiry_raw = se.ok_or_else(|| malformed("the SAS token has no 'se' (expiry) field"))?;

        let sig_bytes: Vec<u8> = percent_decode_str(sig).collect();
        let decoded = LENIENT_BASE64
            .decode(&sig_bytes)
            .map_err(|e| malformed(format!("the SAS token's 'sig' is not valid base64: {e}")))?;
        let signature: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "the SAS token's 'sig' decodes to {} bytes; an HMAC-SHA256 signature is 32 bytes",
                decoded.len()
            ))
        })?;

        let se_text = percent_decode_str(expiry_raw).decode_utf8_lossy();
        let expiry = if !se_text.is_empty() && se_text.bytes().all(|b| b.is_ascii_digit()) {
            se_text.parse::<i64>().ok()
        } else {
            None
        }
        .ok_or_else(|| {
            malformed(format!(
                "the SAS token's 'se' ('{}') is not an expiry time in whole seconds since 1970",
                shown(&se_text)
            ))
        })?;

        let key_name =
            skn.map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned()).filter(|s| !s.is_empty());

        Ok(SasToken {
            resource_raw: resource_raw.to_owned(),
            signature,
            expiry_raw: expiry_raw.to_owned(),
            expiry,
            key_name,
        })
    }

    /// `sr` exactly as transmitted (the signed form).
    pub fn resource_raw(&self) -> &str {
        &self.resource_raw
    }

    /// `sr` with `%xx` escapes decoded (`+` is left as is).
    pub fn resource_decoded(&self) -> String {
        percent_decode_str(&self.resource_raw).decode_utf8_lossy().into_owned()
    }

    /// The expiry, seconds since the Unix epoch.
    pub fn expiry(&self) -> i64 {
        self.expiry
    }

    /// The key name (`skn`): the shared access policy for service tokens, usually `registration` for
    /// device tokens. `None` when absent or empty.
    pub fn key_name(&self) -> Option<&str> {
        self.key_name.as_deref()
    }

    /// Whether the token has expired at `now`, allowing [`MAX_CLOCK_SKEW_SECS`] of clock skew:
    /// expired iff `se + 300 < now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expiry.saturating_add(MAX_CLOCK_SKEW_SECS) < now.unix_seconds()
    }

    /// Whether the signature is HMAC-SHA256(key, raw `sr` + `"\n"` + `se` as transmitted), compared in
    /// constant time.
    pub fn signature_matches(&self, key: &SymmetricKey) -> bool {
        let mut mac = keyed_mac(key.as_bytes());
        mac.update(self.resource_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.expiry_raw.as_bytes());
        mac.verify_slice(&self.signature).is_ok()
    }

    /// Whether the token's audience covers `target`: the decoded `sr`, trailing `/` trimmed, equals `target`
    /// ignoring ASCII case, or is a prefix of it ending at a `/` (prefix by path segment).
    pub fn audience_matches(&self, target: &str) -> bool {
        let decoded = self.resource_decoded();
        let audience = decoded.trim_end_matches('/').as_bytes();
        let target = target.as_bytes();
        if audience.is_empty() || target.len() < audience.len() {
            return false;
        }
        let (head, tail) = target.split_at(audience.len());
        head.eq_ignore_ascii_case(audience) && (tail.is_empty() || tail[0] == b'/')
    }

    /// Verifies the token for `target` at `now` against `keys` (primary first, then secondary), returning
    /// the index of the first key that produced the signature.
    ///
    /// Checks in order: expiry ([`ErrorCode::TokenExpired`]), audience ([`ErrorCode::Unauthorized`]), then
    /// the keys ([`ErrorCode::Unauthorized`] when none matches).
    pub fn verify(&self, now: Timestamp, target: &str, keys: &[&SymmetricKey]) -> Result<usize, DpsError> {
        if self.is_expired(now) {
            return Err(DpsError::with_message(
                ErrorCode::TokenExpired,
                format!(
                    "the SAS token expired at {} (now {}, {MAX_CLOCK_SKEW_SECS} s clock skew allowed)",
                    self.expiry,
                    now.unix_seconds()
                ),
            ));
        }
        if !self.audience_matches(target) {
            return Err(DpsError::with_message(
                ErrorCode::Unauthorized,
                format!(
                    "the SAS token's resource '{}' does not match '{}'",
                    shown(&self.resource_decoded()),
                    shown(target)
                ),
            ));
        }
        keys.iter().position(|k| self.signature_matches(k)).ok_or_else(|| {
            DpsError::with_message(
                ErrorCode::Unauthorized,
                "the SAS token's signature does not match any key",
            )
        })
    }
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource_raw)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// The device-API resource (audience) `{idScope}/registrations/{registrationId}`, not encoded.
pub fn device_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// Percent-encodes everything but the RFC 3986 unreserved characters `A-Z a-z 0-9 - . _ ~`, with uppercase
/// hex digits (like .NET `Uri.EscapeDataString`).
pub fn encode_resource(resource: &str) -> String {
    utf8_percent_encode(resource, ENCODE_SET).to_string()
}

/// Builds a token `SharedAccessSignature sr={sr_as_sent}&sig={url-encoded base64}&se={expiry}[&skn={name}]`,
/// signing `sr_as_sent` exactly as given (encode it first with [`encode_resource`] if wanted).
///
/// `Some("")` as key name produces an empty `skn=` field (as the Java SDK sends).
pub fn build_token(key: &SymmetricKey, sr_as_sent: &str, expiry: i64, key_name: Option<&str>) -> String {
    let signature = key.sign(&format!("{sr_as_sent}\n{expiry}"));
    let sig = encode_resource(&STANDARD.encode(signature));
    let mut token = format!("{SAS_PREFIX} sr={sr_as_sent}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode_resource(name));
    }
    token
}

/// A service connection string, `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (spec §5.1): the
/// service API's host (the audience of its SAS tokens), a shared access policy and one of its keys.
#[derive(Debug, Clone)]
pub struct ConnectionString {
    /// `HostName`.
    pub host_name: String,
    /// `SharedAccessKeyName` (the policy).
    pub key_name: String,
    /// `SharedAccessKey`.
    pub key: SymmetricKey,
}

impl ConnectionString {
    /// Parses a connection string: parts separated by `;`, names case-insensitive and in any order, values
    /// split at the first `=` (base64 keys end in `=`), unknown parts ignored. Errors are
    /// [`ErrorCode::BadRequest`] naming what is missing or wrong.
    pub fn parse(s: &str) -> Result<ConnectionString, DpsError> {
        let bad = |m: String| DpsError::with_message(ErrorCode::BadRequest, m);
        let (mut host, mut name, mut key) = (None, None, None);
        for part in s.trim().split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("connection string part '{part}' is not Name=Value")))?;
            match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.trim().to_owned()),
                "sharedaccesskeyname" => name = Some(v.trim().to_owned()),
                "sharedaccesskey" => key = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        let missing = |what: &str| bad(format!("the connection string has no {what}"));
        let host_name = host.filter(|h| !h.is_empty()).ok_or_else(|| missing("HostName"))?;
        let key_name = name.filter(|n| !n.is_empty()).ok_or_else(|| missing("SharedAccessKeyName"))?;
        let key = key.ok_or_else(|| missing("SharedAccessKey"))?;
        let key = SymmetricKey::parse(&key).map_err(|e| {
            bad(format!("the connection string's SharedAccessKey is not valid: {}", e.message))
        })?;
        Ok(ConnectionString { host_name, key_name, key })
    }

    /// A service SAS token for this policy (`sr` = host, `skn` = policy) expiring at `expiry` (Unix seconds).
    pub fn token(&self, expiry: i64) -> String {
        build_token(&self.key, &encode_resource(&self.host_name), expiry, Some(&self.key_name))
    }
}

impl std::fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name,
            self.key_name,
            self.key.to_base64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let k = SymmetricKey::from_bytes(vec![3; 32]);
        let text = format!(
            "sharedaccesskeyname=owner; HostName=dps.example ;SharedAccessKey={};Extra=1",
            k.to_base64()
        );
        let cs = ConnectionString::parse(&text).unwrap();
        assert_eq!((cs.host_name.as_str(), cs.key_name.as_str()), ("dps.example", "owner"));
        assert_eq!(cs.key.as_bytes(), k.as_bytes());
        let again = ConnectionString::parse(&cs.to_string()).unwrap();
        assert_eq!(again.to_string(), cs.to_string());
        let t = SasToken::parse(&cs.token(1_700_000_000)).unwrap();
        assert_eq!(t.key_name(), Some("owner"));
        assert!(t
            .verify(Timestamp::from_unix_seconds(1_699_999_000), "dps.example/enrollments/x", &[&k])
            .is_ok());
        for bad in [
            "",
            "garbage",
            "HostName=x;SharedAccessKeyName=y",
            "HostName=x;SharedAccessKeyName=y;SharedAccessKey=!!",
        ] {
            assert_eq!(ConnectionString::parse(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
    }

    const K: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const SE: i64 = 1_700_000_000;
    const TARGET: &str = "0ne00000000/registrations/mydev";

    fn key() -> SymmetricKey {
        SymmetricKey::parse(K).unwrap()
    }

    fn other_key() -> SymmetricKey {
        SymmetricKey::from_bytes(vec![0x55; 32])
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_unix_seconds(secs)
    }

    fn sig_b64(key: &SymmetricKey, sr: &str, se: &str) -> String {
        STANDARD.encode(key.sign(&format!("{sr}\n{se}")))
    }

    fn code_of(r: Result<SasToken, DpsError>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn key_parse_limits() {
        assert_eq!(key().as_bytes(), (0u8..32).collect::<Vec<_>>());
        assert_eq!(key().to_base64(), K);
        let k16 = STANDARD.encode([1u8; 16]);
        let k64 = STANDARD.encode([1u8; 64]);
        assert_eq!(SymmetricKey::parse(&k16).unwrap().as_bytes().len(), 16);
        assert_eq!(SymmetricKey::parse(&k64).unwrap().as_bytes().len(), 64);
        for bad in [
            STANDARD.encode([1u8; 15]),
            STANDARD.encode([1u8; 65]),
            String::new(),
            "not base64!".to_owned(),
            K.trim_end_matches('=').to_owned(),
        ] {
            let err = SymmetricKey::parse(&bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnrollment, "{bad}");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn key_debug_is_redacted() {
        let shown = format!("{:?}", key());
        assert!(!shown.contains(K), "{shown}");
        assert!(!shown.contains("0, 1, 2"), "{shown}");
        assert!(shown.contains("32 bytes"), "{shown}");
        let token = SasToken::parse(&build_token(&key(), TARGET, SE, None)).unwrap();
        assert!(!format!("{token:?}").contains("sig"));
    }

    #[test]
    fn key_equality() {
        assert_eq!(key(), SymmetricKey::from_bytes((0u8..32).collect()));
        assert_ne!(key(), other_key());
        assert_ne!(key(), SymmetricKey::from_bytes((0u8..31).collect()));
    }

    #[test]
    fn hmac_matches_the_hmac_crate_for_all_key_lengths() {
        for len in [0usize, 1, 16, 32, 63, 64, 65, 100, 200] {
            let k: Vec<u8> = (0..len).map(|i| i as u8 ^ 0xa5).collect();
            let mut reference = HmacSha256::new_from_slice(&k).unwrap();
            reference.update(b"message");
            let expected: [u8; 32] = reference.finalize().into_bytes().into();
            assert_eq!(SymmetricKey::from_bytes(k).sign("message"), expected, "key length {len}");
        }
    }

    #[test]
    fn appendix_b_device_vectors() {
        let k = key();
        for (sr, sig) in [
            ("0ne00000000%2fregistrations%2fmydev", "YnsSUB4zfA9sbETp0HbhGEOsj3K3PokHMJnuJw/vMUA="),
            ("0ne00000000%2Fregistrations%2Fmydev", "1GdazlZ/vhIA3+FbPXZBtB2/zKD/sPCa1e3oJAUblAo="),
            ("0ne00000000/registrations/mydev", "isWfJMASrv1j1Qp3HkU56pttjT9w/L4hy2wtJwNm2jQ="),
        ] {
            assert_eq!(sig_b64(&k, sr, "1700000000"), sig, "{sr}");
            let header = build_token(&k, sr, SE, Some("registration"));
            assert!(header.contains(&format!("sig={}", encode_resource(sig))), "{header}");
            let token = SasToken::parse(&header).unwrap();
            assert_eq!(token.resource_raw(), sr);
            assert_eq!(token.resource_decoded(), TARGET);
            assert_eq!(token.verify(at(SE), TARGET, &[&k]), Ok(0));
        }
        assert_eq!(
            encode_resource("YnsSUB4zfA9sbETp0HbhGEOsj3K3PokHMJnuJw/vMUA="),
            "YnsSUB4zfA9sbETp0HbhGEOsj3K3PokHMJnuJw%2FvMUA%3D"
        );
    }

    #[test]
    fn appendix_b_service_vector() {
        let host = "mydps.azure-devices-provisioning.net";
        assert_eq!(sig_b64(&key(), host, "1700000000"), "+5V0HFPIoMYrcltM2Jj4oxVByh5pkp677OYUHTEHW70=");
        let token =
            SasToken::parse(&build_token(&key(), host, SE, Some("provisioningserviceowner"))).unwrap();
        assert_eq!(token.key_name(), Some("provisioningserviceowner"));
        assert_eq!(token.verify(at(SE), host, &[&key()]), Ok(0));
        assert_eq!(token.verify(at(SE), &format!("{host}/enrollments/x"), &[&key()]), Ok(0));
        assert_eq!(token.verify(at(SE), "MYDPS.azure-devices-provisioning.net", &[&key()]), Ok(0));
    }

    #[test]
    fn derived_keys() {
        assert_eq!(
            key().derive_device_key("mydev").to_base64(),
            "nRyyOl5i2cQOKWnFy5SDmETKok92rPMz3KrfVSKXisI="
        );
        let g1 = SymmetricKey::parse(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        )
        .unwrap();
        assert_eq!(
            g1.derive_device_key("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").to_base64(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
        let g2 = SymmetricKey::parse(
            "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==",
        )
        .unwrap();
        assert_eq!(
            g2.derive_device_key("breakroom499-contoso-tstrsd-007").to_base64(),
            "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs="
        );
        assert_eq!(
            g2.derive_device_key("mainbuilding167-contoso-hpsd-088").to_base64(),
            "6uejA9PfkQgmYylj8Zerp3kcbeVrGZ172YLa7VSnJzg="
        );
        assert_eq!(g2.derive_device_key("x").as_bytes().len(), 32);
        // The derivation is over the exact bytes: case matters.
        assert_ne!(key().derive_device_key("MyDev"), key().derive_device_key("mydev"));
    }

    /// Builds a header from explicit parts so every client layout of spec §4.2 can be written out.
    fn header(prefix: &str, fields: &[(&str, &str)]) -> String {
        let body: Vec<String> = fields.iter().map(|(n, v)| format!("{n}={v}")).collect();
        format!("{prefix}{}", body.join("&"))
    }

    #[test]
    fn client_variants_of_section_4_2() {
        let k = key();
        let lower = "0ne00000000%2fregistrations%2fmydev";
        let upper = "0ne00000000%2Fregistrations%2Fmydev";
        let raw = "0ne00000000/registrations/mydev";
        let sig = |sr: &str| encode_resource(&sig_b64(&k, sr, "1700000000"));
        let (sl, su, sraw) = (sig(lower), sig(upper), sig(raw));
        let p = "SharedAccessSignature ";
        let cases: Vec<(&str, String, Option<&str>)> = vec![
            // C-SDK: lowercase hex, sr,sig,se,skn.
            (
                "c",
                header(p, &[("sr", lower), ("sig", &sl), ("se", "1700000000"), ("skn", "registration")]),
                Some("registration"),
            ),
            // C#: uppercase hex, sr,sig,se,skn.
            (
                "cs",
                header(p, &[("sr", upper), ("sig", &su), ("se", "1700000000"), ("skn", "registration")]),
                Some("registration"),
            ),
            // Python: no skn.
            ("py", header(p, &[("sr", upper), ("sig", &su), ("se", "1700000000")]), None),
            // Node symmetric key: raw sr, sr,sig,skn,se.
            (
                "node",
                header(p, &[("sr", raw), ("sig", &sraw), ("skn", "registration"), ("se", "1700000000")]),
                Some("registration"),
            ),
            // Node TPM: uppercase, sr,sig,skn,se.
            (
                "node-tpm",
                header(p, &[("sr", upper), ("sig", &su), ("skn", "registration"), ("se", "1700000000")]),
                Some("registration"),
            ),
            // Java: raw sr, empty skn.
            ("java", header(p, &[("sr", raw), ("sig", &sraw), ("se", "1700000000"), ("skn", "")]), None),
            // Prefix casing and no prefix at all (MQTT password).
            (
                "prefix-lower",
                header("sharedaccesssignature ", &[("sr", upper), ("sig", &su), ("se", "1700000000")]),
                None,
            ),
            (
                "prefix-upper",
                header("SHAREDACCESSSIGNATURE  ", &[("sr", upper), ("sig", &su), ("se", "1700000000")]),
                None,
            ),
            ("no-prefix", header("", &[("sr", upper), ("sig", &su), ("se", "1700000000")]), None),
            // Field names in other cases.
            (
                "names",
                header(p, &[("SR", upper), ("Sig", &su), ("sE", "1700000000"), ("SKN", "x")]),
                Some("x"),
            ),
            // Unknown fields and trailing separators are ignored.
            (
                "unknown",
                header(p, &[("sr", upper), ("foo", "bar"), ("sig", &su), ("se", "1700000000&")]),
                None,
            ),
        ];
        for (name, value, skn) in cases {
            let token = SasToken::parse(&value).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(token.expiry(), SE, "{name}");
            assert_eq!(token.key_name(), skn, "{name}");
            assert_eq!(token.resource_decoded(), TARGET, "{name}");
            assert_eq!(token.verify(at(SE), TARGET, &[&k]), Ok(0), "{name}");
        }
    }

    #[test]
    fn iis_lowercase_audience() {
        // IoT Identity Service lowercases the audience before encoding: the scope's hex digits change case.
        let k = key();
        let sr = encode_resource("0ne000cbd6c/registrations/mydev");
        let token = SasToken::parse(&build_token(&k, &sr, SE, Some("registration"))).unwrap();
        assert_eq!(token.verify(at(SE), "0ne000CBD6C/registrations/mydev", &[&k]), Ok(0));
        assert_eq!(token.verify(at(SE), "0ne000CBD6C/registrations/MyDev", &[&k]), Ok(0));
    }

    #[test]
    fn expiry_boundary() {
        let token = SasToken::parse(&build_token(&key(), TARGET, SE, None)).unwrap();
        assert!(!token.is_expired(at(SE)));
        assert!(!token.is_expired(at(SE + 300)));
        assert!(!token.is_expired(Timestamp::from_unix_seconds(SE + 300).plus_millis(999)));
        assert!(token.is_expired(at(SE + 301)));
        assert_eq!(token.verify(at(SE + 300), TARGET, &[&key()]), Ok(0));
        let err = token.verify(at(SE + 301), TARGET, &[&key()]).unwrap_err();
        assert_eq!(err.code, ErrorCode::TokenExpired);
        // Expiry is checked before anything else.
        assert_eq!(token.verify(at(SE + 301), "elsewhere", &[]).unwrap_err().code, ErrorCode::TokenExpired);
        // No overflow at the extremes.
        let far = SasToken::parse(&build_token(&key(), TARGET, i64::MAX, None)).unwrap();
        assert!(!far.is_expired(at(i64::MAX / 1_000_000_000)));
    }

    #[test]
    fn wrong_key_and_secondary_key() {
        let token = SasToken::parse(&build_token(&key(), TARGET, SE, Some("registration"))).unwrap();
        let err = token.verify(at(SE), TARGET, &[&other_key()]).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
        assert!(err.message.contains("signature"), "{}", err.message);
        assert_eq!(token.verify(at(SE), TARGET, &[&other_key(), &key()]), Ok(1));
        assert_eq!(token.verify(at(SE), TARGET, &[]).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(!token.signature_matches(&other_key()));
        assert!(token.signature_matches(&key()));
    }

    #[test]
    fn signature_is_over_the_raw_sr_and_se() {
        let k = key();
        let upper = "0ne00000000%2Fregistrations%2Fmydev";
        let lower = "0ne00000000%2fregistrations%2fmydev";
        // A signature made over the uppercase form does not verify for the lowercase form.
        let forged = format!("sr={lower}&sig={}&se={SE}", encode_resource(&sig_b64(&k, upper, "1700000000")));
        assert!(!SasToken::parse(&forged).unwrap().signature_matches(&k));
        // se is signed as transmitted: a leading zero changes the string to sign but not the expiry.
        let padded =
            format!("sr={upper}&sig={}&se=01700000000", encode_resource(&sig_b64(&k, upper, "01700000000")));
        let token = SasToken::parse(&padded).unwrap();
        assert_eq!(token.expiry(), SE);
        assert!(token.signature_matches(&k));
        // Percent-encoded se digits decode to the same expiry, signed as sent.
        let enc = format!(
            "sr={upper}&sig={}&se=%31700000000",
            encode_resource(&sig_b64(&k, upper, "%31700000000"))
        );
        let token = SasToken::parse(&enc).unwrap();
        assert_eq!(token.expiry(), SE);
        assert!(token.signature_matches(&k));
    }

    #[test]
    fn sig_may_be_unencoded_or_unpadded() {
        let k = key();
        let raw_sig = sig_b64(&k, TARGET, "1700000000");
        let plain = format!("sr={TARGET}&sig={raw_sig}&se={SE}");
        assert!(SasToken::parse(&plain).unwrap().signature_matches(&k));
        let unpadded = format!("sr={TARGET}&sig={}&se={SE}", raw_sig.trim_end_matches('='));
        assert!(SasToken::parse(&unpadded).unwrap().signature_matches(&k));
    }

    #[test]
    fn audience_rules() {
        let make = |sr: &str| SasToken::parse(&build_token(&key(), sr, SE, None)).unwrap();
        let t = make("0ne00000000%2Fregistrations%2Fmydev");
        assert!(t.audience_matches(TARGET));
        assert!(t.audience_matches("0NE00000000/REGISTRATIONS/MYDEV"));
        assert!(t.audience_matches("0ne00000000/registrations/mydev/"));
        assert!(t.audience_matches("0ne00000000/registrations/mydev/register"));
        assert!(!t.audience_matches("0ne00000000/registrations/mydev2"));
        assert!(!t.audience_matches("0ne00000000/registrations/other"));
        assert!(!t.audience_matches("0ne00000000/registrations"));
        assert!(!t.audience_matches(""));
        assert!(make("0ne00000000%2Fregistrations%2Fmydev%2F").audience_matches(TARGET));
        assert!(make("host.example").audience_matches("host.example/enrollments/a"));
        assert!(!make("host.example").audience_matches("host.example.evil/enrollments/a"));
        assert!(!make("%2F").audience_matches("/anything"));
        assert!(!make("%2F").audience_matches(""));

        let err = t.verify(at(SE), "0ne00000000/registrations/other", &[&key()]).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
        assert!(err.message.contains("does not match"), "{}", err.message);
        assert!(err.message.contains("0ne00000000/registrations/mydev"), "{}", err.message);
    }

    #[test]
    fn malformed_tokens() {
        let k = key();
        let good_sig = encode_resource(&sig_b64(&k, TARGET, "1700000000"));
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("blank", "   ".to_owned()),
            ("prefix only", "SharedAccessSignature".to_owned()),
            ("garbage", "garbage".to_owned()),
            ("other scheme", format!("Bearer sr={TARGET}&sig={good_sig}&se={SE}")),
            ("extra words", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se={SE} more")),
            ("missing sig", format!("SharedAccessSignature sr={TARGET}&se={SE}")),
            ("missing sr", format!("SharedAccessSignature sig={good_sig}&se={SE}")),
            ("missing se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}")),
            ("empty sr", format!("SharedAccessSignature sr=&sig={good_sig}&se={SE}")),
            ("bad base64", format!("SharedAccessSignature sr={TARGET}&sig=%%%not-base64!&se={SE}")),
            ("short sig", format!("SharedAccessSignature sr={TARGET}&sig=AAAA&se={SE}")),
            ("empty sig", format!("SharedAccessSignature sr={TARGET}&sig=&se={SE}")),
            ("non-numeric se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se=soon")),
            ("negative se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se=-5")),
            ("fraction se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se=1.5")),
            ("empty se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se=")),
            ("huge se", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se=99999999999999999999")),
            ("no equals", format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se={SE}&skn")),
            ("duplicate sr", format!("SharedAccessSignature sr={TARGET}&sr={TARGET}&sig={good_sig}&se={SE}")),
            (
                "duplicate mixed case",
                format!("SharedAccessSignature sr={TARGET}&sig={good_sig}&se={SE}&SE={SE}"),
            ),
            (
                "duplicate unknown",
                format!("SharedAccessSignature sr={TARGET}&a=1&sig={good_sig}&A=2&se={SE}"),
            ),
        ];
        for (name, value) in cases {
            let err = SasToken::parse(&value).unwrap_err();
            assert_eq!(err.code, ErrorCode::MalformedToken, "{name}: {err}");
            assert!(err.message.len() > 10, "{name}: {err}");
        }
        assert!(SasToken::parse(&format!("sr={TARGET}&sig=AAAA&se={SE}"))
            .unwrap_err()
            .message
            .contains("32 bytes"));
        assert!(code_of(SasToken::parse("sr=a&sig=b")) == ErrorCode::MalformedToken);
    }

    #[test]
    fn build_token_layout() {
        let t = build_token(&key(), "a%2Fb", 5, Some("registration"));
        assert!(t.starts_with("SharedAccessSignature sr=a%2Fb&sig="), "{t}");
        assert!(t.ends_with("&se=5&skn=registration"), "{t}");
        assert!(build_token(&key(), "a", 5, None).ends_with("&se=5"));
        assert!(build_token(&key(), "a", 5, Some("")).ends_with("&se=5&skn="));
    }

    #[test]
    fn resource_helpers() {
        assert_eq!(device_resource("0ne00000000", "mydev"), TARGET);
        assert_eq!(encode_resource(TARGET), "0ne00000000%2Fregistrations%2Fmydev");
        assert_eq!(encode_resource("a-b.c_d~e f:g/h+i"), "a-b.c_d~e%20f%3Ag%2Fh%2Bi");
        assert_eq!(encode_resource("é"), "%C3%A9");
    }
}
