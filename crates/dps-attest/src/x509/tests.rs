//! X.509 attestation tests.
