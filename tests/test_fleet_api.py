"""The fleet on one server over real HTTP: cohort moves, telemetry, the fleet API, metrics."""
from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from server.app import create_app
from shared.protocol import Telemetry
from tests.conftest import build_test_parts, serve_in_thread, wait_for

ADMIN = {"Authorization": "Bearer admin-t0ken"}


@pytest.fixture
def fleet_server(tmp_path):
    parts = build_test_parts(tmp_path / "server", admin_token="admin-t0ken")
    with serve_in_thread(create_app(parts)) as url:
        yield url, parts



def _device(url: str, path, name: str, cohort: str | None = None) -> DeviceClient:
    cfg = DeviceConfig(server=url, state_dir=path, name=name, cohort=cohort, e_max_factor=2.0, dynamic_lambda=None,
                       upload_batch=8, upload_flush_s=0.1, poll_wait_s=2.0)
    return DeviceClient(cfg).start()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_a_moved_device_takes_its_new_cohorts_state_and_keeps_it_after_a_restart(fleet_server, tmp_path):
    url, parts = fleet_server
    a = _device(url, tmp_path / "a", "cam-a")
    b = _device(url, tmp_path / "b", "cam-b", cohort="site-b")
    for i in range(4):  # both adapt, on their own cohorts' version lines
        a.predict(_images(8, i))
        b.predict(_images(8, 100 + i))
    wait_for(lambda: a.model.version >= 2 and b.model.version >= 1)
    assert a.identity.cohort.startswith("device-") and b.identity.cohort == "site-b"

    moved = httpx.post(f"{url}/v1/devices/{a.identity.device_id}/cohort", json={"cohort": "site-b"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    row = next(d for d in moved.json()["devices"] if d["device_id"] == a.identity.device_id)
    assert row["cohort"] == "site-b"
    wait_for(lambda: a.identity.cohort == "site-b")
    assert a.deltas.refused == {}
    b.stop()  # site-b stops moving: a settles on its latest version, with its exact tensors
    time.sleep(1.0)  # b's last flushed uploads may still make a step
    wait_for(lambda: a.model.version == parts.store.version_number("site-b"))
    site_b = parts.store.latest_version("site-b")
    for name, tensor in site_b.params.items():
        np.testing.assert_array_equal(a.model.params[name], tensor.to_numpy())
    a.stop()
    again = _device(url, tmp_path / "a", "cam-a")  # the move survives a restart of the device
    assert again.identity.cohort == "site-b" and again.model.version == a.model.version
    again.stop()


def test_moving_into_an_empty_cohort_seeds_it_at_the_source(fleet_server, tmp_path):
    url, parts = fleet_server
    a = _device(url, tmp_path / "a", "cam-a")
    for i in range(3):
        a.predict(_images(8, i))
    wait_for(lambda: a.model.version >= 1)
    r = httpx.post(f"{url}/v1/devices/{a.identity.device_id}/cohort", json={"cohort": "fresh"}, headers=ADMIN)
    assert r.status_code == 200
    wait_for(lambda: a.identity.cohort == "fresh")
    source = a.source_params
    first = parts.store.latest_version("fresh")
    assert first.version >= 1
    if first.version == 1 and a.model.version == 1:  # the seed: the source's affine parameters
        for name in first.params:
            np.testing.assert_array_equal(a.model.params[name], source[name])
    a.stop()


def test_admin_endpoints_refuse_without_the_admin_token(fleet_server, tiny_server, tmp_path):
    url, _ = fleet_server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{url}/v1/fleet", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert httpx.post(f"{url}/v1/devices/nope/cohort", json={"cohort": "x"}, headers=ADMIN).status_code == 404
    assert httpx.post(f"{url}/v1/devices/nope/cohort", json={"cohort": "bad name!"}, headers=ADMIN).status_code == 422
    plain_url, _ = tiny_server  # no admin token configured: fleet operations are off
    r = httpx.get(f"{plain_url}/v1/fleet", headers=ADMIN)
    assert r.status_code == 403 and r.json()["error"] == "admin_disabled"
    assert "driftsync_auth_failures_total 2.0" in httpx.get(f"{url}/metrics").text


def test_telemetry_feeds_the_fleet_report_and_bad_reports_are_refused(fleet_server, tmp_path):
    url, _ = fleet_server
    a = _device(url, tmp_path / "a", "cam-a")
    token = {"Authorization": f"Bearer {a.identity.token}"}
    sent = 0
    for i in range(3):
        sent += 10 * i
        report = Telemetry(version=0, window_s=2.0, frames=40, mean_entropy=1.0 + i, mean_confidence=0.5,
                           uploads_sent=sent, uploads_spooled=0, uploads_dropped=0)
        assert httpx.post(f"{url}/v1/telemetry", json=report.model_dump(), headers=token).status_code == 204
    nan_report = ('{"version":0,"window_s":2,"frames":1,"mean_entropy":NaN,'
                  '"uploads_sent":0,"uploads_spooled":0,"uploads_dropped":0}')
    r = httpx.post(f"{url}/v1/telemetry", content=nan_report, headers=token | {"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert httpx.post(f"{url}/v1/telemetry", json=report.model_dump()).status_code == 401
    fleet = httpx.get(f"{url}/v1/fleet", headers=ADMIN).json()
    [row] = fleet["devices"]
    assert row["name"] == "cam-a" and row["last_seen"] is not None and len(row["trend"]) == 3
    assert [p["mean_entropy"] for p in row["trend"]] == [1.0, 2.0, 3.0]
    assert [p["uploads_per_s"] for p in row["trend"]] == [0.0, 5.0, 10.0]  # counter deltas over the 2 s windows
    assert fleet["cohorts"] == [{"cohort": row["cohort"], "version": 0, "devices": [row["device_id"]], "accepted_samples": 0, "learnt_samples": 0,
                                 "frozen": False}]
    assert set(fleet["server"]) >= {"queue_depth", "steps_per_s", "samples_per_s", "uptime_s"}
    a.stop()


def test_prometheus_metrics_follow_the_naming_conventions(fleet_server, tmp_path):
    """Base units in the name, counters end in _total, and no per-device labels."""
    url, _ = fleet_server
    a = _device(url, tmp_path / "a", "cam-a")
    for i in range(3):
        a.predict(_images(8, i))
    wait_for(lambda: a.model.version >= 1)
    a.stop()
    text = httpx.get(f"{url}/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert len(types) >= 10
    for name, kind in types.items():
        assert re.fullmatch(r"driftsync_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|kilobytes|megabytes|minutes|hours)(_|$)", name), name
    labels = set(re.findall(r"[{,](\w+)=", text))
    assert not labels & {"device", "device_id", "device_name", "name", "cohort"}, labels
