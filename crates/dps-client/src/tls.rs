//! TLS client configuration on aws-lc-rs (the provider is always passed explicitly).

use crate::ProvisionError;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A TLS client certificate chain and its private key (X.509 attestation, or a mutually-authenticated
/// symmetric-key device).
#[derive(Debug)]
pub struct ClientIdentity {
    /// The device certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the first certificate.
    pub key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// Reads a certificate chain and a private key, each PEM or DER.
    pub fn from_pem_or_der(chain: &[u8], key: &[u8]) -> Result<ClientIdentity, ProvisionError> {
        let chain = certificates(chain)?;
        let key = if looks_like_pem(key) {
            PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| ProvisionError::Config(format!("cannot parse the private key PEM: {e}")))?
        } else {
            PrivateKeyDer::try_from(key.to_vec())
                .map_err(|e| ProvisionError::Config(format!("cannot parse the private key DER: {e}")))?
        };
        Ok(ClientIdentity { chain, key })
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Parses certificates given as PEM (any number) or as one DER certificate.
pub fn certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, ProvisionError> {
    let certs = if looks_like_pem(bytes) {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ProvisionError::Config(format!("cannot parse the certificate PEM: {e}")))?
    } else {
        vec![CertificateDer::from(bytes.to_vec())]
    };
    if certs.is_empty() || certs.iter().any(|c| c.is_empty()) {
        return Err(ProvisionError::Config("no certificate given".to_owned()));
    }
    Ok(certs)
}

/// A rustls client configuration trusting `roots` (and presenting `identity`, if any), TLS 1.3 and 1.2,
/// on the aws-lc-rs provider.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<&ClientIdentity>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, ProvisionError> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store
            .add(cert.clone())
            .map_err(|e| ProvisionError::Tls(format!("the trust root is not usable: {e}")))?;
    }
    if store.is_empty() {
        return Err(ProvisionError::Config("no trust root given".to_owned()));
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ProvisionError::Tls(format!("TLS versions: {e}")))?
            .with_root_certificates(store);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| ProvisionError::Tls(format!("the client certificate is not usable: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
