//! Policy decisions of the DPS engine: which IoT hub a device is allocated to, what happens when a device
//! registers again, and which calls are billable.
//!
//! - [`allocation`]: the candidate hubs of an enrollment (spec §8.1) and the built-in allocation policies
//!   (spec §8.2), with `hashed` as frozen weighted rendezvous hashing;
//! - [`latency`]: lowest-latency allocation: client networks to hub latencies, and the choice;
//! - [`reprovision`]: the reprovisioning decision table (spec §9.2) including the legacy "sticky"
//!   behaviour (spec §9.4);
//! - [`metering`]: billable operations (spec §10.3) and an in-memory meter;
//! - [`throttle`]: rate limits (spec §10.2) as a token bucket fed `now`;
//! - [`fault`]: fault-injection rules (which rule fires for a device request).
//!
//! The crate is pure: it does no I/O, reads no clock or environment, spawns no threads and uses no
//! randomness. Every answer is a deterministic function of the arguments (timestamps are passed in), so
//! the engine can replay and test decisions exactly. Errors are [`dps_proto::DpsError`]s.
#![forbid(unsafe_code)]

pub mod allocation;
pub mod fault;
pub mod latency;
pub mod metering;
pub mod reprovision;
pub mod throttle;

pub use allocation::{allocate, candidate_hubs, LinkedHub};
pub use latency::{lowest_latency, IpNetwork, LatencySource, LatencyTable};
pub use metering::{billable_device_operation, BillableOperation, DeviceOperation, Meter, MeterEvent};
pub use reprovision::{effective_policy, plan, Assignment, ReprovisionPlan, TwinSource};
