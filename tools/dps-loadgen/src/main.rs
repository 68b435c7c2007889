//! `dps-loadgen`: load generator for DPS servers. See `dps-loadgen --help` and the crate documentation.
#![forbid(unsafe_code)]
// A load generator is a program: it reads the clock, the command line and files, and spawns processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use clap::{ArgAction, Args, Parser, Subcommand};
use dps_core::proto::sas::SymmetricKey;
use dps_loadgen::bench::{
    run_baseline, run_bench, BenchPlan, BenchResult, Endpoint, ExternalServer, LoadSettings, ServerSource,
    SpawnPlan, BASELINE_SCOPE,
};
use dps_loadgen::cpu::ServerCpu;
use dps_loadgen::device::{DeviceSet, DriveOptions, Protocol};
use dps_loadgen::runner::{run_load, LoadOptions};
use dps_loadgen::server::{ServerSettings, StopSignal};
use dps_loadgen::service::{verify_assignments, ConnectionString, ServiceClient};
use dps_loadgen::tls::{BaselineClientAuth, CipherSuites, TlsOptions, TlsVersions};
use dps_loadgen::x509::{DeviceCa, DEVICE_CA_NAME};
use dps_loadgen::Error;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// mimalloc instead of glibc malloc: the server allocates per request on many threads, and glibc's
/// arena locking and consolidation showed up as ~10% of server CPU in the load generator's profiles.
/// The load generator's in-process baseline server uses the same allocator, so ratios stay fair.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for DPS servers: simulated symmetric-key or X.509 devices, each on a fresh TLS connection,
/// register and poll until assigned (HTTPS or MQTT), compared with a bare rustls + hyper baseline.
///
/// Exit status: 0 when every device was assigned without any error (and the durability check passed),
/// 1 when a run had errors, 2 when the load could not be set up.
#[derive(Debug, Parser)]
#[command(name = "dps-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Registers N devices against a running server and reports registrations/s, latency and errors.
    Run {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Device transport.
        #[arg(long, value_enum, default_value_t = Protocol::Https)]
        mode: Protocol,
        /// After the run, read every registration state back through the service API and check each
        /// assignment (needs --connection-string or --data-dir).
        #[arg(long)]
        verify: bool,
    },
    /// A baseline server alone, for `bench`/`compare`/`baseline` to run in a process of its own: serves until
    /// standard input closes.
    #[command(hide = true)]
    BaselineServer {
        /// Address to bind (ports chosen by the system).
        #[arg(long)]
        bind: IpAddr,
        /// ID scope of the fixed replies.
        #[arg(long)]
        id_scope: String,
        /// Registration ID of the fixed replies.
        #[arg(long)]
        registration_id: String,
        /// Worker threads.
        #[arg(long)]
        threads: usize,
        /// Request an optional client certificate.
        #[arg(long)]
        client_auth: bool,
        /// Require a client certificate and verify it against the roots in this PEM file (the X.509
        /// baseline).
        #[arg(long, conflicts_with = "client_auth")]
        client_ca: Option<PathBuf>,
        /// Where to write the listeners and CA (JSON) once listening.
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// Runs the same load against a bare rustls + hyper server (or bare MQTT responder) in a process of its
    /// own that answers with fixed replies of the same size, and prints its rate.
    Baseline {
        #[command(flatten)]
        load: LoadArgs,
        /// Which baseline.
        #[arg(long, value_enum, default_value_t = Protocol::Https)]
        mode: Protocol,
        /// Address the baseline server binds (port chosen by the system).
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
    },
    /// Runs the baseline, then the same load against a running server, and prints both and the ratio as a
    /// markdown table.
    Compare {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Device transport.
        #[arg(long, value_enum, default_value_t = Protocol::Https)]
        mode: Protocol,
        /// Also check the stored registration states through the service API.
        #[arg(long)]
        verify: bool,
        /// Repeat the baseline + server pair this many times (alternating; new devices each round).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The whole comparison: baseline, HTTPS and MQTT runs, durability check, markdown table. With
    /// --spawn-server it starts `dps-server` itself on a temporary data directory, sets up the group, and
    /// after the runs stops it, restarts it on the same data and reads every registration state back.
    Bench {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Start `dps-server` on --host (default 127.0.0.30) with --https-port, --mqtt-port and --amqp-port.
        #[arg(long)]
        spawn_server: bool,
        /// The `dps-server` executable (default: next to this one, else target/release/dps-server).
        #[arg(long)]
        server_bin: Option<PathBuf>,
        /// The spawned server's `respond_early`: answer registers 202 before the hub work (true, the
        /// server's default) or after the final commit (false).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
        server_respond_early: bool,
        /// Protocols to run, in order (`x509`, `x509-mqtt`: X.509 devices, each with its own certificate;
        /// `amqp`: AMQP 1.0 over TLS).
        #[arg(long, alias = "protocols", value_enum, value_delimiter = ',', default_value = "https,mqtt")]
        modes: Vec<Protocol>,
        /// Skip the baselines.
        #[arg(long)]
        no_baseline: bool,
        /// Skip the durability check.
        #[arg(long)]
        no_verify: bool,
        /// How the spawned server is stopped before the restart (kill = a crash).
        #[arg(long, value_enum, default_value_t = StopSignal::Term)]
        stop_signal: StopSignal,
        /// Keep the spawned server's temporary directory (data, config, logs) and print its path.
        #[arg(long)]
        keep_data_dir: bool,
        /// Repeat every baseline + server pair this many times (alternating, to spread out the noise of other
        /// processes; new devices each round). The table shows every round and the median ratios.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Seconds to wait for the server to start or stop.
        #[arg(long, default_value_t = 60)]
        server_timeout_secs: u64,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Server address (loopback).
    #[arg(long, default_value = "127.0.0.30")]
    host: IpAddr,
    /// HTTPS port.
    #[arg(long, default_value_t = 443)]
    https_port: u16,
    /// MQTT-over-TLS port.
    #[arg(long, default_value_t = 8883)]
    mqtt_port: u16,
    /// AMQP-over-TLS port.
    #[arg(long, default_value_t = 5671)]
    amqp_port: u16,
    /// Name to verify the server certificate against (default: --host, as an IP SAN).
    #[arg(long)]
    server_name: Option<String>,
    /// CA certificate (PEM) to trust (default: DATA_DIR/tls/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The server's data directory: CA from tls/ca.pem, service credentials from connection-string.txt.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Service API connection string (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…).
    #[arg(long)]
    connection_string: Option<String>,
    /// The server's ID scope.
    #[arg(long)]
    id_scope: Option<String>,
    /// The enrollment group's primary key (base64); default: read through the service API.
    #[arg(long)]
    group_key: Option<String>,
    /// The enrollment group of the simulated devices.
    #[arg(long, default_value = "loadgen")]
    group_id: String,
    /// Create the enrollment group through the service API first if it does not exist.
    #[arg(long)]
    setup: bool,
    /// The X.509 enrollment group of the X.509 devices (modes `x509`, `x509-mqtt`): created or replaced
    /// through the service API, on the root CA the load generator generates at start (uploaded as the
    /// verified CA certificate `loadgen-device-root`).
    #[arg(long, default_value = "loadgen-x509")]
    x509_group_id: String,
    /// The server's process ID, to report its CPU time per registration.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Devices to register.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Devices in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Registration ID prefix: device i is `{prefix}-{i:06}` (bench and compare add `-https`/`-mqtt`/`-x509`).
    #[arg(long, default_value = "sensor")]
    prefix: String,
    /// After a `202 assigning`, poll at once instead of sleeping the Retry-After, so the run measures the
    /// server rather than the sleep (a poll still answering `assigning` is retried after 20 ms × the number
    /// of such answers, capped at the Retry-After). 429 and 5xx answers are always waited out.
    /// `--ignore-retry-after=false` honours every Retry-After like a real device.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    ignore_retry_after: bool,
    /// A registration without a final answer after this many seconds counts as a timeout error.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// TLS versions the devices offer (tls12 is what the Azure Python SDK speaks).
    #[arg(long, value_enum, default_value_t = TlsVersions::Any)]
    tls: TlsVersions,
    /// TLS 1.3 cipher suites the devices offer (aes128 measures a SHA-256 key schedule instead of SHA-384).
    #[arg(long, value_enum, default_value_t = CipherSuites::Default)]
    cipher_suites: CipherSuites,
    /// Worker threads of the in-process baseline server (default: the number of cores, like tokio).
    #[arg(long)]
    baseline_threads: Option<usize>,
    /// The baseline server also requests an optional client certificate in every handshake, as a DPS
    /// server must for X.509 attestation.
    #[arg(long)]
    baseline_client_auth: bool,
    /// Run the baseline server inside the load generator's process (it may then share the crypto code and
    /// tables with the devices' TLS clients in the CPU caches, which a separate server cannot).
    #[arg(long)]
    baseline_in_process: bool,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct OutputArgs {
    /// Also write the markdown between the `<!-- dps-loadgen:begin -->` and `<!-- dps-loadgen:end -->`
    /// markers of this file (e.g. BENCHMARKS.md), adding a `## Load generator (dps-loadgen)` section with
    /// the markers if there is none.
    #[arg(long)]
    write_markdown: Option<PathBuf>,
}

impl LoadArgs {
    fn settings(&self) -> Result<LoadSettings, Error> {
        if self.devices == 0 || self.concurrency == 0 {
            return Err(Error::Config("--devices and --concurrency must be at least 1".into()));
        }
        Ok(LoadSettings {
            devices: self.devices,
            concurrency: self.concurrency,
            prefix: self.prefix.clone(),
            drive: DriveOptions {
                ignore_retry_after: self.ignore_retry_after,
                timeout: Duration::from_secs(self.timeout_secs.max(1)),
            },
            progress: !self.quiet,
            tls: TlsOptions { versions: self.tls, suites: self.cipher_suites },
            baseline_threads: self
                .baseline_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            baseline_client_auth: self.baseline_client_auth,
            baseline_process: if self.baseline_in_process {
                None
            } else {
                Some(std::env::current_exe().map_err(|e| Error::io("locating this program", e))?)
            },
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

impl TargetArgs {
    fn endpoint(&self, tls: TlsOptions) -> Result<Endpoint, Error> {
        let ca = match (&self.ca, &self.data_dir) {
            (Some(ca), _) => ca.clone(),
            (None, Some(dir)) => dir.join("tls").join("ca.pem"),
            (None, None) => {
                return Err(Error::Config("pass --ca FILE or --data-dir DIR (for tls/ca.pem)".into()))
            }
        };
        let name = self.server_name.clone().unwrap_or_else(|| self.host.to_string());
        Endpoint::new(
            SocketAddr::new(self.host, self.https_port),
            SocketAddr::new(self.host, self.mqtt_port),
            SocketAddr::new(self.host, self.amqp_port),
            &name,
            &read_file(&ca)?,
            tls,
        )
    }

    fn connection_string(&self) -> Result<Option<ConnectionString>, Error> {
        match (&self.connection_string, &self.data_dir) {
            (Some(cs), _) => Ok(Some(ConnectionString::parse(cs)?)),
            (None, Some(dir)) => {
                let path = dir.join("connection-string.txt");
                let text = String::from_utf8_lossy(&read_file(&path)?).into_owned();
                Ok(Some(ConnectionString::parse(&text)?))
            }
            (None, None) => Ok(None),
        }
    }

    fn id_scope(&self) -> Result<String, Error> {
        self.id_scope.clone().ok_or_else(|| Error::Config("pass --id-scope (the server's ID scope)".into()))
    }

    fn group_key(&self) -> Result<Option<SymmetricKey>, Error> {
        self.group_key
            .as_deref()
            .map(|k| SymmetricKey::parse(k).map_err(|e| Error::Config(format!("--group-key: {e}"))))
            .transpose()
    }

    fn external(&self, tls: TlsOptions) -> Result<ExternalServer, Error> {
        Ok(ExternalServer {
            endpoint: self.endpoint(tls)?,
            id_scope: self.id_scope()?,
            connection_string: self.connection_string()?,
            group_key: self.group_key()?,
            setup: self.setup,
            pid: self.server_pid,
        })
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .enumerate()
        .map(|(i, a)| if i == 0 { "dps-loadgen".to_owned() } else { a.clone() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces the text between the markers of `path` (or appends a section holding them).
fn write_markdown(path: &Path, body: &str) -> Result<(), Error> {
    const BEGIN: &str = "<!-- dps-loadgen:begin -->";
    const END: &str = "<!-- dps-loadgen:end -->";
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let block = format!("{BEGIN}\n{}\n{END}", body.trim_end());
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{old}{sep}## Load generator (dps-loadgen)\n\n{block}\n")
        }
    };
    std::fs::write(path, new).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn finish_bench(result: &BenchResult, output: &OutputArgs) -> Result<ExitCode, Error> {
    let markdown = result.markdown();
    println!("{markdown}");
    if let Some(path) = &output.write_markdown {
        write_markdown(path, &markdown)?;
        eprintln!("wrote the table into {}", path.display());
    }
    Ok(verdict(result.is_ok()))
}

fn verdict(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("\n*** THE RUN HAD ERRORS (see above) ***");
        ExitCode::from(1)
    }
}

async fn main_inner(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run { target, load, mode, verify } => {
            let settings = load.settings()?;
            let endpoint = target.endpoint(settings.tls)?;
            let credentials = target.connection_string()?;
            let service =
                credentials.map(|c| endpoint.target(Protocol::Https).map(|t| ServiceClient::new(t, c)));
            let service = service.transpose()?;
            let group_id = if mode.is_x509() { &target.x509_group_id } else { &target.group_id };
            let set = if mode.is_x509() {
                let service = service.as_ref().ok_or_else(|| {
                    Error::Config(
                        "--mode x509 uploads its root CA and sets up its group through the service API: pass \
                         --connection-string or --data-dir"
                            .into(),
                    )
                })?;
                let ca = DeviceCa::generate("dps-loadgen device root CA")?;
                service.setup_x509_group(group_id, DEVICE_CA_NAME, ca.pem()).await?;
                x509_devices(&target.id_scope()?, &settings, &ca)?
            } else {
                let group_key = match (target.group_key()?, &service) {
                    (Some(k), _) => k,
                    (None, Some(s)) => s.group_key(group_id, target.setup).await?,
                    (None, None) => return Err(Error::Config(
                        "pass --group-key, or --connection-string/--data-dir to read it through the service API"
                            .into(),
                    )),
                };
                DeviceSet::new(&target.id_scope()?, group_key, &settings.prefix)?
            };
            let set = Arc::new(set);
            let options = LoadOptions {
                label: format!("{} {}", mode.as_str(), endpoint.target(mode)?.addr),
                devices: settings.devices,
                concurrency: settings.concurrency,
                drive: settings.drive,
                progress: settings.progress,
            };
            let cpu = target.server_pid.map_or(ServerCpu::Unknown, ServerCpu::Process);
            let out = run_load(mode, Arc::new(endpoint.target(mode)?), set, &options, &cpu).await;
            println!("{}", out.report);
            let mut ok = out.report.is_clean();
            if verify {
                let service = service.ok_or_else(|| {
                    Error::Config("--verify needs --connection-string or --data-dir".into())
                })?;
                let v = verify_assignments(&out.assignments, &service.registration_states(group_id).await?);
                println!("durability: {}", v.summary());
                ok &= v.is_ok();
            }
            Ok(verdict(ok))
        }
        Command::BaselineServer {
            bind,
            id_scope,
            registration_id,
            threads,
            client_auth,
            client_ca,
            ready_file,
        } => {
            let auth = match (client_ca, client_auth) {
                (Some(path), _) => BaselineClientAuth::Required {
                    roots_pem: String::from_utf8_lossy(&read_file(&path)?).into_owned(),
                },
                (None, true) => BaselineClientAuth::Optional,
                (None, false) => BaselineClientAuth::Off,
            };
            tokio::task::spawn_blocking(move || {
                dps_loadgen::baseline::serve_standalone(
                    bind,
                    &id_scope,
                    &registration_id,
                    threads,
                    &auth,
                    &ready_file,
                )
            })
            .await
            .map_err(|e| Error::Config(format!("baseline server: {e}")))??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Baseline { load, mode, bind } => {
            let settings = load.settings()?;
            let set = if mode.is_x509() {
                x509_devices(BASELINE_SCOPE, &settings, &DeviceCa::generate("dps-loadgen device root CA")?)?
            } else {
                DeviceSet::new(BASELINE_SCOPE, SymmetricKey::from_bytes(vec![0x5a; 64]), &settings.prefix)?
            };
            let set = Arc::new(set);
            let out = run_baseline(mode, set, &settings, bind).await?;
            println!("{}", out.report);
            Ok(verdict(out.report.is_clean()))
        }
        Command::Compare { target, load, mode, verify, rounds, output } => {
            let settings = load.settings()?;
            let plan = BenchPlan {
                load: settings.clone(),
                protocols: vec![mode],
                baseline: true,
                verify,
                group_id: target.group_id.clone(),
                x509_group_id: target.x509_group_id.clone(),
                rounds,
                command: command_line(),
            };
            let result = run_bench(&plan, ServerSource::External(target.external(settings.tls)?)).await?;
            print_ratios(&result);
            finish_bench(&result, &output)
        }
        Command::Bench {
            target,
            load,
            spawn_server,
            server_respond_early,
            server_bin,
            modes,
            no_baseline,
            no_verify,
            stop_signal,
            keep_data_dir,
            rounds,
            server_timeout_secs,
            output,
        } => {
            let settings = load.settings()?;
            let plan = BenchPlan {
                load: settings.clone(),
                protocols: modes,
                baseline: !no_baseline,
                verify: !no_verify,
                group_id: target.group_id.clone(),
                x509_group_id: target.x509_group_id.clone(),
                rounds,
                command: command_line(),
            };
            if !spawn_server {
                let result = run_bench(&plan, ServerSource::External(target.external(settings.tls)?)).await?;
                print_ratios(&result);
                return finish_bench(&result, &output);
            }
            let work = tempfile::Builder::new()
                .prefix("dps-loadgen-")
                .tempdir()
                .map_err(|e| Error::io("creating a temporary directory", e))?;
            let spawn = SpawnPlan {
                settings: ServerSettings {
                    bin: server_bin.unwrap_or_else(dps_loadgen::bench::default_server_bin),
                    host: target.host,
                    https_port: target.https_port,
                    mqtt_port: target.mqtt_port,
                    amqp_port: target.amqp_port,
                    id_scope: target.id_scope.clone().unwrap_or_else(|| BASELINE_SCOPE.to_owned()),
                    service_host_name: "loadgen.localhost".to_owned(),
                    hubs: vec!["hub-1.loadgen.localhost".to_owned(), "hub-2.loadgen.localhost".to_owned()],
                    retry_after_secs: 1,
                    respond_early: server_respond_early,
                    data_dir: work.path().join("data"),
                    work_dir: work.path().to_path_buf(),
                },
                stop_signal,
                timeout: Duration::from_secs(server_timeout_secs.max(1)),
            };
            let result = run_bench(&plan, ServerSource::Spawn(spawn)).await;
            if keep_data_dir {
                eprintln!("kept the server's directory: {}", work.keep().display());
            }
            let result = result?;
            print_ratios(&result);
            finish_bench(&result, &output)
        }
    }
}

/// The X.509 devices of a single run: every leaf generated now, before the timed run.
fn x509_devices(id_scope: &str, settings: &LoadSettings, ca: &DeviceCa) -> Result<DeviceSet, Error> {
    let set = DeviceSet::x509(id_scope, &settings.prefix, ca, settings.devices)?;
    if let Some(x) = set.x509_devices() {
        eprintln!(
            "generated {} X.509 device certificates in {:.2} s ({:.0} us each)",
            x.identities.len(),
            x.generation.as_secs_f64(),
            x.generation.as_secs_f64() * 1e6 / x.identities.len().max(1) as f64
        );
    }
    Ok(set)
}

fn print_ratios(result: &BenchResult) {
    for (protocol, rate, cpu) in result.median_ratios() {
        let f = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        eprintln!(
            "{}: server / baseline = {} measured, {} CPU-bound (median over rounds)",
            protocol.as_str(),
            f(rate),
            f(cpu)
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dps-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
