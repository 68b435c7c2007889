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
