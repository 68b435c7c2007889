//! Usage metering (spec §10.3): every billable operation is counted in the Prometheus counters
//! (`dps_billable_operations_total`) and in the per-scope, per-day usage table of the hub database
//! (`hubs.sqlite3`), which `dps-server admin usage` prints.
//!
//! The engine decides what is billed and how: a reply carries a [`MeterEvent`] when it completes a
//! billable call (service operations; a register refused before any commit, as a failure), and a register
//! that reaches a commit is billed by its **outcome**, at its terminal commit ([`dps_core::register_meter`]:
//! `assigned`/`disabled` success, `failed` failure), which the store wrapper reports to [`Billing::bill`].
//! So a register that ends `failed` after its `202` is never billed as a success, whether the server
//! answered early or last.

use crate::metrics::Metrics;
use dps_core::{MeterEvent, Reply, Timestamp};
use dps_store::{SqliteHubDirectory, UsageEvent};
use std::sync::Arc;

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

/// Counts and persists billable operations.
#[derive(Debug)]
pub struct Billing {
    id_scope: String,
    metrics: Arc<Metrics>,
    hubs: SqliteHubDirectory,
}

impl Billing {
    /// Bills the server's `id_scope` into `metrics` and the usage table of `hubs`.
    pub fn new(id_scope: String, metrics: Arc<Metrics>, hubs: SqliteHubDirectory) -> Self {
        Billing { id_scope, metrics, hubs }
    }

    /// Counts one billable event.
    pub fn bill(&self, event: MeterEvent) {
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
        if let Some(event) = reply.meter {
            self.bill(event);
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
