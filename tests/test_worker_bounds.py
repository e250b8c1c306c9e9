"""What a long-running worker and front keep in memory stays bounded, and shared cohorts keep
each device's statistics apart (issue 11)."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from server.engine import BATCH_STATISTICS_MIN_SAMPLES
from server.queueing import UploadJob
from server.versions import VersionBoard
from tests.conftest import build_test_parts, wait_for


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_timed_out_long_polls_leave_no_waiters_behind() -> None:
    board = VersionBoard()

    async def polls() -> list[int]:
        return await asyncio.gather(*(board.wait_newer(f"c{i % 7}", 0, 0.05) for i in range(200)))

    assert asyncio.run(polls()) == [0] * 200
    assert board.waiting() == 0  # before: 200 entries, until each cohort published again

    async def cancelled() -> None:
        task = asyncio.create_task(board.wait_newer("c", 0, 30))
        await asyncio.sleep(0.05)
        assert board.waiting() == 1
        task.cancel()  # a device that hung up
        await asyncio.sleep(0.05)

    asyncio.run(cancelled())
    assert board.waiting() == 0


def test_cohort_states_are_evicted_to_the_store_beyond_the_memory_bound(tmp_path) -> None:
    parts = build_test_parts(tmp_path / "server")
    worker = parts.worker
    one_cohort = None
    worker.start()
    try:
        for round_ in range(3):
            for c in range(4):
                parts.uploads.offer(UploadJob(f"site-{c}", "d", _images(8, 10 * round_ + c), np.full(8, time.time()),
                                              time.time()))
            wait_for(lambda r=round_: all(parts.store.version_number(f"site-{c}") >= r + 1 for c in range(4)), 60,
                     "every cohort stepped")
            if one_cohort is None:
                one_cohort = max(1, worker.state_bytes() // 4)
                worker.max_state_bytes = 2 * one_cohort  # room for about two cohorts' replay images
        assert worker.state_bytes() <= worker.max_state_bytes + one_cohort
        assert len(worker._states) < 4
        # an evicted cohort goes on from what the store kept: its step count continues
        evicted = next(f"site-{c}" for c in range(4) if f"site-{c}" not in worker._states)
        steps = parts.store.version_number(evicted)
        parts.uploads.offer(UploadJob(evicted, "d", _images(8, 99), np.full(8, time.time()), time.time()))
        wait_for(lambda: parts.store.version_number(evicted) > steps, 60, "the evicted cohort stepped again")
    finally:
        worker.stop()


def test_a_shared_cohort_distils_each_device_under_its_own_statistics(tmp_path) -> None:
    parts = build_test_parts(tmp_path / "server")
    worker = parts.worker  # not started: its steps are taken by hand
    name = next(k for k in parts.model().descriptor().parameters if k.endswith("running_mean"))
    shape = parts.model().descriptor().parameters[name]
    stats = {d: {name: np.full(shape, value, np.float32)} for d, value in (("a", 1.0), ("b", -1.0))}
    for device, n in (("a", 4), ("b", 4), ("a", 4)):
        worker._add(UploadJob("site", device, _images(n, n), np.full(n, time.time()), time.time(), stats[device]))
    seen = []
    while worker._pending["site"].count():
        item, _, _, _ = worker._take("site")
        seen.append((len(item.images), float(next(iter(item.device_stats.values()))[0])))
    assert seen == [(4, 1.0), (4, -1.0), (4, 1.0)]  # before: every sample under the last uploader's


def test_a_batch_statistics_step_never_takes_fewer_than_its_minimum_before_the_max_wait(tmp_path) -> None:
    parts = build_test_parts(tmp_path / "server")  # new_per_step 8, step_min_samples 8
    worker = parts.worker  # not started: its steps are taken by hand
    worker.max_wait_s = 60.0

    def offer(cohort: str, device: str, n: int, batch_statistics: bool) -> None:
        worker._add(UploadJob(cohort, device, _images(n, n), np.full(n, time.time()), time.time(),
                              batch_statistics=batch_statistics))

    assert worker.least_samples(True) == BATCH_STATISTICS_MIN_SAMPLES == 16 and worker.least_samples(False) == 8
    offer("batch", "a", 6, True)
    offer("batch", "b", 6, True)
    offer("running", "a", 8, False)
    assert worker._ready("running", pressed=True)
    assert not worker._ready("batch", pressed=True)  # before: overload stepped 6 samples, one device's
    assert not worker._ready("batch")
    offer("batch", "c", 4, True)
    assert worker._ready("batch", pressed=True) and worker._ready("batch")
    item, captured, _, _ = worker._take("batch")
    assert len(item.images) == 16 == len(captured) and item.batch_statistics  # three devices' samples, one step
    assert worker._pending["batch"].count() == 0
    for device in "abc":
        offer("batch", device, 14, True)
    assert [len(worker._take("batch")[0].images) for _ in range(2)] == [16, 26]  # not 16 + 16 + 10

    offer("batch", "a", 3, True)  # a trickle: held while others may still come...
    worker.min_step_samples = 1  # (replay's lockstep setting)
    assert not worker._ready("batch", pressed=True)
    worker.max_wait_s = 0.0  # ...and stepped after the max wait
    assert worker._ready("batch")
    worker._step(["batch"])
    assert worker._pending["batch"].count() == 0
    assert [len(g.images) for g in worker._states["batch"].replay.groups] == [3]  # the taken steps were not run


def test_the_teacher_log_has_the_teachers_class_for_every_stepped_sample(tmp_path) -> None:
    parts = build_test_parts(tmp_path / "server")
    worker = parts.worker
    worker.teacher_log = tmp_path / "teacher.jsonl"
    captured = 1.8e9 + 1e-6 * np.arange(20)  # distinct to the microsecond, as a replay device stamps them
    worker._add(UploadJob("site", "d", _images(20, 1), captured, time.time()))
    while worker._pending["site"].count():
        worker._step(["site"])
    lines = [json.loads(line) for line in worker.teacher_log.read_text().splitlines()]
    assert [len(line["captured_at"]) for line in lines] == [8, 12]  # 8 + 8 + 4 would leave 4, below the minimum
    assert np.array_equal(np.concatenate([line["captured_at"] for line in lines]), captured)  # exact floats
    assert all(line["cohort"] == "site" and all(0 <= c < 10 for c in line["teacher"]) for line in lines)
    assert all(len(line["teacher"]) == len(line["captured_at"]) for line in lines)


def test_a_step_never_mixes_batches_whose_devices_sent_their_statistics(tmp_path) -> None:
    """A batch-statistics upload that carries its batch's statistics is distilled under them, so a
    step takes its samples from that upload alone, and gives the engine that upload's statistics."""
    parts = build_test_parts(tmp_path / "server")  # new_per_step 8, step_min_samples 8
    worker = parts.worker  # not started: its steps are taken by hand
    stats = [{"bn.running_mean": np.full(4, i, np.float32)} for i in range(2)]
    for n, batch_stats in zip([20, 20], stats):
        worker._add(UploadJob("batch", "a", _images(n, n), np.full(n, time.time()), time.time(), batch_stats,
                              batch_statistics=True))
    taken = [worker._take("batch")[0] for _ in range(2)]
    assert [len(item.images) for item in taken] == [20, 20]  # not 16, then 24 across the two batches
    assert [item.device_stats for item in taken] == stats
    assert not worker._pending["batch"].stats  # a batch's statistics are not the device's latest


def test_a_message_naming_a_gone_upload_is_skipped_and_the_next_one_is_learnt(tmp_path) -> None:
    """A broker message names its upload; one whose row is gone (learnt, discarded, or a forged id)
    is acknowledged and skipped, and the worker goes on with the body the store holds for the next."""
    from server.queueing import StoredJob
    from shared.codec import pack
    from shared.images import encode_image
    from shared.protocol import UploadBatch

    parts = build_test_parts(tmp_path / "server")
    images = _images(8, 3)
    body = pack(UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in images],
                            entropy=[0.5] * 8, captured_at=[time.time()] * 8))
    stored = parts.store.add_upload("site", "d", body, len(images))
    parts.worker.start()
    try:
        assert parts.uploads.offer(StoredJob(stored + 1000, "site", "d", time.time()))  # no such row
        assert parts.uploads.offer(StoredJob(stored, "site", "d", time.time()))
        wait_for(lambda: parts.store.version_number("site") >= 1, 60, "the stored upload learnt")
        assert parts.store.unlearnt_upload(stored) is None and parts.store.learnt_samples("site") == 8
    finally:
        parts.worker.stop()
