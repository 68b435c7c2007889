//! Device attestation for the DPS engine.
//!
//! Attestation answers two questions at once: *is this device who it says it is*, and *which enrollment
//! does it belong to*. The answer is a proof value, [`VerifiedDevice`], that only this crate can construct;
//! the engine's assignment step takes one, so "assigned without attestation" does not compile. The proof
//! is owned (`'static`): it names the enrollment (the individual enrollment itself, or a shared handle on the
//! store's group snapshot) and the hub credential, so it survives an await such as a webhook call.
//!
//! Symmetric-key resolution order (spec §4.3, §12 item 27):
//! 1. An individual enrollment with the registration ID decides alone: its primary then secondary key must
//!    verify the SAS; if it does and the enrollment is disabled, the answer is [`Attestation::Disabled`]
//!    (no fallback to groups).
//! 2. Otherwise every symmetric-key enrollment group is tried, in group-ID order: the device key is
//!    `HMAC-SHA256(group key, registration ID)` for the primary then the secondary group key. The first group
//!    whose derived key verifies decides; if it is disabled the answer is `Disabled`.
//! 3. Nothing verifies: `401000 Unauthorized`.
//!
//! Expiry (with five minutes of skew) and the token's audience are checked before any key is tried.
//!
//! X.509 resolution order (spec §7.1-7.3, feature `x509`, [`x509::attest_x509`]). [`prepare`] parses the
//! presented chain ([`x509::ClientChain`]: 1 to 10 DER certificates, leaf first, the leaf with a CN of at
//! most 64 characters). Then, every failure being `401002 InvalidCertificate` with a message naming the
//! rule that failed:
//! 0. The leaf's CN must equal the registration ID (ignoring case); every presented certificate must use
//!    an accepted key and signature algorithm (ECDSA P-256/P-384 with SHA-256/384, RSA 2048-8192 with
//!    PKCS#1 v1.5 or PSS); the leaf must be within its validity period (five minutes of skew).
//! 1. An individual enrollment with the registration ID decides alone. Disabled (whatever its type) →
//!    [`Attestation::Disabled`]. Not X.509 → refused. With `clientCertificates`: the leaf must be the
//!    primary or secondary certificate; a self-signed leaf needs nothing more (its EKU, when present, must
//!    allow client authentication); a CA-signed one must validate to a verified uploaded CA certificate.
//!    With `caReferences`: the path must pass through the referenced uploaded certificate and reach a
//!    verified one (the reference itself, if verified).
//! 2. Otherwise the X.509 enrollment groups, most specific first: for each certificate above the leaf in
//!    the presented chain, then for the issuer of the last presented certificate when the device left it
//!    out (found by subject and signature among the groups' certificates and the uploads), the groups whose
//!    signing certificate (inline `signingCertificates`, or `caReferences` naming an upload) *is* that
//!    certificate; among several, the device's recorded group first, then group-ID order. The first group
//!    found decides: disabled → `Disabled` (no fallback to a less specific enabled group); enabled → the
//!    path (rustls-webpki: signatures, validity with skew, basicConstraints CA on issuers, EKU clientAuth)
//!    must pass through the group's certificate and reach a verified uploaded certificate; failing that is
//!    an error, not a fall-through.
//! 3. Nothing matches: refused, naming the leaf and its issuer.
//!
//! A group or `caReferences` device's hub credential is [`HubCredential::CertificateAuthority`]; one
//! matched by its enrolled certificate gets [`HubCredential::X509Thumbprints`].
//!
//! This crate does no I/O and reads no clock: `now` is an argument.
#![forbid(unsafe_code)]

use dps_proto::certificate::CaCertificate;
#[cfg(not(feature = "x509"))]
use dps_proto::credential::CertificateChain;
use dps_proto::credential::{Credential, TpmRegistration};
use dps_proto::model::{AttestationType, EnrollmentGroup, IndividualEnrollment, ProvisioningStatus};
use dps_proto::sas::{device_resource, SasToken, SymmetricKey};
use dps_proto::{DpsError, EnrollmentGroupId, ErrorCode, IdScope, RegistrationId, Timestamp};
use std::sync::Arc;

#[cfg(feature = "x509")]
pub mod x509;

/// One enrollment group of a shared, immutable group list (the store's cached snapshot): owning it costs
/// one reference count, not a copy of the group.
#[derive(Debug, Clone)]
pub struct SharedGroup {
    groups: Arc<Vec<EnrollmentGroup>>,
    index: usize,
}

impl SharedGroup {
    /// The group.
    pub fn group(&self) -> &EnrollmentGroup {
        // `index` is always in bounds: only `attest_symmetric_key` builds one, from an index it iterated.
        &self.groups[self.index]
    }
}

impl std::ops::Deref for SharedGroup {
    type Target = EnrollmentGroup;

    fn deref(&self) -> &EnrollmentGroup {
        self.group()
    }
}

/// The enrollment a device matched. Owned: a proof holding it may be kept across an await (a webhook, a
/// certificate issuer, a TPM challenge) without borrowing the store's data.
#[derive(Debug, Clone)]
pub enum MatchedEnrollment {
    /// An individual enrollment.
    Individual(Arc<IndividualEnrollment>),
    /// An enrollment group.
    Group(SharedGroup),
}

impl MatchedEnrollment {
    /// Whether the matched enrollment is disabled.
    pub fn is_disabled(&self) -> bool {
        let status = match self {
            MatchedEnrollment::Individual(e) => e.provisioning_status,
            MatchedEnrollment::Group(g) => g.provisioning_status,
        };
        status == Some(ProvisioningStatus::Disabled)
    }

    /// The group's ID when matched through a group.
    pub fn group_id(&self) -> Option<&str> {
        match self {
            MatchedEnrollment::Group(g) => Some(&g.enrollment_group_id),
            MatchedEnrollment::Individual(_) => None,
        }
    }
}

/// Proof that a device authenticated and which enrollment it belongs to. Only this crate constructs it.
/// It owns everything it names (`Send + Sync + 'static`), so a flow can hold it across any effect.
#[derive(Debug, Clone)]
pub struct VerifiedDevice {
    registration_id: RegistrationId,
    enrollment: MatchedEnrollment,
    credential: DeviceCredential,
    key_index: usize,
}

/// What the device proved itself with.
#[derive(Debug, Clone)]
enum DeviceCredential {
    /// Symmetric keys: the device's primary key and its secondary (or the group key to derive it from).
    Keys { primary: SymmetricKey, secondary: Secondary },
    /// An X.509 chain (boxed: the certificate details are large next to a key).
    #[cfg(feature = "x509")]
    X509(Box<x509::X509Evidence>),
}

/// The device's secondary key, or the group key it is derived from (derived only when asked for: a poll
/// re-attests but never needs it).
#[derive(Debug, Clone)]
enum Secondary {
    Key(SymmetricKey),
    FromGroup(SymmetricKey),
}

impl VerifiedDevice {
    /// The authenticated registration ID.
    pub fn registration_id(&self) -> &RegistrationId {
        &self.registration_id
    }

    /// The enrollment it matched (always enabled).
    pub fn enrollment(&self) -> &MatchedEnrollment {
        &self.enrollment
    }

    /// The device's primary key (the enrollment's key, or the group-derived key): the credential its hub
    /// identity gets. `None` for an X.509 device.
    pub fn primary_key(&self) -> Option<&SymmetricKey> {
        match &self.credential {
            DeviceCredential::Keys { primary, .. } => Some(primary),
            #[cfg(feature = "x509")]
            DeviceCredential::X509(_) => None,
        }
    }

    /// The device's secondary key (for a group device, derived from the group's secondary key on each
    /// call). `None` for an X.509 device.
    pub fn secondary_key(&self) -> Option<SymmetricKey> {
        match &self.credential {
            DeviceCredential::Keys { secondary: Secondary::Key(k), .. } => Some(k.clone()),
            DeviceCredential::Keys { secondary: Secondary::FromGroup(group), .. } => {
                Some(group.derive_device_key(self.registration_id.as_str()))
            }
            #[cfg(feature = "x509")]
            DeviceCredential::X509(_) => None,
        }
    }

    /// Symmetric keys: 0 when the primary key verified the token, 1 for the secondary. X.509: which
    /// enrolled client certificate the device presented (0 primary, 1 secondary), 0 when matched through a
    /// CA.
    pub fn key_index(&self) -> usize {
        self.key_index
    }

    /// The device-facing `registrationState.x509` of an X.509 device: the device certificate's info, the
    /// group it matched through and the info of the signing certificate the enrollment named. `None` for
    /// other devices.
    pub fn x509_result(&self) -> Option<dps_proto::model::X509RegistrationResult> {
        match &self.credential {
            #[cfg(feature = "x509")]
            DeviceCredential::X509(x) => Some(dps_proto::model::X509RegistrationResult {
                certificate_info: Some(x.leaf_info.clone()),
                enrollment_group_id: self.enrollment.group_id().map(str::to_owned),
                signing_certificate_info: x.signing_info.clone(),
            }),
            DeviceCredential::Keys { .. } => None,
        }
    }

    /// The DER of the device certificate an X.509 device presented; `None` for other devices.
    pub fn client_leaf_der(&self) -> Option<&[u8]> {
        match &self.credential {
            #[cfg(feature = "x509")]
            DeviceCredential::X509(x) => Some(&x.leaf_der),
            DeviceCredential::Keys { .. } => None,
        }
    }
}

/// A device that authenticated but whose enrollment is disabled.
#[derive(Debug, Clone)]
pub struct DisabledDevice {
    registration_id: RegistrationId,
    enrollment: MatchedEnrollment,
}

impl DisabledDevice {
    /// The authenticated registration ID.
    pub fn registration_id(&self) -> &RegistrationId {
        &self.registration_id
    }

    /// The disabled enrollment.
    pub fn enrollment(&self) -> &MatchedEnrollment {
        &self.enrollment
    }
}

/// The outcome of a successful authentication.
#[derive(Debug, Clone)]
pub enum Attestation {
    /// Authenticated, enrollment enabled: the device may be assigned.
    Verified(VerifiedDevice),
    /// Authenticated, enrollment disabled: the registration ends in status `disabled`.
    Disabled(DisabledDevice),
}

fn keys_of(
    attestation_keys: Option<&dps_proto::model::SymmetricKeyAttestation>,
) -> Result<(SymmetricKey, SymmetricKey), DpsError> {
    let internal = |what: &str| {
        DpsError::with_message(ErrorCode::InternalError, format!("stored enrollment has no valid {what} key"))
    };
    let k = attestation_keys.ok_or_else(|| internal("symmetric"))?;
    let primary = k.primary_key.as_deref().ok_or_else(|| internal("primary"))?;
    let primary = SymmetricKey::parse(primary).map_err(|_| internal("primary"))?;
    let secondary = match k.secondary_key.as_deref() {
        Some(s) => SymmetricKey::parse(s).map_err(|_| internal("secondary"))?,
        None => primary.clone(),
    };
    Ok((primary, secondary))
}

fn unauthorized(registration_id: &RegistrationId) -> DpsError {
    DpsError::with_message(
        ErrorCode::Unauthorized,
        format!("Unauthorized: no enrollment accepts the SAS token of registration '{registration_id}'"),
    )
}

/// Authenticates a symmetric-key device (see the crate docs for the resolution order).
///
/// `individual` is the individual enrollment with this registration ID, if any; `groups` are the instance's
/// enrollment groups (non-symmetric-key groups are skipped), in the order to try them. The proof takes the
/// individual enrollment and shares the group list. `recorded_group` is the group the device's
/// registration record names, if any: it is tried first, so a known device costs one group whatever the
/// number of groups (a registration recorded through one group may not move to another anyway).
pub fn attest_symmetric_key(
    now: Timestamp,
    id_scope: &IdScope,
    registration_id: &RegistrationId,
    token: &SasToken,
    individual: Option<Arc<IndividualEnrollment>>,
    groups: &Arc<Vec<EnrollmentGroup>>,
    recorded_group: Option<&str>,
) -> Result<Attestation, DpsError> {
    if token.is_expired(now) {
        return Err(DpsError::with_message(
            ErrorCode::TokenExpired,
            format!("The SAS token expired at {} (now {}).", token.expiry(), now.unix_seconds()),
        ));
    }
    let target = device_resource(id_scope.as_str(), registration_id.as_str());
    if !token.audience_matches(&target) {
        return Err(DpsError::with_message(
            ErrorCode::Unauthorized,
            format!("The SAS token's resource '{}' does not match '{target}'.", token.resource_decoded()),
        ));
    }

    if let Some(e) = individual {
        if e.attestation.kind != AttestationType::SymmetricKey {
            return Err(DpsError::with_message(
                ErrorCode::Unauthorized,
                format!("The enrollment of '{registration_id}' does not use symmetric-key attestation."),
            ));
        }
        let (primary, secondary) = keys_of(e.attestation.symmetric_key.as_ref())?;
        let key_index = [&primary, &secondary]
            .iter()
            .position(|k| token.signature_matches(k))
            .ok_or_else(|| unauthorized(registration_id))?;
        let enrollment = MatchedEnrollment::Individual(e);
        return Ok(decide(registration_id, enrollment, primary, Secondary::Key(secondary), key_index));
    }

    let first = recorded_group
        .and_then(|id| groups.iter().position(|g| g.enrollment_group_id.eq_ignore_ascii_case(id)));
    let order = first.into_iter().chain((0..groups.len()).filter(move |i| Some(*i) != first));
    for index in order {
        let g = &groups[index];
        if g.attestation.kind != AttestationType::SymmetricKey {
            continue;
        }
        let Ok((group_primary, group_secondary)) = keys_of(g.attestation.symmetric_key.as_ref()) else {
            continue;
        };
        let matched = || MatchedEnrollment::Group(SharedGroup { groups: Arc::clone(groups), index });
        let primary = group_primary.derive_device_key(registration_id.as_str());
        if token.signature_matches(&primary) {
            return Ok(decide(registration_id, matched(), primary, Secondary::FromGroup(group_secondary), 0));
        }
        let secondary = group_secondary.derive_device_key(registration_id.as_str());
        if token.signature_matches(&secondary) {
            return Ok(decide(registration_id, matched(), primary, Secondary::Key(secondary), 1));
        }
    }
    Err(unauthorized(registration_id))
}

fn decide(
    registration_id: &RegistrationId,
    enrollment: MatchedEnrollment,
    primary_key: SymmetricKey,
    secondary_key: Secondary,
    key_index: usize,
) -> Attestation {
    if enrollment.is_disabled() {
        Attestation::Disabled(DisabledDevice { registration_id: registration_id.clone(), enrollment })
    } else {
        Attestation::Verified(VerifiedDevice {
            registration_id: registration_id.clone(),
            enrollment,
            credential: DeviceCredential::Keys { primary: primary_key, secondary: secondary_key },
            key_index,
        })
    }
}

/// The credential the device's hub identity gets, named by the attestation proof.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HubCredential {
    /// Symmetric keys (the enrollment's, or derived from the group's).
    Keys {
        /// Primary key.
        primary: SymmetricKey,
        /// Secondary key.
        secondary: SymmetricKey,
    },
    /// X.509 thumbprints (uppercase SHA-256 hex of the enrolled device certificates): a device matched by
    /// an individual enrollment's client certificate.
    X509Thumbprints {
        /// Primary thumbprint.
        primary: String,
        /// Secondary thumbprint.
        secondary: Option<String>,
    },
    /// The hub trusts the device's CA: a device matched through an enrollment group or an individual
    /// enrollment's `caReferences`.
    CertificateAuthority,
    /// A TPM endorsement key (base64 TPM2B_PUBLIC).
    Tpm {
        /// The endorsement key.
        endorsement_key: String,
    },
}

impl VerifiedDevice {
    /// The credential to install on the device's hub identity.
    pub fn hub_credential(&self) -> HubCredential {
        match &self.credential {
            DeviceCredential::Keys { primary, .. } => HubCredential::Keys {
                primary: primary.clone(),
                secondary: self.secondary_key().unwrap_or_else(|| primary.clone()),
            },
            #[cfg(feature = "x509")]
            DeviceCredential::X509(x) => x.hub.clone(),
        }
    }
}

/// A credential checked for everything that needs no storage (syntax, expiry), ready for [`attest`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Presented {
    /// A parsed, unexpired SAS token.
    SasToken(SasToken),
    /// A TLS client-certificate chain, parsed (leaf first).
    #[cfg(feature = "x509")]
    ClientCertificate(x509::ClientChain),
    /// A TLS client-certificate chain (not parsed: the crate is built without X.509 support).
    #[cfg(not(feature = "x509"))]
    ClientCertificate(CertificateChain),
    /// TPM registration keys.
    Tpm(TpmRegistration),
}

/// First half of attestation, before any storage is read: parses a SAS token (`401004`) and checks its
/// expiry (`401001`); parses a client-certificate chain ([`x509::ClientChain::parse`]: `401002` for an
/// empty chain, more than [`x509::MAX_CHAIN_LEN`] certificates, one that is not DER X.509, a leaf without
/// a CN or with one over 64 characters); a request with no credential at all is `401004`.
pub fn prepare(now: Timestamp, credential: &Credential) -> Result<Presented, DpsError> {
    match credential {
        Credential::SasToken(raw) => {
            let token = SasToken::parse(raw)?;
            if token.is_expired(now) {
                return Err(DpsError::with_message(
                    ErrorCode::TokenExpired,
                    format!("The SAS token expired at {} (now {}).", token.expiry(), now.unix_seconds()),
                ));
            }
            Ok(Presented::SasToken(token))
        }
        #[cfg(feature = "x509")]
        Credential::ClientCertificate(chain) => {
            Ok(Presented::ClientCertificate(x509::ClientChain::parse(&chain.der)?))
        }
        #[cfg(not(feature = "x509"))]
        Credential::ClientCertificate(chain) => Ok(Presented::ClientCertificate(chain.clone())),
        Credential::Tpm(tpm) => Ok(Presented::Tpm(tpm.clone())),
        _ => Err(DpsError::with_message(
            ErrorCode::MalformedToken,
            "The request has no Authorization (SharedAccessSignature) and no client certificate.",
        )),
    }
}

/// The one attestation dispatcher: verifies a [`Presented`] credential against the device's individual
/// enrollment (if any) and the instance's groups, and returns the proof naming the enrollment and the hub
/// credential. Symmetric keys are verified as [`attest_symmetric_key`] describes (`certificates` is not
/// used); client certificates as [`x509::attest_x509`] describes, against `certificates`, all the
/// instance's uploaded CA certificates (verified or not). TPM answers its precise "not supported" error
/// (`401000`).
#[allow(clippy::too_many_arguments)]
pub fn attest(
    now: Timestamp,
    id_scope: &IdScope,
    registration_id: &RegistrationId,
    presented: &Presented,
    individual: Option<Arc<IndividualEnrollment>>,
    groups: &Arc<Vec<EnrollmentGroup>>,
    recorded_group: Option<&str>,
    certificates: &[CaCertificate],
) -> Result<Attestation, DpsError> {
    match presented {
        Presented::SasToken(token) => {
            attest_symmetric_key(now, id_scope, registration_id, token, individual, groups, recorded_group)
        }
        #[cfg(feature = "x509")]
        Presented::ClientCertificate(chain) => {
            x509::attest_x509(now, registration_id, chain, individual, groups, recorded_group, certificates)
        }
        #[cfg(not(feature = "x509"))]
        Presented::ClientCertificate(chain) => Err(DpsError::with_message(
            ErrorCode::InvalidCertificate,
            format!(
                "Registration '{registration_id}' presented a client certificate ({} in the chain, {} \
                 uploaded CA certificates), but this service is built without X.509 attestation.",
                chain.der.len(),
                certificates.len()
            ),
        )),
        Presented::Tpm(_) => Err(DpsError::with_message(
            ErrorCode::Unauthorized,
            "TPM attestation is not supported by this service; use symmetric-key attestation.",
        )),
    }
}

/// Parses an enrollment group ID from a matched group (stored groups always have valid IDs).
pub fn group_id_of(group: &EnrollmentGroup) -> Result<EnrollmentGroupId, DpsError> {
    EnrollmentGroupId::parse(&group.enrollment_group_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_proto::model::AttestationMechanism;
    use dps_proto::sas::{build_token, encode_resource};

    const NOW: i64 = 1_700_000_000;
    const SCOPE: &str = "0ne00000001";

    fn key(b: u8) -> SymmetricKey {
        SymmetricKey::from_bytes(vec![b; 32])
    }

    fn individual(id: &str, k1: &SymmetricKey, k2: &SymmetricKey, disabled: bool) -> IndividualEnrollment {
        serde_json::from_value(serde_json::json!({
            "registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k1.to_base64(), "secondaryKey": k2.to_base64()}},
            "provisioningStatus": if disabled { "disabled" } else { "enabled" },
        }))
        .unwrap()
    }

    fn group(id: &str, k1: &SymmetricKey, k2: &SymmetricKey, disabled: bool) -> EnrollmentGroup {
        EnrollmentGroup {
            enrollment_group_id: id.into(),
            attestation: AttestationMechanism::symmetric_key(Some(k1.to_base64()), Some(k2.to_base64())),
            iot_hub_host_name: None,
            initial_twin: None,
            etag: None,
            provisioning_status: Some(if disabled {
                ProvisioningStatus::Disabled
            } else {
                ProvisioningStatus::Enabled
            }),
            reprovision_policy: None,
            created_date_time_utc: None,
            last_updated_date_time_utc: None,
            allocation_policy: None,
            iot_hubs: None,
            custom_allocation_definition: None,
            capabilities: None,
        }
    }

    fn token_for(k: &SymmetricKey, id: &str, expiry: i64) -> SasToken {
        let sr = encode_resource(&device_resource(SCOPE, id));
        SasToken::parse(&build_token(k, &sr, expiry, Some("registration"))).unwrap()
    }

    fn run(
        token: &SasToken,
        id: &str,
        ind: Option<&IndividualEnrollment>,
        groups: &[EnrollmentGroup],
    ) -> Result<Attestation, DpsError> {
        attest_symmetric_key(
            Timestamp::from_unix_seconds(NOW),
            &IdScope::parse(SCOPE).unwrap(),
            &RegistrationId::parse(id).unwrap(),
            token,
            ind.cloned().map(Arc::new),
            &Arc::new(groups.to_vec()),
            None,
        )
    }

    #[test]
    fn the_proof_is_owned_and_outlives_its_inputs_across_threads() {
        fn is_static_send<T: Send + Sync + 'static>(_: &T) {}
        let groups = vec![group("g1", &key(3), &key(4), false)];
        let t = token_for(&key(3).derive_device_key("dev-7"), "dev-7", NOW + 60);
        let proof = run(&t, "dev-7", None, &groups).unwrap();
        drop(groups);
        is_static_send(&proof);
        // Moved into a boxed `'static` holder (as a flow holds it across an await) and still names the group.
        let held: Box<dyn std::any::Any + Send + Sync> = Box::new(proof);
        let proof = *held.downcast::<Attestation>().unwrap();
        let Attestation::Verified(v) = proof else { panic!("not verified") };
        assert_eq!(v.enrollment().group_id(), Some("g1"));
        let MatchedEnrollment::Group(g) = v.enrollment() else { panic!("group") };
        assert_eq!(g.group().enrollment_group_id, "g1");
        assert_eq!(
            v.hub_credential(),
            HubCredential::Keys {
                primary: key(3).derive_device_key("dev-7"),
                secondary: key(4).derive_device_key("dev-7")
            }
        );
    }

    #[test]
    fn individual_primary_and_secondary() {
        let e = individual("dev1", &key(1), &key(2), false);
        let Attestation::Verified(v) =
            run(&token_for(&key(1), "dev1", NOW + 60), "dev1", Some(&e), &[]).unwrap()
        else {
            panic!("not verified")
        };
        assert_eq!(v.key_index(), 0);
        assert!(matches!(v.enrollment(), MatchedEnrollment::Individual(_)));
        let Attestation::Verified(v) =
            run(&token_for(&key(2), "dev1", NOW + 60), "dev1", Some(&e), &[]).unwrap()
        else {
            panic!("not verified")
        };
        assert_eq!(v.key_index(), 1);
        assert_eq!(v.primary_key().unwrap().as_bytes(), key(1).as_bytes());
    }

    #[test]
    fn wrong_key_is_unauthorized_without_group_fallback() {
        let e = individual("dev1", &key(1), &key(2), false);
        let groups = [group("g1", &key(3), &key(4), false)];
        let derived = key(3).derive_device_key("dev1");
        let err = run(&token_for(&derived, "dev1", NOW + 60), "dev1", Some(&e), &groups).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
    }

    #[test]
    fn expired_and_wrong_audience() {
        let e = individual("dev1", &key(1), &key(2), false);
        assert!(run(&token_for(&key(1), "dev1", NOW - 300), "dev1", Some(&e), &[]).is_ok());
        let err = run(&token_for(&key(1), "dev1", NOW - 301), "dev1", Some(&e), &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::TokenExpired);
        let err = run(&token_for(&key(1), "other", NOW + 60), "dev1", Some(&e), &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
    }

    #[test]
    fn disabled_individual_stops_even_if_group_matches() {
        let e = individual("dev1", &key(1), &key(2), true);
        let groups = [group("g1", &key(1), &key(2), false)];
        let r = run(&token_for(&key(1), "dev1", NOW + 60), "dev1", Some(&e), &groups).unwrap();
        assert!(matches!(r, Attestation::Disabled(_)));
    }

    #[test]
    fn group_derived_keys() {
        let groups = [group("g1", &key(3), &key(4), false), group("g2", &key(5), &key(6), false)];
        let t = token_for(&key(6).derive_device_key("dev-9"), "dev-9", NOW + 60);
        let Attestation::Verified(v) = run(&t, "dev-9", None, &groups).unwrap() else {
            panic!("not verified")
        };
        assert_eq!(v.enrollment().group_id(), Some("g2"));
        assert_eq!(v.key_index(), 1);
        assert_eq!(v.primary_key().unwrap().as_bytes(), key(5).derive_device_key("dev-9").as_bytes());
        // The group key itself is not a device key.
        let t = token_for(&key(5), "dev-9", NOW + 60);
        assert_eq!(run(&t, "dev-9", None, &groups).unwrap_err().code, ErrorCode::Unauthorized);
    }

    #[test]
    fn the_recorded_group_is_tried_first_and_a_wrong_hint_changes_nothing() {
        let at = |t: &SasToken, groups: &[EnrollmentGroup], hint: Option<&str>| {
            let proof = attest_symmetric_key(
                Timestamp::from_unix_seconds(NOW),
                &IdScope::parse(SCOPE).unwrap(),
                &RegistrationId::parse("dev").unwrap(),
                t,
                None,
                &Arc::new(groups.to_vec()),
                hint,
            )
            .unwrap();
            let Attestation::Verified(v) = proof else { panic!("not verified") };
            v.enrollment().group_id().map(str::to_owned)
        };
        // The same key in two groups: group-ID order decides, unless the record names the other one.
        let same = [group("a", &key(3), &key(4), false), group("b", &key(3), &key(4), false)];
        let t = token_for(&key(3).derive_device_key("dev"), "dev", NOW + 60);
        assert_eq!(at(&t, &same, None).as_deref(), Some("a"));
        assert_eq!(at(&t, &same, Some("B")).as_deref(), Some("b"));
        // A hint naming a group whose key does not fit falls through to the rest, in order.
        let groups = [group("g1", &key(3), &key(4), false), group("g2", &key(5), &key(6), false)];
        let t = token_for(&key(5).derive_device_key("dev"), "dev", NOW + 60);
        assert_eq!(at(&t, &groups, Some("g1")).as_deref(), Some("g2"));
        assert_eq!(at(&t, &groups, Some("gone")).as_deref(), Some("g2"));
    }

    #[test]
    fn disabled_group_stops_resolution() {
        let groups =
            [group("a-disabled", &key(3), &key(4), true), group("b-enabled", &key(3), &key(4), false)];
        let t = token_for(&key(3).derive_device_key("dev"), "dev", NOW + 60);
        let r = run(&t, "dev", None, &groups).unwrap();
        let Attestation::Disabled(d) = r else { panic!("expected disabled") };
        assert_eq!(d.enrollment().group_id(), Some("a-disabled"));
    }

    #[test]
    fn individual_with_other_attestation_refuses_sas() {
        let mut e = individual("dev1", &key(1), &key(2), false);
        e.attestation.kind = AttestationType::X509;
        let err = run(&token_for(&key(1), "dev1", NOW + 60), "dev1", Some(&e), &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
    }

    #[test]
    fn the_dispatcher_verifies_sas_tokens_whatever_the_uploaded_certificates() {
        let now = Timestamp::from_unix_seconds(NOW);
        let raw = build_token(&key(1), &encode_resource(&device_resource(SCOPE, "dev1")), NOW + 60, None);
        let presented = prepare(now, &Credential::SasToken(raw)).unwrap();
        let e = individual("dev1", &key(1), &key(2), false);
        let cert = CaCertificate {
            name: "root".into(),
            der: vec![1, 2, 3],
            is_verified: true,
            verification_code: None,
            created: now,
            updated: now,
            etag: dps_proto::Etag::parse("\"1\"").unwrap(),
        };
        let r = attest(
            now,
            &IdScope::parse(SCOPE).unwrap(),
            &RegistrationId::parse("dev1").unwrap(),
            &presented,
            Some(Arc::new(e)),
            &Arc::new(Vec::new()),
            None,
            &[cert],
        )
        .unwrap();
        let Attestation::Verified(v) = r else { panic!("not verified") };
        assert!(v.x509_result().is_none() && v.client_leaf_der().is_none());
        assert_eq!(v.secondary_key().unwrap().as_bytes(), key(2).as_bytes());
    }

    #[test]
    fn unknown_device() {
        let err = run(&token_for(&key(1), "nobody", NOW + 60), "nobody", None, &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
    }
}
