//! The service API, with a service SAS from a connection string: creating the enrollment group the devices
//! belong to, and reading back every stored registration state to check that each assignment a device was
//! told about was durably committed.

use crate::device::{now, Assignment, Target};
use crate::https::{HttpResponse, HttpsConnection};
use crate::Error;
use dps_core::proto::model::{AttestationMechanism, DeviceRegistrationState, RegistrationStatus};
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::ErrorBody;
use std::collections::HashMap;

/// The service api-version the client sends.
pub const SERVICE_API_VERSION: &str = "2021-10-01";

/// Page size of registration-state queries (the engine's maximum).
pub const QUERY_PAGE_SIZE: usize = 1000;

/// The service connection string (defined once, in `dps-proto`).
pub use dps_core::proto::sas::ConnectionString;

/// A service API client. Each call opens its own connection (calls are few).
#[derive(Debug, Clone)]
pub struct ServiceClient {
    target: Target,
    credentials: ConnectionString,
}

fn service_error(what: &str, response: &HttpResponse) -> Error {
    let detail = match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(e) => format!("{} {}", e.error_code, e.message),
        Err(_) => String::from_utf8_lossy(&response.body).chars().take(300).collect(),
    };
    Error::Service(format!("{what}: HTTP {}: {detail}", response.status))
}

impl ServiceClient {
    /// A client for the service API at `target` (the HTTPS endpoint).
    pub fn new(target: Target, credentials: ConnectionString) -> ServiceClient {
        ServiceClient { target, credentials }
    }

    fn token(&self) -> String {
        self.credentials.token(now().unix_seconds() + 3600)
    }

    /// Sends one request (`path` without query; the api-version is added).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, Error> {
        let mut connection = HttpsConnection::connect(&self.target)
            .await
            .map_err(|e| Error::Service(format!("connecting to {}: {e}", self.target.addr)))?;
        let token = self.token();
        let mut all = vec![("authorization", token.as_str())];
        all.extend_from_slice(headers);
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| Error::Service(e.to_string()))?,
            None => Vec::new(),
        };
        let result = connection
            .send(method, &format!("{path}?api-version={SERVICE_API_VERSION}"), &all, body)
            .await
            .map_err(|e| Error::Service(format!("{method} {path}: {e}")));
        connection.close().await;
        result
    }

    /// The group's primary key; with `create`, creates a symmetric-key group with service-generated keys
    /// first if it does not exist.
    pub async fn group_key(&self, group_id: &str, create: bool) -> Result<SymmetricKey, Error> {
        let path = format!("/enrollmentGroups/{group_id}/attestationmechanism");
        let mut response = self.call("POST", &path, None, &[]).await?;
        if response.status == 404 && create {
            let group = serde_json::json!({
                "enrollmentGroupId": group_id,
                "attestation": {"type": "symmetricKey"},
                "provisioningStatus": "enabled",
            });
            let created =
                self.call("PUT", &format!("/enrollmentGroups/{group_id}"), Some(&group), &[]).await?;
            if created.status != 200 {
                return Err(service_error(&format!("creating enrollment group '{group_id}'"), &created));
            }
            response = self.call("POST", &path, None, &[]).await?;
        }
        if response.status != 200 {
            return Err(service_error(
                &format!("reading the keys of enrollment group '{group_id}'"),
                &response,
            ));
        }
        let mechanism: AttestationMechanism = serde_json::from_slice(&response.body)
            .map_err(|e| Error::Service(format!("the attestation mechanism of '{group_id}': {e}")))?;
        let key = mechanism
            .symmetric_key
            .and_then(|k| k.primary_key)
            .ok_or_else(|| Error::Service(format!("enrollment group '{group_id}' has no symmetric key")))?;
        SymmetricKey::parse(&key).map_err(|e| Error::Service(format!("the group's primary key: {e}")))
    }

    /// Uploads `root_pem` as the **verified** CA certificate `ca_name` (replacing one of that name) and
    /// creates or replaces the X.509 enrollment group `group_id` whose `caReferences.primary` is `ca_name`:
    /// it then admits every device whose certificate chain reaches that root.
    pub async fn setup_x509_group(&self, group_id: &str, ca_name: &str, root_pem: &str) -> Result<(), Error> {
        let certificate = serde_json::json!({"properties": {"certificate": root_pem, "isVerified": true}});
        let path = format!("/certificates/{ca_name}");
        self.put_replacing(&path, &certificate, &format!("uploading CA certificate '{ca_name}'")).await?;
        let group = serde_json::json!({
            "enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}},
            "provisioningStatus": "enabled",
        });
        let path = format!("/enrollmentGroups/{group_id}");
        self.put_replacing(&path, &group, &format!("creating X.509 enrollment group '{group_id}'")).await
    }

    /// Creates or replaces the symmetric-key enrollment group `group_id` with custom allocation through
    /// `webhook_url` (the `custom` mode) and returns its primary key.
    pub async fn setup_custom_group(&self, group_id: &str, webhook_url: &str) -> Result<SymmetricKey, Error> {
        let key = SymmetricKey::from_bytes((0..64u8).map(|b| b.wrapping_mul(37).wrapping_add(11)).collect());
        let group = serde_json::json!({
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": key.to_base64(), "secondaryKey": key.to_base64()}},
            "provisioningStatus": "enabled",
            "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": webhook_url, "apiVersion": "2021-10-01"},
        });
        let path = format!("/enrollmentGroups/{group_id}");
        self.put_replacing(&path, &group, &format!("creating custom-allocation group '{group_id}'")).await?;
        Ok(key)
    }

    /// PUT, with `If-Match` of the current ETag when the object exists already.
    async fn put_replacing(&self, path: &str, body: &serde_json::Value, what: &str) -> Result<(), Error> {
        let current = self.call("GET", path, None, &[]).await?;
        let etag = (current.status == 200)
            .then(|| serde_json::from_slice::<serde_json::Value>(&current.body).ok())
            .flatten()
            .and_then(|v| v.get("etag").and_then(|e| e.as_str()).map(str::to_owned));
        let headers: Vec<(&str, &str)> = etag.as_deref().map(|e| ("if-match", e)).into_iter().collect();
        let response = self.call("PUT", path, Some(body), &headers).await?;
        if response.status != 200 {
            return Err(service_error(what, &response));
        }
        Ok(())
    }

    /// Every registration state of the group, following continuation tokens.
    pub async fn registration_states(&self, group_id: &str) -> Result<Vec<DeviceRegistrationState>, Error> {
        let path = format!("/registrations/{group_id}/query");
        let page_size = QUERY_PAGE_SIZE.to_string();
        let mut states = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", page_size.as_str())];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.as_str()));
            }
            let response = self.call("POST", &path, None, &headers).await?;
            if response.status != 200 {
                return Err(service_error(&format!("querying the registrations of '{group_id}'"), &response));
            }
            let page: Vec<DeviceRegistrationState> = serde_json::from_slice(&response.body)
                .map_err(|e| Error::Service(format!("a page of registration states: {e}")))?;
            let empty = page.is_empty();
            states.extend(page);
            continuation = response.header("x-ms-continuation").map(str::to_owned).filter(|c| !c.is_empty());
            if continuation.is_none() || empty {
                return Ok(states);
            }
        }
    }
}

/// The result of checking devices' assignments against the stored registration states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Assignments checked.
    pub checked: usize,
    /// Registration states read from the service.
    pub stored: usize,
    /// Assigned devices with no stored registration state.
    pub missing: Vec<String>,
    /// Assigned devices whose stored state is not `assigned` to the same hub and device ID.
    pub mismatched: Vec<String>,
}

impl Verification {
    /// Whether every assignment was found as told.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty()
    }

    /// One line for reports.
    pub fn summary(&self) -> String {
        let sample = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        if self.is_ok() {
            format!(
                "all {} assignments found in the {} stored registration states",
                self.checked, self.stored
            )
        } else {
            format!(
                "FAILED: of {} assignments, {} missing (e.g. {}) and {} different (e.g. {}); {} states stored",
                self.checked,
                self.missing.len(),
                sample(&self.missing),
                self.mismatched.len(),
                sample(&self.mismatched),
                self.stored
            )
        }
    }
}

/// Checks that every assignment is stored as `assigned` to the same hub and device ID (registration IDs
/// compare case-insensitively).
pub fn verify_assignments(assignments: &[Assignment], states: &[DeviceRegistrationState]) -> Verification {
    let by_id: HashMap<String, &DeviceRegistrationState> =
        states.iter().map(|s| (s.registration_id.to_ascii_lowercase(), s)).collect();
    let mut v = Verification { checked: assignments.len(), stored: states.len(), ..Verification::default() };
    for a in assignments {
        match by_id.get(&a.registration_id.to_ascii_lowercase()) {
            None => v.missing.push(a.registration_id.clone()),
            Some(s) => {
                let same = s.status == RegistrationStatus::Assigned
                    && s.assigned_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(&a.assigned_hub))
                    && s.device_id.as_deref() == Some(a.device_id.as_str());
                if !same {
                    v.mismatched.push(a.registration_id.clone());
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_parse_in_any_order() {
        let key = SymmetricKey::from_bytes(vec![3; 32]).to_base64();
        let c = ConnectionString::parse(&format!(
            "SharedAccessKey={key};HostName=dps.localhost;SharedAccessKeyName=provisioningserviceowner\n"
        ))
        .unwrap();
        assert_eq!(c.host_name, "dps.localhost");
        assert_eq!(c.key_name, "provisioningserviceowner");
        assert_eq!(c.key.to_base64(), key);
        assert!(ConnectionString::parse("HostName=x;SharedAccessKeyName=y").is_err());
        assert!(ConnectionString::parse("HostName=x;SharedAccessKeyName=y;SharedAccessKey=!!").is_err());
        assert!(ConnectionString::parse("garbage").is_err());
    }

    fn state(id: &str, status: RegistrationStatus, hub: &str) -> DeviceRegistrationState {
        serde_json::from_value(serde_json::json!({
            "registrationId": id, "status": status, "assignedHub": hub, "deviceId": id.to_lowercase(),
        }))
        .unwrap()
    }

    fn assignment(id: &str, hub: &str) -> Assignment {
        Assignment { registration_id: id.into(), assigned_hub: hub.into(), device_id: id.into() }
    }

    #[test]
    fn verification_finds_missing_and_different_states() {
        let states = vec![
            state("a", RegistrationStatus::Assigned, "hub-1"),
            state("B", RegistrationStatus::Assigned, "hub-2"),
            state("c", RegistrationStatus::Assigned, "hub-1"),
            state("d", RegistrationStatus::Assigning, "hub-1"),
        ];
        let ok = verify_assignments(&[assignment("a", "hub-1"), assignment("b", "HUB-2")], &states);
        assert!(ok.is_ok(), "{}", ok.summary());
        assert_eq!((ok.checked, ok.stored), (2, 4));

        let bad = verify_assignments(
            &[
                assignment("a", "hub-1"),
                assignment("c", "hub-2"),
                assignment("d", "hub-1"),
                assignment("e", "hub-1"),
            ],
            &states,
        );
        assert!(!bad.is_ok());
        assert_eq!(bad.missing, vec!["e".to_owned()]);
        assert_eq!(bad.mismatched, vec!["c".to_owned(), "d".to_owned()]);
        assert!(bad.summary().starts_with("FAILED"));
    }
}
