//! Billable operations (spec §10.3) and a pure in-memory meter.
//!
//! Azure bills "each API call on DPS" as one operation, for the device registration call and the service
//! API's registration-state and enrollment operations; device status lookups and operation-status polls,
//! the certificate API and the resource (ARM) API are not billed. The billing unit is defined as the
//! "successful completion of one instruction" (concepts-service.md), so [`Meter`] bills only successful
//! calls and counts failed ones separately (the spec lists whether failed calls bill as a GAP).

use dps_proto::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One billable DPS API (spec §10.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillableOperation {
    /// Device API: Register Device.
    DeviceRegister,
    /// Service API: get a device registration state.
    RegistrationStateGet,
    /// Service API: query the registration states of an enrollment group.
    RegistrationStateQuery,
    /// Service API: delete a device registration state.
    RegistrationStateDelete,
    /// Service API: create or update an individual enrollment.
    EnrollmentCreateOrUpdate,
    /// Service API: delete an individual enrollment.
    EnrollmentDelete,
    /// Service API: get an individual enrollment.
    EnrollmentGet,
    /// Service API: get an individual enrollment's attestation mechanism (with secrets).
    EnrollmentGetAttestationMechanism,
    /// Service API: query individual enrollments.
    EnrollmentQuery,
    /// Service API: bulk operation on individual enrollments.
    EnrollmentBulk,
    /// Service API: create or update an enrollment group.
    EnrollmentGroupCreateOrUpdate,
    /// Service API: delete an enrollment group.
    EnrollmentGroupDelete,
    /// Service API: get an enrollment group.
    EnrollmentGroupGet,
    /// Service API: get an enrollment group's attestation mechanism (with secrets).
    EnrollmentGroupGetAttestationMechanism,
    /// Service API: query enrollment groups.
    EnrollmentGroupQuery,
    /// Service API: bulk operation on enrollment groups.
    EnrollmentGroupBulk,
}

impl BillableOperation {
    /// Every billable operation, in declaration order (which is also the `Ord` order).
    pub const ALL: &'static [BillableOperation] = &[
        BillableOperation::DeviceRegister,
        BillableOperation::RegistrationStateGet,
        BillableOperation::RegistrationStateQuery,
        BillableOperation::RegistrationStateDelete,
        BillableOperation::EnrollmentCreateOrUpdate,
        BillableOperation::EnrollmentDelete,
        BillableOperation::EnrollmentGet,
        BillableOperation::EnrollmentGetAttestationMechanism,
        BillableOperation::EnrollmentQuery,
        BillableOperation::EnrollmentBulk,
        BillableOperation::EnrollmentGroupCreateOrUpdate,
        BillableOperation::EnrollmentGroupDelete,
        BillableOperation::EnrollmentGroupGet,
        BillableOperation::EnrollmentGroupGetAttestationMechanism,
        BillableOperation::EnrollmentGroupQuery,
        BillableOperation::EnrollmentGroupBulk,
    ];

    /// A stable snake_case name for metrics and logs (the same as the serde form). Never changes.
    pub const fn name(self) -> &'static str {
        match self {
            BillableOperation::DeviceRegister => "device_register",
            BillableOperation::RegistrationStateGet => "registration_state_get",
            BillableOperation::RegistrationStateQuery => "registration_state_query",
            BillableOperation::RegistrationStateDelete => "registration_state_delete",
            BillableOperation::EnrollmentCreateOrUpdate => "enrollment_create_or_update",
            BillableOperation::EnrollmentDelete => "enrollment_delete",
            BillableOperation::EnrollmentGet => "enrollment_get",
            BillableOperation::EnrollmentGetAttestationMechanism => "enrollment_get_attestation_mechanism",
            BillableOperation::EnrollmentQuery => "enrollment_query",
            BillableOperation::EnrollmentBulk => "enrollment_bulk",
            BillableOperation::EnrollmentGroupCreateOrUpdate => "enrollment_group_create_or_update",
            BillableOperation::EnrollmentGroupDelete => "enrollment_group_delete",
            BillableOperation::EnrollmentGroupGet => "enrollment_group_get",
            BillableOperation::EnrollmentGroupGetAttestationMechanism => {
                "enrollment_group_get_attestation_mechanism"
            }
            BillableOperation::EnrollmentGroupQuery => "enrollment_group_query",
            BillableOperation::EnrollmentGroupBulk => "enrollment_group_bulk",
        }
    }

    /// Looks an operation up by its [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<BillableOperation> {
        BillableOperation::ALL.iter().copied().find(|op| op.name() == name)
    }
}

impl std::fmt::Display for BillableOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A device-API call (spec §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceOperation {
    /// PUT register (or the MQTT/AMQP register request).
    Register,
    /// GET operation status (polling).
    OperationStatus,
    /// POST device registration status lookup.
    StatusLookup,
}

/// Whether a device-API call is billable (spec §10.3): only Register is; operation-status polls and
/// registration status lookups are not (a status lookup still counts against the registration throttle,
/// which is not this module's business).
pub fn billable_device_operation(op: DeviceOperation) -> Option<BillableOperation> {
    match op {
        DeviceOperation::Register => Some(BillableOperation::DeviceRegister),
        DeviceOperation::OperationStatus | DeviceOperation::StatusLookup => None,
    }
}

/// One completed call of a billable API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeterEvent {
    /// Which API.
    pub operation: BillableOperation,
    /// When it completed (passed in by the caller; this crate reads no clock).
    pub at: Timestamp,
    /// Whether it completed successfully.
    pub succeeded: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    succeeded: u64,
    failed: u64,
}

/// A pure in-memory aggregator of [`MeterEvent`]s.
///
/// Successful calls are billed; failed calls are counted separately and not billed, following the §10.3
/// definition of the billing unit as the "successful completion of one instruction". Counters saturate at
/// `u64::MAX` instead of wrapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meter {
    counts: BTreeMap<BillableOperation, Counts>,
    first_at: Option<Timestamp>,
    last_at: Option<Timestamp>,
}

impl Meter {
    /// An empty meter.
    pub fn new() -> Self {
        Meter::default()
    }

    /// Records one completed call.
    pub fn record(&mut self, event: MeterEvent) {
        let c = self.counts.entry(event.operation).or_default();
        if event.succeeded {
            c.succeeded = c.succeeded.saturating_add(1);
        } else {
            c.failed = c.failed.saturating_add(1);
        }
        self.first_at = Some(self.first_at.map_or(event.at, |t| t.min(event.at)));
        self.last_at = Some(self.last_at.map_or(event.at, |t| t.max(event.at)));
    }

    /// Successful (billed) calls of `op`.
    pub fn count(&self, op: BillableOperation) -> u64 {
        self.counts.get(&op).map_or(0, |c| c.succeeded)
    }

    /// Failed (not billed) calls of `op`.
    pub fn failed(&self, op: BillableOperation) -> u64 {
        self.counts.get(&op).map_or(0, |c| c.failed)
    }

    /// Billable operations: successful calls of every operation. Failed calls are not included (see
    /// [`total_failed`](Self::total_failed)).
    pub fn total_billable(&self) -> u64 {
        self.counts.values().fold(0_u64, |acc, c| acc.saturating_add(c.succeeded))
    }

    /// Failed calls of every operation (not billed).
    pub fn total_failed(&self) -> u64 {
        self.counts.values().fold(0_u64, |acc, c| acc.saturating_add(c.failed))
    }

    /// `(operation, succeeded, failed)` for every operation recorded at least once, in
    /// [`BillableOperation::ALL`] order.
    pub fn snapshot(&self) -> Vec<(BillableOperation, u64, u64)> {
        self.counts.iter().map(|(op, c)| (*op, c.succeeded, c.failed)).collect()
    }

    /// The earliest and latest `at` among recorded events, if any.
    pub fn window(&self) -> Option<(Timestamp, Timestamp)> {
        self.first_at.zip(self.last_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ev(operation: BillableOperation, secs: i64, succeeded: bool) -> MeterEvent {
        MeterEvent { operation, at: Timestamp::from_unix_seconds(secs), succeeded }
    }

    #[test]
    fn all_is_complete_sorted_and_named_uniquely() {
        assert_eq!(BillableOperation::ALL.len(), 16);
        let sorted: Vec<_> =
            BillableOperation::ALL.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        assert_eq!(sorted, BillableOperation::ALL);
        let names: BTreeSet<&str> = BillableOperation::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), 16);
        for op in BillableOperation::ALL {
            let n = op.name();
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{n}");
            assert_eq!(BillableOperation::from_name(n), Some(*op));
            assert_eq!(op.to_string(), n);
            assert_eq!(serde_json::to_value(op).unwrap(), serde_json::Value::String(n.to_owned()));
        }
        assert_eq!(BillableOperation::from_name("certificate_get"), None);
        assert_eq!(
            BillableOperation::EnrollmentGroupGetAttestationMechanism.name(),
            "enrollment_group_get_attestation_mechanism"
        );
    }

    #[test]
    fn only_register_bills_on_the_device_api() {
        assert_eq!(
            billable_device_operation(DeviceOperation::Register),
            Some(BillableOperation::DeviceRegister)
        );
        assert_eq!(billable_device_operation(DeviceOperation::OperationStatus), None);
        assert_eq!(billable_device_operation(DeviceOperation::StatusLookup), None);
    }

    #[test]
    fn empty_meter() {
        let m = Meter::new();
        assert_eq!(m.total_billable(), 0);
        assert_eq!(m.total_failed(), 0);
        assert!(m.snapshot().is_empty());
        assert_eq!(m.window(), None);
        for op in BillableOperation::ALL {
            assert_eq!((m.count(*op), m.failed(*op)), (0, 0));
        }
    }

    #[test]
    fn meter_counts_success_and_failure_separately() {
        use BillableOperation::*;
        let mut m = Meter::new();
        m.record(ev(DeviceRegister, 10, true));
        m.record(ev(DeviceRegister, 5, true));
        m.record(ev(DeviceRegister, 20, false));
        m.record(ev(EnrollmentGroupBulk, 7, false));
        m.record(ev(EnrollmentGet, 12, true));
        assert_eq!(m.count(DeviceRegister), 2);
        assert_eq!(m.failed(DeviceRegister), 1);
        assert_eq!(m.count(EnrollmentGroupBulk), 0);
        assert_eq!(m.failed(EnrollmentGroupBulk), 1);
        assert_eq!(m.count(EnrollmentQuery), 0);
        assert_eq!(m.total_billable(), 3);
        assert_eq!(m.total_failed(), 2);
        assert_eq!(
            m.snapshot(),
            vec![(DeviceRegister, 2, 1), (EnrollmentGet, 1, 0), (EnrollmentGroupBulk, 0, 1)]
        );
        assert_eq!(m.window(), Some((Timestamp::from_unix_seconds(5), Timestamp::from_unix_seconds(20))));
    }

    #[test]
    fn device_flow_meters_only_register() {
        let mut m = Meter::new();
        let calls = [
            DeviceOperation::Register,
            DeviceOperation::OperationStatus,
            DeviceOperation::OperationStatus,
            DeviceOperation::StatusLookup,
        ];
        for (i, op) in calls.into_iter().enumerate() {
            if let Some(b) = billable_device_operation(op) {
                m.record(ev(b, i as i64, true));
            }
        }
        assert_eq!(m.total_billable(), 1);
        assert_eq!(m.snapshot(), vec![(BillableOperation::DeviceRegister, 1, 0)]);
    }
}
