//! The SQLite backend: durable (WAL, `synchronous=FULL`), with group commit. See [`SqliteStore`].

use crate::common::{
    backend, check_certificate_limit, check_delete, check_group_limit, check_write, enrollment_key,
    group_key, is_symmetric_key_group, json_error, non_empty, page_limit, prepare_put,
};
use crate::secrets::{self, HasSecrets};
use dps_core::audit::{AuditFilter, AuditOperation, AuditRecord, AuditTransport};
use dps_core::proto::certificate::CaCertificate;
use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::proto::query::Query;
use dps_core::proto::{EnrollmentGroupId, Etag, IfMatch, RegistrationId, Timestamp};
use dps_core::store::{
    audit_page_before, push_operation, AsyncStore, BlockingStore, DeviceContext, IssuedOperation, Page,
    PageRequest, RegistrationRecord, StoreError, StoreOp, StoreResult, WriteCondition,
};
use dps_seal::Sealer;
use futures::channel::oneshot;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

type OpResult = Result<StoreResult, StoreError>;

/// How long a connection waits for a lock held by another connection (e.g. another process, or a
/// checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, applied in order; after step `i` the database's `user_version` is `i + 1`.
/// Never edit a released step: append a new one.
const MIGRATIONS: &[&str] = &[
    // Version 1: the three tables. Items are stored as their serde JSON; the key is the lowercase ID.
    "CREATE TABLE enrollments (
        key TEXT PRIMARY KEY NOT NULL,
        etag TEXT NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE enrollment_groups (
        key TEXT PRIMARY KEY NOT NULL,
        etag TEXT NOT NULL,
        symmetric_key INTEGER NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE registrations (
        key TEXT PRIMARY KEY NOT NULL,
        group_key TEXT,
        etag TEXT NOT NULL,
        json TEXT NOT NULL
    );
    CREATE INDEX registrations_by_group ON registrations (group_key, key);",
    // Version 2: the store version, one row bumped by every write transaction that changes anything, so a
    // store that caches what it read can tell whether another connection (another process, another
    // `SqliteStore` on the same file) wrote since.
    "CREATE TABLE store_version (
        id INTEGER PRIMARY KEY NOT NULL CHECK (id = 0),
        version INTEGER NOT NULL
    );
    INSERT INTO store_version (id, version) VALUES (0, 0);",
    // Version 3: the CA certificates of the instance (spec §5.7), keyed by lowercase name; times are Unix
    // nanoseconds.
    "CREATE TABLE ca_certificates (
        key TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        etag TEXT NOT NULL,
        der BLOB NOT NULL,
        is_verified INTEGER NOT NULL,
        verification_code TEXT,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL
    );",
    // Version 4: the audit log (`dps_core::audit`), one row per audited service write or refusal, appended
    // in the transaction of the write it describes. `sequence` is never reused (AUTOINCREMENT); times are
    // Unix nanoseconds; the `_key` columns are lowercase for case-insensitive filters. No column holds a
    // secret: identifiers, ETags, outcome and tracking ID only.
    "CREATE TABLE audit_log (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        principal TEXT NOT NULL,
        principal_key TEXT NOT NULL,
        transport TEXT NOT NULL,
        operation TEXT NOT NULL,
        target TEXT NOT NULL,
        target_key TEXT NOT NULL,
        etag_before TEXT,
        etag_after TEXT,
        status INTEGER NOT NULL,
        error_code INTEGER,
        tracking_id TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_target ON audit_log (target_key, sequence);
    CREATE INDEX audit_log_by_time ON audit_log (time);",
];

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Options of [`SqliteStore::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The most write requests applied in one transaction (default 256; 0 is treated as 1).
    pub max_batch: usize,
    /// Number of read-only connections serving reads (default 2; 0 is treated as 1).
    pub read_connections: usize,
    /// Under load (the previous batch held more than one write), how long the writer keeps collecting
    /// writes after the first one before committing (default 2 ms). More writes per fsync means less CPU
    /// per write (a transaction and its fsync cost the writer thread on the order of 100-300 us, whatever
    /// its size); an idle store commits a lone write at once, with no added delay.
    pub batch_window: std::time::Duration,
    /// Memory for the registration record cache (default 32 MiB, counted as each record's JSON size plus
    /// 256 bytes; 0 turns the cache off). The writer puts every registration record it commits there, so
    /// the reads that follow (a device's status polls) are answered from memory.
    pub registration_cache_bytes: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            max_batch: 256,
            read_connections: 2,
            batch_window: std::time::Duration::from_millis(2),
            registration_cache_bytes: 32 << 20,
        }
    }
}

/// Write-path counters of a [`SqliteStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Committed write transactions (batches).
    pub batches: u64,
    /// Write requests applied by those transactions (including those whose precondition failed).
    pub rows: u64,
}

/// A durable store in one SQLite database file.
///
/// # Threads and connections
///
/// - One **writer thread** owns the only read-write connection. Every write (registration commits,
///   enrollment and group puts, deletes) is sent to it over a channel. It blocks for the first request,
///   drains whatever else is queued (up to [`SqliteOptions::max_batch`]) and applies the whole batch in one
///   `BEGIN IMMEDIATE ... COMMIT` transaction, evaluating each request's precondition inside the
///   transaction, in arrival order. A request whose precondition fails gets its error and writes nothing; the
///   rest of the batch goes on. Requesters are answered only after `COMMIT` has returned (the WAL is
///   fsynced); if `COMMIT` fails, every request of the batch gets a `Backend` error. While one batch is
///   being fsynced, the next one queues up, so under load one fsync covers many writes.
/// - A small pool of **read-only connections** serves reads on the caller's thread, with cached prepared
///   statements. WAL readers never block the writer and see every committed batch.
/// - The symmetric-key enrollment groups are kept parsed in memory (an `Arc<Vec<_>>` loaded at open and
///   replaced by the writer after every committed batch that touched groups, before the requesters are
///   answered), so [`StoreOp::LoadDeviceContext`] never parses groups.
/// - Two more in-memory views spare the read connections most of the work of
///   [`StoreOp::LoadDeviceContext`] and [`StoreOp::GetRegistration`], both kept by the writer the same way
///   (updated after `COMMIT`, before the requesters are answered; dropped or reloaded when a batch fails):
///   - the set of individual enrollment IDs, as 64-bit keyed hashes (loaded at open): a registration ID
///     that is not in it has no individual enrollment, so only a hit is looked up;
///   - a bounded cache of registration records ([`SqliteOptions::registration_cache_bytes`]), filled only
///     with what the writer commits, so it never holds anything older than the database. A device's poll
///     after its register is answered without touching SQLite; a miss falls back to a read connection.
///
/// # Other writers of the same file
///
/// Another process, or a second `SqliteStore` opened on the same file, may write to the database at any
/// time (SQLite serializes the writers; each waits up to a few seconds for the lock). Every write
/// transaction that changes anything also bumps the `store_version` row (schema version 2). The views above
/// are trusted only while they reflect the current version: every [`StoreOp::LoadDeviceContext`] and
/// [`StoreOp::GetRegistration`] first reads that row (one single-row read on its read connection) and,
/// when another connection wrote since, reads the database instead and asks the writer to reload its views.
/// The writer checks the version again under its write lock at the start of every batch, and reloads the
/// views inside that transaction before applying anything, so a batch never publishes views built on a
/// stale copy. Preconditions (ETags, create-only) are always evaluated against the database rows, never
/// against a view. A read therefore reflects every write committed, by any process, before it started.
/// Within one process, clone the handle rather than opening the file twice: a second store works, but
/// each one's writes make the other's views stale until its next write.
///
/// # Operation histories
///
/// A registration row's JSON is the record's JSON plus an `operations` member (its
/// [`DeviceContext::operations`]), which the writer reads and extends inside the commit's write
/// transaction. Rows written before histories were kept have no such member and read with an empty
/// history, so this needs no schema change; readers of the plain record (the service API) ignore the
/// member.
///
/// Cheap to clone: clones share the connections and the writer thread. Implements both
/// [`BlockingStore`] (a write blocks until its batch is durable) and [`AsyncStore`] (the future resolves
/// when its batch is durable; the request is queued when `execute` is called, so dropping the future does
/// not cancel the write). Reads run on the caller's thread in both cases.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// `None` once closed.
    sender: RwLock<Option<mpsc::Sender<WriteRequest>>>,
    writer: Mutex<Option<JoinHandle<Result<(), StoreError>>>>,
    closed: AtomicBool,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    state: Arc<WriterState>,
    no_groups: Arc<Vec<EnrollmentGroup>>,
    /// Opens the sealed secrets of what the read connections read (`None`: no encryption at rest).
    sealer: Option<Arc<Sealer>>,
}

/// What the writer thread shares with the handles.
struct WriterState {
    group_snapshot: RwLock<Arc<Vec<EnrollmentGroup>>>,
    /// Every CA certificate, ordered by key (replaced like the group snapshot).
    certificate_snapshot: RwLock<Arc<Vec<CaCertificate>>>,
    /// Which registration IDs may have an individual enrollment.
    enrollment_ids: cache::KeySet,
    /// Which registration IDs may have a registration record: a device registering for the first time is
    /// answered "no record" without a database read (about 32 bytes per record).
    registration_ids: cache::KeySet,
    /// Registration records as last committed.
    registrations: cache::RecordCache,
    /// The store version (the `store_version` row) the three views above reflect; `-1` while they reflect
    /// none. Set by the writer only after the views are up to date with it.
    version: AtomicI64,
    /// The version the writer is committing right now (set before `COMMIT`): a reader that finds it in the
    /// database knows the views are about to catch up and needs no resync.
    committing: AtomicI64,
    /// A [`WriteOp::Resync`] is queued (so readers queue at most one).
    resync_queued: AtomicBool,
    batches: AtomicU64,
    rows: AtomicU64,
}

impl WriterState {
    fn publish_groups(&self, groups: &BTreeMap<String, EnrollmentGroup>) {
        let groups = Arc::new(groups.values().cloned().collect::<Vec<_>>());
        *self.group_snapshot.write().unwrap_or_else(|e| e.into_inner()) = groups;
    }

    fn groups(&self) -> Arc<Vec<EnrollmentGroup>> {
        Arc::clone(&self.group_snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn publish_certificates(&self, certificates: &BTreeMap<String, CaCertificate>) {
        let certificates = Arc::new(certificates.values().cloned().collect::<Vec<_>>());
        *self.certificate_snapshot.write().unwrap_or_else(|e| e.into_inner()) = certificates;
    }

    fn certificates(&self) -> Arc<Vec<CaCertificate>> {
        Arc::clone(&self.certificate_snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A write, with its JSON prepared on the caller's thread where possible.
enum WriteOp {
    CommitRegistration {
        key: String,
        group_key: Option<String>,
        etag: String,
        json: String,
        expected: Option<Etag>,
        /// The record's operation, for the operation history.
        operation: IssuedOperation,
        /// For the record cache once committed.
        record: Option<Box<RegistrationRecord>>,
    },
    DeleteRegistration {
        key: String,
        if_match: Option<IfMatch>,
    },
    PutEnrollment {
        enrollment: Box<IndividualEnrollment>,
        condition: WriteCondition,
    },
    DeleteEnrollment {
        key: String,
        if_match: Option<IfMatch>,
    },
    PutGroup {
        group: Box<EnrollmentGroup>,
        condition: WriteCondition,
        limit: Option<usize>,
    },
    DeleteGroup {
        key: String,
        if_match: Option<IfMatch>,
    },
    PutCertificate {
        certificate: Box<CaCertificate>,
        condition: WriteCondition,
        limit: Option<usize>,
    },
    DeleteCertificate {
        key: String,
        if_match: Option<IfMatch>,
    },
    /// Writes nothing: asks the writer to bring the in-memory views up to date with a database that another
    /// connection wrote to (queued by a reader that found the views stale).
    Resync,
    /// A service write and its audit record, in the same transaction.
    Audited {
        op: Box<WriteOp>,
        record: Box<AuditRecord>,
    },
    /// Audit records alone (refusals).
    AppendAudit(Vec<AuditRecord>),
}

impl WriteOp {
    /// The write itself (an audited write's inner write).
    fn write(&self) -> &WriteOp {
        match self {
            WriteOp::Audited { op, .. } => op,
            other => other,
        }
    }
}

enum ReadOp {
    LoadDeviceContext(RegistrationId),
    GetRegistration(RegistrationId),
    QueryRegistrations(EnrollmentGroupId, PageRequest),
    GetEnrollment(RegistrationId),
    QueryEnrollments(Query, PageRequest),
    GetGroup(EnrollmentGroupId),
    QueryGroups(Query, PageRequest),
    GetCertificate(String),
    ListCertificates,
    QueryAudit(AuditFilter, PageRequest),
}

enum Prepared {
    Read(ReadOp),
    Write(WriteOp),
}

enum Reply {
    Async(oneshot::Sender<OpResult>),
    Blocking(mpsc::SyncSender<OpResult>),
}

impl Reply {
    fn send(self, result: OpResult) {
        // The requester may have gone away (e.g. a dropped future); the write stands regardless.
        match self {
            Reply::Async(s) => {
                let _ = s.send(result);
            }
            Reply::Blocking(s) => {
                let _ = s.send(result);
            }
        }
    }
}

struct WriteRequest {
    op: WriteOp,
    reply: Reply,
}

fn sql_error(what: &str, e: &rusqlite::Error) -> StoreError {
    backend(format!("SQLite error while {what}: {e}"))
}

fn closed_error() -> StoreError {
    backend("the SQLite store is closed")
}

fn writer_gone() -> StoreError {
    backend("the SQLite writer thread stopped before answering")
}

fn to_json<T: serde::Serialize>(what: &str, item: &T) -> Result<String, StoreError> {
    serde_json::to_string(item).map_err(|e| json_error(what, &e))
}

fn from_json<T: DeserializeOwned>(what: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| json_error(what, &e))
}

/// Sets the pragmas of the write connection.
fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_error("setting the busy timeout", &e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| sql_error("enabling WAL mode", &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(backend(format!(
            "SQLite refused WAL mode (journal_mode is '{mode}'); the store needs a database file on a local file system"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| sql_error("setting synchronous=FULL", &e))?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(|e| sql_error("enabling foreign keys", &e))?;
    configure_cache(conn)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// Gives each connection a 16 MiB page cache (memory-mapping the file was tried and cost more in remaps
/// of the growing file than it saved in reads).
fn configure_cache(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "cache_size", -16_384i64).map_err(|e| sql_error("setting cache_size", &e))?;
    Ok(())
}

/// Brings the schema up to [`SCHEMA_VERSION`], in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error("starting the migration transaction", &e))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| sql_error("reading user_version", &e))?;
    let current = usize::try_from(version)
        .ok()
        .filter(|v| *v <= MIGRATIONS.len())
        .ok_or_else(|| {
            backend(format!(
                "the database schema version {version} is not supported by this build (it knows versions up to {SCHEMA_VERSION})"
            ))
        })?;
    if current == MIGRATIONS.len() {
        return tx.commit().map_err(|e| sql_error("ending the migration transaction", &e));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(step).map_err(|e| sql_error(&format!("applying schema migration {}", i + 1), &e))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(|e| sql_error("writing user_version", &e))?;
    tx.commit().map_err(|e| sql_error("committing the schema migration", &e))
}

/// The current store version (the `store_version` row).
fn read_version(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT version FROM store_version WHERE id = 0")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(|e| sql_error("reading the store version", &e))
}

/// Loads the keys of every individual enrollment into `ids`.
fn load_enrollment_ids(conn: &Connection, ids: &cache::KeySet) -> Result<(), StoreError> {
    load_keys(conn, "SELECT key FROM enrollments", "enrollment IDs", ids)
}

/// Loads the keys of every registration record into `ids`.
fn load_registration_ids(conn: &Connection, ids: &cache::KeySet) -> Result<(), StoreError> {
    load_keys(conn, "SELECT key FROM registrations", "registration IDs", ids)
}

fn load_keys(conn: &Connection, sql: &str, what: &str, ids: &cache::KeySet) -> Result<(), StoreError> {
    let mut stmt =
        conn.prepare_cached(sql).map_err(|e| sql_error(&format!("preparing the {what} query"), &e))?;
    let mut rows = stmt.query([]).map_err(|e| sql_error(&format!("loading the {what}"), &e))?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next().map_err(|e| sql_error(&format!("loading the {what}"), &e))? {
        keys.push(row.get::<_, String>(0).map_err(|e| sql_error(&format!("loading the {what}"), &e))?);
    }
    ids.load(keys.iter().map(String::as_str));
    Ok(())
}

/// Every CA certificate, by key.
fn load_certificates(conn: &Connection) -> Result<BTreeMap<String, CaCertificate>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT key, name, etag, der, is_verified, verification_code, created, updated
             FROM ca_certificates ORDER BY key",
        )
        .map_err(|e| sql_error("preparing the CA certificate query", &e))?;
    let mut rows = stmt.query([]).map_err(|e| sql_error("loading CA certificates", &e))?;
    let mut out = BTreeMap::new();
    while let Some(row) = rows.next().map_err(|e| sql_error("loading CA certificates", &e))? {
        let (key, certificate) =
            certificate_row(row).map_err(|e| sql_error("loading CA certificates", &e))?;
        out.insert(key, certificate?);
    }
    Ok(out)
}

/// One row of `ca_certificates` (the outer error is SQLite's, the inner a bad stored ETag).
#[allow(clippy::type_complexity)]
fn certificate_row(
    row: &rusqlite::Row<'_>,
) -> Result<(String, Result<CaCertificate, StoreError>), rusqlite::Error> {
    let key: String = row.get(0)?;
    let name: String = row.get(1)?;
    let etag: String = row.get(2)?;
    let der: Vec<u8> = row.get(3)?;
    let is_verified: bool = row.get(4)?;
    let verification_code: Option<String> = row.get(5)?;
    let created: i64 = row.get(6)?;
    let updated: i64 = row.get(7)?;
    let certificate = Etag::parse(&etag)
        .map_err(|e| backend(format!("CA certificate '{key}' has a bad stored ETag: {e}")))
        .map(|etag| CaCertificate {
            name,
            der,
            is_verified,
            verification_code,
            created: Timestamp::from_unix_nanos(created),
            updated: Timestamp::from_unix_nanos(updated),
            etag,
        });
    Ok((key, certificate))
}

/// Every symmetric-key group, by key.
fn load_groups(
    conn: &Connection,
    sealer: Option<&Sealer>,
) -> Result<BTreeMap<String, EnrollmentGroup>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT key, json FROM enrollment_groups ORDER BY key")
        .map_err(|e| sql_error("preparing the symmetric-key group query", &e))?;
    let mut rows = stmt.query([]).map_err(|e| sql_error("loading enrollment groups", &e))?;
    let mut out = BTreeMap::new();
    while let Some(row) = rows.next().map_err(|e| sql_error("loading enrollment groups", &e))? {
        let key: String = row.get(0).map_err(|e| sql_error("loading enrollment groups", &e))?;
        let json =
            row.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(|e| sql_error("loading groups", &e))?;
        let mut group: EnrollmentGroup = from_json(&format!("reading enrollment group '{key}'"), json)?;
        secrets::open(sealer, &mut group)?;
        out.insert(key, group);
    }
    Ok(out)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending schema migrations, loads the
    /// symmetric-key groups and starts the writer thread.
    ///
    /// `path` must name a file on a local file system (WAL mode needs shared memory; `:memory:` is
    /// refused).
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_sealed(path, options, None)
    }

    /// [`open`](Self::open) with encryption at rest: with a sealer, the secrets of every enrollment and
    /// group written (symmetric keys, webhook URLs) are sealed inside the stored JSON, bound to their row,
    /// and opened when read (groups once, into the in-memory snapshot). Rows written without sealing are
    /// read as they are and sealed on their next write. Without a sealer, a sealed row is an error.
    pub fn open_sealed(
        path: impl AsRef<Path>,
        options: SqliteOptions,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let mut conn =
            Connection::open(&path).map_err(|e| sql_error(&format!("opening database '{shown}'"), &e))?;
        configure_writer(&conn)?;
        migrate(&mut conn)?;
        // The version first: views loaded after it can only be newer than it, never older.
        let version = read_version(&conn)?;
        let groups = load_groups(&conn, sealer.as_deref())?;
        let certificates = load_certificates(&conn)?;

        let mut readers = Vec::new();
        for _ in 0..options.read_connections.max(1) {
            let reader = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(|e| sql_error(&format!("opening a read connection to '{shown}'"), &e))?;
            reader.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_error("setting the busy timeout", &e))?;
            configure_cache(&reader)?;
            reader.set_prepared_statement_cache_capacity(32);
            readers.push(Mutex::new(reader));
        }

        let state = Arc::new(WriterState {
            group_snapshot: RwLock::new(Arc::new(Vec::new())),
            certificate_snapshot: RwLock::new(Arc::new(Vec::new())),
            enrollment_ids: cache::KeySet::new(),
            registration_ids: cache::KeySet::new(),
            registrations: cache::RecordCache::new(options.registration_cache_bytes),
            version: AtomicI64::new(-1),
            committing: AtomicI64::new(-1),
            resync_queued: AtomicBool::new(false),
            batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        });
        state.publish_groups(&groups);
        state.publish_certificates(&certificates);
        load_enrollment_ids(&conn, &state.enrollment_ids)?;
        load_registration_ids(&conn, &state.registration_ids)?;
        state.version.store(version, Ordering::Release);

        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            conn,
            receiver,
            max_batch: options.max_batch.max(1),
            batch_window: options.batch_window,
            state: Arc::clone(&state),
            groups,
            certificates,
            version,
            sealer: sealer.clone(),
            groups_stale: false,
            certificates_stale: false,
            enrollment_ids_stale: false,
            registration_ids_stale: false,
        };
        let handle = std::thread::Builder::new()
            .name("dps-store-sqlite-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| backend(format!("could not start the SQLite writer thread: {e}")))?;

        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path,
                sender: RwLock::new(Some(sender)),
                writer: Mutex::new(Some(handle)),
                closed: AtomicBool::new(false),
                readers,
                next_reader: AtomicUsize::new(0),
                state,
                no_groups: Arc::new(Vec::new()),
                sealer,
            }),
        })
    }

    /// Shuts the store down for every clone of this handle: no new operation is accepted (they fail with
    /// `Backend`), the writer applies and commits what is already queued, closes its connection and exits.
    /// Returns once it has exited; an error means closing the write connection failed (every acknowledged
    /// write is durable regardless).
    pub fn close(self) -> Result<(), StoreError> {
        self.shared.shutdown()
    }

    /// Counters of the write path so far.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            batches: self.shared.state.batches.load(Ordering::Relaxed),
            rows: self.shared.state.rows.load(Ordering::Relaxed),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Validates an operation and splits reads from writes; registration JSON is serialized here, on the
    /// caller's thread, to keep the writer thread's work minimal.
    fn prepare(op: StoreOp) -> Result<Prepared, StoreError> {
        Ok(match op {
            StoreOp::LoadDeviceContext { registration_id } => {
                Prepared::Read(ReadOp::LoadDeviceContext(registration_id))
            }
            StoreOp::CommitRegistration { record, expected } => {
                Prepared::Write(WriteOp::CommitRegistration {
                    key: record.registration_id.key().to_owned(),
                    group_key: record.enrollment.group_id().map(|g| g.key().to_owned()),
                    etag: record.etag.as_str().to_owned(),
                    json: to_json("serializing a registration record", &record)?,
                    expected,
                    operation: record.issued_operation(),
                    record: Some(record),
                })
            }
            StoreOp::GetRegistration { registration_id } => {
                Prepared::Read(ReadOp::GetRegistration(registration_id))
            }
            StoreOp::DeleteRegistration { registration_id, if_match } => {
                Prepared::Write(WriteOp::DeleteRegistration {
                    key: registration_id.key().to_owned(),
                    if_match,
                })
            }
            StoreOp::QueryRegistrations { group_id, page } => {
                Prepared::Read(ReadOp::QueryRegistrations(group_id, page))
            }
            StoreOp::GetEnrollment { registration_id } => {
                Prepared::Read(ReadOp::GetEnrollment(registration_id))
            }
            StoreOp::PutEnrollment { enrollment, condition } => {
                Prepared::Write(WriteOp::PutEnrollment { enrollment, condition })
            }
            StoreOp::DeleteEnrollment { registration_id, if_match } => {
                Prepared::Write(WriteOp::DeleteEnrollment { key: registration_id.key().to_owned(), if_match })
            }
            StoreOp::QueryEnrollments { query, page } => {
                Prepared::Read(ReadOp::QueryEnrollments(query, page))
            }
            StoreOp::GetGroup { group_id } => Prepared::Read(ReadOp::GetGroup(group_id)),
            StoreOp::PutGroup { group, condition, max_symmetric_key_groups } => {
                Prepared::Write(WriteOp::PutGroup { group, condition, limit: max_symmetric_key_groups })
            }
            StoreOp::DeleteGroup { group_id, if_match } => {
                Prepared::Write(WriteOp::DeleteGroup { key: group_id.key().to_owned(), if_match })
            }
            StoreOp::QueryGroups { query, page } => Prepared::Read(ReadOp::QueryGroups(query, page)),
            StoreOp::GetCertificate { name } => {
                Prepared::Read(ReadOp::GetCertificate(name.to_ascii_lowercase()))
            }
            StoreOp::PutCertificate { certificate, condition, max_certificates } => {
                Prepared::Write(WriteOp::PutCertificate { certificate, condition, limit: max_certificates })
            }
            StoreOp::DeleteCertificate { name, if_match } => {
                Prepared::Write(WriteOp::DeleteCertificate { key: name.to_ascii_lowercase(), if_match })
            }
            StoreOp::ListCertificates => Prepared::Read(ReadOp::ListCertificates),
            StoreOp::Audited { op, record } => {
                if !op.is_service_write() {
                    return Err(backend(format!("not an auditable service write: {op:?}")));
                }
                match Self::prepare(*op)? {
                    Prepared::Write(op) => Prepared::Write(WriteOp::Audited { op: Box::new(op), record }),
                    Prepared::Read(_) => return Err(backend("an audited operation must be a write")),
                }
            }
            StoreOp::AppendAudit { records } => Prepared::Write(WriteOp::AppendAudit(records)),
            StoreOp::QueryAudit { filter, page } => Prepared::Read(ReadOp::QueryAudit(filter, page)),
            other => {
                return Err(backend(format!("the SQLite store does not support this operation: {other:?}")))
            }
        })
    }

    /// Queues a write for the writer thread.
    fn submit(&self, op: WriteOp, reply: Reply) -> Result<(), StoreError> {
        let sender = self.shared.sender.read().unwrap_or_else(|e| e.into_inner());
        let sender = sender.as_ref().ok_or_else(closed_error)?;
        sender.send(WriteRequest { op, reply }).map_err(|_| backend("the SQLite writer thread has stopped"))
    }

    /// A read connection: the first free one, round-robin, else wait for one.
    fn reader(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        let readers = &self.shared.readers;
        let n = readers.len();
        if n == 0 {
            return Err(backend("the SQLite store has no read connection"));
        }
        let start = self.shared.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match readers[(start + i) % n].try_lock() {
                Ok(guard) => return Ok(guard),
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        Ok(readers[start % n].lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The sealer, if the store seals.
    fn sealer(&self) -> Option<&Sealer> {
        self.shared.sealer.as_deref()
    }

    /// An enrollment or group as read, with its sealed secrets opened.
    fn opened<T: HasSecrets>(&self, item: Option<T>) -> Result<Option<T>, StoreError> {
        item.map(|mut item| secrets::open(self.sealer(), &mut item).map(|()| item)).transpose()
    }

    /// A page of enrollments or groups as read, with their sealed secrets opened.
    fn opened_page<T: HasSecrets>(&self, mut page: Page<T>) -> Result<Page<T>, StoreError> {
        secrets::open_all(self.sealer(), &mut page.items)?;
        Ok(page)
    }

    /// A registration record from the database.
    fn read_registration(conn: &Connection, key: &str) -> Result<Option<RegistrationRecord>, StoreError> {
        get_json(conn, "SELECT json FROM registrations WHERE key = ?1", key, "a registration record")
    }

    /// Whether the in-memory views reflect the database as `conn` sees it now (no other connection wrote
    /// since the writer last brought them up to date). When they do not, the caller reads the database
    /// instead, and a [`WriteOp::Resync`] is queued so that the writer catches up.
    fn views_current(&self, conn: &Connection) -> Result<bool, StoreError> {
        let state = &self.shared.state;
        let current = read_version(conn)?;
        if current == state.version.load(Ordering::Acquire) {
            return Ok(true);
        }
        // Our own writer's commit in flight: the views catch up before its requesters are answered.
        if current != state.committing.load(Ordering::Acquire)
            && !state.resync_queued.swap(true, Ordering::AcqRel)
        {
            let (reply, _) = oneshot::channel();
            if self.submit(WriteOp::Resync, Reply::Async(reply)).is_err() {
                state.resync_queued.store(false, Ordering::Release);
            }
        }
        Ok(false)
    }

    /// A registration record and its operation history from the database.
    fn read_registration_with_operations(
        conn: &Connection,
        key: &str,
    ) -> Result<Option<cache::CachedRegistration>, StoreError> {
        let json: Option<String> = get_text(conn, "SELECT json FROM registrations WHERE key = ?1", key)?;
        json.map(|json| parse_registration_row(&json)).transpose()
    }

    fn read(&self, op: ReadOp) -> OpResult {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        let state = &self.shared.state;
        match op {
            ReadOp::LoadDeviceContext(id) => {
                let conn = self.reader()?;
                let current = self.views_current(&conn)?;
                let cached = if current { state.registrations.get(id.key()) } else { None };
                let individual: Option<IndividualEnrollment> =
                    if !current || state.enrollment_ids.may_contain(id.key()) {
                        self.opened(get_json(
                            &conn,
                            "SELECT json FROM enrollments WHERE key = ?1",
                            id.key(),
                            "an enrollment",
                        )?)?
                    } else {
                        None
                    };
                let groups = if individual.is_some() {
                    Arc::clone(&self.shared.no_groups)
                } else if current {
                    state.groups()
                } else {
                    Arc::new(load_groups(&conn, self.sealer())?.into_values().collect())
                };
                let certificates = if current {
                    state.certificates()
                } else {
                    Arc::new(load_certificates(&conn)?.into_values().collect())
                };
                let (registration, operations) = match cached {
                    Some(cached) => (Some(cached.record.clone()), cached.operations.clone()),
                    // Current views and no such key: no record (a first registration reads nothing).
                    None if current && !state.registration_ids.may_contain(id.key()) => (None, Vec::new()),
                    None => match Self::read_registration_with_operations(&conn, id.key())? {
                        Some(read) => (Some(read.record), read.operations),
                        None => (None, Vec::new()),
                    },
                };
                Ok(StoreResult::DeviceContext(DeviceContext {
                    individual,
                    groups,
                    certificates,
                    registration,
                    operations,
                }))
            }
            ReadOp::GetRegistration(id) => {
                let conn = self.reader()?;
                let cached =
                    if self.views_current(&conn)? { state.registrations.get(id.key()) } else { None };
                let record = match cached {
                    Some(cached) => Some(cached.record.clone()),
                    None => Self::read_registration(&conn, id.key())?,
                };
                Ok(StoreResult::Registration(record.map(Box::new)))
            }
            ReadOp::QueryRegistrations(group, page) => query_page(
                &*self.reader()?,
                "SELECT key, json FROM registrations WHERE group_key = ?1 AND key > ?2 ORDER BY key",
                &[group.key(), page.after.as_deref().unwrap_or("")],
                None,
                page.limit,
                "registration records",
            )
            .map(StoreResult::Registrations),
            ReadOp::GetEnrollment(id) => self
                .opened(get_json(
                    &*self.reader()?,
                    "SELECT json FROM enrollments WHERE key = ?1",
                    id.key(),
                    "an enrollment",
                )?)
                .map(|e| StoreResult::Enrollment(e.map(Box::new))),
            ReadOp::QueryEnrollments(query, page) => query_page(
                &*self.reader()?,
                "SELECT key, json FROM enrollments WHERE key > ?1 ORDER BY key",
                &[page.after.as_deref().unwrap_or("")],
                Some(&query),
                page.limit,
                "enrollments",
            )
            .and_then(|page| self.opened_page(page))
            .map(StoreResult::Enrollments),
            ReadOp::GetGroup(id) => self
                .opened(get_json(
                    &*self.reader()?,
                    "SELECT json FROM enrollment_groups WHERE key = ?1",
                    id.key(),
                    "an enrollment group",
                )?)
                .map(|g| StoreResult::Group(g.map(Box::new))),
            ReadOp::QueryGroups(query, page) => query_page(
                &*self.reader()?,
                "SELECT key, json FROM enrollment_groups WHERE key > ?1 ORDER BY key",
                &[page.after.as_deref().unwrap_or("")],
                Some(&query),
                page.limit,
                "enrollment groups",
            )
            .and_then(|page| self.opened_page(page))
            .map(StoreResult::Groups),
            ReadOp::GetCertificate(key) => {
                let conn = self.reader()?;
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT key, name, etag, der, is_verified, verification_code, created, updated
                         FROM ca_certificates WHERE key = ?1",
                    )
                    .map_err(|e| sql_error("preparing the CA certificate read", &e))?;
                let found = stmt
                    .query_row([&key], certificate_row)
                    .optional()
                    .map_err(|e| sql_error("reading a CA certificate", &e))?;
                let certificate = found.map(|(_, c)| c).transpose()?;
                Ok(StoreResult::Certificate(certificate.map(Box::new)))
            }
            ReadOp::ListCertificates => {
                let conn = self.reader()?;
                Ok(StoreResult::Certificates(load_certificates(&conn)?.into_values().collect()))
            }
            ReadOp::QueryAudit(filter, page) => query_audit(&*self.reader()?, &filter, &page),
        }
    }
}

/// Reads one page of the audit log of the store database at `path`, newest first, on a read-only
/// connection of its own (no writer, no migration: the server may be running). A database from before the
/// audit log (schema 3 or older) is a backend error naming the missing table.
pub fn read_audit_log(
    path: impl AsRef<Path>,
    filter: &AuditFilter,
    page: &PageRequest,
) -> Result<Page<AuditRecord>, StoreError> {
    let path = path.as_ref();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| sql_error(&format!("opening {} read-only", path.display()), &e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_error("setting the busy timeout", &e))?;
    match query_audit(&conn, filter, page)? {
        StoreResult::Audit(page) => Ok(page),
        _ => Err(backend("the audit query answered something else")),
    }
}

/// Audit records passing `filter`, newest first, one page.
fn query_audit(conn: &Connection, filter: &AuditFilter, page: &PageRequest) -> OpResult {
    let querying = "querying the audit log";
    let before = audit_page_before(page)?.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let limit = page_limit(page.limit);
    let mut stmt = conn
        .prepare_cached(
            "SELECT sequence, time, principal, transport, operation, target, etag_before, etag_after, status,
                error_code, tracking_id
             FROM audit_log
             WHERE sequence < ?1 AND time >= ?2 AND time < ?3
                AND (?4 IS NULL OR principal_key = ?4) AND (?5 IS NULL OR target_key = ?5)
                AND (?6 IS NULL OR operation = ?6)
             ORDER BY sequence DESC LIMIT ?7",
        )
        .map_err(|e| sql_error(querying, &e))?;
    let since = filter.since.map_or(i64::MIN, |t| t.unix_nanos());
    let until = filter.until.map_or(i64::MAX, |t| t.unix_nanos());
    let principal = filter.principal.as_deref().map(str::to_ascii_lowercase);
    let target = filter.target.as_deref().map(str::to_ascii_lowercase);
    let operation = filter.operation.map(AuditOperation::as_str);
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
    let rows = stmt
        .query_map(params![before, since, until, principal, target, operation, fetch], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, String>(10)?,
            ))
        })
        .map_err(|e| sql_error(querying, &e))?;
    let mut items = Vec::new();
    let mut more = false;
    for row in rows {
        let (sequence, time, principal, transport, operation, target, before, after, status, code, tracking) =
            row.map_err(|e| sql_error(querying, &e))?;
        if items.len() == limit {
            more = true;
            break;
        }
        let bad = |what: &str| backend(format!("the audit row {sequence} has an unknown {what}"));
        items.push(AuditRecord {
            sequence: u64::try_from(sequence).map_err(|_| bad("sequence"))?,
            time: Timestamp::from_unix_nanos(time),
            principal,
            transport: AuditTransport::parse(&transport).ok_or_else(|| bad("transport"))?,
            operation: AuditOperation::parse(&operation).ok_or_else(|| bad("operation"))?,
            target,
            etag_before: before,
            etag_after: after,
            status: u16::try_from(status).map_err(|_| bad("status"))?,
            error_code: code.map(|c| u32::try_from(c).map_err(|_| bad("error code"))).transpose()?,
            tracking_id: tracking,
        });
    }
    let next = if more { items.last().map(|r| r.sequence.to_string()) } else { None };
    Ok(StoreResult::Audit(Page { items, next }))
}

/// Appends one audit record inside the open transaction and returns its sequence number.
fn insert_audit(conn: &Connection, record: &AuditRecord) -> Result<u64, rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO audit_log (time, principal, principal_key, transport, operation, target, target_key,
            etag_before, etag_after, status, error_code, tracking_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        record.time.unix_nanos(),
        record.principal,
        record.principal.to_ascii_lowercase(),
        record.transport.as_str(),
        record.operation.as_str(),
        record.target,
        record.target.to_ascii_lowercase(),
        record.etag_before,
        record.etag_after,
        record.status,
        record.error_code,
        record.tracking_id,
    ])?;
    Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or(0))
}

/// The operation history inside a registration row's JSON (absent in rows written before histories were
/// kept: an empty history).
#[derive(serde::Deserialize)]
struct StoredOperations {
    #[serde(default)]
    operations: Vec<IssuedOperation>,
}

/// Parses a registration row's JSON: the record's fields plus its `operations` history.
fn parse_registration_row(json: &str) -> Result<cache::CachedRegistration, StoreError> {
    let reading = "reading a registration record";
    let record: RegistrationRecord = from_json(reading, json)?;
    let StoredOperations { operations } = from_json(reading, json)?;
    Ok(cache::CachedRegistration { record, operations })
}

/// A registration row's JSON: the record's JSON object with an `operations` member added.
fn registration_row(record_json: &str, operations: &[IssuedOperation]) -> Result<String, StoreError> {
    let history = to_json("serializing an operation history", &operations)?;
    let body = record_json
        .strip_suffix('}')
        .filter(|b| b.starts_with('{') && b.len() > 1)
        .ok_or_else(|| backend("a registration record did not serialize to a JSON object"))?;
    Ok(format!("{body},\"operations\":{history}}}"))
}

/// Reads one text column by key.
fn get_text(conn: &Connection, sql: &str, key: &str) -> Result<Option<String>, StoreError> {
    let reading = "reading a registration record";
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
        .map_err(|e| sql_error(reading, &e))
}

/// Reads one JSON column by key and parses it.
fn get_json<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    key: &str,
    what: &str,
) -> Result<Option<T>, StoreError> {
    let reading = || format!("reading {what}");
    let mut stmt = conn.prepare_cached(sql).map_err(|e| sql_error(&reading(), &e))?;
    let mut rows = stmt.query([key]).map_err(|e| sql_error(&reading(), &e))?;
    match rows.next().map_err(|e| sql_error(&reading(), &e))? {
        None => Ok(None),
        Some(row) => {
            let json = row.get_ref(0).and_then(|v| Ok(v.as_str()?)).map_err(|e| sql_error(&reading(), &e))?;
            from_json(&reading(), json).map(Some)
        }
    }
}

/// Runs a `SELECT key, json ... ORDER BY key` and collects one page, filtering by `query`.
fn query_page<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: &[&str],
    query: Option<&Query>,
    limit: usize,
    what: &str,
) -> Result<Page<T>, StoreError> {
    let querying = || format!("querying {what}");
    let query = query.filter(|q| !q.conditions.is_empty());
    let limit = page_limit(limit);
    let mut stmt = conn.prepare_cached(sql).map_err(|e| sql_error(&querying(), &e))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params)).map_err(|e| sql_error(&querying(), &e))?;
    let mut items = Vec::new();
    let mut last_key: Option<String> = None;
    let mut more = false;
    while let Some(row) = rows.next().map_err(|e| sql_error(&querying(), &e))? {
        let json = row.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(|e| sql_error(&querying(), &e))?;
        let item: T = match query {
            None => {
                if items.len() == limit {
                    more = true;
                    break;
                }
                from_json(&querying(), json)?
            }
            Some(q) => {
                let value: serde_json::Value = from_json(&querying(), json)?;
                if !q.matches(&value) {
                    continue;
                }
                if items.len() == limit {
                    more = true;
                    break;
                }
                serde_json::from_value(value).map_err(|e| json_error(&querying(), &e))?
            }
        };
        items.push(item);
        last_key = Some(row.get(0).map_err(|e| sql_error(&querying(), &e))?);
    }
    Ok(Page { items, next: if more { last_key } else { None } })
}

impl Shared {
    fn shutdown(&self) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::Release);
        // Dropping the only sender ends the writer's loop once it has drained the queue.
        drop(self.sender.write().unwrap_or_else(|e| e.into_inner()).take());
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        match handle {
            None => Ok(()),
            Some(h) => h.join().unwrap_or_else(|_| Err(backend("the SQLite writer thread panicked"))),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Finish queued writes and close the write connection before the read connections go.
        let _ = self.shutdown();
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("read_connections", &self.shared.readers.len())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish()
    }
}

impl BlockingStore for SqliteStore {
    /// Reads run on the calling thread; writes block until their batch is committed and durable.
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        match Self::prepare(op)? {
            Prepared::Read(op) => self.read(op),
            Prepared::Write(op) => {
                let (tx, rx) = mpsc::sync_channel(1);
                self.submit(op, Reply::Blocking(tx))?;
                rx.recv().unwrap_or_else(|_| Err(writer_gone()))
            }
        }
    }
}

impl AsyncStore for SqliteStore {
    /// Reads run synchronously (a few microseconds) and return a ready future; writes are queued at once and
    /// the future resolves when their batch is committed and durable.
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        // The future's output is this large anyway (`StoreResult::DeviceContext` is big); boxing would only add
        // an allocation per read.
        #[allow(clippy::large_enum_variant)]
        enum Started {
            Done(OpResult),
            Pending(oneshot::Receiver<OpResult>),
        }
        let started = match Self::prepare(op) {
            Err(e) => Started::Done(Err(e)),
            Ok(Prepared::Read(op)) => Started::Done(self.read(op)),
            Ok(Prepared::Write(op)) => {
                let (tx, rx) = oneshot::channel();
                match self.submit(op, Reply::Async(tx)) {
                    Ok(()) => Started::Pending(rx),
                    Err(e) => Started::Done(Err(e)),
                }
            }
        };
        async move {
            match started {
                Started::Done(result) => result,
                Started::Pending(rx) => rx.await.unwrap_or_else(|_| Err(writer_gone())),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The writer thread
// ------------------------------------------------------------------------------------------------

struct Writer {
    conn: Connection,
    receiver: mpsc::Receiver<WriteRequest>,
    max_batch: usize,
    batch_window: std::time::Duration,
    state: Arc<WriterState>,
    /// The symmetric-key groups as committed, by key (what the shared cache is built from).
    groups: BTreeMap<String, EnrollmentGroup>,
    /// The CA certificates as committed, by key (what the certificate snapshot is built from).
    certificates: BTreeMap<String, CaCertificate>,
    /// The store version this writer last committed or read under its write lock (what the views reflect).
    version: i64,
    /// Seals the secrets of what the writer writes (`None`: no encryption at rest).
    sealer: Option<Arc<Sealer>>,
    /// Set when a batch that touched groups failed: the database may or may not hold its changes, so
    /// `groups` is reloaded from the database.
    groups_stale: bool,
    /// The same for the CA certificates.
    certificates_stale: bool,
    /// The same for the set of enrollment IDs.
    enrollment_ids_stale: bool,
    /// The same for the set of registration IDs.
    registration_ids_stale: bool,
}

/// A change to an in-memory view made by a request of the current batch (registration records are taken
/// from the requests themselves).
enum Change {
    GroupPut(String, Box<EnrollmentGroup>),
    GroupRemove(String),
    CertificatePut(String, Box<CaCertificate>),
    CertificateRemove(String),
    EnrollmentAdded(String),
    EnrollmentRemoved(String),
    RegistrationAdded(String),
    RegistrationRemoved(String),
    /// The operation history a successful registration commit wrote (one per successful commit, in request
    /// order).
    RegistrationOperations(Vec<IssuedOperation>),
}

impl Writer {
    fn run(mut self) -> Result<(), StoreError> {
        let mut batch = Vec::with_capacity(self.max_batch);
        // Reused: an `OpResult` is large (it can hold a whole device context), so a fresh vector per batch
        // would be a large allocation per batch.
        let mut results = Vec::with_capacity(self.max_batch);
        let mut under_load = false;
        while let Ok(first) = self.receiver.recv() {
            batch.push(first);
            if under_load && !self.batch_window.is_zero() {
                // Sleep through the window instead of waiting on the channel: a sender only wakes this
                // thread when it is blocked in `recv` (idle), so a busy store costs one wakeup per batch,
                // not one per write.
                std::thread::sleep(self.batch_window);
            }
            while batch.len() < self.max_batch {
                match self.receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            under_load = batch.len() > 1;
            self.apply_batch(&mut batch, &mut results);
        }
        self.conn.close().map_err(|(_, e)| sql_error("closing the write connection", &e))
    }

    /// Applies a batch in one transaction and answers every request once it is committed.
    fn apply_batch(&mut self, batch: &mut Vec<WriteRequest>, results: &mut Vec<OpResult>) {
        results.clear();
        let mut changes = Vec::new();
        // The operation history of every successful registration commit, in request order.
        let mut histories = std::collections::VecDeque::new();
        match self.transact(batch, results, &mut changes) {
            Ok(()) => {
                let rows = batch.iter().filter(|r| !matches!(r.op, WriteOp::Resync)).count() as u64;
                if rows > 0 {
                    self.state.batches.fetch_add(1, Ordering::Relaxed);
                    self.state.rows.fetch_add(rows, Ordering::Relaxed);
                }
                // Every in-memory view is brought up to date before anyone is answered.
                let mut groups_changed = false;
                let mut certificates_changed = false;
                for change in changes {
                    match change {
                        Change::GroupPut(key, group) => {
                            self.groups.insert(key, *group);
                            groups_changed = true;
                        }
                        Change::GroupRemove(key) => {
                            self.groups.remove(&key);
                            groups_changed = true;
                        }
                        Change::CertificatePut(key, certificate) => {
                            self.certificates.insert(key, *certificate);
                            certificates_changed = true;
                        }
                        Change::CertificateRemove(key) => {
                            self.certificates.remove(&key);
                            certificates_changed = true;
                        }
                        Change::EnrollmentAdded(key) => self.state.enrollment_ids.added(&key),
                        Change::EnrollmentRemoved(key) => self.state.enrollment_ids.removed(&key),
                        Change::RegistrationAdded(key) => self.state.registration_ids.added(&key),
                        Change::RegistrationRemoved(key) => self.state.registration_ids.removed(&key),
                        Change::RegistrationOperations(operations) => histories.push_back(operations),
                    }
                }
                if groups_changed {
                    self.state.publish_groups(&self.groups);
                }
                if certificates_changed {
                    self.state.publish_certificates(&self.certificates);
                }
                for (request, result) in batch.iter_mut().zip(results.iter()) {
                    match (&mut request.op, result) {
                        (WriteOp::CommitRegistration { key, json, record, .. }, Ok(_)) => {
                            let operations = histories.pop_front();
                            match (record.take(), operations) {
                                (Some(record), Some(operations)) => self.state.registrations.put(
                                    key,
                                    cache::CachedRegistration { record: *record, operations },
                                    json.len(),
                                ),
                                _ => self.state.registrations.remove(key),
                            }
                        }
                        (WriteOp::DeleteRegistration { key, .. }, Ok(_)) => {
                            self.state.registrations.remove(key)
                        }
                        (WriteOp::Audited { op, .. }, Ok(_)) => {
                            if let WriteOp::DeleteRegistration { key, .. } = op.as_ref() {
                                self.state.registrations.remove(key)
                            }
                        }
                        _ => {}
                    }
                }
                // The views now reflect the version just committed: readers may trust them again.
                self.state.version.store(self.version, Ordering::Release);
                for (request, result) in batch.drain(..).zip(results.drain(..)) {
                    request.reply.send(result);
                }
            }
            Err(e) => {
                // If the batch did land, its version is not this writer's: the next batch resyncs.
                self.state.committing.store(-1, Ordering::Release);
                if !self.conn.is_autocommit() {
                    // Best effort: if even ROLLBACK fails, the next BEGIN reports the problem.
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                // The database may or may not hold the batch: what it touched is read from it again.
                for change in &changes {
                    match change {
                        Change::GroupPut(..) | Change::GroupRemove(_) => self.groups_stale = true,
                        Change::CertificatePut(..) | Change::CertificateRemove(_) => {
                            self.certificates_stale = true
                        }
                        Change::EnrollmentAdded(_) | Change::EnrollmentRemoved(_) => {
                            self.enrollment_ids_stale = true;
                            self.state.enrollment_ids.unknown();
                        }
                        Change::RegistrationAdded(_) | Change::RegistrationRemoved(_) => {
                            self.registration_ids_stale = true;
                            self.state.registration_ids.unknown();
                        }
                        Change::RegistrationOperations(_) => {}
                    }
                }
                for request in batch.iter() {
                    match request.op.write() {
                        WriteOp::CommitRegistration { key, .. } | WriteOp::DeleteRegistration { key, .. } => {
                            self.state.registrations.remove(key)
                        }
                        _ => {}
                    }
                }
                results.clear();
                for request in batch.drain(..) {
                    request.reply.send(Err(e.clone()));
                }
            }
        }
        if self.groups_stale {
            if let Ok(groups) = load_groups(&self.conn, self.sealer.as_deref()) {
                self.groups = groups;
                self.groups_stale = false;
                self.state.publish_groups(&self.groups);
            }
        }
        if self.certificates_stale {
            if let Ok(certificates) = load_certificates(&self.conn) {
                self.certificates = certificates;
                self.certificates_stale = false;
                self.state.publish_certificates(&self.certificates);
            }
        }
        if self.enrollment_ids_stale && load_enrollment_ids(&self.conn, &self.state.enrollment_ids).is_ok() {
            self.enrollment_ids_stale = false;
        }
        if self.registration_ids_stale
            && load_registration_ids(&self.conn, &self.state.registration_ids).is_ok()
        {
            self.registration_ids_stale = false;
        }
    }

    /// `BEGIN IMMEDIATE`, every request in order, `COMMIT`. An `Err` aborts the whole batch.
    ///
    /// Under the write lock, the store version is read first: if another connection wrote since this
    /// writer's last transaction, the in-memory views are reloaded (inside the transaction, so from exactly
    /// the state the batch's preconditions are checked against) before anything is applied. The version
    /// is bumped in the same transaction when any request changed something.
    fn transact(
        &mut self,
        batch: &[WriteRequest],
        results: &mut Vec<OpResult>,
        changes: &mut Vec<Change>,
    ) -> Result<(), StoreError> {
        fn run(conn: &Connection, sql: &str, what: &str) -> Result<(), StoreError> {
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map(|_| ())
                .map_err(|e| sql_error(what, &e))
        }
        run(&self.conn, "BEGIN IMMEDIATE", "starting a write transaction")?;
        self.state.resync_queued.store(false, Ordering::Release);
        let found = read_version(&self.conn)?;
        if found != self.version {
            self.resync()?;
            self.version = found;
            self.state.version.store(found, Ordering::Release);
        }
        let mut changed = false;
        for request in batch {
            let result = self.apply(&request.op, changes).map_err(|e| sql_error("writing", &e))?;
            // An audit append alone changes nothing any cache holds.
            changed |= result.is_ok() && !matches!(request.op, WriteOp::Resync | WriteOp::AppendAudit(_));
            results.push(result);
        }
        let next = found + 1;
        if changed {
            run(
                &self.conn,
                "UPDATE store_version SET version = version + 1 WHERE id = 0",
                "bumping the store version",
            )?;
            self.state.committing.store(next, Ordering::Release);
        }
        run(&self.conn, "COMMIT", "committing a write transaction")?;
        if changed {
            self.version = next;
        }
        Ok(())
    }

    /// Reloads every in-memory view from the database (another connection wrote to it).
    fn resync(&mut self) -> Result<(), StoreError> {
        self.state.registrations.clear();
        self.state.enrollment_ids.unknown();
        self.enrollment_ids_stale = true;
        load_enrollment_ids(&self.conn, &self.state.enrollment_ids)?;
        self.enrollment_ids_stale = false;
        self.state.registration_ids.unknown();
        self.registration_ids_stale = true;
        load_registration_ids(&self.conn, &self.state.registration_ids)?;
        self.registration_ids_stale = false;
        self.groups = load_groups(&self.conn, self.sealer.as_deref())?;
        self.groups_stale = false;
        self.state.publish_groups(&self.groups);
        self.certificates = load_certificates(&self.conn)?;
        self.certificates_stale = false;
        self.state.publish_certificates(&self.certificates);
        Ok(())
    }

    /// Applies one request inside the open transaction. The outer error is a database failure (it aborts
    /// the batch); the inner result is this request's answer.
    fn apply(&self, op: &WriteOp, changes: &mut Vec<Change>) -> Result<OpResult, rusqlite::Error> {
        let conn = &self.conn;
        match op {
            WriteOp::Resync => Ok(Ok(StoreResult::Done)),
            WriteOp::Audited { op, record } => {
                // Read, write and append under the one write lock of this transaction.
                let before = self.stored_etag(op)?;
                match self.apply(op, changes)? {
                    Ok(result) => {
                        let mut record = (**record).clone();
                        record.etag_before = before;
                        record.etag_after = result.written_etag();
                        record.sequence = insert_audit(conn, &record)?;
                        Ok(Ok(StoreResult::Audited { result: Box::new(result), record: Box::new(record) }))
                    }
                    // Nothing was written (every write checks before it writes): no record either.
                    Err(e) => Ok(Err(e)),
                }
            }
            WriteOp::AppendAudit(records) => {
                for record in records {
                    insert_audit(conn, record)?;
                }
                Ok(Ok(StoreResult::Done))
            }
            WriteOp::CommitRegistration { key, group_key, etag, json, expected, operation, .. } => {
                // The precondition and the operation history are read inside the write transaction (it holds
                // SQLite's write lock), so nothing changes the row between read and write.
                let current: Option<(String, String)> = conn
                    .prepare_cached("SELECT etag, json FROM registrations WHERE key = ?1")?
                    .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let mut operations = match (&current, expected) {
                    (None, None) => Vec::new(),
                    (Some((current, row)), Some(expected)) if current == expected.as_str() => {
                        // An unreadable history (never written so by this store) starts over rather than
                        // blocking the device.
                        serde_json::from_str::<StoredOperations>(row)
                            .map(|s| s.operations)
                            .unwrap_or_default()
                    }
                    _ => return Ok(Err(StoreError::Conflict)),
                };
                push_operation(&mut operations, operation.clone());
                let row = match registration_row(json, &operations) {
                    Ok(row) => row,
                    Err(e) => return Ok(Err(e)),
                };
                if current.is_none() {
                    changes.push(Change::RegistrationAdded(key.clone()));
                }
                match current {
                    None => conn
                        .prepare_cached(
                            "INSERT INTO registrations (key, group_key, etag, json) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![key, group_key, etag, row])?,
                    Some(_) => conn
                        .prepare_cached(
                            "UPDATE registrations SET group_key = ?2, etag = ?3, json = ?4 WHERE key = ?1",
                        )?
                        .execute(params![key, group_key, etag, row])?,
                };
                changes.push(Change::RegistrationOperations(operations));
                Ok(Ok(StoreResult::Done))
            }
            WriteOp::DeleteRegistration { key, if_match } => {
                let current: Option<String> = conn
                    .prepare_cached("SELECT etag FROM registrations WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                match (current, if_match) {
                    (None, _) => return Ok(Err(StoreError::NotFound)),
                    (Some(current), Some(IfMatch::Etag(e))) if e.as_str() != current => {
                        return Ok(Err(StoreError::PreconditionFailed))
                    }
                    _ => {}
                }
                conn.prepare_cached("DELETE FROM registrations WHERE key = ?1")?.execute([key])?;
                changes.push(Change::RegistrationRemoved(key.clone()));
                Ok(Ok(StoreResult::Done))
            }
            WriteOp::PutEnrollment { enrollment, condition } => {
                let key = enrollment_key(enrollment);
                let existing =
                    self.current_item("SELECT etag, json FROM enrollments WHERE key = ?1", &key)?;
                let created = existing.is_none();
                let stored = match prepare_put(condition, existing, (**enrollment).clone(), |e, created| {
                    e.created_date_time_utc = Some(created)
                }) {
                    Ok(stored) => stored,
                    Err(e) => return Ok(Err(e)),
                };
                let json = match self.sealed_json("serializing an enrollment", &stored) {
                    Ok(json) => json,
                    Err(e) => return Ok(Err(e)),
                };
                conn.prepare_cached(
                    "INSERT INTO enrollments (key, etag, json) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, json = excluded.json",
                )?
                .execute(params![key, stored.etag.as_deref().unwrap_or(""), json])?;
                if created {
                    changes.push(Change::EnrollmentAdded(key));
                }
                Ok(Ok(StoreResult::Enrollment(Some(Box::new(stored)))))
            }
            WriteOp::DeleteEnrollment { key, if_match } => {
                let current: Option<String> = conn
                    .prepare_cached("SELECT etag FROM enrollments WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(non_empty)) {
                    return Ok(Err(e));
                }
                conn.prepare_cached("DELETE FROM enrollments WHERE key = ?1")?.execute([key])?;
                changes.push(Change::EnrollmentRemoved(key.clone()));
                Ok(Ok(StoreResult::Done))
            }
            WriteOp::PutGroup { group, condition, limit } => {
                let key = group_key(group);
                let existing =
                    self.current_item("SELECT etag, json FROM enrollment_groups WHERE key = ?1", &key)?;
                if limit.is_some() {
                    // Under the write lock: the count and the write cannot be separated by another writer.
                    let count: i64 = conn
                        .prepare_cached("SELECT COUNT(*) FROM enrollment_groups WHERE symmetric_key = 1")?
                        .query_row([], |r| r.get(0))?;
                    let was_symmetric = conn
                        .prepare_cached("SELECT symmetric_key FROM enrollment_groups WHERE key = ?1")?
                        .query_row([&key], |r| r.get::<_, bool>(0))
                        .optional()?
                        .unwrap_or(false);
                    let count = usize::try_from(count).unwrap_or(usize::MAX);
                    if let Err(e) = check_group_limit(group, was_symmetric, count, *limit) {
                        return Ok(Err(e));
                    }
                }
                let stored = match prepare_put(condition, existing, (**group).clone(), |g, created| {
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
                conn.prepare_cached(
                    "INSERT INTO enrollment_groups (key, etag, symmetric_key, json) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, symmetric_key = excluded.symmetric_key,
                     json = excluded.json",
                )?
                .execute(params![key, stored.etag.as_deref().unwrap_or(""), symmetric, json])?;
                changes.push(Change::GroupPut(key, Box::new(stored.clone())));
                Ok(Ok(StoreResult::Group(Some(Box::new(stored)))))
            }
            WriteOp::DeleteGroup { key, if_match } => {
                let current: Option<String> = conn
                    .prepare_cached("SELECT etag FROM enrollment_groups WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(non_empty)) {
                    return Ok(Err(e));
                }
                conn.prepare_cached("DELETE FROM enrollment_groups WHERE key = ?1")?.execute([key])?;
                changes.push(Change::GroupRemove(key.clone()));
                Ok(Ok(StoreResult::Done))
            }
            WriteOp::PutCertificate { certificate, condition, limit } => {
                let key = certificate.key();
                // Under the write lock: the precondition, the count and the write are one step.
                let current: Option<String> = conn
                    .prepare_cached("SELECT etag FROM ca_certificates WHERE key = ?1")?
                    .query_row([&key], |r| r.get(0))
                    .optional()?;
                if let Err(e) = check_write(condition, current.as_deref().map(Some)) {
                    return Ok(Err(e));
                }
                if limit.is_some() {
                    let count: i64 = conn
                        .prepare_cached("SELECT COUNT(*) FROM ca_certificates")?
                        .query_row([], |r| r.get(0))?;
                    let count = usize::try_from(count).unwrap_or(usize::MAX);
                    if let Err(e) = check_certificate_limit(current.is_some(), count, *limit) {
                        return Ok(Err(e));
                    }
                }
                conn.prepare_cached(
                    "INSERT INTO ca_certificates
                        (key, name, etag, der, is_verified, verification_code, created, updated)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (key) DO UPDATE SET name = excluded.name, etag = excluded.etag,
                        der = excluded.der, is_verified = excluded.is_verified,
                        verification_code = excluded.verification_code, created = excluded.created,
                        updated = excluded.updated",
                )?
                .execute(params![
                    key,
                    certificate.name,
                    certificate.etag.as_str(),
                    certificate.der,
                    certificate.is_verified,
                    certificate.verification_code,
                    certificate.created.unix_nanos(),
                    certificate.updated.unix_nanos(),
                ])?;
                changes.push(Change::CertificatePut(key, certificate.clone()));
                Ok(Ok(StoreResult::Certificate(Some(certificate.clone()))))
            }
            WriteOp::DeleteCertificate { key, if_match } => {
                let current: Option<String> = conn
                    .prepare_cached("SELECT etag FROM ca_certificates WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                if let Err(e) = check_delete(if_match.as_ref(), current.as_deref().map(Some)) {
                    return Ok(Err(e));
                }
                conn.prepare_cached("DELETE FROM ca_certificates WHERE key = ?1")?.execute([key])?;
                changes.push(Change::CertificateRemove(key.clone()));
                Ok(Ok(StoreResult::Done))
            }
        }
    }

    /// The stored ETag of the item a service write changes (`None` when absent, or stored without one).
    fn stored_etag(&self, op: &WriteOp) -> Result<Option<String>, rusqlite::Error> {
        let (sql, key) = match op {
            WriteOp::PutEnrollment { enrollment, .. } => {
                ("SELECT etag FROM enrollments WHERE key = ?1", enrollment_key(enrollment))
            }
            WriteOp::DeleteEnrollment { key, .. } => {
                ("SELECT etag FROM enrollments WHERE key = ?1", key.clone())
            }
            WriteOp::PutGroup { group, .. } => {
                ("SELECT etag FROM enrollment_groups WHERE key = ?1", group_key(group))
            }
            WriteOp::DeleteGroup { key, .. } => {
                ("SELECT etag FROM enrollment_groups WHERE key = ?1", key.clone())
            }
            WriteOp::DeleteRegistration { key, .. } => {
                ("SELECT etag FROM registrations WHERE key = ?1", key.clone())
            }
            WriteOp::PutCertificate { certificate, .. } => {
                ("SELECT etag FROM ca_certificates WHERE key = ?1", certificate.key())
            }
            WriteOp::DeleteCertificate { key, .. } => {
                ("SELECT etag FROM ca_certificates WHERE key = ?1", key.clone())
            }
            _ => return Ok(None),
        };
        let etag: Option<String> =
            self.conn.prepare_cached(sql)?.query_row([&key], |r| r.get(0)).optional()?;
        Ok(etag.filter(|e| !e.is_empty()))
    }

    /// The JSON an enrollment or group is stored as: with its secrets sealed when the store seals.
    fn sealed_json<T: HasSecrets + Clone + serde::Serialize>(
        &self,
        what: &str,
        item: &T,
    ) -> Result<String, StoreError> {
        match self.sealer.as_deref() {
            None => to_json(what, item),
            Some(sealer) => {
                let mut row = item.clone();
                secrets::seal(Some(sealer), &mut row)?;
                to_json(what, &row)
            }
        }
    }

    /// The stored `(etag, json)` of an enrollment or group.
    fn current_item(&self, sql: &str, key: &str) -> Result<Option<(String, String)>, rusqlite::Error> {
        self.conn.prepare_cached(sql)?.query_row([key], |r| Ok((r.get(0)?, r.get(1)?))).optional()
    }
}

// ------------------------------------------------------------------------------------------------
// In-memory views kept by the writer
// ------------------------------------------------------------------------------------------------

mod cache {
    use dps_core::store::{IssuedOperation, RegistrationRecord};
    use std::collections::hash_map::RandomState;
    use std::collections::{HashMap, VecDeque};
    use std::hash::BuildHasher;
    use std::sync::{Arc, Mutex, RwLock};

    /// A set of keys as 64-bit keyed hashes with a count per hash, so that removing one of two colliding keys
    /// keeps the other. Answers "certainly absent" or "maybe present"; while unknown (`None`: not loaded, or
    /// a failed batch left it unsure), everything is "maybe present".
    pub(super) struct KeySet {
        hasher: RandomState,
        counts: RwLock<Option<HashMap<u64, u32>>>,
    }

    impl KeySet {
        pub(super) fn new() -> Self {
            KeySet { hasher: RandomState::new(), counts: RwLock::new(None) }
        }

        fn hash(&self, key: &str) -> u64 {
            self.hasher.hash_one(key)
        }

        /// Replaces the contents with exactly `keys` (each key once).
        pub(super) fn load<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
            let mut counts = HashMap::new();
            for key in keys {
                *counts.entry(self.hash(key)).or_insert(0u32) += 1;
            }
            *self.counts.write().unwrap_or_else(|e| e.into_inner()) = Some(counts);
        }

        /// Forgets the contents: every key is "maybe present" until the next [`KeySet::load`].
        pub(super) fn unknown(&self) {
            *self.counts.write().unwrap_or_else(|e| e.into_inner()) = None;
        }

        /// `false` only when `key` is certainly not in the set.
        pub(super) fn may_contain(&self, key: &str) -> bool {
            match &*self.counts.read().unwrap_or_else(|e| e.into_inner()) {
                None => true,
                Some(counts) => counts.contains_key(&self.hash(key)),
            }
        }

        /// A key that was not in the set was added.
        pub(super) fn added(&self, key: &str) {
            let hash = self.hash(key);
            if let Some(counts) = &mut *self.counts.write().unwrap_or_else(|e| e.into_inner()) {
                *counts.entry(hash).or_insert(0) += 1;
            }
        }

        /// A key that was in the set was removed.
        pub(super) fn removed(&self, key: &str) {
            let hash = self.hash(key);
            if let Some(counts) = &mut *self.counts.write().unwrap_or_else(|e| e.into_inner()) {
                if let Some(n) = counts.get_mut(&hash) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(&hash);
                    }
                }
            }
        }
    }

    const SHARDS: usize = 16;

    /// What an entry costs beyond its JSON size (the parsed record, its strings, the map and queue slots).
    const ENTRY_OVERHEAD: usize = 256;

    /// A registration record with its operation history, as last committed.
    pub(super) struct CachedRegistration {
        /// The record.
        pub(super) record: RegistrationRecord,
        /// Its operation history, oldest first.
        pub(super) operations: Vec<IssuedOperation>,
    }

    struct Entry {
        record: Arc<CachedRegistration>,
        cost: usize,
        /// Which insertion of the key this is, to tell its queue slot from stale ones.
        generation: u64,
    }

    #[derive(Default)]
    struct Shard {
        entries: HashMap<String, Entry>,
        /// Keys in insertion order (oldest first), with the generation they were inserted with; slots of
        /// keys removed or re-inserted since are skipped when evicting.
        order: VecDeque<(String, u64)>,
        bytes: usize,
        next_generation: u64,
    }

    impl Shard {
        fn remove(&mut self, key: &str) {
            if let Some(old) = self.entries.remove(key) {
                self.bytes -= old.cost;
            }
            // Removals leave stale slots behind; compact before they outnumber the live ones.
            if self.order.len() > 2 * self.entries.len() + 64 {
                let entries = &self.entries;
                self.order.retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
            }
        }

        fn insert(&mut self, key: String, record: Arc<CachedRegistration>, cost: usize, budget: usize) {
            self.remove(&key);
            if cost > budget {
                return;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            self.order.push_back((key.clone(), generation));
            self.entries.insert(key, Entry { record, cost, generation });
            self.bytes += cost;
            while self.bytes > budget {
                let Some((oldest, generation)) = self.order.pop_front() else { break };
                if self.entries.get(&oldest).is_some_and(|e| e.generation == generation) {
                    self.remove(&oldest);
                }
            }
        }
    }

    /// Registration records by key, bounded by memory, oldest insertion evicted first. Only the writer
    /// thread inserts (after `COMMIT`), so an entry is always the key's latest committed record.
    pub(super) struct RecordCache {
        hasher: RandomState,
        shards: Vec<Mutex<Shard>>,
        budget_per_shard: usize,
    }

    impl RecordCache {
        /// A cache of about `bytes` (0: caches nothing).
        pub(super) fn new(bytes: usize) -> Self {
            RecordCache {
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                budget_per_shard: bytes / SHARDS,
            }
        }

        fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
            let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
            self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(super) fn get(&self, key: &str) -> Option<Arc<CachedRegistration>> {
            if self.budget_per_shard == 0 {
                return None;
            }
            self.shard(key).entries.get(key).map(|e| Arc::clone(&e.record))
        }

        /// Stores `key`'s newly committed record; `json_len` is the size of its stored JSON.
        pub(super) fn put(&self, key: &str, record: CachedRegistration, json_len: usize) {
            if self.budget_per_shard == 0 {
                return;
            }
            // About 96 bytes per history entry (two strings and a timestamp).
            let cost = json_len.saturating_add(ENTRY_OVERHEAD).saturating_add(record.operations.len() * 96);
            self.shard(key).insert(key.to_owned(), Arc::new(record), cost, self.budget_per_shard);
        }

        /// Forgets every record (another connection wrote to the database).
        pub(super) fn clear(&self) {
            for shard in &self.shards {
                let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard.entries.clear();
                shard.order.clear();
                shard.bytes = 0;
            }
        }

        /// Forgets `key` (deleted, or its state in the database is unsure).
        pub(super) fn remove(&self, key: &str) {
            if self.budget_per_shard == 0 {
                return;
            }
            self.shard(key).remove(key);
        }

        #[cfg(test)]
        pub(super) fn len_and_bytes(&self) -> (usize, usize) {
            self.shards.iter().fold((0, 0), |(n, b), s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                (n + s.entries.len(), b + s.bytes)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::proto::model::{RegistrationStatus, RegistrationSubstatus};
    use dps_core::proto::{OperationId, Timestamp};
    use dps_core::store::EnrollmentRef;

    fn record(id: &str, group: &str, etag: &str) -> RegistrationRecord {
        RegistrationRecord {
            registration_id: RegistrationId::parse(id).unwrap(),
            enrollment: EnrollmentRef::Group(EnrollmentGroupId::parse(group).unwrap()),
            operation_id: OperationId::parse("5.316aac5bdc130deb.8f1c2d3e-0000-4000-8000-000000000001")
                .unwrap(),
            status: RegistrationStatus::Assigned,
            substatus: Some(RegistrationSubstatus::InitialAssignment),
            assigned_hub: Some("hub1.azure-devices.net".into()),
            device_id: Some(id.into()),
            error_code: None,
            error_message: None,
            payload: None,
            created: Timestamp::from_unix_seconds(1_700_000_000),
            last_updated: Timestamp::from_unix_seconds(1_700_000_100),
            etag: Etag::parse(etag).unwrap(),
            x509: None,
            issued_certificate_chain: None,
        }
    }

    fn entry(record: RegistrationRecord) -> cache::CachedRegistration {
        cache::CachedRegistration { record, operations: Vec::new() }
    }

    /// `record` with operation number `n` (as issued at second `n`) and ETag `e{n}`.
    fn with_operation(id: &str, n: u32) -> RegistrationRecord {
        let mut r = record(id, "g", &format!("e{n}"));
        r.operation_id =
            OperationId::parse(&format!("5.316aac5bdc130deb.8f1c2d3e-0000-4000-8000-{n:012}")).unwrap();
        r.last_updated = Timestamp::from_unix_seconds(1_700_000_000 + i64::from(n));
        r
    }

    /// The operation IDs (last 12 characters) `LoadDeviceContext` reports for `id`.
    fn operations(store: &SqliteStore, id: &str) -> Vec<String> {
        match run(store, StoreOp::LoadDeviceContext { registration_id: RegistrationId::parse(id).unwrap() }) {
            StoreResult::DeviceContext(c) => c
                .operations
                .iter()
                .map(|o| {
                    let n = o.operation_id.as_str().rsplit('-').next().unwrap().parse::<i64>().unwrap();
                    assert_eq!(o.issued.unix_seconds() - 1_700_000_000, n);
                    n.to_string()
                })
                .collect(),
            other => panic!("unexpected result {other:?}"),
        }
    }

    #[test]
    fn operation_histories_round_trip_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        commit(&store, with_operation("dev-1", 1), None);
        // The same operation committed again (assigning, then assigned) is one entry.
        let mut again = with_operation("dev-1", 1);
        again.etag = Etag::parse("e1b").unwrap();
        commit(&store, again, Some("e1"));
        commit(&store, with_operation("dev-1", 2), Some("e1b"));
        assert_eq!(operations(&store, "dev-1"), ["1", "2"]);
        // A commit that loses its precondition adds nothing.
        let stale = StoreOp::CommitRegistration {
            record: Box::new(with_operation("dev-1", 3)),
            expected: Some(Etag::parse("e1").unwrap()),
        };
        assert_eq!(BlockingStore::execute(&store, stale).unwrap_err(), StoreError::Conflict);
        store.close().unwrap();

        // From the database (no cache), after reopening.
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(cached(&store), 0);
        assert_eq!(operations(&store, "dev-1"), ["1", "2"]);
        for n in 3..=12 {
            commit(&store, with_operation("dev-1", n), Some(&format!("e{}", n - 1)));
        }
        let newest: Vec<String> = (5..=12).map(|n| n.to_string()).collect();
        assert_eq!(operations(&store, "dev-1"), newest);
        store.close().unwrap();
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(operations(&store, "dev-1"), newest);
        // Deleting the record drops its history; a new record starts a new one.
        let delete = StoreOp::DeleteRegistration {
            registration_id: RegistrationId::parse("dev-1").unwrap(),
            if_match: None,
        };
        run(&store, delete);
        assert!(operations(&store, "dev-1").is_empty());
        commit(&store, with_operation("dev-1", 20), None);
        assert_eq!(operations(&store, "dev-1"), ["20"]);
        store.close().unwrap();
    }

    #[test]
    fn a_row_written_without_a_history_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
        {
            // A row as builds before operation histories wrote it: the record's JSON alone.
            let conn = Connection::open(&path).unwrap();
            let r = with_operation("dev-1", 1);
            conn.execute(
                "INSERT INTO registrations (key, group_key, etag, json) VALUES (?1, ?2, ?3, ?4)",
                params!["dev-1", "g", "e1", serde_json::to_string(&r).unwrap()],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(context(&store, "dev-1"), (false, Some("e1".into())));
        assert!(operations(&store, "dev-1").is_empty());
        // Its next commit starts a history; the service API still reads the plain record.
        commit(&store, with_operation("dev-1", 2), Some("e1"));
        assert_eq!(operations(&store, "dev-1"), ["2"]);
        store.close().unwrap();
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(registration(&store, "dev-1").as_deref(), Some("e2"));
        assert_eq!(operations(&store, "dev-1"), ["2"]);
        let page = run(
            &store,
            StoreOp::QueryRegistrations {
                group_id: EnrollmentGroupId::parse("g").unwrap(),
                page: PageRequest { after: None, limit: 10 },
            },
        );
        assert!(matches!(page, StoreResult::Registrations(p) if p.items.len() == 1));
        store.close().unwrap();
    }

    fn enrollment(id: &str) -> IndividualEnrollment {
        serde_json::from_value(serde_json::json!({
            "registrationId": id,
            "attestation": {
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}
            },
            "provisioningStatus": "enabled",
        }))
        .unwrap()
    }

    fn run(store: &SqliteStore, op: StoreOp) -> StoreResult {
        BlockingStore::execute(store, op).unwrap()
    }

    fn commit(store: &SqliteStore, r: RegistrationRecord, expected: Option<&str>) {
        let expected = expected.map(|e| Etag::parse(e).unwrap());
        assert!(matches!(
            run(store, StoreOp::CommitRegistration { record: Box::new(r), expected }),
            StoreResult::Done
        ));
    }

    /// (individual enrollment found, registration record's ETag) as `LoadDeviceContext` sees them.
    fn context(store: &SqliteStore, id: &str) -> (bool, Option<String>) {
        match run(store, StoreOp::LoadDeviceContext { registration_id: RegistrationId::parse(id).unwrap() }) {
            StoreResult::DeviceContext(c) => {
                (c.individual.is_some(), c.registration.map(|r| r.etag.as_str().to_owned()))
            }
            other => panic!("unexpected result {other:?}"),
        }
    }

    fn registration(store: &SqliteStore, id: &str) -> Option<String> {
        match run(store, StoreOp::GetRegistration { registration_id: RegistrationId::parse(id).unwrap() }) {
            StoreResult::Registration(r) => r.map(|r| r.etag.as_str().to_owned()),
            other => panic!("unexpected result {other:?}"),
        }
    }

    fn cached(store: &SqliteStore) -> usize {
        store.shared.state.registrations.len_and_bytes().0
    }

    #[test]
    fn in_memory_views_follow_every_committed_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();

        // Registration records: committed ones are served from the cache, updates and deletes show at once.
        assert_eq!(context(&store, "dev-1"), (false, None));
        commit(&store, record("dev-1", "g", "e1"), None);
        assert_eq!(cached(&store), 1);
        assert_eq!(context(&store, "dev-1"), (false, Some("e1".into())));
        assert_eq!(registration(&store, "dev-1").as_deref(), Some("e1"));
        commit(&store, record("dev-1", "g", "e2"), Some("e1"));
        assert_eq!(context(&store, "dev-1"), (false, Some("e2".into())));
        // A commit whose precondition fails changes neither the database nor the cache.
        let stale = StoreOp::CommitRegistration {
            record: Box::new(record("dev-1", "g", "e3")),
            expected: Some(Etag::parse("e1").unwrap()),
        };
        assert!(matches!(BlockingStore::execute(&store, stale), Err(StoreError::Conflict)));
        assert_eq!(registration(&store, "dev-1").as_deref(), Some("e2"));
        let delete = StoreOp::DeleteRegistration {
            registration_id: RegistrationId::parse("dev-1").unwrap(),
            if_match: None,
        };
        assert!(matches!(run(&store, delete), StoreResult::Done));
        assert_eq!(cached(&store), 0);
        assert_eq!(context(&store, "dev-1"), (false, None));
        assert_eq!(registration(&store, "dev-1"), None);

        // Individual enrollments: the ID set follows creates and deletes.
        let put = |id: &str| StoreOp::PutEnrollment {
            enrollment: Box::new(enrollment(id)),
            condition: WriteCondition::Upsert,
        };
        run(&store, put("ind-1"));
        run(&store, put("ind-1"));
        run(&store, put("ind-2"));
        assert!(context(&store, "ind-1").0);
        assert!(context(&store, "ind-2").0);
        assert!(!context(&store, "dev-1").0);
        let delete = |id: &str| StoreOp::DeleteEnrollment {
            registration_id: RegistrationId::parse(id).unwrap(),
            if_match: None,
        };
        run(&store, delete("ind-1"));
        assert!(!context(&store, "ind-1").0);
        // `ind-1` was created, then replaced (still one key), then deleted; `ind-2` is untouched.
        assert!(context(&store, "ind-2").0);
        commit(&store, record("dev-2", "g", "e9"), None);
        store.close().unwrap();

        // After a restart: the ID set is loaded from the database, and records come from it until committed
        // again.
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(cached(&store), 0);
        assert!(context(&store, "ind-2").0);
        assert!(!context(&store, "ind-1").0);
        assert_eq!(context(&store, "dev-2"), (false, Some("e9".into())));
        store.close().unwrap();

        // The same answers with the record cache off.
        let options = SqliteOptions { registration_cache_bytes: 0, ..SqliteOptions::default() };
        let store = SqliteStore::open(&path, options).unwrap();
        commit(&store, record("dev-3", "g", "e4"), None);
        assert_eq!(cached(&store), 0);
        assert_eq!(context(&store, "dev-3"), (false, Some("e4".into())));
        assert_eq!(registration(&store, "dev-2").as_deref(), Some("e9"));
        store.close().unwrap();
    }

    #[test]
    fn the_record_cache_stays_within_its_budget() {
        let budget = 16 * 1024;
        let cache = cache::RecordCache::new(budget);
        for i in 0..1000 {
            let id = format!("dev-{i}");
            cache.put(&id, entry(record(&id, "g", "e")), 100);
            // The newest record is always there (it fits its shard's budget).
            assert!(cache.get(&id).is_some());
        }
        let (n, bytes) = cache.len_and_bytes();
        assert!(bytes <= budget, "{bytes} bytes cached");
        assert!(n > 0 && n < 1000, "{n} records cached");
        // Oldest first: the first record is gone.
        assert!(cache.get("dev-0").is_none());
        // Removing and putting again many times leaves no garbage behind.
        for _ in 0..10_000 {
            cache.remove("dev-999");
            cache.put("dev-999", entry(record("dev-999", "g", "e")), 100);
        }
        assert!(cache.get("dev-999").is_some());
        assert!(cache.len_and_bytes().1 <= budget);
        // A record larger than a shard's budget is not cached; a zero budget caches nothing.
        cache.put("huge", entry(record("huge", "g", "e")), budget);
        assert!(cache.get("huge").is_none());
        let off = cache::RecordCache::new(0);
        off.put("dev-1", entry(record("dev-1", "g", "e")), 10);
        assert!(off.get("dev-1").is_none());
    }

    #[test]
    fn the_key_set_counts_keys_per_hash() {
        let set = cache::KeySet::new();
        // Unknown until loaded: everything may be there.
        assert!(set.may_contain("a"));
        set.load(["a", "b"]);
        assert!(set.may_contain("a") && set.may_contain("b"));
        assert!(!set.may_contain("c"));
        set.added("c");
        assert!(set.may_contain("c"));
        set.removed("a");
        assert!(!set.may_contain("a"));
        // Two keys with one hash (here: the same key counted twice) survive the removal of one of them.
        set.added("x");
        set.added("x");
        set.removed("x");
        assert!(set.may_contain("x"));
        set.removed("x");
        assert!(!set.may_contain("x"));
        set.unknown();
        assert!(set.may_contain("never-added"));
    }
}
