//! The audit log of the service flows: every write command (typed or over HTTP) leaves exactly one record
//! per item written or refused, with the principal, operation, target, ETags before and after, outcome
//! and tracking ID; reads leave none; records hold no secret; `GET /audit` reads them back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use dps_core::audit::{AuditFilter, AuditOperation as O, AuditRecord, AuditTransport};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_core::proto::{IdScope, IfMatch, RegistrationId, Timestamp};
use dps_core::store::{BlockingStore, PageRequest, StoreOp, StoreResult};
use dps_core::{
    run_blocking, AccessPolicy, Engine, EngineConfig, HttpRequest, LinkedHub, Principal, Reply, Rights,
    ServiceCommand,
};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};

const NOW: i64 = 1_700_000_000;
/// The policies' key (base64 of 32 bytes of 1).
const POLICY_KEY: [u8; 32] = [1; 32];
/// A device key the tests put in enrollments: it must never show in a record.
const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZg==";
const DEVICE_KEY_2: &str = "YW5vdGhlci1zZWNyZXQta2V5LTAxMjM0NTY3ODlhYmNkZWY=";

struct Rig {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
    now: Timestamp,
}

impl Rig {
    fn new() -> Rig {
        let hubs = vec![LinkedHub::new("hub.example.net", None, None).unwrap()];
        let k = SymmetricKey::from_bytes(POLICY_KEY.to_vec());
        let config = EngineConfig::new(IdScope::parse("0ne00000001").unwrap(), "dps.example.net", hubs)
            .with_policy(AccessPolicy {
                key_name: "owner".into(),
                primary_key: k.clone(),
                secondary_key: k.clone(),
                rights: Rights::ALL,
            })
            .with_policy(AccessPolicy {
                key_name: "reader".into(),
                primary_key: k.clone(),
                secondary_key: k,
                rights: Rights::ENROLLMENT_READ,
            });
        Rig {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: ChaCha8Rng::seed_from_u64(11),
            now: Timestamp::from_unix_seconds(NOW),
        }
    }

    fn http_as(
        &mut self,
        policy: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Reply {
        let expiry = self.now.unix_seconds() + 60;
        let request = common::service_request(policy, method, path, body.as_ref(), if_match, expiry);
        let mut flow = self.engine.http(self.now, &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn http(&mut self, method: &str, path: &str, body: Option<Value>, if_match: Option<&str>) -> Reply {
        self.http_as("owner", method, path, body, if_match)
    }

    fn command(&mut self, principal: &Principal, command: ServiceCommand) -> Reply {
        let mut flow = self.engine.command(self.now, &mut self.rng, principal, command);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    /// Every record, oldest first.
    fn audit(&self) -> Vec<AuditRecord> {
        let op = StoreOp::QueryAudit {
            filter: AuditFilter::default(),
            page: PageRequest { after: None, limit: 1000 },
        };
        match self.store.execute(op).unwrap() {
            StoreResult::Audit(page) => page.items.into_iter().rev().collect(),
            other => panic!("{other:?}"),
        }
    }

    /// The records appended since `before` records existed.
    fn new_records(&self, before: usize) -> Vec<AuditRecord> {
        self.audit().split_off(before)
    }
}

fn enrollment(id: &str, key: &str) -> Value {
    json!({
        "registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": DEVICE_KEY_2}},
    })
}

fn group(id: &str) -> Value {
    json!({
        "enrollmentGroupId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": DEVICE_KEY, "secondaryKey": DEVICE_KEY_2}},
    })
}

fn etag(r: &Reply) -> String {
    r.header("etag").unwrap().trim_matches('"').to_owned()
}

fn assert_one(rig: &Rig, before: usize, reply: &Reply, op: O, target: &str) -> AuditRecord {
    let records = rig.new_records(before);
    assert_eq!(records.len(), 1, "exactly one record for {op}: {records:?}");
    let r = records.into_iter().next().unwrap();
    assert_eq!(r.operation, op);
    assert_eq!(r.target, target);
    assert_eq!(r.status, reply.status);
    assert_eq!(r.error_code, reply.error_code.map(|c| c.code()));
    assert_eq!(r.tracking_id, reply.tracking_id);
    assert_eq!(r.time, rig.now);
    r
}

#[test]
fn every_http_write_leaves_one_record_with_its_etags() {
    let mut rig = Rig::new();
    let created = rig.http("PUT", "/enrollments/dev-1", Some(enrollment("dev-1", DEVICE_KEY)), None);
    assert_eq!(created.status, 200);
    let r = assert_one(&rig, 0, &created, O::EnrollmentPut, "dev-1");
    assert_eq!((r.principal.as_str(), r.transport), ("owner", AuditTransport::Https));
    assert_eq!((r.etag_before, r.etag_after.clone()), (None, Some(etag(&created))));

    // A replace without keys reads the stored item first: still one record, ETag before and after.
    let n = rig.audit().len();
    let replaced = rig.http(
        "PUT",
        "/enrollments/dev-1",
        Some(json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}})),
        None,
    );
    assert_eq!(replaced.status, 200);
    let r = assert_one(&rig, n, &replaced, O::EnrollmentPut, "dev-1");
    assert_eq!((r.etag_before, r.etag_after), (Some(etag(&created)), Some(etag(&replaced))));

    // Reads leave nothing.
    let n = rig.audit().len();
    assert_eq!(rig.http("GET", "/enrollments/dev-1", None, None).status, 200);
    assert_eq!(rig.http("POST", "/enrollments/dev-1/attestationmechanism", None, None).status, 200);
    assert_eq!(
        rig.http("POST", "/enrollments/query", Some(json!({"query": "SELECT * FROM enrollments"})), None)
            .status,
        200
    );
    assert_eq!(rig.audit().len(), n);

    let deleted = rig.http("DELETE", "/enrollments/dev-1", None, Some(&etag(&replaced)));
    assert_eq!(deleted.status, 204);
    let r = assert_one(&rig, n, &deleted, O::EnrollmentDelete, "dev-1");
    assert_eq!((r.etag_before, r.etag_after), (Some(etag(&replaced)), None));

    let n = rig.audit().len();
    let g = rig.http("PUT", "/enrollmentGroups/g1", Some(group("g1")), None);
    assert_eq!(g.status, 200);
    assert_one(&rig, n, &g, O::GroupPut, "g1");
    let n = rig.audit().len();
    let gd = rig.http("DELETE", "/enrollmentGroups/g1", None, None);
    assert_eq!(gd.status, 204);
    let r = assert_one(&rig, n, &gd, O::GroupDelete, "g1");
    assert_eq!(r.etag_before, Some(etag(&g)));

    // A registration state (written by the device API, which is not audited) deleted by the service.
    rig.http("PUT", "/enrollments/dev-2", Some(enrollment("dev-2", DEVICE_KEY)), None);
    let record = dps_store::testing::record("dev-2", None, "r1");
    rig.store.execute(StoreOp::CommitRegistration { record: Box::new(record), expected: None }).unwrap();
    let n = rig.audit().len();
    assert_eq!(rig.audit().len(), n, "a registration commit is not a service write");
    let rd = rig.http("DELETE", "/registrations/dev-2", None, None);
    assert_eq!(rd.status, 204);
    let r = assert_one(&rig, n, &rd, O::RegistrationDelete, "dev-2");
    assert_eq!(r.etag_before.as_deref(), Some("r1"));
}

#[test]
fn refused_writes_are_audited_with_their_code() {
    let mut rig = Rig::new();
    // 403001: the reader policy may not write (refused before the body is read).
    let refused =
        rig.http_as("reader", "PUT", "/enrollments/dev-1", Some(enrollment("dev-1", DEVICE_KEY)), None);
    assert_eq!(refused.status, 403);
    let r = assert_one(&rig, 0, &refused, O::EnrollmentPut, "dev-1");
    assert_eq!((r.principal.as_str(), r.error_code), ("reader", Some(403_001)));
    assert_eq!((r.etag_before, r.etag_after), (None, None));

    // 412001: a stale ETag; nothing written, one record.
    let created = rig.http("PUT", "/enrollments/dev-1", Some(enrollment("dev-1", DEVICE_KEY)), None);
    let n = rig.audit().len();
    let stale = rig.http(
        "PUT",
        "/enrollments/dev-1",
        Some(enrollment("dev-1", DEVICE_KEY)),
        Some("\"00000000-0000-0000-0000-000000000000\""),
    );
    assert_eq!(stale.status, 412);
    let r = assert_one(&rig, n, &stale, O::EnrollmentPut, "dev-1");
    assert_eq!(r.error_code, Some(412_001));
    let stored = rig.http("GET", "/enrollments/dev-1", None, None);
    assert_eq!(etag(&stored), etag(&created), "the refused write wrote nothing");

    // 404 delete, 400 invalid body: audited too.
    let n = rig.audit().len();
    let missing = rig.http("DELETE", "/enrollmentGroups/nope", None, None);
    assert_eq!(missing.status, 404);
    assert_one(&rig, n, &missing, O::GroupDelete, "nope");
    let n = rig.audit().len();
    let bad = rig.http("PUT", "/enrollments/dev-3", Some(json!({"registrationId": "dev-3", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64!"}}})), None);
    assert_eq!(bad.status, 400);
    assert_one(&rig, n, &bad, O::EnrollmentPut, "dev-3");

    // A read that is refused is not audited; nor is a request whose token does not verify.
    let n = rig.audit().len();
    assert_eq!(rig.http_as("reader", "GET", "/registrations/dev-1", None, None).status, 403);
    assert_eq!(
        rig.http_as("nobody", "PUT", "/enrollments/dev-1", Some(enrollment("dev-1", DEVICE_KEY)), None)
            .status,
        401
    );
    assert_eq!(rig.audit().len(), n);
}

#[test]
fn bulk_operations_leave_one_record_per_item() {
    let mut rig = Rig::new();
    rig.http("PUT", "/enrollments/b-2", Some(enrollment("b-2", DEVICE_KEY)), None);
    let n = rig.audit().len();
    let bulk = json!({
        "mode": "create",
        "enrollments": [enrollment("b-1", DEVICE_KEY), enrollment("b-2", DEVICE_KEY), enrollment("b-3", DEVICE_KEY)],
    });
    let reply = rig.http("POST", "/enrollments", Some(bulk), None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body_json().unwrap()["isSuccessful"], false);
    let records = rig.new_records(n);
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|r| r.operation == O::BulkEnrollments && r.tracking_id == reply.tracking_id));
    let by = |t: &str| records.iter().find(|r| r.target == t).unwrap();
    assert!(by("b-1").succeeded() && by("b-3").succeeded());
    assert!(by("b-1").etag_after.is_some());
    assert_eq!((by("b-2").status, by("b-2").error_code), (409, Some(409_000)));

    let n = rig.audit().len();
    let delete = json!({"mode": "delete", "enrollmentGroups": [group("bg-1")]});
    let reply = rig.http("POST", "/enrollmentGroups", Some(delete), None);
    assert_eq!(reply.status, 200);
    let records = rig.new_records(n);
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].operation, records[0].status), (O::BulkGroups, 404));

    // The whole bulk refused (no rights): one record per item named.
    let n = rig.audit().len();
    let bulk = json!({"mode": "update", "enrollments": [enrollment("b-4", DEVICE_KEY), enrollment("b-5", DEVICE_KEY)]});
    let reply = rig.http_as("reader", "POST", "/enrollments", Some(bulk.clone()), None);
    assert_eq!(reply.status, 403);
    let records = rig.new_records(n);
    assert_eq!(records.len(), 1, "refused before the body is read: the route names no item");
    assert_eq!((records[0].target.as_str(), records[0].error_code), ("", Some(403_001)));
    let bulk: dps_core::proto::model::BulkEnrollmentOperation = serde_json::from_value(bulk).unwrap();
    let reader = Principal::granted("in-process-reader", Rights::ENROLLMENT_READ);
    let reply = rig.command(&reader, ServiceCommand::BulkEnrollments(bulk));
    assert_eq!(reply.status, 403);
    let records = rig.new_records(n + 1);
    let targets: Vec<&str> = records.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["b-4", "b-5"]);
    assert!(records
        .iter()
        .all(|r| r.transport == AuditTransport::InProcess && r.principal == "in-process-reader"));
}

fn ca(cn: &str) -> (String, CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap().pem(), params, key)
}

#[test]
fn typed_commands_and_certificate_operations_are_audited_in_process() {
    let mut rig = Rig::new();
    let admin = Principal::granted("backend", Rights::ALL);
    let (pem, params, key) = ca("audit root");
    let upload = ServiceCommand::PutCertificate {
        name: "root".into(),
        certificate_text: pem,
        is_verified: false,
        if_match: None,
    };
    let put = rig.command(&admin, upload);
    assert_eq!(put.status, 200);
    let r = assert_one(&rig, 0, &put, O::CertificatePut, "root");
    assert_eq!((r.principal.as_str(), r.transport), ("backend", AuditTransport::InProcess));
    assert_eq!(r.etag_after, Some(etag(&put)));

    let code = rig.command(
        &admin,
        ServiceCommand::GenerateVerificationCode { name: "root".into(), if_match: IfMatch::Any },
    );
    assert_eq!(code.status, 200);
    let r = assert_one(&rig, 1, &code, O::CertificateGenerateVerificationCode, "root");
    assert_eq!((r.etag_before, r.etag_after), (Some(etag(&put)), Some(etag(&code))));
    let verification_code =
        code.body_json().unwrap()["properties"]["verificationCode"].as_str().unwrap().to_owned();

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, verification_code.as_str());
    let proof = leaf.signed_by(&leaf_key, &Issuer::from_params(&params, &key)).unwrap().pem();
    let verified = rig.command(
        &admin,
        ServiceCommand::VerifyCertificate {
            name: "root".into(),
            if_match: IfMatch::Any,
            certificate_text: proof,
        },
    );
    assert_eq!(verified.status, 200);
    assert_one(&rig, 2, &verified, O::CertificateVerify, "root");

    let n = rig.audit().len();
    assert_eq!(rig.command(&admin, ServiceCommand::ListCertificates).status, 200);
    assert_eq!(rig.command(&admin, ServiceCommand::GetCertificate { name: "root".into() }).status, 200);
    assert_eq!(rig.audit().len(), n, "reads leave nothing");
    let deleted =
        rig.command(&admin, ServiceCommand::DeleteCertificate { name: "root".into(), if_match: None });
    assert_eq!(deleted.status, 204);
    let r = assert_one(&rig, n, &deleted, O::CertificateDelete, "root");
    assert_eq!(r.etag_before, Some(etag(&verified)));

    let e: dps_core::proto::model::IndividualEnrollment =
        serde_json::from_value(enrollment("typed-1", DEVICE_KEY)).unwrap();
    let n = rig.audit().len();
    let put = rig.command(&admin, ServiceCommand::PutEnrollment { enrollment: Box::new(e), if_match: None });
    assert_one(&rig, n, &put, O::EnrollmentPut, "typed-1");
    let n = rig.audit().len();
    let del = rig.command(
        &admin,
        ServiceCommand::DeleteRegistration {
            registration_id: RegistrationId::parse("typed-1").unwrap(),
            if_match: None,
        },
    );
    assert_eq!(del.status, 404);
    assert_one(&rig, n, &del, O::RegistrationDelete, "typed-1");

    // No record carries a key, a verification code or certificate material.
    let all = serde_json::to_string(&rig.audit()).unwrap();
    for secret in [DEVICE_KEY, DEVICE_KEY_2, verification_code.as_str(), "BEGIN CERTIFICATE"] {
        assert!(!all.contains(secret), "{secret} in {all}");
    }
}

#[test]
fn the_audit_route_reads_records_newest_first_with_filters_and_paging() {
    let mut rig = Rig::new();
    for i in 0..5 {
        rig.http(
            "PUT",
            &format!("/enrollments/dev-{i}"),
            Some(enrollment(&format!("dev-{i}"), DEVICE_KEY)),
            None,
        );
        rig.now = rig.now.plus_millis(1000);
    }
    rig.http_as("reader", "DELETE", "/enrollments/dev-1", None, None);
    let all = rig.http("GET", "/audit", None, None);
    assert_eq!(all.status, 200, "{:?}", all.body_json());
    assert_eq!(all.header("x-ms-item-type"), Some("auditRecord"));
    let items = all.body_json().unwrap();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(items[0]["operation"], "enrollment.delete");
    assert_eq!(items[0]["principal"], "reader");
    assert_eq!(items[0]["errorCode"], 403_001);
    assert_eq!(items[5]["target"], "dev-0");

    let dev1 = rig.http("GET", "/audit?target=DEV-1", None, None).body_json().unwrap();
    assert_eq!(dev1.as_array().unwrap().len(), 2);
    let since = Timestamp::from_unix_seconds(NOW + 3).to_iso();
    let recent = rig.http("GET", &format!("/audit?since={since}&principal=owner"), None, None);
    assert_eq!(recent.body_json().unwrap().as_array().unwrap().len(), 2, "dev-3 and dev-4");
    let deletes = rig.http("GET", "/audit?operation=enrollment.delete", None, None).body_json().unwrap();
    assert_eq!(deletes.as_array().unwrap().len(), 1);

    // Paging with x-ms-max-item-count and x-ms-continuation.
    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let request = HttpRequest {
            method: "GET".into(),
            path_and_query: "/audit?api-version=2021-10-01".into(),
            authorization: Some(build_token(
                &SymmetricKey::from_bytes(POLICY_KEY.to_vec()),
                "dps.example.net",
                NOW + 600,
                Some("owner"),
            )),
            max_item_count: Some("4".into()),
            continuation: continuation.clone(),
            ..HttpRequest::default()
        };
        let mut flow = rig.engine.http(rig.now, &mut rig.rng, request);
        let page = run_blocking(&mut flow, &rig.store, &rig.hubs);
        let items = page.body_json().unwrap();
        seen.extend(items.as_array().unwrap().iter().map(|i| i["sequence"].as_u64().unwrap()));
        match page.header("x-ms-continuation") {
            Some(c) => continuation = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, [6, 5, 4, 3, 2, 1]);

    // ServiceConfig is needed; bad filters are 400.
    let n = rig.audit().len();
    assert_eq!(rig.http_as("reader", "GET", "/audit", None, None).status, 403);
    assert_eq!(rig.http("GET", "/audit?since=yesterday", None, None).status, 400);
    assert_eq!(rig.http("GET", "/audit?operation=enrollment.read", None, None).status, 400);
    assert_eq!(rig.audit().len(), n, "reading the log is not audited");
}
