"""Custom allocation (spec 8.3-8.5) with the unmodified Azure IoT Python device SDK: the server calls a webhook
(here a plain-HTTP one on loopback, allowed by `[custom_allocation] allow_http`), the webhook chooses the hub
from the device's payload, and the device receives the webhook's payload as its `response_payload`.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from azure.iot.device.exceptions import ClientError

from dps_harness import (
    HUB_A,
    HUB_B,
    assert_assigned,
    derive_device_key,
    random_key,
    register,
    symmetric_key_enrollment,
    symmetric_key_group,
    unique_id,
)

DPS_IP = "127.0.0.14"
DPS_EXTRA_CONFIG = "[custom_allocation]\nallow_http = true\nattempts = 3\ninitial_interval_ms = 50\nincrement_ms = 50\n"


class Webhook:
    """An allocation webhook: tenant "heatpumps" goes to hub B, everyone else to hub A; 401 for tenant "intruder"."""

    def __init__(self):
        self.requests = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests.append((self.path, body))
                tenant = (body["deviceRuntimeContext"].get("payload") or {}).get("tenant", "")
                if tenant == "intruder":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hub = HUB_B if tenant == "heatpumps" else HUB_A
                answer = json.dumps({
                    "iotHubHostName": hub,
                    "initialTwin": {"tags": {"tenant": tenant}},
                    "payload": {"tenant": tenant, "welcome": f"to {hub}"},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/allocate?code=function-key"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def webhook():
    w = Webhook()
    yield w
    w.close()


def custom(url):
    return {"allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}}


def test_group_device_is_placed_by_the_webhook_and_gets_its_payload(dps, webhook):
    group_id = unique_id("py-custom")
    group_key = random_key()
    dps.service.put_group(symmetric_key_group(group_id, group_key, random_key(), **custom(webhook.url)))
    registration_id = unique_id("py-heatpump")
    device_key = derive_device_key(group_key, registration_id)

    result = register(dps, registration_id, device_key, payload={"tenant": "heatpumps"})

    assert_assigned(dps, result, registration_id, hubs=(HUB_B,))
    assert json.loads(result.registration_state.response_payload) == {"tenant": "heatpumps", "welcome": f"to {HUB_B}"}
    path, request = webhook.requests[-1]
    assert path == "/api/allocate?code=function-key"
    assert request["deviceRuntimeContext"]["registrationId"] == registration_id
    assert request["deviceRuntimeContext"]["payload"] == {"tenant": "heatpumps"}
    assert request["deviceRuntimeContext"]["symmetricKey"] == {}
    assert request["enrollmentGroup"]["enrollmentGroupId"] == group_id
    assert request["enrollmentGroup"]["attestation"] == {"type": "symmetricKey"}, "keys are never sent"
    assert sorted(request["linkedHubs"]) == sorted([HUB_A, HUB_B])

    # Re-registration (over MQTT over WebSocket): the webhook is called again, with the current location.
    again = register(dps, registration_id, device_key, websockets=True, payload={"tenant": "toasters"})
    assert_assigned(dps, again, registration_id, hubs=(HUB_A,), substatus="deviceDataMigrated")
    context = webhook.requests[-1][1]["deviceRuntimeContext"]
    assert context["currentIotHubHostName"] == HUB_B
    assert context["currentDeviceId"] == registration_id


def test_individual_enrollment_and_a_refusing_webhook(dps, webhook):
    registration_id = unique_id("py-custom-ind")
    key = random_key()
    dps.service.put_enrollment(symmetric_key_enrollment(registration_id, key, random_key(), **custom(webhook.url)))
    result = register(dps, registration_id, key, payload={"tenant": "toasters"})
    assert_assigned(dps, result, registration_id, hubs=(HUB_A,))
    assert "individualEnrollment" in webhook.requests[-1][1]

    # The webhook answers 401: the registration fails with 400209, visible through the service API.
    refused_id = unique_id("py-custom-401")
    dps.service.put_enrollment(symmetric_key_enrollment(refused_id, key, random_key(), **custom(webhook.url)))
    # The SDK raises on a `failed` registration status (its cause names the failed status).
    with pytest.raises(ClientError) as raised:
        register(dps, refused_id, key, payload={"tenant": "intruder"})
    assert "failed registration status" in str(raised.value.__cause__)
    status, state = dps.service.get_registration(refused_id)
    assert status == 200
    assert state["status"] == "failed"
    assert state["errorCode"] == 400209
    assert "401" in state["errorMessage"]
