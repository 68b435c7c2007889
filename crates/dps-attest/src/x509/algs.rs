//! The key and signature algorithms X.509 attestation accepts, and signature checks by hand (CSRs, and
//! finding an omitted root among the enrollment material).
//!
//! Accepted: ECDSA on P-256 or P-384 with SHA-256 or SHA-384, RSA 2048 to 8192 bits with PKCS#1 v1.5
//! (SHA-256/384/512) or PSS. Everything else (RSA under 2048 bits, Ed25519, P-521, SHA-1, …) is refused with
//! a message naming the algorithm.

use const_oid::db::rfc5912 as oids;
use const_oid::ObjectIdentifier;
use der::asn1::UintRef;
use der::{Decode, Reader, SliceReader};
use rustls_pki_types::SignatureVerificationAlgorithm;
use webpki::aws_lc_rs as algs;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::Certificate;

/// The signature verification algorithms given to path validation.
pub(crate) static SUPPORTED_SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    algs::ECDSA_P256_SHA256,
    algs::ECDSA_P256_SHA384,
    algs::ECDSA_P384_SHA256,
    algs::ECDSA_P384_SHA384,
    algs::RSA_PKCS1_2048_8192_SHA256,
    algs::RSA_PKCS1_2048_8192_SHA384,
    algs::RSA_PKCS1_2048_8192_SHA512,
    algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// The smallest and largest RSA modulus accepted, bits.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// A public key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyAlg {
    P256,
    P384,
    Rsa { bits: usize },
}

/// A readable name for an OID (its `const-oid` database name, else dotted).
pub(crate) fn oid_name(oid: &ObjectIdentifier) -> String {
    match const_oid::db::DB.by_oid(oid) {
        Some(name) => format!("{name} ({oid})"),
        None => oid.to_string(),
    }
}

/// The key algorithm of a SubjectPublicKeyInfo; the error names an unsupported one.
pub(crate) fn key_alg(spki: &SubjectPublicKeyInfoOwned) -> Result<KeyAlg, String> {
    let alg = &spki.algorithm;
    if alg.oid == oids::ID_EC_PUBLIC_KEY {
        let curve = alg
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            .ok_or_else(|| "an EC key without a named curve".to_owned())?;
        if curve == oids::SECP_256_R_1 {
            Ok(KeyAlg::P256)
        } else if curve == oids::SECP_384_R_1 {
            Ok(KeyAlg::P384)
        } else {
            Err(format!("the unsupported elliptic curve {}", oid_name(&curve)))
        }
    } else if alg.oid == oids::RSA_ENCRYPTION {
        let bits = rsa_modulus_bits(spki.subject_public_key.raw_bytes())
            .ok_or_else(|| "a malformed RSA public key".to_owned())?;
        Ok(KeyAlg::Rsa { bits })
    } else {
        Err(format!("the unsupported key algorithm {}", oid_name(&alg.oid)))
    }
}

/// The bit length of an RSAPublicKey's modulus (`SEQUENCE { modulus INTEGER, publicExponent INTEGER }`).
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    let mut reader = SliceReader::new(der).ok()?;
    let modulus = reader
        .sequence(|r| {
            let n = UintRef::decode(r)?;
            let _e = UintRef::decode(r)?;
            Ok(n)
        })
        .ok()?;
    let bytes = modulus.as_bytes();
    let first = *bytes.first()?;
    Some((bytes.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

fn is_supported_signature(oid: &ObjectIdentifier) -> bool {
    [
        oids::ECDSA_WITH_SHA_256,
        oids::ECDSA_WITH_SHA_384,
        oids::SHA_256_WITH_RSA_ENCRYPTION,
        oids::SHA_384_WITH_RSA_ENCRYPTION,
        oids::SHA_512_WITH_RSA_ENCRYPTION,
        oids::ID_RSASSA_PSS,
    ]
    .contains(oid)
}

/// Checks that a certificate's key and signature algorithms are accepted. `who` names it in the message.
pub(crate) fn check_certificate_algorithms(cert: &Certificate, who: &str) -> Result<(), String> {
    let key = key_alg(&cert.tbs_certificate.subject_public_key_info)
        .map_err(|e| format!("unsupported key algorithm: certificate '{who}' has {e}"))?;
    if let KeyAlg::Rsa { bits } = key {
        if !RSA_BITS.contains(&bits) {
            return Err(format!(
                "unsupported key algorithm: certificate '{who}' has a {bits}-bit RSA key; {} to {} bits are \
                 accepted",
                RSA_BITS.start(),
                RSA_BITS.end()
            ));
        }
    }
    let sig = &cert.signature_algorithm.oid;
    if !is_supported_signature(sig) {
        return Err(format!(
            "unsupported signature algorithm: certificate '{who}' is signed with {}",
            oid_name(sig)
        ));
    }
    Ok(())
}

/// Why a hand-checked signature failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SignatureError {
    /// The key or signature algorithm is not accepted (the message says which).
    Unsupported(String),
    /// The signature does not verify.
    Bad,
}

/// Verifies `signature` over `message` with the key `spki`, for the signature algorithm `sig_alg` (ECDSA
/// with SHA-256/384 on P-256/P-384, RSA PKCS#1 v1.5 with SHA-256/384/512 and 2048+ bits).
pub(crate) fn verify_signature(
    spki: &SubjectPublicKeyInfoOwned,
    sig_alg: &ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let key = key_alg(spki).map_err(SignatureError::Unsupported)?;
    #[derive(Clone, Copy)]
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let ecdsa = [(oids::ECDSA_WITH_SHA_256, Hash::Sha256), (oids::ECDSA_WITH_SHA_384, Hash::Sha384)];
    let rsa = [
        (oids::SHA_256_WITH_RSA_ENCRYPTION, Hash::Sha256),
        (oids::SHA_384_WITH_RSA_ENCRYPTION, Hash::Sha384),
        (oids::SHA_512_WITH_RSA_ENCRYPTION, Hash::Sha512),
    ];
    let find = |table: &[(ObjectIdentifier, Hash)]| table.iter().find(|(o, _)| o == sig_alg).map(|(_, h)| *h);
    let unsupported = || {
        SignatureError::Unsupported(format!("the signature algorithm {} with this key", oid_name(sig_alg)))
    };
    let alg: &dyn SignatureVerificationAlgorithm = match key {
        KeyAlg::P256 | KeyAlg::P384 => match (key == KeyAlg::P256, find(&ecdsa).ok_or_else(unsupported)?) {
            (true, Hash::Sha256) => algs::ECDSA_P256_SHA256,
            (true, _) => algs::ECDSA_P256_SHA384,
            (false, Hash::Sha256) => algs::ECDSA_P384_SHA256,
            (false, _) => algs::ECDSA_P384_SHA384,
        },
        KeyAlg::Rsa { bits } if !RSA_BITS.contains(&bits) => {
            return Err(SignatureError::Unsupported(format!(
                "a {bits}-bit RSA key; {} to {} bits are accepted",
                RSA_BITS.start(),
                RSA_BITS.end()
            )))
        }
        KeyAlg::Rsa { .. } => match find(&rsa).ok_or_else(unsupported)? {
            Hash::Sha256 => algs::RSA_PKCS1_2048_8192_SHA256,
            Hash::Sha384 => algs::RSA_PKCS1_2048_8192_SHA384,
            Hash::Sha512 => algs::RSA_PKCS1_2048_8192_SHA512,
        },
    };
    alg.verify_signature(spki.subject_public_key.raw_bytes(), message, signature)
        .map_err(|_| SignatureError::Bad)
}

/// Whether `issuer`'s key verifies `cert`'s signature (used to find an omitted root, and to tell a
/// self-signed certificate from one that is only self-issued).
pub(crate) fn is_signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    use der::Encode;
    let Ok(tbs) = cert.tbs_certificate.to_der() else { return false };
    let Some(signature) = cert.signature.as_bytes() else { return false };
    verify_signature(
        &issuer.tbs_certificate.subject_public_key_info,
        &cert.signature_algorithm.oid,
        &tbs,
        signature,
    )
    .is_ok()
}
