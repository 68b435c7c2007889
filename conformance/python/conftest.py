"""pytest fixtures: one `dps-server` per test module, on the loopback address the module names (`DPS_IP`).

The Python suite owns 127.0.0.10-19 (the Node suite 127.0.0.20-29); each module sets a distinct `DPS_IP`. A module
that sets `DPS_ADMIN_PORT` also gets the server's plain-HTTP admin listener (`/metrics`) on `DPS_IP:DPS_ADMIN_PORT`;
`DPS_EXTRA_CONFIG` (TOML tables) is appended to the server's configuration.
`conformance/` is put on `sys.path` so that tests can `import pki` (the X.509 certificate generator).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.register_assert_rewrite("dps_harness")

import dps_harness  # noqa: E402


@pytest.fixture(scope="module")
def dps(request):
    ip = getattr(request.module, "DPS_IP", None)
    if ip is None:
        raise RuntimeError(f"{request.module.__name__} must set DPS_IP (one of 127.0.0.10-19)")
    server = dps_harness.DpsServer(
        ip,
        admin_port=getattr(request.module, "DPS_ADMIN_PORT", None),
        extra_config=getattr(request.module, "DPS_EXTRA_CONFIG", ""),
    )
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
