//! X.509 devices: a root CA the load generator generates at start, and for every device its own leaf
//! certificate (ECDSA P-256, subject CN = the registration ID, EKU clientAuth) signed by that root, generated
//! before the timed runs and presented as the TLS client certificate of the device's fresh connection.
//!
//! The server admits such devices through an X.509 enrollment group whose `caReferences.primary` names the
//! root, uploaded as a verified CA certificate ([`crate::service::ServiceClient::setup_x509_group`]); the
//! X.509 baseline requires and verifies the client certificate against the same root
//! ([`crate::tls::BaselineClientAuth::Required`]).

use crate::Error;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name under which the bench uploads its device root as a verified CA certificate.
pub const DEVICE_CA_NAME: &str = "loadgen-device-root";

fn tls(e: rcgen::Error) -> Error {
    Error::Tls(format!("certificate generation failed: {e}"))
}

/// The root CA of the simulated X.509 devices (ECDSA P-256, self-signed).
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa").field("pem", &self.pem).finish_non_exhaustive()
    }
}

impl DeviceCa {
    /// A fresh root CA named `CN={common_name}`.
    pub fn generate(common_name: &str) -> Result<DeviceCa, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, common_name);
        let cert = params.self_signed(&key).map_err(tls)?;
        Ok(DeviceCa { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// The root certificate, PEM (what the server's CA certificate and the X.509 baseline trust).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The root certificate, DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// A leaf for `registration_id`: subject CN = the registration ID, EKU clientAuth, ECDSA P-256, signed
    /// by this root. The chain holds the leaf only (it is signed by the root itself).
    pub fn leaf(&self, registration_id: &str) -> Result<DeviceIdentity, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.distinguished_name.push(DnType::CommonName, registration_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).map_err(tls)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| Error::Tls(format!("the device key is not usable: {e}")))?;
        Ok(DeviceIdentity(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))))
    }

    /// Leaves for `ids`, and how long generating them took.
    pub fn leaves<I, S>(&self, ids: I) -> Result<(Vec<DeviceIdentity>, Duration), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let start = Instant::now();
        let leaves = ids.into_iter().map(|id| self.leaf(id.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok((leaves, start.elapsed()))
    }
}

/// One device's TLS client identity: its leaf certificate chain and its loaded private key, ready to be
/// presented in a handshake without any further parsing.
#[derive(Debug, Clone)]
pub struct DeviceIdentity(Arc<CertifiedKey>);

impl DeviceIdentity {
    /// The certificate chain (the leaf first).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.0.cert
    }

    /// A client certificate resolver that always presents this identity.
    pub fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        Arc::new(FixedClientCert(self.0.clone()))
    }
}

/// Always presents the same certificate (rustls still checks that its key can sign with one of the schemes
/// the server offers).
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::danger::ClientCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::UnixTime;

    fn verifier(root: &DeviceCa) -> Arc<dyn ClientCertVerifier> {
        let mut roots = RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider()).build().unwrap()
    }

    #[test]
    fn a_device_leaf_names_its_registration_id_and_verifies_against_the_root() {
        let root = DeviceCa::generate("dps-loadgen test devices").unwrap();
        assert!(root.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let root_info = dps_core::attest::x509::certificate_info(root.der()).unwrap();
        assert_eq!(root_info.subject_name, "CN=dps-loadgen test devices");

        let (leaves, _took) = root.leaves(["sensor-x509-000000", "sensor-x509-000001"]).unwrap();
        assert_eq!(leaves.len(), 2);
        let now = UnixTime::now();
        for (leaf, id) in leaves.iter().zip(["sensor-x509-000000", "sensor-x509-000001"]) {
            assert_eq!(leaf.chain().len(), 1, "the leaf alone");
            let info = dps_core::attest::x509::certificate_info(&leaf.chain()[0]).unwrap();
            assert_eq!(info.subject_name, format!("CN={id}"));
            assert_eq!(info.issuer_name, "CN=dps-loadgen test devices");
            // The baseline's verifier (webpki, clientAuth EKU) accepts it.
            verifier(&root).verify_client_cert(&leaf.chain()[0], &[], now).unwrap();
            assert!(leaf.resolver().has_certs());
            assert!(leaf.resolver().resolve(&[], &[]).is_some());
        }

        // A leaf of another root does not verify.
        let other = DeviceCa::generate("another root").unwrap();
        let stranger = other.leaf("sensor-x509-000000").unwrap();
        assert!(verifier(&root).verify_client_cert(&stranger.chain()[0], &[], now).is_err());
    }
}
