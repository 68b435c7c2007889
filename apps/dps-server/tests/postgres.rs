//! Several server replicas on one PostgreSQL (`store = "postgres://…"`), each a whole server with its own
//! data directory, store handle, pool and caches (the key material copied from the first, as an operator
//! does): every acknowledged assignment is found through every replica, concurrent registrations of one
//! device and `If-Match` races across replicas have one winner, and a group disabled through one replica
//! refuses devices on the others at once. The cluster comes from `dps_store::pg_testing` (the one of
//! `DPS_TEST_POSTGRES_URL`, or a throwaway one this process starts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Tests are programs: they read files and the clock.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::sas::SymmetricKey;
use dps_server::admin::{CallError, EnrollmentSettings, Kind};
use dps_server::config::StoreConfig;
use dps_server::server::RunningServer;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Copies the key material of a data directory (KEK, data keys, owner keys, TLS) into another one, so
/// that a second replica opens the sealed secrets the first wrote and serves the same certificate.
fn copy_key_material(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("dps.sqlite3") || name.starts_with("hubs.sqlite3") || name == "ready.json" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_key_material(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `n` replicas on one fresh PostgreSQL schema.
struct Replicas {
    servers: Vec<RunningServer>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Replicas {
    async fn start(n: usize) -> Replicas {
        let url = dps_store::pg_testing::fresh_database();
        let mut dirs = Vec::new();
        let mut servers = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().unwrap();
            if i > 0 {
                copy_key_material(dirs.first().map(|d: &tempfile::TempDir| d.path()).unwrap(), dir.path());
            }
            let mut config = config(dir.path());
            config.store = StoreConfig::parse(&url).unwrap();
            servers.push(start(config).await);
            dirs.push(dir);
        }
        Replicas { servers, _dirs: dirs }
    }

    fn get(&self, i: usize) -> &RunningServer {
        &self.servers[i % self.servers.len()]
    }

    async fn shutdown(self) {
        for s in self.servers {
            s.shutdown().await.unwrap();
        }
    }
}

/// A group created through `server`, and its primary key.
async fn group(server: &RunningServer, id: &str) -> SymmetricKey {
    let svc = service(server);
    svc.create(Kind::Group, id, &EnrollmentSettings::default()).await.unwrap();
    let group = svc.show(Kind::Group, id, true).await.unwrap();
    SymmetricKey::parse(group["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap()
}

/// `PUT register` of `id` (group-derived key) through `server`: the status and the JSON answer.
async fn register(server: &RunningServer, key: &SymmetricKey, id: &str) -> (u16, Value) {
    let token = device_token(&key.derive_device_key(id), SCOPE, id, 3600);
    let response = https(server)
        .request(
            "PUT",
            &format!("/{SCOPE}/registrations/{id}/register?api-version=2021-10-01"),
            &[("authorization", token)],
            format!(r#"{{"registrationId":"{id}"}}"#).into_bytes(),
        )
        .await
        .unwrap();
    let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    (response.status, body)
}

/// Polls operation `op` of `id` through `server` until it is no longer `assigning`.
async fn poll_until_done(server: &RunningServer, key: &SymmetricKey, id: &str, op: &str) -> Value {
    let token = device_token(&key.derive_device_key(id), SCOPE, id, 3600);
    for _ in 0..200 {
        let response = https(server)
            .request(
                "GET",
                &format!("/{SCOPE}/registrations/{id}/operations/{op}?api-version=2021-10-01"),
                &[("authorization", token.clone())],
                Vec::new(),
            )
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        if response.status == 200 && body["status"] != "assigning" {
            return body;
        }
        assert!(response.status == 202 || response.status == 200, "{}: {body}", response.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} still assigning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_assignment_is_found_through_every_replica() {
    let replicas = Replicas::start(3).await;
    let key = group(replicas.get(0), "fleet").await;
    let mut assigned = Vec::new();
    for i in 0..24 {
        let id = format!("fleet-dev-{i:02}");
        // Registered through one replica, polled through the next one.
        let (status, body) = register(replicas.get(i), &key, &id).await;
        assert_eq!(status, 202, "{body}");
        let op = body["operationId"].as_str().unwrap().to_owned();
        let done = poll_until_done(replicas.get(i + 1), &key, &id, &op).await;
        assert_eq!(done["status"], "assigned", "{done}");
        assigned.push((id, done["registrationState"]["assignedHub"].clone()));
    }
    for r in 0..3 {
        let svc = service(replicas.get(r));
        for (id, hub) in &assigned {
            let state = svc.registration(id).await.unwrap();
            assert_eq!(state["status"], "assigned", "{id} through replica {r}");
            assert_eq!(&state["assignedHub"], hub);
        }
        assert_eq!(svc.registrations("fleet", 10, None).await.unwrap().len(), 24, "replica {r}");
    }
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_registering_on_two_replicas_at_once_gets_one_record() {
    let replicas = Replicas::start(2).await;
    let key = group(replicas.get(0), "racers").await;
    let mut conflicts = 0;
    for round in 0..5 {
        let id = format!("racer-{round}");
        let attempts: Vec<_> = (0..6)
            .map(|i| {
                let (server, key, id) = (replicas.get(i), key.clone(), id.clone());
                async move { register(server, &key, &id).await }
            })
            .collect();
        let outcomes = futures_util::future::join_all(attempts).await;
        let accepted: Vec<_> = outcomes.iter().filter(|(s, _)| *s == 202).collect();
        assert!(!accepted.is_empty(), "{outcomes:?}");
        for (status, body) in &outcomes {
            match status {
                202 => {}
                409 => {
                    assert_eq!(body["errorCode"], 409203, "{body}");
                    conflicts += 1;
                }
                other => panic!("{other}: {body}"),
            }
        }
        // The last accepted operation ends assigned; the store holds one record, read alike everywhere.
        let state = loop {
            let state = service(replicas.get(1)).registration(&id).await.unwrap();
            if state["status"] != "assigning" {
                break state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(state["status"], "assigned", "{state}");
        let other = service(replicas.get(0)).registration(&id).await.unwrap();
        assert_eq!(other["etag"], state["etag"]);
    }
    let listed = service(replicas.get(0)).registrations("racers", 100, None).await.unwrap();
    assert_eq!(listed.len(), 5, "one record per device: {listed:?}");
    eprintln!("{conflicts} registrations answered 409203");
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_races_across_replicas_have_one_winner() {
    let replicas = Replicas::start(2).await;
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    service(replicas.get(0)).create(Kind::Enrollment, "contested", &settings).await.unwrap();
    for round in 0..6 {
        let current = service(replicas.get(1)).show(Kind::Enrollment, "contested", false).await.unwrap();
        let etag = current["etag"].as_str().unwrap().to_owned();
        let writes: Vec<_> = (0..2)
            .map(|i| {
                let (server, etag) = (replicas.get(i), etag.clone());
                async move {
                    let settings = EnrollmentSettings {
                        device_id: Some(format!("owner-{round}-{i}")),
                        ..EnrollmentSettings::default()
                    };
                    service(server).update(Kind::Enrollment, "contested", &settings, Some(&etag)).await
                }
            })
            .collect();
        let outcomes = futures_util::future::join_all(writes).await;
        let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
        for o in &outcomes {
            if let Err(CallError::Api(e)) = o {
                assert_eq!(e.status, 412, "{:?}", e.body);
            } else {
                assert!(o.is_ok(), "{o:?}");
            }
        }
        // Both replicas read the winner's write.
        for r in 0..2 {
            let now = service(replicas.get(r)).show(Kind::Enrollment, "contested", false).await.unwrap();
            assert_eq!(now["deviceId"], won[0]["deviceId"]);
            assert_eq!(now["etag"], won[0]["etag"]);
        }
    }
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_disabled_through_one_replica_refuses_devices_on_the_others() {
    let replicas = Replicas::start(3).await;
    let key = group(replicas.get(0), "doomed").await;
    // Replicas 1 and 2 admit a device each (their group caches now hold the enabled group).
    for r in 1..3 {
        let id = format!("before-{r}");
        let (status, body) = register(replicas.get(r), &key, &id).await;
        assert_eq!(status, 202, "{body}");
        let done = poll_until_done(replicas.get(r), &key, &id, body["operationId"].as_str().unwrap()).await;
        assert_eq!(done["status"], "assigned");
    }
    let disabled =
        EnrollmentSettings { provisioning_status: Some("disabled".into()), ..EnrollmentSettings::default() };
    service(replicas.get(0)).update(Kind::Group, "doomed", &disabled, None).await.unwrap();
    // The very next registration on each other replica is refused: no assignment, status disabled.
    for r in 1..3 {
        let id = format!("after-{r}");
        let (status, body) = register(replicas.get(r), &key, &id).await;
        let state = if status == 202 {
            poll_until_done(replicas.get(r), &key, &id, body["operationId"].as_str().unwrap()).await
        } else {
            body
        };
        assert_ne!(state["status"], "assigned", "replica {r}: {state}");
        let stored = service(replicas.get(r + 1)).registration(&id).await;
        match stored {
            Ok(s) => {
                assert_eq!(s["status"], "disabled", "{s}");
                assert!(s.get("assignedHub").is_none_or(Value::is_null), "{s}");
            }
            Err(CallError::Api(e)) => assert_eq!(e.status, 404, "{:?}", e.body),
            Err(e) => panic!("{e:?}"),
        }
    }
    replicas.shutdown().await;
}

/// Fills a SQLite store in `dir` (sealed with the data directory's keys, as the server does): CA
/// certificates, groups, enrollments, registrations through a group and through an enrollment.
async fn fill_sqlite(dir: &Path) {
    use dps_core::store::{AsyncStore, StoreOp, WriteCondition};
    use dps_store::testing::{ca, enrollment, record, sym_group};
    let data = dps_server::datadir::DataDir::new(dir);
    data.create().unwrap();
    let provider = dps_server::config::KeyProviderConfig::File(dir.join("kek.key"));
    let sealer = dps_server::encryption::open_sealer(&provider, &data).unwrap();
    let store = dps_server::state::ServerStore::open(&StoreConfig::Sqlite, &data.database(), sealer).unwrap();
    let ops = [
        StoreOp::PutCertificate {
            certificate: Box::new(ca("Root-A", "c1")),
            condition: WriteCondition::Upsert,
            max_certificates: None,
        },
        StoreOp::PutCertificate {
            certificate: Box::new(ca("inter-b", "c2")),
            condition: WriteCondition::Upsert,
            max_certificates: None,
        },
        StoreOp::PutGroup {
            group: Box::new(sym_group("g1", "e1")),
            condition: WriteCondition::Upsert,
            max_symmetric_key_groups: None,
        },
        StoreOp::PutGroup {
            group: Box::new(sym_group("g2", "e2")),
            condition: WriteCondition::Upsert,
            max_symmetric_key_groups: None,
        },
        StoreOp::PutEnrollment {
            enrollment: Box::new(enrollment("dev-solo", "e3")),
            condition: WriteCondition::Upsert,
        },
        StoreOp::PutEnrollment {
            enrollment: Box::new(enrollment("dev-other", "e4")),
            condition: WriteCondition::Upsert,
        },
        StoreOp::CommitRegistration { record: Box::new(record("dev-solo", None, "r1")), expected: None },
        StoreOp::CommitRegistration {
            record: Box::new(record("dev-g1-a", Some("g1"), "r2")),
            expected: None,
        },
        StoreOp::CommitRegistration {
            record: Box::new(record("dev-g1-b", Some("g1"), "r3")),
            expected: None,
        },
        StoreOp::CommitRegistration {
            record: Box::new(record("dev-g2-a", Some("g2"), "r4")),
            expected: None,
        },
    ];
    for op in ops {
        store.execute(op).await.unwrap();
    }
    tokio::task::spawn_blocking(move || store.close()).await.unwrap().unwrap();
}

fn export_with(args: &[&str], output: &Path) -> Value {
    let mut all = vec!["export", "--id-scope", SCOPE, "--output", output.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = cli(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stderr).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_move_a_deployment_between_sqlite_and_postgres() {
    let (sqlite_a, pg_dir, sqlite_c, files) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    fill_sqlite(sqlite_a.path()).await;
    let url = dps_store::pg_testing::fresh_database();
    let (first, second, third) =
        (files.path().join("a.jsonl"), files.path().join("pg.jsonl"), files.path().join("c.jsonl"));

    let counts = export_with(&["--data-dir", sqlite_a.path().to_str().unwrap()], &first);
    assert_eq!(
        counts,
        serde_json::json!({"certificates": 2, "groups": 2, "enrollments": 2, "registrations": 4})
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&first).unwrap().permissions().mode() & 0o777,
            0o600,
            "the export holds secrets"
        );
    }
    let text = std::fs::read_to_string(&first).unwrap();
    assert!(
        text.contains("\"cHJpbWFyeQ==\""),
        "secrets are exported in the clear, to be sealed again on import"
    );

    // SQLite → PostgreSQL (sealed there with the PostgreSQL deployment's own keys).
    let pg = ["--data-dir", pg_dir.path().to_str().unwrap(), "--store", url.as_str()];
    let imported = cli_json(
        &[&["import", "--id-scope", SCOPE, "--input", first.to_str().unwrap()][..], &pg[..]].concat(),
    );
    assert_eq!(imported, counts);
    export_with(&pg, &second);
    assert_eq!(std::fs::read_to_string(&second).unwrap(), text, "PostgreSQL holds exactly what SQLite held");
    let schema = url.rsplit("search_path%3D").next().unwrap();
    let raw = dps_store::pg_testing::query_text_on(
        dps_store::pg_testing::cluster_url(),
        &format!(
            "SELECT json FROM {schema}.enrollments UNION ALL SELECT json FROM {schema}.enrollment_groups"
        ),
    );
    assert_eq!(raw.len(), 4);
    assert!(raw.iter().all(|r| r.contains("sealed:v1:") && !r.contains("\"cHJpbWFyeQ==\"")), "{raw:?}");

    // PostgreSQL → another SQLite deployment; importing twice changes nothing.
    let c = ["--data-dir", sqlite_c.path().to_str().unwrap()];
    for _ in 0..2 {
        cli_json(
            &[&["import", "--id-scope", SCOPE, "--input", second.to_str().unwrap()][..], &c[..]].concat(),
        );
    }
    export_with(&c, &third);
    assert_eq!(std::fs::read_to_string(&third).unwrap(), text);

    // The imported deployment serves: a server on it reads the registration state.
    let mut config = config(sqlite_c.path());
    config.store = StoreConfig::Sqlite;
    let server = start(config).await;
    let state = service(&server).registration("dev-g1-b").await.unwrap();
    assert_eq!(state["etag"], "r3");
    server.shutdown().await.unwrap();
}

#[test]
fn a_server_refuses_a_wrong_postgres_password_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let good = dps_store::pg_testing::cluster_url();
    let (scheme, rest) = good.split_once("://").unwrap();
    let host = rest.split_once('@').unwrap().1;
    let bad = format!("{scheme}://dps:wrong-password@{host}");
    let out = cli(&[
        "run",
        "--id-scope",
        SCOPE,
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--store",
        &bad,
        "--https-listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "",
        "--admin-listen",
        "",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(!stderr.contains("wrong-password"), "the password is never printed: {stderr}");
}
