//! State shared by every connection: the [`Host`] (engine, clock, RNG, store, hub directory, background
//! flows) and metrics.

use crate::config::ServerConfig;
use crate::datadir::OwnerKeys;
use crate::metrics::Metrics;
use crate::ServerError;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::Timestamp;
use dps_core::store::{AsyncStore, StoreError, StoreOp, StoreResult};
use dps_core::OWNER_POLICY;
use dps_core::{AccessPolicy, DeviceRequest, Engine, EngineConfig, HttpRequest, Reply, Rights};
use dps_host::{Clock, Host, SystemClock};
use dps_store::{SqliteOptions, SqliteStore};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The wall clock as the engine's [`Timestamp`].
pub fn now() -> Timestamp {
    SystemClock.now()
}

/// The SQLite store, timing every `CommitRegistration` into
/// [`Metrics::store_commit_latency`](crate::metrics::Metrics).
#[derive(Debug, Clone)]
pub struct MeteredStore {
    inner: SqliteStore,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    /// Wraps a store.
    pub fn new(inner: SqliteStore, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &SqliteStore {
        &self.inner
    }
}

impl AsyncStore for MeteredStore {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        let timed = matches!(op, StoreOp::CommitRegistration { .. });
        let started = Instant::now();
        let pending = self.inner.execute(op);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let result = pending.await;
            if timed {
                metrics.store_commit_latency.observe(started.elapsed());
            }
            result
        }
    }
}

/// Everything a connection handler needs. Shared as `Arc<AppState>`.
#[derive(Debug)]
pub struct AppState {
    /// The embeddable host every request runs through (owns the engine, the RNG, the timed store, the
    /// hub directory and early-answered flows still finishing).
    pub host: Host,
    /// The engine (configuration and flow constructors); the host's.
    pub engine: Engine,
    /// The durable store (timed); the host holds the same store.
    pub store: Arc<MeteredStore>,
    /// The IoT hub directory; the host holds the same directory.
    pub hubs: Arc<MemoryHubDirectory>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The engine configuration for a server configuration and its owner keys.
pub fn engine_config(config: &ServerConfig, owner: &OwnerKeys) -> EngineConfig {
    let mut engine = EngineConfig::new(
        config.id_scope.clone(),
        config.service_host_name.clone(),
        config.linked_hubs.clone(),
    );
    engine.default_allocation = config.default_allocation;
    engine.retry_after_secs = config.retry_after_secs;
    engine.respond_before_assignment = config.respond_early;
    engine.access_policies.push(AccessPolicy {
        key_name: OWNER_POLICY.to_owned(),
        primary_key: owner.primary.clone(),
        secondary_key: owner.secondary.clone(),
        rights: Rights::ALL,
    });
    engine.access_policies.extend(config.access_policies.iter().cloned());
    engine
}

impl AppState {
    /// Opens the store at `database` and builds the engine.
    pub fn open(config: &ServerConfig, owner: &OwnerKeys, database: &Path) -> Result<AppState, ServerError> {
        let store = SqliteStore::open(database, SqliteOptions::default()).map_err(ServerError::Store)?;
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(MeteredStore::new(store, Arc::clone(&metrics)));
        let hubs = Arc::new(MemoryHubDirectory::new());
        let host = Host::builder(engine_config(config, owner))
            .store(store.clone())
            .hubs(hubs.clone())
            .build()
            .map_err(|e| ServerError::Config(crate::config::ConfigError(e.message)))?;
        Ok(AppState { engine: host.engine().clone(), host, store, hubs, metrics })
    }

    /// Draws 16 random bytes (e.g. for a tracking ID).
    pub fn random16(&self) -> [u8; 16] {
        self.host.random16()
    }

    /// Runs a device API request (HTTPS or MQTT, already addressed) to its reply.
    pub async fn run_device(&self, request: DeviceRequest) -> Reply {
        self.host.device(request).await
    }

    /// Runs any HTTP request (device or service API) to its reply.
    pub async fn run_http(&self, request: HttpRequest) -> Reply {
        self.host.http(request).await
    }

    /// Refreshes the store counters shown by `/metrics`.
    pub fn refresh_store_metrics(&self) {
        let stats = self.store.inner().stats();
        self.metrics.set_store_stats(stats.batches, stats.rows);
    }

    /// Closes the store: queued writes are committed and the writer thread exits. Blocks; call it from a
    /// blocking context.
    pub fn close_store(&self) -> Result<(), StoreError> {
        self.store.inner().clone().close()
    }
}
