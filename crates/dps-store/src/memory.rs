//! The in-memory backend: for tests, benchmarks and single-process deployments that do not need
//! durability.

use crate::common::{
    backend, check_certificate_limit, check_delete, check_group_limit, check_write, enrollment_key,
    group_key, is_symmetric_key_group, page_limit, query_matches,
};
use dps_core::audit::{AuditFilter, AuditRecord};
use dps_core::proto::certificate::CaCertificate;
use dps_core::proto::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::proto::query::Query;
use dps_core::proto::{EnrollmentGroupId, Etag, IfMatch, RegistrationId};
use dps_core::store::{
    audit_page_before, push_operation, AsyncStore, BlockingStore, DeviceContext, IssuedOperation, Page,
    PageRequest, RegistrationRecord, StoreError, StoreOp, StoreResult, WriteCondition,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A store that keeps everything in memory, behind one reader-writer lock.
///
/// Every operation is atomic (it runs under the lock) and nothing is durable: the data is gone when the
/// store is dropped. Items are kept in ordered maps keyed by their lowercase ID, so queries page in key
/// order. The symmetric-key groups are kept pre-sorted in a shared `Arc`, rebuilt on group writes, so
/// [`StoreOp::LoadDeviceContext`] costs two map lookups and a few clones.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    /// Handed out when an individual enrollment exists (no allocation per call).
    no_groups: Arc<Vec<EnrollmentGroup>>,
}

#[derive(Debug, Default)]
struct Inner {
    enrollments: BTreeMap<String, IndividualEnrollment>,
    groups: BTreeMap<String, EnrollmentGroup>,
    registrations: BTreeMap<String, RegistrationRecord>,
    /// The operation history of each registration record, by registration key.
    operations: BTreeMap<String, Vec<IssuedOperation>>,
    /// `(group key, registration key)` of every registration that came through a group.
    registrations_by_group: BTreeSet<(String, String)>,
    /// Every symmetric-key group, ordered by group key.
    group_snapshot: Arc<Vec<EnrollmentGroup>>,
    /// CA certificates by key.
    certificates: BTreeMap<String, CaCertificate>,
    /// Every CA certificate, ordered by key (rebuilt on certificate writes).
    certificate_snapshot: Arc<Vec<CaCertificate>>,
    /// The audit log, oldest first (`sequence` is the index plus one).
    audit: Vec<AuditRecord>,
}

impl Inner {
    fn rebuild_group_snapshot(&mut self) {
        self.group_snapshot = Arc::new(self.groups.values().cloned().collect());
    }

    fn rebuild_certificate_snapshot(&mut self) {
        self.certificate_snapshot = Arc::new(self.certificates.values().cloned().collect());
    }

    /// Performs one write (the caller holds the write lock).
    fn apply_write(&mut self, op: StoreOp) -> OpResult {
        match op {
            StoreOp::CommitRegistration { record, expected } => {
                self.commit_registration(*record, expected.as_ref())
            }
            StoreOp::DeleteRegistration { registration_id, if_match } => {
                self.delete_registration(&registration_id, if_match.as_ref())
            }
            StoreOp::PutEnrollment { enrollment, condition } => self.put_enrollment(*enrollment, &condition),
            StoreOp::DeleteEnrollment { registration_id, if_match } => {
                self.delete_enrollment(&registration_id, if_match.as_ref())
            }
            StoreOp::PutGroup { group, condition, max_symmetric_key_groups } => {
                self.put_group(*group, &condition, max_symmetric_key_groups)
            }
            StoreOp::DeleteGroup { group_id, if_match } => self.delete_group(&group_id, if_match.as_ref()),
            StoreOp::PutCertificate { certificate, condition, max_certificates } => {
                self.put_certificate(*certificate, &condition, max_certificates)
            }
            StoreOp::DeleteCertificate { name, if_match } => {
                self.delete_certificate(&name, if_match.as_ref())
            }
            other => Err(backend(format!("the memory store does not support this operation: {other:?}"))),
        }
    }

    /// The stored ETag of the item a service write changes (`None` when absent).
    fn etag_of(&self, op: &StoreOp) -> Option<String> {
        let key = op.audit_target()?.to_ascii_lowercase();
        match op {
            StoreOp::PutEnrollment { .. } | StoreOp::DeleteEnrollment { .. } => {
                self.enrollments.get(&key).and_then(|e| e.etag.clone())
            }
            StoreOp::PutGroup { .. } | StoreOp::DeleteGroup { .. } => {
                self.groups.get(&key).and_then(|g| g.etag.clone())
            }
            StoreOp::DeleteRegistration { .. } => self.registrations.get(&key).map(|r| r.etag.to_string()),
            StoreOp::PutCertificate { .. } | StoreOp::DeleteCertificate { .. } => {
                self.certificates.get(&key).map(|c| c.etag.to_string())
            }
            _ => None,
        }
    }

    /// Appends an audit record, numbering it.
    fn append_audit(&mut self, mut record: AuditRecord) -> AuditRecord {
        record.sequence = self.audit.len() as u64 + 1;
        self.audit.push(record.clone());
        record
    }

    /// A service write and its audit record, under one lock.
    fn audited(&mut self, op: StoreOp, mut record: AuditRecord) -> OpResult {
        if !op.is_service_write() {
            return Err(backend(format!("not an auditable service write: {op:?}")));
        }
        let before = self.etag_of(&op);
        let result = self.apply_write(op)?;
        record.etag_before = before;
        record.etag_after = result.written_etag();
        let record = self.append_audit(record);
        Ok(StoreResult::Audited { result: Box::new(result), record: Box::new(record) })
    }

    /// Audit records passing `filter`, newest first.
    fn query_audit(&self, filter: &AuditFilter, page: &PageRequest) -> OpResult {
        let before = audit_page_before(page)?.unwrap_or(u64::MAX);
        let limit = page_limit(page.limit);
        let mut items = Vec::new();
        let mut more = false;
        for record in self.audit.iter().rev().filter(|r| r.sequence < before && r.matches(filter)) {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(record.clone());
        }
        let next = if more { items.last().map(|r: &AuditRecord| r.sequence.to_string()) } else { None };
        Ok(StoreResult::Audit(Page { items, next }))
    }

    fn commit_registration(&mut self, record: RegistrationRecord, expected: Option<&Etag>) -> OpResult {
        let key = record.registration_id.key().to_owned();
        let inner = self;
        let current = inner.registrations.get(&key).map(|r| &r.etag);
        if current != expected {
            return Err(StoreError::Conflict);
        }
        let new_group = record.enrollment.group_id().map(|g| g.key().to_owned());
        push_operation(inner.operations.entry(key.clone()).or_default(), record.issued_operation());
        if let Some(old) = inner.registrations.insert(key.clone(), record) {
            if let Some(g) = old.enrollment.group_id() {
                inner.registrations_by_group.remove(&(g.key().to_owned(), key.clone()));
            }
        }
        if let Some(g) = new_group {
            inner.registrations_by_group.insert((g, key));
        }
        Ok(StoreResult::Done)
    }

    fn delete_registration(
        &mut self,
        registration_id: &RegistrationId,
        if_match: Option<&IfMatch>,
    ) -> OpResult {
        let key = registration_id.key();
        let inner = self;
        match (inner.registrations.get(key), if_match) {
            (None, _) => return Err(StoreError::NotFound),
            (Some(r), Some(m)) if !m.matches(&r.etag) => return Err(StoreError::PreconditionFailed),
            _ => {}
        }
        inner.operations.remove(key);
        if let Some(old) = inner.registrations.remove(key) {
            if let Some(g) = old.enrollment.group_id() {
                inner.registrations_by_group.remove(&(g.key().to_owned(), key.to_owned()));
            }
        }
        Ok(StoreResult::Done)
    }

    fn put_enrollment(
        &mut self,
        mut enrollment: IndividualEnrollment,
        condition: &WriteCondition,
    ) -> OpResult {
        let key = enrollment_key(&enrollment);
        let inner = self;
        let existing = inner.enrollments.get(&key);
        check_write(condition, existing.map(|e| e.etag.as_deref()))?;
        if let Some(created) = existing.and_then(|e| e.created_date_time_utc.clone()) {
            enrollment.created_date_time_utc = Some(created);
        }
        inner.enrollments.insert(key, enrollment.clone());
        Ok(StoreResult::Enrollment(Some(Box::new(enrollment))))
    }

    fn delete_enrollment(
        &mut self,
        registration_id: &RegistrationId,
        if_match: Option<&IfMatch>,
    ) -> OpResult {
        let key = registration_id.key();
        let inner = self;
        check_delete(if_match, inner.enrollments.get(key).map(|e| e.etag.as_deref()))?;
        inner.enrollments.remove(key);
        Ok(StoreResult::Done)
    }

    fn put_group(
        &mut self,
        mut group: EnrollmentGroup,
        condition: &WriteCondition,
        limit: Option<usize>,
    ) -> OpResult {
        let key = group_key(&group);
        let inner = self;
        let existing = inner.groups.get(&key);
        check_write(condition, existing.map(|g| g.etag.as_deref()))?;
        let was_symmetric = existing.is_some_and(is_symmetric_key_group);
        let count = inner.groups.values().filter(|g| is_symmetric_key_group(g)).count();
        check_group_limit(&group, was_symmetric, count, limit)?;
        let existing = inner.groups.get(&key);
        if let Some(created) = existing.and_then(|g| g.created_date_time_utc.clone()) {
            group.created_date_time_utc = Some(created);
        }
        inner.groups.insert(key, group.clone());
        inner.rebuild_group_snapshot();
        Ok(StoreResult::Group(Some(Box::new(group))))
    }

    fn delete_group(&mut self, group_id: &EnrollmentGroupId, if_match: Option<&IfMatch>) -> OpResult {
        let key = group_id.key();
        let inner = self;
        check_delete(if_match, inner.groups.get(key).map(|g| g.etag.as_deref()))?;
        inner.groups.remove(key);
        inner.rebuild_group_snapshot();
        Ok(StoreResult::Done)
    }

    fn put_certificate(
        &mut self,
        certificate: CaCertificate,
        condition: &WriteCondition,
        limit: Option<usize>,
    ) -> OpResult {
        let key = certificate.key();
        let inner = self;
        let existing = inner.certificates.get(&key);
        check_write(condition, existing.map(|c| Some(c.etag.as_str())))?;
        check_certificate_limit(existing.is_some(), inner.certificates.len(), limit)?;
        inner.certificates.insert(key, certificate.clone());
        inner.rebuild_certificate_snapshot();
        Ok(StoreResult::Certificate(Some(Box::new(certificate))))
    }

    fn delete_certificate(&mut self, name: &str, if_match: Option<&IfMatch>) -> OpResult {
        let key = name.to_ascii_lowercase();
        let inner = self;
        check_delete(if_match, inner.certificates.get(&key).map(|c| Some(c.etag.as_str())))?;
        inner.certificates.remove(&key);
        inner.rebuild_certificate_snapshot();
        Ok(StoreResult::Done)
    }
}

/// Collects one page from `(key, item)` pairs in key order, keeping those that pass `keep`.
fn collect_page<'a, T: Clone + 'a>(
    items: impl Iterator<Item = (&'a String, &'a T)>,
    limit: usize,
    mut keep: impl FnMut(&T) -> Result<bool, StoreError>,
) -> Result<Page<T>, StoreError> {
    let limit = page_limit(limit);
    let mut out = Vec::new();
    let mut last_key: Option<&String> = None;
    let mut more = false;
    for (key, item) in items {
        if !keep(item)? {
            continue;
        }
        if out.len() == limit {
            more = true;
            break;
        }
        out.push(item.clone());
        last_key = Some(key);
    }
    Ok(Page { items: out, next: if more { last_key.cloned() } else { None } })
}

/// The range of keys strictly after `after`.
fn after_bound(page: &PageRequest) -> (Bound<&str>, Bound<&str>) {
    match page.after.as_deref() {
        Some(a) => (Bound::Excluded(a), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn load_device_context(&self, registration_id: &RegistrationId) -> DeviceContext {
        let inner = self.read();
        let key = registration_id.key();
        let individual = inner.enrollments.get(key).cloned();
        let groups = if individual.is_some() {
            Arc::clone(&self.no_groups)
        } else {
            Arc::clone(&inner.group_snapshot)
        };
        let registration = inner.registrations.get(key).cloned();
        let operations = inner.operations.get(key).cloned().unwrap_or_default();
        let certificates = Arc::clone(&inner.certificate_snapshot);
        DeviceContext { individual, groups, certificates, registration, operations }
    }

    fn query_registrations(&self, group_id: &EnrollmentGroupId, page: &PageRequest) -> OpResult {
        let inner = self.read();
        let group = group_id.key().to_owned();
        let start = match &page.after {
            Some(a) => Bound::Excluded((group.clone(), a.clone())),
            None => Bound::Included((group.clone(), String::new())),
        };
        let limit = page_limit(page.limit);
        let mut items = Vec::new();
        let mut last_key: Option<&String> = None;
        let mut more = false;
        for (g, key) in inner.registrations_by_group.range((start, Bound::Unbounded)) {
            if *g != group {
                break;
            }
            let Some(record) = inner.registrations.get(key) else { continue };
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(record.clone());
            last_key = Some(key);
        }
        let next = if more { last_key.cloned() } else { None };
        Ok(StoreResult::Registrations(Page { items, next }))
    }

    fn query_enrollments(&self, query: &Query, page: &PageRequest) -> OpResult {
        let inner = self.read();
        let range = inner.enrollments.range::<str, _>(after_bound(page));
        collect_page(range, page.limit, |e| query_matches(query, e)).map(StoreResult::Enrollments)
    }

    fn query_groups(&self, query: &Query, page: &PageRequest) -> OpResult {
        let inner = self.read();
        let range = inner.groups.range::<str, _>(after_bound(page));
        collect_page(range, page.limit, |g| query_matches(query, g)).map(StoreResult::Groups)
    }
}

type OpResult = Result<StoreResult, StoreError>;

impl BlockingStore for MemoryStore {
    fn execute(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        match op {
            StoreOp::LoadDeviceContext { registration_id } => {
                Ok(StoreResult::DeviceContext(self.load_device_context(&registration_id)))
            }
            StoreOp::GetRegistration { registration_id } => Ok(StoreResult::Registration(
                self.read().registrations.get(registration_id.key()).cloned().map(Box::new),
            )),
            StoreOp::QueryRegistrations { group_id, page } => self.query_registrations(&group_id, &page),
            StoreOp::GetEnrollment { registration_id } => Ok(StoreResult::Enrollment(
                self.read().enrollments.get(registration_id.key()).cloned().map(Box::new),
            )),
            StoreOp::QueryEnrollments { query, page } => self.query_enrollments(&query, &page),
            StoreOp::GetGroup { group_id } => {
                Ok(StoreResult::Group(self.read().groups.get(group_id.key()).cloned().map(Box::new)))
            }
            StoreOp::QueryGroups { query, page } => self.query_groups(&query, &page),
            StoreOp::GetCertificate { name } => Ok(StoreResult::Certificate(
                self.read().certificates.get(&name.to_ascii_lowercase()).cloned().map(Box::new),
            )),
            StoreOp::ListCertificates => {
                Ok(StoreResult::Certificates(self.read().certificate_snapshot.as_ref().clone()))
            }
            StoreOp::Audited { op, record } => self.write().audited(*op, *record),
            StoreOp::AppendAudit { records } => {
                let mut inner = self.write();
                for record in records {
                    inner.append_audit(record);
                }
                Ok(StoreResult::Done)
            }
            StoreOp::QueryAudit { filter, page } => self.read().query_audit(&filter, &page),
            write => self.write().apply_write(write),
        }
    }
}

impl AsyncStore for MemoryStore {
    /// Runs the operation synchronously (it never waits on anything but the lock) and returns a ready
    /// future.
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        std::future::ready(BlockingStore::execute(self, op))
    }
}
