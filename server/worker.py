"""The adaptation worker: drains the upload queue, steps each cohort, publishes versions."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from server.engine import CemaEngine, CohortState
from server.queueing import UploadJob, UploadQueue
from server.store import Store, VersionRecord
from shared.tensors import Tensor, tensors_digest

log = logging.getLogger("driftsync.worker")


class VersionBoard:
    """Latest version per cohort, with async waiters for long-polling devices."""

    def __init__(self) -> None:
        self._latest: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(list)
        self._lock = threading.Lock()

    def latest(self, cohort: str) -> int:
        return self._latest.get(cohort, 0)

    def publish(self, cohort: str, version: int) -> None:
        with self._lock:
            self._latest[cohort] = version
            waiters, self._waiters[cohort] = self._waiters[cohort], []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait_newer(self, cohort: str, since: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                latest = self._latest.get(cohort, 0)
                if latest > since:
                    return latest
                event = asyncio.Event()
                self._waiters[cohort].append((asyncio.get_running_loop(), event))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return latest
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return self.latest(cohort)


@dataclass
class _Pending:
    images: list[np.ndarray] = field(default_factory=list)
    captured_at: list[np.ndarray] = field(default_factory=list)
    first_at: float = 0.0
    norm_stats: dict[str, np.ndarray] | None = None
    batch_statistics: bool = False

    def count(self) -> int:
        return sum(len(x) for x in self.images)


@dataclass
class WorkerStats:
    steps: int = 0
    samples: int = 0
    step_seconds_total: float = 0.0
    last_step_at: float = 0.0


class AdaptationWorker:
    """A thread: the only place where torch trains, so the HTTP front stays responsive."""

    def __init__(
        self,
        engine: CemaEngine,
        uploads: UploadQueue,
        store: Store,
        board: VersionBoard,
        *,
        max_wait_s: float = 2.0,
        min_step_samples: int = 8,
        on_step=None,
    ) -> None:
        self.engine = engine
        self.uploads = uploads
        self.store = store
        self.board = board
        self.max_wait_s = max_wait_s
        self.min_step_samples = min_step_samples
        self.stats = WorkerStats()
        self._states: dict[str, CohortState] = {}
        self._versions: dict[str, int] = {}
        self._pending: dict[str, _Pending] = defaultdict(_Pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptation-worker", daemon=True)
        self._on_step = on_step

    def start(self) -> None:
        """Warm up first: the first torch step pays seconds of one-off setup, which would
        otherwise land on the first real upload's freshness."""
        shape = self.engine.student_input_shape
        self.engine.step(np.zeros((self.engine.cfg.new_per_step, shape[1], shape[2], shape[0]), np.uint8),
                         self.engine.new_state())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def pending_samples(self) -> int:
        return sum(p.count() for p in list(self._pending.values()))

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.uploads.take(timeout=0.1)
            if job is not None:
                self._add(job)
            for cohort in list(self._pending):
                if self._ready(cohort):
                    try:
                        self._step(cohort)
                    except Exception:  # a bad step must not kill the worker
                        log.exception("adaptation step failed for cohort %s", cohort)

    def _add(self, job: UploadJob) -> None:
        pending = self._pending[job.cohort]
        if not pending.images:
            pending.first_at = time.monotonic()
        pending.images.append(job.images)
        pending.captured_at.append(job.captured_at)
        if job.norm_stats is not None:
            pending.norm_stats = job.norm_stats
        pending.batch_statistics = job.batch_statistics

    def _ready(self, cohort: str) -> bool:
        pending = self._pending[cohort]
        n = pending.count()
        if n >= self.engine.cfg.new_per_step:
            return True
        waited = time.monotonic() - pending.first_at
        return n >= self.min_step_samples and waited >= self.max_wait_s

    def _step(self, cohort: str) -> None:
        pending = self._pending[cohort]
        images = np.concatenate(pending.images)
        captured = np.concatenate(pending.captured_at)
        take = self.engine.cfg.new_per_step
        batch, rest = images[:take], images[take:]
        batch_captured, rest_captured = captured[:take], captured[take:]
        stats, batch_statistics = pending.norm_stats, pending.batch_statistics
        self._pending[cohort] = _Pending(
            [rest] if len(rest) else [], [rest_captured] if len(rest) else [], time.monotonic(), stats, batch_statistics
        )

        state = self._states.get(cohort)
        if state is None:
            state = self._states[cohort] = self.engine.new_state()
            latest = self.store.latest_version(cohort)
            self._versions[cohort] = latest.version if latest else 0
        started = time.perf_counter()
        norm = self.engine.step(batch, state, stats, batch_statistics)
        elapsed = time.perf_counter() - started
        version = self._versions[cohort] + 1
        params = {k: Tensor.from_numpy(v) for k, v in norm.items()}
        record = VersionRecord(
            cohort=cohort,
            version=version,
            created_at=time.time(),
            newest_upload_at=float(batch_captured.max()),
            params=params,
            sha256=tensors_digest(params),
        )
        self.store.put_version(record)
        self._versions[cohort] = version
        self.board.publish(cohort, version)
        self.stats.steps += 1
        self.stats.samples += len(batch)
        self.stats.step_seconds_total += elapsed
        self.stats.last_step_at = time.time()
        if self._on_step is not None:
            self._on_step(len(batch), elapsed)
        log.info("cohort %s -> v%d (%d samples, %.0f ms)", cohort, version, len(batch), elapsed * 1000)
