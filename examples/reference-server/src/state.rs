//! State shared by every connection: the engine, the store, the hub directory, the RNG, and metrics.

use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::Timestamp;
use dps_core::{run_async, DeviceRequest, Engine, HttpRequest, Reply};
use dps_store::SqliteStore;
use rand::rngs::StdRng;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock as the engine's [`Timestamp`].
pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

/// Everything a connection handler needs. Shared as `Arc<AppState>`.
#[derive(Debug)]
pub struct AppState {
    /// The engine (configuration and flow constructors).
    pub engine: Engine,
    /// The durable store.
    pub store: SqliteStore,
    /// The IoT hub directory.
    pub hubs: MemoryHubDirectory,
    /// Randomness for operation IDs, ETags, tracking IDs and generated keys.
    pub rng: Mutex<StdRng>,
}

impl AppState {
    /// Runs a device API request (HTTPS or MQTT, already addressed) to its reply.
    pub async fn run_device(&self, request: DeviceRequest) -> Reply {
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.device(now(), &mut *rng, request)
        };
        run_async(&mut flow, &self.store, &self.hubs).await
    }

    /// Runs any HTTP request (device or service API) to its reply.
    pub async fn run_http(&self, request: HttpRequest) -> Reply {
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.http(now(), &mut *rng, request)
        };
        run_async(&mut flow, &self.store, &self.hubs).await
    }
}
