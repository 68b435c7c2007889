//! The service (data-plane management) API flow: enrollments, enrollment groups, registration states,
//! queries with continuation, bulk operations, ETag/If-Match, shared access policies (spec §5).
//!
//! All pure work (authorization, parsing, validation, key generation) happens when the flow is created;
//! the flow then performs its storage operations one by one and formats the reply.

use crate::audit::{AuditFilter, AuditOperation, AuditRecord, AuditTransport};
use crate::ca::{self, CaReference};
use crate::command::{Paging, Principal, ServiceCommand};
use crate::config::{EngineConfig, Rights};
use crate::flow::{Flow, Input, Step};
use crate::reply::Reply;
use crate::request::{unexpected_store_result, Nonces, ServiceRequest};
use crate::store::{
    continuation_token, parse_continuation_token, PageRequest, RegistrationRecord, StoreError, StoreOp,
    StoreResult, WriteCondition,
};
use dps_policy::{candidate_hubs, BillableOperation, MeterEvent};
use dps_proto::certificate::{CaCertificate, CertificateList, CertificateUpload, VerificationCertificate};
use dps_proto::model::{
    AllocationPolicy, AttestationMechanism, AttestationType, BulkEnrollmentGroupOperation,
    BulkEnrollmentOperation, BulkEnrollmentOperationError, BulkEnrollmentOperationResult, BulkOperationMode,
    CustomAllocationDefinition, DeviceCapabilities, DeviceRegistrationState, EnrollmentGroup,
    IndividualEnrollment, ProvisioningStatus, QuerySpecification, SymmetricKeyAttestation,
};
use dps_proto::query::{parse_query, Query, QuerySource};
use dps_proto::route::Route;
use dps_proto::sas::{SasToken, SymmetricKey};
use dps_proto::{
    DeviceId, DpsError, EnrollmentGroupId, ErrorCode, Etag, IfMatch, RegistrationId, Timestamp,
    MAX_BODY_BYTES,
};
use rand_core::RngCore;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;

/// Auto-generated symmetric keys are 64 bytes (spec §4.3).
const GENERATED_KEY_BYTES: usize = 64;
/// At most ten items per bulk operation (spec §5.4).
const MAX_BULK_ITEMS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Enrollment,
    Group,
    Certificate,
}

impl Kind {
    fn not_found(self) -> ErrorCode {
        match self {
            Kind::Enrollment => ErrorCode::EnrollmentNotFound,
            Kind::Group => ErrorCode::EnrollmentGroupNotFound,
            Kind::Certificate => ErrorCode::CertificateNotFound,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Enrollment => "enrollment",
            Kind::Group => "enrollment group",
            Kind::Certificate => "CA certificate",
        }
    }
}

/// How to turn the result of the single store operation into a reply.
#[derive(Debug, Clone)]
enum Then {
    Get(Kind, String),
    /// A create-or-replace; the flags name the symmetric-key slots (primary, secondary) kept from the
    /// stored item because the request left them out: the reply hides those, as a GET would, and shows
    /// only keys the caller sent or the service generated.
    Put(Kind, String, [bool; 2]),
    Delete(Kind, String),
    Attestation(Kind, String),
    Query(Kind, usize),
    GetRegistration(String),
    DeleteRegistration(String),
    QueryRegistrations(usize),
    /// Reply with the certificate the store answered; the flag shows its verification code.
    Certificate(String, bool),
    ListCertificates,
    QueryAudit(usize),
}

#[derive(Debug)]
struct BulkItem {
    id: String,
    op: StoreOp,
    /// When `op` reads the stored item first (see [`KeepKeys`]).
    keep: Option<KeepKeys>,
}

/// A prepared enrollment or group to write.
#[derive(Debug)]
enum Prepared {
    Enrollment(RegistrationId, Box<IndividualEnrollment>),
    /// A group, with the instance's symmetric-key group limit.
    Group(EnrollmentGroupId, Box<EnrollmentGroup>, Option<usize>),
}

impl Prepared {
    fn attestation(&self) -> &AttestationMechanism {
        match self {
            Prepared::Enrollment(_, e) => &e.attestation,
            Prepared::Group(_, g, _) => &g.attestation,
        }
    }

    fn put(self, condition: WriteCondition) -> StoreOp {
        match self {
            Prepared::Enrollment(_, enrollment) => StoreOp::PutEnrollment { enrollment, condition },
            Prepared::Group(_, group, max_symmetric_key_groups) => {
                StoreOp::PutGroup { group, condition, max_symmetric_key_groups }
            }
        }
    }

    fn get(&self) -> StoreOp {
        match self {
            Prepared::Enrollment(id, _) => StoreOp::GetEnrollment { registration_id: id.clone() },
            Prepared::Group(id, _, _) => StoreOp::GetGroup { group_id: id.clone() },
        }
    }

    /// The store operation for this write: the write itself, or — when the request left symmetric keys
    /// out — a read of the stored item first, whose keys the write then keeps.
    fn write(self, supplied: [bool; 2], condition: WriteCondition) -> (StoreOp, Option<KeepKeys>) {
        if supplied == [true, true] || self.attestation().kind != AttestationType::SymmetricKey {
            (self.put(condition), None)
        } else {
            (self.get(), Some(KeepKeys { item: self, supplied, condition }))
        }
    }
}

/// A replace whose body omitted symmetric keys (as a GET → modify → PUT does, since GET hides them): the
/// stored item is read first and its keys kept, so existing devices are not locked out. Keys are generated
/// only for a new item.
#[derive(Debug)]
struct KeepKeys {
    item: Prepared,
    supplied: [bool; 2],
    condition: WriteCondition,
}

impl KeepKeys {
    /// The write, given the stored item (`Err(None)`: the store answered with the wrong kind of result).
    ///
    /// A read-modify-write never loses an update: a request without `If-Match` writes with `If-Match` of
    /// the ETag it read (or create-only when nothing was stored), so a writer that changed the item in
    /// between makes this write fail (reported as `409` "changed concurrently"; see [`guard_result`])
    /// instead of being overwritten with keys from a stale read.
    fn into_put(
        self,
        stored: Result<StoreResult, StoreError>,
    ) -> Result<(StoreOp, bool, [bool; 2]), Option<StoreError>> {
        let KeepKeys { item, supplied, condition } = self;
        let mut kept = [false; 2];
        let read_etag = |etag: Option<&String>| etag.map(|e| IfMatch::parse(e));
        let (item, stored_etag) = match (item, stored) {
            (Prepared::Enrollment(id, mut e), Ok(StoreResult::Enrollment(stored))) => {
                let etag = stored.as_ref().map(|s| read_etag(s.etag.as_ref()));
                if let Some(stored) = stored {
                    kept = keep_stored_keys(&mut e.attestation, &stored.attestation, supplied);
                }
                (Prepared::Enrollment(id, e), etag)
            }
            (Prepared::Group(id, mut g, limit), Ok(StoreResult::Group(stored))) => {
                let etag = stored.as_ref().map(|s| read_etag(s.etag.as_ref()));
                if let Some(stored) = stored {
                    kept = keep_stored_keys(&mut g.attestation, &stored.attestation, supplied);
                }
                (Prepared::Group(id, g, limit), etag)
            }
            (_, Err(e)) => return Err(Some(e)),
            (_, Ok(_)) => return Err(None),
        };
        let (condition, guarded) = match (condition, stored_etag) {
            (WriteCondition::Upsert, None) => (WriteCondition::CreateOnly, true),
            (WriteCondition::Upsert, Some(Some(Ok(etag)))) => (WriteCondition::IfMatch(etag), true),
            (condition, _) => (condition, false),
        };
        Ok((item.put(condition), guarded, kept))
    }
}

#[derive(Debug)]
enum Job {
    Reply(Reply),
    One(Option<StoreOp>, Then),
    /// A write that first reads the stored item to keep its keys (see [`KeepKeys`]).
    KeepKeys {
        get: Option<StoreOp>,
        keep: KeepKeys,
        then: Then,
    },
    Bulk {
        kind: Kind,
        items: VecDeque<BulkItem>,
        current: Option<(String, Option<KeepKeys>)>,
        errors: Vec<BulkEnrollmentOperationError>,
        /// The write in flight is the guarded half of a read-modify-write.
        guarded: bool,
    },
    /// The guarded write of a read-modify-write is in flight (see [`KeepKeys::into_put`]).
    Guarded(Then),
    /// A CA-certificate write that reads the stored certificate first.
    CertificateRead {
        get: Option<StoreOp>,
        plan: CertificatePlan,
    },
    /// An enrollment or group write naming CA certificates: the uploaded certificates are listed first,
    /// and `next` runs only if every reference exists.
    CheckCaReferences {
        list: Option<StoreOp>,
        references: Vec<CaReference>,
        next: Box<Job>,
    },
    Done,
}

/// What to write once the stored CA certificate is read (everything random was drawn when planning).
#[derive(Debug)]
enum CertificatePlan {
    /// Create or replace.
    Put { name: String, der: Vec<u8>, is_verified: bool, if_match: Option<IfMatch>, etag: Etag, limit: usize },
    /// A new verification code.
    GenerateCode { name: String, if_match: IfMatch, code: String, etag: Etag },
    /// A proof of possession.
    Verify { name: String, if_match: IfMatch, proof: Vec<u8>, etag: Etag },
}

impl CertificatePlan {
    fn name(&self) -> &str {
        match self {
            CertificatePlan::Put { name, .. }
            | CertificatePlan::GenerateCode { name, .. }
            | CertificatePlan::Verify { name, .. } => name,
        }
    }
}

/// A service API request in progress.
#[derive(Debug)]
pub struct ServiceFlow {
    now: Timestamp,
    tracking_id: String,
    billable: Option<BillableOperation>,
    job: Job,
    /// Set for a write command (see [`crate::audit`]); `None` for reads.
    audit: Option<Audit>,
}

/// The audit state of a write command: every write it performs goes out as [`StoreOp::Audited`], and a
/// refusal is appended ([`StoreOp::AppendAudit`]) before it is answered.
#[derive(Debug)]
struct Audit {
    principal: String,
    transport: AuditTransport,
    operation: AuditOperation,
    /// The items the command names (what a refusal of the whole command is recorded against).
    targets: Vec<String>,
    /// An audited write is in flight.
    writing: bool,
    /// A write of this command was committed, with its record.
    committed: bool,
    /// The bulk items refused one by one: `(id, six-digit code)`.
    item_refusals: Vec<(String, u32)>,
    /// A refusal reply held back until its records are appended.
    held: Option<Reply>,
}

impl Audit {
    fn new(
        principal: &Principal,
        transport: AuditTransport,
        (operation, targets): (AuditOperation, Vec<String>),
    ) -> Audit {
        Audit {
            principal: principal.name().to_owned(),
            transport,
            operation,
            targets,
            writing: false,
            committed: false,
            item_refusals: Vec::new(),
            held: None,
        }
    }

    fn record(
        &self,
        now: Timestamp,
        tracking_id: &str,
        target: &str,
        status: u16,
        code: Option<u32>,
    ) -> AuditRecord {
        AuditRecord {
            sequence: 0,
            time: now,
            principal: self.principal.clone(),
            transport: self.transport,
            operation: self.operation,
            target: target.to_owned(),
            etag_before: None,
            etag_after: None,
            status,
            error_code: code,
            tracking_id: tracking_id.to_owned(),
        }
    }

    /// The records of the refusals a reply reports: the whole command (an error reply, when nothing was
    /// written), or the refused items of a bulk operation.
    fn refusals(&mut self, now: Timestamp, reply: &Reply) -> Vec<AuditRecord> {
        if reply.status >= 400 {
            if self.committed {
                return Vec::new();
            }
            let code = reply.error_code.map(|c| c.code());
            let mut targets = std::mem::take(&mut self.targets);
            if targets.is_empty() {
                targets.push(String::new());
            }
            return targets
                .iter()
                .map(|t| self.record(now, &reply.tracking_id, t, reply.status, code))
                .collect();
        }
        std::mem::take(&mut self.item_refusals)
            .iter()
            .map(|(id, code)| {
                let status = u16::try_from(code / 1000).unwrap_or(500);
                self.record(now, &reply.tracking_id, id, status, Some(*code))
            })
            .collect()
    }
}

/// The audited operation of a write command and the items it names (`None` for a read).
fn audit_of_command(command: &ServiceCommand) -> Option<(AuditOperation, Vec<String>)> {
    use AuditOperation as O;
    use ServiceCommand as C;
    Some(match command {
        C::PutEnrollment { enrollment, .. } => (O::EnrollmentPut, vec![enrollment.registration_id.clone()]),
        C::DeleteEnrollment { registration_id, .. } => {
            (O::EnrollmentDelete, vec![registration_id.as_str().to_owned()])
        }
        C::PutGroup { group, .. } => (O::GroupPut, vec![group.enrollment_group_id.clone()]),
        C::DeleteGroup { group_id, .. } => (O::GroupDelete, vec![group_id.as_str().to_owned()]),
        C::DeleteRegistration { registration_id, .. } => {
            (O::RegistrationDelete, vec![registration_id.as_str().to_owned()])
        }
        C::BulkEnrollments(b) => {
            (O::BulkEnrollments, b.enrollments.iter().map(|e| e.registration_id.clone()).collect())
        }
        C::BulkGroups(b) => {
            (O::BulkGroups, b.enrollment_groups.iter().map(|g| g.enrollment_group_id.clone()).collect())
        }
        C::PutCertificate { name, .. } => (O::CertificatePut, vec![name.clone()]),
        C::DeleteCertificate { name, .. } => (O::CertificateDelete, vec![name.clone()]),
        C::GenerateVerificationCode { name, .. } => {
            (O::CertificateGenerateVerificationCode, vec![name.clone()])
        }
        C::VerifyCertificate { name, .. } => (O::CertificateVerify, vec![name.clone()]),
        C::GetEnrollment { .. }
        | C::GetEnrollmentAttestation { .. }
        | C::QueryEnrollments { .. }
        | C::GetGroup { .. }
        | C::GetGroupAttestation { .. }
        | C::QueryGroups { .. }
        | C::GetRegistration { .. }
        | C::QueryRegistrations { .. }
        | C::GetCertificate { .. }
        | C::ListCertificates
        | C::QueryAudit { .. } => return None,
    })
}

/// The audited operation of a write route and the item its path names (before the body is read).
fn audit_of_route(route: &Route) -> Option<(AuditOperation, Vec<String>)> {
    use AuditOperation as O;
    let one = |op, id: &str| Some((op, vec![id.to_owned()]));
    match route {
        Route::PutEnrollment { id } => one(O::EnrollmentPut, id.as_str()),
        Route::DeleteEnrollment { id } => one(O::EnrollmentDelete, id.as_str()),
        Route::PutEnrollmentGroup { id } => one(O::GroupPut, id.as_str()),
        Route::DeleteEnrollmentGroup { id } => one(O::GroupDelete, id.as_str()),
        Route::DeleteRegistration { id } => one(O::RegistrationDelete, id.as_str()),
        Route::BulkEnrollments => Some((O::BulkEnrollments, Vec::new())),
        Route::BulkEnrollmentGroups => Some((O::BulkGroups, Vec::new())),
        Route::PutCertificate { name } => one(O::CertificatePut, name),
        Route::DeleteCertificate { name } => one(O::CertificateDelete, name),
        Route::GenerateVerificationCode { name } => one(O::CertificateGenerateVerificationCode, name),
        Route::VerifyCertificate { name } => one(O::CertificateVerify, name),
        _ => None,
    }
}

fn billable_of(route: &Route) -> Option<BillableOperation> {
    use BillableOperation as B;
    Some(match route {
        Route::GetEnrollment { .. } => B::EnrollmentGet,
        Route::PutEnrollment { .. } => B::EnrollmentCreateOrUpdate,
        Route::DeleteEnrollment { .. } => B::EnrollmentDelete,
        Route::EnrollmentAttestation { .. } => B::EnrollmentGetAttestationMechanism,
        Route::BulkEnrollments => B::EnrollmentBulk,
        Route::QueryEnrollments => B::EnrollmentQuery,
        Route::GetEnrollmentGroup { .. } => B::EnrollmentGroupGet,
        Route::PutEnrollmentGroup { .. } => B::EnrollmentGroupCreateOrUpdate,
        Route::DeleteEnrollmentGroup { .. } => B::EnrollmentGroupDelete,
        Route::EnrollmentGroupAttestation { .. } => B::EnrollmentGroupGetAttestationMechanism,
        Route::BulkEnrollmentGroups => B::EnrollmentGroupBulk,
        Route::QueryEnrollmentGroups => B::EnrollmentGroupQuery,
        Route::GetRegistration { .. } => B::RegistrationStateGet,
        Route::DeleteRegistration { .. } => B::RegistrationStateDelete,
        Route::QueryRegistrations { .. } => B::RegistrationStateQuery,
        _ => return None,
    })
}

fn rights_of(route: &Route) -> Rights {
    match route {
        Route::GetEnrollment { .. }
        | Route::EnrollmentAttestation { .. }
        | Route::QueryEnrollments
        | Route::GetEnrollmentGroup { .. }
        | Route::EnrollmentGroupAttestation { .. }
        | Route::QueryEnrollmentGroups => Rights::ENROLLMENT_READ,
        Route::PutEnrollment { .. }
        | Route::DeleteEnrollment { .. }
        | Route::BulkEnrollments
        | Route::PutEnrollmentGroup { .. }
        | Route::DeleteEnrollmentGroup { .. }
        | Route::BulkEnrollmentGroups => Rights::ENROLLMENT_WRITE,
        Route::GetRegistration { .. } | Route::QueryRegistrations { .. } => Rights::REGISTRATION_STATUS_READ,
        Route::DeleteRegistration { .. } => Rights::REGISTRATION_STATUS_WRITE,
        Route::PutCertificate { .. }
        | Route::GetCertificate { .. }
        | Route::ListCertificates
        | Route::DeleteCertificate { .. }
        | Route::GenerateVerificationCode { .. }
        | Route::VerifyCertificate { .. }
        | Route::QueryAudit { .. } => Rights::SERVICE_CONFIG,
        _ => Rights::ALL,
    }
}

/// Verifies a service SAS token against the configured shared access policies and the rights a route needs.
pub fn authorize(
    config: &EngineConfig,
    now: Timestamp,
    authorization: Option<&str>,
    path: &str,
    needed: Rights,
) -> Result<Principal, DpsError> {
    let principal = authenticate(config, now, authorization, path)?;
    check_rights(&principal, needed)?;
    Ok(principal)
}

/// Verifies a service SAS token (`Authorization` of a request to `path`) against the configured shared
/// access policies and returns the [`Principal`] of the policy that signed it.
pub fn authenticate(
    config: &EngineConfig,
    now: Timestamp,
    authorization: Option<&str>,
    path: &str,
) -> Result<Principal, DpsError> {
    let auth = authorization.ok_or_else(|| {
        DpsError::with_message(ErrorCode::MalformedToken, "The request has no Authorization header.")
    })?;
    let token = SasToken::parse(auth)?;
    let name = token.key_name().ok_or_else(|| {
        DpsError::with_message(ErrorCode::Unauthorized, "The SAS token names no shared access policy (skn).")
    })?;
    let policy =
        config.access_policies.iter().find(|p| p.key_name.eq_ignore_ascii_case(name)).ok_or_else(|| {
            DpsError::with_message(ErrorCode::Unauthorized, format!("Unknown shared access policy '{name}'."))
        })?;
    let target = format!("{}{}", config.service_host_name, path);
    token.verify(now, &target, &[&policy.primary_key, &policy.secondary_key])?;
    Ok(Principal::granted(policy.key_name.clone(), policy.rights))
}

fn check_rights(principal: &Principal, needed: Rights) -> Result<(), DpsError> {
    if !principal.rights().contains(needed) {
        return Err(DpsError::with_message(
            ErrorCode::InsufficientRights,
            format!(
                "The policy '{}' has rights [{}] but this operation needs [{}].",
                principal.name(),
                principal.rights().names().join(", "),
                needed.names().join(", ")
            ),
        ));
    }
    Ok(())
}

/// Turns an HTTP service request (route, headers, JSON body) into a typed command, with the same errors
/// the HTTP API has always given (`400001` bad JSON, `400003` path/body ID mismatch, bad paging header).
fn command_of(request: ServiceRequest) -> Result<ServiceCommand, DpsError> {
    use ServiceCommand as C;
    let if_match = parse_if_match(request.if_match.as_deref())?;
    let body = request.body.as_slice();
    let paging = || -> Result<Paging, DpsError> {
        let max_items = match request.max_item_count.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(s.parse::<usize>().map_err(|_| {
                DpsError::with_message(
                    ErrorCode::BadRequest,
                    format!("x-ms-max-item-count '{s}' is not a positive integer."),
                )
            })?),
        };
        Ok(Paging { max_items, continuation: request.continuation.clone() })
    };
    let query = || -> Result<String, DpsError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            Ok(String::new())
        } else {
            Ok(parse_json::<QuerySpecification>(body, "query specification")?.query)
        }
    };
    Ok(match request.route {
        Route::GetEnrollment { id } => C::GetEnrollment { registration_id: id },
        Route::PutEnrollment { id } => {
            let e = parse_json::<IndividualEnrollment>(body, "individual enrollment")?;
            let body_id = RegistrationId::parse(&e.registration_id)?;
            if body_id != id {
                return Err(DpsError::with_message(
                    ErrorCode::RegistrationIdMismatch,
                    format!(
                        "The body's registrationId '{body_id}' does not match '{id}' in the request address."
                    ),
                ));
            }
            C::PutEnrollment { enrollment: Box::new(e), if_match }
        }
        Route::DeleteEnrollment { id } => C::DeleteEnrollment { registration_id: id, if_match },
        Route::EnrollmentAttestation { id } => C::GetEnrollmentAttestation { registration_id: id },
        Route::QueryEnrollments => {
            let paging = paging()?;
            C::QueryEnrollments { query: query()?, paging }
        }
        Route::GetEnrollmentGroup { id } => C::GetGroup { group_id: id },
        Route::PutEnrollmentGroup { id } => {
            let g = parse_json::<EnrollmentGroup>(body, "enrollment group")?;
            let body_id = EnrollmentGroupId::parse(&g.enrollment_group_id)?;
            if body_id != id {
                return Err(DpsError::with_message(
                    ErrorCode::RegistrationIdMismatch,
                    format!("The body's enrollmentGroupId '{body_id}' does not match '{id}' in the request address."),
                ));
            }
            C::PutGroup { group: Box::new(g), if_match }
        }
        Route::DeleteEnrollmentGroup { id } => C::DeleteGroup { group_id: id, if_match },
        Route::EnrollmentGroupAttestation { id } => C::GetGroupAttestation { group_id: id },
        Route::QueryEnrollmentGroups => {
            let paging = paging()?;
            C::QueryGroups { query: query()?, paging }
        }
        Route::GetRegistration { id } => C::GetRegistration { registration_id: id },
        Route::DeleteRegistration { id } => C::DeleteRegistration { registration_id: id, if_match },
        Route::QueryRegistrations { group_id } => C::QueryRegistrations { group_id, paging: paging()? },
        Route::BulkEnrollments => {
            C::BulkEnrollments(parse_json::<BulkEnrollmentOperation>(body, "bulk enrollment operation")?)
        }
        Route::BulkEnrollmentGroups => C::BulkGroups(parse_json::<BulkEnrollmentGroupOperation>(
            body,
            "bulk enrollment group operation",
        )?),
        Route::PutCertificate { name } => {
            let (text, is_verified) =
                parse_json::<CertificateUpload>(body, "certificate upload")?.into_parts();
            let certificate_text = text.ok_or_else(|| {
                ca::invalid_ca("The body has no certificate (properties.certificate, PEM or base64 DER).")
            })?;
            C::PutCertificate { name, certificate_text, is_verified, if_match }
        }
        Route::GetCertificate { name } => C::GetCertificate { name },
        Route::ListCertificates => C::ListCertificates,
        Route::DeleteCertificate { name } => C::DeleteCertificate { name, if_match },
        Route::GenerateVerificationCode { name } => C::GenerateVerificationCode {
            name,
            if_match: required_if_match(if_match, "generateVerificationCode")?,
        },
        Route::VerifyCertificate { name } => {
            let if_match = required_if_match(if_match, "verify")?;
            let proof = parse_json::<VerificationCertificate>(body, "verification certificate body")?;
            C::VerifyCertificate { name, if_match, certificate_text: proof.certificate }
        }
        Route::QueryAudit { since, until, principal, target, operation } => {
            let time = |name: &str, value: Option<String>| -> Result<Option<Timestamp>, DpsError> {
                value
                    .map(|v| {
                        Timestamp::parse_iso(&v).ok_or_else(|| {
                            DpsError::with_message(
                                ErrorCode::BadRequest,
                                format!("{name} '{v}' is not an RFC 3339 time (e.g. 2024-01-31T12:00:00Z)."),
                            )
                        })
                    })
                    .transpose()
            };
            let operation = operation
                .map(|o| {
                    AuditOperation::parse(&o).ok_or_else(|| {
                        DpsError::with_message(
                            ErrorCode::BadRequest,
                            format!("'{o}' is not an audited operation."),
                        )
                    })
                })
                .transpose()?;
            let filter = AuditFilter {
                since: time("since", since)?,
                until: time("until", until)?,
                principal,
                target,
                operation,
            };
            C::QueryAudit { filter, paging: paging()? }
        }
        _ => return Err(DpsError::with_message(ErrorCode::NotFound, "not a service API route")),
    })
}

fn required_if_match(if_match: Option<IfMatch>, operation: &str) -> Result<IfMatch, DpsError> {
    if_match.ok_or_else(|| {
        DpsError::with_message(
            ErrorCode::PreconditionFailed,
            format!("{operation} needs an If-Match header with the certificate's ETag (or *)."),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, DpsError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DpsError::with_message(
            ErrorCode::PayloadTooLarge,
            format!("The request body is {} bytes; the limit is {MAX_BODY_BYTES}.", body.len()),
        ));
    }
    dps_proto::strict::from_slice(body).map_err(|e| {
        DpsError::with_message(ErrorCode::InvalidJson, format!("The body is not a valid {what}: {e}"))
    })
}

fn parse_if_match(value: Option<&str>) -> Result<Option<IfMatch>, DpsError> {
    value.map(IfMatch::parse).transpose()
}

fn invalid(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::InvalidEnrollment, message)
}

/// The oldest api-version a custom allocation webhook may ask the enrollment in (spec §8.3).
const MIN_WEBHOOK_API_VERSION: &str = "2018-09-01";

/// Checks a `customAllocationDefinition`: an absolute `https://` URL with a host (`http://` only when the
/// instance allows insecure webhooks), at most 2048 characters, and a well-formed api-version no older
/// than 2018-09-01-preview.
fn check_custom_definition(config: &EngineConfig, d: &CustomAllocationDefinition) -> Result<(), DpsError> {
    let url = d.webhook_url.as_str();
    if url.len() > 2048 {
        return Err(invalid(format!(
            "customAllocationDefinition.webhookUrl is {} characters; the limit is 2048.",
            url.len()
        )));
    }
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://").filter(|_| config.insecure_webhooks) {
        rest
    } else {
        return Err(invalid(if url.starts_with("http://") {
            "customAllocationDefinition.webhookUrl must be an https:// URL (this service does not allow \
             http:// webhooks)."
        } else {
            "customAllocationDefinition.webhookUrl must be an absolute https:// URL."
        }));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty()
        || authority.contains('@')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "customAllocationDefinition.webhookUrl needs a host name, no user information and no whitespace.",
        ));
    }
    let version = dps_proto::ApiVersion::parse(&d.api_version)
        .map_err(|e| invalid(format!("customAllocationDefinition.apiVersion: {}", e.message)))?;
    if version.date() < MIN_WEBHOOK_API_VERSION {
        return Err(invalid(format!(
            "customAllocationDefinition.apiVersion '{}' is older than 2018-09-01-preview, the first version \
             with custom allocation.",
            d.api_version
        )));
    }
    Ok(())
}

/// Validates the shared enrollment settings and fills in generated keys and defaults.
#[allow(clippy::too_many_arguments)]
fn prepare_common(
    config: &EngineConfig,
    kind: Kind,
    attestation: &mut AttestationMechanism,
    allocation: Option<AllocationPolicy>,
    iot_hubs: Option<&[String]>,
    iot_hub_host_name: Option<&str>,
    custom: Option<&CustomAllocationDefinition>,
    rng: &mut dyn RngCore,
) -> Result<Vec<CaReference>, DpsError> {
    let mut references = Vec::new();
    match attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = attestation.symmetric_key.get_or_insert_with(SymmetricKeyAttestation::default);
            for slot in [&mut keys.primary_key, &mut keys.secondary_key] {
                match slot.as_deref() {
                    Some(k) if !k.is_empty() => {
                        SymmetricKey::parse(k)?;
                    }
                    _ => {
                        let mut bytes = vec![0u8; GENERATED_KEY_BYTES];
                        rng.fill_bytes(&mut bytes);
                        *slot = Some(SymmetricKey::from_bytes(bytes).to_base64());
                    }
                }
            }
            attestation.tpm = None;
            attestation.x509 = None;
        }
        AttestationType::X509 => references = ca::prepare_x509(attestation, kind == Kind::Group)?,
        AttestationType::Tpm if kind == Kind::Group => {
            return Err(invalid("tpm is not a supported attestation type for group enrollments."))
        }
        other => {
            return Err(invalid(format!(
                "The attestation type '{}' is not supported by this service yet; use symmetricKey or x509.",
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )))
        }
    }
    let policy = allocation.unwrap_or(config.default_allocation);
    if let Some(definition) = custom {
        check_custom_definition(config, definition)?;
    } else if policy == AllocationPolicy::Custom && !config.allocation_hook {
        return Err(invalid(
            "allocationPolicy 'custom' needs a customAllocationDefinition with the webhookUrl and apiVersion \
             of the allocation webhook.",
        ));
    }
    let explicit =
        iot_hubs.is_some_and(|h| !h.is_empty()) || iot_hub_host_name.is_some_and(|h| !h.is_empty());
    if explicit || policy == AllocationPolicy::Static {
        let candidates = candidate_hubs(&config.linked_hubs, iot_hubs, iot_hub_host_name)
            .map(|c| c.len())
            .map_err(|e| invalid(e.message))?;
        if policy == AllocationPolicy::Static && candidates != 1 {
            return Err(invalid("Static allocation needs exactly one IoT hub in iotHubs."));
        }
    }
    Ok(references)
}

fn prepare_enrollment(
    config: &EngineConfig,
    now: Timestamp,
    rng: &mut dyn RngCore,
    mut e: IndividualEnrollment,
    path_id: Option<&RegistrationId>,
) -> Result<(RegistrationId, IndividualEnrollment, Vec<CaReference>), DpsError> {
    let id = RegistrationId::parse(&e.registration_id)?;
    if let Some(p) = path_id {
        if p != &id {
            return Err(DpsError::with_message(
                ErrorCode::RegistrationIdMismatch,
                format!("The body's registrationId '{id}' does not match '{p}' in the request address."),
            ));
        }
    }
    if let Some(d) = e.device_id.as_deref().filter(|d| !d.is_empty()) {
        DeviceId::parse(d)?;
    }
    let references = prepare_common(
        config,
        Kind::Enrollment,
        &mut e.attestation,
        e.allocation_policy,
        e.iot_hubs.as_deref(),
        e.iot_hub_host_name.as_deref(),
        e.custom_allocation_definition.as_ref(),
        rng,
    )?;
    e.registration_state = None;
    e.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    e.capabilities.get_or_insert(DeviceCapabilities::default());
    e.etag = Some(new_etag(rng).to_string());
    e.created_date_time_utc = Some(now.to_iso());
    e.last_updated_date_time_utc = Some(now.to_iso());
    Ok((id, e, references))
}

fn prepare_group(
    config: &EngineConfig,
    now: Timestamp,
    rng: &mut dyn RngCore,
    mut g: EnrollmentGroup,
    path_id: Option<&EnrollmentGroupId>,
) -> Result<(EnrollmentGroupId, EnrollmentGroup, Vec<CaReference>), DpsError> {
    let id = EnrollmentGroupId::parse(&g.enrollment_group_id)?;
    if let Some(p) = path_id {
        if p != &id {
            return Err(DpsError::with_message(
                ErrorCode::RegistrationIdMismatch,
                format!("The body's enrollmentGroupId '{id}' does not match '{p}' in the request address."),
            ));
        }
    }
    let references = prepare_common(
        config,
        Kind::Group,
        &mut g.attestation,
        g.allocation_policy,
        g.iot_hubs.as_deref(),
        g.iot_hub_host_name.as_deref(),
        g.custom_allocation_definition.as_ref(),
        rng,
    )?;
    g.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    g.capabilities.get_or_insert(DeviceCapabilities::default());
    g.etag = Some(new_etag(rng).to_string());
    g.created_date_time_utc = Some(now.to_iso());
    g.last_updated_date_time_utc = Some(now.to_iso());
    Ok((id, g, references))
}

fn new_etag(rng: &mut dyn RngCore) -> Etag {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    Etag::generate(b)
}

/// The service view of a registration record.
pub fn registration_state_of(r: &RegistrationRecord) -> DeviceRegistrationState {
    DeviceRegistrationState {
        registration_id: r.registration_id.as_str().to_owned(),
        created_date_time_utc: Some(r.created.to_iso()),
        assigned_hub: r.assigned_hub.clone(),
        device_id: r.device_id.clone(),
        status: r.status,
        substatus: r.substatus,
        error_code: r.error_code,
        error_message: r.error_message.clone(),
        last_updated_date_time_utc: Some(r.last_updated.to_iso()),
        etag: Some(r.etag.to_string()),
        payload: r.payload.clone(),
    }
}

fn hide_enrollment_secrets(mut e: IndividualEnrollment) -> IndividualEnrollment {
    e.attestation = e.attestation.without_secrets();
    e
}

fn hide_group_secrets(mut g: EnrollmentGroup) -> EnrollmentGroup {
    g.attestation = g.attestation.without_secrets();
    g
}

impl ServiceFlow {
    pub(crate) fn new(
        config: Arc<EngineConfig>,
        now: Timestamp,
        rng: &mut dyn RngCore,
        request: ServiceRequest,
    ) -> ServiceFlow {
        let tracking_id = Nonces::draw(rng).tracking_id();
        let billable = billable_of(&request.route);
        let mut audit = None;
        let job = match Self::plan(&config, now, rng, request, &mut audit) {
            Ok(job) => job,
            Err(e) => Job::Reply(Reply::error(&e, tracking_id.clone(), now)),
        };
        ServiceFlow { now, tracking_id, billable, job, audit }
    }

    pub(crate) fn from_command(
        config: Arc<EngineConfig>,
        now: Timestamp,
        rng: &mut dyn RngCore,
        principal: &Principal,
        command: ServiceCommand,
    ) -> ServiceFlow {
        let tracking_id = Nonces::draw(rng).tracking_id();
        let billable = command.billable();
        let audit = audit_of_command(&command).map(|a| Audit::new(principal, AuditTransport::InProcess, a));
        let job = match Self::plan_command(&config, now, rng, principal, command) {
            Ok(job) => job,
            Err(e) => Job::Reply(Reply::error(&e, tracking_id.clone(), now)),
        };
        ServiceFlow { now, tracking_id, billable, job, audit }
    }

    fn page(config: &EngineConfig, paging: &Paging) -> Result<(usize, Option<String>), DpsError> {
        let size = match paging.max_items {
            None | Some(0) => config.default_page_size,
            Some(n) => n.min(config.max_page_size),
        };
        let after = match paging.continuation.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(t) => Some(parse_continuation_token(t).ok_or_else(|| {
                DpsError::with_message(ErrorCode::BadRequest, "The x-ms-continuation token is not valid.")
            })?),
        };
        Ok((size, after))
    }

    fn query_of(text: &str, source: QuerySource) -> Result<Query, DpsError> {
        let q = parse_query(text, source)?;
        if q.source != source {
            return Err(DpsError::with_message(
                ErrorCode::InvalidQuery,
                "The query's FROM source does not match the resource it was sent to.",
            ));
        }
        Ok(q)
    }

    /// The HTTP adapter: verifies the SAS token into a [`Principal`], checks the route's rights (before the
    /// body is looked at), turns route + headers + body into a [`ServiceCommand`] and plans it.
    ///
    /// A write route is audited from the moment its principal is known (`audit` is set then): a request
    /// whose SAS token does not verify names no principal and is not audited.
    fn plan(
        config: &EngineConfig,
        now: Timestamp,
        rng: &mut dyn RngCore,
        request: ServiceRequest,
        audit: &mut Option<Audit>,
    ) -> Result<Job, DpsError> {
        if request.route.is_device_api() {
            return Err(DpsError::with_message(ErrorCode::NotFound, "not a service API route"));
        }
        let principal = authenticate(config, now, request.authorization.as_deref(), &request.path)?;
        *audit = audit_of_route(&request.route).map(|a| Audit::new(&principal, AuditTransport::Https, a));
        check_rights(&principal, rights_of(&request.route))?;
        let command = command_of(request)?;
        if let (Some(audit), Some((_, targets))) = (audit.as_mut(), audit_of_command(&command)) {
            audit.targets = targets;
        }
        Self::plan_command(config, now, rng, &principal, command)
    }

    /// Plans a typed command under a principal: all pure work (rights, validation, key generation) happens
    /// here; the job then performs its store operations.
    fn plan_command(
        config: &EngineConfig,
        now: Timestamp,
        rng: &mut dyn RngCore,
        principal: &Principal,
        command: ServiceCommand,
    ) -> Result<Job, DpsError> {
        use ServiceCommand as C;
        check_rights(principal, command.rights())?;
        let condition = |if_match: &Option<IfMatch>| {
            if_match.clone().map(WriteCondition::IfMatch).unwrap_or(WriteCondition::Upsert)
        };
        Ok(match command {
            C::GetEnrollment { registration_id: id } => Job::One(
                Some(StoreOp::GetEnrollment { registration_id: id.clone() }),
                Then::Get(Kind::Enrollment, id.to_string()),
            ),
            C::PutEnrollment { enrollment, if_match } => {
                let supplied = supplied_keys(&enrollment.attestation);
                let (id, e, references) = prepare_enrollment(config, now, rng, *enrollment, None)?;
                let then = Then::Put(Kind::Enrollment, id.to_string(), [false; 2]);
                let job =
                    single_write(Prepared::Enrollment(id, Box::new(e)), supplied, condition(&if_match), then);
                check_references_first(references, job)
            }
            C::DeleteEnrollment { registration_id: id, if_match } => Job::One(
                Some(StoreOp::DeleteEnrollment { registration_id: id.clone(), if_match }),
                Then::Delete(Kind::Enrollment, id.to_string()),
            ),
            C::GetEnrollmentAttestation { registration_id: id } => Job::One(
                Some(StoreOp::GetEnrollment { registration_id: id.clone() }),
                Then::Attestation(Kind::Enrollment, id.to_string()),
            ),
            C::QueryEnrollments { query, paging } => {
                let (size, after) = Self::page(config, &paging)?;
                let query = Self::query_of(&query, QuerySource::Enrollments)?;
                Job::One(
                    Some(StoreOp::QueryEnrollments { query, page: PageRequest { after, limit: size } }),
                    Then::Query(Kind::Enrollment, size),
                )
            }
            C::GetGroup { group_id: id } => Job::One(
                Some(StoreOp::GetGroup { group_id: id.clone() }),
                Then::Get(Kind::Group, id.to_string()),
            ),
            C::PutGroup { group, if_match } => {
                let supplied = supplied_keys(&group.attestation);
                let (id, g, references) = prepare_group(config, now, rng, *group, None)?;
                let then = Then::Put(Kind::Group, id.to_string(), [false; 2]);
                let limit = Some(config.max_symmetric_key_groups);
                let job = single_write(
                    Prepared::Group(id, Box::new(g), limit),
                    supplied,
                    condition(&if_match),
                    then,
                );
                check_references_first(references, job)
            }
            C::DeleteGroup { group_id: id, if_match } => Job::One(
                Some(StoreOp::DeleteGroup { group_id: id.clone(), if_match }),
                Then::Delete(Kind::Group, id.to_string()),
            ),
            C::GetGroupAttestation { group_id: id } => Job::One(
                Some(StoreOp::GetGroup { group_id: id.clone() }),
                Then::Attestation(Kind::Group, id.to_string()),
            ),
            C::QueryGroups { query, paging } => {
                let (size, after) = Self::page(config, &paging)?;
                let query = Self::query_of(&query, QuerySource::EnrollmentGroups)?;
                Job::One(
                    Some(StoreOp::QueryGroups { query, page: PageRequest { after, limit: size } }),
                    Then::Query(Kind::Group, size),
                )
            }
            C::GetRegistration { registration_id: id } => Job::One(
                Some(StoreOp::GetRegistration { registration_id: id.clone() }),
                Then::GetRegistration(id.to_string()),
            ),
            C::DeleteRegistration { registration_id: id, if_match } => Job::One(
                Some(StoreOp::DeleteRegistration { registration_id: id.clone(), if_match }),
                Then::DeleteRegistration(id.to_string()),
            ),
            C::QueryRegistrations { group_id, paging } => {
                let (size, after) = Self::page(config, &paging)?;
                Job::One(
                    Some(StoreOp::QueryRegistrations { group_id, page: PageRequest { after, limit: size } }),
                    Then::QueryRegistrations(size),
                )
            }
            C::BulkEnrollments(bulk) => {
                let mode = bulk.mode;
                let mut references = Vec::new();
                let job = bulk_job(
                    Kind::Enrollment,
                    bulk.enrollments,
                    |e| e.registration_id.clone(),
                    |e| {
                        let condition = bulk_condition(mode, e.etag.as_deref())?;
                        if mode == BulkOperationMode::Delete {
                            let registration_id = RegistrationId::parse(&e.registration_id)?;
                            let if_match = item_if_match(&e.etag)?;
                            return Ok((StoreOp::DeleteEnrollment { registration_id, if_match }, None));
                        }
                        let supplied = supplied_keys(&e.attestation);
                        let (id, e, refs) = prepare_enrollment(config, now, rng, e, None)?;
                        references.extend(refs);
                        Ok(Prepared::Enrollment(id, Box::new(e)).write(supplied, condition))
                    },
                )?;
                check_references_first(references, job)
            }
            C::BulkGroups(bulk) => {
                let mode = bulk.mode;
                let mut references = Vec::new();
                let job = bulk_job(
                    Kind::Group,
                    bulk.enrollment_groups,
                    |g| g.enrollment_group_id.clone(),
                    |g| {
                        let condition = bulk_condition(mode, g.etag.as_deref())?;
                        if mode == BulkOperationMode::Delete {
                            let group_id = EnrollmentGroupId::parse(&g.enrollment_group_id)?;
                            let if_match = item_if_match(&g.etag)?;
                            return Ok((StoreOp::DeleteGroup { group_id, if_match }, None));
                        }
                        let supplied = supplied_keys(&g.attestation);
                        let (id, g, refs) = prepare_group(config, now, rng, g, None)?;
                        references.extend(refs);
                        let limit = Some(config.max_symmetric_key_groups);
                        Ok(Prepared::Group(id, Box::new(g), limit).write(supplied, condition))
                    },
                )?;
                check_references_first(references, job)
            }
            C::PutCertificate { name, certificate_text, is_verified, if_match } => {
                ca::check_name(&name)?;
                let der = ca::parse_ca(&certificate_text)?;
                let plan = CertificatePlan::Put {
                    name,
                    der,
                    is_verified,
                    if_match,
                    etag: new_etag(rng),
                    limit: config.max_ca_certificates,
                };
                Job::CertificateRead { get: Some(get_certificate(plan.name())), plan }
            }
            C::GetCertificate { name } => {
                ca::check_name(&name)?;
                Job::One(Some(get_certificate(&name)), Then::Certificate(name, false))
            }
            C::ListCertificates => Job::One(Some(StoreOp::ListCertificates), Then::ListCertificates),
            C::QueryAudit { filter, paging } => {
                let (size, after) = Self::page(config, &paging)?;
                Job::One(
                    Some(StoreOp::QueryAudit { filter, page: PageRequest { after, limit: size } }),
                    Then::QueryAudit(size),
                )
            }
            C::DeleteCertificate { name, if_match } => {
                ca::check_name(&name)?;
                Job::One(
                    Some(StoreOp::DeleteCertificate { name: name.clone(), if_match }),
                    Then::Delete(Kind::Certificate, name),
                )
            }
            C::GenerateVerificationCode { name, if_match } => {
                ca::check_name(&name)?;
                let code = ca::verification_code(rng);
                let plan = CertificatePlan::GenerateCode { name, if_match, code, etag: new_etag(rng) };
                Job::CertificateRead { get: Some(get_certificate(plan.name())), plan }
            }
            C::VerifyCertificate { name, if_match, certificate_text } => {
                ca::check_name(&name)?;
                let proof = ca::parse_proof(&certificate_text)?;
                let plan = CertificatePlan::Verify { name, if_match, proof, etag: new_etag(rng) };
                Job::CertificateRead { get: Some(get_certificate(plan.name())), plan }
            }
        })
    }

    fn reply_json<T: Serialize>(&self, status: u16, body: &T) -> Reply {
        Reply::json(status, body, self.tracking_id.clone())
    }

    fn store_failure(&self, e: StoreError, kind: Option<Kind>, id: &str) -> DpsError {
        match e {
            StoreError::NotFound => match kind {
                Some(k) => {
                    DpsError::with_message(k.not_found(), format!("The {} '{id}' does not exist.", k.noun()))
                }
                None => DpsError::with_message(
                    ErrorCode::RegistrationNotFound,
                    format!("The device registration '{id}' does not exist."),
                ),
            },
            StoreError::PreconditionFailed => DpsError::with_message(
                ErrorCode::PreconditionFailed,
                format!("The ETag in If-Match does not match the current ETag of '{id}'."),
            ),
            StoreError::AlreadyExists => {
                DpsError::with_message(ErrorCode::Conflict, format!("'{id}' already exists."))
            }
            StoreError::Conflict => {
                DpsError::with_message(ErrorCode::Conflict, format!("'{id}' changed concurrently."))
            }
            StoreError::LimitReached { what, limit } => DpsError::with_message(
                ErrorCode::QuotaExceeded,
                format!("'{id}' cannot be created: this instance holds at most {limit} {what} (spec 10.1)."),
            ),
            StoreError::Backend { message } => DpsError::with_message(ErrorCode::StoreUnavailable, message),
        }
    }

    fn finish(&self, then: &Then, result: Result<StoreResult, StoreError>) -> Result<Reply, DpsError> {
        let (kind, id) = match then {
            Then::Get(k, id) | Then::Put(k, id, _) | Then::Delete(k, id) | Then::Attestation(k, id) => {
                (Some(*k), id.as_str())
            }
            Then::GetRegistration(id) | Then::DeleteRegistration(id) => (None, id.as_str()),
            Then::Certificate(id, _) => (Some(Kind::Certificate), id.as_str()),
            Then::Query(..) | Then::QueryRegistrations(_) | Then::ListCertificates | Then::QueryAudit(_) => {
                (None, "")
            }
        };
        let result = result.map_err(|e| self.store_failure(e, kind, id))?;
        let not_found = |k: Kind| {
            DpsError::with_message(k.not_found(), format!("The {} '{id}' does not exist.", k.noun()))
        };
        let with_etag = |r: Reply, etag: &Option<String>| match etag {
            Some(e) => r.with_header("etag", format!("\"{e}\"")),
            None => r,
        };
        Ok(match (then, result) {
            (Then::Get(Kind::Enrollment, _), StoreResult::Enrollment(e)) => {
                let e = hide_enrollment_secrets(*e.ok_or_else(|| not_found(Kind::Enrollment))?);
                with_etag(self.reply_json(200, &e), &e.etag)
            }
            (Then::Put(Kind::Enrollment, _, kept), StoreResult::Enrollment(e)) => {
                let mut e = e.ok_or_else(|| not_found(Kind::Enrollment))?;
                hide_kept_keys(&mut e.attestation, *kept);
                with_etag(self.reply_json(200, &e), &e.etag)
            }
            (Then::Attestation(Kind::Enrollment, _), StoreResult::Enrollment(e)) => {
                self.reply_json(200, &e.ok_or_else(|| not_found(Kind::Enrollment))?.attestation)
            }
            (Then::Get(Kind::Group, _), StoreResult::Group(g)) => {
                let g = hide_group_secrets(*g.ok_or_else(|| not_found(Kind::Group))?);
                with_etag(self.reply_json(200, &g), &g.etag)
            }
            (Then::Put(Kind::Group, _, kept), StoreResult::Group(g)) => {
                let mut g = g.ok_or_else(|| not_found(Kind::Group))?;
                hide_kept_keys(&mut g.attestation, *kept);
                with_etag(self.reply_json(200, &g), &g.etag)
            }
            (Then::Attestation(Kind::Group, _), StoreResult::Group(g)) => {
                self.reply_json(200, &g.ok_or_else(|| not_found(Kind::Group))?.attestation)
            }
            (Then::Delete(..), StoreResult::Done) | (Then::DeleteRegistration(_), StoreResult::Done) => {
                Reply::empty(204, self.tracking_id.clone())
            }
            (Then::Query(Kind::Enrollment, size), StoreResult::Enrollments(page)) => {
                let items: Vec<_> = page.items.into_iter().map(hide_enrollment_secrets).collect();
                query_reply(self.reply_json(200, &items), "enrollment", *size, page.next)
            }
            (Then::Query(Kind::Group, size), StoreResult::Groups(page)) => {
                let items: Vec<_> = page.items.into_iter().map(hide_group_secrets).collect();
                query_reply(self.reply_json(200, &items), "enrollmentGroup", *size, page.next)
            }
            (Then::GetRegistration(_), StoreResult::Registration(r)) => {
                let r = r.ok_or_else(|| {
                    DpsError::with_message(
                        ErrorCode::RegistrationNotFound,
                        format!("The device registration '{id}' does not exist."),
                    )
                })?;
                let state = registration_state_of(&r);
                with_etag(self.reply_json(200, &state), &state.etag)
            }
            (Then::Certificate(_, with_code), StoreResult::Certificate(c)) => {
                let c = c.ok_or_else(|| not_found(Kind::Certificate))?;
                let body = ca::response(&c, *with_code)?;
                self.reply_json(200, &body).with_header("etag", format!("\"{}\"", c.etag))
            }
            (Then::ListCertificates, StoreResult::Certificates(list)) => {
                let value = list.iter().map(|c| ca::response(c, false)).collect::<Result<Vec<_>, _>>()?;
                self.reply_json(200, &CertificateList { value })
            }
            (Then::QueryAudit(size), StoreResult::Audit(page)) => {
                query_reply(self.reply_json(200, &page.items), "auditRecord", *size, page.next)
            }
            (Then::QueryRegistrations(size), StoreResult::Registrations(page)) => {
                let items: Vec<_> = page.items.iter().map(registration_state_of).collect();
                query_reply(self.reply_json(200, &items), "deviceRegistration", *size, page.next)
            }
            _ => return Err(unexpected_store_result()),
        })
    }

    /// The write of a CA-certificate operation, given the stored certificate: always guarded by the ETag
    /// read (or create-only), so a concurrent change makes it fail (`409`) instead of being overwritten.
    fn certificate_write(
        &self,
        plan: CertificatePlan,
        stored: Result<StoreResult, StoreError>,
    ) -> Result<(StoreOp, Then), DpsError> {
        let name = plan.name().to_owned();
        let stored = match stored {
            Ok(StoreResult::Certificate(c)) => c.map(|c| *c),
            Ok(_) => return Err(unexpected_store_result()),
            Err(e) => return Err(self.store_failure(e, Some(Kind::Certificate), &name)),
        };
        let guard = |c: &CaCertificate| WriteCondition::IfMatch(IfMatch::Etag(c.etag.clone()));
        let not_found = || {
            DpsError::with_message(
                ErrorCode::CertificateNotFound,
                format!("The CA certificate '{name}' does not exist."),
            )
        };
        let check_etag = |c: &CaCertificate, m: &IfMatch| {
            if m.matches(&c.etag) {
                Ok(())
            } else {
                Err(self.store_failure(StoreError::PreconditionFailed, Some(Kind::Certificate), &name))
            }
        };
        let (certificate, condition, limit, with_code) = match plan {
            CertificatePlan::Put { name, der, is_verified, if_match, etag, limit } => {
                if let (Some(m), Some(c)) = (&if_match, &stored) {
                    check_etag(c, m)?;
                }
                if let (Some(_), None) = (&if_match, &stored) {
                    return Err(not_found());
                }
                let condition = match &stored {
                    Some(c) => guard(c),
                    None => WriteCondition::CreateOnly,
                };
                let created = stored.as_ref().map_or(self.now, |c| c.created);
                // A replace keeps the name as first uploaded (names compare case-insensitively).
                let name = stored.as_ref().map_or(name, |c| c.name.clone());
                let certificate = CaCertificate {
                    name,
                    der,
                    is_verified,
                    verification_code: None,
                    created,
                    updated: self.now,
                    etag,
                };
                (certificate, condition, Some(limit), false)
            }
            CertificatePlan::GenerateCode { if_match, code, etag, .. } => {
                let mut c = stored.ok_or_else(not_found)?;
                check_etag(&c, &if_match)?;
                let condition = guard(&c);
                c.verification_code = Some(code);
                c.etag = etag;
                c.updated = self.now;
                (c, condition, None, true)
            }
            CertificatePlan::Verify { if_match, proof, etag, .. } => {
                let mut c = stored.ok_or_else(not_found)?;
                check_etag(&c, &if_match)?;
                let code = c.verification_code.as_deref().ok_or_else(|| {
                    ca::invalid_ca(format!(
                        "No verification code was generated for '{name}'; generate one first (generateVerificationCode)."
                    ))
                })?;
                dps_attest::x509::verify_proof_of_possession(&c.der, &proof, code, self.now)
                    .map_err(|e| ca::invalid_ca(format!("The proof of possession is not valid: {e}")))?;
                let condition = guard(&c);
                c.is_verified = true;
                c.verification_code = None;
                c.etag = etag;
                c.updated = self.now;
                (c, condition, None, false)
            }
        };
        let op = StoreOp::PutCertificate {
            certificate: Box::new(certificate),
            condition,
            max_certificates: limit,
        };
        Ok((op, Then::Certificate(name, with_code)))
    }

    fn metered(&self, mut reply: Reply) -> Reply {
        if let Some(op) = self.billable {
            reply.meter = Some(MeterEvent { operation: op, at: self.now, succeeded: reply.status < 400 });
        }
        reply
    }
}

fn query_reply(reply: Reply, item_type: &str, size: usize, next: Option<String>) -> Reply {
    let reply = reply
        .with_header("x-ms-item-type", item_type.to_owned())
        .with_header("x-ms-max-item-count", size.to_string());
    match next {
        Some(key) => reply.with_header("x-ms-continuation", continuation_token(&key)),
        None => reply,
    }
}

/// A guarded write (If-Match of the ETag read, or create-only) that lost to a concurrent writer.
fn guard_error(e: StoreError) -> StoreError {
    match e {
        StoreError::PreconditionFailed | StoreError::AlreadyExists => StoreError::Conflict,
        other => other,
    }
}

fn guard_result(result: Result<StoreResult, StoreError>) -> Result<StoreResult, StoreError> {
    result.map_err(guard_error)
}

fn get_certificate(name: &str) -> StoreOp {
    StoreOp::GetCertificate { name: name.to_owned() }
}

/// Runs `job` only after checking its `caReferences` against the uploaded certificates (when it has any).
fn check_references_first(references: Vec<CaReference>, job: Job) -> Job {
    if references.is_empty() {
        job
    } else {
        Job::CheckCaReferences { list: Some(StoreOp::ListCertificates), references, next: Box::new(job) }
    }
}

fn check_bulk_size(n: usize) -> Result<(), DpsError> {
    if n == 0 || n > MAX_BULK_ITEMS {
        return Err(DpsError::with_message(
            ErrorCode::BulkOperationTooLarge,
            format!("A bulk operation must contain between 1 and {MAX_BULK_ITEMS} items; it has {n}."),
        ));
    }
    Ok(())
}

fn bulk_condition(mode: BulkOperationMode, etag: Option<&str>) -> Result<WriteCondition, DpsError> {
    Ok(match mode {
        BulkOperationMode::Create => WriteCondition::CreateOnly,
        BulkOperationMode::Update => WriteCondition::Upsert,
        BulkOperationMode::UpdateIfMatchEtag => match etag {
            Some(e) => WriteCondition::IfMatch(IfMatch::parse(e)?),
            None => {
                return Err(DpsError::with_message(
                    ErrorCode::PreconditionFailed,
                    "updateIfMatchETag needs the item's etag.",
                ))
            }
        },
        BulkOperationMode::Delete => WriteCondition::Upsert,
    })
}

/// Which of the primary and secondary symmetric keys a request body supplies.
fn supplied_keys(attestation: &AttestationMechanism) -> [bool; 2] {
    let k = attestation.symmetric_key.as_ref();
    let has = |v: Option<&String>| v.is_some_and(|s| !s.is_empty());
    [has(k.and_then(|k| k.primary_key.as_ref())), has(k.and_then(|k| k.secondary_key.as_ref()))]
}

/// Copies the stored keys into the slots the request left empty; returns which slots it filled.
fn keep_stored_keys(
    new: &mut AttestationMechanism,
    stored: &AttestationMechanism,
    supplied: [bool; 2],
) -> [bool; 2] {
    let (Some(new_keys), Some(old_keys)) = (new.symmetric_key.as_mut(), stored.symmetric_key.as_ref()) else {
        return [false; 2];
    };
    if stored.kind != AttestationType::SymmetricKey {
        return [false; 2];
    }
    let mut kept = [false; 2];
    if !supplied[0] && old_keys.primary_key.is_some() {
        new_keys.primary_key.clone_from(&old_keys.primary_key);
        kept[0] = true;
    }
    if !supplied[1] && old_keys.secondary_key.is_some() {
        new_keys.secondary_key.clone_from(&old_keys.secondary_key);
        kept[1] = true;
    }
    kept
}

/// Hides the keys a replace kept from storage (the caller did not send them and may not read them).
fn hide_kept_keys(attestation: &mut AttestationMechanism, kept: [bool; 2]) {
    if let Some(keys) = attestation.symmetric_key.as_mut() {
        if kept[0] {
            keys.primary_key = None;
        }
        if kept[1] {
            keys.secondary_key = None;
        }
    }
}

/// The job for a single create-or-replace.
fn single_write(item: Prepared, supplied: [bool; 2], condition: WriteCondition, then: Then) -> Job {
    match item.write(supplied, condition) {
        (op, None) => Job::One(Some(op), then),
        (get, Some(keep)) => Job::KeepKeys { get: Some(get), keep, then },
    }
}

fn item_if_match(etag: &Option<String>) -> Result<Option<IfMatch>, DpsError> {
    etag.as_deref().map(IfMatch::parse).transpose()
}

/// Turns the items of a bulk operation into store operations, collecting per-item validation errors.
fn bulk_job<T>(
    kind: Kind,
    items: Vec<T>,
    id_of: impl Fn(&T) -> String,
    mut op_of: impl FnMut(T) -> Result<(StoreOp, Option<KeepKeys>), DpsError>,
) -> Result<Job, DpsError> {
    check_bulk_size(items.len())?;
    let mut queue = VecDeque::new();
    let mut errors = Vec::new();
    for item in items {
        let id = id_of(&item);
        match op_of(item) {
            Ok((op, keep)) => queue.push_back(BulkItem { id, op, keep }),
            Err(err) => errors.push(bulk_error(kind, id, &err)),
        }
    }
    Ok(Job::Bulk { kind, items: queue, current: None, errors, guarded: false })
}

fn bulk_error(kind: Kind, id: String, err: &DpsError) -> BulkEnrollmentOperationError {
    let (registration_id, enrollment_group_id) = match kind {
        Kind::Enrollment => (Some(id), None),
        Kind::Group | Kind::Certificate => (None, Some(id)),
    };
    BulkEnrollmentOperationError {
        registration_id,
        enrollment_group_id,
        error_code: err.code.code(),
        error_status: err.message.clone(),
    }
}

impl ServiceFlow {
    /// Unwraps the answer to an audited write for the job (and notes that it committed).
    fn audit_input(&mut self, input: Input) -> Input {
        let Some(audit) = self.audit.as_mut() else { return input };
        if !std::mem::take(&mut audit.writing) {
            return input;
        }
        match input {
            Input::Store(Ok(StoreResult::Audited { result, .. })) => {
                audit.committed = true;
                Input::Store(Ok(*result))
            }
            other => other,
        }
    }

    /// Wraps the job's writes in [`StoreOp::Audited`], and holds a refusal back until its records are
    /// appended.
    fn audit_step(&mut self, step: Step) -> Step {
        let Some(audit) = self.audit.as_mut() else { return step };
        match step {
            Step::Store(op) => match op.audit_target() {
                Some(target) => {
                    let status = match op {
                        StoreOp::DeleteEnrollment { .. }
                        | StoreOp::DeleteGroup { .. }
                        | StoreOp::DeleteRegistration { .. }
                        | StoreOp::DeleteCertificate { .. } => 204,
                        _ => 200,
                    };
                    let record = audit.record(self.now, &self.tracking_id, target, status, None);
                    audit.writing = true;
                    Step::Store(StoreOp::Audited { op: Box::new(op), record: Box::new(record) })
                }
                None => Step::Store(op),
            },
            Step::Respond(reply) => {
                let records = audit.refusals(self.now, &reply);
                if records.is_empty() {
                    Step::Respond(reply)
                } else {
                    audit.held = Some(reply);
                    Step::Store(StoreOp::AppendAudit { records })
                }
            }
            other => other,
        }
    }

    fn step(&mut self, input: Input) -> Step {
        let job = std::mem::replace(&mut self.job, Job::Done);
        match (job, input) {
            (Job::Reply(reply), _) => Step::Respond(self.metered(reply)),
            (Job::One(Some(op), then), Input::Start) => {
                self.job = Job::One(None, then);
                Step::Store(op)
            }
            (Job::One(None, then), Input::Store(result)) => {
                let reply = match self.finish(&then, result) {
                    Ok(r) => r,
                    Err(e) => Reply::error(&e, self.tracking_id.clone(), self.now),
                };
                Step::Respond(self.metered(reply))
            }
            (Job::Bulk { kind, mut items, current, mut errors, guarded }, input) => {
                match (current, input) {
                    // The stored item was read: now write, keeping its keys.
                    (Some((id, Some(keep))), Input::Store(stored)) => match keep.into_put(stored) {
                        Ok((put, guarded, _)) => {
                            self.job = Job::Bulk { kind, items, current: Some((id, None)), errors, guarded };
                            return Step::Store(put);
                        }
                        Err(e) => {
                            let err = match e {
                                Some(e) => self.store_failure(e, Some(kind), &id),
                                None => unexpected_store_result(),
                            };
                            errors.push(bulk_error(kind, id, &err));
                        }
                    },
                    (Some((id, None)), Input::Store(Err(e))) => {
                        let e = if guarded { guard_error(e) } else { e };
                        let err = self.store_failure(e, Some(kind), &id);
                        errors.push(bulk_error(kind, id, &err));
                    }
                    _ => {}
                }
                match items.pop_front() {
                    Some(item) => {
                        self.job = Job::Bulk {
                            kind,
                            items,
                            current: Some((item.id, item.keep)),
                            errors,
                            guarded: false,
                        };
                        Step::Store(item.op)
                    }
                    None => {
                        if let Some(audit) = self.audit.as_mut() {
                            audit.item_refusals = errors
                                .iter()
                                .map(|e| {
                                    let id = e.registration_id.as_ref().or(e.enrollment_group_id.as_ref());
                                    (id.cloned().unwrap_or_default(), e.error_code)
                                })
                                .collect();
                        }
                        let result =
                            BulkEnrollmentOperationResult { is_successful: errors.is_empty(), errors };
                        let reply = self.reply_json(200, &result);
                        Step::Respond(self.metered(reply))
                    }
                }
            }
            (Job::KeepKeys { get: Some(op), keep, then }, Input::Start) => {
                self.job = Job::KeepKeys { get: None, keep, then };
                Step::Store(op)
            }
            (Job::KeepKeys { get: None, keep, then }, Input::Store(stored)) => match keep.into_put(stored) {
                Ok((put, guarded, kept)) => {
                    let then = match then {
                        Then::Put(kind, id, _) => Then::Put(kind, id, kept),
                        other => other,
                    };
                    self.job = if guarded { Job::Guarded(then) } else { Job::One(None, then) };
                    Step::Store(put)
                }
                Err(e) => {
                    let err = match e {
                        Some(e) => self.store_failure(e, None, ""),
                        None => unexpected_store_result(),
                    };
                    let reply = Reply::error(&err, self.tracking_id.clone(), self.now);
                    Step::Respond(self.metered(reply))
                }
            },
            (Job::Guarded(then), Input::Store(result)) => {
                let reply = match self.finish(&then, guard_result(result)) {
                    Ok(r) => r,
                    Err(e) => Reply::error(&e, self.tracking_id.clone(), self.now),
                };
                Step::Respond(self.metered(reply))
            }
            (Job::CertificateRead { get: Some(op), plan }, Input::Start) => {
                self.job = Job::CertificateRead { get: None, plan };
                Step::Store(op)
            }
            (Job::CertificateRead { get: None, plan }, Input::Store(stored)) => {
                match self.certificate_write(plan, stored) {
                    Ok((op, then)) => {
                        self.job = Job::Guarded(then);
                        Step::Store(op)
                    }
                    Err(e) => {
                        let reply = Reply::error(&e, self.tracking_id.clone(), self.now);
                        Step::Respond(self.metered(reply))
                    }
                }
            }
            (Job::CheckCaReferences { list: Some(op), references, next }, Input::Start) => {
                self.job = Job::CheckCaReferences { list: None, references, next };
                Step::Store(op)
            }
            (Job::CheckCaReferences { list: None, references, next }, Input::Store(listed)) => {
                let checked = match listed {
                    Ok(StoreResult::Certificates(uploaded)) => ca::check_references(&references, &uploaded),
                    Ok(_) => Err(unexpected_store_result()),
                    Err(e) => Err(self.store_failure(e, None, "")),
                };
                match checked {
                    Ok(()) => {
                        self.job = *next;
                        self.step(Input::Start)
                    }
                    Err(e) => {
                        let reply = Reply::error(&e, self.tracking_id.clone(), self.now);
                        Step::Respond(self.metered(reply))
                    }
                }
            }
            (Job::Done, _) => Step::Finished,
            (Job::One(..), _)
            | (Job::KeepKeys { .. }, _)
            | (Job::Guarded(_), _)
            | (Job::CertificateRead { .. }, _)
            | (Job::CheckCaReferences { .. }, _) => {
                let reply = Reply::error(&unexpected_store_result(), self.tracking_id.clone(), self.now);
                Step::Respond(self.metered(reply))
            }
        }
    }
}

impl Flow for ServiceFlow {
    fn resume_at(&mut self, now: Timestamp, input: Input) -> Step {
        self.now = self.now.max(now);
        self.resume(input)
    }

    fn resume(&mut self, input: Input) -> Step {
        // A refusal held back for its audit records: whatever the append answered, the refusal stands.
        if let Some(reply) = self.audit.as_mut().and_then(|a| a.held.take()) {
            return Step::Respond(reply);
        }
        let input = self.audit_input(input);
        let step = self.step(input);
        self.audit_step(step)
    }
}
