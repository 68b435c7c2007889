//! X.509 attestation (feature `x509`): certificates parsed with `x509-cert`, paths validated with
//! `rustls-webpki` on aws-lc-rs, CSRs parsed and their signatures checked.

mod algs;
mod attest;
mod certinfo;
mod chain;
pub mod csr;
mod path;
mod pop;
pub use pop::{check_ca_certificate, verify_proof_of_possession};

pub(crate) use attest::X509Evidence;
pub use attest::{attest_x509, same_device_certificate};
pub use certinfo::{
    certificate_info, common_name, info_of, is_self_issued, parse_certificate_text, parse_der,
    sha1_thumbprint, sha256_thumbprint, thumbprint_matches, to_der, validity, MAX_CERTIFICATE_BYTES,
};
pub use chain::{ClientChain, MAX_CHAIN_LEN, MAX_COMMON_NAME_LEN};

#[cfg(test)]
mod testpki;
#[cfg(test)]
mod tests;
