//! Effects beyond storage and hubs: work a flow asks its host to do, named by [`Effect`] and answered with
//! [`Input::Effect`](crate::flow::Input::Effect). Today: certificate issuance from a device's CSR. The
//! enum is `#[non_exhaustive]`, so an allocation hook or a TPM challenge becomes one more variant, not a
//! new driver.
//!
//! A driver performs effects through an [`Effects`] implementation; [`NoEffects`] (what
//! [`run_blocking`](crate::flow::run_blocking) and [`run_async`](crate::flow::run_async) use) answers every
//! effect "not available", and [`EffectHandlers`] dispatches to the handlers a host was given (a
//! [`CertificateIssuer`]).

use dps_proto::{RegistrationId, Timestamp};
use std::sync::Arc;

/// An effect a flow asks for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Effect {
    /// Issue a device certificate for a verified CSR.
    IssueCertificate(IssueRequest),
}

/// What an issuer is asked to sign.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The (attested) registration ID: the certificate's subject CN.
    pub registration_id: RegistrationId,
    /// The device ID the device gets in its hub.
    pub device_id: String,
    /// The public key to certify: the SubjectPublicKeyInfo (DER) of the device's CSR, which the engine
    /// parsed and whose signature and CN it checked.
    pub subject_public_key_info: Vec<u8>,
    /// The CSR itself (DER PKCS#10), for issuers that forward it to another CA.
    pub csr_der: Vec<u8>,
}

/// The result of an [`Effect`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EffectResult {
    /// For [`Effect::IssueCertificate`]: DER certificates, the issued leaf first, then each issuer up to
    /// the root (each certificate the issuer of the one before).
    IssuedCertificate(Vec<Vec<u8>>),
}

/// An effect could not be performed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EffectError {
    /// What went wrong (shown to the device in its registration's `errorMessage`).
    pub message: String,
    /// The host has no handler for this effect.
    pub unsupported: bool,
}

impl EffectError {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        EffectError { message: message.into(), unsupported: false }
    }

    /// "This host cannot perform `what`."
    pub fn unsupported(what: &str) -> Self {
        EffectError { message: format!("{what} is not available in this host"), unsupported: true }
    }
}

/// Issues device certificates (the pluggable issuer of spec §7.6). The reference implementation is the
/// host's local CA (`dps_host::LocalCa`); an embedder may forward to a corporate PKI instead. Called on
/// the flow's task; signing a certificate takes about a millisecond.
pub trait CertificateIssuer: Send + Sync {
    /// Signs a certificate for `request` at time `now`; returns the chain, leaf first, up to the root.
    fn issue(&self, request: &IssueRequest, now: Timestamp) -> Result<Vec<Vec<u8>>, EffectError>;
}

/// Performs effects for a driver.
pub trait Effects: Send + Sync {
    /// Performs one effect at time `now`.
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError>;
}

/// Answers every effect with [`EffectError::unsupported`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEffects;

impl Effects for NoEffects {
    fn perform(&self, effect: Effect, _now: Timestamp) -> Result<EffectResult, EffectError> {
        Err(match effect {
            Effect::IssueCertificate(_) => EffectError::unsupported("certificate issuance"),
        })
    }
}

/// The effect handlers a host was given.
#[derive(Clone, Default)]
pub struct EffectHandlers {
    /// Issues certificates for CSRs (none: a `csr` is refused with 400008).
    pub issuer: Option<Arc<dyn CertificateIssuer>>,
}

impl std::fmt::Debug for EffectHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EffectHandlers").field("issuer", &self.issuer.is_some()).finish()
    }
}

impl Effects for EffectHandlers {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        match effect {
            Effect::IssueCertificate(request) => match &self.issuer {
                Some(issuer) => issuer.issue(&request, now).map(EffectResult::IssuedCertificate),
                None => Err(EffectError::unsupported("certificate issuance")),
            },
        }
    }
}

impl<T: Effects + ?Sized> Effects for Arc<T> {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        (**self).perform(effect, now)
    }
}

impl<T: Effects + ?Sized> Effects for &T {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        (**self).perform(effect, now)
    }
}
