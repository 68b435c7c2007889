//! Bad input never crashes the server: each abuse gets its precise error code or a clean disconnect, and
//! afterwards the same server still provisions devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests are programs: they read files and the clock and spawn the server binary.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use dps_core::proto::sas::{build_token, SymmetricKey};
use dps_server::admin::{EnrollmentSettings, Kind};
use dps_server::server::RunningServer;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn error_code(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["errorCode"].as_u64().unwrap()
}

fn register_path(scope: &str, id: &str) -> String {
    format!("/{scope}/registrations/{id}/register?api-version=2021-10-01")
}

async fn malformed_request_line(server: &RunningServer) {
    let mut s = raw_tls(server).await;
    write_all(&mut s, b"THIS IS NOT HTTP\r\n\r\n").await;
    let reply = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

async fn oversized_bodies(server: &RunningServer) {
    let path = register_path(SCOPE, "big-1");
    // Announced and sent: drained, answered 413001, and the connection stays usable.
    let mut s = raw_tls(server).await;
    let head = format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200000\r\n\r\n");
    write_all(&mut s, head.as_bytes()).await;
    write_all(&mut s, &vec![b'a'; 200_000]).await;
    let (status, headers, body) = read_response(&mut s).await;
    assert_eq!((status, error_code(&body)), (413, 413001));
    assert_eq!(header(&headers, "x-ms-error-code"), Some("413001"));
    write_all(&mut s, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(read_response(&mut s).await.0, 200);

    // Chunked: the same.
    let mut s = raw_tls(server).await;
    let head = format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    write_all(&mut s, head.as_bytes()).await;
    for _ in 0..5 {
        write_all(&mut s, format!("{:x}\r\n", 20_000).as_bytes()).await;
        write_all(&mut s, &vec![b'{'; 20_000]).await;
        write_all(&mut s, b"\r\n").await;
    }
    write_all(&mut s, b"0\r\n\r\n").await;
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!((status, error_code(&body)), (413, 413001));
    write_all(&mut s, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(read_response(&mut s).await.0, 200);

    // Announced far beyond the limit: answered before a byte of it is read, then closed.
    let mut s = raw_tls(server).await;
    let head = format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n");
    write_all(&mut s, head.as_bytes()).await;
    let (status, headers, body) = read_response(&mut s).await;
    assert_eq!((status, error_code(&body)), (413, 413001));
    assert_eq!(header(&headers, "connection"), Some("close"));
    read_to_close(&mut s).await;
}

async fn malformed_json(server: &RunningServer) {
    let token = device_token(&device_key(), SCOPE, "bad-dev", 3600);
    let r = https(server)
        .request("PUT", &register_path(SCOPE, "bad-dev"), &[("authorization", token)], b"{not json".to_vec())
        .await
        .unwrap();
    assert_eq!((r.status, error_code(&r.body)), (400, 400001));
    assert_eq!(r.header("x-ms-error-code"), Some("400001"));
    assert_eq!(
        r.header("x-ms-request-id").unwrap(),
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["trackingId"]
    );

    let svc = service(server);
    let r = https(server)
        .request(
            "PUT",
            "/enrollmentGroups/g-json?api-version=2021-10-01",
            &[("authorization", svc.token())],
            b"[1, 2".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((r.status, error_code(&r.body)), (400, 400001));
}

/// Issue 14, defect 1: a JSON array where an object belongs was bound by position.
async fn json_arrays_are_not_objects(server: &RunningServer) {
    let token = device_token(&device_key(), SCOPE, "bi-dev-1", 3600);
    for body in [&b"[]"[..], br#"["other-dev"]"#, br#"["bi-dev-1", null, {"a":1}]"#] {
        let r = https(server)
            .request(
                "PUT",
                &register_path(SCOPE, "bi-dev-1"),
                &[("authorization", token.clone())],
                body.to_vec(),
            )
            .await
            .unwrap();
        assert_eq!((r.status, error_code(&r.body)), (400, 400001), "{}", String::from_utf8_lossy(&r.body));
    }
    let svc = service(server);
    let cases: [(&str, &str, &[u8]); 4] = [
        ("POST", "/enrollments?api-version=2021-10-01", br#"[[{"registrationId":"x"}],"create"]"#),
        ("POST", "/enrollments/query?api-version=2021-10-01", br#"["SELECT * FROM enrollments"]"#),
        ("PUT", "/enrollments/arr-1?api-version=2021-10-01", br#"["arr-1"]"#),
        (
            "PUT",
            "/enrollments/arr-2?api-version=2021-10-01",
            br#"{"registrationId":"arr-2","attestation":["symmetricKey"]}"#,
        ),
    ];
    for (method, path, body) in cases {
        let r = https(server)
            .request(method, path, &[("authorization", svc.token())], body.to_vec())
            .await
            .unwrap();
        assert_eq!(
            (r.status, error_code(&r.body)),
            (400, 400001),
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// Issue 14, defect 2: RFC 9112 §3.2 requires exactly one Host header in an HTTP/1.1 request.
async fn host_header_is_required_once(server: &RunningServer) {
    for head in
        ["GET /health HTTP/1.1\r\n\r\n", "GET /health HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n"]
    {
        let mut s = raw_tls(server).await;
        write_all(&mut s, head.as_bytes()).await;
        let (status, headers, body) = read_response(&mut s).await;
        assert_eq!((status, error_code(&body)), (400, 400000), "{head:?}");
        assert_eq!(header(&headers, "connection"), Some("close"));
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("Host header"), "{text}");
    }
}

/// Issue 14, defect 9: a WebSocket upgrade offering only subprotocols the server does not speak.
async fn websocket_upgrade_without_mqtt_is_refused(server: &RunningServer) {
    let mut s = raw_tls(server).await;
    let head =
        "GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                Sec-WebSocket-Protocol: AMQPWSB10\r\n\r\n";
    write_all(&mut s, head.as_bytes()).await;
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!((status, error_code(&body)), (400, 400000));
    assert!(String::from_utf8_lossy(&body).contains("AMQPWSB10"));
}

async fn bad_tokens(server: &RunningServer) {
    let http = https(server);
    let path = register_path(SCOPE, "bad-dev");
    let cases = [
        (device_token(&SymmetricKey::from_bytes(vec![1; 32]), SCOPE, "bad-dev", 3600), 401000),
        (device_token(&device_key(), SCOPE, "bad-dev", -3600), 401001),
        ("SharedAccessSignature garbage".to_owned(), 401004),
    ];
    for (token, code) in cases {
        let r = http.request("PUT", &path, &[("authorization", token)], b"{}".to_vec()).await.unwrap();
        assert_eq!(error_code(&r.body), code, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(u64::from(r.status), code / 1000);
    }
    let other_scope = "0ne0000FFFF";
    let token = device_token(&device_key(), other_scope, "bad-dev", 3600);
    let r = http
        .request("PUT", &register_path(other_scope, "bad-dev"), &[("authorization", token)], Vec::new())
        .await
        .unwrap();
    assert_eq!((r.status, error_code(&r.body)), (401, 401003));

    // A service token signed with the owner key, expired an hour ago.
    let cs = std::fs::read_to_string(server.data_dir.connection_string()).unwrap();
    let cs = dps_server::datadir::ConnectionString::parse(&cs).unwrap();
    let expired = build_token(&cs.key, "localhost", unix_now() - 3600, Some(&cs.key_name));
    let r = http
        .request("GET", "/enrollments/x?api-version=2021-10-01", &[("authorization", expired)], Vec::new())
        .await
        .unwrap();
    assert_eq!((r.status, error_code(&r.body)), (401, 401001));
}

async fn slow_client_is_cut_off_while_others_are_served(server: &RunningServer) {
    let mut slow = raw_tls(server).await;
    write_all(&mut slow, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await;
    // Meanwhile, another client is served.
    let r = https(server).request("GET", "/health", &[], Vec::new()).await.unwrap();
    assert_eq!(r.status, 200);
    // The slow one never finishes its headers and is disconnected (header_read_timeout).
    let rest = read_to_close(&mut slow).await;
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
}

async fn garbage_instead_of_tls(server: &RunningServer, addr: std::net::SocketAddr) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let _ = read_to_close(&mut tcp).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7]).await;
    let _ = tcp.shutdown().await;
    let _ = read_to_close(&mut tcp).await;
    // A client that connects and says nothing is dropped at the handshake deadline; meanwhile all is well.
    let _silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(https(server).request("GET", "/health", &[], Vec::new()).await.unwrap().status, 200);
}

async fn still_provisions(server: &RunningServer, id: &str) {
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    service(server).create(Kind::Enrollment, id, &settings).await.unwrap();
    let token = device_token(&device_key(), SCOPE, id, 3600);
    let r = https(server)
        .request("PUT", &register_path(SCOPE, id), &[("authorization", token)], Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_breaks_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.header_read_timeout = Duration::from_secs(1);
    cfg.tls_handshake_timeout = Duration::from_secs(1);
    let server = start(cfg).await;
    still_provisions(&server, "before-1").await;

    malformed_request_line(&server).await;
    oversized_bodies(&server).await;
    malformed_json(&server).await;
    json_arrays_are_not_objects(&server).await;
    host_header_is_required_once(&server).await;
    websocket_upgrade_without_mqtt_is_refused(&server).await;
    bad_tokens(&server).await;
    slow_client_is_cut_off_while_others_are_served(&server).await;
    garbage_instead_of_tls(&server, server.ready.https).await;
    garbage_instead_of_tls(&server, server.ready.mqtt.unwrap()).await;

    still_provisions(&server, "after-1").await;
    let state = service(&server).registration("before-1").await.unwrap();
    assert_eq!(state["status"], "assigned");
    let metrics = server.state.metrics.render();
    assert!(metrics.contains("dps_connections_refused_total{reason=\"tls_handshake\"}"), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 2;
    let server = start(cfg).await;
    let mut first = https(&server).connect().await.unwrap();
    let second = raw_tls(&server).await;
    assert_eq!(first.send("GET", "/health", &[], Vec::new()).await.unwrap().status, 200);

    // The third connection is closed before the TLS handshake.
    let mut third = TcpStream::connect(server.ready.https).await.unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), third.read(&mut byte)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    assert!(server.state.metrics.render().contains("dps_connections_refused_total{reason=\"limit\"} 1"));

    // Once one closes, new connections are served again (the server notices the close asynchronously).
    drop(second);
    let mut served = false;
    for _ in 0..100 {
        if let Ok(r) = https(&server).request("GET", "/health", &[], Vec::new()).await {
            served = r.status == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served);
    assert_eq!(first.send("GET", "/health", &[], Vec::new()).await.unwrap().status, 200);
    server.shutdown().await.unwrap();
}

/// Issue 14, defect 7: CONNECTs with credentials that fit no enrollment are refused at once (CONNACK 5) and
/// closed, so they cannot hold the connection slots a good client needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_mqtt_connects_are_refused_and_hold_no_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 3;
    let server = start(cfg).await;
    let username = dps_core::proto::mqtt::build_username(SCOPE, "nobody", "2019-03-31", None);
    let password = device_token(&device_key(), SCOPE, "nobody", 3600);
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut tls = raw_tls_to(&server, server.ready.mqtt.unwrap()).await;
        let mut buf = Vec::new();
        write_all(&mut tls, &mqtt_connect("nobody", &username, &password)).await;
        let ack = mqtt_read(&mut tls, &mut buf).await;
        assert_eq!(ack.first, 0x20, "CONNACK");
        assert_eq!(ack.body.get(1), Some(&5), "return code 5 (not authorized): {:?}", ack.body);
        assert!(read_to_close(&mut tls).await.is_empty(), "closed after the CONNACK");
        held.push(tls);
    }
    // Ten refused sessions later (three slots), a good HTTPS client is served.
    assert_eq!(https(&server).request("GET", "/health", &[], Vec::new()).await.unwrap().status, 200);
    still_provisions(&server, "after-bogus").await;
    server.shutdown().await.unwrap();
}

/// Issue 14, defect 7: one client address cannot take the whole connection cap; other addresses are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 10;
    cfg.max_connections_per_address = 3;
    let server = start(cfg).await;
    let addr = server.ready.https;
    let tcp_from = |source: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    };
    let tls_from = |source: &'static str| {
        let connector = tokio_rustls::TlsConnector::from(client_tls(&server));
        async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp_from(source).await).await.unwrap()
        }
    };
    let health = |mut tls: tokio_rustls::client::TlsStream<TcpStream>| async move {
        write_all(&mut tls, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        read_response(&mut tls).await.0
    };
    // The abuser's address holds three connections (TLS done, nothing sent)…
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_from("127.0.0.1").await);
    }
    // …and a fourth is closed at once, before any TLS.
    let mut fourth = tcp_from("127.0.0.1").await;
    assert!(read_to_close(&mut fourth).await.is_empty());
    // Another address is served meanwhile.
    assert_eq!(health(tls_from("127.0.0.2").await).await, 200);
    let metrics = server.state.metrics.render();
    assert!(metrics.contains("dps_connections_refused_total{reason=\"address_limit\"} 1"), "{metrics}");
    // A slot given back can be taken again.
    drop(held.pop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(health(tls_from("127.0.0.1").await).await, 200);
    server.shutdown().await.unwrap();
}

/// Issue 14, defect 7: a flood on the MQTT listener leaves room on the HTTPS one (each device listener may
/// take at most all but a quarter of the cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mqtt_listener_leaves_room_for_https() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 8;
    cfg.max_connections_per_address = 8;
    let server = start(cfg).await;
    // Six MQTT connections (the listener's share of eight) that never send a CONNECT…
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(raw_tls_to(&server, server.ready.mqtt.unwrap()).await);
    }
    // …a seventh MQTT connection is closed at once…
    let mut seventh = TcpStream::connect(server.ready.mqtt.unwrap()).await.unwrap();
    assert!(read_to_close(&mut seventh).await.is_empty());
    // …and HTTPS is still served.
    assert_eq!(https(&server).request("GET", "/health", &[], Vec::new()).await.unwrap().status, 200);
    drop(held);
    server.shutdown().await.unwrap();
}

// =============================================================================================================
// The table of bad input (issue 14): every case names what is sent and the precise outcome expected. Each
// group ends with a good device provisioning on the same server. Mismatches are collected per group and
// reported together.
// =============================================================================================================

/// What a case expects back.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    /// An HTTP status with this six-digit errorCode (and, when not empty, a message containing this text).
    Code(u16, u64, &'static str),
    /// An HTTP status without a DPS error body (answered by the HTTP layer).
    Status(u16),
    /// One of these statuses without a DPS error body (the HTTP layer's choice depends on how the bytes
    /// arrive).
    StatusIn(&'static [u16]),
    /// The connection closed without an answer.
    Closed,
    /// A CONNACK with this return code (nonzero: then closed).
    Connack(u8),
    /// After CONNACK 0: a SUBACK with these return codes.
    Suback(Vec<u8>),
    /// After CONNACK 0: a response PUBLISH `res/{status}` with this errorCode (0: none checked) and message.
    Res(u16, u64, &'static str),
    /// After CONNACK 0: the session closed without another packet.
    ClosedAfterConnack,
    /// A WebSocket close frame with this code.
    WsClose(u16),
}

/// What came back.
#[derive(Debug, Clone)]
enum Got {
    Http {
        status: u16,
        code: Option<u64>,
        message: String,
    },
    Closed,
    Mqtt(Vec<(u8, Vec<u8>)>, bool),
    WsClose(Option<u16>, Vec<(u8, Vec<u8>)>),
    /// Shown (through Debug) in the failure list.
    Failed(#[allow(dead_code)] String),
}

fn judge(want: &Want, got: &Got) -> bool {
    match (want, got) {
        (Want::Code(s, c, m), Got::Http { status, code, message }) => {
            s == status && Some(*c) == *code && message.contains(m)
        }
        (Want::Status(s), Got::Http { status, code, .. }) => s == status && code.is_none(),
        (Want::StatusIn(s), Got::Http { status, code, .. }) => s.contains(status) && code.is_none(),
        (Want::Closed, Got::Closed) => true,
        (Want::Closed, Got::Mqtt(p, true)) => p.is_empty(),
        (Want::Connack(rc), Got::Mqtt(p, closed)) => {
            p.first().is_some_and(|(f, b)| *f == 0x20 && b.get(1) == Some(rc)) && (*rc == 0 || *closed)
        }
        (Want::ClosedAfterConnack, Got::Mqtt(p, true)) => {
            p.len() == 1 && p[0].0 == 0x20 && p[0].1.get(1) == Some(&0)
        }
        (Want::Suback(codes), Got::Mqtt(p, _)) => {
            p.iter().any(|(f, b)| *f == 0x90 && b.get(2..) == Some(codes.as_slice()))
        }
        (Want::Res(status, code, m), Got::Mqtt(p, _)) => p.iter().any(|(f, b)| {
            if f >> 4 != 3 {
                return false;
            }
            let packet = MqttPacket { first: *f, body: b.clone() };
            let (topic, _, payload) = packet.publish();
            let body: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            topic.starts_with(&format!("$dps/registrations/res/{status}/"))
                && (*code == 0 || body["errorCode"].as_u64() == Some(*code))
                && body["message"].as_str().unwrap_or("").contains(m)
        }),
        (Want::WsClose(c), Got::WsClose(code, _)) => Some(*c) == *code,
        (Want::Connack(rc), Got::WsClose(_, p)) => {
            p.first().is_some_and(|(f, b)| *f == 0x20 && b.get(1) == Some(rc))
        }
        _ => false,
    }
}

/// Collects the outcomes of one group's cases.
#[derive(Default)]
struct Table {
    names: std::collections::BTreeSet<String>,
    failures: Vec<String>,
}

impl Table {
    fn record(&mut self, name: &str, want: &Want, got: &Got) {
        assert!(self.names.insert(name.to_owned()), "case name used twice: {name}");
        if !judge(want, got) {
            self.failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }

    async fn end_group(&mut self, server: &RunningServer, group: &str) {
        eprintln!("bad-input group '{group}' done: {} cases so far", self.names.len());
        assert!(
            self.failures.is_empty(),
            "{group}: {} failures:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
        still_provisions(server, &format!("good-after-{group}")).await;
    }
}

/// An HTTP/1.1 request with Host and (for a body or PUT/POST) Content-Length.
fn req(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "PUT" || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one response (or the close) from a raw stream.
async fn read_got<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Got {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            Ok(_) if buf.is_empty() => return Got::Closed,
            Ok(_) => {
                return Got::Failed(format!("closed inside the head: {}", String::from_utf8_lossy(&buf)))
            }
            Err(_) => return Got::Failed("no answer within 30 s".into()),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let len: usize = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if s.read_exact(&mut body).await.is_err() {
        return Got::Failed(format!("body cut short: {head}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let code = v["errorCode"].as_u64();
    if let Some(code) = code {
        let header = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-ms-error-code"))
            .map(|(_, v)| v.trim().to_owned());
        if header.as_deref() != Some(code.to_string().as_str()) || code / 1000 != u64::from(status) {
            return Got::Failed(format!("errorCode {code} vs status {status} / header {header:?}"));
        }
    }
    Got::Http { status, code, message: v["message"].as_str().unwrap_or("").to_owned() }
}

async fn http_raw(server: &RunningServer, bytes: &[u8]) -> Got {
    let mut s = raw_tls(server).await;
    if s.write_all(bytes).await.is_err() || s.flush().await.is_err() {
        return read_got(&mut s).await;
    }
    read_got(&mut s).await
}

fn tok(id: &str) -> String {
    device_token(&device_key(), SCOPE, id, 3600)
}

fn reg(id: &str) -> String {
    register_path(SCOPE, id)
}

const V: &str = "api-version=2021-10-01";

async fn run_http_cases(server: &RunningServer, table: &mut Table, cases: Vec<(String, Vec<u8>, Want)>) {
    for (name, bytes, want) in cases {
        let got = http_raw(server, &bytes).await;
        table.record(&name, &want, &got);
    }
}

fn auth(t: String) -> Vec<(&'static str, String)> {
    vec![("authorization", t)]
}

/// HTTPS request lines, paths, headers and framing.
fn http_framing_cases() -> Vec<(String, Vec<u8>, Want)> {
    let good = tok("bi-good");
    let r = reg("bi-good");
    let long_path = format!("/{SCOPE}/registrations/{}/register?{V}", "a".repeat(70_000));
    let mut c: Vec<(String, Vec<u8>, Want)> = vec![
        ("method FOO on register".into(), req("FOO", &r, &auth(good.clone()), b"{}"), Want::Code(405, 405000, "")),
        ("method DELETE on register".into(), req("DELETE", &r, &auth(good.clone()), b""), Want::Code(405, 405000, "")),
        ("method GET on register".into(), req("GET", &r, &auth(good.clone()), b""), Want::Code(405, 405000, "")),
        ("method POST on register".into(), req("POST", &r, &auth(good.clone()), b"{}"), Want::Code(405, 405000, "")),
        ("method PATCH on an enrollment".into(), req("PATCH", &format!("/enrollments/x?{V}"), &[], b"{}"), Want::Code(405, 405000, "")),
        ("lowercase method".into(), req("put", &r, &auth(good.clone()), b"{}"), Want::Code(405, 405000, "")),
        ("unknown path".into(), req("GET", &format!("/nothing/here?{V}"), &[], b""), Want::Code(404, 404000, "")),
        ("root path".into(), req("GET", "/", &[], b""), Want::Code(404, 404000, "")),
        ("scope only".into(), req("PUT", &format!("/{SCOPE}?{V}"), &[], b"{}"), Want::Code(404, 404000, "")),
        ("registrations without an id".into(), req("PUT", &format!("/{SCOPE}/registrations/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(405, 405000, "allowed: POST")),
        ("register with a trailing segment".into(), req("PUT", &format!("/{SCOPE}/registrations/bi-good/register/more?{V}"), &auth(good.clone()), b"{}"), Want::Code(404, 404000, "")),
        ("bad percent-encoding %zz".into(), req("PUT", &format!("/{SCOPE}/registrations/ab%zz/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(400, 400002, "")),
        ("truncated percent-encoding".into(), req("PUT", &format!("/{SCOPE}/registrations/ab%4/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(400, 400002, "")),
        ("percent-encoded NUL".into(), req("PUT", &format!("/{SCOPE}/registrations/ab%00/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(400, 400002, "")),
        ("percent-encoded slash".into(), req("PUT", &format!("/{SCOPE}/registrations/a%2Fb/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(400, 400002, "")),
        ("invalid UTF-8 in the path".into(), req("PUT", &format!("/{SCOPE}/registrations/a%C3%28/register?{V}"), &auth(good.clone()), b"{}"), Want::Code(400, 400002, "")),
        ("path of 70 KB".into(), req("PUT", &long_path, &[], b"{}"), Want::StatusIn(&[414, 431])),
        ("120 headers".into(), req("GET", "/health", &(0..120).map(|_| ("x-many", "1".to_owned())).collect::<Vec<_>>(), b""), Want::Status(431)),
        ("header line without a colon".into(), b"GET /health HTTP/1.1\r\nHost: localhost\r\nNoColonHere\r\n\r\n".to_vec(), Want::Status(400)),
        ("header name with a space".into(), b"GET /health HTTP/1.1\r\nHost: localhost\r\nBad Name: x\r\n\r\n".to_vec(), Want::Status(400)),
        ("NUL in a header value".into(), b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n".to_vec(), Want::Status(400)),
        ("request line without a version".into(), b"GET /health\r\n\r\n".to_vec(), Want::Status(400)),
        ("HTTP/2.0 in an HTTP/1 request line".into(), b"GET /health HTTP/2.0\r\nHost: localhost\r\n\r\n".to_vec(), Want::Status(400)),
        ("HTTP/9.9".into(), b"GET /health HTTP/9.9\r\nHost: localhost\r\n\r\n".to_vec(), Want::Status(400)),
        ("binary garbage request line".into(), vec![0x01, 0x02, 0xff, 0xfe, b'\r', b'\n', b'\r', b'\n'], Want::Status(400)),
        ("non-numeric Content-Length".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n{{}}").into_bytes(), Want::Status(400)),
        ("negative Content-Length".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nContent-Length: -2\r\n\r\n{{}}").into_bytes(), Want::Status(400)),
        ("two different Content-Lengths".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}").into_bytes(), Want::Status(400)),
        ("Content-Length and Transfer-Encoding".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(), Want::Code(401, 401004, "")),
        ("Transfer-Encoding gzip".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n{{}}").into_bytes(), Want::Status(400)),
        ("bad chunk size".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n").into_bytes(), Want::Code(400, 400000, "could not be read")),
        ("Host header twice, same value".into(), b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n".to_vec(), Want::Code(400, 400000, "exactly one Host")),
        ("body of 96 KB + 1".into(), req("PUT", &r, &auth(good.clone()), &vec![b' '; 96 * 1024 + 1]), Want::Code(413, 413001, "")),
        ("body of exactly 96 KB (not JSON)".into(), req("PUT", &r, &auth(good.clone()), &vec![b'x'; 96 * 1024]), Want::Code(400, 400001, "")),
        ("oversized body announced with Expect: 100-continue".into(), format!("PUT {r} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 200000\r\n\r\n").into_bytes(), Want::Code(413, 413001, "")),
    ];
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
    ] {
        c.push((
            format!("content type {ct}"),
            req(
                "PUT",
                &r,
                &[("authorization", good.clone()), ("content-type", ct.to_owned())],
                b"registrationId=bi-good",
            ),
            Want::Code(400, 400001, "not a valid JSON object"),
        ));
    }
    c
}

/// Non-object JSON, at any depth, and bad api-versions.
fn json_and_version_cases(svc: &str) -> Vec<(String, Vec<u8>, Want)> {
    let good = tok("bi-good");
    let r = reg("bi-good");
    let mut c = Vec::new();
    for (what, body) in [
        ("a string", &br#""bi-good""#[..]),
        ("a number", b"42"),
        ("null", b"null"),
        ("true", b"true"),
        ("a string registrationId number", br#"{"registrationId":5}"#),
        ("registrationId an array", br#"{"registrationId":["bi-good"]}"#),
        ("tpm an array", br#"{"registrationId":"bi-good","tpm":[]}"#),
        ("tpm a string", br#"{"registrationId":"bi-good","tpm":"x"}"#),
        ("trailing garbage", br#"{"registrationId":"bi-good"} x"#),
        ("truncated object", br#"{"registrationId":"#),
        ("invalid UTF-8", b"{\"registrationId\":\"\xff\"}"),
        ("deeply nested payload", &[b'['; 5000][..]),
    ] {
        c.push((
            format!("register body: {what}"),
            req("PUT", &r, &auth(good.clone()), body),
            Want::Code(400, 400001, ""),
        ));
    }
    let svc_bodies: [(&str, &str, &[u8]); 9] = [
        ("enrollment: a string", "/enrollments/j-1", br#""x""#),
        (
            "enrollment: attestation a string",
            "/enrollments/j-2",
            br#"{"registrationId":"j-2","attestation":"symmetricKey"}"#,
        ),
        (
            "enrollment: symmetricKey an array",
            "/enrollments/j-3",
            br#"{"registrationId":"j-3","attestation":{"type":"symmetricKey","symmetricKey":[]}}"#,
        ),
        (
            "enrollment: initialTwin an array",
            "/enrollments/j-4",
            br#"{"registrationId":"j-4","attestation":{"type":"symmetricKey"},"initialTwin":[]}"#,
        ),
        (
            "enrollment: reprovisionPolicy a string",
            "/enrollments/j-5",
            br#"{"registrationId":"j-5","attestation":{"type":"symmetricKey"},"reprovisionPolicy":"x"}"#,
        ),
        (
            "enrollment: capabilities a number",
            "/enrollments/j-6",
            br#"{"registrationId":"j-6","attestation":{"type":"symmetricKey"},"capabilities":1}"#,
        ),
        ("group: a number", "/enrollmentGroups/jg-1", b"7"),
        (
            "group: x509 an array",
            "/enrollmentGroups/jg-2",
            br#"{"enrollmentGroupId":"jg-2","attestation":{"type":"x509","x509":[]}}"#,
        ),
        ("certificate: properties an array", "/certificates/jc-1", br#"{"properties":[]}"#),
    ];
    for (what, path, body) in svc_bodies {
        c.push((
            format!("service body {what}"),
            req("PUT", &format!("{path}?{V}"), &auth(svc.to_owned()), body),
            Want::Code(400, 400001, ""),
        ));
    }
    let base = format!("/{SCOPE}/registrations/bi-good/register");
    for (what, query) in [
        ("empty", "?api-version=".to_owned()),
        ("not a date", "?api-version=latest".to_owned()),
        ("with a NUL", "?api-version=2021-10-01%00".to_owned()),
        ("of 5 KB", format!("?api-version={}", "9".repeat(5000))),
    ] {
        c.push((
            format!("device api-version {what}"),
            req("PUT", &format!("{base}{query}"), &auth(good.clone()), b"{}"),
            Want::Code(400, 400007, ""),
        ));
    }
    for (what, query) in [("empty", "?api-version="), ("not a date", "?api-version=x")] {
        c.push((
            format!("service api-version {what}"),
            req("GET", &format!("/enrollments/x{query}"), &auth(svc.to_owned()), b""),
            Want::Code(400, 400007, ""),
        ));
    }
    c
}

/// Registration IDs, ID scopes and operation IDs of bad shape (spec §11).
fn identifier_cases() -> Vec<(String, Vec<u8>, Want)> {
    let mut c = Vec::new();
    for (what, id) in [
        ("starting with a dash", "-abc".to_owned()),
        ("starting with a dot", ".abc".to_owned()),
        ("ending with a dot", "abc.".to_owned()),
        ("ending with a colon", "abc:".to_owned()),
        ("ending with an underscore", "abc_".to_owned()),
        ("with a space", "a%20b".to_owned()),
        ("with a star", "a*b".to_owned()),
        ("with a dollar", "a$b".to_owned()),
        ("with a non-ASCII letter", "caf%C3%A9".to_owned()),
        ("of 129 characters", "a".repeat(129)),
    ] {
        let path = format!("/{SCOPE}/registrations/{id}/register?{V}");
        c.push((
            format!("registration ID {what}"),
            req("PUT", &path, &auth(tok(&id)), b"{}"),
            Want::Code(400, 400002, ""),
        ));
    }
    let path = format!("/{SCOPE}/registrations/bi-good/register?{V}");
    c.push((
        "body registrationId differs from the path".into(),
        req("PUT", &path, &auth(tok("bi-good")), br#"{"registrationId":"other"}"#),
        Want::Code(400, 400003, ""),
    ));
    for (what, scope, code) in [
        ("of another instance", "0ne0000FFFF", 401003u64),
        ("without the 0ne prefix", "1ab0000A0B1", 400002),
        ("too short", "0ne0A", 400002),
    ] {
        let path = format!("/{scope}/registrations/bi-good/register?{V}");
        c.push((
            format!("ID scope {what}"),
            req("PUT", &path, &auth(device_token(&device_key(), scope, "bi-good", 3600)), b"{}"),
            Want::Code(
                (code / 1000) as u16,
                code,
                if code == 400002 { "followed by 8 hexadecimal digits" } else { "" },
            ),
        ));
    }
    for (what, op, want) in [
        ("with dots only", "..".to_owned(), Want::Code(404, 404204, "does not exist")),
        ("of 300 characters", "a".repeat(300), Want::Code(400, 400002, "")),
        ("with a percent-encoded NUL", "4.abc%00".to_owned(), Want::Code(400, 400002, "")),
        ("with a space", "4.a%20b".to_owned(), Want::Code(400, 400002, "")),
        (
            "well formed but unknown",
            "4.0123456789abcdef.00000000-0000-0000-0000-000000000000".to_owned(),
            Want::Code(404, 404204, "does not exist"),
        ),
    ] {
        let path = format!("/{SCOPE}/registrations/bi-good/operations/{op}?{V}");
        c.push((format!("operation ID {what}"), req("GET", &path, &auth(tok("bi-good")), b""), want));
    }
    c
}

/// Every malformed SAS variant on the device API, and service-API tokens.
fn sas_cases(service_token: &str, service_key: &SymmetricKey) -> Vec<(String, Vec<u8>, Want)> {
    let r = reg("bi-good");
    let good = tok("bi-good");
    let resource =
        dps_core::proto::sas::encode_resource(&dps_core::proto::sas::device_resource(SCOPE, "bi-good"));
    let se = unix_now() + 3600;
    let sig = good.split("sig=").nth(1).unwrap().split('&').next().unwrap().to_owned();
    let mut c = Vec::new();
    for (what, token, code) in [
        ("missing sr", format!("SharedAccessSignature sig={sig}&se={se}&skn=registration"), 401004u64),
        ("missing sig", format!("SharedAccessSignature sr={resource}&se={se}&skn=registration"), 401004),
        ("missing se", format!("SharedAccessSignature sr={resource}&sig={sig}&skn=registration"), 401004),
        (
            "se not a number",
            format!("SharedAccessSignature sr={resource}&sig={sig}&se=soon&skn=registration"),
            401004,
        ),
        (
            "se negative",
            format!("SharedAccessSignature sr={resource}&sig={sig}&se=-5&skn=registration"),
            401004,
        ),
        (
            "se of 40 digits",
            format!("SharedAccessSignature sr={resource}&sig={sig}&se={}&skn=registration", "9".repeat(40)),
            401004,
        ),
        (
            "sig not base64",
            format!("SharedAccessSignature sr={resource}&sig=%21%21%21&se={se}&skn=registration"),
            401004,
        ),
        ("sig empty", format!("SharedAccessSignature sr={resource}&sig=&se={se}&skn=registration"), 401004),
        (
            "field twice",
            format!("SharedAccessSignature sr={resource}&sr={resource}&sig={sig}&se={se}&skn=registration"),
            401004,
        ),
        ("Bearer scheme", "Bearer abc.def.ghi".to_owned(), 401004),
        ("Basic scheme", "Basic dXNlcjpwYXNz".to_owned(), 401004),
        ("empty", String::new(), 401004),
        ("scheme only", "SharedAccessSignature".to_owned(), 401004),
        ("expired a day ago", device_token(&device_key(), SCOPE, "bi-good", -86_400), 401001),
        ("wrong key", device_token(&SymmetricKey::from_bytes(vec![7; 32]), SCOPE, "bi-good", 3600), 401000),
        ("wrong sr (other device)", device_token(&device_key(), SCOPE, "bi-other", 3600), 401000),
        ("wrong sr (other scope)", device_token(&device_key(), "0ne0000FFFF", "bi-good", 3600), 401000),
        ("sig of another expiry", good.replace(&format!("se={se}"), &format!("se={}", se + 1)), 401000),
    ] {
        let headers = if what == "empty" { vec![("authorization", String::new())] } else { auth(token) };
        c.push((format!("device SAS {what}"), req("PUT", &r, &headers, b"{}"), Want::Code(401, code, "")));
    }
    c.push((
        "device request without authorization".into(),
        req("PUT", &r, &[], b"{}"),
        Want::Code(401, 401004, ""),
    ));
    let path = format!("/enrollments/x?{V}");
    let expiry = unix_now() + 3600;
    for (what, token, code) in [
        ("missing", None, 401004u64),
        ("garbage", Some("SharedAccessSignature nonsense".to_owned()), 401004),
        (
            "wrong key",
            Some(build_token(
                &SymmetricKey::from_bytes(vec![9; 32]),
                "localhost",
                expiry,
                Some("provisioningserviceowner"),
            )),
            401000,
        ),
        ("unknown policy", Some(build_token(service_key, "localhost", expiry, Some("nobody"))), 401000),
        (
            "wrong audience",
            Some(build_token(service_key, "elsewhere.example", expiry, Some("provisioningserviceowner"))),
            401000,
        ),
        ("a device token", Some(tok("bi-good")), 401000),
    ] {
        let headers: Vec<(&str, String)> = token.map(|t| ("authorization", t)).into_iter().collect();
        c.push((format!("service SAS {what}"), req("GET", &path, &headers, b""), Want::Code(401, code, "")));
    }
    let _ = service_token;
    c
}

/// The service API: If-Match, continuation tokens, queries, bulk operations, certificates.
fn service_cases(token: &str) -> Vec<(String, Vec<u8>, Want)> {
    let a = |extra: &[(&'static str, String)]| {
        let mut h = vec![("authorization", token.to_owned())];
        h.extend_from_slice(extra);
        h
    };
    let enrollment = br#"{"registrationId":"bi-good","attestation":{"type":"symmetricKey"}}"#;
    let mut c: Vec<(String, Vec<u8>, Want)> = vec![
        (
            "If-Match of another etag".into(),
            req(
                "PUT",
                &format!("/enrollments/bi-good?{V}"),
                &a(&[("if-match", "\"nope\"".into())]),
                enrollment,
            ),
            Want::Code(412, 412001, ""),
        ),
        (
            "If-Match on a missing enrollment".into(),
            req(
                "PUT",
                &format!("/enrollments/bi-none?{V}"),
                &a(&[("if-match", "\"nope\"".into())]),
                br#"{"registrationId":"bi-none","attestation":{"type":"symmetricKey"}}"#,
            ),
            Want::Code(404, 404201, "does not exist"),
        ),
        (
            "If-Match garbage on delete".into(),
            req("DELETE", &format!("/enrollments/bi-good?{V}"), &a(&[("if-match", "garbage".into())]), b""),
            Want::Code(412, 412001, ""),
        ),
        (
            "If-Match empty".into(),
            req("PUT", &format!("/enrollments/bi-good?{V}"), &a(&[("if-match", String::new())]), enrollment),
            Want::Code(400, 400002, "is not valid"),
        ),
        (
            "continuation token garbage".into(),
            req(
                "POST",
                &format!("/enrollments/query?{V}"),
                &a(&[("x-ms-continuation", "!!!".into())]),
                br#"{"query":"SELECT * FROM enrollments"}"#,
            ),
            Want::Code(400, 400000, ""),
        ),
        (
            "max item count not a number".into(),
            req(
                "POST",
                &format!("/enrollments/query?{V}"),
                &a(&[("x-ms-max-item-count", "many".into())]),
                br#"{"query":"SELECT * FROM enrollments"}"#,
            ),
            Want::Code(400, 400000, ""),
        ),
        (
            "max item count negative".into(),
            req(
                "POST",
                &format!("/enrollments/query?{V}"),
                &a(&[("x-ms-max-item-count", "-1".into())]),
                br#"{"query":"SELECT * FROM enrollments"}"#,
            ),
            Want::Code(400, 400000, ""),
        ),
    ];
    for (what, body) in [
        ("not SQL", &br#"{"query":"DROP TABLE enrollments"}"#[..]),
        ("unknown collection", br#"{"query":"SELECT * FROM devices"}"#),
        ("a number", br#"{"query":5}"#),
        ("unterminated string", br#"{"query":"SELECT * FROM enrollments WHERE registrationId = 'x"}"#),
    ] {
        c.push((
            format!("query {what}"),
            req("POST", &format!("/enrollments/query?{V}"), &a(&[]), body),
            Want::Code(400, if what == "a number" { 400001 } else { 400006 }, ""),
        ));
    }
    let item =
        |i: usize| format!(r#"{{"registrationId":"bulk-{i}","attestation":{{"type":"symmetricKey"}}}}"#);
    let eleven: Vec<String> = (0..11).map(item).collect();
    for (what, body, want) in [
        ("with 0 items", r#"{"mode":"create","enrollments":[]}"#.to_owned(), Want::Code(400, 400005, "")),
        (
            "with 11 items",
            format!(r#"{{"mode":"create","enrollments":[{}]}}"#, eleven.join(",")),
            Want::Code(400, 400005, ""),
        ),
        (
            "with an unknown mode",
            format!(r#"{{"mode":"explode","enrollments":[{}]}}"#, item(0)),
            Want::Code(400, 400001, ""),
        ),
        ("without enrollments", r#"{"mode":"create"}"#.to_owned(), Want::Code(400, 400001, "")),
    ] {
        c.push((
            format!("bulk {what}"),
            req("POST", &format!("/enrollments?{V}"), &a(&[]), body.as_bytes()),
            want,
        ));
    }
    let leaf = {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["leaf.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    };
    for (what, name, body, want) in [
        (
            "garbage",
            "c-garbage",
            r#"{"properties":{"certificate":"not a certificate"}}"#.to_owned(),
            Want::Code(400, 400009, ""),
        ),
        (
            "garbage base64",
            "c-b64",
            r#"{"properties":{"certificate":"AAAA"}}"#.to_owned(),
            Want::Code(400, 400009, ""),
        ),
        (
            "a leaf, not a CA",
            "c-leaf",
            serde_json::json!({"properties":{"certificate": leaf}}).to_string(),
            Want::Code(400, 400009, ""),
        ),
        ("without the certificate", "c-none", r#"{"properties":{}}"#.to_owned(), Want::Code(400, 400009, "")),
        (
            "name with a space",
            "c%20d",
            r#"{"properties":{"certificate":"x"}}"#.to_owned(),
            Want::Code(400, 400002, ""),
        ),
        (
            "name of 300 characters",
            &"c".repeat(300),
            r#"{"properties":{"certificate":"x"}}"#.to_owned(),
            Want::Code(400, 400002, ""),
        ),
        (
            "name with a star",
            "c*d",
            r#"{"properties":{"certificate":"x"}}"#.to_owned(),
            Want::Code(400, 400002, ""),
        ),
    ] {
        c.push((
            format!("certificate upload {what}"),
            req("PUT", &format!("/certificates/{name}?{V}"), &a(&[]), body.as_bytes()),
            want,
        ));
    }
    c.push((
        "certificate verify of a missing certificate".into(),
        req(
            "POST",
            &format!("/certificates/c-missing/verify?{V}"),
            &a(&[("if-match", "*".into())]),
            br#"{"certificate":"x"}"#,
        ),
        Want::Code(400, 400009, "neither PEM nor base64 DER"),
    ));
    c.push((
        "enrollment with a bad registration ID".into(),
        req(
            "PUT",
            &format!("/enrollments/-bad-?{V}"),
            &a(&[]),
            br#"{"registrationId":"-bad-","attestation":{"type":"symmetricKey"}}"#,
        ),
        Want::Code(400, 400002, ""),
    ));
    c.push(("enrollment with a bad primary key".into(), req("PUT", &format!("/enrollments/bi-key?{V}"), &a(&[]), br#"{"registrationId":"bi-key","attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":"%%%"}}}"#), Want::Code(400, 400004, "")));
    c
}

// --- MQTT -------------------------------------------------------------------------------------------------

fn enc(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn pkt(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
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
    out.extend(body);
    out
}

/// A CONNECT with every part chosen.
fn connect_with(
    name: &str,
    level: u8,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Vec<u8> {
    let mut b = Vec::new();
    enc(name.as_bytes(), &mut b);
    b.push(level);
    b.push(0x02 | if username.is_some() { 0x80 } else { 0 } | if password.is_some() { 0x40 } else { 0 });
    b.extend_from_slice(&60u16.to_be_bytes());
    enc(client_id.as_bytes(), &mut b);
    if let Some(u) = username {
        enc(u.as_bytes(), &mut b);
    }
    if let Some(p) = password {
        enc(p.as_bytes(), &mut b);
    }
    pkt(0x10, b)
}

fn username(id: &str) -> String {
    dps_core::proto::mqtt::build_username(SCOPE, id, "2019-03-31", None)
}

fn good_connect(id: &str) -> Vec<u8> {
    mqtt_connect(id, &username(id), &tok(id))
}

fn register_topic(rid: &str) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
}

/// Writes `bytes`, then reads packets until `packets` have arrived (then stops) or the server closes.
async fn mqtt_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
    packets: usize,
) -> Got {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut buf = Vec::new();
    let mut got = Vec::new();
    loop {
        while let Some(p) = mqtt_parse(&mut buf) {
            got.push((p.first, p.body));
        }
        if got.len() >= packets {
            return Got::Mqtt(got, false);
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Got::Mqtt(got, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Got::Failed(format!("no close within 30 s after {got:?}")),
        }
    }
}

/// MQTT cases: (name, bytes, how many packets to wait for (usize::MAX: until the close), expected).
fn mqtt_cases() -> Vec<(String, Vec<u8>, usize, Want)> {
    let id = "bi-mqtt";
    let good = || good_connect(id);
    let after = |extra: &[u8]| {
        let mut b = good();
        b.extend_from_slice(extra);
        b
    };
    let all = usize::MAX;
    let mut big = Vec::new();
    enc(register_topic("1").as_bytes(), &mut big);
    big.extend(vec![b'x'; 100_001]);
    let oversized = pkt(0x30, big);
    let mut truncated = mqtt_publish(&register_topic("1"), b"{}");
    truncated.truncate(6);
    let mut c = vec![
        ("CONNECT MQTT level 3".into(), connect_with("MQTT", 3, id, Some(&username(id)), Some(&tok(id))), all, Want::Connack(1)),
        ("CONNECT MQTT level 5".into(), connect_with("MQTT", 5, id, Some(&username(id)), Some(&tok(id))), all, Want::Connack(1)),
        ("CONNECT MQIsdp level 3".into(), connect_with("MQIsdp", 3, id, Some(&username(id)), Some(&tok(id))), all, Want::Connack(1)),
        ("CONNECT protocol name XMPP".into(), connect_with("XMPP", 4, id, Some(&username(id)), Some(&tok(id))), all, Want::Closed),
        ("CONNECT empty client ID".into(), connect_with("MQTT", 4, "", Some(&username(id)), Some(&tok(id))), all, Want::Connack(2)),
        ("CONNECT client ID of another device".into(), connect_with("MQTT", 4, "bi-other", Some(&username(id)), Some(&tok(id))), all, Want::Connack(2)),
        ("CONNECT client ID not a registration ID".into(), connect_with("MQTT", 4, "-bad-", Some(&username(id)), Some(&tok(id))), all, Want::Connack(2)),
        ("CONNECT without a username".into(), connect_with("MQTT", 4, id, None, None), all, Want::Connack(4)),
        ("CONNECT username garbage".into(), connect_with("MQTT", 4, id, Some("garbage"), Some(&tok(id))), all, Want::Connack(4)),
        ("CONNECT username with a bad registration ID".into(), connect_with("MQTT", 4, "-x", Some(&username("-x")), Some(&tok("-x"))), all, Want::Connack(4)),
        ("CONNECT username of another scope".into(), connect_with("MQTT", 4, id, Some(&dps_core::proto::mqtt::build_username("0ne0000FFFF", id, "2019-03-31", None)), Some(&tok(id))), all, Want::Connack(5)),
        ("CONNECT wrong SAS key".into(), connect_with("MQTT", 4, id, Some(&username(id)), Some(&device_token(&SymmetricKey::from_bytes(vec![3; 32]), SCOPE, id, 3600))), all, Want::Connack(5)),
        ("CONNECT expired SAS".into(), connect_with("MQTT", 4, id, Some(&username(id)), Some(&device_token(&device_key(), SCOPE, id, -86_400))), all, Want::Connack(5)),
        ("CONNECT SAS garbage".into(), connect_with("MQTT", 4, id, Some(&username(id)), Some("SharedAccessSignature x")), all, Want::Connack(5)),
        ("CONNECT without a password or certificate".into(), connect_with("MQTT", 4, id, Some(&username(id)), None), all, Want::Connack(5)),
        ("PINGREQ before CONNECT".into(), vec![0xC0, 0], all, Want::Closed),
        ("SUBSCRIBE before CONNECT".into(), mqtt_subscribe(1, "$dps/registrations/res/#"), all, Want::Closed),
        ("PUBLISH before CONNECT".into(), mqtt_publish(&register_topic("1"), b"{}"), all, Want::Closed),
        ("reserved packet type 0".into(), vec![0x00, 0], all, Want::Closed),
        ("reserved packet type 15".into(), vec![0xF0, 0], all, Want::Closed),
        ("remaining length of five bytes".into(), vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f], all, Want::Closed),
        ("CONNECT with bad flags (reserved bit)".into(), { let mut b = good(); b[0] = 0x11; b }, all, Want::Closed),
        ("second CONNECT".into(), after(&good()), all, Want::ClosedAfterConnack),
        ("QoS 2 PUBLISH".into(), after(&pkt(0x34, { let mut b = Vec::new(); enc(register_topic("1").as_bytes(), &mut b); b.extend_from_slice(&[0, 1]); b.extend_from_slice(b"{}"); b })), all, Want::ClosedAfterConnack),
        ("PUBREL from the client".into(), after(&[0x62, 2, 0, 1]), all, Want::ClosedAfterConnack),
        ("CONNACK from the client".into(), after(&[0x20, 2, 0, 0]), all, Want::ClosedAfterConnack),
        ("PUBLISH on a topic without $rid".into(), after(&mqtt_publish("devices/x/messages", b"{}")), all, Want::ClosedAfterConnack),
        ("PUBLISH with an invalid UTF-8 topic".into(), after(&pkt(0x30, { let mut b = Vec::new(); enc(&[0xff, 0xfe], &mut b); b.extend_from_slice(b"{}"); b })), all, Want::ClosedAfterConnack),
        ("oversized PUBLISH".into(), after(&oversized), all, Want::ClosedAfterConnack),
        ("truncated PUBLISH".into(), after(&truncated), all, Want::ClosedAfterConnack),
        ("SUBSCRIBE to #".into(), after(&mqtt_subscribe(2, "#")), 2, Want::Suback(vec![0x80])),
        ("SUBSCRIBE to another device's topics".into(), after(&mqtt_subscribe(3, "$dps/registrations/res/+/bi-other")), 2, Want::Suback(vec![0x80])),
        ("SUBSCRIBE to the hub's topics".into(), after(&mqtt_subscribe(4, "devices/bi-mqtt/messages/devicebound/#")), 2, Want::Suback(vec![0x80])),
        ("PUBLISH on an unknown request topic".into(), after(&mqtt_publish("$dps/registrations/PUT/iotdps-explode/?$rid=7", b"{}")), 2, Want::Res(404, 0, "")),
        ("PUBLISH poll without an operationId".into(), after(&mqtt_publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8", b"")), 2, Want::Res(400, 0, "")),
        ("PUBLISH register with a JSON array".into(), after(&mqtt_publish(&register_topic("9"), b"[1]")), 2, Want::Res(400, 400001, "")),
        ("PUBLISH register with another registrationId".into(), after(&mqtt_publish(&register_topic("10"), br#"{"registrationId":"bi-other"}"#)), 2, Want::Res(400, 400003, "")),
        ("PUBLISH register with a TPM body".into(), after(&mqtt_publish(&register_topic("11"), br#"{"registrationId":"bi-mqtt","tpm":{"endorsementKey":"AAAA"}}"#)), 2, Want::Res(400, 400000, "TPM")),
        ("PUBLISH poll of an unknown operation".into(), after(&mqtt_publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=12&operationId=4.0123456789abcdef.00000000-0000-0000-0000-000000000000", b"")), 2, Want::Res(404, 0, "")),
    ];
    c.push((
        "PUBLISH register over 96 KB".into(),
        after(&mqtt_publish(&register_topic("13"), &vec![b' '; 96 * 1024 + 1])),
        2,
        Want::Res(413, 413001, ""),
    ));
    c
}

async fn run_mqtt_cases(server: &RunningServer, table: &mut Table, websocket: bool) {
    for (name, bytes, packets, want) in mqtt_cases() {
        let (name, got) = if websocket {
            let (mut s, bridge) = mqtt_websocket(server).await;
            let got = mqtt_exchange(&mut s, &bytes, packets).await;
            drop(s);
            bridge.finish().await;
            (format!("websocket: {name}"), got)
        } else {
            let mut s = raw_tls_to(server, server.ready.mqtt.unwrap()).await;
            (format!("mqtt: {name}"), mqtt_exchange(&mut s, &bytes, packets).await)
        };
        table.record(&name, &want, &got);
    }
}

// --- WebSocket ----------------------------------------------------------------------------------------------

fn upgrade(extra: &str, method: &str) -> Vec<u8> {
    format!(
        "{method} /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn websocket_upgrade_cases() -> Vec<(String, Vec<u8>, Want)> {
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let proto = "Sec-WebSocket-Protocol: mqtt\r\n";
    vec![
        (
            "upgrade without Sec-WebSocket-Key".into(),
            upgrade(&format!("{version}{proto}"), "GET"),
            Want::Code(400, 400000, "Sec-WebSocket-Key"),
        ),
        (
            "upgrade with a short Sec-WebSocket-Key".into(),
            upgrade(&format!("Sec-WebSocket-Key: abcd\r\n{version}{proto}"), "GET"),
            Want::Code(400, 400000, "16 bytes"),
        ),
        (
            "upgrade with two Sec-WebSocket-Keys".into(),
            upgrade(&format!("{key}{key}{version}{proto}"), "GET"),
            Want::Code(400, 400000, "more than one"),
        ),
        (
            "upgrade with version 8".into(),
            upgrade(&format!("{key}Sec-WebSocket-Version: 8\r\n{proto}"), "GET"),
            Want::Code(400, 400000, "not 13"),
        ),
        (
            "upgrade without a version".into(),
            upgrade(&format!("{key}{proto}"), "GET"),
            Want::Code(400, 400000, "not 13"),
        ),
        (
            "upgrade by POST".into(),
            upgrade(&format!("{key}{version}{proto}"), "POST"),
            Want::Code(400, 400000, "must use GET"),
        ),
        (
            "upgrade offering mqttv5 only".into(),
            upgrade(&format!("{key}{version}Sec-WebSocket-Protocol: mqttv5\r\n"), "GET"),
            Want::Code(400, 400000, "mqttv5"),
        ),
    ]
}

/// A WebSocket (subprotocol mqtt); sends `messages`, then reads until the close frame.
async fn websocket_frames(
    server: &RunningServer,
    messages: Vec<tokio_tungstenite::tungstenite::Message>,
) -> Got {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let tls = raw_tls(server).await;
    let mut request = "wss://localhost/$iothub/websocket".into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    for m in messages {
        if ws.send(m).await.is_err() {
            break;
        }
    }
    let mut packets = Vec::new();
    let mut buf = Vec::new();
    let read = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    buf.extend_from_slice(&b);
                    while let Some(p) = mqtt_parse(&mut buf) {
                        packets.push((p.first, p.body));
                    }
                }
                Ok(Message::Close(frame)) => return Some(frame.map(|f| u16::from(f.code))),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(Some(code)) => Got::WsClose(code, packets),
        Ok(None) => Got::Failed(format!("no close frame; packets {packets:?}")),
        Err(_) => Got::Failed("no close within 30 s".into()),
    }
}

async fn run_websocket_frame_cases(server: &RunningServer, table: &mut Table) {
    use tokio_tungstenite::tungstenite::Message;
    let cases: Vec<(&str, Vec<Message>, Want)> = vec![
        ("a text frame first", vec![Message::text("CONNECT")], Want::WsClose(1002)),
        ("garbage binary first", vec![Message::binary(vec![0x00, 0x01, 0x02])], Want::WsClose(1002)),
        ("a PINGREQ first", vec![Message::binary(vec![0xC0, 0x00])], Want::WsClose(1002)),
        ("a message over the size limit", vec![Message::binary(vec![0x30; 200_000])], Want::WsClose(1009)),
        (
            "CONNECT level 3 over WebSocket",
            vec![Message::binary(connect_with(
                "MQTT",
                3,
                "bi-mqtt",
                Some(&username("bi-mqtt")),
                Some(&tok("bi-mqtt")),
            ))],
            Want::Connack(1),
        ),
        (
            "a text frame after CONNECT",
            vec![Message::binary(good_connect("bi-mqtt")), Message::text("hi")],
            Want::WsClose(1002),
        ),
    ];
    for (name, messages, want) in cases {
        let got = websocket_frames(server, messages).await;
        table.record(&format!("websocket frames: {name}"), &want, &got);
    }
}

// --- TLS and X.509 --------------------------------------------------------------------------------------------

async fn tls_garbage(addr: std::net::SocketAddr, bytes: &[u8]) -> Got {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut sink = [0u8; 1024];
    let read = async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), read).await {
        Ok(()) => Got::Closed,
        Err(_) => Got::Failed("not closed within 30 s".into()),
    }
}

fn tls_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "a kilobyte of random bytes",
            (0..1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
        ),
        ("an HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("an SSLv2 ClientHello", vec![0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10]),
        ("a handshake record of length zero", vec![0x16, 0x03, 0x03, 0x00, 0x00]),
        ("an alert record first", vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
        ("an MQTT CONNECT in clear text", good_connect("bi-mqtt")),
    ]
}

struct X509Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    der: rustls_pki_types::CertificateDer<'static>,
    pem: String,
}

fn x509_ca(cn: &str, parent: Option<&X509Ca>) -> X509Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = match parent {
        Some(p) => params.signed_by(&key, &rcgen::Issuer::from_params(&p.params, &p.key)).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    X509Ca { params, key, der: cert.der().clone(), pem: cert.pem() }
}

/// A leaf for `cn` (signed by `parent`, or self-signed), optionally already expired.
fn x509_leaf(
    cn: &str,
    parent: Option<&X509Ca>,
    expired: bool,
) -> (rustls_pki_types::CertificateDer<'static>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let cert = match parent {
        Some(p) => params.signed_by(&key, &rcgen::Issuer::from_params(&p.params, &p.key)).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.der().clone(), key)
}

/// Mutual TLS to `addr` presenting `chain` (leaf first).
async fn tls_with_cert(
    server: &RunningServer,
    addr: std::net::SocketAddr,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: &rcgen::KeyPair,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(server.data_dir.ca_cert()).unwrap();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ClientConfig::builder_with_provider(dps_server::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn run_x509_cases(server: &RunningServer, table: &mut Table) {
    let svc = service(server);
    let root = x509_ca("bi-root", None);
    svc.upload_certificate("bi-root", &root.pem, true, None).await.unwrap();
    let group = serde_json::json!({"enrollmentGroupId": "bi-x509",
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "bi-root"}}}});
    svc.call("PUT", "/enrollmentGroups/bi-x509", Some(&group), &[]).await.unwrap();
    let unverified = x509_ca("bi-unverified", None);
    svc.upload_certificate("bi-unverified", &unverified.pem, false, None).await.unwrap();
    let mut chain_cas = vec![x509_ca("bi-long-0", Some(&root))];
    for i in 1..12 {
        let next = x509_ca(&format!("bi-long-{i}"), chain_cas.last());
        chain_cas.push(next);
    }
    type Leaf = (rustls_pki_types::CertificateDer<'static>, rcgen::KeyPair);
    type Case<'a> = (&'a str, &'a str, Leaf, Vec<rustls_pki_types::CertificateDer<'static>>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("self-signed, not enrolled", "x-self", x509_leaf("x-self", None, false), vec![], ""),
        (
            "CN differs from the registration ID",
            "x-claimed",
            x509_leaf("x-actual", Some(&root), false),
            vec![],
            "x-actual",
        ),
        ("expired", "x-expired", x509_leaf("x-expired", Some(&root), true), vec![], "expired"),
        (
            "chain of 13 certificates",
            "x-long",
            x509_leaf("x-long", chain_cas.last(), false),
            chain_cas.iter().rev().map(|c| c.der.clone()).collect(),
            "",
        ),
        (
            "signed by an unverified CA",
            "x-unverified",
            x509_leaf("x-unverified", Some(&unverified), false),
            vec![unverified.der.clone()],
            "",
        ),
        (
            "signed by an unknown CA",
            "x-unknown",
            x509_leaf("x-unknown", Some(&x509_ca("bi-stranger", None)), false),
            vec![],
            "",
        ),
    ];
    for (what, id, (leaf, key), rest, message) in cases {
        let mut chain = vec![leaf];
        chain.extend(rest);
        let mut s = tls_with_cert(server, server.ready.https, chain.clone(), &key).await;
        let _ = s
            .write_all(&req("PUT", &reg(id), &[], format!(r#"{{"registrationId":"{id}"}}"#).as_bytes()))
            .await;
        let got = read_got(&mut s).await;
        table.record(&format!("x509 https: {what}"), &Want::Code(401, 401002, message), &got);
        let mut s = tls_with_cert(server, server.ready.mqtt.unwrap(), chain, &key).await;
        let mut bytes = connect_with("MQTT", 4, id, Some(&username(id)), None);
        bytes
            .extend(mqtt_publish(&register_topic("1"), format!(r#"{{"registrationId":"{id}"}}"#).as_bytes()));
        let got = mqtt_exchange(&mut s, &bytes, 2).await;
        table.record(&format!("x509 mqtt: {what}"), &Want::Res(401, 401002, message), &got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_of_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.header_read_timeout = Duration::from_secs(2);
    cfg.tls_handshake_timeout = Duration::from_secs(2);
    // The table makes well over a hundred failed authentications from one address.
    cfg.auth_failures.burst = 100_000;
    let server = start(cfg).await;
    let svc = service(&server);
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    for id in ["bi-good", "bi-mqtt"] {
        svc.create(Kind::Enrollment, id, &settings).await.unwrap();
    }
    let cs = std::fs::read_to_string(server.data_dir.connection_string()).unwrap();
    let cs = dps_server::datadir::ConnectionString::parse(&cs).unwrap();
    let mut table = Table::default();

    run_http_cases(&server, &mut table, http_framing_cases()).await;
    table.end_group(&server, "framing").await;
    run_http_cases(&server, &mut table, json_and_version_cases(&svc.token())).await;
    table.end_group(&server, "json").await;
    run_http_cases(&server, &mut table, identifier_cases()).await;
    table.end_group(&server, "identifiers").await;
    run_http_cases(&server, &mut table, sas_cases(&svc.token(), &cs.key)).await;
    table.end_group(&server, "sas").await;
    run_http_cases(&server, &mut table, service_cases(&svc.token())).await;
    table.end_group(&server, "service").await;
    run_mqtt_cases(&server, &mut table, false).await;
    table.end_group(&server, "mqtt").await;
    run_http_cases(&server, &mut table, websocket_upgrade_cases()).await;
    run_websocket_frame_cases(&server, &mut table).await;
    table.end_group(&server, "websocket").await;
    for (listener, addr) in [("https", server.ready.https), ("mqtt", server.ready.mqtt.unwrap())] {
        for (what, bytes) in tls_cases() {
            let got = tls_garbage(addr, &bytes).await;
            table.record(&format!("tls {listener}: {what}"), &Want::Closed, &got);
        }
        // A client that connects and stalls is dropped at the handshake deadline.
        let got = tls_garbage(addr, &[0x16, 0x03]).await;
        table.record(&format!("tls {listener}: handshake stall"), &Want::Closed, &got);
    }
    table.end_group(&server, "tls").await;
    run_x509_cases(&server, &mut table).await;
    table.end_group(&server, "x509").await;

    let total = table.names.len();
    println!("{total} distinct bad-input cases");
    assert!(total >= 150, "only {total} cases");
    server.shutdown().await.unwrap();
}

// --- The failed-authentication limiter (401 storms) -----------------------------------------------------------

/// One register from `source` with `token`: (status, errorCode, Retry-After).
async fn register_from(
    server: &RunningServer,
    source: &str,
    id: &str,
    token: String,
) -> (u16, Option<u64>, Option<u64>) {
    let mut s = tls_from(server, server.ready.https, source).await;
    write_all(&mut s, &req("PUT", &reg(id), &auth(token), b"{}")).await;
    let (status, headers, body) = read_response(&mut s).await;
    let code = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["errorCode"].as_u64());
    (status, code, header(&headers, "retry-after").and_then(|v| v.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_storm_is_throttled_per_address_while_good_devices_elsewhere_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auth_failures.per_minute = 60;
    cfg.auth_failures.burst = 5;
    let server = start(cfg).await;
    let settings =
        EnrollmentSettings { primary_key: Some(device_key().to_base64()), ..EnrollmentSettings::default() };
    for id in ["storm-good-1", "storm-good-2", "storm-good-3", "storm-mqtt"] {
        service(&server).create(Kind::Enrollment, id, &settings).await.unwrap();
    }
    let wrong = || device_token(&SymmetricKey::from_bytes(vec![5; 32]), SCOPE, "storm-victim", 3600);
    // The storm from 127.0.0.1: the burst is answered 401, then 429001 with a Retry-After.
    for _ in 0..5 {
        assert_eq!(register_from(&server, "127.0.0.1", "storm-victim", wrong()).await.0, 401);
    }
    let (status, code, retry) = register_from(&server, "127.0.0.1", "storm-victim", wrong()).await;
    assert_eq!((status, code), (429, Some(429001)));
    assert!(retry.is_some_and(|r| r >= 1), "{retry:?}");
    // Throttled on MQTT too (CONNACK 3, server unavailable: the SDKs retry it as transient).
    let mut s = tls_from(&server, server.ready.mqtt.unwrap(), "127.0.0.1").await;
    let got = mqtt_exchange(&mut s, &good_connect("storm-mqtt"), usize::MAX).await;
    assert!(judge(&Want::Connack(3), &got), "{got:?}");
    // A good device from another address is served meanwhile, over HTTPS and MQTT.
    let (status, ..) = register_from(&server, "127.0.0.2", "storm-good-1", tok("storm-good-1")).await;
    assert_eq!(status, 202);
    let mut s = tls_from(&server, server.ready.mqtt.unwrap(), "127.0.0.2").await;
    let mut bytes = good_connect("storm-mqtt");
    bytes.extend(mqtt_publish(&register_topic("1"), br#"{"registrationId":"storm-mqtt"}"#));
    let got = mqtt_exchange(&mut s, &bytes, 2).await;
    assert!(judge(&Want::Res(202, 0, ""), &got), "{got:?}");
    // The service API is not the device API's limiter's business.
    assert!(service(&server).show(Kind::Enrollment, "storm-good-1", false).await.is_ok());
    assert!(server.state.metrics.auth_throttled_count() >= 2);
    assert!(server.state.metrics.render().contains("dps_auth_throttled_total"));
    // The storming address's good device is throttled until its bucket refills, then served: waiting the
    // Retry-After it was given is enough.
    let mut served = false;
    for _ in 0..10 {
        let (status, _, retry) =
            register_from(&server, "127.0.0.1", "storm-good-2", tok("storm-good-2")).await;
        if status == 202 {
            served = true;
            break;
        }
        assert_eq!(status, 429);
        tokio::time::sleep(Duration::from_secs(retry.unwrap_or(1))).await;
    }
    assert!(served, "the good device from the storming address was never served");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_remembers_a_bounded_number_of_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auth_failures.per_minute = 1;
    cfg.auth_failures.burst = 1;
    cfg.auth_failures.max_addresses = 8;
    let server = start(cfg).await;
    let wrong = || device_token(&SymmetricKey::from_bytes(vec![5; 32]), SCOPE, "nobody", 3600);
    for n in 1..=40 {
        let source = format!("127.0.1.{n}");
        assert_eq!(register_from(&server, &source, "nobody", wrong()).await.0, 401);
        assert!(
            server.state.auth_failures.tracked() <= 8,
            "{} addresses after {n}",
            server.state.auth_failures.tracked()
        );
    }
    // The most recent address is remembered (throttled at its second failure).
    assert_eq!(register_from(&server, "127.0.1.40", "nobody", wrong()).await.0, 429);
    still_provisions(&server, "after-bound").await;
    server.shutdown().await.unwrap();
}
