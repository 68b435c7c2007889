//! Storage backends for the DPS engine. The engine (in `dps-core`) asks for a
//! [`StoreOp`](dps_core::store::StoreOp); a backend here performs it. Both backends implement
//! [`BlockingStore`](dps_core::store::BlockingStore) and [`AsyncStore`](dps_core::store::AsyncStore) and
//! pass the same conformance suite (`store_conformance_tests!`, exported with the feature `testing` so
//! that other backends run it too).
//!
//! - [`MemoryStore`]: everything in memory behind one lock. For tests, benchmarks and deployments that can
//!   lose their data on restart. Every operation is atomic; nothing is durable.
//! - [`SqliteStore`] (feature `sqlite`, on by default): one SQLite database file in WAL mode with
//!   `synchronous=FULL`. A write is acknowledged only once it is committed and fsynced, so an acknowledged
//!   registration, enrollment or group survives a crash or power loss (as far as the disk honours fsync).
//! - [`PostgresStore`] (feature `postgres`): a PostgreSQL database shared by any number of server
//!   replicas; every write is one transaction whose precondition is checked against the row it locks.
//!
//! # Group commit
//!
//! An fsync costs on the order of 150 microseconds, so one transaction per registration would cap a
//! server at a few thousand registrations per second. [`SqliteStore`] instead funnels every write
//! through one writer thread that takes whatever requests have queued up (up to
//! [`SqliteOptions::max_batch`]) and applies them in a single transaction: each request's precondition is
//! checked inside the transaction in arrival order, a failed precondition fails only that request, and
//! every requester is answered after the one `COMMIT` (and its fsync) has returned. Under load, one fsync
//! therefore covers many writes and durability costs a few microseconds per write; an idle store still
//! answers a lone write after a single fsync, with no added delay. Reads never wait for the writer: they
//! run on the caller's thread on a small pool of read-only connections.
#![forbid(unsafe_code)]
// This crate legitimately does I/O: it owns database files and runs a writer thread, which the
// workspace-wide bans (meant for the pure crates) would otherwise forbid.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;
mod memory;
#[cfg(all(feature = "testing", feature = "postgres"))]
pub mod pg_testing;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod secrets;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
mod sqlite_hub;
#[cfg(feature = "testing")]
pub mod testing;

/// Encryption at rest (the sealer, key providers and keyring), re-exported for callers of
/// [`SqliteStore::open_sealed`] and [`SqliteHubDirectory::open_sealed`].
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use dps_seal as seal;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore, POSTGRES_SCHEMA_VERSION};
#[cfg(feature = "sqlite")]
pub use sqlite::{read_audit_log, SqliteOptions, SqliteStats, SqliteStore, SCHEMA_VERSION};
#[cfg(feature = "sqlite")]
pub use sqlite_hub::{
    HubDatabase, SqliteHubDirectory, UsageEvent, UsageRow, DEFAULT_BATCH_WINDOW as HUB_BATCH_WINDOW,
    HUB_SCHEMA_VERSION,
};
