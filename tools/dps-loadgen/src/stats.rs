//! Results: latency percentiles, error accounting by DPS error code, and the report of one run.

use dps_core::proto::ErrorCode;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Why a request or a whole registration did not succeed.
///
/// Everything the service answered is counted by its six-digit DPS error code; what happened below the
/// protocol (connect, TLS, a dropped connection) has its own kind, so nothing is lumped together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The service answered with this DPS error code: an HTTP/MQTT error reply (the `errorCode` of its body,
    /// or `status * 1000` when the body has none), or a registration that ended `failed` with this code.
    Code(u32),
    /// The registration ended with status `disabled`.
    Disabled,
    /// The TCP connection could not be opened.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The connection broke during the exchange (reset, closed early, HTTP framing error).
    Connection,
    /// The MQTT CONNACK refused the connection with this return code.
    ConnAckRefused(u8),
    /// The server answered something the protocol does not allow (unparseable answer, wrong `$rid`,
    /// a refused subscription, an `assigned` result without hub).
    Protocol,
    /// The device gave up after too many requests without a final answer.
    GaveUp,
    /// The whole registration took longer than the timeout.
    Timeout,
}

impl Failure {
    /// The failure for a service error reply: its body's `errorCode`, else `status * 1000`.
    pub fn from_reply(status: u16, body: &[u8]) -> Failure {
        match serde_json::from_slice::<dps_core::proto::ErrorBody>(body) {
            Ok(e) if e.error_code != 0 => Failure::Code(e.error_code),
            _ => Failure::Code(u32::from(status) * 1000),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Code(code) => match ErrorCode::from_code(*code) {
                Some(known) => write!(f, "{code} {}", known.name()),
                None => write!(f, "{code}"),
            },
            Failure::Disabled => f.write_str("registration disabled"),
            Failure::Connect => f.write_str("transport: connect failed"),
            Failure::Tls => f.write_str("transport: TLS handshake failed"),
            Failure::Connection => f.write_str("transport: connection broken"),
            Failure::ConnAckRefused(code) => write!(f, "mqtt: CONNACK refused (return code {code})"),
            Failure::Protocol => f.write_str("protocol violation"),
            Failure::GaveUp => f.write_str("gave up (too many requests)"),
            Failure::Timeout => f.write_str("timeout"),
        }
    }
}

/// One failure with the detail that explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    /// The kind (and DPS code) of the failure.
    pub failure: Failure,
    /// The service's message or the transport error.
    pub message: String,
}

impl Incident {
    /// A failure with its message.
    pub fn new(failure: Failure, message: impl Into<String>) -> Incident {
        Incident { failure, message: message.into() }
    }
}

impl fmt::Display for Incident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.failure, self.message)
    }
}

/// Counts of failures by kind, keeping the first message seen for each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorTally {
    counts: BTreeMap<Failure, (u64, String)>,
}

impl ErrorTally {
    /// An empty tally.
    pub fn new() -> ErrorTally {
        ErrorTally::default()
    }

    /// Counts one incident.
    pub fn record(&mut self, incident: &Incident) {
        self.add(incident.failure, 1, &incident.message);
    }

    fn add(&mut self, failure: Failure, n: u64, message: &str) {
        let entry = self.counts.entry(failure).or_insert_with(|| (0, message.to_owned()));
        entry.0 += n;
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &ErrorTally) {
        for (failure, (n, message)) in &other.counts {
            self.add(*failure, *n, message);
        }
    }

    /// How many incidents of this kind were counted.
    pub fn count(&self, failure: Failure) -> u64 {
        self.counts.get(&failure).map_or(0, |(n, _)| *n)
    }

    /// Total incidents.
    pub fn total(&self) -> u64 {
        self.counts.values().map(|(n, _)| n).sum()
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// `(failure, count, first message)`, ordered by failure (DPS codes ascending first).
    pub fn entries(&self) -> impl Iterator<Item = (Failure, u64, &str)> {
        self.counts.iter().map(|(f, (n, m))| (*f, *n, m.as_str()))
    }

    /// A one-line summary such as `401000 Unauthorized x3, transport: connect failed x1`, or `none`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "none".to_owned();
        }
        self.entries().map(|(f, n, _)| format!("{f} x{n}")).collect::<Vec<_>>().join(", ")
    }
}

/// The `p`-th percentile (0 < p <= 100) of **sorted** values by the nearest-rank method: the smallest value
/// such that at least `p` percent of the values are less than or equal to it. `None` when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let p = p.clamp(0.0, 100.0);
    // The rank is ceil(p/100 * n), at least 1. Computed in integers where possible to avoid 0.9 * 10 =
    // 9.000000000000002 rounding up to 10.
    let scaled = p / 100.0 * n as f64;
    let rounded = scaled.round();
    let rank = if (scaled - rounded).abs() < 1e-9 { rounded } else { scaled.ceil() };
    let rank = (rank as usize).clamp(1, n);
    sorted.get(rank - 1).copied()
}

/// A latency distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: usize,
    /// Smallest.
    pub min: Duration,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl LatencySummary {
    /// Summarises samples (in any order; sorts them). All zero when empty.
    pub fn of(mut samples: Vec<Duration>) -> LatencySummary {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let count = samples.len();
        let at = |p| percentile(&samples, p).unwrap_or_default();
        LatencySummary {
            count,
            min: samples[0],
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: samples[count - 1],
            mean: total / u32::try_from(count).unwrap_or(u32::MAX),
        }
    }
}

/// Formats a duration as milliseconds with one decimal (`12.3 ms`).
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time used during a run, where it could be measured (Linux `/proc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuUse {
    /// CPU time of the server (the spawned `dps-server` process, or the baseline server's threads).
    pub server: Option<Duration>,
    /// CPU time of the load generator's own client side.
    pub client: Option<Duration>,
    /// CPU time used on the whole machine (every core, every process) during the run.
    pub machine_busy: Option<Duration>,
    /// CPU time available on the whole machine during the run (cores × wall time).
    pub machine_total: Option<Duration>,
}

impl CpuUse {
    /// The share of the machine's CPU that was busy, 0..=1.
    pub fn machine_load(&self) -> Option<f64> {
        let (busy, total) = (self.machine_busy?, self.machine_total?);
        (!total.is_zero()).then(|| busy.as_secs_f64() / total.as_secs_f64())
    }

    /// The share of the machine's CPU used by other processes than the server and the load generator.
    pub fn others_load(&self) -> Option<f64> {
        let (busy, total) = (self.machine_busy?, self.machine_total?);
        let ours = self.server.unwrap_or_default() + self.client?;
        (!total.is_zero()).then(|| busy.saturating_sub(ours).as_secs_f64() / total.as_secs_f64())
    }
}

/// The outcome of one load run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// What was run (`baseline https`, `https`, `mqtt`, ...).
    pub label: String,
    /// Devices attempted.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Devices that ended assigned.
    pub assigned: usize,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
    /// Latency of whole registrations (connect → assigned), successful devices only.
    pub latency: LatencySummary,
    /// Time to open the TCP connection and finish the TLS handshake.
    pub handshake: LatencySummary,
    /// Connections by what their TLS handshake negotiated.
    pub tls: BTreeMap<String, u64>,
    /// Requests sent (register + polls + retries), all devices.
    pub requests: u64,
    /// Devices that did not end assigned, by the reason that ended them.
    pub failed: ErrorTally,
    /// Error replies that the client retried (429, 5xx), by code; each also counts as an error of the run.
    pub retried: ErrorTally,
    /// CPU time used, when measured.
    pub cpu: CpuUse,
}

impl RunReport {
    /// Successful registrations per second of wall time (each one is a new TLS connection).
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.assigned as f64 / secs
        } else {
            0.0
        }
    }

    /// Every error of the run: failed devices plus retried error replies.
    pub fn errors(&self) -> ErrorTally {
        let mut all = self.failed.clone();
        all.merge(&self.retried);
        all
    }

    /// Whether the run had no error at all and every device was assigned.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty() && self.retried.is_empty() && self.assigned == self.devices
    }

    /// Server CPU time per successful registration, when measured.
    pub fn server_cpu_per_registration(&self) -> Option<Duration> {
        per(self.cpu.server, self.assigned)
    }

    /// The rate this run's CPU cost allows when the server and the load generator have the machine's `cores`
    /// to themselves: `cores / (server CPU + load generator CPU per registration)`. Unlike [`RunReport::rate`]
    /// it does not depend on what other processes take from the machine during the run.
    pub fn cpu_bound_rate(&self, cores: f64) -> Option<f64> {
        let per = self.server_cpu_per_registration()? + self.client_cpu_per_registration()?;
        (!per.is_zero()).then(|| cores / per.as_secs_f64())
    }

    /// Client CPU time per successful registration, when measured.
    pub fn client_cpu_per_registration(&self) -> Option<Duration> {
        per(self.cpu.client, self.assigned)
    }
}

fn per(total: Option<Duration>, n: usize) -> Option<Duration> {
    let n = u32::try_from(n).ok().filter(|n| *n > 0)?;
    total.map(|t| t / n)
}

/// Formats a per-registration CPU time in microseconds, or `-`.
pub fn us(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.0} us", d.as_secs_f64() * 1e6))
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.label)?;
        writeln!(
            f,
            "devices {}  concurrency {}  assigned {}  failed {}  elapsed {:.2} s",
            self.devices,
            self.concurrency,
            self.assigned,
            self.devices - self.assigned.min(self.devices),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "rate {:.0} registrations/s (one new TLS connection each)", self.rate())?;
        let l = &self.latency;
        writeln!(
            f,
            "registration latency  p50 {}  p90 {}  p99 {}  max {}  mean {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.max),
            ms(l.mean)
        )?;
        let h = &self.handshake;
        writeln!(f, "connect + TLS handshake  p50 {}  p90 {}  p99 {}", ms(h.p50), ms(h.p90), ms(h.p99))?;
        if !self.tls.is_empty() {
            let parts: Vec<String> = self.tls.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            writeln!(f, "TLS: {}", parts.join(", "))?;
        }
        writeln!(
            f,
            "requests {} ({:.2} per device)",
            self.requests,
            self.requests as f64 / self.devices.max(1) as f64
        )?;
        if self.cpu.server.is_some() || self.cpu.client.is_some() {
            writeln!(
                f,
                "CPU per registration  server {}  load generator {}",
                us(self.server_cpu_per_registration()),
                us(self.client_cpu_per_registration())
            )?;
        }
        if let Some(load) = self.cpu.machine_load() {
            write!(f, "machine CPU busy {:.0}%", load * 100.0)?;
            match self.cpu.others_load() {
                Some(others) => writeln!(f, " (other processes {:.0}%)", others * 100.0)?,
                None => writeln!(f)?,
            }
        }
        let errors = self.errors();
        if errors.is_empty() {
            writeln!(f, "errors: none")?;
        } else {
            writeln!(f, "ERRORS: {} in total", errors.total())?;
            for (failure, n, message) in self.failed.entries() {
                writeln!(f, "  {n:>8} devices failed: {failure} (first: {message})")?;
            }
            for (failure, n, message) in self.retried.entries() {
                writeln!(f, "  {n:>8} error replies retried: {failure} (first: {message})")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_vec(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = ms_vec(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&s, 90.0), Some(Duration::from_millis(9)));
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&s, 100.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&s, 10.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&s, 11.0), Some(Duration::from_millis(2)));
        assert_eq!(percentile(&s, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
        let one = ms_vec(&[42]);
        assert_eq!(percentile(&one, 1.0), Some(Duration::from_millis(42)));
        assert_eq!(percentile(&one, 99.0), Some(Duration::from_millis(42)));
    }

    #[test]
    fn percentiles_of_a_thousand() {
        let s: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_micros(500)));
        assert_eq!(percentile(&s, 90.0), Some(Duration::from_micros(900)));
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_micros(990)));
        assert_eq!(percentile(&s, 99.9), Some(Duration::from_micros(999)));
    }

    #[test]
    fn summary_sorts_and_averages() {
        let s = LatencySummary::of(ms_vec(&[30, 10, 20, 40]));
        assert_eq!(s.count, 4);
        assert_eq!(s.min, Duration::from_millis(10));
        assert_eq!(s.p50, Duration::from_millis(20));
        assert_eq!(s.p90, Duration::from_millis(40));
        assert_eq!(s.max, Duration::from_millis(40));
        assert_eq!(s.mean, Duration::from_millis(25));
        assert_eq!(LatencySummary::of(Vec::new()), LatencySummary::default());
    }

    #[test]
    fn tally_counts_by_code_and_keeps_first_message() {
        let mut t = ErrorTally::new();
        assert!(t.is_empty());
        assert_eq!(t.summary(), "none");
        t.record(&Incident::new(Failure::Code(401000), "wrong key"));
        t.record(&Incident::new(Failure::Code(401000), "second"));
        t.record(&Incident::new(Failure::Connect, "refused"));
        assert_eq!(t.count(Failure::Code(401000)), 2);
        assert_eq!(t.count(Failure::Connect), 1);
        assert_eq!(t.count(Failure::Tls), 0);
        assert_eq!(t.total(), 3);
        let entries: Vec<_> = t.entries().collect();
        assert_eq!(entries[0], (Failure::Code(401000), 2, "wrong key"));
        assert_eq!(t.summary(), "401000 Unauthorized x2, transport: connect failed x1");

        let mut u = ErrorTally::new();
        u.record(&Incident::new(Failure::Code(429001), "slow down"));
        u.record(&Incident::new(Failure::Code(401000), "third"));
        t.merge(&u);
        assert_eq!(t.count(Failure::Code(401000)), 3);
        assert_eq!(t.count(Failure::Code(429001)), 1);
        assert_eq!(t.total(), 5);
    }

    #[test]
    fn failure_from_reply_uses_body_code_or_status() {
        let body =
            br#"{"errorCode":401002,"trackingId":"t","message":"Invalid certificate.","timestampUtc":"x"}"#;
        assert_eq!(Failure::from_reply(401, body), Failure::Code(401002));
        assert_eq!(Failure::from_reply(503, b"<html>busy</html>"), Failure::Code(503000));
        assert_eq!(Failure::Code(404204).to_string(), "404204 OperationNotFound");
        assert_eq!(Failure::Code(599123).to_string(), "599123");
    }

    #[test]
    fn machine_shares() {
        let cpu = CpuUse {
            server: Some(Duration::from_millis(300)),
            client: Some(Duration::from_millis(500)),
            machine_busy: Some(Duration::from_millis(1200)),
            machine_total: Some(Duration::from_millis(2000)),
        };
        assert!((cpu.machine_load().unwrap() - 0.6).abs() < 1e-9);
        assert!((cpu.others_load().unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(CpuUse::default().machine_load(), None);
    }

    #[test]
    fn report_cleanliness_and_rate() {
        let mut r = RunReport {
            label: "x".into(),
            devices: 10,
            concurrency: 2,
            assigned: 10,
            elapsed: Duration::from_secs(2),
            latency: LatencySummary::default(),
            handshake: LatencySummary::default(),
            tls: BTreeMap::new(),
            requests: 20,
            failed: ErrorTally::new(),
            retried: ErrorTally::new(),
            cpu: CpuUse { server: Some(Duration::from_millis(5)), ..CpuUse::default() },
        };
        assert!(r.is_clean());
        assert!((r.rate() - 5.0).abs() < 1e-9);
        assert_eq!(r.server_cpu_per_registration(), Some(Duration::from_micros(500)));
        assert_eq!(r.client_cpu_per_registration(), None);
        assert_eq!(r.cpu_bound_rate(2.0), None);
        r.cpu.client = Some(Duration::from_millis(15));
        // 500 us + 1500 us per registration on 2 cores: 1000 registrations/s.
        assert!((r.cpu_bound_rate(2.0).unwrap() - 1000.0).abs() < 1e-6);
        assert!(r.to_string().contains("errors: none"));
        r.retried.record(&Incident::new(Failure::Code(429001), "throttled"));
        assert!(!r.is_clean());
        assert_eq!(r.errors().total(), 1);
        assert!(r.to_string().contains("ERRORS: 1"));
        r.retried = ErrorTally::new();
        r.assigned = 9;
        assert!(!r.is_clean());
    }
}
