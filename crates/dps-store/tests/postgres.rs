//! The PostgreSQL store on a real PostgreSQL (`dps_store::pg_testing`: the cluster of
//! `DPS_TEST_POSTGRES_URL`, or one this test process starts with `scripts/pg.sh`): the whole conformance
//! suite (blocking, async, sealed), then what only several processes on one database show: registration
//! races, If-Match races, the group and certificate cache across store instances, and the failures an
//! operator meets (unreachable server, wrong or missing password, newer schema, exhausted pool, a
//! connection lost mid-transaction).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The tests race threads, time failures and find free ports: the I/O the workspace bans in pure crates.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use dps_core::proto::model::ProvisioningStatus;
use dps_core::store::{BlockingStore, StoreError, StoreOp, StoreResult, WriteCondition};
use dps_store::pg_testing::{admin_sql, cluster_url, fresh_database, query_text_on};
use dps_store::seal::{DataKey, Sealer};
use dps_store::testing::*;
use dps_store::{PostgresOptions, PostgresStore, POSTGRES_SCHEMA_VERSION};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn options() -> PostgresOptions {
    PostgresOptions { max_connections: 4, worker_threads: 1, ..PostgresOptions::default() }
}

fn open(url: &str) -> PostgresStore {
    PostgresStore::connect(url, options(), None).unwrap()
}

fn fresh() -> PostgresStore {
    open(&fresh_database())
}

fn sealer() -> Arc<Sealer> {
    Arc::new(Sealer::new(vec![("t1".into(), DataKey::from_bytes([3u8; 32]))], "t1").unwrap())
}

fn fresh_sealed() -> PostgresStore {
    PostgresStore::connect(&fresh_database(), options(), Some(sealer())).unwrap()
}

dps_store::store_conformance_tests!(postgres, fresh());
dps_store::store_conformance_tests!(postgres_async, ViaAsync(fresh()));
dps_store::store_conformance_tests!(postgres_sealed, fresh_sealed());

/// `url` with its password replaced.
fn with_password(url: &str, password: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (credentials, host) = rest.split_once('@').unwrap();
    let user = credentials.split(':').next().unwrap();
    match password {
        Some(p) => format!("{scheme}://{user}:{p}@{host}"),
        None => format!("{scheme}://{user}@{host}"),
    }
}

fn backend_message(e: StoreError) -> String {
    match e {
        StoreError::Backend { message } => message,
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn data_survives_reconnect_and_migrations_run_once() {
    let url = fresh_database();
    let a = open(&url);
    assert_eq!(a.schema_version().unwrap(), POSTGRES_SCHEMA_VERSION);
    put_enrollment(&a, enrollment("dev-1", "e1"), WriteCondition::CreateOnly).unwrap();
    put_group(&a, sym_group("g1", "e1"), WriteCondition::CreateOnly).unwrap();
    commit(&a, record("dev-2", Some("g1"), "r1"), None).unwrap();
    drop(a);
    // Several replicas starting at once migrate once (the advisory lock) and all open.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || open(&url))
        })
        .collect();
    let stores: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for s in &stores {
        assert_eq!(get_enrollment(s, "dev-1"), Some(enrollment("dev-1", "e1")));
        let ctx = load(s, "dev-2");
        assert_eq!(group_ids(&ctx.groups), ["g1"]);
        assert_eq!(ctx.registration, Some(record("dev-2", Some("g1"), "r1")));
        assert_eq!(ctx.operations.len(), 1);
    }
}

#[test]
fn concurrent_first_registrations_across_replicas_make_one_record() {
    let url = fresh_database();
    let replicas: Vec<_> = (0..3).map(|_| open(&url)).collect();
    for round in 0..10 {
        let id = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(6));
        let outcomes: Vec<_> = (0..6)
            .map(|i| {
                let store = replicas[i % 3].clone();
                let (barrier, id) = (Arc::clone(&barrier), id.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    commit(&store, record(&id, None, &format!("r{i}")), None)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let won: Vec<_> = outcomes.iter().enumerate().filter(|(_, o)| o.is_ok()).map(|(i, _)| i).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
        assert!(outcomes.iter().filter(|o| o.is_err()).all(|o| *o == Err(StoreError::Conflict)));
        // Every replica reads the winner's record, with one operation in its history.
        for s in &replicas {
            assert_eq!(get_registration(s, &id).unwrap().etag.as_str(), format!("r{}", won[0]));
            assert_eq!(load(s, &id).operations.len(), 1);
        }
        // The next commits race on the winner's ETag: again exactly one wins.
        let expected = format!("r{}", won[0]);
        let barrier = Arc::new(Barrier::new(6));
        let outcomes: Vec<_> = (0..6)
            .map(|i| {
                let store = replicas[i % 3].clone();
                let (barrier, id, expected) = (Arc::clone(&barrier), id.clone(), expected.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    commit(&store, record(&id, None, &format!("s{i}")), Some(&expected))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let won: Vec<_> = outcomes.iter().enumerate().filter(|(_, o)| o.is_ok()).map(|(i, _)| i).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
        for s in &replicas {
            assert_eq!(load(s, &id).registration.unwrap().etag.as_str(), format!("s{}", won[0]));
        }
    }
}

#[test]
fn if_match_updates_across_replicas_never_lose_one() {
    let url = fresh_database();
    let replicas: Vec<_> = (0..2).map(|_| open(&url)).collect();
    put_enrollment(&replicas[0], enrollment("counter", "v0"), WriteCondition::CreateOnly).unwrap();
    // Each writer adds its increments with read-modify-write under If-Match, retrying on 412.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = replicas[w % 2].clone();
            std::thread::spawn(move || {
                let mut mine = 0;
                while mine < 15 {
                    let current = get_enrollment(&store, "counter").unwrap();
                    let n: u32 = current.device_id.as_deref().unwrap_or("0").parse().unwrap();
                    let mut next = current.clone();
                    next.device_id = Some((n + 1).to_string());
                    next.etag = Some(format!("v{}-{w}-{mine}", n + 1));
                    let condition = WriteCondition::IfMatch(if_match(current.etag.as_deref().unwrap()));
                    match put_enrollment(&store, next, condition) {
                        Ok(_) => mine += 1,
                        Err(StoreError::PreconditionFailed) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    writers.into_iter().for_each(|h| h.join().unwrap());
    for s in &replicas {
        assert_eq!(get_enrollment(s, "counter").unwrap().device_id.as_deref(), Some("60"));
    }
}

#[test]
fn a_group_disabled_through_one_replica_is_disabled_on_the_others() {
    let url = fresh_database();
    let (a, b) = (open(&url), open(&url));
    let g = put_group(&a, sym_group("g1", "e1"), WriteCondition::CreateOnly).unwrap();
    // b caches the group snapshot...
    assert_eq!(load(&b, "dev-1").groups[0].provisioning_status, Some(ProvisioningStatus::Enabled));
    // ...a disables the group: b's very next device context has it disabled (bound: zero).
    let mut disabled = g.clone();
    disabled.provisioning_status = Some(ProvisioningStatus::Disabled);
    disabled.etag = Some("e2".into());
    put_group(&a, disabled, WriteCondition::IfMatch(if_match("e1"))).unwrap();
    assert_eq!(load(&b, "dev-1").groups[0].provisioning_status, Some(ProvisioningStatus::Disabled));
    delete_group(&a, "g1", None).unwrap();
    assert!(load(&b, "dev-1").groups.is_empty());
    // Certificates ride on the same version.
    put_certificate(&b, ca("root", "c1"), WriteCondition::CreateOnly, Some(25)).unwrap();
    assert_eq!(certificate_names(&load(&a, "dev-1").certificates), ["root"]);
    delete_certificate(&b, "root", None).unwrap();
    assert!(load(&a, "dev-1").certificates.is_empty());
}

#[test]
fn the_group_limit_holds_across_replicas() {
    let url = fresh_database();
    let replicas: Vec<_> = (0..2).map(|_| open(&url)).collect();
    let barrier = Arc::new(Barrier::new(8));
    let created = (0..8)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                put_group_limited(
                    &store,
                    sym_group(&format!("g{i}"), "e1"),
                    WriteCondition::CreateOnly,
                    Some(3),
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(created, 3);
    assert_eq!(
        query_groups(
            &replicas[1],
            all(dps_core::proto::query::QuerySource::EnrollmentGroups),
            page(None, 100)
        )
        .items
        .len(),
        3
    );
}

#[test]
fn secrets_are_sealed_in_the_database() {
    let url = fresh_database();
    let store = PostgresStore::connect(&url, options(), Some(sealer())).unwrap();
    put_enrollment(&store, enrollment("dev-1", "e1"), WriteCondition::CreateOnly).unwrap();
    put_group(&store, sym_group("g1", "e1"), WriteCondition::CreateOnly).unwrap();
    let rows =
        query_text_on(&url, "SELECT json FROM enrollments UNION ALL SELECT json FROM enrollment_groups");
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert!(row.contains("sealed:v1:t1:"), "{row}");
        for secret in ["cHJpbWFyeQ==", "c2Vjb25kYXJ5", "a2V5", "a2V5Mg=="] {
            assert!(!row.contains(&format!("\"{secret}\"")), "{secret} in {row}");
        }
    }
    // Read back opened; a store without the keys refuses to read them.
    assert_eq!(get_enrollment(&store, "dev-1"), Some(enrollment("dev-1", "e1")));
    let message = backend_message(PostgresStore::connect(&url, options(), None).unwrap_err());
    assert!(message.contains("opened without encryption keys"), "{message}");
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_message() {
    let url = fresh_database();
    drop(open(&url));
    let schema = url.rsplit("search_path%3D").next().unwrap().to_owned();
    admin_sql(&format!("UPDATE {schema}.dps_schema SET version = {}", POSTGRES_SCHEMA_VERSION + 7));
    let message = backend_message(PostgresStore::connect(&url, options(), None).unwrap_err());
    assert!(message.contains(&format!("schema version {}", POSTGRES_SCHEMA_VERSION + 7)), "{message}");
    assert!(message.contains("newer than this build"), "{message}");
}

#[test]
fn a_wrong_or_missing_password_is_refused_at_once() {
    for password in [Some("not-the-password"), None] {
        let url = with_password(cluster_url(), password);
        let started = Instant::now();
        let message = backend_message(PostgresStore::connect(&url, options(), None).unwrap_err());
        assert!(started.elapsed() < Duration::from_secs(10), "authentication failures are not retried");
        assert!(message.contains("refused the credentials") || message.contains("password"), "{message}");
        assert!(!message.contains("not-the-password"), "the password is never shown: {message}");
    }
}

#[test]
fn an_unreachable_server_is_retried_then_reported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://dps:secret@127.0.0.1:{port}/postgres");
    let started = Instant::now();
    let options = PostgresOptions { connect_retry: Duration::from_millis(1500), ..options() };
    let message = backend_message(PostgresStore::connect(&url, options, None).unwrap_err());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(10), "{took:?}");
    assert!(message.contains(&format!("127.0.0.1:{port}")) && message.contains("attempts"), "{message}");
    assert!(!message.contains("secret"), "{message}");
}

/// Holds a row lock on `registrations` row `key` of the schema in `url` from a connection of its own until
/// the returned sender is dropped.
fn hold_row_lock(url: &str, table: &str, key: &str) -> std::sync::mpsc::Sender<()> {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (url, sql) = (url.to_owned(), format!("SELECT 1 FROM {table} WHERE key = '{key}' FOR UPDATE"));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut client, connection) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let tx = client.transaction().await.unwrap();
            assert_eq!(tx.query(&sql, &[]).await.unwrap().len(), 1);
            locked_tx.send(()).unwrap();
            let _ = tokio::task::spawn_blocking(move || release_rx.recv()).await;
            tx.rollback().await.unwrap();
        });
    });
    locked_rx.recv().unwrap();
    release_tx
}

#[test]
fn an_exhausted_pool_fails_fast_and_a_slow_write_times_out_whole() {
    let url = fresh_database();
    let options = PostgresOptions {
        max_connections: 1,
        pool_wait: Duration::from_millis(300),
        operation_timeout: Duration::from_secs(3),
        ..options()
    };
    let store = PostgresStore::connect(&url, options, None).unwrap();
    commit(&store, record("dev-1", None, "r1"), None).unwrap();
    let release = hold_row_lock(&url, "registrations", "dev-1");
    // The only connection waits on the lock...
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || commit(&store, record("dev-1", None, "r2"), Some("r1")))
    };
    std::thread::sleep(Duration::from_millis(300));
    // ...so another request gets the pool's refusal after its bounded wait, not a hang.
    let started = Instant::now();
    let message = backend_message(
        store.execute(StoreOp::GetRegistration { registration_id: rid("dev-2") }).unwrap_err(),
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(message.contains("pool is exhausted"), "{message}");
    // The blocked write gives up at the operation timeout and writes nothing.
    let message = backend_message(writer.join().unwrap().unwrap_err());
    assert!(message.contains("did not finish within"), "{message}");
    drop(release);
    assert_eq!(get_registration(&store, "dev-1").unwrap().etag.as_str(), "r1");
    commit(&store, record("dev-1", None, "r3"), Some("r1")).unwrap();
}

#[test]
fn a_connection_lost_mid_transaction_writes_nothing_and_the_store_recovers() {
    let url = fresh_database();
    let store = open(&url);
    put_group(&store, sym_group("g1", "e1"), WriteCondition::CreateOnly).unwrap();
    commit(&store, record("dev-1", Some("g1"), "r1"), None).unwrap();
    let release = hold_row_lock(&url, "registrations", "dev-1");
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || commit(&store, record("dev-1", Some("g1"), "r2"), Some("r1")))
    };
    std::thread::sleep(Duration::from_millis(300));
    // Kill the store's backend that is waiting inside its transaction.
    admin_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'dps-server' AND wait_event_type = 'Lock'",
    );
    let message = backend_message(writer.join().unwrap().unwrap_err());
    assert!(message.contains("PostgreSQL"), "{message}");
    drop(release);
    let ctx = load(&store, "dev-1");
    assert_eq!(ctx.registration.unwrap().etag.as_str(), "r1", "nothing half-written");
    assert_eq!(ctx.operations.len(), 1);
    commit(&store, record("dev-1", Some("g1"), "r2"), Some("r1")).unwrap();
    assert!(matches!(
        store.execute(StoreOp::GetRegistration { registration_id: rid("dev-1") }).unwrap(),
        StoreResult::Registration(Some(r)) if r.etag.as_str() == "r2"
    ));
}
