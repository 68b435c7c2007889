//! Key-encryption keys: the [`KeyProvider`] trait and the local providers.

use crate::{random, write_private, SealError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize as _, Zeroizing};

/// Length of a key-encryption key and of a data key (AES-256).
pub const KEK_LEN: usize = 32;

/// The environment variable [`EnvKey`] reads by default.
pub const DEFAULT_ENV_VAR: &str = "DPS_KEK";

/// Associated data of a data key wrapped by a [`LocalKek`].
const WRAP_AAD: &[u8] = b"dps-seal data key v1";

/// A 256-bit data key, wiped from memory when dropped.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; KEK_LEN]>);

impl DataKey {
    /// A data key from its bytes.
    pub fn from_bytes(bytes: [u8; KEK_LEN]) -> DataKey {
        DataKey(Zeroizing::new(bytes))
    }

    /// A fresh random data key from the operating system's generator.
    pub fn generate() -> Result<DataKey, SealError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        random(bytes.as_mut())?;
        Ok(DataKey(bytes))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; KEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Wraps and unwraps data keys with a key-encryption key. Implement it for a KMS (the KEK then never
/// leaves it: `wrap` and `unwrap` are its encrypt and decrypt calls); [`KeyFile`] and [`EnvKey`] are the
/// local implementations.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// A stable, non-secret identifier of the KEK (stored next to each wrapped data key, so a wrong KEK
    /// is named as such and a rotation knows which wrappings are whose). For a KMS, its key ARN or name.
    fn kek_id(&self) -> String;

    /// Encrypts `key` under the KEK. The output is opaque and is given back to [`KeyProvider::unwrap`].
    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, SealError>;

    /// Decrypts what [`KeyProvider::wrap`] returned; a wrong KEK is an error.
    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, SealError>;

    /// Where the KEK comes from, for messages (`file /var/lib/dps/kek.key`, `environment variable DPS_KEK`).
    fn describe(&self) -> String;
}

/// A KEK held in memory: AES-256-GCM key wrapping (random nonce, fixed associated data). What
/// [`KeyFile`] and [`EnvKey`] load.
pub struct LocalKek {
    key: LessSafeKey,
    id: String,
    source: String,
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek").field("id", &self.id).field("source", &self.source).finish()
    }
}

impl LocalKek {
    /// A KEK from its 32 bytes; `source` describes where it came from.
    pub fn new(bytes: &[u8; KEK_LEN], source: impl Into<String>) -> Result<LocalKek, SealError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SealError::Kek("bad key".into()))?;
        // The ID is a fingerprint: a truncated hash under a domain-separation prefix, which says nothing
        // about the key.
        let mut input = Zeroizing::new(b"dps-seal kek id v1\0".to_vec());
        input.extend_from_slice(bytes);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect::<String>();
        Ok(LocalKek { key: LessSafeKey::new(unbound), id: format!("local:{id}"), source: source.into() })
    }

    /// Parses a KEK: 32 raw bytes, or (surrounding whitespace ignored) base64 of 32 bytes.
    pub fn parse(data: &[u8], source: impl Into<String>) -> Result<LocalKek, SealError> {
        let source = source.into();
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        if data.len() == KEK_LEN {
            bytes.copy_from_slice(data);
        } else {
            let text = std::str::from_utf8(data)
                .map_err(|_| SealError::Kek(format!("{source} holds neither 32 bytes nor base64")))?;
            let mut decoded = Zeroizing::new(
                STANDARD
                    .decode(text.trim())
                    .map_err(|_| SealError::Kek(format!("{source} holds neither 32 bytes nor base64")))?,
            );
            if decoded.len() != KEK_LEN {
                let n = decoded.len();
                decoded.zeroize();
                return Err(SealError::Kek(format!("{source} holds a {n}-byte key; a KEK is 32 bytes")));
            }
            bytes.copy_from_slice(&decoded);
        }
        LocalKek::new(&bytes, source)
    }

    /// A fresh random KEK as base64 text (what [`KeyFile`] writes).
    pub fn generate_base64() -> Result<Zeroizing<String>, SealError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        random(bytes.as_mut())?;
        Ok(Zeroizing::new(format!("{}\n", STANDARD.encode(bytes.as_ref()))))
    }
}

impl KeyProvider for LocalKek {
    fn kek_id(&self) -> String {
        self.id.clone()
    }

    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut out = Vec::with_capacity(NONCE_LEN + KEK_LEN + 16);
        out.extend_from_slice(&nonce);
        let mut sealed = key.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(WRAP_AAD), &mut sealed)
            .map_err(|_| SealError::Kek("wrapping the data key failed".into()))?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, SealError> {
        if wrapped.len() != NONCE_LEN + KEK_LEN + 16 {
            return Err(SealError::Kek(format!(
                "a wrapped data key of {} bytes is malformed",
                wrapped.len()
            )));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Kek("bad nonce".into()))?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain = self.key.open_in_place(nonce, Aad::from(WRAP_AAD), &mut buf).map_err(|_| {
            SealError::Kek(format!(
                "the key-encryption key from {} ({}) does not unwrap the data key: wrong key",
                self.source, self.id
            ))
        })?;
        let mut bytes = [0u8; KEK_LEN];
        bytes.copy_from_slice(plain);
        let key = DataKey::from_bytes(bytes);
        bytes.zeroize();
        Ok(key)
    }

    fn describe(&self) -> String {
        self.source.clone()
    }
}

/// A KEK kept in a file (the default: `kek.key` in the data directory), base64 of 32 random bytes (a
/// file of exactly 32 raw bytes is read too). Created with mode 0600 when absent.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
    kek: LocalKek,
}

impl KeyFile {
    /// Reads the KEK at `path`, creating it (random, mode 0600) if the file does not exist. Returns the
    /// key and whether this call created it.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<(KeyFile, bool), SealError> {
        let path = path.as_ref();
        let mut created = false;
        if !path.exists() {
            let text = LocalKek::generate_base64()?;
            created = write_private(path, text.as_bytes(), false)?;
        }
        Ok((KeyFile::open(path)?, created))
    }

    /// Reads the KEK at `path` (it must exist).
    pub fn open(path: impl AsRef<Path>) -> Result<KeyFile, SealError> {
        let path = path.as_ref().to_path_buf();
        let data = Zeroizing::new(
            std::fs::read(&path).map_err(|e| SealError::io(format!("reading {}", path.display()), e))?,
        );
        let kek = LocalKek::parse(&data, format!("file {}", path.display()))?;
        Ok(KeyFile { path, kek })
    }

    /// Writes a new random KEK to `path` (mode 0600), refusing to replace an existing file.
    pub fn generate(path: impl AsRef<Path>) -> Result<KeyFile, SealError> {
        let path = path.as_ref();
        let text = LocalKek::generate_base64()?;
        if !write_private(path, text.as_bytes(), false)? {
            return Err(SealError::Kek(format!("{} exists already", path.display())));
        }
        KeyFile::open(path)
    }

    /// Replaces the KEK file at `path` with the key of `source` (atomically, mode 0600).
    pub fn install(source: &Path, path: &Path) -> Result<KeyFile, SealError> {
        let data = Zeroizing::new(
            std::fs::read(source).map_err(|e| SealError::io(format!("reading {}", source.display()), e))?,
        );
        // Refuse to install something that is not a key.
        LocalKek::parse(&data, format!("file {}", source.display()))?;
        write_private(path, &data, true)?;
        KeyFile::open(path)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Both local providers hand the work to the KEK they hold.
macro_rules! local_kek_provider {
    ($($t:ty),*) => {$(
        impl KeyProvider for $t {
            fn kek_id(&self) -> String {
                self.kek.kek_id()
            }
            fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, SealError> {
                self.kek.wrap(key)
            }
            fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, SealError> {
                self.kek.unwrap(wrapped)
            }
            fn describe(&self) -> String {
                self.kek.describe()
            }
        }
    )*};
}

local_kek_provider!(KeyFile, EnvKey);

/// A KEK given as base64 (32 bytes) in an environment variable (default [`DEFAULT_ENV_VAR`]).
#[derive(Debug)]
pub struct EnvKey {
    kek: LocalKek,
}

impl EnvKey {
    /// Reads the KEK from the environment variable `name`.
    pub fn from_env(name: &str) -> Result<EnvKey, SealError> {
        let value = Zeroizing::new(std::env::var(name).map_err(|_| {
            SealError::Kek(format!("the environment variable {name} (base64 of 32 bytes) is not set"))
        })?);
        EnvKey::from_value(name, &value)
    }

    /// The KEK from a variable's value (base64 of 32 bytes); `name` is for messages.
    pub fn from_value(name: &str, value: &str) -> Result<EnvKey, SealError> {
        let source = format!("environment variable {name}");
        let data = value.trim().as_bytes();
        if data.len() == KEK_LEN {
            // Thirty-two characters are not base64 of 32 bytes; refuse rather than guess.
            return Err(SealError::Kek(format!("{source} must hold base64 of 32 bytes")));
        }
        Ok(EnvKey { kek: LocalKek::parse(data, source)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_a_wrong_kek_is_refused() {
        let a = LocalKek::new(&[1u8; 32], "a").unwrap();
        let b = LocalKek::new(&[2u8; 32], "b").unwrap();
        assert_ne!(a.kek_id(), b.kek_id());
        let key = DataKey::generate().unwrap();
        let wrapped = a.wrap(&key).unwrap();
        assert_eq!(a.unwrap(&wrapped).unwrap().as_bytes(), key.as_bytes());
        let err = b.unwrap(&wrapped).unwrap_err().to_string();
        assert!(err.contains("wrong key"), "{err}");
        let mut bad = wrapped.clone();
        bad[20] ^= 1;
        assert!(a.unwrap(&bad).is_err());
        assert!(a.unwrap(&wrapped[..10]).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let (first, created) = KeyFile::open_or_create(&path).unwrap();
        assert!(created);
        let (second, created) = KeyFile::open_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.kek_id(), second.kek_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "short").unwrap();
        assert!(KeyFile::open(&path).is_err());
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert!(KeyFile::open(&path).is_ok());
    }

    #[test]
    fn env_key_parses_base64_only() {
        let value = STANDARD.encode([9u8; 32]);
        let k = EnvKey::from_value("X", &value).unwrap();
        assert_eq!(k.kek_id(), LocalKek::new(&[9u8; 32], "y").unwrap().kek_id());
        assert!(EnvKey::from_value("X", "not base64!").is_err());
        assert!(EnvKey::from_value("X", &STANDARD.encode([1u8; 16])).is_err());
        assert!(EnvKey::from_env("DPS_SEAL_TEST_SURELY_UNSET_VARIABLE").is_err());
    }
}
