//! A symmetric-key device provisioning with the [`dps_client`] crate: its state machine driven in real
//! time (honouring Retry-After, reconnecting after transport failures) over its HTTPS or MQTT transport,
//! to the endpoint of an [`HttpsClient`].

use crate::client::HttpsClient;
use crate::ServerError;
use dps_client::{ClientConfig, ProvisionError, Transport};
use dps_core::proto::model::DeviceRegistrationResult;

/// One exchange, for progress output.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `PUT …/register`, `GET …/operations/…` or the MQTT topic.
    pub request: String,
    /// The status (0 when the transport failed).
    pub status: u16,
    /// Retry-After, if sent.
    pub retry_after: Option<u32>,
    /// The body (or the transport error).
    pub body: String,
}

/// Registers the device described by `config` over HTTPS to the endpoint of `http` and returns its
/// assignment. `on_exchange` is called after every request (for progress output).
pub async fn provision(
    http: &HttpsClient,
    config: ClientConfig,
    on_exchange: impl FnMut(&Exchange),
) -> Result<DeviceRegistrationResult, ServerError> {
    provision_over(http, Transport::Https, config, on_exchange).await
}

/// [`provision`] over either transport (`http` gives the address, server name and trust roots; for MQTT
/// its address is the MQTT listener's).
pub async fn provision_over(
    http: &HttpsClient,
    transport: Transport,
    config: ClientConfig,
    mut on_exchange: impl FnMut(&Exchange),
) -> Result<DeviceRegistrationResult, ServerError> {
    let result = dps_client::provision_with(config, http.device_connector(), transport, |x| {
        on_exchange(&match &x.outcome {
            Ok(r) => Exchange {
                request: x.request.clone(),
                status: r.status,
                retry_after: r.retry_after,
                body: String::from_utf8_lossy(&r.body).into_owned(),
            },
            Err(e) => {
                Exchange { request: x.request.clone(), status: 0, retry_after: None, body: e.to_string() }
            }
        })
    })
    .await;
    match result {
        Ok(p) => Ok(p.registration),
        Err(ProvisionError::Registration(e)) => Err(ServerError::Client(format!(
            "registration failed: status {}, error code {}: {}",
            e.status, e.code, e.message
        ))),
        Err(e) => Err(ServerError::Client(format!("registration failed: {e}"))),
    }
}
