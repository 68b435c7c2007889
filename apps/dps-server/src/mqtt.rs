//! The server's [`dps_mqtt::DeviceHandler`]: MQTT (over TLS or WebSocket) device requests run through the
//! shared engine and are counted in the metrics.

use crate::metrics::{Api, Transport};
use crate::state::{now, AppState};
use dps_core::proto::id::format_uuid;
use dps_core::{DeviceCall, DeviceRequest, DpsError, Reply};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Runs MQTT device requests on the server's [`AppState`].
#[derive(Debug, Clone)]
pub struct DeviceApi {
    state: Arc<AppState>,
    transport: Transport,
    /// The client address of the connection, for the failed-authentication limiter ([`crate::throttle`]).
    peer: Option<IpAddr>,
}

impl DeviceApi {
    /// A handler counting its requests under `transport` (`Mqtt` or `WebSocket`).
    pub fn new(state: Arc<AppState>, transport: Transport) -> Self {
        DeviceApi { state, transport, peer: None }
    }

    /// This handler for one connection from `peer`: its failed authentications count against the address,
    /// and while the address is throttled its requests are answered `429001` (an MQTT CONNECT: CONNACK 3)
    /// without checking their credential.
    pub fn for_peer(&self, peer: IpAddr) -> Self {
        DeviceApi { state: Arc::clone(&self.state), transport: self.transport, peer: Some(peer) }
    }
}

impl dps_mqtt::DeviceHandler for DeviceApi {
    fn handle(&self, mut request: DeviceRequest) -> impl Future<Output = Reply> + Send {
        let state = Arc::clone(&self.state);
        let transport = self.transport;
        let peer = self.peer;
        request.client_address = request.client_address.or(peer);
        async move {
            let register = matches!(request.call, DeviceCall::Register { .. });
            let started = Instant::now();
            let throttled = peer.and_then(|ip| state.throttled(ip));
            let reply = match throttled {
                Some(reply) => reply,
                None => state.run_device(request).await,
            };
            if let Some(ip) = peer {
                state.note_auth_outcome(ip, &reply);
            }
            if register {
                let code = reply.error_code.map(|c| c.code());
                state.metrics.registration(transport, reply.status, code, started.elapsed());
            }
            state.metrics.request(Api::Device, reply.status);
            if reply.status >= 500 {
                tracing::warn!(transport = transport.label(), status = reply.status,
                    error_code = ?reply.error_code.map(|c| c.code()), tracking_id = %reply.tracking_id,
                    "MQTT request failed");
            }
            reply
        }
    }

    fn error_reply(&self, error: &DpsError) -> Reply {
        self.state.metrics.request(Api::Device, error.code.http_status());
        Reply::error(error, format_uuid(self.state.random16()), now())
    }
}
