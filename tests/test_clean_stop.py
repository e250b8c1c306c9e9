"""`docker compose down` sends SIGTERM to every container, then SIGKILL after the stop grace
period (docker-compose.yml: 30 s; Docker's default is 10 s). Real `driftsync serve` and
`driftsync device` processes, a device long-polling: each must exit 0 well within it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx

from driftsync.processes import cli, free_port, wait_healthy
from tests.conftest import wait_for

ENROL, ADMIN = "enrol-secret-0123456789", "admin-secret-0123456789"
GRACE_S = 30.0  # stop_grace_period in docker-compose.yml


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), stdout=log.open("a"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _long_polls(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^driftsync_long_polls (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _stopped_within(processes: list[subprocess.Popen], limit_s: float) -> tuple[list[int | None], float]:
    start = time.monotonic()
    for process in processes:
        process.send_signal(signal.SIGTERM)
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, limit_s - (time.monotonic() - start))))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes, time.monotonic() - start


def test_sigterm_stops_a_server_with_a_waiting_long_poll_and_its_device_cleanly(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log, device_log = tmp_path / "server.log", tmp_path / "device.log"
    server = _start(["serve", "--port", str(port), "--state-dir", str(tmp_path / "server"), "--enrolment-token", ENROL,
                     "--admin-token", ADMIN, "--step-min-samples", "4", "--device-expiry-s", "600"], server_log)
    device = None
    try:
        wait_healthy(url, server)
        device = _start(["device", "--server", url, "--state-dir", str(tmp_path / "devices" / "{name}"),
                         "--enrolment-token", ENROL, "--source", "embedded", "--samples-per-domain", "16",
                         "--corruptions", "fog", "--repeat", "--fps", "20", "--sink", "none",
                         "--e-max-factor", "1e-9"], device_log)  # uploads nothing: no version ends the poll early
        status = tmp_path / "devices"
        wait_for(lambda: list(status.glob("*/status.json")), timeout=120, what="the device's status file")
        wait_for(lambda: _long_polls(url) >= 1, timeout=60, what="a device long poll waiting on the server")
        # the server alone first: uvicorn waits for requests in flight, so the signal must end the poll
        (server_code,), server_took = _stopped_within([server], GRACE_S)
        (device_code,), device_took = _stopped_within([device], GRACE_S)  # its server gone: spool and exit
    finally:
        for process in (server, device):
            if process is not None and process.poll() is None:
                process.kill()
    assert (server_code, device_code) == (0, 0), (server_log.read_text()[-2000:], device_log.read_text()[-2000:])
    assert server_took < 10, f"the server took {server_took:.1f} s: the long poll was not answered at the signal"
    assert device_took < GRACE_S - 5, f"the device took {device_took:.1f} s"
    logs = server_log.read_text()
    assert "Application shutdown complete" in logs and "Traceback" not in logs
    (final,) = [json.loads(p.read_text()) for p in status.glob("*/status.json")]
    assert final["state"] == "stopped" and "Traceback" not in device_log.read_text()


def test_sigterm_while_a_device_waits_for_its_server_is_a_clean_exit(tmp_path):
    """`down` before the server ever answered (a replica still provisioning)."""
    log = tmp_path / "device.log"
    device = _start(["device", "--server", f"http://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "{name}"),
                     "--enrolment-token", ENROL, "--sink", "none"], log)
    try:
        wait_for(lambda: "register" in log.read_text() or device.poll() is not None, timeout=60,
                 what="the device retrying its registration")
        codes, took = _stopped_within([device], GRACE_S)
    finally:
        if device.poll() is None:
            device.kill()
    assert codes == [0] and took < 10, (codes, took, log.read_text()[-2000:])
