//! Overlapping registrations of one device and enrollment ownership, driven by hand in virtual time with
//! the in-memory store and hub directory (see the `device` module docs for the rules).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::device_request;
use dps_client::{ClientAction, ClientConfig, ClientRequest, RegistrationClient, RequestKind};
use dps_core::device::{IN_FLIGHT_REUSE_MS, OPERATION_RETENTION_MS};
use dps_core::hub::{BlockingHubDirectory, MemoryHubDirectory};
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_core::proto::{IdScope, OperationId, RegistrationId, Timestamp};
use dps_core::store::{BlockingStore, OPERATION_HISTORY_LEN};
use dps_core::{
    run_blocking, AccessPolicy, Engine, EngineConfig, Flow, HttpRequest, Input, LinkedHub, Reply, Rights,
    Step,
};
use dps_store::MemoryStore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const SCOPE: &str = "0ne0000ABCD";
const HOST: &str = "mydps.example.net";
const HUB_A: &str = "hub-a.example.net";
const HUB_B: &str = "hub-b.example.net";

fn key(b: u8) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![b; 32])
}

struct World {
    engine: Engine,
    store: MemoryStore,
    hubs: MemoryHubDirectory,
    rng: ChaCha8Rng,
    now: Timestamp,
}

impl World {
    /// `early`: answer the register 202 right after attestation (the overlap window is the hub work).
    fn new(early: bool) -> World {
        let hubs =
            vec![LinkedHub::new(HUB_A, None, None).unwrap(), LinkedHub::new(HUB_B, None, None).unwrap()];
        let mut config =
            EngineConfig::new(IdScope::parse(SCOPE).unwrap(), HOST, hubs).with_policy(AccessPolicy {
                key_name: "provisioningserviceowner".into(),
                primary_key: key(100),
                secondary_key: key(101),
                rights: Rights::ALL,
            });
        config.respond_before_assignment = early;
        World {
            engine: Engine::new(config).unwrap(),
            store: MemoryStore::new(),
            hubs: MemoryHubDirectory::new(),
            rng: ChaCha8Rng::seed_from_u64(11),
            now: Timestamp::from_unix_seconds(1_700_000_000),
        }
    }

    fn service(&mut self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let token =
            build_token(&key(100), HOST, self.now.unix_seconds() + 600, Some("provisioningserviceowner"));
        let request = HttpRequest {
            method: method.into(),
            path_and_query: format!("{path}?api-version=2021-10-01"),
            authorization: Some(token),
            body: body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default(),
            ..Default::default()
        };
        let mut flow = self.engine.http(self.now, &mut self.rng, request);
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn enroll_group(&mut self, id: &str, k: &SymmetricKey) {
        let body = json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": k.to_base64(), "secondaryKey": key(99).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollmentGroups/{id}"), Some(body));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    fn enroll(&mut self, id: &str, k: &SymmetricKey) {
        let body = json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": k.to_base64(), "secondaryKey": key(98).to_base64()}}});
        let r = self.service("PUT", &format!("/enrollments/{id}"), Some(body));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    /// A register request as the device client builds it (token valid for an hour).
    fn register_request(&self, id: &str, k: &SymmetricKey) -> ClientRequest {
        let mut config =
            ClientConfig::new(IdScope::parse(SCOPE).unwrap(), RegistrationId::parse(id).unwrap(), k.clone());
        config.token_ttl_secs = 3600;
        match RegistrationClient::new(config).start(self.now) {
            ClientAction::Send(request) => request,
            other => panic!("unexpected client action {other:?}"),
        }
    }

    /// Starts a register flow and drives it to its reply; the flow is returned unfinished when the reply
    /// came early (hub work and the final commit still to do).
    fn register_until_reply(&mut self, request: &ClientRequest) -> (Reply, Box<dyn Flow>) {
        let mut flow: Box<dyn Flow> =
            Box::new(self.engine.device(self.now, &mut self.rng, device_request(request)));
        let mut input = Input::Start;
        loop {
            input = match flow.resume(input) {
                Step::Store(op) => Input::Store(BlockingStore::execute(&self.store, op)),
                Step::Hub(op) => Input::Hub(BlockingHubDirectory::execute(&self.hubs, op)),
                Step::Respond(reply) => return (reply, flow),
                Step::Finished => panic!("finished without a reply"),
                other => panic!("unexpected step {other:?}"),
            }
        }
    }

    /// Finishes a flow whose reply was sent.
    fn finish(&self, flow: &mut dyn Flow) {
        let mut input = Input::Responded;
        loop {
            input = match flow.resume(input) {
                Step::Store(op) => Input::Store(BlockingStore::execute(&self.store, op)),
                Step::Hub(op) => Input::Hub(BlockingHubDirectory::execute(&self.hubs, op)),
                Step::Respond(_) => panic!("only one reply"),
                Step::Finished => return,
                other => panic!("unexpected step {other:?}"),
            }
        }
    }

    /// A whole register: its reply (the flow run to its end).
    fn register(&mut self, request: &ClientRequest) -> Reply {
        let (reply, mut flow) = self.register_until_reply(request);
        self.finish(flow.as_mut());
        reply
    }

    /// Polls `op` with the credentials of `request`.
    fn poll(&mut self, request: &ClientRequest, op: &OperationId) -> Reply {
        let mut poll = request.clone();
        poll.kind = RequestKind::OperationStatus(op.clone());
        poll.body = Vec::new();
        let mut flow = self.engine.device(self.now, &mut self.rng, device_request(&poll));
        run_blocking(&mut flow, &self.store, &self.hubs)
    }

    fn advance_ms(&mut self, ms: i64) {
        self.now = self.now.plus_millis(ms);
    }
}

fn operation_of(reply: &Reply) -> OperationId {
    assert_eq!(reply.status, 202, "{}", String::from_utf8_lossy(&reply.body));
    OperationId::parse(reply.body_json().unwrap()["operationId"].as_str().unwrap()).unwrap()
}

fn error_code(r: &Reply) -> u64 {
    r.body_json().unwrap()["errorCode"].as_u64().unwrap()
}

/// Asserts every operation polls 200 `assigned` with the same registration state, under its own ID.
fn assert_all_assigned(w: &mut World, request: &ClientRequest, ops: &[OperationId]) -> Value {
    let mut states = Vec::new();
    for op in ops {
        let r = w.poll(request, op);
        assert_eq!(r.status, 200, "poll of {op}: {}", String::from_utf8_lossy(&r.body));
        let body = r.body_json().unwrap();
        assert_eq!(body["status"], "assigned");
        assert_eq!(body["operationId"], op.as_str());
        states.push(body["registrationState"].clone());
    }
    assert!(states.windows(2).all(|p| p[0] == p[1]), "{states:?}");
    states.pop().unwrap()
}

#[test]
fn staggered_register_while_in_flight_reuses_the_operation() {
    let mut w = World::new(true);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let (first, mut flow_a) = w.register_until_reply(&request);
    let op_a = operation_of(&first);
    // The device sends its register again 300 ms later, while the first is still assigning.
    w.advance_ms(300);
    let (second, mut flow_b) = w.register_until_reply(&request);
    let op_b = operation_of(&second);
    assert_eq!(op_a, op_b, "a register during a recent in-flight one reuses its operation ID");
    // Both polls see `assigning` meanwhile.
    for op in [&op_a, &op_b] {
        let r = w.poll(&request, op);
        assert_eq!(r.status, 202);
        assert_eq!(r.body_json().unwrap()["status"], "assigning");
    }
    // The first flow loses its final commit quietly; the second one assigns.
    w.finish(flow_a.as_mut());
    w.finish(flow_b.as_mut());
    let state = assert_all_assigned(&mut w, &request, &[op_a, op_b]);
    assert_eq!(state["deviceId"], "dev-1");
}

#[test]
fn staggered_register_after_the_reuse_window_gets_a_new_operation_and_both_answer() {
    let mut w = World::new(true);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let (first, mut flow_a) = w.register_until_reply(&request);
    let op_a = operation_of(&first);
    // A stale in-flight record (its flow died or is slow) does not lend its operation ID.
    w.advance_ms(IN_FLIGHT_REUSE_MS + 1);
    let (second, mut flow_b) = w.register_until_reply(&request);
    let op_b = operation_of(&second);
    assert_ne!(op_a, op_b);
    w.finish(flow_b.as_mut());
    w.finish(flow_a.as_mut());
    assert_all_assigned(&mut w, &request, &[op_a, op_b]);
}

#[test]
fn staggered_completed_registers_keep_answering_every_operation() {
    // Without the early reply each register completes before answering: the second one mints a new
    // operation ID, and the first one still answers.
    let mut w = World::new(false);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let op_a = operation_of(&w.register(&request));
    w.advance_ms(300);
    let op_b = operation_of(&w.register(&request));
    assert_ne!(op_a, op_b);
    assert_all_assigned(&mut w, &request, &[op_a, op_b]);
}

#[test]
fn burst_of_eight_registers_before_any_completes() {
    let mut w = World::new(true);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let mut flows = Vec::new();
    let mut ops = Vec::new();
    for _ in 0..8 {
        let (reply, flow) = w.register_until_reply(&request);
        ops.push(operation_of(&reply));
        flows.push(flow);
        w.advance_ms(50);
    }
    // Two flows that load the same record state race: the loser answers 409203 before handing anything
    // out, and its retry joins the in-flight operation.
    let mut late_a = w.engine.device(w.now, &mut w.rng, device_request(&request));
    let mut late_b = w.engine.device(w.now, &mut w.rng, device_request(&request));
    let (Step::Store(load_a), Step::Store(load_b)) =
        (late_a.resume(Input::Start), late_b.resume(Input::Start))
    else {
        panic!("both load first")
    };
    let ctx_a = BlockingStore::execute(&w.store, load_a);
    let ctx_b = BlockingStore::execute(&w.store, load_b);
    let step_a = late_a.resume(Input::Store(ctx_a));
    let step_b = late_b.resume(Input::Store(ctx_b));
    let drive = |flow: &mut dyn Flow, mut step: Step| loop {
        step = match step {
            Step::Store(op) => flow.resume(Input::Store(BlockingStore::execute(&w.store, op))),
            Step::Hub(_) => panic!("early mode replies before hub work"),
            Step::Respond(r) => break r,
            Step::Finished => panic!("no reply"),
            other => panic!("unexpected step {other:?}"),
        }
    };
    let ra = drive(&mut late_a, step_a);
    let rb = drive(&mut late_b, step_b);
    ops.push(operation_of(&ra));
    assert_eq!((rb.status, error_code(&rb)), (409, 409203));
    let (retry, retry_flow) = w.register_until_reply(&request);
    ops.push(operation_of(&retry));
    flows.push(Box::new(late_a));
    flows.push(retry_flow);
    // Every register was answered while the first was still assigning: one operation throughout.
    assert!(ops.iter().all(|op| *op == ops[0]), "{ops:?}");
    for op in &ops {
        assert_eq!(w.poll(&request, op).status, 202);
    }
    // They complete in any order; only the last early commit's flow writes the result.
    for mut flow in flows.into_iter().rev() {
        w.finish(flow.as_mut());
    }
    assert_all_assigned(&mut w, &request, &ops);
}

#[test]
fn burst_of_eight_distinct_operations_all_answer_within_the_retention() {
    let mut w = World::new(false);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let mut ops = Vec::new();
    for _ in 0..OPERATION_HISTORY_LEN {
        ops.push(operation_of(&w.register(&request)));
        w.advance_ms(100);
    }
    let mut distinct = ops.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), OPERATION_HISTORY_LEN);
    assert_all_assigned(&mut w, &request, &ops);
    // A ninth pushes the oldest out of the history.
    ops.push(operation_of(&w.register(&request)));
    let r = w.poll(&request, &ops[0]);
    assert_eq!((r.status, error_code(&r)), (404, 404204));
    assert_all_assigned(&mut w, &request, &ops[1..]);
    // After the retention window only the current operation answers.
    w.advance_ms(OPERATION_RETENTION_MS + 1);
    let request = w.register_request("dev-1", &key(1));
    let r = w.poll(&request, &ops[1]);
    assert_eq!((r.status, error_code(&r)), (404, 404204));
    assert_all_assigned(&mut w, &request, &ops[ops.len() - 1..]);
}

#[test]
fn a_failed_reregister_is_what_every_operation_reports() {
    // Polls report the registration's current state, whatever operation they name.
    let mut w = World::new(false);
    w.enroll("dev-1", &key(1));
    let request = w.register_request("dev-1", &key(1));
    let op_a = operation_of(&w.register(&request));
    w.hubs.set_unavailable(HUB_A, true);
    w.hubs.set_unavailable(HUB_B, true);
    let op_b = operation_of(&w.register(&request));
    for op in [&op_a, &op_b] {
        let r = w.poll(&request, op);
        assert_eq!(r.status, 200);
        assert_eq!(r.body_json().unwrap()["status"], "failed");
    }
}

/// Registers `dev-1` through group `grp-h` (key 20) and returns the hub it landed on.
fn owned_by_h(w: &mut World) -> (String, ClientRequest) {
    w.enroll_group("grp-h", &key(20));
    w.enroll_group("grp-g", &key(30));
    let request = w.register_request("dev-1", &key(20).derive_device_key("dev-1"));
    let op = operation_of(&w.register(&request));
    let state = assert_all_assigned(w, &request, &[op]);
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "grp-h");
    (state["assignedHub"].as_str().unwrap().to_owned(), request)
}

#[test]
fn another_group_cannot_take_over_a_registration() {
    let mut w = World::new(false);
    let (hub, _) = owned_by_h(&mut w);
    let before = w.hubs.device(&hub, "dev-1").unwrap();
    let record_before = w.service("GET", "/registrations/dev-1", None).body_json().unwrap();
    assert_eq!(before.identity.primary_key().unwrap(), key(20).derive_device_key("dev-1").to_base64());
    let intruder = w.register_request("dev-1", &key(30).derive_device_key("dev-1"));
    let r = w.register(&intruder);
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    let message = r.body_json().unwrap()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("enrollment group 'grp-h'"), "{message}");
    assert!(message.contains("delete its registration record"), "{message}");
    // Nothing changed: the hub identity, and the record.
    assert_eq!(w.hubs.device(&hub, "dev-1").unwrap(), before);
    assert_eq!(w.hubs.devices().len(), 1);
    assert_eq!(w.service("GET", "/registrations/dev-1", None).body_json().unwrap(), record_before);
}

#[test]
fn the_same_group_may_register_again() {
    let mut w = World::new(false);
    let (hub, request) = owned_by_h(&mut w);
    w.advance_ms(1000);
    let op = operation_of(&w.register(&request));
    let state = assert_all_assigned(&mut w, &request, &[op]);
    assert_eq!(state["assignedHub"], hub.as_str());
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "grp-h");
}

#[test]
fn deleting_the_registration_record_releases_the_device() {
    let mut w = World::new(false);
    let (_, _) = owned_by_h(&mut w);
    let r = w.service("DELETE", "/registrations/dev-1", None);
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    let other = w.register_request("dev-1", &key(30).derive_device_key("dev-1"));
    let op = operation_of(&w.register(&other));
    let state = assert_all_assigned(&mut w, &other, &[op]);
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "grp-g");
    let hub = state["assignedHub"].as_str().unwrap();
    let device = w.hubs.device(hub, "dev-1").unwrap();
    assert_eq!(device.identity.primary_key().unwrap(), key(30).derive_device_key("dev-1").to_base64());
}

#[test]
fn an_individual_enrollment_always_decides() {
    let mut w = World::new(false);
    let (_, _) = owned_by_h(&mut w);
    // An individual enrollment created later for the ID takes the device over.
    w.enroll("dev-1", &key(40));
    let individual = w.register_request("dev-1", &key(40));
    let op = operation_of(&w.register(&individual));
    let state = assert_all_assigned(&mut w, &individual, &[op]);
    assert!(state.get("symmetricKey").is_none(), "{state}");
    // Once the individual enrollment is gone, the record still names it: no group may take it over.
    let r = w.service("DELETE", "/enrollments/dev-1", None);
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    let group = w.register_request("dev-1", &key(20).derive_device_key("dev-1"));
    let r = w.register(&group);
    assert_eq!((r.status, error_code(&r)), (401, 401000));
    assert!(r.body_json().unwrap()["message"].as_str().unwrap().contains("an individual enrollment"));
}
