"""How long `driftsync serve` takes to answer /healthz, and to end its warm-up step, for a model pair.

    python scripts/bench_startup.py --student resnet18:CKPT --teacher resnet50:CKPT [--torch-threads 2] [--torch-device cpu]

Health answers once the models are loaded (`"warming": true`); the warm-up step, a full CEMA step
on blank images, runs on the worker thread behind it. Prints both times and the step's own log line.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from driftsync.processes import cli, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--torch-threads", default="0")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--timeout-s", type=float, default=1200.0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp())
    log = work / "server.log"
    started = time.monotonic()
    server = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(work / "state"), "--student", args.student,
            "--teacher", args.teacher, "--torch-threads", args.torch_threads, "--torch-device", args.torch_device),
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    healthy = warm = None
    try:
        while time.monotonic() - started < args.timeout_s and server.poll() is None and warm is None:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2.0)
                if health.status_code == 200:
                    if healthy is None:
                        healthy = time.monotonic() - started
                        print(f"healthy after {healthy:.1f} s: {health.json()}", flush=True)
                    if not health.json().get("warming", False):
                        warm = time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"warm-up over after {warm:.1f} s" if warm is not None else "warm-up not over in time")
    print(*[line for line in log.read_text().splitlines() if "warm-up" in line], sep="\n")


if __name__ == "__main__":
    main()
