//! The SAS test vectors of spec Appendix B and §4.3, through the public API only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dps_proto::sas::{build_token, device_resource, encode_resource, SasToken, SymmetricKey};
use dps_proto::{ErrorCode, Timestamp};

/// Appendix B device key: bytes 00..1f.
const K: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SE: i64 = 1_700_000_000;

fn key() -> SymmetricKey {
    SymmetricKey::parse(K).unwrap()
}

/// Verifies `header` for `target` at the expiry instant with `keys`, asserting the matching key index.
fn assert_verifies(header: &str, target: &str, keys: &[&SymmetricKey], index: usize) {
    let token = SasToken::parse(header).unwrap_or_else(|e| panic!("{header}: {e}"));
    assert_eq!(token.expiry(), SE);
    assert_eq!(token.verify(Timestamp::from_unix_seconds(SE), target, keys), Ok(index), "{header}");
}

#[test]
fn key_bytes() {
    assert_eq!(key().as_bytes(), (0u8..32).collect::<Vec<u8>>().as_slice());
}

#[test]
fn device_sas_lowercase_hex() {
    let sr = "0ne00000000%2fregistrations%2fmydev";
    let header = format!(
        "SharedAccessSignature sr={sr}&sig=YnsSUB4zfA9sbETp0HbhGEOsj3K3PokHMJnuJw%2FvMUA%3D&se=1700000000&skn=registration"
    );
    assert_eq!(build_token(&key(), sr, SE, Some("registration")), header);
    assert_verifies(&header, &device_resource("0ne00000000", "mydev"), &[&key()], 0);
    let token = SasToken::parse(&header).unwrap();
    assert_eq!(token.resource_raw(), sr);
    assert_eq!(token.key_name(), Some("registration"));
}

#[test]
fn device_sas_uppercase_hex() {
    let sr = encode_resource(&device_resource("0ne00000000", "mydev"));
    assert_eq!(sr, "0ne00000000%2Fregistrations%2Fmydev");
    let sig = encode_resource("1GdazlZ/vhIA3+FbPXZBtB2/zKD/sPCa1e3oJAUblAo=");
    let header = format!("SharedAccessSignature sr={sr}&sig={sig}&se=1700000000");
    assert_eq!(build_token(&key(), &sr, SE, None), header);
    assert_verifies(&header, "0ne00000000/registrations/mydev", &[&key()], 0);
}

#[test]
fn device_sas_raw_resource() {
    let sr = "0ne00000000/registrations/mydev";
    let sig = encode_resource("isWfJMASrv1j1Qp3HkU56pttjT9w/L4hy2wtJwNm2jQ=");
    // Node SDK field order: sr, sig, skn, se.
    let header = format!("SharedAccessSignature sr={sr}&sig={sig}&skn=registration&se=1700000000");
    assert_verifies(&header, sr, &[&key()], 0);
    // Java SDK: empty skn.
    let header = format!("SharedAccessSignature sr={sr}&sig={sig}&se=1700000000&skn=");
    assert_verifies(&header, sr, &[&key()], 0);
    assert_eq!(SasToken::parse(&header).unwrap().key_name(), None);
}

#[test]
fn service_sas() {
    let host = "mydps.azure-devices-provisioning.net";
    let sig = encode_resource("+5V0HFPIoMYrcltM2Jj4oxVByh5pkp677OYUHTEHW70=");
    let header =
        format!("SharedAccessSignature sr={host}&sig={sig}&se=1700000000&skn=provisioningserviceowner");
    assert_eq!(build_token(&key(), host, SE, Some("provisioningserviceowner")), header);
    assert_verifies(&header, host, &[&key()], 0);
    assert_verifies(&header, &format!("{host}/enrollments/mydev"), &[&key()], 0);
    // The secondary key of the policy is tried after the primary.
    let primary = SymmetricKey::from_bytes(vec![9; 32]);
    assert_verifies(&header, host, &[&primary, &key()], 1);
    let token = SasToken::parse(&header).unwrap();
    assert_eq!(token.key_name(), Some("provisioningserviceowner"));
    let err =
        token.verify(Timestamp::from_unix_seconds(SE), "otherdps.azure-devices-provisioning.net", &[&key()]);
    assert_eq!(err.unwrap_err().code, ErrorCode::Unauthorized);
}

#[test]
fn derived_key_appendix_b() {
    assert_eq!(key().derive_device_key("mydev").to_base64(), "nRyyOl5i2cQOKWnFy5SDmETKok92rPMz3KrfVSKXisI=");
}

#[test]
fn derived_keys_docs_vectors() {
    let g1 = SymmetricKey::parse(
        "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
    )
    .unwrap();
    let g2 = SymmetricKey::parse(
        "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==",
    )
    .unwrap();
    for (group, id, expected) in [
        (&g1, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="),
        (&g2, "breakroom499-contoso-tstrsd-007", "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs="),
        (&g2, "mainbuilding167-contoso-hpsd-088", "6uejA9PfkQgmYylj8Zerp3kcbeVrGZ172YLa7VSnJzg="),
    ] {
        assert_eq!(group.derive_device_key(id).to_base64(), expected, "{id}");
    }
}

#[test]
fn group_device_token_end_to_end() {
    // A device in a symmetric-key group signs with its derived key; the server re-derives and verifies.
    let group_primary = key();
    let group_secondary = SymmetricKey::from_bytes(vec![7; 64]);
    let device_key = group_secondary.derive_device_key("mydev");
    let sr = "0ne00000000%2fregistrations%2fmydev";
    let header = build_token(&device_key, sr, SE, Some("registration"));
    let derived = [group_primary.derive_device_key("mydev"), group_secondary.derive_device_key("mydev")];
    assert_verifies(&header, "0ne00000000/registrations/mydev", &[&derived[0], &derived[1]], 1);
}
