//! X.509 attestation tests: every example of spec §7.2, the bad-input rules, CSRs, and no-panic
//! properties.

use super::csr::{parse_csr, CsrKeyKind, MAX_CSR_BYTES};
use super::testpki::*;
use super::{parse_certificate_text, sha256_thumbprint, validity};
use crate::{attest, prepare, Attestation, HubCredential, MatchedEnrollment, VerifiedDevice};
use base64::Engine as _;
use dps_proto::certificate::CaCertificate;
use dps_proto::credential::{CertificateChain, Credential};
use dps_proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_proto::{DpsError, ErrorCode, IdScope, RegistrationId, Timestamp};
use std::sync::Arc;

const UNKNOWN: &str = "does not reach a verified CA certificate";

fn pem_of(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap()
}

struct Case<'a> {
    now: i64,
    id: &'a str,
    chain: Vec<Vec<u8>>,
    individual: Option<IndividualEnrollment>,
    groups: Vec<EnrollmentGroup>,
    certs: Vec<CaCertificate>,
    recorded: Option<&'a str>,
}

impl<'a> Case<'a> {
    fn new(id: &'a str, chain: Vec<Vec<u8>>) -> Self {
        Case { now: NOW, id, chain, individual: None, groups: Vec::new(), certs: Vec::new(), recorded: None }
    }
    fn individual(mut self, e: IndividualEnrollment) -> Self {
        self.individual = Some(e);
        self
    }
    fn group(mut self, g: EnrollmentGroup) -> Self {
        self.groups.push(g);
        self
    }
    fn cert(mut self, c: CaCertificate) -> Self {
        self.certs.push(c);
        self
    }
    fn at(mut self, now: i64) -> Self {
        self.now = now;
        self
    }
    fn run(&self) -> Result<Attestation, DpsError> {
        let now = Timestamp::from_unix_seconds(self.now);
        let presented =
            prepare(now, &Credential::ClientCertificate(CertificateChain { der: self.chain.clone() }))?;
        attest(
            now,
            &IdScope::parse("0ne00000001").unwrap(),
            &RegistrationId::parse(self.id).unwrap(),
            &presented,
            self.individual.clone().map(Arc::new),
            &Arc::new(self.groups.clone()),
            self.recorded,
            &self.certs,
        )
    }
    fn verified(&self) -> VerifiedDevice {
        match self.run() {
            Ok(Attestation::Verified(v)) => v,
            other => panic!("expected verified, got {other:?}"),
        }
    }
    fn disabled(&self) -> MatchedEnrollment {
        match self.run() {
            Ok(Attestation::Disabled(d)) => d.enrollment().clone(),
            other => panic!("expected disabled, got {other:?}"),
        }
    }
    fn fails(&self, needle: &str) -> String {
        let e = self.run().expect_err("expected an error");
        assert_eq!(e.code, ErrorCode::InvalidCertificate, "{}", e.message);
        assert!(e.message.contains(needle), "message {:?} lacks {needle:?}", e.message);
        e.message
    }
}

fn self_signed(cn: &str, alg: Alg) -> Ca {
    issue(leaf_params(cn), alg, None)
}

#[test]
fn individual_self_signed_primary_and_secondary() {
    let c1 = self_signed("dev-1", Alg::P256);
    let c2 = self_signed("dev-1", Alg::P384);
    let e = individual_certs("dev-1", &c1.pem, Some(&c2.pem), false);

    let v = Case::new("dev-1", vec![c1.der.clone()]).individual(e.clone()).verified();
    assert_eq!(v.key_index(), 0);
    assert!(v.primary_key().is_none() && v.secondary_key().is_none());
    assert_eq!(v.client_leaf_der(), Some(c1.der.as_slice()));
    assert_eq!(
        v.hub_credential(),
        HubCredential::X509Thumbprints {
            primary: sha256_thumbprint(&c1.der),
            secondary: Some(sha256_thumbprint(&c2.der))
        }
    );
    let r = v.x509_result().unwrap();
    let info = r.certificate_info.unwrap();
    assert_eq!(info.subject_name, "CN=dev-1");
    assert_eq!(info.sha256_thumbprint, sha256_thumbprint(&c1.der));
    assert_eq!(r.enrollment_group_id, None);
    assert_eq!(r.signing_certificate_info, None);

    // The proof is owned: it survives a boxed 'static holder.
    let held: Box<dyn std::any::Any + Send + Sync> = Box::new(v);
    assert!(held.downcast::<VerifiedDevice>().is_ok());

    let v = Case::new("dev-1", vec![c2.der.clone()]).individual(e.clone()).verified();
    assert_eq!(v.key_index(), 1);

    let other = self_signed("dev-1", Alg::P256);
    Case::new("dev-1", vec![other.der])
        .individual(e)
        .fails("neither the primary nor the secondary certificate");
}

#[test]
fn individual_self_signed_base64_der_enrollment_and_case_insensitive_cn() {
    let c = self_signed("Dev-Upper", Alg::Rsa2048);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&c.der);
    let e = individual_certs("dev-upper", &b64, None, false);
    let v = Case::new("dev-upper", vec![c.der.clone()]).individual(e).verified();
    assert_eq!(
        v.hub_credential(),
        HubCredential::X509Thumbprints { primary: sha256_thumbprint(&c.der), secondary: None }
    );
}

#[test]
fn a_self_signed_device_certificate_marked_ca_is_accepted_but_its_eku_is_checked() {
    let mut p = ca_params("dev-ca-flag");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let c = issue(p, Alg::P256, None);
    let e = individual_certs("dev-ca-flag", &c.pem, None, false);
    Case::new("dev-ca-flag", vec![c.der.clone()]).individual(e).verified();

    let mut p = leaf_params("dev-srv");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let c = issue(p, Alg::P256, None);
    let e = individual_certs("dev-srv", &c.pem, None, false);
    Case::new("dev-srv", vec![c.der.clone()])
        .individual(e)
        .fails("extended key usage does not allow client authentication");
}

#[test]
fn individual_ca_signed_needs_a_verified_ca_in_every_algorithm() {
    for alg in [Alg::Rsa2048, Alg::P256, Alg::P384] {
        let pki = Pki::new(alg, "ind");
        let leaf = pki.device("dev-ca");
        let e = individual_certs("dev-ca", &pem_of(&leaf), None, false);
        let case = Case::new("dev-ca", pki.chain(&leaf)).individual(e);
        case.fails(UNKNOWN);
        let case = case.cert(uploaded("root", &pki.root.der, false));
        case.fails(UNKNOWN);
        let mut case = case;
        case.certs[0].is_verified = true;
        let v = case.verified();
        assert!(matches!(v.hub_credential(), HubCredential::X509Thumbprints { secondary: None, .. }));
        assert!(matches!(v.enrollment(), MatchedEnrollment::Individual(_)));
    }
}

#[test]
fn group_on_the_root_inline_and_by_reference_in_every_algorithm() {
    for alg in [Alg::Rsa2048, Alg::P256, Alg::P384] {
        let pki = Pki::new(alg, "grp");
        let leaf = pki.device("dev-g");
        // Inline root; the device leaves the root out.
        let case = Case::new("dev-g", pki.chain(&leaf)).group(group_inline("g-root", &pki.root.pem, false));
        case.fails(UNKNOWN);
        let v = case.cert(uploaded("root", &pki.root.der, true)).verified();
        assert_eq!(v.enrollment().group_id(), Some("g-root"));
        assert_eq!(v.hub_credential(), HubCredential::CertificateAuthority);
        let r = v.x509_result().unwrap();
        assert_eq!(r.enrollment_group_id.as_deref(), Some("g-root"));
        assert_eq!(r.signing_certificate_info.unwrap().subject_name, "CN=grp root");
        assert_eq!(r.certificate_info.unwrap().issuer_name, "CN=grp intermediate2");

        // By reference to a verified upload (name compared case-insensitively); the root sent too.
        let mut chain = pki.chain(&leaf);
        chain.push(pki.root.der.clone());
        let v = Case::new("dev-g", chain)
            .group(group_ref("g-ref", "ROOT-CA", false))
            .cert(uploaded("root-ca", &pki.root.der, true))
            .verified();
        assert_eq!(v.enrollment().group_id(), Some("g-ref"));
    }
}

#[test]
fn the_most_specific_group_wins() {
    let pki = Pki::new(Alg::P256, "spec");
    let leaf = pki.device("dev-s");
    let v = Case::new("dev-s", pki.chain(&leaf))
        .group(group_inline("a-root", &pki.root.pem, false))
        .group(group_inline("z-int2", &pki.int2.pem, false))
        .cert(uploaded("root", &pki.root.der, true))
        .verified();
    assert_eq!(v.enrollment().group_id(), Some("z-int2"));
    let info = v.x509_result().unwrap().signing_certificate_info.unwrap();
    assert_eq!(info.subject_name, "CN=spec intermediate2");
}

#[test]
fn a_disabled_group_on_an_intermediate_blocks_although_the_root_group_is_enabled() {
    let pki = Pki::new(Alg::P384, "dis");
    let leaf = pki.device("dev-d");
    let m = Case::new("dev-d", pki.chain(&leaf))
        .group(group_inline("a-root", &pki.root.pem, false))
        .group(group_inline("b-int1", &pki.int1.pem, true))
        .cert(uploaded("root", &pki.root.der, true))
        .disabled();
    assert_eq!(m.group_id(), Some("b-int1"));
}

#[test]
fn a_disabled_individual_blocks_its_group_device_and_deleting_it_lets_the_group_decide() {
    let pki = Pki::new(Alg::P256, "ind-dis");
    let leaf = pki.device("dev-3");
    let base = Case::new("dev-3", pki.chain(&leaf))
        .group(group_inline("g", &pki.root.pem, false))
        .cert(uploaded("root", &pki.root.der, true));
    let case = base.clone_with(Some(individual_certs("dev-3", &pem_of(&leaf), None, true)));
    assert!(matches!(case.disabled(), MatchedEnrollment::Individual(_)));
    // A disabled symmetric-key individual enrollment blocks as well (spec §7.2).
    let case = base.clone_with(Some(individual_sas("dev-3", true)));
    assert!(matches!(case.disabled(), MatchedEnrollment::Individual(_)));
    // An enabled one of another type refuses.
    base.clone_with(Some(individual_sas("dev-3", false))).fails("does not use X.509 attestation");
    // Deleted: the group decides.
    assert_eq!(base.clone_with(None).verified().enrollment().group_id(), Some("g"));
}

impl Case<'_> {
    fn clone_with(&self, individual: Option<IndividualEnrollment>) -> Self {
        Case {
            now: self.now,
            id: self.id,
            chain: self.chain.clone(),
            individual,
            groups: self.groups.clone(),
            certs: self.certs.clone(),
            recorded: self.recorded,
        }
    }
}

#[test]
fn the_recorded_group_goes_first_among_groups_on_the_same_certificate() {
    let pki = Pki::new(Alg::P256, "rec");
    let leaf = pki.device("dev-r");
    let mut case = Case::new("dev-r", pki.chain(&leaf))
        .group(group_inline("b", &pki.root.pem, false))
        .group(group_inline("a", &pki.root.pem, false))
        .cert(uploaded("root", &pki.root.der, true));
    assert_eq!(case.verified().enrollment().group_id(), Some("a"));
    case.recorded = Some("B");
    assert_eq!(case.verified().enrollment().group_id(), Some("b"));
}

#[test]
fn individual_ca_references() {
    let pki = Pki::new(Alg::P256, "iref");
    let leaf = pki.device("dev-i");
    let e = individual_refs("dev-i", "int2", false);
    let case = Case::new("dev-i", vec![leaf.clone(), pki.int2.der.clone()]).individual(e.clone());
    case.fails("is not uploaded");
    // The referenced intermediate is unverified: the path must reach a verified CA above it.
    let case = case.cert(uploaded("int2", &pki.int2.der, false));
    case.fails(UNKNOWN);
    let case = case.cert(uploaded("root", &pki.root.der, true));
    case.fails(UNKNOWN); // intermediate1 is missing
    let mut case = case;
    case.chain.push(pki.int1.der.clone());
    let v = case.verified();
    assert_eq!(v.hub_credential(), HubCredential::CertificateAuthority);
    let r = v.x509_result().unwrap();
    assert_eq!(r.signing_certificate_info.unwrap().subject_name, "CN=iref intermediate2");
    assert_eq!(r.enrollment_group_id, None);
    // A referenced certificate the path does not pass through does not count.
    let other = Pki::new(Alg::P256, "other");
    Case::new("dev-i", pki.chain(&leaf))
        .individual(individual_refs("dev-i", "other", false))
        .cert(uploaded("other", &other.int2.der, true))
        .cert(uploaded("root", &pki.root.der, true))
        .fails("not through the enrollment's certificate 'CN=other intermediate2'");
}

#[test]
fn expiry_and_not_before_allow_five_minutes_of_skew() {
    let mut p = leaf_params("dev-t");
    p.not_after = rcgen::date_time_ymd(2023, 1, 1);
    let c = issue(p, Alg::P256, None);
    let t = validity(&super::parse_der(&c.der).unwrap()).1.unix_seconds();
    let e = individual_certs("dev-t", &c.pem, None, false);
    Case::new("dev-t", vec![c.der.clone()]).individual(e.clone()).at(t + 300).verified();
    Case::new("dev-t", vec![c.der.clone()])
        .individual(e.clone())
        .at(t + 301)
        .fails("'CN=dev-t' expired at 2023-01-01");

    let mut p = leaf_params("dev-t");
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    let c = issue(p, Alg::P256, None);
    let nb = validity(&super::parse_der(&c.der).unwrap()).0.unix_seconds();
    let e = individual_certs("dev-t", &c.pem, None, false);
    Case::new("dev-t", vec![c.der.clone()]).individual(e.clone()).at(nb - 300).verified();
    Case::new("dev-t", vec![c.der.clone()])
        .individual(e)
        .at(nb - 301)
        .fails("is not valid before 2024-01-01");
}

#[test]
fn an_expired_intermediate_fails_naming_it_and_is_accepted_within_the_skew() {
    let root = issue(ca_params("exp root"), Alg::P256, None);
    let mut p = ca_params("exp intermediate");
    p.not_after = rcgen::date_time_ymd(2023, 1, 1);
    let int = issue(p, Alg::P256, Some(&root));
    let t = validity(&super::parse_der(&int.der).unwrap()).1.unix_seconds();
    let leaf = issue(leaf_params("dev-x"), Alg::P256, Some(&int)).der;
    let case = Case::new("dev-x", vec![leaf, int.der.clone()])
        .group(group_inline("g", &root.pem, false))
        .cert(uploaded("root", &root.der, true));
    case.clone_with(None).at(t + 200).verified();
    case.at(t + 400).fails("certificate 'CN=exp intermediate' expired at 2023-01-01");
}

#[test]
fn a_server_auth_only_device_certificate_is_refused() {
    let pki = Pki::new(Alg::P256, "eku");
    let mut p = leaf_params("dev-e");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = issue(p, Alg::P256, Some(&pki.int2)).der;
    Case::new("dev-e", pki.chain(&leaf))
        .group(group_inline("g", &pki.root.pem, false))
        .cert(uploaded("root", &pki.root.der, true))
        .fails("extended key usage does not allow client authentication");
}

#[test]
fn an_issuer_without_the_ca_flag_is_refused() {
    let root = issue(ca_params("noca root"), Alg::P256, None);
    let not_ca = issue(params("noca issuer"), Alg::P256, Some(&root));
    let leaf = issue(leaf_params("dev-n"), Alg::P256, Some(&not_ca)).der;
    Case::new("dev-n", vec![leaf, not_ca.der.clone()])
        .group(group_inline("g", &root.pem, false))
        .cert(uploaded("root", &root.der, true))
        .fails("certificate 'CN=noca issuer' is used as an issuer but is not a CA");
}

#[test]
fn an_unverified_ca_with_nothing_verified_above_is_refused() {
    let pki = Pki::new(Alg::Rsa2048, "unv");
    let leaf = pki.device("dev-u");
    let case = Case::new("dev-u", pki.chain(&leaf)).group(group_ref("g", "int1", false)).cert(uploaded(
        "int1",
        &pki.int1.der,
        false,
    ));
    let message = case.fails(UNKNOWN);
    assert!(message.contains("enrollment group 'g'"), "{message}");
    // Verifying the root (above it) makes the same chain acceptable.
    assert_eq!(
        case.cert(uploaded("root", &pki.root.der, true)).verified().enrollment().group_id(),
        Some("g")
    );
}

#[test]
fn a_chain_that_reaches_no_verified_certificate_is_refused() {
    let pki = Pki::new(Alg::P256, "far");
    let other = Pki::new(Alg::P256, "elsewhere");
    let leaf = pki.device("dev-f");
    Case::new("dev-f", pki.chain(&leaf))
        .group(group_inline("g", &pki.int2.pem, false))
        .cert(uploaded("other-root", &other.root.der, true))
        .fails(UNKNOWN);
}

#[test]
fn only_the_leaf_sent_for_a_group_device() {
    let pki = Pki::new(Alg::P256, "lone");
    let leaf = pki.device("dev-l");
    // The group is on the leaf's issuer: found, but the path lacks intermediate1.
    Case::new("dev-l", vec![leaf.clone()])
        .group(group_inline("g", &pki.int2.pem, false))
        .cert(uploaded("root", &pki.root.der, true))
        .fails(UNKNOWN);
    // The group is on the root: nothing the device sent leads there.
    let m = Case::new("dev-l", vec![leaf])
        .group(group_inline("g", &pki.root.pem, false))
        .cert(uploaded("root", &pki.root.der, true))
        .fails("no enrollment matches the certificate 'CN=dev-l' issued by 'CN=lone intermediate2'");
    assert!(m.contains(UNKNOWN), "{m}");
}

#[test]
fn no_enrollment_at_all() {
    let pki = Pki::new(Alg::P256, "none");
    let leaf = pki.device("dev-0");
    Case::new("dev-0", pki.chain(&leaf))
        .cert(uploaded("root", &pki.root.der, true))
        .fails("no enrollment matches the certificate 'CN=dev-0' issued by 'CN=none intermediate2'");
}

#[test]
fn the_cn_must_be_the_registration_id() {
    let c = self_signed("dev-1", Alg::P256);
    let e = individual_certs("dev-2", &c.pem, None, false);
    Case::new("dev-2", vec![c.der])
        .individual(e)
        .fails("the certificate's CN 'dev-1' does not match registration ID 'dev-2'");
}

#[test]
fn prepare_refuses_malformed_chains_naming_the_rule() {
    let refuse = |chain: Vec<Vec<u8>>, needle: &str| {
        let e = prepare(
            Timestamp::from_unix_seconds(NOW),
            &Credential::ClientCertificate(CertificateChain { der: chain }),
        )
        .expect_err("expected an error");
        assert_eq!(e.code, ErrorCode::InvalidCertificate);
        assert!(e.message.contains(needle), "message {:?} lacks {needle:?}", e.message);
    };
    refuse(Vec::new(), "empty");
    let c = self_signed("dev-1", Alg::P256);
    refuse(vec![c.der.clone(); 20], "the chain has 20 certificates; at most 10 are accepted");
    refuse(vec![b"garbage".to_vec()], "position 0");
    refuse(vec![c.der.clone(), b"garbage".to_vec()], "position 1");
    let long = "d".repeat(65);
    refuse(vec![self_signed(&long, Alg::P256).der], "CN has 65 characters; at most 64");
    assert!(prepare(
        Timestamp::from_unix_seconds(NOW),
        &Credential::ClientCertificate(CertificateChain {
            der: vec![self_signed(&"d".repeat(64), Alg::P256).der]
        })
    )
    .is_ok());
    let mut p = leaf_params("x");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "no cn");
    refuse(vec![issue(p, Alg::P256, None).der], "no subject CN");
}

#[test]
fn unsupported_algorithms_are_refused() {
    let c = parse_certificate_text(RSA1024_PEM).unwrap();
    let nb = validity(&super::parse_der(&c).unwrap()).0.unix_seconds();
    Case::new("dev-rsa1024", vec![c])
        .individual(individual_certs("dev-rsa1024", RSA1024_PEM, None, false))
        .at(nb + 60)
        .fails("1024-bit RSA key");
    let ed = self_signed("dev-ed", Alg::Ed25519);
    Case::new("dev-ed", vec![ed.der.clone()])
        .individual(individual_certs("dev-ed", &ed.pem, None, false))
        .fails("unsupported key algorithm");
}

// ---------------------------------------------------------------------------------------------------
// CSRs

fn csr_b64(cn: &str, alg: Alg) -> (String, rcgen::KeyPair) {
    let k = key(alg);
    let csr = params(cn).serialize_request(&k).unwrap();
    (base64::engine::general_purpose::STANDARD.encode(csr.der().as_ref()), k)
}

fn rid(s: &str) -> RegistrationId {
    RegistrationId::parse(s).unwrap()
}

fn csr_fails(b64: &str, id: &str, needle: &str) {
    let e = parse_csr(b64, &rid(id)).expect_err("expected an error");
    assert_eq!(e.code, ErrorCode::InvalidCsr);
    assert!(e.message.contains(needle), "message {:?} lacks {needle:?}", e.message);
}

#[test]
fn valid_csrs_parse_with_their_key() {
    use rcgen::PublicKeyData as _;
    for (alg, kind) in [(Alg::P256, CsrKeyKind::EcdsaP256), (Alg::P384, CsrKeyKind::EcdsaP384)] {
        let (b64, k) = csr_b64("dev-csr", alg);
        // Whitespace (line breaks) is tolerated.
        let wrapped: String =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\n");
        let req = parse_csr(&wrapped, &rid("DEV-csr")).unwrap();
        assert_eq!(req.common_name(), "dev-csr");
        assert_eq!(req.key_kind(), kind);
        assert_eq!(req.subject_public_key_info_der(), k.subject_public_key_info().as_slice());
    }
    let (b64, _) = csr_b64("dev-rsa", Alg::Rsa2048);
    assert_eq!(parse_csr(&b64, &rid("dev-rsa")).unwrap().key_kind(), CsrKeyKind::Rsa { bits: 2048 });
}

#[test]
fn bad_csrs_say_why() {
    let (b64, _) = csr_b64("dev-csr", Alg::P256);
    let mut der = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let flipped = base64::engine::general_purpose::STANDARD.encode(&der);
    csr_fails(&flipped, "dev-csr", "the CSR's signature does not verify");
    csr_fails(&b64, "dev-other", "the CSR's CN 'dev-csr' is not registration ID 'dev-other'");
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 9000]);
    csr_fails(&big, "dev-csr", &format!("the CSR is 9000 bytes; at most {MAX_CSR_BYTES}"));
    csr_fails("!!! not base64 !!!", "dev-csr", "not base64");
    csr_fails(&base64::engine::general_purpose::STANDARD.encode(b"garbage"), "dev-csr", "not DER PKCS#10");
    let (ed, _) = csr_b64("dev-csr", Alg::Ed25519);
    csr_fails(&ed, "dev-csr", "unsupported key algorithm");
}

// ---------------------------------------------------------------------------------------------------
// No panics on arbitrary input

mod props {
    use super::*;
    use proptest::prelude::*;

    fn prepare_chain(chain: Vec<Vec<u8>>) {
        match prepare(
            Timestamp::from_unix_seconds(NOW),
            &Credential::ClientCertificate(CertificateChain { der: chain }),
        ) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code, ErrorCode::InvalidCertificate),
        }
    }

    proptest! {
        #[test]
        fn prepare_never_panics(a in proptest::collection::vec(any::<u8>(), 0..512),
                                b in proptest::collection::vec(any::<u8>(), 0..512)) {
            prepare_chain(vec![a.clone()]);
            prepare_chain(vec![a, b]);
        }

        #[test]
        fn certificate_text_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_certificate_text(&String::from_utf8_lossy(&bytes));
            let _ = parse_certificate_text(&base64::engine::general_purpose::STANDARD.encode(&bytes));
        }

        #[test]
        fn ca_upload_and_proof_checks_never_panic(a in proptest::collection::vec(any::<u8>(), 0..512),
                                                  b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::x509::check_ca_certificate(&a);
            let _ = crate::x509::verify_proof_of_possession(&a, &b, "CODE", Timestamp::from_unix_seconds(NOW));
            let _ = crate::x509::certificate_info(&a);
        }

        #[test]
        fn csr_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let id = rid("dev");
            for text in [String::from_utf8_lossy(&bytes).into_owned(),
                         base64::engine::general_purpose::STANDARD.encode(&bytes)] {
                if let Err(e) = parse_csr(&text, &id) {
                    prop_assert_eq!(e.code, ErrorCode::InvalidCsr);
                }
            }
        }
    }

    #[test]
    fn mutated_real_certificates_and_csrs_never_panic() {
        let pki = Pki::new(Alg::P256, "fuzz");
        let leaf = pki.device("dev");
        let (csr, _) = csr_b64("dev", Alg::P256);
        let csr = base64::engine::general_purpose::STANDARD.decode(csr).unwrap();
        for i in 0..leaf.len().max(csr.len()) {
            let mut l = leaf.clone();
            if let Some(b) = l.get_mut(i) {
                *b ^= 0xff;
            }
            prepare_chain(vec![l, pki.int2.der.clone()]);
            let mut c = csr.clone();
            if let Some(b) = c.get_mut(i) {
                *b ^= 0xff;
            }
            let _ = parse_csr(&base64::engine::general_purpose::STANDARD.encode(&c), &rid("dev"));
        }
    }
}
