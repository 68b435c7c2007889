//! The comparison: baseline runs (bare rustls + hyper / bare MQTT, fixed replies, in this process) and real
//! runs against a server — optionally spawned here on a temporary data directory, stopped and restarted to
//! check that every assignment was durably committed — summarised as a markdown table for `BENCHMARKS.md`.

use crate::baseline::{BaselineProcess, BaselineServer, FixedReplies};
use crate::cpu::ServerCpu;
use crate::device::{Assignment, DeviceSet, DriveOptions, Protocol, Target};
use crate::runner::{run_load, LoadOptions, RunOutput};
use crate::server::{ServerSettings, SpawnedServer, StopSignal};
use crate::service::{verify_assignments, ConnectionString, ServiceClient, Verification};
use crate::stats::{ms, us, RunReport};
use crate::tls::{client_config, server_name, BaselineClientAuth, TlsOptions};
use crate::x509::{DeviceCa, DEVICE_CA_NAME};
use crate::Error;
use dps_core::proto::sas::SymmetricKey;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A server's device endpoints and how to trust it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// HTTPS address.
    pub https: SocketAddr,
    /// MQTT-over-TLS address.
    pub mqtt: SocketAddr,
    /// AMQP-over-TLS address.
    pub amqp: SocketAddr,
    /// Name verified against the server certificate (and sent as `Host`).
    pub server_name: String,
    /// Client TLS configuration trusting the server's CA.
    pub tls: Arc<rustls::ClientConfig>,
}

impl Endpoint {
    /// An endpoint trusting the CA certificates in `ca_pem`.
    pub fn new(
        https: SocketAddr,
        mqtt: SocketAddr,
        amqp: SocketAddr,
        server_name: &str,
        ca_pem: &[u8],
        tls: impl Into<TlsOptions>,
    ) -> Result<Endpoint, Error> {
        let tls = client_config(ca_pem, tls)?;
        Ok(Endpoint { https, mqtt, amqp, server_name: server_name.to_owned(), tls })
    }

    /// The devices' target for a protocol.
    pub fn target(&self, protocol: Protocol) -> Result<Target, Error> {
        let addr = match protocol.transport() {
            Protocol::Mqtt => self.mqtt,
            Protocol::Amqp => self.amqp,
            _ => self.https,
        };
        let host_header = match protocol.transport() {
            Protocol::Https if self.https.port() != 443 => {
                format!("{}:{}", self.server_name, self.https.port())
            }
            _ => self.server_name.clone(),
        };
        Ok(Target { addr, server_name: server_name(&self.server_name)?, tls: self.tls.clone(), host_header })
    }
}

/// The load of every run.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// Devices per run.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Registration ID prefix (each protocol's runs add `-https` / `-mqtt` / `-x509` / `-x509-mqtt`).
    pub prefix: String,
    /// Device behaviour.
    pub drive: DriveOptions,
    /// Progress bars on stderr.
    pub progress: bool,
    /// What the devices offer in their TLS handshakes.
    pub tls: TlsOptions,
    /// Worker threads of the baseline server's runtime.
    pub baseline_threads: usize,
    /// The baseline requests an optional client certificate in each handshake (as a DPS server must for
    /// X.509 attestation).
    pub baseline_client_auth: bool,
    /// The program to run the baseline server as a process of its own (this binary; its hidden
    /// `baseline-server` command), or None to run it inside the load generator's process.
    pub baseline_process: Option<std::path::PathBuf>,
}

impl LoadSettings {
    fn options(&self, label: String) -> LoadOptions {
        LoadOptions {
            label,
            devices: self.devices,
            concurrency: self.concurrency,
            drive: self.drive,
            progress: self.progress,
        }
    }

    /// The registration ID prefix of a protocol's devices.
    pub fn prefix_for(&self, protocol: Protocol) -> String {
        format!("{}-{}", self.prefix, protocol.as_str())
    }
}

/// The ID scope of baseline runs when no server is involved.
pub const BASELINE_SCOPE: &str = "0ne00000A11";

/// The hub named in the baseline's `assigned` reply (the same length as a spawned server's hubs).
pub const BASELINE_HUB: &str = "hub-1.loadgen.localhost";

/// Runs the load against a fresh baseline server bound on `bind` (port chosen by the system): in a process
/// of its own when `load.baseline_process` names the program (see [`crate::baseline`] for why).
pub async fn run_baseline(
    protocol: Protocol,
    set: Arc<DeviceSet>,
    load: &LoadSettings,
    bind: IpAddr,
) -> Result<RunOutput, Error> {
    let scope = set.id_scope().as_str().to_owned();
    let registration_id = set.registration_id(0);
    let client_auth = baseline_client_auth(protocol, &set, load)?;
    let label = format!(
        "baseline {} (bare rustls + {}, fixed replies{}{})",
        protocol.as_str(),
        bare(protocol),
        client_auth.describe(),
        if load.baseline_process.is_none() { ", in the load generator's process" } else { "" }
    );
    let Some(exe) = load.baseline_process.clone() else {
        let replies = FixedReplies::from_engine(&scope, &registration_id, BASELINE_HUB)?;
        let server = BaselineServer::start_with(bind, replies, load.baseline_threads, &client_auth)?;
        let endpoint = Endpoint::new(
            server.https_addr(),
            server.mqtt_addr(),
            server.amqp_addr(),
            &bind.to_string(),
            server.ca_pem().as_bytes(),
            load.tls,
        )?;
        let target = Arc::new(endpoint.target(protocol)?);
        let output = run_load(protocol, target, set, &load.options(label), &server.cpu()).await;
        drop(server);
        return Ok(output);
    };
    let threads = load.baseline_threads;
    let server = tokio::task::spawn_blocking(move || {
        BaselineProcess::start(&exe, bind, &scope, &registration_id, threads, &client_auth)
    })
    .await
    .map_err(|e| Error::Config(format!("starting the baseline server process: {e}")))??;
    let ready = server.ready().clone();
    let endpoint = Endpoint::new(
        ready.https,
        ready.mqtt,
        ready.amqp,
        &bind.to_string(),
        ready.ca_pem.as_bytes(),
        load.tls,
    )?;
    let target = Arc::new(endpoint.target(protocol)?);
    let output = run_load(protocol, target, set, &load.options(label), &server.cpu()).await;
    let _ = tokio::task::spawn_blocking(move || drop(server)).await;
    Ok(output)
}

/// How the baseline of `protocol` treats client certificates: X.509 devices' baseline requires and verifies
/// them against the set's root; otherwise as `--baseline-client-auth` says.
fn baseline_client_auth(
    protocol: Protocol,
    set: &DeviceSet,
    load: &LoadSettings,
) -> Result<BaselineClientAuth, Error> {
    if protocol.is_x509() {
        let devices = set.x509_devices().ok_or_else(|| {
            Error::Config(format!("the {} devices have no certificates", protocol.as_str()))
        })?;
        return Ok(BaselineClientAuth::Required { roots_pem: devices.root_pem.clone() });
    }
    Ok(if load.baseline_client_auth { BaselineClientAuth::Optional } else { BaselineClientAuth::Off })
}

fn bare(protocol: Protocol) -> &'static str {
    match protocol.transport() {
        Protocol::Mqtt => "MQTT codec",
        Protocol::Amqp => "fe2o3-amqp acceptor",
        _ => "hyper",
    }
}

/// Runs the load against a server.
pub async fn run_server(
    protocol: Protocol,
    endpoint: &Endpoint,
    set: Arc<DeviceSet>,
    load: &LoadSettings,
    server_cpu: &ServerCpu,
    name: &str,
) -> Result<RunOutput, Error> {
    let target = Arc::new(endpoint.target(protocol)?);
    let label = format!("{name} {}", protocol.as_str());
    Ok(run_load(protocol, target, set, &load.options(label), server_cpu).await)
}

/// One protocol's pair of runs in one round.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The protocol.
    pub protocol: Protocol,
    /// The round (0-based).
    pub round: usize,
    /// The baseline run, if one was made.
    pub baseline: Option<RunReport>,
    /// The server run.
    pub server: RunReport,
}

impl Comparison {
    /// Server rate / baseline rate.
    pub fn rate_ratio(&self) -> Option<f64> {
        let b = self.baseline.as_ref()?.rate();
        (b > 0.0).then(|| self.server.rate() / b)
    }

    /// Server CPU-bound rate / baseline CPU-bound rate on `cores` cores.
    pub fn cpu_bound_ratio(&self, cores: f64) -> Option<f64> {
        let b = self.baseline.as_ref()?.cpu_bound_rate(cores)?;
        Some(self.server.cpu_bound_rate(cores)? / b)
    }
}

/// Everything a bench produced.
#[derive(Debug, Clone, Default)]
pub struct BenchResult {
    /// Per round and protocol, in the order run.
    pub comparisons: Vec<Comparison>,
    /// Cores of the machine (for CPU-bound rates).
    pub cores: f64,
    /// The durability check, if made.
    pub verification: Option<Verification>,
    /// How the verification was made (e.g. "after SIGTERM and a restart").
    pub verification_method: String,
    /// What was measured on what (printed under the table).
    pub notes: Vec<String>,
    /// The command line, for the record.
    pub command: String,
}

/// The median of some values (the mean of the middle two for an even count); `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

impl BenchResult {
    /// Whether every run was clean and the verification (if any) passed.
    pub fn is_ok(&self) -> bool {
        self.comparisons
            .iter()
            .all(|c| c.server.is_clean() && c.baseline.as_ref().is_none_or(RunReport::is_clean))
            && self.verification.as_ref().is_none_or(Verification::is_ok)
    }

    fn rounds(&self) -> usize {
        self.comparisons.iter().map(|c| c.round + 1).max().unwrap_or(0)
    }

    /// Per protocol: the median over rounds of the measured rate ratio and of the CPU-bound ratio.
    pub fn median_ratios(&self) -> Vec<(Protocol, Option<f64>, Option<f64>)> {
        let mut protocols: Vec<Protocol> = Vec::new();
        for c in &self.comparisons {
            if !protocols.contains(&c.protocol) {
                protocols.push(c.protocol);
            }
        }
        protocols
            .into_iter()
            .map(|p| {
                let of = |f: &dyn Fn(&Comparison) -> Option<f64>| {
                    median(self.comparisons.iter().filter(|c| c.protocol == p).filter_map(f).collect())
                };
                (p, of(&|c| c.rate_ratio()), of(&|c| c.cpu_bound_ratio(self.cores)))
            })
            .collect()
    }

    /// The markdown section body: command, table, summary, durability line, notes.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        if !self.command.is_empty() {
            let _ = writeln!(s, "```sh\n{}\n```\n", self.command);
        }
        let _ = writeln!(
            s,
            "| run | devices | concurrency | registrations/s | ratio to baseline | CPU-bound registrations/s | CPU-bound ratio | p50 | p90 | p99 | server CPU / registration | load generator CPU / registration | machine CPU busy (other processes) | errors |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        let rounds = self.rounds();
        for c in &self.comparisons {
            let https_baseline = self
                .comparisons
                .iter()
                .find(|h| h.round == c.round && h.protocol == Protocol::Https)
                .and_then(|h| h.baseline.as_ref());
            let suffix = if rounds > 1 { format!(", round {}", c.round + 1) } else { String::new() };
            if let Some(b) = &c.baseline {
                row(&mut s, b, &suffix, "1.00".to_owned(), "1.00".to_owned(), self.cores);
            }
            let mut rate = fmt_ratio(c.rate_ratio());
            let mut cpu = fmt_ratio(c.cpu_bound_ratio(self.cores));
            let hashed = self
                .comparisons
                .iter()
                .find(|h| h.round == c.round && h.protocol == Protocol::Https)
                .map(|h| &h.server);
            if let (Protocol::Custom, Some(h)) = (c.protocol, hashed) {
                let vs = |x: Option<f64>, y: Option<f64>| fmt_ratio(x.zip(y).map(|(x, y)| x / y));
                rate = format!("{rate} ({} of hashed https)", vs(Some(c.server.rate()), Some(h.rate())));
                cpu = format!(
                    "{cpu} ({} of hashed https)",
                    vs(c.server.cpu_bound_rate(self.cores), h.cpu_bound_rate(self.cores))
                );
            }
            if let (Protocol::Mqtt | Protocol::X509 | Protocol::X509Mqtt | Protocol::Amqp, Some(h)) =
                (c.protocol, https_baseline)
            {
                let vs = |x: Option<f64>, y: Option<f64>| fmt_ratio(x.zip(y).map(|(x, y)| x / y));
                rate = format!("{rate} ({} of HTTPS baseline)", vs(Some(c.server.rate()), Some(h.rate())));
                cpu = format!(
                    "{cpu} ({} of HTTPS baseline)",
                    vs(c.server.cpu_bound_rate(self.cores), h.cpu_bound_rate(self.cores))
                );
            }
            row(&mut s, &c.server, &suffix, rate, cpu, self.cores);
        }
        let medians = self.median_ratios();
        if rounds > 1 && !medians.is_empty() {
            let parts: Vec<String> = medians
                .iter()
                .map(|(p, r, c)| format!("{} {} (CPU-bound {})", p.as_str(), fmt_ratio(*r), fmt_ratio(*c)))
                .collect();
            let _ = writeln!(s, "\nMedian ratio to the baseline over {rounds} rounds: {}.", parts.join("; "));
        }
        let custom_vs_hashed: Vec<f64> = self
            .comparisons
            .iter()
            .filter(|c| c.protocol == Protocol::Custom)
            .filter_map(|c| {
                let h =
                    self.comparisons.iter().find(|h| h.round == c.round && h.protocol == Protocol::Https)?;
                (h.server.rate() > 0.0).then(|| c.server.rate() / h.server.rate())
            })
            .collect();
        if let Some(m) = median(custom_vs_hashed) {
            let _ =
                writeln!(s, "\nCustom allocation (webhook) / hashed allocation, median over rounds: {m:.2}.");
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(s, "\nDurability ({}): {}", self.verification_method, v.summary());
        }
        for note in &self.notes {
            let _ = writeln!(s, "\n{note}");
        }
        s
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
}

fn row(s: &mut String, r: &RunReport, suffix: &str, ratio: String, cpu_ratio: String, cores: f64) {
    let percent = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{:.0}%", x * 100.0));
    let machine = format!("{} ({})", percent(r.cpu.machine_load()), percent(r.cpu.others_load()));
    let cpu_bound = r.cpu_bound_rate(cores).map_or_else(|| "-".to_owned(), |x| format!("{x:.0}"));
    let errors = r.errors();
    let errors = if errors.is_empty() && r.assigned == r.devices {
        "0".to_owned()
    } else {
        format!("**{}**: {}", errors.total(), errors.summary())
    };
    let _ = writeln!(
        s,
        "| {}{} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.label,
        suffix,
        r.devices,
        r.concurrency,
        r.rate(),
        ratio,
        cpu_bound,
        cpu_ratio,
        ms(r.latency.p50),
        ms(r.latency.p90),
        ms(r.latency.p99),
        us(r.server_cpu_per_registration()),
        us(r.client_cpu_per_registration()),
        machine,
        errors
    );
}

/// Facts about this machine for the notes under the table.
pub fn machine_notes() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or_else(|| "?".to_owned(), |kb| format!("{:.1}", kb / 1024.0 / 1024.0));
    format!("{model}, {cores} cores available, {mem_gib} GiB RAM, Linux {kernel}")
}

/// A server spawned for the bench, and how to check durability on it.
#[derive(Debug, Clone)]
pub struct SpawnPlan {
    /// Server settings (binary, addresses, data directory).
    pub settings: ServerSettings,
    /// How to stop it before the restart.
    pub stop_signal: StopSignal,
    /// How long to wait for start and stop.
    pub timeout: Duration,
}

/// An already running server.
#[derive(Debug, Clone)]
pub struct ExternalServer {
    /// Its endpoints.
    pub endpoint: Endpoint,
    /// Its ID scope.
    pub id_scope: String,
    /// Service API credentials (group setup and verification), if known.
    pub connection_string: Option<ConnectionString>,
    /// The group key, when given rather than read through the service API.
    pub group_key: Option<SymmetricKey>,
    /// Create the group if missing.
    pub setup: bool,
    /// Its process ID, to measure its CPU time.
    pub pid: Option<u32>,
}

/// Which server a bench measures.
#[derive(Debug, Clone)]
pub enum ServerSource {
    /// Spawn `dps-server` here.
    Spawn(SpawnPlan),
    /// Use a running server.
    External(ExternalServer),
}

/// What a bench runs.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// The load of every run.
    pub load: LoadSettings,
    /// Protocols, in order.
    pub protocols: Vec<Protocol>,
    /// Run the baselines.
    pub baseline: bool,
    /// Check the stored registration states after the runs (needs service credentials).
    pub verify: bool,
    /// The enrollment group of the devices.
    pub group_id: String,
    /// The X.509 enrollment group of the X.509 devices (created, with the root as its verified CA
    /// certificate, when an X.509 protocol runs).
    pub x509_group_id: String,
    /// How many times to repeat every baseline + server pair (alternating, to spread out noise from other
    /// processes; each round registers new devices).
    pub rounds: usize,
    /// The command line, for the record.
    pub command: String,
}

fn read_data_dir(settings: &ServerSettings) -> Result<(Vec<u8>, ConnectionString), Error> {
    let ca = settings.data_dir.join("tls").join("ca.pem");
    let ca_pem = std::fs::read(&ca).map_err(|e| Error::io(format!("reading {}", ca.display()), e))?;
    let cs = settings.data_dir.join("connection-string.txt");
    let text = std::fs::read_to_string(&cs).map_err(|e| Error::io(format!("reading {}", cs.display()), e))?;
    Ok((ca_pem, ConnectionString::parse(&text)?))
}

/// Runs the baselines and the server runs for every protocol, then the durability check.
pub async fn run_bench(plan: &BenchPlan, source: ServerSource) -> Result<BenchResult, Error> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut result =
        BenchResult { command: plan.command.clone(), cores: cores as f64, ..BenchResult::default() };
    result.notes.push(format!("Machine: {}.", machine_notes()));

    let (endpoint, id_scope, credentials, mut spawned, server_cpu, name) = match &source {
        ServerSource::Spawn(spawn) => {
            let server = SpawnedServer::start(&spawn.settings, "dps-server-1.log", spawn.timeout).await?;
            let (ca_pem, credentials) = read_data_dir(&spawn.settings)?;
            let s = &spawn.settings;
            let endpoint = Endpoint::new(
                s.https_addr(),
                s.mqtt_addr(),
                s.amqp_addr(),
                &s.host.to_string(),
                &ca_pem,
                plan.load.tls,
            )?;
            let cpu = ServerCpu::Process(server.pid());
            (endpoint, s.id_scope.clone(), Some(credentials), Some(server), cpu, "dps-server")
        }
        ServerSource::External(ext) => {
            let cpu = ext.pid.map_or(ServerCpu::Unknown, ServerCpu::Process);
            (ext.endpoint.clone(), ext.id_scope.clone(), ext.connection_string.clone(), None, cpu, "server")
        }
    };

    let service = match credentials {
        Some(c) => Some(ServiceClient::new(endpoint.target(Protocol::Https)?, c)),
        None => None,
    };
    let symmetric = plan.protocols.iter().any(|p| !p.is_x509() && *p != Protocol::Custom);
    let custom = plan.protocols.contains(&Protocol::Custom);
    let x509 = plan.protocols.iter().any(|p| p.is_x509());
    let group_key = match (&source, &service) {
        _ if !symmetric => SymmetricKey::from_bytes(Vec::new()),
        (ServerSource::External(ExternalServer { group_key: Some(k), .. }), _) => k.clone(),
        (ServerSource::External(ext), Some(service)) => service.group_key(&plan.group_id, ext.setup).await?,
        (ServerSource::Spawn(_), Some(service)) => service.group_key(&plan.group_id, true).await?,
        (_, None) => {
            return Err(Error::Config(
                "no group key: pass --group-key, or --connection-string/--data-dir for the service API"
                    .into(),
            ))
        }
    };
    // X.509: one root for the whole bench, uploaded as a verified CA certificate with the group on it.
    let device_ca = if x509 {
        let ca = DeviceCa::generate("dps-loadgen device root CA")?;
        let service = service.as_ref().ok_or_else(|| {
            Error::Config(
                "the X.509 mode uploads its root CA and creates its group through the service API: pass \
                 --connection-string or --data-dir"
                    .into(),
            )
        })?;
        service.setup_x509_group(&plan.x509_group_id, DEVICE_CA_NAME, ca.pem()).await?;
        Some(ca)
    } else {
        None
    };

    let bind = endpoint.https.ip();
    // Custom allocation: a local webhook and a group of its own pointing at it.
    let (webhook, custom_key) = if custom {
        let service = service.as_ref().ok_or_else(|| {
            Error::Config("the custom mode creates its group through the service API: pass --data-dir".into())
        })?;
        let webhook = crate::webhook::LocalWebhook::start(bind).await?;
        let key = service.setup_custom_group(&custom_group_id(plan), &webhook.url()).await?;
        (Some(webhook), Some(key))
    } else {
        (None, None)
    };
    let mut all_assignments: Vec<Assignment> = Vec::new();
    let mut leaves = (0usize, Duration::ZERO);
    let rounds = plan.rounds.max(1);
    for round in 0..rounds {
        for &protocol in &plan.protocols {
            let mut prefix = plan.load.prefix_for(protocol);
            if rounds > 1 {
                prefix = format!("{prefix}-r{}", round + 1);
            }
            let set = match (&device_ca, protocol.is_x509()) {
                (Some(ca), true) => {
                    // Every leaf is generated here, before the timed runs of this round.
                    let set = DeviceSet::x509(&id_scope, &prefix, ca, plan.load.devices)?;
                    if let Some(x) = set.x509_devices() {
                        leaves = (leaves.0 + x.identities.len(), leaves.1 + x.generation);
                        eprintln!(
                            "generated {} X.509 device certificates for {prefix} in {:.2} s",
                            x.identities.len(),
                            x.generation.as_secs_f64()
                        );
                    }
                    set
                }
                _ => match (&custom_key, protocol) {
                    (Some(key), Protocol::Custom) => DeviceSet::new(&id_scope, key.clone(), &prefix)?,
                    _ => DeviceSet::new(&id_scope, group_key.clone(), &prefix)?,
                },
            };
            let set = Arc::new(set);
            let baseline = if plan.baseline {
                let out = run_baseline(protocol, set.clone(), &plan.load, bind).await?;
                eprintln!("{}", out.report);
                Some(out.report)
            } else {
                None
            };
            let out = run_server(protocol, &endpoint, set, &plan.load, &server_cpu, name).await?;
            eprintln!("{}", out.report);
            all_assignments.extend(out.assignments);
            result.comparisons.push(Comparison { protocol, round, baseline, server: out.report });
        }
    }
    if let Some(webhook) = &webhook {
        result.notes.push(format!(
            "custom: devices of the group '{}' (allocationPolicy custom), each allocated by a call of the server to \
             a local plain-HTTP webhook in the load generator's process (keep-alive; it answered {} calls), \
             compared with the hashed `https` run of the same round; its baseline is the HTTPS one.",
            custom_group_id(plan),
            webhook.calls()
        ));
    }
    if leaves.0 > 0 {
        result.notes.push(format!(
            "X.509 devices: a root CA generated at start (ECDSA P-256), uploaded as the verified CA certificate \
             '{DEVICE_CA_NAME}' with the enrollment group '{}' on it; each device its own leaf (ECDSA P-256, \
             CN = registration ID, EKU clientAuth, signed by the root, sent without the root) presented on a \
             fresh mutual-TLS connection, no SAS token. The {} leaves were generated before the timed runs, in \
             {:.2} s ({:.0} us each). The X.509 baseline requires the client certificate and verifies it \
             against the root (rustls WebPkiClientVerifier); its fixed replies are the symmetric-key ones.",
            plan.x509_group_id,
            leaves.0,
            leaves.1.as_secs_f64(),
            leaves.1.as_secs_f64() * 1e6 / leaves.0 as f64,
        ));
    }

    if plan.verify {
        match (&source, spawned.take(), &service) {
            (ServerSource::Spawn(spawn), Some(server), Some(service)) => {
                let status = server.stop(spawn.stop_signal, spawn.timeout).await?;
                eprintln!(
                    "dps-server stopped with {} ({status}); restarting it on the same data directory",
                    spawn.stop_signal.name()
                );
                let restarted =
                    SpawnedServer::start(&spawn.settings, "dps-server-2.log", spawn.timeout).await?;
                let states = all_states(service, plan, symmetric, x509, custom).await;
                let stopped = restarted.stop(StopSignal::Term, spawn.timeout).await;
                let verification = verify_assignments(&all_assignments, &states?);
                stopped?;
                result.verification_method = format!(
                    "every assignment a device was told about, read back through the service API after stopping the server with {} and restarting it on the same data directory",
                    spawn.stop_signal.name()
                );
                result.verification = Some(verification);
            }
            (_, server, Some(service)) => {
                spawned = server;
                let states = all_states(service, plan, symmetric, x509, custom).await?;
                result.verification_method =
                    "every assignment a device was told about, read back through the service API (server not restarted)"
                        .to_owned();
                result.verification = Some(verify_assignments(&all_assignments, &states));
            }
            (_, server, None) => {
                spawned = server;
                result.notes.push("Durability not checked: no service API credentials.".to_owned());
            }
        }
    }
    if let (ServerSource::Spawn(spawn), Some(server)) = (&source, spawned) {
        server.stop(StopSignal::Term, spawn.timeout).await?;
    }
    result.notes.push(format!(
        "Each device: a fresh TCP + TLS connection (full handshake, no session resumption, {}), register, \
         poll until assigned{}; {} devices per run, {} in flight; the load generator shares the machine. \
         CPU-bound registrations/s = cores / (server + load generator CPU time per registration): the rate \
         with the machine to ourselves, unaffected by other processes (CPU time from /proc, 10 ms ticks).",
        plan.load.tls.describe(),
        if plan.load.drive.ignore_retry_after {
            " (polling at once instead of waiting Retry-After)"
        } else {
            ""
        },
        plan.load.devices,
        plan.load.concurrency,
    ));
    Ok(result)
}

/// The group of the `custom` mode's devices.
fn custom_group_id(plan: &BenchPlan) -> String {
    format!("{}-custom", plan.group_id)
}

/// The registration states of the symmetric-key, X.509 and custom-allocation groups, as far as used.
async fn all_states(
    service: &ServiceClient,
    plan: &BenchPlan,
    symmetric: bool,
    x509: bool,
    custom: bool,
) -> Result<Vec<dps_core::proto::model::DeviceRegistrationState>, Error> {
    let mut states = Vec::new();
    if symmetric {
        states.extend(service.registration_states(&plan.group_id).await?);
    }
    if x509 {
        states.extend(service.registration_states(&plan.x509_group_id).await?);
    }
    if custom {
        states.extend(service.registration_states(&custom_group_id(plan)).await?);
    }
    Ok(states)
}

/// Where `dps-server` is looked for when `--server-bin` is not given: next to this executable (both are in
/// `target/release` after `cargo build --release`), then `target/release/dps-server`.
pub fn default_server_bin() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("dps-server")));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("target/release/dps-server"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{CpuUse, ErrorTally, Failure, Incident, LatencySummary};

    fn report(label: &str, rate: usize, server_us: u64, client_us: u64) -> RunReport {
        RunReport {
            label: label.into(),
            devices: rate,
            concurrency: 8,
            assigned: rate,
            elapsed: Duration::from_secs(1),
            latency: LatencySummary::default(),
            handshake: LatencySummary::default(),
            tls: Default::default(),
            requests: 2 * rate as u64,
            failed: ErrorTally::new(),
            retried: ErrorTally::new(),
            cpu: CpuUse {
                server: Some(Duration::from_micros(server_us * rate as u64)),
                client: Some(Duration::from_micros(client_us * rate as u64)),
                machine_busy: None,
                machine_total: None,
            },
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn table_ratios_and_rounds() {
        let mut result = BenchResult { cores: 2.0, ..BenchResult::default() };
        for round in 0..2 {
            result.comparisons.push(Comparison {
                protocol: Protocol::Https,
                round,
                baseline: Some(report("baseline https", 1000, 200, 300)),
                server: report("dps-server https", 800 + 100 * round, 300, 300),
            });
            result.comparisons.push(Comparison {
                protocol: Protocol::Mqtt,
                round,
                baseline: Some(report("baseline mqtt", 900, 200, 300)),
                server: report("dps-server mqtt", 900, 300, 300),
            });
        }
        let c = &result.comparisons[0];
        assert!((c.rate_ratio().unwrap() - 0.8).abs() < 1e-9);
        // 2 cores / 500 us = 4000/s against 2 cores / 600 us = 3333/s.
        assert!((c.cpu_bound_ratio(2.0).unwrap() - 5.0 / 6.0).abs() < 1e-9);
        let medians = result.median_ratios();
        assert_eq!(medians[0].0, Protocol::Https);
        assert!((medians[0].1.unwrap() - 0.85).abs() < 1e-9);
        assert!((medians[1].1.unwrap() - 1.0).abs() < 1e-9);

        let md = result.markdown();
        assert_eq!(md.matches("| dps-server https, round ").count(), 2, "{md}");
        assert!(md.contains("| baseline mqtt, round 2 | 900 | 8 | 900 | 1.00 | 4000 | 1.00 |"), "{md}");
        assert!(md.contains("1.00 (0.90 of HTTPS baseline)"), "{md}");
        assert!(
            md.contains("Median ratio to the baseline over 2 rounds: https 0.85 (CPU-bound 0.83); mqtt 1.00")
        );
        assert!(result.is_ok());

        result.comparisons[3].server.failed.record(&Incident::new(Failure::Code(500001), "store"));
        result.comparisons[3].server.assigned -= 1;
        assert!(!result.is_ok());
        assert!(result.markdown().contains("**1**: 500001 StoreUnavailable x1"));
    }
}
