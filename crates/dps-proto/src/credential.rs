//! What a device presents to prove who it is, as captured by its transport.
//!
//! Every transport builds one [`Credential`] per device request: the HTTPS `Authorization` header or the
//! MQTT CONNECT password becomes [`Credential::SasToken`]; the client-certificate chain of the TLS session
//! (HTTPS, MQTT on 8883, either over WebSocket) becomes [`Credential::ClientCertificate`]; a TPM device's
//! first register carries its endorsement and storage root keys in the body, which the engine turns into
//! [`Credential::Tpm`]. Attestation (`dps-attest`) dispatches on it.

/// A client-certificate chain as captured by TLS: DER certificates, the device (leaf) certificate first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertificateChain {
    /// DER-encoded certificates, leaf first.
    pub der: Vec<Vec<u8>>,
}

impl CertificateChain {
    /// The device certificate (first of the chain), if any.
    pub fn leaf(&self) -> Option<&[u8]> {
        self.der.first().map(Vec::as_slice)
    }
}

/// A TPM device's registration keys (base64 as sent in the register body).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TpmRegistration {
    /// Base64 TPM2B_PUBLIC of the endorsement key.
    pub endorsement_key: String,
    /// Base64 TPM2B_PUBLIC of the storage root key.
    pub storage_root_key: String,
}

/// What a device presented.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Credential {
    /// Nothing: no SAS token and no client certificate.
    #[default]
    None,
    /// A `SharedAccessSignature …` value exactly as sent (Authorization header or MQTT password).
    SasToken(String),
    /// A TLS client-certificate chain.
    ClientCertificate(CertificateChain),
    /// TPM registration keys.
    Tpm(TpmRegistration),
}

impl Credential {
    /// The credential of a request from what its transport captured: a SAS token when one was sent
    /// (it wins, as in Azure, where a SAS on a mutually authenticated connection is what is verified),
    /// otherwise the client-certificate chain, otherwise [`Credential::None`].
    pub fn from_transport(authorization: Option<String>, client_certificates: Option<Vec<Vec<u8>>>) -> Self {
        match (authorization, client_certificates) {
            (Some(token), _) => Credential::SasToken(token),
            (None, Some(der)) if !der.is_empty() => Credential::ClientCertificate(CertificateChain { der }),
            _ => Credential::None,
        }
    }

    /// The SAS token, if this is one.
    pub fn sas_token(&self) -> Option<&str> {
        match self {
            Credential::SasToken(t) => Some(t),
            _ => None,
        }
    }

    /// A short name for logs and messages: `none`, `sasToken`, `x509`, `tpm`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::None => "none",
            Credential::SasToken(_) => "sasToken",
            Credential::ClientCertificate(_) => "x509",
            Credential::Tpm(_) => "tpm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sas_token_wins_over_a_client_certificate_and_an_empty_chain_is_no_credential() {
        let chain = Some(vec![vec![0x30, 0x00]]);
        assert_eq!(
            Credential::from_transport(Some("SharedAccessSignature x".into()), chain.clone()).kind(),
            "sasToken"
        );
        assert_eq!(Credential::from_transport(None, chain).kind(), "x509");
        assert_eq!(Credential::from_transport(None, Some(vec![])), Credential::None);
        assert_eq!(Credential::from_transport(None, None), Credential::None);
    }
}
