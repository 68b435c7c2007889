//! The X.509 mode: devices with their own leaf certificates against the X.509 baseline, which requires and
//! verifies the client certificate (in this process and in a process of its own), and refuses devices
//! without one or with one of another root.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests of a network program: they open sockets, files and processes.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use dps_core::proto::sas::SymmetricKey;
use dps_loadgen::baseline::{BaselineServer, FixedReplies};
use dps_loadgen::bench::{run_baseline, Endpoint, LoadSettings, BASELINE_HUB, BASELINE_SCOPE};
use dps_loadgen::device::{DeviceSet, DriveOptions, Protocol};
use dps_loadgen::runner::{run_load, LoadOptions, RunOutput};
use dps_loadgen::stats::Failure;
use dps_loadgen::tls::{BaselineClientAuth, TlsVersions};
use dps_loadgen::x509::DeviceCa;
use std::sync::Arc;

const LOCAL: &str = "127.0.0.1";

fn settings(devices: usize) -> LoadSettings {
    LoadSettings {
        devices,
        concurrency: 4,
        prefix: "t".into(),
        drive: DriveOptions::default(),
        progress: false,
        tls: TlsVersions::Any.into(),
        baseline_threads: 2,
        baseline_client_auth: false,
        baseline_process: None,
    }
}

fn check_clean(out: &RunOutput, set: &DeviceSet, n: usize) {
    let r = &out.report;
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.assigned, n);
    assert_eq!(r.requests, 2 * n as u64, "one register and one poll per device");
    let mut ids: Vec<_> = out.assignments.iter().map(|a| a.registration_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, (0..n).map(|i| set.registration_id(i)).collect::<Vec<_>>());
}

#[test]
fn an_x509_device_set_has_one_leaf_per_device_named_by_its_registration_id() {
    let root = DeviceCa::generate("set root").unwrap();
    let set = DeviceSet::x509(BASELINE_SCOPE, "fleet", &root, 3).unwrap();
    let x = set.x509_devices().unwrap();
    assert_eq!(x.identities.len(), 3);
    assert_eq!(x.root_pem, root.pem());
    for i in 0..3 {
        let leaf = &set.identity(i).unwrap().chain()[0];
        let info = dps_core::attest::x509::certificate_info(leaf).unwrap();
        assert_eq!(info.subject_name, format!("CN={}", set.registration_id(i)));
    }
    assert!(set.identity(3).is_none());
    // X.509 devices send no SAS token.
    let mut client = set.client(1).unwrap();
    let dps_client::ClientAction::Send(request) = client.start(dps_loadgen::device::now()) else {
        panic!("no first request")
    };
    assert!(request.authorization.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_devices_register_against_the_x509_baseline_on_both_transports() {
    let root = DeviceCa::generate("baseline test root").unwrap();
    for (protocol, in_process) in
        [(Protocol::X509, true), (Protocol::X509Mqtt, true), (Protocol::X509, false)]
    {
        let set = Arc::new(DeviceSet::x509(BASELINE_SCOPE, protocol.as_str(), &root, 12).unwrap());
        let mut load = settings(12);
        if !in_process {
            // The standalone baseline reads the root from the file its parent writes (--client-ca).
            load.baseline_process = Some(env!("CARGO_BIN_EXE_dps-loadgen").into());
        }
        let out = run_baseline(protocol, set.clone(), &load, LOCAL.parse().unwrap()).await.unwrap();
        check_clean(&out, &set, 12);
        assert!(out.report.label.contains("client cert required and verified"), "{}", out.report.label);
    }
}

/// An X.509 baseline server trusting `root`, and the endpoint devices use for it.
fn x509_baseline(root: &DeviceCa) -> (BaselineServer, Endpoint) {
    let replies = FixedReplies::from_engine(BASELINE_SCOPE, "t-000000", BASELINE_HUB).unwrap();
    let auth = BaselineClientAuth::Required { roots_pem: root.pem().to_owned() };
    let server = BaselineServer::start_with(LOCAL.parse().unwrap(), replies, 1, &auth).unwrap();
    let endpoint = Endpoint::new(
        server.https_addr(),
        server.mqtt_addr(),
        server.amqp_addr(),
        LOCAL,
        server.ca_pem().as_bytes(),
        TlsVersions::Any,
    )
    .unwrap();
    (server, endpoint)
}

fn options(n: usize) -> LoadOptions {
    LoadOptions {
        label: "refused".into(),
        devices: n,
        concurrency: 2,
        drive: DriveOptions::default(),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_x509_baseline_refuses_devices_without_a_certificate_or_with_one_of_another_root() {
    let root = DeviceCa::generate("trusted root").unwrap();
    let (server, endpoint) = x509_baseline(&root);

    // No client certificate at all (symmetric-key devices), over both transports.
    let keyed = Arc::new(DeviceSet::new(BASELINE_SCOPE, SymmetricKey::from_bytes(vec![5; 64]), "t").unwrap());
    for protocol in [Protocol::Https, Protocol::Mqtt] {
        let target = Arc::new(endpoint.target(protocol).unwrap());
        let out = run_load(protocol, target, keyed.clone(), &options(4), &server.cpu()).await;
        let r = &out.report;
        assert_eq!(r.assigned, 0, "{r}");
        assert!(out.assignments.is_empty());
        // TLS 1.3: the client's handshake ends before the server checks its (missing) certificate, so the
        // refusal may surface as a broken connection on the first request rather than in the handshake.
        assert_eq!(r.failed.count(Failure::Tls) + r.failed.count(Failure::Connection), 4, "{r}");
    }

    // TLS 1.2 only: the refusal is in the handshake itself.
    let tls12 = Endpoint::new(
        server.https_addr(),
        server.mqtt_addr(),
        server.amqp_addr(),
        LOCAL,
        server.ca_pem().as_bytes(),
        TlsVersions::Tls12,
    )
    .unwrap();
    let target = Arc::new(tls12.target(Protocol::Https).unwrap());
    let out = run_load(Protocol::Https, target, keyed.clone(), &options(3), &server.cpu()).await;
    assert_eq!(out.report.failed.count(Failure::Tls), 3, "{}", out.report);

    // A certificate of another root.
    let stranger = DeviceCa::generate("another root").unwrap();
    let strangers = Arc::new(DeviceSet::x509(BASELINE_SCOPE, "t", &stranger, 3).unwrap());
    let target = Arc::new(endpoint.target(Protocol::X509).unwrap());
    let out = run_load(Protocol::X509, target, strangers, &options(3), &server.cpu()).await;
    let r = &out.report;
    assert_eq!(r.assigned, 0, "{r}");
    assert_eq!(r.failed.count(Failure::Tls) + r.failed.count(Failure::Connection), 3, "{r}");

    // And its own devices get through the same server.
    let own = Arc::new(DeviceSet::x509(BASELINE_SCOPE, "t", &root, 3).unwrap());
    let target = Arc::new(endpoint.target(Protocol::X509).unwrap());
    let out = run_load(Protocol::X509, target, own.clone(), &options(3), &server.cpu()).await;
    check_clean(&out, &own, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_command_runs_x509_devices() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dps-loadgen"))
        .args(["baseline", "--mode", "x509", "--devices", "10", "--concurrency", "2", "--quiet"])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("baseline x509"), "{stdout}");
    assert!(stdout.contains("assigned 10"), "{stdout}");
    assert!(stderr.contains("generated 10 X.509 device certificates"), "{stderr}");
}
