//! State shared by every connection: the [`Host`] (engine, clock, RNG, store, hub directory, background
//! flows), metrics and usage metering. The hub directory is durable ([`SqliteHubDirectory`] in the data
//! directory's `hubs.sqlite3`), so a restarted server still migrates its devices' twins.

use crate::config::ServerConfig;
use crate::datadir::DataDir;
use crate::datadir::OwnerKeys;
use crate::metrics::Metrics;
use crate::throttle::AuthFailureLimiter;
use crate::usage::Billing;
use crate::ServerError;
use dps_core::audit::AuditRecord;
use dps_core::proto::Timestamp;
use dps_core::store::{AsyncStore, StoreError, StoreOp, StoreResult};
use dps_core::OWNER_POLICY;
use dps_core::{AccessPolicy, DeviceRequest, Engine, EngineConfig, HttpRequest, Reply, Rights};
use dps_host::{AssigningRecords, Clock, Host, LocalCa, SystemClock, WebhookConfig, Webhooks};
use dps_hubs::RoutingDirectory;
use dps_store::seal::Sealer;
use dps_store::{PostgresStore, SqliteHubDirectory, SqliteOptions, SqliteStats, SqliteStore};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The wall clock as the engine's [`Timestamp`].
pub fn now() -> Timestamp {
    SystemClock.now()
}

/// The store the server runs on, as configured (`store = "sqlite"` or a `postgres://` URL).
#[derive(Debug, Clone)]
pub enum ServerStore {
    /// `dps.sqlite3` in the data directory: one process.
    Sqlite(SqliteStore),
    /// A PostgreSQL database shared by every replica.
    Postgres(PostgresStore),
}

impl ServerStore {
    /// Opens the configured store: SQLite at `database`, or PostgreSQL (connecting with retries, migrating).
    /// Blocks; call it from a blocking context.
    pub fn open(
        config: &crate::config::StoreConfig,
        database: &Path,
        sealer: Arc<Sealer>,
    ) -> Result<ServerStore, StoreError> {
        Ok(match config {
            crate::config::StoreConfig::Sqlite => ServerStore::Sqlite(SqliteStore::open_sealed(
                database,
                SqliteOptions::default(),
                Some(sealer),
            )?),
            crate::config::StoreConfig::Postgres { url, options } => {
                ServerStore::Postgres(PostgresStore::connect(url, options.clone(), Some(sealer))?)
            }
        })
    }

    /// Where the data is: the SQLite file, or the PostgreSQL target without its password.
    pub fn describe(&self) -> String {
        match self {
            ServerStore::Sqlite(s) => s.path().display().to_string(),
            ServerStore::Postgres(p) => p.target().to_owned(),
        }
    }

    /// The SQLite write-path counters (zero on PostgreSQL, which commits each write on its own).
    pub fn stats(&self) -> SqliteStats {
        match self {
            ServerStore::Sqlite(s) => s.stats(),
            ServerStore::Postgres(_) => SqliteStats::default(),
        }
    }

    /// Closes the store: SQLite commits what is queued and stops its writer; PostgreSQL closes its pool.
    pub fn close(self) -> Result<(), StoreError> {
        match self {
            ServerStore::Sqlite(s) => s.close(),
            ServerStore::Postgres(p) => {
                p.close();
                Ok(())
            }
        }
    }
}

impl AsyncStore for ServerStore {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        enum Pending<A, B> {
            Sqlite(A),
            Postgres(B),
        }
        let pending = match self {
            ServerStore::Sqlite(s) => Pending::Sqlite(AsyncStore::execute(s, op)),
            ServerStore::Postgres(p) => Pending::Postgres(AsyncStore::execute(p, op)),
        };
        async move {
            match pending {
                Pending::Sqlite(f) => f.await,
                Pending::Postgres(f) => f.await,
            }
        }
    }
}

/// The store, timing every `CommitRegistration` into
/// [`Metrics::store_commit_latency`](crate::metrics::Metrics).
#[derive(Debug, Clone)]
pub struct MeteredStore {
    inner: ServerStore,
    metrics: Arc<Metrics>,
    billing: Option<Arc<Billing>>,
}

impl MeteredStore {
    /// Wraps a store.
    pub fn new(inner: ServerStore, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics, billing: None }
    }

    /// Also reports every committed registration record to `billing` (a register is billed by its final
    /// status).
    pub fn with_billing(mut self, billing: Arc<Billing>) -> Self {
        self.billing = Some(billing);
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &ServerStore {
        &self.inner
    }
}

impl AsyncStore for MeteredStore {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        let billed = match (&op, &self.billing) {
            (StoreOp::CommitRegistration { record, .. }, Some(b)) => {
                dps_core::register_meter(record).map(|event| (Arc::clone(b), event))
            }
            _ => None,
        };
        let timed = matches!(op, StoreOp::CommitRegistration { .. });
        // Refusals are logged from the records the engine appends (their store answers only `Done`).
        let refusals = match &op {
            StoreOp::AppendAudit { records } => records.clone(),
            _ => Vec::new(),
        };
        let started = Instant::now();
        let pending = self.inner.execute(op);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let result = pending.await;
            match &result {
                Ok(StoreResult::Audited { record, .. }) => log_audit(record),
                Ok(_) => refusals.iter().for_each(log_audit),
                Err(_) => {}
            }
            if timed {
                metrics.store_commit_latency.observe(started.elapsed());
            }
            if let (Some((billing, event)), Ok(_)) = (billed, &result) {
                billing.bill(event);
            }
            result
        }
    }
}

/// The structured log event of an audited write or refusal (target `audit`). It carries the record's
/// fields only: identifiers, ETags, outcome and tracking ID, never a secret.
pub fn log_audit(record: &AuditRecord) {
    tracing::info!(
        target: "audit",
        sequence = record.sequence,
        principal = %record.principal,
        transport = record.transport.as_str(),
        operation = record.operation.as_str(),
        target = %record.target,
        etag_before = record.etag_before.as_deref().unwrap_or(""),
        etag_after = record.etag_after.as_deref().unwrap_or(""),
        status = record.status,
        error_code = record.error_code.unwrap_or(0),
        tracking_id = %record.tracking_id,
        "audited service write"
    );
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
    /// The durable local IoT hub directory: the default of `routing`, which the host holds.
    pub hubs: Arc<SqliteHubDirectory>,
    /// Routes each hub operation to the adapter of its linked hub (`mosquitto`, `iothub`) or to `hubs`.
    pub routing: Arc<RoutingDirectory>,
    /// The linked hubs, changeable at run time (`/linkedHubs`, `dps-server hubs`).
    pub linked: Arc<crate::linked::LinkedHubs>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Billable-operation metering (counters and the usage table).
    pub billing: Arc<Billing>,
    /// The local CA issuing device certificates (with `[certificate_issuance] enabled = true`).
    pub issuer: Option<Arc<LocalCa>>,
    /// Failed device authentications per client address (401 storms, [`crate::throttle`]).
    pub auth_failures: AuthFailureLimiter,
}

/// The name under which the issuing CA is registered as a verified CA certificate of the instance (and
/// the subject CN of a CA it creates): reference it from an enrollment group's `caReferences` so issued
/// certificates attest their devices.
pub const ISSUER_CA_NAME: &str = "dps-issuer";

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
    engine.max_symmetric_key_groups = config.max_symmetric_key_groups;
    engine.max_ca_certificates = config.max_ca_certificates;
    engine.latency = config.latency.clone().map(|t| Arc::new(t) as Arc<dyn dps_core::policy::LatencySource>);
    engine.access_policies.push(AccessPolicy {
        key_name: OWNER_POLICY.to_owned(),
        primary_key: owner.primary.clone(),
        secondary_key: owner.secondary.clone(),
        rights: Rights::ALL,
    });
    engine.access_policies.extend(config.access_policies.iter().cloned());
    engine
}

/// The custom allocation webhook client of `[custom_allocation]`: the system's trust roots plus `ca_file`.
fn webhooks(c: &crate::config::CustomAllocationConfig) -> Result<Webhooks, ServerError> {
    let mut roots = WebhookConfig::system_roots();
    if let Some(path) = &c.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            ServerError::Config(crate::config::ConfigError(format!(
                "custom_allocation.ca_file {}: {e}",
                path.display()
            )))
        })?;
        let extra = dps_client::tls::certificates(&pem).map_err(|e| {
            ServerError::Config(crate::config::ConfigError(format!(
                "custom_allocation.ca_file {}: {e}",
                path.display()
            )))
        })?;
        roots.extend(extra);
    }
    Webhooks::new(WebhookConfig {
        roots,
        timeout: c.timeout,
        attempts: c.attempts,
        initial_interval: c.initial_interval,
        increment: c.increment,
        allow_http: c.allow_http,
        ..WebhookConfig::default()
    })
    .map_err(|e| ServerError::Config(crate::config::ConfigError(e)))
}

impl AppState {
    /// Opens the configured store (SQLite at `database`, or PostgreSQL) and the hub directory (`hubs.sqlite3` in the data directory) and builds
    /// the engine.
    ///
    /// Every secret the stores write (enrollment and group keys, webhook URLs, hub device keys, the issuing
    /// CA's key) is sealed with `sealer`.
    pub fn open(
        config: &ServerConfig,
        owner: &OwnerKeys,
        database: &Path,
        sealer: Arc<Sealer>,
    ) -> Result<AppState, ServerError> {
        let hubs_path = DataDir::new(config.data_dir.clone()).hubs_database();
        let hubs = SqliteHubDirectory::open_sealed(
            &hubs_path,
            dps_store::HUB_BATCH_WINDOW,
            Some(Arc::clone(&sealer)),
        )
        .map_err(|e| ServerError::DataDir(format!("{}: {e}", hubs_path.display())))?;
        let store =
            ServerStore::open(&config.store, database, Arc::clone(&sealer)).map_err(ServerError::Store)?;
        let metrics = Arc::new(Metrics::default());
        let billing = Arc::new(Billing::new(config.id_scope.to_string(), Arc::clone(&metrics), hubs.clone()));
        let store =
            Arc::new(MeteredStore::new(store, Arc::clone(&metrics)).with_billing(Arc::clone(&billing)));
        let hubs = Arc::new(hubs);
        let data_dir = DataDir::new(config.data_dir.clone());
        let entries = match crate::linked::load(data_dir.root(), &sealer)? {
            Some(entries) => {
                tracing::info!(hubs = entries.len(), file = crate::linked::FILE_NAME,
                    "linked hubs from the data directory (changed at run time; [[linked_hubs]] seeds only a new data directory)");
                entries
            }
            None => config
                .linked_hubs
                .iter()
                .map(|hub| crate::linked::HubEntry {
                    hub: hub.clone(),
                    adapter: config.hub_adapters.get(&hub.host_name).cloned().unwrap_or_default(),
                })
                .collect(),
        };
        let routing = Arc::new(RoutingDirectory::new(hubs.clone()));
        crate::linked::install(&entries, &routing)
            .map_err(|m| ServerError::Config(crate::config::ConfigError(m)))?;
        let mut engine = engine_config(config, owner);
        engine.linked_hubs = entries.iter().map(|e| e.hub.clone()).collect();
        let mut builder = Host::builder(engine)
            .store(store.clone())
            .hubs(routing.clone())
            .poll_hold(config.poll_hold)
            .quotas(config.quotas)
            .faults(config.faults.clone())
            // Replicas sharing PostgreSQL must see an early-answered registration's `assigning` record (a
            // device's poll may reach another replica): it is written to the store, not kept in memory.
            .assigning_records(match config.store {
                crate::config::StoreConfig::Sqlite => AssigningRecords::Host,
                crate::config::StoreConfig::Postgres { .. } => AssigningRecords::Store,
            });
        if let Some(seed) = config.fault_seed {
            use rand::SeedableRng;
            builder = builder.fault_rng(Box::new(rand::rngs::StdRng::seed_from_u64(seed)));
        }
        let issuer = match config.certificate_issuance {
            Some(settings) => {
                let dir = DataDir::new(config.data_dir.clone()).issuer_dir();
                let ca = LocalCa::open_or_create_sealed(
                    &dir,
                    ISSUER_CA_NAME,
                    settings.key,
                    settings.validity,
                    now(),
                    Some(&sealer),
                )
                .map_err(|e| ServerError::DataDir(format!("{}: {e}", dir.display())))?;
                let ca = Arc::new(ca);
                builder = builder.issuer(ca.clone());
                Some(ca)
            }
            None => None,
        };
        builder = builder.webhooks(webhooks(&config.custom_allocation)?);
        let host = builder.build().map_err(|e| ServerError::Config(crate::config::ConfigError(e.message)))?;
        let auth_failures = AuthFailureLimiter::new(config.auth_failures);
        let linked = Arc::new(crate::linked::LinkedHubs::new(
            entries,
            host.engine().clone(),
            routing.clone(),
            data_dir.root(),
            Arc::clone(&sealer),
        ));
        Ok(AppState {
            routing,
            linked,
            engine: host.engine().clone(),
            host,
            store,
            hubs,
            metrics,
            billing,
            issuer,
            auth_failures,
        })
    }

    /// Draws 16 random bytes (e.g. for a tracking ID).
    pub fn random16(&self) -> [u8; 16] {
        self.host.random16()
    }

    /// Runs a device API request (HTTPS or MQTT, already addressed) to its reply.
    pub async fn run_device(&self, request: DeviceRequest) -> Reply {
        let reply = self.host.device(request).await;
        self.billing.on_reply(&reply);
        reply
    }

    /// Runs any HTTP request (device or service API) to its reply.
    pub async fn run_http(&self, request: HttpRequest) -> Reply {
        let reply = self.host.http(request).await;
        self.billing.on_reply(&reply);
        reply
    }

    /// The refusal of a device-API request from `ip` while that address is throttled for failed
    /// authentications (`429001` with a Retry-After; counted in the metrics), or None.
    pub fn throttled(&self, ip: std::net::IpAddr) -> Option<Reply> {
        let retry_after = self.auth_failures.check(ip).err()?;
        self.metrics.auth_throttled();
        let error = dps_core::DpsError::with_message(
            dps_core::ErrorCode::Throttled,
            format!(
                "too many failed authentications from this address (more than {} a minute, {} at once); \
                 retry after {retry_after} s",
                self.auth_failures.limits().per_minute,
                self.auth_failures.limits().burst
            ),
        )
        .retry_after(retry_after);
        Some(Reply::error(&error, dps_core::proto::id::format_uuid(self.random16()), now()))
    }

    /// Counts `reply` against `ip`'s failed-authentication budget when it is a 401.
    pub fn note_auth_outcome(&self, ip: std::net::IpAddr, reply: &Reply) {
        if reply.status == 401 {
            self.auth_failures.failed(ip);
        }
    }

    /// Refreshes the store counters shown by `/metrics`.
    pub fn refresh_store_metrics(&self) {
        let stats = self.store.inner().stats();
        self.metrics.set_store_stats(stats.batches, stats.rows);
        self.metrics.set_gate_counts(self.host.gate_counts());
    }

    /// Closes the store and the hub directory: queued writes (and usage rows) are committed and the writer
    /// threads exit. Blocks; call it from a blocking context.
    pub fn close_store(&self) -> Result<(), StoreError> {
        let closed = self.store.inner().clone().close();
        if let Err(e) = self.hubs.close() {
            tracing::warn!(error = %e, "closing the hub directory");
        }
        closed
    }
}
