//! Writes the seed corpora under `corpus/<target>/` (run once, by hand, and commit the files):
//! `cargo test --no-default-features --test seeds -- --ignored`. The certificates and CSRs are generated
//! here with rcgen, so a rerun writes new keys; the committed files are what the fuzzers start from.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The corpus lives in files; the pure-crate I/O ban (clippy.toml) does not apply to this test.
#![allow(clippy::disallowed_methods)]

use bytes::BytesMut;
use dps_fuzz::NOW;
use dps_proto::sas::{build_token, device_resource, encode_resource, SymmetricKey};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use std::path::{Path, PathBuf};

const SCOPE: &str = "0ne00000001";
const OP: &str = "4.d0a671905ea5b2c8.e7173b7b-0e54-4aa0-9d20-aeb1b89e6c7d";

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, data: impl AsRef<[u8]>) {
    std::fs::write(dir(target).join(name), data).unwrap();
}

fn device_key(id: &str) -> SymmetricKey {
    SymmetricKey::from_bytes(vec![9; 64]).derive_device_key(id)
}

/// The SAS variants of spec §4.2, for `id`.
fn sdk_tokens(id: &str) -> Vec<(&'static str, String)> {
    let k = device_key(id);
    let res = device_resource(SCOPE, id);
    let upper = encode_resource(&res);
    let lower = upper.replace("%2F", "%2f");
    let se = NOW + 3600;
    let sig_of = |sr: &str| {
        let t = build_token(&k, sr, se, None);
        t.split("sig=").nth(1).unwrap().split('&').next().unwrap().to_owned()
    };
    vec![
        (
            "c_sdk",
            format!("SharedAccessSignature sr={lower}&sig={}&se={se}&skn=registration", sig_of(&lower)),
        ),
        ("cs_sdk", build_token(&k, &upper, se, Some("registration"))),
        ("py_sdk", build_token(&k, &upper, se, None)),
        ("node_sdk", format!("SharedAccessSignature sr={res}&sig={}&skn=registration&se={se}", sig_of(&res))),
        ("java_sdk", build_token(&k, &res, se, Some(""))),
        ("emb_c", format!("SharedAccessSignature sr={lower}&sig={}&se={se}", sig_of(&lower))),
        ("expired", build_token(&k, &upper, NOW - 3600, Some("registration"))),
        (
            "service",
            build_token(
                &SymmetricKey::from_bytes(vec![1; 32]),
                "dps.example.net",
                se,
                Some("provisioningserviceowner"),
            ),
        ),
    ]
}

fn encode(p: Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

fn ws_frames(mqtt: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x82];
    match mqtt.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(mqtt.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn mqtt_session(username: &str, password: Option<&str>, register: &[u8], qos: QoS, poll: bool) -> Vec<u8> {
    let mut connect = Connect::new("fuzz-dev");
    connect.keep_alive = 30;
    connect.login = Some(Login::new(username, password.unwrap_or("")));
    let mut out = encode(Packet::Connect(connect));
    out.extend(encode(Packet::Subscribe(Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce))));
    let mut publish = Publish::new("$dps/registrations/PUT/iotdps-register/?$rid=1", qos, register.to_vec());
    if qos != QoS::AtMostOnce {
        publish.pkid = 2;
    }
    out.extend(encode(Packet::Publish(publish)));
    out.extend(encode(Packet::PingReq));
    if poll {
        out.extend(encode(Packet::Publish(Publish::new(
            format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={OP}"),
            QoS::AtMostOnce,
            " ",
        ))));
    }
    out.extend(encode(Packet::Disconnect));
    out
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2040, 1, 1);
    p
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn generate_seed_corpus() {
    // SAS tokens, keys and connection strings.
    for (name, token) in sdk_tokens("fuzz-dev") {
        write("sas_token", name, token);
    }
    write("sas_token", "key", SymmetricKey::from_bytes(vec![9; 64]).to_base64());
    write(
        "sas_token",
        "connection_string",
        format!(
            "HostName=dps.example.net;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
            SymmetricKey::from_bytes(vec![1; 32]).to_base64()
        ),
    );

    // HTTPS routes (spec §1.3, §5.2).
    let routes = [
        ("register", "PUT", format!("/{SCOPE}/registrations/fuzz-dev/register?api-version=2021-06-01")),
        (
            "register_force",
            "PUT",
            format!("/{SCOPE}/registrations/fuzz-dev/register?api-version=2019-03-31&forceRegistration=true"),
        ),
        (
            "operation",
            "GET",
            format!("/{SCOPE}/registrations/fuzz-dev/operations/{OP}?api-version=2021-06-01"),
        ),
        ("status_lookup", "POST", format!("/{SCOPE}/registrations/fuzz-dev?api-version=2018-11-01")),
        ("enrollment", "PUT", "/enrollments/fuzz-dev?api-version=2021-10-01".to_owned()),
        (
            "group_attestation",
            "POST",
            "/enrollmentGroups/g1/attestationmechanism?api-version=2021-10-01".to_owned(),
        ),
        ("query", "POST", "/enrollments/query?api-version=2021-10-01".to_owned()),
        ("bulk", "POST", "/enrollmentGroups?api-version=2021-10-01".to_owned()),
        ("registration_query", "POST", "/registrations/g1/query?api-version=2021-10-01".to_owned()),
        ("certificate", "PUT", "/certificates/root1?api-version=2021-10-01".to_owned()),
        ("verify", "POST", "/certificates/root1/verify?api-version=2021-10-01".to_owned()),
        ("encoded", "DELETE", "/registrations/fuzz%2Ddev/?api-version=2021-10-01".to_owned()),
    ];
    for (name, method, path) in &routes {
        write("https_route", name, format!("{method}\n{path}"));
    }

    // MQTT usernames (spec §2.2) and topics (§2.4-2.6).
    let base = format!("{SCOPE}/registrations/fuzz-dev");
    let usernames = [
        ("user_c", format!("{base}/api-version=2021-06-01&ClientVersion=1.15.0")),
        ("user_cs", format!("{base}/api-version=2019-03-31&ClientVersion=Microsoft.Azure.Devices.Provisioning.Client%2F1.19.0%20%28.NET%29")),
        ("user_py", format!("{base}/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.12.0%20%28Python%3B%20Linux%29")),
        ("user_java", format!("{base}/api-version=2019-03-31&ClientVersion=2019-03-31")),
        ("user_embc", format!("{base}/api-version=2019-03-31")),
        ("user_csr", format!("{base}/api-version=2025-07-01-preview")),
        ("topic_register", "$dps/registrations/PUT/iotdps-register/?$rid=1".to_owned()),
        ("topic_register_uuid", "$dps/registrations/PUT/iotdps-register/?$rid=7f3c2a1e-9b1d-4c55-8c1e-2b7f0a9d3e11".to_owned()),
        ("topic_status", format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={OP}")),
        ("topic_status_quoted", format!("$dps/registrations/GET/iotdps-get-operationstatus/?operationId={}&$rid=3", encode_resource(OP))),
        ("topic_response", "$dps/registrations/res/202/?$rid=1&retry-after=3".to_owned()),
        ("topic_response_final", "$dps/registrations/res/200/?$rid=1".to_owned()),
    ];
    for (name, text) in &usernames {
        write("mqtt_username_topic", name, text);
    }

    // Whole MQTT sessions: flags byte (bit 0 WebSocket, bits 1-7 write size - 1), then the client bytes.
    let py = format!("{base}/?api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.12.0");
    let tokens = sdk_tokens("fuzz-dev");
    let token = |n: &str| tokens.iter().find(|(k, _)| *k == n).map(|(_, t)| t.as_str());
    let sessions = [
        (
            "py_qos1",
            mqtt_session(
                &py,
                token("py_sdk"),
                br#"{"payload": null, "registrationId": "fuzz-dev"}"#,
                QoS::AtLeastOnce,
                true,
            ),
        ),
        (
            "c_qos0",
            mqtt_session(
                &format!("{base}/api-version=2021-06-01&ClientVersion=1.15.0"),
                token("c_sdk"),
                br#"{"registrationId":"fuzz-dev"}"#,
                QoS::AtMostOnce,
                true,
            ),
        ),
        (
            "cs_empty_body",
            mqtt_session(
                &format!("{base}/api-version=2019-03-31"),
                token("cs_sdk"),
                b"",
                QoS::AtLeastOnce,
                false,
            ),
        ),
        (
            "no_password",
            mqtt_session(&format!("{base}/api-version=2019-03-31"), None, b"", QoS::AtLeastOnce, false),
        ),
        (
            "expired",
            mqtt_session(
                &format!("{base}/api-version=2019-03-31"),
                token("expired"),
                b"",
                QoS::AtLeastOnce,
                false,
            ),
        ),
    ];
    for (name, bytes) in &sessions {
        let mut raw = vec![0xfe]; // raw MQTT, 128-byte writes
        raw.extend_from_slice(bytes);
        write("mqtt_session", &format!("{name}_raw"), &raw);
        let mut small = vec![0x0e]; // raw MQTT, 8-byte writes
        small.extend_from_slice(bytes);
        write("mqtt_session", &format!("{name}_chunked"), &small);
    }
    let mut ws = vec![0xff];
    ws.extend(ws_frames(&sessions[0].1));
    write("mqtt_session", "py_qos1_websocket", &ws);

    // Wire models (spec §1.5, §5.6).
    let k = SymmetricKey::from_bytes(vec![9; 64]).to_base64();
    let models = [
        ("device_registration", r#"{"registrationId":"fuzz-dev","payload":{"modelId":"dtmi:x;1"}}"#.to_owned()),
        ("device_registration_csr", r#"{"registrationId":"fuzz-dev","csr":"MIIB"}"#.to_owned()),
        ("tpm_registration", r#"{"registrationId":"fuzz-dev","tpm":{"endorsementKey":"AToAAQAL","storageRootKey":"AToAAQAL"}}"#.to_owned()),
        ("individual", format!(r#"{{"registrationId":"fuzz-dev","deviceId":"dev","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"{k}","secondaryKey":"{k}"}}}},"capabilities":{{"iotEdge":false}},"iotHubHostName":"hub-a.example.net","initialTwin":{{"tags":{{"a":1}},"properties":{{"desired":{{"b":"c"}}}}}},"provisioningStatus":"enabled","reprovisionPolicy":{{"updateHubAssignment":true,"migrateDeviceData":false}},"allocationPolicy":"hashed","iotHubs":["hub-a.example.net"],"etag":"\"abc\""}}"#)),
        ("group_x509", r#"{"enrollmentGroupId":"g1","attestation":{"type":"x509","x509":{"caReferences":{"primary":"root1"}}},"provisioningStatus":"disabled","allocationPolicy":"static","iotHubs":["hub-b.example.net"]}"#.to_owned()),
        ("group_signing", r#"{"enrollmentGroupId":"g2","attestation":{"type":"x509","x509":{"signingCertificates":{"primary":{"certificate":"MIIB"}}}}}"#.to_owned()),
        ("bulk", r#"{"mode":"create","enrollments":[{"registrationId":"a","attestation":{"type":"symmetricKey"}},{"registrationId":"b","attestation":{"type":"tpm","tpm":{"endorsementKey":"AAA"}}}]}"#.to_owned()),
        ("bulk_groups", r#"{"mode":"delete","enrollmentGroups":[{"enrollmentGroupId":"g1","attestation":{"type":"symmetricKey"}}]}"#.to_owned()),
        ("query", r#"{"query":"SELECT * FROM enrollments WHERE provisioningStatus = 'enabled'"}"#.to_owned()),
        ("operation_status", r#"{"operationId":"4.1.2","status":"assigned","registrationState":{"registrationId":"fuzz-dev","assignedHub":"hub-a.example.net","deviceId":"fuzz-dev","status":"assigned","substatus":"initialAssignment","createdDateTimeUtc":"2023-11-14T22:13:20Z","etag":"\"e\""}}"#.to_owned()),
        ("certificate_upload", r#"{"certificate":"MIIB","isVerified":false}"#.to_owned()),
        ("certificate_upload_props", r#"{"properties":{"certificate":"MIIB","isVerified":true}}"#.to_owned()),
        ("verification", r#"{"certificate":"MIIB"}"#.to_owned()),
        ("array_instead_of_object", r#"["fuzz-dev",null]"#.to_owned()),
    ];
    for (name, text) in &models {
        write("wire_models", name, text);
    }

    // The query language (spec §5.3).
    for (name, q) in [
        ("all", "SELECT * FROM enrollments"),
        ("groups", "select * from enrollmentGroups"),
        ("where", "SELECT * FROM enrollments WHERE provisioningStatus = 'enabled'"),
        (
            "and",
            "SELECT * FROM registrations WHERE status = \"assigned\" AND assignedHub = `hub-a.example.net`",
        ),
        ("bare", "SELECT * FROM deviceRegistrations WHERE iotEdge=true"),
        ("empty", ""),
    ] {
        write("query", name, q);
    }

    // Continuation tokens.
    for (name, t) in [
        ("key", dps_core::store::continuation_token("fuzz-dev")),
        ("composite", dps_core::store::continuation_token("g1\u{1f}fuzz-dev")),
        ("padded", "ZnV6ei1kZXY=".to_owned()),
        ("spaces", " ZnV6ei1kZXY ".to_owned()),
    ] {
        write("continuation", name, t);
    }

    // Engine requests: method, path, Authorization, If-Match, max-item-count, continuation, body.
    let requests = [
        ("create_then_get", vec![
            format!("PUT\n/enrollments/fuzz-dev?api-version=2021-10-01\n$owner\n\n\n\n{{\"registrationId\":\"fuzz-dev\",\"attestation\":{{\"type\":\"symmetricKey\"}}}}"),
            "GET\n/enrollments/fuzz-dev?api-version=2021-10-01\n$owner\n\n\n\n".to_owned(),
            "POST\n/enrollments/fuzz-dev/attestationmechanism?api-version=2021-10-01\n$owner\n\n\n\n".to_owned(),
            "DELETE\n/enrollments/fuzz-dev?api-version=2021-10-01\n$owner\n*\n\n\n".to_owned(),
        ]),
        ("group_register_poll", vec![
            format!("PUT\n/enrollmentGroups/g1?api-version=2021-10-01\n$owner\n\n\n\n{{\"enrollmentGroupId\":\"g1\",\"attestation\":{{\"type\":\"symmetricKey\",\"symmetricKey\":{{\"primaryKey\":\"{k}\",\"secondaryKey\":\"{k}\"}}}}}}"),
            format!("PUT\n/{SCOPE}/registrations/fuzz-dev/register?api-version=2021-06-01\n$device:fuzz-dev\n\n\n\n{{\"registrationId\":\"fuzz-dev\"}}"),
            format!("GET\n/{SCOPE}/registrations/fuzz-dev/operations/{OP}?api-version=2021-06-01\n$device:fuzz-dev\n\n\n\n"),
            format!("POST\n/{SCOPE}/registrations/fuzz-dev?api-version=2021-06-01\n$device:fuzz-dev\n\n\n\n{{\"registrationId\":\"fuzz-dev\"}}"),
            "POST\n/registrations/g1/query?api-version=2021-10-01\n$owner\n\n1\n\n".to_owned(),
            "GET\n/registrations/fuzz-dev?api-version=2021-10-01\n$owner\n\n\n\n".to_owned(),
        ]),
        ("bulk_and_query_pages", vec![
            r#"POST
/enrollments?api-version=2021-10-01
$owner



{"mode":"create","enrollments":[{"registrationId":"a","attestation":{"type":"symmetricKey"}},{"registrationId":"b","attestation":{"type":"symmetricKey"}},{"registrationId":"c","attestation":{"type":"symmetricKey"}}]}"#.to_owned(),
            "POST\n/enrollments/query?api-version=2021-10-01\n$owner\n\n1\n\n{\"query\":\"SELECT * FROM enrollments\"}".to_owned(),
            format!("POST\n/enrollments/query?api-version=2021-10-01\n$owner\n\n1\n{}\n{{\"query\":\"SELECT * FROM enrollments\"}}", dps_core::store::continuation_token("a")),
        ]),
        ("certificates", vec![
            "PUT\n/certificates/root1?api-version=2021-10-01\n$owner\n\n\n\n{\"certificate\":\"MIIB\"}".to_owned(),
            "GET\n/certificates?api-version=2021-10-01\n$owner\n\n\n\n".to_owned(),
            "POST\n/certificates/root1/generateVerificationCode?api-version=2021-10-01\n$owner\n*\n\n\n".to_owned(),
        ]),
        ("unauthenticated", vec![
            format!("PUT\n/{SCOPE}/registrations/fuzz-dev/register?api-version=2021-06-01\n{}\n\n\n\n{{\"registrationId\":\"fuzz-dev\"}}", sdk_tokens("fuzz-dev")[0].1),
            "GET\n/enrollments/x\n\n\n\n\n".to_owned(),
        ]),
    ];
    for (name, reqs) in &requests {
        write("engine_http", name, reqs.join(dps_fuzz::engine::NEXT));
    }

    // X.509: root -> intermediate -> leaf (P-256), a P-384 and an RSA leaf, CSRs, CA uploads with proofs.
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_cert = ca_params("fuzz root").self_signed(&root_key).unwrap();
    let root = Issuer::new(ca_params("fuzz root"), root_key);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let int_cert = ca_params("fuzz intermediate").signed_by(&int_key, &root).unwrap();
    let int = Issuer::new(ca_params("fuzz intermediate"), int_key);
    let mut leaf_params = params("fuzz-dev");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &int).unwrap();
    let p384_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p384 = params("fuzz-p384").self_signed(&p384_key).unwrap();
    let rsa_key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let rsa = params("fuzz-rsa").self_signed(&rsa_key).unwrap();

    let cat = |parts: &[&[u8]]| parts.concat();
    write("x509_chain", "leaf", leaf.der());
    write("x509_chain", "leaf_int", cat(&[leaf.der(), int_cert.der()]));
    write("x509_chain", "leaf_int_root", cat(&[leaf.der(), int_cert.der(), root_cert.der()]));
    write("x509_chain", "p384_self_signed", p384.der());
    write("x509_chain", "rsa_self_signed", rsa.der());

    let b64 = |der: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(der)
    };
    let csr_p256 = params("fuzz-dev").serialize_request(&leaf_key).unwrap();
    let csr_p384 = params("FUZZ-DEV").serialize_request(&p384_key).unwrap();
    let csr_rsa = params("fuzz-dev").serialize_request(&rsa_key).unwrap();
    write("csr", "p256", format!("fuzz-dev\n{}", b64(csr_p256.der())));
    write("csr", "p384_upper_cn", format!("fuzz-dev\n{}", b64(csr_p384.der())));
    write("csr", "rsa", format!("fuzz-dev\n{}", b64(csr_rsa.der())));
    write("csr", "wrong_id", format!("other-dev\n{}", b64(csr_p256.der())));

    let proof_p = params("0123456789ABCDEF0123456789ABCDEF");
    let proof_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let proof = proof_p.signed_by(&proof_key, &root).unwrap();
    let code = "0123456789ABCDEF0123456789ABCDEF";
    write("ca_upload", "root_pem_with_proof", format!("{}\0{}\0{code}", root_cert.pem(), proof.pem()));
    write(
        "ca_upload",
        "root_base64_with_proof",
        format!("{}\0{}\0{code}", b64(root_cert.der()), b64(proof.der())),
    );
    write("ca_upload", "intermediate_pem", int_cert.pem());
    write("ca_upload", "leaf_not_ca", leaf.pem());
    write("ca_upload", "wrong_code", format!("{}\0{}\0WRONG", root_cert.pem(), proof.pem()));
}
