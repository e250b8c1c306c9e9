"""`driftsync fleet` runs docker-compose.yml's very services as local processes: 3 devices."""
from __future__ import annotations

import json
import subprocess

from driftsync.processes import cli
from tests.conftest import REPO


def test_fleet_from_the_compose_file_adapts_every_device(tmp_path):
    work = tmp_path / "fleet"
    short_stream = {
        "DRIFTSYNC_REPEAT": "false", "DRIFTSYNC_SAMPLES_PER_DOMAIN": "32", "DRIFTSYNC_CORRUPTIONS": "fog,contrast,snow",
        "DRIFTSYNC_FPS": "none", "DRIFTSYNC_LOCKSTEP_TIMEOUT_S": "20", "DRIFTSYNC_SINK": "",
        "DRIFTSYNC_STEP_MIN_SAMPLES": "4",
    }
    env_flags = [flag for key, value in short_stream.items() for flag in ("--env", f"{key}={value}")]
    out = subprocess.run(
        cli("fleet", "--compose", str(REPO / "docker-compose.yml"), "--scale", "device=3", "--work", str(work),
            "--duration", "240", *env_flags),
        capture_output=True, text=True, timeout=420,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    statuses = {}
    for i in (1, 2, 3):
        status = json.loads((work / "volumes" / "device-state" / f"device-{i}" / "status.json").read_text())
        statuses[status["name"]] = status
        assert status["state"] == "stopped" and status["frames"] == 3 * 32
        assert status["deltas"]["applied"] >= 1 and status["version"] >= 1, status
        assert status["uploads"]["sent"] > 0 and status["uploads"]["spooled"] == 0
    assert sorted(statuses) == ["device-1", "device-2", "device-3"]
    assert len({s["cohort"] for s in statuses.values()}) == 3  # per-device state by default
    logs = {i: (work / "logs" / f"device-{i}.log").read_text() for i in (1, 2, 3)}
    assert all("Traceback" not in log for log in logs.values())
