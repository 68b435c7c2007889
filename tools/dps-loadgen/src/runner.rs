//! Runs N devices with C in flight at once, shows progress on stderr, and aggregates the results.

use crate::cpu::{CpuMark, ServerCpu};
use crate::device::{register_device, Assignment, DeviceResult, DeviceSet, DriveOptions, Protocol, Target};
use crate::stats::{ErrorTally, LatencySummary, RunReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much load to generate.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Report label.
    pub label: String,
    /// Devices to register (device indexes `0..devices`).
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Device behaviour.
    pub drive: DriveOptions,
    /// Show a progress bar on stderr (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// A finished run: the report and every assignment (for verification against the store).
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The aggregated report.
    pub report: RunReport,
    /// The devices that were assigned, and where.
    pub assignments: Vec<Assignment>,
}

fn progress_bar(options: &LoadOptions) -> ProgressBar {
    let target = if options.progress && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(options.devices as u64), target);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} {elapsed_precise} [{wide_bar}] {pos}/{len} {per_sec} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(options.label.clone());
    bar
}

/// Registers `options.devices` devices of `set` against `target`, `options.concurrency` at a time, each on a
/// fresh connection; measures the server's CPU through `server_cpu`.
pub async fn run_load(
    protocol: Protocol,
    target: Arc<Target>,
    set: Arc<DeviceSet>,
    options: &LoadOptions,
    server_cpu: &ServerCpu,
) -> RunOutput {
    let bar = progress_bar(options);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let workers = options.concurrency.clamp(1, options.devices.max(1));
    let mark = CpuMark::now(server_cpu);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (target, set, next, failures, bar) =
            (target.clone(), set.clone(), next.clone(), failures.clone(), bar.clone());
        let (devices, drive) = (options.devices, options.drive);
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= devices {
                    break;
                }
                let result = register_device(protocol, &target, &set, index, &drive).await;
                if result.outcome.is_err() || !result.retried.is_empty() {
                    let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                    bar.set_message(format!("ERRORS {n}"));
                }
                bar.inc(1);
                results.push(result);
            }
            results
        }));
    }
    let mut results: Vec<DeviceResult> = Vec::with_capacity(options.devices);
    let mut lost_workers = 0usize;
    for task in tasks {
        match task.await {
            Ok(mut r) => results.append(&mut r),
            Err(_) => lost_workers += 1,
        }
    }
    let elapsed = started.elapsed();
    let cpu = mark.since(server_cpu);
    bar.finish_and_clear();
    let mut output = aggregate(&options.label, options.devices, options.concurrency, elapsed, results);
    output.report.cpu = cpu;
    if lost_workers > 0 {
        // A worker task panicked (a bug): its devices are counted as protocol failures rather than lost.
        let missing =
            options.devices.saturating_sub(output.report.assigned + output.report.failed.total() as usize);
        for _ in 0..missing {
            output.report.failed.record(&crate::stats::Incident::new(
                crate::stats::Failure::Protocol,
                "a load generator worker stopped unexpectedly",
            ));
        }
    }
    output
}

/// Aggregates per-device results into a report.
pub fn aggregate(
    label: &str,
    devices: usize,
    concurrency: usize,
    elapsed: Duration,
    results: Vec<DeviceResult>,
) -> RunOutput {
    let mut latencies = Vec::with_capacity(results.len());
    let mut handshakes = Vec::with_capacity(results.len());
    let mut failed = ErrorTally::new();
    let mut retried = ErrorTally::new();
    let mut assignments = Vec::with_capacity(results.len());
    let mut requests = 0u64;
    let mut tls = std::collections::BTreeMap::new();
    for r in results {
        requests += u64::from(r.requests);
        if let Some(t) = r.tls {
            *tls.entry(t).or_insert(0u64) += 1;
        }
        if let Some(h) = r.handshake {
            handshakes.push(h);
        }
        for incident in &r.retried {
            retried.record(incident);
        }
        match r.outcome {
            Ok(a) => {
                latencies.push(r.latency);
                assignments.push(a);
            }
            Err(incident) => failed.record(&incident),
        }
    }
    let report = RunReport {
        label: label.to_owned(),
        devices,
        concurrency,
        assigned: assignments.len(),
        elapsed,
        latency: LatencySummary::of(latencies),
        handshake: LatencySummary::of(handshakes),
        tls,
        requests,
        failed,
        retried,
        cpu: Default::default(),
    };
    RunOutput { report, assignments }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Failure, Incident};

    fn ok(id: &str, ms: u64) -> DeviceResult {
        DeviceResult {
            outcome: Ok(Assignment {
                registration_id: id.into(),
                assigned_hub: "hub".into(),
                device_id: id.into(),
            }),
            latency: Duration::from_millis(ms),
            handshake: Some(Duration::from_millis(1)),
            tls: Some("TLSv1_3".into()),
            requests: 2,
            retried: Vec::new(),
        }
    }

    #[test]
    fn aggregation_counts_failures_by_code_and_retries_separately() {
        let mut throttled = ok("c", 30);
        throttled.retried.push(Incident::new(Failure::Code(429001), "slow down"));
        throttled.requests = 3;
        let results = vec![
            ok("a", 10),
            ok("b", 20),
            throttled,
            DeviceResult {
                outcome: Err(Incident::new(Failure::Code(401000), "bad key")),
                latency: Duration::from_millis(5),
                handshake: Some(Duration::from_millis(1)),
                tls: Some("TLSv1_3".into()),
                requests: 1,
                retried: Vec::new(),
            },
            DeviceResult {
                outcome: Err(Incident::new(Failure::Tls, "handshake")),
                latency: Duration::from_millis(1),
                handshake: None,
                tls: None,
                requests: 0,
                retried: Vec::new(),
            },
        ];
        let out = aggregate("t", 5, 2, Duration::from_secs(1), results);
        let r = &out.report;
        assert_eq!(r.assigned, 3);
        assert_eq!(out.assignments.len(), 3);
        assert_eq!(r.requests, 8);
        assert_eq!(r.failed.count(Failure::Code(401000)), 1);
        assert_eq!(r.failed.count(Failure::Tls), 1);
        assert_eq!(r.retried.count(Failure::Code(429001)), 1);
        assert_eq!(r.errors().total(), 3);
        assert!(!r.is_clean());
        // Latency only of successful registrations.
        assert_eq!(r.latency.count, 3);
        assert_eq!(r.latency.p50, Duration::from_millis(20));
        assert_eq!(r.handshake.count, 4);
        assert_eq!(r.tls.get("TLSv1_3"), Some(&4));
    }
}
