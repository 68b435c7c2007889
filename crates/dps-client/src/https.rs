//! The HTTPS transport: HTTP/1.1 (hyper) over one kept-alive TLS connection, reconnecting after a failure.

use crate::machine::ClientRequest;
use crate::{Connector, ProvisionError, RawResponse};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One device's HTTPS exchanges with the service.
#[derive(Debug)]
pub struct HttpsTransport {
    connector: Connector,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpsTransport {
    /// A transport that connects on the first request.
    pub fn new(connector: Connector) -> HttpsTransport {
        HttpsTransport { connector, sender: None }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ProvisionError> {
        let tls = self.connector.connect().await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ProvisionError::Transport(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends `request` and reads the answer (any status).
    pub async fn exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let result = self.try_exchange(request).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_exchange(&mut self, request: &ClientRequest) -> Result<RawResponse, ProvisionError> {
        let sender = match self.sender.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => self.sender.insert(self.connect().await?),
        };
        sender.ready().await.map_err(|e| ProvisionError::Transport(e.to_string()))?;
        let mut builder = hyper::Request::builder()
            .method(request.http_method())
            .uri(request.http_path_and_query())
            .header(hyper::header::HOST, self.connector.server_name())
            .header(hyper::header::USER_AGENT, crate::USER_AGENT)
            .header(hyper::header::ACCEPT, "application/json");
        if !request.authorization.is_empty() {
            builder = builder.header(hyper::header::AUTHORIZATION, request.authorization.as_str());
        }
        if !request.body.is_empty() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json; charset=utf-8");
        }
        let http = builder
            .body(Full::new(Bytes::from(request.body.clone())))
            .map_err(|e| ProvisionError::Config(format!("cannot build the request: {e}")))?;
        let response =
            sender.send_request(http).await.map_err(|e| ProvisionError::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let close = response
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ProvisionError::Transport(e.to_string()))?
            .to_bytes()
            .to_vec();
        if close {
            self.sender = None;
        }
        Ok(RawResponse { status, retry_after, body })
    }
}
