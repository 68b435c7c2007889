//! The command line: `dps-server [run] [--config FILE] [flags]` runs the server; `enrollment`, `group` and
//! `registration` manage the service through its HTTPS service API (in the spirit of `az iot dps …`);
//! `provision-device` registers a symmetric-key device over HTTPS or MQTT with the `dps-client` crate;
//! `admin hub-devices|twin|usage` read the data directory's hub database (`hubs.sqlite3`) directly,
//! read-only, and so need no connection string.
//!
//! Admin commands authenticate with a connection string (`--connection-string` / `DPS_CONNECTION_STRING`,
//! or the data directory's `connection-string.txt`), trust `--ca` (default: the data directory's
//! `tls/ca.pem`) and connect to `--server` (default: the HTTPS address in the data directory's
//! `ready.json`, else the connection string's host name on port 443). They print JSON on stdout; errors go
//! to stderr with exit code 1.

use crate::admin::{CallError, EnrollmentSettings, Kind, Reprovision, ServiceClient};
use crate::client::HttpsClient;
use crate::config::{FileConfig, Overrides, ServerConfig};
use crate::datadir::{ConnectionString, DataDir, Ready};
use crate::state::now;
use crate::ServerError;
use clap::{Args, Parser, Subcommand, ValueEnum};
use dps_client::ClientConfig;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::{ApiVersion, IdScope, RegistrationId};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `dps-server`: an Azure-compatible Device Provisioning Service.
#[derive(Debug, Parser)]
#[command(name = "dps-server", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: run the server).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Run(RunArgs),
    /// Manage individual enrollments.
    Enrollment {
        /// The operation.
        #[command(subcommand)]
        action: EnrollmentAction,
    },
    /// Manage enrollment groups.
    Group {
        /// The operation.
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Read and delete device registration states.
    Registration {
        /// The operation.
        #[command(subcommand)]
        action: RegistrationAction,
    },
    /// Manage the instance's CA certificates and prove possession of their keys (like
    /// `az iot dps certificate`).
    Certificate {
        /// The operation.
        #[command(subcommand)]
        action: CertificateAction,
    },
    /// Manage the linked IoT hubs of a running server, without a restart (kept in its data directory).
    Hubs {
        /// The operation.
        #[command(subcommand)]
        action: HubAction,
    },
    /// Inject faults into a running server (its admin API, `/admin/faults`): add, list and remove rules
    /// that make matching devices' requests fail, slow down, hang in `assigning` or lose their connection.
    Fault {
        /// The operation.
        #[command(subcommand)]
        action: FaultCommand,
    },
    /// Provision a symmetric-key device over HTTPS or MQTT with the dps-client crate.
    ProvisionDevice(ProvisionArgs),
    /// Write every CA certificate, enrollment group, individual enrollment and registration record of the
    /// configured store (SQLite or PostgreSQL) as JSON Lines. Secrets are in the clear: the file is
    /// created with mode 0600.
    Export(ExportArgs),
    /// Read an export into the configured store (each item created or replaced).
    Import(ImportArgs),
    /// Inspect a local server's hub directory, usage report and audit log. These commands do not use the
    /// HTTPS API: they read the data directory's databases directly, read-only (the server may be running).
    Admin {
        /// The operation.
        #[command(subcommand)]
        action: AdminAction,
    },
}

/// `export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The file to write (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The store and its keys: the same settings as the server's (--config, --store, --data-dir, …).
    #[command(flatten)]
    pub server: RunArgs,
}

/// `import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The export to read.
    #[arg(long, short, value_name = "FILE")]
    pub input: PathBuf,
    /// The store and its keys: the same settings as the server's (--config, --store, --data-dir, …).
    #[command(flatten)]
    pub server: RunArgs,
}

/// Opens the store a server configuration names, with the data directory's encryption keys.
async fn open_configured_store(args: &RunArgs) -> Result<crate::state::ServerStore, ServerError> {
    let config = args.resolve(|k| std::env::var(k).ok())?;
    let dir = DataDir::new(config.data_dir.clone());
    dir.create()?;
    tokio::task::spawn_blocking(move || {
        let sealer = crate::encryption::open_sealer(&config.key_provider, &dir)?;
        crate::state::ServerStore::open(&config.store, &dir.database(), sealer).map_err(ServerError::Store)
    })
    .await
    .map_err(|e| ServerError::Client(format!("the store open task failed: {e}")))?
}

/// `export`: the counts of what was written.
pub async fn run_export(a: &ExportArgs) -> Result<Value, ServerError> {
    let store = open_configured_store(&a.server).await?;
    let counts = match &a.output {
        Some(path) => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file =
                options.open(path).map_err(|e| ServerError::io(format!("creating {}", path.display()), e))?;
            crate::transfer::export(&store, &mut std::io::BufWriter::new(file)).await?
        }
        None => crate::transfer::export(&store, &mut std::io::stdout().lock()).await?,
    };
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    serde_json::to_value(counts).map_err(|e| ServerError::Client(e.to_string()))
}

/// `import`: the counts of what was written.
pub async fn run_import(a: &ImportArgs) -> Result<Value, ServerError> {
    let file = std::fs::File::open(&a.input)
        .map_err(|e| ServerError::io(format!("opening {}", a.input.display()), e))?;
    let store = open_configured_store(&a.server).await?;
    let counts = crate::transfer::import(&store, std::io::BufReader::new(file)).await?;
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| ServerError::Client(format!("the store close task failed: {e}")))?;
    closed.map_err(ServerError::Store)?;
    serde_json::to_value(counts).map_err(|e| ServerError::Client(e.to_string()))
}

/// Where the local-database admin commands find the data directory.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Data directory of the server (its hubs.sqlite3 is read, read-only) [default: ./dps-data].
    #[arg(long, env = "DPS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl LocalArgs {
    /// The data directory.
    pub fn dir(&self) -> DataDir {
        DataDir::new(self.data_dir.clone().unwrap_or_else(|| PathBuf::from("./dps-data")))
    }
}

/// `admin hub-devices`.
#[derive(Debug, Clone, Args)]
pub struct HubDevicesArgs {
    /// Data directory.
    #[command(flatten)]
    pub local: LocalArgs,
    /// IoT hub host name.
    #[arg(long, value_name = "HOST")]
    pub hub: String,
}

/// `admin twin`.
#[derive(Debug, Clone, Args)]
pub struct TwinArgs {
    /// Data directory.
    #[command(flatten)]
    pub local: LocalArgs,
    /// IoT hub host name.
    #[arg(long, value_name = "HOST")]
    pub hub: String,
    /// Device ID.
    #[arg(long, value_name = "ID")]
    pub device: String,
}

/// `admin usage`.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// Data directory.
    #[command(flatten)]
    pub local: LocalArgs,
    /// Only the last N UTC days, today included [default: every day recorded].
    #[arg(long, value_name = "N")]
    pub days: Option<u32>,
}

/// `admin audit`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Data directory.
    #[command(flatten)]
    pub local: LocalArgs,
    /// Only records at or after this time (RFC 3339, e.g. 2024-01-31T00:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only records about this item (registration ID, group ID or certificate name).
    #[arg(long, value_name = "ID")]
    pub target: Option<String>,
    /// Only records of this principal (shared access policy or in-process name).
    #[arg(long, value_name = "NAME")]
    pub principal: Option<String>,
    /// Only records of this operation (e.g. enrollment.put).
    #[arg(long, value_name = "OPERATION")]
    pub operation: Option<String>,
    /// At most this many records, newest first.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub top: usize,
}

/// The key provider of a key rotation (as `[encryption]` configures the server).
#[derive(Debug, Clone, Args)]
pub struct KekArgs {
    /// Data directory.
    #[command(flatten)]
    pub local: LocalArgs,
    /// Where the current key-encryption key comes from: `file` or `env`.
    #[arg(long, default_value = "file", value_name = "PROVIDER")]
    pub key_provider: String,
    /// The current KEK file (provider `file`) [default: DATA_DIR/kek.key].
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the current KEK (provider `env`).
    #[arg(long, default_value = "DPS_KEK", value_name = "VAR")]
    pub env_var: String,
}

impl KekArgs {
    /// The provider these flags name.
    pub fn provider(&self) -> Result<crate::config::KeyProviderConfig, ServerError> {
        use crate::config::KeyProviderConfig;
        match self.key_provider.as_str() {
            "file" => Ok(KeyProviderConfig::File(
                self.key_file.clone().unwrap_or_else(|| self.local.dir().kek_file()),
            )),
            "env" => Ok(KeyProviderConfig::Env(self.env_var.clone())),
            other => Err(ServerError::Client(format!("--key-provider '{other}': expected file or env"))),
        }
    }
}

/// `admin rotate-kek`.
#[derive(Debug, Clone, Args)]
pub struct RotateKekArgs {
    /// The current key provider.
    #[command(flatten)]
    pub kek: KekArgs,
    /// A file holding the new key-encryption key (base64 of 32 bytes, e.g. `openssl rand -base64 32`).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: PathBuf,
}

/// Local-database admin operations (read the data directory's `hubs.sqlite3` read-only, not the HTTPS API).
#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// List the devices the server registered in an IoT hub (reads DATA_DIR/hubs.sqlite3 directly).
    HubDevices(HubDevicesArgs),
    /// Show a hub device's twin: tags, desired properties, capabilities (reads DATA_DIR/hubs.sqlite3
    /// directly).
    Twin(TwinArgs),
    /// Billable operations per ID scope and UTC day, successes (billed) and failures (reads
    /// DATA_DIR/hubs.sqlite3 directly).
    Usage(UsageArgs),
    /// The audit log of service writes and refusals, newest first, as JSON (reads DATA_DIR's store
    /// database directly, read-only).
    Audit(AuditArgs),
    /// Re-wrap the data keys of encryption at rest under a new key-encryption key (no row is
    /// re-encrypted; running servers keep working; the next start uses the new key). Provider `file`:
    /// the new key replaces the key file.
    RotateKek(RotateKekArgs),
    /// Add a new data key of encryption at rest and make it active: servers seal new writes with it from
    /// their next start; values sealed before stay readable under their key ID.
    RotateDataKey(KekArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `dps-server run` flags. Each overrides the environment variable named in its help, which overrides the
/// configuration file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Print the service connection string (with the owner key) at start even when it already existed.
    #[arg(long)]
    pub show_secrets: bool,
    /// TOML configuration file [env: DPS_CONFIG].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// ID scope served [env: DPS_ID_SCOPE].
    #[arg(long)]
    pub id_scope: Option<String>,
    /// Service API host name (connection string HostName, SAS audience) [env: DPS_SERVICE_HOST_NAME].
    #[arg(long)]
    pub service_host_name: Option<String>,
    /// Device API host name (Location headers) [env: DPS_DEVICE_HOST_NAME].
    #[arg(long)]
    pub device_host_name: Option<String>,
    /// Data directory [env: DPS_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store: sqlite (default) or postgres://user:password@host:5432/db [env: DPS_STORE].
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// Default allocation policy: hashed, static or geoLatency [env: DPS_DEFAULT_ALLOCATION].
    #[arg(long)]
    pub default_allocation: Option<String>,
    /// Retry-After of 202 answers, seconds [env: DPS_RETRY_AFTER_SECS].
    #[arg(long)]
    pub retry_after_secs: Option<String>,
    /// Answer registers 202 before the hub work: true (default) or false [env: DPS_RESPOND_EARLY].
    #[arg(long, value_name = "BOOL")]
    pub respond_early: Option<String>,
    /// A poll of a registration still finishing here waits up to this for it, ms (default 100; 0 = at once)
    /// [env: DPS_POLL_HOLD_MS].
    #[arg(long, value_name = "MS")]
    pub poll_hold_ms: Option<String>,
    /// Request header read timeout, seconds [env: DPS_HEADER_READ_TIMEOUT_SECS].
    #[arg(long)]
    pub header_read_timeout_secs: Option<String>,
    /// Maximum concurrent connections [env: DPS_MAX_CONNECTIONS].
    #[arg(long)]
    pub max_connections: Option<String>,
    /// HTTPS listen address ip:port [env: DPS_HTTPS_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Option<String>,
    /// MQTT over TLS listen address ip:port, "" disables [env: DPS_MQTT_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<String>,
    /// AMQP 1.0 over TLS listen address ip:port, "" disables [env: DPS_AMQP_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub amqp_listen: Option<String>,
    /// Admin (plain HTTP /health, /metrics) listen address, "" disables [env: DPS_ADMIN_LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Subject alternative name of the server certificate; repeat for several [env: DPS_TLS_SANS, comma-separated].
    #[arg(long = "tls-san", value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Log format (filter with RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "DPS_LOG_FORMAT")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The flags as overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            id_scope: self.id_scope.clone(),
            service_host_name: self.service_host_name.clone(),
            device_host_name: self.device_host_name.clone(),
            data_dir: self.data_dir.clone(),
            store: self.store.clone(),
            default_allocation: self.default_allocation.clone(),
            retry_after_secs: self.retry_after_secs.clone(),
            respond_early: self.respond_early.clone(),
            poll_hold_ms: self.poll_hold_ms.clone(),
            header_read_timeout_secs: self.header_read_timeout_secs.clone(),
            max_connections: self.max_connections.clone(),
            https_listen: self.https_listen.clone(),
            mqtt_listen: self.mqtt_listen.clone(),
            amqp_listen: self.amqp_listen.clone(),
            admin_listen: self.admin_listen.clone(),
            subject_alt_names: (!self.tls_san.is_empty()).then(|| self.tls_san.clone()),
        }
    }

    /// Resolves the configuration: these flags over the environment (read through `env`) over the file
    /// (`--config`, else `DPS_CONFIG`, else none).
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<ServerConfig, ServerError> {
        let path =
            self.config.clone().or_else(|| env("DPS_CONFIG").filter(|p| !p.is_empty()).map(PathBuf::from));
        let file = match path {
            Some(p) => FileConfig::read(&p)?,
            None => FileConfig::default(),
        };
        Ok(ServerConfig::resolve(file, &Overrides::from_env(&env), &self.overrides())?)
    }
}

/// How admin commands reach and authenticate to the service.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Service connection string (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…).
    #[arg(long, env = "DPS_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Data directory of a local server (connection-string.txt, tls/ca.pem, ready.json) [default: ./dps-data].
    #[arg(long, env = "DPS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// CA certificate (PEM) to trust [default: DATA_DIR/tls/ca.pem].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Address to connect to, host:port [default: ready.json's HTTPS address, else HostName:443].
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
}

/// Allocation policy values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllocationArg {
    /// Evenly weighted distribution.
    Hashed,
    /// Exactly one hub.
    Static,
    /// Lowest latency.
    #[value(name = "geoLatency", alias = "geolatency")]
    GeoLatency,
}

/// Reprovision policy values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReprovisionArg {
    /// Move to the newly allocated hub with the device's data.
    #[value(name = "reprovisionandmigratedata")]
    ReprovisionAndMigrateData,
    /// Move to the newly allocated hub with the initial configuration.
    #[value(name = "reprovisionandresetdata")]
    ReprovisionAndResetData,
    /// Stay on the current hub.
    #[value(name = "neverreprovision")]
    NeverReprovision,
}

/// Provisioning status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Devices may provision.
    Enabled,
    /// Devices are refused.
    Disabled,
}

/// Enrollment and group settings.
#[derive(Debug, Clone, Args)]
pub struct SettingsArgs {
    /// Base64 primary key (omitted: generated by the service on create, kept on update).
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Base64 secondary key (omitted: generated by the service on create, kept on update).
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// Comma-separated IoT hub host names (omitted: every linked hub).
    #[arg(long, value_delimiter = ',')]
    pub iot_hubs: Option<Vec<String>>,
    /// Allocation policy (omitted: the instance default).
    #[arg(long, value_enum)]
    pub allocation_policy: Option<AllocationArg>,
    /// Reprovision policy.
    #[arg(long, value_enum)]
    pub reprovision_policy: Option<ReprovisionArg>,
    /// Initial twin tags, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub initial_twin_tags: Option<String>,
    /// Initial twin desired properties, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub initial_twin_properties: Option<String>,
    /// Provisioning status.
    #[arg(long, value_enum)]
    pub provisioning_status: Option<StatusArg>,
    /// IoT Edge device(s).
    #[arg(long)]
    pub edge_enabled: Option<bool>,
}

fn parse_object(text: &str, flag: &str) -> Result<Value, ServerError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ServerError::Client(format!("{flag} must be a JSON object"))),
        Err(e) => Err(ServerError::Client(format!("{flag} is not valid JSON: {e}"))),
    }
}

impl SettingsArgs {
    fn settings(&self, device_id: Option<String>) -> Result<EnrollmentSettings, ServerError> {
        Ok(EnrollmentSettings {
            primary_key: self.primary_key.clone(),
            secondary_key: self.secondary_key.clone(),
            iot_hubs: self.iot_hubs.clone(),
            allocation_policy: self.allocation_policy.map(|a| {
                match a {
                    AllocationArg::Hashed => "hashed",
                    AllocationArg::Static => "static",
                    AllocationArg::GeoLatency => "geoLatency",
                }
                .to_owned()
            }),
            reprovision: self.reprovision_policy.map(|r| match r {
                ReprovisionArg::ReprovisionAndMigrateData => Reprovision::ReprovisionAndMigrateData,
                ReprovisionArg::ReprovisionAndResetData => Reprovision::ReprovisionAndResetData,
                ReprovisionArg::NeverReprovision => Reprovision::NeverReprovision,
            }),
            initial_twin_tags: self
                .initial_twin_tags
                .as_deref()
                .map(|t| parse_object(t, "--initial-twin-tags"))
                .transpose()?,
            initial_twin_properties: self
                .initial_twin_properties
                .as_deref()
                .map(|t| parse_object(t, "--initial-twin-properties"))
                .transpose()?,
            provisioning_status: self.provisioning_status.map(|s| {
                match s {
                    StatusArg::Enabled => "enabled",
                    StatusArg::Disabled => "disabled",
                }
                .to_owned()
            }),
            edge_enabled: self.edge_enabled,
            device_id,
        })
    }
}

/// `enrollment create|update`.
#[derive(Debug, Clone, Args)]
pub struct EnrollmentWrite {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// Device ID in the hub (default: the registration ID).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Settings.
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Update only if the enrollment's ETag is this (default: the ETag read).
    #[arg(long)]
    pub etag: Option<String>,
}

/// `… show`.
#[derive(Debug, Clone, Args)]
pub struct EnrollmentShow {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// Include the keys (calls …/attestationmechanism).
    #[arg(long)]
    pub show_keys: bool,
}

/// `… list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Return at most this many items.
    #[arg(long)]
    pub top: Option<usize>,
    /// Items per page requested from the service.
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
}

/// `enrollment delete`.
#[derive(Debug, Clone, Args)]
pub struct EnrollmentDelete {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// Delete only if the ETag matches.
    #[arg(long)]
    pub etag: Option<String>,
}

/// Individual enrollment operations.
#[derive(Debug, Subcommand)]
pub enum EnrollmentAction {
    /// Create (or replace) an individual enrollment (symmetric key).
    Create(EnrollmentWrite),
    /// Show an individual enrollment.
    Show(EnrollmentShow),
    /// List individual enrollments.
    List(ListArgs),
    /// Update an individual enrollment (keys and unset settings are kept).
    Update(EnrollmentWrite),
    /// Delete an individual enrollment.
    Delete(EnrollmentDelete),
}

/// `group create|update`.
#[derive(Debug, Clone, Args)]
pub struct GroupWrite {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Enrollment group ID.
    #[arg(long)]
    pub group_id: String,
    /// Settings.
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Update only if the group's ETag is this (default: the ETag read).
    #[arg(long)]
    pub etag: Option<String>,
}

/// `group show`.
#[derive(Debug, Clone, Args)]
pub struct GroupShow {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Enrollment group ID.
    #[arg(long)]
    pub group_id: String,
    /// Include the keys (calls …/attestationmechanism).
    #[arg(long)]
    pub show_keys: bool,
}

/// `group delete`.
#[derive(Debug, Clone, Args)]
pub struct GroupDelete {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Enrollment group ID.
    #[arg(long)]
    pub group_id: String,
    /// Delete only if the ETag matches.
    #[arg(long)]
    pub etag: Option<String>,
}

/// Enrollment group operations.
#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// Create (or replace) a symmetric-key enrollment group.
    Create(GroupWrite),
    /// Show an enrollment group.
    Show(GroupShow),
    /// List enrollment groups.
    List(ListArgs),
    /// Update an enrollment group (keys and unset settings are kept).
    Update(GroupWrite),
    /// Delete an enrollment group (its devices' registration states stay).
    Delete(GroupDelete),
}

/// `registration show|delete`.
#[derive(Debug, Clone, Args)]
pub struct RegistrationOne {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// Delete only if the ETag matches.
    #[arg(long)]
    pub etag: Option<String>,
}

/// `registration list`.
#[derive(Debug, Clone, Args)]
pub struct RegistrationList {
    /// List options.
    #[command(flatten)]
    pub list: ListArgs,
    /// The enrollment group whose devices are listed.
    #[arg(long)]
    pub group_id: String,
}

/// Registration state operations.
#[derive(Debug, Subcommand)]
pub enum RegistrationAction {
    /// Show a device's registration state.
    Show(RegistrationOne),
    /// List the registration states of an enrollment group's devices.
    List(RegistrationList),
    /// Delete a device's registration state.
    Delete(RegistrationOne),
    /// Explain what a registration of this device would do (matched enrollment, candidate hubs, chosen
    /// hub and why, reprovisioning), without changing anything.
    Explain(RegistrationExplain),
}

/// `registration explain`.
#[derive(Debug, Clone, Args)]
pub struct RegistrationExplain {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// A hypothetical device of this enrollment group.
    #[arg(long)]
    pub group: Option<String>,
    /// The device's symmetric key (base64).
    #[arg(long)]
    pub device_key: Option<String>,
    /// The device's certificate chain (PEM, leaf first).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The device's IP address (lowest-latency allocation).
    #[arg(long)]
    pub from: Option<String>,
    /// The payload the device would send (JSON).
    #[arg(long)]
    pub payload: Option<String>,
}

impl RegistrationExplain {
    /// The explain request body.
    pub fn body(&self) -> Result<Value, ServerError> {
        let mut body = serde_json::json!({});
        if let Some(g) = &self.group {
            body["enrollmentGroupId"] = Value::String(g.clone());
        }
        if let Some(k) = &self.device_key {
            body["deviceKey"] = Value::String(k.clone());
        }
        if let Some(path) = &self.cert {
            let pem = std::fs::read(path)
                .map_err(|e| ServerError::Client(format!("--cert {}: {e}", path.display())))?;
            let certs = dps_client::tls::certificates(&pem)
                .map_err(|e| ServerError::Client(format!("--cert {}: {e}", path.display())))?;
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            body["certificates"] = certs.iter().map(|c| Value::String(b64.encode(c.as_ref()))).collect();
        }
        if let Some(ip) = &self.from {
            body["clientAddress"] = Value::String(ip.clone());
        }
        if let Some(p) = &self.payload {
            body["payload"] = serde_json::from_str(p)
                .map_err(|e| ServerError::Client(format!("--payload is not JSON: {e}")))?;
        }
        Ok(body)
    }
}

/// `certificate upload`.
#[derive(Debug, Clone, Args)]
pub struct CertificateUpload {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The certificate's name (ASCII letters, digits, `-`, `.`, `_`).
    #[arg(long)]
    pub name: String,
    /// The CA certificate, PEM or base64 DER.
    #[arg(long)]
    pub file: PathBuf,
    /// Set it verified on upload, without proof of possession.
    #[arg(long)]
    pub verified: bool,
    /// Replace only if the ETag matches.
    #[arg(long)]
    pub etag: Option<String>,
}

/// `certificate show|generate-code`.
#[derive(Debug, Clone, Args)]
pub struct CertificateOne {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The certificate's name.
    #[arg(long)]
    pub name: String,
}

/// `certificate delete`.
#[derive(Debug, Clone, Args)]
pub struct CertificateDelete {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The certificate's name.
    #[arg(long)]
    pub name: String,
    /// Delete only if the ETag matches (default: the current ETag, read first).
    #[arg(long)]
    pub etag: Option<String>,
}

/// `certificate verify`.
#[derive(Debug, Clone, Args)]
pub struct CertificateVerify {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The certificate's name.
    #[arg(long)]
    pub name: String,
    /// The verification certificate (subject CN = the verification code, signed by the CA), PEM or base64 DER.
    #[arg(long)]
    pub file: PathBuf,
}

/// CA-certificate operations.
#[derive(Debug, Subcommand)]
pub enum CertificateAction {
    /// Upload (or replace) a CA certificate.
    Upload(CertificateUpload),
    /// List the CA certificates.
    List(ConnectOnly),
    /// Show one CA certificate.
    Show(CertificateOne),
    /// Delete a CA certificate.
    Delete(CertificateDelete),
    /// Issue a verification code (prints the answer, with `properties.verificationCode`).
    GenerateCode(CertificateOne),
    /// Prove possession of the CA's private key with a verification certificate.
    Verify(CertificateVerify),
}

/// Linked-hub operations.
#[derive(Debug, Subcommand)]
pub enum HubAction {
    /// List the linked hubs and their adapters.
    List(ConnectOnly),
    /// Show one linked hub.
    Show(HubOne),
    /// Link a hub, or change one: only the settings given change.
    Set(HubSet),
    /// Unlink a hub.
    Remove(HubOne),
}

/// `hubs show` / `hubs remove`.
#[derive(Debug, Clone, Args)]
pub struct HubOne {
    /// The hub's host name.
    pub host_name: String,
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `hubs set`.
#[derive(Debug, Clone, Args)]
pub struct HubSet {
    /// The hub's host name.
    pub host_name: String,
    /// Allocation weight (1..=1000).
    #[arg(long)]
    pub weight: Option<u32>,
    /// Whether the hub takes part in automatic allocation.
    #[arg(long)]
    pub apply_allocation_policy: Option<bool>,
    /// Where the hub runs ("" clears it).
    #[arg(long)]
    pub location: Option<String>,
    /// The adapter: local, mosquitto or iothub.
    #[arg(long)]
    pub kind: Option<String>,
    /// mosquitto: the broker's host:port.
    #[arg(long)]
    pub broker: Option<String>,
    /// mosquitto: the dynamic-security admin username.
    #[arg(long)]
    pub admin_username: Option<String>,
    /// A file holding the credential: the broker admin's password (mosquitto) or the hub's connection
    /// string (iothub). Read from a file so that it shows in no process list or shell history.
    #[arg(long, value_name = "FILE")]
    pub credential_file: Option<PathBuf>,
    /// iothub: connect to this host:port instead of HostName:443.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// iothub: PEM file (on the server's machine) of the CAs trusted for the hub's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Bound on one hub operation, seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl HubSet {
    /// The `PUT /linkedHubs/{hostName}` body.
    pub fn body(&self, current_kind: Option<&str>) -> Result<Value, ServerError> {
        let mut body = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            body.insert(k.to_owned(), v);
        };
        if let Some(w) = self.weight {
            put("allocationWeight", serde_json::json!(w));
        }
        if let Some(a) = self.apply_allocation_policy {
            put("applyAllocationPolicy", serde_json::json!(a));
        }
        if let Some(l) = &self.location {
            put("location", serde_json::json!(l));
        }
        if let Some(k) = &self.kind {
            put("kind", serde_json::json!(k));
        }
        if let Some(b) = &self.broker {
            put("broker", serde_json::json!(b));
        }
        if let Some(u) = &self.admin_username {
            put("adminUsername", serde_json::json!(u));
        }
        if let Some(e) = &self.endpoint {
            put("endpoint", serde_json::json!(e));
        }
        if let Some(c) = &self.ca_file {
            put("caFile", serde_json::json!(c));
        }
        if let Some(t) = self.timeout_secs {
            put("timeoutSecs", serde_json::json!(t));
        }
        if let Some(path) = &self.credential_file {
            let secret = read_text(path, "the credential file")?.trim().to_owned();
            let field = match self.kind.as_deref().or(current_kind) {
                Some("mosquitto") => "adminPassword",
                Some("iothub") => "connectionString",
                other => {
                    return Err(ServerError::Client(format!(
                        "--credential-file needs a mosquitto or iothub hub (kind {})",
                        other.unwrap_or("local")
                    )))
                }
            };
            put(field, serde_json::json!(secret));
        }
        Ok(Value::Object(body))
    }
}

/// Commands that take only the connection.
#[derive(Debug, Clone, Args)]
pub struct ConnectOnly {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `fault add`: the keys of a `[[faults]]` rule as flags.
#[derive(Debug, Clone, Args)]
pub struct FaultAdd {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The rule's name [default: fault-N].
    #[arg(long)]
    pub id: Option<String>,
    /// Registration IDs it applies to: a glob (`*` any run, `?` one character, case-insensitive).
    #[arg(long, value_name = "PATTERN")]
    pub registration_id: String,
    /// What it does: throttle, error, latency, stuck_assigning or drop_connection.
    #[arg(long)]
    pub kind: String,
    /// Which requests: any, register or poll [default: any].
    #[arg(long)]
    pub requests: Option<String>,
    /// The chance it fires on a matching request, 0.0 to 1.0 [default: 1.0].
    #[arg(long)]
    pub probability: Option<f64>,
    /// Fire at most this many times [default: no limit].
    #[arg(long)]
    pub times: Option<u64>,
    /// throttle: the Retry-After to answer, 1 to 300 seconds.
    #[arg(long)]
    pub retry_after_secs: Option<u32>,
    /// error: a 5xx code of the error table (500000, 500001, 500002, 503000).
    #[arg(long)]
    pub code: Option<u32>,
    /// latency: milliseconds added before the request runs (at most 60000).
    #[arg(long)]
    pub latency_ms: Option<u32>,
    /// stuck_assigning: how long polls answer assigning [default: until the rule is removed].
    #[arg(long)]
    pub duration_secs: Option<u32>,
}

/// `fault remove`.
#[derive(Debug, Clone, Args)]
pub struct FaultRemove {
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The rule's name.
    #[arg(long)]
    pub id: String,
}

/// Fault-rule operations.
#[derive(Debug, Subcommand)]
pub enum FaultCommand {
    /// Add a rule (after the existing ones); prints it.
    Add(FaultAdd),
    /// List the rules in force with how often each fired.
    List(ConnectOnly),
    /// Remove a rule (a stuck assigning it caused ends).
    Remove(FaultRemove),
}

async fn run_fault(action: FaultCommand) -> ExitCode {
    let path = crate::faults::FAULTS_PATH;
    match action {
        FaultCommand::Add(a) => {
            let spec = crate::faults::FaultSpec {
                id: a.id,
                registration_id: a.registration_id,
                kind: a.kind,
                requests: a.requests,
                probability: a.probability,
                times: a.times,
                retry_after_secs: a.retry_after_secs,
                code: a.code,
                latency_ms: a.latency_ms,
                duration_secs: a.duration_secs,
            };
            let body = match serde_json::to_value(&spec) {
                Ok(b) => b,
                Err(e) => return fail(e),
            };
            match service_client(&a.connect) {
                Ok(c) => finish(c.call("POST", path, Some(&body), &[]).await.map(Some)),
                Err(e) => fail(e),
            }
        }
        FaultCommand::List(a) => match service_client(&a.connect) {
            Ok(c) => finish(c.call("GET", path, None, &[]).await.map(Some)),
            Err(e) => fail(e),
        },
        FaultCommand::Remove(a) => match service_client(&a.connect) {
            Ok(c) => {
                let target = format!("{path}/{}", crate::admin::segment(&a.id));
                finish(c.call("DELETE", &target, None, &[]).await.map(|_| None))
            }
            Err(e) => fail(e),
        },
    }
}

/// `provision-device`.
#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {
    /// The device's registration ID.
    #[arg(long)]
    pub registration_id: String,
    /// The enrollment group's key (the device key is derived from it).
    #[arg(long, conflicts_with_all = ["device_key", "cert"], required_unless_present_any = ["device_key", "cert"])]
    pub group_key: Option<String>,
    /// The device's own key (individual enrollment, or already derived).
    #[arg(long, conflicts_with = "cert")]
    pub device_key: Option<String>,
    /// X.509: the device certificate chain (PEM: leaf first, then the intermediates) to authenticate with.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// X.509: the private key (PEM or DER, PKCS#8) of `--cert`.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Have the service issue a device certificate: generate an ECDSA P-384 key, send a CSR for it
    /// (CN = the registration ID) and write the issued chain (PEM, leaf first) here.
    #[arg(long, value_name = "FILE", requires = "key_out")]
    pub cert_out: Option<PathBuf>,
    /// With `--cert-out`: where to write the new private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires = "cert_out")]
    pub key_out: Option<PathBuf>,
    /// With `--cert-out`: send this CSR (PEM or DER; its key is yours) instead of generating a key.
    #[arg(long, value_name = "FILE", requires = "cert_out", conflicts_with = "key_out")]
    pub csr: Option<PathBuf>,
    /// With `--cert-out`: also write the CSR that was sent (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_out")]
    pub csr_out: Option<PathBuf>,
    /// The ID scope.
    #[arg(long, env = "DPS_ID_SCOPE")]
    pub id_scope: String,
    /// Host to connect to (DNS name or IP; also the name the certificate is checked for).
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// HTTPS port.
    #[arg(long, default_value_t = 443)]
    pub port: u16,
    /// CA certificate (PEM) to trust.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Custom payload, a JSON value.
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// api-version to send [default: 2021-10-01, or 2025-07-01-preview with `--cert-out`].
    #[arg(long)]
    pub api_version: Option<String>,
    /// Device transport (`--port` is the HTTPS or the MQTT port accordingly).
    #[arg(long, value_enum, default_value_t = DeviceTransport::Https)]
    pub transport: DeviceTransport,
}

/// The device transport of `provision-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceTransport {
    /// HTTPS.
    Https,
    /// MQTT 3.1.1 over TLS.
    Mqtt,
}

fn read_text(path: &Path, what: &str) -> Result<String, ServerError> {
    std::fs::read_to_string(path)
        .map_err(|e| ServerError::Client(format!("cannot read {what} {}: {e}", path.display())))
}

/// Builds the service client from the connection arguments.
pub fn service_client(args: &ConnectArgs) -> Result<ServiceClient, ServerError> {
    let dir = DataDir::new(args.data_dir.clone().unwrap_or_else(|| PathBuf::from("./dps-data")));
    let text = match &args.connection_string {
        Some(s) => s.clone(),
        None => read_text(
            &dir.connection_string(),
            "the connection string (use --connection-string or --data-dir)",
        )?,
    };
    let connection =
        ConnectionString::parse(&text).map_err(|e| ServerError::Client(format!("connection string: {e}")))?;
    let ca_path = args.ca.clone().unwrap_or_else(|| dir.ca_cert());
    let tls = crate::tls::client_config(read_text(&ca_path, "the CA certificate (use --ca)")?.as_bytes())?;
    let address = match &args.server {
        Some(s) => s.clone(),
        None => match Ready::read(&dir) {
            Some(ready) => connectable(ready.https).to_string(),
            None => format!("{}:443", connection.host_name),
        },
    };
    let http = HttpsClient::new(address, &connection.host_name, tls)?;
    Ok(ServiceClient::new(http, connection))
}

/// A listener address a client can connect to (the unspecified address becomes loopback).
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("dps-server: {e}");
    ExitCode::FAILURE
}

fn finish(result: Result<Option<Value>, CallError>) -> ExitCode {
    match result {
        Ok(Some(v)) => {
            print_json(&v);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(CallError::Api(e)) => {
            eprintln!("dps-server: the service answered HTTP {}", e.status);
            eprintln!("{}", serde_json::to_string_pretty(&e.body).unwrap_or_else(|_| e.body.to_string()));
            ExitCode::FAILURE
        }
        Err(CallError::Transport(e)) => fail(e),
    }
}

async fn run_hubs(action: HubAction) -> ExitCode {
    let connect = match &action {
        HubAction::List(a) => &a.connect,
        HubAction::Show(a) | HubAction::Remove(a) => &a.connect,
        HubAction::Set(a) => &a.connect,
    };
    let client = match service_client(connect) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = match action {
        HubAction::List(_) => client.linked_hubs().await.map(Some),
        HubAction::Show(a) => client.linked_hub(&a.host_name).await.map(Some),
        HubAction::Remove(a) => client.remove_linked_hub(&a.host_name).await.map(|()| None),
        HubAction::Set(a) => {
            // The credential's field depends on the kind: the current one unless --kind changes it.
            let current = match (&a.kind, &a.credential_file) {
                (None, Some(_)) => client.linked_hub(&a.host_name).await.ok(),
                _ => None,
            };
            let kind = current.as_ref().and_then(|c| c.get("kind")).and_then(Value::as_str);
            match a.body(kind) {
                Ok(body) => client.set_linked_hub(&a.host_name, &body).await.map(Some),
                Err(e) => return fail(e),
            }
        }
    };
    finish(result)
}

async fn run_certificate(action: CertificateAction) -> ExitCode {
    let connect = match &action {
        CertificateAction::Upload(a) => &a.connect,
        CertificateAction::List(a) => &a.connect,
        CertificateAction::Show(a) | CertificateAction::GenerateCode(a) => &a.connect,
        CertificateAction::Delete(a) => &a.connect,
        CertificateAction::Verify(a) => &a.connect,
    };
    let client = match service_client(connect) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = match action {
        CertificateAction::Upload(a) => match read_text(&a.file, "the certificate file") {
            Ok(text) => {
                client.upload_certificate(&a.name, &text, a.verified, a.etag.as_deref()).await.map(Some)
            }
            Err(e) => return fail(e),
        },
        CertificateAction::List(_) => client.certificates().await.map(Some),
        CertificateAction::Show(a) => client.certificate(&a.name).await.map(Some),
        CertificateAction::Delete(a) => {
            client.delete_certificate(&a.name, a.etag.as_deref()).await.map(|()| None)
        }
        CertificateAction::GenerateCode(a) => {
            client.generate_verification_code(&a.name, None).await.map(Some)
        }
        CertificateAction::Verify(a) => match read_text(&a.file, "the verification certificate file") {
            Ok(text) => client.verify_certificate(&a.name, &text, None).await.map(Some),
            Err(e) => return fail(e),
        },
    };
    finish(result)
}

async fn write_command(
    connect: &ConnectArgs,
    kind: Kind,
    id: &str,
    settings: Result<EnrollmentSettings, ServerError>,
    update: Option<Option<&str>>,
) -> ExitCode {
    let (client, settings) = match (service_client(connect), settings) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let result = match update {
        None => client.create(kind, id, &settings).await,
        Some(etag) => client.update(kind, id, &settings, etag).await,
    };
    finish(result.map(Some))
}

/// Runs an admin command (everything but `run`).
pub async fn run_admin(command: Command) -> ExitCode {
    match command {
        Command::Run(_) => fail("`run` is not an admin command"),
        Command::Enrollment { action } => match action {
            EnrollmentAction::Create(a) => {
                let s = a.settings.settings(a.device_id.clone());
                write_command(&a.connect, Kind::Enrollment, &a.registration_id, s, None).await
            }
            EnrollmentAction::Update(a) => {
                let s = a.settings.settings(a.device_id.clone());
                write_command(&a.connect, Kind::Enrollment, &a.registration_id, s, Some(a.etag.as_deref()))
                    .await
            }
            EnrollmentAction::Show(a) => match service_client(&a.connect) {
                Ok(c) => finish(c.show(Kind::Enrollment, &a.registration_id, a.show_keys).await.map(Some)),
                Err(e) => fail(e),
            },
            EnrollmentAction::List(a) => match service_client(&a.connect) {
                Ok(c) => {
                    finish(c.list(Kind::Enrollment, a.page_size, a.top).await.map(|v| Some(Value::Array(v))))
                }
                Err(e) => fail(e),
            },
            EnrollmentAction::Delete(a) => match service_client(&a.connect) {
                Ok(c) => finish(
                    c.delete(Kind::Enrollment, &a.registration_id, a.etag.as_deref()).await.map(|()| None),
                ),
                Err(e) => fail(e),
            },
        },
        Command::Group { action } => match action {
            GroupAction::Create(a) => {
                let s = a.settings.settings(None);
                write_command(&a.connect, Kind::Group, &a.group_id, s, None).await
            }
            GroupAction::Update(a) => {
                let s = a.settings.settings(None);
                write_command(&a.connect, Kind::Group, &a.group_id, s, Some(a.etag.as_deref())).await
            }
            GroupAction::Show(a) => match service_client(&a.connect) {
                Ok(c) => finish(c.show(Kind::Group, &a.group_id, a.show_keys).await.map(Some)),
                Err(e) => fail(e),
            },
            GroupAction::List(a) => match service_client(&a.connect) {
                Ok(c) => finish(c.list(Kind::Group, a.page_size, a.top).await.map(|v| Some(Value::Array(v)))),
                Err(e) => fail(e),
            },
            GroupAction::Delete(a) => match service_client(&a.connect) {
                Ok(c) => finish(c.delete(Kind::Group, &a.group_id, a.etag.as_deref()).await.map(|()| None)),
                Err(e) => fail(e),
            },
        },
        Command::Registration { action } => match action {
            RegistrationAction::Show(a) => match service_client(&a.connect) {
                Ok(c) => finish(c.registration(&a.registration_id).await.map(Some)),
                Err(e) => fail(e),
            },
            RegistrationAction::List(a) => match service_client(&a.list.connect) {
                Ok(c) => finish(
                    c.registrations(&a.group_id, a.list.page_size, a.list.top)
                        .await
                        .map(|v| Some(Value::Array(v))),
                ),
                Err(e) => fail(e),
            },
            RegistrationAction::Delete(a) => match service_client(&a.connect) {
                Ok(c) => {
                    finish(c.delete_registration(&a.registration_id, a.etag.as_deref()).await.map(|()| None))
                }
                Err(e) => fail(e),
            },
            RegistrationAction::Explain(a) => match (service_client(&a.connect), a.body()) {
                (Ok(c), Ok(body)) => finish(
                    c.call(
                        "POST",
                        &format!("/registrations/{}/explain", a.registration_id),
                        Some(&body),
                        &[],
                    )
                    .await
                    .map(Some),
                ),
                (Err(e), _) | (_, Err(e)) => fail(e),
            },
        },
        Command::Certificate { action } => run_certificate(action).await,
        Command::Hubs { action } => run_hubs(action).await,
        Command::Fault { action } => run_fault(action).await,
        Command::Admin { action } => {
            let result = match action {
                AdminAction::HubDevices(a) => crate::admin::hub_devices(&a.local.dir(), &a.hub),
                AdminAction::Twin(a) => crate::admin::twin(&a.local.dir(), &a.hub, &a.device),
                AdminAction::Usage(a) => crate::admin::usage_report(&a.local.dir(), a.days, now()),
                AdminAction::Audit(a) => crate::admin::audit_report(&a),
                AdminAction::RotateKek(a) => a.kek.provider().and_then(|p| {
                    crate::encryption::rotate_kek(&p, &a.kek.local.dir(), &a.new_key_file)
                        .map(|m| serde_json::json!({ "rotated": m }))
                }),
                AdminAction::RotateDataKey(a) => a.provider().and_then(|p| {
                    crate::encryption::rotate_data_key(&p, &a.local.dir())
                        .map(|m| serde_json::json!({ "rotated": m }))
                }),
            };
            match result {
                Ok(v) => {
                    print_json(&v);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Export(a) => match run_export(&a).await {
            Ok(v) => {
                eprintln!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Import(a) => match run_import(&a).await {
            Ok(v) => {
                print_json(&v);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::ProvisionDevice(a) => match provision_device(&a).await {
            Ok(v) => {
                print_json(&v);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

/// `provision-device`: progress on stderr, the assignment (JSON) returned.
pub async fn provision_device(a: &ProvisionArgs) -> Result<Value, ServerError> {
    let bad = |what: &str, e: dps_core::DpsError| ServerError::Client(format!("{what}: {}", e.message));
    let id_scope = IdScope::parse(&a.id_scope).map_err(|e| bad("--id-scope", e))?;
    let registration_id =
        RegistrationId::parse(&a.registration_id).map_err(|e| bad("--registration-id", e))?;
    let device_key = match (&a.group_key, &a.device_key, &a.cert) {
        (Some(g), _, _) => Some(
            SymmetricKey::parse(g.trim())
                .map_err(|e| bad("--group-key", e))?
                .derive_device_key(registration_id.as_str()),
        ),
        (None, Some(d), _) => Some(SymmetricKey::parse(d.trim()).map_err(|e| bad("--device-key", e))?),
        (None, None, Some(_)) => None,
        (None, None, None) => {
            return Err(ServerError::Client("give --group-key, --device-key or --cert/--key".into()))
        }
    };
    let identity = match (&a.cert, &a.key) {
        (Some(cert), Some(key)) => {
            let chain = std::fs::read(cert)
                .map_err(|e| ServerError::Client(format!("reading --cert {}: {e}", cert.display())))?;
            let key = std::fs::read(key)
                .map_err(|e| ServerError::Client(format!("reading --key {}: {e}", key.display())))?;
            Some(
                dps_client::ClientIdentity::from_pem_or_der(&chain, &key)
                    .map_err(|e| ServerError::Client(format!("--cert/--key: {e}")))?,
            )
        }
        _ => None,
    };
    let issuance = match &a.cert_out {
        Some(_) => Some(device_csr(a, &registration_id)?),
        None => None,
    };
    let mut config = match device_key {
        Some(key) => ClientConfig::new(id_scope, registration_id, key),
        None => ClientConfig::x509(id_scope, registration_id),
    };
    config.api_version = match (&a.api_version, &issuance) {
        (Some(v), _) => ApiVersion::parse(v).map_err(|e| bad("--api-version", e))?,
        (None, Some(_)) => ApiVersion::V2025_07_01Preview,
        (None, None) => ApiVersion::V2021_10_01,
    };
    config.csr = issuance.as_ref().map(|i| i.csr_base64.clone());
    config.payload = a
        .payload
        .as_deref()
        .map(|p| {
            serde_json::from_str(p).map_err(|e| ServerError::Client(format!("--payload is not JSON: {e}")))
        })
        .transpose()?;
    let roots = dps_client::tls::certificates(read_text(&a.ca, "the CA certificate")?.as_bytes())
        .map_err(|e| ServerError::Client(format!("--ca: {e}")))?;
    let tls = dps_client::tls::client_config(&roots, identity.as_ref(), &[])
        .map_err(|e| ServerError::Client(format!("TLS: {e}")))?;
    let address = match a.host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, a.port).to_string(),
        Err(_) => format!("{}:{}", a.host, a.port),
    };
    let http = HttpsClient::new(address, &a.host, tls)?;
    let transport = match a.transport {
        DeviceTransport::Https => dps_client::Transport::Https,
        DeviceTransport::Mqtt => dps_client::Transport::Mqtt,
    };
    let result = crate::provision::provision_over(&http, transport, config, |x| {
        let retry = x.retry_after.map(|r| format!(" (Retry-After {r})")).unwrap_or_default();
        eprintln!("device -> {}", x.request);
        eprintln!("device <- {}{retry} {}", x.status, x.body);
    })
    .await?;
    if let (Some(issuance), Some(cert_out)) = (issuance, &a.cert_out) {
        write_issued(&result, issuance, cert_out, a)?;
    }
    serde_json::to_value(&result).map_err(|e| ServerError::Client(format!("serializing the result: {e}")))
}

/// The CSR `provision-device --cert-out` sends, and the new key when it generated one.
struct Issuance {
    csr_base64: String,
    csr_pem: String,
    key_pem: Option<String>,
}

fn device_csr(a: &ProvisionArgs, registration_id: &RegistrationId) -> Result<Issuance, ServerError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let fail = |what: &str, e: &dyn std::fmt::Display| ServerError::Client(format!("{what}: {e}"));
    if let Some(path) = &a.csr {
        let bytes =
            std::fs::read(path).map_err(|e| fail(&format!("reading --csr {}", path.display()), &e))?;
        let der = match std::str::from_utf8(&bytes) {
            Ok(text) if text.trim_start().starts_with("-----BEGIN") => {
                let (label, der) = der_pem(text).map_err(|e| fail("--csr", &e))?;
                if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
                    return Err(ServerError::Client(format!("--csr holds a '{label}' PEM block, not a CSR")));
                }
                der
            }
            _ => bytes,
        };
        let csr_pem = pem_block("CERTIFICATE REQUEST", &der);
        return Ok(Issuance { csr_base64: b64.encode(&der), csr_pem, key_pem: None });
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
        .map_err(|e| fail("generating the device key", &e))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, registration_id.as_str());
    let csr = params.serialize_request(&key).map_err(|e| fail("making the CSR", &e))?;
    let der = csr.der().to_vec();
    Ok(Issuance {
        csr_base64: b64.encode(&der),
        csr_pem: pem_block("CERTIFICATE REQUEST", &der),
        key_pem: Some(key.serialize_pem()),
    })
}

fn der_pem(text: &str) -> Result<(String, Vec<u8>), String> {
    use base64::Engine as _;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|l| l.strip_suffix("-----"))
        .ok_or_else(|| "not a PEM block".to_owned())?
        .to_owned();
    let body: String = lines.take_while(|l| !l.starts_with("-----END")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| format!("the PEM body is not base64: {e}"))?;
    Ok((label, der))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_issued(
    result: &dps_core::proto::model::DeviceRegistrationResult,
    issuance: Issuance,
    cert_out: &Path,
    a: &ProvisionArgs,
) -> Result<(), ServerError> {
    use base64::Engine as _;
    let chain = result.issued_certificate_chain.as_deref().unwrap_or_default();
    if chain.is_empty() {
        return Err(ServerError::Client(
            "the service assigned the device but returned no issued certificate chain".into(),
        ));
    }
    let mut pem = String::new();
    for cert in chain {
        let der = base64::engine::general_purpose::STANDARD
            .decode(cert.as_bytes())
            .map_err(|e| ServerError::Client(format!("the issued certificate is not base64: {e}")))?;
        pem.push_str(&pem_block("CERTIFICATE", &der));
    }
    let write = |path: &Path, contents: &str| {
        crate::datadir::write_file(path, contents.as_bytes())
            .map_err(|e| ServerError::Client(format!("writing {}: {e}", path.display())))
    };
    write(cert_out, &pem)?;
    if let (Some(key_pem), Some(key_out)) = (&issuance.key_pem, &a.key_out) {
        write(key_out, key_pem)?;
    }
    if let Some(csr_out) = &a.csr_out {
        write(csr_out, &issuance.csr_pem)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default() {
        let cli = Cli::try_parse_from(["dps-server", "--id-scope", "0ne00000001"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.id_scope.as_deref(), Some("0ne00000001"));
        let cli = Cli::try_parse_from(["dps-server", "run", "--https-listen", "127.0.0.1:0"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Run(ref r)) if r.https_listen.as_deref() == Some("127.0.0.1:0"))
        );
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dps.toml");
        std::fs::write(
            &file,
            "id_scope = \"0ne00000001\"\nservice_host_name = \"file\"\ndevice_host_name = \"file\"\ndata_dir = \"/file\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "dps-server",
            "--config",
            file.to_str().unwrap(),
            "--service-host-name",
            "flag",
        ])
        .unwrap();
        let env = |k: &str| match k {
            "DPS_SERVICE_HOST_NAME" => Some("env".to_owned()),
            "DPS_DEVICE_HOST_NAME" => Some("env".to_owned()),
            _ => None,
        };
        let c = cli.run.resolve(env).unwrap();
        assert_eq!(c.service_host_name, "flag");
        assert_eq!(c.device_host_name, "env");
        assert_eq!(c.data_dir, PathBuf::from("/file"));
    }

    #[test]
    fn admin_flags_parse() {
        let cli = Cli::try_parse_from([
            "dps-server",
            "enrollment",
            "create",
            "--registration-id",
            "dev-1",
            "--iot-hubs",
            "a.example,b.example",
            "--reprovision-policy",
            "neverreprovision",
            "--allocation-policy",
            "geoLatency",
            "--initial-twin-tags",
            "{\"x\":1}",
        ])
        .unwrap();
        let Some(Command::Enrollment { action: EnrollmentAction::Create(a) }) = cli.command else {
            panic!("not an enrollment create");
        };
        let s = a.settings.settings(None).unwrap();
        assert_eq!(s.iot_hubs, Some(vec!["a.example".to_owned(), "b.example".to_owned()]));
        assert_eq!(s.reprovision, Some(Reprovision::NeverReprovision));
        assert_eq!(s.allocation_policy.as_deref(), Some("geoLatency"));
        assert!(Cli::try_parse_from([
            "dps-server",
            "provision-device",
            "--registration-id",
            "d",
            "--ca",
            "x"
        ])
        .is_err());
    }
}
