//! Usage metering (spec §10.3): every reply carrying a [`MeterEvent`] is counted in the Prometheus
//! counters (`dps_billable_operations_total`) and in the per-scope, per-day usage table of the hub database
//! (`hubs.sqlite3`), which `dps-server admin usage` prints.
//!
//! A register answered `202` is billed by its *outcome*: the `202` goes out before the assignment ends
//! (always so with `respond_early`), so [`Billing`] holds the reply's event until the registration's final
//! commit (seen by the store wrapper) says whether it ended `assigned`/`disabled` (success) or `failed`
//! (failure). Either may come first; the pair is matched by operation ID.

use crate::metrics::Metrics;
use dps_core::proto::model::RegistrationStatus;
use dps_core::store::RegistrationRecord;
use dps_core::{BillableOperation, MeterEvent, Reply, Timestamp};
use dps_store::{SqliteHubDirectory, UsageEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Above this many unmatched entries, entries older than [`STALE_AFTER`] are settled or dropped.
const PRUNE_ABOVE: usize = 10_000;
/// How long a `202` waits for its final commit before it is billed as a failure.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// The UTC day of a timestamp, `YYYY-MM-DD`.
pub fn day_of(at: Timestamp) -> String {
    day_of_unix(at.unix_seconds())
}

/// The UTC day of a Unix time in seconds, `YYYY-MM-DD`.
pub fn day_of_unix(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        Err(_) => "0000-00-00".to_owned(),
    }
}

#[derive(Debug)]
enum Half {
    /// The `202` went out; the outcome is not known yet.
    Replied(MeterEvent, Instant),
    /// The final commit landed (true: success); the `202` has not been seen yet.
    Outcome(bool, Instant),
}

/// Counts and persists billable operations.
#[derive(Debug)]
pub struct Billing {
    id_scope: String,
    metrics: Arc<Metrics>,
    hubs: SqliteHubDirectory,
    unmatched: Mutex<HashMap<String, Half>>,
}

fn operation_id_of(reply: &Reply) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    v.get("operationId")?.as_str().map(str::to_owned)
}

impl Billing {
    /// Bills the server's `id_scope` into `metrics` and the usage table of `hubs`.
    pub fn new(id_scope: String, metrics: Arc<Metrics>, hubs: SqliteHubDirectory) -> Self {
        Billing { id_scope, metrics, hubs, unmatched: Mutex::new(HashMap::new()) }
    }

    fn bill(&self, event: MeterEvent) {
        self.metrics.billable(event.operation, event.succeeded);
        let usage = UsageEvent {
            id_scope: self.id_scope.clone(),
            day: day_of(event.at),
            operation: event.operation.name().to_owned(),
            succeeded: event.succeeded,
        };
        if let Err(e) = self.hubs.record_usage(usage) {
            tracing::warn!(error = %e, "usage not recorded");
        }
    }

    /// Called for every reply about to be sent.
    pub fn on_reply(&self, reply: &Reply) {
        let Some(event) = reply.meter else { return };
        let deferred =
            event.operation == BillableOperation::DeviceRegister && event.succeeded && reply.status == 202;
        let operation_id = if deferred { operation_id_of(reply) } else { None };
        let Some(operation_id) = operation_id else { return self.bill(event) };
        let settled = {
            let mut map = self.unmatched.lock().unwrap_or_else(|e| e.into_inner());
            match map.remove(&operation_id) {
                Some(Half::Outcome(ok, _)) => Some(ok),
                Some(other) => {
                    map.insert(operation_id, other);
                    None
                }
                None => {
                    map.insert(operation_id, Half::Replied(event, Instant::now()));
                    None
                }
            }
        };
        if let Some(ok) = settled {
            self.bill(MeterEvent { succeeded: ok, ..event });
        }
        self.prune();
    }

    /// Called for every registration record committed durably.
    pub fn on_commit(&self, record: &RegistrationRecord) {
        let ok = match record.status {
            RegistrationStatus::Assigned | RegistrationStatus::Disabled => true,
            RegistrationStatus::Failed => false,
            _ => return,
        };
        let operation_id = record.operation_id.to_string();
        let replied = {
            let mut map = self.unmatched.lock().unwrap_or_else(|e| e.into_inner());
            match map.remove(&operation_id) {
                Some(Half::Replied(event, _)) => Some(event),
                _ => {
                    map.insert(operation_id, Half::Outcome(ok, Instant::now()));
                    None
                }
            }
        };
        if let Some(event) = replied {
            self.bill(MeterEvent { succeeded: ok, ..event });
        }
    }

    /// `202`s still waiting for their outcome.
    pub fn unsettled(&self) -> usize {
        let map = self.unmatched.lock().unwrap_or_else(|e| e.into_inner());
        map.values().filter(|h| matches!(h, Half::Replied(..))).count()
    }

    /// Bills every `202` still waiting as a failure (its assignment never finished). Call on shutdown,
    /// after the host drained its background flows.
    pub fn settle_all(&self) {
        let stale: Vec<MeterEvent> = {
            let mut map = self.unmatched.lock().unwrap_or_else(|e| e.into_inner());
            map.drain()
                .filter_map(|(_, h)| match h {
                    Half::Replied(e, _) => Some(e),
                    Half::Outcome(..) => None,
                })
                .collect()
        };
        for e in stale {
            self.bill(MeterEvent { succeeded: false, ..e });
        }
    }

    fn prune(&self) {
        let stale: Vec<MeterEvent> = {
            let mut map = self.unmatched.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() <= PRUNE_ABOVE {
                return;
            }
            let mut stale = Vec::new();
            map.retain(|_, h| match h {
                Half::Replied(e, at) if at.elapsed() > STALE_AFTER => {
                    stale.push(*e);
                    false
                }
                Half::Outcome(_, at) => at.elapsed() <= STALE_AFTER,
                Half::Replied(..) => true,
            });
            stale
        };
        for e in stale {
            self.bill(MeterEvent { succeeded: false, ..e });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of_unix(0), "1970-01-01");
        assert_eq!(day_of_unix(1_700_000_000), "2023-11-14");
    }
}
