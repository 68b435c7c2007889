//! The [`Sealer`]: AES-256-GCM under the data keys, in the `sealed:v1:` text format.

use crate::provider::DataKey;
use crate::{random, SealError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use std::collections::HashMap;
use std::fmt;

/// What every sealed value starts with.
pub const SEALED_PREFIX: &str = "sealed:";

const V1: &str = "sealed:v1:";
const TAG_LEN: usize = 16;

/// Whether `text` is a sealed value (rather than a plain one written before encryption at rest).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

/// Seals and unseals values with the data keys it holds, by key ID; new values are sealed with the active
/// key. Cheap to share (`Arc<Sealer>`); every method takes `&self`.
pub struct Sealer {
    keys: HashMap<String, LessSafeKey>,
    active: String,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Sealer").field("active", &self.active).field("keys", &ids).finish()
    }
}

/// The associated data: a version tag, then each part with its length, so that no two different lists
/// of parts give the same bytes.
fn associated_data(context: &[&str]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + context.iter().map(|p| p.len() + 4).sum::<usize>());
    aad.extend_from_slice(b"dps-seal v1");
    for part in context {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Sealer {
    /// A sealer holding `keys` (ID, key), sealing with `active`, which must be one of them.
    pub fn new(keys: Vec<(String, DataKey)>, active: &str) -> Result<Sealer, SealError> {
        let mut map = HashMap::new();
        for (id, key) in keys {
            if !valid_key_id(&id) {
                return Err(SealError::Keyring(format!("invalid data key ID '{id}'")));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, key.as_bytes())
                .map_err(|_| SealError::Keyring("unusable data key".into()))?;
            map.insert(id, LessSafeKey::new(unbound));
        }
        if !map.contains_key(active) {
            return Err(SealError::Keyring(format!("the active data key '{active}' is not in the keyring")));
        }
        Ok(Sealer { keys: map, active: active.to_owned() })
    }

    /// The ID of the data key new values are sealed with.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Seals `plain`, bound to `context` (where the value lives: e.g. `["enrollments", "<key>",
    /// "primaryKey"]`): only [`Sealer::open`] with the same context opens it.
    pub fn seal(&self, context: &[&str], plain: &[u8]) -> Result<String, SealError> {
        let key = self.keys.get(&self.active).ok_or_else(|| SealError::UnknownKey(self.active.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut buf = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(plain);
        let aad = associated_data(context);
        let (_, body) = buf.split_at_mut(NONCE_LEN);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), body)
            .map_err(|_| SealError::Format("sealing failed".into()))?;
        buf.extend_from_slice(tag.as_ref());
        let mut out = String::with_capacity(V1.len() + self.active.len() + 1 + buf.len() * 4 / 3 + 4);
        out.push_str(V1);
        out.push_str(&self.active);
        out.push(':');
        STANDARD_NO_PAD.encode_string(&buf, &mut out);
        Ok(out)
    }

    /// Seals a text value (see [`Sealer::seal`]).
    pub fn seal_str(&self, context: &[&str], plain: &str) -> Result<String, SealError> {
        self.seal(context, plain.as_bytes())
    }

    /// Opens a value [`Sealer::seal`] produced with the same `context`. A tampered value, one sealed for
    /// another context, or one under an unknown key is an error (never a panic).
    pub fn open(&self, context: &[&str], sealed: &str) -> Result<Vec<u8>, SealError> {
        let rest = sealed.strip_prefix(V1).ok_or_else(|| {
            if is_sealed(sealed) {
                SealError::Format("unknown sealed format version (written by a newer build?)".into())
            } else {
                SealError::Format("not a sealed value".into())
            }
        })?;
        let (id, body) =
            rest.split_once(':').ok_or_else(|| SealError::Format("missing the data key ID".into()))?;
        let key = self.keys.get(id).ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let mut buf = STANDARD_NO_PAD
            .decode(body.trim_end())
            .map_err(|_| SealError::Format("the ciphertext is not base64".into()))?;
        if buf.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Format("the ciphertext is too short".into()));
        }
        let (nonce, ciphertext) = buf.split_at_mut(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Format("bad nonce".into()))?;
        let aad = associated_data(context);
        let len = key
            .open_in_place(nonce, Aad::from(&aad), ciphertext)
            .map_err(|_| SealError::Open(context.join("/")))?
            .len();
        buf.drain(..NONCE_LEN);
        buf.truncate(len);
        Ok(buf)
    }

    /// Opens a sealed text value; a plain value (no `sealed:` prefix, written before encryption at rest)
    /// is returned as it is.
    pub fn open_str(&self, context: &[&str], text: &str) -> Result<String, SealError> {
        if !is_sealed(text) {
            return Ok(text.to_owned());
        }
        String::from_utf8(self.open(context, text)?)
            .map_err(|_| SealError::Format("the sealed value is not text".into()))
    }

    /// Opens the contents of a sealed file (`sealed:v1:…` and a newline); plain contents are returned as
    /// they are, with `false` (not sealed yet).
    pub fn open_file(&self, context: &[&str], contents: &[u8]) -> Result<(Vec<u8>, bool), SealError> {
        match std::str::from_utf8(contents) {
            Ok(text) if is_sealed(text) => Ok((self.open(context, text.trim_end())?, true)),
            _ => Ok((contents.to_vec(), false)),
        }
    }

    /// The contents of a sealed file holding `plain`.
    pub fn seal_file(&self, context: &[&str], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut text = self.seal(context, plain)?;
        text.push('\n');
        Ok(text.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(vec![("k1".into(), DataKey::from_bytes([5u8; 32]))], "k1").unwrap()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let s = sealer();
        let a = s.seal_str(&["t", "row", "f"], "secret").unwrap();
        let b = s.seal_str(&["t", "row", "f"], "secret").unwrap();
        assert!(a.starts_with("sealed:v1:k1:"));
        assert_ne!(a, b, "a fresh nonce per seal");
        assert!(!a.contains("secret"));
        assert_eq!(s.open_str(&["t", "row", "f"], &a).unwrap(), "secret");
        assert_eq!(s.open_str(&["t", "row", "f"], "plain").unwrap(), "plain");
        let empty = s.seal(&["x"], b"").unwrap();
        assert_eq!(s.open(&["x"], &empty).unwrap(), b"");
    }

    #[test]
    fn another_row_or_field_does_not_open() {
        let s = sealer();
        let v = s.seal_str(&["t", "row", "f"], "secret").unwrap();
        for context in [&["t", "row2", "f"][..], &["t", "row", "g"], &["u", "row", "f"], &["t", "rowf"]] {
            let err = s.open_str(context, &v).unwrap_err();
            assert!(matches!(err, SealError::Open(_)), "{err}");
        }
        // Length-prefixed parts: moving a boundary changes the associated data.
        assert!(s.open_str(&["t", "ro", "wf"], &v).is_err());
    }

    #[test]
    fn tampering_is_an_error_not_a_panic() {
        let s = sealer();
        let v = s.seal_str(&["c"], "secret value").unwrap();
        let prefix = "sealed:v1:k1:".len();
        for i in prefix..v.len() {
            let mut bytes = v.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(bytes).unwrap();
            if t != v {
                assert!(s.open(&["c"], &t).is_err(), "flip at {i}");
            }
        }
        for bad in [
            "sealed:v1:k1:",
            "sealed:v1:k1:!!!!",
            "sealed:v1:k1:AAAA",
            "sealed:v1:k1",
            "sealed:v2:k1:AAAA",
            "sealed:v1:k9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            &v[..v.len() - 4],
        ] {
            assert!(s.open(&["c"], bad).is_err(), "{bad}");
        }
        assert!(matches!(
            s.open(&["c"], "sealed:v1:k9:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Err(SealError::UnknownKey(_))
        ));
    }

    #[test]
    fn old_keys_stay_readable_by_id() {
        let old = sealer();
        let v = old.seal_str(&["c"], "x").unwrap();
        let both = Sealer::new(
            vec![
                ("k1".into(), DataKey::from_bytes([5u8; 32])),
                ("k2".into(), DataKey::from_bytes([6u8; 32])),
            ],
            "k2",
        )
        .unwrap();
        assert_eq!(both.open_str(&["c"], &v).unwrap(), "x");
        assert!(both.seal_str(&["c"], "y").unwrap().starts_with("sealed:v1:k2:"));
        assert!(Sealer::new(vec![], "k1").is_err());
        assert!(Sealer::new(vec![("a:b".into(), DataKey::from_bytes([0; 32]))], "a:b").is_err());
    }

    #[test]
    fn files_round_trip() {
        let s = sealer();
        let f = s.seal_file(&["file", "ca.key"], b"-----BEGIN").unwrap();
        assert!(f.ends_with(b"\n"));
        assert_eq!(s.open_file(&["file", "ca.key"], &f).unwrap(), (b"-----BEGIN".to_vec(), true));
        assert_eq!(s.open_file(&["file", "ca.key"], b"plain").unwrap(), (b"plain".to_vec(), false));
        assert!(s.open_file(&["file", "other"], &f).is_err());
    }
}
