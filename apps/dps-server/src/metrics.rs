//! Prometheus metrics (text exposition format 0.0.4), served on the admin listener's `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `dps_registrations_total` | counter | `transport` (https, mqtt, websocket, amqp, amqp_websocket), `status_class` (2xx, 4xx, 5xx), `error_code` (six digits, or empty) |
//! | `dps_registration_duration_seconds` | histogram | — (register requests, from complete request to reply) |
//! | `dps_requests_total` | counter | `api` (device, service, other), `status_class` |
//! | `dps_open_connections` | gauge | `transport` (https, mqtt, websocket, amqp, amqp_websocket, admin) |
//! | `dps_connections_total` | counter | `transport` |
//! | `dps_connections_refused_total` | counter | `reason` (limit, tls_handshake) |
//! | `dps_auth_throttled_total` | counter | — (device-API requests refused `429001` because their address made too many failed authentications) |
//! | `dps_store_commit_duration_seconds` | histogram | — (`CommitRegistration`, until durable) |
//! | `dps_store_batches_total`, `dps_store_rows_total` | counter | — (SQLite group-commit transactions and the writes they carried) |
//! | `dps_billable_operations_total` | counter | `operation` (spec §10.3, e.g. `device_register`), `outcome` (success, failure); a register by its final status |

use dps_core::BillableOperation;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A transport, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// HTTPS (device and service API).
    Https,
    /// MQTT over TLS.
    Mqtt,
    /// MQTT over WebSocket (on the HTTPS listener).
    WebSocket,
    /// The plain HTTP admin listener.
    Admin,
    /// AMQP 1.0 over TLS.
    Amqp,
    /// AMQP over WebSocket (on the HTTPS listener).
    AmqpWebSocket,
}

impl Transport {
    const ALL: [Transport; 6] = [
        Transport::Https,
        Transport::Mqtt,
        Transport::WebSocket,
        Transport::Admin,
        Transport::Amqp,
        Transport::AmqpWebSocket,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::WebSocket => "websocket",
            Transport::Admin => "admin",
            Transport::Amqp => "amqp",
            Transport::AmqpWebSocket => "amqp_websocket",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which API a request addressed, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Api {
    /// Device (runtime) API.
    Device,
    /// Service (management) API.
    Service,
    /// Anything else (health, unknown routes).
    Other,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Device => "device",
            Api::Service => "service",
            Api::Other => "other",
        }
    }
}

/// Why a connection was refused, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    Limit,
    /// The client address holds `max_connections_per_address` already.
    AddressLimit,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric of the server. Shared as part of [`crate::state::AppState`].
#[derive(Debug, Default)]
pub struct Metrics {
    registrations: Mutex<BTreeMap<(Transport, &'static str, u32), u64>>,
    requests: Mutex<BTreeMap<(Api, &'static str), u64>>,
    /// Register request latency.
    pub registration_latency: Histogram,
    /// `CommitRegistration` latency (until durable).
    pub store_commit_latency: Histogram,
    open: [AtomicI64; 6],
    accepted: [AtomicU64; 6],
    refused_limit: AtomicU64,
    refused_address: AtomicU64,
    refused_tls: AtomicU64,
    auth_throttled: AtomicU64,
    store_stats: Mutex<Option<(u64, u64)>>,
    gate: Mutex<dps_host::GateCounts>,
    billable: Mutex<BTreeMap<(BillableOperation, bool), u64>>,
}

impl Metrics {
    /// Counts a register request's reply.
    pub fn registration(&self, transport: Transport, status: u16, error_code: Option<u32>, took: Duration) {
        let key = (transport, status_class(status), error_code.unwrap_or(0));
        *self.registrations.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(0) += 1;
        self.registration_latency.observe(took);
    }

    /// Counts any request's reply.
    pub fn request(&self, api: Api, status: u16) {
        let key = (api, status_class(status));
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(0) += 1;
    }

    /// Counts one billable operation (spec §10.3) by outcome.
    pub fn billable(&self, operation: BillableOperation, succeeded: bool) {
        *self
            .billable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((operation, succeeded))
            .or_insert(0) += 1;
    }

    /// How many `operation` calls ended with `succeeded`.
    pub fn billable_count(&self, operation: BillableOperation, succeeded: bool) -> u64 {
        self.billable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(operation, succeeded))
            .copied()
            .unwrap_or(0)
    }

    /// Counts a refused connection.
    pub fn refused(&self, reason: Refusal) {
        match reason {
            Refusal::Limit => &self.refused_limit,
            Refusal::AddressLimit => &self.refused_address,
            Refusal::TlsHandshake => &self.refused_tls,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a device-API request refused because its address made too many failed authentications.
    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests [`auth_throttled`](Self::auth_throttled) counted.
    pub fn auth_throttled_count(&self) -> u64 {
        self.auth_throttled.load(Ordering::Relaxed)
    }

    /// Marks a connection open until the returned guard is dropped.
    pub fn open_connection(self: &std::sync::Arc<Self>, transport: Transport) -> ConnectionGuard {
        self.open[transport.index()].fetch_add(1, Ordering::Relaxed);
        self.accepted[transport.index()].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { metrics: std::sync::Arc::clone(self), transport }
    }

    /// Currently open connections of a transport.
    pub fn open_connections(&self, transport: Transport) -> i64 {
        self.open[transport.index()].load(Ordering::Relaxed)
    }

    /// Sets the host's rate-limit refusals and fault injections shown at the next render.
    pub fn set_gate_counts(&self, counts: dps_host::GateCounts) {
        *self.gate.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    /// Sets the store's write counters (batches, rows) shown at the next render.
    pub fn set_store_stats(&self, batches: u64, rows: u64) {
        *self.store_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some((batches, rows));
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP dps_registrations_total Device register requests by transport and outcome.\n");
        out.push_str("# TYPE dps_registrations_total counter\n");
        for ((t, class, code), n) in self.registrations.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let code = if *code == 0 { String::new() } else { code.to_string() };
            let _ = writeln!(
                out,
                "dps_registrations_total{{transport=\"{}\",status_class=\"{class}\",error_code=\"{code}\"}} {n}",
                t.label()
            );
        }
        self.registration_latency.render(
            &mut out,
            "dps_registration_duration_seconds",
            "Time from a complete register request to its reply.",
        );
        out.push_str("# HELP dps_requests_total Requests by API and status class.\n");
        out.push_str("# TYPE dps_requests_total counter\n");
        for ((api, class), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ =
                writeln!(out, "dps_requests_total{{api=\"{}\",status_class=\"{class}\"}} {n}", api.label());
        }
        out.push_str("# HELP dps_open_connections Currently open connections by transport.\n");
        out.push_str("# TYPE dps_open_connections gauge\n");
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "dps_open_connections{{transport=\"{}\"}} {}",
                t.label(),
                self.open_connections(t)
            );
        }
        out.push_str("# HELP dps_connections_total Accepted connections by transport.\n");
        out.push_str("# TYPE dps_connections_total counter\n");
        for t in Transport::ALL {
            let n = self.accepted[t.index()].load(Ordering::Relaxed);
            let _ = writeln!(out, "dps_connections_total{{transport=\"{}\"}} {n}", t.label());
        }
        out.push_str("# HELP dps_connections_refused_total Connections closed before serving them.\n");
        out.push_str("# TYPE dps_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "dps_connections_refused_total{{reason=\"limit\"}} {}\n\
             dps_connections_refused_total{{reason=\"address_limit\"}} {}\n\
             dps_connections_refused_total{{reason=\"tls_handshake\"}} {}",
            self.refused_limit.load(Ordering::Relaxed),
            self.refused_address.load(Ordering::Relaxed),
            self.refused_tls.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dps_auth_throttled_total Device requests refused (429001) after too many failed authentications from their address.\n\
             # TYPE dps_auth_throttled_total counter\ndps_auth_throttled_total {}",
            self.auth_throttled_count()
        );
        let gate = *self.gate.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(
            "# HELP dps_throttled_total Requests refused (429001) by a rate limit of [quotas].\n\
             # TYPE dps_throttled_total counter\n",
        );
        for limit in dps_host::Limit::ALL {
            let _ = writeln!(
                out,
                "dps_throttled_total{{limit=\"{}\"}} {}",
                limit.as_str(),
                gate.throttled(limit)
            );
        }
        out.push_str(
            "# HELP dps_faults_injected_total Device requests a fault rule ([[faults]]) affected, by fault kind.\n\
             # TYPE dps_faults_injected_total counter\n",
        );
        for kind in dps_host::fault::FaultKind::ALL {
            let _ = writeln!(
                out,
                "dps_faults_injected_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                gate.faults(kind)
            );
        }
        self.store_commit_latency.render(
            &mut out,
            "dps_store_commit_duration_seconds",
            "Time for a registration commit to become durable.",
        );
        out.push_str(
            "# HELP dps_billable_operations_total Billable DPS operations (spec 10.3) by outcome.\n",
        );
        out.push_str("# TYPE dps_billable_operations_total counter\n");
        for ((op, ok), n) in self.billable.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let outcome = if *ok { "success" } else { "failure" };
            let _ = writeln!(
                out,
                "dps_billable_operations_total{{operation=\"{}\",outcome=\"{outcome}\"}} {n}",
                op.name()
            );
        }
        if let Some((batches, rows)) = *self.store_stats.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = writeln!(
                out,
                "# HELP dps_store_batches_total Committed store write transactions.\n# TYPE dps_store_batches_total counter\ndps_store_batches_total {batches}\n\
                 # HELP dps_store_rows_total Store writes applied by those transactions.\n# TYPE dps_store_rows_total counter\ndps_store_rows_total {rows}"
            );
        }
        out
    }
}

/// Keeps a connection counted as open; decrements on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: std::sync::Arc<Metrics>,
    transport: Transport,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open[self.transport.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Arc::new(Metrics::default());
        m.registration(Transport::Https, 202, None, Duration::from_millis(3));
        m.registration(Transport::Mqtt, 401, Some(401000), Duration::from_millis(700));
        m.request(Api::Device, 202);
        {
            let _g = m.open_connection(Transport::Https);
            assert_eq!(m.open_connections(Transport::Https), 1);
        }
        assert_eq!(m.open_connections(Transport::Https), 0);
        m.refused(Refusal::Limit);
        m.billable(BillableOperation::DeviceRegister, true);
        m.billable(BillableOperation::DeviceRegister, false);
        m.billable(BillableOperation::DeviceRegister, true);
        let text = m.render();
        assert!(text
            .contains("dps_billable_operations_total{operation=\"device_register\",outcome=\"success\"} 2"));
        assert!(text
            .contains("dps_billable_operations_total{operation=\"device_register\",outcome=\"failure\"} 1"));
        assert!(text
            .contains("dps_registrations_total{transport=\"https\",status_class=\"2xx\",error_code=\"\"} 1"));
        assert!(text.contains(
            "dps_registrations_total{transport=\"mqtt\",status_class=\"4xx\",error_code=\"401000\"} 1"
        ));
        assert!(text.contains("dps_registration_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("dps_registration_duration_seconds_bucket{le=\"1\"} 2"));
        assert!(text.contains("dps_registration_duration_seconds_count 2"));
        assert!(text.contains("dps_connections_total{transport=\"https\"} 1"));
        assert!(text.contains("dps_connections_refused_total{reason=\"limit\"} 1"));
        assert!(text.contains("dps_requests_total{api=\"device\",status_class=\"2xx\"} 1"));
    }
}
