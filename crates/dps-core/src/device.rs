//! The device API flow: register, operation status, status lookup (spec §1, §12 items 3-10).
//!
//! Register: check scope, body and token → load the device context → attest (proof) → plan the assignment
//! (allocation + reprovision policy) → hub operations → commit the registration record → 202. With
//! `respond_before_assignment`, an `assigning` record is committed and the 202 sent right after attestation,
//! and the assignment finishes afterwards; polls meanwhile answer 202 `assigning`.
//!
//! # Overlapping registrations
//!
//! A device may send its register again while the first is in flight (reboot, retry after a lost reply,
//! two SDK instances). No operation ID the server handed out is ever stranded:
//! - every operation ID committed for a registration is kept in its operation history
//!   ([`crate::store::DeviceContext::operations`], the last [`crate::store::OPERATION_HISTORY_LEN`]); a
//!   poll of any of them issued within [`OPERATION_RETENTION_MS`] (24 h), or of the record's current one,
//!   is answered with the registration's *current* state (202 `assigning`, then the terminal result), under
//!   the polled operation ID;
//! - a register that arrives while the record is `assigning` through the same enrollment and was written
//!   within [`IN_FLIGHT_REUSE_MS`] reuses the in-flight operation ID instead of minting a new one (it still
//!   does the whole assignment itself, so a flow that died after its early reply does not strand it);
//! - registers that load the same record state race on the final commit as before: the loser answers
//!   409203 (retryable) before it has handed out anything, or, after an early reply, ends quietly while
//!   the winner's result answers both operation IDs.
//!
//! # Enrollment ownership
//!
//! A registration record belongs to the enrollment it was made through. An individual enrollment always
//! decides (it takes precedence over groups), but a register that attests only through an enrollment
//! group is refused with 401000 while the record names another group, or an individual enrollment: group
//! G's key cannot move or take over a device of group H. Deleting the registration record through the
//! service API releases the device.

use crate::config::EngineConfig;
use crate::effect::{AllocationCall, Effect, EffectError, EffectResult, IssueRequest};
use crate::flow::{Flow, Input, Step};
use crate::hub::{DeviceIdentity, DeviceTwin, HubAuthentication, HubError, HubOp, HubResult};
use crate::reply::Reply;
use crate::request::{unexpected_store_result, DeviceCall, DeviceRequest, Nonces};
use crate::store::{DeviceContext, EnrollmentRef, RegistrationRecord, StoreError, StoreOp, StoreResult};
use dps_attest::{Attestation, HubCredential, MatchedEnrollment, Presented, VerifiedDevice};
use dps_policy::{
    allocate, billable_device_operation, candidate_hubs, Assignment, DeviceOperation, MeterEvent,
    ReprovisionPlan, TwinSource,
};
use dps_proto::allocation::{AllocationRequest, AllocationResponse, DeviceRuntimeContext};
use dps_proto::credential::{Credential, TpmRegistration};
use dps_proto::model::{
    AllocationPolicy, CustomAllocationDefinition, DeviceRegistration, DeviceRegistrationResult, InitialTwin,
    RegistrationOperationStatus, RegistrationStatus, RegistrationSubstatus, ReprovisionPolicy,
    SymmetricKeyRegistrationResult,
};
use dps_proto::{
    ApiVersion, DpsError, EnrollmentGroupId, ErrorCode, Etag, OperationId, RegistrationId, Timestamp,
    MAX_BODY_BYTES,
};
use serde_json::{json, Value};
use std::sync::Arc;

/// How long an operation ID from a registration's operation history keeps answering polls (24 h). The
/// record's current operation ID answers as long as the record exists.
pub const OPERATION_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

/// How recent an `assigning` record must be for a new register to reuse its operation ID (2 minutes).
pub const IN_FLIGHT_REUSE_MS: i64 = 2 * 60 * 1000;

/// The first api-version that carries a `csr` (spec §7.6).
const CSR_API_VERSION: ApiVersion = ApiVersion::V2025_07_01Preview;

/// The api-version assumed when a request sends none.
const DEFAULT_API_VERSION: ApiVersion = ApiVersion::V2021_10_01;

/// An owned assignment decision, built only from a [`VerifiedDevice`].
#[derive(Debug, Clone)]
struct AssignmentPlan {
    target: Assignment,
    identity: DeviceIdentity,
    twin: TwinSource,
    initial_twin: DeviceTwin,
    delete_previous: Option<Assignment>,
    substatus: RegistrationSubstatus,
}

/// A custom-allocation device waiting for its webhook's (or hook's) answer: the call to make and what the
/// plan needs once the answer is in.
#[derive(Debug)]
struct CustomPending {
    /// Taken when the effect is asked for.
    call: Option<Box<AllocationCall>>,
    /// The hubs offered to the webhook (its answer must be one of them).
    linked: Vec<String>,
    previous: Option<Assignment>,
    reprovision: Option<ReprovisionPolicy>,
    api_version: ApiVersion,
    device_id: String,
    authentication: HubAuthentication,
    enrollment_twin: DeviceTwin,
    iot_edge: bool,
}

/// What [`plan_assignment`] decided: a plan, or a custom allocation to ask for first.
#[derive(Debug)]
// Built once per registration and moved straight into the job; boxing the plan would add an allocation on
// the hot path of every built-in allocation.
#[allow(clippy::large_enum_variant)]
enum Planned {
    Ready(AssignmentPlan),
    Custom(Box<CustomPending>),
}

#[derive(Debug)]
enum HubStage {
    ReadTwin,
    Upsert,
    Delete,
}

/// The registration being carried out.
#[derive(Debug)]
struct Job {
    /// The record to commit at the end (status and location filled in as the work goes).
    record: RegistrationRecord,
    /// The ETag the final commit expects.
    expected: Option<Etag>,
    plan: Option<AssignmentPlan>,
    migrated_twin: Option<DeviceTwin>,
    /// The 202 was already sent (early mode).
    responded: bool,
    /// The last hub operation completed.
    done: Option<HubStage>,
    /// A certificate to issue (the device sent a CSR) before the hub operations.
    issue: Option<IssueRequest>,
    /// A custom allocation to ask for before anything else (the plan is made from its answer).
    custom: Option<Box<CustomPending>>,
}

impl Job {
    /// Whether the registration still has assignment work to do (a plan, or a custom allocation that
    /// will make one).
    fn has_work(&self) -> bool {
        self.plan.is_some() || self.custom.is_some()
    }
}

#[derive(Debug)]
enum State {
    Start,
    AwaitContext,
    AwaitEarlyCommit(Box<Job>),
    AwaitEarlyResponded(Box<Job>),
    AwaitHub(Box<Job>, HubStage),
    AwaitIssued(Box<Job>),
    AwaitAllocation(Box<Job>),
    AwaitCommit { responded: bool, operation_id: OperationId },
    Finishing,
    Finished,
}

/// A device API request in progress. Drive it with [`Flow::resume`] or the drivers in [`crate::flow`].
#[derive(Debug)]
pub struct DeviceFlow {
    config: Arc<EngineConfig>,
    now: Timestamp,
    nonces: Nonces,
    request: DeviceRequest,
    presented: Option<Presented>,
    body: DeviceRegistration,
    /// The device's CSR, checked: (SubjectPublicKeyInfo DER, CSR DER).
    csr: Option<(Vec<u8>, Vec<u8>)>,
    state: State,
}

impl DeviceFlow {
    pub(crate) fn new(
        config: Arc<EngineConfig>,
        now: Timestamp,
        nonces: Nonces,
        request: DeviceRequest,
    ) -> Self {
        DeviceFlow {
            config,
            now,
            nonces,
            request,
            presented: None,
            body: DeviceRegistration::default(),
            csr: None,
            state: State::Start,
        }
    }

    fn api_version(&self) -> &ApiVersion {
        self.request.api_version.as_ref().unwrap_or(&DEFAULT_API_VERSION)
    }

    fn fail(&mut self, err: &DpsError) -> Step {
        self.state = State::Finishing;
        let mut reply = Reply::error(err, self.nonces.tracking_id(), self.now);
        if matches!(self.request.call, DeviceCall::Register { .. }) {
            if let Some(op) = billable_device_operation(DeviceOperation::Register) {
                reply.meter = Some(MeterEvent { operation: op, at: self.now, succeeded: false });
            }
        }
        Step::Respond(reply)
    }

    fn respond(&mut self, reply: Reply) -> Step {
        self.state = State::Finishing;
        Step::Respond(reply)
    }

    /// Checks a register's `csr` (spec §7.6): only on a register, only with api-version
    /// 2025-07-01-preview or later, only when this service issues certificates, and only a valid PKCS#10
    /// request for the registration ID.
    fn check_csr(&self, csr: &str) -> Result<(Vec<u8>, Vec<u8>), DpsError> {
        let refuse = |m: String| DpsError::with_message(ErrorCode::InvalidCsr, m);
        if matches!(self.request.call, DeviceCall::StatusLookup) {
            return Err(refuse("A status lookup may not carry a csr; send it with the register.".into()));
        }
        let version = self.api_version();
        if version.date() < CSR_API_VERSION.date() {
            return Err(refuse(format!(
                "The request carries a csr, but api-version {} does not support certificate issuance; use \
                 api-version={} or later.",
                version.as_str(),
                CSR_API_VERSION.as_str()
            )));
        }
        if !self.config.certificate_issuance {
            return Err(refuse(
                "The device sent a csr, but certificate issuance is not configured in this service.".into(),
            ));
        }
        let request = dps_attest::x509::csr::parse_csr(csr, &self.request.registration_id)?;
        let compact: String = csr.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| refuse(format!("The csr is not base64: {e}")))?;
        Ok((request.subject_public_key_info_der().to_vec(), der))
    }

    /// Checks everything that needs no storage: scope, body, token syntax and expiry.
    fn start(&mut self) -> Result<Step, DpsError> {
        if self.request.id_scope != self.config.id_scope {
            return Err(DpsError::with_message(
                ErrorCode::IdScopeNotFound,
                format!(
                    "The ID scope '{}' is not served by this provisioning service.",
                    self.request.id_scope
                ),
            ));
        }
        if matches!(self.request.call, DeviceCall::Register { .. } | DeviceCall::StatusLookup) {
            self.body = parse_device_body(&self.request.body, &self.request.registration_id)?;
            if let Some(csr) = self.body.csr.take() {
                self.csr = Some(self.check_csr(&csr)?);
            }
        }
        if self.request.credential == Credential::None {
            if let Some(tpm) = &self.body.tpm {
                // A TPM device's first register carries its keys in the body, with no Authorization.
                self.request.credential = Credential::Tpm(TpmRegistration {
                    endorsement_key: tpm.endorsement_key.clone().unwrap_or_default(),
                    storage_root_key: tpm.storage_root_key.clone().unwrap_or_default(),
                });
            }
        }
        self.presented = Some(dps_attest::prepare(self.now, &self.request.credential)?);
        self.state = State::AwaitContext;
        Ok(Step::Store(StoreOp::LoadDeviceContext { registration_id: self.request.registration_id.clone() }))
    }

    fn on_context(&mut self, mut ctx: DeviceContext) -> Result<Step, DpsError> {
        let Some(presented) = self.presented.as_ref() else {
            return Err(DpsError::with_message(ErrorCode::InternalError, "credential missing after start"));
        };
        if let (DeviceCall::OperationStatus(op), Presented::ClientCertificate(chain), Some(record)) =
            (&self.request.call, presented, ctx.registration.as_ref())
        {
            // A device polling with the certificate its registration was made with: the TLS handshake
            // proved the key, the record names the certificate; no second chain validation.
            let recorded = record.x509.as_ref().and_then(|x| x.certificate_info.as_ref());
            if let Some(info) = recorded {
                let id = &self.request.registration_id;
                if dps_attest::x509::same_device_certificate(self.now, id, chain, &info.sha256_thumbprint)? {
                    let op = op.clone();
                    return self.answer_poll(ctx, &op);
                }
            }
        }
        let attestation = dps_attest::attest(
            self.now,
            &self.config.id_scope,
            &self.request.registration_id,
            presented,
            ctx.individual.take().map(Arc::new),
            &ctx.groups,
            ctx.registration.as_ref().and_then(|r| match &r.enrollment {
                EnrollmentRef::Group(g) => Some(g.as_str()),
                EnrollmentRef::Individual(_) => None,
            }),
            &ctx.certificates,
        )?;
        match self.request.call.clone() {
            DeviceCall::Register { .. } => self.register(attestation, ctx.registration.as_ref()),
            DeviceCall::OperationStatus(op) => self.answer_poll(ctx, &op),
            DeviceCall::Authenticate => Ok(self.respond(Reply::empty(204, self.nonces.tracking_id()))),
            DeviceCall::StatusLookup => {
                let record = ctx.registration.ok_or_else(|| {
                    DpsError::with_message(
                        ErrorCode::RegistrationNotFound,
                        format!(
                            "Registration '{}' has no registration record.",
                            self.request.registration_id
                        ),
                    )
                })?;
                // The issued chain is not repeated by a status lookup (spec §7.6).
                let reply = Reply::json(200, &result_of(&record, false), self.nonces.tracking_id());
                Ok(self.respond(reply))
            }
        }
    }

    /// Answers a poll of `op` from the loaded context (after the device authenticated).
    fn answer_poll(&mut self, ctx: DeviceContext, op: &OperationId) -> Result<Step, DpsError> {
        let now = self.now;
        let operations = &ctx.operations;
        let record = ctx.registration.filter(|r| answers(r, operations, op, now)).ok_or_else(|| {
            DpsError::with_message(
                ErrorCode::OperationNotFound,
                format!(
                    "Operation '{op}' of registration '{}' does not exist.",
                    self.request.registration_id
                ),
            )
        })?;
        Ok(self.respond(self.operation_reply(&record, op)))
    }

    fn new_record(
        &self,
        previous: Option<&RegistrationRecord>,
        enrollment: EnrollmentRef,
    ) -> RegistrationRecord {
        let partition = partition_of(self.request.registration_id.key());
        // Reuse the operation of a recent in-flight register through the same enrollment.
        let operation_id = match previous {
            Some(p)
                if p.status == RegistrationStatus::Assigning
                    && p.enrollment == enrollment
                    && self.now <= p.last_updated.plus_millis(IN_FLIGHT_REUSE_MS) =>
            {
                p.operation_id.clone()
            }
            _ => OperationId::generate(partition, self.nonces.op),
        };
        RegistrationRecord {
            registration_id: self.request.registration_id.clone(),
            enrollment,
            operation_id,
            status: RegistrationStatus::Assigning,
            substatus: None,
            assigned_hub: previous.and_then(|p| p.assigned_hub.clone()),
            device_id: previous.and_then(|p| p.device_id.clone()),
            error_code: None,
            error_message: None,
            payload: None,
            created: previous.map(|p| p.created).unwrap_or(self.now),
            last_updated: self.now,
            etag: Etag::generate(self.nonces.etag),
            x509: None,
            issued_certificate_chain: None,
        }
    }

    fn register(
        &mut self,
        attestation: Attestation,
        previous: Option<&RegistrationRecord>,
    ) -> Result<Step, DpsError> {
        let expected = previous.map(|p| p.etag.clone());
        let x509 = match &attestation {
            Attestation::Verified(v) => v.x509_result(),
            Attestation::Disabled(_) => None,
        };
        let (enrollment, plan) = match &attestation {
            Attestation::Disabled(d) => {
                (enrollment_ref(&self.request.registration_id, d.enrollment())?, None)
            }
            Attestation::Verified(v) => {
                let payload = self.body.payload.take();
                let plan =
                    plan_assignment(&self.config, v, previous, self.api_version(), payload, &self.request);
                (enrollment_ref(&self.request.registration_id, v.enrollment())?, Some(plan))
            }
        };
        check_owner(&self.request.registration_id, previous, &enrollment)?;
        let mut record = self.new_record(previous, enrollment);
        record.x509 = x509;
        let (plan, custom) = match plan {
            None => {
                record.status = RegistrationStatus::Disabled;
                (None, None)
            }
            Some(Err(e)) => {
                set_failed(&mut record, &e);
                (None, None)
            }
            Some(Ok(Planned::Ready(plan))) => (Some(plan), None),
            Some(Ok(Planned::Custom(pending))) => (None, Some(pending)),
        };
        let device_id = plan
            .as_ref()
            .map(|p| p.target.device_id.clone())
            .or_else(|| custom.as_ref().map(|c| c.device_id.clone()));
        let issue = match (device_id, self.csr.take()) {
            (Some(device_id), Some((subject_public_key_info, csr_der))) => Some(IssueRequest {
                registration_id: self.request.registration_id.clone(),
                device_id,
                subject_public_key_info,
                csr_der,
            }),
            _ => None,
        };
        let mut job = Box::new(Job {
            record,
            expected,
            plan,
            migrated_twin: None,
            responded: false,
            done: None,
            issue,
            custom,
        });
        if job.has_work() && self.config.respond_before_assignment {
            // Commit an `assigning` record first so polls can see the operation, then answer.
            let mut assigning = job.record.clone();
            assigning.status = RegistrationStatus::Assigning;
            assigning.etag = Etag::generate(self.nonces.etag2);
            let expected = job.expected.replace(assigning.etag.clone());
            self.state = State::AwaitEarlyCommit(job);
            return Ok(Step::Store(StoreOp::CommitRegistration { record: Box::new(assigning), expected }));
        }
        Ok(self.next_hub_step(job))
    }

    /// The next hub operation of the plan (after `job.done`), or the final commit. A custom allocation
    /// comes first (it makes the plan), then a certificate to issue: the hub identity then trusts the
    /// issuing CA.
    fn next_hub_step(&mut self, mut job: Box<Job>) -> Step {
        if let Some(call) = job.custom.as_mut().and_then(|c| c.call.take()) {
            self.state = State::AwaitAllocation(job);
            return Step::Effect(Effect::Allocate(call));
        }
        if job.plan.is_some() {
            if let Some(request) = job.issue.take() {
                self.state = State::AwaitIssued(job);
                return Step::Effect(Effect::IssueCertificate(request));
            }
        }
        let Some(plan) = job.plan.as_ref() else { return self.commit(job) };
        let next = match job.done {
            None => match plan.twin {
                TwinSource::MigrateFrom(_) => Some(HubStage::ReadTwin),
                _ => Some(HubStage::Upsert),
            },
            Some(HubStage::ReadTwin) => Some(HubStage::Upsert),
            Some(HubStage::Upsert) => plan.delete_previous.as_ref().map(|_| HubStage::Delete),
            Some(HubStage::Delete) => None,
        };
        let op = match (&next, &plan.twin, &plan.delete_previous) {
            (None, _, _) => return self.commit(job),
            (Some(HubStage::ReadTwin), TwinSource::MigrateFrom(prev), _) => {
                HubOp::ReadTwin { hub: prev.hub.clone(), device_id: prev.device_id.clone() }
            }
            (Some(HubStage::Delete), _, Some(prev)) => {
                HubOp::DeleteDevice { hub: prev.hub.clone(), device_id: prev.device_id.clone() }
            }
            (Some(_), twin, _) => HubOp::UpsertDevice {
                hub: plan.target.hub.clone(),
                identity: plan.identity.clone(),
                twin: match twin {
                    TwinSource::MigrateFrom(_) => {
                        job.migrated_twin.clone().unwrap_or_else(|| plan.initial_twin.clone())
                    }
                    _ => plan.initial_twin.clone(),
                },
                replace_twin: !matches!(twin, TwinSource::Keep),
            },
        };
        let stage = match op {
            HubOp::ReadTwin { .. } => HubStage::ReadTwin,
            HubOp::DeleteDevice { .. } => HubStage::Delete,
            _ => HubStage::Upsert,
        };
        self.state = State::AwaitHub(job, stage);
        Step::Hub(op)
    }

    fn commit(&mut self, mut job: Box<Job>) -> Step {
        if let Some(plan) = job.plan.take() {
            job.record.status = RegistrationStatus::Assigned;
            job.record.substatus = Some(plan.substatus);
            job.record.assigned_hub = Some(plan.target.hub);
            job.record.device_id = Some(plan.target.device_id);
        }
        self.state =
            State::AwaitCommit { responded: job.responded, operation_id: job.record.operation_id.clone() };
        Step::Store(StoreOp::CommitRegistration { record: Box::new(job.record), expected: job.expected })
    }

    fn on_hub(&mut self, mut job: Box<Job>, stage: HubStage, result: Result<HubResult, HubError>) -> Step {
        match (&stage, result) {
            (HubStage::ReadTwin, Ok(HubResult::Twin(twin))) => {
                // Nothing to migrate (the previous device is gone from its hub): the device starts from the
                // enrollment's initial twin, so it is an initial assignment, not `deviceDataMigrated`.
                if twin.is_none() {
                    if let Some(plan) = job.plan.as_mut() {
                        plan.substatus = RegistrationSubstatus::InitialAssignment;
                    }
                }
                job.migrated_twin = twin;
            }
            (HubStage::Upsert, Ok(HubResult::Done)) => {}
            // The device already lives on its new hub; a stale identity left on the old hub does not stop it.
            (HubStage::Delete, _) => {}
            (_, Err(e)) => {
                job.plan = None;
                set_failed(
                    &mut job.record,
                    &DpsError::with_message(ErrorCode::HubOperationFailed, e.to_string()),
                );
                return self.commit(job);
            }
            (_, Ok(_)) => {
                job.plan = None;
                set_failed(
                    &mut job.record,
                    &DpsError::with_message(ErrorCode::InternalError, "unexpected hub result"),
                );
                return self.commit(job);
            }
        }
        job.done = Some(stage);
        self.next_hub_step(job)
    }

    fn on_issued(&mut self, mut job: Box<Job>, result: Result<EffectResult, EffectError>) -> Step {
        match result {
            Ok(EffectResult::IssuedCertificate(chain)) if !chain.is_empty() => {
                use base64::Engine as _;
                let b64 = base64::engine::general_purpose::STANDARD;
                job.record.issued_certificate_chain = Some(chain.iter().map(|c| b64.encode(c)).collect());
                if let Some(plan) = job.plan.as_mut() {
                    plan.identity.authentication = HubAuthentication::CertificateAuthority;
                }
                self.next_hub_step(job)
            }
            Ok(_) => {
                job.plan = None;
                set_failed(
                    &mut job.record,
                    &DpsError::with_message(
                        ErrorCode::InternalError,
                        "The certificate issuer returned no certificate.",
                    ),
                );
                self.commit(job)
            }
            Err(e) => {
                job.plan = None;
                let code = if e.unsupported { ErrorCode::InvalidCsr } else { ErrorCode::InternalError };
                set_failed(
                    &mut job.record,
                    &DpsError::with_message(code, format!("Certificate issuance failed: {}", e.message)),
                );
                self.commit(job)
            }
        }
    }

    /// The webhook's (or hook's) answer to a custom allocation: checked against spec §8.5, then planned
    /// like any allocation (the reprovision table decides twin, substatus and what to delete).
    fn on_allocated(&mut self, mut job: Box<Job>, result: Result<EffectResult, EffectError>) -> Step {
        let Some(pending) = job.custom.take() else {
            return self.fail(&unexpected_store_result());
        };
        let decided = match result {
            Ok(EffectResult::Allocation(response)) => decide_custom(*pending, response),
            Ok(_) => Err(DpsError::with_message(ErrorCode::InternalError, "unexpected allocation result")),
            Err(e) => Err(DpsError::with_message(
                e.code.unwrap_or(ErrorCode::CustomAllocationFailed),
                format!("Custom allocation failed: {}", e.message),
            )),
        };
        match decided {
            Ok((plan, payload)) => {
                job.record.payload = payload;
                job.plan = Some(plan);
                self.next_hub_step(job)
            }
            Err(e) => {
                job.issue = None;
                set_failed(&mut job.record, &e);
                self.commit(job)
            }
        }
    }

    fn register_reply(&self, operation_id: &OperationId) -> Reply {
        let body = RegistrationOperationStatus {
            operation_id: operation_id.to_string(),
            status: RegistrationStatus::Assigning,
            registration_state: None,
        };
        // No meter: a register is billed by its outcome, at its terminal commit ([`register_meter`]).
        Reply::json(202, &body, self.nonces.tracking_id()).with_retry_after(self.config.retry_after_secs)
    }

    /// The answer to a poll of `operation_id`: the record's current state.
    fn operation_reply(&self, record: &RegistrationRecord, operation_id: &OperationId) -> Reply {
        if record.status.is_terminal() {
            let body = RegistrationOperationStatus {
                operation_id: operation_id.to_string(),
                status: record.status,
                registration_state: Some(result_of(record, true)),
            };
            Reply::json(200, &body, self.nonces.tracking_id())
        } else {
            let body = RegistrationOperationStatus {
                operation_id: operation_id.to_string(),
                status: RegistrationStatus::Assigning,
                registration_state: Some(DeviceRegistrationResult::minimal(
                    record.registration_id.as_str(),
                    RegistrationStatus::Assigning,
                )),
            };
            Reply::json(202, &body, self.nonces.tracking_id()).with_retry_after(self.config.retry_after_secs)
        }
    }

    fn store_error(&mut self, e: StoreError) -> Step {
        let err = match e {
            StoreError::Conflict => DpsError::with_message(
                ErrorCode::RegistrationConflict,
                format!(
                    "Precondition failed: registration '{}' changed concurrently; retry.",
                    self.request.registration_id
                ),
            )
            .retry_after(self.config.retry_after_secs),
            StoreError::Backend { message } => DpsError::with_message(ErrorCode::StoreUnavailable, message)
                .retry_after(self.config.retry_after_secs),
            other => DpsError::with_message(ErrorCode::InternalError, other.to_string()),
        };
        self.fail(&err)
    }
}

/// The billing event of a register, from the registration record it commits: a register is billed by its
/// **outcome**, not by its `202` (which leaves before the assignment ends when answering early). A terminal
/// record (`assigned` or `disabled`: success; `failed`: failure) is the billing point; a non-terminal one
/// (`assigning`) bills nothing. Every register that gets as far as a commit commits exactly one terminal
/// record; a register refused before that (bad token, unknown enrollment) is billed as a failure on its
/// error reply ([`Reply::meter`]). Call it for each successful `CommitRegistration` (the reference server's
/// store wrapper does).
pub fn register_meter(record: &RegistrationRecord) -> Option<MeterEvent> {
    let succeeded = match record.status {
        RegistrationStatus::Assigned | RegistrationStatus::Disabled => true,
        RegistrationStatus::Failed => false,
        _ => return None,
    };
    let operation = billable_device_operation(DeviceOperation::Register)?;
    Some(MeterEvent { operation, at: record.last_updated, succeeded })
}

impl DeviceFlow {
    /// The request this flow serves (transport, scope, registration ID, call).
    pub fn request(&self) -> &DeviceRequest {
        &self.request
    }
}

impl Flow for DeviceFlow {
    fn resume_at(&mut self, now: Timestamp, input: Input) -> Step {
        self.now = self.now.max(now);
        self.resume(input)
    }

    fn resume(&mut self, input: Input) -> Step {
        let state = std::mem::replace(&mut self.state, State::Finished);
        match (state, input) {
            (State::Start, _) => match self.start() {
                Ok(step) => step,
                Err(e) => self.fail(&e),
            },
            (State::AwaitContext, Input::Store(Ok(StoreResult::DeviceContext(ctx)))) => {
                match self.on_context(ctx) {
                    Ok(step) => step,
                    Err(e) => self.fail(&e),
                }
            }
            (State::AwaitEarlyCommit(mut job), Input::Store(Ok(_))) => {
                job.responded = true;
                let reply = self.register_reply(&job.record.operation_id);
                self.state = State::AwaitEarlyResponded(job);
                Step::Respond(reply)
            }
            (State::AwaitEarlyResponded(job), Input::Responded) => self.next_hub_step(job),
            (State::AwaitHub(job, stage), Input::Hub(result)) => self.on_hub(job, stage, result),
            (State::AwaitIssued(job), Input::Effect(result)) => self.on_issued(job, result),
            (State::AwaitAllocation(job), Input::Effect(result)) => self.on_allocated(job, result),
            (State::AwaitCommit { responded: false, operation_id }, Input::Store(Ok(_))) => {
                let reply = self.register_reply(&operation_id);
                self.respond(reply)
            }
            (State::AwaitCommit { responded: true, .. }, Input::Store(Ok(_))) => Step::Finished,
            (State::AwaitCommit { responded: true, .. }, Input::Store(Err(_))) => Step::Finished,
            (
                State::AwaitContext
                | State::AwaitEarlyCommit(_)
                | State::AwaitCommit { responded: false, .. },
                Input::Store(Err(e)),
            ) => self.store_error(e),
            (State::Finishing, _) | (State::Finished, _) => Step::Finished,
            (_, _) => self.fail(&unexpected_store_result()),
        }
    }
}

fn parse_device_body(body: &[u8], registration_id: &RegistrationId) -> Result<DeviceRegistration, DpsError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DpsError::with_message(
            ErrorCode::PayloadTooLarge,
            format!("The request body is {} bytes; the limit is {MAX_BODY_BYTES}.", body.len()),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeviceRegistration::default());
    }
    let parsed: DeviceRegistration = dps_proto::strict::from_slice(body).map_err(|e| {
        DpsError::with_message(
            ErrorCode::InvalidJson,
            format!("The registration request is not a valid JSON object: {e}"),
        )
    })?;
    if let Some(id) = parsed.registration_id.as_deref() {
        if !id.eq_ignore_ascii_case(registration_id.as_str()) {
            return Err(DpsError::with_message(
                ErrorCode::RegistrationIdMismatch,
                format!("The body's registrationId '{id}' does not match '{registration_id}' in the request address."),
            ));
        }
    }
    Ok(parsed)
}

fn enrollment_ref(
    registration_id: &RegistrationId,
    matched: &MatchedEnrollment,
) -> Result<EnrollmentRef, DpsError> {
    Ok(match matched {
        MatchedEnrollment::Individual(_) => EnrollmentRef::Individual(registration_id.clone()),
        MatchedEnrollment::Group(g) => {
            EnrollmentRef::Group(EnrollmentGroupId::parse(&g.enrollment_group_id)?)
        }
    })
}

/// Whether a poll of `operation_id` is answered from `record`: it is the record's current operation, or one
/// of its history issued within [`OPERATION_RETENTION_MS`].
fn answers(
    record: &RegistrationRecord,
    history: &[crate::store::IssuedOperation],
    operation_id: &OperationId,
    now: Timestamp,
) -> bool {
    record.operation_id == *operation_id
        || history
            .iter()
            .any(|o| o.operation_id == *operation_id && now <= o.issued.plus_millis(OPERATION_RETENTION_MS))
}

/// The enrollment-ownership rule (module docs): an individual enrollment always decides; a register
/// through group G is refused while the record names another enrollment.
fn check_owner(
    registration_id: &RegistrationId,
    previous: Option<&RegistrationRecord>,
    attested: &EnrollmentRef,
) -> Result<(), DpsError> {
    let (EnrollmentRef::Group(group), Some(previous)) = (attested, previous) else { return Ok(()) };
    let owner = match &previous.enrollment {
        EnrollmentRef::Group(h) if h.key() == group.key() => return Ok(()),
        EnrollmentRef::Group(h) => format!("enrollment group '{h}'"),
        EnrollmentRef::Individual(_) => "an individual enrollment".to_owned(),
    };
    Err(DpsError::with_message(
        ErrorCode::Unauthorized,
        format!(
            "Registration '{registration_id}' belongs to {owner}, not to enrollment group '{group}' whose key \
             was presented; delete its registration record to move it."
        ),
    ))
}

fn set_failed(record: &mut RegistrationRecord, err: &DpsError) {
    record.status = RegistrationStatus::Failed;
    record.substatus = None;
    record.error_code = Some(err.code.code());
    record.error_message = Some(err.message.clone());
}

/// Turns an enrollment's initial twin and capabilities into the hub twin.
fn twin_of(initial: Option<&InitialTwin>, iot_edge: bool) -> DeviceTwin {
    let object = |v: Option<&Value>| v.filter(|v| v.is_object()).cloned().unwrap_or_else(|| json!({}));
    DeviceTwin {
        tags: object(initial.and_then(|t| t.tags.as_ref())),
        desired: object(initial.and_then(|t| t.properties.as_ref()).and_then(|p| p.desired.as_ref())),
        iot_edge,
    }
}

/// Decides where a verified device goes (or, for custom allocation, what to ask the webhook). Requires the
/// attestation proof.
fn plan_assignment(
    config: &EngineConfig,
    device: &VerifiedDevice,
    previous: Option<&RegistrationRecord>,
    api_version: &ApiVersion,
    payload: Option<Value>,
    request: &DeviceRequest,
) -> Result<Planned, DpsError> {
    let credential = &request.credential;
    struct Settings<'a> {
        policy: Option<AllocationPolicy>,
        hubs: Option<&'a [String]>,
        hub: Option<&'a str>,
        reprovision: Option<ReprovisionPolicy>,
        twin: Option<&'a InitialTwin>,
        iot_edge: bool,
        device_id: Option<&'a str>,
        custom: Option<&'a CustomAllocationDefinition>,
    }
    let s = match device.enrollment() {
        MatchedEnrollment::Individual(e) => Settings {
            policy: e.allocation_policy,
            hubs: e.iot_hubs.as_deref(),
            hub: e.iot_hub_host_name.as_deref(),
            reprovision: e.reprovision_policy,
            twin: e.initial_twin.as_ref(),
            iot_edge: e.capabilities.is_some_and(|c| c.iot_edge),
            device_id: e.device_id.as_deref().filter(|d| !d.is_empty()),
            custom: e.custom_allocation_definition.as_ref(),
        },
        MatchedEnrollment::Group(g) => Settings {
            policy: g.allocation_policy,
            hubs: g.iot_hubs.as_deref(),
            hub: g.iot_hub_host_name.as_deref(),
            reprovision: g.reprovision_policy,
            twin: g.initial_twin.as_ref(),
            iot_edge: g.capabilities.is_some_and(|c| c.iot_edge),
            device_id: None,
            custom: g.custom_allocation_definition.as_ref(),
        },
    };
    let policy = s.policy.unwrap_or(config.default_allocation);
    let registration_id = device.registration_id();
    let device_id = s.device_id.unwrap_or(registration_id.as_str()).to_owned();
    let previous_assignment = previous.and_then(|p| match (&p.assigned_hub, &p.device_id) {
        (Some(hub), Some(id)) => Some(Assignment::new(hub.clone(), id.clone())),
        _ => None,
    });
    let authentication = hub_authentication(device)?;
    let initial_twin = twin_of(s.twin, s.iot_edge);
    if policy == AllocationPolicy::Custom {
        // Spec §8.3: the hubs the webhook may choose from; only the current one under "never reprovision".
        let effective = dps_policy::effective_policy(s.reprovision, api_version);
        let linked: Vec<String> = match &previous_assignment {
            Some(prev) if !effective.update_hub_assignment => vec![prev.hub.clone()],
            _ => candidate_hubs(&config.linked_hubs, s.hubs, s.hub)?
                .into_iter()
                .map(|h| h.host_name.clone())
                .collect(),
        };
        let request = AllocationRequest {
            individual_enrollment: match device.enrollment() {
                MatchedEnrollment::Individual(e) => Some(Box::new(webhook_view_individual(e, s.custom))),
                MatchedEnrollment::Group(_) => None,
            },
            enrollment_group: match device.enrollment() {
                MatchedEnrollment::Group(g) => Some(Box::new(webhook_view_group(g.group(), s.custom))),
                MatchedEnrollment::Individual(_) => None,
            },
            device_runtime_context: DeviceRuntimeContext {
                registration_id: registration_id.as_str().to_owned(),
                current_iot_hub_host_name: previous_assignment.as_ref().map(|p| p.hub.clone()),
                current_device_id: previous_assignment.as_ref().map(|p| p.device_id.clone()),
                symmetric_key: matches!(credential, Credential::SasToken(_)).then(|| json!({})),
                x509: device.x509_result(),
                tpm: match credential {
                    Credential::Tpm(t) => Some(dps_proto::model::TpmAttestation {
                        endorsement_key: Some(t.endorsement_key.clone()),
                        storage_root_key: Some(t.storage_root_key.clone()),
                    }),
                    _ => None,
                },
                payload,
            },
            linked_hubs: linked.clone(),
        };
        return Ok(Planned::Custom(Box::new(CustomPending {
            call: Some(Box::new(AllocationCall { definition: s.custom.cloned(), request })),
            linked,
            previous: previous_assignment,
            reprovision: s.reprovision,
            api_version: api_version.clone(),
            device_id,
            authentication,
            enrollment_twin: initial_twin,
            iot_edge: s.iot_edge,
        })));
    }
    let plan =
        dps_policy::plan(previous_assignment.as_ref(), s.reprovision, api_version, &device_id, || {
            let candidates = candidate_hubs(&config.linked_hubs, s.hubs, s.hub)?;
            match (policy, &config.latency, request.client_address) {
                (AllocationPolicy::GeoLatency, Some(source), Some(client)) => {
                    let latency = |hub: &dps_policy::LinkedHub| source.latency_ms(client, hub);
                    Ok(dps_policy::lowest_latency(registration_id.key(), &candidates, latency)?
                        .0
                        .host_name
                        .clone())
                }
                _ => Ok(allocate(policy, registration_id.key(), &candidates)?.host_name.clone()),
            }
        })?;
    Ok(Planned::Ready(assignment_plan(plan, authentication, initial_twin)))
}

/// The hub authentication for the device's credential.
fn hub_authentication(device: &VerifiedDevice) -> Result<HubAuthentication, DpsError> {
    Ok(match device.hub_credential() {
        HubCredential::Keys { primary, secondary } => {
            HubAuthentication::Sas { primary_key: primary.to_base64(), secondary_key: secondary.to_base64() }
        }
        HubCredential::X509Thumbprints { primary, secondary } => {
            HubAuthentication::SelfSigned { primary_thumbprint: primary, secondary_thumbprint: secondary }
        }
        HubCredential::CertificateAuthority => HubAuthentication::CertificateAuthority,
        other => {
            return Err(DpsError::with_message(
                ErrorCode::InternalError,
                format!("no hub authentication for the device's credential {other:?}"),
            ))
        }
    })
}

fn assignment_plan(
    plan: ReprovisionPlan,
    authentication: HubAuthentication,
    initial_twin: DeviceTwin,
) -> AssignmentPlan {
    AssignmentPlan {
        identity: DeviceIdentity { device_id: plan.target.device_id.clone(), authentication },
        target: plan.target,
        twin: plan.twin,
        initial_twin,
        delete_previous: plan.delete_previous,
        substatus: plan.substatus,
    }
}

/// Checks a webhook's answer (spec §8.4, §8.5) and plans the assignment; returns the plan and the payload
/// for the device.
fn decide_custom(
    pending: CustomPending,
    response: AllocationResponse,
) -> Result<(AssignmentPlan, Option<Value>), DpsError> {
    let chosen = response.iot_hub_host_name.as_deref().map(str::trim).unwrap_or_default();
    if chosen.is_empty() {
        return Err(DpsError::with_message(
            ErrorCode::CustomAllocationIotHubNotSpecified,
            "The custom allocation webhook answered without an iotHubHostName.",
        ));
    }
    let Some(hub) = pending.linked.iter().find(|h| h.eq_ignore_ascii_case(chosen)).cloned() else {
        return Err(DpsError::with_message(
            ErrorCode::CustomAllocationFailed,
            format!(
                "The custom allocation webhook chose IoT hub '{}', which is not one of the linked hubs it was \
                 offered ({}).",
                chosen.chars().take(256).collect::<String>(),
                pending.linked.join(", ")
            ),
        ));
    };
    let plan = dps_policy::plan(
        pending.previous.as_ref(),
        pending.reprovision,
        &pending.api_version,
        &pending.device_id,
        || Ok(hub),
    )?;
    // Spec §8.4: the webhook's initial twin applies to a first assignment, and on reprovisioning only when
    // the hub changes under "reset to initial config"; otherwise the enrollment's.
    let hub_changed =
        pending.previous.as_ref().is_some_and(|p| !p.hub.eq_ignore_ascii_case(&plan.target.hub));
    let first = pending.previous.is_none();
    let twin = match response.initial_twin.as_ref() {
        Some(t) if first || (plan.twin == TwinSource::Initial && hub_changed) => {
            twin_of(Some(t), pending.iot_edge)
        }
        _ => pending.enrollment_twin,
    };
    Ok((assignment_plan(plan, pending.authentication, twin), response.payload))
}

/// The webhook URL as an enrollment sent to a webhook shows it: the query (which carries the function key)
/// masked, as Azure shows it.
fn masked_definition(definition: Option<&CustomAllocationDefinition>) -> Option<CustomAllocationDefinition> {
    definition.map(|d| CustomAllocationDefinition {
        webhook_url: match d.webhook_url.split_once('?') {
            Some((base, _)) => format!("{base}?****"),
            None => d.webhook_url.clone(),
        },
        api_version: d.api_version.clone(),
    })
}

/// Whether an enrollment serialized for a webhook of `api_version` carries fields of 2021-10-01.
fn has_2021_fields(definition: Option<&CustomAllocationDefinition>) -> bool {
    definition.is_none_or(|d| d.api_version.get(..10).is_some_and(|date| date >= "2021-10-01"))
}

/// An individual enrollment as a webhook sees it (spec §8.3): keys stripped (`{"type":"symmetricKey"}`),
/// no registration state, the webhook URL's query masked, serialized for the definition's api-version.
fn webhook_view_individual(
    e: &dps_proto::model::IndividualEnrollment,
    definition: Option<&CustomAllocationDefinition>,
) -> dps_proto::model::IndividualEnrollment {
    let mut e = e.clone();
    e.attestation.symmetric_key = None;
    e.registration_state = None;
    e.custom_allocation_definition = masked_definition(definition);
    if !has_2021_fields(definition) {
        e.optional_device_information = None;
    }
    e
}

/// An enrollment group as a webhook sees it; see [`webhook_view_individual`].
fn webhook_view_group(
    g: &dps_proto::model::EnrollmentGroup,
    definition: Option<&CustomAllocationDefinition>,
) -> dps_proto::model::EnrollmentGroup {
    let mut g = g.clone();
    g.attestation.symmetric_key = None;
    g.custom_allocation_definition = masked_definition(definition);
    g
}

/// The device-facing registration result of a record (spec §1.6); `with_issued_chain`: include the
/// certificate chain issued for the device's CSR (register and operation-status replies do, a status
/// lookup does not).
pub fn result_of(record: &RegistrationRecord, with_issued_chain: bool) -> DeviceRegistrationResult {
    let mut r = DeviceRegistrationResult::minimal(record.registration_id.as_str(), record.status);
    match record.status {
        RegistrationStatus::Assigned => {
            if record.x509.is_some() {
                r.x509 = record.x509.clone();
            } else {
                r.symmetric_key = record.enrollment.group_id().map(|g| SymmetricKeyRegistrationResult {
                    enrollment_group_id: Some(g.as_str().to_owned()),
                });
            }
            if with_issued_chain {
                r.issued_certificate_chain = record.issued_certificate_chain.clone();
            }
            r.created_date_time_utc = Some(record.created.to_iso());
            r.assigned_hub = record.assigned_hub.clone();
            r.device_id = record.device_id.clone();
            r.substatus = record.substatus;
            r.last_updated_date_time_utc = Some(record.last_updated.to_iso());
            r.etag = Some(record.etag.to_string());
            r.payload = record.payload.clone();
        }
        RegistrationStatus::Failed => {
            r.created_date_time_utc = Some(record.created.to_iso());
            r.error_code = record.error_code;
            r.error_message = record.error_message.clone();
            r.last_updated_date_time_utc = Some(record.last_updated.to_iso());
            r.etag = Some(record.etag.to_string());
        }
        _ => {}
    }
    r
}

/// FNV-1a of the registration key: the stable middle part of operation IDs.
fn partition_of(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}
