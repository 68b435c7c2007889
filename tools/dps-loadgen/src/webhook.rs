//! A local custom allocation webhook for the `custom` mode: plain HTTP/1.1 with keep-alive on the bench's
//! loopback address, answering every `AllocationRequest` with one of its `linkedHubs` (chosen by a hash of
//! the registration ID, so devices spread over the hubs). The spawned server allows `http://` webhooks
//! (`[custom_allocation] allow_http`), so the measured cost is the server's webhook client and the extra
//! step of the flow, not a TLS handshake per call (its pool keeps connections alive).

use crate::Error;
use dps_core::proto::allocation::{AllocationRequest, AllocationResponse};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A running local webhook; stops when dropped.
#[derive(Debug)]
pub struct LocalWebhook {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalWebhook {
    /// Starts the webhook on `bind` (a free port).
    pub async fn start(bind: IpAddr) -> Result<LocalWebhook, Error> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, 0))
            .await
            .map_err(|e| Error::io("binding the local webhook".to_owned(), e))?;
        let addr =
            listener.local_addr().map_err(|e| Error::io("the local webhook's address".to_owned(), e))?;
        let calls = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&calls);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let counter = Arc::clone(&counter);
                            async move {
                                counter.fetch_add(1, Ordering::Relaxed);
                                let body =
                                    req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                let (status, answer) =
                                    match serde_json::from_slice::<AllocationRequest>(&body) {
                                        Ok(request) => (200, choose(&request)),
                                        Err(_) => (400, AllocationResponse::default()),
                                    };
                                let json = serde_json::to_vec(&answer).unwrap_or_default();
                                let mut response = hyper::Response::new(Full::new(Bytes::from(json)));
                                *response.status_mut() = hyper::StatusCode::from_u16(status)
                                    .unwrap_or(hyper::StatusCode::BAD_REQUEST);
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(LocalWebhook { addr, calls, task })
    }

    /// The webhook URL to put in the enrollment group.
    pub fn url(&self) -> String {
        format!("http://{}/api/allocate?code=loadgen", self.addr)
    }

    /// How many allocation requests it answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Drop for LocalWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One of the offered hubs, by an FNV-1a hash of the registration ID.
fn choose(request: &AllocationRequest) -> AllocationResponse {
    let id = request.device_runtime_context.registration_id.as_bytes();
    let h =
        id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    match request.linked_hubs.len() {
        0 => AllocationResponse::default(),
        n => AllocationResponse::hub(request.linked_hubs[(h % n as u64) as usize].clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_answers_one_of_the_offered_hubs_and_spreads_devices() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..32 {
            let request = AllocationRequest {
                device_runtime_context: dps_core::proto::allocation::DeviceRuntimeContext {
                    registration_id: format!("dev-{i}"),
                    ..Default::default()
                },
                linked_hubs: vec!["a".into(), "b".into()],
                ..Default::default()
            };
            let hub = choose(&request).iot_hub_host_name.unwrap();
            assert!(hub == "a" || hub == "b");
            seen.insert(hub);
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(choose(&AllocationRequest::default()).iot_hub_host_name, None);
    }
}
