//! AMQP 1.0 over TLS with `dps-client`'s AMQP session (`fe2o3-amqp`'s client over our own TLS stream). A
//! device does what the Azure SDKs do: SASL PLAIN with authcid `{scope}/registrations/{id}` and the SAS
//! token, one session with a receiver and a sender link at `{scope}/registrations/{id}`, then one message
//! per request (register, then status polls) and the response with its correlation-id; finally it
//! detaches, ends the session and closes the connection.

use crate::device::{drive, Assignment, DriveOptions, Exchange, Progress, RawResponse, Target};
use crate::https::USER_AGENT;
use crate::stats::{Failure, Incident};
use crate::x509::DeviceIdentity;
use dps_client::amqp::AmqpSession;
use dps_client::{ClientAction, ClientRequest, ProvisionError, RegistrationClient};
use std::time::Instant;

/// A device's AMQP connection.
struct AmqpDevice(AmqpSession);

fn incident(e: ProvisionError) -> Incident {
    match e {
        // SASL outcome `auth` (a refused SAS): counted like an MQTT CONNACK refusal.
        ProvisionError::Refused { status: 401, reason } => Incident::new(Failure::Code(401_000), reason),
        ProvisionError::Refused { status, reason } => {
            Incident::new(Failure::Code(u32::from(status) * 1000), reason)
        }
        other => Incident::new(Failure::Connection, other.to_string()),
    }
}

impl Exchange for AmqpDevice {
    async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, Incident> {
        let r = self.0.exchange(request).await.map_err(incident)?;
        Ok(RawResponse { status: r.status, retry_after: r.retry_after, body: r.body })
    }
}

/// One device's registration over a fresh AMQP-over-TLS connection.
pub(crate) async fn register(
    target: &Target,
    identity: Option<&DeviceIdentity>,
    client: &mut RegistrationClient,
    options: &DriveOptions,
    progress: &mut Progress,
    start: Instant,
) -> Result<Assignment, Incident> {
    let first = client.start(crate::device::now());
    let ClientAction::Send(request) = &first else {
        return Err(Incident::new(Failure::Protocol, "the client did not start with a request"));
    };
    let tls = crate::https::connect_tls(target, identity).await?;
    progress.handshake = Some(start.elapsed());
    progress.tls = Some(crate::https::tls_parameters(tls.get_ref().1));
    let host = target.server_name.to_str().into_owned();
    let session = AmqpSession::open(tls, request, &host, USER_AGENT).await.map_err(incident)?;
    let mut device = AmqpDevice(session);
    let outcome = drive(&mut device, client, first, options, progress).await;
    device.0.close().await;
    outcome
}
