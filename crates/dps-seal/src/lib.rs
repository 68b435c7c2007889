//! Encryption at rest for the DPS stores.
//!
//! Every secret a store keeps (enrollment and group symmetric keys, webhook URLs, hub device keys, the
//! issuing CA's private key, the owner policy keys) is **sealed** with AES-256-GCM under a *data key*
//! before it reaches a file, and unsealed when it is read back.
//!
//! - A [`Sealer`] holds the unwrapped data keys by key ID and seals new values with the active one. A
//!   sealed value is text, `sealed:v1:<key id>:<base64 of nonce ‖ ciphertext ‖ tag>`, with a fresh random
//!   96-bit nonce per seal and *associated data* naming where the value lives (for example table, row key
//!   and field), so a sealed value copied to another row or field does not open. A value without the
//!   `sealed:` prefix is a plain value written before encryption was enabled: it is read as is and sealed
//!   on its next write.
//! - The data keys are kept in a [`keyring`] file next to the stores, each *wrapped* (encrypted) by a
//!   key-encryption key (KEK) from a [`KeyProvider`]: [`KeyFile`] (a 32-byte key in a file of the data
//!   directory, created with mode 0600 when absent), [`EnvKey`] (base64 in an environment variable), or an
//!   embedder's own (a KMS). The KEK never seals data itself, so rotating it re-wraps the data keys (a few
//!   hundred bytes) and re-encrypts no row, while a running server keeps the data keys it unwrapped at
//!   start.
#![forbid(unsafe_code)]
// This crate reads key files and environment variables (the key providers) and writes the keyring; the
// workspace-wide bans are meant for the pure crates.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod keyring;
mod provider;
mod sealer;

pub use keyring::{Keyring, KeyringEntry, Wrapping};
pub use provider::{DataKey, EnvKey, KeyFile, KeyProvider, LocalKek, DEFAULT_ENV_VAR, KEK_LEN};
pub use sealer::{is_sealed, Sealer, SEALED_PREFIX};

/// Why sealing, unsealing or key handling failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A sealed value is not in the `sealed:v1:<key id>:<base64>` format.
    #[error("sealed value is malformed: {0}")]
    Format(String),
    /// A sealed value names a data key the sealer does not hold.
    #[error("sealed value uses data key '{0}', which is not in the keyring")]
    UnknownKey(String),
    /// Authentication failed: the value was altered, moved from another row or field, or sealed under
    /// another data key with the same ID.
    #[error("sealed value does not open for {0} (tampered with, or copied from another row)")]
    Open(String),
    /// The key-encryption key does not unwrap a data key (a wrong KEK), or is unusable.
    #[error("key-encryption key: {0}")]
    Kek(String),
    /// The keyring file is unreadable or inconsistent.
    #[error("keyring: {0}")]
    Keyring(String),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
}

impl SealError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> SealError {
        SealError::Io { what: what.into(), source }
    }
}

/// Fills `buf` from the operating system's random generator.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), SealError> {
    use aws_lc_rs::rand::SecureRandom as _;
    aws_lc_rs::rand::SystemRandom::new().fill(buf).map_err(|_| SealError::Random)
}

/// Writes `contents` to `path` atomically (temporary file with mode 0600, fsync, rename).
pub(crate) fn write_private(
    path: &std::path::Path,
    contents: &[u8],
    replace: bool,
) -> Result<bool, SealError> {
    use std::io::Write as _;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut nonce = [0u8; 6];
    random(&mut nonce)?;
    let suffix: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_file_name(format!(".{name}.{suffix}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let shown = path.display().to_string();
    let result = (|| -> Result<bool, SealError> {
        let mut file = options.open(&tmp).map_err(|e| SealError::io(format!("creating {shown}"), e))?;
        file.write_all(contents).map_err(|e| SealError::io(format!("writing {shown}"), e))?;
        file.sync_all().map_err(|e| SealError::io(format!("writing {shown}"), e))?;
        drop(file);
        if replace {
            std::fs::rename(&tmp, path).map_err(|e| SealError::io(format!("writing {shown}"), e))?;
            Ok(true)
        } else {
            // Create-if-absent: a hard link fails when the name exists, so two processes starting at once
            // agree on one file.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(SealError::io(format!("creating {shown}"), e)),
            }
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    if let Some(dir) = path.parent() {
        // Best effort: make the rename durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}
