//! Encryption at rest: the key provider chosen by `[encryption]`, the keyring in the data directory
//! (`data-keys.json`) and the rotations run by `dps-server admin rotate-kek` and `rotate-data-key`.
//!
//! At start the server unwraps the data keys with the key-encryption key (KEK) and keeps them in memory
//! (a [`Sealer`]); everything sealed afterwards is sealed under the active data key. A rotation rewrites
//! only the keyring: a running server keeps the data keys it holds, and the next start reads the keyring
//! with the new KEK.

use crate::config::KeyProviderConfig;
use crate::datadir::DataDir;
use crate::ServerError;
use dps_store::seal::{EnvKey, KeyFile, KeyProvider, Keyring, SealError, Sealer};
use std::path::Path;
use std::sync::Arc;

fn seal_error(e: SealError) -> ServerError {
    ServerError::Encryption(e.to_string())
}

/// The configured key provider. With `create`, a missing key file is created (first start).
pub fn key_provider(config: &KeyProviderConfig, create: bool) -> Result<Box<dyn KeyProvider>, ServerError> {
    Ok(match config {
        KeyProviderConfig::File(path) if create => {
            Box::new(KeyFile::open_or_create(path).map_err(seal_error)?.0)
        }
        KeyProviderConfig::File(path) => Box::new(KeyFile::open(path).map_err(seal_error)?),
        KeyProviderConfig::Env(name) => Box::new(EnvKey::from_env(name).map_err(seal_error)?),
    })
}

/// Opens the data directory's keyring with the configured KEK, creating the KEK file (provider `file`) and
/// the keyring on first start. A KEK that does not open the keyring is an error that says so.
pub fn open_sealer(config: &KeyProviderConfig, dir: &DataDir) -> Result<Arc<Sealer>, ServerError> {
    // A new KEK file next to an existing keyring can never open it: refuse rather than create one.
    let create = !dir.keyring().exists();
    let provider = key_provider(config, create).map_err(|e| match (config, create) {
        (KeyProviderConfig::File(path), false) if !path.exists() => ServerError::Encryption(format!(
            "the key-encryption key file {} is missing, and {} holds data keys only it opens; restore it \
             (or set [encryption] to the provider that holds the key)",
            path.display(),
            dir.keyring().display()
        )),
        _ => e,
    })?;
    let (sealer, _) = Keyring::open_or_create(&dir.keyring(), provider.as_ref()).map_err(seal_error)?;
    Ok(Arc::new(sealer))
}

/// `admin rotate-kek`: wraps every data key with the KEK in `new_key_file` (read with the current
/// provider), installs it as the key file (provider `file`), then drops the old KEK's wrappings. Rows are
/// not re-encrypted and running servers keep working. Returns a summary for the operator.
pub fn rotate_kek(
    config: &KeyProviderConfig,
    dir: &DataDir,
    new_key_file: &Path,
) -> Result<String, ServerError> {
    let current = key_provider(config, false)?;
    let new = KeyFile::open(new_key_file).map_err(seal_error)?;
    if new.kek_id() == current.kek_id() {
        return Err(ServerError::Encryption(format!(
            "{} holds the current key-encryption key",
            new_key_file.display()
        )));
    }
    let keyring = dir.keyring();
    let count = Keyring::rotate_kek(&keyring, current.as_ref(), &new).map_err(seal_error)?;
    let next = match config {
        KeyProviderConfig::File(path) => {
            if path != new_key_file {
                KeyFile::install(new_key_file, path).map_err(seal_error)?;
            }
            format!("{} now holds the new key-encryption key", path.display())
        }
        KeyProviderConfig::Env(name) => {
            format!("set {name} to the contents of {} before the next start", new_key_file.display())
        }
    };
    Keyring::retire_keks(&keyring, &new).map_err(seal_error)?;
    Ok(format!(
        "re-wrapped {count} data key(s) in {} under {}; {next}; the old key-encryption key opens nothing any \
         more, running servers keep working",
        keyring.display(),
        new.kek_id()
    ))
}

/// `admin rotate-data-key`: a new data key seals what is written after the next start; values sealed
/// before stay readable under their key ID.
pub fn rotate_data_key(config: &KeyProviderConfig, dir: &DataDir) -> Result<String, ServerError> {
    let provider = key_provider(config, false)?;
    let id = Keyring::rotate_data_key(&dir.keyring(), provider.as_ref()).map_err(seal_error)?;
    Ok(format!(
        "data key {id} added to {} and made active: servers seal new writes with it from their next start; \
         values sealed before stay readable",
        dir.keyring().display()
    ))
}
