//! Encryption at rest in the SQLite store and the hub directory: no secret in the raw files, plain rows
//! from before still read (and sealed on their next write), a sealed value moved to another row refused.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The test reads the raw database files.
#![allow(clippy::disallowed_methods)]

use dps_core::hub::{BlockingHubDirectory, DeviceIdentity, DeviceTwin, HubAuthentication, HubOp};
use dps_core::proto::model::{
    AttestationMechanism, CustomAllocationDefinition, EnrollmentGroup, IndividualEnrollment,
};
use dps_core::proto::{EnrollmentGroupId, RegistrationId};
use dps_core::store::{BlockingStore, StoreOp, StoreResult, WriteCondition};
use dps_store::seal::{DataKey, Sealer};
use dps_store::{SqliteHubDirectory, SqliteOptions, SqliteStore};
use std::path::Path;
use std::sync::Arc;

const PRIMARY: &str = "cHJpbWFyeS1zZWNyZXQta2V5LTAxMjM0NTY3ODlhYmNkZWY=";
const SECONDARY: &str = "c2Vjb25kYXJ5LXNlY3JldC1rZXktMDEyMzQ1Njc4OWFiY2Q=";
const GROUP_PRIMARY: &str = "Z3JvdXAtcHJpbWFyeS1rZXktMDEyMzQ1Njc4OWFiY2RlZg==";
const WEBHOOK: &str = "https://hooks.example/api/allocate?code=webhook-secret-code-42";

fn sealer() -> Arc<Sealer> {
    Arc::new(Sealer::new(vec![("t1".into(), DataKey::from_bytes([7u8; 32]))], "t1").unwrap())
}

fn enrollment(id: &str) -> IndividualEnrollment {
    let mut e: IndividualEnrollment = serde_json::from_value(serde_json::json!({
        "registrationId": id,
        "attestation": {"type": "symmetricKey"},
    }))
    .unwrap();
    e.attestation = AttestationMechanism::symmetric_key(Some(PRIMARY.into()), Some(SECONDARY.into()));
    e.custom_allocation_definition = Some(
        serde_json::from_value::<CustomAllocationDefinition>(
            serde_json::json!({"webhookUrl": WEBHOOK, "apiVersion": "2021-10-01"}),
        )
        .unwrap(),
    );
    e
}

fn group(id: &str) -> EnrollmentGroup {
    let mut g: EnrollmentGroup = serde_json::from_value(serde_json::json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "symmetricKey"},
    }))
    .unwrap();
    g.attestation = AttestationMechanism::symmetric_key(Some(GROUP_PRIMARY.into()), Some(SECONDARY.into()));
    g
}

fn put_enrollment(store: &SqliteStore, e: IndividualEnrollment) {
    BlockingStore::execute(
        store,
        StoreOp::PutEnrollment { enrollment: Box::new(e), condition: WriteCondition::Upsert },
    )
    .unwrap();
}

fn get_enrollment(store: &SqliteStore, id: &str) -> Result<Option<IndividualEnrollment>, String> {
    match BlockingStore::execute(
        store,
        StoreOp::GetEnrollment { registration_id: RegistrationId::parse(id).unwrap() },
    ) {
        Ok(StoreResult::Enrollment(e)) => Ok(e.map(|e| *e)),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.to_string()),
    }
}

/// Every file of `dir` (the database and its WAL), as bytes.
fn raw(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_secret_reaches_the_files_and_reads_return_plain_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_sealed(dir.path().join("dps.db"), SqliteOptions::default(), Some(sealer()))
        .unwrap();
    put_enrollment(&store, enrollment("dev-1"));
    BlockingStore::execute(
        &store,
        StoreOp::PutGroup {
            group: Box::new(group("g1")),
            condition: WriteCondition::Upsert,
            max_symmetric_key_groups: None,
        },
    )
    .unwrap();
    let e = get_enrollment(&store, "dev-1").unwrap().unwrap();
    let keys = e.attestation.symmetric_key.unwrap();
    assert_eq!(keys.primary_key.as_deref(), Some(PRIMARY));
    assert_eq!(keys.secondary_key.as_deref(), Some(SECONDARY));
    assert_eq!(e.custom_allocation_definition.unwrap().webhook_url, WEBHOOK);
    match BlockingStore::execute(
        &store,
        StoreOp::GetGroup { group_id: EnrollmentGroupId::parse("g1").unwrap() },
    ) {
        Ok(StoreResult::Group(Some(g))) => {
            assert_eq!(g.attestation.symmetric_key.unwrap().primary_key.as_deref(), Some(GROUP_PRIMARY))
        }
        other => panic!("{other:?}"),
    }
    // The device context carries the group from the snapshot, plain.
    match BlockingStore::execute(
        &store,
        StoreOp::LoadDeviceContext { registration_id: RegistrationId::parse("other").unwrap() },
    ) {
        Ok(StoreResult::DeviceContext(c)) => assert_eq!(
            c.groups[0].attestation.symmetric_key.as_ref().unwrap().primary_key.as_deref(),
            Some(GROUP_PRIMARY)
        ),
        other => panic!("{other:?}"),
    }
    let files = raw(dir.path());
    store.close().unwrap();
    let files = [files, raw(dir.path())].concat();
    for secret in [PRIMARY, SECONDARY, GROUP_PRIMARY, WEBHOOK, "webhook-secret-code-42"] {
        assert!(!contains(&files, secret.as_bytes()), "{secret} found in the raw database");
    }
    use base64::Engine as _;
    let raw_key = base64::engine::general_purpose::STANDARD.decode(PRIMARY).unwrap();
    assert!(!contains(&files, &raw_key));

    // Reopened with the key: the group snapshot and reads still work. Without it: a clear error.
    let store = SqliteStore::open_sealed(dir.path().join("dps.db"), SqliteOptions::default(), Some(sealer()))
        .unwrap();
    assert!(get_enrollment(&store, "dev-1").unwrap().is_some());
    store.close().unwrap();
    let err = SqliteStore::open(dir.path().join("dps.db"), SqliteOptions::default()).unwrap_err().to_string();
    assert!(err.contains("sealed"), "{err}");
}

#[test]
fn plain_rows_from_before_are_read_and_sealed_on_their_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    put_enrollment(&store, enrollment("old"));
    store.close().unwrap();
    let store = SqliteStore::open_sealed(&path, SqliteOptions::default(), Some(sealer())).unwrap();
    let e = get_enrollment(&store, "old").unwrap().unwrap();
    assert_eq!(e.attestation.symmetric_key.as_ref().unwrap().primary_key.as_deref(), Some(PRIMARY));
    put_enrollment(&store, e);
    store.close().unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let json: String =
        conn.query_row("SELECT json FROM enrollments WHERE key = 'old'", [], |r| r.get(0)).unwrap();
    assert!(!json.contains(PRIMARY) && json.contains("sealed:v1:t1:"), "{json}");
}

#[test]
fn a_sealed_value_copied_to_another_row_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.db");
    let store = SqliteStore::open_sealed(&path, SqliteOptions::default(), Some(sealer())).unwrap();
    put_enrollment(&store, enrollment("victim"));
    let mut other = enrollment("attacker");
    other.attestation = AttestationMechanism::symmetric_key(Some("YQ==".into()), Some("Yg==".into()));
    put_enrollment(&store, other);
    store.close().unwrap();
    {
        // Someone with write access to the file moves the victim's sealed keys into their own row.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let json: String =
            conn.query_row("SELECT json FROM enrollments WHERE key = 'victim'", [], |r| r.get(0)).unwrap();
        let moved = json.replace("\"victim\"", "\"attacker\"");
        conn.execute("UPDATE enrollments SET json = ?1 WHERE key = 'attacker'", [moved]).unwrap();
    }
    let store = SqliteStore::open_sealed(&path, SqliteOptions::default(), Some(sealer())).unwrap();
    let err = get_enrollment(&store, "attacker").unwrap_err();
    assert!(err.contains("copied from another row"), "{err}");
    assert!(get_enrollment(&store, "victim").unwrap().is_some());
    store.close().unwrap();
}

#[test]
fn hub_device_keys_are_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hubs.sqlite3");
    let hubs = SqliteHubDirectory::open_sealed(&path, std::time::Duration::ZERO, Some(sealer())).unwrap();
    let upsert = |id: &str| HubOp::UpsertDevice {
        hub: "hub.example".into(),
        identity: DeviceIdentity {
            device_id: id.into(),
            authentication: HubAuthentication::Sas {
                primary_key: PRIMARY.into(),
                secondary_key: SECONDARY.into(),
            },
        },
        twin: DeviceTwin::default(),
        replace_twin: true,
    };
    BlockingHubDirectory::execute(&hubs, upsert("d1")).unwrap();
    BlockingHubDirectory::execute(&hubs, upsert("d2")).unwrap();
    assert_eq!(hubs.device("hub.example", "d1").unwrap().identity.primary_key(), Some(PRIMARY));
    hubs.close().unwrap();
    let files = raw(dir.path());
    assert!(!contains(&files, PRIMARY.as_bytes()) && !contains(&files, SECONDARY.as_bytes()));
    // The read-only view opens them with the sealer, and refuses without.
    let db = dps_store::HubDatabase::open_read_only(&path).unwrap();
    assert!(db.device("hub.example", "d1").is_err());
    let db = db.with_sealer(sealer());
    assert_eq!(db.device("hub.example", "d1").unwrap().unwrap().identity.primary_key(), Some(PRIMARY));
    // d1's sealed key moved to d2 does not open.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE hub_devices SET primary_key = (SELECT primary_key FROM hub_devices WHERE device_id = 'd1')
             WHERE device_id = 'd2'",
            [],
        )
        .unwrap();
    }
    assert!(db.device("hub.example", "d2").is_err());
}
