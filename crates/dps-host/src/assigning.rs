//! Where an early-answered registration's `assigning` record lives while its hub work runs.
//!
//! Answering early (`respond_before_assignment`), a register commits an `assigning` record, answers `202`,
//! does the hub work, and commits the final record. With [`AssigningRecords::Host`] (the default) the host
//! keeps that `assigning` record **in memory** instead of writing it to the store: every request through
//! this host sees it (polls answer `202 assigning`, an overlapping register of the same device reuses its
//! operation ID), and the final commit goes to the store with the ETag the `assigning` commit expected, so
//! the store's precondition still covers the whole registration and a write by anyone else in between
//! (another process, the service API) makes the final commit conflict. What is saved is one store
//! round trip and one durable row write per registration; what is given up is that *other processes*
//! sharing the store see the previous record, not `assigning`, until the final commit, and that the service
//! API's registration-state read does the same. A process that dies mid-assignment leaves no stranded
//! `assigning` record behind (the device's next poll is answered `404204` and it registers again).
//! [`AssigningRecords::Store`] writes it durably, for stores shared by several serving processes.

use dps_core::object::DynStore;
use dps_core::proto::Etag;
use dps_core::store::{push_operation, AsyncStore, RegistrationRecord, StoreError, StoreOp, StoreResult};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where the `assigning` record of an early-answered registration is kept while its hub work runs (see
/// the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AssigningRecords {
    /// In the host's memory, seen by every request through this host (default).
    #[default]
    Host,
    /// Written to the store like any commit, seen by every process sharing it.
    Store,
}

#[derive(Debug)]
struct Provisional {
    record: RegistrationRecord,
    /// The ETag the store must still hold when the final record is committed.
    underlying: Option<Etag>,
}

/// The in-memory `assigning` records of a host, by registration key.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    records: Mutex<HashMap<String, Provisional>>,
}

impl Overlay {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Provisional>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many registrations are assigning in memory right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The store as one flow sees it: the host's store with the host's in-memory `assigning` records laid
/// over it. Made per flow; [`FlowStore::release`] drops the record the flow left if it never committed
/// its final one (e.g. the store failed).
pub(crate) struct FlowStore {
    store: Arc<dyn DynStore>,
    overlay: Option<Arc<Overlay>>,
    /// The `assigning` record this flow put in the overlay: (key, ETag).
    wrote: Mutex<Option<(String, Etag)>>,
}

impl FlowStore {
    pub(crate) fn new(store: Arc<dyn DynStore>, overlay: Option<Arc<Overlay>>) -> Self {
        FlowStore { store, overlay, wrote: Mutex::new(None) }
    }

    fn wrote(&self) -> MutexGuard<'_, Option<(String, Etag)>> {
        self.wrote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes this flow's in-memory record if it is still there (the flow has finished).
    pub(crate) fn release(&self) {
        let (Some(overlay), Some((key, etag))) = (&self.overlay, self.wrote().take()) else { return };
        let mut records = overlay.lock();
        if records.get(&key).is_some_and(|p| p.record.etag == etag) {
            records.remove(&key);
        }
    }

    async fn run(&self, op: StoreOp) -> Result<StoreResult, StoreError> {
        let Some(overlay) = &self.overlay else { return self.store.execute(op).await };
        match op {
            StoreOp::CommitRegistration { record, expected } if !record.status.is_terminal() => {
                let key = record.registration_id.key().to_owned();
                let mut records = overlay.lock();
                let underlying = match records.get(&key) {
                    // Another in-memory record: the flow must have read exactly that one.
                    Some(p) if expected.as_ref() == Some(&p.record.etag) => p.underlying.clone(),
                    Some(_) => return Err(StoreError::Conflict),
                    None => expected,
                };
                *self.wrote() = Some((key.clone(), record.etag.clone()));
                records.insert(key, Provisional { record: *record, underlying });
                Ok(StoreResult::Done)
            }
            StoreOp::CommitRegistration { record, expected } => {
                let key = record.registration_id.key().to_owned();
                let replaced = {
                    let records = overlay.lock();
                    records
                        .get(&key)
                        .filter(|p| expected.as_ref() == Some(&p.record.etag))
                        .map(|p| (p.record.etag.clone(), p.underlying.clone()))
                };
                let Some((etag, underlying)) = replaced else {
                    return self.store.execute(StoreOp::CommitRegistration { record, expected }).await;
                };
                let result =
                    self.store.execute(StoreOp::CommitRegistration { record, expected: underlying }).await;
                // Committed or refused, the in-memory record has had its turn.
                let mut records = overlay.lock();
                if records.get(&key).is_some_and(|p| p.record.etag == etag) {
                    records.remove(&key);
                }
                result
            }
            StoreOp::LoadDeviceContext { registration_id } => {
                let key = registration_id.key().to_owned();
                let mut result = self.store.execute(StoreOp::LoadDeviceContext { registration_id }).await;
                if let Ok(StoreResult::DeviceContext(ctx)) = &mut result {
                    if let Some(p) = overlay.lock().get(&key) {
                        push_operation(&mut ctx.operations, p.record.issued_operation());
                        ctx.registration = Some(p.record.clone());
                    }
                }
                result
            }
            other => self.store.execute(other).await,
        }
    }
}

impl AsyncStore for FlowStore {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        self.run(op)
    }
}
