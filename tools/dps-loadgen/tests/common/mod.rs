//! A minimal engine-backed device and service server for tests: the real `dps-core` engine on a
//! `MemoryStore`, behind HTTPS (hyper) and MQTT over TLS (the load generator's own packet I/O). It is not
//! the reference server; it lets the load generator's HTTPS and MQTT clients be tested against real replies.
#![allow(dead_code)]

use bytes::Bytes;
use dps_core::hub::MemoryHubDirectory;
use dps_core::proto::mqtt::{parse_request_topic, parse_username, response_topic, MqttRequest};
use dps_core::proto::sas::SymmetricKey;
use dps_core::proto::IdScope;
use dps_core::{
    AccessPolicy, DeviceCall, DeviceRequest, EngineConfig, HttpRequest, LinkedHub, Reply, Rights,
    OWNER_POLICY,
};
use dps_host::Host;
use dps_loadgen::baseline::FixedReply;
use dps_loadgen::mqtt::PacketIo;
use dps_loadgen::tls::TestPki;
use dps_store::MemoryStore;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub const SCOPE: &str = "0ne00000B22";
pub const SERVICE_HOST: &str = "test-dps.localhost";

/// The engine as an embedder runs it: one `dps_host::Host`.
pub struct State {
    host: Host,
}

impl State {
    async fn http(&self, request: HttpRequest) -> Reply {
        self.host.http(request).await
    }

    async fn device(&self, request: DeviceRequest) -> Reply {
        self.host.device(request).await
    }
}

pub struct EngineServer {
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    pub ca_pem: String,
    pub connection_string: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn to_response(reply: &Reply) -> Response<Full<Bytes>> {
    let fixed = FixedReply::from_reply(reply);
    let mut response = Response::builder().status(fixed.status);
    for (k, v) in &fixed.headers {
        response = response.header(k, v);
    }
    if let Some(s) = fixed.retry_after {
        response = response.header("retry-after", s.to_string());
    }
    response.body(Full::new(fixed.body)).unwrap()
}

impl EngineServer {
    /// Starts both listeners on 127.0.0.1 (ports chosen by the system) on the current runtime.
    pub async fn start() -> EngineServer {
        let owner = SymmetricKey::from_bytes(vec![0x11; 32]);
        let config = EngineConfig::new(
            IdScope::parse(SCOPE).unwrap(),
            SERVICE_HOST,
            vec![
                LinkedHub::new("hub-a.test.localhost", None, None).unwrap(),
                LinkedHub::new("hub-b.test.localhost", None, None).unwrap(),
            ],
        )
        .with_policy(AccessPolicy {
            key_name: OWNER_POLICY.into(),
            primary_key: owner.clone(),
            secondary_key: owner.clone(),
            rights: Rights::ALL,
        });
        let host = Host::builder(config)
            .store(Arc::new(MemoryStore::new()))
            .hubs(Arc::new(MemoryHubDirectory::new()))
            .rng(Box::new(StdRng::seed_from_u64(99)))
            .build()
            .unwrap();
        let state = Arc::new(State { host });
        let pki = TestPki::generate(&["127.0.0.1".to_owned()]).unwrap();
        let acceptor = TlsAcceptor::from(pki.server_config().unwrap());
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mqtt = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (https_addr, mqtt_addr) = (https.local_addr().unwrap(), mqtt.local_addr().unwrap());

        let (s, a) = (state.clone(), acceptor.clone());
        let https_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = https.accept().await else { continue };
                let (s, a) = (s.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(tls) = a.accept(tcp).await else { return };
                    let service = service_fn(move |request: Request<Incoming>| {
                        let s = s.clone();
                        async move {
                            let http = HttpRequest {
                                method: request.method().as_str().to_owned(),
                                path_and_query: request
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default(),
                                authorization: header(&request, "authorization"),
                                client_certificates: None,
                                client_address: None,
                                if_match: header(&request, "if-match"),
                                max_item_count: header(&request, "x-ms-max-item-count"),
                                continuation: header(&request, "x-ms-continuation"),
                                body: request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default(),
                            };
                            Ok::<_, Infallible>(to_response(&s.http(http).await))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });

        let (s, a) = (state.clone(), acceptor);
        let mqtt_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = mqtt.accept().await else { continue };
                let (s, a) = (s.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(tls) = a.accept(tcp).await else { return };
                    let mut io = PacketIo::new(tls);
                    let _ = mqtt_session(&mut io, &s).await;
                    io.shutdown().await;
                });
            }
        });

        EngineServer {
            https: https_addr,
            mqtt: mqtt_addr,
            ca_pem: pki.ca_pem,
            connection_string: format!(
                "HostName={SERVICE_HOST};SharedAccessKeyName={OWNER_POLICY};SharedAccessKey={}",
                owner.to_base64()
            ),
            tasks: vec![https_task, mqtt_task],
        }
    }
}

async fn mqtt_session<S>(io: &mut PacketIo<S>, state: &State) -> Result<(), dps_loadgen::stats::Incident>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(Packet::Connect(connect)) = io.read().await? else { return Ok(()) };
    let Some(login) = connect.login else {
        io.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadUserNamePassword, false))).await?;
        return Ok(());
    };
    let Ok(user) = parse_username(&login.username) else {
        io.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadUserNamePassword, false))).await?;
        return Ok(());
    };
    if !user.registration_id.as_str().eq_ignore_ascii_case(&connect.client_id) {
        io.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false))).await?;
        return Ok(());
    }
    io.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;
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
                let (call, rid) = match parse_request_topic(&p.topic) {
                    Ok(MqttRequest::Register { rid }) => (DeviceCall::Register { force: false }, rid),
                    Ok(MqttRequest::OperationStatus { rid, operation_id }) => {
                        (DeviceCall::OperationStatus(operation_id), rid)
                    }
                    Err(_) => return Ok(()),
                };
                let reply = state
                    .device(DeviceRequest {
                        id_scope: user.id_scope.clone(),
                        registration_id: user.registration_id.clone(),
                        call,
                        api_version: user.api_version.clone(),
                        credential: dps_core::proto::Credential::from_transport(
                            Some(login.password.clone()),
                            None,
                        ),
                        body: p.payload.to_vec(),
                        client_address: None,
                    })
                    .await;
                pkid = pkid.wrapping_add(1).max(1);
                let mut out = Publish::new(
                    response_topic(reply.status, &rid, reply.retry_after),
                    QoS::AtLeastOnce,
                    reply.body,
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
