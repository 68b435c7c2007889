//! A real PostgreSQL for tests (features `testing` and `postgres`): no pre-existing server needed.
//!
//! [`cluster_url`] is the cluster every test of the process shares: the one named by the environment
//! variable `DPS_TEST_POSTGRES_URL` (what `scripts/check.sh` sets, after starting one cluster for the whole
//! run with `scripts/pg.sh start`), or else a throwaway cluster this process starts with
//! `scripts/pg.sh serve <pid>` (initdb in a temporary directory, a free loopback port; the script stops
//! and removes it when this process exits). [`fresh_database`] gives each test an empty schema of its
//! own in that cluster, so tests run in parallel without seeing each other's rows.
//!
//! This is test code: it panics when no cluster can be had (a test that needs PostgreSQL must fail, never
//! skip silently).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming a running cluster (`postgres://user:password@host:port/db`).
pub const URL_VAR: &str = "DPS_TEST_POSTGRES_URL";

/// The cluster this process started (kept so that it is never waited for; the script watches our PID).
static STARTED: Mutex<Option<Child>> = Mutex::new(None);
static URL: OnceLock<String> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The URL of the shared test cluster (started on first use when `DPS_TEST_POSTGRES_URL` is not set).
pub fn cluster_url() -> &'static str {
    URL.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => start_cluster(),
    })
}

fn start_cluster() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .arg("serve")
        .arg(std::process::id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {script}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading pg.sh's output");
        if let Some(u) = line.strip_prefix(&format!("{URL_VAR}=")) {
            url = Some(u.to_owned());
        }
        if line.starts_with("DPS_TEST_POSTGRES_DIR=") {
            break;
        }
    }
    let url = url.unwrap_or_else(|| {
        panic!("{script} serve did not start a PostgreSQL cluster (see its output above)")
    });
    *STARTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    url
}

/// Runs SQL statements on the cluster as its superuser (a connection of its own).
pub fn admin_sql(sql: &str) {
    admin_sql_on(cluster_url(), sql)
}

/// Runs SQL statements on the database at `url`.
pub fn admin_sql_on(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    on_own_runtime(move || async move {
        let (url, sql) = (url.as_str(), sql.as_str());
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test cluster: {e}"));
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap_or_else(|e| panic!("running {sql:?}: {e:?}"));
        drop(client);
        let _ = driver.await;
    })
}

/// Runs the future `make` builds on a runtime of its own, on a thread of its own (so that it also works
/// from inside an async test), and returns its output.
fn on_own_runtime<T, F>(make: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(make())
    })
    .join()
    .unwrap_or_else(|_| panic!("the test cluster task panicked (see above)"))
}

/// The first column (as text) of every row `sql` returns on the database at `url`.
pub fn query_text_on(url: &str, sql: &str) -> Vec<String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    on_own_runtime(move || async move {
        let (url, sql) = (url.as_str(), sql.as_str());
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test cluster: {e}"));
        let driver = tokio::spawn(connection);
        let rows = client.simple_query(sql).await.unwrap_or_else(|e| panic!("running {sql:?}: {e:?}"));
        drop(client);
        let _ = driver.await;
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
                _ => None,
            })
            .collect()
    })
}

/// A new, empty schema in the shared cluster, and the URL whose connections use it (its `search_path`).
/// The store's tables are created there by its migrations.
pub fn fresh_database() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let schema = format!("t_{}_{}_{}", std::process::id(), n, nanos);
    admin_sql(&format!("CREATE SCHEMA {schema}"));
    with_schema(cluster_url(), &schema)
}

/// `url` with connections using `schema` (libpq `options=-csearch_path=…`).
pub fn with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}
