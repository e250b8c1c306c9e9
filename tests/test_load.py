"""A short version of the load benchmark: simulated devices against a real server process.
(The 64-device, 60-second run is `driftsync loadtest`; figures in BENCHMARKS.md.)"""
from __future__ import annotations

import asyncio
import os
import subprocess

import httpx

from driftsync.loadtest import LoadOptions, run_load
from driftsync.processes import cli, free_port, wait_healthy


def test_simulated_fleet_gets_no_5xx_loses_nothing_and_converges(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(tmp_path / "server"), "--admin-token", "adm-test-token-0123456789",
            "--step-max-wait-s", "0.5"),
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        wait_healthy(url, server)
        report = asyncio.run(run_load(LoadOptions(server=url, devices=12, duration_s=8.0, fps=30.0, settle_s=45.0,
                                                  server_pid=server.pid)))
        assert report["server_errors"] == 0 and report["upload_requests"] > 50, report
        assert report["acked_samples"] > 0 and report["samples_never_in_a_delta"] == 0, report
        assert report["converged_devices"] == 12, report
        assert report["server_rss_mb_max"] is not None and report["server_rss_mb_max"] < 4096
        assert report["upload_latency_ms_p99"] is not None and report["freshness_s_p95"] is not None
        fleet = httpx.get(f"{url}/v1/fleet", headers={"Authorization": "Bearer adm-test-token-0123456789"}).json()
        assert sum(c["accepted_samples"] for c in fleet["cohorts"]) == report["acked_samples"]
        assert all(c["learnt_samples"] >= c["accepted_samples"] for c in fleet["cohorts"])  # nothing accepted lost
    finally:
        server.terminate()
        server.wait(timeout=60)
