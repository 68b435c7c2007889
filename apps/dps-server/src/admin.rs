//! The service API from the outside, as the admin CLI uses it: a [`ServiceClient`] signs every request with
//! a service SAS token built from a connection string (`sr` = host name, `skn` = policy name), and the
//! helpers here build enrollment and group bodies from command-line settings. [`hub_devices`], [`twin`] and
//! [`usage_report`] read the data directory's hub database (`hubs.sqlite3`) directly, read-only.

use crate::client::{HttpResponse, HttpsClient};
use crate::datadir::{ConnectionString, DataDir};
use crate::state::now;
use crate::ServerError;
use dps_core::hub::HubDevice;
use dps_core::Timestamp;
use dps_store::HubDatabase;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};

/// The api-version the admin CLI sends.
pub const SERVICE_API_VERSION: &str = "2021-10-01";

/// Lifetime of the SAS tokens the CLI signs, in seconds.
const TOKEN_TTL_SECS: i64 = 3600;

/// An error answer of the service API, kept whole for the CLI to print.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The body (the DPS error JSON).
    pub body: Value,
}

/// What a service call can end with.
#[derive(Debug)]
pub enum CallError {
    /// The service answered with an error.
    Api(ApiError),
    /// Nothing usable came back (connection, TLS, bad JSON).
    Transport(ServerError),
}

impl From<ServerError> for CallError {
    fn from(e: ServerError) -> Self {
        CallError::Transport(e)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Api(e) => write!(f, "HTTP {}: {}", e.status, e.body),
            CallError::Transport(e) => write!(f, "{e}"),
        }
    }
}

/// A service API client authenticated by a connection string.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: HttpsClient,
    connection: ConnectionString,
}

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl ServiceClient {
    /// A client sending to `http` with the policy of `connection`.
    pub fn new(http: HttpsClient, connection: ConnectionString) -> Self {
        ServiceClient { http, connection }
    }

    /// A fresh `SharedAccessSignature sr={host}&sig=…&se=…&skn={policy}` header value.
    pub fn token(&self) -> String {
        self.connection.token(now().unix_seconds().saturating_add(TOKEN_TTL_SECS))
    }

    /// Sends one request (`path` without query; the api-version is appended).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra_headers: &[(&str, String)],
    ) -> Result<HttpResponse, CallError> {
        let mut headers = vec![("authorization", self.token())];
        headers.extend(extra_headers.iter().cloned());
        let body = match body {
            Some(b) => serde_json::to_vec(b)
                .map_err(|e| ServerError::Client(format!("serializing the body: {e}")))?,
            None => Vec::new(),
        };
        let response = self
            .http
            .request(method, &format!("{path}?api-version={SERVICE_API_VERSION}"), &headers, body)
            .await?;
        if response.status >= 300 {
            let body = serde_json::from_slice(&response.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into_owned()));
            return Err(CallError::Api(ApiError { status: response.status, body }));
        }
        Ok(response)
    }

    /// Sends a request and parses the JSON answer (`null` for an empty body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra_headers: &[(&str, String)],
    ) -> Result<Value, CallError> {
        let response = self.send(method, path, body, extra_headers).await?;
        if response.body.is_empty() {
            return Ok(Value::Null);
        }
        Ok(response.json()?)
    }

    /// Runs a query to the end (following `x-ms-continuation`), at most `top` items when given.
    pub async fn query_all(
        &self,
        path: &str,
        query: &str,
        page_size: u32,
        top: Option<usize>,
    ) -> Result<Vec<Value>, CallError> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", page_size.to_string())];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.clone()));
            }
            let response = self.send("POST", path, Some(&json!({ "query": query })), &headers).await?;
            match response.json()? {
                Value::Array(page) => items.extend(page),
                other => {
                    return Err(CallError::Transport(ServerError::Client(format!(
                        "a query answered with a non-array body: {other}"
                    ))))
                }
            }
            continuation = response.header("x-ms-continuation").filter(|c| !c.is_empty()).map(str::to_owned);
            if let Some(top) = top {
                if items.len() >= top {
                    items.truncate(top);
                    break;
                }
            }
            if continuation.is_none() {
                break;
            }
        }
        Ok(items)
    }
}

/// Reprovisioning behaviour, in `az iot dps` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reprovision {
    /// Re-evaluate the hub and move the device's data (the default).
    ReprovisionAndMigrateData,
    /// Re-evaluate the hub and reset the device to the initial configuration.
    ReprovisionAndResetData,
    /// Keep the device on its hub.
    NeverReprovision,
}

impl Reprovision {
    /// The `reprovisionPolicy` object.
    pub fn to_json(self) -> Value {
        let (update, migrate) = match self {
            Reprovision::ReprovisionAndMigrateData => (true, true),
            Reprovision::ReprovisionAndResetData => (true, false),
            Reprovision::NeverReprovision => (false, false),
        };
        json!({ "updateHubAssignment": update, "migrateDeviceData": migrate })
    }
}

/// Settings of an enrollment or group given on the command line (absent = unchanged / service default).
#[derive(Debug, Clone, Default)]
pub struct EnrollmentSettings {
    /// Base64 primary key (absent: generated by the service on create, kept on update).
    pub primary_key: Option<String>,
    /// Base64 secondary key.
    pub secondary_key: Option<String>,
    /// Hub host names.
    pub iot_hubs: Option<Vec<String>>,
    /// `hashed`, `static` or `geoLatency`.
    pub allocation_policy: Option<String>,
    /// Reprovisioning.
    pub reprovision: Option<Reprovision>,
    /// Initial twin tags (JSON object).
    pub initial_twin_tags: Option<Value>,
    /// Initial twin desired properties (JSON object).
    pub initial_twin_properties: Option<Value>,
    /// `enabled` or `disabled`.
    pub provisioning_status: Option<String>,
    /// IoT Edge device(s).
    pub edge_enabled: Option<bool>,
    /// Device ID (individual enrollments only).
    pub device_id: Option<String>,
}

/// Makes `v` a JSON object (replacing anything else) and returns its map.
fn object(v: &mut Value) -> Option<&mut Map<String, Value>> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut()
}

impl EnrollmentSettings {
    /// Applies the settings to an enrollment or group JSON object. With `create`, a symmetric-key
    /// attestation is set when none is present.
    pub fn apply(&self, target: &mut Value, create: bool) {
        let Some(t) = object(target) else { return };
        if create && !t.contains_key("attestation") {
            t.insert("attestation".into(), json!({ "type": "symmetricKey" }));
        }
        if self.primary_key.is_some() || self.secondary_key.is_some() {
            if let Some(att) = object(t.entry("attestation").or_insert_with(|| json!({}))) {
                att.insert("type".into(), json!("symmetricKey"));
                if let Some(keys) = object(att.entry("symmetricKey").or_insert_with(|| json!({}))) {
                    if let Some(k) = &self.primary_key {
                        keys.insert("primaryKey".into(), json!(k));
                    }
                    if let Some(k) = &self.secondary_key {
                        keys.insert("secondaryKey".into(), json!(k));
                    }
                }
            }
        }
        if let Some(h) = &self.iot_hubs {
            t.insert("iotHubs".into(), json!(h));
        }
        if let Some(p) = &self.allocation_policy {
            t.insert("allocationPolicy".into(), json!(p));
        }
        if let Some(r) = self.reprovision {
            t.insert("reprovisionPolicy".into(), r.to_json());
        }
        if self.initial_twin_tags.is_some() || self.initial_twin_properties.is_some() {
            if let Some(twin) = object(t.entry("initialTwin").or_insert_with(|| json!({}))) {
                if let Some(tags) = &self.initial_twin_tags {
                    twin.insert("tags".into(), tags.clone());
                }
                if let Some(desired) = &self.initial_twin_properties {
                    if let Some(props) = object(twin.entry("properties").or_insert_with(|| json!({}))) {
                        props.insert("desired".into(), desired.clone());
                    }
                }
            }
        }
        if let Some(s) = &self.provisioning_status {
            t.insert("provisioningStatus".into(), json!(s));
        }
        if let Some(e) = self.edge_enabled {
            t.insert("capabilities".into(), json!({ "iotEdge": e }));
        }
        if let Some(d) = &self.device_id {
            t.insert("deviceId".into(), json!(d));
        }
    }
}

/// Which collection an operation addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Individual enrollments (`/enrollments`).
    Enrollment,
    /// Enrollment groups (`/enrollmentGroups`).
    Group,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Enrollment => "/enrollments",
            Kind::Group => "/enrollmentGroups",
        }
    }

    fn id_field(self) -> &'static str {
        match self {
            Kind::Enrollment => "registrationId",
            Kind::Group => "enrollmentGroupId",
        }
    }

    fn path(self, id: &str) -> String {
        format!("{}/{}", self.collection(), segment(id))
    }

    fn query(self) -> &'static str {
        match self {
            Kind::Enrollment => "SELECT * FROM enrollments",
            Kind::Group => "SELECT * FROM enrollmentGroups",
        }
    }
}

impl ServiceClient {
    /// Creates (or replaces, as `az iot dps … create` does) an enrollment or group.
    pub async fn create(
        &self,
        kind: Kind,
        id: &str,
        settings: &EnrollmentSettings,
    ) -> Result<Value, CallError> {
        let mut body = json!({ kind.id_field(): id });
        settings.apply(&mut body, true);
        self.call("PUT", &kind.path(id), Some(&body), &[]).await
    }

    /// Reads an enrollment or group; with `show_keys` its attestation (with secrets) is included.
    pub async fn show(&self, kind: Kind, id: &str, show_keys: bool) -> Result<Value, CallError> {
        let mut current = self.call("GET", &kind.path(id), None, &[]).await?;
        if show_keys {
            let mechanism =
                self.call("POST", &format!("{}/attestationmechanism", kind.path(id)), None, &[]).await?;
            if let Some(map) = object(&mut current) {
                map.insert("attestation".into(), mechanism);
            }
        }
        Ok(current)
    }

    /// Lists every enrollment or group (at most `top`).
    pub async fn list(
        &self,
        kind: Kind,
        page_size: u32,
        top: Option<usize>,
    ) -> Result<Vec<Value>, CallError> {
        self.query_all(&format!("{}/query", kind.collection()), kind.query(), page_size, top).await
    }

    /// Updates an enrollment or group: reads it (with its keys, so that they are kept), applies `settings`
    /// and writes it back with `If-Match` (the given ETag, or the one read).
    pub async fn update(
        &self,
        kind: Kind,
        id: &str,
        settings: &EnrollmentSettings,
        etag: Option<&str>,
    ) -> Result<Value, CallError> {
        let mut current = self.show(kind, id, true).await?;
        let etag = match etag {
            Some(e) => e.to_owned(),
            None => current.get("etag").and_then(Value::as_str).unwrap_or("*").to_owned(),
        };
        settings.apply(&mut current, false);
        self.call("PUT", &kind.path(id), Some(&current), &[("if-match", etag)]).await
    }

    /// Deletes an enrollment or group (with `If-Match` when an ETag is given).
    pub async fn delete(&self, kind: Kind, id: &str, etag: Option<&str>) -> Result<(), CallError> {
        let headers: Vec<(&str, String)> = etag.map(|e| ("if-match", e.to_owned())).into_iter().collect();
        self.send("DELETE", &kind.path(id), None, &headers).await.map(|_| ())
    }

    /// Reads a device registration state.
    pub async fn registration(&self, registration_id: &str) -> Result<Value, CallError> {
        self.call("GET", &format!("/registrations/{}", segment(registration_id)), None, &[]).await
    }

    /// Lists the registration states of a group's devices.
    pub async fn registrations(
        &self,
        group_id: &str,
        page_size: u32,
        top: Option<usize>,
    ) -> Result<Vec<Value>, CallError> {
        self.query_all(
            &format!("/registrations/{}/query", segment(group_id)),
            "SELECT * FROM registrations",
            page_size,
            top,
        )
        .await
    }

    /// Uploads (or replaces) a CA certificate given as PEM or base64 DER; `verified` sets it verified on
    /// upload. Answers the ARM `CertificateResponse`.
    pub async fn upload_certificate(
        &self,
        name: &str,
        certificate: &str,
        verified: bool,
        etag: Option<&str>,
    ) -> Result<Value, CallError> {
        let body = json!({"properties": {"certificate": certificate, "isVerified": verified}});
        let headers: Vec<(&str, String)> = etag.map(|e| ("if-match", e.to_owned())).into_iter().collect();
        self.call("PUT", &certificate_path(name), Some(&body), &headers).await
    }

    /// Reads a CA certificate.
    pub async fn certificate(&self, name: &str) -> Result<Value, CallError> {
        self.call("GET", &certificate_path(name), None, &[]).await
    }

    /// Lists the CA certificates (`{"value": [...]}`).
    pub async fn certificates(&self) -> Result<Value, CallError> {
        self.call("GET", "/certificates", None, &[]).await
    }

    /// The certificate's current ETag (for the operations that need `If-Match`), or the given one.
    async fn certificate_etag(&self, name: &str, etag: Option<&str>) -> Result<String, CallError> {
        if let Some(e) = etag {
            return Ok(e.to_owned());
        }
        let current = self.certificate(name).await?;
        Ok(current.get("etag").and_then(Value::as_str).unwrap_or("*").to_owned())
    }

    /// Deletes a CA certificate, with `If-Match` of `etag` or of the ETag read first.
    pub async fn delete_certificate(&self, name: &str, etag: Option<&str>) -> Result<(), CallError> {
        let etag = self.certificate_etag(name, etag).await?;
        self.send("DELETE", &certificate_path(name), None, &[("if-match", etag)]).await.map(|_| ())
    }

    /// Issues a new verification code (`properties.verificationCode` of the answer), with `If-Match` of
    /// `etag` or of the ETag read first.
    pub async fn generate_verification_code(
        &self,
        name: &str,
        etag: Option<&str>,
    ) -> Result<Value, CallError> {
        let etag = self.certificate_etag(name, etag).await?;
        let path = format!("{}/generateVerificationCode", certificate_path(name));
        self.call("POST", &path, None, &[("if-match", etag)]).await
    }

    /// Proves possession of the CA's key with a verification certificate (PEM or base64 DER; subject CN =
    /// the verification code, signed by the CA), with `If-Match` of `etag` or of the ETag read first.
    pub async fn verify_certificate(
        &self,
        name: &str,
        proof: &str,
        etag: Option<&str>,
    ) -> Result<Value, CallError> {
        let etag = self.certificate_etag(name, etag).await?;
        let path = format!("{}/verify", certificate_path(name));
        self.call("POST", &path, Some(&json!({"certificate": proof})), &[("if-match", etag)]).await
    }

    /// Deletes a device registration state.
    pub async fn delete_registration(
        &self,
        registration_id: &str,
        etag: Option<&str>,
    ) -> Result<(), CallError> {
        let headers: Vec<(&str, String)> = etag.map(|e| ("if-match", e.to_owned())).into_iter().collect();
        self.send("DELETE", &format!("/registrations/{}", segment(registration_id)), None, &headers)
            .await
            .map(|_| ())
    }
}

/// The service path of a CA certificate.
impl ServiceClient {
    /// `GET /linkedHubs`: every linked hub with its adapter (credentials never shown).
    pub async fn linked_hubs(&self) -> Result<Value, CallError> {
        self.call("GET", crate::linked::API_PATH, None, &[]).await
    }

    /// `GET /linkedHubs/{hostName}`.
    pub async fn linked_hub(&self, host: &str) -> Result<Value, CallError> {
        self.call("GET", &format!("{}/{}", crate::linked::API_PATH, segment(host)), None, &[]).await
    }

    /// `PUT /linkedHubs/{hostName}`: links a hub or updates it (omitted fields keep their values).
    pub async fn set_linked_hub(&self, host: &str, body: &Value) -> Result<Value, CallError> {
        self.call("PUT", &format!("{}/{}", crate::linked::API_PATH, segment(host)), Some(body), &[]).await
    }

    /// `DELETE /linkedHubs/{hostName}`.
    pub async fn remove_linked_hub(&self, host: &str) -> Result<(), CallError> {
        self.send("DELETE", &format!("{}/{}", crate::linked::API_PATH, segment(host)), None, &[]).await?;
        Ok(())
    }
}

fn certificate_path(name: &str) -> String {
    format!("/certificates/{}", segment(name))
}

/// Opens the data directory's hub database read-only.
fn hub_database(dir: &DataDir) -> Result<HubDatabase, ServerError> {
    let path = dir.hubs_database();
    if !path.exists() {
        return Err(ServerError::Client(format!(
            "no hub database at {} (use --data-dir with the server's data directory)",
            path.display()
        )));
    }
    let db = HubDatabase::open_read_only(&path).map_err(|e| ServerError::Client(e.to_string()))?;
    if !dir.keyring().exists() {
        return Ok(db);
    }
    // Device keys are sealed: the KEK from DPS_KEK when set, else the data directory's key file.
    let provider = match std::env::var(dps_store::seal::DEFAULT_ENV_VAR) {
        Ok(_) => crate::config::KeyProviderConfig::Env(dps_store::seal::DEFAULT_ENV_VAR.to_owned()),
        Err(_) => crate::config::KeyProviderConfig::File(dir.kek_file()),
    };
    Ok(db.with_sealer(crate::encryption::open_sealer(&provider, dir)?))
}

/// A twin in the IoT Hub shape (`tags`, `properties.desired`, `capabilities.iotEdge`).
fn twin_json(hub: &str, device: &HubDevice) -> Value {
    json!({
        "deviceId": device.identity.device_id,
        "hub": hub.to_ascii_lowercase(),
        "tags": device.twin.tags,
        "properties": { "desired": device.twin.desired },
        "capabilities": { "iotEdge": device.twin.iot_edge },
    })
}

/// `admin hub-devices`: the devices of `hub` in the data directory's hub database (no keys).
pub fn hub_devices(dir: &DataDir, hub: &str) -> Result<Value, ServerError> {
    let devices = hub_database(dir)?.devices(hub).map_err(|e| ServerError::Client(e.to_string()))?;
    Ok(Value::Array(
        devices
            .iter()
            .map(|d| {
                json!({
                    "deviceId": d.identity.device_id,
                    "authentication": authentication_json(&d.identity.authentication),
                    "capabilities": { "iotEdge": d.twin.iot_edge },
                })
            })
            .collect(),
    ))
}

/// A hub device's authentication as IoT Hub shows it, keys left out (they are secrets; thumbprints are
/// not).
fn authentication_json(auth: &dps_core::hub::HubAuthentication) -> Value {
    use dps_core::hub::HubAuthentication;
    match auth {
        HubAuthentication::SelfSigned { primary_thumbprint, secondary_thumbprint } => json!({
            "type": auth.type_name(),
            "x509Thumbprint": {"primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint},
        }),
        other => json!({ "type": other.type_name() }),
    }
}

/// `admin twin`: one hub device's twin from the data directory's hub database.
pub fn twin(dir: &DataDir, hub: &str, device_id: &str) -> Result<Value, ServerError> {
    match hub_database(dir)?.device(hub, device_id).map_err(|e| ServerError::Client(e.to_string()))? {
        Some(d) => Ok(twin_json(hub, &d)),
        None => Err(ServerError::Client(format!("no device '{device_id}' on hub '{hub}'"))),
    }
}

/// `admin usage`: billable operations per ID scope, UTC day and operation (the last `days` days up to
/// `now`, or every day), with a total per scope.
pub fn usage_report(dir: &DataDir, days: Option<u32>, now: Timestamp) -> Result<Value, ServerError> {
    let since = days.map(|n| {
        let back = i64::from(n.max(1) - 1).saturating_mul(86_400);
        crate::usage::day_of_unix(now.unix_seconds().saturating_sub(back))
    });
    let rows = hub_database(dir)?.usage(since.as_deref()).map_err(|e| ServerError::Client(e.to_string()))?;
    let mut totals: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
    for r in &rows {
        let t = totals.entry(r.id_scope.as_str()).or_default();
        t.0 = t.0.saturating_add(r.succeeded);
        t.1 = t.1.saturating_add(r.failed);
    }
    Ok(json!({
        "since": since,
        "days": rows.iter().map(|r| json!({
            "idScope": r.id_scope,
            "day": r.day,
            "operation": r.operation,
            "billable": r.succeeded,
            "failed": r.failed,
        })).collect::<Vec<_>>(),
        "totals": totals.iter().map(|(scope, (ok, failed))| json!({
            "idScope": scope, "billable": ok, "failed": failed,
        })).collect::<Vec<_>>(),
    }))
}

/// `admin audit`: the audit log (newest first, at most `top` records) of the data directory's store
/// database, read-only, as a JSON array of records.
pub fn audit_report(args: &crate::cli::AuditArgs) -> Result<Value, ServerError> {
    use dps_core::audit::{AuditFilter, AuditOperation};
    use dps_core::store::PageRequest;
    let path = args.local.dir().database();
    if !path.exists() {
        return Err(ServerError::Client(format!(
            "no store database at {} (use --data-dir with the server's data directory)",
            path.display()
        )));
    }
    let time = |flag: &str, value: &Option<String>| -> Result<Option<Timestamp>, ServerError> {
        value
            .as_deref()
            .map(|v| {
                Timestamp::parse_iso(v)
                    .ok_or_else(|| ServerError::Client(format!("--{flag} '{v}' is not an RFC 3339 time")))
            })
            .transpose()
    };
    let operation = args
        .operation
        .as_deref()
        .map(|o| {
            AuditOperation::parse(o)
                .ok_or_else(|| ServerError::Client(format!("--operation '{o}' is not an audited operation")))
        })
        .transpose()?;
    let filter = AuditFilter {
        since: time("since", &args.since)?,
        until: time("until", &args.until)?,
        principal: args.principal.clone(),
        target: args.target.clone(),
        operation,
    };
    let mut records = Vec::new();
    let mut after = None;
    while records.len() < args.top {
        let page = PageRequest { after, limit: (args.top - records.len()).min(500) };
        let page = dps_store::read_audit_log(&path, &filter, &page)
            .map_err(|e| ServerError::Client(format!("{}: {e}", path.display())))?;
        records.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    serde_json::to_value(records).map_err(|e| ServerError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_build_the_azure_shape() {
        let s = EnrollmentSettings {
            primary_key: Some("cHJpbWFyeQ==".into()),
            iot_hubs: Some(vec!["hub-1.localhost".into()]),
            allocation_policy: Some("static".into()),
            reprovision: Some(Reprovision::NeverReprovision),
            initial_twin_tags: Some(json!({"a": 1})),
            initial_twin_properties: Some(json!({"b": 2})),
            provisioning_status: Some("disabled".into()),
            edge_enabled: Some(true),
            ..EnrollmentSettings::default()
        };
        let mut body = json!({"enrollmentGroupId": "g"});
        s.apply(&mut body, true);
        assert_eq!(
            body,
            json!({
                "enrollmentGroupId": "g",
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "cHJpbWFyeQ=="}},
                "iotHubs": ["hub-1.localhost"],
                "allocationPolicy": "static",
                "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": false},
                "initialTwin": {"tags": {"a": 1}, "properties": {"desired": {"b": 2}}},
                "provisioningStatus": "disabled",
                "capabilities": {"iotEdge": true}
            })
        );
    }

    #[test]
    fn update_keeps_what_is_not_set() {
        let mut current = json!({"registrationId": "r", "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": "p", "secondaryKey": "s"}}, "initialTwin": {"tags": {"x": 1}}});
        EnrollmentSettings { provisioning_status: Some("disabled".into()), ..Default::default() }
            .apply(&mut current, false);
        assert_eq!(current["attestation"]["symmetricKey"]["secondaryKey"], "s");
        assert_eq!(current["initialTwin"]["tags"]["x"], 1);
        assert_eq!(current["provisioningStatus"], "disabled");
    }
}
