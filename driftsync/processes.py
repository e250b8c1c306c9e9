"""A server and device processes on loopback, started through the same commands a user runs.

`driftsync demo` and `driftsync replay` both run their collaborative loop this way:
`driftsync serve` and N `driftsync device` processes, talking HTTP.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


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


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "driftsync", *args]


def last_progress(log_path: Path) -> str:
    """The device's latest 'replayed ...' log line, for a one-line progress report."""
    try:
        lines = [line for line in log_path.read_text().splitlines() if "replayed" in line]
    except FileNotFoundError:
        return "starting"
    return lines[-1].split("replayed", 1)[1].strip() if lines else "starting"


def run_fleet(
    server_args: list[str],
    device_args: list[list[str]],
    work: Path,
    *,
    port: int = 0,
    report: Callable[[float, str], None] = lambda elapsed, progress: None,
) -> list[dict]:
    """Serve, run one device per argument list to completion, stop the server; return the
    devices' replay summaries. Each device gets --server, --state-dir and --summary here."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_log = (logs / "server.log").open("w")
    server = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(work / "server-state"), *server_args),
        stdout=server_log, stderr=subprocess.STDOUT, env=env,
    )
    devices: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        wait_healthy(url, server)
        for i, args in enumerate(device_args):
            state = work / "devices" / str(i)
            state.mkdir(parents=True, exist_ok=True)
            devices.append(subprocess.Popen(
                cli("device", "--server", url, "--state-dir", str(state), "--summary", str(state / "summary.json"), *args),
                stdout=(logs / f"device-{i}.log").open("w"), stderr=subprocess.STDOUT, env=env,
            ))
        while any(p.poll() is None for p in devices):
            time.sleep(5.0)
            report(time.monotonic() - started,
                   ", ".join(f"device {i}: {last_progress(logs / f'device-{i}.log')}" for i in range(len(devices))))
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
    return [json.loads((work / "devices" / str(i) / "summary.json").read_text()) for i in range(len(device_args))]


def mean_curve(summaries: list[dict]) -> list[dict]:
    """Average the devices' curves point by point when they replayed equal-length streams."""
    curves = [s["curve"] for s in summaries]
    if not curves or any(len(c) != len(curves[0]) for c in curves):
        return curves[0] if curves else []
    return [
        dict(points[0], accuracy=sum(p["accuracy"] for p in points) / len(points),
             accuracy_source=sum(p["accuracy_source"] for p in points) / len(points))
        for points in zip(*curves)
    ]
