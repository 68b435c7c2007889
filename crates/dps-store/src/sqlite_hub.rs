//! A durable IoT hub directory: every hub's device identities (keys) and twins (tags, desired properties,
//! capabilities) in one SQLite file (WAL, `synchronous=FULL`), so that a restarted server still finds the
//! twins it must migrate (spec §9.2). The same file holds a small per-day usage table (billable operations,
//! spec §10.3) written by the server.
//!
//! One worker thread owns the read-write connection. Every operation (blocking or async) is sent to it over
//! a channel; it takes whatever has queued up and applies it in one transaction, answering each caller after
//! the `COMMIT` (and its fsync) returned, so an acknowledged upsert survives a crash. Under load it first
//! collects requests for a short window (as the store's writer does), so concurrent registrations share one
//! fsync; usage counts are added up in memory and ride on the next transaction. Readers that only look
//! (the admin CLI) open the file read-only with [`HubDatabase::open_read_only`].

use dps_core::hub::{
    AsyncHubDirectory, BlockingHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubDevice,
    HubError, HubOp, HubResult,
};
use dps_seal::{is_sealed, Sealer};
use futures::channel::oneshot;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The schema version stored in the hub database's `user_version`.
pub const HUB_SCHEMA_VERSION: i64 = 2;

/// At most this many queued requests share one transaction.
const MAX_BATCH: usize = 256;

/// Under load (the previous transaction carried more than one request), how long the worker collects
/// requests before its next transaction (the store writer's default window).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// Usage counts ride on the next hub transaction; with no hub write for this long they are written on
/// their own. A process killed outright loses at most this much metering (never a device or a twin).
pub const USAGE_FLUSH: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hub_devices (
    hub TEXT NOT NULL,
    device_id TEXT NOT NULL,
    primary_key TEXT NOT NULL,
    secondary_key TEXT NOT NULL,
    tags TEXT NOT NULL,
    desired TEXT NOT NULL,
    iot_edge INTEGER NOT NULL,
    auth_type TEXT NOT NULL DEFAULT 'sas',
    PRIMARY KEY (hub, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    id_scope TEXT NOT NULL,
    day TEXT NOT NULL,
    operation TEXT NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    PRIMARY KEY (id_scope, day, operation)
) WITHOUT ROWID;
";

/// One day's count of one billable operation in one ID scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The ID scope.
    pub id_scope: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// The operation's stable name (e.g. `device_register`).
    pub operation: String,
    /// Successful (billed) calls.
    pub succeeded: u64,
    /// Failed (not billed) calls.
    pub failed: u64,
}

/// Usage to add to the usage table: one call of `operation` on `day` in `id_scope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// The ID scope.
    pub id_scope: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// The operation's stable name.
    pub operation: String,
    /// Whether the call succeeded.
    pub succeeded: bool,
}

enum Job {
    Hub(HubOp, oneshot::Sender<Result<HubResult, HubError>>),
    Device(String, String, oneshot::Sender<Result<Option<HubDevice>, HubError>>),
    Devices(String, oneshot::Sender<Result<Vec<HubDevice>, HubError>>),
    Usage(UsageEvent),
    UsageRows(Option<String>, oneshot::Sender<Result<Vec<UsageRow>, HubError>>),
    Sync(oneshot::Sender<Result<(), HubError>>),
}

struct Shared {
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let sender = self.sender.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        drop(sender);
        if let Some(worker) = self.worker.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = worker.join();
        }
    }
}

/// A durable hub directory in one SQLite file. Cheap to clone (one `Arc`); implements
/// [`BlockingHubDirectory`] and [`AsyncHubDirectory`].
#[derive(Clone)]
pub struct SqliteHubDirectory {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteHubDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteHubDirectory").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

fn db_error(context: &str, e: impl std::fmt::Display) -> HubError {
    HubError { hub: "*".to_owned(), message: format!("hub database: {context}: {e}") }
}

fn hub_error(hub: &str, e: impl std::fmt::Display) -> HubError {
    HubError { hub: hub.to_owned(), message: format!("hub database: {e}") }
}

fn closed() -> HubError {
    HubError { hub: "*".to_owned(), message: "hub database: closed".to_owned() }
}

impl SqliteHubDirectory {
    /// Opens (creating if needed) the hub database at `path` and starts its worker thread, with the
    /// [`DEFAULT_BATCH_WINDOW`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteHubDirectory, HubError> {
        SqliteHubDirectory::open_with(path, DEFAULT_BATCH_WINDOW)
    }

    /// [`open`](Self::open) with a collection window: under load the worker waits `batch_window` before
    /// each transaction so that concurrent upserts share its fsync (zero commits every request at once).
    pub fn open_with(path: impl AsRef<Path>, batch_window: Duration) -> Result<SqliteHubDirectory, HubError> {
        SqliteHubDirectory::open_sealed(path, batch_window, None)
    }

    /// [`open_with`](Self::open_with) with encryption at rest: with a sealer, the keys of every SAS
    /// device written are sealed in their columns, bound to the hub, device and column, and opened when
    /// read. Rows written without sealing are read as they are and sealed on their next upsert.
    pub fn open_sealed(
        path: impl AsRef<Path>,
        batch_window: Duration,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<SqliteHubDirectory, HubError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(|e| db_error(&path.display().to_string(), e))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
            .map_err(|e| db_error("pragmas", e))?;
        let version: i64 =
            conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| db_error("version", e))?;
        if version > HUB_SCHEMA_VERSION {
            return Err(db_error(
                "schema",
                format!("version {version} is newer than this build's {HUB_SCHEMA_VERSION}"),
            ));
        }
        conn.execute_batch(SCHEMA).map_err(|e| db_error("schema", e))?;
        if version < 2 {
            // Version 2: how the device authenticates (`sas`, `selfSigned`: the key columns hold the
            // thumbprints, `certificateAuthority`: they are empty). Devices written before were all `sas`.
            let has: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('hub_devices') WHERE name = 'auth_type'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| db_error("schema", e))?;
            if has == 0 {
                conn.execute_batch(
                    "ALTER TABLE hub_devices ADD COLUMN auth_type TEXT NOT NULL DEFAULT 'sas'",
                )
                .map_err(|e| db_error("schema", e))?;
            }
        }
        conn.execute_batch(&format!("PRAGMA user_version={HUB_SCHEMA_VERSION}"))
            .map_err(|e| db_error("schema", e))?;
        let (sender, receiver) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("dps-hub-db".to_owned())
            .spawn(move || worker(conn, receiver, batch_window, sealer))
            .map_err(|e| db_error("worker thread", e))?;
        Ok(SqliteHubDirectory {
            shared: Arc::new(Shared {
                path,
                sender: Mutex::new(Some(sender)),
                worker: Mutex::new(Some(worker)),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn send(&self, job: Job) -> Result<(), HubError> {
        let guard = self.shared.sender.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(s) => s.send(job).map_err(|_| closed()),
            None => Err(closed()),
        }
    }

    fn ask<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, HubError>>) -> Job,
    ) -> impl Future<Output = Result<T, HubError>> + Send + 'static
    where
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(job(tx));
        async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err(closed()))
        }
    }

    /// The device `device_id` on `hub` (None if absent or if the database cannot be read; see
    /// [`read_device`](Self::read_device) for the error).
    pub fn device(&self, hub: &str, device_id: &str) -> Option<HubDevice> {
        self.read_device(hub, device_id).ok().flatten()
    }

    /// The device `device_id` on `hub`, if registered. Blocks.
    pub fn read_device(&self, hub: &str, device_id: &str) -> Result<Option<HubDevice>, HubError> {
        futures::executor::block_on(
            self.ask(|tx| Job::Device(hub.to_ascii_lowercase(), device_id.to_owned(), tx)),
        )
    }

    /// Every device of `hub`, by device ID. Blocks.
    pub fn devices(&self, hub: &str) -> Result<Vec<HubDevice>, HubError> {
        futures::executor::block_on(self.ask(|tx| Job::Devices(hub.to_ascii_lowercase(), tx)))
    }

    /// Counts one call for the usage table. Counts are added up in memory and written with the next hub
    /// transaction, or on their own after [`USAGE_FLUSH`] without one; they are durable after
    /// [`sync`](Self::sync) or [`close`](Self::close). Does not block.
    pub fn record_usage(&self, event: UsageEvent) -> Result<(), HubError> {
        self.send(Job::Usage(event))
    }

    /// The usage rows of days `>= since` (every day when None), by scope, day and operation. Blocks.
    pub fn usage(&self, since: Option<&str>) -> Result<Vec<UsageRow>, HubError> {
        futures::executor::block_on(self.ask(|tx| Job::UsageRows(since.map(str::to_owned), tx)))
    }

    /// Waits until everything queued so far is committed. Blocks.
    pub fn sync(&self) -> Result<(), HubError> {
        futures::executor::block_on(self.ask(Job::Sync))
    }

    /// Commits what is queued and stops the worker thread; later operations fail. Blocks.
    pub fn close(&self) -> Result<(), HubError> {
        let sender = self.shared.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(sender);
        let worker = self.shared.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(worker) = worker {
            worker.join().map_err(|_| db_error("worker thread", "panicked"))?;
        }
        Ok(())
    }
}

impl BlockingHubDirectory for SqliteHubDirectory {
    fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        futures::executor::block_on(self.ask(|tx| Job::Hub(op, tx)))
    }
}

impl AsyncHubDirectory for SqliteHubDirectory {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        self.ask(|tx| Job::Hub(op, tx))
    }
}

/// Read-only access to a hub database file (for tools such as the admin CLI, while the server may be
/// running).
#[derive(Debug)]
pub struct HubDatabase {
    conn: Connection,
    sealer: Option<Arc<Sealer>>,
}

impl HubDatabase {
    /// Opens the file at `path` read-only (it must exist).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<HubDatabase, HubError> {
        let path = path.as_ref();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| db_error(&path.display().to_string(), e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| db_error("busy timeout", e))?;
        Ok(HubDatabase { conn, sealer: None })
    }

    /// Opens sealed device keys with `sealer` (without one, reading a sealed device is an error).
    pub fn with_sealer(mut self, sealer: Arc<Sealer>) -> HubDatabase {
        self.sealer = Some(sealer);
        self
    }

    /// The device `device_id` on `hub`, if registered.
    pub fn device(&self, hub: &str, device_id: &str) -> Result<Option<HubDevice>, HubError> {
        read_device(&self.conn, self.sealer.as_deref(), &hub.to_ascii_lowercase(), device_id)
    }

    /// Every device of `hub`, by device ID.
    pub fn devices(&self, hub: &str) -> Result<Vec<HubDevice>, HubError> {
        read_devices(&self.conn, self.sealer.as_deref(), &hub.to_ascii_lowercase())
    }

    /// The usage rows of days `>= since` (every day when None).
    pub fn usage(&self, since: Option<&str>) -> Result<Vec<UsageRow>, HubError> {
        read_usage(&self.conn, since)
    }
}

/// Usage counts waiting for a transaction: (scope, day, operation) → (succeeded, failed).
type PendingUsage = HashMap<(String, String, String), (i64, i64)>;

fn worker(
    mut conn: Connection,
    receiver: mpsc::Receiver<Job>,
    batch_window: Duration,
    sealer: Option<Arc<Sealer>>,
) {
    let mut usage = PendingUsage::new();
    let mut under_load = false;
    loop {
        // Usage counts alone never start a transaction: they ride on the next one, or are written on
        // their own after USAGE_FLUSH of quiet.
        let first = if usage.is_empty() {
            match receiver.recv() {
                Ok(j) => j,
                Err(_) => break,
            }
        } else {
            match receiver.recv_timeout(USAGE_FLUSH) {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    run_batch(&mut conn, sealer.as_deref(), Vec::new(), &mut usage);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        if let Job::Usage(event) = first {
            count_usage(&mut usage, event);
            continue;
        }
        if under_load && !batch_window.is_zero() {
            // As the store's writer does: sleep through the window instead of being woken by every write,
            // so a busy directory costs one transaction (and one fsync) per window, not one per upsert.
            std::thread::sleep(batch_window);
        }
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(Job::Usage(event)) => count_usage(&mut usage, event),
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        under_load = jobs.len() > 1;
        run_batch(&mut conn, sealer.as_deref(), jobs, &mut usage);
    }
    if !usage.is_empty() {
        run_batch(&mut conn, sealer.as_deref(), Vec::new(), &mut usage);
    }
}

fn count_usage(usage: &mut PendingUsage, event: UsageEvent) {
    let counts = usage.entry((event.id_scope, event.day, event.operation)).or_insert((0, 0));
    if event.succeeded {
        counts.0 += 1;
    } else {
        counts.1 += 1;
    }
}

enum Answer {
    Hub(oneshot::Sender<Result<HubResult, HubError>>, Result<HubResult, HubError>),
    Device(oneshot::Sender<Result<Option<HubDevice>, HubError>>, Result<Option<HubDevice>, HubError>),
    Devices(oneshot::Sender<Result<Vec<HubDevice>, HubError>>, Result<Vec<HubDevice>, HubError>),
    Usage(oneshot::Sender<Result<Vec<UsageRow>, HubError>>, Result<Vec<UsageRow>, HubError>),
    Sync(oneshot::Sender<Result<(), HubError>>),
}

impl Answer {
    /// Sends the answer; a failed commit turns every write's success into that error.
    fn send(self, commit: &Result<(), HubError>) {
        match self {
            Answer::Hub(tx, r) => {
                let _ = tx.send(match (r, commit) {
                    (Ok(_), Err(e)) => Err(e.clone()),
                    (r, _) => r,
                });
            }
            Answer::Device(tx, r) => {
                let _ = tx.send(r);
            }
            Answer::Devices(tx, r) => {
                let _ = tx.send(r);
            }
            Answer::Usage(tx, r) => {
                let _ = tx.send(r);
            }
            Answer::Sync(tx) => {
                let _ = tx.send(commit.clone());
            }
        }
    }
}

fn run_batch(conn: &mut Connection, sealer: Option<&Sealer>, jobs: Vec<Job>, usage: &mut PendingUsage) {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let e = db_error("begin", e);
            for job in jobs {
                match job {
                    Job::Hub(_, s) => drop(s.send(Err(e.clone()))),
                    Job::Device(_, _, s) => drop(s.send(Err(e.clone()))),
                    Job::Devices(_, s) => drop(s.send(Err(e.clone()))),
                    Job::UsageRows(_, s) => drop(s.send(Err(e.clone()))),
                    Job::Sync(s) => drop(s.send(Err(e.clone()))),
                    Job::Usage(_) => {}
                }
            }
            // The pending usage counts stay queued for the next transaction.
            return;
        }
    };
    // Usage first, so that a `UsageRows` or `Sync` in this batch sees (or waits for) every count queued
    // before it. A usage row that cannot be written must not fail the hub writes sharing the transaction.
    let mut usage_written = true;
    for ((id_scope, day, operation), (succeeded, failed)) in usage.iter() {
        usage_written &= add_usage(&tx, id_scope, day, operation, *succeeded, *failed).is_ok();
    }
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job {
            Job::Hub(op, s) => answers.push(Answer::Hub(s, apply(&tx, sealer, op))),
            Job::Device(hub, id, s) => answers.push(Answer::Device(s, read_device(&tx, sealer, &hub, &id))),
            Job::Devices(hub, s) => answers.push(Answer::Devices(s, read_devices(&tx, sealer, &hub))),
            Job::UsageRows(since, s) => answers.push(Answer::Usage(s, read_usage(&tx, since.as_deref()))),
            Job::Sync(s) => answers.push(Answer::Sync(s)),
            Job::Usage(event) => count_usage(usage, event),
        }
    }
    let commit = tx.commit().map_err(|e| db_error("commit", e));
    if commit.is_ok() && usage_written {
        usage.clear();
    }
    for a in answers {
        a.send(&commit);
    }
}

fn apply(conn: &Connection, sealer: Option<&Sealer>, op: HubOp) -> Result<HubResult, HubError> {
    match op {
        HubOp::UpsertDevice { hub, identity, twin, replace_twin } => {
            let hub_key = hub.to_ascii_lowercase();
            let tags = serde_json::to_string(&twin.tags).map_err(|e| hub_error(&hub, e))?;
            let desired = serde_json::to_string(&twin.desired).map_err(|e| hub_error(&hub, e))?;
            let sql = if replace_twin {
                "INSERT INTO hub_devices (hub, device_id, primary_key, secondary_key, tags, desired, iot_edge,
                   auth_type)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (hub, device_id) DO UPDATE SET primary_key = excluded.primary_key,
                   secondary_key = excluded.secondary_key, tags = excluded.tags, desired = excluded.desired,
                   iot_edge = excluded.iot_edge, auth_type = excluded.auth_type"
            } else {
                "INSERT INTO hub_devices (hub, device_id, primary_key, secondary_key, tags, desired, iot_edge,
                   auth_type)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (hub, device_id) DO UPDATE SET primary_key = excluded.primary_key,
                   secondary_key = excluded.secondary_key, auth_type = excluded.auth_type"
            };
            let (first, second) = match &identity.authentication {
                HubAuthentication::Sas { primary_key, secondary_key } => {
                    (primary_key.as_str(), secondary_key.as_str())
                }
                HubAuthentication::SelfSigned { primary_thumbprint, secondary_thumbprint } => {
                    (primary_thumbprint.as_str(), secondary_thumbprint.as_deref().unwrap_or(""))
                }
                HubAuthentication::CertificateAuthority => ("", ""),
            };
            // SAS keys are secrets; thumbprints (self-signed) are not.
            let sealed = match (&identity.authentication, sealer) {
                (HubAuthentication::Sas { .. }, Some(sealer)) => {
                    let seal = |column: &str, value: &str| {
                        sealer
                            .seal_str(&["hub_devices", &hub_key, &identity.device_id, column], value)
                            .map_err(|e| hub_error(&hub, format!("sealing a device key: {e}")))
                    };
                    Some((seal("primary_key", first)?, seal("secondary_key", second)?))
                }
                _ => None,
            };
            let (first, second) = match &sealed {
                Some((p, s)) => (p.as_str(), s.as_str()),
                None => (first, second),
            };
            conn.prepare_cached(sql)
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        hub_key,
                        identity.device_id,
                        first,
                        second,
                        tags,
                        desired,
                        twin.iot_edge,
                        identity.authentication.type_name()
                    ])
                })
                .map_err(|e| hub_error(&hub, e))?;
            Ok(HubResult::Done)
        }
        HubOp::ReadTwin { hub, device_id } => {
            let device = read_device(conn, sealer, &hub.to_ascii_lowercase(), &device_id)?;
            Ok(HubResult::Twin(device.map(|d| d.twin)))
        }
        HubOp::DeleteDevice { hub, device_id } => {
            conn.execute(
                "DELETE FROM hub_devices WHERE hub = ?1 AND device_id = ?2",
                params![hub.to_ascii_lowercase(), device_id],
            )
            .map_err(|e| hub_error(&hub, e))?;
            Ok(HubResult::Done)
        }
        other => Err(db_error("operation", format!("unsupported hub operation {other:?}"))),
    }
}

type Row = (String, String, String, String, String, bool, String);

fn to_device(hub: &str, sealer: Option<&Sealer>, row: Row) -> Result<HubDevice, HubError> {
    let (device_id, mut first, mut second, tags, desired, iot_edge, auth_type) = row;
    for (column, value) in [("primary_key", &mut first), ("secondary_key", &mut second)] {
        if is_sealed(value) {
            let sealer = sealer.ok_or_else(|| {
                hub_error(
                    hub,
                    format!("device '{device_id}' has sealed keys and no encryption key was given"),
                )
            })?;
            *value = sealer
                .open_str(&["hub_devices", hub, &device_id, column], value)
                .map_err(|e| hub_error(hub, format!("device '{device_id}': {e}")))?;
        }
    }
    let json = |s: &str| serde_json::from_str::<Value>(s).map_err(|e| hub_error(hub, e));
    let authentication = match auth_type.as_str() {
        "sas" => HubAuthentication::Sas { primary_key: first, secondary_key: second },
        "selfSigned" => HubAuthentication::SelfSigned {
            primary_thumbprint: first,
            secondary_thumbprint: Some(second).filter(|s| !s.is_empty()),
        },
        "certificateAuthority" => HubAuthentication::CertificateAuthority,
        other => {
            return Err(hub_error(
                hub,
                format!("device '{device_id}' has unknown authentication type '{other}'"),
            ))
        }
    };
    Ok(HubDevice {
        identity: DeviceIdentity { device_id, authentication },
        twin: DeviceTwin { tags: json(&tags)?, desired: json(&desired)?, iot_edge },
    })
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn read_device(
    conn: &Connection,
    sealer: Option<&Sealer>,
    hub: &str,
    device_id: &str,
) -> Result<Option<HubDevice>, HubError> {
    let found = conn
        .prepare_cached(
            "SELECT device_id, primary_key, secondary_key, tags, desired, iot_edge, auth_type FROM hub_devices
             WHERE hub = ?1 AND device_id = ?2",
        )
        .and_then(|mut stmt| stmt.query_row(params![hub, device_id], row).optional())
        .map_err(|e| hub_error(hub, e))?;
    found.map(|r| to_device(hub, sealer, r)).transpose()
}

fn read_devices(conn: &Connection, sealer: Option<&Sealer>, hub: &str) -> Result<Vec<HubDevice>, HubError> {
    let mut stmt = conn
        .prepare(
            "SELECT device_id, primary_key, secondary_key, tags, desired, iot_edge, auth_type FROM hub_devices
             WHERE hub = ?1 ORDER BY device_id",
        )
        .map_err(|e| hub_error(hub, e))?;
    let rows = stmt.query_map(params![hub], row).map_err(|e| hub_error(hub, e))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(to_device(hub, sealer, r.map_err(|e| hub_error(hub, e))?)?);
    }
    Ok(out)
}

fn add_usage(
    conn: &Connection,
    id_scope: &str,
    day: &str,
    operation: &str,
    succeeded: i64,
    failed: i64,
) -> Result<(), HubError> {
    conn.prepare_cached(
        "INSERT INTO usage (id_scope, day, operation, succeeded, failed) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id_scope, day, operation) DO UPDATE SET succeeded = succeeded + excluded.succeeded,
           failed = failed + excluded.failed",
    )
    .and_then(|mut stmt| stmt.execute(params![id_scope, day, operation, succeeded, failed]))
    .map_err(|err| db_error("usage", err))?;
    Ok(())
}

fn read_usage(conn: &Connection, since: Option<&str>) -> Result<Vec<UsageRow>, HubError> {
    let mut stmt = conn
        .prepare(
            "SELECT id_scope, day, operation, succeeded, failed FROM usage WHERE day >= ?1
             ORDER BY id_scope, day, operation",
        )
        .map_err(|e| db_error("usage", e))?;
    let rows = stmt
        .query_map(params![since.unwrap_or("")], |r| {
            Ok(UsageRow {
                id_scope: r.get(0)?,
                day: r.get(1)?,
                operation: r.get(2)?,
                succeeded: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                failed: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
            })
        })
        .map_err(|e| db_error("usage", e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| db_error("usage", e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn upsert(hub: &str, id: &str, twin: DeviceTwin, replace_twin: bool) -> HubOp {
        HubOp::UpsertDevice {
            hub: hub.to_owned(),
            identity: DeviceIdentity::with_keys(id, "cA==".to_owned(), "cw==".to_owned()),
            twin,
            replace_twin,
        }
    }

    fn twin() -> DeviceTwin {
        DeviceTwin { tags: json!({"site": "a"}), desired: json!({"rate": 5}), iot_edge: true }
    }

    #[test]
    fn x509_identities_keep_their_authentication_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hubs.sqlite3");
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        let put = |id: &str, authentication: HubAuthentication| HubOp::UpsertDevice {
            hub: "hub".into(),
            identity: DeviceIdentity { device_id: id.into(), authentication },
            twin: DeviceTwin::default(),
            replace_twin: false,
        };
        let self_signed = HubAuthentication::SelfSigned {
            primary_thumbprint: "AB".repeat(32),
            secondary_thumbprint: Some("CD".repeat(32)),
        };
        let only_primary =
            HubAuthentication::SelfSigned { primary_thumbprint: "EF".repeat(32), secondary_thumbprint: None };
        BlockingHubDirectory::execute(&hubs, put("x1", self_signed.clone())).unwrap();
        BlockingHubDirectory::execute(&hubs, put("x2", only_primary.clone())).unwrap();
        BlockingHubDirectory::execute(&hubs, put("ca", HubAuthentication::CertificateAuthority)).unwrap();
        hubs.close().unwrap();
        drop(hubs);
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        assert_eq!(hubs.device("hub", "x1").unwrap().identity.authentication, self_signed);
        assert_eq!(hubs.device("hub", "x2").unwrap().identity.authentication, only_primary);
        let ca = hubs.device("hub", "ca").unwrap().identity;
        assert_eq!(ca.authentication, HubAuthentication::CertificateAuthority);
        assert_eq!(ca.primary_key(), None);
    }

    #[test]
    fn a_version_1_database_is_upgraded_and_its_devices_stay_sas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hubs.sqlite3");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE hub_devices (hub TEXT NOT NULL, device_id TEXT NOT NULL, primary_key TEXT NOT NULL,
                   secondary_key TEXT NOT NULL, tags TEXT NOT NULL, desired TEXT NOT NULL, iot_edge INTEGER NOT NULL,
                   PRIMARY KEY (hub, device_id)) WITHOUT ROWID;
                 INSERT INTO hub_devices VALUES ('hub', 'old', 'cA==', 'cw==', '{}', '{}', 0);
                 PRAGMA user_version=1;",
            )
            .unwrap();
        }
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        let old = hubs.device("hub", "old").unwrap().identity;
        assert_eq!(old, DeviceIdentity::with_keys("old", "cA==".into(), "cw==".into()));
    }

    #[test]
    fn reopen_keeps_devices_and_twins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hubs.sqlite3");
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        BlockingHubDirectory::execute(&hubs, upsert("Hub-1.example", "d1", twin(), false)).unwrap();
        BlockingHubDirectory::execute(&hubs, upsert("hub-1.example", "d2", DeviceTwin::default(), false))
            .unwrap();
        hubs.close().unwrap();
        drop(hubs);

        let hubs = SqliteHubDirectory::open(&path).unwrap();
        let d1 = hubs.device("hub-1.example", "d1").unwrap();
        assert_eq!(d1.twin, twin());
        assert_eq!(d1.identity.primary_key(), Some("cA=="));
        assert_eq!(d1.identity.secondary_key(), Some("cw=="));
        assert_eq!(hubs.devices("HUB-1.example").unwrap().len(), 2);
        assert_eq!(
            BlockingHubDirectory::execute(
                &hubs,
                HubOp::ReadTwin { hub: "hub-1.example".into(), device_id: "d1".into() }
            )
            .unwrap(),
            HubResult::Twin(Some(twin()))
        );
        assert_eq!(
            BlockingHubDirectory::execute(
                &hubs,
                HubOp::ReadTwin { hub: "hub-2.example".into(), device_id: "d1".into() }
            )
            .unwrap(),
            HubResult::Twin(None)
        );
        let ro = HubDatabase::open_read_only(&path).unwrap();
        assert_eq!(ro.device("hub-1.example", "d1").unwrap().unwrap().twin, twin());
        drop(ro);
        hubs.close().unwrap();
    }

    #[test]
    fn upsert_keeps_or_replaces_the_twin_and_delete_removes() {
        let dir = tempfile::tempdir().unwrap();
        let hubs = SqliteHubDirectory::open(dir.path().join("h.sqlite3")).unwrap();
        futures::executor::block_on(AsyncHubDirectory::execute(&hubs, upsert("h", "d", twin(), true)))
            .unwrap();
        BlockingHubDirectory::execute(&hubs, upsert("h", "d", DeviceTwin::default(), false)).unwrap();
        assert_eq!(hubs.device("h", "d").unwrap().twin, twin());
        BlockingHubDirectory::execute(&hubs, upsert("h", "d", DeviceTwin::default(), true)).unwrap();
        assert_eq!(hubs.device("h", "d").unwrap().twin, DeviceTwin::default());
        BlockingHubDirectory::execute(&hubs, HubOp::DeleteDevice { hub: "H".into(), device_id: "d".into() })
            .unwrap();
        assert!(hubs.device("h", "d").is_none());
        hubs.close().unwrap();
        assert!(BlockingHubDirectory::execute(&hubs, upsert("h", "d", twin(), true)).is_err());
    }

    #[test]
    fn usage_adds_up_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite3");
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        let ev = |day: &str, ok: bool| UsageEvent {
            id_scope: "0ne1".into(),
            day: day.into(),
            operation: "device_register".into(),
            succeeded: ok,
        };
        hubs.record_usage(ev("2026-01-01", true)).unwrap();
        hubs.record_usage(ev("2026-01-02", true)).unwrap();
        hubs.record_usage(ev("2026-01-02", true)).unwrap();
        hubs.record_usage(ev("2026-01-02", false)).unwrap();
        hubs.close().unwrap();
        let ro = HubDatabase::open_read_only(&path).unwrap();
        let rows = ro.usage(Some("2026-01-02")).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].succeeded, rows[0].failed), (2, 1));
        assert_eq!(ro.usage(None).unwrap().len(), 2);
    }

    #[test]
    fn usage_is_visible_to_the_server_at_once_and_on_disk_after_a_quiet_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite3");
        let hubs = SqliteHubDirectory::open(&path).unwrap();
        let ev = UsageEvent {
            id_scope: "0ne1".into(),
            day: "2026-03-04".into(),
            operation: "device_register".into(),
            succeeded: true,
        };
        hubs.record_usage(ev.clone()).unwrap();
        hubs.record_usage(ev.clone()).unwrap();
        // The server's own report includes counts not written yet.
        let rows = hubs.usage(None).unwrap();
        assert_eq!((rows.len(), rows[0].succeeded), (1, 2));
        // Counts after a write ride on a hub transaction; with none, they reach the file on their own.
        hubs.record_usage(ev.clone()).unwrap();
        std::thread::sleep(USAGE_FLUSH + Duration::from_millis(500));
        let ro = HubDatabase::open_read_only(&path).unwrap();
        assert_eq!(ro.usage(None).unwrap()[0].succeeded, 3);
        // A hub write commits the counts queued before it.
        hubs.record_usage(ev).unwrap();
        BlockingHubDirectory::execute(&hubs, upsert("h", "d9", twin(), false)).unwrap();
        assert_eq!(ro.usage(None).unwrap()[0].succeeded, 4);
        hubs.close().unwrap();
    }

    #[test]
    fn concurrent_upserts_under_a_window_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite3");
        let hubs = SqliteHubDirectory::open_with(&path, Duration::from_millis(5)).unwrap();
        let ops: Vec<_> = (0..200)
            .map(|i| AsyncHubDirectory::execute(&hubs, upsert("h", &format!("d{i}"), twin(), true)))
            .collect();
        for r in futures::executor::block_on(futures::future::join_all(ops)) {
            r.unwrap();
        }
        hubs.close().unwrap();
        let ro = HubDatabase::open_read_only(&path).unwrap();
        assert_eq!(ro.devices("h").unwrap().len(), 200);
    }
}
