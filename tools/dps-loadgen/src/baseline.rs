//! The baseline: bare rustls + hyper (and a bare MQTT responder, and a bare AMQP responder on `fe2o3-amqp`'s
//! acceptor, the AMQP implementation `dps-amqp` is built on) in this process, answering each device's two
//! requests with **fixed** replies — a real `202 assigning` and a real `200 assigned` produced once by the
//! engine for a sample device, so the bytes on the wire have the same size and shape as a server's. It does
//! the same TLS work as a server (ECDSA P-256 certificate, TLS 1.3, aws-lc-rs) and nothing else: no
//! authentication, no storage. A server is judged by its rate as a fraction of this one.
//!
//! By default the baseline runs in **its own process** ([`BaselineProcess`]: this binary's hidden
//! `baseline-server` command), like the server it is compared with, so both pay the same process-level
//! costs. In the load generator's own process it could share the crypto code and tables (aws-lc's P-256 and
//! X25519 tables, the AES and SHA code) with the devices' TLS clients in the CPU caches, which no separate
//! server can. (Under `perf`, every aws-lc primitive took about 1.4 times as long per call in the server
//! process as in the in-process baseline; the separate-process baseline then measured within the noise of
//! the in-process one, so that gap has another cause.) `--baseline-in-process` keeps the old arrangement.
//!
//! The baseline of X.509 devices ([`BaselineClientAuth::Required`]) **requires** a client certificate in
//! every handshake and verifies it against the devices' root (rustls `WebPkiClientVerifier`), which is the
//! TLS work a DPS server's X.509 attestation needs at the least; a handshake without one fails.

use crate::cpu::{current_thread_id, ServerCpu};
use crate::mqtt::PacketIo;
use crate::stats::Incident;
use crate::tls::{BaselineClientAuth, TestPki};
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
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAcceptor, SessionAcceptor};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{Array, Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
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
    amqp_addr: SocketAddr,
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
        BaselineServer::start_with(ip, replies, worker_threads, &BaselineClientAuth::Off)
    }

    /// [`BaselineServer::start`] with client authentication: an optional client certificate requested in
    /// every handshake (as a DPS server must for X.509 attestation), or one required and verified against
    /// given roots (the baseline of X.509 devices).
    pub fn start_with(
        ip: IpAddr,
        replies: FixedReplies,
        worker_threads: usize,
        client_auth: &BaselineClientAuth,
    ) -> Result<BaselineServer, Error> {
        let pki = TestPki::generate(&[ip.to_string(), "localhost".to_owned()])?;
        let acceptor = TlsAcceptor::from(pki.server_config_for(client_auth)?);
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
        let (https, mqtt, amqp) = {
            let _context = runtime.enter();
            (listen(ip)?, listen(ip)?, listen(ip)?)
        };
        let local = |l: &TcpListener| l.local_addr().map_err(|e| Error::io("baseline listener address", e));
        let (https_addr, mqtt_addr, amqp_addr) = (local(&https)?, local(&mqtt)?, local(&amqp)?);
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
        runtime.spawn(serve_mqtt(mqtt, acceptor.clone(), replies.clone()));
        runtime.spawn(serve_amqp(amqp, acceptor, replies));
        Ok(BaselineServer {
            https_addr,
            mqtt_addr,
            amqp_addr,
            ca_pem: pki.ca_pem,
            threads,
            runtime: Some(runtime),
        })
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The MQTT-over-TLS listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The AMQP-over-TLS listener's address.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
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

/// The baseline's SASL: offers PLAIN (and ANONYMOUS) and accepts any credential, as the other baselines
/// authenticate nothing.
#[derive(Debug, Clone)]
struct AcceptAnyCredential;

impl SaslAcceptor for AcceptAnyCredential {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("PLAIN"), Symbol::from("ANONYMOUS")])
    }

    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Ok, additional_data: None })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Ok, additional_data: None })
    }
}

async fn serve_amqp(listener: TcpListener, acceptor: TlsAcceptor, replies: Arc<FixedReplies>) {
    accept_loop(listener, acceptor, move |tls| {
        let replies = replies.clone();
        async move {
            let _ = amqp_connection(tls, &replies).await;
        }
    })
    .await;
}

/// A bare AMQP responder: SASL accepting anything, one session, the device's two links, and each request
/// message accepted and answered with the fixed reply of its operation type (a `data` section, the
/// request's correlation-id, both Retry-After spellings), as `dps-amqp` answers.
async fn amqp_connection<S>(stream: S, replies: &FixedReplies) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let acceptor =
        ConnectionAcceptor::builder().container_id("baseline").sasl_acceptor(AcceptAnyCredential).build();
    let mut connection = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
    let mut session = SessionAcceptor::new().accept(&mut connection).await.map_err(|e| e.to_string())?;
    let links = LinkAcceptor::new();
    let (mut receiver, mut sender) = (None, None);
    while receiver.is_none() || sender.is_none() {
        match links.accept(&mut session).await.map_err(|e| e.to_string())? {
            LinkEndpoint::Receiver(r) => receiver = Some(r),
            LinkEndpoint::Sender(s) => sender = Some(s),
        }
    }
    let (Some(mut receiver), Some(mut sender)) = (receiver, sender) else { return Ok(()) };
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let message = delivery.message();
        let register = message
            .application_properties
            .as_ref()
            .and_then(|p| p.0.get("iotdps-operation-type"))
            .is_some_and(|v| matches!(v, SimpleValue::String(s) if s == "iotdps-register"));
        let reply = if register { &replies.register } else { &replies.poll };
        let correlation_id = message.properties.as_ref().and_then(|p| p.correlation_id.clone());
        receiver.accept(&delivery).await.map_err(|e| e.to_string())?;
        let mut response =
            Message::builder().properties(Properties { correlation_id, ..Properties::default() });
        if let Some(secs) = reply.retry_after {
            let secs = i32::try_from(secs).unwrap_or(i32::MAX);
            response = response.application_properties(
                ApplicationProperties::builder()
                    .insert("retry-after", SimpleValue::Int(secs))
                    .insert("Retry-After", SimpleValue::Int(secs))
                    .build(),
            );
        }
        let response = response.data(Binary::from(reply.body.to_vec())).build();
        sender.send_batchable(response).await.map_err(|e| e.to_string())?;
    }
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(())
}

/// What a standalone baseline server writes to its ready file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaselineReady {
    /// HTTPS listener.
    pub https: SocketAddr,
    /// MQTT-over-TLS listener.
    pub mqtt: SocketAddr,
    /// AMQP-over-TLS listener.
    pub amqp: SocketAddr,
    /// The CA certificate (PEM) devices must trust.
    pub ca_pem: String,
}

/// The body of the hidden `baseline-server` command: starts a [`BaselineServer`] answering with the fixed
/// replies of `registration_id` in `id_scope`, writes a [`BaselineReady`] to `ready_file`, and serves until
/// standard input closes (the parent closes it, or dies).
pub fn serve_standalone(
    bind: IpAddr,
    id_scope: &str,
    registration_id: &str,
    worker_threads: usize,
    client_auth: &BaselineClientAuth,
    ready_file: &std::path::Path,
) -> Result<(), Error> {
    let replies = FixedReplies::from_engine(id_scope, registration_id, crate::bench::BASELINE_HUB)?;
    let server = BaselineServer::start_with(bind, replies, worker_threads, client_auth)?;
    let ready = BaselineReady {
        https: server.https_addr,
        mqtt: server.mqtt_addr,
        amqp: server.amqp_addr,
        ca_pem: server.ca_pem.clone(),
    };
    let json = serde_json::to_vec(&ready).map_err(|e| Error::Config(format!("ready file: {e}")))?;
    let partial = ready_file.with_extension("partial");
    std::fs::write(&partial, json).map_err(|e| Error::io(format!("writing {}", partial.display()), e))?;
    std::fs::rename(&partial, ready_file)
        .map_err(|e| Error::io(format!("writing {}", ready_file.display()), e))?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    drop(server);
    Ok(())
}

/// A baseline server in a child process of its own (see the module docs). Dropping it stops the child.
#[derive(Debug)]
pub struct BaselineProcess {
    child: std::process::Child,
    ready: BaselineReady,
    _dir: tempfile::TempDir,
}

impl BaselineProcess {
    /// Starts `exe baseline-server …` (`exe`: the `dps-loadgen` binary) and waits (up to 20 s) for it to
    /// listen.
    pub fn start(
        exe: &std::path::Path,
        bind: IpAddr,
        id_scope: &str,
        registration_id: &str,
        worker_threads: usize,
        client_auth: &BaselineClientAuth,
    ) -> Result<BaselineProcess, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating a temporary directory", e))?;
        let ready_file = dir.path().join("baseline-ready.json");
        let mut command = std::process::Command::new(exe);
        command
            .arg("baseline-server")
            .arg("--bind")
            .arg(bind.to_string())
            .arg("--id-scope")
            .arg(id_scope)
            .arg("--registration-id")
            .arg(registration_id)
            .arg("--threads")
            .arg(worker_threads.to_string())
            .arg("--ready-file")
            .arg(&ready_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        match client_auth {
            BaselineClientAuth::Off => {}
            BaselineClientAuth::Optional => {
                command.arg("--client-auth");
            }
            BaselineClientAuth::Required { roots_pem } => {
                let roots = dir.path().join("client-ca.pem");
                std::fs::write(&roots, roots_pem)
                    .map_err(|e| Error::io(format!("writing {}", roots.display()), e))?;
                command.arg("--client-ca").arg(&roots);
            }
        }
        let mut child = command.spawn().map_err(|e| Error::io("starting the baseline server process", e))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(bytes) = std::fs::read(&ready_file) {
                let ready: BaselineReady = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("the baseline server's ready file: {e}")))?;
                return Ok(BaselineProcess { child, ready, _dir: dir });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Config(format!("the baseline server process exited at start: {status}")));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Config("the baseline server process did not start within 20 s".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Where it listens and which CA to trust.
    pub fn ready(&self) -> &BaselineReady {
        &self.ready
    }

    /// How to read its CPU time (the whole child process).
    pub fn cpu(&self) -> ServerCpu {
        ServerCpu::Process(self.child.id())
    }
}

impl Drop for BaselineProcess {
    fn drop(&mut self) {
        // Closing its standard input asks it to stop; a child that does not is killed.
        drop(self.child.stdin.take());
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
