//! A symmetric-key device provisioning over HTTPS: [`dps_core::client::RegistrationClient`] driven in real
//! time (honouring Retry-After, reconnecting after transport failures) through an [`HttpsClient`].

use crate::client::{HttpsClient, HttpsConnection};
use crate::state::now;
use crate::ServerError;
use dps_core::client::{ClientAction, ClientConfig, ClientEvent, RegistrationClient};
use dps_core::proto::model::DeviceRegistrationResult;
use std::time::Duration;

/// One exchange, for progress output.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `PUT …/register` or `GET …/operations/…`.
    pub request: String,
    /// The status (0 when the transport failed).
    pub status: u16,
    /// Retry-After, if sent.
    pub retry_after: Option<u32>,
    /// The body (or the transport error).
    pub body: String,
}

/// Registers the device described by `config` through `http` and returns its assignment. `on_exchange` is
/// called after every request (for progress output).
pub async fn provision(
    http: &HttpsClient,
    config: ClientConfig,
    mut on_exchange: impl FnMut(&Exchange),
) -> Result<DeviceRegistrationResult, ServerError> {
    let mut client = RegistrationClient::new(config);
    let mut connection: Option<HttpsConnection> = None;
    let mut action = client.start(now());
    loop {
        action = match action {
            ClientAction::Send(request) => {
                let line = format!("{} {}", request.http_method(), request.http_path_and_query());
                let result = async {
                    let conn = match connection.as_mut() {
                        Some(c) => c,
                        None => connection.insert(http.connect().await?),
                    };
                    conn.send(
                        request.http_method(),
                        &request.http_path_and_query(),
                        &[("authorization", request.authorization.clone())],
                        request.body.clone(),
                    )
                    .await
                }
                .await;
                match result {
                    Ok(response) => {
                        let retry_after =
                            response.header("retry-after").and_then(|v| v.trim().parse::<u32>().ok());
                        on_exchange(&Exchange {
                            request: line,
                            status: response.status,
                            retry_after,
                            body: String::from_utf8_lossy(&response.body).into_owned(),
                        });
                        if response.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                            connection = None;
                        }
                        client.handle(
                            now(),
                            ClientEvent::Response {
                                status: response.status,
                                retry_after,
                                body: response.body,
                            },
                        )
                    }
                    Err(e) => {
                        on_exchange(&Exchange {
                            request: line,
                            status: 0,
                            retry_after: None,
                            body: e.to_string(),
                        });
                        connection = None;
                        client.handle(now(), ClientEvent::TransportFailed)
                    }
                }
            }
            ClientAction::Wait { until } => {
                let nanos = until.unix_nanos().saturating_sub(now().unix_nanos()).max(0);
                tokio::time::sleep(Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))).await;
                client.handle(now(), ClientEvent::TimerFired)
            }
            ClientAction::Assigned(result) => return Ok(*result),
            ClientAction::Failed(e) => {
                return Err(ServerError::Client(format!(
                    "registration failed: status {}, error code {}: {}",
                    e.status, e.code, e.message
                )))
            }
        };
    }
}
