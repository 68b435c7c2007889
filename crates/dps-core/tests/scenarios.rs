//! Engine scenarios driven in virtual time: the engine, the device-side client state machine, the in-memory
//! store and the in-memory hub directory, wired together without sockets, threads or sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::device_request;
use dps_client::{ClientAction, ClientConfig, ClientError, ClientEvent, RegistrationClient};
use dps_core::hub::{DeviceTwin, MemoryHubDirectory};
use dps_core::proto::model::{DeviceRegistrationResult, RegistrationStatus, RegistrationSubstatus};
use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_core::proto::{ApiVersion, IdScope, OperationId, RegistrationId, Timestamp};
use dps_core::{
    run_async, run_blocking, AccessPolicy, DeviceCall, DeviceRequest, Engine, EngineConfig, Flow,
    HttpRequest, Input, LinkedHub, Reply, Rights, Step,
};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const SCOPE: &str = "0ne0000ABCD";
const HOST: &str = "mydps.example.net";
const HUB_A: &str = "hub-a.example.net";
const HUB_B: &str = "hub-b.example.net";
const T0: i64 = 1_700_000_000;

struct World {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
    now: Timestamp,
    owner_key: SymmetricKey,
    reader_key: SymmetricKey,
}

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

impl World {
    fn new() -> World {
        Self::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut EngineConfig)) -> World {
        let hubs =
            vec![LinkedHub::new(HUB_A, None, None).unwrap(), LinkedHub::new(HUB_B, None, None).unwrap()];
        let mut config = EngineConfig::new(IdScope::parse(SCOPE).unwrap(), HOST, hubs)
            .with_policy(AccessPolicy {
                key_name: "provisioningserviceowner".into(),
                primary_key: key(100),
                secondary_key: key(101),
                rights: Rights::ALL,
            })
            .with_policy(AccessPolicy {
                key_name: "enrollmentread".into(),
                primary_key: key(102),
                secondary_key: key(103),
                rights: Rights::ENROLLMENT_READ.union(Rights::REGISTRATION_STATUS_READ),
            });
        tweak(&mut config);
        World {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: ChaCha8Rng::seed_from_u64(7),
            now: Timestamp::from_unix_seconds(T0),
            owner_key: key(100),
            reader_key: key(102),
        }
    }

    fn service_as(
        &mut self,
        policy: &str,
        k: &SymmetricKey,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        self.service_full(policy, k, method, path, body, None, None, None)
    }

    fn service(&mut self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let k = self.owner_key.clone();
        self.service_as("provisioningserviceowner", &k, method, path, body)
    }

    #[allow(clippy::too_many_arguments)]
    fn service_full(
        &mut self,
        policy: &str,
        k: &SymmetricKey,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
        page: Option<usize>,
        continuation: Option<&str>,
    ) -> Reply {
        let token = build_token(k, HOST, self.now.unix_seconds() + 600, Some(policy));
        let request = HttpRequest {
            method: method.into(),
            path_and_query: format!("{path}?api-version=2021-10-01"),
            authorization: Some(token),
            if_match: if_match.map(str::to_owned),
            max_item_count: page.map(|p| p.to_string()),
            continuation: continuation.map(str::to_owned),
            client_certificates: None,
            client_address: None,
            body: body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default(),
        };
        let mut flow = self.engine.http(self.now, &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn enroll(&mut self, body: Value) -> Value {
        let id = body["registrationId"].as_str().unwrap().to_owned();
        let r = self.service("PUT", &format!("/enrollments/{id}"), Some(body));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.body_json().unwrap()
    }

    fn enroll_group(&mut self, body: Value) -> Value {
        let id = body["enrollmentGroupId"].as_str().unwrap().to_owned();
        let r = self.service("PUT", &format!("/enrollmentGroups/{id}"), Some(body));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.body_json().unwrap()
    }

    fn device_raw(
        &mut self,
        id: &str,
        call: DeviceCall,
        authorization: Option<String>,
        body: &[u8],
    ) -> Reply {
        self.device_raw_scope(SCOPE, id, call, authorization, body)
    }

    fn device_raw_scope(
        &mut self,
        scope: &str,
        id: &str,
        call: DeviceCall,
        authorization: Option<String>,
        body: &[u8],
    ) -> Reply {
        let request = DeviceRequest {
            id_scope: IdScope::parse(scope).unwrap(),
            registration_id: RegistrationId::parse(id).unwrap(),
            call,
            api_version: Some(ApiVersion::V2021_06_01),
            credential: dps_core::proto::Credential::from_transport(authorization, None),
            body: body.to_vec(),
            client_address: None,
        };
        let mut flow = self.engine.device(self.now, &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn device_token(&self, id: &str, k: &SymmetricKey, expiry: i64) -> String {
        build_token(k, &encode_resource(&device_resource(SCOPE, id)), expiry, Some("registration"))
    }

    /// Provisions like a real device: the client state machine against the engine, in virtual time.
    fn provision_with(
        &mut self,
        id: &str,
        k: &SymmetricKey,
        api: ApiVersion,
    ) -> Result<DeviceRegistrationResult, ClientError> {
        let mut config =
            ClientConfig::new(IdScope::parse(SCOPE).unwrap(), RegistrationId::parse(id).unwrap(), k.clone());
        config.api_version = api;
        let mut client = RegistrationClient::new(config);
        let mut action = client.start(self.now);
        loop {
            action = match action {
                ClientAction::Send(request) => {
                    let mut flow = self.engine.device(self.now, &mut self.rng, device_request(&request));
                    let reply = run_blocking(&mut flow, &self.store, &self.hubs);
                    client.handle(
                        self.now,
                        ClientEvent::Response {
                            status: reply.status,
                            retry_after: reply.retry_after,
                            body: reply.body,
                        },
                    )
                }
                ClientAction::Wait { until } => {
                    assert!(until > self.now);
                    self.now = until;
                    client.handle(self.now, ClientEvent::TimerFired)
                }
                ClientAction::Assigned(result) => return Ok(*result),
                ClientAction::Failed(e) => return Err(e),
            }
        }
    }

    fn provision(&mut self, id: &str, k: &SymmetricKey) -> Result<DeviceRegistrationResult, ClientError> {
        self.provision_with(id, k, ApiVersion::V2021_06_01)
    }
}

fn sym(id: &str, k1: &SymmetricKey, k2: &SymmetricKey) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k1.to_base64(), "secondaryKey": k2.to_base64()}}})
}

fn group(id: &str, k1: &SymmetricKey, k2: &SymmetricKey) -> Value {
    json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k1.to_base64(), "secondaryKey": k2.to_base64()}}})
}

fn error_code(r: &Reply) -> u32 {
    r.body_json().unwrap()["errorCode"].as_u64().unwrap() as u32
}

#[test]
fn individual_device_is_assigned_and_registered_in_its_hub() {
    let mut w = World::new();
    let mut e = sym("dev-1", &key(1), &key(2));
    e["initialTwin"] = json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}});
    e["capabilities"] = json!({"iotEdge": true});
    e["deviceId"] = json!("dev-1-hub");
    w.enroll(e);
    let r = w.provision("dev-1", &key(1)).unwrap();
    assert_eq!(r.status, RegistrationStatus::Assigned);
    assert_eq!(r.substatus, Some(RegistrationSubstatus::InitialAssignment));
    assert_eq!(r.device_id.as_deref(), Some("dev-1-hub"));
    let hub = r.assigned_hub.unwrap();
    assert!(hub == HUB_A || hub == HUB_B);
    assert!(r.symmetric_key.is_none(), "no symmetricKey object for individual enrollments");
    assert!(r.created_date_time_utc.is_some() && r.etag.is_some());
    let device = w.hubs.device(&hub, "dev-1-hub").expect("registered in its hub");
    assert_eq!(device.identity.primary_key().unwrap(), key(1).to_base64());
    assert_eq!(device.identity.secondary_key().unwrap(), key(2).to_base64());
    assert_eq!(device.twin.tags, json!({"site": "lab"}));
    assert_eq!(device.twin.desired, json!({"interval": 30}));
    assert!(device.twin.iot_edge);
    // The registration state is visible through the service API.
    let s = w.service("GET", "/registrations/dev-1", None);
    assert_eq!(s.status, 200);
    let s = s.body_json().unwrap();
    assert_eq!(s["status"], "assigned");
    assert_eq!(s["assignedHub"], json!(hub));
    // The secondary key works too.
    assert!(w.provision("dev-1", &key(2)).is_ok());
}

#[test]
fn group_device_uses_derived_key() {
    let mut w = World::new();
    w.enroll_group(group("building-7", &key(5), &key(6)));
    let device_key = key(5).derive_device_key("sensor-42");
    let r = w.provision("sensor-42", &device_key).unwrap();
    assert_eq!(r.device_id.as_deref(), Some("sensor-42"));
    assert_eq!(r.symmetric_key.unwrap().enrollment_group_id.as_deref(), Some("building-7"));
    let hub = r.assigned_hub.unwrap();
    let device = w.hubs.device(&hub, "sensor-42").unwrap();
    assert_eq!(device.identity.primary_key().unwrap(), device_key.to_base64());
    assert_eq!(device.identity.secondary_key().unwrap(), key(6).derive_device_key("sensor-42").to_base64());
    // The group key itself is not a device credential.
    let err = w.provision("sensor-43", &key(5)).unwrap_err();
    assert_eq!(err.code, 401000);
    // Registration states of the group.
    let q = w.service(
        "POST",
        "/registrations/building-7/query",
        Some(json!({"query": "SELECT * FROM enrollments"})),
    );
    assert_eq!(q.status, 200);
    assert_eq!(q.header("x-ms-item-type"), Some("deviceRegistration"));
    let items = q.body_json().unwrap();
    assert_eq!(items.as_array().unwrap().len(), 1);
    assert_eq!(items[0]["registrationId"], "sensor-42");
}

#[test]
fn disabled_enrollment_and_disabled_group_end_in_disabled() {
    let mut w = World::new();
    let mut e = sym("dev-off", &key(1), &key(2));
    e["provisioningStatus"] = json!("disabled");
    w.enroll(e);
    let err = w.provision("dev-off", &key(1)).unwrap_err();
    assert_eq!(err.registration_status, Some(RegistrationStatus::Disabled));
    assert_eq!(w.service("GET", "/registrations/dev-off", None).body_json().unwrap()["status"], "disabled");

    let mut g = group("off-group", &key(7), &key(8));
    g["provisioningStatus"] = json!("disabled");
    w.enroll_group(g);
    let err = w.provision("member-1", &key(7).derive_device_key("member-1")).unwrap_err();
    assert_eq!(err.registration_status, Some(RegistrationStatus::Disabled));
    assert!(w.hubs.devices().is_empty(), "nothing registered in any hub");

    // A disabled individual enrollment blocks a device even when an enabled group would accept it.
    w.enroll_group(group("on-group", &key(1), &key(2)));
    let mut e = sym("dev-2", &key(9), &key(9));
    e["provisioningStatus"] = json!("disabled");
    w.enroll(e);
    let err = w.provision("dev-2", &key(9)).unwrap_err();
    assert_eq!(err.registration_status, Some(RegistrationStatus::Disabled));
}

fn static_on(mut e: Value, hub: &str) -> Value {
    e["allocationPolicy"] = json!("static");
    e["iotHubs"] = json!([hub]);
    e
}

fn reprovision_case(policy: Option<Value>, api: ApiVersion) -> (World, DeviceRegistrationResult) {
    let mut w = World::new();
    let mut e = static_on(sym("mover", &key(1), &key(2)), HUB_A);
    e["initialTwin"] = json!({"tags": {"v": 1}});
    if let Some(p) = &policy {
        e["reprovisionPolicy"] = p.clone();
    }
    w.enroll(e.clone());
    let first = w.provision_with("mover", &key(1), api.clone()).unwrap();
    assert_eq!(first.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(first.substatus, Some(RegistrationSubstatus::InitialAssignment));
    // The device's twin changes in its hub, then the enrollment moves to hub B.
    assert!(w.hubs.set_twin(
        HUB_A,
        "mover",
        DeviceTwin { tags: json!({"v": 2}), desired: json!({}), iot_edge: false }
    ));
    let mut moved = static_on(e, HUB_B);
    moved["etag"] = Value::Null;
    w.enroll(moved);
    let second = w.provision_with("mover", &key(1), api).unwrap();
    assert_eq!(second.created_date_time_utc, first.created_date_time_utc, "creation time survives");
    (w, second)
}

#[test]
fn reprovision_migrate_moves_twin_and_removes_old_identity() {
    let (w, r) = reprovision_case(
        Some(json!({"updateHubAssignment": true, "migrateDeviceData": true})),
        ApiVersion::V2021_06_01,
    );
    assert_eq!(r.assigned_hub.as_deref(), Some(HUB_B));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::DeviceDataMigrated));
    assert_eq!(w.hubs.device(HUB_B, "mover").unwrap().twin.tags, json!({"v": 2}));
    assert!(w.hubs.device(HUB_A, "mover").is_none());
}

#[test]
fn reprovision_reset_uses_initial_twin() {
    let (w, r) = reprovision_case(
        Some(json!({"updateHubAssignment": true, "migrateDeviceData": false})),
        ApiVersion::V2021_06_01,
    );
    assert_eq!(r.assigned_hub.as_deref(), Some(HUB_B));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::DeviceDataReset));
    assert_eq!(w.hubs.device(HUB_B, "mover").unwrap().twin.tags, json!({"v": 1}));
    assert!(w.hubs.device(HUB_A, "mover").is_none());
}

#[test]
fn reprovision_never_keeps_the_device_where_it_is() {
    let (w, r) = reprovision_case(
        Some(json!({"updateHubAssignment": false, "migrateDeviceData": true})),
        ApiVersion::V2021_06_01,
    );
    assert_eq!(r.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::ReprovisionedToInitialAssignment));
    assert_eq!(w.hubs.device(HUB_A, "mover").unwrap().twin.tags, json!({"v": 2}), "twin untouched");
    assert!(w.hubs.device(HUB_B, "mover").is_none());
}

#[test]
fn legacy_api_without_policy_is_sticky_and_reports_initial_assignment() {
    let (_, r) = reprovision_case(None, ApiVersion::V2018_04_01);
    assert_eq!(r.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::InitialAssignment));
    // Modern api-version with no policy: the default (migrate) applies.
    let (_, r) = reprovision_case(None, ApiVersion::V2021_06_01);
    assert_eq!(r.substatus, Some(RegistrationSubstatus::DeviceDataMigrated));
}

#[test]
fn re_registration_to_the_same_hub_keeps_twin() {
    let mut w = World::new();
    w.enroll(static_on(sym("stay", &key(1), &key(2)), HUB_A));
    w.provision("stay", &key(1)).unwrap();
    w.hubs.set_twin(HUB_A, "stay", DeviceTwin { tags: json!({"x": 1}), desired: json!({}), iot_edge: false });
    let r = w.provision("stay", &key(1)).unwrap();
    assert_eq!(r.substatus, Some(RegistrationSubstatus::ReprovisionedToInitialAssignment));
    assert_eq!(w.hubs.device(HUB_A, "stay").unwrap().twin.tags, json!({"x": 1}));
    // An identity that vanished from the hub is recreated with the initial twin.
    dps_core::hub::BlockingHubDirectory::execute(
        &w.hubs,
        dps_core::hub::HubOp::DeleteDevice { hub: HUB_A.into(), device_id: "stay".into() },
    )
    .unwrap();
    w.provision("stay", &key(1)).unwrap();
    assert_eq!(w.hubs.device(HUB_A, "stay").unwrap().twin.tags, json!({}));
    // Deleting the registration record makes the next registration an initial assignment again.
    assert_eq!(w.service("DELETE", "/registrations/stay", None).status, 204);
    let r = w.provision("stay", &key(1)).unwrap();
    assert_eq!(r.substatus, Some(RegistrationSubstatus::InitialAssignment));
}

#[test]
fn authentication_failures_have_precise_codes() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let register = DeviceCall::Register { force: false };
    // Wrong key.
    let t = w.device_token("dev-1", &key(3), T0 + 600);
    let r = w.device_raw("dev-1", register.clone(), Some(t), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    // Expired token (beyond five minutes of skew).
    let t = w.device_token("dev-1", &key(1), T0 - 301);
    let r = w.device_raw("dev-1", register.clone(), Some(t), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401001));
    // Within the skew it is fine.
    let t = w.device_token("dev-1", &key(1), T0 - 299);
    assert_eq!(w.device_raw("dev-1", register.clone(), Some(t), b"").status, 202);
    // Unknown registration.
    let t = w.device_token("ghost", &key(1), T0 + 600);
    let r = w.device_raw("ghost", register.clone(), Some(t), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    // Unknown scope.
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let r = w.device_raw_scope("0ne00000000", "dev-1", register.clone(), Some(t), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401003));
    // Missing and malformed authorization.
    let r = w.device_raw("dev-1", register.clone(), None, b"");
    assert_eq!((r.status, error_code(&r)), (401, 401004));
    let r = w.device_raw("dev-1", register.clone(), Some("SharedAccessSignature garbage".into()), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401004));
    // Token for another device.
    let t = w.device_token("dev-2", &key(1), T0 + 600);
    let r = w.device_raw("dev-1", register, Some(t), b"");
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    // Every error carries a tracking ID equal to the body's.
    assert_eq!(r.body_json().unwrap()["trackingId"], json!(r.tracking_id));
}

#[test]
fn bad_bodies_have_precise_codes() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let register = DeviceCall::Register { force: false };
    let r = w.device_raw("dev-1", register.clone(), Some(t.clone()), b"{not json");
    assert_eq!((r.status, error_code(&r)), (400, 400001));
    let r = w.device_raw("dev-1", register.clone(), Some(t.clone()), br#"{"registrationId":"other"}"#);
    assert_eq!((r.status, error_code(&r)), (400, 400003));
    let big = format!("{{\"payload\":\"{}\"}}", "x".repeat(97 * 1024));
    let r = w.device_raw("dev-1", register.clone(), Some(t.clone()), big.as_bytes());
    assert_eq!((r.status, error_code(&r)), (413, 413001));
    // Tolerated variants: empty body, payload null, registrationId in other case, a single space.
    for body in [&b""[..], b" ", br#"{"payload":null,"registrationId":"DEV-1"}"#, br#"{"payload":{"a":1}}"#] {
        let r = w.device_raw("dev-1", register.clone(), Some(t.clone()), body);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(body));
        assert_eq!(r.retry_after, Some(2));
    }
}

#[test]
fn polls_status_lookup_and_unknown_operation() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let r = w.device_raw("dev-1", DeviceCall::Register { force: true }, Some(t.clone()), b"");
    assert_eq!(r.status, 202);
    let body = r.body_json().unwrap();
    assert_eq!(body["status"], "assigning");
    assert!(body.get("registrationState").is_none());
    let op = OperationId::parse(body["operationId"].as_str().unwrap()).unwrap();
    let poll = w.device_raw("dev-1", DeviceCall::OperationStatus(op), Some(t.clone()), b"{}");
    assert_eq!(poll.status, 200);
    let pb = poll.body_json().unwrap();
    assert_eq!(pb["status"], "assigned");
    assert_eq!(pb["registrationState"]["registrationId"], "dev-1");
    let lookup = w.device_raw("dev-1", DeviceCall::StatusLookup, Some(t.clone()), b"");
    assert_eq!(lookup.status, 200);
    assert_eq!(lookup.body_json().unwrap()["assignedHub"], pb["registrationState"]["assignedHub"]);
    let other = OperationId::parse("1.0000000000000000.nope").unwrap();
    let r = w.device_raw("dev-1", DeviceCall::OperationStatus(other), Some(t.clone()), b"");
    assert_eq!((r.status, error_code(&r)), (404, 404204));
    // Polls re-check authentication.
    let bad = w.device_token("dev-1", &key(9), T0 + 600);
    let op = OperationId::parse(body["operationId"].as_str().unwrap()).unwrap();
    let r = w.device_raw("dev-1", DeviceCall::OperationStatus(op), Some(bad), b"");
    assert_eq!(r.status, 401);
    // Billing: the register is billable, the poll is not.
    assert!(r.meter.is_none());
    assert_eq!(lookup.meter, None);
}

/// Drives a register flow to its end, returning its one reply and the billing events of its commits.
fn register_billing(w: &mut World, id: &str, token: String) -> (Reply, Vec<dps_core::MeterEvent>) {
    let request = DeviceRequest {
        id_scope: IdScope::parse(SCOPE).unwrap(),
        registration_id: RegistrationId::parse(id).unwrap(),
        call: DeviceCall::Register { force: false },
        api_version: None,
        credential: dps_core::proto::Credential::SasToken(token),
        body: Vec::new(),
        client_address: None,
    };
    let mut flow = w.engine.device(w.now, &mut w.rng, request);
    let (mut input, mut reply, mut billed) = (Input::Start, None, Vec::new());
    loop {
        input = match flow.resume(input) {
            Step::Store(op) => {
                let meter = match &op {
                    dps_core::store::StoreOp::CommitRegistration { record, .. } => {
                        dps_core::register_meter(record)
                    }
                    _ => None,
                };
                let result = dps_core::store::BlockingStore::execute(&w.store, op);
                if result.is_ok() {
                    billed.extend(meter);
                }
                Input::Store(result)
            }
            Step::Hub(op) => Input::Hub(dps_core::hub::BlockingHubDirectory::execute(&w.hubs, op)),
            Step::Respond(r) => {
                assert!(reply.replace(r).is_none(), "one reply");
                Input::Responded
            }
            Step::Finished => break,
            other => panic!("unexpected step {other:?}"),
        }
    }
    (reply.unwrap(), billed)
}

#[test]
fn register_is_billed_once_by_its_outcome() {
    for early in [false, true] {
        let mut w = World::new();
        let mut config = w.engine.config().clone();
        config.respond_before_assignment = early;
        w.engine = Engine::new(config).unwrap();
        w.enroll(static_on(sym("dev-1", &key(1), &key(2)), HUB_A));
        // Assigned: the 202 carries no bill; the terminal commit bills one success.
        let t = w.device_token("dev-1", &key(1), T0 + 600);
        let (reply, billed) = register_billing(&mut w, "dev-1", t.clone());
        assert_eq!((reply.status, reply.meter), (202, None), "early={early}");
        assert_eq!(billed.len(), 1);
        assert_eq!(billed[0].operation, dps_core::BillableOperation::DeviceRegister);
        assert!(billed[0].succeeded);
        // Failed after the 202 (hub down): one failure, never a success.
        w.hubs.set_unavailable(HUB_A, true);
        let (reply, billed) = register_billing(&mut w, "dev-1", t);
        assert_eq!(reply.meter, None);
        assert_eq!(billed.iter().map(|m| m.succeeded).collect::<Vec<_>>(), vec![false], "early={early}");
        // Refused before any commit: billed as a failure on the error reply.
        let bad = w.device_token("dev-1", &key(9), T0 + 600);
        let (reply, billed) = register_billing(&mut w, "dev-1", bad);
        assert_eq!(reply.status, 401);
        assert!(billed.is_empty());
        assert!(!reply.meter.unwrap().succeeded);
    }
}

#[test]
fn hub_failure_ends_in_failed_with_code() {
    let mut w = World::new();
    w.enroll(static_on(sym("dev-1", &key(1), &key(2)), HUB_A));
    w.hubs.set_unavailable(HUB_A, true);
    let err = w.provision("dev-1", &key(1)).unwrap_err();
    assert_eq!(err.registration_status, Some(RegistrationStatus::Failed));
    assert_eq!(err.code, 500002);
    let s = w.service("GET", "/registrations/dev-1", None).body_json().unwrap();
    assert_eq!(s["status"], "failed");
    assert_eq!(s["errorCode"], 500002);
    w.hubs.set_unavailable(HUB_A, false);
    let r = w.provision("dev-1", &key(1)).unwrap();
    assert_eq!(r.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(r.substatus, Some(RegistrationSubstatus::InitialAssignment));
}

#[test]
fn respond_before_assignment_polls_see_assigning() {
    let mut w = World::with(|c| c.respond_before_assignment = true);
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let request = DeviceRequest {
        id_scope: IdScope::parse(SCOPE).unwrap(),
        registration_id: RegistrationId::parse("dev-1").unwrap(),
        call: DeviceCall::Register { force: false },
        api_version: None,
        credential: dps_core::proto::Credential::SasToken(t.clone()),
        body: Vec::new(),
        client_address: None,
    };
    let mut flow = w.engine.device(w.now, &mut w.rng, request);
    // Drive by hand up to the early reply.
    let mut input = Input::Start;
    let reply = loop {
        input = match flow.resume(input) {
            Step::Store(op) => Input::Store(dps_core::store::BlockingStore::execute(&w.store, op)),
            Step::Hub(_) => panic!("hub work must come after the early reply"),
            Step::Respond(r) => break r,
            Step::Finished => panic!("finished early"),
            other => panic!("unexpected step {other:?}"),
        }
    };
    assert_eq!(reply.status, 202);
    let op = OperationId::parse(reply.body_json().unwrap()["operationId"].as_str().unwrap()).unwrap();
    // A poll now sees the operation still assigning.
    let poll = w.device_raw("dev-1", DeviceCall::OperationStatus(op.clone()), Some(t.clone()), b"");
    assert_eq!(poll.status, 202);
    assert_eq!(poll.retry_after, Some(2));
    assert_eq!(
        poll.body_json().unwrap()["registrationState"],
        json!({"registrationId": "dev-1", "status": "assigning"})
    );
    // Finish the flow.
    let mut input = Input::Responded;
    loop {
        input = match flow.resume(input) {
            Step::Store(op) => Input::Store(dps_core::store::BlockingStore::execute(&w.store, op)),
            Step::Hub(op) => Input::Hub(dps_core::hub::BlockingHubDirectory::execute(&w.hubs, op)),
            Step::Respond(_) => panic!("only one reply"),
            Step::Finished => break,
            other => panic!("unexpected step {other:?}"),
        }
    }
    let poll = w.device_raw("dev-1", DeviceCall::OperationStatus(op), Some(t), b"");
    assert_eq!(poll.status, 200);
    assert_eq!(poll.body_json().unwrap()["status"], "assigned");
}

#[test]
fn concurrent_registrations_of_one_device_conflict() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let make = |w: &mut World| {
        let request = DeviceRequest {
            id_scope: IdScope::parse(SCOPE).unwrap(),
            registration_id: RegistrationId::parse("dev-1").unwrap(),
            call: DeviceCall::Register { force: false },
            api_version: None,
            credential: dps_core::proto::Credential::SasToken(t.clone()),
            body: Vec::new(),
            client_address: None,
        };
        w.engine.device(w.now, &mut w.rng, request)
    };
    let mut a = make(&mut w);
    let mut b = make(&mut w);
    // Both load the (empty) context before either commits.
    let (Step::Store(la), Step::Store(lb)) = (a.resume(Input::Start), b.resume(Input::Start)) else {
        panic!()
    };
    let store = &w.store;
    let exec = |op| dps_core::store::BlockingStore::execute(store, op);
    let mut sa = a.resume(Input::Store(exec(la)));
    let mut sb = b.resume(Input::Store(exec(lb)));
    let finish = |flow: &mut dyn Flow, mut step: Step| loop {
        step = match step {
            Step::Store(op) => flow.resume(Input::Store(exec(op))),
            Step::Hub(op) => {
                flow.resume(Input::Hub(dps_core::hub::BlockingHubDirectory::execute(&w.hubs, op)))
            }
            Step::Respond(r) => break r,
            Step::Finished => panic!("no reply"),
            other => panic!("unexpected step {other:?}"),
        }
    };
    let ra = finish(&mut a, std::mem::replace(&mut sa, Step::Finished));
    let rb = finish(&mut b, std::mem::replace(&mut sb, Step::Finished));
    assert_eq!(ra.status, 202);
    assert_eq!((rb.status, error_code(&rb)), (409, 409203));
    assert!(rb.retry_after.is_some());
}

#[test]
fn async_driver_runs_the_same_flows() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let t = w.device_token("dev-1", &key(1), T0 + 600);
    let request = HttpRequest {
        method: "PUT".into(),
        path_and_query: format!("/{SCOPE}/registrations/dev-1/register?api-version=2019-03-31"),
        authorization: Some(t),
        body: br#"{"registrationId":"dev-1"}"#.to_vec(),
        ..HttpRequest::default()
    };
    let mut flow = w.engine.http(w.now, &mut w.rng, request);
    let reply = futures::executor::block_on(run_async(&mut flow, &w.store, &w.hubs));
    assert_eq!(reply.status, 202);
    assert_eq!(w.hubs.devices().len(), 1);
}

#[test]
fn enrollment_crud_with_etags_and_hidden_secrets() {
    let mut w = World::new();
    // Keys are generated (64 bytes) when absent and returned by PUT.
    let created = w.enroll(json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}}));
    let primary = created["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    assert_eq!(SymmetricKey::parse(&primary).unwrap().as_bytes().len(), 64);
    assert_eq!(created["provisioningStatus"], "enabled");
    let etag = created["etag"].as_str().unwrap().to_owned();
    // GET hides secrets; the attestation mechanism call returns them.
    let got = w.service("GET", "/enrollments/dev-1", None).body_json().unwrap();
    assert_eq!(got["attestation"], json!({"type": "symmetricKey"}));
    let mech = w.service("POST", "/enrollments/DEV-1/attestationmechanism", None).body_json().unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], json!(primary));
    // If-Match: wrong etag refused, quoted right etag accepted, * accepted.
    let k = w.owner_key.clone();
    let body = json!({"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"});
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "PUT",
        "/enrollments/dev-1",
        Some(body.clone()),
        Some("\"nope\""),
        None,
        None,
    );
    assert_eq!((r.status, error_code(&r)), (412, 412001));
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "PUT",
        "/enrollments/dev-1",
        Some(body.clone()),
        Some(&format!("\"{etag}\"")),
        None,
        None,
    );
    assert_eq!(r.status, 200);
    let updated = r.body_json().unwrap();
    assert_ne!(updated["etag"], json!(etag));
    assert_eq!(updated["createdDateTimeUtc"], created["createdDateTimeUtc"]);
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "PUT",
        "/enrollments/dev-1",
        Some(body),
        Some("*"),
        None,
        None,
    );
    assert_eq!(r.status, 200);
    // Delete with a stale etag is refused; then deleted; then 404.
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "DELETE",
        "/enrollments/dev-1",
        None,
        Some(&etag),
        None,
        None,
    );
    assert_eq!((r.status, error_code(&r)), (412, 412001));
    assert_eq!(w.service("DELETE", "/enrollments/dev-1", None).status, 204);
    let r = w.service("GET", "/enrollments/dev-1", None);
    assert_eq!((r.status, error_code(&r)), (404, 404201));
    let r = w.service("GET", "/enrollmentGroups/nope", None);
    assert_eq!((r.status, error_code(&r)), (404, 404202));
    let r = w.service("GET", "/registrations/nope", None);
    assert_eq!((r.status, error_code(&r)), (404, 404203));
    // If-Match on a missing enrollment.
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "PUT",
        "/enrollments/dev-9",
        Some(sym("dev-9", &key(1), &key(1))),
        Some("*"),
        None,
        None,
    );
    assert_eq!((r.status, error_code(&r)), (404, 404201));
}

#[test]
fn enrollment_validation() {
    let mut w = World::new();
    let cases = [
        (
            json!({"registrationId": "a", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "short"}}}),
            400004,
        ),
        (json!({"registrationId": "-bad", "attestation": {"type": "symmetricKey"}}), 400002),
        (
            json!({"registrationId": "a", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "static"}),
            400004,
        ),
        (
            json!({"registrationId": "a", "attestation": {"type": "symmetricKey"}, "iotHubs": ["unlinked.example.net"]}),
            400004,
        ),
        (
            json!({"registrationId": "a", "attestation": {"type": "symmetricKey"}, "deviceId": "bad id"}),
            400002,
        ),
        (json!({"registrationId": "b", "attestation": {"type": "symmetricKey"}}), 400003),
        (json!({"attestation": {"type": "symmetricKey"}}), 400001),
    ];
    for (body, code) in cases {
        let r = w.service("PUT", "/enrollments/a", Some(body.clone()));
        assert_eq!(error_code(&r), code, "{body}");
    }
    let r = w.service(
        "PUT",
        "/enrollmentGroups/g",
        Some(json!({"enrollmentGroupId": "g", "attestation": {"type": "tpm"}})),
    );
    assert_eq!(error_code(&r), 400004);
}

#[test]
fn service_authorization() {
    let mut w = World::new();
    w.enroll(sym("dev-1", &key(1), &key(2)));
    let reader = w.reader_key.clone();
    // A read-only policy reads but may not write.
    assert_eq!(w.service_as("enrollmentread", &reader, "GET", "/enrollments/dev-1", None).status, 200);
    let r = w.service_as("enrollmentread", &reader, "DELETE", "/enrollments/dev-1", None);
    assert_eq!((r.status, error_code(&r)), (403, 403001));
    // Wrong key, unknown policy, no token.
    let r = w.service_as("provisioningserviceowner", &key(55), "GET", "/enrollments/dev-1", None);
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    let r = w.service_as("nobody", &key(100), "GET", "/enrollments/dev-1", None);
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    let mut flow = w.engine.http(
        w.now,
        &mut w.rng,
        HttpRequest {
            method: "GET".into(),
            path_and_query: "/enrollments/dev-1".into(),
            ..HttpRequest::default()
        },
    );
    let r = run_blocking(&mut flow, &w.store, &w.hubs);
    assert_eq!((r.status, error_code(&r)), (401, 401004));
    // The secondary key of a policy works.
    assert_eq!(
        w.service_as("provisioningserviceowner", &key(101), "GET", "/enrollments/dev-1", None).status,
        200
    );
}

#[test]
fn query_paging_with_continuation() {
    let mut w = World::new();
    for i in 0..25 {
        w.enroll(sym(&format!("dev-{i:02}"), &key(1), &key(2)));
    }
    let k = w.owner_key.clone();
    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let r = w.service_full(
            "provisioningserviceowner",
            &k,
            "POST",
            "/enrollments/query",
            Some(json!({"query": "SELECT * FROM enrollments"})),
            None,
            Some(10),
            continuation.as_deref(),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ms-item-type"), Some("enrollment"));
        pages += 1;
        let items = r.body_json().unwrap();
        for item in items.as_array().unwrap() {
            assert_eq!(item["attestation"], json!({"type": "symmetricKey"}), "secrets hidden in queries");
            seen.push(item["registrationId"].as_str().unwrap().to_owned());
        }
        match r.header("x-ms-continuation") {
            Some(c) => continuation = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<_> = (0..25).map(|i| format!("dev-{i:02}")).collect();
    assert_eq!(seen, expected);
    // An empty result is `[]` with the item type.
    let r = w.service(
        "POST",
        "/enrollmentGroups/query",
        Some(json!({"query": "SELECT * FROM enrollmentGroups"})),
    );
    assert_eq!(r.body, b"[]");
    assert_eq!(r.header("x-ms-item-type"), Some("enrollmentGroup"));
    assert_eq!(r.header("x-ms-continuation"), None);
    // Filters and bad queries.
    let r = w.service(
        "POST",
        "/enrollments/query",
        Some(json!({"query": "SELECT * FROM enrollments WHERE registrationId = 'dev-07'"})),
    );
    assert_eq!(r.body_json().unwrap().as_array().unwrap().len(), 1);
    let r = w.service("POST", "/enrollments/query", Some(json!({"query": "SELECT * FROM enrollmentGroups"})));
    assert_eq!(error_code(&r), 400006);
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "POST",
        "/enrollments/query",
        None,
        None,
        None,
        Some("%%%"),
    );
    assert_eq!(error_code(&r), 400000);
}

#[test]
fn bulk_with_mixed_results() {
    let mut w = World::new();
    w.enroll(sym("exists", &key(1), &key(2)));
    let r = w.service(
        "POST",
        "/enrollments",
        Some(json!({"mode": "create", "enrollments": [
            sym("new-1", &key(1), &key(2)),
            sym("exists", &key(1), &key(2)),
            {"registrationId": "bad id", "attestation": {"type": "symmetricKey"}},
            sym("new-2", &key(1), &key(2)),
        ]})),
    );
    assert_eq!(r.status, 200);
    let b = r.body_json().unwrap();
    assert_eq!(b["isSuccessful"], false);
    let errors = b["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    let codes: Vec<(String, u64)> = errors
        .iter()
        .map(|e| (e["registrationId"].as_str().unwrap().to_owned(), e["errorCode"].as_u64().unwrap()))
        .collect();
    assert!(codes.contains(&("exists".into(), 409000)));
    assert!(codes.contains(&("bad id".into(), 400002)));
    assert_eq!(w.service("GET", "/enrollments/new-2", None).status, 200);
    // Delete in bulk, one missing.
    let r = w.service(
        "POST",
        "/enrollments",
        Some(json!({"mode": "delete", "enrollments": [sym("new-1", &key(1), &key(2)), sym("never", &key(1), &key(2))]})),
    );
    let b = r.body_json().unwrap();
    assert_eq!(b["errors"][0]["errorCode"], 404201);
    assert_eq!(w.service("GET", "/enrollments/new-1", None).status, 404);
    // updateIfMatchETag needs a matching etag.
    let r = w.service(
        "POST",
        "/enrollments",
        Some(json!({"mode": "updateIfMatchETag", "enrollments": [{"registrationId": "exists", "etag": "stale", "attestation": {"type": "symmetricKey"}}]})),
    );
    assert_eq!(r.body_json().unwrap()["errors"][0]["errorCode"], 412001);
    // Size limits.
    let eleven: Vec<Value> = (0..11).map(|i| sym(&format!("d{i}"), &key(1), &key(2))).collect();
    let r = w.service("POST", "/enrollments", Some(json!({"mode": "update", "enrollments": eleven})));
    assert_eq!((r.status, error_code(&r)), (400, 400005));
    // Groups in bulk.
    let r = w.service(
        "POST",
        "/enrollmentGroups",
        Some(json!({"mode": "update", "enrollmentGroups": [group("g1", &key(1), &key(2))]})),
    );
    assert_eq!(r.body_json().unwrap(), json!({"isSuccessful": true, "errors": []}));
}

#[test]
fn routing_errors() {
    let mut w = World::new();
    let mut flow = w.engine.http(
        w.now,
        &mut w.rng,
        HttpRequest {
            method: "GET".into(),
            path_and_query: "/nothing/here".into(),
            ..HttpRequest::default()
        },
    );
    let r = run_blocking(&mut flow, &w.store, &w.hubs);
    assert_eq!((r.status, error_code(&r)), (404, 404000));
    let mut flow = w.engine.http(
        w.now,
        &mut w.rng,
        HttpRequest {
            method: "PATCH".into(),
            path_and_query: "/enrollments/x".into(),
            ..HttpRequest::default()
        },
    );
    let r = run_blocking(&mut flow, &w.store, &w.hubs);
    assert_eq!((r.status, error_code(&r)), (405, 405000));
}

#[test]
fn hashed_allocation_spreads_devices_over_hubs() {
    let mut w = World::new();
    w.enroll_group(group("fleet", &key(5), &key(6)));
    let mut on_a = 0;
    for i in 0..60 {
        let id = format!("unit-{i}");
        let r = w.provision(&id, &key(5).derive_device_key(&id)).unwrap();
        if r.assigned_hub.as_deref() == Some(HUB_A) {
            on_a += 1;
        }
    }
    assert!((15..=45).contains(&on_a), "{on_a} of 60 on hub A");
}

#[test]
fn replacing_without_keys_keeps_the_stored_keys() {
    let mut w = World::new();
    w.enroll(sym("keeper", &key(1), &key(2)));
    w.enroll_group(group("keepers", &key(3), &key(4)));
    // GET hides the keys; PUT the GET body back (as SDKs and the portal do for an update).
    let mut got = w.service("GET", "/enrollments/keeper", None).body_json().unwrap();
    got["provisioningStatus"] = json!("enabled");
    got["initialTwin"] = json!({"tags": {"updated": true}});
    let put = w.service("PUT", "/enrollments/keeper", Some(got)).body_json().unwrap();
    // The kept keys are not echoed (issue 14, defect 3): the reply hides them as the GET did.
    assert_eq!(put["attestation"]["symmetricKey"], json!({}), "{put}");
    let mech = w.service("POST", "/enrollments/keeper/attestationmechanism", None).body_json().unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], json!(key(1).to_base64()));
    assert_eq!(mech["symmetricKey"]["secondaryKey"], json!(key(2).to_base64()));
    assert!(w.provision("keeper", &key(1)).is_ok(), "the device still authenticates");
    let got = w.service("GET", "/enrollmentGroups/keepers", None).body_json().unwrap();
    let put = w.service("PUT", "/enrollmentGroups/keepers", Some(got)).body_json().unwrap();
    assert_eq!(put["attestation"]["symmetricKey"], json!({}), "{put}");
    let mech = w.service("POST", "/enrollmentGroups/keepers/attestationmechanism", None).body_json().unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], json!(key(3).to_base64()));
    // Supplying one key replaces only that one.
    let mut e = w.service("GET", "/enrollments/keeper", None).body_json().unwrap();
    e["attestation"]["symmetricKey"] = json!({"secondaryKey": key(9).to_base64()});
    let put = w.service("PUT", "/enrollments/keeper", Some(e)).body_json().unwrap();
    assert_eq!(put["attestation"]["symmetricKey"], json!({"secondaryKey": key(9).to_base64()}), "{put}");
    let mech = w.service("POST", "/enrollments/keeper/attestationmechanism", None).body_json().unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], json!(key(1).to_base64()));
    // Bulk updates keep stored keys the same way, and still generate keys for new items.
    let r = w.service(
        "POST",
        "/enrollments",
        Some(json!({"mode": "update", "enrollments": [
            {"registrationId": "keeper", "attestation": {"type": "symmetricKey"}, "provisioningStatus": "enabled"},
            {"registrationId": "fresh", "attestation": {"type": "symmetricKey"}},
        ]})),
    );
    assert_eq!(r.body_json().unwrap(), json!({"isSuccessful": true, "errors": []}));
    let mech = w.service("POST", "/enrollments/keeper/attestationmechanism", None).body_json().unwrap();
    assert_eq!(mech["symmetricKey"]["primaryKey"], json!(key(1).to_base64()));
    let fresh = w.service("POST", "/enrollments/fresh/attestationmechanism", None).body_json().unwrap();
    assert_eq!(
        SymmetricKey::parse(fresh["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap().as_bytes().len(),
        64
    );
    let r = w.service(
        "POST",
        "/enrollmentGroups",
        Some(json!({"mode": "updateIfMatchETag", "enrollmentGroups": [
            {"enrollmentGroupId": "keepers", "attestation": {"type": "symmetricKey"}, "etag": "stale"},
        ]})),
    );
    assert_eq!(r.body_json().unwrap()["errors"][0]["errorCode"], 412001);
    // A stale If-Match is still refused.
    let k = w.owner_key.clone();
    let body = json!({"registrationId": "keeper", "attestation": {"type": "symmetricKey"}});
    let r = w.service_full(
        "provisioningserviceowner",
        &k,
        "PUT",
        "/enrollments/keeper",
        Some(body),
        Some("stale"),
        None,
        None,
    );
    assert_eq!(r.status, 412);
}
