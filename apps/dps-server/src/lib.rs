//! The reference DPS server: the `dps-core` engine behind HTTPS (device and service API), MQTT over TLS and
//! MQTT over WebSocket, on the durable SQLite store. The binary `dps-server` runs it; this library holds the
//! pieces so that tests, the load generator and the admin CLI share them.
//!
//! - [`config`]: the TOML file, environment and flags (flags > env > file > defaults).
//! - [`datadir`]: the data directory (store, generated CA and server certificate, owner keys, connection
//!   string, `ready.json`).
//! - [`tls`]: certificate generation and the rustls configurations.
//! - [`server`]: the listeners ([`server::start`] → [`server::RunningServer`], graceful shutdown).
//! - [`state`]: the engine, store and hub directory every connection shares.
//! - [`metrics`]: Prometheus metrics for the admin listener; [`usage`] billable-operation metering.
//! - [`client`]: a small HTTPS client (admin CLI, demo device, tests); [`admin`] the service API commands;
//!   [`provision`] the device client driving `dps_client` (its state machine and HTTPS/MQTT transports).
//! - [`cli`]: the command line.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dps_server::ServerError> {
//! let config = dps_server::config::ServerConfig::for_tests("0ne00000001", "/tmp/dps-data")?;
//! let server = dps_server::server::start(config).await?;
//! println!("HTTPS on {}", server.ready.https);
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
// The server is a program: it reads the clock, the environment and files, and opens sockets.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod datadir;
pub mod encryption;
pub mod faults;
mod http;
pub mod linked;
pub mod metrics;
pub mod mqtt;
pub mod provision;
pub mod server;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod transfer;
pub mod usage;

/// Why the server (or a CLI command) could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The data directory holds something unusable.
    #[error("data directory: {0}")]
    DataDir(String),
    /// TLS material or configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// The store failed to open or close.
    #[error("store: {0}")]
    Store(dps_core::store::StoreError),
    /// A client-side failure (admin CLI, device client).
    #[error("{0}")]
    Client(String),
    /// Encryption at rest: the key-encryption key or the keyring is missing, wrong or unusable.
    #[error("encryption at rest: {0}")]
    Encryption(String),
}

impl ServerError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> ServerError {
        ServerError::Io { context: context.into(), source }
    }
}
