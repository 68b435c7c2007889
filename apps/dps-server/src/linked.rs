//! Linked hubs at run time: each linked hub with the adapter that serves it (`local`, `mosquitto`,
//! `iothub`), changed through the service API (`GET/PUT/DELETE /linkedHubs[/{hostName}]`, right
//! *ServiceConfig*) or `dps-server hubs …`, applied without a restart and persisted in the data
//! directory's `linked-hubs.json`.
//!
//! Once that file exists (after the first change) it is the linked-hub set the server starts with; the
//! configuration file's `[[linked_hubs]]` seed it until then. Credentials are sealed in it with the data
//! directory's keyring (associated data `linked-hubs/{hostName}/{field}`), never shown by the API, and
//! never in `Debug` output.

use crate::datadir::write_file;
use crate::ServerError;
use dps_core::{DpsError, Engine, ErrorCode, LinkedHub};
use dps_hubs::iothub::IotHubConfig;
use dps_hubs::mosquitto::{MosquittoConfig, DEFAULT_TIMEOUT};
use dps_hubs::{AdapterSpec, RoutingDirectory, Secret};
use dps_store::seal::Sealer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The file of the run-time linked-hub set, in the data directory.
pub const FILE_NAME: &str = "linked-hubs.json";

/// An adapter's settings as written (configuration file, API body, persisted file), credential included.
#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterSettings {
    /// `local` (default), `mosquitto` or `iothub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// mosquitto: the broker's `host:port` (a plain MQTT listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// mosquitto: the dynamic-security admin username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_username: Option<String>,
    /// mosquitto: its password (a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_password: Option<String>,
    /// iothub: the hub's connection string (a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    /// iothub: connect to this `host:port` instead of `HostName:443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// iothub: PEM file of the CAs trusted for the hub's certificate (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Bound on one hub operation, seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

impl std::fmt::Debug for AdapterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("AdapterSettings")
            .field("kind", &self.kind)
            .field("broker", &self.broker)
            .field("admin_username", &self.admin_username)
            .field("admin_password", &set(&self.admin_password))
            .field("connection_string", &set(&self.connection_string))
            .field("endpoint", &self.endpoint)
            .field("ca_file", &self.ca_file)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

impl AdapterSettings {
    /// The adapter these settings describe, for the hub `host`; the message names the setting at fault
    /// (never the credential).
    pub fn spec(&self, host: &str) -> Result<AdapterSpec, String> {
        let timeout = match self.timeout_secs {
            None => DEFAULT_TIMEOUT,
            Some(s @ 1..=300) => Duration::from_secs(s),
            Some(s) => return Err(format!("timeout_secs must be within 1..=300, not {s}")),
        };
        let required = |v: &Option<String>, name: &str, kind: &str| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| format!("a {kind} hub needs {name}"))
        };
        let only = |present: &[(&str, bool)], kind: &str| match present.iter().find(|(_, p)| *p) {
            Some((name, _)) => Err(format!("{name} does not apply to a {kind} hub")),
            None => Ok(()),
        };
        match self.kind.as_deref().unwrap_or("local") {
            "local" => {
                only(
                    &[
                        ("broker", self.broker.is_some()),
                        ("admin_username", self.admin_username.is_some()),
                        ("admin_password", self.admin_password.is_some()),
                        ("connection_string", self.connection_string.is_some()),
                        ("endpoint", self.endpoint.is_some()),
                        ("ca_file", self.ca_file.is_some()),
                    ],
                    "local",
                )?;
                Ok(AdapterSpec::Local)
            }
            "mosquitto" => {
                only(
                    &[
                        ("connection_string", self.connection_string.is_some()),
                        ("endpoint", self.endpoint.is_some()),
                        ("ca_file", self.ca_file.is_some()),
                    ],
                    "mosquitto",
                )?;
                let broker = required(&self.broker, "broker (host:port)", "mosquitto")?;
                let (h, p) =
                    broker.rsplit_once(':').ok_or_else(|| format!("broker '{broker}' is not host:port"))?;
                let port: u16 =
                    p.parse().map_err(|_| format!("broker '{broker}': the port is not a number"))?;
                let host_part = h.trim_start_matches('[').trim_end_matches(']');
                if host_part.is_empty() || port == 0 {
                    return Err(format!("broker '{broker}' is not host:port"));
                }
                Ok(AdapterSpec::Mosquitto(MosquittoConfig {
                    host: host_part.to_owned(),
                    port,
                    admin_username: required(&self.admin_username, "admin_username", "mosquitto")?,
                    admin_password: Secret::new(required(
                        &self.admin_password,
                        "admin_password",
                        "mosquitto",
                    )?),
                    timeout,
                }))
            }
            "iothub" => {
                only(
                    &[
                        ("broker", self.broker.is_some()),
                        ("admin_username", self.admin_username.is_some()),
                        ("admin_password", self.admin_password.is_some()),
                    ],
                    "iothub",
                )?;
                let mut c = IotHubConfig::new(Secret::new(required(
                    &self.connection_string,
                    "connection_string",
                    "iothub",
                )?));
                c.endpoint = self.endpoint.clone();
                c.ca_file = self.ca_file.clone();
                c.timeout = timeout;
                // Check it now (connection string, CA file) rather than at the first registration.
                AdapterSpec::IotHub(c.clone()).build(host)?;
                Ok(AdapterSpec::IotHub(c))
            }
            other => Err(format!("kind '{other}': expected local, mosquitto or iothub")),
        }
    }

    /// The settings without their credential, for the API's answers: `credential` says whether one is set.
    pub fn shown(&self) -> Value {
        let mut public = self.clone();
        let has_credential =
            public.admin_password.take().is_some() | public.connection_string.take().is_some();
        let mut v = serde_json::to_value(&public).unwrap_or_else(|_| json!({}));
        v["kind"] = json!(self.kind.as_deref().unwrap_or("local"));
        if has_credential {
            v["credential"] = json!("set");
        }
        v
    }
}

/// A linked hub and its adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct HubEntry {
    /// Allocation settings (host name, weight, applyAllocationPolicy, location).
    pub hub: LinkedHub,
    /// Its adapter's settings.
    pub adapter: AdapterSettings,
}

impl HubEntry {
    /// The API's view: the linked hub and its adapter, without credentials.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.hub).unwrap_or_else(|_| json!({}));
        if let (Some(o), Value::Object(a)) = (v.as_object_mut(), self.adapter.shown()) {
            o.extend(a);
        }
        v
    }
}

/// The body of `PUT /linkedHubs/{hostName}`: every field optional; for an existing hub an omitted field
/// keeps its value (the credential too, while the kind stays the same).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubUpdate {
    /// Allocation weight (1..=1000).
    pub allocation_weight: Option<u32>,
    /// Whether the hub takes part in automatic allocation.
    pub apply_allocation_policy: Option<bool>,
    /// Location (empty string: none).
    pub location: Option<String>,
    /// Ignored when equal to the path's host name (the body may repeat it).
    pub host_name: Option<String>,
    /// Adapter settings.
    #[serde(flatten)]
    pub adapter: AdapterSettings,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    version: u32,
    linked_hubs: Vec<PersistedHub>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersistedHub {
    hub: LinkedHub,
    adapter: AdapterSettings,
}

/// The fields a `PUT /linkedHubs/{hostName}` body may have (any other is refused, so a typo is not
/// silently ignored).
pub const UPDATE_FIELDS: [&str; 12] = [
    "hostName",
    "allocationWeight",
    "applyAllocationPolicy",
    "location",
    "kind",
    "broker",
    "adminUsername",
    "adminPassword",
    "connectionString",
    "endpoint",
    "caFile",
    "timeoutSecs",
];

/// Parses a `PUT /linkedHubs/{hostName}` body (`400000` naming an unknown field or a wrong type).
pub fn parse_update(body: &[u8]) -> Result<HubUpdate, DpsError> {
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?
    };
    let Value::Object(map) = &value else { return Err(bad("the body must be a JSON object")) };
    if let Some(unknown) = map.keys().find(|k| !UPDATE_FIELDS.contains(&k.as_str())) {
        return Err(bad(format!("unknown field '{unknown}'; expected one of {}", UPDATE_FIELDS.join(", "))));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("the body is not a linked hub: {e}")))
}

/// The linked hubs of a running server: the engine's set and the routing directory's adapters, changed
/// together and persisted.
pub struct LinkedHubs {
    entries: Mutex<Vec<HubEntry>>,
    engine: Engine,
    routing: Arc<RoutingDirectory>,
    file: PathBuf,
    sealer: Arc<Sealer>,
}

impl std::fmt::Debug for LinkedHubs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedHubs").field("routing", &self.routing).field("file", &self.file).finish()
    }
}

fn bad(message: impl Into<String>) -> DpsError {
    DpsError::with_message(ErrorCode::BadRequest, message)
}

const SEALED_FIELDS: [&str; 2] = ["adminPassword", "connectionString"];

/// Reads the persisted set (None: no file yet), unsealing the credentials.
pub fn load(data_dir: &Path, sealer: &Sealer) -> Result<Option<Vec<HubEntry>>, ServerError> {
    let path = data_dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ServerError::DataDir(format!("{}: {e}", path.display()))),
    };
    let fail = |m: String| ServerError::DataDir(format!("{}: {m}", path.display()));
    let persisted: Persisted = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if persisted.version != 1 {
        return Err(fail(format!("unknown version {}", persisted.version)));
    }
    let mut entries = Vec::with_capacity(persisted.linked_hubs.len());
    for p in persisted.linked_hubs {
        let mut adapter = p.adapter;
        let host = p.hub.host_name.clone();
        for (field, slot) in
            SEALED_FIELDS.iter().zip([&mut adapter.admin_password, &mut adapter.connection_string])
        {
            if let Some(sealed) = slot.take() {
                let open = sealer
                    .open_str(&["linked-hubs", &host, field], &sealed)
                    .map_err(|e| fail(format!("{host} {field}: {e}")))?;
                *slot = Some(open);
            }
        }
        entries.push(HubEntry { hub: p.hub, adapter });
    }
    Ok(Some(entries))
}

fn save(path: &Path, sealer: &Sealer, entries: &[HubEntry]) -> Result<(), DpsError> {
    let internal = |m: String| DpsError::with_message(ErrorCode::InternalError, m);
    let mut hubs = Vec::with_capacity(entries.len());
    for e in entries {
        let mut adapter = e.adapter.clone();
        let host = e.hub.host_name.as_str();
        for (field, slot) in
            SEALED_FIELDS.iter().zip([&mut adapter.admin_password, &mut adapter.connection_string])
        {
            if let Some(plain) = slot.take() {
                let sealed = sealer
                    .seal_str(&["linked-hubs", host, field], &plain)
                    .map_err(|e| internal(format!("sealing the credential of {host}: {e}")))?;
                *slot = Some(sealed);
            }
        }
        hubs.push(PersistedHub { hub: e.hub.clone(), adapter });
    }
    let text = serde_json::to_vec_pretty(&Persisted { version: 1, linked_hubs: hubs })
        .map_err(|e| internal(e.to_string()))?;
    write_file(path, &text).map_err(|e| internal(format!("writing {}: {e}", path.display())))
}

/// Routes every entry's hub to its adapter; the first failure names the hub.
pub fn install(entries: &[HubEntry], routing: &RoutingDirectory) -> Result<(), String> {
    for e in entries {
        let spec =
            e.adapter.spec(&e.hub.host_name).map_err(|m| format!("linked hub '{}': {m}", e.hub.host_name))?;
        spec.install(&e.hub.host_name, routing)
            .map_err(|m| format!("linked hub '{}': {m}", e.hub.host_name))?;
    }
    Ok(())
}

impl LinkedHubs {
    /// The manager of a running server whose engine and routing directory already hold `entries`.
    pub fn new(
        entries: Vec<HubEntry>,
        engine: Engine,
        routing: Arc<RoutingDirectory>,
        data_dir: &Path,
        sealer: Arc<Sealer>,
    ) -> LinkedHubs {
        LinkedHubs { entries: Mutex::new(entries), engine, routing, file: data_dir.join(FILE_NAME), sealer }
    }

    /// The routing directory.
    pub fn routing(&self) -> &Arc<RoutingDirectory> {
        &self.routing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HubEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every linked hub, as the API shows it.
    pub fn list(&self) -> Value {
        Value::Array(self.lock().iter().map(HubEntry::to_json).collect())
    }

    /// One linked hub (`404000` when not linked).
    pub fn get(&self, host: &str) -> Result<Value, DpsError> {
        self.lock()
            .iter()
            .find(|e| e.hub.is_named(host))
            .map(HubEntry::to_json)
            .ok_or_else(|| not_linked(host))
    }

    /// Links `host` or updates it. Nothing changes unless every step succeeds: the settings validate, the
    /// adapter builds, the set fits the limit (`403002` beyond 50 hubs), the file is written; then the
    /// engine and the router switch. Flows already running finish on the set they started with.
    pub fn put(&self, host: &str, update: HubUpdate) -> Result<Value, DpsError> {
        let mut entries = self.lock();
        let index = entries.iter().position(|e| e.hub.is_named(host));
        if let Some(named) = &update.host_name {
            if !named.eq_ignore_ascii_case(host) {
                return Err(bad(format!("hostName '{named}' does not match the path's '{host}'")));
            }
        }
        let current = index.map(|i| entries[i].clone());
        let weight = update.allocation_weight.or(current.as_ref().map(|c| c.hub.allocation_weight));
        let apply =
            update.apply_allocation_policy.or(current.as_ref().map(|c| c.hub.apply_allocation_policy));
        let location = match update.location {
            Some(l) => Some(l),
            None => current.as_ref().and_then(|c| c.hub.location.clone()),
        };
        let hub = LinkedHub::new(host, weight, apply)?;
        let hub = match location.as_deref().map(str::trim) {
            Some(l) if !l.is_empty() => hub.with_location(l),
            _ => hub,
        };
        let adapter = merge(current.as_ref().map(|c| &c.adapter), update.adapter);
        let spec =
            adapter.spec(&hub.host_name).map_err(|m| bad(format!("linked hub '{}': {m}", hub.host_name)))?;
        let entry = HubEntry { hub, adapter };
        let mut next = entries.clone();
        match index {
            Some(i) => next[i] = entry.clone(),
            None => next.push(entry.clone()),
        }
        dps_core::config::validate_linked_hubs(&next.iter().map(|e| e.hub.clone()).collect::<Vec<_>>())?;
        save(&self.file, &self.sealer, &next)?;
        spec.install(&entry.hub.host_name, &self.routing).map_err(bad)?;
        self.engine.set_linked_hubs(next.iter().map(|e| e.hub.clone()).collect())?;
        *entries = next;
        tracing::info!(hub = %entry.hub.host_name, kind = spec.kind(), weight = entry.hub.allocation_weight,
            apply_allocation_policy = entry.hub.apply_allocation_policy, created = index.is_none(), "linked hub set");
        Ok(entry.to_json())
    }

    /// Unlinks `host` (`404000` when not linked). Devices already assigned to it keep their record; a
    /// device that re-registers is allocated among the remaining hubs (its old identity's deletion goes to
    /// the local directory, as the hub has no adapter any more).
    pub fn remove(&self, host: &str) -> Result<(), DpsError> {
        let mut entries = self.lock();
        let index = entries.iter().position(|e| e.hub.is_named(host)).ok_or_else(|| not_linked(host))?;
        let mut next = entries.clone();
        let removed = next.remove(index);
        save(&self.file, &self.sealer, &next)?;
        self.engine.set_linked_hubs(next.iter().map(|e| e.hub.clone()).collect())?;
        self.routing.remove(&removed.hub.host_name);
        *entries = next;
        tracing::info!(hub = %removed.hub.host_name, "linked hub removed");
        Ok(())
    }
}

fn not_linked(host: &str) -> DpsError {
    let shown: String = host.chars().take(80).collect();
    DpsError::with_message(ErrorCode::NotFound, format!("the IoT hub '{shown}' is not linked"))
}

/// Applies an update over the current settings: a field given replaces it; when the kind changes, the
/// old kind's settings (and credential) are dropped.
fn merge(current: Option<&AdapterSettings>, update: AdapterSettings) -> AdapterSettings {
    let Some(current) = current else { return update };
    let kind_of = |s: &AdapterSettings| s.kind.clone().unwrap_or_else(|| "local".to_owned());
    if update.kind.is_some() && kind_of(&update) != kind_of(current) {
        return update;
    }
    AdapterSettings {
        kind: update.kind.or_else(|| current.kind.clone()),
        broker: update.broker.or_else(|| current.broker.clone()),
        admin_username: update.admin_username.or_else(|| current.admin_username.clone()),
        admin_password: update.admin_password.or_else(|| current.admin_password.clone()),
        connection_string: update.connection_string.or_else(|| current.connection_string.clone()),
        endpoint: update.endpoint.or_else(|| current.endpoint.clone()),
        ca_file: update.ca_file.or_else(|| current.ca_file.clone()),
        timeout_secs: update.timeout_secs.or(current.timeout_secs),
    }
}

/// The path prefix of the linked-hub API.
pub const API_PATH: &str = "/linkedHubs";

/// Serves `GET /linkedHubs`, `GET|PUT|DELETE /linkedHubs/{hostName}` (None: not this API's path).
/// Authenticated like the service API (a service SAS token whose policy has *ServiceConfig*).
pub fn serve(
    state: &crate::state::AppState,
    method: &str,
    path_and_query: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> Option<dps_core::Reply> {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let rest = path.strip_prefix(API_PATH)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let tracking = dps_core::proto::id::format_uuid(state.random16());
    let now = crate::state::now();
    let host = rest.trim_start_matches('/');
    let host = percent_encoding::percent_decode_str(host).decode_utf8_lossy().into_owned();
    let outcome = (|| {
        let principal = dps_core::service::authenticate(&state.engine.config(), now, authorization, path)?;
        if !principal.rights().contains(dps_core::Rights::SERVICE_CONFIG) {
            return Err(DpsError::with_message(
                ErrorCode::InsufficientRights,
                format!("the policy '{}' lacks ServiceConfig, which linked hubs need", principal.name()),
            ));
        }
        let linked = &state.linked;
        match (method, host.is_empty()) {
            ("GET", true) => Ok((200, Some(linked.list()))),
            ("GET", false) => linked.get(&host).map(|v| (200, Some(v))),
            ("PUT", false) => linked.put(&host, parse_update(body)?).map(|v| (200, Some(v))),
            ("DELETE", false) => linked.remove(&host).map(|()| (204, None)),
            _ => Err(DpsError::with_message(
                ErrorCode::MethodNotAllowed,
                format!("{method} is not allowed on {path} (GET /linkedHubs, GET|PUT|DELETE /linkedHubs/{{hostName}})"),
            )),
        }
    })();
    Some(match outcome {
        Ok((status, Some(body))) => dps_core::Reply::json(status, &body, tracking),
        Ok((status, None)) => dps_core::Reply::empty(status, tracking),
        Err(e) => dps_core::Reply::error(&e, tracking, now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_validate_and_hide_credentials() {
        let m = AdapterSettings {
            kind: Some("mosquitto".into()),
            broker: Some("127.0.0.1:1883".into()),
            admin_username: Some("admin".into()),
            admin_password: Some("hunter2".into()),
            ..AdapterSettings::default()
        };
        assert!(matches!(m.spec("h").unwrap(), AdapterSpec::Mosquitto(c) if c.port == 1883));
        assert!(!format!("{m:?}").contains("hunter2"));
        let shown = m.shown();
        assert_eq!(shown["credential"], "set");
        assert!(!shown.to_string().contains("hunter2"));
        let mut no_pw = m.clone();
        no_pw.admin_password = None;
        assert!(no_pw.spec("h").unwrap_err().contains("admin_password"));
        let mut bad_broker = m.clone();
        bad_broker.broker = Some("nohost".into());
        assert!(bad_broker.spec("h").is_err());
        let mixed = AdapterSettings { connection_string: Some("x".into()), ..m.clone() };
        assert!(mixed.spec("h").unwrap_err().contains("connection_string"));
        assert!(AdapterSettings { kind: Some("amqp".into()), ..Default::default() }.spec("h").is_err());
        assert_eq!(AdapterSettings::default().spec("h").unwrap(), AdapterSpec::Local);
        let bad_cs = AdapterSettings {
            kind: Some("iothub".into()),
            connection_string: Some("HostName=h;SharedAccessKeyName=k;SharedAccessKey=!!c2VjcmV0!!".into()),
            ..Default::default()
        };
        assert!(!bad_cs.spec("h").unwrap_err().contains("c2VjcmV0"));
    }

    #[test]
    fn updates_keep_what_they_omit() {
        let current = AdapterSettings {
            kind: Some("mosquitto".into()),
            broker: Some("b:1".into()),
            admin_username: Some("a".into()),
            admin_password: Some("p".into()),
            ..AdapterSettings::default()
        };
        let kept = merge(Some(&current), AdapterSettings { timeout_secs: Some(3), ..Default::default() });
        assert_eq!(kept.admin_password.as_deref(), Some("p"));
        assert_eq!(kept.timeout_secs, Some(3));
        let switched =
            merge(Some(&current), AdapterSettings { kind: Some("local".into()), ..Default::default() });
        assert_eq!(switched, AdapterSettings { kind: Some("local".into()), ..Default::default() });
    }
}
