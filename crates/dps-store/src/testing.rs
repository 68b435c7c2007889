//! The store conformance suite, exported (feature `testing`) so that every backend runs the same tests:
//! the two in this crate, a PostgreSQL one, or a store written by an embedder.
//!
//! Every test is a generic function over `S: BlockingStore` that starts from an empty store; an
//! [`AsyncStore`] runs through [`ViaAsync`]. [`store_conformance_tests!`](crate::store_conformance_tests)
//! generates one `#[test]` per suite function, each building a fresh store from the given expression:
//!
//! ```ignore
//! use dps_store::testing::ViaAsync;
//! use dps_store::MemoryStore;
//!
//! dps_store::store_conformance_tests!(memory, MemoryStore::new());
//! dps_store::store_conformance_tests!(memory_async, ViaAsync(MemoryStore::new()));
//! ```
//!
//! The expression is evaluated inside a module generated in the caller's module (which it sees through
//! `use super::*`); it may return any [`BlockingStore`], e.g. a wrapper that also owns a temporary
//! directory. The fixtures and operation helpers are public too, for a backend's own extra tests.
//!
//! This is test code: the suite panics (asserts, unwraps) on the first contract violation.
// Test code: panicking on a failed expectation is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dps_core::audit::{AuditFilter, AuditOperation, AuditRecord, AuditTransport};
use dps_core::proto::certificate::CaCertificate;
use dps_core::proto::model::{
    AttestationType, EnrollmentGroup, IndividualEnrollment, RegistrationStatus, RegistrationSubstatus,
};
use dps_core::proto::query::{parse_query, Query, QuerySource};
use dps_core::proto::{EnrollmentGroupId, Etag, IfMatch, OperationId, RegistrationId, Timestamp};
use dps_core::store::{
    AsyncStore, BlockingStore, DeviceContext, EnrollmentRef, Page, PageRequest, RegistrationRecord,
    StoreError, StoreOp, StoreResult, WriteCondition,
};
use serde_json::json;

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

/// Creation time of the fixtures.
pub const CREATED: &str = "2024-01-01T00:00:00.0000000Z";
/// A later time.
pub const LATER: &str = "2024-06-01T12:00:00.0000000Z";

/// A registration ID (panics when invalid).
pub fn rid(s: &str) -> RegistrationId {
    RegistrationId::parse(s).unwrap()
}

/// An enrollment group ID (panics when invalid).
pub fn gid(s: &str) -> EnrollmentGroupId {
    EnrollmentGroupId::parse(s).unwrap()
}

/// An ETag (panics when invalid).
pub fn etag(s: &str) -> Etag {
    Etag::parse(s).unwrap()
}

/// An `If-Match` for one ETag.
pub fn if_match(s: &str) -> IfMatch {
    IfMatch::Etag(etag(s))
}

/// A symmetric-key individual enrollment with the given ETag and creation time.
pub fn enrollment_at(id: &str, etag: &str, created: &str) -> IndividualEnrollment {
    serde_json::from_value(json!({
        "registrationId": id,
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}
        },
        "iotHubHostName": "hub1.azure-devices.net",
        "etag": etag,
        "provisioningStatus": "enabled",
        "createdDateTimeUtc": created,
        "lastUpdatedDateTimeUtc": created,
        "capabilities": {"iotEdge": false}
    }))
    .unwrap()
}

/// A symmetric-key individual enrollment created at [`CREATED`].
pub fn enrollment(id: &str, etag: &str) -> IndividualEnrollment {
    enrollment_at(id, etag, CREATED)
}

/// An enrollment group of attestation `kind` (`symmetricKey` or `x509`) and provisioning `status`.
pub fn group_with(id: &str, kind: &str, etag: &str, status: &str, created: &str) -> EnrollmentGroup {
    let attestation = match kind {
        "symmetricKey" => {
            json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": "a2V5", "secondaryKey": "a2V5Mg=="}})
        }
        "x509" => json!({"type": "x509", "x509": {"caReferences": {"primary": "root-ca"}}}),
        other => panic!("unknown attestation kind {other}"),
    };
    serde_json::from_value(json!({
        "enrollmentGroupId": id,
        "attestation": attestation,
        "etag": etag,
        "provisioningStatus": status,
        "createdDateTimeUtc": created,
        "lastUpdatedDateTimeUtc": created,
        "iotHubs": ["hub1.azure-devices.net"]
    }))
    .unwrap()
}

/// An enabled symmetric-key enrollment group created at [`CREATED`].
pub fn sym_group(id: &str, etag: &str) -> EnrollmentGroup {
    group_with(id, "symmetricKey", etag, "enabled", CREATED)
}

/// An assigned registration record, through group `group` (or its individual enrollment when `None`).
pub fn record(id: &str, group: Option<&str>, etag_value: &str) -> RegistrationRecord {
    RegistrationRecord {
        registration_id: rid(id),
        enrollment: match group {
            Some(g) => EnrollmentRef::Group(gid(g)),
            None => EnrollmentRef::Individual(rid(id)),
        },
        operation_id: OperationId::parse("5.316aac5bdc130deb.8f1c2d3e-0000-4000-8000-000000000001").unwrap(),
        status: RegistrationStatus::Assigned,
        substatus: Some(RegistrationSubstatus::InitialAssignment),
        assigned_hub: Some("hub1.azure-devices.net".into()),
        device_id: Some(id.into()),
        error_code: None,
        error_message: None,
        payload: Some(json!({"hello": "world"})),
        created: Timestamp::from_unix_seconds(1_700_000_000),
        last_updated: Timestamp::from_unix_seconds(1_700_000_100),
        etag: etag(etag_value),
        x509: None,
        issued_certificate_chain: None,
    }
}

/// A query without conditions.
pub fn all(source: QuerySource) -> Query {
    Query { source, conditions: Vec::new() }
}

/// A page request.
pub fn page(after: Option<String>, limit: usize) -> PageRequest {
    PageRequest { after, limit }
}

// ------------------------------------------------------------------------------------------------
// Operation helpers
// ------------------------------------------------------------------------------------------------

/// `PutEnrollment`, returning what the store stored.
pub fn put_enrollment<S: BlockingStore>(
    s: &S,
    e: IndividualEnrollment,
    condition: WriteCondition,
) -> Result<IndividualEnrollment, StoreError> {
    match s.execute(StoreOp::PutEnrollment { enrollment: Box::new(e), condition })? {
        StoreResult::Enrollment(Some(e)) => Ok(*e),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `GetEnrollment`.
pub fn get_enrollment<S: BlockingStore>(s: &S, id: &str) -> Option<IndividualEnrollment> {
    match s.execute(StoreOp::GetEnrollment { registration_id: rid(id) }).unwrap() {
        StoreResult::Enrollment(e) => e.map(|e| *e),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `DeleteEnrollment`.
pub fn delete_enrollment<S: BlockingStore>(
    s: &S,
    id: &str,
    if_match: Option<IfMatch>,
) -> Result<(), StoreError> {
    match s.execute(StoreOp::DeleteEnrollment { registration_id: rid(id), if_match })? {
        StoreResult::Done => Ok(()),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `QueryEnrollments`.
pub fn query_enrollments<S: BlockingStore>(
    s: &S,
    query: Query,
    req: PageRequest,
) -> Page<IndividualEnrollment> {
    match s.execute(StoreOp::QueryEnrollments { query, page: req }).unwrap() {
        StoreResult::Enrollments(p) => p,
        other => panic!("unexpected result {other:?}"),
    }
}

/// `PutGroup`, returning what the store stored.
pub fn put_group<S: BlockingStore>(
    s: &S,
    g: EnrollmentGroup,
    condition: WriteCondition,
) -> Result<EnrollmentGroup, StoreError> {
    put_group_limited(s, g, condition, None)
}

/// `PutGroup` with a symmetric-key group limit, returning what the store stored.
pub fn put_group_limited<S: BlockingStore>(
    s: &S,
    g: EnrollmentGroup,
    condition: WriteCondition,
    max_symmetric_key_groups: Option<usize>,
) -> Result<EnrollmentGroup, StoreError> {
    match s.execute(StoreOp::PutGroup { group: Box::new(g), condition, max_symmetric_key_groups })? {
        StoreResult::Group(Some(g)) => Ok(*g),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `GetGroup`.
pub fn get_group<S: BlockingStore>(s: &S, id: &str) -> Option<EnrollmentGroup> {
    match s.execute(StoreOp::GetGroup { group_id: gid(id) }).unwrap() {
        StoreResult::Group(g) => g.map(|g| *g),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `DeleteGroup`.
pub fn delete_group<S: BlockingStore>(s: &S, id: &str, if_match: Option<IfMatch>) -> Result<(), StoreError> {
    match s.execute(StoreOp::DeleteGroup { group_id: gid(id), if_match })? {
        StoreResult::Done => Ok(()),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `QueryGroups`.
pub fn query_groups<S: BlockingStore>(s: &S, query: Query, req: PageRequest) -> Page<EnrollmentGroup> {
    match s.execute(StoreOp::QueryGroups { query, page: req }).unwrap() {
        StoreResult::Groups(p) => p,
        other => panic!("unexpected result {other:?}"),
    }
}

/// `CommitRegistration` with the expected ETag (`None`: no record may exist).
pub fn commit<S: BlockingStore>(
    s: &S,
    r: RegistrationRecord,
    expected: Option<&str>,
) -> Result<(), StoreError> {
    match s.execute(StoreOp::CommitRegistration { record: Box::new(r), expected: expected.map(etag) })? {
        StoreResult::Done => Ok(()),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `GetRegistration`.
pub fn get_registration<S: BlockingStore>(s: &S, id: &str) -> Option<RegistrationRecord> {
    match s.execute(StoreOp::GetRegistration { registration_id: rid(id) }).unwrap() {
        StoreResult::Registration(r) => r.map(|r| *r),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `DeleteRegistration`.
pub fn delete_registration<S: BlockingStore>(
    s: &S,
    id: &str,
    if_match: Option<IfMatch>,
) -> Result<(), StoreError> {
    match s.execute(StoreOp::DeleteRegistration { registration_id: rid(id), if_match })? {
        StoreResult::Done => Ok(()),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `QueryRegistrations` of a group.
pub fn query_registrations<S: BlockingStore>(
    s: &S,
    group: &str,
    req: PageRequest,
) -> Page<RegistrationRecord> {
    match s.execute(StoreOp::QueryRegistrations { group_id: gid(group), page: req }).unwrap() {
        StoreResult::Registrations(p) => p,
        other => panic!("unexpected result {other:?}"),
    }
}

/// `LoadDeviceContext`.
pub fn load<S: BlockingStore>(s: &S, id: &str) -> DeviceContext {
    match s.execute(StoreOp::LoadDeviceContext { registration_id: rid(id) }).unwrap() {
        StoreResult::DeviceContext(c) => c,
        other => panic!("unexpected result {other:?}"),
    }
}

/// The IDs of `groups`, in order.
pub fn group_ids(groups: &[EnrollmentGroup]) -> Vec<&str> {
    groups.iter().map(|g| g.enrollment_group_id.as_str()).collect()
}

/// Pages through everything with the given page size, checking the paging contract on the way.
pub fn collect_all<T>(
    limit: usize,
    mut fetch: impl FnMut(PageRequest) -> Page<T>,
    key: impl Fn(&T) -> String,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let p = fetch(page(after.clone(), limit));
        pages += 1;
        assert!(pages < 1000, "paging does not terminate");
        assert!(p.items.len() <= limit.max(1));
        let page_keys: Vec<String> = p.items.iter().map(&key).collect();
        if let Some(next) = &p.next {
            assert_eq!(Some(next), page_keys.last(), "next is the key of the last item");
        }
        keys.extend(page_keys);
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    keys
}

// ------------------------------------------------------------------------------------------------
// The generic suite
// ------------------------------------------------------------------------------------------------

/// Enrollments: put, get, upsert.
pub fn enrollment_put_and_get<S: BlockingStore>(s: &S) {
    assert_eq!(get_enrollment(s, "dev-1"), None);
    let e = enrollment("Dev-1", "e1");
    let stored = put_enrollment(s, e.clone(), WriteCondition::Upsert).unwrap();
    assert_eq!(stored, e);
    // Keys are case-insensitive; the ID keeps its original spelling.
    assert_eq!(get_enrollment(s, "dev-1"), Some(e.clone()));
    assert_eq!(get_enrollment(s, "DEV-1"), Some(e));
    assert_eq!(get_enrollment(s, "dev-2"), None);
}

/// Enrollments: create-only fails on an existing one.
pub fn enrollment_create_only<S: BlockingStore>(s: &S) {
    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::CreateOnly).unwrap();
    let err = put_enrollment(s, enrollment("DEV-1", "e2"), WriteCondition::CreateOnly).unwrap_err();
    assert_eq!(err, StoreError::AlreadyExists);
    assert_eq!(get_enrollment(s, "dev-1").unwrap().etag.as_deref(), Some("e1"));
}

/// Enrollments: `If-Match` writes.
pub fn enrollment_if_match<S: BlockingStore>(s: &S) {
    let absent = put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::IfMatch(IfMatch::Any));
    assert_eq!(absent.unwrap_err(), StoreError::NotFound);
    let absent = put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::IfMatch(if_match("e0")));
    assert_eq!(absent.unwrap_err(), StoreError::NotFound);
    assert_eq!(get_enrollment(s, "dev-1"), None);

    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
    let stale = put_enrollment(s, enrollment("dev-1", "e2"), WriteCondition::IfMatch(if_match("e0")));
    assert_eq!(stale.unwrap_err(), StoreError::PreconditionFailed);
    assert_eq!(get_enrollment(s, "dev-1").unwrap().etag.as_deref(), Some("e1"));

    put_enrollment(s, enrollment("dev-1", "e2"), WriteCondition::IfMatch(if_match("e1"))).unwrap();
    // A quoted / weak If-Match value parses to the same ETag.
    put_enrollment(
        s,
        enrollment("dev-1", "e3"),
        WriteCondition::IfMatch(IfMatch::parse("W/\"e2\"").unwrap()),
    )
    .unwrap();
    put_enrollment(s, enrollment("dev-1", "e4"), WriteCondition::IfMatch(IfMatch::Any)).unwrap();
    assert_eq!(get_enrollment(s, "dev-1").unwrap().etag.as_deref(), Some("e4"));
}

/// Enrollments: the stored ETag is compared parsed (quoted or not).
pub fn enrollment_stored_etag_is_parsed<S: BlockingStore>(s: &S) {
    // The stored etag string is compared after Etag::parse (quotes stripped).
    put_enrollment(s, enrollment("dev-1", "\"quoted\""), WriteCondition::Upsert).unwrap();
    put_enrollment(s, enrollment("dev-1", "e2"), WriteCondition::IfMatch(if_match("quoted"))).unwrap();
    // An item without an ETag only satisfies `*`.
    let mut e = enrollment("dev-2", "x");
    e.etag = None;
    put_enrollment(s, e.clone(), WriteCondition::Upsert).unwrap();
    let err = put_enrollment(s, e.clone(), WriteCondition::IfMatch(if_match("x"))).unwrap_err();
    assert_eq!(err, StoreError::PreconditionFailed);
    put_enrollment(s, e.clone(), WriteCondition::IfMatch(IfMatch::Any)).unwrap();
    assert_eq!(delete_enrollment(s, "dev-2", Some(if_match("x"))), Err(StoreError::PreconditionFailed));
    delete_enrollment(s, "dev-2", Some(IfMatch::Any)).unwrap();
}

/// Enrollments: a replace keeps the stored creation time.
pub fn enrollment_replace_keeps_created_time<S: BlockingStore>(s: &S) {
    let first = put_enrollment(s, enrollment_at("dev-1", "e1", CREATED), WriteCondition::Upsert).unwrap();
    assert_eq!(first.created_date_time_utc.as_deref(), Some(CREATED));
    let mut update = enrollment_at("dev-1", "e2", LATER);
    update.iot_hub_host_name = Some("hub2.azure-devices.net".into());
    let stored = put_enrollment(s, update.clone(), WriteCondition::Upsert).unwrap();
    assert_eq!(stored.created_date_time_utc.as_deref(), Some(CREATED), "creation time kept");
    assert_eq!(stored.last_updated_date_time_utc.as_deref(), Some(LATER));
    assert_eq!(stored.iot_hub_host_name.as_deref(), Some("hub2.azure-devices.net"));
    assert_eq!(get_enrollment(s, "dev-1"), Some(stored));

    let stored =
        put_enrollment(s, enrollment_at("dev-1", "e3", LATER), WriteCondition::IfMatch(if_match("e2")))
            .unwrap();
    assert_eq!(stored.created_date_time_utc.as_deref(), Some(CREATED));
    assert_eq!(get_enrollment(s, "dev-1").unwrap().created_date_time_utc.as_deref(), Some(CREATED));
}

/// Enrollments: delete, with and without a precondition.
pub fn enrollment_delete<S: BlockingStore>(s: &S) {
    assert_eq!(delete_enrollment(s, "dev-1", None), Err(StoreError::NotFound));
    assert_eq!(delete_enrollment(s, "dev-1", Some(IfMatch::Any)), Err(StoreError::NotFound));
    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
    put_enrollment(s, enrollment("dev-2", "e1"), WriteCondition::Upsert).unwrap();
    put_enrollment(s, enrollment("dev-3", "e1"), WriteCondition::Upsert).unwrap();
    assert_eq!(delete_enrollment(s, "dev-1", Some(if_match("e0"))), Err(StoreError::PreconditionFailed));
    assert!(get_enrollment(s, "dev-1").is_some());
    delete_enrollment(s, "DEV-1", Some(if_match("e1"))).unwrap();
    delete_enrollment(s, "dev-2", Some(IfMatch::Any)).unwrap();
    delete_enrollment(s, "dev-3", None).unwrap();
    for id in ["dev-1", "dev-2", "dev-3"] {
        assert_eq!(get_enrollment(s, id), None);
    }
    assert_eq!(delete_enrollment(s, "dev-1", None), Err(StoreError::NotFound));
}

/// Groups: put, get and write conditions.
pub fn group_put_get_and_conditions<S: BlockingStore>(s: &S) {
    assert_eq!(get_group(s, "g1"), None);
    let g = group_with("Group-1", "symmetricKey", "e1", "enabled", CREATED);
    assert_eq!(put_group(s, g.clone(), WriteCondition::CreateOnly).unwrap(), g);
    assert_eq!(get_group(s, "group-1"), Some(g.clone()));
    assert_eq!(put_group(s, g.clone(), WriteCondition::CreateOnly), Err(StoreError::AlreadyExists));

    let absent = put_group(s, sym_group("other", "e1"), WriteCondition::IfMatch(IfMatch::Any));
    assert_eq!(absent, Err(StoreError::NotFound));
    let stale = put_group(s, sym_group("group-1", "e2"), WriteCondition::IfMatch(if_match("nope")));
    assert_eq!(stale, Err(StoreError::PreconditionFailed));
    assert_eq!(get_group(s, "group-1").unwrap().etag.as_deref(), Some("e1"));

    let update = group_with("GROUP-1", "symmetricKey", "e2", "disabled", LATER);
    let stored = put_group(s, update, WriteCondition::IfMatch(if_match("e1"))).unwrap();
    assert_eq!(stored.created_date_time_utc.as_deref(), Some(CREATED), "creation time kept");
    assert_eq!(stored.last_updated_date_time_utc.as_deref(), Some(LATER));
    assert_eq!(stored.enrollment_group_id, "GROUP-1");
    assert_eq!(get_group(s, "group-1"), Some(stored));

    let stored =
        put_group(s, group_with("group-1", "x509", "e3", "enabled", LATER), WriteCondition::Upsert).unwrap();
    assert_eq!(stored.created_date_time_utc.as_deref(), Some(CREATED));
    put_group(s, sym_group("group-1", "e4"), WriteCondition::IfMatch(IfMatch::Any)).unwrap();
    assert_eq!(get_group(s, "group-1").unwrap().etag.as_deref(), Some("e4"));
}

/// Groups: delete, with and without a precondition.
pub fn group_delete<S: BlockingStore>(s: &S) {
    assert_eq!(delete_group(s, "g1", None), Err(StoreError::NotFound));
    assert_eq!(delete_group(s, "g1", Some(IfMatch::Any)), Err(StoreError::NotFound));
    put_group(s, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
    put_group(s, sym_group("g2", "e1"), WriteCondition::Upsert).unwrap();
    assert_eq!(delete_group(s, "g1", Some(if_match("e9"))), Err(StoreError::PreconditionFailed));
    assert!(get_group(s, "g1").is_some());
    delete_group(s, "G1", Some(if_match("e1"))).unwrap();
    delete_group(s, "g2", None).unwrap();
    assert_eq!(get_group(s, "g1"), None);
    assert_eq!(get_group(s, "g2"), None);
    assert_eq!(delete_group(s, "g1", None), Err(StoreError::NotFound));
}

/// The symmetric-key group limit: a new symmetric-key group beyond it is `LimitReached`; replacing one,
/// groups of another attestation, and a create after a delete are not limited.
pub fn group_limit_counts_symmetric_key_groups_only<S: BlockingStore>(s: &S) {
    let limited = |g, c| put_group_limited(s, g, c, Some(2));
    limited(sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
    limited(sym_group("g2", "e1"), WriteCondition::Upsert).unwrap();
    let refused = limited(sym_group("g3", "e1"), WriteCondition::Upsert).unwrap_err();
    assert_eq!(
        refused,
        StoreError::LimitReached { what: "symmetric-key enrollment groups".into(), limit: 2 }
    );
    assert_eq!(get_group(s, "g3"), None, "nothing is written");
    limited(sym_group("g2", "e2"), WriteCondition::Upsert).unwrap();
    limited(group_with("x1", "x509", "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
    // An X.509 group turned symmetric-key counts as a new one.
    assert!(limited(sym_group("x1", "e2"), WriteCondition::Upsert).is_err());
    delete_group(s, "g1", None).unwrap();
    limited(sym_group("g3", "e1"), WriteCondition::Upsert).unwrap();
    // The device context holds every group, X.509 ones too.
    assert_eq!(load(s, "anyone").groups.len(), 3);
}

/// Registration commits: create-only and ETag-guarded replace, `Conflict` otherwise.
pub fn registration_commit_conditions<S: BlockingStore>(s: &S) {
    assert_eq!(get_registration(s, "dev-1"), None);
    // Some(expected) when nothing exists: conflict.
    assert_eq!(commit(s, record("dev-1", None, "r1"), Some("r0")), Err(StoreError::Conflict));
    commit(s, record("Dev-1", None, "r1"), None).unwrap();
    assert_eq!(get_registration(s, "dev-1"), Some(record("Dev-1", None, "r1")));
    // None when a record exists: conflict.
    assert_eq!(commit(s, record("dev-1", None, "r2"), None), Err(StoreError::Conflict));
    // Wrong expected etag: conflict.
    assert_eq!(commit(s, record("dev-1", None, "r2"), Some("r0")), Err(StoreError::Conflict));
    assert_eq!(get_registration(s, "DEV-1").unwrap().etag, etag("r1"));
    // Right expected etag.
    let mut next = record("dev-1", Some("g1"), "r2");
    next.status = RegistrationStatus::Failed;
    next.error_code = Some(400_209);
    next.error_message = Some("nope".into());
    commit(s, next.clone(), Some("r1")).unwrap();
    assert_eq!(get_registration(s, "dev-1"), Some(next));
    // The old etag no longer works.
    assert_eq!(commit(s, record("dev-1", None, "r3"), Some("r1")), Err(StoreError::Conflict));
}

/// Registration records: get and delete.
pub fn registration_get_and_delete<S: BlockingStore>(s: &S) {
    assert_eq!(delete_registration(s, "dev-1", None), Err(StoreError::NotFound));
    assert_eq!(delete_registration(s, "dev-1", Some(IfMatch::Any)), Err(StoreError::NotFound));
    commit(s, record("dev-1", Some("g1"), "r1"), None).unwrap();
    commit(s, record("dev-2", None, "r1"), None).unwrap();
    commit(s, record("dev-3", None, "r1"), None).unwrap();
    assert_eq!(delete_registration(s, "dev-1", Some(if_match("r0"))), Err(StoreError::PreconditionFailed));
    assert!(get_registration(s, "dev-1").is_some());
    delete_registration(s, "DEV-1", Some(if_match("r1"))).unwrap();
    delete_registration(s, "dev-2", Some(IfMatch::Any)).unwrap();
    delete_registration(s, "dev-3", None).unwrap();
    for id in ["dev-1", "dev-2", "dev-3"] {
        assert_eq!(get_registration(s, id), None);
    }
    assert!(query_registrations(s, "g1", page(None, 10)).items.is_empty());
    // A deleted registration can be created again from scratch.
    commit(s, record("dev-1", Some("g1"), "r5"), None).unwrap();
    assert_eq!(get_registration(s, "dev-1").unwrap().etag, etag("r5"));
}

/// `LoadDeviceContext` with an individual enrollment (no groups).
pub fn context_with_individual_enrollment<S: BlockingStore>(s: &S) {
    put_group(s, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
    let e = put_enrollment(s, enrollment("Dev-1", "e1"), WriteCondition::Upsert).unwrap();
    let ctx = load(s, "dev-1");
    assert_eq!(ctx.individual, Some(e));
    assert!(ctx.groups.is_empty(), "groups are not loaded when an individual enrollment exists");
    assert_eq!(ctx.registration, None);

    commit(s, record("dev-1", None, "r1"), None).unwrap();
    let ctx = load(s, "DEV-1");
    assert!(ctx.individual.is_some());
    assert_eq!(ctx.registration, Some(record("dev-1", None, "r1")));
}

/// `LoadDeviceContext` without one: every symmetric-key group, ordered, following writes.
pub fn context_without_individual_enrollment<S: BlockingStore>(s: &S) {
    let ctx = load(s, "dev-1");
    assert!(ctx.individual.is_none() && ctx.registration.is_none() && ctx.groups.is_empty());

    // Inserted out of order, mixed case, one disabled, two X.509: the context carries every group.
    put_group(s, group_with("Zeta", "symmetricKey", "e1", "enabled", CREATED), WriteCondition::Upsert)
        .unwrap();
    put_group(s, group_with("alpha", "symmetricKey", "e1", "disabled", CREATED), WriteCondition::Upsert)
        .unwrap();
    put_group(s, group_with("certs", "x509", "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
    put_group(s, group_with("Mid", "symmetricKey", "e1", "enabled", CREATED), WriteCondition::Upsert)
        .unwrap();
    put_group(s, group_with("more-certs", "x509", "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
    put_enrollment(s, enrollment("other-device", "e1"), WriteCondition::Upsert).unwrap();
    commit(s, record("dev-1", Some("mid"), "r1"), None).unwrap();

    let ctx = load(s, "dev-1");
    assert_eq!(ctx.individual, None);
    assert_eq!(group_ids(&ctx.groups), ["alpha", "certs", "Mid", "more-certs", "Zeta"]);
    assert_eq!(ctx.groups[0].provisioning_status, Some(serde_json::from_value(json!("disabled")).unwrap()));
    assert_eq!(ctx.registration, Some(record("dev-1", Some("mid"), "r1")));

    // The cached group list follows writes: update, kind change, delete, new group.
    put_group(s, group_with("zeta", "symmetricKey", "e2", "disabled", LATER), WriteCondition::Upsert)
        .unwrap();
    let ctx = load(s, "dev-1");
    assert_eq!(group_ids(&ctx.groups), ["alpha", "certs", "Mid", "more-certs", "zeta"]);
    assert_eq!(ctx.groups[4].etag.as_deref(), Some("e2"));
    assert_eq!(ctx.groups[4].created_date_time_utc.as_deref(), Some(CREATED));

    put_group(s, group_with("mid", "x509", "e2", "enabled", LATER), WriteCondition::Upsert).unwrap();
    assert_eq!(group_ids(&load(s, "dev-1").groups), ["alpha", "certs", "mid", "more-certs", "zeta"]);
    put_group(s, group_with("certs", "symmetricKey", "e2", "enabled", LATER), WriteCondition::Upsert)
        .unwrap();
    assert_eq!(load(s, "dev-1").groups[1].attestation.kind, AttestationType::SymmetricKey);
    delete_group(s, "ALPHA", None).unwrap();
    assert_eq!(group_ids(&load(s, "dev-1").groups), ["certs", "mid", "more-certs", "zeta"]);
    // A failed conditional write leaves the list alone.
    let failed = put_group(s, sym_group("new", "e1"), WriteCondition::IfMatch(IfMatch::Any));
    assert_eq!(failed, Err(StoreError::NotFound));
    assert_eq!(delete_group(s, "zeta", Some(if_match("wrong"))), Err(StoreError::PreconditionFailed));
    assert_eq!(group_ids(&load(s, "dev-1").groups), ["certs", "mid", "more-certs", "zeta"]);
    put_group(s, sym_group("beta", "e1"), WriteCondition::CreateOnly).unwrap();
    assert_eq!(group_ids(&load(s, "dev-1").groups), ["beta", "certs", "mid", "more-certs", "zeta"]);

    // Once the device gets an individual enrollment, groups are no longer loaded; removing it brings them back.
    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
    assert!(load(s, "dev-1").groups.is_empty());
    delete_enrollment(s, "dev-1", None).unwrap();
    assert_eq!(load(s, "dev-1").groups.len(), 5);
}

/// Enrollment queries page through 25 items with every page size.
pub fn enrollments_page_through_25<S: BlockingStore>(s: &S) {
    // Inserted in scrambled order and mixed case; pages come back by lowercase key.
    let mut expected = Vec::new();
    for i in 0..25 {
        let n = (i * 7) % 25;
        let id = if n % 2 == 0 { format!("Device-{n:02}") } else { format!("device-{n:02}") };
        put_enrollment(s, enrollment(&id, "e1"), WriteCondition::Upsert).unwrap();
        expected.push(id.to_ascii_lowercase());
    }
    expected.sort();
    let mut sizes = Vec::new();
    let keys = collect_all(
        10,
        |req| {
            let p = query_enrollments(s, all(QuerySource::Enrollments), req);
            sizes.push((p.items.len(), p.next.is_some()));
            p
        },
        |e| e.registration_id.to_ascii_lowercase(),
    );
    assert_eq!(sizes, [(10, true), (10, true), (5, false)], "exactly three pages");
    assert_eq!(keys, expected, "no duplicates, no omissions, key order");

    // Exactly a multiple of the page size: the last full page has no `next`.
    let p = query_enrollments(s, all(QuerySource::Enrollments), page(None, 25));
    assert_eq!((p.items.len(), p.next), (25, None));
    let p = query_enrollments(s, all(QuerySource::Enrollments), page(None, 24));
    assert_eq!(p.next.as_deref(), Some(expected[23].as_str()));
    // Past the end.
    let p = query_enrollments(s, all(QuerySource::Enrollments), page(Some("zzz".into()), 10));
    assert!(p.items.is_empty() && p.next.is_none());
    // `after` need not be an existing key.
    let p = query_enrollments(s, all(QuerySource::Enrollments), page(Some("device-10a".into()), 100));
    assert_eq!(p.items.len(), 14);
}

/// Group queries page through 25 items.
pub fn groups_page_through_25<S: BlockingStore>(s: &S) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let id = format!("group-{:02}", (i * 11) % 25);
        let kind = if i % 3 == 0 { "x509" } else { "symmetricKey" };
        put_group(s, group_with(&id, kind, "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
        expected.push(id);
    }
    expected.sort();
    let mut sizes = Vec::new();
    let keys = collect_all(
        10,
        |req| {
            let p = query_groups(s, all(QuerySource::EnrollmentGroups), req);
            sizes.push((p.items.len(), p.next.is_some()));
            p
        },
        |g| g.enrollment_group_id.to_ascii_lowercase(),
    );
    assert_eq!(sizes, [(10, true), (10, true), (5, false)]);
    assert_eq!(keys, expected);
}

/// Registration queries page by group.
pub fn registrations_page_by_group<S: BlockingStore>(s: &S) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let id = format!("Dev-{:02}", (i * 3) % 25);
        commit(s, record(&id, Some("G1"), "r1"), None).unwrap();
        expected.push(id.to_ascii_lowercase());
    }
    expected.sort();
    // Noise: another group, individual enrollments, a group whose ID is a prefix.
    for i in 0..5 {
        commit(s, record(&format!("other-{i}"), Some("g2"), "r1"), None).unwrap();
        commit(s, record(&format!("solo-{i}"), None, "r1"), None).unwrap();
        commit(s, record(&format!("prefix-{i}"), Some("g"), "r1"), None).unwrap();
    }
    let mut sizes = Vec::new();
    let keys = collect_all(
        10,
        |req| {
            let p = query_registrations(s, "g1", req);
            sizes.push((p.items.len(), p.next.is_some()));
            p
        },
        |r| r.registration_id.key().to_owned(),
    );
    assert_eq!(sizes, [(10, true), (10, true), (5, false)]);
    assert_eq!(keys, expected);
    assert_eq!(query_registrations(s, "G2", page(None, 100)).items.len(), 5);
    assert_eq!(query_registrations(s, "g", page(None, 100)).items.len(), 5);
    assert!(query_registrations(s, "nope", page(None, 100)).items.is_empty());
    let p = query_registrations(s, "g1", page(None, 1));
    assert_eq!(p.items[0], record("Dev-00", Some("G1"), "r1"));

    // A registration that moves to another group moves between the query results.
    commit(s, record("dev-00", Some("g2"), "r2"), Some("r1")).unwrap();
    assert_eq!(query_registrations(s, "g1", page(None, 100)).items.len(), 24);
    assert_eq!(query_registrations(s, "g2", page(None, 100)).items.len(), 6);
    commit(s, record("dev-00", None, "r3"), Some("r2")).unwrap();
    assert_eq!(query_registrations(s, "g2", page(None, 100)).items.len(), 5);
}

/// Query conditions filter enrollments and groups.
pub fn query_filters<S: BlockingStore>(s: &S) {
    for i in 0..12 {
        let mut e = enrollment(&format!("dev-{i:02}"), "e1");
        if i % 3 == 0 {
            e.provisioning_status = Some(serde_json::from_value(json!("disabled")).unwrap());
        }
        if i % 4 == 0 {
            e.iot_hub_host_name = Some("Hub2.azure-devices.net".into());
        }
        put_enrollment(s, e, WriteCondition::Upsert).unwrap();
    }
    let q = |text: &str| parse_query(text, QuerySource::Enrollments).unwrap();

    let disabled = q("SELECT * FROM enrollments WHERE provisioningStatus = 'disabled'");
    let p = query_enrollments(s, disabled.clone(), page(None, 100));
    let ids: Vec<_> = p.items.iter().map(|e| e.registration_id.as_str()).collect();
    assert_eq!(ids, ["dev-00", "dev-03", "dev-06", "dev-09"]);
    assert_eq!(p.next, None);

    // Paging through a filtered result: `next` only when another *matching* item exists.
    let p = query_enrollments(s, disabled.clone(), page(None, 3));
    assert_eq!(p.items.len(), 3);
    assert_eq!(p.next.as_deref(), Some("dev-06"));
    let p = query_enrollments(s, disabled.clone(), page(p.next, 3));
    assert_eq!(p.items.len(), 1);
    assert_eq!(p.next, None, "items after dev-09 exist but none match");
    let p = query_enrollments(s, disabled, page(Some("dev-06".into()), 1));
    assert_eq!(p.items.len(), 1);
    assert_eq!(p.next, None);

    let both = q("select * from enrollments where provisioningStatus = disabled and iotHubHostName = 'hub2.AZURE-devices.net'");
    let ids: Vec<_> =
        query_enrollments(s, both, page(None, 100)).items.into_iter().map(|e| e.registration_id).collect();
    assert_eq!(ids, ["dev-00"]);

    let none = q("SELECT * FROM enrollments WHERE iotHubHostName = 'nowhere'");
    let p = query_enrollments(s, none, page(None, 5));
    assert!(p.items.is_empty() && p.next.is_none());

    // Groups are filtered the same way.
    put_group(s, group_with("ga", "symmetricKey", "e1", "disabled", CREATED), WriteCondition::Upsert)
        .unwrap();
    put_group(s, group_with("gb", "x509", "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
    put_group(s, group_with("gc", "symmetricKey", "e1", "enabled", CREATED), WriteCondition::Upsert).unwrap();
    let enabled = parse_query(
        "SELECT * FROM enrollmentGroups WHERE provisioningStatus = 'enabled'",
        QuerySource::EnrollmentGroups,
    )
    .unwrap();
    let p = query_groups(s, enabled, page(None, 10));
    assert_eq!(group_ids(&p.items), ["gb", "gc"]);
}

/// A page limit of 0 returns one item.
pub fn page_limit_zero_means_one<S: BlockingStore>(s: &S) {
    put_enrollment(s, enrollment("a", "e1"), WriteCondition::Upsert).unwrap();
    put_enrollment(s, enrollment("b", "e1"), WriteCondition::Upsert).unwrap();
    put_group(s, sym_group("ga", "e1"), WriteCondition::Upsert).unwrap();
    put_group(s, sym_group("gb", "e1"), WriteCondition::Upsert).unwrap();
    commit(s, record("a", Some("g"), "r1"), None).unwrap();
    commit(s, record("b", Some("g"), "r1"), None).unwrap();
    let p = query_enrollments(s, all(QuerySource::Enrollments), page(None, 0));
    assert_eq!((p.items.len(), p.next.as_deref()), (1, Some("a")));
    let p = query_groups(s, all(QuerySource::EnrollmentGroups), page(None, 0));
    assert_eq!((p.items.len(), p.next.as_deref()), (1, Some("ga")));
    let p = query_registrations(s, "g", page(None, 0));
    assert_eq!((p.items.len(), p.next.as_deref()), (1, Some("a")));
    let p = query_registrations(s, "g", page(p.next, 0));
    assert_eq!((p.items.len(), p.next), (1, None));
}

/// Deleting a group keeps its registration records.
pub fn group_delete_leaves_registrations<S: BlockingStore>(s: &S) {
    put_group(s, sym_group("g1", "e1"), WriteCondition::Upsert).unwrap();
    for i in 0..3 {
        commit(s, record(&format!("dev-{i}"), Some("g1"), "r1"), None).unwrap();
    }
    delete_group(s, "g1", None).unwrap();
    assert_eq!(get_group(s, "g1"), None);
    for i in 0..3 {
        assert!(get_registration(s, &format!("dev-{i}")).is_some());
    }
    assert_eq!(query_registrations(s, "g1", page(None, 10)).items.len(), 3);
    let ctx = load(s, "dev-1");
    assert!(ctx.groups.is_empty());
    assert_eq!(ctx.registration.unwrap().enrollment, EnrollmentRef::Group(gid("g1")));
}

/// Deleting an enrollment keeps its registration record.
pub fn enrollment_delete_leaves_registration<S: BlockingStore>(s: &S) {
    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
    commit(s, record("dev-1", None, "r1"), None).unwrap();
    delete_enrollment(s, "dev-1", None).unwrap();
    let ctx = load(s, "dev-1");
    assert!(ctx.individual.is_none());
    assert!(ctx.registration.is_some());
}

/// The same key in the three collections does not interfere.
pub fn operations_are_independent<S: BlockingStore>(s: &S) {
    // Same key in the three collections: they do not interfere.
    put_enrollment(s, enrollment("same", "e1"), WriteCondition::Upsert).unwrap();
    put_group(s, sym_group("same", "g1"), WriteCondition::Upsert).unwrap();
    commit(s, record("same", Some("same"), "r1"), None).unwrap();
    delete_group(s, "same", None).unwrap();
    assert!(get_enrollment(s, "same").is_some());
    assert!(get_registration(s, "same").is_some());
    delete_registration(s, "same", None).unwrap();
    assert!(get_enrollment(s, "same").is_some());
}

// ------------------------------------------------------------------------------------------------
// Adapters
// ------------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------------
// CA certificates
// ------------------------------------------------------------------------------------------------

/// A CA certificate fixture (the store does not parse `der`; these bytes name the certificate).
pub fn ca(name: &str, etag_value: &str) -> CaCertificate {
    CaCertificate {
        name: name.to_owned(),
        der: format!("der of {name}").into_bytes(),
        is_verified: false,
        verification_code: None,
        created: Timestamp::parse_iso(CREATED).unwrap(),
        updated: Timestamp::parse_iso(CREATED).unwrap(),
        etag: etag(etag_value),
    }
}

/// `PutCertificate`.
pub fn put_certificate<S: BlockingStore>(
    s: &S,
    certificate: CaCertificate,
    condition: WriteCondition,
    max_certificates: Option<usize>,
) -> Result<CaCertificate, StoreError> {
    match s.execute(StoreOp::PutCertificate {
        certificate: Box::new(certificate),
        condition,
        max_certificates,
    })? {
        StoreResult::Certificate(Some(c)) => Ok(*c),
        other => panic!("PutCertificate answered {other:?}"),
    }
}

/// `GetCertificate`.
pub fn get_certificate<S: BlockingStore>(s: &S, name: &str) -> Option<CaCertificate> {
    match s.execute(StoreOp::GetCertificate { name: name.to_owned() }).unwrap() {
        StoreResult::Certificate(c) => c.map(|c| *c),
        other => panic!("GetCertificate answered {other:?}"),
    }
}

/// `DeleteCertificate`.
pub fn delete_certificate<S: BlockingStore>(
    s: &S,
    name: &str,
    if_match: Option<IfMatch>,
) -> Result<(), StoreError> {
    match s.execute(StoreOp::DeleteCertificate { name: name.to_owned(), if_match })? {
        StoreResult::Done => Ok(()),
        other => panic!("DeleteCertificate answered {other:?}"),
    }
}

/// `ListCertificates`.
pub fn list_certificates<S: BlockingStore>(s: &S) -> Vec<CaCertificate> {
    match s.execute(StoreOp::ListCertificates).unwrap() {
        StoreResult::Certificates(c) => c,
        other => panic!("ListCertificates answered {other:?}"),
    }
}

/// The names of some certificates, in order.
pub fn certificate_names(certificates: &[CaCertificate]) -> Vec<&str> {
    certificates.iter().map(|c| c.name.as_str()).collect()
}

/// Create-only refuses an existing certificate (names compare case-insensitively); get finds it by any case.
pub fn certificate_create_only_and_get<S: BlockingStore>(s: &S) {
    assert_eq!(get_certificate(s, "root"), None);
    let stored = put_certificate(s, ca("Root", "c1"), WriteCondition::CreateOnly, None).unwrap();
    assert_eq!(stored, ca("Root", "c1"));
    assert_eq!(
        put_certificate(s, ca("ROOT", "c2"), WriteCondition::CreateOnly, None),
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(get_certificate(s, "rOOt"), Some(ca("Root", "c1")));
}

/// If-Match replaces only a matching certificate; `*` matches any existing one; absent is not found.
pub fn certificate_if_match<S: BlockingStore>(s: &S) {
    assert_eq!(
        put_certificate(s, ca("root", "c2"), WriteCondition::IfMatch(if_match("c1")), None),
        Err(StoreError::NotFound)
    );
    put_certificate(s, ca("root", "c1"), WriteCondition::Upsert, None).unwrap();
    assert_eq!(
        put_certificate(s, ca("root", "c2"), WriteCondition::IfMatch(if_match("zz")), None),
        Err(StoreError::PreconditionFailed)
    );
    let mut verified = ca("root", "c2");
    verified.is_verified = true;
    verified.verification_code = Some("code".into());
    put_certificate(s, verified.clone(), WriteCondition::IfMatch(if_match("c1")), None).unwrap();
    assert_eq!(get_certificate(s, "root"), Some(verified));
    put_certificate(s, ca("root", "c3"), WriteCondition::IfMatch(IfMatch::Any), None).unwrap();
    assert_eq!(get_certificate(s, "root").unwrap().etag, etag("c3"));
}

/// Delete: not found when absent, If-Match honoured, unconditional without one.
pub fn certificate_delete<S: BlockingStore>(s: &S) {
    assert_eq!(delete_certificate(s, "root", None), Err(StoreError::NotFound));
    put_certificate(s, ca("root", "c1"), WriteCondition::Upsert, None).unwrap();
    put_certificate(s, ca("inter", "c1"), WriteCondition::Upsert, None).unwrap();
    assert_eq!(delete_certificate(s, "ROOT", Some(if_match("zz"))), Err(StoreError::PreconditionFailed));
    delete_certificate(s, "ROOT", Some(if_match("c1"))).unwrap();
    assert_eq!(get_certificate(s, "root"), None);
    delete_certificate(s, "inter", None).unwrap();
    assert_eq!(list_certificates(s), Vec::<CaCertificate>::new());
}

/// Creating beyond the limit is refused; replacing at the limit is not.
pub fn certificate_limit<S: BlockingStore>(s: &S) {
    put_certificate(s, ca("a", "c1"), WriteCondition::Upsert, Some(2)).unwrap();
    put_certificate(s, ca("b", "c1"), WriteCondition::Upsert, Some(2)).unwrap();
    assert_eq!(
        put_certificate(s, ca("c", "c1"), WriteCondition::Upsert, Some(2)),
        Err(StoreError::LimitReached { what: "CA certificates".into(), limit: 2 })
    );
    put_certificate(s, ca("B", "c2"), WriteCondition::Upsert, Some(2)).unwrap();
    assert_eq!(get_certificate(s, "c"), None);
    delete_certificate(s, "a", None).unwrap();
    put_certificate(s, ca("c", "c1"), WriteCondition::Upsert, Some(2)).unwrap();
}

/// Listed in key (lowercase name) order.
pub fn certificates_listed_in_key_order<S: BlockingStore>(s: &S) {
    for name in ["zeta", "Alpha", "mid", "beta"] {
        put_certificate(s, ca(name, "c1"), WriteCondition::Upsert, None).unwrap();
    }
    assert_eq!(certificate_names(&list_certificates(s)), ["Alpha", "beta", "mid", "zeta"]);
}

/// The device context carries every certificate, in key order, after every write and delete (with and
/// without an individual enrollment).
pub fn context_carries_certificates<S: BlockingStore>(s: &S) {
    assert!(load(s, "dev-1").certificates.is_empty());
    put_certificate(s, ca("root2", "c1"), WriteCondition::Upsert, None).unwrap();
    put_certificate(s, ca("Root1", "c1"), WriteCondition::Upsert, None).unwrap();
    assert_eq!(certificate_names(&load(s, "dev-1").certificates), ["Root1", "root2"]);
    let mut verified = ca("root2", "c2");
    verified.is_verified = true;
    put_certificate(s, verified.clone(), WriteCondition::IfMatch(if_match("c1")), None).unwrap();
    assert_eq!(load(s, "dev-1").certificates[1], verified);
    put_enrollment(s, enrollment("dev-2", "e1"), WriteCondition::Upsert).unwrap();
    assert_eq!(certificate_names(&load(s, "dev-2").certificates), ["Root1", "root2"]);
    delete_certificate(s, "root1", None).unwrap();
    assert_eq!(certificate_names(&load(s, "dev-1").certificates), ["root2"]);
    assert_eq!(certificate_names(&load(s, "dev-2").certificates), ["root2"]);
}

// ------------------------------------------------------------------------------------------------
// The audit log
// ------------------------------------------------------------------------------------------------

/// An audit record of `operation` on `target` at `seconds` past the Unix epoch, by `principal`.
pub fn audit_record(operation: AuditOperation, target: &str, principal: &str, seconds: i64) -> AuditRecord {
    AuditRecord {
        sequence: 0,
        time: Timestamp::from_unix_seconds(seconds),
        principal: principal.to_owned(),
        transport: AuditTransport::Https,
        operation,
        target: target.to_owned(),
        etag_before: None,
        etag_after: None,
        status: 200,
        error_code: None,
        tracking_id: format!("tracking-{target}-{seconds}"),
    }
}

/// `Audited`: the write's result and the record as appended.
pub fn audited<S: BlockingStore>(
    s: &S,
    op: StoreOp,
    record: AuditRecord,
) -> Result<(StoreResult, AuditRecord), StoreError> {
    match s.execute(StoreOp::Audited { op: Box::new(op), record: Box::new(record) })? {
        StoreResult::Audited { result, record } => Ok((*result, *record)),
        other => panic!("unexpected result {other:?}"),
    }
}

/// `QueryAudit`, one page.
pub fn query_audit<S: BlockingStore>(s: &S, filter: AuditFilter, req: PageRequest) -> Page<AuditRecord> {
    match s.execute(StoreOp::QueryAudit { filter, page: req }).unwrap() {
        StoreResult::Audit(p) => p,
        other => panic!("unexpected result {other:?}"),
    }
}

/// Every audit record passing `filter`, newest first, paged `limit` at a time.
pub fn all_audit<S: BlockingStore>(s: &S, filter: &AuditFilter, limit: usize) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let p = query_audit(s, filter.clone(), page(after, limit));
        assert!(p.items.len() <= limit.max(1));
        out.extend(p.items);
        match p.next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

/// An audited write performs the write and appends its record in one step: the store numbers it and
/// fills the ETags before (`None` on create) and after (`None` on delete), for enrollments, groups,
/// registration states and CA certificates.
pub fn audited_writes_append_their_records<S: BlockingStore>(s: &S) {
    use AuditOperation as O;
    let put = |e| StoreOp::PutEnrollment { enrollment: Box::new(e), condition: WriteCondition::Upsert };
    let (result, r1) =
        audited(s, put(enrollment("dev-1", "e1")), audit_record(O::EnrollmentPut, "dev-1", "p", 1)).unwrap();
    assert!(matches!(result, StoreResult::Enrollment(Some(_))));
    assert_eq!(get_enrollment(s, "dev-1").unwrap().etag.as_deref(), Some("e1"));
    assert!(r1.sequence > 0);
    assert_eq!((r1.etag_before.as_deref(), r1.etag_after.as_deref()), (None, Some("e1")));
    let (_, r2) =
        audited(s, put(enrollment("dev-1", "e2")), audit_record(O::EnrollmentPut, "dev-1", "p", 2)).unwrap();
    assert!(r2.sequence > r1.sequence);
    assert_eq!((r2.etag_before.as_deref(), r2.etag_after.as_deref()), (Some("e1"), Some("e2")));
    let delete = StoreOp::DeleteEnrollment { registration_id: rid("DEV-1"), if_match: None };
    let (result, r3) = audited(s, delete, audit_record(O::EnrollmentDelete, "DEV-1", "p", 3)).unwrap();
    assert!(matches!(result, StoreResult::Done));
    assert_eq!((r3.etag_before.as_deref(), r3.etag_after.as_deref()), (Some("e2"), None));
    assert!(get_enrollment(s, "dev-1").is_none());

    let put_group = StoreOp::PutGroup {
        group: Box::new(sym_group("g1", "g-1")),
        condition: WriteCondition::CreateOnly,
        max_symmetric_key_groups: None,
    };
    let (_, g) = audited(s, put_group, audit_record(O::GroupPut, "g1", "p", 4)).unwrap();
    assert_eq!(g.etag_after.as_deref(), Some("g-1"));
    assert_eq!(load(s, "dev-9").groups.len(), 1, "the group write itself happened");
    let delete = StoreOp::DeleteGroup { group_id: gid("g1"), if_match: Some(if_match("g-1")) };
    let (_, g) = audited(s, delete, audit_record(O::GroupDelete, "g1", "p", 5)).unwrap();
    assert_eq!((g.etag_before.as_deref(), g.etag_after), (Some("g-1"), None));

    commit(s, record("dev-2", None, "r1"), None).unwrap();
    let delete = StoreOp::DeleteRegistration { registration_id: rid("dev-2"), if_match: None };
    let (_, r) = audited(s, delete, audit_record(O::RegistrationDelete, "dev-2", "p", 6)).unwrap();
    assert_eq!(r.etag_before.as_deref(), Some("r1"));
    assert!(get_registration(s, "dev-2").is_none(), "the registration cache follows an audited delete");

    let put_ca = StoreOp::PutCertificate {
        certificate: Box::new(ca("root", "c1")),
        condition: WriteCondition::CreateOnly,
        max_certificates: None,
    };
    let (_, c) = audited(s, put_ca, audit_record(O::CertificatePut, "root", "p", 7)).unwrap();
    assert_eq!((c.etag_before, c.etag_after.as_deref()), (None, Some("c1")));
    assert_eq!(certificate_names(&load(s, "dev-9").certificates), ["root"]);

    let all = all_audit(s, &AuditFilter::default(), 100);
    assert_eq!(all.len(), 7);
    let seconds: Vec<i64> = all.iter().map(|r| r.time.unix_seconds()).collect();
    assert_eq!(seconds, [7, 6, 5, 4, 3, 2, 1], "newest first");
    assert_eq!(all[6], r1, "what the query returns is what was appended");
}

/// A write that fails (precondition, not found, conflict, limit) writes nothing and appends nothing;
/// a standalone append records a refusal.
pub fn failed_audited_writes_append_nothing<S: BlockingStore>(s: &S) {
    use AuditOperation as O;
    put_enrollment(s, enrollment("dev-1", "e1"), WriteCondition::Upsert).unwrap();
    let stale = StoreOp::PutEnrollment {
        enrollment: Box::new(enrollment("dev-1", "e2")),
        condition: WriteCondition::IfMatch(if_match("nope")),
    };
    assert_eq!(
        audited(s, stale, audit_record(O::EnrollmentPut, "dev-1", "p", 1)).unwrap_err(),
        StoreError::PreconditionFailed
    );
    assert_eq!(get_enrollment(s, "dev-1").unwrap().etag.as_deref(), Some("e1"));
    let missing = StoreOp::DeleteGroup { group_id: gid("none"), if_match: None };
    assert_eq!(
        audited(s, missing, audit_record(O::GroupDelete, "none", "p", 2)).unwrap_err(),
        StoreError::NotFound
    );
    put_certificate(s, ca("a", "c1"), WriteCondition::Upsert, None).unwrap();
    let over = StoreOp::PutCertificate {
        certificate: Box::new(ca("b", "c1")),
        condition: WriteCondition::Upsert,
        max_certificates: Some(1),
    };
    assert!(matches!(
        audited(s, over, audit_record(O::CertificatePut, "b", "p", 3)),
        Err(StoreError::LimitReached { .. })
    ));
    assert!(all_audit(s, &AuditFilter::default(), 10).is_empty());
    // Only service writes can be audited.
    let read = StoreOp::GetEnrollment { registration_id: rid("dev-1") };
    assert!(s
        .execute(StoreOp::Audited {
            op: Box::new(read),
            record: Box::new(audit_record(O::EnrollmentPut, "x", "p", 4))
        })
        .is_err());

    let mut refused = audit_record(O::EnrollmentPut, "dev-1", "p", 5);
    refused.status = 412;
    refused.error_code = Some(412_001);
    let mut second = audit_record(O::BulkGroups, "g2", "q", 5);
    second.status = 403;
    second.error_code = Some(403_001);
    assert!(matches!(
        s.execute(StoreOp::AppendAudit { records: vec![refused.clone(), second.clone()] }).unwrap(),
        StoreResult::Done
    ));
    let all = all_audit(s, &AuditFilter::default(), 10);
    assert_eq!(all.len(), 2);
    assert!(all[0].sequence > all[1].sequence);
    refused.sequence = all[1].sequence;
    second.sequence = all[0].sequence;
    assert_eq!(all, [second, refused]);
}

/// Queries filter by time (since inclusive, until exclusive), principal and target (case-insensitive) and
/// operation, newest first, and page by sequence without gaps or repeats.
pub fn audit_query_filters_and_pages<S: BlockingStore>(s: &S) {
    use AuditOperation as O;
    let mut records = Vec::new();
    for i in 0..25i64 {
        let target = format!("dev-{}", i % 5);
        let principal = if i % 2 == 0 { "Owner" } else { "reader" };
        let op = if i % 3 == 0 { O::EnrollmentDelete } else { O::EnrollmentPut };
        records.push(audit_record(op, &target, principal, 100 + i));
    }
    s.execute(StoreOp::AppendAudit { records }).unwrap();
    let all = all_audit(s, &AuditFilter::default(), 7);
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].sequence > w[1].sequence), "newest first, no repeats");
    let f =
        |since: Option<i64>, until: Option<i64>, principal: Option<&str>, target: Option<&str>| AuditFilter {
            since: since.map(Timestamp::from_unix_seconds),
            until: until.map(Timestamp::from_unix_seconds),
            principal: principal.map(str::to_owned),
            target: target.map(str::to_owned),
            operation: None,
        };
    assert_eq!(all_audit(s, &f(Some(120), None, None, None), 2).len(), 5);
    assert_eq!(all_audit(s, &f(None, Some(103), None, None), 2).len(), 3);
    assert_eq!(all_audit(s, &f(Some(110), Some(115), None, None), 100).len(), 5);
    let owner = all_audit(s, &f(None, None, Some("OWNER"), None), 3);
    assert_eq!(owner.len(), 13);
    assert!(owner.iter().all(|r| r.principal == "Owner"));
    let dev3 = all_audit(s, &f(None, None, None, Some("DEV-3")), 2);
    assert_eq!(dev3.iter().map(|r| r.time.unix_seconds()).collect::<Vec<_>>(), [123, 118, 113, 108, 103]);
    assert_eq!(all_audit(s, &f(Some(110), None, Some("reader"), Some("dev-1")), 1).len(), 2);
    let deletes = AuditFilter { operation: Some(O::EnrollmentDelete), ..AuditFilter::default() };
    assert_eq!(all_audit(s, &deletes, 4).len(), 9);
    let first = query_audit(s, AuditFilter::default(), page(None, 0));
    assert_eq!(first.items.len(), 1, "a page holds at least one record");
    assert!(first.next.is_some());
    assert!(s
        .execute(StoreOp::QueryAudit { filter: AuditFilter::default(), page: page(Some("x".into()), 5) })
        .is_err());
}

/// Runs an [`AsyncStore`] through the blocking interface, so the async paths run the same suite.
pub struct ViaAsync<S>(pub S);

impl<S: AsyncStore> BlockingStore for ViaAsync<S> {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        futures::executor::block_on(AsyncStore::execute(&self.0, op))
    }
}

/// Generates the conformance suite as `mod $name { #[test] fn ... }`, one test per suite function of
/// [`testing`](crate::testing), each running against a fresh store built by the expression `$store`
/// (evaluated once per test, in a module that does `use super::*`).
///
/// ```ignore
/// dps_store::store_conformance_tests!(sqlite, TempSqlite::new());
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($name:ident, $store:expr $(,)?) => {
        $crate::store_conformance_tests!(@suite $name, $store, [
            enrollment_put_and_get,
            enrollment_create_only,
            enrollment_if_match,
            enrollment_stored_etag_is_parsed,
            enrollment_replace_keeps_created_time,
            enrollment_delete,
            group_put_get_and_conditions,
            group_delete,
            group_limit_counts_symmetric_key_groups_only,
            registration_commit_conditions,
            registration_get_and_delete,
            context_with_individual_enrollment,
            context_without_individual_enrollment,
            enrollments_page_through_25,
            groups_page_through_25,
            registrations_page_by_group,
            query_filters,
            page_limit_zero_means_one,
            group_delete_leaves_registrations,
            enrollment_delete_leaves_registration,
            operations_are_independent,
            certificate_create_only_and_get,
            certificate_if_match,
            certificate_delete,
            certificate_limit,
            certificates_listed_in_key_order,
            context_carries_certificates,
            audited_writes_append_their_records,
            failed_audited_writes_append_nothing,
            audit_query_filters_and_pages,
        ]);
    };
    (@suite $name:ident, $store:expr, [$($test:ident),* $(,)?]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    let store = $store;
                    $crate::testing::$test(&store);
                }
            )*
        }
    };
}
