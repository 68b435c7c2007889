//! The PostgreSQL backend, for several server replicas on one database. See [`PostgresStore`].

use crate::common::{
    backend, check_certificate_limit, check_delete, check_group_limit, check_write, enrollment_key,
    group_key, is_symmetric_key_group, json_error, non_empty, page_limit, prepare_put,
};
use crate::secrets::{self, HasSecrets};
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType};
use dps_core::audit::{AuditFilter, AuditOperation, AuditRecord, AuditTransport};
use dps_core::proto::certificate::CaCertificate;
use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::proto::query::Query;
use dps_core::proto::{Etag, IfMatch, Timestamp};
use dps_core::store::{
    audit_page_before, push_operation, AsyncStore, BlockingStore, DeviceContext, IssuedOperation, Page,
    PageRequest, RegistrationRecord, StoreError, StoreOp, StoreResult, WriteCondition,
};
use dps_seal::Sealer;
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

type OpResult = Result<StoreResult, StoreError>;

/// Schema migrations, applied in order inside one transaction; after step `i` the `dps_schema` row holds
/// `i + 1`. Never edit a released step: append a new one. Keys are `COLLATE "C"` so that they order and
/// page by bytes, as the other backends do, whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    // Version 1: every table of the SQLite schema 4, with the operation history of a registration in a
    // column of its own.
    r#"CREATE TABLE enrollments (
        key TEXT COLLATE "C" PRIMARY KEY,
        etag TEXT NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE enrollment_groups (
        key TEXT COLLATE "C" PRIMARY KEY,
        etag TEXT NOT NULL,
        symmetric_key BOOLEAN NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE registrations (
        key TEXT COLLATE "C" PRIMARY KEY,
        group_key TEXT COLLATE "C",
        etag TEXT NOT NULL,
        json TEXT NOT NULL,
        operations TEXT NOT NULL
    );
    CREATE INDEX registrations_by_group ON registrations (group_key, key);
    CREATE TABLE store_version (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        version BIGINT NOT NULL
    );
    INSERT INTO store_version (id, version) VALUES (0, 0);
    CREATE TABLE ca_certificates (
        key TEXT COLLATE "C" PRIMARY KEY,
        name TEXT NOT NULL,
        etag TEXT NOT NULL,
        der BYTEA NOT NULL,
        is_verified BOOLEAN NOT NULL,
        verification_code TEXT,
        created BIGINT NOT NULL,
        updated BIGINT NOT NULL
    );
    CREATE TABLE audit_log (
        sequence BIGSERIAL PRIMARY KEY,
        time BIGINT NOT NULL,
        principal TEXT NOT NULL,
        principal_key TEXT NOT NULL,
        transport TEXT NOT NULL,
        operation TEXT NOT NULL,
        target TEXT NOT NULL,
        target_key TEXT NOT NULL,
        etag_before TEXT,
        etag_after TEXT,
        status INTEGER NOT NULL,
        error_code BIGINT,
        tracking_id TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_target ON audit_log (target_key, sequence);
    CREATE INDEX audit_log_by_time ON audit_log (time);"#,
];

/// The schema version this build writes (the `dps_schema` row).
pub const POSTGRES_SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Advisory lock keys (`pg_advisory_xact_lock`): migrations, the symmetric-key group count, the CA
/// certificate count. Arbitrary constants, fixed forever ("dps" + a number).
const MIGRATION_LOCK: i64 = 0x0064_7073_0001;
const GROUP_LIMIT_LOCK: i64 = 0x0064_7073_0002;
const CERTIFICATE_LIMIT_LOCK: i64 = 0x0064_7073_0003;

/// Rows fetched per round trip when a filtered query scans for matches.
const SCAN_CHUNK: i64 = 500;

/// Options of [`PostgresStore::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The most connections this store opens (default 16). A request that finds them all busy waits for
    /// one at most [`pool_wait`](Self::pool_wait).
    pub max_connections: usize,
    /// How long a request waits for a free pooled connection before it fails with a `Backend` error
    /// ("pool exhausted", answered `500001` with a Retry-After). Default 2 s.
    pub pool_wait: Duration,
    /// How long one operation (connection included) may take before it fails with a `Backend` error
    /// (its transaction is then rolled back by the server). Default 15 s.
    pub operation_timeout: Duration,
    /// How long [`PostgresStore::connect`] keeps retrying an unreachable server (with exponential backoff,
    /// 100 ms doubling up to 2 s) before giving up. Authentication failures are never retried. Default 30 s.
    pub connect_retry: Duration,
    /// Worker threads of the store's own runtime, which runs the connections (default 2).
    pub worker_threads: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            pool_wait: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(15),
            connect_retry: Duration::from_secs(30),
            worker_threads: 2,
        }
    }
}

/// A durable store in a PostgreSQL database, shared by any number of processes (server replicas).
///
/// # Transactions and preconditions
///
/// Every write is one transaction on a pooled connection, committed before it is acknowledged (with the
/// server's `synchronous_commit`, durable once acknowledged). The precondition is evaluated inside that
/// transaction against the row read `FOR UPDATE`, so a concurrent writer of the same item (in this process
/// or another) waits for the row lock and then sees the committed row: an `If-Match` update never
/// overwrites a change it did not see, and of two registration commits expecting the same ETag exactly one
/// succeeds, the other answers [`StoreError::Conflict`]. A first registration (no record expected) inserts
/// with `ON CONFLICT DO NOTHING` and is a conflict when another transaction inserted first. The instance
/// limits (symmetric-key groups, CA certificates) are counted under an advisory transaction lock, so two
/// replicas cannot both create the last allowed one. An audited write appends its audit record in its own
/// transaction. A connection lost mid-transaction leaves nothing: PostgreSQL rolls the transaction back and
/// the requester gets a `Backend` error (a device: `500001` with a Retry-After).
///
/// # The cache and its bound
///
/// Only the enrollment groups and the CA certificates are cached (parsed, secrets opened), as one
/// snapshot tagged with the `store_version` row that every group or certificate write increments in its
/// own transaction. Every [`StoreOp::LoadDeviceContext`] reads that row in the same statement as the
/// device's enrollment and record, and reloads the snapshot when the version moved. The bound on
/// staleness is therefore zero: a group disabled (or a certificate deleted) through any replica is seen by
/// every request on every replica that starts after the write was acknowledged. Enrollments and
/// registration records are never cached.
///
/// # Runtime
///
/// The store runs its connections on a small tokio runtime of its own, so it serves callers on any
/// executor (the server's tokio runtime, `futures::executor::block_on`, plain threads through
/// [`BlockingStore`]). Cheap to clone: clones share the pool, the cache and the runtime.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    runtime: Arc<RuntimeGuard>,
}

/// Owns the store's runtime; shut down (without blocking) when the last handle goes.
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

struct Shared {
    pool: Pool,
    /// Where the store connects (host, port, database, user: never the password).
    target: String,
    options: PostgresOptions,
    sealer: Option<Arc<Sealer>>,
    snapshot: RwLock<Arc<Snapshot>>,
    no_groups: Arc<Vec<EnrollmentGroup>>,
}

/// The cached groups and certificates, as of one store version.
struct Snapshot {
    /// `-1`: nothing loaded yet.
    version: i64,
    groups: Arc<Vec<EnrollmentGroup>>,
    certificates: Arc<Vec<CaCertificate>>,
}

/// A database failure, described for a `Backend` error.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

fn pg_error(what: &str, e: &tokio_postgres::Error) -> StoreError {
    backend(format!("PostgreSQL error while {what}: {}", describe(e)))
}

/// Whether a connection failure is an authentication problem (never retried).
fn is_auth_error(e: &tokio_postgres::Error) -> bool {
    let code = e.code();
    code == Some(&SqlState::INVALID_PASSWORD)
        || code == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
        || describe(e).contains("password missing")
}

fn from_json<T: DeserializeOwned>(what: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| json_error(what, &e))
}

fn to_json<T: serde::Serialize>(what: &str, item: &T) -> Result<String, StoreError> {
    serde_json::to_string(item).map_err(|e| json_error(what, &e))
}

/// Shows a connection target without its password.
fn target_of(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("(no user)");
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`, any libpq key-value
    /// string works too; no TLS), retrying an unreachable server for [`PostgresOptions::connect_retry`],
    /// applies pending schema migrations (under an advisory lock, so replicas starting together migrate
    /// once) and loads the group and certificate snapshot.
    ///
    /// Fails with a clear message when the password is missing or wrong (not retried), when the server
    /// stays unreachable, and when the database's schema is newer than this build knows. Blocks the calling
    /// thread (call it from a blocking context).
    pub fn connect(
        url: &str,
        options: PostgresOptions,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<PostgresStore, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| backend(format!("the PostgreSQL connection string is invalid: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("dps-server");
        }
        let target = target_of(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.max(1))
            .thread_name("dps-store-postgres")
            .enable_all()
            .build()
            .map_err(|e| backend(format!("could not start the PostgreSQL store's runtime: {e}")))?;
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(options.max_connections.max(1))
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(options.pool_wait))
                .create_timeout(Some(options.operation_timeout))
                .recycle_timeout(Some(options.operation_timeout))
                .build()
                .map_err(|e| backend(format!("could not build the PostgreSQL connection pool: {e}")))?
        };
        let shared = Arc::new(Shared {
            pool,
            target,
            options,
            sealer,
            snapshot: RwLock::new(Arc::new(Snapshot {
                version: -1,
                groups: Arc::new(Vec::new()),
                certificates: Arc::new(Vec::new()),
            })),
            no_groups: Arc::new(Vec::new()),
        });
        let task = {
            let shared = Arc::clone(&shared);
            runtime.spawn(async move {
                shared.wait_for_server().await?;
                shared.migrate().await?;
                shared.reload_snapshot().await.map(|_| ())
            })
        };
        futures::executor::block_on(task)
            .map_err(|e| backend(format!("the PostgreSQL connect task failed: {e}")))??;
        Ok(PostgresStore { shared, runtime: Arc::new(RuntimeGuard(Some(runtime))) })
    }

    /// Where the store connects (`postgres://user@host:port/db`, without the password).
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// Connections open now and connections idle in the pool.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.shared.pool.status();
        (status.size, status.available)
    }

    /// The schema version of the database (the `dps_schema` row).
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        let shared = Arc::clone(&self.shared);
        self.block_on(async move {
            let client = shared.client().await?;
            let row = client
                .query_one("SELECT version FROM dps_schema WHERE id = 0", &[])
                .await
                .map_err(|e| pg_error("reading the schema version", &e))?;
            Ok(row.get::<_, i32>(0))
        })
    }

    /// Closes the pool: new operations fail, idle connections are closed.
    pub fn close(&self) {
        self.shared.pool.close();
    }

    /// Runs `future` on the store's runtime and waits for it on the calling thread.
    fn block_on<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = self.runtime_handle()?.spawn(future);
        futures::executor::block_on(handle)
            .map_err(|e| backend(format!("a PostgreSQL store task failed: {e}")))?
    }

    fn runtime_handle(&self) -> Result<tokio::runtime::Handle, StoreError> {
        self.runtime
            .0
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| backend("the PostgreSQL store is shut down"))
    }

    /// Starts `op` on the store's runtime, bounded by the operation timeout.
    fn start(&self, op: StoreOp) -> Result<tokio::task::JoinHandle<OpResult>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let timeout = shared.options.operation_timeout;
        Ok(self.runtime_handle()?.spawn(async move {
            match tokio::time::timeout(timeout, shared.execute(op)).await {
                Ok(result) => result,
                Err(_) => Err(backend(format!(
                    "the PostgreSQL operation did not finish within {} ms (rolled back)",
                    timeout.as_millis()
                ))),
            }
        }))
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (size, available) = self.pool_status();
        f.debug_struct("PostgresStore")
            .field("target", &self.shared.target)
            .field("connections", &size)
            .field("idle", &available)
            .finish()
    }
}

impl BlockingStore for PostgresStore {
    /// Runs the operation on the store's runtime and blocks until it has committed (or failed).
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        let handle = self.start(op)?;
        futures::executor::block_on(handle)
            .unwrap_or_else(|e| Err(backend(format!("a PostgreSQL store task failed: {e}"))))
    }
}

impl AsyncStore for PostgresStore {
    /// The operation starts at once on the store's runtime (dropping the future does not cancel a write);
    /// the future resolves when it has committed (or failed).
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        let started = self.start(op);
        async move {
            match started {
                Ok(handle) => handle
                    .await
                    .unwrap_or_else(|e| Err(backend(format!("a PostgreSQL store task failed: {e}")))),
                Err(e) => Err(e),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Connections, migrations, the snapshot
// ------------------------------------------------------------------------------------------------

impl Shared {
    /// A pooled connection, or a `Backend` error saying why none could be had.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(&e))
    }

    fn pool_error(&self, e: &PoolError) -> StoreError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => backend(format!(
                "the PostgreSQL connection pool is exhausted: all {} connections to {} stayed busy for {} ms; retry later",
                self.options.max_connections,
                self.target,
                self.options.pool_wait.as_millis()
            )),
            PoolError::Timeout(_) => {
                backend(format!("PostgreSQL at {} did not answer in time (connecting or checking a connection)", self.target))
            }
            PoolError::Backend(e) if is_auth_error(e) => backend(format!(
                "PostgreSQL at {} refused the credentials: {} (check the password in the connection string)",
                self.target,
                describe(e)
            )),
            PoolError::Backend(e) => {
                backend(format!("PostgreSQL at {} is unavailable: {}", self.target, describe(e)))
            }
            PoolError::Closed => backend("the PostgreSQL store is closed"),
            other => backend(format!("PostgreSQL connection pool error: {other}")),
        }
    }

    /// Waits until a connection can be made, with exponential backoff, for at most `connect_retry`.
    async fn wait_for_server(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.pool.get().await {
                Ok(_) => return Ok(()),
                Err(PoolError::Backend(e)) if is_auth_error(&e) => {
                    return Err(self.pool_error(&PoolError::Backend(e)))
                }
                Err(e) => {
                    if started.elapsed() + delay > self.options.connect_retry {
                        let StoreError::Backend { message } = self.pool_error(&e) else {
                            return Err(self.pool_error(&e));
                        };
                        return Err(backend(format!(
                            "{message} (gave up after {attempts} attempts in {} s)",
                            started.elapsed().as_secs()
                        )));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Brings the schema up to [`POSTGRES_SCHEMA_VERSION`] in one transaction, under an advisory lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error("starting the migration", &e))?;
        let step = |what: &'static str| move |e: tokio_postgres::Error| pg_error(what, &e);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(step("taking the migration lock"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS dps_schema (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
             INSERT INTO dps_schema (id, version) VALUES (0, 0) ON CONFLICT (id) DO NOTHING;",
        )
        .await
        .map_err(step("creating the schema version table"))?;
        let version: i32 = tx
            .query_one("SELECT version FROM dps_schema WHERE id = 0", &[])
            .await
            .map_err(step("reading the schema version"))?
            .get(0);
        let current =
            usize::try_from(version).map_err(|_| backend(format!("bad schema version {version}")))?;
        if current > MIGRATIONS.len() {
            return Err(backend(format!(
                "the PostgreSQL database at {} has schema version {version}, newer than this build knows \
                 (up to {POSTGRES_SCHEMA_VERSION}): it was migrated by a newer dps-server; run that version \
                 (or newer) instead, this one refuses to start rather than misread the data",
                self.target
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_error(&format!("applying schema migration {}", i + 1), &e))?;
        }
        if current < MIGRATIONS.len() {
            tx.execute("UPDATE dps_schema SET version = $1 WHERE id = 0", &[&POSTGRES_SCHEMA_VERSION])
                .await
                .map_err(step("writing the schema version"))?;
        }
        tx.commit().await.map_err(step("committing the schema migration"))
    }

    fn current_snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the version, the groups and the certificates in one repeatable-read transaction and publishes
    /// them (unless a newer snapshot was published meanwhile).
    async fn reload_snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg_error("starting a snapshot read", &e))?;
        let version: i64 = tx
            .query_one("SELECT version FROM store_version WHERE id = 0", &[])
            .await
            .map_err(|e| pg_error("reading the store version", &e))?
            .get(0);
        let mut groups = Vec::new();
        for row in tx
            .query("SELECT key, json FROM enrollment_groups ORDER BY key", &[])
            .await
            .map_err(|e| pg_error("loading enrollment groups", &e))?
        {
            let key: &str = row.get(0);
            let mut group: EnrollmentGroup =
                from_json(&format!("reading enrollment group '{key}'"), row.get(1))?;
            secrets::open(self.sealer.as_deref(), &mut group)?;
            groups.push(group);
        }
        let certificates = load_certificates(&tx, None).await?;
        tx.commit().await.map_err(|e| pg_error("ending a snapshot read", &e))?;
        let fresh =
            Arc::new(Snapshot { version, groups: Arc::new(groups), certificates: Arc::new(certificates) });
        let mut slot = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        if slot.version <= version {
            *slot = Arc::clone(&fresh);
        }
        Ok(fresh)
    }

    fn sealer(&self) -> Option<&Sealer> {
        self.sealer.as_deref()
    }

    fn opened<T: HasSecrets>(&self, item: Option<T>) -> Result<Option<T>, StoreError> {
        item.map(|mut item| secrets::open(self.sealer(), &mut item).map(|()| item)).transpose()
    }

    fn sealed_json<T: HasSecrets + Clone + serde::Serialize>(
        &self,
        what: &str,
        item: &T,
    ) -> Result<String, StoreError> {
        match self.sealer() {
            None => to_json(what, item),
            Some(sealer) => {
                let mut row = item.clone();
                secrets::seal(Some(sealer), &mut row)?;
                to_json(what, &row)
            }
        }
    }
}

/// Every CA certificate, ordered by key (`key`: only that one).
async fn load_certificates<C: GenericClient>(
    client: &C,
    key: Option<&str>,
) -> Result<Vec<CaCertificate>, StoreError> {
    let rows = client
        .query(
            "SELECT key, name, etag, der, is_verified, verification_code, created, updated
             FROM ca_certificates WHERE ($1::text IS NULL OR key = $1) ORDER BY key",
            &[&key],
        )
        .await
        .map_err(|e| pg_error("loading CA certificates", &e))?;
    rows.iter().map(certificate_row).collect()
}

fn certificate_row(row: &Row) -> Result<CaCertificate, StoreError> {
    let key: &str = row.get(0);
    let etag: &str = row.get(2);
    let etag = Etag::parse(etag)
        .map_err(|e| backend(format!("CA certificate '{key}' has a bad stored ETag: {e}")))?;
    Ok(CaCertificate {
        name: row.get(1),
        der: row.get(3),
        is_verified: row.get(4),
        verification_code: row.get(5),
        created: Timestamp::from_unix_nanos(row.get(6)),
        updated: Timestamp::from_unix_nanos(row.get(7)),
        etag,
    })
}

// ------------------------------------------------------------------------------------------------
// Operations
// ------------------------------------------------------------------------------------------------

/// Whether a write changes the cached snapshot (and so bumps the store version).
fn touches_snapshot(op: &StoreOp) -> bool {
    match op {
        StoreOp::PutGroup { .. }
        | StoreOp::DeleteGroup { .. }
        | StoreOp::PutCertificate { .. }
        | StoreOp::DeleteCertificate { .. } => true,
        StoreOp::Audited { op, .. } => touches_snapshot(op),
        _ => false,
    }
}

fn is_write(op: &StoreOp) -> bool {
    matches!(
        op,
        StoreOp::CommitRegistration { .. }
            | StoreOp::DeleteRegistration { .. }
            | StoreOp::PutEnrollment { .. }
            | StoreOp::DeleteEnrollment { .. }
            | StoreOp::PutGroup { .. }
            | StoreOp::DeleteGroup { .. }
            | StoreOp::PutCertificate { .. }
            | StoreOp::DeleteCertificate { .. }
            | StoreOp::Audited { .. }
            | StoreOp::AppendAudit { .. }
    )
}

impl Shared {
    async fn execute(&self, op: StoreOp) -> OpResult {
        if let StoreOp::Audited { op: inner, .. } = &op {
            if !inner.is_service_write() {
                return Err(backend(format!("not an auditable service write: {inner:?}")));
            }
        }
        if is_write(&op) {
            self.write(op).await
        } else {
            self.read(op).await
        }
    }

    async fn read(&self, op: StoreOp) -> OpResult {
        let client = self.client().await?;
        match op {
            StoreOp::LoadDeviceContext { registration_id } => {
                let key = registration_id.key();
                let statement = client
                    .prepare_cached(
                        "SELECT (SELECT version FROM store_version WHERE id = 0),
                                (SELECT json FROM enrollments WHERE key = $1),
                                r.json, r.operations
                         FROM (SELECT 1) AS one LEFT JOIN registrations r ON r.key = $1",
                    )
                    .await
                    .map_err(|e| pg_error("preparing the device context read", &e))?;
                let row = client
                    .query_one(&statement, &[&key])
                    .await
                    .map_err(|e| pg_error("reading a device context", &e))?;
                let version: i64 = row.get(0);
                let individual: Option<IndividualEnrollment> = self.opened(
                    row.get::<_, Option<&str>>(1)
                        .map(|j| from_json("reading an enrollment", j))
                        .transpose()?,
                )?;
                let (registration, operations) = match row.get::<_, Option<&str>>(2) {
                    Some(json) => {
                        let record: RegistrationRecord = from_json("reading a registration record", json)?;
                        let operations: Vec<IssuedOperation> =
                            from_json("reading an operation history", row.get::<_, &str>(3))?;
                        (Some(record), operations)
                    }
                    None => (None, Vec::new()),
                };
                drop(client);
                let mut snapshot = self.current_snapshot();
                if snapshot.version != version {
                    snapshot = self.reload_snapshot().await?;
                }
                let groups = if individual.is_some() {
                    Arc::clone(&self.no_groups)
                } else {
                    Arc::clone(&snapshot.groups)
                };
                Ok(StoreResult::DeviceContext(DeviceContext {
                    individual,
                    groups,
                    certificates: Arc::clone(&snapshot.certificates),
                    registration,
                    operations,
                }))
            }
            StoreOp::GetRegistration { registration_id } => {
                let json =
                    get_text(&client, "SELECT json FROM registrations WHERE key = $1", registration_id.key())
                        .await?;
                let record: Option<RegistrationRecord> =
                    json.map(|j| from_json("reading a registration record", &j)).transpose()?;
                Ok(StoreResult::Registration(record.map(Box::new)))
            }
            StoreOp::QueryRegistrations { group_id, page } => {
                let limit = page_limit(page.limit);
                let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
                let rows = client
                    .query(
                        "SELECT key, json FROM registrations WHERE group_key = $1 AND key > $2 ORDER BY key LIMIT $3",
                        &[&group_id.key(), &page.after.as_deref().unwrap_or(""), &fetch],
                    )
                    .await
                    .map_err(|e| pg_error("querying registration records", &e))?;
                let mut items = Vec::new();
                let mut next = None;
                for row in rows.iter() {
                    if items.len() == limit {
                        next = items.last().map(|r: &RegistrationRecord| r.registration_id.key().to_owned());
                        break;
                    }
                    items.push(from_json("reading a registration record", row.get(1))?);
                }
                Ok(StoreResult::Registrations(Page { items, next }))
            }
            StoreOp::GetEnrollment { registration_id } => {
                let json =
                    get_text(&client, "SELECT json FROM enrollments WHERE key = $1", registration_id.key())
                        .await?;
                let enrollment: Option<IndividualEnrollment> =
                    json.map(|j| from_json("reading an enrollment", &j)).transpose()?;
                Ok(StoreResult::Enrollment(self.opened(enrollment)?.map(Box::new)))
            }
            StoreOp::QueryEnrollments { query, page } => {
                let mut page: Page<IndividualEnrollment> =
                    query_page(&client, "enrollments", &query, &page).await?;
                secrets::open_all(self.sealer(), &mut page.items)?;
                Ok(StoreResult::Enrollments(page))
            }
            StoreOp::GetGroup { group_id } => {
                let json =
                    get_text(&client, "SELECT json FROM enrollment_groups WHERE key = $1", group_id.key())
                        .await?;
                let group: Option<EnrollmentGroup> =
                    json.map(|j| from_json("reading an enrollment group", &j)).transpose()?;
                Ok(StoreResult::Group(self.opened(group)?.map(Box::new)))
            }
            StoreOp::QueryGroups { query, page } => {
                let mut page: Page<EnrollmentGroup> =
                    query_page(&client, "enrollment_groups", &query, &page).await?;
                secrets::open_all(self.sealer(), &mut page.items)?;
                Ok(StoreResult::Groups(page))
            }
            StoreOp::GetCertificate { name } => {
                let key = name.to_ascii_lowercase();
                let found = load_certificates(&client, Some(&key)).await?;
                Ok(StoreResult::Certificate(found.into_iter().next().map(Box::new)))
            }
            StoreOp::ListCertificates => {
                Ok(StoreResult::Certificates(load_certificates(&client, None).await?))
            }
            StoreOp::QueryAudit { filter, page } => query_audit(&client, &filter, &page).await,
            other => Err(backend(format!("the PostgreSQL store does not support this operation: {other:?}"))),
        }
    }

    /// One write in one transaction: committed when the write succeeded, rolled back when its precondition
    /// failed (nothing written, no audit record) or the database failed.
    async fn write(&self, op: StoreOp) -> OpResult {
        let bump = touches_snapshot(&op);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg_error("starting a write transaction", &e))?;
        let result = self.apply(&tx, op).await?;
        if result.is_err() {
            tx.rollback().await.map_err(|e| pg_error("rolling back a refused write", &e))?;
            return result;
        }
        if bump {
            tx.execute("UPDATE store_version SET version = version + 1 WHERE id = 0", &[])
                .await
                .map_err(|e| pg_error("bumping the store version", &e))?;
        }
        tx.commit().await.map_err(|e| pg_error("committing a write transaction", &e))?;
        result
    }

    /// Applies one write inside `tx`. The outer error is a database failure (the transaction is dropped,
    /// so rolled back); the inner result is the write's answer.
    fn apply<'a>(
        &'a self,
        tx: &'a deadpool_postgres::Transaction<'a>,
        op: StoreOp,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<OpResult, StoreError>> + Send + 'a>> {
        Box::pin(async move {
            let writing = |e: tokio_postgres::Error| pg_error("writing", &e);
            match op {
                StoreOp::Audited { op, record } => {
                    let before = stored_etag(tx, &op).await?;
                    match self.apply(tx, *op).await? {
                        Ok(result) => {
                            let mut record = *record;
                            record.etag_before = before;
                            record.etag_after = result.written_etag();
                            record.sequence = insert_audit(tx, &record).await?;
                            Ok(Ok(StoreResult::Audited {
                                result: Box::new(result),
                                record: Box::new(record),
                            }))
                        }
                        Err(e) => Ok(Err(e)),
                    }
                }
                StoreOp::AppendAudit { records } => {
                    for record in &records {
                        insert_audit(tx, record).await?;
                    }
                    Ok(Ok(StoreResult::Done))
                }
                StoreOp::CommitRegistration { record, expected } => {
                    let key = record.registration_id.key().to_owned();
                    let group = record.enrollment.group_id().map(|g| g.key().to_owned());
                    let json = match to_json("serializing a registration record", &record) {
                        Ok(json) => json,
                        Err(e) => return Ok(Err(e)),
                    };
                    let current = tx
                        .query_opt(
                            "SELECT etag, operations FROM registrations WHERE key = $1 FOR UPDATE",
                            &[&key],
                        )
                        .await
                        .map_err(writing)?;
                    let mut operations: Vec<IssuedOperation> = match (&current, &expected) {
                        (None, None) => Vec::new(),
                        (Some(row), Some(expected)) if row.get::<_, &str>(0) == expected.as_str() => {
                            // An unreadable history starts over rather than blocking the device.
                            serde_json::from_str(row.get::<_, &str>(1)).unwrap_or_default()
                        }
                        _ => return Ok(Err(StoreError::Conflict)),
                    };
                    push_operation(&mut operations, record.issued_operation());
                    let history = match to_json("serializing an operation history", &operations) {
                        Ok(h) => h,
                        Err(e) => return Ok(Err(e)),
                    };
                    let etag = record.etag.as_str();
                    let written = if current.is_none() {
                        tx.execute(
                            "INSERT INTO registrations (key, group_key, etag, json, operations)
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
                            &[&key, &group, &etag, &json, &history],
                        )
                        .await
                        .map_err(writing)?
                    } else {
                        tx.execute(
                            "UPDATE registrations SET group_key = $2, etag = $3, json = $4, operations = $5
                             WHERE key = $1",
                            &[&key, &group, &etag, &json, &history],
                        )
                        .await
                        .map_err(writing)?
                    };
                    // Another transaction inserted the first record of this device meanwhile.
                    if written == 0 {
                        return Ok(Err(StoreError::Conflict));
                    }
                    Ok(Ok(StoreResult::Done))
                }
                StoreOp::DeleteRegistration { registration_id, if_match } => {
                    let key = registration_id.key();
                    let current = locked_etag(tx, "registrations", key).await?;
                    match (current, if_match) {
                        (None, _) => return Ok(Err(StoreError::NotFound)),
                        (Some(current), Some(IfMatch::Etag(e))) if e.as_str() != current => {
                            return Ok(Err(StoreError::PreconditionFailed))
                        }
                        _ => {}
                    }
                    tx.execute("DELETE FROM registrations WHERE key = $1", &[&key]).await.map_err(writing)?;
                    Ok(Ok(StoreResult::Done))
                }
                StoreOp::PutEnrollment { enrollment, condition } => {
                    let key = enrollment_key(&enrollment);
                    let existing = locked_item(tx, "enrollments", &key).await?;
                    let created = existing.is_none();
                    let stored = match prepare_put(&condition, existing, *enrollment, |e, created| {
                        e.created_date_time_utc = Some(created)
                    }) {
                        Ok(stored) => stored,
                        Err(e) => return Ok(Err(e)),
                    };
                    let json = match self.sealed_json("serializing an enrollment", &stored) {
                        Ok(json) => json,
                        Err(e) => return Ok(Err(e)),
                    };
                    let etag = stored.etag.as_deref().unwrap_or("");
                    let sql = if created {
                        "INSERT INTO enrollments (key, etag, json) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING"
                    } else {
                        "UPDATE enrollments SET etag = $2, json = $3 WHERE key = $1"
                    };
                    if tx.execute(sql, &[&key, &etag, &json]).await.map_err(writing)? == 0 {
                        // Created by another transaction since this one looked.
                        return Ok(Err(created_meanwhile(&condition)));
                    }
                    Ok(Ok(StoreResult::Enrollment(Some(Box::new(stored)))))
                }
                StoreOp::DeleteEnrollment { registration_id, if_match } => {
                    let key = registration_id.key();
                    let current = locked_etag(tx, "enrollments", key).await?;
                    if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(non_empty)) {
                        return Ok(Err(e));
                    }
                    tx.execute("DELETE FROM enrollments WHERE key = $1", &[&key]).await.map_err(writing)?;
                    Ok(Ok(StoreResult::Done))
                }
                StoreOp::PutGroup { group, condition, max_symmetric_key_groups } => {
                    let key = group_key(&group);
                    if max_symmetric_key_groups.is_some() {
                        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&GROUP_LIMIT_LOCK])
                            .await
                            .map_err(writing)?;
                    }
                    let existing = locked_item(tx, "enrollment_groups", &key).await?;
                    if max_symmetric_key_groups.is_some() {
                        let count: i64 = tx
                            .query_one("SELECT COUNT(*) FROM enrollment_groups WHERE symmetric_key", &[])
                            .await
                            .map_err(writing)?
                            .get(0);
                        let was_symmetric = tx
                            .query_opt("SELECT symmetric_key FROM enrollment_groups WHERE key = $1", &[&key])
                            .await
                            .map_err(writing)?
                            .is_some_and(|r| r.get::<_, bool>(0));
                        let count = usize::try_from(count).unwrap_or(usize::MAX);
                        if let Err(e) =
                            check_group_limit(&group, was_symmetric, count, max_symmetric_key_groups)
                        {
                            return Ok(Err(e));
                        }
                    }
                    let created = existing.is_none();
                    let stored = match prepare_put(&condition, existing, *group, |g, created| {
                        g.created_date_time_utc = Some(created)
                    }) {
                        Ok(stored) => stored,
                        Err(e) => return Ok(Err(e)),
                    };
                    let json = match self.sealed_json("serializing an enrollment group", &stored) {
                        Ok(json) => json,
                        Err(e) => return Ok(Err(e)),
                    };
                    let symmetric = is_symmetric_key_group(&stored);
                    let etag = stored.etag.as_deref().unwrap_or("");
                    let sql = if created {
                        "INSERT INTO enrollment_groups (key, etag, symmetric_key, json) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (key) DO NOTHING"
                    } else {
                        "UPDATE enrollment_groups SET etag = $2, symmetric_key = $3, json = $4 WHERE key = $1"
                    };
                    if tx.execute(sql, &[&key, &etag, &symmetric, &json]).await.map_err(writing)? == 0 {
                        return Ok(Err(created_meanwhile(&condition)));
                    }
                    Ok(Ok(StoreResult::Group(Some(Box::new(stored)))))
                }
                StoreOp::DeleteGroup { group_id, if_match } => {
                    let key = group_id.key();
                    let current = locked_etag(tx, "enrollment_groups", key).await?;
                    if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(non_empty)) {
                        return Ok(Err(e));
                    }
                    tx.execute("DELETE FROM enrollment_groups WHERE key = $1", &[&key])
                        .await
                        .map_err(writing)?;
                    Ok(Ok(StoreResult::Done))
                }
                StoreOp::PutCertificate { certificate, condition, max_certificates } => {
                    let key = certificate.key();
                    if max_certificates.is_some() {
                        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CERTIFICATE_LIMIT_LOCK])
                            .await
                            .map_err(writing)?;
                    }
                    let current = locked_etag(tx, "ca_certificates", &key).await?;
                    if let Err(e) = check_write(&condition, current.as_deref().map(Some)) {
                        return Ok(Err(e));
                    }
                    if max_certificates.is_some() {
                        let count: i64 = tx
                            .query_one("SELECT COUNT(*) FROM ca_certificates", &[])
                            .await
                            .map_err(writing)?
                            .get(0);
                        let count = usize::try_from(count).unwrap_or(usize::MAX);
                        if let Err(e) = check_certificate_limit(current.is_some(), count, max_certificates) {
                            return Ok(Err(e));
                        }
                    }
                    let c = &certificate;
                    let written = tx
                        .execute(
                            "INSERT INTO ca_certificates
                                (key, name, etag, der, is_verified, verification_code, created, updated)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                             ON CONFLICT (key) DO UPDATE SET name = excluded.name, etag = excluded.etag,
                                der = excluded.der, is_verified = excluded.is_verified,
                                verification_code = excluded.verification_code, created = excluded.created,
                                updated = excluded.updated
                             WHERE $9",
                            &[
                                &key,
                                &c.name,
                                &c.etag.as_str(),
                                &c.der,
                                &c.is_verified,
                                &c.verification_code,
                                &c.created.unix_nanos(),
                                &c.updated.unix_nanos(),
                                &current.is_some(),
                            ],
                        )
                        .await
                        .map_err(writing)?;
                    if written == 0 {
                        return Ok(Err(created_meanwhile(&condition)));
                    }
                    Ok(Ok(StoreResult::Certificate(Some(certificate))))
                }
                StoreOp::DeleteCertificate { name, if_match } => {
                    let key = name.to_ascii_lowercase();
                    let current = locked_etag(tx, "ca_certificates", &key).await?;
                    if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(Some)) {
                        return Ok(Err(e));
                    }
                    tx.execute("DELETE FROM ca_certificates WHERE key = $1", &[&key])
                        .await
                        .map_err(writing)?;
                    Ok(Ok(StoreResult::Done))
                }
                other => Err(backend(format!("not a write: {other:?}"))),
            }
        })
    }
}

/// The answer to a create that found its row created by a concurrent transaction after it looked: the
/// same as if it had looked later.
fn created_meanwhile(condition: &WriteCondition) -> StoreError {
    match condition {
        WriteCondition::CreateOnly => StoreError::AlreadyExists,
        WriteCondition::IfMatch(_) => StoreError::NotFound,
        // Retried by the caller: PostgreSQL reports the race like any other conflict.
        WriteCondition::Upsert => backend("a concurrent write created the same item; retry"),
    }
}

/// The ETag of a row, locked for the rest of the transaction (`None`: no such row).
async fn locked_etag(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    key: &str,
) -> Result<Option<String>, StoreError> {
    let sql = format!("SELECT etag FROM {table} WHERE key = $1 FOR UPDATE");
    let row = tx.query_opt(&sql, &[&key]).await.map_err(|e| pg_error(&format!("reading {table}"), &e))?;
    Ok(row.map(|r| r.get(0)))
}

/// The `(etag, json)` of an enrollment or group row, locked for the rest of the transaction.
async fn locked_item(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    key: &str,
) -> Result<Option<(String, String)>, StoreError> {
    let sql = format!("SELECT etag, json FROM {table} WHERE key = $1 FOR UPDATE");
    let row = tx.query_opt(&sql, &[&key]).await.map_err(|e| pg_error(&format!("reading {table}"), &e))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The stored ETag of the item a service write changes, locked (`None` when absent or stored without one).
async fn stored_etag(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &StoreOp,
) -> Result<Option<String>, StoreError> {
    let (table, key) = match op {
        StoreOp::PutEnrollment { enrollment, .. } => ("enrollments", enrollment_key(enrollment)),
        StoreOp::DeleteEnrollment { registration_id, .. } => {
            ("enrollments", registration_id.key().to_owned())
        }
        StoreOp::PutGroup { group, .. } => ("enrollment_groups", group_key(group)),
        StoreOp::DeleteGroup { group_id, .. } => ("enrollment_groups", group_id.key().to_owned()),
        StoreOp::DeleteRegistration { registration_id, .. } => {
            ("registrations", registration_id.key().to_owned())
        }
        StoreOp::PutCertificate { certificate, .. } => ("ca_certificates", certificate.key()),
        StoreOp::DeleteCertificate { name, .. } => ("ca_certificates", name.to_ascii_lowercase()),
        _ => return Ok(None),
    };
    Ok(locked_etag(tx, table, &key).await?.filter(|e| !e.is_empty()))
}

/// Appends one audit record inside the open transaction and returns its sequence number.
async fn insert_audit(
    tx: &deadpool_postgres::Transaction<'_>,
    record: &AuditRecord,
) -> Result<u64, StoreError> {
    let status = i32::from(record.status);
    let code = record.error_code.map(i64::from);
    let row = tx
        .query_one(
            "INSERT INTO audit_log (time, principal, principal_key, transport, operation, target, target_key,
                etag_before, etag_after, status, error_code, tracking_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING sequence",
            &[
                &record.time.unix_nanos(),
                &record.principal,
                &record.principal.to_ascii_lowercase(),
                &record.transport.as_str(),
                &record.operation.as_str(),
                &record.target,
                &record.target.to_ascii_lowercase(),
                &record.etag_before,
                &record.etag_after,
                &status,
                &code,
                &record.tracking_id,
            ],
        )
        .await
        .map_err(|e| pg_error("appending to the audit log", &e))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Reads one text column by key.
async fn get_text<C: GenericClient>(client: &C, sql: &str, key: &str) -> Result<Option<String>, StoreError> {
    let row = client.query_opt(sql, &[&key]).await.map_err(|e| pg_error("reading a row", &e))?;
    Ok(row.map(|r| r.get(0)))
}

/// One page of enrollments or groups (`table`) after `page.after`, filtered by `query`: rows are read in
/// key order, in chunks, until the page is full and one more match shows that more exist.
async fn query_page<C: GenericClient, T: DeserializeOwned>(
    client: &C,
    table: &str,
    query: &Query,
    page: &PageRequest,
) -> Result<Page<T>, StoreError> {
    let querying = format!("querying {table}");
    let limit = page_limit(page.limit);
    let filtered = !query.conditions.is_empty();
    let chunk = if filtered { SCAN_CHUNK } else { i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1 };
    let sql = format!("SELECT key, json FROM {table} WHERE key > $1 ORDER BY key LIMIT $2");
    let mut after = page.after.clone().unwrap_or_default();
    let mut items = Vec::new();
    let mut last_key: Option<String> = None;
    loop {
        let rows = client.query(&sql, &[&after, &chunk]).await.map_err(|e| pg_error(&querying, &e))?;
        let exhausted = i64::try_from(rows.len()).unwrap_or(i64::MAX) < chunk;
        for row in &rows {
            let key: String = row.get(0);
            let json: &str = row.get(1);
            let item: T = if filtered {
                let value: serde_json::Value = from_json(&querying, json)?;
                if !query.matches(&value) {
                    after = key;
                    continue;
                }
                if items.len() == limit {
                    return Ok(Page { items, next: last_key });
                }
                serde_json::from_value(value).map_err(|e| json_error(&querying, &e))?
            } else {
                if items.len() == limit {
                    return Ok(Page { items, next: last_key });
                }
                from_json(&querying, json)?
            };
            items.push(item);
            last_key = Some(key.clone());
            after = key;
        }
        if exhausted || !filtered {
            return Ok(Page { items, next: None });
        }
    }
}

/// Audit records passing `filter`, newest first, one page.
async fn query_audit<C: GenericClient>(client: &C, filter: &AuditFilter, page: &PageRequest) -> OpResult {
    let querying = "querying the audit log";
    let before = audit_page_before(page)?.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let limit = page_limit(page.limit);
    let since = filter.since.map_or(i64::MIN, |t| t.unix_nanos());
    let until = filter.until.map_or(i64::MAX, |t| t.unix_nanos());
    let principal = filter.principal.as_deref().map(str::to_ascii_lowercase);
    let target = filter.target.as_deref().map(str::to_ascii_lowercase);
    let operation = filter.operation.map(AuditOperation::as_str);
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
    let params: [&(dyn ToSql + Sync); 7] = [&before, &since, &until, &principal, &target, &operation, &fetch];
    let rows = client
        .query(
            "SELECT sequence, time, principal, transport, operation, target, etag_before, etag_after, status,
                error_code, tracking_id
             FROM audit_log
             WHERE sequence < $1 AND time >= $2 AND time < $3
                AND ($4::text IS NULL OR principal_key = $4) AND ($5::text IS NULL OR target_key = $5)
                AND ($6::text IS NULL OR operation = $6)
             ORDER BY sequence DESC LIMIT $7",
            &params,
        )
        .await
        .map_err(|e| pg_error(querying, &e))?;
    let mut items = Vec::new();
    let mut more = false;
    for row in &rows {
        if items.len() == limit {
            more = true;
            break;
        }
        let sequence: i64 = row.get(0);
        let bad = |what: &str| backend(format!("the audit row {sequence} has an unknown {what}"));
        let transport: &str = row.get(3);
        let operation: &str = row.get(4);
        items.push(AuditRecord {
            sequence: u64::try_from(sequence).map_err(|_| bad("sequence"))?,
            time: Timestamp::from_unix_nanos(row.get(1)),
            principal: row.get(2),
            transport: AuditTransport::parse(transport).ok_or_else(|| bad("transport"))?,
            operation: AuditOperation::parse(operation).ok_or_else(|| bad("operation"))?,
            target: row.get(5),
            etag_before: row.get(6),
            etag_after: row.get(7),
            status: u16::try_from(row.get::<_, i32>(8)).map_err(|_| bad("status"))?,
            error_code: row
                .get::<_, Option<i64>>(9)
                .map(|c| u32::try_from(c).map_err(|_| bad("error code")))
                .transpose()?,
            tracking_id: row.get(10),
        });
    }
    let next = if more { items.last().map(|r| r.sequence.to_string()) } else { None };
    Ok(StoreResult::Audit(Page { items, next }))
}
