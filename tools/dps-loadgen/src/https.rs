//! HTTPS: a hyper 1 HTTP/1.1 client connection over tokio-rustls, used by devices (one fresh connection per
//! device, kept alive for its register and polls) and by the service API client.

use crate::device::{drive, DriveOptions, Exchange, Progress, RawResponse, Target};
use crate::stats::{Failure, Incident};
use crate::x509::DeviceIdentity;
use bytes::Bytes;
use dps_client::{ClientAction, ClientRequest, RegistrationClient};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// The largest response body accepted (a page of 1,000 registration states is about 500 KB).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The `User-Agent` the load generator sends.
pub const USER_AGENT: &str = concat!("dps-loadgen/", env!("CARGO_PKG_VERSION"));

/// A response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A header as text, if present and valid.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Retry-After` header as seconds, if it is a number.
    pub fn retry_after(&self) -> Option<u32> {
        self.header("retry-after").and_then(|v| v.trim().parse().ok())
    }
}

/// One HTTP/1.1 connection over TLS.
#[derive(Debug)]
pub struct HttpsConnection {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
    host_header: String,
    tls: String,
}

/// What a TLS connection negotiated, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn tls_parameters(connection: &rustls::ClientConnection) -> String {
    let name = |d: Option<String>| d.unwrap_or_else(|| "?".to_owned());
    format!(
        "{} {} {}",
        name(connection.protocol_version().map(|v| format!("{v:?}"))),
        name(connection.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))),
        name(connection.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))),
    )
}

/// Opens a TCP connection and completes the TLS handshake.
pub(crate) async fn connect_tls(
    target: &Target,
    identity: Option<&DeviceIdentity>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Incident> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| Incident::new(Failure::Connect, format!("{}: {e}", target.addr)))?;
    // Small request/response exchanges: do not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| Incident::new(Failure::Connect, format!("TCP_NODELAY: {e}")))?;
    TlsConnector::from(target.tls_for(identity))
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| Incident::new(Failure::Tls, e.to_string()))
}

impl HttpsConnection {
    /// Connects (TCP, TLS handshake, HTTP/1.1 handshake).
    pub async fn connect(target: &Target) -> Result<HttpsConnection, Incident> {
        HttpsConnection::connect_as(target, None).await
    }

    /// Connects presenting `identity` as the TLS client certificate, if given.
    pub async fn connect_as(
        target: &Target,
        identity: Option<&DeviceIdentity>,
    ) -> Result<HttpsConnection, Incident> {
        let tls = connect_tls(target, identity).await?;
        let parameters = tls_parameters(tls.get_ref().1);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Incident::new(Failure::Connection, e.to_string()))?;
        let driver = tokio::spawn(async move {
            // Errors surface on the request futures; the connection just ends.
            let _ = connection.await;
        });
        Ok(HttpsConnection { sender, driver, host_header: target.host_header.clone(), tls: parameters })
    }

    /// What the TLS handshake negotiated (version, cipher suite, key exchange group).
    pub fn tls_parameters(&self) -> &str {
        &self.tls
    }

    /// Sends a request and reads the whole response.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, Incident> {
        let broken = |e: String| Incident::new(Failure::Connection, e);
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| broken(e.to_string()))?;
        let has_body = !body.is_empty();
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &self.host_header)
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .header(hyper::header::ACCEPT, "application/json");
        if has_body {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json; charset=utf-8");
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| broken(e.to_string()))?;
            let value = HeaderValue::from_str(value).map_err(|e| broken(e.to_string()))?;
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| broken(e.to_string()))?;
        self.sender.ready().await.map_err(|e| broken(format!("connection closed: {e}")))?;
        let response = self.sender.send_request(request).await.map_err(|e| broken(e.to_string()))?;
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| broken(format!("reading the response body: {e}")))?
            .to_bytes();
        Ok(HttpResponse { status, headers: parts.headers, body })
    }

    /// Closes the connection (TLS close_notify, then FIN) and waits until it is closed.
    pub async fn close(self) {
        drop(self.sender);
        let _ = self.driver.await;
    }
}

impl Exchange for HttpsConnection {
    async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, Incident> {
        // X.509 devices send no SAS token (their TLS client certificate authenticates them).
        let authorization = [("authorization", request.authorization.as_str())];
        let headers: &[(&str, &str)] = if request.authorization.is_empty() { &[] } else { &authorization };
        let response = self
            .send(request.http_method(), &request.http_path_and_query(), headers, request.body.clone())
            .await?;
        Ok(RawResponse {
            status: response.status,
            retry_after: response.retry_after(),
            body: response.body.to_vec(),
        })
    }
}

/// One device's registration over a fresh HTTPS connection.
pub(crate) async fn register(
    target: &Target,
    identity: Option<&DeviceIdentity>,
    client: &mut RegistrationClient,
    options: &DriveOptions,
    progress: &mut Progress,
    start: Instant,
) -> Result<crate::device::Assignment, Incident> {
    let mut connection = HttpsConnection::connect_as(target, identity).await?;
    progress.handshake = Some(start.elapsed());
    progress.tls = Some(connection.tls.clone());
    let first = client.start(crate::device::now());
    if !matches!(first, ClientAction::Send(_)) {
        return Err(Incident::new(Failure::Protocol, "the client did not start with a request"));
    }
    let outcome = drive(&mut connection, client, first, options, progress).await;
    connection.close().await;
    outcome
}
