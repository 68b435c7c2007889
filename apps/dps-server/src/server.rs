//! The listeners and connection management.
//!
//! - **HTTPS** (`listen.https`): TLS 1.3/1.2, then HTTP/1.1 with upgrades: the device API, the service API,
//!   `GET /health`, MQTT over WebSocket (any path, subprotocol `mqtt`) and AMQP over WebSocket (any path,
//!   subprotocol `AMQPWSB10`).
//! - **MQTT** (`listen.mqtt`): TLS, then MQTT 3.1.1 sessions ([`dps_mqtt::serve_connection`]).
//! - **AMQP** (`listen.amqp`): TLS, then AMQP 1.0 connections ([`dps_amqp::serve_connection`]); AMQP over
//!   WebSocket (subprotocol `AMQPWSB10`) rides on the HTTPS listener next to MQTT's.
//! - **Admin** (`listen.admin`): plain HTTP `/health` and `/metrics`.
//!
//! Limits: at most `max_connections` HTTPS + MQTT + AMQP + WebSocket connections (beyond it a new connection is
//! closed at once), a TLS handshake deadline, a request-head deadline (also the keep-alive idle limit,
//! against slowloris), a request-body deadline and the 96 KB body limit (`413001`).
//!
//! Shutdown ([`RunningServer::shutdown`]): the listeners stop accepting, HTTP connections finish their
//! in-flight request and close, everything still open after `shutdown_grace` is dropped, then the store is
//! closed (its queued writes committed) and `ready.json` removed.

use crate::config::ServerConfig;
use crate::datadir::{write_file, DataDir, OwnerKeys, Ready};
use crate::http::{admin_service, https_service, ConnCtx};
use crate::metrics::{Refusal, Transport};
use crate::mqtt::DeviceApi;
use crate::state::AppState;
use crate::tls::{ensure_tls_material_sealed, server_config};
use crate::ServerError;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// The lifecycle phase every task watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Serving.
    Running,
    /// Not accepting; HTTP connections finish their request and close.
    Draining,
    /// Drop everything.
    Stopped,
}

/// Admin connections are few (scrapers, health checks); they get their own small limit.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// What every connection task shares.
pub(crate) struct Shared {
    pub state: Arc<AppState>,
    pub config: ServerConfig,
    pub acceptor: TlsAcceptor,
    pub connections: Arc<Semaphore>,
    /// Connections per client address (HTTPS, MQTT, WebSocket), so one address cannot take the whole cap.
    pub addresses: Arc<AddressBudget>,
    /// Each device listener's share of the cap (three quarters each), so a flood on one listener (MQTT
    /// CONNECTs, or HTTPS) always leaves room on the other.
    pub https_share: Arc<Semaphore>,
    /// The MQTT-over-TLS listener's share of the cap.
    pub mqtt_share: Arc<Semaphore>,
    /// The AMQP-over-TLS listener's share of the cap.
    pub amqp_share: Arc<Semaphore>,
    pub admin_connections: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub phase: watch::Receiver<Phase>,
    pub mqtt_limits: dps_mqtt::MqttLimits,
    pub mqtt_handler: Arc<DeviceApi>,
    pub websocket_handler: Arc<DeviceApi>,
    pub amqp_limits: dps_amqp::AmqpLimits,
    pub amqp_handler: Arc<DeviceApi>,
    pub amqp_websocket_handler: Arc<DeviceApi>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound addresses (also written to `ready.json`).
    pub ready: Ready,
    /// The data directory.
    pub data_dir: DataDir,
    /// The owner connection string (also in `connection-string.txt`).
    pub connection_string: String,
    /// The owner keys (and so the connection string) were created by this start.
    pub created_owner_keys: bool,
    /// The shared state (engine, store, metrics).
    pub state: Arc<AppState>,
    /// What was generated on this start, for the startup summary.
    pub generated: Vec<String>,
    phase: watch::Sender<Phase>,
    tracker: TaskTracker,
    grace: Duration,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or choose another port)"
        } else if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another process listens there)"
        } else {
            ""
        };
        ServerError::io(format!("binding the {what} listener to {addr}{hint}"), e)
    })
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, ServerError> {
    l.local_addr().map_err(|e| ServerError::io("reading a listener's address", e))
}

/// Prepares the data directory, opens the store, binds every listener, starts serving and writes
/// `ready.json`.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let data_dir = DataDir::new(&config.data_dir);
    data_dir.create()?;
    match std::fs::remove_file(data_dir.ready()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ServerError::io(format!("removing the stale {}", data_dir.ready().display()), e))
        }
    }
    let mut rng = StdRng::from_entropy();
    let mut generated = Vec::new();
    // Encryption at rest: the data keys, unwrapped once by the key-encryption key, seal every secret below.
    let sealer = {
        let (provider, dir) = (config.key_provider.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || crate::encryption::open_sealer(&provider, &dir))
            .await
            .map_err(|e| ServerError::Encryption(format!("key loading task failed: {e}")))??
    };
    let (owner, new_keys) = OwnerKeys::load_or_generate(&data_dir, &mut rng, &sealer)?;
    if new_keys {
        generated.push(format!("owner policy keys {}", data_dir.owner_key().display()));
    }
    let connection_string = owner.connection_string(&config.service_host_name);
    write_file(&data_dir.connection_string(), format!("{connection_string}\n").as_bytes())?;

    let names = config.subject_alt_names.clone();
    let dir = data_dir.clone();
    let tls_sealer = Arc::clone(&sealer);
    let material = tokio::task::spawn_blocking(move || {
        ensure_tls_material_sealed(&dir, &names, &mut rng, Some(&tls_sealer))
    })
    .await
    .map_err(|e| ServerError::Tls(format!("certificate generation task failed: {e}")))??;
    if material.generated_ca {
        generated.push(format!("CA certificate {}", data_dir.ca_cert().display()));
    }
    if material.generated_server {
        generated.push(format!("server certificate {}", data_dir.server_cert().display()));
    }
    let acceptor = TlsAcceptor::from(server_config(&material)?);

    let database = data_dir.database();
    let state = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || AppState::open(&config, &owner, &database, sealer))
            .await
            .map_err(|e| ServerError::DataDir(format!("store open task failed: {e}")))??
    };
    let state = Arc::new(state);
    register_issuer(&state).await?;

    let https = bind(config.listen.https, "HTTPS").await?;
    let mqtt = match config.listen.mqtt {
        Some(a) => Some(bind(a, "MQTT").await?),
        None => None,
    };
    let amqp = match config.listen.amqp {
        Some(a) => Some(bind(a, "AMQP").await?),
        None => None,
    };
    let admin = match config.listen.admin {
        Some(a) => Some(bind(a, "admin").await?),
        None => None,
    };
    let ready = Ready {
        https: local_addr(&https)?,
        mqtt: mqtt.as_ref().map(local_addr).transpose()?,
        amqp: amqp.as_ref().map(local_addr).transpose()?,
        admin: admin.as_ref().map(local_addr).transpose()?,
    };

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let tracker = TaskTracker::new();
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        // A client gets as long for its CONNECT as an HTTP client for its request head.
        // A session must make a request within that time too (after waiting the Retry-After it was given).
        mqtt_limits: dps_mqtt::MqttLimits {
            connect_timeout: config.header_read_timeout,
            request_idle_timeout: config.header_read_timeout
                + Duration::from_secs(u64::from(config.retry_after_secs)),
            ..Default::default()
        },
        // The same deadlines for AMQP: its handshake (header, SASL, open) as a CONNECT, and a request
        // within the Retry-After plus that.
        amqp_limits: dps_amqp::AmqpLimits {
            handshake_timeout: config.header_read_timeout,
            request_idle_timeout: config.header_read_timeout
                + Duration::from_secs(u64::from(config.retry_after_secs)),
            ..Default::default()
        },
        amqp_handler: Arc::new(DeviceApi::new(Arc::clone(&state), Transport::Amqp)),
        amqp_websocket_handler: Arc::new(DeviceApi::new(Arc::clone(&state), Transport::AmqpWebSocket)),
        amqp_share: Arc::new(Semaphore::new(listener_share(config.max_connections))),
        mqtt_handler: Arc::new(DeviceApi::new(Arc::clone(&state), Transport::Mqtt)),
        websocket_handler: Arc::new(DeviceApi::new(Arc::clone(&state), Transport::WebSocket)),
        state: Arc::clone(&state),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        addresses: Arc::new(AddressBudget::new(config.max_connections_per_address)),
        https_share: Arc::new(Semaphore::new(listener_share(config.max_connections))),
        mqtt_share: Arc::new(Semaphore::new(listener_share(config.max_connections))),
        admin_connections: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
        config,
        acceptor,
        tracker: tracker.clone(),
        phase: phase_rx,
    });

    tracker.spawn(accept_loop(https, Arc::clone(&shared), Transport::Https));
    if let Some(l) = mqtt {
        tracker.spawn(accept_loop(l, Arc::clone(&shared), Transport::Mqtt));
    }
    if let Some(l) = amqp {
        tracker.spawn(accept_loop(l, Arc::clone(&shared), Transport::Amqp));
    }
    if let Some(l) = admin {
        tracker.spawn(accept_loop(l, Arc::clone(&shared), Transport::Admin));
    }

    ready.write(&data_dir)?;
    let or_off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        https = %ready.https,
        mqtt = %or_off(ready.mqtt),
        amqp = %or_off(ready.amqp),
        admin = %or_off(ready.admin),
        data_dir = %data_dir.root().display(),
        id_scope = %shared.config.id_scope.as_str(),
        "dps-server ready"
    );
    Ok(RunningServer {
        ready,
        data_dir,
        connection_string,
        created_owner_keys: new_keys,
        state,
        generated,
        phase: phase_tx,
        tracker,
        grace,
    })
}

impl RunningServer {
    /// A human-readable summary: where the files are and the listen addresses. The connection string
    /// (which carries the owner key) is printed only when this start created it, or with `show_secrets`:
    /// otherwise it would end up in every log of every restart.
    pub fn summary(&self, show_secrets: bool) -> String {
        let d = &self.data_dir;
        let or_off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
        let mut s = String::new();
        for g in &self.generated {
            s.push_str(&format!("generated {g}\n"));
        }
        s.push_str(&format!(
            "dps-server ready\n\
             \x20 ID scope           {}\n\
             \x20 HTTPS              {}   (device API, service API, MQTT and AMQP over WebSocket, /health)\n\
             \x20 MQTT over TLS      {}\n\
             \x20 AMQP over TLS      {}\n\
             \x20 admin (HTTP)       {}   (/health, /metrics)\n\
             \x20 data directory     {}\n\
             \x20 store              {}\n\
             \x20 CA certificate     {}   (trust this on devices and clients)\n\
             \x20 server certificate {}\n\
             \x20 owner keys         {}\n\
             \x20 connection string  {}\n\
             \x20 readiness file     {}\n\
             {}\n",
            self.state.engine.config().id_scope.as_str(),
            self.ready.https,
            or_off(self.ready.mqtt),
            or_off(self.ready.amqp),
            or_off(self.ready.admin),
            d.root().display(),
            self.state.store.inner().describe(),
            d.ca_cert().display(),
            d.server_cert().display(),
            d.owner_key().display(),
            d.connection_string().display(),
            d.ready().display(),
            if show_secrets || self.created_owner_keys {
                self.connection_string.clone()
            } else {
                format!(
                    "(the connection string carries the owner key: read it from {}, or start with --show-secrets)",
                    d.connection_string().display()
                )
            },
        ));
        s
    }

    /// Stops accepting, lets in-flight requests finish (at most `shutdown_grace`), drops what is left,
    /// closes the store (committing queued writes) and removes `ready.json`.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        let _ = self.phase.send(Phase::Draining);
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = self.tracker.len(),
                "connections still open after the shutdown grace period; closing them"
            );
            let _ = self.phase.send(Phase::Stopped);
            if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await.is_err() {
                tracing::warn!(open = self.tracker.len(), "tasks did not stop; closing the store anyway");
            }
        }
        // Registrations answered early (202) finish their hub work and final commit before the store closes.
        if tokio::time::timeout(self.grace, self.state.host.drain()).await.is_err() {
            tracing::warn!(
                pending = self.state.host.background_flows(),
                "early-answered registrations still finishing after the grace period; closing the store"
            );
        }
        let _ = self.phase.send(Phase::Stopped);
        let _ = std::fs::remove_file(self.data_dir.ready());
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || state.close_store())
            .await
            .map_err(|e| ServerError::DataDir(format!("store close task failed: {e}")))?
            .map_err(ServerError::Store)?;
        tracing::info!("store closed; bye");
        Ok(())
    }
}

/// Waits until the phase is at least `at_least` (or the sender is gone).
pub(crate) async fn phase_reached(mut rx: watch::Receiver<Phase>, at_least: Phase) {
    let reached = |p: &Phase| match at_least {
        Phase::Running => true,
        Phase::Draining => *p != Phase::Running,
        Phase::Stopped => *p == Phase::Stopped,
    };
    let _ = rx.wait_for(reached).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, transport: Transport) {
    let draining = phase_reached(shared.phase.clone(), Phase::Draining);
    tokio::pin!(draining);
    let limit = match transport {
        Transport::Admin => &shared.admin_connections,
        _ => &shared.connections,
    };
    loop {
        let accepted = tokio::select! {
            () = &mut draining => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, listener = transport.label(), "accept failed");
                tokio::select! {
                    () = &mut draining => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(limit).try_acquire_owned() else {
            shared.state.metrics.refused(Refusal::Limit);
            tracing::debug!(%peer, listener = transport.label(), "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let share = match transport {
            Transport::Https => Some(&shared.https_share),
            Transport::Mqtt => Some(&shared.mqtt_share),
            Transport::Amqp => Some(&shared.amqp_share),
            Transport::Admin | Transport::WebSocket | Transport::AmqpWebSocket => None,
        };
        let share = match share.map(|s| Arc::clone(s).try_acquire_owned()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                shared.state.metrics.refused(Refusal::Limit);
                tracing::debug!(%peer, listener = transport.label(), "listener's share of the cap reached; closing");
                drop(stream);
                continue;
            }
        };
        let address = match transport {
            Transport::Admin => None,
            _ => match shared.addresses.take(peer.ip()) {
                Some(taken) => Some(taken),
                None => {
                    shared.state.metrics.refused(Refusal::AddressLimit);
                    tracing::debug!(%peer, listener = transport.label(), "per-address limit reached; closing");
                    drop(stream);
                    continue;
                }
            },
        };
        let permit = Slot { _global: permit, _share: share, address };
        let _ = stream.set_nodelay(true);
        let s = Arc::clone(&shared);
        match transport {
            Transport::Https => shared.tracker.spawn(serve_https(stream, peer, s, permit)),
            Transport::Mqtt => shared.tracker.spawn(serve_mqtt(stream, peer, s, permit)),
            Transport::Amqp => shared.tracker.spawn(serve_amqp(stream, peer, s, permit)),
            Transport::Admin | Transport::WebSocket | Transport::AmqpWebSocket => {
                shared.tracker.spawn(serve_admin(stream, peer, s, permit))
            }
        };
    }
    tracing::debug!(listener = transport.label(), "listener closed");
}

/// With certificate issuance on, makes the issuing CA a verified CA certificate of the instance (named
/// [`crate::state::ISSUER_CA_NAME`]), so an enrollment group that references it attests devices by the
/// certificates it issued. An existing entry with the same certificate is left alone.
async fn register_issuer(state: &AppState) -> Result<(), ServerError> {
    use dps_core::{Principal, Rights, ServiceCommand};
    let Some(issuer) = &state.issuer else { return Ok(()) };
    let principal = Principal::granted("dps-server (certificate issuance)", Rights::ALL);
    let name = crate::state::ISSUER_CA_NAME.to_owned();
    let current = state.host.command(&principal, ServiceCommand::GetCertificate { name: name.clone() }).await;
    if current.status == 200 {
        let body: serde_json::Value = serde_json::from_slice(&current.body).unwrap_or_default();
        let thumbprint = dps_core::attest::x509::sha1_thumbprint(issuer.certificate_der());
        let same =
            body["properties"]["thumbprint"].as_str().is_some_and(|t| t.eq_ignore_ascii_case(&thumbprint));
        if same && body["properties"]["isVerified"] == serde_json::Value::Bool(true) {
            return Ok(());
        }
    }
    let put = ServiceCommand::PutCertificate {
        name: name.clone(),
        certificate_text: issuer.certificate_pem().to_owned(),
        is_verified: true,
        if_match: Some(dps_core::proto::IfMatch::Any).filter(|_| current.status == 200),
    };
    let reply = state.host.command(&principal, put).await;
    if reply.status >= 300 {
        return Err(ServerError::DataDir(format!(
            "registering the issuing CA as CA certificate '{name}': {}",
            String::from_utf8_lossy(&reply.body)
        )));
    }
    tracing::info!(certificate = %name, "issuing CA registered as a verified CA certificate");
    Ok(())
}

/// Runs the TLS handshake within the configured deadline; returns the stream and the client's certificate
/// chain, if it presented one.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<Vec<CertificateDer<'static>>>)> {
    match tokio::time::timeout(shared.config.tls_handshake_timeout, shared.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
            Some((tls, certs))
        }
        Ok(Err(e)) => {
            shared.state.metrics.refused(Refusal::TlsHandshake);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            shared.state.metrics.refused(Refusal::TlsHandshake);
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

fn http1_builder(shared: &Shared) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    b
}

/// Drives an HTTP connection future, starting its graceful shutdown when the server drains and dropping it
/// when the server stops.
async fn drive<C, E>(
    conn: C,
    mut graceful: impl FnMut(std::pin::Pin<&mut C>),
    shared: &Shared,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let draining = phase_reached(shared.phase.clone(), Phase::Draining);
    let stopped = phase_reached(shared.phase.clone(), Phase::Stopped);
    tokio::pin!(draining, stopped);
    let mut drained = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            () = &mut draining, if !drained => {
                drained = true;
                graceful(conn.as_mut());
            }
            () = &mut stopped => break,
        }
    }
}

async fn serve_https(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, permit: Slot) {
    let _open = shared.state.metrics.open_connection(Transport::Https);
    let Some((tls, client_certs)) = handshake(stream, peer, &shared).await else {
        return;
    };
    let ctx =
        Arc::new(ConnCtx { shared: Arc::clone(&shared), peer, client_certs, _permit: Arc::new(permit) });
    let conn = http1_builder(&shared).serve_connection(TokioIo::new(tls), https_service(ctx)).with_upgrades();
    drive(conn, |c| c.graceful_shutdown(), &shared, peer).await;
}

async fn serve_admin(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, _permit: Slot) {
    let _open = shared.state.metrics.open_connection(Transport::Admin);
    let conn =
        http1_builder(&shared).serve_connection(TokioIo::new(stream), admin_service(Arc::clone(&shared)));
    drive(conn, |c| c.graceful_shutdown(), &shared, peer).await;
}

async fn serve_mqtt(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, _permit: Slot) {
    let _open = shared.state.metrics.open_connection(Transport::Mqtt);
    let Some((tls, client_certs)) = handshake(stream, peer, &shared).await else {
        return;
    };
    let chain = crate::http::der_chain(client_certs.as_deref());
    let session = dps_mqtt::serve_connection_with_peer(
        tls,
        Arc::new(shared.mqtt_handler.for_peer(peer.ip())),
        &shared.mqtt_limits,
        chain,
    );
    let stopped = phase_reached(shared.phase.clone(), Phase::Stopped);
    tokio::select! {
        r = session => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "MQTT session ended");
        },
        () = stopped => tracing::debug!(%peer, "MQTT session dropped at shutdown"),
    }
}

async fn serve_amqp(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, _permit: Slot) {
    let _open = shared.state.metrics.open_connection(Transport::Amqp);
    let Some((tls, client_certs)) = handshake(stream, peer, &shared).await else {
        return;
    };
    let chain = crate::http::der_chain(client_certs.as_deref());
    let connection = dps_amqp::serve_connection_with_peer(
        tls,
        Arc::new(shared.amqp_handler.for_peer(peer.ip())),
        &shared.amqp_limits,
        chain,
    );
    let stopped = phase_reached(shared.phase.clone(), Phase::Stopped);
    tokio::select! {
        r = connection => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "AMQP connection ended");
        },
        () = stopped => tracing::debug!(%peer, "AMQP connection dropped at shutdown"),
    }
}

/// Serves an upgraded AMQP-over-WebSocket connection (spawned by the HTTPS service after its `101`).
pub(crate) fn spawn_amqp_websocket(ctx: Arc<ConnCtx>, on_upgrade: hyper::upgrade::OnUpgrade) {
    let shared = Arc::clone(&ctx.shared);
    shared.tracker.spawn(async move {
        let peer = ctx.peer;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        // The connection's permit stays held (through `ctx`) while the AMQP connection runs.
        let _open = ctx.shared.state.metrics.open_connection(Transport::AmqpWebSocket);
        let chain = crate::http::der_chain(ctx.client_certs.as_deref());
        let connection = dps_amqp::serve_websocket_with_peer(
            TokioIo::new(upgraded),
            Arc::new(ctx.shared.amqp_websocket_handler.for_peer(peer.ip())),
            &ctx.shared.amqp_limits,
            chain,
        );
        let stopped = phase_reached(ctx.shared.phase.clone(), Phase::Stopped);
        tokio::select! {
            r = connection => if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "AMQP over WebSocket connection ended");
            },
            () = stopped => tracing::debug!(%peer, "AMQP over WebSocket connection dropped at shutdown"),
        }
    });
}

/// Serves an upgraded WebSocket connection (spawned by the HTTPS service after its `101`).
pub(crate) fn spawn_websocket(ctx: Arc<ConnCtx>, on_upgrade: hyper::upgrade::OnUpgrade) {
    let shared = Arc::clone(&ctx.shared);
    shared.tracker.spawn(async move {
        let peer = ctx.peer;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        // The connection's permit stays held (through `ctx`) while the WebSocket session runs.
        let _open = ctx.shared.state.metrics.open_connection(Transport::WebSocket);
        let chain = crate::http::der_chain(ctx.client_certs.as_deref());
        let session = dps_mqtt::serve_websocket_with_peer(
            TokioIo::new(upgraded),
            Arc::new(ctx.shared.websocket_handler.for_peer(peer.ip())),
            &ctx.shared.mqtt_limits,
            chain,
        );
        let stopped = phase_reached(ctx.shared.phase.clone(), Phase::Stopped);
        tokio::select! {
            r = session => if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "MQTT over WebSocket session ended");
            },
            () = stopped => tracing::debug!(%peer, "MQTT over WebSocket session dropped at shutdown"),
        }
    });
}

/// The connection-limit permit, shared by an HTTPS connection and the WebSocket session it upgrades to.
pub(crate) type ConnPermit = Arc<Slot>;

/// A connection's hold on the shared cap and on its client address's budget; both are released when the
/// connection ends.
#[derive(Debug)]
pub struct Slot {
    _global: OwnedSemaphorePermit,
    _share: Option<OwnedSemaphorePermit>,
    address: Option<(Arc<AddressBudget>, IpAddr)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((budget, ip)) = self.address.take() {
            budget.release(ip);
        }
    }
}

/// One device listener's share of `max_connections`: all but a quarter of it (rounded down), so a cap
/// below four leaves each listener the whole cap.
fn listener_share(max_connections: usize) -> usize {
    (max_connections - max_connections / 4).max(1)
}

/// How many connections each client address holds, against a limit.
#[derive(Debug)]
pub struct AddressBudget {
    limit: usize,
    held: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl AddressBudget {
    /// A budget of `limit` connections per address.
    pub fn new(limit: usize) -> Self {
        AddressBudget { limit: limit.max(1), held: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<IpAddr, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one connection of `ip`'s budget, or None when it is spent.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<(Arc<AddressBudget>, IpAddr)> {
        let mut held = self.held();
        let n = held.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some((Arc::clone(self), ip))
    }

    fn release(&self, ip: IpAddr) {
        let mut held = self.held();
        if let Some(n) = held.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&ip);
            }
        }
    }
}
