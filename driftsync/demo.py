"""`driftsync demo`: a real server and N device processes on loopback, then a report.

Everything goes through the same commands a user runs (`driftsync serve`,
`driftsync device`), as separate processes talking HTTP.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from driftsync.report import build_report, markdown, write_report

log = logging.getLogger("driftsync.demo")
STUDENT, TEACHER = "embedded-student", "embedded-teacher"


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 2
    samples_per_domain: int = 200
    severity: int = 5
    corruptions: str = "all"
    out: Path = Path("driftsync-demo")
    seed: int = 0
    fps: float | None = 30.0
    batch_size: int = 16
    port: int = 0
    server_args: tuple[str, ...] = ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} not healthy after {timeout:.0f}s")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "driftsync", *args]


def _last_progress(log_path: Path) -> str:
    try:
        lines = [l for l in log_path.read_text().splitlines() if "replayed" in l]
    except FileNotFoundError:
        return "starting"
    return lines[-1].split("replayed", 1)[1].strip() if lines else "starting"


def run_demo(opts: DemoOptions) -> dict:
    from server.models.embedded import ensure_trained  # torch: the demo runs the server too

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for name in (STUDENT, TEACHER):
        print(f"[demo] model {name}: {ensure_trained(name, log=lambda m: print(f'[train] {m}', flush=True))}", flush=True)

    port = opts.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    server_log = (logs / "server.log").open("w")
    server = subprocess.Popen(
        _cli("serve", "--port", str(port), "--state-dir", str(out / "server-state"), "--torch-threads", "1",
             "--student", STUDENT, "--teacher", TEACHER, *opts.server_args),
        stdout=server_log, stderr=subprocess.STDOUT, env=env,
    )
    devices: list[subprocess.Popen] = []
    try:
        wait_healthy(url, server)
        print(f"[demo] server up at {url}; starting {opts.devices} devices", flush=True)
        for i in range(opts.devices):
            state = out / "devices" / str(i)
            state.mkdir(parents=True, exist_ok=True)
            args = [
                "device", "--server", url, "--state-dir", str(state), "--name", f"demo-{i}",
                "--source", "embedded", "--image-offset", str(i * opts.samples_per_domain),
                "--corruptions", opts.corruptions, "--severity", str(opts.severity),
                "--samples-per-domain", str(opts.samples_per_domain), "--batch-size", str(opts.batch_size),
                "--fps", str(opts.fps) if opts.fps else "none", "--seed", str(opts.seed + i),
                "--threads", "1", "--summary", str(state / "summary.json"),
            ]
            devices.append(subprocess.Popen(
                _cli(*args), stdout=(logs / f"device-{i}.log").open("w"), stderr=subprocess.STDOUT, env=env,
            ))
        while any(p.poll() is None for p in devices):
            time.sleep(5.0)
            progress = ", ".join(f"device {i}: {_last_progress(logs / f'device-{i}.log')}" for i in range(opts.devices))
            print(f"[demo] {time.monotonic() - started:5.0f}s {progress}", flush=True)
        failed = [i for i, p in enumerate(devices) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"devices {failed} failed; see {logs}")
    finally:
        for p in devices:
            if p.poll() is None:
                p.terminate()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()

    summaries = [json.loads((out / "devices" / str(i) / "summary.json").read_text()) for i in range(opts.devices)]
    report = build_report(summaries, {
        "dataset": "embedded", "setting": "continual", "severity": opts.severity, "method": "cema",
        "student": STUDENT, "teacher": TEACHER, "corruption_constants": "cifar10",
        "seconds": round(time.monotonic() - started, 1),
    })
    write_report(report, _mean_curve(summaries), out)
    print(markdown(report))
    print(f"[demo] wrote {out}/report.json, report.md, report.png", flush=True)
    return report


def _mean_curve(summaries: list[dict]) -> list[dict]:
    """Average the devices' curves point by point when they replayed equal-length streams."""
    curves = [s["curve"] for s in summaries]
    if not curves or any(len(c) != len(curves[0]) for c in curves):
        return curves[0] if curves else []
    return [
        dict(points[0], accuracy=sum(p["accuracy"] for p in points) / len(points),
             accuracy_source=sum(p["accuracy_source"] for p in points) / len(points))
        for points in zip(*curves)
    ]
