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
        status = json.loads((work / "state" / f"device-{i}" / "status.json").read_text())
        statuses[status["name"]] = status
        assert status["state"] == "stopped" and status["frames"] == 3 * 32
        assert status["deltas"]["applied"] >= 1 and status["version"] >= 1, status
        assert status["uploads"]["sent"] > 0 and status["uploads"]["spooled"] == 0
    assert sorted(statuses) == ["device-1", "device-2", "device-3"]
    assert len({s["cohort"] for s in statuses.values()}) == 3  # per-device state by default
    logs = {i: (work / "logs" / f"device-{i}.log").read_text() for i in (1, 2, 3)}
    assert all("Traceback" not in log for log in logs.values())


def test_fleet_scale_profile_runs_the_scale_out_topology_locally(tmp_path):
    """The compose `scale` profile as local processes: PostgreSQL, Redis, the migration, two API
    replicas behind HAProxy, two workers; the devices reach the gateway (no `server` runs, so they
    fail over to it) and every one adapts."""
    import shutil

    import pytest

    from driftsync.localservices import postgres_bindir

    missing = [name for name in ("redis-server", "haproxy") if shutil.which(name) is None]
    if missing or postgres_bindir() is None:
        pytest.skip(f"not installed: {missing or ['postgresql']} (apt-get install postgresql redis-server haproxy; "
                    ".ci/run does this)")
    work = tmp_path / "fleet"
    stream = {"DRIFTSYNC_REPEAT": "false", "DRIFTSYNC_SAMPLES_PER_DOMAIN": "32", "DRIFTSYNC_CORRUPTIONS": "fog,contrast",
              "DRIFTSYNC_FPS": "none", "DRIFTSYNC_LOCKSTEP_TIMEOUT_S": "20", "DRIFTSYNC_SINK": "",
              "DRIFTSYNC_STEP_MIN_SAMPLES": "4"}
    env_flags = [flag for key, value in stream.items() for flag in ("--env", f"{key}={value}")]
    out = subprocess.run(
        cli("fleet", "--compose", str(REPO / "docker-compose.yml"), "--profile", "scale", "--scale", "device=2",
            "--work", str(work), "--until-exit", "device", "--duration", "240", *env_flags),
        capture_output=True, text=True, timeout=420,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for i in (1, 2):
        status = json.loads((work / "state" / f"device-{i}" / "status.json").read_text())
        assert status["frames"] == 2 * 32 and status["version"] >= 1, status
        assert status["uploads"]["sent"] > 0 and status["uploads"]["spooled"] == 0
    logs = {path.name: path.read_text() for path in (work / "logs").glob("*.log")}
    assert "api-1-1.log" in logs and "gateway-1.log" in logs and "server-1.log" not in logs
    assert any("took partition" in logs[f"worker-{i}-1.log"] for i in (1, 2))
    assert "schema at version" in logs["migrate-1.log"]
    assert all("Traceback" not in text for text in logs.values())
