//! One AMQP connection: protocol header, SASL (or not), then sessions and links driven by `fe2o3-amqp`'s
//! acceptor, with requests handed to the [`DeviceHandler`].

use crate::address::{normalize_address, LinkAddress};
use crate::io::Io;
use crate::message::{link_refusal, parse_request, rejection, response_message};
use crate::sasl::{self, Identity};
use crate::{AmqpError, AmqpLimits, DeviceHandler};
use dps_core::proto::{ApiVersion, Credential};
use dps_core::{DeviceRequest, DpsError, ErrorCode, Reply};
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle, ListenerSessionHandle,
    SessionAcceptor,
};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{LinkStateError, RecvError};
use fe2o3_amqp::types::definitions::{AmqpError as Condition, Error as AmqpErrorFrame, ErrorCondition, Role};
use fe2o3_amqp::types::messaging::{Body, Data, Message, MessageId, Source, Target, TargetArchetype};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Delivery, Receiver, Sender};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

/// The SASL protocol header (`AMQP 3 1 0 0`).
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The plain AMQP protocol header (`AMQP 0 1 0 0`).
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// How long a close may wait for the peer's answer, and the sessions of a closed connection for their
/// requests to be disposed of; a peer that never answers is then left to the engine's idle limit.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The attach property with the device's api-version.
const API_VERSION_PROPERTY: &str = "com.microsoft:api-version";

/// `fe2o3-amqp`'s link acceptor with its default (no dynamic) terminus handlers.
type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// What the sessions of one connection share.
struct Shared<H> {
    handler: Arc<H>,
    identity: Identity,
    client_certificates: Option<Vec<Vec<u8>>>,
    link_credit: u32,
    max_message_bytes: u64,
    activity: Activity,
}

/// When the connection last made a request, and how many are being answered (the idle deadline applies
/// only while none is).
struct Activity {
    last: Mutex<Instant>,
    busy: AtomicUsize,
}

impl Activity {
    fn begin(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.touch();
    }

    fn end(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
        self.touch();
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves one connection to its end.
pub(crate) async fn run<S, H>(
    mut io: Io<S>,
    handler: Arc<H>,
    limits: &AmqpLimits,
    client_certificates: Option<Vec<Vec<u8>>>,
) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: DeviceHandler,
{
    let has_certificate = client_certificates.as_ref().is_some_and(|c| !c.is_empty());
    let handshake = async {
        let mut header = [0u8; 8];
        let mut read = 0;
        while read < header.len() {
            let n = io.read(&mut header[read..]).await?;
            if n == 0 {
                return Ok(None);
            }
            read += n;
            // Refuse garbage as soon as it cannot be a header, without waiting for eight bytes.
            if !b"AMQP"[..read.min(4)].eq(&header[..read.min(4)]) {
                break;
            }
        }
        let header = &header[..read];
        io.unread(header);
        let (io, identity) = if header == SASL_HEADER {
            sasl::negotiate(io, handler.as_ref(), has_certificate).await?
        } else if header == AMQP_HEADER {
            (io, Identity::Transport)
        } else {
            // AMQP 1.0 §2.2: answer with a header this server speaks, then close.
            let mut io = io;
            let _ = io.write_all(&SASL_HEADER).await;
            let _ = io.shutdown().await;
            return Err(AmqpError::ProtocolHeader(header.to_vec()));
        };
        let mut acceptor = ConnectionAcceptor::builder()
            .container_id("dps-rs")
            .max_frame_size(limits.max_frame_bytes)
            .build();
        let idle = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
        if idle > 0 {
            acceptor.local_open.idle_time_out = Some(idle);
        }
        let connection = acceptor.accept(io).await.map_err(|e| AmqpError::Open(e.to_string()))?;
        Ok::<_, AmqpError>(Some((connection, identity)))
    };
    let (mut connection, identity) = match timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(Some(opened))) => opened,
        // The client closed before sending a whole header: nothing to answer.
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(AmqpError::HandshakeTimeout(limits.handshake_timeout)),
    };

    let shared = Arc::new(Shared {
        handler,
        identity,
        client_certificates,
        link_credit: limits.link_credit.max(1),
        max_message_bytes: limits.max_message_bytes,
        activity: Activity { last: Mutex::new(Instant::now()), busy: AtomicUsize::new(0) },
    });
    let result = serve(&mut connection, &shared, limits.request_idle_timeout).await;
    let _ = timeout(CLOSE_GRACE, connection.close()).await;
    result
}

/// Accepts sessions until the connection ends; each session runs alongside.
async fn serve<H: DeviceHandler>(
    connection: &mut ListenerConnectionHandle,
    shared: &Arc<Shared<H>>,
    idle: Duration,
) -> Result<(), AmqpError> {
    let session_acceptor = SessionAcceptor::new();
    let mut sessions = FuturesUnordered::new();
    let mut outcome = Ok(());
    loop {
        let deadline = (!idle.is_zero() && shared.activity.busy.load(Ordering::SeqCst) == 0)
            .then(|| shared.activity.last().checked_add(idle))
            .flatten();
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match session_acceptor.accept_incoming_session(incoming, connection).await {
                    Ok(session) => sessions.push(serve_session(session, Arc::clone(shared))),
                    Err(e) => {
                        outcome = Err(AmqpError::Protocol(format!("begin: {e}")));
                        break;
                    }
                }
            }
            Some(result) = sessions.next(), if !sessions.is_empty() => {
                if let Err(e) = result {
                    outcome = Err(e);
                    break;
                }
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if shared.activity.busy.load(Ordering::SeqCst) == 0
                    && shared.activity.last().checked_add(idle).is_some_and(|d| d <= Instant::now())
                {
                    outcome = Err(AmqpError::RequestIdleTimeout(idle));
                    break;
                }
            }
        }
    }
    // Close first, so that sessions still waiting for frames end; requests already with the handler run
    // to their end (their sessions finish once the reply is disposed of or the links are gone).
    let error = match &outcome {
        Err(AmqpError::RequestIdleTimeout(idle)) => Some(AmqpErrorFrame {
            condition: ErrorCondition::AmqpError(Condition::ResourceLimitExceeded),
            description: Some(format!("no request within {idle:?}")),
            info: None,
        }),
        Err(e) => Some(AmqpErrorFrame {
            condition: ErrorCondition::AmqpError(Condition::InternalError),
            description: Some(e.to_string()),
            info: None,
        }),
        Ok(()) => None,
    };
    if let Some(error) = error {
        let _ = timeout(CLOSE_GRACE, connection.close_with_error(error)).await;
    }
    let drained = async { while sessions.next().await.is_some() {} };
    let _ = timeout(CLOSE_GRACE, drained).await;
    outcome
}

/// The links of one session: the device's sender (requests arrive on our receiver) and its receiver
/// (responses leave on our sender).
struct SessionLinks {
    requests: Option<(Receiver, LinkAddress, Option<ApiVersion>)>,
    responses: Option<Sender>,
    /// Responses waiting for the device's receiver link.
    waiting: VecDeque<Message<Data>>,
}

async fn serve_session<H: DeviceHandler>(
    mut session: ListenerSessionHandle,
    shared: Arc<Shared<H>>,
) -> Result<(), AmqpError> {
    let link_acceptor = LinkAcceptor::builder().max_message_size(shared.max_message_bytes).build();
    let mut links = SessionLinks { requests: None, responses: None, waiting: VecDeque::new() };
    let result = loop {
        tokio::select! {
            attach = session.next_incoming_attach() => {
                let Some(attach) = attach else { break Ok(()) };
                if let Err(e) = on_attach(attach, &mut session, &link_acceptor, &shared, &mut links).await {
                    break Err(e);
                }
            }
            delivery = recv(&mut links.requests), if links.requests.is_some() => {
                match delivery {
                    Ok(Some(delivery)) => {
                        if let Err(e) = on_request(delivery, &shared, &mut links).await {
                            break Err(e);
                        }
                    }
                    // The device detached or closed its sender link: the session goes on without it.
                    Ok(None) => links.requests = None,
                    Err(e) => break Err(e),
                }
            }
        }
    };
    if let Err(e) = &result {
        let error = AmqpErrorFrame {
            condition: ErrorCondition::AmqpError(Condition::InternalError),
            description: Some(e.to_string()),
            info: None,
        };
        let _ = session.end_with_error(error).await;
    } else {
        let _ = session.end().await;
    }
    result
}

/// The next request on the device's sender link; `None` when the device detached or closed it (or its
/// session ended), an error when the link broke the protocol.
async fn recv(
    requests: &mut Option<(Receiver, LinkAddress, Option<ApiVersion>)>,
) -> Result<Option<Delivery<Body<Value>>>, AmqpError> {
    let Some((receiver, _, _)) = requests else {
        return std::future::pending().await;
    };
    match receiver.recv::<Body<Value>>().await {
        Ok(delivery) => Ok(Some(delivery)),
        Err(RecvError::LinkStateError(
            LinkStateError::RemoteClosed | LinkStateError::RemoteDetached | LinkStateError::SessionStopped(_),
        )) => Ok(None),
        Err(e) => Err(AmqpError::Protocol(format!("request link: {e}"))),
    }
}

/// An incoming attach: the address (target of the device's sender, source of its receiver) must name a
/// registration, and on a SASL PLAIN connection the authenticated one; otherwise the link is refused.
async fn on_attach<H: DeviceHandler>(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    acceptor: &DefaultLinkAcceptor,
    shared: &Shared<H>,
    links: &mut SessionLinks,
) -> Result<(), AmqpError> {
    let address = match attach.role {
        // The device sends: its target is the service.
        Role::Sender => attach.target.as_deref().and_then(|t| match t {
            TargetArchetype::Target(t) => t.address.clone(),
        }),
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
    };
    let api_version = attach.properties.as_ref().and_then(|p| {
        p.iter().find(|(k, _)| k.0 == API_VERSION_PROPERTY).and_then(|(_, v)| match v {
            Value::String(s) => ApiVersion::parse(s).ok(),
            _ => None,
        })
    });
    let verdict = check_address(address.as_deref(), &shared.identity);
    let role = attach.role.clone();
    let link = acceptor
        .accept_incoming_attach(attach, session)
        .await
        .map_err(|e| AmqpError::Protocol(format!("attach: {e}")))?;
    let refusal = match (&verdict, &role, &links) {
        (Err(e), _, _) => Some(link_refusal(&shared.handler.error_reply(e))),
        (Ok(_), Role::Sender, SessionLinks { requests: Some(_), .. })
        | (Ok(_), Role::Receiver, SessionLinks { responses: Some(_), .. }) => Some(AmqpErrorFrame {
            condition: ErrorCondition::AmqpError(Condition::NotAllowed),
            description: Some("a session has one request link and one response link".to_owned()),
            info: None,
        }),
        _ => None,
    };
    match (link, verdict, refusal) {
        (LinkEndpoint::Receiver(r), _, Some(error)) => {
            let _ = r.close_with_error(error).await;
        }
        (LinkEndpoint::Sender(s), _, Some(error)) => {
            let _ = s.close_with_error(error).await;
        }
        (LinkEndpoint::Receiver(mut r), Ok(address), None) => {
            // The acceptor grants its default credit at attach; from here on the device may have
            // `link_credit` requests outstanding, renewed as they arrive.
            r.set_credit_mode(CreditMode::Auto(shared.link_credit));
            r.set_credit(shared.link_credit).await.map_err(|e| AmqpError::Protocol(format!("flow: {e}")))?;
            links.requests = Some((r, address, api_version));
        }
        (LinkEndpoint::Sender(mut s), Ok(_), None) => {
            while let Some(message) = links.waiting.pop_front() {
                send(&mut s, message).await?;
            }
            links.responses = Some(s);
        }
        (_, Err(_), None) => {}
    }
    Ok(())
}

/// The device a link address names, if this connection may use it.
fn check_address(address: Option<&str>, identity: &Identity) -> Result<LinkAddress, DpsError> {
    let address = address.ok_or_else(|| {
        DpsError::with_message(
            ErrorCode::NotFound,
            "the link has no address; it must be '{idScope}/registrations/{registrationId}'",
        )
    })?;
    let parsed = normalize_address(address)?;
    if let Identity::Sas { id_scope, registration_id, .. } = identity {
        if parsed.id_scope != *id_scope || parsed.registration_id != *registration_id {
            return Err(DpsError::with_message(
                ErrorCode::Unauthorized,
                format!(
                    "the link addresses '{}/registrations/{}', but the connection authenticated as '{}/registrations/{}'",
                    parsed.id_scope.as_str(),
                    parsed.registration_id.as_str(),
                    id_scope.as_str(),
                    registration_id.as_str()
                ),
            ));
        }
    }
    Ok(parsed)
}

/// One request: parsed, handled, disposed (accepted, or rejected with the error), answered.
async fn on_request<H: DeviceHandler>(
    delivery: Delivery<Body<Value>>,
    shared: &Shared<H>,
    links: &mut SessionLinks,
) -> Result<(), AmqpError> {
    let Some((receiver, address, api_version)) = &links.requests else {
        return Ok(());
    };
    shared.activity.begin();
    let (correlation_id, reply) = match parse_request(delivery.message()) {
        Ok(request) => {
            let token = match &shared.identity {
                Identity::Sas { token, .. } => Some(token.clone()),
                Identity::Transport => None,
            };
            let request_for_engine = DeviceRequest {
                id_scope: address.id_scope.clone(),
                registration_id: address.registration_id.clone(),
                call: request.call,
                api_version: api_version.clone(),
                credential: Credential::from_transport(token, shared.client_certificates.clone()),
                body: request.body,
                // The server's handler fills in the peer address.
                client_address: None,
            };
            // The handler call runs on a task of its own, so it completes even if this connection's future
            // is dropped (the store is never left half-written because a device went away).
            let handler = Arc::clone(&shared.handler);
            let reply = match tokio::spawn(async move { handler.handle(request_for_engine).await }).await {
                Ok(reply) => reply,
                Err(e) => shared.handler.error_reply(&DpsError::with_message(
                    ErrorCode::InternalError,
                    format!("the request task failed: {e}"),
                )),
            };
            (request.correlation_id, reply)
        }
        Err(e) => (correlation(&delivery), shared.handler.error_reply(&e)),
    };
    shared.activity.end();
    if reply.status >= 300 {
        receiver
            .reject(&delivery, rejection(&reply))
            .await
            .map_err(|e| AmqpError::Protocol(format!("disposition: {e}")))?;
        return Ok(());
    }
    receiver.accept(&delivery).await.map_err(|e| AmqpError::Protocol(format!("disposition: {e}")))?;
    respond(links, reply, correlation_id).await
}

fn correlation(delivery: &Delivery<Body<Value>>) -> Option<MessageId> {
    delivery.message().properties.as_ref().and_then(|p| p.correlation_id.clone())
}

async fn respond(
    links: &mut SessionLinks,
    reply: Reply,
    correlation_id: Option<MessageId>,
) -> Result<(), AmqpError> {
    let message = response_message(reply, correlation_id);
    match &mut links.responses {
        Some(sender) => send(sender, message).await,
        None => {
            links.waiting.push_back(message);
            Ok(())
        }
    }
}

/// Sends a response without waiting for the device's disposition (it settles or not as it likes).
async fn send(sender: &mut Sender, message: Message<Data>) -> Result<(), AmqpError> {
    sender
        .send_batchable(message)
        .await
        .map(drop)
        .map_err(|e| AmqpError::Protocol(format!("response link: {e}")))
}
