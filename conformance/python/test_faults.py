"""Azure IoT Python device SDK (azure-iot-device 2.x) against dps-server's fault injection and quotas: for
every kind of fault (429 with a Retry-After, 5xx, added latency, a stuck `assigning`, a dropped connection)
and for the per-device polling limit, the unmodified SDK retries and ends assigned. Rules are added and
removed at run time through the admin API (`/admin/faults`, signed like the service API)."""

import re

import pytest

import dps_harness
from dps_harness import assert_assigned, derive_device_key, random_key, register, symmetric_key_group, unique_id

DPS_IP = "127.0.0.13"
DPS_ADMIN_PORT = 9093

# Polls of one device are limited to 3 per 10 s (Azure's is 5): a device held in `assigning` polls once a
# second (the harness's Retry-After) and is throttled, which the SDK must ride out too.
QUOTAS = "[quotas]\npolls_per_device_per_10s = 3\n"


class FaultServer(dps_harness.DpsServer):
    def config_text(self):
        return super().config_text() + QUOTAS


@pytest.fixture(scope="module")
def dps():
    server = FaultServer(DPS_IP, admin_port=DPS_ADMIN_PORT)
    try:
        server.start()
    except Exception:
        server.stop()
        server.cleanup()
        raise
    try:
        yield server
    finally:
        code = server.stop()
        tail = server.log_tail()
        server.cleanup()
        assert code == 0, f"dps-server exited with {code} after SIGTERM; log:\n{tail}"


@pytest.fixture(scope="module")
def group_key(dps):
    key = random_key()
    dps.service.put_group(symmetric_key_group(unique_id("py-faults"), key, random_key()))
    return key


def add_fault(dps, rule):
    """POST /admin/faults; returns the rule as listed (with `fired`)."""
    return dps.service.call("POST", "/admin/faults", rule, expect=(201,))[2]


def remove_fault(dps, rule_id):
    dps.service.call("DELETE", f"/admin/faults/{rule_id}", expect=(204,))


def fired(dps, rule_id):
    rules = dps.service.call("GET", "/admin/faults")[2]
    return next(rule["fired"] for rule in rules if rule["id"] == rule_id)


def counter(dps, name, label):
    match = re.search(rf'^{name}\{{{label}\}}\s+(\d+)$', dps.metrics(), re.M)
    return int(match.group(1)) if match else 0


def provision_through(dps, group_key, prefix, rule, websockets=False):
    """Adds `rule` for devices named `prefix-*`, provisions one with the SDK, removes the rule; returns how
    often it fired."""
    registration_id = unique_id(prefix)
    rule = dict(rule, id=unique_id("rule"), registration_id=f"{prefix}-*")
    add_fault(dps, rule)
    try:
        result = register(dps, registration_id, derive_device_key(group_key, registration_id), websockets=websockets)
        assert_assigned(dps, result, registration_id)
        return fired(dps, rule["id"])
    finally:
        remove_fault(dps, rule["id"])


@pytest.mark.parametrize("websockets", [pytest.param(False, id="mqtt"), pytest.param(True, id="websocket")])
def test_sdk_retries_an_injected_429_after_its_retry_after(dps, group_key, websockets):
    rule = {"kind": "throttle", "retry_after_secs": 2, "times": 2}
    assert provision_through(dps, group_key, "py-429", rule, websockets) == 2


def test_sdk_retries_injected_5xx_on_register_and_poll(dps, group_key):
    assert provision_through(dps, group_key, "py-503", {"kind": "error", "code": 503000, "times": 2}) == 2
    rule = {"kind": "error", "code": 500000, "requests": "poll", "times": 1}
    assert provision_through(dps, group_key, "py-500", rule) == 1


def test_sdk_waits_out_added_latency(dps, group_key):
    assert provision_through(dps, group_key, "py-slow", {"kind": "latency", "latency_ms": 1500}) >= 2


def test_sdk_keeps_polling_a_stuck_assignment_and_rides_out_the_poll_limit(dps, group_key):
    throttled_before = counter(dps, "dps_throttled_total", 'limit="operation_status"')
    assert provision_through(dps, group_key, "py-stuck", {"kind": "stuck_assigning", "duration_secs": 6}) == 1
    # Six seconds of polls once a second is more than 3 per 10 s: some were answered 429 and retried.
    assert counter(dps, "dps_throttled_total", 'limit="operation_status"') > throttled_before


@pytest.mark.parametrize("websockets", [pytest.param(False, id="mqtt"), pytest.param(True, id="websocket")])
def test_sdk_reconnects_after_a_dropped_connection(dps, group_key, websockets):
    rule = {"kind": "drop_connection", "requests": "register", "times": 1}
    assert provision_through(dps, group_key, "py-drop", rule, websockets) == 1
    assert counter(dps, "dps_faults_injected_total", 'kind="drop_connection"') >= 1
