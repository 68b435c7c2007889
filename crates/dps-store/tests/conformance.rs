//! The store conformance suite (`dps_store::testing`, feature `testing`), run against every backend of this
//! crate (memory and SQLite, each through its blocking and its async interface). SQLite-only tests
//! (durability, migrations, group commit, several handles on one file) follow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_core::store::{AsyncStore, BlockingStore, StoreError, StoreOp, StoreResult, WriteCondition};
use dps_store::testing::*;
use dps_store::MemoryStore;
#[cfg(feature = "sqlite")]
use dps_store::{SqliteOptions, SqliteStore};

// ------------------------------------------------------------------------------------------------
// Backends
// ------------------------------------------------------------------------------------------------

#[cfg(feature = "sqlite")]
fn sqlite_options() -> SqliteOptions {
    SqliteOptions::default()
}

#[cfg(feature = "sqlite")]
fn open_sqlite(dir: &std::path::Path) -> SqliteStore {
    SqliteStore::open(dir.join("dps.db"), sqlite_options()).unwrap()
}

/// A SQLite store in its own temporary directory (removed after the store is closed).
#[cfg(feature = "sqlite")]
struct TempSqlite {
    store: Option<SqliteStore>,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "sqlite")]
impl TempSqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        TempSqlite { store: Some(open_sqlite(dir.path())), _dir: dir }
    }

    /// The same with encryption at rest (a fixed test data key).
    fn sealed() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dps_store::seal::DataKey::from_bytes([3u8; 32]);
        let sealer =
            std::sync::Arc::new(dps_store::seal::Sealer::new(vec![("t1".into(), key)], "t1").unwrap());
        let store =
            SqliteStore::open_sealed(dir.path().join("dps.db"), sqlite_options(), Some(sealer)).unwrap();
        TempSqlite { store: Some(store), _dir: dir }
    }

    fn store(&self) -> &SqliteStore {
        self.store.as_ref().unwrap()
    }
}

#[cfg(feature = "sqlite")]
impl Drop for TempSqlite {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            // Not while unwinding from a failed test: that would hide its message.
            if !std::thread::panicking() {
                store.close().unwrap();
            }
        }
    }
}

#[cfg(feature = "sqlite")]
impl BlockingStore for TempSqlite {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        BlockingStore::execute(self.store(), op)
    }
}

/// [`TempSqlite`] through its async interface.
#[cfg(feature = "sqlite")]
struct TempSqliteAsync(TempSqlite);

#[cfg(feature = "sqlite")]
impl BlockingStore for TempSqliteAsync {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        futures::executor::block_on(AsyncStore::execute(self.0.store(), op))
    }
}

dps_store::store_conformance_tests!(memory, MemoryStore::new());
dps_store::store_conformance_tests!(memory_async, ViaAsync(MemoryStore::new()));
#[cfg(feature = "sqlite")]
dps_store::store_conformance_tests!(sqlite, TempSqlite::new());
#[cfg(feature = "sqlite")]
dps_store::store_conformance_tests!(sqlite_async, TempSqliteAsync(TempSqlite::new()));
#[cfg(feature = "sqlite")]
dps_store::store_conformance_tests!(sqlite_sealed, TempSqlite::sealed());

// ------------------------------------------------------------------------------------------------
// SQLite only
// ------------------------------------------------------------------------------------------------

#[cfg(feature = "sqlite")]
mod sqlite_only {
    use super::*;
    use dps_core::proto::model::ProvisioningStatus;
    use std::collections::BTreeSet;

    #[test]
    fn sqlite_store_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<SqliteStore>();
        fn check_memory<T: Send + Sync + 'static>() {}
        check_memory::<MemoryStore>();
    }

    #[test]
    fn sqlite_data_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        put_enrollment(&store, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
        put_group(&store, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
        put_group(&store, group_with("g2", "x509", "e1", "enabled", CREATED), WriteCondition::Upsert)
            .unwrap();
        commit(&store, record("dev-2", Some("g1"), "r1"), None).unwrap();
        store.close().unwrap();

        let store = open_sqlite(dir.path());
        assert_eq!(get_enrollment(&store, "dev-1"), Some(enrollment("dev-1", "e1")));
        assert_eq!(get_group(&store, "g2").unwrap().enrollment_group_id, "g2");
        let ctx = load(&store, "dev-2");
        assert_eq!(group_ids(&ctx.groups), ["g1", "g2"], "group cache loaded at open");
        assert_eq!(ctx.registration, Some(record("dev-2", Some("g1"), "r1")));
        assert_eq!(query_registrations(&store, "g1", page(None, 10)).items.len(), 1);
        // Conditions still see the stored etags.
        assert_eq!(commit(&store, record("dev-2", None, "r2"), None), Err(StoreError::Conflict));
        commit(&store, record("dev-2", None, "r2"), Some("r1")).unwrap();
        store.close().unwrap();
    }

    #[test]
    fn sqlite_certificates_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        let mut root = ca("Root", "c1");
        root.is_verified = true;
        root.verification_code = Some("ABC".into());
        put_certificate(&store, root.clone(), WriteCondition::CreateOnly, Some(25)).unwrap();
        put_certificate(&store, ca("inter", "c1"), WriteCondition::CreateOnly, Some(25)).unwrap();
        store.close().unwrap();

        let store = open_sqlite(dir.path());
        assert_eq!(get_certificate(&store, "root"), Some(root.clone()));
        assert_eq!(certificate_names(&load(&store, "dev-1").certificates), ["inter", "Root"]);
        assert_eq!(
            put_certificate(&store, ca("root", "c2"), WriteCondition::IfMatch(if_match("zz")), None),
            Err(StoreError::PreconditionFailed)
        );
        delete_certificate(&store, "inter", Some(if_match("c1"))).unwrap();
        store.close().unwrap();
        let store = open_sqlite(dir.path());
        assert_eq!(list_certificates(&store), vec![root]);
        store.close().unwrap();
    }

    #[test]
    fn sqlite_second_handle_sees_certificates_written_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_handles(dir.path());
        assert!(load(&b, "dev-1").certificates.is_empty());
        put_certificate(&a, ca("root", "c1"), WriteCondition::Upsert, None).unwrap();
        assert_eq!(certificate_names(&load(&b, "dev-1").certificates), ["root"]);
        delete_certificate(&a, "root", None).unwrap();
        assert!(load(&b, "dev-1").certificates.is_empty());
        a.close().unwrap();
        b.close().unwrap();
    }

    #[test]
    fn sqlite_data_survives_drop_without_close() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_sqlite(dir.path());
            let clone = store.clone();
            commit(&clone, record("dev-1", None, "r1"), None).unwrap();
            drop(store);
            commit(&clone, record("dev-2", None, "r1"), None).unwrap();
        }
        let store = open_sqlite(dir.path());
        assert!(get_registration(&store, "dev-1").is_some());
        assert!(get_registration(&store, "dev-2").is_some());
    }

    #[test]
    fn sqlite_async_writes_queued_before_close_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        let other = store.clone();
        let futures: Vec<_> = (0..50)
            .map(|i| {
                AsyncStore::execute(
                    &store,
                    StoreOp::CommitRegistration {
                        record: Box::new(record(&format!("dev-{i}"), None, "r1")),
                        expected: None,
                    },
                )
            })
            .collect();
        // Closing (from another handle) stops new work but applies and answers what is queued; `close` returns
        // only once it is committed.
        other.close().unwrap();
        for r in futures::executor::block_on(futures::future::join_all(futures)) {
            assert!(matches!(r, Ok(StoreResult::Done)), "{r:?}");
        }
        drop(store);
        let store = open_sqlite(dir.path());
        for i in 0..50 {
            assert!(get_registration(&store, &format!("dev-{i}")).is_some());
        }
    }

    #[test]
    fn sqlite_migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        let user_version = || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap()
        };
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        put_enrollment(&store, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
        store.close().unwrap();
        assert_eq!(user_version(), i64::from(dps_store::SCHEMA_VERSION));
        for _ in 0..3 {
            let store = SqliteStore::open(&path, sqlite_options()).unwrap();
            assert!(get_enrollment(&store, "dev-1").is_some());
            store.close().unwrap();
            assert_eq!(user_version(), i64::from(dps_store::SCHEMA_VERSION));
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn sqlite_upgrades_a_version_1_database() {
        // A database written before the store version existed (schema 1) is upgraded in place, data kept.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        put_group(&store, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
        commit(&store, record("dev-1", Some("g1"), "r1"), None).unwrap();
        store.close().unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE store_version; DROP TABLE ca_certificates; DROP TABLE audit_log; PRAGMA user_version = 1;",
        )
            .unwrap();
        drop(conn);
        let (a, b) = two_handles(dir.path());
        assert_eq!(group_ids(&load(&b, "dev-1").groups), ["g1"]);
        commit(&a, record("dev-1", Some("g1"), "r2"), Some("r1")).unwrap();
        assert_eq!(load(&b, "dev-1").registration.unwrap().etag, etag("r2"));
        a.close().unwrap();
        b.close().unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, i64::from(dps_store::SCHEMA_VERSION));
    }

    #[test]
    fn sqlite_audit_log_survives_reopen_and_upgrades_from_version_3() {
        use dps_core::audit::{AuditFilter, AuditOperation};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        let put = StoreOp::PutEnrollment {
            enrollment: Box::new(enrollment("dev-1", "e1")),
            condition: WriteCondition::Upsert,
        };
        let (_, appended) =
            audited(&store, put, audit_record(AuditOperation::EnrollmentPut, "dev-1", "owner", 1)).unwrap();
        store.close().unwrap();
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        assert_eq!(all_audit(&store, &AuditFilter::default(), 10), [appended]);
        store.close().unwrap();
        // A database of schema 3 (before the audit log) gains an empty log, its data kept.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE audit_log; PRAGMA user_version = 3;").unwrap();
        drop(conn);
        let store = SqliteStore::open(&path, sqlite_options()).unwrap();
        assert!(all_audit(&store, &AuditFilter::default(), 10).is_empty());
        assert!(get_enrollment(&store, "dev-1").is_some());
        let delete = StoreOp::DeleteEnrollment { registration_id: rid("dev-1"), if_match: None };
        let (_, r) =
            audited(&store, delete, audit_record(AuditOperation::EnrollmentDelete, "dev-1", "owner", 2))
                .unwrap();
        assert_eq!(r.etag_before.as_deref(), Some("e1"));
        store.close().unwrap();
    }

    #[test]
    fn sqlite_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dps.db");
        SqliteStore::open(&path, sqlite_options()).unwrap().close().unwrap();
        rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path, sqlite_options()).unwrap_err();
        assert!(matches!(&err, StoreError::Backend { message } if message.contains("99")), "{err:?}");
    }

    #[test]
    fn sqlite_refuses_in_memory_database() {
        let err = SqliteStore::open(":memory:", sqlite_options()).unwrap_err();
        assert!(matches!(&err, StoreError::Backend { message } if message.contains("WAL")), "{err:?}");
    }

    #[test]
    fn sqlite_open_reports_bad_path() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            SqliteStore::open(dir.path().join("missing-dir").join("dps.db"), sqlite_options()).unwrap_err();
        assert!(matches!(&err, StoreError::Backend { message } if message.contains("opening")), "{err:?}");
    }

    #[test]
    fn sqlite_closed_store_refuses_operations() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        let clone = store.clone();
        commit(&store, record("dev-1", None, "r1"), None).unwrap();
        store.close().unwrap();
        let err = commit(&clone, record("dev-2", None, "r1"), None).unwrap_err();
        assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
        let err = BlockingStore::execute(&clone, StoreOp::GetRegistration { registration_id: rid("dev-1") })
            .unwrap_err();
        assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
        let err = futures::executor::block_on(AsyncStore::execute(
            &clone,
            StoreOp::CommitRegistration { record: Box::new(record("dev-3", None, "r1")), expected: None },
        ))
        .unwrap_err();
        assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
        // Closing twice is harmless.
        clone.close().unwrap();
    }

    #[test]
    fn sqlite_group_commit_from_threads() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..PER_THREAD {
                        commit(&store, record(&format!("dev-{t}-{i}"), Some("g1"), "r1"), None).unwrap();
                    }
                });
            }
        });
        let stats = store.stats();
        assert_eq!(stats.rows, (THREADS * PER_THREAD) as u64);
        assert!(stats.batches < stats.rows, "no batching happened: {stats:?}");
        for t in 0..THREADS {
            for i in 0..PER_THREAD {
                assert!(get_registration(&store, &format!("dev-{t}-{i}")).is_some());
            }
        }
        let keys = collect_all(
            97,
            |req| query_registrations(&store, "g1", req),
            |r| r.registration_id.key().to_owned(),
        );
        assert_eq!(keys.len(), THREADS * PER_THREAD);
        assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), keys.len());
        store.close().unwrap();
    }

    #[test]
    fn sqlite_concurrent_commits_of_one_device_conflict() {
        // Several racers create the same record at once: exactly one wins, whether or not they share a batch.
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        for round in 0..20 {
            let id = format!("dev-{round}");
            let futures: Vec<_> = (0..6)
                .map(|i| {
                    AsyncStore::execute(
                        &store,
                        StoreOp::CommitRegistration {
                            record: Box::new(record(&id, None, &format!("r{i}"))),
                            expected: None,
                        },
                    )
                })
                .collect();
            let results = futures::executor::block_on(futures::future::join_all(futures));
            let winners: Vec<usize> =
                results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
            assert_eq!(winners.len(), 1, "{results:?}");
            for r in &results {
                assert!(matches!(r, Ok(StoreResult::Done) | Err(StoreError::Conflict)), "{r:?}");
            }
            assert_eq!(get_registration(&store, &id).unwrap().etag, etag(&format!("r{}", winners[0])));
        }
        store.close().unwrap();
    }

    #[test]
    fn sqlite_async_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        commit(&store, record("dev-0", Some("g1"), "r0"), None).unwrap();
        let before = store.stats();
        let futures: Vec<_> = (0..500)
            .map(|i| {
                // Mix in requests whose condition fails: they get their error without aborting their batch.
                let expected = if i == 0 {
                    Some(etag("r0"))
                } else if i % 50 == 1 {
                    Some(etag("missing"))
                } else {
                    None
                };
                AsyncStore::execute(
                    &store,
                    StoreOp::CommitRegistration {
                        record: Box::new(record(&format!("dev-{i}"), Some("g1"), "r1")),
                        expected,
                    },
                )
            })
            .collect();
        let results = futures::executor::block_on(futures::future::join_all(futures));
        for (i, r) in results.iter().enumerate() {
            if i % 50 == 1 {
                assert!(matches!(r, Err(StoreError::Conflict)), "{i}: {r:?}");
            } else {
                assert!(matches!(r, Ok(StoreResult::Done)), "{i}: {r:?}");
            }
        }
        for i in 0..500 {
            let found = get_registration(&store, &format!("dev-{i}"));
            assert_eq!(found.is_some(), i % 50 != 1, "dev-{i}");
        }
        let after = store.stats();
        assert_eq!(after.rows - before.rows, 500);
        assert!(after.batches - before.batches < 500, "no batching happened: {after:?}");
        store.close().unwrap();
    }

    #[test]
    fn sqlite_small_batches_and_single_reader() {
        // max_batch 1 (no batching) and one read connection still behave.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            dir.path().join("dps.db"),
            SqliteOptions { max_batch: 0, read_connections: 0, ..SqliteOptions::default() },
        )
        .unwrap();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..20 {
                        commit(&store, record(&format!("dev-{t}-{i}"), None, "r1"), None).unwrap();
                        assert!(
                            get_registration(&store, &format!("dev-{t}-{i}")).is_some(),
                            "read your writes"
                        );
                    }
                });
            }
        });
        assert_eq!(store.stats(), dps_store::SqliteStats { batches: 80, rows: 80 });
        store.close().unwrap();
    }

    /// Two stores on one database file, as two processes would have.
    fn two_handles(dir: &std::path::Path) -> (SqliteStore, SqliteStore) {
        (open_sqlite(dir), open_sqlite(dir))
    }

    fn group_status(ctx: &dps_core::store::DeviceContext, id: &str) -> Option<ProvisioningStatus> {
        ctx.groups
            .iter()
            .find(|g| g.enrollment_group_id == id)
            .map(|g| g.provisioning_status.unwrap_or_default())
    }

    #[test]
    fn sqlite_second_handle_sees_groups_created_disabled_and_deleted_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_handles(dir.path());
        // B's views are loaded (and its caches warm) before A writes.
        assert!(load(&b, "dev-1").groups.is_empty());
        put_group(&a, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
        assert_eq!(group_ids(&load(&b, "dev-1").groups), ["g1"], "created via A");
        // Disabled via A: B sees it disabled, not as the enabled copy it had.
        put_group(&a, group_with("g1", "symmetricKey", "e2", "disabled", CREATED), WriteCondition::Upsert)
            .unwrap();
        assert_eq!(group_status(&load(&b, "dev-1"), "g1"), Some(ProvisioningStatus::Disabled));
        // A write through B first (its writer resyncs under the write lock): B's views stay right.
        put_group(&a, sym_group("g2", "e1"), WriteCondition::Upsert).unwrap();
        put_group(&b, sym_group("g3", "e1"), WriteCondition::Upsert).unwrap();
        let ctx = load(&b, "dev-1");
        assert_eq!(group_ids(&ctx.groups), ["g1", "g2", "g3"]);
        assert_eq!(group_status(&ctx, "g1"), Some(ProvisioningStatus::Disabled));
        // Deleted via A: B no longer offers it.
        delete_group(&a, "g1", None).unwrap();
        assert_eq!(group_ids(&load(&b, "dev-1").groups), ["g2", "g3"]);
        // And A sees what B wrote.
        assert_eq!(group_ids(&load(&a, "dev-1").groups), ["g2", "g3"]);
        // Once B's writer has caught up (any later write), its views are trusted again and still right.
        commit(&b, record("dev-9", Some("g2"), "r1"), None).unwrap();
        assert_eq!(group_ids(&load(&b, "dev-1").groups), ["g2", "g3"]);
        a.close().unwrap();
        b.close().unwrap();
    }

    #[test]
    fn sqlite_second_handle_stale_etag_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_handles(dir.path());
        // B commits (its record cache now holds r1), then A replaces the record.
        commit(&b, record("dev-1", Some("g1"), "r1"), None).unwrap();
        assert_eq!(load(&a, "dev-1").registration.unwrap().etag, etag("r1"));
        commit(&a, record("dev-1", Some("g1"), "r2"), Some("r1")).unwrap();
        // B does not answer from its stale cache.
        assert_eq!(load(&b, "dev-1").registration.unwrap().etag, etag("r2"));
        assert_eq!(get_registration(&b, "dev-1").unwrap().etag, etag("r2"));
        // A commit through B with the ETag it read before A's write conflicts.
        assert_eq!(commit(&b, record("dev-1", Some("g1"), "r3"), Some("r1")), Err(StoreError::Conflict));
        assert_eq!(commit(&b, record("dev-1", Some("g1"), "r3"), None), Err(StoreError::Conflict));
        commit(&b, record("dev-1", Some("g1"), "r3"), Some("r2")).unwrap();
        assert_eq!(get_registration(&a, "dev-1").unwrap().etag, etag("r3"));
        // Deleted via A: gone for B too.
        delete_registration(&a, "dev-1", None).unwrap();
        assert_eq!(get_registration(&b, "dev-1"), None);
        assert!(load(&b, "dev-1").registration.is_none());
        a.close().unwrap();
        b.close().unwrap();
    }

    #[test]
    fn sqlite_second_handle_sees_enrollments_created_and_deleted_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_handles(dir.path());
        put_group(&b, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
        // B's set of enrollment IDs says "certainly absent"; A creates one.
        assert!(load(&b, "ind-1").individual.is_none());
        put_enrollment(&a, enrollment("ind-1", "e1"), WriteCondition::Upsert).unwrap();
        let ctx = load(&b, "ind-1");
        assert!(ctx.individual.is_some(), "created via A");
        assert!(ctx.groups.is_empty());
        // Deleted via A: not found via B, by any read.
        delete_enrollment(&a, "ind-1", None).unwrap();
        let ctx = load(&b, "ind-1");
        assert!(ctx.individual.is_none(), "deleted via A");
        assert_eq!(group_ids(&ctx.groups), ["g1"]);
        assert_eq!(get_enrollment(&b, "ind-1"), None);
        assert_eq!(delete_enrollment(&b, "ind-1", None), Err(StoreError::NotFound));
        // After B's writer caught up, its views still agree.
        put_enrollment(&b, enrollment("ind-2", "e1"), WriteCondition::Upsert).unwrap();
        assert!(load(&b, "ind-1").individual.is_none());
        assert!(load(&b, "ind-2").individual.is_some());
        assert!(load(&a, "ind-2").individual.is_some());
        a.close().unwrap();
        b.close().unwrap();
    }

    #[test]
    fn sqlite_handles_on_one_file_race_without_lost_views() {
        // Two handles write groups and registrations concurrently; afterwards both agree with the database.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = two_handles(dir.path());
        std::thread::scope(|scope| {
            for (t, store) in [(0, &a), (1, &b)] {
                scope.spawn(move || {
                    for i in 0..30 {
                        put_group(store, sym_group(&format!("g-{t}-{i:02}"), "e1"), WriteCondition::Upsert)
                            .unwrap();
                        commit(store, record(&format!("dev-{t}-{i}"), None, "r1"), None).unwrap();
                        let _ = load(store, "dev-x");
                    }
                });
            }
        });
        for store in [&a, &b] {
            assert_eq!(load(store, "dev-x").groups.len(), 60);
            for t in 0..2 {
                for i in 0..30 {
                    assert!(get_registration(store, &format!("dev-{t}-{i}")).is_some());
                }
            }
        }
        a.close().unwrap();
        b.close().unwrap();
    }

    #[test]
    fn sqlite_reads_see_committed_writes_from_other_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_sqlite(dir.path());
        std::thread::scope(|scope| {
            let writer = store.clone();
            scope.spawn(move || {
                for i in 0..100 {
                    let expected = if i == 0 { None } else { Some(format!("r{}", i - 1)) };
                    commit(&writer, record("dev-1", None, &format!("r{i}")), expected.as_deref()).unwrap();
                }
            });
            for _ in 0..2 {
                let reader = store.clone();
                scope.spawn(move || {
                    let mut last = -1i64;
                    for _ in 0..300 {
                        if let Some(r) = load(&reader, "dev-1").registration {
                            let n: i64 = r.etag.as_str()[1..].parse().unwrap();
                            assert!(n >= last, "reads never go back in time");
                            last = n;
                        }
                    }
                });
            }
        });
        assert_eq!(get_registration(&store, "dev-1").unwrap().etag, etag("r99"));
        store.close().unwrap();
    }
}
