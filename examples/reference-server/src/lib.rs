//! The reference DPS server: the `dps-core` engine behind HTTPS (device and service API), MQTT over TLS and
//! MQTT over WebSocket, on the durable SQLite store. The binary `dps-server` runs it; this library holds the
//! pieces so that tests, the load generator and the admin CLI share them.
#![forbid(unsafe_code)]
// The server is a program: it reads the clock, the environment and files, and spawns tasks.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod state;
