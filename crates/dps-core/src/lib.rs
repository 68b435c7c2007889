//! The transport-agnostic DPS engine: device and service flows, typed service commands, and the store and
//! hub-directory contracts (the device side lives in `dps-client`, the embeddable host in `dps-host`).
//!
//! This crate does no I/O, reads no clock, spawns no threads and draws randomness only from an injected
//! [`rand_core::RngCore`]. Requests become [`flow::Flow`] values — small state machines that ask for storage
//! ([`store::StoreOp`]) and hub ([`hub::HubOp`]) work and answer with [`reply::Reply`] values. The
//! drivers in [`flow`] run a flow against blocking or async backends; tests drive flows by hand in virtual
//! time.
//!
//! ```text
//! transport ──DeviceRequest──▶ Engine::device ──▶ DeviceFlow
//!     ▲                                           │ Store(LoadDeviceContext) ─▶ store
//!     │                                           │ attest (dps-attest: VerifiedDevice proof)
//!     │                                           │ plan (dps-policy: allocation + reprovision)
//!     │                                           │ Hub(ReadTwin/UpsertDevice/DeleteDevice) ─▶ hubs
//!     │                                           │ Store(CommitRegistration) ─▶ store (durable)
//!     └──────────────── Reply (202 + Retry-After) ◀┘
//! ```
#![forbid(unsafe_code)]

pub mod audit;
mod ca;
pub mod command;
pub mod config;
pub mod device;
pub mod effect;
pub mod engine;
pub mod flow;
pub mod hub;
pub mod object;
pub mod reply;
pub mod request;
pub mod service;
pub mod store;

pub use audit::{AuditFilter, AuditOperation, AuditRecord, AuditTransport};
pub use command::{Paging, Principal, ServiceCommand};
pub use config::{AccessPolicy, EngineConfig, Rights, OWNER_POLICY};
pub use device::register_meter;
pub use dps_attest as attest;
pub use dps_policy as policy;
pub use dps_policy::{BillableOperation, LinkedHub, Meter, MeterEvent};
pub use dps_proto as proto;
pub use dps_proto::{DpsError, ErrorCode, Timestamp};
pub use effect::{
    AllocationCall, AllocationHook, CertificateIssuer, Effect, EffectError, EffectHandlers, EffectResult,
    Effects, IssueRequest, NoEffects,
};
pub use engine::{DeviceCall, DeviceRequest, Engine, EngineFlow, HttpRequest, ServiceRequest};
pub use flow::{
    finish_async, run_async, run_async_until_reply, run_blocking, run_blocking_with, Flow, Input, Progress,
    Step,
};
pub use reply::Reply;
