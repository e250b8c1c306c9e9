"""`driftsync loadtest`: many simulated devices against a server, over real HTTP.

Each simulated device registers, then uploads what a real one would at `--fps` frames/s
with `--upload-ratio` of its frames selected (real WebP images, in batches), honours
Retry-After, and long-polls for deltas. No model runs on the device side: the load is
the server's. The report gives upload latency, refusals, 5xx, delta freshness per
uploaded sample (capture -> the first delta that includes it), the server's RSS, and
whether every device converged on its cohort's latest version. Given several server URLs
(API replicas), each device fails over to the next one when its current one stops
answering; given the admin token, the report compares what devices had acknowledged with
what the server says it accepted and learnt.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from driftsync.config import (
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    URLS,
    add,
    bounded,
    optional,
)
from driftsync.errors import UserError
from shared.codec import MSGPACK_MEDIA_TYPE, decode, pack
from shared.images import encode_image
from shared.protocol import Delta, RegisterRequest, UploadBatch

log = logging.getLogger("driftsync.loadtest")


@dataclass
class SimulatedDevice:
    name: str
    servers: list[str] = field(default_factory=list)
    current: int = 0  # index into servers; moves on when that one fails
    failovers: int = 0
    token: str = ""
    cohort: str = ""
    version: int = 0
    newest_included: float = 0.0  # newest_upload_at of the latest delta received
    acked: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    server_errors: int = 0  # 5xx other than 502/503/504, which say "try another replica or later"
    latencies: list[float] = field(default_factory=list)
    awaiting: list[float] = field(default_factory=list)  # capture times not yet in a delta
    freshness: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LoadOptions:
    server: str
    devices: int = 16
    duration_s: float = 30.0
    fps: float = 30.0
    upload_ratio: float = 0.25
    batch: int = 8
    settle_s: float = 30.0
    enrolment_token: str | None = None
    server_pid: int | None = None
    cohort: str | None = None  # all devices in one cohort; default: each its own
    admin_token: str | None = None  # to read accepted/learnt totals from the fleet API at the end

    @property
    def servers(self) -> list[str]:
        return [url.strip().rstrip("/") for url in self.server.split(",") if url.strip()]


def _images(count: int) -> list[bytes]:
    from driftsync.data import streams

    images, _ = streams.embedded_base(count)
    fog = streams.corrupted(images, streams.Domain("fog", 5), 0)
    return [encode_image(x, "webp") for x in fog]


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


FAILOVER_STATUSES = (502, 503, 504)


async def _request(client: httpx.AsyncClient, device: SimulatedDevice, method: str, path: str, **kw) -> httpx.Response:
    """One request to the device's current server; on a connection failure or a gateway error the
    device moves to the next server for its following requests (the error still reaches the caller)."""
    url = device.servers[device.current % len(device.servers)] + path
    try:
        response = await client.request(method, url, **kw)
    except httpx.HTTPError:
        _fail_over(device)
        raise
    if response.status_code in FAILOVER_STATUSES:
        _fail_over(device)
    return response


def _fail_over(device: SimulatedDevice) -> None:
    if len(device.servers) > 1:
        device.current += 1
        device.failovers += 1


async def _register(client: httpx.AsyncClient, device: SimulatedDevice, opts: LoadOptions) -> None:
    body = RegisterRequest(device_name=device.name, cohort=opts.cohort, enrolment_token=opts.enrolment_token)
    for attempt in range(2 * len(device.servers)):
        try:
            reply = (await _request(client, device, "POST", "/v1/devices", json=body.model_dump())).raise_for_status()
            break
        except httpx.HTTPError:
            if attempt == 2 * len(device.servers) - 1:
                raise
            await asyncio.sleep(0.5)
    device.token, device.cohort = reply.json()["token"], reply.json()["cohort"]


async def _upload_loop(client: httpx.AsyncClient, device: SimulatedDevice, images: list[bytes], opts: LoadOptions,
                       end: float, rng: np.random.Generator) -> None:
    period = opts.batch / (opts.fps * opts.upload_ratio)
    next_at = time.monotonic() + rng.random() * period  # devices do not start in step
    headers = {"Authorization": f"Bearer {device.token}", "Content-Type": MSGPACK_MEDIA_TYPE}
    while time.monotonic() < end:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        now = time.time()
        picks = rng.choice(len(images), opts.batch, replace=False)
        captured = [now + 1e-6 * i for i in range(opts.batch)]
        body = pack(UploadBatch(device_version=device.version, codec="webp", images=[images[i] for i in picks],
                                entropy=[0.5] * opts.batch, captured_at=captured))
        started = time.perf_counter()
        try:
            response = await _request(client, device, "POST", "/v1/uploads", content=body, headers=headers)
        except httpx.HTTPError:
            device.refused[0] = device.refused.get(0, 0) + 1
            next_at = time.monotonic() + period
            continue
        device.latencies.append(time.perf_counter() - started)
        if response.status_code < 300:
            device.acked += opts.batch
            device.awaiting.extend(captured)
            next_at += period
        else:
            device.refused[response.status_code] = device.refused.get(response.status_code, 0) + 1
            device.server_errors += response.status_code >= 500 and response.status_code not in FAILOVER_STATUSES
            retry = float(response.headers.get("Retry-After", "1")) if response.status_code not in FAILOVER_STATUSES else 0.2
            next_at = time.monotonic() + retry  # obey the server: no retry storm


async def _poll_loop(client: httpx.AsyncClient, device: SimulatedDevice, stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {device.token}"}
    while not stop.is_set():
        try:
            response = await _request(client, device, "GET", "/v1/deltas", headers=headers, timeout=40.0,
                                      params={"since": device.version, "cohort": device.cohort, "wait": 5.0})
        except httpx.HTTPError:
            await asyncio.sleep(1.0)
            continue
        if response.status_code != 200:
            device.server_errors += response.status_code >= 500 and response.status_code not in FAILOVER_STATUSES
            if response.status_code != 204:
                await asyncio.sleep(1.0)
            continue
        delta = decode(response.content, Delta)
        now = time.time()
        device.version, device.newest_included = delta.new_version, max(device.newest_included, delta.newest_upload_at)
        still = [t for t in device.awaiting if t > device.newest_included]
        device.freshness += [now - t for t in device.awaiting if t <= device.newest_included]
        device.awaiting = still


async def run_load(opts: LoadOptions, progress=lambda text: None) -> dict:
    images = _images(256)
    rng = np.random.default_rng(0)
    limits = httpx.Limits(max_connections=4 * opts.devices + 8, max_keepalive_connections=4 * opts.devices + 8)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        devices = [SimulatedDevice(f"load-{i}", opts.servers, current=i) for i in range(opts.devices)]
        await asyncio.gather(*(_register(client, d, opts) for d in devices))
        stop = asyncio.Event()
        end = time.monotonic() + opts.duration_s
        pollers = [asyncio.create_task(_poll_loop(client, d, stop)) for d in devices]
        uploaders = [asyncio.create_task(_upload_loop(client, d, images, opts, end, rng)) for d in devices]
        rss = []
        while time.monotonic() < end:
            await asyncio.sleep(min(5.0, max(0.1, end - time.monotonic())))
            rss.append(_rss_mb(opts.server_pid))
            progress(f"{opts.duration_s - max(0.0, end - time.monotonic()):.0f}/{opts.duration_s:.0f}s, "
                     f"{sum(d.acked for d in devices)} samples acknowledged")
        await asyncio.gather(*uploaders)
        at_end = await _fleet_totals(client, devices[0], opts.admin_token) if opts.admin_token else {}
        settle_end = time.monotonic() + opts.settle_s  # let the server catch up, then check convergence
        while time.monotonic() < settle_end and any(d.awaiting for d in devices):
            await asyncio.sleep(0.5)
        fleet = await _latest_versions(client, devices)
        stop.set()
        await asyncio.gather(*pollers, return_exceptions=True)
        totals = await _fleet_totals(client, devices[0], opts.admin_token) if opts.admin_token else {}
    latencies = np.array([x for d in devices for x in d.latencies]) * 1000
    fresh = np.array([x for d in devices for x in d.freshness])
    refused: dict[str, int] = {}
    for d in devices:
        for code, n in d.refused.items():
            refused[str(code)] = refused.get(str(code), 0) + n
    pct = lambda a, q: round(float(np.percentile(a, q)), 3) if a.size else None  # noqa: E731
    return {
        "devices": opts.devices, "duration_s": opts.duration_s, "fps": opts.fps, "upload_ratio": opts.upload_ratio,
        "offered_samples_per_s": round(opts.devices * opts.fps * opts.upload_ratio, 1),
        "acked_samples": sum(d.acked for d in devices),
        "acked_samples_per_s": round(sum(d.acked for d in devices) / opts.duration_s, 1),
        "upload_requests": int(latencies.size), "refused": refused, "server_errors": sum(d.server_errors for d in devices),
        "upload_latency_ms_p50": pct(latencies, 50), "upload_latency_ms_p99": pct(latencies, 99),
        "freshness_s_p50": pct(fresh, 50), "freshness_s_p95": pct(fresh, 95), "freshness_s_p99": pct(fresh, 99),
        "samples_never_in_a_delta": sum(len(d.awaiting) for d in devices),
        "server_rss_mb_max": max((r for r in rss if r is not None), default=None),
        "converged_devices": sum(fleet.get(d.cohort) == d.version for d in devices),
        "failovers": sum(d.failovers for d in devices),
        **totals,
        "learnt_samples_per_s_during_load": (round(at_end["server_learnt_samples"] / opts.duration_s, 1)
                                             if at_end else None),
    }


async def _latest_versions(client: httpx.AsyncClient, devices: list[SimulatedDevice]) -> dict[str, int]:
    """Each cohort's latest version, as the devices' own long polls see it (a 204 means: current)."""
    latest: dict[str, int] = {}
    for d in devices:
        for _ in range(2 * len(d.servers)):
            try:
                response = await _request(client, d, "GET", "/v1/deltas", params={"since": d.version, "cohort": d.cohort},
                                          headers={"Authorization": f"Bearer {d.token}"})
            except httpx.HTTPError:
                continue
            if response.status_code in (200, 204):
                latest[d.cohort] = d.version if response.status_code == 204 else decode(response.content, Delta).new_version
                break
    return latest


async def _fleet_totals(client: httpx.AsyncClient, device: SimulatedDevice, admin_token: str) -> dict:
    """What the server accepted and learnt, summed over the load's cohorts; `lost` must be 0."""
    for _ in range(2 * len(device.servers)):
        try:
            reply = await _request(client, device, "GET", "/v1/fleet", headers={"Authorization": f"Bearer {admin_token}"})
        except httpx.HTTPError:
            continue
        if reply.status_code == 200:
            cohorts = [c for c in reply.json()["cohorts"] if any(n.startswith("load-") for n in _names(reply.json(), c))]
            accepted = sum(c["accepted_samples"] for c in cohorts)
            learnt = sum(c["learnt_samples"] for c in cohorts)
            return {"server_accepted_samples": accepted, "server_learnt_samples": learnt,
                    "accepted_samples_not_learnt": accepted - learnt}
    return {}


def _names(fleet: dict, cohort: dict) -> list[str]:
    by_id = {d["device_id"]: d["name"] for d in fleet["devices"]}
    return [by_id.get(i, "") for i in cohort["devices"]]


def add_loadtest_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest", help="simulated devices against a running server: latency, freshness, RSS",
        description="Many simulated devices against one running server, over real HTTP: each registers, "
        "uploads real WebP images at --fps x --upload-ratio and long-polls for deltas. Reports upload "
        "latency, refusals, 5xx, delta freshness, the server's RSS and convergence.",
        epilog="examples:\n  driftsync loadtest --server http://127.0.0.1:8700 --devices 64 --duration-s 60\n"
               "  driftsync loadtest --devices 16 --cohort shared --server-pid \"$(pgrep -f 'driftsync serve')\" --json load.json",
    )
    add(p, "--server", "http://127.0.0.1:8700", URLS, help="server base URL, or a comma list of API replicas to fail over between")
    add(p, "--admin-token", None, optional(str), help="read accepted/learnt totals from the fleet API at the end")
    add(p, "--devices", 16, POSITIVE_INT, help="simulated devices")
    add(p, "--duration-s", 30.0, POSITIVE, help="upload for this long")
    add(p, "--fps", 30.0, POSITIVE, help="frames/s per device")
    add(p, "--upload-ratio", 0.25, bounded(float, 0.0, 1.0, above=True), help="share of frames each device uploads")
    add(p, "--batch", 8, POSITIVE_INT, help="samples per upload request")
    add(p, "--settle-s", 30.0, NONNEGATIVE, help="after uploading, wait this long for the last deltas")
    add(p, "--enrolment-token", None, optional(str), help="fleet enrolment token", secret=True)
    add(p, "--cohort", None, optional(str), help="put every device in this cohort (default: each its own)")
    add(p, "--server-pid", None, optional(POSITIVE_INT), help="read this process's RSS during the run")
    add(p, "--json", None, optional(str), help="also write the report here")


def _check_reachable(servers: str) -> None:
    """Fail in one line before any work when no server of the list answers at /healthz."""
    error: Exception | None = None
    for server in servers.split(","):
        try:
            httpx.get(f"{server.strip()}/healthz", timeout=5.0).raise_for_status()
            return
        except httpx.HTTPError as exc:
            error = exc
    raise UserError(f"no healthy driftsync server at {servers}: {error}") from error


def run_loadtest_command(args: argparse.Namespace) -> int:
    _check_reachable(args.server)
    opts = LoadOptions(server=args.server, devices=args.devices, duration_s=args.duration_s, fps=args.fps,
                       upload_ratio=args.upload_ratio, batch=args.batch, settle_s=args.settle_s,
                       enrolment_token=args.enrolment_token, server_pid=args.server_pid, cohort=args.cohort,
                       admin_token=args.admin_token)
    report = asyncio.run(run_load(opts, progress=lambda text: print(f"[loadtest] {text}", flush=True)))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    lost = report.get("accepted_samples_not_learnt", 0)
    return 0 if report["server_errors"] == 0 and lost == 0 else 1
