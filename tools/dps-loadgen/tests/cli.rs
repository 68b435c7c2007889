//! The `dps-loadgen` program: exit status, reports and the markdown it writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests of a network program: they open sockets, files and processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::{EngineServer, SCOPE};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dps-loadgen");

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_command_succeeds_and_reports() {
    let (code, out, err) = run(&["baseline", "--devices", "20", "--concurrency", "4", "--quiet"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("baseline https"), "{out}");
    assert!(out.contains("assigned 20"), "{out}");
    assert!(out.contains("errors: none"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_errors_says_so_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let pki = dps_loadgen::tls::TestPki::generate(&["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let key = dps_core::proto::sas::SymmetricKey::from_bytes(vec![1; 64]).to_base64();
    let (code, out, err) = run(&[
        "run",
        "--host",
        "127.0.0.1",
        "--https-port",
        &closed,
        "--ca",
        ca.to_str().unwrap(),
        "--id-scope",
        SCOPE,
        "--group-key",
        &key,
        "--devices",
        "5",
        "--concurrency",
        "2",
        "--quiet",
    ])
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("ERRORS: 5"), "{out}");
    assert!(out.contains("transport: connect failed"), "{out}");
    assert!(err.contains("THE RUN HAD ERRORS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_problems_exit_with_2() {
    let (code, _, err) = run(&["run", "--devices", "1"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--ca"), "{err}");
    let (code, _, err) = run(&[
        "bench",
        "--spawn-server",
        "--server-bin",
        "/nonexistent/dps-server",
        "--devices",
        "1",
        "--quiet",
    ])
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/dps-server"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_a_running_server_writes_the_markdown_section() {
    let server = EngineServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let md = dir.path().join("BENCHMARKS.md");
    std::fs::write(&md, "# Benchmarks\n\n## Engine\n\nother text\n").unwrap();
    let (https, mqtt) = (server.https.port().to_string(), server.mqtt.port().to_string());
    let args = [
        "bench",
        "--host",
        "127.0.0.1",
        "--https-port",
        &https,
        "--mqtt-port",
        &mqtt,
        "--ca",
        ca.to_str().unwrap(),
        "--id-scope",
        SCOPE,
        "--connection-string",
        &server.connection_string,
        "--setup",
        "--devices",
        "12",
        "--concurrency",
        "3",
        "--quiet",
        "--write-markdown",
        md.to_str().unwrap(),
    ];
    let (code, out, err) = run(&args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("| run | devices | concurrency | registrations/s | ratio to baseline"), "{out}");
    assert!(out.contains("baseline https"), "{out}");
    assert!(out.contains("server mqtt"), "{out}");
    assert!(out.contains("all 24 assignments found"), "{out}");
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.starts_with("# Benchmarks\n\n## Engine\n\nother text\n"), "{text}");
    assert_eq!(text.matches("## Load generator (dps-loadgen)").count(), 1);
    assert_eq!(text.matches("<!-- dps-loadgen:begin -->").count(), 1);

    // A second run replaces the block instead of adding one.
    let (code, out, err) = run(&args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let again = std::fs::read_to_string(&md).unwrap();
    assert_eq!(again.matches("## Load generator (dps-loadgen)").count(), 1);
    assert_eq!(again.matches("<!-- dps-loadgen:begin -->").count(), 1);
    assert!(again.starts_with("# Benchmarks\n\n## Engine\n\nother text\n"));
}
