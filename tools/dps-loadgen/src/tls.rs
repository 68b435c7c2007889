//! TLS on aws-lc-rs, always with the provider passed explicitly: the client configuration devices use, and
//! the certificates and server configuration of the in-process baseline servers.

use crate::Error;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::sync::Arc;

/// The crypto provider every configuration uses: aws-lc-rs, passed explicitly (with both ring and aws-lc-rs
/// in the dependency graph the default builders would panic).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Which TLS versions the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsVersions {
    /// TLS 1.3 and 1.2 (the server picks; rustls servers pick 1.3).
    #[default]
    Any,
    /// TLS 1.2 only (what the Azure Python device SDK speaks).
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Which TLS 1.3 cipher suites the client offers (TLS 1.2 suites are unaffected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CipherSuites {
    /// rustls's default order: AES-256-GCM-SHA384, AES-128-GCM-SHA256, ChaCha20-Poly1305-SHA256 (OpenSSL
    /// clients, and so most device SDKs, also put AES-256-GCM-SHA384 first).
    #[default]
    Default,
    /// Only TLS13_AES_128_GCM_SHA256 (its key schedule uses SHA-256 instead of SHA-384).
    Aes128,
    /// Only TLS13_AES_256_GCM_SHA384.
    Aes256,
    /// Only TLS13_CHACHA20_POLY1305_SHA256.
    Chacha20,
}

/// The client's TLS choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// Protocol versions offered.
    pub versions: TlsVersions,
    /// TLS 1.3 cipher suites offered.
    pub suites: CipherSuites,
}

impl From<TlsVersions> for TlsOptions {
    fn from(versions: TlsVersions) -> TlsOptions {
        TlsOptions { versions, suites: CipherSuites::Default }
    }
}

impl TlsOptions {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        let versions = match self.versions {
            TlsVersions::Any => "TLS 1.3 offered with 1.2",
            TlsVersions::Tls12 => "TLS 1.2",
            TlsVersions::Tls13 => "TLS 1.3",
        };
        match self.suites {
            CipherSuites::Default => versions.to_owned(),
            CipherSuites::Aes128 => format!("{versions}, TLS 1.3 suite AES-128-GCM-SHA256 only"),
            CipherSuites::Aes256 => format!("{versions}, TLS 1.3 suite AES-256-GCM-SHA384 only"),
            CipherSuites::Chacha20 => format!("{versions}, TLS 1.3 suite ChaCha20-Poly1305 only"),
        }
    }
}

/// Parses every certificate of a PEM file's contents.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("cannot parse the CA certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls("the CA file holds no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// A device-side client configuration trusting the CA certificates in `ca_pem`.
///
/// Session resumption is **disabled**: every device does a full handshake, as a freshly booted device does,
/// and as the server must be able to afford.
pub fn client_config(ca_pem: &[u8], options: impl Into<TlsOptions>) -> Result<Arc<ClientConfig>, Error> {
    let options = options.into();
    let mut roots = RootCertStore::empty();
    for cert in parse_certificates(ca_pem)? {
        roots.add(cert).map_err(|e| Error::Tls(format!("the CA certificate is not usable: {e}")))?;
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match options.versions {
        TlsVersions::Any => &[&TLS13, &TLS12],
        TlsVersions::Tls12 => &[&TLS12],
        TlsVersions::Tls13 => &[&TLS13],
    };
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let only = match options.suites {
        CipherSuites::Default => None,
        CipherSuites::Aes128 => Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        CipherSuites::Aes256 => Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
        CipherSuites::Chacha20 => Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
    };
    if let Some(only) = only {
        provider.cipher_suites.retain(|s| s.suite() == only || s.tls13().is_none());
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name the client verifies the server certificate against: an IP address SAN for an IP, else a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| Error::Config(format!("'{host}' is not a server name: {e}")))
}

/// A throw-away PKI like the reference server's: an ECDSA P-256 CA and a server certificate it signed.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate, PEM (what devices trust).
    pub ca_pem: String,
    /// The server's chain: the leaf, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub key: PrivateKeyDer<'static>,
}

impl TestPki {
    /// Generates a CA and a server certificate with these subject alternative names (IP addresses become IP
    /// SANs, anything else DNS names).
    pub fn generate(subject_alt_names: &[String]) -> Result<TestPki, Error> {
        let tls = |e: rcgen::Error| Error::Tls(format!("certificate generation failed: {e}"));
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "dps-loadgen baseline CA");
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls)?;
        let mut leaf_params = CertificateParams::new(subject_alt_names.to_vec()).map_err(tls)?;
        leaf_params.distinguished_name.push(DnType::CommonName, "dps-loadgen baseline server");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).map_err(tls)?;

        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        })
    }

    /// A server configuration (TLS 1.3 and 1.2, aws-lc-rs, no client authentication) for this certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        self.server_config_with(false)
    }

    /// A server configuration that may also **request** an optional client certificate, as a DPS server must
    /// for X.509 attestation (devices without one send an empty Certificate message).
    pub fn server_config_with(&self, request_client_cert: bool) -> Result<Arc<ServerConfig>, Error> {
        let auth = if request_client_cert { BaselineClientAuth::Optional } else { BaselineClientAuth::Off };
        self.server_config_for(&auth)
    }

    /// A server configuration with the given client authentication.
    pub fn server_config_for(&self, auth: &BaselineClientAuth) -> Result<Arc<ServerConfig>, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|e| Error::Tls(e.to_string()))?;
        let roots_of = |pem: &[u8]| -> Result<RootCertStore, Error> {
            let mut roots = RootCertStore::empty();
            for cert in parse_certificates(pem)? {
                roots.add(cert).map_err(|e| Error::Tls(e.to_string()))?;
            }
            Ok(roots)
        };
        let builder = match auth {
            BaselineClientAuth::Off => builder.with_no_client_auth(),
            BaselineClientAuth::Optional => {
                let roots = roots_of(self.ca_pem.as_bytes())?;
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| Error::Tls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            BaselineClientAuth::Required { roots_pem } => {
                let roots = roots_of(roots_pem.as_bytes())?;
                // Mandatory: a handshake without a certificate chaining to `roots` fails.
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| Error::Tls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls(format!("the server certificate is not usable: {e}")))?;
        Ok(Arc::new(config))
    }
}

/// How a baseline server treats client certificates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BaselineClientAuth {
    /// None requested (symmetric-key devices, the default).
    #[default]
    Off,
    /// An optional client certificate requested in every handshake (`--baseline-client-auth`), as a DPS
    /// server must for X.509 attestation; devices without one send an empty Certificate message.
    Optional,
    /// A client certificate **required** and verified (webpki, EKU clientAuth) against these roots: the
    /// baseline of X.509 devices.
    Required {
        /// The trusted roots, PEM.
        roots_pem: String,
    },
}

impl BaselineClientAuth {
    /// A few words for report labels (empty for [`BaselineClientAuth::Off`]).
    pub fn describe(&self) -> &'static str {
        match self {
            BaselineClientAuth::Off => "",
            BaselineClientAuth::Optional => ", optional client cert requested",
            BaselineClientAuth::Required { .. } => ", client cert required and verified",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pki_makes_working_configs() {
        let pki = TestPki::generate(&["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        assert!(pki.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(pki.chain.len(), 2);
        pki.server_config().unwrap();
        pki.server_config_with(true).unwrap();
        client_config(pki.ca_pem.as_bytes(), TlsVersions::Any).unwrap();
        client_config(pki.ca_pem.as_bytes(), TlsVersions::Tls12).unwrap();
        for suites in [CipherSuites::Aes128, CipherSuites::Aes256, CipherSuites::Chacha20] {
            let options = TlsOptions { versions: TlsVersions::Tls13, suites };
            client_config(pki.ca_pem.as_bytes(), options).unwrap();
            assert!(options.describe().contains("only"));
        }
        assert!(matches!(server_name("127.0.0.1").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("localhost").unwrap(), ServerName::DnsName(_)));
    }

    #[test]
    fn bad_ca_files_are_refused() {
        assert!(client_config(b"not a pem", TlsVersions::Any).is_err());
        assert!(client_config(b"", TlsVersions::Any).is_err());
    }
}
