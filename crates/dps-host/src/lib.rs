//! The embeddable DPS host: **one object** that owns the engine, a clock, an RNG, the store, the hub
//! directory and the background work of flows that answered early, with async entry points for device
//! requests (any transport), HTTP requests (device and service API) and a blocking twin.
//!
//! Servers, bindings, tests and tools wrap a [`Host`] instead of wiring "clock + RNG + engine + store +
//! hubs + driver" themselves:
//!
//! ```no_run
//! # async fn demo(config: dps_core::EngineConfig) -> Result<(), dps_core::DpsError> {
//! use std::sync::Arc;
//! let host = dps_host::Host::builder(config)
//!     .store(Arc::new(dps_store::MemoryStore::new()))
//!     .hubs(Arc::new(dps_core::hub::MemoryHubDirectory::new()))
//!     .build()?;
//! let reply = host.http(dps_core::HttpRequest::default()).await;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! Transports (`dps-mqtt`, later AMQP) drive a host through the [`DeviceHandler`] trait, which lives here
//! so that every transport depends on the host's contract rather than on each other.
//!
//! **Early answers.** With [`EngineConfig::respond_before_assignment`] (the reference server's default) a
//! register commits an `assigning` record, the host returns the `202` to the caller, and the remaining
//! hub work and final commit continue on a background task tracked by the host; polls see `assigning`
//! until that commit lands. [`Host::drain`] waits for that background work (graceful shutdown).
//!
//! **Quotas and fault injection.** Before a request reaches the engine the host applies its rate limits
//! ([`HostBuilder::quotas`], Azure's with [`Quotas::azure`], none by default) and its fault rules
//! ([`HostBuilder::faults`], [`Host::add_fault`]; none by default), so every transport answers the same
//! `429` / `429001` with a `Retry-After`, the same injected errors and delays. A dropped connection is
//! a reply with [`Reply::drop_connection`] set: the transport closes the connection without sending it.

#![forbid(unsafe_code)]
// A host crate: it reads the wall clock (SystemClock) and spawns Tokio tasks for early-answered flows.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod assigning;
mod gate;
mod hooks;
mod issuer;
mod webhook;
pub use assigning::AssigningRecords;
use assigning::{FlowStore, Overlay};
/// Fault rules and their parts (`dps_policy::fault`), for building [`HostBuilder::faults`].
pub use dps_policy::fault;
/// Rates of [`Quotas`] (`dps_policy::throttle`).
pub use dps_policy::throttle;
use gate::{Decision, Gate};
pub use gate::{FaultStatus, GateCounts, Limit, Quotas, DEFAULT_TRACKED_DEVICES};
pub use hooks::{hook_fn, BlockingEffects};
pub use issuer::{CaKeyKind, LocalCa, CA_VALIDITY, DEFAULT_ISSUED_VALIDITY};
pub use webhook::{WebhookConfig, Webhooks};

use dps_core::effect::{AllocationHook, CertificateIssuer, EffectHandlers};
use dps_core::object::{DynHubDirectory, DynStore};
use dps_core::proto::id::format_uuid;
use dps_core::store::BlockingStore;
use dps_core::{
    finish_async, run_async_until_reply, run_blocking_with, DeviceCall, DeviceRequest, DpsError, Engine,
    EngineConfig, HttpRequest, Principal, Progress, Reply, ServiceCommand, Timestamp,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_core::RngCore;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use dps_core;

/// The time source of a host. Tests use a fixed or stepped clock; production the [`SystemClock`].
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}

impl<F: Fn() -> Timestamp + Send + Sync> Clock for F {
    fn now(&self) -> Timestamp {
        self()
    }
}

/// Runs device API requests for a transport (MQTT, AMQP, …) that has already parsed the address into a
/// [`DeviceRequest`]. A [`Host`] implements it; a server may wrap the host to count requests.
pub trait DeviceHandler: Send + Sync + 'static {
    /// Runs one device API request to its reply.
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send;

    /// The reply to a request refused before it reached the engine (a PUBLISH on an unknown or malformed
    /// topic that still names a `$rid`, a handler task that failed).
    ///
    /// The default builds the wire error body with a random tracking ID and the current time.
    fn error_reply(&self, error: &DpsError) -> Reply {
        default_error_reply(error)
    }
}

/// The default [`DeviceHandler::error_reply`]: `Reply::error` with a random tracking ID and the wall clock.
pub fn default_error_reply(error: &DpsError) -> Reply {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    Reply::error(error, format_uuid(b), SystemClock.now())
}

/// Builds a [`Host`]; see [`Host::builder`].
pub struct HostBuilder {
    config: EngineConfig,
    store: Option<Arc<dyn DynStore>>,
    hubs: Option<Arc<dyn DynHubDirectory>>,
    clock: Arc<dyn Clock>,
    rng: Option<Box<dyn RngCore + Send>>,
    poll_hold: Duration,
    assigning: AssigningRecords,
    effects: EffectHandlers,
    quotas: Quotas,
    faults: Vec<fault::FaultRule>,
    fault_rng: Option<Box<dyn RngCore + Send>>,
    hook: Option<Arc<dyn AllocationHook>>,
    webhooks: Option<Webhooks>,
}

/// The default of [`HostBuilder::poll_hold`].
pub const DEFAULT_POLL_HOLD: Duration = Duration::from_millis(100);

impl HostBuilder {
    /// The store (required): any `AsyncStore + Send + Sync`, e.g. `dps_store::SqliteStore`.
    pub fn store(mut self, store: Arc<dyn DynStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The hub directory (default: a new in-memory `MemoryHubDirectory`).
    pub fn hubs(mut self, hubs: Arc<dyn DynHubDirectory>) -> Self {
        self.hubs = Some(hubs);
        self
    }

    /// The clock (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The RNG for operation IDs, ETags, tracking IDs and generated keys (default: `StdRng` from OS
    /// entropy). Pass a seeded RNG for reproducible tests.
    pub fn rng(mut self, rng: Box<dyn RngCore + Send>) -> Self {
        self.rng = Some(rng);
        self
    }

    /// How long a poll of a registration whose early-answered flow is still running in this host waits for
    /// that flow to finish before it is answered (default [`DEFAULT_POLL_HOLD`]; zero answers at once).
    /// A device polling right after its `202` then usually gets the final result instead of another
    /// `assigning` (one request instead of several); a flow that takes longer (a slow hub or webhook) is
    /// still reported `assigning` after the hold. Polls of other registrations never wait.
    pub fn poll_hold(mut self, hold: Duration) -> Self {
        self.poll_hold = hold;
        self
    }

    /// Where an early-answered registration's `assigning` record lives while its hub work runs (default
    /// [`AssigningRecords::Host`]: in memory, one store write fewer per registration; see
    /// [`AssigningRecords`] for what other processes then see).
    pub fn assigning_records(mut self, assigning: AssigningRecords) -> Self {
        self.assigning = assigning;
        self
    }

    /// The certificate issuer for devices that send a CSR (spec §7.6; default: none, and a `csr` is
    /// refused with 400008). [`LocalCa`] is the built-in one.
    pub fn issuer(mut self, issuer: Arc<dyn CertificateIssuer>) -> Self {
        self.effects.issuer = Some(issuer);
        self
    }

    /// The rate limits (default: none; [`Quotas::azure`] for Azure's). A request beyond one is answered
    /// `429` / `429001` with a `Retry-After` before it reaches the engine.
    pub fn quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// The fault rules in force from the start (default: none; see [`Host::add_fault`]). Each is
    /// validated by [`build`](Self::build); IDs must be unique.
    pub fn faults(mut self, rules: Vec<fault::FaultRule>) -> Self {
        self.faults = rules;
        self
    }

    /// The RNG that rolls fault probabilities (default: `StdRng` from OS entropy); seed it for
    /// reproducible tests. Kept apart from [`rng`](Self::rng) so faults do not change generated IDs.
    pub fn fault_rng(mut self, rng: Box<dyn RngCore + Send>) -> Self {
        self.fault_rng = Some(rng);
        self
    }

    /// An in-process allocation hook that decides every custom-allocation device (spec §8.3-8.5) instead
    /// of the enrollments' webhooks: it gets the same `AllocationRequest` and answers the same
    /// `AllocationResponse`. With a hook, an enrollment with `allocationPolicy: custom` may omit its
    /// `customAllocationDefinition`; to keep webhooks for some enrollments, hold a [`Webhooks`] in the hook
    /// and call it. A hook that panics fails that registration with 400207; the host keeps serving.
    pub fn allocation_hook(mut self, hook: Arc<dyn AllocationHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The webhook client for custom allocation (default: [`Webhooks`] with [`WebhookConfig::default`]
    /// and the system's trust roots).
    pub fn webhooks(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// Validates the configuration and builds the host.
    pub fn build(mut self) -> Result<Host, DpsError> {
        self.config.certificate_issuance = self.effects.issuer.is_some();
        self.config.allocation_hook = self.hook.is_some();
        let allocator: Arc<dyn AllocationHook> = match (self.hook, self.webhooks) {
            (Some(hook), _) => hook,
            (None, Some(webhooks)) => {
                self.config.insecure_webhooks = webhooks.allows_http();
                Arc::new(webhooks)
            }
            (None, None) => Arc::new(
                Webhooks::new(WebhookConfig { roots: WebhookConfig::system_roots(), ..Default::default() })
                    .map_err(|e| internal(&e))?,
            ),
        };
        self.effects.allocator = Some(hooks::contained(allocator));
        let engine = Engine::new(self.config)?;
        let store = self.store.ok_or_else(|| {
            DpsError::with_message(dps_core::ErrorCode::InternalError, "Host::builder: no store was given")
        })?;
        let hubs = self.hubs.unwrap_or_else(|| Arc::new(dps_core::hub::MemoryHubDirectory::new()));
        let rng = self.rng.unwrap_or_else(|| Box::new(StdRng::from_entropy()));
        let gate = Gate::new(
            self.quotas,
            Vec::new(),
            self.fault_rng.unwrap_or_else(|| Box::new(StdRng::from_entropy())),
        );
        for rule in self.faults {
            gate.add_fault(rule)?;
        }
        Ok(Host {
            inner: Arc::new(Inner {
                engine,
                store,
                hubs,
                clock: self.clock,
                rng: Mutex::new(rng),
                background: TaskTracker::new(),
                in_flight: Mutex::new(HashMap::new()),
                poll_hold: self.poll_hold,
                effects: Arc::new(self.effects),
                overlay: match self.assigning {
                    AssigningRecords::Host => Some(Arc::new(Overlay::default())),
                    AssigningRecords::Store => None,
                },
                gate,
            }),
        })
    }
}

struct Inner {
    engine: Engine,
    store: Arc<dyn DynStore>,
    hubs: Arc<dyn DynHubDirectory>,
    clock: Arc<dyn Clock>,
    rng: Mutex<Box<dyn RngCore + Send>>,
    background: TaskTracker,
    /// Early-answered registrations still finishing, by (ID scope, registration ID): the receiver sees its
    /// sender dropped when the flow is done.
    in_flight: Mutex<HashMap<FlowKey, watch::Receiver<()>>>,
    poll_hold: Duration,
    /// Handlers of the flows' effects (the certificate issuer).
    effects: Arc<EffectHandlers>,
    /// In-memory `assigning` records (with [`AssigningRecords::Host`]).
    overlay: Option<Arc<Overlay>>,
    /// Rate limits and fault rules.
    gate: Gate,
}

type FlowKey = (String, String);

fn key_of(request: &DeviceRequest) -> FlowKey {
    (request.id_scope.as_str().to_owned(), request.registration_id.key().to_owned())
}

/// The embeddable provisioning service. Cheap to clone (one `Arc`); share it between connections.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("id_scope", &self.inner.engine.config().id_scope)
            .field("background_flows", &self.inner.background.len())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Starts building a host for this engine configuration.
    pub fn builder(config: EngineConfig) -> HostBuilder {
        HostBuilder {
            config,
            store: None,
            hubs: None,
            clock: Arc::new(SystemClock),
            rng: None,
            poll_hold: DEFAULT_POLL_HOLD,
            assigning: AssigningRecords::default(),
            effects: EffectHandlers::default(),
            quotas: Quotas::none(),
            faults: Vec::new(),
            fault_rng: None,
            hook: None,
            webhooks: None,
        }
    }

    /// The engine (its configuration, and flow constructors for callers that drive flows themselves).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn DynStore> {
        &self.inner.store
    }

    /// The hub directory.
    pub fn hubs(&self) -> &Arc<dyn DynHubDirectory> {
        &self.inner.hubs
    }

    /// The host clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Draws 16 random bytes from the host RNG (e.g. for a tracking ID).
    pub fn random16(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        self.with_rng(|rng| rng.fill_bytes(&mut b));
        b
    }

    fn with_rng<T>(&self, f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        let mut guard = self.inner.rng.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut **guard)
    }

    /// An error reply with a tracking ID from the host RNG and the host clock.
    pub fn error_reply(&self, error: &DpsError) -> Reply {
        Reply::error(error, format_uuid(self.random16()), self.now())
    }

    /// Runs a device API request (already addressed by a transport) to its reply. If the flow answers
    /// early, the rest of it continues on a background task (see the crate docs); this needs a Tokio
    /// runtime only in that case.
    ///
    /// Rate limits and fault rules apply first (see the crate docs); a refused request is answered
    /// without reaching the engine.
    pub async fn device(&self, request: DeviceRequest) -> Reply {
        let now = self.now();
        let stuck = match self.admit(&request, now).await {
            Ok(stuck) => stuck,
            Err(reply) => return reply,
        };
        let flow = self.with_rng(|rng| self.inner.engine.device(now, rng, request));
        let key = self.hold_poll(flow.request()).await;
        let stuck = stuck.then(|| stuck_poll(flow.request()));
        let reply = self.drive(flow, key).await;
        self.shown(reply, stuck.flatten())
    }

    /// Runs an HTTP request (device or service API: method, path and query, headers, body) to its reply.
    /// Device API requests pass the rate limits and fault rules as [`device`](Self::device) does; service
    /// API requests count against the service-operation limit.
    pub async fn http(&self, request: HttpRequest) -> Reply {
        let now = self.now();
        let flow = self.with_rng(|rng| self.inner.engine.http(now, rng, request));
        let (key, stuck) = match flow.device_request() {
            Some(request) => {
                let stuck = match self.admit(request, now).await {
                    Ok(stuck) => stuck.then(|| stuck_poll(request)).flatten(),
                    Err(reply) => return reply,
                };
                (self.hold_poll(request).await, stuck)
            }
            None => {
                if let Some(error) = self.inner.gate.service(now) {
                    return self.error_reply(&error);
                }
                (None, None)
            }
        };
        let reply = self.drive(flow, key).await;
        self.shown(reply, stuck)
    }

    /// Applies the fault rules and the rate limits to a device request: `Ok(stuck)` to run it (after an
    /// injected delay), `Err` with the reply that refuses it.
    async fn admit(&self, request: &DeviceRequest, now: Timestamp) -> Result<bool, Reply> {
        match self.inner.gate.device(request, now) {
            Decision::Run { delay_ms, stuck } => {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(delay_ms))).await;
                }
                Ok(stuck)
            }
            Decision::Refuse { error, drop } => {
                let mut reply = self.error_reply(&error);
                reply.drop_connection = drop;
                Err(reply)
            }
        }
    }

    /// A stuck registration's final poll answer is shown as `202 assigning` (errors stay as they are).
    fn shown(&self, reply: Reply, stuck: Option<(String, String)>) -> Reply {
        match stuck {
            Some((operation_id, registration_id)) if reply.status == 200 => {
                let body = gate::assigning_body(&operation_id, &registration_id);
                Reply::json(202, &body, reply.tracking_id)
                    .with_retry_after(self.inner.engine.config().retry_after_secs)
            }
            _ => reply,
        }
    }

    /// Adds a fault rule at run time (after the existing ones). Refused with `400000` when the rule is not
    /// valid ([`fault::FaultRule::validate`]) and `409000` when its ID is taken.
    pub fn add_fault(&self, rule: fault::FaultRule) -> Result<(), DpsError> {
        self.inner.gate.add_fault(rule)
    }

    /// Removes the fault rule with this ID (and ends the stuck `assigning` it caused); false when there is
    /// none.
    pub fn remove_fault(&self, id: &str) -> bool {
        self.inner.gate.remove_fault(id)
    }

    /// The fault rules in force, in order, with how often each fired.
    pub fn faults(&self) -> Vec<FaultStatus> {
        self.inner.gate.faults()
    }

    /// The rate limits in force.
    pub fn quotas(&self) -> Quotas {
        self.inner.gate.quotas()
    }

    /// How many requests each rate limit refused and each kind of fault affected, since the start.
    pub fn gate_counts(&self) -> GateCounts {
        self.inner.gate.counts()
    }

    /// Executes a typed service command (create, query, delete enrollments, groups and registration
    /// states) under `principal`, e.g. `Principal::granted("backend", Rights::ALL)`: no token, no JSON.
    /// The reply is the one the HTTP service API would give (status, JSON body, ETag header, error code).
    ///
    /// Counts against the service-operation rate limit.
    pub async fn command(&self, principal: &Principal, command: ServiceCommand) -> Reply {
        let now = self.now();
        if let Some(error) = self.inner.gate.service(now) {
            return self.error_reply(&error);
        }
        let flow = self.with_rng(|rng| self.inner.engine.command(now, rng, principal, command));
        self.drive(flow, None).await
    }

    /// For a poll of a registration still finishing in the background, waits up to the poll hold for it.
    /// Returns the key under which a register that may answer early is tracked (None for anything else,
    /// so other requests build no key).
    async fn hold_poll(&self, request: &DeviceRequest) -> Option<FlowKey> {
        match request.call {
            DeviceCall::Register { .. } if self.inner.engine.config().respond_before_assignment => {
                Some(key_of(request))
            }
            DeviceCall::OperationStatus(_) if !self.inner.poll_hold.is_zero() => {
                let running = {
                    let in_flight = self.in_flight();
                    if in_flight.is_empty() {
                        None
                    } else {
                        in_flight.get(&key_of(request)).cloned()
                    }
                };
                if let Some(mut done) = running {
                    // Err (sender dropped) is the flow finishing; a timeout answers with the current state.
                    let _ = tokio::time::timeout(self.inner.poll_hold, done.changed()).await;
                }
                None
            }
            _ => None,
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<FlowKey, watch::Receiver<()>>> {
        self.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn drive<F: dps_core::Flow + Send + 'static>(&self, mut flow: F, key: Option<FlowKey>) -> Reply {
        let inner = &self.inner;
        let clock = || inner.clock.now();
        let store = FlowStore::new(Arc::clone(&inner.store), inner.overlay.clone());
        match run_async_until_reply(&mut flow, &store, &inner.hubs, &*inner.effects, &clock).await {
            Progress::Done(reply) => {
                store.release();
                reply
            }
            Progress::Replied { reply, next } => {
                let hubs = Arc::clone(&inner.hubs);
                let effects = Arc::clone(&inner.effects);
                let clock = Arc::clone(&inner.clock);
                let tracked = key.map(|key| {
                    let (done, running) = watch::channel(());
                    self.in_flight().insert(key.clone(), running.clone());
                    (key, done, running)
                });
                let host = self.clone();
                inner.background.spawn(async move {
                    finish_async(&mut flow, next, &store, &hubs, &*effects, &|| clock.now()).await;
                    store.release();
                    if let Some((key, done, running)) = tracked {
                        let mut map = host.in_flight();
                        // A later register of the same device may have replaced the entry.
                        if map.get(&key).is_some_and(|r| r.same_channel(&running)) {
                            map.remove(&key);
                        }
                        drop(map);
                        drop(done);
                    }
                });
                reply
            }
        }
    }

    /// How many registrations are assigning with their `assigning` record in this host's memory.
    pub fn assigning_in_memory(&self) -> usize {
        self.inner.overlay.as_ref().map_or(0, |o| o.len())
    }

    /// How many early-answered flows are still finishing in the background.
    pub fn background_flows(&self) -> usize {
        self.inner.background.len()
    }

    /// Waits until every background flow started so far has finished (call on shutdown, before closing
    /// the store). New requests may still be served meanwhile.
    pub async fn drain(&self) {
        let tracker = &self.inner.background;
        tracker.close();
        tracker.wait().await;
        tracker.reopen();
    }
}

impl DeviceHandler for Host {
    fn handle(&self, request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        self.device(request)
    }

    fn error_reply(&self, error: &DpsError) -> Reply {
        Host::error_reply(self, error)
    }
}

/// The blocking twin of [`Host`], for embedders without an async runtime (scripts, FFI callers, tests):
/// a blocking store (e.g. `MemoryStore`, or `SqliteStore` through its blocking interface) and a blocking hub
/// directory, driven on the caller's thread. It applies no rate limits and no fault rules (those are
/// [`Host`]'s, for the transports).
pub struct BlockingHost<S, H> {
    engine: Engine,
    store: S,
    hubs: H,
    clock: Arc<dyn Clock>,
    rng: Mutex<Box<dyn RngCore + Send>>,
    effects: BlockingEffects,
}

impl<S, H> fmt::Debug for BlockingHost<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingHost")
            .field("id_scope", &self.engine.config().id_scope)
            .finish_non_exhaustive()
    }
}

impl<S: BlockingStore, H: dps_core::hub::BlockingHubDirectory> BlockingHost<S, H> {
    /// A blocking host with the system clock and an OS-seeded RNG.
    pub fn new(config: EngineConfig, store: S, hubs: H) -> Result<Self, DpsError> {
        Ok(BlockingHost {
            engine: Engine::new(config)?,
            store,
            hubs,
            clock: Arc::new(SystemClock),
            rng: Mutex::new(Box::new(StdRng::from_entropy())),
            effects: BlockingEffects::default(),
        })
    }

    /// Adds an in-process allocation hook (see [`HostBuilder::allocation_hook`]); the blocking host waits
    /// for its answer on the caller's thread. (The blocking host has no webhook client: [`Webhooks`]
    /// needs the async [`Host`].)
    pub fn with_allocation_hook(mut self, hook: Arc<dyn AllocationHook>) -> Result<Self, DpsError> {
        let mut config = EngineConfig::clone(&self.engine.config());
        config.allocation_hook = true;
        self.engine = Engine::new(config)?;
        self.effects.handlers.allocator = Some(hooks::contained(hook));
        Ok(self)
    }

    /// Adds a certificate issuer (see [`HostBuilder::issuer`]).
    pub fn with_issuer(mut self, issuer: Arc<dyn CertificateIssuer>) -> Result<Self, DpsError> {
        let mut config = EngineConfig::clone(&self.engine.config());
        config.certificate_issuance = true;
        self.engine = Engine::new(config)?;
        self.effects.handlers.issuer = Some(issuer);
        Ok(self)
    }

    /// Replaces the clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the RNG.
    pub fn with_rng(mut self, rng: Box<dyn RngCore + Send>) -> Self {
        self.rng = Mutex::new(rng);
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The hub directory.
    pub fn hubs(&self) -> &H {
        &self.hubs
    }

    /// Runs a device API request to completion and returns its (first) reply.
    pub fn device(&self, request: DeviceRequest) -> Reply {
        let now = self.clock.now();
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.device(now, &mut **rng, request)
        };
        let mut out = None;
        run_blocking_with(&mut flow, &self.store, &self.hubs, &self.effects, &|| self.clock.now(), |r| {
            out = Some(r)
        });
        out.unwrap_or_else(|| Reply::error_plain(&internal("the flow finished without a reply")))
    }

    /// Executes a typed service command under `principal` (see [`Host::command`]).
    pub fn command(&self, principal: &Principal, command: ServiceCommand) -> Reply {
        let now = self.clock.now();
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.command(now, &mut **rng, principal, command)
        };
        let mut out = None;
        run_blocking_with(&mut flow, &self.store, &self.hubs, &self.effects, &|| self.clock.now(), |r| {
            out = Some(r)
        });
        out.unwrap_or_else(|| Reply::error_plain(&internal("the flow finished without a reply")))
    }

    /// Runs an HTTP request (device or service API) to completion and returns its (first) reply.
    pub fn http(&self, request: HttpRequest) -> Reply {
        let mut out = None;
        self.http_with(request, |r| out = Some(r));
        out.unwrap_or_else(|| Reply::error_plain(&internal("the flow finished without a reply")))
    }

    /// Runs an HTTP request, handing its reply to `on_reply` as soon as the flow produces it (an early
    /// `202`), then finishes the flow on this thread before returning.
    pub fn http_with(&self, request: HttpRequest, on_reply: impl FnOnce(Reply)) {
        let now = self.clock.now();
        let mut flow = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            self.engine.http(now, &mut **rng, request)
        };
        run_blocking_with(&mut flow, &self.store, &self.hubs, &self.effects, &|| self.clock.now(), on_reply);
    }
}

/// A `dps-client` device request as an in-process engine request, for running the device client against a
/// host in the same process (demos, tests, a load generator's fixed replies) without a network hop.
pub fn client_request(r: &dps_client::ClientRequest) -> DeviceRequest {
    DeviceRequest {
        id_scope: r.id_scope().clone(),
        registration_id: r.registration_id().clone(),
        call: match &r.kind {
            dps_client::RequestKind::Register => dps_core::DeviceCall::Register { force: false },
            dps_client::RequestKind::OperationStatus(op) => dps_core::DeviceCall::OperationStatus(op.clone()),
        },
        api_version: Some(r.api_version().clone()),
        credential: dps_core::proto::Credential::from_transport(
            Some(r.authorization.clone()).filter(|a| !a.is_empty()),
            None,
        ),
        body: r.body.clone(),
        client_address: None,
    }
}

/// The operation and registration IDs of a poll (what a stuck `assigning` answer names).
fn stuck_poll(request: &DeviceRequest) -> Option<(String, String)> {
    match &request.call {
        DeviceCall::OperationStatus(op) => {
            Some((op.as_str().to_owned(), request.registration_id.as_str().to_owned()))
        }
        _ => None,
    }
}

fn internal(message: &str) -> DpsError {
    DpsError::with_message(dps_core::ErrorCode::InternalError, message)
}
