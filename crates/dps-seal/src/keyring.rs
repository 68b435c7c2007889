//! The keyring file: the data keys, each wrapped by one or more key-encryption keys.
//!
//! ```json
//! {"format": "dps-seal keyring", "version": 1, "active": "dk-3f9a0c12",
//!  "keys": [{"id": "dk-3f9a0c12", "wrappings": [{"kek": "local:5be1…", "key": "<base64>"}]}]}
//! ```
//!
//! A data key may carry several wrappings during a KEK rotation ([`Keyring::rotate_kek`] adds the new
//! KEK's, [`Keyring::retire_keks`] drops the others once the new KEK is in place), so a crash at any step
//! leaves a keyring that the old or the new KEK opens. Every change is written to a temporary file and
//! renamed into place (mode 0600). Run one rotation at a time; servers only read the file, at start.

use crate::provider::{DataKey, KeyProvider};
use crate::sealer::Sealer;
use crate::{random, write_private, SealError};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::path::Path;

const FORMAT: &str = "dps-seal keyring";

/// The keyring file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    /// Always `"dps-seal keyring"`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// The data key new values are sealed with.
    pub active: String,
    /// Every data key, old ones included (values sealed under them stay readable).
    pub keys: Vec<KeyringEntry>,
}

/// One data key of a [`Keyring`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringEntry {
    /// The data key's ID (named in every value sealed under it).
    pub id: String,
    /// The data key wrapped by each KEK that may open it.
    pub wrappings: Vec<Wrapping>,
}

/// A data key wrapped by one KEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrapping {
    /// The KEK's [`KeyProvider::kek_id`].
    pub kek: String,
    /// What [`KeyProvider::wrap`] returned, base64.
    pub key: String,
}

fn new_key_id() -> Result<String, SealError> {
    let mut b = [0u8; 4];
    random(&mut b)?;
    Ok(format!("dk-{}", b.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

impl Keyring {
    /// Reads the keyring at `path` (`None` if the file does not exist).
    pub fn load(path: &Path) -> Result<Option<Keyring>, SealError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SealError::io(format!("reading {}", path.display()), e)),
        };
        let ring: Keyring = serde_json::from_str(&text)
            .map_err(|e| SealError::Keyring(format!("{} is not a keyring: {e}", path.display())))?;
        if ring.format != FORMAT || ring.version != 1 {
            return Err(SealError::Keyring(format!(
                "{} has format '{}' version {}, this build reads '{FORMAT}' version 1",
                path.display(),
                ring.format,
                ring.version
            )));
        }
        Ok(Some(ring))
    }

    /// Writes the keyring to `path` (atomically, mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| SealError::Keyring(format!("serializing the keyring: {e}")))?;
        write_private(path, text.as_bytes(), true).map(|_| ())
    }

    /// Opens the keyring at `path` with `kek`, creating it (one new data key wrapped by `kek`) when the
    /// file does not exist. Returns the sealer and whether this call created the keyring.
    pub fn open_or_create(path: &Path, kek: &dyn KeyProvider) -> Result<(Sealer, bool), SealError> {
        if let Some(ring) = Keyring::load(path)? {
            return Ok((ring.sealer(kek)?, false));
        }
        let id = new_key_id()?;
        let key = DataKey::generate()?;
        let ring = Keyring {
            format: FORMAT.to_owned(),
            version: 1,
            active: id.clone(),
            keys: vec![KeyringEntry { id, wrappings: vec![wrap(kek, &key)?] }],
        };
        let text = serde_json::to_string_pretty(&ring)
            .map_err(|e| SealError::Keyring(format!("serializing the keyring: {e}")))?;
        if write_private(path, text.as_bytes(), false)? {
            return Ok((ring.sealer(kek)?, true));
        }
        // Another process created it first: use theirs.
        let ring = Keyring::load(path)?
            .ok_or_else(|| SealError::Keyring(format!("{} vanished while opening it", path.display())))?;
        Ok((ring.sealer(kek)?, false))
    }

    /// Unwraps every data key with `kek` into a [`Sealer`]. A KEK that opens none of them (the wrong key)
    /// is an error naming the KEK the keyring expects.
    pub fn sealer(&self, kek: &dyn KeyProvider) -> Result<Sealer, SealError> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for entry in &self.keys {
            keys.push((entry.id.clone(), self.unwrap_entry(entry, kek)?));
        }
        Sealer::new(keys, &self.active)
    }

    fn unwrap_entry(&self, entry: &KeyringEntry, kek: &dyn KeyProvider) -> Result<DataKey, SealError> {
        let id = kek.kek_id();
        // The wrapping made by this KEK first; then any (a KMS whose key ID changed with an alias).
        let mut ordered: Vec<&Wrapping> = entry.wrappings.iter().filter(|w| w.kek == id).collect();
        ordered.extend(entry.wrappings.iter().filter(|w| w.kek != id));
        let mut last = None;
        for w in ordered {
            let wrapped = STANDARD
                .decode(&w.key)
                .map_err(|_| SealError::Keyring(format!("data key '{}' is not base64", entry.id)))?;
            match kek.unwrap(&wrapped) {
                Ok(key) => return Ok(key),
                Err(e) => last = Some(e),
            }
        }
        let expected: Vec<&str> = entry.wrappings.iter().map(|w| w.kek.as_str()).collect();
        Err(SealError::Kek(format!(
            "the key-encryption key from {} ({id}) does not open data key '{}', which is wrapped by {}: \
             wrong key-encryption key{}",
            kek.describe(),
            entry.id,
            expected.join(", "),
            last.map(|e| format!(" ({e})")).unwrap_or_default()
        )))
    }

    /// KEK rotation, first step: wraps every data key with `new` as well (opening it with `current`) and
    /// saves. Rows are not touched. Returns how many data keys were re-wrapped.
    pub fn rotate_kek(
        path: &Path,
        current: &dyn KeyProvider,
        new: &dyn KeyProvider,
    ) -> Result<usize, SealError> {
        let mut ring = Keyring::load(path)?
            .ok_or_else(|| SealError::Keyring(format!("{} does not exist", path.display())))?;
        let new_id = new.kek_id();
        let mut rewrapped = Vec::with_capacity(ring.keys.len());
        for entry in &ring.keys {
            let key = ring.unwrap_entry(entry, current)?;
            rewrapped.push(wrap(new, &key)?);
        }
        for (entry, wrapping) in ring.keys.iter_mut().zip(rewrapped) {
            entry.wrappings.retain(|w| w.kek != new_id);
            entry.wrappings.push(wrapping);
        }
        ring.save(path)?;
        Ok(ring.keys.len())
    }

    /// KEK rotation, last step: checks that `keep` opens every data key and drops every other KEK's
    /// wrapping, so the old KEK opens nothing any more. Returns how many wrappings were dropped.
    pub fn retire_keks(path: &Path, keep: &dyn KeyProvider) -> Result<usize, SealError> {
        let mut ring = Keyring::load(path)?
            .ok_or_else(|| SealError::Keyring(format!("{} does not exist", path.display())))?;
        let id = keep.kek_id();
        let mut dropped = 0;
        let (format, version) = (ring.format.clone(), ring.version);
        for entry in &mut ring.keys {
            let mine: Vec<Wrapping> = entry.wrappings.iter().filter(|w| w.kek == id).cloned().collect();
            let only = KeyringEntry { id: entry.id.clone(), wrappings: mine };
            if only.wrappings.is_empty() {
                return Err(SealError::Kek(format!(
                    "data key '{}' has no wrapping by {} ({id}); run the rotation's first step",
                    entry.id,
                    keep.describe()
                )));
            }
            // Prove it opens before anything is thrown away.
            let check = Keyring {
                format: format.clone(),
                version,
                active: only.id.clone(),
                keys: vec![only.clone()],
            };
            check.sealer(keep)?;
            dropped += entry.wrappings.len() - only.wrappings.len();
            *entry = only;
        }
        ring.save(path)?;
        Ok(dropped)
    }

    /// Data key rotation: adds a new data key wrapped by `kek`, makes it the active one and saves. Values
    /// sealed before stay readable under their key ID; processes that opened the keyring before keep
    /// sealing with the old key until they restart. Returns the new key's ID.
    pub fn rotate_data_key(path: &Path, kek: &dyn KeyProvider) -> Result<String, SealError> {
        let mut ring = Keyring::load(path)?
            .ok_or_else(|| SealError::Keyring(format!("{} does not exist", path.display())))?;
        // The KEK must open what is there (else the new key would be wrapped by a stranger).
        ring.sealer(kek)?;
        let id = new_key_id()?;
        ring.keys.push(KeyringEntry { id: id.clone(), wrappings: vec![wrap(kek, &DataKey::generate()?)?] });
        ring.active = id.clone();
        ring.save(path)?;
        Ok(id)
    }
}

fn wrap(kek: &dyn KeyProvider, key: &DataKey) -> Result<Wrapping, SealError> {
    Ok(Wrapping { kek: kek.kek_id(), key: STANDARD.encode(kek.wrap(key)?) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::LocalKek;

    #[test]
    fn create_reopen_wrong_kek_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-keys.json");
        let old = LocalKek::new(&[1; 32], "old").unwrap();
        let new = LocalKek::new(&[2; 32], "new").unwrap();
        let (s1, created) = Keyring::open_or_create(&path, &old).unwrap();
        assert!(created);
        let sealed = s1.seal_str(&["t"], "v").unwrap();
        let (s2, created) = Keyring::open_or_create(&path, &old).unwrap();
        assert!(!created);
        assert_eq!(s2.open_str(&["t"], &sealed).unwrap(), "v");

        let err = Keyring::open_or_create(&path, &new).unwrap_err().to_string();
        assert!(err.contains("wrong key-encryption key"), "{err}");

        assert_eq!(Keyring::rotate_kek(&path, &old, &new).unwrap(), 1);
        // Both open during the rotation.
        Keyring::open_or_create(&path, &old).unwrap();
        let (s3, _) = Keyring::open_or_create(&path, &new).unwrap();
        assert_eq!(s3.open_str(&["t"], &sealed).unwrap(), "v");
        assert_eq!(Keyring::retire_keks(&path, &new).unwrap(), 1);
        assert!(Keyring::open_or_create(&path, &old).is_err());
        let (s4, _) = Keyring::open_or_create(&path, &new).unwrap();
        assert_eq!(s4.open_str(&["t"], &sealed).unwrap(), "v");
        // Retiring by a KEK without wrappings refuses.
        assert!(Keyring::retire_keks(&path, &old).is_err());

        let id = Keyring::rotate_data_key(&path, &new).unwrap();
        let (s5, _) = Keyring::open_or_create(&path, &new).unwrap();
        assert_eq!(s5.active_key_id(), id);
        assert_eq!(s5.open_str(&["t"], &sealed).unwrap(), "v");
        assert!(s5.seal_str(&["t"], "w").unwrap().starts_with(&format!("sealed:v1:{id}:")));
        assert!(Keyring::rotate_data_key(&path, &old).is_err());
    }

    #[test]
    fn a_corrupt_keyring_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-keys.json");
        std::fs::write(&path, "{").unwrap();
        let kek = LocalKek::new(&[1; 32], "k").unwrap();
        assert!(Keyring::open_or_create(&path, &kek).is_err());
        std::fs::write(&path, r#"{"format":"x","version":1,"active":"a","keys":[]}"#).unwrap();
        assert!(Keyring::open_or_create(&path, &kek).is_err());
    }
}
