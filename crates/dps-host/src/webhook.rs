//! The custom allocation webhook client (spec §8.3-8.5): POSTs the `AllocationRequest` to an enrollment's
//! `webhookUrl` and reads the `AllocationResponse`, with Azure's outcome table:
//!
//! | webhook answer | outcome |
//! |---|---|
//! | 2xx with an `AllocationResponse` JSON object | the answer (the flow then checks the hub: missing → 400208, not linked → 400207) |
//! | 401 | 400209 `CustomAllocationUnauthorizedAccess` |
//! | 429 or 5xx, a timeout, a connection failure | retried: [`WebhookConfig::attempts`] attempts, waiting `initial_interval`, then `+ increment` each time (Azure: 10 attempts, 1 s, +9 s) while the device polls `assigning` |
//! | anything else (400, 404, a redirect — never followed —, a body over [`WebhookConfig::max_body`], garbage) | 400207 `CustomAllocationFailed` with what was wrong |
//!
//! Connections are HTTP/1.1 over rustls (aws-lc-rs), kept alive in a small pool per host (at most
//! [`WebhookConfig::idle_per_host`] idle connections), and at most [`WebhookConfig::max_in_flight`]
//! requests run at once (a registration waits for a slot). The webhook's function key travels only in its
//! URL, as in Azure: the client sends no credential of its own, and the URL is never logged.

use dps_core::effect::{AllocationCall, AllocationHook, EffectError};
use dps_core::object::BoxFuture;
use dps_core::proto::allocation::AllocationResponse;
use dps_core::{ErrorCode, Timestamp};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// How the webhook client behaves.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Trust roots for `https://` webhooks (e.g. [`WebhookConfig::system_roots`] plus your own CA).
    pub roots: Vec<CertificateDer<'static>>,
    /// How long one attempt (connect, TLS, request, response) may take before it counts as failed and is
    /// retried (default 30 s).
    pub timeout: Duration,
    /// Attempts in all, the first included (default 10, as Azure).
    pub attempts: u32,
    /// Wait before the second attempt (default 1 s).
    pub initial_interval: Duration,
    /// Added to the wait before each further attempt (default 9 s).
    pub increment: Duration,
    /// The largest response body read (default 64 KiB; larger: 400207).
    pub max_body: usize,
    /// Idle kept-alive connections per webhook host (default 8).
    pub idle_per_host: usize,
    /// Requests in flight at once across all webhooks (default 64).
    pub max_in_flight: usize,
    /// Accept `http://` webhook URLs (default false; local development only).
    pub allow_http: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            roots: Vec::new(),
            timeout: Duration::from_secs(30),
            attempts: 10,
            initial_interval: Duration::from_secs(1),
            increment: Duration::from_secs(9),
            max_body: 64 * 1024,
            idle_per_host: 8,
            max_in_flight: 64,
            allow_http: false,
        }
    }
}

impl WebhookConfig {
    /// The operating system's trust roots (`/etc/ssl/certs/ca-certificates.crt` and the other usual bundle
    /// paths); empty when none is found.
    pub fn system_roots() -> Vec<CertificateDer<'static>> {
        const BUNDLES: [&str; 4] = [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
            "/etc/ssl/ca-bundle.pem",
        ];
        BUNDLES
            .iter()
            .find_map(|path| std::fs::read(path).ok())
            .and_then(|pem| dps_client::tls::certificates(&pem).ok())
            .unwrap_or_default()
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

/// The built-in [`AllocationHook`]: calls each enrollment's webhook. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebhookConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    idle: Mutex<HashMap<Origin, Vec<SendRequest<Full<Bytes>>>>>,
    slots: Semaphore,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("roots", &self.inner.config.roots.len())
            .field("attempts", &self.inner.config.attempts)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum Attempt {
    /// Worth another attempt (429, 5xx, timeout, connection failure).
    Retry(String),
    /// Final.
    Fail(EffectError),
}

impl Webhooks {
    /// A client with `config`. Fails when a trust root is unusable.
    pub fn new(config: WebhookConfig) -> Result<Webhooks, String> {
        let tls = if config.roots.is_empty() {
            None
        } else {
            Some(
                dps_client::tls::client_config(&config.roots, None, &[b"http/1.1"])
                    .map_err(|e| format!("webhook trust roots: {e}"))?,
            )
        };
        let slots = Semaphore::new(config.max_in_flight.max(1));
        Ok(Webhooks { inner: Arc::new(Inner { config, tls, idle: Mutex::new(HashMap::new()), slots }) })
    }

    /// Whether `http://` webhooks are allowed ([`WebhookConfig::allow_http`]).
    pub fn allows_http(&self) -> bool {
        self.inner.config.allow_http
    }

    /// Idle kept-alive connections in the pool (all hosts).
    pub fn idle_connections(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, Vec<SendRequest<Full<Bytes>>>>> {
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls the webhook of `call` with its retry schedule and returns the answer.
    pub async fn call(&self, call: &AllocationCall) -> Result<AllocationResponse, EffectError> {
        let Some(definition) = &call.definition else {
            return Err(failed("the enrollment names no webhook (customAllocationDefinition) and this host has no allocation hook"));
        };
        let (origin, uri) = self.target(&definition.webhook_url)?;
        let body = serde_json::to_vec(&call.request)
            .map_err(|e| failed(format!("the allocation request cannot be serialized: {e}")))?;
        let body = Bytes::from(body);
        let config = &self.inner.config;
        let mut wait = config.initial_interval;
        let mut last = String::new();
        for attempt in 0..config.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(wait).await;
                wait += config.increment;
            }
            let once = self.attempt(&origin, &uri, body.clone());
            match tokio::time::timeout(config.timeout, once).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(Attempt::Fail(e))) => return Err(e),
                Ok(Err(Attempt::Retry(why))) => last = why,
                Err(_) => last = format!("no answer within {} ms", config.timeout.as_millis()),
            }
        }
        Err(failed(format!(
            "the webhook did not answer successfully after {} attempts (last: {last})",
            config.attempts.max(1)
        )))
    }

    fn target(&self, url: &str) -> Result<(Origin, Uri), EffectError> {
        let uri: Uri = url.parse().map_err(|_| failed("the webhook URL is not a valid URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if self.inner.config.allow_http => false,
            _ => return Err(failed("the webhook URL must be https:// (http:// is not allowed here)")),
        };
        let host = uri.host().ok_or_else(|| failed("the webhook URL has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok((Origin { https, host, port }, uri))
    }

    async fn attempt(&self, origin: &Origin, uri: &Uri, body: Bytes) -> Result<AllocationResponse, Attempt> {
        let _slot = self.inner.slots.acquire().await.map_err(|_| Attempt::Retry("shutting down".into()))?;
        let pooled = self.idle().get_mut(origin).and_then(Vec::pop);
        let mut sender = match pooled {
            Some(s) if !s.is_closed() => s,
            _ => self.connect(origin).await?,
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let host_header = if origin.port == if origin.https { 443 } else { 80 } {
            origin.host.clone()
        } else {
            format!("{}:{}", origin.host, origin.port)
        };
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("dps-rs/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| Attempt::Fail(failed(format!("cannot build the webhook request: {e}"))))?;
        sender.ready().await.map_err(|e| Attempt::Retry(format!("connection lost: {e}")))?;
        let response =
            sender.send_request(request).await.map_err(|e| Attempt::Retry(format!("request failed: {e}")))?;
        let status = response.status().as_u16();
        let limit = self.inner.config.max_body;
        let collected = Limited::new(response.into_body(), limit).collect().await;
        let bytes = match collected {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(Attempt::Fail(failed(format!(
                    "the webhook answered {status} with a body over {limit} bytes"
                ))))
            }
            Err(e) => return Err(Attempt::Retry(format!("reading the answer failed: {e}"))),
        };
        // The whole answer was read: the connection can serve the next call.
        let mut idle = self.idle();
        let slot = idle.entry(origin.clone()).or_default();
        if slot.len() < self.inner.config.idle_per_host && !sender.is_closed() {
            slot.push(sender);
        }
        drop(idle);
        match status {
            200..=299 => {
                let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    Attempt::Fail(failed(format!(
                        "the webhook answered {status} with a body that is not JSON: {e}"
                    )))
                })?;
                if !value.is_object() {
                    return Err(Attempt::Fail(failed(format!(
                        "the webhook answered {status} with JSON that is not an AllocationResponse object"
                    ))));
                }
                serde_json::from_value(value).map_err(|e| {
                    Attempt::Fail(failed(format!("the webhook's AllocationResponse is malformed: {e}")))
                })
            }
            401 => Err(Attempt::Fail(EffectError::with_code(
                ErrorCode::CustomAllocationUnauthorizedAccess,
                "the webhook answered 401 Unauthorized (check the function key in webhookUrl)",
            ))),
            s if s >= 429 => Err(Attempt::Retry(format!("the webhook answered {s}"))),
            300..=399 => Err(Attempt::Fail(failed(format!(
                "the webhook answered {status}, a redirect (redirects are not followed)"
            )))),
            s => Err(Attempt::Fail(failed(format!("the webhook answered {s}")))),
        }
    }

    async fn connect(&self, origin: &Origin) -> Result<SendRequest<Full<Bytes>>, Attempt> {
        let tcp = tokio::net::TcpStream::connect((origin.host.as_str(), origin.port))
            .await
            .map_err(|e| Attempt::Retry(format!("cannot connect to {}:{}: {e}", origin.host, origin.port)))?;
        let _ = tcp.set_nodelay(true);
        if !origin.https {
            return handshake(TokioIo::new(tcp)).await;
        }
        let Some(tls) = &self.inner.tls else {
            return Err(Attempt::Fail(failed("no trust roots are configured for https:// webhooks")));
        };
        let name = ServerName::try_from(origin.host.clone())
            .map_err(|_| Attempt::Fail(failed("the webhook host is not a valid TLS server name")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls)).connect(name, tcp).await.map_err(
            |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                // A certificate the roots do not trust will not be trusted on the next attempt either.
                Some(rustls::Error::InvalidCertificate(c)) => {
                    Attempt::Fail(failed(format!("the webhook's TLS certificate is not trusted: {c:?}")))
                }
                _ => Attempt::Retry(format!("TLS handshake failed: {e}")),
            },
        )?;
        handshake(TokioIo::new(stream)).await
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, Attempt>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Attempt::Retry(format!("HTTP handshake failed: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

fn failed(message: impl Into<String>) -> EffectError {
    EffectError::with_code(ErrorCode::CustomAllocationFailed, message)
}

impl AllocationHook for Webhooks {
    fn allocate(
        &self,
        call: AllocationCall,
        _now: Timestamp,
    ) -> BoxFuture<'static, Result<AllocationResponse, EffectError>> {
        let client = self.clone();
        Box::pin(async move { client.call(&call).await })
    }
}
