"""Model safety: collapse resets, the guarded push, rollback and freeze, over real HTTP."""
from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from server.app import create_app
from server.engine import CemaConfig, CemaEngine, class_marginal_entropy
from tests.conftest import build_test_parts, serve_in_thread, tiny_pair, wait_for
from tests.test_engine import _images

ADMIN = {"Authorization": "Bearer adm"}


def _engine(**cfg) -> CemaEngine:
    student, teacher = tiny_pair()
    return CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8, **cfg))


def test_class_marginal_entropy_spans_collapse_to_uniform() -> None:
    assert class_marginal_entropy(np.zeros(100, int), 10) == 0.0
    assert class_marginal_entropy(np.arange(100) % 10, 10) == pytest.approx(math.log(10))
    assert 0 < class_marginal_entropy(np.array([0] * 90 + [1] * 10), 10) < 0.5


def test_a_collapsed_cohort_is_reset_to_the_source() -> None:
    engine = _engine(collapse_window=16, collapse_marginal=0.99)  # any non-uniform window counts as collapse
    state = engine.new_state()
    first = engine.step(_images(8, 1), state)
    assert first.event is None and first.tensors is not None and state.steps == 1  # window not full yet
    second = engine.step(_images(8, 2), state)
    assert second.event == "collapse_reset" and "entropy" in second.detail
    source = engine.source_delta()
    assert set(second.tensors) == set(source)
    for name in source:
        np.testing.assert_array_equal(second.tensors[name], source[name])
    assert state.steps == 0 and state.replay.size == 0 and len(state.predictions) == 0


def test_the_guard_withholds_a_worse_delta_and_keeps_what_devices_run() -> None:
    strict = _engine(holdout_every=2, guard_tolerance=-1.0, guard_min_holdout=4)  # "worse" by construction
    state = strict.new_state()
    published = {k: v.copy() for k, v in state.published.items()}
    strict.step(_images(8, 1), state)  # fills the held-out buffer (no delta to compare against yet is fine)
    result = strict.step(_images(8, 2), state)
    assert result.event == "withheld" and "agreement" in result.detail
    for name, value in published.items():  # the next version carries what the devices run; so does the student
        np.testing.assert_array_equal(result.tensors[name], value)
        np.testing.assert_array_equal(state.student_norm[name], value)
    assert state.holdout.size == 8 and state.replay.size == 8  # half of each step's uploads held out
    lenient = _engine(holdout_every=2, guard_tolerance=1.0, guard_min_holdout=4)
    state = lenient.new_state()
    assert all(lenient.step(_images(8, i), state).event is None for i in range(3))
    quiet = _engine(holdout_every=2, guard_tolerance=-1.0, guard_min_holdout=1000)  # too few held out: no verdict
    state = quiet.new_state()
    assert all(quiet.step(_images(8, i), state).event is None for i in range(3))


@pytest.fixture
def admin_server(tmp_path):
    parts = build_test_parts(tmp_path / "server", admin_token="adm", frozen_retry_after_s=1)
    with serve_in_thread(create_app(parts)) as url:
        yield url, parts



def test_rollback_and_freeze_over_http(admin_server, tmp_path) -> None:
    url, parts = admin_server
    cfg = DeviceConfig(server=url, state_dir=tmp_path / "d", cohort="site", e_max_factor=2.0, dynamic_lambda=None,
                       upload_batch=8, upload_flush_s=0.1, poll_wait_s=2.0)
    device = DeviceClient(cfg).start()
    for i in range(4):
        device.predict(_images(8, i))
    wait_for(lambda: parts.store.learnt_samples("site") == 32)  # every upload learnt: the cohort is quiet
    wait_for(lambda: device.model.version == parts.store.version_number("site"))
    v1 = parts.store.version("site", 1)

    r = httpx.post(f"{url}/v1/cohorts/site/rollback", json={"version": 1}, headers=ADMIN)
    assert r.status_code == 200, r.text
    rolled = r.json()["version"]
    assert rolled > 1 and rolled == parts.store.version_number("site")  # versions only move forward
    record = parts.store.version("site", rolled)
    assert record.sha256 == v1.sha256
    wait_for(lambda: device.model.version == rolled)
    for name, tensor in v1.params.items():
        np.testing.assert_array_equal(device.model.params[name], tensor.to_numpy())
    assert httpx.post(f"{url}/v1/cohorts/site/rollback", json={"version": 999}, headers=ADMIN).status_code == 404
    assert httpx.post(f"{url}/v1/cohorts/site/rollback", json={"version": 1}).status_code == 401

    frozen = httpx.post(f"{url}/v1/cohorts/site/freeze", headers=ADMIN).json()
    assert frozen == {"cohort": "site", "version": rolled, "frozen": True}
    device.predict(_images(8, 50))  # refused with 423: the device keeps it spooled and backs off
    wait_for(lambda: device.uploader.stats.retries > 0 and device.status()["uploads"]["spooled"] == 8)
    assert parts.store.version_number("site") == rolled
    httpx.post(f"{url}/v1/cohorts/site/unfreeze", headers=ADMIN)
    wait_for(lambda: device.status()["uploads"]["spooled"] == 0, timeout=60)  # it drains after Retry-After
    wait_for(lambda: parts.store.version_number("site") > rolled)
    kinds = [e["kind"] for e in httpx.get(f"{url}/v1/events", headers=ADMIN).json()]
    assert kinds[:3] == ["unfrozen", "frozen", "rollback"]
    assert 'driftsync_cohort_events_total{kind="rollback"} 1.0' in httpx.get(f"{url}/metrics").text
    device.stop()
