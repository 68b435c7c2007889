//! A small HTTPS client (hyper over tokio-rustls) for the admin CLI, the demo device and tests.

use crate::ServerError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long connecting (TCP + TLS) or one request may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ServerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ServerError::Client(format!(
                "the server answered {} with a body that is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ))
        })
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct HttpsClient {
    address: String,
    server_name: ServerName<'static>,
    host_header: String,
    tls: Arc<rustls::ClientConfig>,
}

impl HttpsClient {
    /// A client connecting to `address` (`host:port`), verifying the server certificate for `server_name`
    /// (a DNS name or an IP address) against the roots of `tls`.
    pub fn new(
        address: impl Into<String>,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, ServerError> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            ServerError::Client(format!("'{server_name}' is not a valid TLS server name: {e}"))
        })?;
        let host_header = match &server_name {
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => other.to_str().into_owned(),
        };
        Ok(HttpsClient { address: address.into(), server_name, host_header, tls })
    }

    /// The same endpoint as a [`dps_client::Connector`] (for the device client's transports).
    pub fn device_connector(&self) -> dps_client::Connector {
        dps_client::Connector::from_parts(self.address.clone(), self.server_name.clone(), self.tls.clone())
    }

    /// Opens a keep-alive connection.
    pub async fn connect(&self) -> Result<HttpsConnection, ServerError> {
        let connect = async {
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(|e| ServerError::Client(format!("cannot connect to {}: {e}", self.address)))?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(Arc::clone(&self.tls))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| ServerError::Client(format!("TLS with {} failed: {e}", self.address)))?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| {
                    ServerError::Client(format!("HTTP handshake with {} failed: {e}", self.address))
                })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, ServerError>(sender)
        };
        let sender = tokio::time::timeout(CLIENT_TIMEOUT, connect)
            .await
            .map_err(|_| ServerError::Client(format!("connecting to {} timed out", self.address)))??;
        Ok(HttpsConnection { sender, host_header: self.host_header.clone() })
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, ServerError> {
        self.connect().await?.send(method, path_and_query, headers, body).await
    }
}

/// An open HTTP/1.1 connection.
#[derive(Debug)]
pub struct HttpsConnection {
    sender: SendRequest<Full<Bytes>>,
    host_header: String,
}

impl HttpsConnection {
    /// Sends a request and reads the whole response. A JSON content type is set when `body` is not empty.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, ServerError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", &self.host_header)
            .header("accept", "application/json");
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json; charset=utf-8");
        }
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ServerError::Client(format!("cannot build the request: {e}")))?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| ServerError::Client(format!("the connection closed: {e}")))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| ServerError::Client(format!("the request failed: {e}")))?;
            let status = response.status().as_u16();
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ServerError::Client(format!("reading the response failed: {e}")))?
                .to_bytes()
                .to_vec();
            Ok(HttpResponse { status, headers: parts.headers, body })
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .map_err(|_| ServerError::Client("the request timed out".into()))?
    }
}
