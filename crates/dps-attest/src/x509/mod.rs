//! X.509 attestation (feature `x509`): certificates parsed with `x509-cert`, paths validated with
//! `rustls-webpki` on aws-lc-rs.

mod certinfo;
mod pop;
pub use pop::{check_ca_certificate, verify_proof_of_possession};

pub use certinfo::{
    certificate_info, common_name, info_of, is_self_issued, parse_certificate_text, parse_der,
    sha1_thumbprint, sha256_thumbprint, thumbprint_matches, to_der, validity, MAX_CERTIFICATE_BYTES,
};
