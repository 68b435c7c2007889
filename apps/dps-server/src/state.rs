//! State shared by every connection: the engine, the store, the hub directory, the RNG, and metrics.

use crate::config::ServerConfig;
use crate::datadir::OwnerKeys;
use crate::metrics::Metrics;
use crate::ServerError;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::Timestamp;
use dps_core::store::{AsyncStore, StoreError, StoreOp, StoreResult};
use dps_core::OWNER_POLICY;
use dps_core::{run_async, AccessPolicy, DeviceRequest, Engine, EngineConfig, HttpRequest, Reply, Rights};
use dps_store::{SqliteOptions, SqliteStore};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The wall clock as the engine's [`Timestamp`].
pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
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
    /// The engine (configuration and flow constructors).
    pub engine: Engine,
    /// The durable store (timed).
    pub store: MeteredStore,
    /// The IoT hub directory.
    pub hubs: MemoryHubDirectory,
    /// Randomness for operation IDs, ETags, tracking IDs and generated keys.
    pub rng: Mutex<StdRng>,
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
        let engine = Engine::new(engine_config(config, owner))
            .map_err(|e| ServerError::Config(crate::config::ConfigError(e.message)))?;
        let store = SqliteStore::open(database, SqliteOptions::default()).map_err(ServerError::Store)?;
        let metrics = Arc::new(Metrics::default());
        Ok(AppState {
            engine,
            store: MeteredStore::new(store, Arc::clone(&metrics)),
            hubs: MemoryHubDirectory::new(),
            rng: Mutex::new(StdRng::from_entropy()),
            metrics,
        })
    }

    /// Draws 16 random bytes (e.g. for a tracking ID).
    pub fn random16(&self) -> [u8; 16] {
        use rand::RngCore;
        let mut b = [0u8; 16];
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).fill_bytes(&mut b);
        b
    }

    /// Runs a device API request (HTTPS or MQTT, already addressed) to its reply.
    pub async fn run_device(&self, request: DeviceRequest) -> Reply {
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.device(now(), &mut *rng, request)
        };
        run_async(&mut flow, &self.store, &self.hubs).await
    }

    /// Runs any HTTP request (device or service API) to its reply.
    pub async fn run_http(&self, request: HttpRequest) -> Reply {
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.http(now(), &mut *rng, request)
        };
        run_async(&mut flow, &self.store, &self.hubs).await
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
