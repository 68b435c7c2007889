"""pytest fixtures: one `dps-server` per test module, on the loopback address the module names (`DPS_IP`).

The Python suite owns 127.0.0.10-19 (the Node suite 127.0.0.20-29); each module sets a distinct `DPS_IP`.
"""

import pytest

pytest.register_assert_rewrite("dps_harness")

import dps_harness  # noqa: E402


@pytest.fixture(scope="module")
def dps(request):
    ip = getattr(request.module, "DPS_IP", None)
    if ip is None:
        raise RuntimeError(f"{request.module.__name__} must set DPS_IP (one of 127.0.0.10-19)")
    server = dps_harness.DpsServer(ip)
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
        # SIGTERM must stop the server gracefully (exit status 0), spec'd by the server contract.
        assert code == 0, f"dps-server exited with {code} after SIGTERM; log:\n{tail}"
