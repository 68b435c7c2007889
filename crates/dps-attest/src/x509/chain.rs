//! The client-certificate chain a device presented, parsed once when the request is prepared.

use super::certinfo::{common_name, parse_der};
use dps_proto::{DpsError, ErrorCode};
use x509_cert::Certificate;

/// The most certificates a presented chain may hold (leaf included).
pub const MAX_CHAIN_LEN: usize = 10;

/// The longest leaf Common Name accepted (X.520 `ub-common-name`).
pub const MAX_COMMON_NAME_LEN: usize = 64;

/// One certificate of a presented chain: its DER and its parsed form.
#[derive(Debug, Clone)]
pub(crate) struct ChainCertificate {
    pub(crate) der: Vec<u8>,
    pub(crate) cert: Certificate,
}

/// A presented TLS client-certificate chain, leaf first, every certificate parsed as X.509, the leaf
/// carrying a subject Common Name of at most [`MAX_COMMON_NAME_LEN`] characters. Owned, so it can be held
/// across an await. Nothing here says the chain is trustworthy: [`super::attest_x509`] decides that against
/// the enrollment material.
#[derive(Debug, Clone)]
pub struct ClientChain {
    /// Never empty.
    certs: Vec<ChainCertificate>,
    common_name: String,
}

fn invalid(message: String) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidCertificate, message)
}

impl ClientChain {
    /// Parses a presented chain (DER certificates, leaf first). Refuses with `401002 InvalidCertificate`
    /// and a message naming the rule: an empty chain, more than [`MAX_CHAIN_LEN`] certificates, a
    /// certificate that is not DER X.509 (naming its position), a leaf without a subject CN or with one
    /// longer than [`MAX_COMMON_NAME_LEN`] characters.
    pub fn parse(der: &[Vec<u8>]) -> Result<Self, DpsError> {
        if der.is_empty() {
            return Err(invalid("the client certificate chain is empty".into()));
        }
        if der.len() > MAX_CHAIN_LEN {
            return Err(invalid(format!(
                "the chain has {} certificates; at most {MAX_CHAIN_LEN} are accepted",
                der.len()
            )));
        }
        let mut certs = Vec::with_capacity(der.len());
        for (i, d) in der.iter().enumerate() {
            let what = if i == 0 {
                "the device certificate (position 0)".to_owned()
            } else {
                format!("position {i}")
            };
            let cert =
                parse_der(d).map_err(|e| invalid(format!("certificate at {what} of the chain: {e}")))?;
            certs.push(ChainCertificate { der: d.clone(), cert });
        }
        let leaf = certs.first().map(|c| &c.cert);
        let common_name = leaf.and_then(common_name).ok_or_else(|| {
            invalid("the device certificate has no subject CN (it must be the registration ID)".into())
        })?;
        let len = common_name.chars().count();
        if len > MAX_COMMON_NAME_LEN {
            return Err(invalid(format!(
                "the device certificate's CN has {len} characters; at most {MAX_COMMON_NAME_LEN} are accepted"
            )));
        }
        Ok(ClientChain { certs, common_name })
    }

    /// The number of certificates (at least 1).
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Always false: a chain has at least its leaf.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The leaf's subject Common Name, as presented.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The leaf (device) certificate's DER.
    pub fn leaf_der(&self) -> &[u8] {
        self.der(0).unwrap_or_default()
    }

    /// The parsed leaf certificate.
    pub fn leaf(&self) -> &Certificate {
        &self.leaf_entry().cert
    }

    /// The DER of the certificate at `index` (0 is the leaf).
    pub fn der(&self, index: usize) -> Option<&[u8]> {
        self.certs.get(index).map(|c| c.der.as_slice())
    }

    /// The parsed certificate at `index` (0 is the leaf).
    pub fn certificate(&self, index: usize) -> Option<&Certificate> {
        self.certs.get(index).map(|c| &c.cert)
    }

    /// Every certificate's DER, leaf first.
    pub fn iter_der(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.certs.iter().map(|c| c.der.as_slice())
    }

    pub(crate) fn entries(&self) -> &[ChainCertificate] {
        &self.certs
    }

    fn leaf_entry(&self) -> &ChainCertificate {
        // `certs` is never empty (`parse` refuses an empty chain).
        &self.certs[0]
    }
}
