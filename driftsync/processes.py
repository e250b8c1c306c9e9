"""A server and device processes on loopback, started through the same commands a user runs.

`driftsync demo` and `driftsync replay` both run their collaborative loop this way:
`driftsync serve` and N `driftsync device` processes, talking HTTP.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from driftsync.errors import UserError
from driftsync.progress import bar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"server exited with code {process.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise UserError(f"server at {url} not healthy after {timeout:.0f}s (a larger --health-timeout-s waits longer)")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "driftsync", *args]


def last_line(log_path: Path) -> str:
    """A process's last log line: why it failed, for the one-line error."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _status(path: Path) -> dict:
    """A device's status file (rewritten atomically every 2 s); empty until the first write."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_fleet(
    server_args: list[str],
    device_args: list[list[str]],
    work: Path,
    *,
    port: int = 0,
    frames: int | None = None,
    label: str = "fleet",
    health_timeout_s: float = 300.0,
) -> list[dict]:
    """Serve, run one device per argument list to completion, stop the server; return the
    devices' replay summaries. Each device gets --server, --state-dir, --summary and --sink none
    here. Progress: one bar over the frames all devices replay (`frames` in total), from their
    status files."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for scratch in ("server-state", "devices"):  # a rerun starts from the source model, not the last run's state
        shutil.rmtree(work / scratch, ignore_errors=True)
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
        print(f"[{label}] starting the server", file=sys.stderr, flush=True)
        try:
            wait_healthy(url, server, health_timeout_s)
        except UserError as exc:
            raise UserError(f"{exc}: {last_line(logs / 'server.log')} (see {logs / 'server.log'})") from exc
        print(f"[{label}] server ready in {time.monotonic() - started:.1f}s; starting {len(device_args)} device(s)",
              file=sys.stderr, flush=True)
        for i, args in enumerate(device_args):
            state = work / "devices" / str(i)
            state.mkdir(parents=True, exist_ok=True)
            devices.append(subprocess.Popen(
                cli("device", "--server", url, "--state-dir", str(state), "--summary", str(state / "summary.json"),
                    "--sink", "none", *args),
                stdout=(logs / f"device-{i}.log").open("w"), stderr=subprocess.STDOUT, env=env,
            ))
        _follow(devices, [work / "devices" / str(i) / "status.json" for i in range(len(devices))], frames, label)
        failed = [i for i, p in enumerate(devices) if p.returncode != 0]
        if failed:
            log_path = logs / f"device-{failed[0]}.log"
            raise UserError(f"device {failed[0]} exited with code {devices[failed[0]].returncode}: "
                            f"{last_line(log_path)} (see {log_path})")
    finally:
        for p in devices:
            if p.poll() is None:
                p.terminate()
        _stop_server(server)
        server_log.close()
    return [json.loads((work / "devices" / str(i) / "summary.json").read_text()) for i in range(len(device_args))]


def _stop_server(server: subprocess.Popen) -> None:
    """Stop the server gracefully, without waiting up to 20 s for long-polls whose devices are gone."""
    server.terminate()
    try:
        server.wait(timeout=3.0)
        return
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGINT)  # uvicorn: a second signal stops waiting for open connections
    try:
        server.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _follow(devices: list[subprocess.Popen], status_files: list[Path], frames: int | None, label: str) -> None:
    """Until every device exits: one bar over their frames, with the newest version and uploads."""
    with bar(frames, f"[{label}] replay") as progress:
        running = True
        while running:
            running = any(p.poll() is None for p in devices)  # one last update after they all exited
            time.sleep(1.0 if running else 0.0)
            statuses = [_status(path) for path in status_files]
            progress.set_postfix(version=max((s.get("version", 0) for s in statuses), default=0),
                                 uploads=sum(s.get("uploads", {}).get("sent", 0) for s in statuses), refresh=False)
            progress.update(sum(s.get("frames", 0) for s in statuses) - progress.n)


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
