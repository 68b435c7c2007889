//! The transport-agnostic DPS engine (sans-IO) and the device-side client state machine.
#![forbid(unsafe_code)]

pub mod hub;
pub mod store;

pub use dps_proto as proto;
