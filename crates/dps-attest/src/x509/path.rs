//! Path validation of a presented chain with rustls-webpki, with the five-minute skew rule and errors
//! that say which rule failed.

use super::algs::SUPPORTED_SIG_ALGS;
use super::certinfo::{parse_der, validity};
use super::chain::ClientChain;
use dps_proto::sas::MAX_CLOCK_SKEW_SECS;
use dps_proto::Timestamp;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::cell::Cell;
use std::time::Duration;
use webpki::{EndEntityCert, Error, KeyUsage, VerifiedPath};
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::Certificate;

/// What a path must satisfy.
pub(crate) struct PathRequest<'a> {
    /// The presented chain (its certificates after the leaf are intermediates).
    pub(crate) chain: &'a ClientChain,
    /// More intermediates (a group's inline signing certificates, an uploaded certificate the enrollment
    /// names).
    pub(crate) extra_intermediates: Vec<&'a [u8]>,
    /// Trust anchors (verified uploaded certificates; the enrolled certificate of a self-signed device).
    pub(crate) anchors: Vec<&'a [u8]>,
    /// A certificate the path must pass through (as an intermediate or as its anchor).
    pub(crate) required: Option<&'a [u8]>,
}

/// A certificate known to the request, for naming it in messages.
struct Known {
    der: Vec<u8>,
    cert: Certificate,
}

impl Known {
    fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }
}

fn iso(secs: u64) -> String {
    let t = Timestamp::from_unix_seconds(i64::try_from(secs).unwrap_or(i64::MAX));
    let full = t.to_iso();
    match full.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => full,
    }
}

fn unix(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// Validates the path for client authentication at `now`, allowing [`MAX_CLOCK_SKEW_SECS`] of skew on
/// every validity period. The error is a message naming the rule that failed.
pub(crate) fn validate(now: Timestamp, req: &PathRequest<'_>) -> Result<(), String> {
    let leaf_der = CertificateDer::from(req.chain.leaf_der());
    let leaf = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| format!("the device certificate is not usable: {e:?}"))?;

    let mut intermediates: Vec<CertificateDer<'_>> = Vec::new();
    for der in req.chain.iter_der().skip(1).chain(req.extra_intermediates.iter().copied()) {
        if !intermediates.iter().any(|c| c.as_ref() == der) {
            intermediates.push(CertificateDer::from(der));
        }
    }
    let anchor_ders: Vec<CertificateDer<'_>> = req.anchors.iter().map(|d| CertificateDer::from(*d)).collect();
    let anchors: Vec<TrustAnchor<'_>> =
        anchor_ders.iter().filter_map(|d| webpki::anchor_from_trusted_cert(d).ok()).collect();
    let required_der = req.required.map(CertificateDer::from);
    let required_anchor = required_der.as_ref().and_then(|d| webpki::anchor_from_trusted_cert(d).ok());

    // Every certificate the request knows, to name the one an error is about.
    let mut known: Vec<Known> = Vec::new();
    for e in req.chain.entries() {
        known.push(Known { der: e.der.clone(), cert: e.cert.clone() });
    }
    for der in req.extra_intermediates.iter().chain(req.anchors.iter()) {
        if known.iter().any(|k| k.der.as_slice() == *der) {
            continue;
        }
        if let Ok(cert) = parse_der(der) {
            known.push(Known { der: der.to_vec(), cert });
        }
    }

    let missed_required = Cell::new(false);
    let now_secs = now.unix_seconds();
    let check_path = |path: &VerifiedPath<'_>| -> Result<(), Error> {
        let anchor = path.anchor();
        // webpki takes anchors as given; an anchor past its validity (beyond the skew) does not count.
        let anchor_cert = known.iter().find(|k| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(k.der.as_slice())).is_ok_and(|a| {
                a.subject.as_ref() == anchor.subject.as_ref()
                    && a.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
            })
        });
        if let Some(k) = anchor_cert {
            let (not_before, not_after) = validity(&k.cert);
            if not_after.unix_seconds().saturating_add(MAX_CLOCK_SKEW_SECS) < now_secs {
                return Err(Error::CertExpired {
                    time: unix(now_secs),
                    not_after: unix(not_after.unix_seconds()),
                });
            }
            if not_before.unix_seconds().saturating_sub(MAX_CLOCK_SKEW_SECS) > now_secs {
                return Err(Error::CertNotValidYet {
                    time: unix(now_secs),
                    not_before: unix(not_before.unix_seconds()),
                });
            }
        }
        let Some(required) = &required_der else { return Ok(()) };
        if path.intermediate_certificates().any(|c| c.der().as_ref() == required.as_ref()) {
            return Ok(());
        }
        if let Some(r) = &required_anchor {
            if r.subject.as_ref() == anchor.subject.as_ref()
                && r.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
            {
                return Ok(());
            }
        }
        missed_required.set(true);
        Err(Error::UnknownIssuer)
    };

    let run = |secs: i64| {
        leaf.verify_for_usage(
            SUPPORTED_SIG_ALGS,
            &anchors,
            &intermediates,
            unix(secs),
            KeyUsage::client_auth(),
            None,
            Some(&check_path),
        )
        .map(|_| ())
    };
    let result = match run(now_secs) {
        Err(first @ Error::CertExpired { .. }) => {
            run(now_secs.saturating_sub(MAX_CLOCK_SKEW_SECS)).map_err(|e| pick(first, e))
        }
        Err(first @ Error::CertNotValidYet { .. }) => {
            run(now_secs.saturating_add(MAX_CLOCK_SKEW_SECS)).map_err(|e| pick(first, e))
        }
        other => other,
    };
    result.map_err(|e| describe(&e, req, &known, missed_required.get()))
}

/// After a skew retry: the retry's error unless it is the same kind of validity failure (then the
/// original, which carries the real time).
fn pick(first: Error, retry: Error) -> Error {
    match (&first, &retry) {
        (Error::CertExpired { .. }, Error::CertExpired { .. })
        | (Error::CertNotValidYet { .. }, Error::CertNotValidYet { .. }) => first,
        _ => retry,
    }
}

fn is_ca(cert: &Certificate) -> bool {
    matches!(cert.tbs_certificate.get::<BasicConstraints>(), Ok(Some((_, BasicConstraints { ca: true, .. }))))
}

pub(crate) const UNKNOWN_ISSUER: &str =
    "the chain does not reach a verified CA certificate (send the intermediates; \
                              upload and verify the root or an intermediate)";

fn describe(err: &Error, req: &PathRequest<'_>, known: &[Known], missed_required: bool) -> String {
    let leaf_subject = req.chain.leaf().tbs_certificate.subject.to_string();
    #[allow(deprecated)]
    match err {
        Error::CertExpired { time, not_after } => {
            let who = known
                .iter()
                .find(|k| i64::try_from(not_after.as_secs()).is_ok_and(|s| validity(&k.cert).1.unix_seconds() == s))
                .map_or_else(|| "of the chain".to_owned(), |k| format!("'{}'", k.subject()));
            format!(
                "certificate {who} expired at {} (now {}; {MAX_CLOCK_SKEW_SECS} s of clock skew allowed)",
                iso(not_after.as_secs()),
                iso(time.as_secs())
            )
        }
        Error::CertNotValidYet { time, not_before } => {
            let who = known
                .iter()
                .find(|k| i64::try_from(not_before.as_secs()).is_ok_and(|s| validity(&k.cert).0.unix_seconds() == s))
                .map_or_else(|| "of the chain".to_owned(), |k| format!("'{}'", k.subject()));
            format!(
                "certificate {who} is not valid before {} (now {}; {MAX_CLOCK_SKEW_SECS} s of clock skew allowed)",
                iso(not_before.as_secs()),
                iso(time.as_secs())
            )
        }
        Error::UnknownIssuer if missed_required => {
            let name = req
                .required
                .and_then(|d| known.iter().find(|k| k.der.as_slice() == d))
                .map_or_else(String::new, |k| format!(" '{}'", k.subject()));
            format!(
                "the chain reaches a verified CA certificate, but not through the enrollment's certificate{name}; \
                 {UNKNOWN_ISSUER}"
            )
        }
        Error::UnknownIssuer => UNKNOWN_ISSUER.to_owned(),
        Error::CaUsedAsEndEntity => format!(
            "the device certificate '{leaf_subject}' is a CA certificate (basicConstraints CA=true) and cannot \
             authenticate a device"
        ),
        Error::EndEntityUsedAsCa => {
            let who = known
                .iter()
                .skip(1)
                .find(|k| !is_ca(&k.cert))
                .map_or_else(|| "of the chain".to_owned(), |k| format!("'{}'", k.subject()));
            format!("certificate {who} is used as an issuer but is not a CA (no basicConstraints CA=true)")
        }
        Error::RequiredEkuNotFound | Error::RequiredEkuNotFoundContext(_) | Error::EmptyEkuExtension => {
            "the device certificate's extended key usage does not allow client authentication".to_owned()
        }
        Error::UnsupportedSignatureAlgorithm
        | Error::UnsupportedSignatureAlgorithmContext(_)
        | Error::UnsupportedSignatureAlgorithmForPublicKey
        | Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "unsupported signature algorithm in the chain (accepted: ECDSA P-256/P-384 with SHA-256/384, RSA \
             2048-8192 bits PKCS#1 v1.5 or PSS with SHA-256/384/512)"
                .to_owned()
        }
        Error::InvalidSignatureForPublicKey | Error::SignatureAlgorithmMismatch => {
            "a certificate's signature does not verify with its issuer's public key".to_owned()
        }
        Error::PathLenConstraintViolated => "a CA's path length constraint is exceeded by the chain".to_owned(),
        Error::NameConstraintViolation => "the chain violates a CA's name constraints".to_owned(),
        Error::MaximumPathDepthExceeded
        | Error::MaximumPathBuildCallsExceeded
        | Error::MaximumSignatureChecksExceeded => "the chain is too long or too complex to validate".to_owned(),
        Error::UnsupportedCriticalExtension => {
            "a certificate of the chain has an unsupported critical extension".to_owned()
        }
        Error::CertDistrusted => "a certificate of the chain is distrusted".to_owned(),
        other => format!("the certificate chain is not valid ({other:?})"),
    }
}
