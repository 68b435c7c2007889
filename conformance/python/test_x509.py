"""Azure IoT Python device SDK (azure-iot-device 2.x) against dps-server: X.509 attestation (spec section 7) over
MQTT (port 8883, TLS 1.2) and MQTT over WebSocket (wss on 443), and the CA certificate API (spec 5.7, 7.3).

The device authenticates with its TLS client certificate only: `create_from_x509_certificate(...,
x509=X509(cert_file=<its certificate followed by its intermediates>, key_file=...))`, registration ID = the leaf's
CN. Certificates come from `conformance/pki.py` (ECDSA P-256 and RSA-2048); CA certificates are uploaded to the
server and verified by proof of possession through the service API (generateVerificationCode → a certificate with
CN = the code signed by the CA's key → verify).

Refusals are asserted three ways: the SDK raises (its error chain says the server answered 401), the server counted
one more registration answered with 401002 InvalidCertificate (`/metrics` of the admin listener), and the service
API has no registration state for the device.
"""

import base64

import pytest
from azure.iot.device.exceptions import ClientError, ServiceError

import pki
from dps_harness import (
    LINKED_HUBS,
    assert_assigned,
    register_x509,
    unique_id,
    x509_enrollment,
    x509_group,
)

DPS_IP = "127.0.0.12"
DPS_ADMIN_PORT = 9090

TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="websocket")]
INVALID_CERTIFICATE = 401002


def register_device(dps, device, directory, websockets=False, registration_id=None, send_chain=True):
    """Writes `device` (a `pki.Identity`) to `directory` and registers it with the SDK, presenting its chain (leaf +
    intermediates) or, with `send_chain=False`, only its own certificate."""
    paths = device.write(directory)
    cert_file = paths["chain"] if send_chain else paths["cert"]
    return register_x509(dps, registration_id or device.cn, cert_file, paths["key"], websockets=websockets)


def error_chain(error):
    """The exception and its causes, as `Type: message` lines."""
    lines = []
    while error is not None:
        lines.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(lines)


def service_error_of(error):
    """The SDK's `ServiceError` behind a `ClientError` (the server answered, rather than TLS or MQTT failing)."""
    cause = error
    while cause is not None and not isinstance(cause, ServiceError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and "CredentialError" in error_chain(error):
        raise AssertionError(
            "the server refused the MQTT CONNECT (CONNACK 5, not authorised) instead of accepting it and answering the "
            "register request on $dps/registrations/res/401/ with errorCode 401002 (spec 2.6, 7.5):\n" + error_chain(error)
        )
    assert cause is not None, f"the registration did not fail with a service error:\n{error_chain(error)}"
    return cause


def assert_refused(dps, device, directory, websockets=False, registration_id=None, send_chain=True):
    """The registration is refused with 401 / 401002 InvalidCertificate and leaves no registration state."""
    registration_id = registration_id or device.cn
    before = dps.registrations_with_error(INVALID_CERTIFICATE)

    with pytest.raises(ClientError) as raised:
        register_device(dps, device, directory, websockets, registration_id, send_chain)

    cause = service_error_of(raised.value)
    assert "status code 401" in str(cause), error_chain(raised.value)
    assert dps.registrations_with_error(INVALID_CERTIFICATE) == before + 1, (
        f"the server did not count a registration answered with {INVALID_CERTIFICATE}; log:\n{dps.log_tail(20)}"
    )
    _, body = dps.service.get_registration(registration_id, expect=(404,))
    assert body["errorCode"] == 404203, body


def group_members(dps, group_id):
    states, _ = dps.service.query_group_registrations(group_id)
    return {s["registrationId"].lower() for s in states}


def same_certificate(text, identity):
    """Whether `text` (PEM or base64 DER) is `identity`'s certificate."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    else:
        body = "".join(text.split())
    return base64.b64decode(body) == identity.cert_der


# --- Individual enrollments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("websockets", TRANSPORTS)
@pytest.mark.parametrize(
    "slot,key_type", [pytest.param("primary", "ec", id="primary-ec"), pytest.param("secondary", "rsa", id="secondary-rsa")]
)
def test_individual_self_signed(dps, tmp_path, websockets, slot, key_type):
    """A self-signed device certificate enrolled as `clientCertificates.primary` or `.secondary` is enough on its
    own (spec 7.1); the other slot holds another certificate with the same CN."""
    registration_id = unique_id("py-x509-self")
    device = pki.self_signed(registration_id, key_type=key_type)
    other = pki.self_signed(registration_id)
    certificates = {slot: device.cert_pem, ("secondary" if slot == "primary" else "primary"): other.cert_pem}
    dps.service.put_enrollment(x509_enrollment(registration_id, **certificates))

    result = register_device(dps, device, tmp_path, websockets)

    assert_assigned(dps, result, registration_id)


def test_individual_self_signed_base64_der_and_device_id(dps, tmp_path):
    """The enrolled certificate as base64 DER without PEM armour (what the C# service SDK sends, spec 5.6), and a
    `deviceId` that differs from the registration ID (spec 7.1: individual → enrollment.deviceId)."""
    registration_id = unique_id("py-x509-der")
    device_id = "X509_" + registration_id.upper()
    device = pki.self_signed(registration_id)
    dps.service.put_enrollment(
        x509_enrollment(registration_id, primary=base64.b64encode(device.cert_der).decode(), deviceId=device_id)
    )

    result = register_device(dps, device, tmp_path)

    assert_assigned(dps, result, registration_id, device_id=device_id)


def test_individual_enrollment_reads_back_certificate_info_not_the_certificate(dps):
    """On read the service returns the enrolled certificates' `info` (X509CertificateInfo), never the certificate
    text (spec 5.6)."""
    registration_id = unique_id("py-x509-info")
    device = pki.self_signed(registration_id)
    dps.service.put_enrollment(x509_enrollment(registration_id, primary=device.cert_pem))

    fetched = dps.service.get_enrollment(registration_id)

    assert fetched["attestation"]["type"] == "x509", fetched
    primary = fetched["attestation"]["x509"]["clientCertificates"]["primary"]
    assert not primary.get("certificate"), f"GET must not return the certificate: {primary}"
    info = primary["info"]
    assert info["subjectName"] == f"CN={registration_id}", info
    assert info["issuerName"] == f"CN={registration_id}", info
    assert info["sha1Thumbprint"].upper() == device.sha1_thumbprint, info
    assert info["sha256Thumbprint"].upper() == device.sha256_thumbprint, info
    assert int(info["serialNumber"], 16) == device.cert.serial_number, info
    assert info["version"] == 3, info


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_individual_ca_signed_with_root_verified_by_proof_of_possession(dps, tmp_path, websockets):
    """A CA-signed device certificate in `clientCertificates` needs its chain to reach a verified CA (spec 7.3):
    the root is uploaded, then verified by proof of possession; the device sends leaf + intermediate1."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    dps.service.upload_verified_ca(unique_id("py-ca"), root)
    registration_id = unique_id("py-x509-casigned")
    device = pki.device(int1, registration_id)
    dps.service.put_enrollment(x509_enrollment(registration_id, primary=device.cert_pem))

    result = register_device(dps, device, tmp_path, websockets)

    assert_assigned(dps, result, registration_id)


def test_individual_enrollment_with_ca_reference(dps, tmp_path):
    """An individual enrollment naming a verified uploaded CA in `caReferences` instead of the device's own
    certificate: any device with that CN whose chain rolls up to the CA is the enrolled device."""
    root = pki.root(unique_id("py-root"), key_type="rsa")
    int1 = pki.intermediate(root, unique_id("py-int1"))
    int2 = pki.intermediate(int1, unique_id("py-int2"))
    name = unique_id("py-ca")
    dps.service.upload_verified_ca(name, root)
    registration_id = unique_id("py-x509-caref")
    dps.service.put_enrollment(x509_enrollment(registration_id, ca_references={"primary": name}))

    result = register_device(dps, pki.device(int2, registration_id), tmp_path)

    assert_assigned(dps, result, registration_id)


# --- Enrollment groups --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "websockets,reference",
    [pytest.param(False, "inline", id="mqtt-signingCertificates"), pytest.param(True, "name", id="websocket-caReferences")],
)
def test_group_on_verified_root_with_two_intermediates(dps, tmp_path, websockets, reference):
    """A group on the (uploaded, verified) root, inline (`signingCertificates`) or by name (`caReferences`); the
    devices are issued by intermediate2 (root → intermediate1 → intermediate2) and send leaf + int2 + int1
    (spec 7.1). One EC and one RSA device."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    int2 = pki.intermediate(int1, unique_id("py-int2"))
    name = unique_id("py-ca")
    dps.service.upload_verified_ca(name, root)
    group_id = unique_id("py-x509-group")
    if reference == "inline":
        dps.service.put_group(x509_group(group_id, primary=root.cert_pem))
    else:
        dps.service.put_group(x509_group(group_id, ca_references={"primary": name}))
    device_1 = pki.device(int2, unique_id("py-x509-gdev"))
    device_2 = pki.device(int2, unique_id("py-x509-gdev"), key_type="rsa")
    assert len(device_1.chain) == 3

    result_1 = register_device(dps, device_1, tmp_path, websockets)
    result_2 = register_device(dps, device_2, tmp_path, websockets)

    assert_assigned(dps, result_1, device_1.cn)
    assert_assigned(dps, result_2, device_2.cn)
    assert group_members(dps, group_id) == {device_1.cn, device_2.cn}


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_most_specific_group_wins(dps, tmp_path, websockets):
    """Groups on the root (by reference, verified) and on intermediate2 (inline, not uploaded: it rolls up to the
    verified root through the presented chain). A device under int2 lands in the int2 group, the closest one to
    its leaf; a device issued by int1 (no group of its own) lands in the root group (spec 7.2). The root group's
    ID sorts first, so list order cannot pick the right group by accident."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    int2 = pki.intermediate(int1, unique_id("py-int2"))
    name = unique_id("py-ca")
    dps.service.upload_verified_ca(name, root)
    root_group = unique_id("a-py-root-group")
    int2_group = unique_id("z-py-int2-group")
    dps.service.put_group(x509_group(root_group, ca_references={"primary": name}))
    dps.service.put_group(x509_group(int2_group, primary=int2.cert_pem))
    under_int2 = pki.device(int2, unique_id("py-x509-deep"))
    under_int1 = pki.device(int1, unique_id("py-x509-shallow"))

    deep = register_device(dps, under_int2, tmp_path, websockets)
    shallow = register_device(dps, under_int1, tmp_path, websockets)

    deep_state = assert_assigned(dps, deep, under_int2.cn)
    shallow_state = assert_assigned(dps, shallow, under_int1.cn)
    assert group_members(dps, int2_group) == {under_int2.cn}
    assert group_members(dps, root_group) == {under_int1.cn}
    for state, device in ((deep_state, under_int2), (shallow_state, under_int1)):
        assert state["deviceId"] == device.cn
        assert state["assignedHub"] in LINKED_HUBS


# --- Refusals -----------------------------------------------------------------------------------------------------


def test_ca_signed_device_of_an_unverified_ca_is_refused(dps, tmp_path):
    """The device's own certificate is enrolled, but its issuer is uploaded and NOT verified: the chain reaches no
    verified CA (spec 7.3)."""
    root = pki.root(unique_id("py-root"))
    name = unique_id("py-ca")
    uploaded = dps.service.put_certificate(name, root.cert_pem)
    assert uploaded["properties"]["isVerified"] is False
    registration_id = unique_id("py-x509-unverified")
    device = pki.device(root, registration_id)
    dps.service.put_enrollment(x509_enrollment(registration_id, primary=device.cert_pem))

    assert_refused(dps, device, tmp_path)


def test_group_on_an_unverified_ca_is_refused_until_it_is_verified(dps, tmp_path):
    """A group on an uploaded but unverified root refuses its devices (over WebSocket); after proof of possession the
    same device with the same certificate is assigned."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    name = unique_id("py-ca")
    uploaded = dps.service.put_certificate(name, root.cert_pem)
    group_id = unique_id("py-x509-ugroup")
    dps.service.put_group(x509_group(group_id, primary=root.cert_pem))
    device = pki.device(int1, unique_id("py-x509-udev"))

    assert_refused(dps, device, tmp_path, websockets=True)

    coded = dps.service.generate_verification_code(name, uploaded["etag"])
    proof = pki.proof(root, coded["properties"]["verificationCode"])
    assert dps.service.verify_certificate(name, coded["etag"], proof.cert_pem)["properties"]["isVerified"] is True
    result = register_device(dps, device, tmp_path, websockets=True)
    assert_assigned(dps, result, device.cn)
    assert group_members(dps, group_id) == {device.cn}


def test_group_device_sending_only_its_leaf_is_refused(dps, tmp_path):
    """Group on the verified root, device issued by intermediate2: sent alone, the leaf cannot be traced to the
    root (spec 7.1: "device must send the chain"); with leaf + int2 + int1 the same device is assigned."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    int2 = pki.intermediate(int1, unique_id("py-int2"))
    dps.service.upload_verified_ca(unique_id("py-ca"), root)
    group_id = unique_id("py-x509-leafonly")
    dps.service.put_group(x509_group(group_id, primary=root.cert_pem))
    device = pki.device(int2, unique_id("py-x509-lonely"))

    assert_refused(dps, device, tmp_path, send_chain=False)

    result = register_device(dps, device, tmp_path)
    assert_assigned(dps, result, device.cn)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_disabled_group_on_intermediate_blocks_although_root_group_is_enabled(dps, tmp_path, websockets):
    """The docs' example (spec 7.2): a disabled group on a compromised intermediate1 blocks its devices although an
    enabled group on the root covers them too — the first applicable entry decides, no fallback. A device of a
    sibling intermediate still lands in the root group."""
    root = pki.root(unique_id("py-root"))
    int1 = pki.intermediate(root, unique_id("py-int1"))
    int2 = pki.intermediate(int1, unique_id("py-int2"))
    sibling = pki.intermediate(root, unique_id("py-int1b"))
    name = unique_id("py-ca")
    dps.service.upload_verified_ca(name, root)
    root_group = unique_id("py-x509-root-on")
    int1_group = unique_id("py-x509-int1-off")
    dps.service.put_group(x509_group(root_group, ca_references={"primary": name}))
    dps.service.put_group(x509_group(int1_group, primary=int1.cert_pem, provisioningStatus="disabled"))
    blocked = pki.device(int2, unique_id("py-x509-blocked"))
    allowed = pki.device(sibling, unique_id("py-x509-allowed"))

    with pytest.raises(ClientError) as raised:
        register_device(dps, blocked, tmp_path, websockets)
    service_error_of(raised.value)
    result = register_device(dps, allowed, tmp_path, websockets)

    assert_assigned(dps, result, allowed.cn)
    assert group_members(dps, root_group) == {allowed.cn}
    status, body = dps.service.get_registration(blocked.cn, expect=(200, 404))
    if status == 200:
        assert body["status"] == "disabled", body
        assert body.get("assignedHub") not in LINKED_HUBS, body


def test_certificate_cn_must_match_registration_id(dps, tmp_path):
    """The registration ID is the leaf's CN (spec 7.1): a device registering as B with a certificate of CN A is
    refused, even though B's enrollment holds exactly that certificate."""
    cn = unique_id("py-x509-cn")
    registration_id = unique_id("py-x509-other")
    device = pki.self_signed(cn)
    dps.service.put_enrollment(x509_enrollment(registration_id, primary=device.cert_pem))

    assert_refused(dps, device, tmp_path, registration_id=registration_id)


def test_certificate_not_in_the_enrollment_is_refused(dps, tmp_path):
    """A self-signed certificate with the right CN that is neither the enrollment's primary nor its secondary."""
    registration_id = unique_id("py-x509-stranger")
    dps.service.put_enrollment(
        x509_enrollment(
            registration_id,
            primary=pki.self_signed(registration_id).cert_pem,
            secondary=pki.self_signed(registration_id).cert_pem,
        )
    )

    assert_refused(dps, pki.self_signed(registration_id), tmp_path)


def test_expired_certificate_is_refused(dps, tmp_path):
    """An enrolled self-signed certificate that expired two days ago (beyond any clock skew allowance)."""
    registration_id = unique_id("py-x509-expired")
    device = pki.self_signed(registration_id, expired=True)
    dps.service.put_enrollment(x509_enrollment(registration_id, primary=device.cert_pem))

    assert_refused(dps, device, tmp_path)


# --- The CA certificate API ---------------------------------------------------------------------------------------


def test_ca_certificate_api_upload_list_verify_delete(dps):
    """Upload (ARM-style body), get, list; proof of possession refused for a wrong CN and for a certificate of the
    right CN signed by another key (400 / 400009), and with a stale etag (412); verified with the right proof;
    delete with a stale etag (412), then with the current one; gone (404 / 404205)."""
    root = pki.root(unique_id("py-api-root"), key_type="rsa")
    name = unique_id("py-api-ca")

    created = dps.service.put_certificate(name, root.cert_pem)

    assert created["name"] == name
    assert created["etag"], created
    props = created["properties"]
    assert props["subject"] == f"CN={root.cn}", props
    assert props["thumbprint"] == root.sha1_thumbprint, props  # uppercase hex SHA-1 (spec 5.7)
    assert props["isVerified"] is False, props
    assert props["created"] and props["updated"] and props["expiry"], props
    assert same_certificate(props["certificate"], root), props
    assert not props.get("verificationCode"), props

    fetched = dps.service.get_certificate(name)
    assert (fetched["name"], fetched["etag"]) == (name, created["etag"])
    assert fetched["properties"]["thumbprint"] == root.sha1_thumbprint
    assert name in {c["name"] for c in dps.service.list_certificates()}

    coded = dps.service.generate_verification_code(name, created["etag"])
    code = coded["properties"]["verificationCode"]
    assert code and coded["etag"] != created["etag"], coded
    assert coded["properties"]["isVerified"] is False

    wrong_cn = dps.service.verify_certificate(name, coded["etag"], pki.proof(root, "x" + code).cert_pem, expect=(400,))
    assert wrong_cn["errorCode"] == 400009, wrong_cn
    impostor = pki.root(root.cn)  # the same subject, another key
    wrong_key = dps.service.verify_certificate(name, coded["etag"], pki.proof(impostor, code).cert_pem, expect=(400,))
    assert wrong_key["errorCode"] == 400009, wrong_key
    stale = dps.service.verify_certificate(name, created["etag"], pki.proof(root, code).cert_pem, expect=(412,))
    assert stale["errorCode"] // 1000 == 412, stale
    assert dps.service.get_certificate(name)["properties"]["isVerified"] is False

    verified = dps.service.verify_certificate(name, coded["etag"], pki.proof(root, code).cert_pem)
    assert verified["name"] == name
    assert verified["properties"]["isVerified"] is True, verified
    assert verified["properties"]["thumbprint"] == root.sha1_thumbprint
    assert dps.service.get_certificate(name)["properties"]["isVerified"] is True

    stale = dps.service.delete_certificate(name, coded["etag"], expect=(412,))
    assert stale == 412
    dps.service.delete_certificate(name, verified["etag"])
    gone = dps.service.get_certificate(name, expect=(404,))
    assert gone["errorCode"] == 404205, gone
    assert name not in {c["name"] for c in dps.service.list_certificates()}


def test_ca_certificate_uploaded_as_verified_and_as_base64_der(dps, tmp_path):
    """`isVerified: true` on upload verifies at once (spec 5.7), and base64 DER is accepted like PEM: a group on
    that CA provisions at once."""
    root = pki.root(unique_id("py-selfverified"))
    name = unique_id("py-ca")

    created = dps.service.put_certificate(name, base64.b64encode(root.cert_der).decode(), is_verified=True)

    assert created["properties"]["isVerified"] is True, created
    assert created["properties"]["thumbprint"] == root.sha1_thumbprint
    group_id = unique_id("py-x509-selfverified")
    dps.service.put_group(x509_group(group_id, ca_references={"primary": name}))
    device = pki.device(root, unique_id("py-x509-sv"))
    assert_assigned(dps, register_device(dps, device, tmp_path), device.cn)
    assert group_members(dps, group_id) == {device.cn}
