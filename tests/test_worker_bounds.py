"""What a long-running worker and front keep in memory stays bounded, and shared cohorts keep
each device's statistics apart (issue 11)."""
from __future__ import annotations

import asyncio
import time

import numpy as np

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
