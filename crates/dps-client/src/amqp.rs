//! The AMQP 1.0 transport (feature `amqp`; `fe2o3-amqp`'s client over this crate's TLS stream), as the
//! Azure SDKs speak it (spec §3): SASL PLAIN with authcid `{scope}/registrations/{id}` and the SAS token as
//! password (no SASL layer for X.509 devices, whose TLS client certificate authenticates), one session
//! with a sender and a receiver link at `{scope}/registrations/{id}`, then one message per request
//! (application property `iotdps-operation-type`, a fresh correlation-id, the JSON in a `data` section) and
//! the response matching its correlation-id. A rejected outcome carries the service's JSON error.
//!
//! The message helpers ([`request_message`], [`response_to_raw`], [`rejection_to_raw`]) are public so that
//! a caller with its own connection handling (a load generator) speaks exactly the same messages.

use crate::machine::{ClientRequest, RequestKind};
use crate::{Connector, ProvisionError, RawResponse};
use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{Error as AmqpError, Fields};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::types::sasl::SaslCode;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_json::Value as Json;

pub use fe2o3_amqp;

/// The link address of a request's device: `{idScope}/registrations/{registrationId}`.
pub fn link_address(request: &ClientRequest) -> String {
    format!("{}/registrations/{}", request.id_scope().as_str(), request.registration_id().as_str())
}

/// The attach properties the SDKs send: `com.microsoft:api-version` (and the client version).
pub fn attach_properties(request: &ClientRequest, client_version: &str) -> Fields {
    let mut fields = Fields::new();
    fields.insert(
        Symbol::from("com.microsoft:api-version"),
        Value::String(request.api_version().as_str().to_owned()),
    );
    fields.insert(Symbol::from("com.microsoft:client-version"), Value::String(client_version.to_owned()));
    fields
}

/// The message of a request: `iotdps-operation-type` (and `iotdps-operation-id` for a poll), the given
/// correlation-id, and the JSON body in a `data` section (empty for a poll).
pub fn request_message(request: &ClientRequest, correlation_id: &str) -> Message<Data> {
    let props = match &request.kind {
        RequestKind::Register => ApplicationProperties::builder()
            .insert("iotdps-operation-type", SimpleValue::String("iotdps-register".into()))
            .insert("iotdps-forceRegistration", SimpleValue::Bool(false)),
        RequestKind::OperationStatus(op) => ApplicationProperties::builder()
            .insert("iotdps-operation-type", SimpleValue::String("iotdps-get-operationstatus".into()))
            .insert("iotdps-operation-id", SimpleValue::String(op.as_str().to_owned())),
    };
    Message::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::String(correlation_id.to_owned())),
            ..Properties::default()
        })
        .application_properties(props.build())
        .data(Binary::from(request.body.clone()))
        .build()
}

fn seconds(value: &SimpleValue) -> Option<u32> {
    match value {
        SimpleValue::Int(i) => u32::try_from(*i).ok(),
        SimpleValue::Long(i) => u32::try_from(*i).ok(),
        SimpleValue::Uint(i) => Some(*i),
        SimpleValue::Ulong(i) => u32::try_from(*i).ok(),
        SimpleValue::Ushort(i) => Some(u32::from(*i)),
        SimpleValue::Ubyte(i) => Some(u32::from(*i)),
        SimpleValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A response message as the state machine's [`RawResponse`]: AMQP responses carry no status code, so an
/// `assigning` body is `202` and any other `200`; Retry-After from `retry-after` (or `Retry-After`).
pub fn response_to_raw(message: &Message<Body<Value>>) -> Result<RawResponse, ProvisionError> {
    let body = match &message.body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect::<Vec<u8>>(),
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => b.to_vec(),
            Value::String(s) => s.as_bytes().to_vec(),
            other => {
                return Err(ProvisionError::Transport(format!("the response body is {other:?}, not JSON")))
            }
        },
        _ => return Err(ProvisionError::Transport("the response has no data section".into())),
    };
    let json: Json = serde_json::from_slice(&body)
        .map_err(|e| ProvisionError::Transport(format!("the response body is not JSON: {e}")))?;
    let status = if json.get("status").and_then(Json::as_str) == Some("assigning") { 202 } else { 200 };
    let props = message.application_properties.as_ref();
    let retry_after =
        props.and_then(|p| p.0.get("retry-after").or_else(|| p.0.get("Retry-After"))).and_then(seconds);
    Ok(RawResponse { status, retry_after, body })
}

/// A rejected outcome as a [`RawResponse`]: the description is the service's JSON error body, its
/// `errorCode / 1000` the status; Retry-After from the info.
pub fn rejection_to_raw(error: Option<&AmqpError>) -> RawResponse {
    let description = error.and_then(|e| e.description.clone()).unwrap_or_default();
    let code = serde_json::from_str::<Json>(&description).ok().and_then(|j| j.get("errorCode")?.as_u64());
    let status =
        code.and_then(|c| u16::try_from(c / 1000).ok()).filter(|s| (400..600).contains(s)).unwrap_or(500);
    let retry_after = error
        .and_then(|e| e.info.as_ref())
        .and_then(|info| info.get(&Symbol::from("Retry-After")))
        .and_then(|v| match v {
            Value::Int(i) => u32::try_from(*i).ok(),
            Value::Long(i) => u32::try_from(*i).ok(),
            Value::Uint(i) => Some(*i),
            Value::Ulong(i) => u32::try_from(*i).ok(),
            _ => None,
        });
    RawResponse { status, retry_after, body: description.into_bytes() }
}

/// The SASL outcome of a failed open as the error the state machine understands.
fn open_error(e: OpenError) -> ProvisionError {
    match e {
        OpenError::SaslError { code: SaslCode::Auth, .. } => ProvisionError::Refused {
            status: 401,
            reason: "SASL outcome auth: the SAS token was refused".into(),
        },
        OpenError::SaslError { code: SaslCode::SysTemp, .. } => {
            ProvisionError::Refused { status: 503, reason: "SASL outcome sys-temp".into() }
        }
        other => ProvisionError::Transport(format!("AMQP open: {other}")),
    }
}

/// An open AMQP connection of one device: its session and two links.
#[derive(Debug)]
pub struct AmqpSession {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
    next_correlation: u64,
}

impl AmqpSession {
    /// Opens the AMQP connection on an already secured `stream` for the device of `request`: SASL PLAIN
    /// with its SAS token when it has one (none for X.509), a session, the sender and receiver links.
    pub async fn open<S>(
        stream: S,
        request: &ClientRequest,
        host: &str,
        client_version: &str,
    ) -> Result<AmqpSession, ProvisionError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let address = link_address(request);
        let builder = Connection::builder().container_id(request.registration_id().as_str()).hostname(host);
        let mut connection = if request.authorization.is_empty() {
            builder.open_with_stream(stream).await
        } else {
            builder
                .sasl_profile(SaslProfile::Plain {
                    username: address.clone(),
                    password: request.authorization.clone(),
                })
                .open_with_stream(stream)
                .await
        }
        .map_err(open_error)?;
        let link = |e: &dyn std::fmt::Display| ProvisionError::Transport(format!("AMQP: {e}"));
        let mut session = Session::begin(&mut connection).await.map_err(|e| link(&e))?;
        let receiver = Receiver::builder()
            .name("recv_link")
            .source(address.as_str())
            .properties(attach_properties(request, client_version))
            .attach(&mut session)
            .await
            .map_err(|e| link(&e))?;
        let sender = Sender::builder()
            .name("sender_link")
            .target(address.as_str())
            .properties(attach_properties(request, client_version))
            .attach(&mut session)
            .await
            .map_err(|e| link(&e))?;
        Ok(AmqpSession { connection, session, sender, receiver, next_correlation: 0 })
    }

    /// Sends one request and reads its response (or its rejection).
    pub async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let broken = |e: &dyn std::fmt::Display| ProvisionError::Transport(format!("AMQP: {e}"));
        self.next_correlation += 1;
        let correlation = self.next_correlation.to_string();
        match self.sender.send(request_message(request, &correlation)).await.map_err(|e| broken(&e))? {
            Outcome::Accepted(_) => {}
            Outcome::Rejected(rejected) => return Ok(rejection_to_raw(rejected.error.as_ref())),
            other => return Err(ProvisionError::Transport(format!("AMQP: the request was {other:?}"))),
        }
        loop {
            let delivery = self.receiver.recv::<Body<Value>>().await.map_err(|e| broken(&e))?;
            self.receiver.accept(&delivery).await.map_err(|e| broken(&e))?;
            let message = delivery.into_message();
            let ours = message.properties.as_ref().and_then(|p| p.correlation_id.as_ref());
            // A response to an earlier request (a duplicate): the SDKs match on correlation-id.
            if ours.is_some_and(|id| *id != MessageId::String(correlation.clone())) {
                continue;
            }
            return response_to_raw(&message);
        }
    }

    /// Detaches the links, ends the session and closes the connection.
    pub async fn close(mut self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

/// One device's AMQP connection with the service; connects (SASL PLAIN with the first request's SAS
/// token, or no SASL for X.509) on the first request and again after a failure.
#[derive(Debug)]
pub struct AmqpTransport {
    connector: Connector,
    session: Option<AmqpSession>,
}

impl AmqpTransport {
    /// A transport that connects on the first request.
    pub fn new(connector: Connector) -> AmqpTransport {
        AmqpTransport { connector, session: None }
    }

    /// Sends `request` and reads its response.
    pub async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let session = match self.session.as_mut() {
            Some(s) => s,
            None => {
                let stream = self.connector.connect().await?;
                let host = self.connector.server_name();
                self.session.insert(AmqpSession::open(stream, request, &host, crate::USER_AGENT).await?)
            }
        };
        let result = session.exchange(request).await;
        if result.is_err() {
            if let Some(session) = self.session.take() {
                session.close().await;
            }
        }
        result
    }

    /// Closes the connection, if one is open.
    pub async fn close(&mut self) {
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::{AmqpError as Condition, ErrorCondition};
    use fe2o3_amqp::types::messaging::AmqpValue;

    fn message(body: &str, props: &[(&str, SimpleValue)]) -> Message<Body<Value>> {
        let mut b = ApplicationProperties::builder();
        for (k, v) in props {
            b = b.insert(*k, v.clone());
        }
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: Some(b.build()),
            body: Body::Data(vec![Data(Binary::from(body.as_bytes().to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn responses_become_statuses_by_their_json() {
        let r =
            response_to_raw(&message(r#"{"status":"assigning"}"#, &[("retry-after", SimpleValue::Int(3))]))
                .unwrap();
        assert_eq!((r.status, r.retry_after), (202, Some(3)));
        let r = response_to_raw(&message(
            r#"{"status":"assigned"}"#,
            &[("Retry-After", SimpleValue::String("2".into()))],
        ))
        .unwrap();
        assert_eq!((r.status, r.retry_after), (200, Some(2)));
        assert!(response_to_raw(&message("not json", &[])).is_err());
        let mut m = message("{}", &[]);
        m.body = Body::Value(AmqpValue(Value::Int(1)));
        assert!(response_to_raw(&m).is_err());
    }

    #[test]
    fn rejections_carry_the_service_error() {
        let mut info = Fields::new();
        info.insert(Symbol::from("Retry-After"), Value::Int(5));
        let e = AmqpError {
            condition: ErrorCondition::AmqpError(Condition::ResourceLimitExceeded),
            description: Some(r#"{"errorCode":429001,"message":"slow down"}"#.into()),
            info: Some(Box::new(info)),
        };
        let r = rejection_to_raw(Some(&e));
        assert_eq!((r.status, r.retry_after), (429, Some(5)));
        assert_eq!(rejection_to_raw(None).status, 500);
    }
}
