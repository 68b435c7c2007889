//! Server configuration: a TOML file, environment variables and command-line flags, merged with the
//! precedence **flags > environment > file > defaults**.
//!
//! The file schema (every key optional except `id_scope`, which may also come from `--id-scope` or
//! `DPS_ID_SCOPE`):
//!
//! ```toml
//! id_scope = "0ne00000001"
//! service_host_name = "localhost"        # HostName of the connection string = audience of service SAS tokens
//! device_host_name = "localhost"         # used in Location headers
//! data_dir = "./dps-data"
//! store = "sqlite"                       # or "postgres://user:password@host:5432/db": replicas share it
//! store_max_connections = 16             # postgres: pooled connections per process
//! store_pool_wait_ms = 2000              # postgres: a request waits this long for a free connection
//! default_allocation = "hashed"          # hashed | static | geoLatency
//! retry_after_secs = 2
//! respond_early = true                 # answer a register 202 before the hub work (Azure's behaviour)
//! poll_hold_ms = 100                     # a poll of a registration still finishing here waits up to this
//! max_symmetric_key_groups = 100         # spec 10.1; creating one more is refused with 403002
//! max_ca_certificates = 25               # spec 10.1; uploading one more is refused with 403002
//! max_connections_per_address = 2500     # default: a quarter of max_connections (at least 16)
//! max_auth_failures_per_address_per_minute = 600  # 401 storms: beyond it 429001 (0 turns it off)
//! auth_failure_burst = 60                # failures an address may make at once before the rate applies
//! header_read_timeout_secs = 10
//! max_connections = 10000
//! tls_handshake_timeout_secs = 10        # extension: TLS handshake deadline
//! shutdown_grace_secs = 10               # extension: bounded wait for in-flight requests on shutdown
//! [listen]
//! https = "0.0.0.0:443"                  # port 0 = any free port (tests)
//! mqtt = "0.0.0.0:8883"                  # "" disables
//! amqp = "0.0.0.0:5671"                  # AMQP 1.0 over TLS; "" disables
//! admin = ""                             # plain HTTP /health + /metrics, e.g. "127.0.0.1:9090"
//! [tls]
//! subject_alt_names = ["localhost", "127.0.0.1"]
//! [[linked_hubs]]
//! host_name = "hub-1.example.net"
//! allocation_weight = 1
//! apply_allocation_policy = true
//! location = "westeurope"                # optional: the name a [[latency]] row may use for the hub
//! kind = "local"                         # local (default) | mosquitto | iothub: the adapter serving it
//! # kind = "mosquitto":  broker = "127.0.0.1:1883", admin_username = "admin", admin_password = "…"
//! # kind = "iothub":     connection_string = "HostName=…;SharedAccessKeyName=…;SharedAccessKey=…",
//! #                      endpoint = "host:port" (optional), ca_file = "roots.pem" (optional)
//! # timeout_secs = 10                    # bound on one hub operation (mosquitto, iothub)
//! [[latency]]                            # geoLatency: client networks -> latency (ms) to hubs, by host
//! network = "10.1.0.0/16"                #   name or location; the most specific network wins; a device
//! hubs = { westeurope = 20, "hub-2.example.net" = 120 }  # from an unlisted network is hashed
//! [certificate_issuance]                # devices may send a CSR (api-version 2025-07-01-preview)
//! enabled = false                        # on: a CA is created in DATA_DIR/issuer and registered verified
//! key = "p384"                           # p384 | p256: the issuing CA's key (new CA only)
//! validity_days = 30                     # issued device certificates
//! [custom_allocation]                   # the webhook client of allocationPolicy "custom" (spec 8.3-8.5)
//! ca_file = "webhook-ca.pem"             # extra trust roots (PEM) besides the system's, e.g. a private CA
//! allow_http = false                     # accept http:// webhook URLs (local development only)
//! timeout_ms = 30000                     # one attempt (connect + TLS + request + answer)
//! attempts = 10                          # on 429 / 5xx / timeout: Azure's 10 attempts,
//! initial_interval_ms = 1000             #   waiting 1 s before the second,
//! increment_ms = 9000                    #   and 9 s more before each further one
//! [encryption]                          # encryption at rest of every stored secret (always on)
//! key_provider = "file"                  # file | env: where the key-encryption key (KEK) comes from
//! key_file = "./dps-data/kek.key"        # file: default DATA_DIR/kek.key, created (mode 0600) if absent
//! env_var = "DPS_KEK"                    # env: the variable holding the base64 KEK (32 bytes)
//! [quotas]                              # rate limits (spec 10.2): off unless set; 429001 + Retry-After beyond
//! preset = "none"                        # none | azure (1000 registrations/min, 5 polls/device/10 s, 1000 service ops/min)
//! registrations_per_minute = 1000        # register + status lookup, per instance (0 off)
//! polls_per_device_per_10s = 5           # operation-status polls of one device (0 off)
//! service_operations_per_minute = 1000   # service API calls, per instance (0 off)
//! [[faults]]                            # fault injection (off unless rules are given; see crate::faults)
//! registration_id = "flaky-*"
//! kind = "throttle"                      # throttle | error | latency | stuck_assigning | drop_connection
//! retry_after_secs = 5
//! probability = 0.5
//! fault_seed = 1                         # top-level: seed of the fault RNG (default: OS entropy)
//! [[access_policies]]
//! key_name = "enrollmentread"
//! primary_key = "<base64>"
//! secondary_key = "<base64>"
//! rights = "EnrollmentRead, RegistrationStatusRead"
//! ```
//!
//! Unknown keys are refused (a typo must not silently fall back to a default). Relative paths are relative
//! to the working directory of the server process.

use dps_core::proto::model::AllocationPolicy;
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::IdScope;
use dps_core::{AccessPolicy, LinkedHub, Rights, OWNER_POLICY};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error, with a message that names the setting and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// The configuration file as written (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The ID scope this instance serves.
    pub id_scope: Option<String>,
    /// Service API host name (audience of service SAS tokens).
    pub service_host_name: Option<String>,
    /// Device API host name (Location headers).
    pub device_host_name: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// The store: `sqlite` (default, `dps.sqlite3` in the data directory) or a `postgres://` URL.
    pub store: Option<String>,
    /// PostgreSQL: pooled connections per process.
    pub store_max_connections: Option<usize>,
    /// PostgreSQL: how long a request waits for a free pooled connection, in milliseconds.
    pub store_pool_wait_ms: Option<u64>,
    /// Default allocation policy.
    pub default_allocation: Option<String>,
    /// Retry-After of 202 answers.
    pub retry_after_secs: Option<u32>,
    /// Answer a register `202 assigning` before the hub work.
    pub respond_early: Option<bool>,
    /// How long a poll of a registration still finishing in this process waits for it, milliseconds.
    pub poll_hold_ms: Option<u64>,
    /// The most symmetric-key enrollment groups (default 100, as Azure).
    pub max_symmetric_key_groups: Option<usize>,
    /// The most CA certificates (default 25, as Azure).
    pub max_ca_certificates: Option<usize>,
    /// The most connections one client address may hold (default: a quarter of `max_connections`).
    pub max_connections_per_address: Option<usize>,
    /// Failed device authentications (401) one client address may make per minute (default 600, 0 off).
    pub max_auth_failures_per_address_per_minute: Option<u32>,
    /// Failed device authentications one client address may make at once (default 60).
    pub auth_failure_burst: Option<u32>,
    /// How many client addresses the failure limiter remembers (default 10000).
    pub auth_failure_tracked_addresses: Option<usize>,
    /// Header read timeout.
    pub header_read_timeout_secs: Option<u64>,
    /// Maximum concurrent connections.
    pub max_connections: Option<usize>,
    /// TLS handshake timeout.
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Bounded wait for in-flight work on shutdown.
    pub shutdown_grace_secs: Option<u64>,
    /// Listen addresses.
    #[serde(default)]
    pub listen: FileListen,
    /// TLS settings.
    #[serde(default)]
    pub tls: FileTls,
    /// Linked IoT hubs (absent: one hub `hub-1.localhost`).
    pub linked_hubs: Option<Vec<FileLinkedHub>>,
    /// Extra shared access policies.
    #[serde(default)]
    pub access_policies: Vec<FileAccessPolicy>,
    /// Certificate issuance from device CSRs.
    #[serde(default)]
    pub certificate_issuance: FileIssuance,
    /// Encryption at rest.
    #[serde(default)]
    pub encryption: FileEncryption,
    /// Rate limits.
    #[serde(default)]
    pub quotas: FileQuotas,
    /// Fault rules.
    #[serde(default)]
    pub faults: Vec<crate::faults::FaultSpec>,
    /// Seed of the RNG that rolls fault probabilities (default: OS entropy).
    pub fault_seed: Option<u64>,
    /// The custom allocation webhook client.
    #[serde(default)]
    pub custom_allocation: FileCustomAllocation,
    /// The latency table of `geoLatency` allocation.
    #[serde(default)]
    pub latency: Vec<FileLatency>,
}

/// `[[latency]]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLatency {
    /// A client network in CIDR notation.
    pub network: String,
    /// Latency in ms to hubs, keyed by host name or location.
    pub hubs: std::collections::BTreeMap<String, u32>,
}

/// `[custom_allocation]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCustomAllocation {
    /// Extra trust roots (PEM) for https:// webhooks.
    pub ca_file: Option<PathBuf>,
    /// Accept http:// webhook URLs.
    pub allow_http: Option<bool>,
    /// Timeout of one attempt, ms.
    pub timeout_ms: Option<u64>,
    /// Attempts in all.
    pub attempts: Option<u32>,
    /// Wait before the second attempt, ms.
    pub initial_interval_ms: Option<u64>,
    /// Added to the wait before each further attempt, ms.
    pub increment_ms: Option<u64>,
}

/// The custom allocation webhook client's settings (`[custom_allocation]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomAllocationConfig {
    /// Extra trust roots (PEM file) besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Accept http:// webhook URLs.
    pub allow_http: bool,
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Attempts in all (1..=20).
    pub attempts: u32,
    /// Wait before the second attempt.
    pub initial_interval: Duration,
    /// Added to the wait before each further attempt.
    pub increment: Duration,
}

/// `[quotas]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuotas {
    /// `none` (default) or `azure`: the values the keys below start from.
    pub preset: Option<String>,
    /// Registrations (register and status lookup) per minute, per instance; 0 turns the limit off.
    pub registrations_per_minute: Option<u32>,
    /// Operation-status polls per device per 10 seconds; 0 turns the limit off.
    pub polls_per_device_per_10s: Option<u32>,
    /// Service API operations per minute, per instance; 0 turns the limit off.
    pub service_operations_per_minute: Option<u32>,
    /// How many devices' poll budgets are remembered at once (default 100000).
    pub tracked_devices: Option<usize>,
}

/// `[encryption]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEncryption {
    /// `file` (default) or `env`.
    pub key_provider: Option<String>,
    /// The KEK file (provider `file`; default `DATA_DIR/kek.key`).
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the KEK (provider `env`; default `DPS_KEK`).
    pub env_var: Option<String>,
}

/// Where the key-encryption key of encryption at rest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProviderConfig {
    /// A key file (created with mode 0600 if absent).
    File(PathBuf),
    /// An environment variable holding base64 of 32 bytes.
    Env(String),
}

/// `[certificate_issuance]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIssuance {
    /// Issue device certificates for CSRs (default false).
    pub enabled: Option<bool>,
    /// The issuing CA's key: `p384` (default) or `p256`.
    pub key: Option<String>,
    /// Validity of issued certificates in days (default 30).
    pub validity_days: Option<u32>,
}

/// Certificate issuance settings (spec §7.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuanceConfig {
    /// The issuing CA's key kind (used when the CA is created).
    pub key: dps_host::CaKeyKind,
    /// How long issued device certificates are valid.
    pub validity: Duration,
}

/// `[listen]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    /// HTTPS listener.
    pub https: Option<String>,
    /// MQTT over TLS listener (`""` disables).
    pub mqtt: Option<String>,
    /// AMQP 1.0 over TLS listener (`""` disables).
    pub amqp: Option<String>,
    /// Plain HTTP admin listener (`""` disables).
    pub admin: Option<String>,
}

/// `[tls]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// Subject alternative names of the generated server certificate.
    pub subject_alt_names: Option<Vec<String>>,
}

/// `[[linked_hubs]]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLinkedHub {
    /// Hub host name.
    pub host_name: String,
    /// Allocation weight (1..=1000, default 1).
    pub allocation_weight: Option<u32>,
    /// Whether the hub takes part in automatic allocation (default true).
    pub apply_allocation_policy: Option<bool>,
    /// Where the hub runs (optional).
    #[serde(default)]
    pub location: Option<String>,
    /// The adapter serving it: `local` (default), `mosquitto`, `iothub`.
    #[serde(default)]
    pub kind: Option<String>,
    /// mosquitto: the broker's `host:port`.
    #[serde(default)]
    pub broker: Option<String>,
    /// mosquitto: the dynamic-security admin username.
    #[serde(default)]
    pub admin_username: Option<String>,
    /// mosquitto: its password.
    #[serde(default)]
    pub admin_password: Option<String>,
    /// iothub: the hub's connection string.
    #[serde(default)]
    pub connection_string: Option<String>,
    /// iothub: connect here instead of `HostName:443`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// iothub: PEM file of the trusted CAs (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Bound on one hub operation, seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

impl FileLinkedHub {
    /// A local hub with defaults.
    pub fn named(host_name: &str) -> FileLinkedHub {
        FileLinkedHub {
            host_name: host_name.to_owned(),
            allocation_weight: None,
            apply_allocation_policy: None,
            location: None,
            kind: None,
            broker: None,
            admin_username: None,
            admin_password: None,
            connection_string: None,
            endpoint: None,
            ca_file: None,
            timeout_secs: None,
        }
    }

    fn adapter(&self) -> crate::linked::AdapterSettings {
        crate::linked::AdapterSettings {
            kind: self.kind.clone(),
            broker: self.broker.clone(),
            admin_username: self.admin_username.clone(),
            admin_password: self.admin_password.clone(),
            connection_string: self.connection_string.clone(),
            endpoint: self.endpoint.clone(),
            ca_file: self.ca_file.clone(),
            timeout_secs: self.timeout_secs,
        }
    }
}

/// `[[access_policies]]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccessPolicy {
    /// Policy name (`skn`).
    pub key_name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
    /// Comma-separated rights, e.g. `"EnrollmentRead, RegistrationStatusRead"`.
    pub rights: String,
}

impl FileConfig {
    /// Parses TOML text (`origin` names the source in error messages).
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| err(format!("{origin}: {e}")))
    }

    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read the configuration file {}: {e}", path.display())))?;
        FileConfig::parse(&text, &path.display().to_string())
    }
}

/// Settings that environment variables and flags may override (all optional). The environment and the
/// flags each produce one of these; [`ServerConfig::resolve`] applies them over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--id-scope` / `DPS_ID_SCOPE`.
    pub id_scope: Option<String>,
    /// `--service-host-name` / `DPS_SERVICE_HOST_NAME`.
    pub service_host_name: Option<String>,
    /// `--device-host-name` / `DPS_DEVICE_HOST_NAME`.
    pub device_host_name: Option<String>,
    /// `--data-dir` / `DPS_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--store` / `DPS_STORE` (`sqlite` or a `postgres://` URL).
    pub store: Option<String>,
    /// `--default-allocation` / `DPS_DEFAULT_ALLOCATION`.
    pub default_allocation: Option<String>,
    /// `--retry-after-secs` / `DPS_RETRY_AFTER_SECS`.
    pub retry_after_secs: Option<String>,
    /// `--respond-early` / `DPS_RESPOND_EARLY` (`true` or `false`).
    pub respond_early: Option<String>,
    /// `--poll-hold-ms` / `DPS_POLL_HOLD_MS`.
    pub poll_hold_ms: Option<String>,
    /// `--header-read-timeout-secs` / `DPS_HEADER_READ_TIMEOUT_SECS`.
    pub header_read_timeout_secs: Option<String>,
    /// `--max-connections` / `DPS_MAX_CONNECTIONS`.
    pub max_connections: Option<String>,
    /// `--https-listen` / `DPS_HTTPS_LISTEN`.
    pub https_listen: Option<String>,
    /// `--mqtt-listen` / `DPS_MQTT_LISTEN` (`""` disables).
    pub mqtt_listen: Option<String>,
    /// `--amqp-listen` / `DPS_AMQP_LISTEN` (`""` disables).
    pub amqp_listen: Option<String>,
    /// `--admin-listen` / `DPS_ADMIN_LISTEN` (`""` disables).
    pub admin_listen: Option<String>,
    /// `--tls-san` (repeatable) / `DPS_TLS_SANS` (comma-separated).
    pub subject_alt_names: Option<Vec<String>>,
}

impl Overrides {
    /// Reads the `DPS_*` variables through `lookup` (pass `|k| std::env::var(k).ok()` for the process
    /// environment; tests pass a map).
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Overrides {
        Overrides {
            id_scope: lookup("DPS_ID_SCOPE"),
            service_host_name: lookup("DPS_SERVICE_HOST_NAME"),
            device_host_name: lookup("DPS_DEVICE_HOST_NAME"),
            data_dir: lookup("DPS_DATA_DIR").map(PathBuf::from),
            store: lookup("DPS_STORE"),
            default_allocation: lookup("DPS_DEFAULT_ALLOCATION"),
            retry_after_secs: lookup("DPS_RETRY_AFTER_SECS"),
            respond_early: lookup("DPS_RESPOND_EARLY"),
            poll_hold_ms: lookup("DPS_POLL_HOLD_MS"),
            header_read_timeout_secs: lookup("DPS_HEADER_READ_TIMEOUT_SECS"),
            max_connections: lookup("DPS_MAX_CONNECTIONS"),
            https_listen: lookup("DPS_HTTPS_LISTEN"),
            mqtt_listen: lookup("DPS_MQTT_LISTEN"),
            amqp_listen: lookup("DPS_AMQP_LISTEN"),
            admin_listen: lookup("DPS_ADMIN_LISTEN"),
            subject_alt_names: lookup("DPS_TLS_SANS")
                .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()),
        }
    }

    /// Applies `self` over `file` (each set field wins).
    fn apply(&self, file: &mut FileConfig) -> Result<(), ConfigError> {
        fn set<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
            if let Some(v) = value {
                *target = Some(v.clone());
            }
        }
        fn num<T: std::str::FromStr>(
            target: &mut Option<T>,
            value: &Option<String>,
            name: &str,
        ) -> Result<(), ConfigError> {
            if let Some(v) = value {
                *target =
                    Some(v.trim().parse().map_err(|_| err(format!("{name}: '{v}' is not a valid number")))?);
            }
            Ok(())
        }
        set(&mut file.id_scope, &self.id_scope);
        set(&mut file.service_host_name, &self.service_host_name);
        set(&mut file.device_host_name, &self.device_host_name);
        set(&mut file.data_dir, &self.data_dir);
        set(&mut file.store, &self.store);
        set(&mut file.default_allocation, &self.default_allocation);
        num(&mut file.retry_after_secs, &self.retry_after_secs, "retry_after_secs")?;
        if let Some(v) = &self.respond_early {
            file.respond_early = Some(match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(err(format!("respond_early: '{v}' is not true or false"))),
            });
        }
        num(&mut file.poll_hold_ms, &self.poll_hold_ms, "poll_hold_ms")?;
        num(&mut file.header_read_timeout_secs, &self.header_read_timeout_secs, "header_read_timeout_secs")?;
        num(&mut file.max_connections, &self.max_connections, "max_connections")?;
        set(&mut file.listen.https, &self.https_listen);
        set(&mut file.listen.mqtt, &self.mqtt_listen);
        set(&mut file.listen.amqp, &self.amqp_listen);
        set(&mut file.listen.admin, &self.admin_listen);
        set(&mut file.tls.subject_alt_names, &self.subject_alt_names);
        Ok(())
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// HTTPS (device API, service API, MQTT over WebSocket, `/health`).
    pub https: SocketAddr,
    /// MQTT over TLS; `None` disables it.
    pub mqtt: Option<SocketAddr>,
    /// AMQP 1.0 over TLS; `None` disables it.
    pub amqp: Option<SocketAddr>,
    /// Plain HTTP `/health` and `/metrics`; `None` disables it.
    pub admin: Option<SocketAddr>,
}

/// A linked IoT hub as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Host name.
    pub host_name: String,
    /// Allocation weight.
    pub allocation_weight: Option<u32>,
    /// Whether it takes part in automatic allocation.
    pub apply_allocation_policy: Option<bool>,
}

/// The resolved, validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The ID scope served.
    pub id_scope: IdScope,
    /// Service API host name (audience of service SAS tokens, `HostName` of the connection string).
    pub service_host_name: String,
    /// Device API host name (Location headers).
    pub device_host_name: String,
    /// Data directory (database, TLS material, keys, `ready.json`).
    pub data_dir: PathBuf,
    /// Where enrollments, groups, registrations, CA certificates and the audit log are stored.
    pub store: StoreConfig,
    /// Default allocation policy.
    pub default_allocation: AllocationPolicy,
    /// Retry-After of 202 answers, in seconds.
    pub retry_after_secs: u32,
    /// Answer a register `202 assigning` right after attestation and finish the hub work in the
    /// background (default true, as Azure does); polls see `assigning` until the final commit.
    pub respond_early: bool,
    /// A poll of a registration whose early-answered flow is still running in this process waits up to this
    /// long for it (default 100 ms; zero answers at once), so a device polling right after its `202` gets
    /// the result in one poll; a slower assignment is still reported `assigning`.
    pub poll_hold: Duration,
    /// The most symmetric-key enrollment groups the instance holds (default 100, spec §10.1): a register
    /// whose key fits none is tried against each, so this bounds what an unauthenticated request costs.
    pub max_symmetric_key_groups: usize,
    /// The most CA certificates the instance holds (default 25, spec §10.1).
    pub max_ca_certificates: usize,
    /// The most HTTPS, MQTT and WebSocket connections one client address may hold at once (default a
    /// quarter of `max_connections`, at least 16), so that one abuser cannot take the whole cap; beyond it
    /// a new connection from that address is closed at once.
    pub max_connections_per_address: usize,
    /// The limiter of failed device authentications per client address ([`crate::throttle`]): beyond it,
    /// that address's device-API requests are answered `429001` (HTTPS, `res/429`) or CONNACK 3 (MQTT).
    pub auth_failures: crate::throttle::AuthFailureLimits,
    /// A client must send a complete request head within this time (also the keep-alive idle limit).
    pub header_read_timeout: Duration,
    /// A client must send the request body within this time after the head.
    pub body_read_timeout: Duration,
    /// A TLS handshake must complete within this time.
    pub tls_handshake_timeout: Duration,
    /// On shutdown, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Maximum concurrently open connections (HTTPS, MQTT and WebSocket together); beyond it new
    /// connections are closed at once.
    pub max_connections: usize,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// SANs of the generated server certificate (IP literals become IP SANs).
    pub subject_alt_names: Vec<String>,
    /// Linked IoT hubs.
    pub linked_hubs: Vec<LinkedHub>,
    /// The adapter of each linked hub, by host name (a hub not listed is `local`). Credentials inside never
    /// show in `Debug` output.
    pub hub_adapters: std::collections::BTreeMap<String, crate::linked::AdapterSettings>,
    /// Shared access policies besides the generated owner policy.
    pub access_policies: Vec<AccessPolicy>,
    /// Certificate issuance from device CSRs (None: off, a `csr` is refused with 400008).
    pub certificate_issuance: Option<IssuanceConfig>,
    /// The key provider of encryption at rest.
    pub key_provider: KeyProviderConfig,
    /// The rate limits of `[quotas]` (default: none).
    pub quotas: dps_host::Quotas,
    /// The fault rules of `[[faults]]` (default: none).
    pub faults: Vec<dps_host::fault::FaultRule>,
    /// The fault RNG's seed (None: OS entropy).
    pub fault_seed: Option<u64>,
    /// The custom allocation webhook client.
    pub custom_allocation: CustomAllocationConfig,
    /// The latency table of `geoLatency` allocation (None: no `[[latency]]` rows).
    pub latency: Option<dps_core::policy::LatencyTable>,
}

/// Where the server stores its data.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `dps.sqlite3` in the data directory (one process).
    Sqlite,
    /// A PostgreSQL database, shared by any number of replicas.
    Postgres {
        /// The connection string (may hold a password: never printed, see the `Debug` impl).
        url: String,
        /// Pool and timeout settings.
        options: dps_store::PostgresOptions,
    },
}

impl StoreConfig {
    /// Parses the `store` setting: `sqlite`, or a `postgres://` / `postgresql://` URL.
    pub fn parse(value: &str) -> Result<StoreConfig, ConfigError> {
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("sqlite") {
            return Ok(StoreConfig::Sqlite);
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            return Ok(StoreConfig::Postgres {
                url: value.to_owned(),
                options: dps_store::PostgresOptions::default(),
            });
        }
        Err(err("store: expected \"sqlite\" or a postgres:// URL (postgres://user:password@host:5432/db)"))
    }

    /// A description safe to log: the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite => "sqlite".into(),
            StoreConfig::Postgres { url, .. } => redact_password(url),
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `scheme://user:password@host/…` with the password replaced by `***`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The hub linked when the configuration names none.
pub const DEFAULT_HUB: &str = "hub-1.localhost";

fn parse_listen(value: &str, name: &str, optional: bool) -> Result<Option<SocketAddr>, ConfigError> {
    let v = value.trim();
    if v.is_empty() {
        return if optional { Ok(None) } else { Err(err(format!("listen.{name} must not be empty"))) };
    }
    v.parse::<SocketAddr>().map(Some).map_err(|_| {
        err(format!(
            "listen.{name}: '{v}' is not an address of the form ip:port (e.g. 0.0.0.0:443, [::]:443)"
        ))
    })
}

fn parse_allocation(value: &str) -> Result<AllocationPolicy, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "hashed" => Ok(AllocationPolicy::Hashed),
        "static" => Ok(AllocationPolicy::Static),
        "geolatency" => Ok(AllocationPolicy::GeoLatency),
        _ => Err(err(format!("default_allocation: '{value}' is not one of hashed, static, geoLatency"))),
    }
}

fn parse_quotas(q: &FileQuotas) -> Result<dps_host::Quotas, ConfigError> {
    use dps_host::throttle::Rate;
    let preset = match q.preset.as_deref().map(str::trim) {
        None | Some("none") => dps_host::Quotas::none(),
        Some("azure") => dps_host::Quotas::azure(),
        Some(other) => return Err(err(format!("quotas.preset: '{other}' is not one of none, azure"))),
    };
    let rate = |value: Option<u32>, window: u32, preset: Option<Rate>| match value {
        Some(n) => Rate::new(n, window),
        None => preset,
    };
    let tracked = q.tracked_devices.unwrap_or(dps_host::DEFAULT_TRACKED_DEVICES);
    if tracked == 0 {
        return Err(err("quotas.tracked_devices must be at least 1"));
    }
    Ok(dps_host::Quotas {
        registrations: rate(q.registrations_per_minute, 60, preset.registrations),
        polls_per_device: rate(q.polls_per_device_per_10s, 10, preset.polls_per_device),
        service_operations: rate(q.service_operations_per_minute, 60, preset.service_operations),
        max_tracked_devices: tracked,
    })
}

fn secs(value: Option<u64>, default: u64, name: &str) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(err(format!("{name} must be at least 1"))),
        s => Ok(Duration::from_secs(s)),
    }
}

impl ServerConfig {
    /// Merges `file` < `env` < `flags` over the defaults and validates the result.
    pub fn resolve(
        mut file: FileConfig,
        env: &Overrides,
        flags: &Overrides,
    ) -> Result<ServerConfig, ConfigError> {
        env.apply(&mut file)?;
        flags.apply(&mut file)?;

        let scope = file.id_scope.as_deref().ok_or_else(|| {
            err("id_scope is required: set it in the configuration file, with --id-scope or with DPS_ID_SCOPE")
        })?;
        let id_scope =
            IdScope::parse(scope.trim()).map_err(|e| err(format!("id_scope '{scope}': {}", e.message)))?;
        let host = |v: Option<String>, name: &str| -> Result<String, ConfigError> {
            let v = v.unwrap_or_else(|| "localhost".to_owned());
            let v = v.trim().to_owned();
            if v.is_empty() || v.contains(['/', ' ', '?', '#']) {
                return Err(err(format!("{name}: '{v}' is not a host name")));
            }
            Ok(v)
        };
        let service_host_name = host(file.service_host_name, "service_host_name")?;
        let device_host_name = host(file.device_host_name, "device_host_name")?;
        let default_allocation = parse_allocation(file.default_allocation.as_deref().unwrap_or("hashed"))?;
        let retry_after_secs = file.retry_after_secs.unwrap_or(2);
        if !(1..=300).contains(&retry_after_secs) {
            return Err(err(format!("retry_after_secs must be within 1..=300, not {retry_after_secs}")));
        }
        let header_read_timeout = secs(file.header_read_timeout_secs, 10, "header_read_timeout_secs")?;
        let tls_handshake_timeout = secs(file.tls_handshake_timeout_secs, 10, "tls_handshake_timeout_secs")?;
        let shutdown_grace = secs(file.shutdown_grace_secs, 10, "shutdown_grace_secs")?;
        let max_connections = file.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(err("max_connections must be at least 1"));
        }

        let listen = ListenConfig {
            https: parse_listen(file.listen.https.as_deref().unwrap_or("0.0.0.0:443"), "https", false)?
                .ok_or_else(|| err("listen.https must not be empty"))?,
            mqtt: parse_listen(file.listen.mqtt.as_deref().unwrap_or("0.0.0.0:8883"), "mqtt", true)?,
            amqp: parse_listen(file.listen.amqp.as_deref().unwrap_or("0.0.0.0:5671"), "amqp", true)?,
            admin: parse_listen(file.listen.admin.as_deref().unwrap_or(""), "admin", true)?,
        };

        let subject_alt_names: Vec<String> = file
            .tls
            .subject_alt_names
            .unwrap_or_else(|| vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .into_iter()
            .map(|s| s.trim().to_owned())
            .collect();
        if subject_alt_names.is_empty() || subject_alt_names.iter().any(String::is_empty) {
            return Err(err("tls.subject_alt_names must list at least one non-empty name"));
        }

        let hubs = file.linked_hubs.unwrap_or_else(|| vec![FileLinkedHub::named(DEFAULT_HUB)]);
        if hubs.len() > dps_core::MAX_LINKED_HUBS {
            return Err(err(format!(
                "linked_hubs: at most {} hubs can be linked, not {}",
                dps_core::MAX_LINKED_HUBS,
                hubs.len()
            )));
        }
        let mut linked_hubs = Vec::with_capacity(hubs.len());
        let mut hub_adapters = std::collections::BTreeMap::new();
        for h in hubs {
            let mut hub = LinkedHub::new(&h.host_name, h.allocation_weight, h.apply_allocation_policy)
                .map_err(|e| err(format!("linked_hubs '{}': {}", h.host_name, e.message)))?;
            match h.location.as_deref().map(str::trim) {
                Some("") => return Err(err(format!("linked_hubs '{}': location is empty", h.host_name))),
                Some(l) => hub = hub.with_location(l),
                None => {}
            }
            if linked_hubs.iter().any(|l: &LinkedHub| l.host_name == hub.host_name) {
                return Err(err(format!("linked_hubs: '{}' is listed twice", h.host_name)));
            }
            let adapter = h.adapter();
            adapter.spec(&hub.host_name).map_err(|m| err(format!("linked_hubs '{}': {m}", h.host_name)))?;
            if adapter != crate::linked::AdapterSettings::default() {
                hub_adapters.insert(hub.host_name.clone(), adapter);
            }
            linked_hubs.push(hub);
        }

        let latency = if file.latency.is_empty() {
            None
        } else {
            let rows: Vec<(&str, Vec<(String, u32)>)> = file
                .latency
                .iter()
                .map(|row| (row.network.as_str(), row.hubs.iter().map(|(k, v)| (k.clone(), *v)).collect()))
                .collect();
            let table = dps_core::policy::LatencyTable::new(rows)
                .map_err(|e| err(format!("latency: {}", e.message)))?;
            for row in &file.latency {
                for name in row.hubs.keys() {
                    let known = linked_hubs.iter().any(|h: &LinkedHub| {
                        h.is_named(name)
                            || h.location.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(name))
                    });
                    if !known {
                        return Err(err(format!(
                            "latency '{}': '{name}' is neither a linked hub's host_name nor its location",
                            row.network
                        )));
                    }
                }
            }
            Some(table)
        };

        let mut access_policies: Vec<AccessPolicy> = Vec::with_capacity(file.access_policies.len());
        for p in file.access_policies {
            let name = p.key_name.trim();
            if name.is_empty() {
                return Err(err("access_policies: key_name must not be empty"));
            }
            if name.eq_ignore_ascii_case(OWNER_POLICY) {
                return Err(err(format!(
                    "access_policies: '{OWNER_POLICY}' is generated by the server (its keys are in the data \
                     directory's owner.key); choose another key_name"
                )));
            }
            if access_policies.iter().any(|a| a.key_name.eq_ignore_ascii_case(name)) {
                return Err(err(format!("access_policies: '{name}' is listed twice")));
            }
            let key = |k: &str, which: &str| {
                SymmetricKey::parse(k.trim())
                    .map_err(|e| err(format!("access_policies '{name}' {which}: {}", e.message)))
            };
            access_policies.push(AccessPolicy {
                key_name: name.to_owned(),
                primary_key: key(&p.primary_key, "primary_key")?,
                secondary_key: key(&p.secondary_key, "secondary_key")?,
                rights: Rights::parse(&p.rights)
                    .map_err(|e| err(format!("access_policies '{name}' rights: {}", e.message)))?,
            });
        }

        let certificate_issuance = match file.certificate_issuance.enabled {
            Some(true) => Some(IssuanceConfig {
                key: match file.certificate_issuance.key.as_deref().map(str::trim) {
                    None | Some("p384") | Some("P384") | Some("P-384") => dps_host::CaKeyKind::P384,
                    Some("p256") | Some("P256") | Some("P-256") => dps_host::CaKeyKind::P256,
                    Some(other) => {
                        return Err(err(format!(
                            "certificate_issuance.key: '{other}' is not a supported key (p384 or p256)"
                        )))
                    }
                },
                validity: match file.certificate_issuance.validity_days.unwrap_or(30) {
                    0 => return Err(err("certificate_issuance.validity_days must be at least 1")),
                    days => Duration::from_secs(u64::from(days.min(3650)) * 86_400),
                },
            }),
            _ => None,
        };
        let quotas = parse_quotas(&file.quotas)?;
        let faults = crate::faults::rules_from_config(&file.faults).map_err(err)?;
        let custom_allocation = {
            let c = &file.custom_allocation;
            let ms = |v: Option<u64>, default: u64, name: &str| -> Result<Duration, ConfigError> {
                match v.unwrap_or(default) {
                    v if v > 3_600_000 => Err(err(format!("custom_allocation.{name} is over one hour"))),
                    v => Ok(Duration::from_millis(v)),
                }
            };
            CustomAllocationConfig {
                ca_file: c.ca_file.clone(),
                allow_http: c.allow_http.unwrap_or(false),
                timeout: match ms(c.timeout_ms, 30_000, "timeout_ms")? {
                    d if d.is_zero() => return Err(err("custom_allocation.timeout_ms must be at least 1")),
                    d => d,
                },
                attempts: match c.attempts.unwrap_or(10) {
                    n @ 1..=20 => n,
                    n => return Err(err(format!("custom_allocation.attempts is {n}; it must be 1..=20"))),
                },
                initial_interval: ms(c.initial_interval_ms, 1_000, "initial_interval_ms")?,
                increment: ms(c.increment_ms, 9_000, "increment_ms")?,
            }
        };
        let data_dir = file.data_dir.unwrap_or_else(|| PathBuf::from("./dps-data"));
        let mut store = StoreConfig::parse(file.store.as_deref().unwrap_or("sqlite"))?;
        if let StoreConfig::Postgres { options, .. } = &mut store {
            if let Some(n) = file.store_max_connections {
                options.max_connections = n.clamp(1, 1000);
            }
            if let Some(ms) = file.store_pool_wait_ms {
                options.pool_wait = Duration::from_millis(ms.clamp(1, 60_000));
            }
        }
        let key_provider = match file.encryption.key_provider.as_deref().map(str::trim) {
            None | Some("file") => KeyProviderConfig::File(
                file.encryption.key_file.clone().unwrap_or_else(|| data_dir.join("kek.key")),
            ),
            Some("env") => KeyProviderConfig::Env(
                file.encryption
                    .env_var
                    .clone()
                    .unwrap_or_else(|| dps_store::seal::DEFAULT_ENV_VAR.to_owned()),
            ),
            Some(other) => {
                return Err(err(format!(
                    "encryption.key_provider: '{other}' is not a provider (file or env)"
                )))
            }
        };
        Ok(ServerConfig {
            id_scope,
            service_host_name,
            device_host_name,
            data_dir,
            store,
            default_allocation,
            retry_after_secs,
            respond_early: file.respond_early.unwrap_or(true),
            poll_hold: Duration::from_millis(file.poll_hold_ms.unwrap_or(100).min(60_000)),
            max_symmetric_key_groups: file.max_symmetric_key_groups.unwrap_or(100).max(1),
            max_ca_certificates: file.max_ca_certificates.unwrap_or(25).max(1),
            max_connections_per_address: file
                .max_connections_per_address
                .unwrap_or((max_connections / 4).max(16))
                .max(1),
            auth_failures: {
                let d = crate::throttle::AuthFailureLimits::default();
                crate::throttle::AuthFailureLimits {
                    per_minute: file.max_auth_failures_per_address_per_minute.unwrap_or(d.per_minute),
                    burst: file.auth_failure_burst.unwrap_or(d.burst).max(1),
                    max_addresses: file.auth_failure_tracked_addresses.unwrap_or(d.max_addresses).max(1),
                }
            },
            header_read_timeout,
            body_read_timeout: header_read_timeout.max(Duration::from_secs(30)),
            tls_handshake_timeout,
            shutdown_grace,
            max_connections,
            listen,
            subject_alt_names,
            linked_hubs,
            hub_adapters,
            access_policies,
            certificate_issuance,
            key_provider,
            quotas,
            faults,
            fault_seed: file.fault_seed,
            custom_allocation,
            latency,
        })
    }

    /// A configuration for tests and embedding: the given scope and data directory, every listener on
    /// `127.0.0.1` with port 0 (MQTT, AMQP and admin on), defaults otherwise.
    pub fn for_tests(id_scope: &str, data_dir: impl Into<PathBuf>) -> Result<ServerConfig, ConfigError> {
        let file = FileConfig {
            id_scope: Some(id_scope.to_owned()),
            data_dir: Some(data_dir.into()),
            listen: FileListen {
                https: Some("127.0.0.1:0".into()),
                mqtt: Some("127.0.0.1:0".into()),
                amqp: Some("127.0.0.1:0".into()),
                admin: Some("127.0.0.1:0".into()),
            },
            ..FileConfig::default()
        };
        ServerConfig::resolve(file, &Overrides::default(), &Overrides::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Overrides {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Overrides::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_only_a_scope() {
        let c = ServerConfig::resolve(
            FileConfig::default(),
            &env(&[("DPS_ID_SCOPE", "0ne00000001")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.id_scope.as_str(), "0ne00000001");
        assert_eq!(c.listen.https, "0.0.0.0:443".parse().unwrap());
        assert_eq!(c.listen.mqtt, Some("0.0.0.0:8883".parse().unwrap()));
        assert_eq!(c.listen.amqp, Some("0.0.0.0:5671".parse().unwrap()));
        assert_eq!(c.listen.admin, None);
        assert_eq!(c.linked_hubs.len(), 1);
        assert_eq!(c.linked_hubs[0].host_name, DEFAULT_HUB);
        assert_eq!(c.subject_alt_names, vec!["localhost", "127.0.0.1"]);
        assert_eq!(c.data_dir, PathBuf::from("./dps-data"));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_connections, 10_000);
    }

    #[test]
    fn the_store_is_sqlite_or_a_postgres_url_never_shown_with_its_password() {
        let scope = "id_scope = \"0ne00000001\"\n";
        let c = ServerConfig::resolve(FileConfig::parse(scope, "t").unwrap(), &env(&[]), &env(&[])).unwrap();
        assert_eq!(c.store, StoreConfig::Sqlite);
        let file =
            format!("{scope}store = \"postgres://dps:s3cret@db:5432/dps\"\nstore_max_connections = 4\n");
        let c = ServerConfig::resolve(FileConfig::parse(&file, "t").unwrap(), &env(&[]), &env(&[])).unwrap();
        match &c.store {
            StoreConfig::Postgres { url, options } => {
                assert_eq!(url, "postgres://dps:s3cret@db:5432/dps");
                assert_eq!(options.max_connections, 4);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(format!("{:?}", c.store), "postgres://dps:***@db:5432/dps");
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = ServerConfig::resolve(
            FileConfig::parse(scope, "t").unwrap(),
            &env(&[("DPS_STORE", "postgresql://x@h/d")]),
            &env(&[]),
        )
        .unwrap();
        assert!(matches!(c.store, StoreConfig::Postgres { .. }));
        let bad = ServerConfig::resolve(
            FileConfig::parse(&format!("{scope}store = \"mysql://x\"\n"), "t").unwrap(),
            &env(&[]),
            &env(&[]),
        )
        .unwrap_err();
        assert!(bad.0.contains("store:"), "{bad}");
    }

    #[test]
    fn missing_scope_is_explained() {
        let e = ServerConfig::resolve(FileConfig::default(), &Overrides::default(), &Overrides::default())
            .unwrap_err();
        assert!(e.0.contains("id_scope is required"), "{e}");
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let file = FileConfig::parse(
            r#"
            id_scope = "0ne0000F11E"
            data_dir = "/file"
            service_host_name = "file.example"
            [listen]
            https = "127.0.0.1:1001"
            mqtt = "127.0.0.1:1002"
            amqp = "127.0.0.1:1003"
            "#,
            "test",
        )
        .unwrap();
        let e = env(&[("DPS_ID_SCOPE", "0ne00000E0E"), ("DPS_DATA_DIR", "/env"), ("DPS_MQTT_LISTEN", "")]);
        let flags_amqp = Overrides { amqp_listen: Some("127.0.0.1:1004".into()), ..Overrides::default() };
        let flags = Overrides { id_scope: Some("0ne0000F1A6".into()), ..Overrides::default() };
        let c = ServerConfig::resolve(file, &e, &flags).unwrap();
        assert_eq!(c.id_scope.as_str(), "0ne0000F1A6");
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        assert_eq!(c.service_host_name, "file.example");
        assert_eq!(c.listen.https, "127.0.0.1:1001".parse().unwrap());
        assert_eq!(c.listen.mqtt, None);
        assert_eq!(c.listen.amqp, Some("127.0.0.1:1003".parse().unwrap()));
        let file =
            FileConfig::parse("id_scope = \"0ne0000F11E\"\n[listen]\namqp = \"127.0.0.1:1003\"\n", "test")
                .unwrap();
        let c = ServerConfig::resolve(file, &env(&[("DPS_AMQP_LISTEN", "")]), &Overrides::default()).unwrap();
        assert_eq!(c.listen.amqp, None, "the environment disables the AMQP listener");
        let file = FileConfig::parse("id_scope = \"0ne0000F11E\"\n", "test").unwrap();
        let c = ServerConfig::resolve(file, &env(&[("DPS_AMQP_LISTEN", "")]), &flags_amqp).unwrap();
        assert_eq!(c.listen.amqp, Some("127.0.0.1:1004".parse().unwrap()), "the flag wins");
    }

    #[test]
    fn full_schema_parses() {
        let file = FileConfig::parse(
            r#"
            id_scope = "0ne00000001"
            service_host_name = "dps.example"
            device_host_name = "global.example"
            data_dir = "./x"
            default_allocation = "geoLatency"
            retry_after_secs = 3
            header_read_timeout_secs = 5
            max_connections = 7
            [listen]
            https = "0.0.0.0:443"
            mqtt = ""
            admin = "127.0.0.1:9090"
            [tls]
            subject_alt_names = ["dps.example", "10.0.0.1"]
            [[linked_hubs]]
            host_name = "hub-1.example.net"
            allocation_weight = 5
            apply_allocation_policy = false
            [[linked_hubs]]
            host_name = "hub-2.example.net"
            [[access_policies]]
            key_name = "enrollmentread"
            primary_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            secondary_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            rights = "EnrollmentRead, RegistrationStatusRead"
            "#,
            "test",
        )
        .unwrap();
        let c = ServerConfig::resolve(file, &Overrides::default(), &Overrides::default()).unwrap();
        assert_eq!(c.default_allocation, AllocationPolicy::GeoLatency);
        assert_eq!(c.retry_after_secs, 3);
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.listen.mqtt, None);
        assert_eq!(c.listen.admin, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.linked_hubs.len(), 2);
        assert_eq!(c.linked_hubs[0].allocation_weight, 5);
        assert!(!c.linked_hubs[0].apply_allocation_policy);
        assert_eq!(c.access_policies.len(), 1);
        assert!(c.access_policies[0].rights.contains(Rights::ENROLLMENT_READ));
        assert!(!c.access_policies[0].rights.contains(Rights::ENROLLMENT_WRITE));
    }

    #[test]
    fn encryption_providers_resolve() {
        let resolve = |text: &str| {
            let file = FileConfig::parse(text, "test").unwrap();
            ServerConfig::resolve(file, &Overrides::default(), &Overrides::default()).unwrap().key_provider
        };
        let scope = "id_scope = \"0ne00000001\"\ndata_dir = \"/d\"\n";
        assert_eq!(resolve(scope), KeyProviderConfig::File(PathBuf::from("/d/kek.key")));
        assert_eq!(
            resolve(&format!("{scope}[encryption]\nkey_provider = \"file\"\nkey_file = \"/k/kek\"")),
            KeyProviderConfig::File(PathBuf::from("/k/kek"))
        );
        assert_eq!(
            resolve(&format!("{scope}[encryption]\nkey_provider = \"env\"")),
            KeyProviderConfig::Env("DPS_KEK".into())
        );
        assert_eq!(
            resolve(&format!("{scope}[encryption]\nkey_provider = \"env\"\nenv_var = \"MY_KEK\"")),
            KeyProviderConfig::Env("MY_KEK".into())
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let cases = [
            ("id_scope = \"0ne00000001\"\nbogus = 1", "bogus"),
            ("id_scope = \"0ne00000001\"\n[listen]\nhttps = \"localhost\"", "listen.https"),
            ("id_scope = \"0ne00000001\"\ndefault_allocation = \"custom\"", "default_allocation"),
            ("id_scope = \"0ne00000001\"\nretry_after_secs = 0", "retry_after_secs"),
            ("id_scope = \"not a scope\"", "id_scope"),
            ("id_scope = \"0ne00000001\"\n[encryption]\nkey_provider = \"kms\"", "encryption.key_provider"),
            ("id_scope = \"0ne00000001\"\n[encryption]\nkey = \"x\"", "key"),
            (
                "id_scope = \"0ne00000001\"\n[[access_policies]]\nkey_name = \"provisioningserviceowner\"\nprimary_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\nsecondary_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\nrights = \"EnrollmentRead\"",
                "provisioningserviceowner",
            ),
        ];
        for (text, needle) in cases {
            let result = FileConfig::parse(text, "test")
                .and_then(|f| ServerConfig::resolve(f, &Overrides::default(), &Overrides::default()));
            let e = result.unwrap_err();
            assert!(e.0.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn quotas_are_off_by_default_and_azure_is_a_preset() {
        let resolve = |text: &str| {
            let file = FileConfig::parse(&format!("id_scope = \"0ne00000001\"\n{text}"), "test")?;
            ServerConfig::resolve(file, &Overrides::default(), &Overrides::default())
        };
        assert_eq!(resolve("").unwrap().quotas, dps_host::Quotas::none());
        assert!(resolve("").unwrap().faults.is_empty());
        assert_eq!(resolve("[quotas]\npreset = \"azure\"").unwrap().quotas, dps_host::Quotas::azure());
        // A key overrides the preset; 0 turns one limit off.
        let q = resolve(
            "[quotas]\npreset = \"azure\"\nregistrations_per_minute = 0\npolls_per_device_per_10s = 3",
        )
        .unwrap()
        .quotas;
        assert_eq!(q.registrations, None);
        assert_eq!(q.polls_per_device, dps_host::throttle::Rate::new(3, 10));
        assert_eq!(q.service_operations, dps_host::throttle::Rate::per_minute(1000));
        let e = resolve("[quotas]\npreset = \"s2\"").unwrap_err();
        assert!(e.0.contains("quotas.preset"), "{e}");
        let e = resolve("[quotas]\nregistrations_per_hour = 1").unwrap_err();
        assert!(e.0.contains("registrations_per_hour"), "{e}");
    }

    #[test]
    fn fault_rules_are_validated_with_their_name() {
        let file = FileConfig::parse(
            "id_scope = \"0ne00000001\"\nfault_seed = 9\n[[faults]]\nid = \"slow\"\nregistration_id = \"*\"\nkind = \"latency\"\nlatency_ms = 10\n\
             [[faults]]\nid = \"bad\"\nregistration_id = \"*\"\nkind = \"latency\"",
            "test",
        )
        .unwrap();
        let e = ServerConfig::resolve(file, &Overrides::default(), &Overrides::default()).unwrap_err();
        assert!(e.0.contains("faults[1] ('bad')") && e.0.contains("latency_ms"), "{e}");
        let file = FileConfig::parse(
            "id_scope = \"0ne00000001\"\nfault_seed = 9\n[[faults]]\nregistration_id = \"*\"\nkind = \"drop_connection\"",
            "test",
        )
        .unwrap();
        let c = ServerConfig::resolve(file, &Overrides::default(), &Overrides::default()).unwrap();
        assert_eq!(c.faults[0].id, "fault-1");
        assert_eq!(c.fault_seed, Some(9));
    }

    #[test]
    fn env_numbers_are_checked() {
        let e = ServerConfig::resolve(
            FileConfig::default(),
            &env(&[("DPS_ID_SCOPE", "0ne00000001"), ("DPS_MAX_CONNECTIONS", "lots")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.0.contains("max_connections"), "{e}");
    }
}
