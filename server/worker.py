"""The adaptation worker: drains the upload queue, steps each cohort, publishes versions."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace

import numpy as np

from server.engine import CemaEngine, CohortState, StepInput
from server.persist import decode_state, encode_state
from server.queueing import UploadJob, UploadQueue
from server.store import Store, VersionRecord
from shared.tensors import Tensor, tensors_digest

log = logging.getLogger("driftsync.worker")
MAX_DRAIN = 256  # upload jobs taken before the worker looks for ready cohorts


class VersionBoard:
    """Latest version per cohort, with async waiters for long-polling devices."""

    def __init__(self) -> None:
        self._latest: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(list)
        self._generation = 0  # bumped by wake_all: a device's cohort may have changed
        self._lock = threading.Lock()

    def latest(self, cohort: str) -> int:
        return self._latest.get(cohort, 0)

    def publish(self, cohort: str, version: int) -> None:
        with self._lock:
            self._latest[cohort] = version
            waiters, self._waiters[cohort] = self._waiters[cohort], []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wake_all(self) -> None:
        """End every long poll now (after a cohort move, so the moved device hears at once)."""
        with self._lock:
            self._generation += 1
            waiters = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait_newer(self, cohort: str, since: int, timeout: float) -> int:
        """The cohort's latest version once it exceeds `since`, or at the timeout or a wake_all."""
        deadline = time.monotonic() + timeout
        generation = self._generation
        while True:
            with self._lock:
                latest = self._latest.get(cohort, 0)
                if latest > since or self._generation != generation:
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
    sources: list[list] = field(default_factory=list)  # [upload id, samples], in the order of `images`

    def count(self) -> int:
        return sum(len(x) for x in self.images)

    def consume(self, samples: int) -> dict[int, int]:
        """Take `samples` from the front of `sources`: how many came from each stored upload."""
        consumed: dict[int, int] = {}
        while samples > 0 and self.sources:
            upload_id, count = self.sources[0]
            n = min(samples, count)
            if upload_id is not None:
                consumed[upload_id] = consumed.get(upload_id, 0) + n
            samples -= n
            if n == count:
                self.sources.pop(0)
            else:
                self.sources[0][1] = count - n
        return consumed


@dataclass
class WorkerStats:
    steps: int = 0
    samples: int = 0
    step_seconds_total: float = 0.0
    last_step_at: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))  # (time, samples) per step

    def rates(self, window_s: float = 60.0) -> tuple[float, float]:
        """Steps/s and samples/s over the last `window_s`."""
        since = time.time() - window_s
        recent = [(t, n) for t, n in list(self.recent) if t >= since]
        return len(recent) / window_s, sum(n for _, n in recent) / window_s


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
        max_cohorts_per_step: int = 4,
        max_pending_samples: int = 2048,
        on_step=None,
        on_event=None,
    ) -> None:
        self.engine = engine
        self.uploads = uploads
        self.store = store
        self.board = board
        self.max_wait_s = max_wait_s
        self.min_step_samples = min_step_samples
        self.max_cohorts_per_step = max_cohorts_per_step
        self.max_pending_samples = max_pending_samples  # taken from the queue but not yet learnt from
        self.stats = WorkerStats()
        self._states: dict[str, CohortState] = {}
        self._pending: dict[str, _Pending] = defaultdict(_Pending)
        self._stop = threading.Event()
        self._publish = threading.Lock()  # version numbers of a cohort are assigned one at a time
        self._states_lock = threading.RLock()  # a step and an operator's rollback do not interleave
        self.frozen: set[str] = set(store.frozen_cohorts())
        self._thread = threading.Thread(target=self._run, name="adaptation-worker", daemon=True)
        self._on_step = on_step
        self._on_event = on_event

    def start(self) -> None:
        """Warm up first: the first torch step pays seconds of one-off setup, which would
        otherwise land on the first real upload's freshness."""
        shape = self.engine.student_input_shape
        self.engine.step(np.zeros((self.engine.cfg.new_per_step, shape[1], shape[2], shape[0]), np.uint8),
                         self.engine.new_state())
        self._thread.start()

    def restore(self, job: UploadJob, remaining: int) -> None:
        """Before start: an upload accepted before a restart, of which `remaining` samples (its
        last ones) no published version has learnt from yet."""
        keep = slice(len(job.images) - remaining, None)
        self._add(replace(job, images=job.images[keep], captured_at=job.captured_at[keep]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def pending_samples(self) -> int:
        return sum(p.count() for p in list(self._pending.values()))

    def _commit(self, cohort: str, tensors: dict[str, np.ndarray], newest_upload_at: float,
                state: bytes | None = None, consumed: dict[int, int] | None = None, learnt: int = 0) -> int:
        """Store what a step did in one transaction, and announce the cohort's next version."""
        params = {k: Tensor.from_numpy(v) for k, v in tensors.items()}
        with self._publish:
            record = VersionRecord(cohort, self.store.version_number(cohort) + 1, time.time(), newest_upload_at,
                                   params, tensors_digest(params))
            self.store.commit(cohort, record, state, consumed, learnt)
        self.board.publish(cohort, record.version)
        return record.version

    def _event(self, cohort: str, kind: str, detail: str) -> None:
        log.warning("cohort %s: %s (%s)", cohort, kind, detail)
        self.store.add_event(cohort, kind, detail)
        if self._on_event is not None:
            self._on_event(kind)

    def rollback(self, cohort: str, version: int) -> int:
        """Publish version `version`'s tensors again, as the cohort's next version (versions only
        move forward), and continue adapting from them with fresh optimizer state."""
        with self._states_lock:
            record = self.store.version(cohort, version)
            if record is None:
                raise KeyError(f"cohort {cohort!r} has no stored version {version}")
            tensors = {name: tensor.to_numpy() for name, tensor in record.params.items()}
            state = self._state(cohort)
            state.student_norm.update({k: v.copy() for k, v in tensors.items()})
            state.prompt_ema.update({k: v.copy() for k, v in tensors.items() if k.startswith("prompt.")})
            state.published = {k: v.copy() for k, v in tensors.items()}
            state.student_opt, state.prompt_opt = {}, {}
            state.predictions.clear()
            new_version = self._commit(cohort, tensors, record.newest_upload_at, encode_state(state))
        self._event(cohort, "rollback", f"v{new_version} carries v{version}'s tensors")
        return new_version

    def set_frozen(self, cohort: str, frozen: bool) -> None:
        """A frozen cohort keeps its parameters: accepted uploads wait and new ones are refused."""
        (self.frozen.add if frozen else self.frozen.discard)(cohort)
        self.store.set_frozen(cohort, frozen)
        self._event(cohort, "frozen" if frozen else "unfrozen", "by an operator")

    def seed_cohort(self, cohort: str) -> None:
        """Give a cohort with no versions a first one at the source parameters, so a device
        moved into it has a version to move to."""
        if self.store.version_number(cohort) == 0:
            self._commit(cohort, self.engine.source_delta(), 0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            full = self.pending_samples() >= self.max_pending_samples
            job = None if full else self.uploads.take(timeout=0.1)
            drained = 0
            while job is not None:  # take what is queued, so one step sees every cohort that is ready
                self._add(job)
                drained += 1
                full = self.pending_samples() >= self.max_pending_samples
                job = self.uploads.take(timeout=0) if drained < MAX_DRAIN and not full else None
            # over the bound, jobs stay in the (bounded) queue, so the front answers 429: memory stays
            # bounded and the delay moves to the devices' spools; meanwhile any cohort with samples steps
            ready = [cohort for cohort in list(self._pending) if self._ready(cohort, pressed=full)]
            if ready:
                try:
                    self._step(ready[: self.max_cohorts_per_step])
                except Exception:  # a bad step must not kill the worker
                    log.exception("adaptation step failed for cohorts %s", ready)

    def _add(self, job: UploadJob) -> None:
        pending = self._pending[job.cohort]
        if not pending.images:
            pending.first_at = time.monotonic()
        pending.images.append(job.images)
        pending.captured_at.append(job.captured_at)
        pending.sources.append([job.upload_id, len(job.images)])
        if job.norm_stats is not None:
            pending.norm_stats = job.norm_stats
        pending.batch_statistics = job.batch_statistics

    def _ready(self, cohort: str, pressed: bool = False) -> bool:
        if cohort in self.frozen:  # its accepted uploads wait, on disk too, until it is unfrozen
            return False
        pending = self._pending[cohort]
        n = pending.count()
        if n >= self.engine.cfg.new_per_step or (pressed and n > 0):
            return True
        waited = time.monotonic() - pending.first_at
        return n >= self.min_step_samples and waited >= self.max_wait_s

    def _take(self, cohort: str) -> tuple[StepInput, float, dict[int, int]]:
        """The cohort's next step's samples (the rest wait), the newest capture time among them,
        and how many samples each stored upload gave."""
        pending = self._pending[cohort]
        images = np.concatenate(pending.images)
        captured = np.concatenate(pending.captured_at)
        take = self.engine.cfg.new_per_step
        consumed = pending.consume(min(take, len(images)))
        rest, rest_captured = images[take:], captured[take:]
        stats, batch_statistics = pending.norm_stats, pending.batch_statistics
        self._pending[cohort] = _Pending(
            [rest] if len(rest) else [], [rest_captured] if len(rest) else [], time.monotonic(), stats, batch_statistics,
            pending.sources,
        )
        return StepInput(images[:take], self._state(cohort), stats, batch_statistics), float(captured[:take].max()), consumed

    def _state(self, cohort: str) -> CohortState:
        """The cohort's state: in memory, else as the store kept it (a restart), else the source."""
        state = self._states.get(cohort)
        if state is None:
            saved = self.store.load_state(cohort)
            state = decode_state(saved, self.engine.cfg) if saved else self.engine.new_state()
            self._states[cohort] = state
        return state

    def _step(self, cohorts: list[str]) -> None:
        """Step several cohorts at once: the teacher's forward pass is shared by all of them."""
        with self._states_lock:
            self._step_locked(cohorts)

    def _step_locked(self, cohorts: list[str]) -> None:
        inputs, newest, consumed = zip(*(self._take(cohort) for cohort in cohorts))
        started = time.perf_counter()
        results = self.engine.step_many(list(inputs))
        elapsed = time.perf_counter() - started
        samples = sum(len(item.images) for item in inputs)
        versions = []
        for cohort, result, newest_at, item, used in zip(cohorts, results, newest, inputs, consumed):
            versions.append(self._commit(cohort, result.tensors, newest_at, encode_state(item.state), used,
                                         len(item.images) - sum(used.values())))  # samples with no stored upload
            if result.event is not None:
                self._event(cohort, result.event, result.detail)
        self.stats.steps += len(cohorts)
        self.stats.samples += samples
        self.stats.step_seconds_total += elapsed
        self.stats.last_step_at = time.time()
        for item in inputs:
            self.stats.recent.append((self.stats.last_step_at, len(item.images)))
        if self._on_step is not None:
            self._on_step(len(cohorts), samples, elapsed)
        log.info("%s (%d samples, %.0f ms)", ", ".join(f"{c} -> v{v}" for c, v in zip(cohorts, versions)),
                 samples, elapsed * 1000)
