//! `dps-loadgen`: simulated symmetric-key devices that each open a **fresh TLS connection**, register and poll
//! until assigned — over HTTPS, MQTT or AMQP — driving the device-side state machine
//! [`dps_client::RegistrationClient`] rather than re-implementing the protocol. In the X.509 mode
//! (`x509`, `x509-mqtt`) every device instead presents its own leaf certificate, signed by a root the load
//! generator generates at start, on a fresh mutual-TLS connection, and its baseline requires and verifies
//! that certificate.
//!
//! It measures registrations per second, the latency of whole registrations and errors by DPS error code,
//! and compares the server with a **baseline**: a bare rustls + hyper server in the same process (same kind
//! of certificate, ECDSA P-256 on aws-lc-rs) answering the same requests with fixed replies of the same size,
//! loaded identically. A server is judged by how close it stays to that baseline, since each device's TLS
//! handshake dominates the cost of a registration.
//!
//! Modules: [`device`] (identities and the per-device driver), [`https`], [`mqtt`] and [`amqp`] (transports),
//! [`runner`] (concurrency, progress, aggregation), [`baseline`] (the fixed-reply servers), [`service`] (the
//! service API: group setup and verification of stored registrations), [`server`] (spawning `dps-server`),
//! [`bench`](mod@bench) (the whole comparison and its markdown table), [`stats`] and [`cpu`] (measurement), [`tls`],
//! [`x509`] (the device root CA and per-device leaf certificates of the X.509 mode).
#![forbid(unsafe_code)]
// A load generator is a program: it reads the clock, sleeps, opens sockets and files, and spawns processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod amqp;
pub mod baseline;
pub mod bench;
pub mod cpu;
pub mod device;
pub mod https;
pub mod mqtt;
pub mod runner;
pub mod server;
pub mod service;
pub mod stats;
pub mod tls;
pub mod webhook;
pub mod x509;

/// Why the load generator could not set up or finish (errors of individual devices are counted in a
/// [`stats::ErrorTally`] instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS configuration or certificate problem.
    #[error("TLS: {0}")]
    Tls(String),
    /// A setting is missing or invalid.
    #[error("{0}")]
    Config(String),
    /// The service API refused or failed a request.
    #[error("service API: {0}")]
    Service(String),
    /// The spawned server did not start, stop or restart as expected.
    #[error("server process: {0}")]
    Server(String),
}

/// A DPS error outside a service reply (e.g. a malformed connection string) is a configuration problem.
impl From<dps_core::DpsError> for Error {
    fn from(e: dps_core::DpsError) -> Self {
        Error::Config(e.to_string())
    }
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}
