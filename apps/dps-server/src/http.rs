//! The HTTP services: HTTPS (device API, service API, `/health`, MQTT over WebSocket upgrades) and the admin
//! listener (`/health`, `/metrics`). A [`Reply`] becomes an HTTP response here.

use crate::metrics::{Api, Transport};
use crate::server::{spawn_amqp_websocket, spawn_websocket, ConnPermit, Shared};
use crate::state::now;
use bytes::Bytes;
use dps_core::proto::id::format_uuid;
use dps_core::proto::route::{parse_route, Route};
use dps_core::proto::MAX_BODY_BYTES;
use dps_core::{DpsError, ErrorCode, HttpRequest, Reply};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio_util::task::TaskTracker;

/// One HTTPS connection's context.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    /// The client certificate chain presented in the TLS handshake (kept for X.509 attestation; today only
    /// logged, as the engine has no X.509 attestation yet).
    pub client_certs: Option<Vec<CertificateDer<'static>>>,
    /// The connection-limit permit, held while the connection (or its WebSocket session) lives.
    pub _permit: ConnPermit,
}

const JSON: &str = "application/json; charset=utf-8";

type Resp = Response<Full<Bytes>>;

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Writes a [`Reply`] as an HTTP response.
pub(crate) fn reply_response(reply: Reply, location: Option<String>, close: bool) -> Resp {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let has_body = !reply.body.is_empty() && status != StatusCode::NO_CONTENT;
    let mut response =
        Response::new(Full::new(if has_body { Bytes::from(reply.body) } else { Bytes::new() }));
    *response.status_mut() = status;
    let h = response.headers_mut();
    let mut put = |name: &str, value: &str| match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => {
            h.append(n, v);
        }
        _ => tracing::warn!(header = name, "dropping a reply header that is not valid HTTP"),
    };
    if has_body {
        put("content-type", JSON);
    }
    if let Some(s) = reply.retry_after {
        put("retry-after", &s.to_string());
    }
    put("x-ms-request-id", &reply.tracking_id);
    if let Some(code) = reply.error_code {
        put("x-ms-error-code", &code.code().to_string());
    }
    if let Some(l) = location {
        put("location", &l);
    }
    for (name, value) in &reply.headers {
        put(name, value);
    }
    if close {
        put("connection", "close");
    }
    response
}

fn json_response(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

fn health() -> Resp {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

fn error_reply(shared: &Shared, error: DpsError) -> Reply {
    Reply::error(&error, format_uuid(shared.state.random16()), now())
}

/// How much of an oversized body is read and discarded so that the `413` can be answered on a connection
/// that stays usable (closing with unread data would make the kernel reset the connection, which can
/// destroy the reply before the client reads it). Bodies larger still get the `413` at once, then a close.
const DRAIN_LIMIT: u64 = 256 * 1024;

/// A request body, read.
enum Body {
    /// The whole body, within [`MAX_BODY_BYTES`].
    Complete(Vec<u8>),
    /// Over the limit; `drained` when the rest was read (the connection can be kept).
    TooLarge { drained: bool },
    /// The client's stream failed.
    Failed(String),
}

/// Reads a body up to [`MAX_BODY_BYTES`]: an announced larger body is refused before reading when it is
/// beyond the drain limit or the client waits for `100 Continue`; otherwise an oversized body is drained.
async fn read_body(mut body: Incoming, expect_continue: bool) -> Body {
    let max = MAX_BODY_BYTES as u64;
    let announced = body.size_hint().lower();
    if announced > max && (expect_continue || announced > max + DRAIN_LIMIT) {
        return Body::TooLarge { drained: false };
    }
    let mut bytes = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Body::Failed(e.to_string()),
        };
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len() as u64);
            if total > max + DRAIN_LIMIT {
                return Body::TooLarge { drained: false };
            }
            if total > max {
                bytes = Vec::new();
            } else {
                bytes.extend_from_slice(&data);
            }
        }
    }
    if total > max {
        Body::TooLarge { drained: true }
    } else {
        Body::Complete(bytes)
    }
}

/// The error that makes hyper close an HTTPS connection without writing a response: a reply with
/// [`Reply::drop_connection`] (fault injection's dropped connection).
#[derive(Debug, thiserror::Error)]
#[error("the connection is dropped without a response (fault injection)")]
pub(crate) struct Dropped;

/// Marks a response that must not be sent: the connection is closed instead.
#[derive(Debug, Clone, Copy)]
struct DropMarker;

/// The HTTPS service of one connection.
pub(crate) fn https_service(
    ctx: Arc<ConnCtx>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Resp,
    Error = Dropped,
    Future = impl Future<Output = Result<Resp, Dropped>> + Send,
> + Send {
    hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move {
            let response = handle_https(req, ctx).await;
            if response.extensions().get::<DropMarker>().is_some() {
                // hyper ends the connection on a service error, writing nothing.
                return Err(Dropped);
            }
            Ok(response)
        }
    })
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host` header; anything else is answered 400.
fn host_header_problem(req: &Request<Incoming>) -> Option<String> {
    if req.version() != hyper::Version::HTTP_11 {
        return None;
    }
    match req.headers().get_all(hyper::header::HOST).iter().count() {
        1 => None,
        0 => Some("an HTTP/1.1 request must carry a Host header (RFC 9112 §3.2); this one has none".into()),
        n => Some(format!(
            "an HTTP/1.1 request must carry exactly one Host header (RFC 9112 §3.2); this one has {n}"
        )),
    }
}

async fn handle_https(mut req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Resp {
    let shared = &ctx.shared;
    if let Some(message) = host_header_problem(&req) {
        shared.state.metrics.request(Api::Other, 400);
        return reply_response(
            error_reply(shared, DpsError::with_message(ErrorCode::BadRequest, message)),
            None,
            true,
        );
    }
    // RFC 9110 §9.1: methods are case-sensitive ("put" is not PUT).
    if req.method().as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        shared.state.metrics.request(Api::Other, 405);
        let message = format!("method '{}' is not allowed (methods are case-sensitive)", req.method());
        return reply_response(
            error_reply(shared, DpsError::with_message(ErrorCode::MethodNotAllowed, message)),
            None,
            false,
        );
    }
    if dps_mqtt::is_websocket_upgrade(req.headers()) {
        let refused = |message: String| {
            tracing::debug!(peer = %ctx.peer, %message, "WebSocket upgrade refused");
            let mut r = reply_response(
                error_reply(shared, DpsError::with_message(ErrorCode::BadRequest, message)),
                None,
                true,
            );
            r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            r
        };
        if req.method() != Method::GET {
            return refused(format!("a WebSocket upgrade must use GET, not {}", req.method()));
        }
        // AMQP when the client offers `AMQPWSB10`, MQTT otherwise (spec §3.1, §2.1).
        if dps_amqp::offers_amqp_subprotocol(req.headers()) {
            return match dps_amqp::websocket_upgrade_response(req.headers()) {
                Ok(response) => {
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    spawn_amqp_websocket(Arc::clone(&ctx), on_upgrade);
                    response.map(|()| Full::new(Bytes::new()))
                }
                Err(e) => refused(e.to_string()),
            };
        }
        return match dps_mqtt::websocket_upgrade_response(req.headers()) {
            Ok(response) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                spawn_websocket(Arc::clone(&ctx), on_upgrade);
                response.map(|()| Full::new(Bytes::new()))
            }
            Err(e) => refused(e.to_string()),
        };
    }
    if req.uri().path() == "/health" && matches!(*req.method(), Method::GET | Method::HEAD) {
        shared.state.metrics.request(Api::Other, 200);
        return health();
    }

    let (parts, body) = req.into_parts();
    let path_and_query =
        parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    let peer = ctx.peer;

    let expect_continue = parts
        .headers
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let outcome =
        tokio::time::timeout(shared.config.body_read_timeout, read_body(body, expect_continue)).await;
    let body = match outcome {
        Ok(Body::Complete(b)) => b,
        Ok(Body::TooLarge { drained }) => {
            tracing::debug!(%peer, path = %path_and_query, drained, "request body over the 96 KB limit");
            shared.state.metrics.request(Api::Other, 413);
            return reply_response(
                error_reply(shared, DpsError::new(ErrorCode::PayloadTooLarge)),
                None,
                !drained,
            );
        }
        Ok(Body::Failed(e)) => {
            tracing::debug!(%peer, error = %e, "reading the request body failed");
            let err = DpsError::with_message(
                ErrorCode::BadRequest,
                format!("the request body could not be read: {e}"),
            );
            return reply_response(error_reply(shared, err), None, true);
        }
        Err(_) => {
            tracing::debug!(%peer, "request body timed out");
            let err = DpsError::with_message(
                ErrorCode::BadRequest,
                format!(
                    "the request body was not received within {} s",
                    shared.config.body_read_timeout.as_secs()
                ),
            );
            return reply_response(error_reply(shared, err), None, true);
        }
    };

    if path_and_query.starts_with(crate::faults::FAULTS_PATH) {
        let path = path_and_query.split('?').next().unwrap_or_default();
        let authorization = header_string(&parts.headers, "authorization");
        let reply = crate::faults::handle(
            &shared.state,
            parts.method.as_str(),
            path,
            authorization.as_deref(),
            &body,
        );
        shared.state.metrics.request(Api::Service, reply.status);
        return reply_response(reply, None, false);
    }

    let started = Instant::now();
    // Linked hubs at run time: an extension of the service API, answered here (not by the engine).
    if let Some(reply) = crate::linked::serve(
        &shared.state,
        parts.method.as_str(),
        &path_and_query,
        header_string(&parts.headers, "authorization").as_deref(),
        &body,
    ) {
        shared.state.metrics.request(Api::Service, reply.status);
        tracing::debug!(%peer, method = %parts.method, path = %parts.uri.path(), status = reply.status,
            error_code = ?reply.error_code.map(|c| c.code()), "linked hubs");
        return reply_response(reply, None, false);
    }
    let route = parse_route(parts.method.as_str(), &path_and_query).ok().map(|m| m.route);
    let request = HttpRequest {
        method: parts.method.as_str().to_owned(),
        path_and_query: path_and_query.clone(),
        authorization: header_string(&parts.headers, "authorization"),
        client_certificates: der_chain(ctx.client_certs.as_deref()),
        if_match: header_string(&parts.headers, "if-match"),
        max_item_count: header_string(&parts.headers, "x-ms-max-item-count"),
        continuation: header_string(&parts.headers, "x-ms-continuation"),
        body,
        client_address: Some(peer.ip()),
    };
    // The engine runs inline, in this connection's task; if the connection is dropped while the flow waits
    // (the client went away, or shutdown gave up on the connection), the rest of the flow moves to a
    // tracked task, so a flow is never abandoned half-way (hub identity written, registration not yet
    // committed) and shutdown waits for it before closing the store.
    let device_api = route.as_ref().is_some_and(Route::is_device_api);
    let state = Arc::clone(&shared.state);
    let throttled = if device_api { state.throttled(peer.ip()) } else { None };
    let flow = Detachable::new(
        async move {
            match throttled {
                Some(reply) => reply,
                None => state.run_http(request).await,
            }
        },
        shared.tracker.clone(),
    );
    let reply = match flow.await {
        Ok(reply) => reply,
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            tracing::error!(%peer, panic = %message, "the request handler panicked");
            error_reply(
                shared,
                DpsError::with_message(ErrorCode::InternalError, "the request handler failed"),
            )
        }
    };
    let took = started.elapsed();
    if reply.drop_connection {
        tracing::debug!(%peer, path = %parts.uri.path(), "dropping the connection without a response (fault rule)");
        let mut response = Response::new(Full::new(Bytes::new()));
        response.extensions_mut().insert(DropMarker);
        return response;
    }
    if device_api {
        shared.state.note_auth_outcome(peer.ip(), &reply);
    }

    let api = match &route {
        Some(r) if r.is_device_api() => Api::Device,
        Some(_) => Api::Service,
        None => Api::Other,
    };
    shared.state.metrics.request(api, reply.status);
    let mut location = None;
    if let Some(Route::Register { id_scope, registration_id }) = &route {
        shared.state.metrics.registration(
            Transport::Https,
            reply.status,
            reply.error_code.map(|c| c.code()),
            took,
        );
        if reply.status == 202 {
            location = Some(format!(
                "https://{}/{}/registrations/{}/register",
                shared.config.device_host_name,
                id_scope.as_str(),
                registration_id.as_str()
            ));
        }
    }
    if reply.status >= 500 {
        tracing::warn!(%peer, method = %parts.method, path = %parts.uri.path(), status = reply.status,
            error_code = ?reply.error_code.map(|c| c.code()), tracking_id = %reply.tracking_id, "request failed");
    } else {
        tracing::debug!(%peer, method = %parts.method, path = %parts.uri.path(), status = reply.status,
            error_code = ?reply.error_code.map(|c| c.code()), tracking_id = %reply.tracking_id,
            client_cert = ctx.client_certs.is_some(), micros = took.as_micros() as u64, "request");
    }
    reply_response(reply, location, false)
}

/// A future run inline by whoever awaits it that, if dropped before it completes, finishes in a task of
/// `tracker` instead of being cancelled. A panic while polling it is caught and returned as `Err` (the
/// connection stays usable, as it did when every flow ran in its own task).
///
/// This gives a flow the guarantees of a spawned task without spawning one per request: most flows never
/// wait at all (reads are synchronous; the in-memory hub directory answers at once) or wait only for the
/// store's group commit, and only a dropped connection pays for a task.
pub(crate) struct Detachable<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    tracker: TaskTracker,
}

impl<T: Send + 'static> Detachable<T> {
    /// Wraps `future`; nothing runs until it is polled.
    pub(crate) fn new(future: impl Future<Output = T> + Send + 'static, tracker: TaskTracker) -> Self {
        Detachable { future: Some(Box::pin(future)), tracker }
    }
}

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(future) = self.future.as_mut() else {
            return Poll::Ready(Err(Box::new("polled after completion")));
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => {
                self.future = None;
                Poll::Ready(Ok(value))
            }
            Err(panic) => {
                self.future = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            // Outside a runtime (it is being torn down) there is nothing left to run the flow on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(self.tracker.track_future(async move {
                    let _ = future.await;
                }));
            }
        }
    }
}

/// The message of a caught panic, when it has one.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The admin listener's service.
pub(crate) fn admin_service(
    shared: Arc<Shared>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Resp,
    Error = Infallible,
    Future = impl Future<Output = Result<Resp, Infallible>> + Send,
> + Send {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        async move {
            let get = matches!(*req.method(), Method::GET | Method::HEAD);
            let response = match req.uri().path() {
                "/health" if get => health(),
                "/metrics" if get => {
                    shared.state.refresh_store_metrics();
                    let mut r = Response::new(Full::new(Bytes::from(shared.state.metrics.render())));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                }
                "/health" | "/metrics" => reply_response(
                    error_reply(&shared, DpsError::new(ErrorCode::MethodNotAllowed)),
                    None,
                    false,
                ),
                _ => reply_response(error_reply(&shared, DpsError::new(ErrorCode::NotFound)), None, false),
            };
            Ok::<_, Infallible>(response)
        }
    })
}

/// The client-certificate chain a TLS handshake captured, as the DER list a device request's `Credential`
/// carries (leaf first).
pub(crate) fn der_chain(certs: Option<&[CertificateDer<'static>]>) -> Option<Vec<Vec<u8>>> {
    certs.map(|chain| chain.iter().map(|c| c.as_ref().to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Polls `future` once, as a connection does before the client goes away.
    async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
    }

    #[tokio::test]
    async fn a_flow_dropped_while_waiting_finishes_in_a_tracked_task() {
        let tracker = TaskTracker::new();
        let finished = Arc::new(AtomicBool::new(false));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::clone(&finished);
        let mut flow = Detachable::new(
            async move {
                let _ = wait.await;
                done.store(true, Ordering::SeqCst);
                7
            },
            tracker.clone(),
        );
        assert!(poll_once(&mut flow).await.is_pending());
        assert!(tracker.is_empty());
        drop(flow);
        // The rest of the flow now runs in a task that shutdown waits for.
        assert_eq!(tracker.len(), 1);
        release.send(()).unwrap();
        tracker.close();
        tracker.wait().await;
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_flow_run_to_completion_spawns_nothing() {
        let tracker = TaskTracker::new();
        let flow = Detachable::new(async { tokio::task::yield_now().await }, tracker.clone());
        assert!(flow.await.is_ok());
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_flow_is_an_error_not_a_crash() {
        let tracker = TaskTracker::new();
        let flow = Detachable::new(async { panic!("engine bug") }, tracker.clone());
        let Err(panic) = flow.await else { panic!("the panic was not caught") };
        assert_eq!(panic_message(panic.as_ref()), "engine bug");
        assert!(tracker.is_empty());
    }
}
