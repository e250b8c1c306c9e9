"""Fleet load on one server: a fresh `driftsync serve` per fleet size, `driftsync loadtest`
against it, one table row per size. Finds the largest fleet whose delta freshness p95 stays
under 5 s at 30 frames/s per device (25% uploaded).

    python scripts/bench_fleet_load.py [--sizes 4,8,16,32,64] [--duration-s 30] [--long 64:60] [--json OUT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
from datetime import date
from pathlib import Path

from driftsync.loadtest import LoadOptions, run_load
from driftsync.processes import cli, free_port, wait_healthy

FRESH_P95_S = 5.0


def one_size(devices: int, duration_s: float, fps: float, server_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as state:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(state) / "server.log"
        server = subprocess.Popen(cli("serve", "--port", str(port), "--state-dir", state, *server_args),
                                  stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_healthy(url, server)
            return asyncio.run(run_load(
                LoadOptions(server=url, devices=devices, duration_s=duration_s, fps=fps, settle_s=60.0,
                            server_pid=server.pid),
                progress=lambda text: print(f"[{devices} devices] {text}", flush=True),
            ))
        finally:
            server.terminate()
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,8,16,32,64")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--server-args", default="", help="extra `driftsync serve` flags")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [one_size(int(n), args.duration_s, args.fps, args.server_args.split()) for n in args.sizes.split(",")]
    print(f"\n# fleet load: `driftsync serve` (embedded default) + `driftsync loadtest`, {args.fps:g} frames/s per device, "
          f"25% uploaded in batches of 8, {args.duration_s:g} s each ({date.today()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, loadtest on the same machine)")
    print("| devices | offered samples/s | acknowledged samples/s | 429s | 5xx | upload p50 / p99 ms "
          "| freshness p50 / p95 / p99 s | never in a delta | server RSS max MB | converged |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['devices']} | {r['offered_samples_per_s']} | {r['acked_samples_per_s']} | {r['refused'].get('429', 0)} "
              f"| {r['server_errors']} | {r['upload_latency_ms_p50']} / {r['upload_latency_ms_p99']} "
              f"| {r['freshness_s_p50']} / {r['freshness_s_p95']} / {r['freshness_s_p99']} | {r['samples_never_in_a_delta']} "
              f"| {r['server_rss_mb_max']:.0f} | {r['converged_devices']}/{r['devices']} |")
    fresh = [r["devices"] for r in rows if r["freshness_s_p95"] is not None and r["freshness_s_p95"] < FRESH_P95_S]
    print(f"\nlargest fleet with freshness p95 < {FRESH_P95_S:g} s: {max(fresh) if fresh else 'none'} devices")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
