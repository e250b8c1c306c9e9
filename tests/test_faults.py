"""Faults on loopback with real processes: a server kill -9 mid-stream, a device kill -9
mid-upload, and the network cut (the server stopped) for 30 s. Each asserts that nothing the
server accepted was lost and that every device ends on its cohort's latest version."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from driftsync.processes import cli, free_port, wait_healthy
from tests.conftest import wait_for

ADMIN = {"Authorization": "Bearer adm-test-token-0123456789"}


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen | None = None
        self.devices: dict[int, subprocess.Popen] = {}

    def serve(self) -> None:
        self.server = subprocess.Popen(
            cli("serve", "--port", str(self.port), "--state-dir", str(self.tmp / "server"), "--admin-token", "adm-test-token-0123456789",
                "--step-max-wait-s", "0.5", "--step-min-samples", "4"),
            stdout=(self.tmp / "server.log").open("a"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        wait_healthy(self.url, self.server)

    def device(self, i: int, *source: str) -> None:
        source = source or ("--source", "embedded", "--corruptions", "fog,contrast,snow", "--samples-per-domain", "100",
                            "--fps", "12", "--domain-offset", str(i))
        self.devices[i] = subprocess.Popen(
            cli("device", "--server", self.url, "--name", f"dev-{i}", "--state-dir", str(self.tmp / "devices" / "{name}"),
                "--e-max-factor", "2", "--dynamic-lambda", "none", "--upload-share", "none", "--upload-batch", "8",
                *source),
            stdout=(self.tmp / f"device-{i}.log").open("a"), stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def status(self, i: int) -> dict:
        try:
            return json.loads((self.tmp / "devices" / f"dev-{i}" / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def fleet(self) -> dict:
        return httpx.get(f"{self.url}/v1/fleet", headers=ADMIN, timeout=10).json()

    def stop_all(self) -> None:
        for p in [*self.devices.values(), self.server]:
            if p is not None and p.poll() is None:
                p.kill()



def _sent(fleet: Fleet, i: int) -> int:
    return fleet.status(i).get("uploads", {}).get("sent", 0)


@pytest.mark.parametrize("fault", ["server_kill_9", "device_kill_9_mid_upload", "network_cut_30s"])
def test_nothing_accepted_is_lost_and_every_device_converges(tmp_path, fault):
    fleet = Fleet(tmp_path)
    try:
        fleet.serve()
        for i in range(3):
            fleet.device(i)
        wait_for(lambda: all(_sent(fleet, i) > 0 for i in range(3)), 90, "uploads from every device")
        if fault == "server_kill_9":
            fleet.server.send_signal(signal.SIGKILL)
            fleet.server.wait(timeout=30)
            time.sleep(3)
            fleet.serve()
        elif fault == "device_kill_9_mid_upload":
            wait_for(lambda: fleet.status(0).get("uploads", {}).get("requests", 0) >= 2, 60, "device 0 uploading")
            fleet.devices[0].send_signal(signal.SIGKILL)
            fleet.devices[0].wait(timeout=30)
            fleet.device(0)  # same state directory: its spool and version come back with it
        else:
            fleet.server.terminate()
            fleet.server.wait(timeout=60)
            frames = [fleet.status(i)["frames"] for i in range(3)]
            time.sleep(30)
            offline = [fleet.status(i) for i in range(3)]
            assert any(s["frames"] > f for s, f in zip(offline, frames))  # inference went on
            assert any(s["uploads"]["spooled"] > 0 for s in offline)  # and uploads were spooled
            fleet.serve()
        for i in range(3):  # the stream ends; whatever is still spooled stays on disk
            assert fleet.devices[i].wait(timeout=240) == 0, (tmp_path / f"device-{i}.log").read_text()[-3000:]

        # each device comes back as an idle daemon: its spool drains...
        idle = tmp_path / "idle"
        idle.mkdir()
        for i in range(3):
            fleet.device(i, "--source", "folder", "--data", str(idle))
        for i in range(3):
            wait_for(lambda: (s := fleet.status(i)).get("state") == "running" and s["uploads"]["spooled"] == 0, 90,
                  f"device {i}'s spool draining")

        # ...the server learns everything it accepted...
        def caught_up() -> dict | None:
            report = fleet.fleet()
            cohorts = report["cohorts"]
            return report if len(cohorts) == 3 and all(c["learnt_samples"] >= c["accepted_samples"] > 0 for c in cohorts) else None

        report = wait_for(caught_up, 120, "the server learning every accepted upload")
        # ...and every device ends on its cohort's latest version
        latest = {c["cohort"]: c["version"] for c in report["cohorts"]}
        for i in range(3):
            wait_for(lambda: (s := fleet.status(i)).get("state") == "running" and s["version"] == latest[s["cohort"]],
                  60, f"device {i} converging")
        for i in range(3):
            fleet.devices[i].terminate()
            assert fleet.devices[i].wait(timeout=60) == 0
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        fleet.stop_all()
