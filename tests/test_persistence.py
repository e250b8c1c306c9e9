"""What survives the server: cohort state, versions, and every upload it acknowledged."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch

from device_client.client import DeviceClient, DeviceConfig
from driftsync.data import streams
from driftsync.processes import cli, free_port, wait_healthy
from server.engine import CemaConfig, CemaEngine, learns_conv
from server.persist import decode_state, encode_state
from server.store import SqliteStore
from tests.conftest import tiny_pair
from tests.test_engine import _images

ADMIN = {"Authorization": "Bearer adm-test-token-0123456789"}


def _adam_engine(learn: str = "norm") -> CemaEngine:
    from server.norm import learn_conv_weights

    student, teacher = tiny_pair()
    cfg = CemaConfig(num_classes=10, new_per_step=8, replay_min=1000, teacher_optimizer="adam", teacher_lr=1e-3, learn=learn)
    return CemaEngine(learn_conv_weights(student) if learns_conv(learn) else student, teacher, cfg)


@pytest.mark.parametrize("learn", ["norm", "race"])
def test_cohort_state_round_trips_without_pickle_and_training_continues_from_it(learn: str) -> None:
    engine = _adam_engine(learn)
    state = engine.new_state()
    for seed in range(2):
        engine.step(_images(8, seed), state)
    data = encode_state(state)
    assert b"torch" not in data and b"\x80\x04" not in data[:2]  # plain msgpack, no pickle protocol header
    restored = decode_state(data, engine.cfg)
    assert restored.steps == 2 and restored.replay.size == 0
    for name, value in state.student_norm.items():
        np.testing.assert_array_equal(restored.student_norm[name], value)
    if learn == "race":  # both tracks come back, with their scores, and the one the devices run
        assert restored.learning == state.learning == "norm"
        assert (restored.rival_lead, restored.rival_lead_squares) == (state.rival_lead, state.rival_lead_squares)
        for name, value in state.rival_norm.items():
            np.testing.assert_array_equal(restored.rival_norm[name], value)
    for name in ("student_opt", "teacher_opt") + (("rival_opt",) if learn == "race" else ()):
        original, back = getattr(state, name), getattr(restored, name)
        assert original["param_groups"] == back["param_groups"]
        for index, slots in original["state"].items():
            for slot, tensor in slots.items():
                torch.testing.assert_close(back["state"][index][slot], tensor)
    twin = _adam_engine(learn)  # a restarted server's engine
    a, b = engine.step(_images(8, 7), state).tensors, twin.step(_images(8, 7), restored).tensors
    for name in a:  # with the replay buffer below its minimum, the next step is identical
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


@pytest.mark.parametrize(("stored", "now"), [("norm", "race"), ("race", "norm"), ("norm+conv", "race"),
                                             ("race", "norm+conv"), ("norm", "norm+conv")])
def test_a_state_stored_under_another_learn_mode_continues_under_this_one(stored: str, now: str) -> None:
    """An upgrade to a new default, or a changed --learn, finds cohort states stored under
    the old mode: the next steps run, and what the devices get is this mode's."""
    before = _adam_engine(stored)
    state = before.new_state()
    for seed in range(2):
        before.step(_images(8, seed), state)
    if stored == "race":
        state.swap_tracks()  # stored while the devices ran the convolution track
    after = _adam_engine(now)
    restored = decode_state(encode_state(state), after.cfg)
    for seed in range(2, 4):
        tensors = after.step(_images(8, seed), restored).tensors
    learnt = {name for name in tensors if not name.endswith(("running_mean", "running_var"))}  # cloud statistics aside
    always = set(after.source_delta())  # the affine tensors (convolutions at their source values stay off the wire)
    assert always <= learnt <= set(after._source_student) and set(restored.student_norm) == set(after._source_student)
    assert (restored.learning in ("norm", "norm+conv")) == (now == "race")
    assert all(np.isfinite(v.astype(np.float32)).all() for v in tensors.values())


def test_versions_state_and_uploads_commit_together(tmp_path) -> None:
    from server.store import VersionRecord
    from shared.tensors import Tensor, tensors_digest

    store = SqliteStore(tmp_path / "s.sqlite")
    first = store.add_upload("c", "d", b"body-1", 5)
    second = store.add_upload("c", "d", b"body-2", 3)
    params = {"w": Tensor.from_numpy(np.ones(2, np.float32))}
    record = VersionRecord("c", 1, time.time(), 0.0, params, tensors_digest(params))
    store.commit("c", record, b"state-1", {first: 5, second: 1})
    reopened = SqliteStore(tmp_path / "s.sqlite")
    [left] = reopened.pending_uploads()
    assert left.upload_id == second and left.remaining == 2 and left.body == b"body-2"
    assert reopened.load_state("c") == b"state-1" and reopened.version_number("c") == 1
    assert reopened.learnt_samples("c") == 6
    try:  # a failed commit leaves nothing behind: the same version twice violates the key
        reopened.commit("c", record, b"state-2", {second: 2})
    except Exception:
        pass
    assert reopened.load_state("c") == b"state-1" and len(reopened.pending_uploads()) == 1
    assert reopened.learnt_samples("c") == 6
    reopened.commit("c", None, None, {second: 2})  # a withheld step: no version, uploads used up
    assert reopened.learnt_samples("c") == 8 and reopened.pending_uploads() == []
    assert reopened.load_state("c") == b"state-1" and reopened.version_number("c") == 1


def _serve(port: int, state, log, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(state), "--admin-token", "adm-test-token-0123456789", *extra),
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


def _fleet(url: str) -> dict:
    return httpx.get(f"{url}/v1/fleet", headers=ADMIN).json()


def test_kill_9_loses_no_acknowledged_upload_and_versions_never_go_back(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    images, _ = streams.embedded_base(96)
    fog = streams.corrupted(images, streams.Domain("fog", 5), 0)
    device = None
    server = _serve(port, tmp_path / "server", log, "--step-min-samples", "4", "--step-max-wait-s", "0.3")
    try:
        cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=2.0, dynamic_lambda=None,
                           upload_batch=16, upload_flush_s=0.1, poll_wait_s=2.0)
        device = DeviceClient(cfg).start()
        device.predict(fog[:32])
        deadline = time.monotonic() + 60
        while device.model.version < 1:
            assert time.monotonic() < deadline, "no first delta"
            time.sleep(0.05)
        [cohort] = _fleet(url)["cohorts"]
        before = cohort["version"]

        # a server that acknowledges but cannot step yet (it waits for 4096 samples), then dies
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        server = _serve(port, tmp_path / "server", log, "--new-per-step", "4096", "--step-max-wait-s", "3600")
        device.predict(fog[32:96])
        deadline = time.monotonic() + 60
        while device.status()["uploads"]["sent"] < 96:
            assert time.monotonic() < deadline, f"uploads not acknowledged: {device.status()['uploads']}"
            time.sleep(0.05)
        acknowledged = device.status()["uploads"]["sent"]
        assert _fleet(url)["cohorts"][0]["version"] == before  # nothing learnt from the 64 yet
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)

        # restarted normally: it finds the 64 acknowledged samples and learns from them
        server = _serve(port, tmp_path / "server", log, "--step-min-samples", "4", "--step-max-wait-s", "0.3")
        deadline = time.monotonic() + 90
        while (c := _fleet(url)["cohorts"][0])["learnt_samples"] < acknowledged:
            assert time.monotonic() < deadline, f"learnt {c['learnt_samples']} of {acknowledged} acknowledged"
            time.sleep(0.2)
        assert c["version"] > before  # numbering continued: versions never move backwards
        deadline = time.monotonic() + 60
        while device.model.version != c["version"]:  # the device converges on the latest
            assert time.monotonic() < deadline, "device did not converge"
            time.sleep(0.1)
        assert "recovered" in log.read_text()
    finally:
        if device is not None:
            device.stop(flush_timeout=2)
        if server.poll() is None:
            server.kill()


def test_a_restarted_worker_resumes_each_cohort_from_its_stored_state(tmp_path) -> None:
    from server.queueing import UploadJob
    from tests.conftest import build_test_parts

    first = build_test_parts(tmp_path / "server")
    first.worker.start()
    for i in range(3):
        first.uploads.offer(UploadJob("north", "d1", _images(8, i), np.full(8, time.time()), time.time()))
    deadline = time.monotonic() + 30
    while first.store.version_number("north") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.worker.stop()
    before = first.worker._states["north"]
    second = build_test_parts(tmp_path / "server")  # same SQLite file, fresh engine: a restart
    after = second.worker._state("north")
    assert after.steps == before.steps == 3
    for name, value in before.student_norm.items():
        np.testing.assert_array_equal(after.student_norm[name], value)
    for name, value in before.teacher_norm.items():
        np.testing.assert_array_equal(after.teacher_norm[name], value)
    assert after.student_opt["state"].keys() == before.student_opt["state"].keys()
