//! IoT hub adapters behind the engine's hub-directory contract ([`HubOp`] → [`HubResult`]), chosen per
//! linked hub:
//!
//! - [`RoutingDirectory`] dispatches each operation by the hub host name it names, to the adapter
//!   registered for that hub, or to a default directory (the server's durable local directory) for every
//!   hub without one. Adapters can be added, replaced and removed while flows run.
//! - [`mosquitto::MosquittoDirectory`]: an MQTT broker (Mosquitto with its dynamic-security plugin) whose
//!   accounts are the devices' hub identities, managed through the plugin's control topic.
//! - [`iothub::IotHubDirectory`]: Azure IoT Hub's registry and twin REST API, authenticated with the hub's
//!   connection string.
//!
//! Every failure is a [`HubError`], which the engine turns into a `failed` registration with `500002`.
//! Credentials are held as [`Secret`]s, which never show in `Debug` or `Display` output.

#![forbid(unsafe_code)]
// This crate does network I/O (sockets, timeouts, the wall clock for SAS expiry): it opts out of the pure
// crates' bans on clock and I/O calls.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod iothub;
pub mod mosquitto;
#[cfg(feature = "testing")]
pub mod testing;

use dps_core::hub::{AsyncHubDirectory, HubError, HubOp, HubResult};
use dps_core::object::DynHubDirectory;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};

/// A credential (a password, a connection string): its text never appears in `Debug` or `Display`
/// output, so it cannot leak through a log line or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Which adapter serves a linked hub, with its settings and credential.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSpec {
    /// The host's default directory (the server's durable local directory).
    Local,
    /// A Mosquitto broker with the dynamic-security plugin.
    Mosquitto(mosquitto::MosquittoConfig),
    /// An Azure IoT hub through its REST API.
    IotHub(iothub::IotHubConfig),
}

impl AdapterSpec {
    /// The kind's name in configuration: `local`, `mosquitto`, `iothub`.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterSpec::Local => "local",
            AdapterSpec::Mosquitto(_) => "mosquitto",
            AdapterSpec::IotHub(_) => "iothub",
        }
    }

    /// The adapter for the linked hub `hub` (None for `local`: the default directory serves it). Fails
    /// when the settings are not usable (a bad connection string, an unreadable CA file), with a message
    /// that never contains the credential.
    pub fn build(&self, hub: &str) -> Result<Option<Arc<dyn DynHubDirectory>>, String> {
        Ok(match self {
            AdapterSpec::Local => None,
            AdapterSpec::Mosquitto(c) => Some(Arc::new(mosquitto::MosquittoDirectory::new(hub, c.clone()))),
            AdapterSpec::IotHub(c) => Some(Arc::new(iothub::IotHubDirectory::new(hub, c.clone())?)),
        })
    }

    /// Routes `hub` on `routing` to the adapter this spec builds (or back to the default for `local`).
    pub fn install(&self, hub: &str, routing: &RoutingDirectory) -> Result<(), String> {
        match self.build(hub)? {
            Some(directory) => routing.set(hub, self.kind(), directory),
            None => {
                routing.remove(hub);
            }
        }
        Ok(())
    }
}

/// The hub host name an operation addresses.
pub fn op_hub(op: &HubOp) -> Option<&str> {
    match op {
        HubOp::UpsertDevice { hub, .. } | HubOp::ReadTwin { hub, .. } | HubOp::DeleteDevice { hub, .. } => {
            Some(hub)
        }
        _ => None,
    }
}

/// A hub error for `hub`.
pub(crate) fn hub_error(hub: &str, message: impl Into<String>) -> HubError {
    HubError { hub: hub.to_owned(), message: message.into() }
}

/// Dispatches each [`HubOp`] by its hub host name (ASCII case-insensitive) to the adapter registered for
/// that hub, or to the default directory.
///
/// The table sits behind a read-write lock: an operation takes the read lock only long enough to clone the
/// adapter's `Arc`, so replacing an adapter never waits for hub work in progress, and an operation already
/// started finishes on the adapter it began with.
pub struct RoutingDirectory {
    default: Arc<dyn DynHubDirectory>,
    routes: RwLock<HashMap<String, Route>>,
}

struct Route {
    kind: &'static str,
    directory: Arc<dyn DynHubDirectory>,
}

impl fmt::Debug for RoutingDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut shown: Vec<(&String, &'static str)> = routes.iter().map(|(h, r)| (h, r.kind)).collect();
        shown.sort();
        f.debug_struct("RoutingDirectory").field("routes", &shown).finish_non_exhaustive()
    }
}

impl RoutingDirectory {
    /// A directory sending every hub to `default` until adapters are set.
    pub fn new(default: Arc<dyn DynHubDirectory>) -> RoutingDirectory {
        RoutingDirectory { default, routes: RwLock::new(HashMap::new()) }
    }

    /// Sends the operations of `hub` to `directory` (replacing any adapter it had). `kind` names the
    /// adapter in `Debug` output and [`RoutingDirectory::kind`].
    pub fn set(&self, hub: &str, kind: &'static str, directory: Arc<dyn DynHubDirectory>) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.insert(hub.to_ascii_lowercase(), Route { kind, directory });
    }

    /// Sends `hub` back to the default directory; whether it had an adapter.
    pub fn remove(&self, hub: &str) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.remove(&hub.to_ascii_lowercase()).is_some()
    }

    /// The kind of adapter `hub` is routed to (None: the default directory).
    pub fn kind(&self, hub: &str) -> Option<&'static str> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(&hub.to_ascii_lowercase()).map(|r| r.kind)
    }

    /// The directory that performs the operations of `hub`.
    pub fn route(&self, hub: &str) -> Arc<dyn DynHubDirectory> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        match routes.get(&hub.to_ascii_lowercase()) {
            Some(r) => Arc::clone(&r.directory),
            None => Arc::clone(&self.default),
        }
    }
}

impl AsyncHubDirectory for RoutingDirectory {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        let directory = match op_hub(&op) {
            Some(hub) => self.route(hub),
            None => Arc::clone(&self.default),
        };
        async move { directory.execute_boxed(op).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::hub::{BlockingHubDirectory, DeviceIdentity, DeviceTwin, MemoryHubDirectory};

    fn upsert(hub: &str, id: &str) -> HubOp {
        HubOp::UpsertDevice {
            hub: hub.into(),
            identity: DeviceIdentity::with_keys(id, "a".into(), "b".into()),
            twin: DeviceTwin::default(),
            replace_twin: false,
        }
    }

    #[tokio::test]
    async fn operations_go_to_the_adapter_of_their_hub() {
        let local = Arc::new(MemoryHubDirectory::new());
        let other = Arc::new(MemoryHubDirectory::new());
        let routing = RoutingDirectory::new(local.clone());
        routing.set("Hub-B.example", "memory", other.clone());
        assert_eq!(routing.kind("hub-b.EXAMPLE"), Some("memory"));
        routing.execute(upsert("hub-a.example", "d1")).await.unwrap();
        routing.execute(upsert("HUB-B.example", "d2")).await.unwrap();
        assert!(local.device("hub-a.example", "d1").is_some());
        assert!(local.device("hub-b.example", "d2").is_none());
        assert!(other.device("hub-b.example", "d2").is_some());
        // Removed: back to the default.
        assert!(routing.remove("hub-b.example"));
        assert!(!routing.remove("hub-b.example"));
        routing.execute(upsert("hub-b.example", "d3")).await.unwrap();
        assert!(local.device("hub-b.example", "d3").is_some());
        // A failing adapter fails only its hub.
        routing.set("hub-c.example", "memory", other.clone());
        other.set_unavailable("hub-c.example", true);
        assert!(routing.execute(upsert("hub-c.example", "d4")).await.is_err());
        assert!(BlockingHubDirectory::execute(&*local, upsert("hub-c.example", "d4")).is_ok());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("HostName=h;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0");
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        assert!(s.expose().contains("c2VjcmV0"));
    }
}
