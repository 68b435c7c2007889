//! Shared helpers of the integration tests: an in-process server on 127.0.0.1 port 0, clients that trust
//! its generated CA, SAS tokens, and a minimal MQTT 3.1.1 packet codec.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use dps_core::proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use dps_server::admin::ServiceClient;
use dps_server::client::HttpsClient;
use dps_server::config::ServerConfig;
use dps_server::datadir::ConnectionString;
use dps_server::server::RunningServer;
use rustls_pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SCOPE: &str = "0ne0000A0B1";

/// A fixed 32-byte key for devices.
pub fn device_key() -> SymmetricKey {
    SymmetricKey::from_bytes((0u8..32).collect())
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A device SAS token for `registration_id`, expiring `ttl` seconds from now (negative: in the past).
pub fn device_token(key: &SymmetricKey, scope: &str, registration_id: &str, ttl: i64) -> String {
    let resource = device_resource(scope, registration_id);
    build_token(key, &encode_resource(&resource), unix_now() + ttl, Some("registration"))
}

/// The test configuration for `dir` (listeners on 127.0.0.1:0).
pub fn config(dir: &Path) -> ServerConfig {
    ServerConfig::for_tests(SCOPE, dir).unwrap()
}

pub async fn start(config: ServerConfig) -> RunningServer {
    dps_server::server::start(config).await.unwrap()
}

pub fn client_tls(server: &RunningServer) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(server.data_dir.ca_cert()).unwrap();
    dps_server::tls::client_config(&pem).unwrap()
}

pub fn https(server: &RunningServer) -> HttpsClient {
    HttpsClient::new(server.ready.https.to_string(), "localhost", client_tls(server)).unwrap()
}

pub fn service(server: &RunningServer) -> ServiceClient {
    let text = std::fs::read_to_string(server.data_dir.connection_string()).unwrap();
    ServiceClient::new(https(server), ConnectionString::parse(&text).unwrap())
}

/// A TLS stream to `addr` from the local address `source` (e.g. `127.0.0.2`): a client on another address.
pub async fn tls_from(
    server: &RunningServer,
    addr: std::net::SocketAddr,
    source: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_tls(server))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A raw TLS stream to the HTTPS listener (for malformed requests).
pub async fn raw_tls(server: &RunningServer) -> tokio_rustls::client::TlsStream<TcpStream> {
    raw_tls_to(server, server.ready.https).await
}

pub async fn raw_tls_to(
    server: &RunningServer,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_tls(server))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads until EOF (or an error, which counts as the peer closing), with a generous liveness bound.
pub async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the server never closed the connection");
    out
}

/// Reads one HTTP/1.1 response with a Content-Length body (status, lowercase headers, body).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed inside the response head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let len: usize =
        headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (status, headers, body)
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1.1 client codec (CONNECT, SUBSCRIBE, PUBLISH QoS 0, PUBACK; reading any packet).
// ---------------------------------------------------------------------------------------------

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend(body);
    out
}

pub fn mqtt_connect(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.push(4); // protocol level 3.1.1
    b.push(0xC2); // username, password, clean session
    b.extend_from_slice(&60u16.to_be_bytes());
    string(client_id, &mut b);
    string(username, &mut b);
    string(password, &mut b);
    packet(0x10, b)
}

pub fn mqtt_subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut b = packet_id.to_be_bytes().to_vec();
    string(filter, &mut b);
    b.push(1);
    packet(0x82, b)
}

pub fn mqtt_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    b.extend_from_slice(payload);
    packet(0x30, b)
}

pub fn mqtt_puback(packet_id: u16) -> Vec<u8> {
    let mut b = vec![0x40, 0x02];
    b.extend_from_slice(&packet_id.to_be_bytes());
    b
}

/// One packet: (first byte, body).
#[derive(Debug)]
pub struct MqttPacket {
    pub first: u8,
    pub body: Vec<u8>,
}

impl MqttPacket {
    /// For a PUBLISH: (topic, packet id when QoS > 0, payload).
    pub fn publish(&self) -> (String, Option<u16>, Vec<u8>) {
        assert_eq!(self.first >> 4, 3, "not a PUBLISH: {self:?}");
        let len = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + len].to_vec()).unwrap();
        let mut at = 2 + len;
        let id = if (self.first >> 1) & 3 > 0 {
            at += 2;
            Some(u16::from_be_bytes([self.body[at - 2], self.body[at - 1]]))
        } else {
            None
        };
        (topic, id, self.body[at..].to_vec())
    }
}

/// Parses one packet from the front of `buf`, if complete.
pub fn mqtt_parse(buf: &mut Vec<u8>) -> Option<MqttPacket> {
    if buf.len() < 2 {
        return None;
    }
    let (mut len, mut mult, mut at) = (0usize, 1usize, 1usize);
    loop {
        let b = *buf.get(at)?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < at + len {
        return None;
    }
    let first = buf[0];
    let body = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some(MqttPacket { first, body })
}

/// Reads one MQTT packet from a byte stream.
pub async fn mqtt_read<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> MqttPacket {
    loop {
        if let Some(p) = mqtt_parse(buf) {
            return p;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the MQTT connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// The two copying tasks of a WebSocket bridge ([`mqtt_websocket`]).
pub struct WsBridge {
    up: tokio::task::JoinHandle<()>,
    down: tokio::task::JoinHandle<()>,
}

impl WsBridge {
    /// Waits for the upstream copy to close the WebSocket (after the stream was dropped), then stops.
    pub async fn finish(self) {
        let _ = self.up.await;
        self.down.abort();
    }
}

/// A WebSocket (subprotocol `mqtt`) on the server's HTTPS port, adapted to a byte stream for the MQTT
/// helpers: bytes written become binary messages, messages become bytes to read.
pub async fn mqtt_websocket(server: &RunningServer) -> (tokio::io::DuplexStream, WsBridge) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let tls = raw_tls(server).await;
    let mut request = "wss://localhost/$iothub/websocket".into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "mqtt");
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut theirs_read, mut theirs_write) = tokio::io::split(theirs);
    let (mut sink, mut stream) = ws.split();
    let up = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = theirs_read.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                let _ = sink.close().await;
                break;
            }
            if sink.send(Message::binary(chunk[..n].to_vec())).await.is_err() {
                break;
            }
        }
    });
    let down = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Binary(b) = msg {
                if theirs_write.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
    });
    (ours, WsBridge { up, down })
}

/// The built server binary (for tests that run it as a process).
pub const BIN: &str = env!("CARGO_BIN_EXE_dps-server");

/// Runs the binary (an admin command) with a clean environment; returns its output.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).env_clear().output().unwrap()
}

/// [`cli`], which must succeed and print JSON.
pub fn cli_json(args: &[&str]) -> serde_json::Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
