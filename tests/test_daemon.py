"""The device daemon as an operator runs it: real `driftsync serve` and `driftsync device`
processes, a watched folder, a JSONL sink, a dead server, a kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from driftsync.data import streams
from driftsync.processes import cli, free_port, wait_healthy
from tests.conftest import wait_for

ENROL, ADMIN = "enrol-secret-0123456789", "admin-secret-0123456789"



def _serve(port: int, state: Path, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(state), "--enrolment-token", ENROL, "--admin-token", ADMIN,
            "--step-min-samples", "4", "--step-max-wait-s", "0.3"),
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


def _device(url: str, tmp: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cli("device", "--server", url, "--name", "cam-1", "--state-dir", str(tmp / "device" / "{name}"),
            "--enrolment-token", ENROL, "--source", "folder", "--data", str(tmp / "inbox"), "--batch-size", "8",
            "--sink", f"jsonl:{tmp / 'predictions.jsonl'}", "--e-max-factor", "2", "--dynamic-lambda", "none", "--upload-share", "none",
            "--upload-batch", "8", "--telemetry-every-s", "1", "--status-port", "0"),
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _drop(inbox: Path, images: np.ndarray, start: int) -> None:
    """Write each image under a temporary name, then rename: the daemon never sees half a file."""
    inbox.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        tmp = inbox / f".img-{start + i:04d}.png"
        Image.fromarray(image).save(tmp)
        os.replace(tmp, inbox / f"img-{start + i:04d}.png")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _status(tmp: Path) -> dict:
    try:
        return json.loads((tmp / "device" / "cam-1" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=60)


def test_daemon_watches_a_folder_spools_offline_and_survives_kill_9(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log, device_log = tmp_path / "server.log", tmp_path / "device.log"
    images, _ = streams.embedded_base(64)
    fog = streams.corrupted(images, streams.Domain("fog", 5), 0)
    server = _serve(port, tmp_path / "server", server_log)
    device = _device(url, tmp_path, device_log)
    try:
        # 1. images dropped in come out as predictions, and the cloud adapts
        _drop(tmp_path / "inbox", fog[:16], 0)
        records = wait_for(lambda: len(r := _records(tmp_path / "predictions.jsonl")) >= 16 and r, what="16 predictions")
        assert {r["id"] for r in records} == {f"img-{i:04d}.png" for i in range(16)}
        for r in records:
            assert set(r) >= {"prediction", "class", "confidence", "entropy", "version", "time"}
            assert 0.0 <= r["confidence"] <= 1.0 and r["entropy"] >= 0.0
        first = wait_for(lambda: (s := _status(tmp_path)).get("version", 0) >= 1 and s, what="a first delta")
        assert first["model_downloaded"] is True and first["uploads"]["sent"] > 0
        served = httpx.get(first["status_url"]).json()  # the same status, live, on loopback
        assert served["device_id"] == first["device_id"] and served["frames"] >= 16

        # 2. the server dies: predictions go on, uploads are spooled
        _stop(server, signal.SIGKILL)
        _drop(tmp_path / "inbox", fog[16:48], 16)
        wait_for(lambda: len(_records(tmp_path / "predictions.jsonl")) >= 48, what="predictions while offline")
        offline = wait_for(lambda: (s := _status(tmp_path))["uploads"]["spooled"] >= 32 and s, what="a spool")
        assert offline["version"] == first["version"] or offline["version"] >= first["version"]
        assert offline["uploads"]["dropped"] == 0 and device.poll() is None

        # 3. the server returns: the spool drains and a newer delta arrives
        version_before = _status(tmp_path)["version"]
        server = _serve(port, tmp_path / "server", server_log)
        drained = wait_for(lambda: (s := _status(tmp_path))["uploads"]["spooled"] == 0
                            and s["version"] > version_before and s, timeout=90, what="spool drained and a new delta")
        assert drained["uploads"]["sent"] >= first["uploads"]["sent"] + 32
        fleet = httpx.get(f"{url}/v1/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert [d["name"] for d in fleet["devices"]] == ["cam-1"]

        # 4. kill -9 the device; it restarts at its version, from its cached model
        _stop(device, signal.SIGKILL)
        at_kill = _status(tmp_path)["version"]
        restarted_at = time.time()
        device = _device(url, tmp_path, device_log)
        resumed = wait_for(lambda: (s := _status(tmp_path)).get("updated_at", 0) > restarted_at and s,
                            what="a restarted device")
        assert resumed["model_downloaded"] is False
        assert resumed["version"] >= at_kill and resumed["device_id"] == drained["device_id"]
        _drop(tmp_path / "inbox", fog[48:64], 48)
        wait_for(lambda: len(_records(tmp_path / "predictions.jsonl")) >= 64, what="predictions after the restart")
        time.sleep(1.0)  # room for any re-classification to show
        # a restarted folder source remembers what it processed: only the new files, each once
        ids = [r["id"] for r in _records(tmp_path / "predictions.jsonl")]
        assert sorted(ids) == [f"img-{i:04d}.png" for i in range(64)]

        # 5. SIGTERM: a clean exit with the final status written
        assert _stop(device) == 0
        assert _status(tmp_path)["state"] == "stopped"
    finally:
        for p in (device, server):
            if p.poll() is None:
                p.kill()
    assert "Traceback" not in device_log.read_text(), device_log.read_text()[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--source", "stdin"], "--frame-size"),
    (["--source", "folder"], "--data"),
    (["--source", "nonsense"], "argument --source: expected one of folder"),
])
def test_daemon_refuses_incomplete_source_options(tiny_server, tmp_path, flags, message):
    url, _ = tiny_server
    out = subprocess.run(cli("device", "--server", url, "--state-dir", str(tmp_path / "d"), *flags),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr + out.stdout
