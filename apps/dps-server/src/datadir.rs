//! The data directory: the store, the TLS material, the owner policy keys, the connection string and the
//! readiness file.
//!
//! ```text
//! data_dir/
//!   dps.sqlite3 (+ -wal, -shm)   the durable store
//!   tls/ca.pem, tls/ca.key        generated self-signed CA (trust ca.pem on devices and clients)
//!   tls/server.pem, server.key    ECDSA P-256 server certificate signed by the CA, with the configured SANs
//!   kek.key                       the key-encryption key (default key provider; base64, mode 0600)
//!   data-keys.json                the data keys of encryption at rest, wrapped by the KEK
//!   owner.key                     primary and secondary keys of the provisioningserviceowner policy (sealed)
//!   connection-string.txt         HostName=…;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=…
//!   ready.json                    {"https": "ip:port", "mqtt": "ip:port"|null, "amqp": "ip:port"|null, "admin": "ip:port"|null}
//! ```
//!
//! Key files (`*.key`, `connection-string.txt`) are written with mode 0600. Every file is written to a
//! temporary name and renamed into place, so a crash never leaves a half-written key behind.

use crate::ServerError;
use dps_core::proto::sas::SymmetricKey;
use dps_core::OWNER_POLICY;
use dps_store::seal::Sealer;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Paths inside a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.root.join("dps.sqlite3")
    }

    /// The durable IoT hub directory (hub devices and twins, and the usage table).
    pub fn hubs_database(&self) -> PathBuf {
        self.root.join("hubs.sqlite3")
    }

    /// The issuing CA of certificate issuance (`ca.pem`, and `ca.key` readable by the owner only).
    pub fn issuer_dir(&self) -> PathBuf {
        self.root.join("issuer")
    }

    /// The TLS directory.
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// The CA certificate (PEM) clients trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    /// The CA private key (PEM, PKCS#8).
    pub fn ca_key(&self) -> PathBuf {
        self.tls_dir().join("ca.key")
    }

    /// The server certificate (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.tls_dir().join("server.pem")
    }

    /// The server private key (PEM, PKCS#8).
    pub fn server_key(&self) -> PathBuf {
        self.tls_dir().join("server.key")
    }

    /// The default key-encryption key file of encryption at rest.
    pub fn kek_file(&self) -> PathBuf {
        self.root.join("kek.key")
    }

    /// The keyring: the data keys of encryption at rest, wrapped by the key-encryption key.
    pub fn keyring(&self) -> PathBuf {
        self.root.join("data-keys.json")
    }

    /// The owner policy keys.
    pub fn owner_key(&self) -> PathBuf {
        self.root.join("owner.key")
    }

    /// The owner connection string.
    pub fn connection_string(&self) -> PathBuf {
        self.root.join("connection-string.txt")
    }

    /// The readiness file.
    pub fn ready(&self) -> PathBuf {
        self.root.join("ready.json")
    }

    /// Creates the directory and its `tls/` subdirectory, and makes them private whatever existed before:
    /// both directories mode 0700 and every file in them 0600 (on Unix). The two databases are created
    /// empty with mode 0600 before SQLite opens them, so their `-wal` and `-shm` files (which SQLite creates
    /// with the database file's mode) are private too. A directory or file whose mode cannot be set (not
    /// ours) refuses the start with a message naming it.
    pub fn create(&self) -> Result<(), ServerError> {
        for dir in [self.root.clone(), self.tls_dir()] {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(&dir).map_err(|e| ServerError::io(format!("creating {}", dir.display()), e))?;
        }
        #[cfg(unix)]
        {
            for dir in [self.root.clone(), self.tls_dir()] {
                make_private(&dir, 0o700)?;
                let entries = std::fs::read_dir(&dir)
                    .map_err(|e| ServerError::io(format!("reading {}", dir.display()), e))?;
                for entry in entries {
                    let entry =
                        entry.map_err(|e| ServerError::io(format!("reading {}", dir.display()), e))?;
                    let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                    if is_file {
                        make_private(&entry.path(), 0o600)?;
                    }
                }
            }
            for db in [self.database(), self.hubs_database()] {
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).truncate(false);
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
                options.open(&db).map_err(|e| ServerError::io(format!("creating {}", db.display()), e))?;
            }
        }
        Ok(())
    }
}

/// Sets `path`'s mode, or explains why the server will not start.
#[cfg(unix)]
fn make_private(path: &Path, mode: u32) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)
        .map_err(|e| ServerError::io(format!("reading the mode of {}", path.display()), e))?
        .permissions()
        .mode()
        & 0o777;
    if current == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        ServerError::DataDir(format!(
            "{} has mode {current:o} and cannot be made {mode:o} ({e}); the data directory holds the \
             fleet's keys and must be private to the server's user",
            path.display()
        ))
    })
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename), with mode 0600 (every file in
/// the data directory is private to the server's user).
pub fn write_file(path: &Path, contents: &[u8]) -> Result<(), ServerError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let write = || -> std::io::Result<()> {
        let mut f = options.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| ServerError::io(format!("writing {}", path.display()), e))
}

/// The associated data of the sealed `owner.key`.
const OWNER_KEY_CONTEXT: &[&str] = &["file", "owner.key"];

/// The keys of the generated `provisioningserviceowner` policy.
#[derive(Debug, Clone)]
pub struct OwnerKeys {
    /// Primary key.
    pub primary: SymmetricKey,
    /// Secondary key.
    pub secondary: SymmetricKey,
}

impl OwnerKeys {
    /// Generates two random 32-byte keys.
    pub fn generate(rng: &mut dyn RngCore) -> OwnerKeys {
        let mut key = || {
            let mut b = vec![0u8; 32];
            rng.fill_bytes(&mut b);
            SymmetricKey::from_bytes(b)
        };
        OwnerKeys { primary: key(), secondary: key() }
    }

    /// The file format: a comment and `primary=`/`secondary=` lines.
    pub fn to_file(&self) -> String {
        format!(
            "# Keys of the {OWNER_POLICY} shared access policy (all rights). Keep this file secret.\n\
             primary={}\nsecondary={}\n",
            self.primary.to_base64(),
            self.secondary.to_base64()
        )
    }

    /// Parses [`OwnerKeys::to_file`]'s format. A file holding one bare base64 key (written by earlier
    /// demo programs) is read as that key for both slots.
    pub fn parse(text: &str) -> Result<OwnerKeys, String> {
        let mut primary = None;
        let mut secondary = None;
        let mut bare = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if let Some(v) = line.strip_prefix("primary=") {
                primary = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("secondary=") {
                secondary = Some(v.trim());
            } else {
                bare.push(line);
            }
        }
        let (p, s) = match (primary, secondary, bare.as_slice()) {
            (Some(p), Some(s), []) => (p, s),
            (None, None, [k]) => (*k, *k),
            _ => return Err("expected a 'primary=<base64>' line and a 'secondary=<base64>' line".into()),
        };
        let key =
            |k: &str, which: &str| SymmetricKey::parse(k).map_err(|e| format!("{which} key: {}", e.message));
        Ok(OwnerKeys { primary: key(p, "primary")?, secondary: key(s, "secondary")? })
    }

    /// Loads the keys from `dir`, generating and writing them on first start. A file that exists but does
    /// not parse is an error (never silently replaced: clients hold connection strings made from it).
    /// The file is sealed with `sealer` (a file written in clear before is read and rewritten sealed).
    pub fn load_or_generate(
        dir: &DataDir,
        rng: &mut dyn RngCore,
        sealer: &Sealer,
    ) -> Result<(OwnerKeys, bool), ServerError> {
        let path = dir.owner_key();
        match std::fs::read(&path) {
            Ok(stored) => {
                let (text, sealed) = sealer
                    .open_file(OWNER_KEY_CONTEXT, &stored)
                    .map_err(|e| ServerError::DataDir(format!("{}: {e}", path.display())))?;
                let text = String::from_utf8(text).unwrap_or_default();
                let keys = OwnerKeys::parse(&text).map_err(|e| {
                    ServerError::DataDir(format!(
                        "{} is not valid ({e}); fix it, or delete it to generate new owner keys",
                        path.display()
                    ))
                })?;
                if !sealed {
                    keys.write_sealed(&path, sealer)?;
                }
                Ok((keys, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = OwnerKeys::generate(rng);
                keys.write_sealed(&path, sealer)?;
                Ok((keys, true))
            }
            Err(e) => Err(ServerError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn write_sealed(&self, path: &Path, sealer: &Sealer) -> Result<(), ServerError> {
        let sealed = sealer
            .seal_file(OWNER_KEY_CONTEXT, self.to_file().as_bytes())
            .map_err(|e| ServerError::DataDir(format!("sealing {}: {e}", path.display())))?;
        write_file(path, &sealed)
    }

    /// The owner connection string for `host`.
    pub fn connection_string(&self, host: &str) -> String {
        format!(
            "HostName={host};SharedAccessKeyName={OWNER_POLICY};SharedAccessKey={}",
            self.primary.to_base64()
        )
    }
}

/// The contents of `ready.json`: the actually bound addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// HTTPS listener.
    pub https: SocketAddr,
    /// MQTT over TLS listener, if enabled.
    pub mqtt: Option<SocketAddr>,
    /// AMQP over TLS listener, if enabled (absent in files of servers without it).
    #[serde(default)]
    pub amqp: Option<SocketAddr>,
    /// Admin listener, if enabled.
    pub admin: Option<SocketAddr>,
}

impl Ready {
    /// Reads `ready.json` from a data directory (`None` if absent or incomplete).
    pub fn read(dir: &DataDir) -> Option<Ready> {
        let text = std::fs::read_to_string(dir.ready()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `ready.json` atomically.
    pub fn write(&self, dir: &DataDir) -> Result<(), ServerError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| ServerError::DataDir(format!("serializing ready.json: {e}")))?;
        write_file(&dir.ready(), text.as_bytes())
    }
}

/// The service connection string (defined once, in `dps-proto`).
pub use dps_core::proto::sas::ConnectionString;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn owner_keys_round_trip_and_legacy_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let keys = OwnerKeys::generate(&mut rng);
        let back = OwnerKeys::parse(&keys.to_file()).unwrap();
        assert_eq!(back.primary.to_base64(), keys.primary.to_base64());
        assert_eq!(back.secondary.to_base64(), keys.secondary.to_base64());
        assert_ne!(keys.primary.to_base64(), keys.secondary.to_base64());
        let legacy = OwnerKeys::parse(&format!("{}\n", keys.primary.to_base64())).unwrap();
        assert_eq!(legacy.secondary.to_base64(), keys.primary.to_base64());
        assert!(OwnerKeys::parse("primary=???\nsecondary=x").is_err());
        assert!(OwnerKeys::parse("").is_err());
    }

    #[test]
    fn connection_string_parses() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let keys = OwnerKeys::generate(&mut rng);
        let cs = ConnectionString::parse(&keys.connection_string("dps.example")).unwrap();
        assert_eq!(cs.host_name, "dps.example");
        assert_eq!(cs.key_name, OWNER_POLICY);
        assert_eq!(cs.key.to_base64(), keys.primary.to_base64());
        assert!(ConnectionString::parse("HostName=x;SharedAccessKeyName=y").is_err());
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.create().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let sealer = dps_store::seal::Sealer::new(
            vec![("t1".into(), dps_store::seal::DataKey::from_bytes([1; 32]))],
            "t1",
        )
        .unwrap();
        let (first, generated) = OwnerKeys::load_or_generate(&data, &mut rng, &sealer).unwrap();
        assert!(generated);
        let stored = std::fs::read_to_string(data.owner_key()).unwrap();
        assert!(stored.starts_with("sealed:v1:") && !stored.contains(&first.primary.to_base64()));
        let (second, generated) = OwnerKeys::load_or_generate(&data, &mut rng, &sealer).unwrap();
        assert!(!generated);
        assert_eq!(first.primary.to_base64(), second.primary.to_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.owner_key()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A file in clear from before: read, then sealed.
        std::fs::write(data.owner_key(), first.to_file()).unwrap();
        let (third, _) = OwnerKeys::load_or_generate(&data, &mut rng, &sealer).unwrap();
        assert_eq!(third.primary.to_base64(), first.primary.to_base64());
        assert!(std::fs::read_to_string(data.owner_key()).unwrap().starts_with("sealed:v1:"));
        std::fs::write(data.owner_key(), "garbage").unwrap();
        assert!(OwnerKeys::load_or_generate(&data, &mut rng, &sealer).is_err());
    }
}
