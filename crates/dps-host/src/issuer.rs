//! The built-in certificate issuer: a local CA that signs device certificates for CSRs (spec §7.6).
//!
//! [`LocalCa`] holds a CA certificate and its private key (ECDSA P-384 by default, or P-256), generated
//! once and kept as PEM files (`ca.pem`, `ca.key`, the key readable by its owner only), and signs, for each
//! verified CSR, a certificate with subject `CN=<registration ID>`, extended key usage clientAuth, valid
//! from five minutes before issuance (the clock-skew allowance every check here uses) for the configured
//! validity, but never past the CA's own expiry. The chain it returns is `[leaf, CA]`. Upload the CA
//! certificate to the instance as a verified CA (the reference server does so itself) and reference it
//! from an enrollment group: the issued certificate then attests the device over X.509 on its next
//! registration, so its credential rolls without re-enrollment.

use dps_core::effect::{CertificateIssuer, EffectError, IssueRequest};
use dps_core::Timestamp;
use rand_core::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use std::path::Path;
use std::time::Duration;

/// The CA key's curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaKeyKind {
    /// ECDSA P-256 with SHA-256.
    P256,
    /// ECDSA P-384 with SHA-384 (the default, as Azure's preview issues).
    #[default]
    P384,
}

/// How long a generated CA certificate is valid (ten years).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// The default validity of an issued device certificate (30 days).
pub const DEFAULT_ISSUED_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const SKEW_SECS: i64 = 300;

/// A local certificate authority issuing device certificates.
pub struct LocalCa {
    ca_der: Vec<u8>,
    ca_pem: String,
    key: KeyPair,
    not_after: i64,
    validity: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("validity", &self.validity).finish_non_exhaustive()
    }
}

fn error(what: &str, e: impl std::fmt::Display) -> EffectError {
    EffectError::new(format!("{what}: {e}"))
}

fn offset(secs: i64) -> Result<time::OffsetDateTime, EffectError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| error("certificate time", e))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and of full length
    SerialNumber::from_slice(&bytes)
}

impl LocalCa {
    /// A new self-signed root CA with subject `CN=<common_name>`, valid for [`CA_VALIDITY`] from `now`.
    pub fn generate(
        common_name: &str,
        kind: CaKeyKind,
        validity: Duration,
        now: Timestamp,
    ) -> Result<LocalCa, EffectError> {
        let alg = match kind {
            CaKeyKind::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            CaKeyKind::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        };
        let key = KeyPair::generate_for(alg).map_err(|e| error("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let start = now.unix_seconds() - SKEW_SECS;
        params.not_before = offset(start)?;
        params.not_after = offset(now.unix_seconds() + CA_VALIDITY.as_secs() as i64)?;
        let cert = params.self_signed(&key).map_err(|e| error("signing the CA certificate", e))?;
        Ok(LocalCa {
            ca_der: cert.der().to_vec(),
            ca_pem: cert.pem(),
            key,
            not_after: now.unix_seconds() + CA_VALIDITY.as_secs() as i64,
            validity,
        })
    }

    /// A CA from its certificate and private key (PEM, PKCS#8).
    pub fn from_pem(cert_pem: &str, key_pem: &str, validity: Duration) -> Result<LocalCa, EffectError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| error("reading the CA key", e))?;
        let ca_der = dps_core::attest::x509::parse_certificate_text(cert_pem)
            .map_err(|e| error("reading the CA certificate", e))?;
        let cert =
            dps_core::attest::x509::parse_der(&ca_der).map_err(|e| error("reading the CA certificate", e))?;
        let (_, not_after) = dps_core::attest::x509::validity(&cert);
        // The key must be the certificate's: an issuer built from both signs a probe that must verify.
        Issuer::from_ca_cert_der(&ca_der.as_slice().into(), &key)
            .map_err(|e| error("reading the CA certificate", e))?;
        Ok(LocalCa {
            ca_der,
            ca_pem: cert_pem.to_owned(),
            key,
            not_after: not_after.unix_seconds(),
            validity,
        })
    }

    /// Opens the CA kept in `dir` (`ca.pem`, `ca.key`), creating both (the key with mode 0600) when
    /// neither exists. `common_name` and `kind` apply to a new CA only. The key is kept in clear; see
    /// [`LocalCa::open_or_create_sealed`].
    pub fn open_or_create(
        dir: &Path,
        common_name: &str,
        kind: CaKeyKind,
        validity: Duration,
        now: Timestamp,
    ) -> Result<LocalCa, EffectError> {
        LocalCa::open_or_create_sealed(dir, common_name, kind, validity, now, None)
    }

    /// [`open_or_create`](Self::open_or_create) with encryption at rest: with a sealer, `ca.key` is
    /// written sealed (`sealed:v1:…`, bound to the name `issuer/ca.key`) and opened through the sealer
    /// when read; a key file written in clear before is read and rewritten sealed.
    pub fn open_or_create_sealed(
        dir: &Path,
        common_name: &str,
        kind: CaKeyKind,
        validity: Duration,
        now: Timestamp,
        sealer: Option<&dps_seal::Sealer>,
    ) -> Result<LocalCa, EffectError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = std::fs::read_to_string(&cert_path)
                    .map_err(|e| error(&format!("reading {}", cert_path.display()), e))?;
                let stored = std::fs::read(&key_path)
                    .map_err(|e| error(&format!("reading {}", key_path.display()), e))?;
                let (key, was_sealed) = match sealer {
                    Some(sealer) => sealer
                        .open_file(SEALED_KEY_CONTEXT, &stored)
                        .map_err(|e| error(&format!("reading {}", key_path.display()), e))?,
                    None if dps_seal::is_sealed(&String::from_utf8_lossy(&stored)) => {
                        return Err(EffectError::new(format!(
                            "{} is sealed and no encryption key was given",
                            key_path.display()
                        )))
                    }
                    None => (stored, false),
                };
                let key = String::from_utf8(key)
                    .map_err(|_| EffectError::new(format!("{} is not PEM", key_path.display())))?;
                let ca = LocalCa::from_pem(&cert, &key, validity)?;
                if let (Some(sealer), false) = (sealer, was_sealed) {
                    // Written in clear by an earlier build: sealed now.
                    let sealed = sealer
                        .seal_file(SEALED_KEY_CONTEXT, key.as_bytes())
                        .map_err(|e| error("sealing the CA key", e))?;
                    replace_private(&key_path, &sealed)?;
                }
                Ok(ca)
            }
            (false, false) => {
                let ca = LocalCa::generate(common_name, kind, validity, now)?;
                std::fs::create_dir_all(dir).map_err(|e| error(&format!("creating {}", dir.display()), e))?;
                let pem = ca.key.serialize_pem();
                let stored = match sealer {
                    Some(sealer) => sealer
                        .seal_file(SEALED_KEY_CONTEXT, pem.as_bytes())
                        .map_err(|e| error("sealing the CA key", e))?,
                    None => pem.into_bytes(),
                };
                write_private(&key_path, &stored)?;
                std::fs::write(&cert_path, ca.ca_pem.as_bytes())
                    .map_err(|e| error(&format!("writing {}", cert_path.display()), e))?;
                Ok(ca)
            }
            _ => Err(EffectError::new(format!(
                "{} holds only one of ca.pem and ca.key; restore the other or remove both to create a new CA",
                dir.display()
            ))),
        }
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The CA certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.ca_pem
    }

    /// How long issued certificates are valid.
    pub fn validity(&self) -> Duration {
        self.validity
    }
}

/// The associated data of the sealed `ca.key`.
const SEALED_KEY_CONTEXT: &[&str] = &["file", "issuer/ca.key"];

/// Replaces `path` by `contents` atomically (temporary file with mode 0600, then rename).
fn replace_private(path: &Path, contents: &[u8]) -> Result<(), EffectError> {
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, contents)?;
    std::fs::rename(&tmp, path).map_err(|e| error(&format!("writing {}", path.display()), e))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), EffectError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| error(&format!("creating {}", path.display()), e))?;
    file.write_all(contents).map_err(|e| error(&format!("writing {}", path.display()), e))?;
    file.sync_all().map_err(|e| error(&format!("writing {}", path.display()), e))
}

impl CertificateIssuer for LocalCa {
    fn issue(&self, request: &IssueRequest, now: Timestamp) -> Result<Vec<Vec<u8>>, EffectError> {
        let public_key = SubjectPublicKeyInfo::from_der(&request.subject_public_key_info)
            .map_err(|e| error("the CSR's public key cannot be certified", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.registration_id.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let start = now.unix_seconds() - SKEW_SECS;
        let end = (now.unix_seconds() + self.validity.as_secs() as i64).min(self.not_after);
        if end <= now.unix_seconds() {
            return Err(EffectError::new("the issuing CA certificate has expired"));
        }
        params.not_before = offset(start)?;
        params.not_after = offset(end)?;
        let issuer = Issuer::from_ca_cert_der(&self.ca_der.as_slice().into(), &self.key)
            .map_err(|e| error("reading the CA certificate", e))?;
        let cert =
            params.signed_by(&public_key, &issuer).map_err(|e| error("signing the device certificate", e))?;
        Ok(vec![cert.der().to_vec(), self.ca_der.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_seal::{DataKey, Sealer};

    fn sealer() -> Sealer {
        Sealer::new(vec![("t1".into(), DataKey::from_bytes([4u8; 32]))], "t1").unwrap()
    }

    fn dir() -> std::path::PathBuf {
        let mut b = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut b);
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        std::env::temp_dir().join(format!("dps-host-issuer-{name}"))
    }

    #[test]
    fn the_sealed_ca_key_is_not_in_clear_and_reopens() {
        let dir = dir();
        let now = Timestamp::from_unix_seconds(1_700_000_000);
        let s = sealer();
        let ca = LocalCa::open_or_create_sealed(
            &dir,
            "t",
            CaKeyKind::P256,
            DEFAULT_ISSUED_VALIDITY,
            now,
            Some(&s),
        )
        .unwrap();
        let stored = std::fs::read_to_string(dir.join("ca.key")).unwrap();
        assert!(stored.starts_with("sealed:v1:t1:") && !stored.contains("PRIVATE KEY"), "{stored}");
        let again = LocalCa::open_or_create_sealed(
            &dir,
            "t",
            CaKeyKind::P256,
            DEFAULT_ISSUED_VALIDITY,
            now,
            Some(&s),
        )
        .unwrap();
        assert_eq!(again.certificate_der(), ca.certificate_der());
        // Without the sealer: a clear error, not garbage.
        let err =
            LocalCa::open_or_create(&dir, "t", CaKeyKind::P256, DEFAULT_ISSUED_VALIDITY, now).unwrap_err();
        assert!(err.to_string().contains("sealed"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_clear_ca_key_from_before_is_sealed_on_open() {
        let dir = dir();
        let now = Timestamp::from_unix_seconds(1_700_000_000);
        LocalCa::open_or_create(&dir, "t", CaKeyKind::P256, DEFAULT_ISSUED_VALIDITY, now).unwrap();
        assert!(std::fs::read_to_string(dir.join("ca.key")).unwrap().contains("PRIVATE KEY"));
        let s = sealer();
        LocalCa::open_or_create_sealed(&dir, "t", CaKeyKind::P256, DEFAULT_ISSUED_VALIDITY, now, Some(&s))
            .unwrap();
        assert!(std::fs::read_to_string(dir.join("ca.key")).unwrap().starts_with("sealed:v1:"));
        LocalCa::open_or_create_sealed(&dir, "t", CaKeyKind::P256, DEFAULT_ISSUED_VALIDITY, now, Some(&s))
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
