"""Test harness for the Python conformance suite: runs a `dps-server`, talks to its service API.

Nothing here touches the Azure SDK; the tests use `azure-iot-device` exactly as a device would. The service
API helper is deliberately tiny (urllib + a hand-signed SAS token, spec section 5.1) so that the Python suite
depends on nothing but the device SDK and pytest (and `cryptography`, through `conformance/pki.py`, for the X.509
certificates).
"""

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from azure.iot.device import X509, ProvisioningDeviceClient
from azure.iot.device.common.evented_callback import EventedCallback

REPO_ROOT = Path(__file__).resolve().parents[2]
ID_SCOPE = "0ne00000010"
HUB_A = "hub-a.example.net"
HUB_B = "hub-b.example.net"
LINKED_HUBS = (HUB_A, HUB_B)
SERVICE_API_VERSION = "2021-10-01"

# Bounded waits (seconds). Generous: CI machines are small and shared; nothing asserts on timings.
READY_TIMEOUT = 90
STOP_TIMEOUT = 20


def server_binary():
    """The `dps-server` binary: `$DPS_SERVER_BIN`, else `target/debug/dps-server` of this checkout."""
    path = os.environ.get("DPS_SERVER_BIN") or str(REPO_ROOT / "target" / "debug" / "dps-server")
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"dps-server binary not found at {path}: run `cargo build -p dps-server` or set DPS_SERVER_BIN"
        )
    return path


def random_key(nbytes=64):
    """A fresh base64 symmetric key (Azure generates 64-byte keys)."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode()


def derive_device_key(group_key, registration_id):
    """Per-device key of a symmetric-key group: base64(HMAC-SHA256(b64decode(groupKey), regId)) (spec 4.3)."""
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def unique_id(prefix):
    """A registration / group ID unique within a run (lowercase alphanumerics and '-', spec 11.1)."""
    return f"{prefix}-{secrets.token_hex(4)}"


class ServiceApiError(Exception):
    """A service API call answered with an unexpected HTTP status."""

    def __init__(self, method, path, status, body, headers):
        super().__init__(f"{method} {path} -> {status}: {body!r}")
        self.status = status
        self.body = body
        self.headers = headers


class ServiceApi:
    """Minimal client of the DPS service API (spec section 5) authenticated with a shared access policy."""

    def __init__(self, connection_string, ca_file, address=None):
        fields = dict(part.split("=", 1) for part in connection_string.strip().split(";") if part)
        self.host = fields["HostName"]
        self.key_name = fields["SharedAccessKeyName"]
        self.key = fields["SharedAccessKey"]
        self.address = address or self.host
        self.context = ssl.create_default_context(cafile=str(ca_file))

    def sas_token(self, ttl=3600):
        """`SharedAccessSignature sr={host}&sig=…&se=…&skn={policy}` (spec 5.1)."""
        sr = urllib.parse.quote(self.host, safe="")
        se = int(time.time()) + ttl
        mac = hmac.new(base64.b64decode(self.key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
        sig = urllib.parse.quote(base64.b64encode(mac).decode(), safe="")
        return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={self.key_name}"

    def call(self, method, path, body=None, headers=None, expect=(200,)):
        """Send one request; returns (status, headers, decoded JSON body or None)."""
        url = f"https://{self.address}{path}?api-version={SERVICE_API_VERSION}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", self.sas_token())
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json; charset=utf-8")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                status, raw, response_headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, raw, response_headers = error.code, error.read(), dict(error.headers)
        decoded = json.loads(raw) if raw.strip() else None
        if expect is not None and status not in expect:
            raise ServiceApiError(method, path, status, decoded, response_headers)
        return status, response_headers, decoded

    def put_enrollment(self, enrollment, etag=None):
        headers = {"If-Match": etag} if etag else None
        path = "/enrollments/" + urllib.parse.quote(enrollment["registrationId"], safe="")
        return self.call("PUT", path, enrollment, headers)[2]

    def get_enrollment(self, registration_id):
        return self.call("GET", "/enrollments/" + urllib.parse.quote(registration_id, safe=""))[2]

    def put_group(self, group, etag=None):
        headers = {"If-Match": etag} if etag else None
        path = "/enrollmentGroups/" + urllib.parse.quote(group["enrollmentGroupId"], safe="")
        return self.call("PUT", path, group, headers)[2]

    def get_group(self, group_id):
        return self.call("GET", "/enrollmentGroups/" + urllib.parse.quote(group_id, safe=""))[2]

    def attestation_mechanism(self, registration_id):
        path = "/enrollments/" + urllib.parse.quote(registration_id, safe="") + "/attestationmechanism"
        return self.call("POST", path)[2]

    def get_registration(self, registration_id, expect=(200,)):
        """(status, DeviceRegistrationState or error body) of `GET /registrations/{id}`."""
        status, _, body = self.call(
            "GET", "/registrations/" + urllib.parse.quote(registration_id, safe=""), expect=expect
        )
        return status, body

    # --- CA certificates (spec 5.7, 7.3): the instance's registry of uploaded / verified CAs ---------------

    @staticmethod
    def _certificate_path(name, action=None):
        path = "/certificates/" + urllib.parse.quote(name, safe="")
        return path + "/" + action if action else path

    def put_certificate(self, name, certificate, is_verified=False, etag=None, expect=(200, 201)):
        """`PUT /certificates/{name}` with `{"properties": {"certificate", "isVerified"}}`; returns the body."""
        headers = {"If-Match": etag} if etag else None
        body = {"properties": {"certificate": certificate, "isVerified": is_verified}}
        return self.call("PUT", self._certificate_path(name), body, headers, expect=expect)[2]

    def get_certificate(self, name, expect=(200,)):
        return self.call("GET", self._certificate_path(name), expect=expect)[2]

    def list_certificates(self):
        """`GET /certificates` → the `value` list."""
        return self.call("GET", "/certificates")[2]["value"]

    def delete_certificate(self, name, etag, expect=(200, 204)):
        """`DELETE /certificates/{name}` with `If-Match`; returns the status."""
        return self.call("DELETE", self._certificate_path(name), headers={"If-Match": etag}, expect=expect)[0]

    def generate_verification_code(self, name, etag, expect=(200,)):
        """`POST /certificates/{name}/generateVerificationCode` with `If-Match`; the body carries
        `properties.verificationCode` and a new etag."""
        path = self._certificate_path(name, "generateVerificationCode")
        return self.call("POST", path, headers={"If-Match": etag}, expect=expect)[2]

    def verify_certificate(self, name, etag, proof_pem, expect=(200,)):
        """`POST /certificates/{name}/verify` with `If-Match` and `{"certificate": <proof PEM>}`."""
        path = self._certificate_path(name, "verify")
        return self.call("POST", path, {"certificate": proof_pem}, {"If-Match": etag}, expect=expect)[2]

    def upload_verified_ca(self, name, ca):
        """Uploads the `pki.Identity` `ca` unverified, then verifies it by proof of possession (spec 7.3): a
        verification code, a certificate with CN = the code signed by the CA's key, `verify`. Returns the
        verified certificate's body."""
        import pki  # conformance/pki.py (on sys.path through conftest.py)

        uploaded = self.put_certificate(name, ca.cert_pem)
        assert uploaded["properties"]["isVerified"] is False, uploaded
        coded = self.generate_verification_code(name, uploaded["etag"])
        code = coded["properties"]["verificationCode"]
        assert code, coded
        verified = self.verify_certificate(name, coded["etag"], pki.proof(ca, code).cert_pem)
        assert verified["properties"]["isVerified"] is True, verified
        return verified

    def query_group_registrations(self, group_id):
        """Every registration state of a group, following `x-ms-continuation` pages."""
        items, continuation = [], None
        for _ in range(100):
            headers = {"x-ms-max-item-count": "10"}
            if continuation:
                headers["x-ms-continuation"] = continuation
            path = "/registrations/" + urllib.parse.quote(group_id, safe="") + "/query"
            _, response_headers, body = self.call("POST", path, {"query": "SELECT * FROM registrations"}, headers)
            items.extend(body)
            lowered = {k.lower(): v for k, v in response_headers.items()}
            continuation = lowered.get("x-ms-continuation")
            if not continuation:
                return items, lowered
        raise AssertionError("registration query never ended (more than 100 pages)")


def symmetric_key_enrollment(registration_id, primary, secondary, **extra):
    """An IndividualEnrollment body with symmetric-key attestation."""
    enrollment = {
        "registrationId": registration_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
    }
    enrollment.update(extra)
    return enrollment


def symmetric_key_group(group_id, primary, secondary, **extra):
    """An EnrollmentGroup body with symmetric-key attestation."""
    group = {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
    }
    group.update(extra)
    return group


def x509_certificates(primary=None, secondary=None):
    """X509Certificates: `{"primary": {"certificate": …}, "secondary": {…}}` (PEM or base64 DER text)."""
    certificates = {}
    if primary is not None:
        certificates["primary"] = {"certificate": primary}
    if secondary is not None:
        certificates["secondary"] = {"certificate": secondary}
    return certificates


def x509_enrollment(registration_id, primary=None, secondary=None, ca_references=None, **extra):
    """An IndividualEnrollment with X.509 attestation: the device's own certificate(s) in `clientCertificates`
    (self-signed or CA-signed), or `caReferences` naming uploaded CA certificates."""
    x509 = {"caReferences": ca_references} if ca_references else {
        "clientCertificates": x509_certificates(primary, secondary)}
    enrollment = {"registrationId": registration_id, "attestation": {"type": "x509", "x509": x509}}
    enrollment.update(extra)
    return enrollment


def x509_group(group_id, primary=None, secondary=None, ca_references=None, **extra):
    """An EnrollmentGroup with X.509 attestation: inline `signingCertificates`, or `caReferences` naming uploaded
    CA certificates."""
    x509 = {"caReferences": ca_references} if ca_references else {
        "signingCertificates": x509_certificates(primary, secondary)}
    group = {"enrollmentGroupId": group_id, "attestation": {"type": "x509", "x509": x509}}
    group.update(extra)
    return group


class DpsServer:
    """One `dps-server run` on its own loopback address and fresh data directory."""

    def __init__(self, ip, retry_after_secs=1, admin_port=None, extra_config=""):
        self.ip = ip
        self.extra_config = extra_config  # TOML appended to the generated configuration (whole tables)
        self.retry_after_secs = retry_after_secs
        self.admin_port = admin_port  # plain HTTP /health + /metrics on ip:admin_port when set
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"dps-conformance-py-{ip}-"))
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self.process = None
        self.ca_path = None
        self.ca_pem = None
        self.connection_string = None
        self.service = None
        self.ready = None

    def config_text(self):
        hubs = "".join(f'[[linked_hubs]]\nhost_name = "{hub}"\n' for hub in LINKED_HUBS)
        return (
            f'id_scope = "{ID_SCOPE}"\n'
            f'service_host_name = "{self.ip}"\n'
            f'device_host_name = "{self.ip}"\n'
            f'data_dir = "{self.data_dir}"\n'
            f"retry_after_secs = {self.retry_after_secs}\n"
            "[listen]\n"
            f'https = "{self.ip}:443"\n'
            f'mqtt = "{self.ip}:8883"\n'
            f'amqp = "{self.ip}:5671"\n'
            + (f'admin = "{self.ip}:{self.admin_port}"\n' if self.admin_port else "")
            + "[tls]\n"
            f'subject_alt_names = ["{self.ip}", "localhost"]\n' + hubs + self.extra_config
        )

    def start(self):
        config_path = self.data_dir.parent / (self.data_dir.name + ".toml")
        config_path.write_text(self.config_text())
        log = open(self.log_path, "wb")
        # The server reads DPS_* variables with precedence over the config file: keep ours out of its way.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPS_")}
        env["NO_COLOR"] = "1"  # plain log lines in the log file
        self.process = subprocess.Popen(
            [server_binary(), "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        ready_file = self.data_dir / "ready.json"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dps-server exited with {self.process.returncode} before it was ready; log:\n{self.log_tail()}"
                )
            if ready_file.exists():
                try:
                    self.ready = json.loads(ready_file.read_text())
                    break
                except ValueError:
                    pass  # being written; read again
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dps-server not ready after {READY_TIMEOUT}s; log:\n{self.log_tail()}")
            time.sleep(0.05)
        self.ca_path = self.data_dir / "tls" / "ca.pem"
        self.ca_pem = self.ca_path.read_text()
        self.connection_string = (self.data_dir / "connection-string.txt").read_text().strip()
        self.service = ServiceApi(self.connection_string, self.ca_path)
        return self

    def metrics(self):
        """The admin listener's `/metrics` text (needs `admin_port`)."""
        if not self.admin_port:
            raise RuntimeError("this server has no admin listener (DpsServer(admin_port=...))")
        with urllib.request.urlopen(f"http://{self.ip}:{self.admin_port}/metrics", timeout=30) as response:
            return response.read().decode()

    def registrations_with_error(self, error_code):
        """How many device registrations (any transport) the server answered with `error_code` so far
        (`dps_registrations_total{…,error_code="…"}`)."""
        pattern = re.compile(r'^dps_registrations_total\{([^}]*)\}\s+(\d+)', re.M)
        return sum(
            int(count) for labels, count in pattern.findall(self.metrics()) if f'error_code="{error_code}"' in labels
        )

    def log_tail(self, lines=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self):
        """SIGTERM, bounded wait, then SIGKILL. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        code = self.process.returncode
        self.process = None
        return code

    def cleanup(self):
        if os.environ.get("DPS_CONFORMANCE_KEEP"):
            print(f"keeping {self.data_dir} and {self.log_path}")
            return
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for suffix in (".toml", ".log"):
            try:
                (self.data_dir.parent / (self.data_dir.name + suffix)).unlink()
            except OSError:
                pass


def register(server, registration_id, symmetric_key, websockets=False, payload=None):
    """Provision one device with the unmodified Azure SDK; returns its `RegistrationResult`."""
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=server.ip,
        registration_id=registration_id,
        id_scope=ID_SCOPE,
        symmetric_key=symmetric_key,
        websockets=websockets,
        server_verification_cert=server.ca_pem,
    )
    return _register(client, payload)


def register_x509(server, registration_id, cert_file, key_file, websockets=False, payload=None):
    """Provision one X.509 device with the unmodified Azure SDK: `cert_file` is the PEM the device presents in
    TLS (its certificate, then the intermediates), `key_file` its private key. Returns the `RegistrationResult`."""
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=server.ip,
        registration_id=registration_id,
        id_scope=ID_SCOPE,
        x509=X509(cert_file=str(cert_file), key_file=str(key_file)),
        websockets=websockets,
        server_verification_cert=server.ca_pem,
    )
    return _register(client, payload)


def _register(client, payload):
    """Set the payload, register, and shut the client's pipeline down unless it was assigned."""
    if payload is not None:
        client.provisioning_payload = payload
    try:
        result = client.register()
    except Exception:
        _shutdown(client)
        raise
    if result is None or result.status != "assigned":
        _shutdown(client)
    return result


def _shutdown(client):
    """Test hygiene only: after a failed registration the SDK keeps its MQTT pipeline (and its reconnect timers)
    alive, and the provisioning client has no public shutdown; stop it so nothing outlives the test."""
    try:
        done = EventedCallback()
        client._pipeline.shutdown(callback=done)
        done.wait_for_completion()
    except Exception as error:  # cleanup must not mask the test's outcome
        print(f"provisioning client shutdown: {error!r}")


def assert_assigned(server, result, registration_id, device_id=None, hubs=LINKED_HUBS,
                    substatus="initialAssignment"):
    """The SDK result says assigned (to one of `hubs`, as `device_id`, with `substatus`), and the service API's
    registration state agrees. Returns the service API's DeviceRegistrationState."""
    device_id = device_id or registration_id
    assert result is not None, "register() returned no result"
    assert result.status == "assigned", f"status {result.status!r}: {result}"
    assert result.operation_id, "no operationId"
    state = result.registration_state
    assert state is not None, f"assigned without registrationState: {result}"
    assert state.assigned_hub in hubs, f"assignedHub {state.assigned_hub!r} not in {hubs}"
    assert state.device_id == device_id
    assert state.sub_status == substatus, f"substatus {state.sub_status!r}, expected {substatus!r}"
    assert state.created_date_time and state.last_update_date_time and state.etag, str(state)

    status, service_state = server.service.get_registration(registration_id)
    assert status == 200
    assert service_state["registrationId"].lower() == registration_id.lower()
    assert service_state["status"] == "assigned"
    assert service_state["assignedHub"] == state.assigned_hub
    assert service_state["deviceId"] == device_id
    assert service_state["substatus"] == substatus
    assert service_state.get("etag"), service_state
    return service_state
