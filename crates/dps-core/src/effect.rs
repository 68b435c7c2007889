//! Effects beyond storage and hubs: work a flow asks its host to do, named by [`Effect`] and answered with
//! [`Input::Effect`](crate::flow::Input::Effect). Today: certificate issuance from a device's CSR, and
//! custom allocation (the enrollment's webhook, or an in-process [`AllocationHook`]). The enum is
//! `#[non_exhaustive]`, so a TPM challenge becomes one more variant, not a new driver.
//!
//! A driver performs effects through an [`Effects`] implementation; [`NoEffects`] (what
//! [`run_blocking`](crate::flow::run_blocking) and [`run_async`](crate::flow::run_async) use) answers every
//! effect "not available", and [`EffectHandlers`] dispatches to the handlers a host was given (a
//! [`CertificateIssuer`], an [`AllocationHook`]). Effects that wait on the network (a webhook) are
//! performed through [`Effects::perform_async`], which the async drivers call; its default runs the
//! synchronous [`Effects::perform`].

use crate::object::BoxFuture;
use dps_proto::allocation::{AllocationRequest, AllocationResponse};
use dps_proto::model::CustomAllocationDefinition;
use dps_proto::{ErrorCode, RegistrationId, Timestamp};
use std::sync::Arc;

/// An effect a flow asks for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Effect {
    /// Issue a device certificate for a verified CSR.
    IssueCertificate(IssueRequest),
    /// Decide a custom-allocation device's hub (spec §8.3-8.5): call the enrollment's webhook or the
    /// host's in-process hook.
    Allocate(Box<AllocationCall>),
}

/// What a custom allocation is asked to decide.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationCall {
    /// The enrollment's `customAllocationDefinition` with its real webhook URL (the copy of the
    /// enrollment inside `request` has the URL's query masked, as Azure shows it); `None` when the
    /// enrollment names no webhook (allowed only with an in-process hook).
    pub definition: Option<CustomAllocationDefinition>,
    /// The request body, exactly what a webhook receives.
    pub request: AllocationRequest,
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
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EffectResult {
    /// For [`Effect::IssueCertificate`]: DER certificates, the issued leaf first, then each issuer up to
    /// the root (each certificate the issuer of the one before).
    IssuedCertificate(Vec<Vec<u8>>),
    /// For [`Effect::Allocate`]: the webhook's (or hook's) answer, to be checked by the flow.
    Allocation(AllocationResponse),
}

/// An effect could not be performed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EffectError {
    /// What went wrong (shown to the device in its registration's `errorMessage`).
    pub message: String,
    /// The host has no handler for this effect.
    pub unsupported: bool,
    /// The registration's error code, when the effect names one (e.g. a webhook's 401 is 400209).
    pub code: Option<ErrorCode>,
}

impl EffectError {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        EffectError { message: message.into(), unsupported: false, code: None }
    }

    /// A failure the registration reports with `code`.
    pub fn with_code(code: ErrorCode, message: impl Into<String>) -> Self {
        EffectError { message: message.into(), unsupported: false, code: Some(code) }
    }

    /// "This host cannot perform `what`."
    pub fn unsupported(what: &str) -> Self {
        EffectError {
            message: format!("{what} is not available in this host"),
            unsupported: true,
            code: None,
        }
    }
}

/// Decides custom allocations (spec §8.3-8.5) in-process: the same request a webhook receives, the same
/// response it answers. The host's built-in implementation is its webhook client (`dps_host::Webhooks`);
/// an embedder installs its own with `HostBuilder::allocation_hook`, and may delegate to the webhook for
/// enrollments it does not handle.
///
/// Answer `Err` with [`EffectError::with_code`]: [`ErrorCode::CustomAllocationFailed`] (400207),
/// [`ErrorCode::CustomAllocationUnauthorizedAccess`] (400209); an answer without a hub is 400208, a hub
/// not among `linkedHubs` 400207 (the flow checks both). The future is awaited on the registration's
/// background task while the device polls `assigning`; the host contains a panic (400207).
pub trait AllocationHook: Send + Sync {
    /// Decides `call` at time `now`.
    fn allocate(
        &self,
        call: AllocationCall,
        now: Timestamp,
    ) -> BoxFuture<'static, Result<AllocationResponse, EffectError>>;
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

    /// Performs one effect at time `now`, awaiting network work (what the async drivers call). The
    /// default performs [`Effects::perform`].
    fn perform_async(
        &self,
        effect: Effect,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<EffectResult, EffectError>> {
        let result = self.perform(effect, now);
        Box::pin(std::future::ready(result))
    }
}

/// Answers every effect with [`EffectError::unsupported`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEffects;

impl Effects for NoEffects {
    fn perform(&self, effect: Effect, _now: Timestamp) -> Result<EffectResult, EffectError> {
        Err(match effect {
            Effect::IssueCertificate(_) => EffectError::unsupported("certificate issuance"),
            Effect::Allocate(_) => EffectError::unsupported("custom allocation"),
        })
    }
}

/// The effect handlers a host was given.
#[derive(Clone, Default)]
pub struct EffectHandlers {
    /// Issues certificates for CSRs (none: a `csr` is refused with 400008).
    pub issuer: Option<Arc<dyn CertificateIssuer>>,
    /// Decides custom allocations (none: a custom-allocation device fails with 400207).
    pub allocator: Option<Arc<dyn AllocationHook>>,
}

impl std::fmt::Debug for EffectHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EffectHandlers")
            .field("issuer", &self.issuer.is_some())
            .field("allocator", &self.allocator.is_some())
            .finish()
    }
}

impl Effects for EffectHandlers {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        match effect {
            Effect::IssueCertificate(request) => match &self.issuer {
                Some(issuer) => issuer.issue(&request, now).map(EffectResult::IssuedCertificate),
                None => Err(EffectError::unsupported("certificate issuance")),
            },
            // A hook answers with a future: a blocking driver cannot wait for it here (the blocking host
            // wraps its handlers and waits itself).
            Effect::Allocate(_) => Err(EffectError::unsupported("custom allocation in a blocking driver")),
        }
    }

    fn perform_async(
        &self,
        effect: Effect,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<EffectResult, EffectError>> {
        match effect {
            Effect::Allocate(call) => match &self.allocator {
                Some(hook) => {
                    let answer = hook.allocate(*call, now);
                    Box::pin(async move { answer.await.map(EffectResult::Allocation) })
                }
                None => Box::pin(std::future::ready(Err(EffectError::unsupported("custom allocation")))),
            },
            other => Box::pin(std::future::ready(self.perform(other, now))),
        }
    }
}

impl<T: Effects + ?Sized> Effects for Arc<T> {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        (**self).perform(effect, now)
    }

    fn perform_async(
        &self,
        effect: Effect,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<EffectResult, EffectError>> {
        (**self).perform_async(effect, now)
    }
}

impl<T: Effects + ?Sized> Effects for &T {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        (**self).perform(effect, now)
    }

    fn perform_async(
        &self,
        effect: Effect,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<EffectResult, EffectError>> {
        (**self).perform_async(effect, now)
    }
}
