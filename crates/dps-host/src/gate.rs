//! What a request passes before it reaches the engine: fault injection and rate limits (quotas).
//!
//! Both live in the host, not in a transport, so HTTPS, MQTT and AMQP get the same behaviour. The
//! decisions are `dps-policy`'s (a token bucket fed `now`, the first fault rule whose roll passes); the
//! counters, the buckets, the RNG of the rolls and the "stuck assigning" deadlines are kept here.

use dps_core::proto::model::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};
use dps_core::{DeviceCall, DeviceRequest, DpsError, ErrorCode, Timestamp};
use dps_policy::fault::{self, FaultAction, FaultKind, FaultRule, RequestKind};
use dps_policy::throttle::{Bucket, Rate};
use rand_core::RngCore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Rate limits of a host (spec §10.2). Each is off when `None`; [`Quotas::default`] turns all off,
/// [`Quotas::azure`] gives Azure's S1 numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Device registrations (register and registration status lookup) per instance.
    pub registrations: Option<Rate>,
    /// Operation-status polls per device.
    pub polls_per_device: Option<Rate>,
    /// Service API operations per instance.
    pub service_operations: Option<Rate>,
    /// The most devices whose poll buckets are remembered at once (at least 1). When a new device would
    /// exceed it, buckets that refilled (they carry no information) are forgotten; if every bucket is still
    /// in use, all are (the devices start with full buckets again) rather than growing without bound.
    pub max_tracked_devices: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas::none()
    }
}

/// The default of [`Quotas::max_tracked_devices`].
pub const DEFAULT_TRACKED_DEVICES: usize = 100_000;

impl Quotas {
    /// No rate limit at all.
    pub const fn none() -> Quotas {
        Quotas {
            registrations: None,
            polls_per_device: None,
            service_operations: None,
            max_tracked_devices: DEFAULT_TRACKED_DEVICES,
        }
    }

    /// Azure's S1 limits (spec §10.2, the 2024-2026 limits page): 1,000 registrations a minute, 1,000
    /// service operations a minute, 5 operation-status polls per device per 10 seconds.
    pub fn azure() -> Quotas {
        Quotas {
            registrations: Rate::per_minute(1000),
            polls_per_device: Rate::new(5, 10),
            service_operations: Rate::per_minute(1000),
            max_tracked_devices: DEFAULT_TRACKED_DEVICES,
        }
    }

    fn is_none(&self) -> bool {
        self.registrations.is_none() && self.polls_per_device.is_none() && self.service_operations.is_none()
    }
}

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`Quotas::registrations`].
    Registrations,
    /// [`Quotas::polls_per_device`].
    PollsPerDevice,
    /// [`Quotas::service_operations`].
    ServiceOperations,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Limit; 3] = [Limit::Registrations, Limit::PollsPerDevice, Limit::ServiceOperations];

    /// The metric label: `registrations`, `operation_status`, `service_operations`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Registrations => "registrations",
            Limit::PollsPerDevice => "operation_status",
            Limit::ServiceOperations => "service_operations",
        }
    }
}

/// How often each limit refused a request, and each kind of fault was injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Refusals by [`Limit`], in [`Limit::ALL`] order.
    pub throttled: [u64; 3],
    /// Injections by [`FaultKind`], in [`FaultKind::ALL`] order.
    pub faults: [u64; 5],
}

impl GateCounts {
    /// The refusals of one limit.
    pub fn throttled(&self, limit: Limit) -> u64 {
        self.throttled[limit as usize]
    }

    /// The injections of one fault kind.
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults[kind.index()]
    }
}

/// A fault rule with how often it has fired.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultStatus {
    /// The rule.
    pub rule: FaultRule,
    /// How many requests it fired on.
    pub fired: u64,
}

/// What the gate decided for a request.
pub(crate) enum Decision {
    /// Run it (after `delay_ms`); `stuck` says its final answer is to be shown as `assigning`.
    Run { delay_ms: u32, stuck: bool },
    /// Answer this without running it.
    Refuse { error: DpsError, drop: bool },
}

const RUN: Decision = Decision::Run { delay_ms: 0, stuck: false };

#[derive(Default)]
struct FaultSet {
    rules: Vec<FaultRule>,
    fired: Vec<u64>,
    /// Registrations whose polls answer `assigning`: registration key → (rule ID, until; None = forever).
    stuck: HashMap<String, (String, Option<Timestamp>)>,
}

/// The most registrations held stuck at once.
const MAX_STUCK: usize = 100_000;

pub(crate) struct Gate {
    quotas: Quotas,
    registrations: Mutex<Bucket>,
    service: Mutex<Bucket>,
    polls: Mutex<HashMap<String, Bucket>>,
    faults: Mutex<FaultSet>,
    /// Whether any rule or stuck registration exists (checked before taking the lock).
    faults_active: AtomicBool,
    rng: Mutex<Box<dyn RngCore + Send>>,
    throttled: [AtomicU64; 3],
    injected: [AtomicU64; 5],
}

fn kind_of(call: &DeviceCall) -> Option<RequestKind> {
    match call {
        DeviceCall::Register { .. } => Some(RequestKind::Register),
        DeviceCall::OperationStatus(_) => Some(RequestKind::Poll),
        DeviceCall::StatusLookup => Some(RequestKind::StatusLookup),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gate {
    pub(crate) fn new(quotas: Quotas, rules: Vec<FaultRule>, rng: Box<dyn RngCore + Send>) -> Gate {
        let fired = vec![0; rules.len()];
        let active = !rules.is_empty();
        Gate {
            quotas: Quotas { max_tracked_devices: quotas.max_tracked_devices.max(1), ..quotas },
            registrations: Mutex::new(Bucket::default()),
            service: Mutex::new(Bucket::default()),
            polls: Mutex::new(HashMap::new()),
            faults: Mutex::new(FaultSet { rules, fired, stuck: HashMap::new() }),
            faults_active: AtomicBool::new(active),
            rng: Mutex::new(rng),
            throttled: Default::default(),
            injected: Default::default(),
        }
    }

    pub(crate) fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Faults first (they are what the operator asked for), then the rate limits.
    pub(crate) fn device(&self, request: &DeviceRequest, now: Timestamp) -> Decision {
        let Some(kind) = kind_of(&request.call) else {
            return RUN;
        };
        let decision = if self.faults_active.load(Ordering::Relaxed) {
            self.fault(request.registration_id.key(), kind, now)
        } else {
            RUN
        };
        if let Decision::Refuse { .. } = decision {
            return decision;
        }
        match self.throttle_device(request.registration_id.key(), kind, now) {
            Some(error) => Decision::Refuse { error, drop: false },
            None => decision,
        }
    }

    /// The service API's rate limit.
    pub(crate) fn service(&self, now: Timestamp) -> Option<DpsError> {
        let rate = self.quotas.service_operations?;
        self.take(&self.service, &rate, now, Limit::ServiceOperations)
    }

    /// Whether the rate limits allow the request (None) or the refusal.
    pub(crate) fn throttle_device(&self, key: &str, kind: RequestKind, now: Timestamp) -> Option<DpsError> {
        if self.quotas.is_none() {
            return None;
        }
        match kind {
            RequestKind::Register | RequestKind::StatusLookup => {
                let rate = self.quotas.registrations?;
                self.take(&self.registrations, &rate, now, Limit::Registrations)
            }
            RequestKind::Poll => {
                let rate = self.quotas.polls_per_device?;
                let mut polls = lock(&self.polls);
                let refused = match polls.get_mut(key) {
                    Some(bucket) => bucket.take(&rate, now).err(),
                    None => {
                        if polls.len() >= self.quotas.max_tracked_devices {
                            polls.retain(|_, b| !b.is_full(now));
                            if polls.len() >= self.quotas.max_tracked_devices {
                                // Every bucket is in use: start over rather than grow without bound.
                                polls.clear();
                            }
                        }
                        let mut bucket = Bucket::default();
                        let refused = bucket.take(&rate, now).err();
                        polls.insert(key.to_owned(), bucket);
                        refused
                    }
                };
                drop(polls);
                refused.map(|t| self.refusal(Limit::PollsPerDevice, &rate, t.retry_after_secs()))
            }
        }
    }

    fn take(&self, bucket: &Mutex<Bucket>, rate: &Rate, now: Timestamp, limit: Limit) -> Option<DpsError> {
        let refused = lock(bucket).take(rate, now).err()?;
        Some(self.refusal(limit, rate, refused.retry_after_secs()))
    }

    fn refusal(&self, limit: Limit, rate: &Rate, retry_after: u32) -> DpsError {
        self.throttled[limit as usize].fetch_add(1, Ordering::Relaxed);
        let what = match limit {
            Limit::Registrations => "device registrations of this instance",
            Limit::PollsPerDevice => "operation-status polls of this device",
            Limit::ServiceOperations => "service operations of this instance",
        };
        DpsError::with_message(
            ErrorCode::Throttled,
            format!(
                "Too many requests: the {what} are limited to {} per {} s; retry after {retry_after} s.",
                rate.limit(),
                rate.window_secs()
            ),
        )
        .retry_after(retry_after)
    }

    fn roll(&self) -> f64 {
        // 53 random bits: uniform in 0.0..1.0.
        (lock(&self.rng).next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fault(&self, key: &str, kind: RequestKind, now: Timestamp) -> Decision {
        let mut set = lock(&self.faults);
        let mut stuck = false;
        if kind == RequestKind::Poll {
            if let Some((rule, until)) = set.stuck.get(key) {
                let rule_exists = set.rules.iter().any(|r| &r.id == rule);
                if rule_exists && until.is_none_or(|u| now < u) {
                    stuck = true;
                } else {
                    set.stuck.remove(key);
                    self.refresh_active(&set);
                }
            }
        }
        let FaultSet { rules, fired, .. } = &*set;
        let Some(i) = fault::choose(rules, fired, key, kind, || self.roll()) else {
            return Decision::Run { delay_ms: 0, stuck };
        };
        set.fired[i] += 1;
        let rule = &set.rules[i];
        let action = rule.action.clone();
        let id = rule.id.clone();
        self.injected[action.kind().index()].fetch_add(1, Ordering::Relaxed);
        let injected = |code: ErrorCode, what: &str| {
            DpsError::with_message(code, format!("Fault injected by rule '{id}': {what}."))
        };
        match action {
            FaultAction::Throttle { retry_after_secs } => Decision::Refuse {
                error: injected(
                    ErrorCode::Throttled,
                    &format!("throttled, retry after {retry_after_secs} s"),
                )
                .retry_after(retry_after_secs),
                drop: false,
            },
            FaultAction::Error { code } => {
                Decision::Refuse { error: injected(code, code.message().trim_end_matches('.')), drop: false }
            }
            FaultAction::DropConnection => Decision::Refuse {
                error: injected(ErrorCode::ServiceUnavailable, "the connection is dropped"),
                drop: true,
            },
            FaultAction::Latency { millis } => Decision::Run { delay_ms: millis, stuck },
            FaultAction::StuckAssigning { secs } => {
                if set.stuck.len() < MAX_STUCK || set.stuck.contains_key(key) {
                    let until = secs
                        .map(|s| Timestamp::from_unix_nanos(now.unix_nanos() + i64::from(s) * 1_000_000_000));
                    set.stuck.insert(key.to_owned(), (id, until));
                }
                Decision::Run { delay_ms: 0, stuck: false }
            }
        }
    }

    fn refresh_active(&self, set: &FaultSet) {
        self.faults_active.store(!set.rules.is_empty() || !set.stuck.is_empty(), Ordering::Relaxed);
    }

    pub(crate) fn add_fault(&self, rule: FaultRule) -> Result<(), DpsError> {
        rule.validate().map_err(|e| {
            DpsError::with_message(ErrorCode::BadRequest, format!("fault rule '{}': {}", rule.id, e.message))
        })?;
        let mut set = lock(&self.faults);
        if set.rules.iter().any(|r| r.id == rule.id) {
            return Err(DpsError::with_message(
                ErrorCode::Conflict,
                format!("a fault rule named '{}' exists already", rule.id),
            ));
        }
        set.rules.push(rule);
        set.fired.push(0);
        self.refresh_active(&set);
        Ok(())
    }

    pub(crate) fn remove_fault(&self, id: &str) -> bool {
        let mut set = lock(&self.faults);
        let Some(i) = set.rules.iter().position(|r| r.id == id) else {
            return false;
        };
        set.rules.remove(i);
        set.fired.remove(i);
        set.stuck.retain(|_, (rule, _)| rule != id);
        self.refresh_active(&set);
        true
    }

    pub(crate) fn faults(&self) -> Vec<FaultStatus> {
        let set = lock(&self.faults);
        set.rules
            .iter()
            .zip(&set.fired)
            .map(|(rule, &fired)| FaultStatus { rule: rule.clone(), fired })
            .collect()
    }

    pub(crate) fn counts(&self) -> GateCounts {
        let mut c = GateCounts::default();
        for (out, n) in c.throttled.iter_mut().zip(&self.throttled) {
            *out = n.load(Ordering::Relaxed);
        }
        for (out, n) in c.faults.iter_mut().zip(&self.injected) {
            *out = n.load(Ordering::Relaxed);
        }
        c
    }
}

/// The `202 assigning` a stuck registration's poll answers instead of its result.
pub(crate) fn assigning_body(operation_id: &str, registration_id: &str) -> RegistrationOperationStatus {
    RegistrationOperationStatus {
        operation_id: operation_id.to_owned(),
        status: RegistrationStatus::Assigning,
        registration_state: Some(DeviceRegistrationResult::minimal(
            registration_id,
            RegistrationStatus::Assigning,
        )),
    }
}
