//! Storage as effects: the engine asks for a [`StoreOp`], the caller's store performs it and the result is
//! fed back. Backends (in memory, SQLite, ...) live in `dps-store` and implement [`BlockingStore`] and/or
//! [`AsyncStore`]; every backend runs the same conformance suite.
//!
//! Conditional writes are evaluated by the store, atomically: the engine never does an unguarded
//! read-modify-write.
//!
//! # Store contract: many processes, caches and staleness
//!
//! Several processes (or several store handles in one process) may serve the same data: a backend must
//! stay correct when another process writes its database at any time. What follows binds every backend
//! and is what the conformance suite (`dps_store::testing`) checks.
//!
//! - **Reads are current.** A read ([`StoreOp::LoadDeviceContext`], the `Get*` and `Query*` operations)
//!   reflects every write acknowledged, by any process, before the read started. A read racing a write may
//!   or may not see it, but never goes back in time: once a value is seen, older values are not.
//! - **What may be cached.** Anything, for speed — e.g. the symmetric-key groups (parsed), registration
//!   records, the set of individual enrollment IDs (SQLite caches all three) — provided a cached value is
//!   only used after a check, cheap and done on every read, that no other writer changed the data since the
//!   cache was filled (SQLite: a version row bumped by every write transaction; a backend with change
//!   notifications may use those instead). A cache that fails the check is bypassed (the database is read)
//!   until it is rebuilt. Staleness beyond the start of the read is not allowed, not even "a few
//!   milliseconds": a device's register on one instance and its poll on another must agree.
//! - **What must be checked at commit.** Every precondition ([`WriteCondition`], `If-Match`, the
//!   `expected` ETag of [`StoreOp::CommitRegistration`]) is evaluated against the stored item inside the
//!   write's transaction, never against a cache, so a decision taken from a stale read fails with
//!   [`StoreError::Conflict`] / [`StoreError::PreconditionFailed`] instead of overwriting. A backend that
//!   updates its caches from its own writes must re-check, under the write lock, that nobody else wrote
//!   since its caches were built, and rebuild them first, so it never publishes its own change on top of a
//!   stale copy.
//! - **What is not guarded.** A registration commit is guarded by the record's ETag only, not by the
//!   enrollment or group it was decided from: a group deleted or disabled between a device's context load
//!   and its commit does not fail the commit (in one process as across several); the next load sees it.

use crate::audit::{AuditFilter, AuditRecord};
use dps_proto::certificate::CaCertificate;
use dps_proto::model::{
    EnrollmentGroup, IndividualEnrollment, RegistrationStatus, RegistrationSubstatus, X509RegistrationResult,
};
use dps_proto::query::Query;
use dps_proto::{EnrollmentGroupId, Etag, IfMatch, OperationId, RegistrationId, Timestamp};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;

/// Which enrollment a registration came through.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EnrollmentRef {
    /// An individual enrollment (keyed by the registration ID).
    Individual(RegistrationId),
    /// An enrollment group.
    Group(EnrollmentGroupId),
}

impl EnrollmentRef {
    /// The group ID when the registration came through a group.
    pub fn group_id(&self) -> Option<&EnrollmentGroupId> {
        match self {
            EnrollmentRef::Group(g) => Some(g),
            EnrollmentRef::Individual(_) => None,
        }
    }
}

/// How many operation IDs a store keeps per registration record ([`DeviceContext::operations`]).
pub const OPERATION_HISTORY_LEN: usize = 8;

/// One operation ID the server handed out for a registration, with when it was first committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedOperation {
    /// The operation ID.
    pub operation_id: OperationId,
    /// When the first record carrying it was committed (that record's `last_updated`).
    pub issued: Timestamp,
}

/// Appends an operation to a registration's operation history, as every store does on a successful
/// [`StoreOp::CommitRegistration`] (with [`RegistrationRecord::issued_operation`] of the committed record):
/// nothing changes when the newest entry already has that operation ID (the same operation committed
/// again, e.g. `assigning` then `assigned`); otherwise it is added and the oldest entries beyond
/// [`OPERATION_HISTORY_LEN`] are dropped.
pub fn push_operation(history: &mut Vec<IssuedOperation>, operation: IssuedOperation) {
    if history.last().is_some_and(|last| last.operation_id == operation.operation_id) {
        return;
    }
    history.push(operation);
    if history.len() > OPERATION_HISTORY_LEN {
        let excess = history.len() - OPERATION_HISTORY_LEN;
        history.drain(..excess);
    }
}

/// A device registration record (the service API's `DeviceRegistrationState`, plus the latest operation).
///
/// There is one record per registration ID; it carries the device's latest operation. The operation IDs
/// handed out before it are kept by the store next to the record (see [`DeviceContext::operations`]), so
/// polls for them keep being answered with the record's current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// Registration ID as the device sent it.
    pub registration_id: RegistrationId,
    /// The enrollment it matched.
    pub enrollment: EnrollmentRef,
    /// The latest operation.
    pub operation_id: OperationId,
    /// Status of the latest operation.
    pub status: RegistrationStatus,
    /// Substatus when assigned.
    pub substatus: Option<RegistrationSubstatus>,
    /// The hub the device is (or was last) assigned to.
    pub assigned_hub: Option<String>,
    /// The device ID in that hub.
    pub device_id: Option<String>,
    /// Six-digit error code when failed.
    pub error_code: Option<u32>,
    /// Error message when failed.
    pub error_message: Option<String>,
    /// Custom payload returned to the device.
    pub payload: Option<serde_json::Value>,
    /// When the record was first created.
    pub created: Timestamp,
    /// When it was last written.
    pub last_updated: Timestamp,
    /// Record ETag (changes on every write).
    pub etag: Etag,
    /// The X.509 details of an X.509 device (`registrationState.x509`: its certificate and, through a
    /// group, the group and its signing certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// The certificate chain issued for the device's CSR (base64 DER, leaf first, up to the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

impl RegistrationRecord {
    /// The record's operation as a history entry: its operation ID, issued at `last_updated`.
    pub fn issued_operation(&self) -> IssuedOperation {
        IssuedOperation { operation_id: self.operation_id.clone(), issued: self.last_updated }
    }
}

/// What a registration needs from storage, loaded in one round trip.
#[derive(Debug, Clone, Default)]
pub struct DeviceContext {
    /// The individual enrollment with this registration ID, if any.
    pub individual: Option<IndividualEnrollment>,
    /// When there is no individual enrollment: every enrollment group (enabled and disabled, symmetric-key
    /// and X.509), ordered by group ID. Empty when an individual enrollment exists.
    pub groups: Arc<Vec<EnrollmentGroup>>,
    /// Every CA certificate uploaded to the instance (verified or not), ordered by name: what X.509
    /// attestation validates chains against. Stores hold at most a few dozen.
    pub certificates: Arc<Vec<CaCertificate>>,
    /// The device's registration record, if any.
    pub registration: Option<RegistrationRecord>,
    /// The operation IDs committed for that record, oldest first, at most [`OPERATION_HISTORY_LEN`]
    /// (maintained by the store with [`push_operation`] on every successful
    /// [`StoreOp::CommitRegistration`] and dropped with the record). Empty when there is no record, or for
    /// a record written before the store kept histories (its current `operation_id` still counts).
    pub operations: Vec<IssuedOperation>,
}

/// A write precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    /// Create or replace.
    Upsert,
    /// Create only; fail with [`StoreError::AlreadyExists`] if present.
    CreateOnly,
    /// Replace only if present and matching; otherwise [`StoreError::NotFound`] or
    /// [`StoreError::PreconditionFailed`].
    IfMatch(IfMatch),
}

/// A page request: items strictly after `after` (by lowercase key), at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Continue after this key (exclusive).
    pub after: Option<String>,
    /// Maximum number of items (at least 1).
    pub limit: usize,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items, ordered by lowercase key.
    pub items: Vec<T>,
    /// Key to continue after, present only when more items exist.
    pub next: Option<String>,
}

/// A storage operation requested by the engine.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreOp {
    /// Load the individual enrollment, (if none) the enrollment groups, every CA certificate, and the
    /// registration record.
    LoadDeviceContext {
        /// The device.
        registration_id: RegistrationId,
    },
    /// Write a registration record, durably, if the current record's ETag is `expected`
    /// (`None`: no record may exist). Mismatch: [`StoreError::Conflict`]. On success the store also adds
    /// the record's operation to the registration's operation history ([`push_operation`]).
    CommitRegistration {
        /// The record to write.
        record: Box<RegistrationRecord>,
        /// The ETag the engine read.
        expected: Option<Etag>,
    },
    /// Read a registration record.
    GetRegistration {
        /// The device.
        registration_id: RegistrationId,
    },
    /// Delete a registration record and its operation history ([`StoreError::NotFound`] when absent).
    DeleteRegistration {
        /// The device.
        registration_id: RegistrationId,
        /// Optional precondition.
        if_match: Option<IfMatch>,
    },
    /// Registration records that came through a group, by registration ID.
    QueryRegistrations {
        /// The group.
        group_id: EnrollmentGroupId,
        /// Paging.
        page: PageRequest,
    },
    /// Read an individual enrollment.
    GetEnrollment {
        /// Its registration ID.
        registration_id: RegistrationId,
    },
    /// Write an individual enrollment. The store keeps `createdDateTimeUtc` of an existing enrollment and
    /// returns what it stored.
    PutEnrollment {
        /// The enrollment (with new etag and timestamps set by the engine).
        enrollment: Box<IndividualEnrollment>,
        /// The precondition.
        condition: WriteCondition,
    },
    /// Delete an individual enrollment.
    DeleteEnrollment {
        /// Its registration ID.
        registration_id: RegistrationId,
        /// Optional precondition.
        if_match: Option<IfMatch>,
    },
    /// Individual enrollments matching a query, by registration ID.
    QueryEnrollments {
        /// The filter (its source is `enrollments`).
        query: Query,
        /// Paging.
        page: PageRequest,
    },
    /// Read an enrollment group.
    GetGroup {
        /// Its ID.
        group_id: EnrollmentGroupId,
    },
    /// Write an enrollment group (keeps the existing creation time). Creating a symmetric-key group when
    /// `max_symmetric_key_groups` of them exist already is [`StoreError::LimitReached`] (checked atomically
    /// with the write).
    PutGroup {
        /// The group.
        group: Box<EnrollmentGroup>,
        /// The precondition.
        condition: WriteCondition,
        /// The most symmetric-key groups the instance may hold (None: no limit).
        max_symmetric_key_groups: Option<usize>,
    },
    /// Delete an enrollment group (its registration records stay, as in Azure).
    DeleteGroup {
        /// Its ID.
        group_id: EnrollmentGroupId,
        /// Optional precondition.
        if_match: Option<IfMatch>,
    },
    /// Enrollment groups matching a query, by group ID.
    QueryGroups {
        /// The filter.
        query: Query,
        /// Paging.
        page: PageRequest,
    },
    /// Read a CA certificate (names compare case-insensitively, [`CaCertificate::key`]).
    GetCertificate {
        /// Its name.
        name: String,
    },
    /// Write a CA certificate (stored as given; the engine carries `created` over on replace). Creating one
    /// when `max_certificates` exist already is [`StoreError::LimitReached`] (checked atomically with the
    /// write); replacing one never counts. Answers [`StoreResult::Certificate`] with what was stored.
    PutCertificate {
        /// The certificate (with new etag and timestamps set by the engine).
        certificate: Box<CaCertificate>,
        /// The precondition.
        condition: WriteCondition,
        /// The most CA certificates the instance may hold (None: no limit).
        max_certificates: Option<usize>,
    },
    /// Delete a CA certificate ([`StoreError::NotFound`] when absent).
    DeleteCertificate {
        /// Its name.
        name: String,
        /// Optional precondition.
        if_match: Option<IfMatch>,
    },
    /// Every CA certificate, ordered by key.
    ListCertificates,
    /// Performs a service write (`op`: [`StoreOp::is_service_write`]) and, **in the same transaction**,
    /// appends `record` to the audit log: a committed write always has its record, a failed one (any
    /// error, nothing written) has none. The store sets the record's `sequence`, its `etag_before` (the
    /// stored item's ETag just before the write; `None` when the write created it) and its `etag_after`
    /// (the written item's ETag; `None` after a delete), and answers [`StoreResult::Audited`] with the
    /// write's own result and the record as appended. Any other `op` is a backend error.
    Audited {
        /// The write.
        op: Box<StoreOp>,
        /// Its audit record (who, what, outcome, tracking ID, time).
        record: Box<AuditRecord>,
    },
    /// Appends audit records on their own (refused writes, which wrote nothing), in order, durably;
    /// answers [`StoreResult::Done`].
    AppendAudit {
        /// The records (their `sequence` is assigned by the store).
        records: Vec<AuditRecord>,
    },
    /// Audit records passing a filter, newest first (by decreasing `sequence`). A page's `after` is a
    /// sequence number in decimal: the page holds records with a smaller one; `next` is the last
    /// sequence of the page when older matching records exist.
    QueryAudit {
        /// The filter.
        filter: AuditFilter,
        /// Paging.
        page: PageRequest,
    },
}

impl StoreOp {
    /// Whether this is a write a service command performs (and the engine audits): enrollment, group,
    /// registration-state and CA-certificate puts and deletes. Registration commits of the device API are
    /// not service writes.
    pub fn is_service_write(&self) -> bool {
        self.audit_target().is_some()
    }

    /// The item a service write changes, as the command named it (`None` for any other operation).
    pub fn audit_target(&self) -> Option<&str> {
        Some(match self {
            StoreOp::PutEnrollment { enrollment, .. } => &enrollment.registration_id,
            StoreOp::DeleteEnrollment { registration_id, .. } => registration_id.as_str(),
            StoreOp::PutGroup { group, .. } => &group.enrollment_group_id,
            StoreOp::DeleteGroup { group_id, .. } => group_id.as_str(),
            StoreOp::DeleteRegistration { registration_id, .. } => registration_id.as_str(),
            StoreOp::PutCertificate { certificate, .. } => &certificate.name,
            StoreOp::DeleteCertificate { name, .. } => name,
            _ => return None,
        })
    }
}

impl StoreResult {
    /// The ETag of the item a put wrote (`None` for other results, e.g. a delete's `Done`).
    pub fn written_etag(&self) -> Option<String> {
        match self {
            StoreResult::Enrollment(Some(e)) => e.etag.clone(),
            StoreResult::Group(Some(g)) => g.etag.clone(),
            StoreResult::Certificate(Some(c)) => Some(c.etag.to_string()),
            _ => None,
        }
    }
}

/// The page position of an audit query: records with a sequence below `after` (`None`: from the newest).
/// `Err` when `after` is not a decimal sequence number.
pub fn audit_page_before(page: &PageRequest) -> Result<Option<u64>, StoreError> {
    page.after
        .as_deref()
        .map(|a| {
            a.parse::<u64>().map_err(|_| StoreError::Backend {
                message: format!("the audit page position '{a}' is not a sequence number"),
            })
        })
        .transpose()
}

/// The result of a [`StoreOp`].
#[derive(Debug, Clone)]
#[non_exhaustive]
// Results are moved once per step; boxing would add an allocation on the hot path for no gain.
#[allow(clippy::large_enum_variant)]
pub enum StoreResult {
    /// For [`StoreOp::LoadDeviceContext`].
    DeviceContext(DeviceContext),
    /// For writes and deletes that return nothing.
    Done,
    /// For [`StoreOp::GetRegistration`].
    Registration(Option<Box<RegistrationRecord>>),
    /// For [`StoreOp::QueryRegistrations`].
    Registrations(Page<RegistrationRecord>),
    /// For [`StoreOp::GetEnrollment`] and [`StoreOp::PutEnrollment`].
    Enrollment(Option<Box<IndividualEnrollment>>),
    /// For [`StoreOp::QueryEnrollments`].
    Enrollments(Page<IndividualEnrollment>),
    /// For [`StoreOp::GetGroup`] and [`StoreOp::PutGroup`].
    Group(Option<Box<EnrollmentGroup>>),
    /// For [`StoreOp::QueryGroups`].
    Groups(Page<EnrollmentGroup>),
    /// For [`StoreOp::GetCertificate`] and [`StoreOp::PutCertificate`].
    Certificate(Option<Box<CaCertificate>>),
    /// For [`StoreOp::ListCertificates`], ordered by key.
    Certificates(Vec<CaCertificate>),
    /// For [`StoreOp::Audited`]: the write's own result and its record as appended.
    Audited {
        /// What the write alone would have answered.
        result: Box<StoreResult>,
        /// The record, with `sequence`, `etag_before` and `etag_after` set by the store.
        record: Box<AuditRecord>,
    },
    /// For [`StoreOp::QueryAudit`], newest first.
    Audit(Page<AuditRecord>),
}

/// Why a store operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The item does not exist.
    #[error("not found")]
    NotFound,
    /// The item exists and the write was create-only.
    #[error("already exists")]
    AlreadyExists,
    /// The If-Match precondition failed.
    #[error("precondition failed")]
    PreconditionFailed,
    /// A registration commit lost a race with another registration of the same device.
    #[error("conflicting concurrent write")]
    Conflict,
    /// The write would exceed an instance limit.
    #[error("limit reached: at most {limit} {what}")]
    LimitReached {
        /// What is limited (e.g. "symmetric-key enrollment groups").
        what: String,
        /// The limit.
        limit: usize,
    },
    /// The backend failed (I/O, corruption, shutdown).
    #[error("storage backend failed: {message}")]
    Backend {
        /// What failed.
        message: String,
    },
}

/// A store that performs operations synchronously (in memory, or a blocking database client).
///
/// Implementations follow the [module's store contract](self#store-contract-many-processes-caches-and-staleness):
/// reads reflect every write acknowledged before them, by any process; caches are used only after a check
/// that nobody else wrote; preconditions are evaluated against the stored items at commit.
pub trait BlockingStore {
    /// Performs one operation.
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError>;
}

/// A store whose operations complete asynchronously (e.g. a group-committing SQLite writer).
///
/// The same [store contract](self#store-contract-many-processes-caches-and-staleness) as
/// [`BlockingStore`]; a write is acknowledged when its future resolves.
pub trait AsyncStore {
    /// Performs one operation.
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send;
}

impl<T: BlockingStore + ?Sized> BlockingStore for &T {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        (**self).execute(op)
    }
}

impl<T: BlockingStore + ?Sized> BlockingStore for Arc<T> {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        (**self).execute(op)
    }
}

impl<T: AsyncStore + ?Sized> AsyncStore for &T {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        (**self).execute(op)
    }
}

impl<T: AsyncStore + ?Sized> AsyncStore for Arc<T> {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        (**self).execute(op)
    }
}

/// Encodes a page key as an opaque continuation token.
pub fn continuation_token(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// Decodes a continuation token produced by [`continuation_token`].
pub fn parse_continuation_token(token: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    String::from_utf8(bytes).ok()
}
