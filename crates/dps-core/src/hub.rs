//! The IoT hub directory: where the engine registers device identities with their credentials and initial
//! twin, reads twins (for migration) and deletes identities (spec §8.6, §9.2). Like storage, hub work is an
//! effect ([`HubOp`]) performed by the caller; [`MemoryHubDirectory`] is an in-memory implementation that
//! makes assignments observable in tests and demos.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// A device twin's DPS-managed parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTwin {
    /// Twin tags (a JSON object).
    pub tags: Value,
    /// Desired properties (a JSON object).
    pub desired: Value,
    /// Whether the device is an IoT Edge device (capabilities travel with the twin on migration).
    pub iot_edge: bool,
}

/// A device identity to create or update in a hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    /// Device ID.
    pub device_id: String,
    /// How the device authenticates to the hub: with the credential it provisioned with.
    pub authentication: HubAuthentication,
}

impl DeviceIdentity {
    /// An identity authenticating with symmetric keys (base64).
    pub fn with_keys(device_id: impl Into<String>, primary_key: String, secondary_key: String) -> Self {
        DeviceIdentity {
            device_id: device_id.into(),
            authentication: HubAuthentication::Sas { primary_key, secondary_key },
        }
    }

    /// The primary symmetric key, for a `sas` identity.
    pub fn primary_key(&self) -> Option<&str> {
        match &self.authentication {
            HubAuthentication::Sas { primary_key, .. } => Some(primary_key),
            _ => None,
        }
    }

    /// The secondary symmetric key, for a `sas` identity.
    pub fn secondary_key(&self) -> Option<&str> {
        match &self.authentication {
            HubAuthentication::Sas { secondary_key, .. } => Some(secondary_key),
            _ => None,
        }
    }
}

/// A hub device's authentication, in IoT Hub's terms (`authentication.type` of a device identity):
/// symmetric keys (`sas`), the thumbprints of its own certificate (`selfSigned`), or any certificate
/// signed by a CA the hub trusts (`certificateAuthority`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HubAuthentication {
    /// Symmetric keys, base64.
    #[serde(rename_all = "camelCase")]
    Sas {
        /// Primary key.
        primary_key: String,
        /// Secondary key.
        secondary_key: String,
    },
    /// X.509 thumbprints (uppercase hex) of the device's certificates: an individual X.509 enrollment.
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        /// Primary thumbprint.
        primary_thumbprint: String,
        /// Secondary thumbprint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_thumbprint: Option<String>,
    },
    /// Any certificate chaining to a CA the hub trusts: an X.509 group device (or an issued certificate).
    CertificateAuthority,
}

impl HubAuthentication {
    /// IoT Hub's name of the type: `sas`, `selfSigned`, `certificateAuthority`.
    pub fn type_name(&self) -> &'static str {
        match self {
            HubAuthentication::Sas { .. } => "sas",
            HubAuthentication::SelfSigned { .. } => "selfSigned",
            HubAuthentication::CertificateAuthority => "certificateAuthority",
        }
    }
}

/// A hub operation requested by the engine.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HubOp {
    /// Create the identity or update its credentials. A new identity gets `twin`; an existing one gets it
    /// only when `replace_twin` is true (otherwise its current twin is kept).
    UpsertDevice {
        /// Hub host name.
        hub: String,
        /// The identity.
        identity: DeviceIdentity,
        /// The twin for a new identity (and for an existing one when `replace_twin`).
        twin: DeviceTwin,
        /// Replace the twin of an existing identity.
        replace_twin: bool,
    },
    /// Read a device's twin.
    ReadTwin {
        /// Hub host name.
        hub: String,
        /// Device ID.
        device_id: String,
    },
    /// Delete a device identity (absent is not an error).
    DeleteDevice {
        /// Hub host name.
        hub: String,
        /// Device ID.
        device_id: String,
    },
}

/// The result of a [`HubOp`].
#[derive(Debug, Clone, PartialEq)]
pub enum HubResult {
    /// Upsert or delete done.
    Done,
    /// The twin read (None: no such device).
    Twin(Option<DeviceTwin>),
}

/// A hub operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IoT hub {hub}: {message}")]
pub struct HubError {
    /// The hub.
    pub hub: String,
    /// What went wrong.
    pub message: String,
}

/// A hub directory driven synchronously.
pub trait BlockingHubDirectory {
    /// Performs one operation.
    fn execute(&self, op: HubOp) -> Result<HubResult, HubError>;
}

/// A hub directory driven asynchronously.
pub trait AsyncHubDirectory {
    /// Performs one operation.
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send;
}

impl<T: BlockingHubDirectory + ?Sized> BlockingHubDirectory for &T {
    fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        (**self).execute(op)
    }
}

impl<T: BlockingHubDirectory + ?Sized> BlockingHubDirectory for Arc<T> {
    fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        (**self).execute(op)
    }
}

impl<T: AsyncHubDirectory + ?Sized> AsyncHubDirectory for &T {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        (**self).execute(op)
    }
}

impl<T: AsyncHubDirectory + ?Sized> AsyncHubDirectory for Arc<T> {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        (**self).execute(op)
    }
}

/// A device as the in-memory hub holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubDevice {
    /// Its identity.
    pub identity: DeviceIdentity,
    /// Its twin.
    pub twin: DeviceTwin,
}

/// An in-memory hub directory. Hubs named in `unavailable` fail every operation (to test failures).
#[derive(Debug, Default)]
pub struct MemoryHubDirectory {
    devices: Mutex<HashMap<(String, String), HubDevice>>,
    unavailable: Mutex<Vec<String>>,
}

impl MemoryHubDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device `device_id` on `hub`, if registered.
    pub fn device(&self, hub: &str, device_id: &str) -> Option<HubDevice> {
        let map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(hub.to_ascii_lowercase(), device_id.to_owned())).cloned()
    }

    /// Every (hub, device ID) registered, sorted.
    pub fn devices(&self) -> Vec<(String, String)> {
        let map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.keys().cloned().collect();
        v.sort();
        v
    }

    /// Replaces a device's twin (simulates the device or a back end changing it in the hub).
    pub fn set_twin(&self, hub: &str, device_id: &str, twin: DeviceTwin) -> bool {
        let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&(hub.to_ascii_lowercase(), device_id.to_owned())) {
            Some(d) => {
                d.twin = twin;
                true
            }
            None => false,
        }
    }

    /// Makes a hub fail (or recover).
    pub fn set_unavailable(&self, hub: &str, unavailable: bool) {
        let mut v = self.unavailable.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|h| !h.eq_ignore_ascii_case(hub));
        if unavailable {
            v.push(hub.to_ascii_lowercase());
        }
    }

    fn check(&self, hub: &str) -> Result<(), HubError> {
        let v = self.unavailable.lock().unwrap_or_else(|e| e.into_inner());
        if v.iter().any(|h| h.eq_ignore_ascii_case(hub)) {
            return Err(HubError { hub: hub.to_owned(), message: "hub unavailable".to_owned() });
        }
        Ok(())
    }
}

impl BlockingHubDirectory for MemoryHubDirectory {
    fn execute(&self, op: HubOp) -> Result<HubResult, HubError> {
        match op {
            HubOp::UpsertDevice { hub, identity, twin, replace_twin } => {
                self.check(&hub)?;
                let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
                let key = (hub.to_ascii_lowercase(), identity.device_id.clone());
                match map.get_mut(&key) {
                    Some(d) => {
                        d.identity = identity;
                        if replace_twin {
                            d.twin = twin;
                        }
                    }
                    None => {
                        map.insert(key, HubDevice { identity, twin });
                    }
                }
                Ok(HubResult::Done)
            }
            HubOp::ReadTwin { hub, device_id } => {
                self.check(&hub)?;
                Ok(HubResult::Twin(self.device(&hub, &device_id).map(|d| d.twin)))
            }
            HubOp::DeleteDevice { hub, device_id } => {
                self.check(&hub)?;
                let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
                map.remove(&(hub.to_ascii_lowercase(), device_id));
                Ok(HubResult::Done)
            }
        }
    }
}

impl AsyncHubDirectory for MemoryHubDirectory {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        std::future::ready(BlockingHubDirectory::execute(self, op))
    }
}
