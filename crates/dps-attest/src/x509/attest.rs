//! X.509 enrollment matching (spec §7.2) and trust (§7.3).

use super::algs::{check_certificate_algorithms, is_signed_by};
use super::certinfo::{
    info_of, is_self_issued, parse_certificate_text, parse_der, sha256_thumbprint, validity,
};
use super::chain::ClientChain;
use super::path::{validate, PathRequest, UNKNOWN_ISSUER};
use crate::VerifiedDevice;
use crate::{Attestation, DeviceCredential, DisabledDevice, HubCredential, MatchedEnrollment, SharedGroup};
use dps_proto::certificate::CaCertificate;
use dps_proto::model::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, ProvisioningStatus, X509Attestation,
    X509CertificateInfo, X509Certificates,
};
use dps_proto::sas::MAX_CLOCK_SKEW_SECS;
use dps_proto::{DpsError, ErrorCode, RegistrationId, Timestamp};
use std::sync::Arc;
use x509_cert::Certificate;

/// What an X.509 proof carries besides the enrollment.
#[derive(Debug, Clone)]
pub(crate) struct X509Evidence {
    pub(crate) leaf_der: Vec<u8>,
    pub(crate) leaf_info: X509CertificateInfo,
    pub(crate) signing_info: Option<X509CertificateInfo>,
    pub(crate) hub: HubCredential,
}

fn invalid(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidCertificate, message)
}

fn subject(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

/// Authenticates an X.509 device: checks the presented chain against the individual enrollment with
/// this registration ID (if any), else against the X.509 enrollment groups, most specific first (see the
/// crate docs for the order). `certificates` are all the instance's uploaded CA certificates; only
/// verified ones are trust anchors. Every failure is `401002 InvalidCertificate` with a message naming
/// the rule that failed.
pub fn attest_x509(
    now: Timestamp,
    registration_id: &RegistrationId,
    chain: &ClientChain,
    individual: Option<Arc<IndividualEnrollment>>,
    groups: &Arc<Vec<EnrollmentGroup>>,
    recorded_group: Option<&str>,
    certificates: &[CaCertificate],
) -> Result<Attestation, DpsError> {
    if chain.common_name().to_lowercase() != registration_id.key() {
        return Err(invalid(format!(
            "the certificate's CN '{}' does not match registration ID '{registration_id}'",
            chain.common_name()
        )));
    }
    check_sanity(now, chain)?;
    let verified: Vec<&[u8]> =
        certificates.iter().filter(|c| c.is_verified).map(|c| c.der.as_slice()).collect();
    let ctx = Ctx { now, registration_id, chain, certificates, verified };
    match individual {
        Some(e) => ctx.individual(e),
        None => ctx.groups(groups, recorded_group),
    }
}

/// Whether `chain` is the very certificate a device's registration record was made with (its leaf's
/// SHA-256 thumbprint is `recorded_sha256`), still within its validity and with the registration ID as its
/// CN. A transport proved possession of the leaf's key in the TLS handshake, so a device polling its own
/// registration with that certificate needs no second path validation: `Ok(false)` (another certificate)
/// means attest it in full. An expired leaf or another CN is an error (401002), as in [`attest_x509`].
pub fn same_device_certificate(
    now: Timestamp,
    registration_id: &RegistrationId,
    chain: &ClientChain,
    recorded_sha256: &str,
) -> Result<bool, DpsError> {
    if !crate::x509::thumbprint_matches(recorded_sha256, chain.leaf_der()) {
        return Ok(false);
    }
    if chain.common_name().to_lowercase() != registration_id.key() {
        return Err(invalid(format!(
            "the certificate's CN '{}' does not match registration ID '{registration_id}'",
            chain.common_name()
        )));
    }
    check_sanity(now, chain)?;
    Ok(true)
}

/// The checks that need no enrollment: accepted algorithms for every presented certificate, and the
/// leaf's validity (with the skew allowance).
fn check_sanity(now: Timestamp, chain: &ClientChain) -> Result<(), DpsError> {
    for (i, e) in chain.entries().iter().enumerate() {
        let who = subject(&e.cert);
        check_certificate_algorithms(&e.cert, &who)
            .map_err(|m| invalid(format!("{m} (position {i} of the chain)")))?;
    }
    let leaf = chain.leaf();
    let (not_before, not_after) = validity(leaf);
    let now_s = now.unix_seconds();
    let iso = |t: Timestamp| t.to_iso();
    if not_after.unix_seconds().saturating_add(MAX_CLOCK_SKEW_SECS) < now_s {
        return Err(invalid(format!(
            "certificate '{}' expired at {} (now {}; {MAX_CLOCK_SKEW_SECS} s of clock skew allowed)",
            subject(leaf),
            iso(not_after),
            iso(now)
        )));
    }
    if not_before.unix_seconds().saturating_sub(MAX_CLOCK_SKEW_SECS) > now_s {
        return Err(invalid(format!(
            "certificate '{}' is not valid before {} (now {}; {MAX_CLOCK_SKEW_SECS} s of clock skew allowed)",
            subject(leaf),
            iso(not_before),
            iso(now)
        )));
    }
    Ok(())
}

/// An extended key usage, when present, must allow client authentication (or any purpose).
fn check_client_auth_eku(leaf: &Certificate) -> Result<(), DpsError> {
    use const_oid::db::rfc5280::{ANY_EXTENDED_KEY_USAGE, ID_KP_CLIENT_AUTH};
    use x509_cert::ext::pkix::ExtendedKeyUsage;
    match leaf.tbs_certificate.get::<ExtendedKeyUsage>() {
        Ok(None) => Ok(()),
        Ok(Some((_, eku)))
            if eku.0.iter().any(|o| *o == ID_KP_CLIENT_AUTH || *o == ANY_EXTENDED_KEY_USAGE) =>
        {
            Ok(())
        }
        Ok(Some(_)) => {
            Err(invalid("the device certificate's extended key usage does not allow client authentication"))
        }
        Err(e) => {
            Err(invalid(format!("the device certificate's extended key usage extension is malformed: {e}")))
        }
    }
}

fn is_disabled(status: Option<ProvisioningStatus>) -> bool {
    status == Some(ProvisioningStatus::Disabled)
}

/// The DER of enrolled certificates (primary, secondary), skipping unparseable ones.
fn enrolled(certs: Option<&X509Certificates>) -> [Option<Vec<u8>>; 2] {
    let parse = |c: Option<&dps_proto::model::X509CertificateWithInfo>| {
        c.and_then(|c| c.certificate.as_deref()).and_then(|t| parse_certificate_text(t).ok())
    };
    match certs {
        Some(c) => [parse(c.primary.as_ref()), parse(c.secondary.as_ref())],
        None => [None, None],
    }
}

fn find_uploaded<'c>(certificates: &'c [CaCertificate], name: &str) -> Option<&'c CaCertificate> {
    certificates.iter().find(|c| c.name.eq_ignore_ascii_case(name))
}

/// The certificates a group's attestation names: inline signing certificates and referenced uploads.
struct GroupCerts {
    index: usize,
    inline: Vec<Vec<u8>>,
    all: Vec<Vec<u8>>,
}

fn group_certs(index: usize, x: Option<&X509Attestation>, certificates: &[CaCertificate]) -> GroupCerts {
    let mut inline = Vec::new();
    let mut all = Vec::new();
    if let Some(x) = x {
        for der in enrolled(x.signing_certificates.as_ref()).into_iter().flatten() {
            inline.push(der.clone());
            all.push(der);
        }
        if let Some(refs) = &x.ca_references {
            for name in [&refs.primary, &refs.secondary].into_iter().flatten() {
                if let Some(c) = find_uploaded(certificates, name) {
                    all.push(c.der.clone());
                }
            }
        }
    }
    GroupCerts { index, inline, all }
}

struct Ctx<'a> {
    now: Timestamp,
    registration_id: &'a RegistrationId,
    chain: &'a ClientChain,
    certificates: &'a [CaCertificate],
    verified: Vec<&'a [u8]>,
}

impl Ctx<'_> {
    fn disabled(&self, enrollment: MatchedEnrollment) -> Attestation {
        Attestation::Disabled(DisabledDevice { registration_id: self.registration_id.clone(), enrollment })
    }

    fn verified_device(
        &self,
        enrollment: MatchedEnrollment,
        key_index: usize,
        signing_info: Option<X509CertificateInfo>,
        hub: HubCredential,
    ) -> Attestation {
        let leaf_der = self.chain.leaf_der().to_vec();
        let leaf_info = info_of(self.chain.leaf(), &leaf_der);
        Attestation::Verified(VerifiedDevice {
            registration_id: self.registration_id.clone(),
            enrollment,
            credential: DeviceCredential::X509(Box::new(X509Evidence {
                leaf_der,
                leaf_info,
                signing_info,
                hub,
            })),
            key_index,
        })
    }

    fn individual(&self, e: Arc<IndividualEnrollment>) -> Result<Attestation, DpsError> {
        let rid = self.registration_id;
        if is_disabled(e.provisioning_status) {
            return Ok(self.disabled(MatchedEnrollment::Individual(e)));
        }
        if e.attestation.kind != AttestationType::X509 {
            return Err(invalid(format!("the enrollment of '{rid}' does not use X.509 attestation")));
        }
        let x = e.attestation.x509.as_ref();
        if let Some(client) = x.and_then(|x| x.client_certificates.as_ref()) {
            return self.individual_client_certificates(Arc::clone(&e), client);
        }
        if let Some(refs) = x.and_then(|x| x.ca_references.as_ref()) {
            let names: Vec<&String> = [&refs.primary, &refs.secondary].into_iter().flatten().collect();
            let mut first_error = None;
            for name in &names {
                let Some(ca) = find_uploaded(self.certificates, name) else {
                    first_error.get_or_insert_with(|| {
                        format!(
                            "the CA certificate '{name}' named by the enrollment of '{rid}' is not uploaded"
                        )
                    });
                    continue;
                };
                let req = PathRequest {
                    chain: self.chain,
                    extra_intermediates: vec![ca.der.as_slice()],
                    anchors: self.verified.clone(),
                    required: Some(ca.der.as_slice()),
                };
                match validate(self.now, &req) {
                    Ok(()) => {
                        let info = parse_der(&ca.der).ok().map(|c| info_of(&c, &ca.der));
                        let m = MatchedEnrollment::Individual(e);
                        return Ok(self.verified_device(m, 0, info, HubCredential::CertificateAuthority));
                    }
                    Err(m) => {
                        first_error.get_or_insert_with(|| format!("CA certificate '{}': {m}", ca.name));
                    }
                }
            }
            return Err(invalid(first_error.unwrap_or_else(|| {
                format!("the X.509 enrollment of '{rid}' names no CA certificate in caReferences")
            })));
        }
        Err(invalid(format!(
            "the X.509 enrollment of '{rid}' names no client certificate and no CA reference"
        )))
    }

    fn individual_client_certificates(
        &self,
        e: Arc<IndividualEnrollment>,
        client: &X509Certificates,
    ) -> Result<Attestation, DpsError> {
        let rid = self.registration_id;
        let enrolled = enrolled(Some(client));
        let leaf_der = self.chain.leaf_der();
        let Some(key_index) = enrolled.iter().position(|d| d.as_deref() == Some(leaf_der)) else {
            return Err(invalid(format!(
                "the certificate '{}' (SHA-256 {}) is neither the primary nor the secondary certificate of the \
                 enrollment of '{rid}'",
                subject(self.chain.leaf()),
                sha256_thumbprint(leaf_der)
            )));
        };
        let leaf = self.chain.leaf();
        let self_issued = is_self_issued(leaf);
        if self_issued && is_signed_by(leaf, leaf) {
            // Self-signed and enrolled: the signature proves nothing more; validity (checked above) and
            // the EKU are what is left. By hand rather than through webpki, so a self-signed device
            // certificate marked CA (OpenSSL's `req -x509` default) is accepted, as Azure does.
            check_client_auth_eku(leaf)?;
        } else {
            let mut anchors = self.verified.clone();
            if self_issued {
                // A self-issued certificate whose signature the hand check could not verify (RSA-PSS, or
                // a bad signature): webpki decides, with the enrolled certificate as its own anchor.
                anchors.push(leaf_der);
            }
            let req =
                PathRequest { chain: self.chain, extra_intermediates: Vec::new(), anchors, required: None };
            validate(self.now, &req).map_err(invalid)?;
        }
        let mut thumbprints = enrolled.iter().flatten().map(|d| sha256_thumbprint(d));
        let hub = HubCredential::X509Thumbprints {
            primary: thumbprints.next().unwrap_or_default(),
            secondary: thumbprints.next(),
        };
        Ok(self.verified_device(MatchedEnrollment::Individual(e), key_index, None, hub))
    }

    fn groups(
        &self,
        groups: &Arc<Vec<EnrollmentGroup>>,
        recorded_group: Option<&str>,
    ) -> Result<Attestation, DpsError> {
        let mut order: Vec<usize> = (0..groups.len())
            .filter(|i| groups.get(*i).is_some_and(|g| g.attestation.kind == AttestationType::X509))
            .collect();
        order.sort_by_key(|i| {
            let id = groups.get(*i).map(|g| g.enrollment_group_id.to_ascii_lowercase()).unwrap_or_default();
            let recorded = recorded_group.is_some_and(|r| r.eq_ignore_ascii_case(&id));
            (!recorded, id)
        });
        let candidates: Vec<GroupCerts> = order
            .iter()
            .filter_map(|i| {
                groups.get(*i).map(|g| group_certs(*i, g.attestation.x509.as_ref(), self.certificates))
            })
            .collect();

        // The levels above the leaf, most specific first: the presented certificates, then the issuer of
        // the last one when the device left it out.
        let mut levels: Vec<Vec<u8>> = self.chain.iter_der().skip(1).map(<[u8]>::to_vec).collect();
        let last = self.chain.certificate(self.chain.len() - 1).unwrap_or(self.chain.leaf());
        if !is_self_issued(last) {
            let known = candidates
                .iter()
                .flat_map(|g| g.all.iter())
                .map(Vec::as_slice)
                .chain(self.certificates.iter().map(|c| c.der.as_slice()));
            // Certificates named like the issuer; the signature decides only between several (a CA
            // rollover keeps the name): the path validation below checks it anyway, through the group's
            // certificate, so one candidate costs no extra signature check.
            let mut named: Vec<(&[u8], Certificate)> = Vec::new();
            for der in known {
                if named.iter().any(|(d, _)| *d == der) {
                    continue;
                }
                let Ok(cert) = parse_der(der) else { continue };
                if cert.tbs_certificate.subject == last.tbs_certificate.issuer {
                    named.push((der, cert));
                }
            }
            let issuer = match named.len() {
                0 => None,
                1 => named.first().map(|(d, _)| *d),
                _ => named.iter().find(|(_, c)| is_signed_by(last, c)).map(|(d, _)| *d),
            };
            if let Some(der) = issuer {
                levels.push(der.to_vec());
            }
        }

        for level in &levels {
            let Some(g) = candidates.iter().find(|g| g.all.iter().any(|d| d == level)) else { continue };
            let Some(group) = groups.get(g.index) else { continue };
            let matched =
                MatchedEnrollment::Group(SharedGroup { groups: Arc::clone(groups), index: g.index });
            if is_disabled(group.provisioning_status) {
                return Ok(self.disabled(matched));
            }
            let mut extra: Vec<&[u8]> = g.inline.iter().map(Vec::as_slice).collect();
            extra.push(level.as_slice());
            let req = PathRequest {
                chain: self.chain,
                extra_intermediates: extra,
                anchors: self.verified.clone(),
                required: Some(level.as_slice()),
            };
            validate(self.now, &req)
                .map_err(|m| invalid(format!("enrollment group '{}': {m}", group.enrollment_group_id)))?;
            let info = parse_der(level).ok().map(|c| info_of(&c, level));
            return Ok(self.verified_device(matched, 0, info, HubCredential::CertificateAuthority));
        }

        let leaf = self.chain.leaf();
        let hint = if self.chain.len() == 1 {
            format!(" (only the device certificate was sent): {UNKNOWN_ISSUER}")
        } else {
            String::new()
        };
        Err(invalid(format!(
            "no enrollment matches the certificate '{}' issued by '{}'{hint}",
            subject(leaf),
            leaf.tbs_certificate.issuer
        )))
    }
}
