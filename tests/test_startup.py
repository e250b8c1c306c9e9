"""Start-up: health answers while the warm-up step runs, uploads queue meanwhile, and the
wait for health is the caller's to set."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from driftsync.data import streams
from driftsync.errors import UserError
from driftsync.processes import cli, free_port, wait_healthy
from shared.codec import decode, pack
from shared.images import encode_image
from shared.protocol import Delta, RegisterRequest, UploadBatch
from tests.conftest import wait_for

WARM_UP_SAMPLES = "1024"  # the warm-up step runs on --new-per-step images: seconds of teacher and student work


def test_health_answers_before_the_warm_up_ends_and_uploads_queue_meanwhile(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(tmp_path / "server"), "--torch-threads", "1", "--torch-device", "cpu",
            "--new-per-step", WARM_UP_SAMPLES, "--step-min-samples", "1", "--step-max-wait-s", "0.3"),
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        wait_healthy(url, server, timeout=120)
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["warming"] is True, health
        assert "warm-up step done" not in log.read_text()

        device = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="early").model_dump()).json()
        images, _ = streams.embedded_base(8)
        batch = UploadBatch(device_version=0, codec="webp", images=[encode_image(x, "webp") for x in images],
                            entropy=[0.5] * 8, captured_at=[time.time()] * 8)
        headers = {"Authorization": f"Bearer {device['token']}", "Content-Type": "application/msgpack"}
        r = httpx.post(f"{url}/v1/uploads", content=pack(batch), headers=headers)
        assert r.status_code == 202 and r.json()["accepted"] == 8, r.text
        assert httpx.get(f"{url}/healthz").json()["warming"] is True  # accepted while still warming

        wait_for(lambda: not httpx.get(f"{url}/healthz").json()["warming"], timeout=240, what="warm-up end")
        assert "warm-up step done" in log.read_text()
        reply = httpx.get(f"{url}/v1/deltas", params={"since": 0, "wait": 30}, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        assert decode(reply.content, Delta).new_version >= 1  # the upload sent while warming was learnt
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_wait_healthy_gives_up_after_the_given_timeout_in_one_line() -> None:
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match="not healthy after 1s .*--health-timeout-s"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", silent, timeout=1.0)
        assert time.monotonic() - started < 10
    finally:
        silent.kill()
        silent.wait()


def test_replay_health_timeout_flag_is_checked() -> None:
    done = subprocess.run(cli("replay", "--health-timeout-s", "0"), check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--health-timeout-s" in done.stderr
