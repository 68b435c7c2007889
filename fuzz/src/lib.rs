//! The bodies of the fuzz targets, one plain function per target, so that libFuzzer (`fuzz_targets/`,
//! `cargo +nightly fuzz`) and a stable `cargo test` (which replays `corpus/<target>/`, see
//! `tests/corpora.rs`) run exactly the same code. Each function panics only when the code under test breaks
//! its contract (or panics itself); every other outcome, including a refusal, is a pass.
//!
//! The contracts checked, per target:
//! - every refusal is a [`DpsError`] whose code is in the error table with a 4xx status, and one of the codes
//!   the parser documents;
//! - what parses re-serialises (with the crate's own builder) to something that parses the same;
//! - the engine answers every HTTP request with a status and, at 400 or above, the JSON error body with a
//!   six-digit code whose first three digits are the status;
//! - an MQTT session ends without a panic and everything the server wrote is well-formed MQTT.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod engine;
mod mqtt_session;
mod parsers;
mod x509;

pub use engine::engine_http;
pub use mqtt_session::mqtt_session;
pub use parsers::{continuation, https_route, mqtt_username_topic, query, sas_token, wire_models};
pub use x509::{ca_upload, csr, x509_chain};

use dps_proto::{DpsError, ErrorCode};

/// The fixed "now" of every target (2023-11-14T22:13:20Z); seed tokens expire an hour later.
pub const NOW: i64 = 1_700_000_000;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the `fuzz_targets/` binaries and the `corpus/` directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("sas_token", sas_token),
    ("https_route", https_route),
    ("mqtt_username_topic", mqtt_username_topic),
    ("mqtt_session", mqtt_session),
    ("wire_models", wire_models),
    ("query", query),
    ("continuation", continuation),
    ("x509_chain", x509_chain),
    ("csr", csr),
    ("ca_upload", ca_upload),
    ("engine_http", engine_http),
];

/// Asserts that `err` is a table code with a 4xx status and one of `allowed`.
#[track_caller]
pub(crate) fn assert_refusal(what: &str, err: &DpsError, allowed: &[ErrorCode]) {
    let code = err.code.code();
    assert_eq!(ErrorCode::from_code(code), Some(err.code), "{what}: {err} is not in the error table");
    assert!((400..500).contains(&err.code.http_status()), "{what}: {err} is not a client error");
    assert!(allowed.contains(&err.code), "{what}: unexpected code {err}; allowed {allowed:?}");
    assert!(!err.message.is_empty(), "{what}: {err} has no message");
}
