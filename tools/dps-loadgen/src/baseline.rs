//! The baseline: bare rustls + hyper (and a bare MQTT responder) in this process, answering each device's two
//! requests with **fixed** replies — a real `202 assigning` and a real `200 assigned` produced once by the
//! engine for a sample device, so the bytes on the wire have the same size and shape as a server's. It does
//! the same TLS work as a server (ECDSA P-256 certificate, TLS 1.3, aws-lc-rs) and nothing else: no
//! authentication, no storage. A server is judged by its rate as a fraction of this one.

use crate::cpu::{current_thread_id, ServerCpu};
use crate::mqtt::PacketIo;
use crate::stats::Incident;
use crate::tls::TestPki;
use crate::Error;
use bytes::Bytes;
use dps_client::{ClientAction, ClientConfig, ClientEvent, RegistrationClient};
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::mqtt::{parse_request_topic, response_topic, MqttRequest};
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_core::proto::{IdScope, RegistrationId};
use dps_core::{
    run_blocking, AccessPolicy, Engine, EngineConfig, HttpRequest, LinkedHub, Reply, Rights, OWNER_POLICY,
};
use dps_store::MemoryStore;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;

/// One fixed reply.
#[derive(Debug, Clone)]
pub struct FixedReply {
    /// Status.
    pub status: u16,
    /// Retry-After seconds (header over HTTPS, topic parameter over MQTT).
    pub retry_after: Option<u32>,
    /// Other HTTP headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl FixedReply {
    /// The engine's reply as a server would send it: `content-type`, `x-ms-request-id`, Retry-After, the
    /// reply's own headers, and `x-ms-error-code` for errors.
    pub fn from_reply(reply: &Reply) -> FixedReply {
        let mut headers = vec![
            ("content-type".to_owned(), "application/json; charset=utf-8".to_owned()),
            ("x-ms-request-id".to_owned(), reply.tracking_id.clone()),
        ];
        if let Some(code) = reply.error_code {
            headers.push(("x-ms-error-code".to_owned(), code.code().to_string()));
        }
        headers.extend(reply.headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        FixedReply {
            status: reply.status,
            retry_after: reply.retry_after,
            headers,
            body: Bytes::from(reply.body.clone()),
        }
    }
}

/// The answers to a register request and to a status poll.
#[derive(Debug, Clone)]
pub struct FixedReplies {
    /// The answer to every register request (`PUT …/register` or `iotdps-register`).
    pub register: FixedReply,
    /// The answer to every status poll (`GET …/operations/{id}` or `iotdps-get-operationstatus`).
    pub poll: FixedReply,
}

fn config_error(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("building the baseline's replies: {e}"))
}

impl FixedReplies {
    /// Runs the engine in memory once for a sample device `registration_id` of an enrollment group and keeps
    /// its replies: the `202 assigning` to the register request and the `200 assigned` to the first poll.
    pub fn from_engine(id_scope: &str, registration_id: &str, hub: &str) -> Result<FixedReplies, Error> {
        let scope = IdScope::parse(id_scope).map_err(config_error)?;
        let owner = SymmetricKey::from_bytes(vec![0x42; 32]);
        let service_host = "baseline.localhost";
        let config = EngineConfig::new(
            scope.clone(),
            service_host,
            vec![LinkedHub::new(hub, None, None).map_err(config_error)?],
        )
        .with_policy(AccessPolicy {
            key_name: OWNER_POLICY.to_owned(),
            primary_key: owner.clone(),
            secondary_key: owner.clone(),
            rights: Rights::ALL,
        });
        let engine = Engine::new(config).map_err(config_error)?;
        let store = MemoryStore::new();
        let hubs = MemoryHubDirectory::new();
        let mut rng = StdRng::seed_from_u64(7);
        let now = crate::device::now();

        let group_key = SymmetricKey::from_bytes(vec![0x24; 64]);
        let group = serde_json::json!({
            "enrollmentGroupId": "baseline",
            "attestation": {"type": "symmetricKey", "symmetricKey": {
                "primaryKey": group_key.to_base64(), "secondaryKey": group_key.to_base64()}},
        });
        let created = run_blocking(
            &mut engine.http(
                now,
                &mut rng,
                HttpRequest {
                    method: "PUT".into(),
                    path_and_query: "/enrollmentGroups/baseline?api-version=2021-10-01".into(),
                    authorization: Some(build_token(
                        &owner,
                        service_host,
                        now.unix_seconds() + 600,
                        Some(OWNER_POLICY),
                    )),
                    body: serde_json::to_vec(&group).map_err(config_error)?,
                    ..HttpRequest::default()
                },
            ),
            &store,
            &hubs,
        );
        if created.status != 200 {
            return Err(config_error(String::from_utf8_lossy(&created.body)));
        }

        let id = RegistrationId::parse(registration_id).map_err(config_error)?;
        let key = group_key.derive_device_key(id.as_str());
        let mut client = RegistrationClient::new(ClientConfig::new(scope, id, key));
        let mut action = client.start(now);
        let mut replies = Vec::new();
        while replies.len() < 2 {
            action = match action {
                ClientAction::Send(request) => {
                    let reply = run_blocking(
                        &mut engine.device(now, &mut rng, dps_host::client_request(&request)),
                        &store,
                        &hubs,
                    );
                    replies.push(FixedReply::from_reply(&reply));
                    client.handle(
                        now,
                        ClientEvent::Response {
                            status: reply.status,
                            retry_after: reply.retry_after,
                            body: reply.body,
                        },
                    )
                }
                ClientAction::Wait { .. } => client.handle(now, ClientEvent::TimerFired),
                other => return Err(config_error(format!("the sample registration ended early: {other:?}"))),
            };
        }
        if !matches!(action, ClientAction::Assigned(_)) {
            return Err(config_error(format!("the sample device was not assigned: {action:?}")));
        }
        let poll = replies.pop().ok_or_else(|| config_error("no poll reply"))?;
        let register = replies.pop().ok_or_else(|| config_error("no register reply"))?;
        Ok(FixedReplies { register, poll })
    }
}

/// The baseline servers (HTTPS and MQTT over TLS), running on their own multi-threaded tokio runtime inside
/// this process. Dropping it stops them.
#[derive(Debug)]
pub struct BaselineServer {
    https_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    ca_pem: String,
    threads: Arc<Mutex<Vec<u32>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn listen(ip: IpAddr) -> Result<TcpListener, Error> {
    let io = |e| Error::io(format!("binding a baseline listener on {ip}"), e);
    let socket = if ip.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(io)?;
    socket.set_reuseaddr(true).map_err(io)?;
    socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
    socket.listen(1024).map_err(io)
}

impl BaselineServer {
    /// Starts both servers on `ip` (ports chosen by the system), with a fresh CA and server certificate (IP
    /// SAN for `ip`, DNS SAN `localhost`), on a runtime of `worker_threads` threads.
    pub fn start(ip: IpAddr, replies: FixedReplies, worker_threads: usize) -> Result<BaselineServer, Error> {
        BaselineServer::start_with(ip, replies, worker_threads, false)
    }

    /// [`BaselineServer::start`], optionally requesting an (optional) client certificate in every handshake
    /// as a DPS server must for X.509 attestation.
    pub fn start_with(
        ip: IpAddr,
        replies: FixedReplies,
        worker_threads: usize,
        request_client_cert: bool,
    ) -> Result<BaselineServer, Error> {
        let pki = TestPki::generate(&[ip.to_string(), "localhost".to_owned()])?;
        let acceptor = TlsAcceptor::from(pki.server_config_with(request_client_cert)?);
        let threads = Arc::new(Mutex::new(Vec::new()));
        let registered = threads.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("baseline-server")
            .enable_all()
            .on_thread_start(move || {
                if let (Some(tid), Ok(mut list)) = (current_thread_id(), registered.lock()) {
                    list.push(tid);
                }
            })
            .build()
            .map_err(|e| Error::io("starting the baseline server's runtime", e))?;
        let (https, mqtt) = {
            let _context = runtime.enter();
            (listen(ip)?, listen(ip)?)
        };
        let local = |l: &TcpListener| l.local_addr().map_err(|e| Error::io("baseline listener address", e));
        let (https_addr, mqtt_addr) = (local(&https)?, local(&mqtt)?);
        // The workers register their thread IDs as they start; wait (briefly) for all of them so that CPU
        // readings taken from now on cover every thread.
        let workers = worker_threads.max(1);
        for _ in 0..1000 {
            if threads.lock().map_or(0, |t| t.len()) >= workers {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let replies = Arc::new(replies);
        runtime.spawn(serve_https(https, acceptor.clone(), replies.clone()));
        runtime.spawn(serve_mqtt(mqtt, acceptor, replies));
        Ok(BaselineServer { https_addr, mqtt_addr, ca_pem: pki.ca_pem, threads, runtime: Some(runtime) })
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The MQTT-over-TLS listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The CA certificate (PEM) devices must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// How to read the baseline server's CPU time (its runtime's threads).
    pub fn cpu(&self) -> ServerCpu {
        ServerCpu::Threads(self.threads.clone())
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Safe inside an async context, unlike dropping the runtime.
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, acceptor: TlsAcceptor, handle: F)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors or a connection reset before accept: keep serving.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let (acceptor, handle) = (acceptor.clone(), handle.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = acceptor.accept(tcp).await {
                handle(tls).await;
            }
        });
    }
}

async fn serve_https(listener: TcpListener, acceptor: TlsAcceptor, replies: Arc<FixedReplies>) {
    accept_loop(listener, acceptor, move |tls| {
        let replies = replies.clone();
        async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let replies = replies.clone();
                async move { Ok::<_, Infallible>(answer(&replies, request).await) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        }
    })
    .await;
}

async fn answer(replies: &FixedReplies, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    // Read the whole request, as a server must.
    let _ = request.into_body().collect().await;
    let reply = match method {
        Method::PUT => &replies.register,
        Method::GET => &replies.poll,
        _ => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = hyper::StatusCode::METHOD_NOT_ALLOWED;
            return r;
        }
    };
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    if let Some(secs) = reply.retry_after {
        response = response.header("retry-after", secs.to_string());
    }
    response.body(Full::new(reply.body.clone())).unwrap_or_else(|_| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

async fn serve_mqtt(listener: TcpListener, acceptor: TlsAcceptor, replies: Arc<FixedReplies>) {
    accept_loop(listener, acceptor, move |tls| {
        let replies = replies.clone();
        async move {
            let mut io = PacketIo::new(tls);
            let _ = mqtt_session(&mut io, &replies).await;
            io.shutdown().await;
        }
    })
    .await;
}

/// A bare MQTT responder: accepts any CONNECT, grants any subscription at QoS 1, acknowledges QoS 1
/// requests and answers each with the fixed reply for its topic.
async fn mqtt_session<S>(io: &mut PacketIo<S>, replies: &FixedReplies) -> Result<(), Incident>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match io.read().await? {
        Some(Packet::Connect(_)) => {
            io.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?
        }
        _ => return Ok(()),
    }
    let mut pkid = 0u16;
    while let Some(packet) = io.read().await? {
        match packet {
            Packet::Subscribe(s) => {
                let codes =
                    s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                io.send(&Packet::SubAck(SubAck::new(s.pkid, codes))).await?;
            }
            Packet::Publish(p) => {
                if p.qos != QoS::AtMostOnce {
                    io.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                }
                let (reply, rid) = match parse_request_topic(&p.topic) {
                    Ok(MqttRequest::Register { rid }) => (&replies.register, rid),
                    Ok(MqttRequest::OperationStatus { rid, .. }) => (&replies.poll, rid),
                    Err(_) => return Ok(()),
                };
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                let mut out = Publish::from_bytes(
                    response_topic(reply.status, &rid, reply.retry_after),
                    QoS::AtLeastOnce,
                    reply.body.clone(),
                );
                out.pkid = pkid;
                io.queue(&Packet::Publish(out))?;
                io.flush().await?;
            }
            Packet::PubAck(_) => {}
            Packet::PingReq => io.send(&Packet::PingResp).await?,
            _ => return Ok(()),
        }
    }
    Ok(())
}
