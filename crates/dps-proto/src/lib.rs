//! Wire types and pure codecs of the Azure IoT Hub Device Provisioning Service (DPS) protocol.
//!
//! This crate does no I/O, reads no clock and spawns no threads. It holds:
//! - [`allocation`]: the custom allocation webhook's request and response (spec §8.3-8.5);
//! - [`model`]: device-API and service-API JSON models with Azure's exact field names;
//! - [`id`]: identifiers built only by parsing (spec §11);
//! - [`error`]: the one error-code table and the wire error body;
//! - [`sas`]: SharedAccessSignature tokens (parse, sign, verify, group-derived keys);
//! - [`route`]: HTTPS request routing (method + path + query to a request enum);
//! - [`mqtt`]: MQTT username and topic codecs;
//! - [`query`]: the service API's SQL-like query specification;
//! - [`time`]: timestamps passed in by callers.
#![forbid(unsafe_code)]

pub mod allocation;
pub mod certificate;
pub mod credential;
pub mod error;
pub mod id;
pub mod model;
pub mod mqtt;
pub mod query;
pub mod route;
pub mod sas;
pub mod strict;
pub mod time;

pub use credential::Credential;
pub use error::{DpsError, ErrorBody, ErrorCode};
pub use id::{ApiVersion, DeviceId, EnrollmentGroupId, Etag, IdScope, IfMatch, OperationId, RegistrationId};
pub use time::Timestamp;

/// The largest request body accepted, in bytes (spec §10.1: 96 KB).
pub const MAX_BODY_BYTES: usize = 96 * 1024;
