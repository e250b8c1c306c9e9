"""Scale-out side by side: the single process against API replicas and workers on PostgreSQL
and Redis, all on this machine, each configuration under the same `driftsync loadtest`.

    python scripts/bench_scale.py [--configs all,1x1,1x2,2x1,2x2] [--devices 32] [--duration-s 30]
                                  [--large 64,256] [--kill-worker] [--json OUT]

A configuration AxW is A API replicas and W workers. Rows: upload requests/s and p99 (the
API side), adapted samples/s and freshness p95 (the worker side), and whether every
accepted sample was learnt. `--large` adds runs of 64 and 256 devices against 2x2 (the
compose `scale` profile's shape); `--kill-worker` kills one worker with SIGKILL mid-run there.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx

from driftsync.loadtest import LoadOptions, run_load
from driftsync.processes import cli, free_port, wait_healthy
from driftsync.topology import Topology

ADMIN = "bench-admin-token-0123456789abcdef"
COMMON = ["--admin-token", ADMIN, "--device-samples-per-s", "none"]


def _service(kind: str, root: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "driftsync.localservices", kind, "--port", str(port),
                                "--data", str(root / kind), *extra],
                               stdout=(root / f"{kind}.log").open("w"), stderr=subprocess.STDOUT)
    return process, port


def _wait_postgres(port: int) -> None:
    import psycopg

    deadline = time.monotonic() + 120
    while True:
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/bench", connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _load(url: str, devices: int, duration_s: float, label: str, pid: int | None = None) -> dict:
    opts = LoadOptions(server=url, devices=devices, duration_s=duration_s, fps=30.0, settle_s=60.0,
                       admin_token=ADMIN, server_pid=pid)
    return asyncio.run(run_load(opts, progress=lambda text: print(f"[{label}] {text}", flush=True)))


def run_single(devices: int, duration_s: float) -> dict:
    with tempfile.TemporaryDirectory() as state:
        port = free_port()
        server = subprocess.Popen(cli("serve", "--port", str(port), "--state-dir", state, *COMMON),
                                  stdout=(Path(state) / "server.log").open("w"), stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server)
            return _load(f"http://127.0.0.1:{port}", devices, duration_s, f"all, {devices} devices", server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)


def run_topology(apis: int, workers: int, devices: int, duration_s: float, kill_worker: bool = False) -> dict:
    root = Path(tempfile.mkdtemp(prefix="driftsync-bench-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    postgres, pg_port = _service("postgres", root, "--database", "bench")
    redis, redis_port = _service("redis", root)
    topo = Topology(f"postgresql://postgres@127.0.0.1:{pg_port}/bench", f"redis://127.0.0.1:{redis_port}/0",
                    root / "topology", common=COMMON)
    label = f"{apis}x{workers}, {devices} devices{', worker killed' if kill_worker else ''}"
    try:
        _wait_postgres(pg_port)
        topo.migrate()
        for i in range(workers):
            topo.start("worker", f"worker-{i}")
        for i in range(apis):
            topo.start("api", f"api-{i}")
        if workers > 1:
            time.sleep(6)  # the first worker gives half its partitions to the second
        killer = None
        if kill_worker:
            killer = threading.Timer(duration_s / 3, lambda: topo.kill(topo.workers()[0]))
            killer.start()
        report = _load(topo.api_urls(), devices, duration_s, label)
        fleet = httpx.get(f"{topo.apis()[0].url}/v1/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        report["steps_total"] = fleet["server"]["steps_total"]
        return report
    finally:
        topo.stop()
        for process in (redis, postgres):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def row(name: str, r: dict) -> str:
    requests_per_s = r["upload_requests"] / r["duration_s"]
    return (f"| {name} | {r['devices']} | {requests_per_s:.1f} | {r['upload_latency_ms_p50']} / {r['upload_latency_ms_p99']} "
            f"| {r['acked_samples_per_s']} | {r['learnt_samples_per_s_during_load']} "
            f"| {r['freshness_s_p50']} / {r['freshness_s_p95']} | {r['refused'].get('429', 0)} | {r['server_errors']} "
            f"| {r.get('accepted_samples_not_learnt', '?')} | {r['converged_devices']}/{r['devices']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="all,1x1,1x2,2x1,2x2")
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--large", default="", help="comma list of fleet sizes to run against 2x2")
    parser.add_argument("--kill-worker", action="store_true", help="with --large: kill one worker a third of the way in")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: list[tuple[str, dict]] = []
    for config in [c for c in args.configs.split(",") if c]:
        if config == "all":
            results.append(("all (one process, SQLite)", run_single(args.devices, args.duration_s)))
        else:
            apis, workers = (int(n) for n in config.split("x"))
            results.append((f"{apis} API x {workers} worker", run_topology(apis, workers, args.devices, args.duration_s)))
    for size in [int(n) for n in args.large.split(",") if n]:
        results.append(("2 API x 2 worker", run_topology(2, 2, size, args.duration_s)))
        if args.kill_worker:
            results.append(("2 API x 2 worker, one killed", run_topology(2, 2, size, args.duration_s, kill_worker=True)))
    print(f"\n# scale-out: `driftsync loadtest` at 30 frames/s per device, 25% uploaded in batches of 8, "
          f"{args.duration_s:g} s ({date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          "every process and the load generator on this one machine)")
    print("| configuration | devices | upload requests/s | upload p50 / p99 ms | acked samples/s | learnt samples/s (during load) "
          "| freshness p50 / p95 s | 429s | 5xx | accepted not learnt | converged |")
    print("|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for name, r in results:
        print(row(name, r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{"configuration": n, **r} for n, r in results], indent=2))


if __name__ == "__main__":
    main()
