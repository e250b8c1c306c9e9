"""The adaptation worker: takes uploads, steps each cohort, publishes versions.

One worker runs inside `driftsync serve --role all` behind an in-process queue; with
`--role worker` several run on their own machines behind Redis Streams, each owning the
partitions it holds a lease on (server/leases.py). Either way an upload is acked only
after the version that learnt from it is committed, and every commit names the lease it
relies on, so a worker that lost its partition cannot publish.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from server.api_role import WORKER_STATS_BLOB
from server.artifact import PublishedModel
from server.engine import (
    BATCH_STATISTICS_MIN_SAMPLES,
    CemaEngine,
    CohortState,
    StepInput,
    StepResult,
)
from server.leases import LeaseKeeper
from server.persist import decode_state, encode_state
from server.queueing import (
    BrokerUnavailable,
    ControlJob,
    Job,
    StoredJob,
    UploadJob,
    UploadQueue,
    partition_of,
)
from server.store import Store, StoreError, VersionRecord
from server.uploads import UploadRejected, parse_upload
from shared.tensors import Tensor, tensors_digest

log = logging.getLogger("driftsync.worker")
MAX_DRAIN = 256  # jobs taken before the worker looks for ready cohorts
MAX_STORED_BODY = 1 << 30  # a stored body passed the front's size check once
RESYNC_EVERY_S = 10.0  # partitioned workers re-read the store for uploads a broker lost
FROZEN_REFRESH_S = 1.0
STATS_EVERY_S = 2.0
TEACHER_LOG_MAX_BYTES = 256 << 20  # an evaluation run's teacher log stops growing here


class PartitionedQueue(UploadQueue, Protocol):
    def hold(self, partition: int) -> None: ...
    def release(self, partition: int) -> None: ...


MAX_DEVICE_STATS = 1024  # devices of one cohort whose latest statistics are kept


@dataclass
class _Pending:
    """A cohort's samples waiting for a step, and each of its devices' latest statistics: a
    sample is distilled under the statistics of the device that sent it, never another's."""

    images: list[np.ndarray] = field(default_factory=list)
    captured_at: list[np.ndarray] = field(default_factory=list)
    first_at: float = 0.0
    stats: OrderedDict[str, dict[str, np.ndarray]] = field(default_factory=OrderedDict)  # device id -> statistics
    sources: list[list] = field(default_factory=list)  # [job, samples left], in the order of `images`

    def count(self) -> int:
        return sum(len(x) for x in self.images)

    def keep_stats(self, device_id: str, stats: dict[str, np.ndarray]) -> None:
        self.stats[device_id] = stats
        self.stats.move_to_end(device_id)
        while len(self.stats) > MAX_DEVICE_STATS:
            self.stats.popitem(last=False)

    def front_run(self, limit: int) -> int:
        """Samples at the front that share one normalization, at most `limit`: one device's under
        its statistics, or any devices' that normalise by batch statistics, unless they sent the
        statistics of their batch: then one upload's."""
        first = self.sources[0][0]
        run = 0
        for job, count in self.sources:
            if job.batch_statistics != first.batch_statistics or (
                    not first.batch_statistics and job.device_id != first.device_id) or (
                    first.batch_statistics and job.norm_stats is not first.norm_stats):
                break
            run += count
            if run >= limit:
                return limit
        return run

    def consume(self, samples: int) -> tuple[dict[int, int], list[Job]]:
        """Take `samples` from the front: how many came from each stored upload, and the jobs used up."""
        consumed: dict[int, int] = {}
        finished: list[Job] = []
        while samples > 0 and self.sources:
            job, count = self.sources[0]
            n = min(samples, count)
            if job.upload_id is not None:
                consumed[job.upload_id] = consumed.get(job.upload_id, 0) + n
            samples -= n
            if n == count:
                finished.append(self.sources.pop(0)[0])
            else:
                self.sources[0][1] = count - n
        return consumed, finished


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
        model: PublishedModel,
        announce: Callable[[str, int], None],
        *,
        keeper: LeaseKeeper | None = None,
        partitions: int = 1,
        max_wait_s: float = 2.0,
        min_step_samples: int = 8,
        max_cohorts_per_step: int = 4,
        max_pending_samples: int = 2048,
        max_state_bytes: int = 1 << 30,
        teacher_log: Path | None = None,
        on_step=None,
        on_event=None,
    ) -> None:
        self.engine = engine
        self.uploads = uploads
        self.store = store
        self.model = model
        self.descriptor = model.descriptor()
        self.announce = announce
        self.keeper = keeper
        self.partitions = partitions
        self.max_wait_s = max_wait_s
        self.min_step_samples = min_step_samples
        self.max_cohorts_per_step = max_cohorts_per_step
        self.max_pending_samples = max_pending_samples  # taken from the queue but not yet learnt from
        self.max_state_bytes = max_state_bytes  # replay images held over all cohorts; least recently used states beyond
        self.teacher_log = teacher_log  # evaluation aid: the teacher's class for each stepped sample
        self._teacher_log_full = False
        self.stats = WorkerStats()
        self._states: OrderedDict[str, CohortState] = OrderedDict()
        self._pending: dict[str, _Pending] = defaultdict(_Pending)
        self._holding: set[int] = set()  # upload ids with samples in `_pending`
        self._partitions_held: dict[int, int] = {}  # partition -> lease epoch this worker reads it under
        self._resync_wanted = False
        self._stop = threading.Event()
        self._warm = threading.Event()
        self._states_lock = threading.RLock()  # a step and an operator's action do not interleave
        self.frozen: set[str] = set(store.frozen_cohorts())
        self._next_frozen = self._next_resync = self._next_stats = 0.0
        self._thread = threading.Thread(target=self._run, name="adaptation-worker", daemon=True)
        self._on_step = on_step
        self._on_event = on_event

    def start(self) -> None:
        """Recover what was accepted and start the thread, which warms up before it takes the
        first upload (see `_warm_up`): start-up, and so health, does not wait for the warm-up."""
        if self.keeper is None:
            recovered = self._resync(None)
            if recovered:
                log.info("recovered %d accepted uploads (%d samples) from before the restart", *recovered)
        else:
            self.keeper.start()
        self._thread.start()

    @property
    def warming(self) -> bool:
        """True until the warm-up step has run: uploads are accepted and queue meanwhile."""
        return not self._warm.is_set()

    def _warm_up(self) -> None:
        """One step on blank images: the first torch step pays one-off setup (seconds for a small
        model, minutes for a ResNet-50 teacher on a CPU), which would otherwise land on the first
        real upload's freshness. A failure here is logged; the real steps say the rest."""
        shape = self.engine.student_input_shape
        started = time.monotonic()
        try:
            self.engine.step(np.zeros((self.engine.cfg.new_per_step, shape[1], shape[2], shape[0]), np.uint8),
                             self.engine.new_state())
            log.info("warm-up step done in %.1f s", time.monotonic() - started)
        except Exception:
            log.exception("warm-up step failed")
        finally:
            self._warm.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.keeper is not None:
            self.keeper.stop()

    def pending_samples(self) -> int:
        return sum(p.count() for p in list(self._pending.values()))

    # -- operator actions (run on the worker's thread, in order with the cohort's uploads) -------

    def _control(self, job: ControlJob) -> None:
        if job.action == "seed":
            if self.store.version_number(job.cohort) == 0:
                self._commit(job.cohort, self.engine.source_delta(), 0.0)
        elif job.action == "rollback":
            self._rollback(job.cohort, job.version)

    def _rollback(self, cohort: str, version: int) -> None:
        """Publish version `version`'s tensors again, as the cohort's next version (versions only
        move forward), and continue adapting from them with fresh optimizer state."""
        record = self.store.version(cohort, version)
        if record is None:
            log.error("rollback of %s: no stored version %d", cohort, version)
            return
        tensors = {name: tensor.to_numpy() for name, tensor in record.params.items()}
        with self._states_lock:
            state = self._state(cohort)
            state.restart_from(tensors)
            state.published = {k: v.copy() for k, v in tensors.items()}
            state.predictions.clear()
            new_version = self._commit(cohort, tensors, record.newest_upload_at, encode_state(state))
        if new_version:
            self._event(cohort, "rollback", f"v{new_version} carries v{version}'s tensors")

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._warm_up()
        while not self._stop.is_set():
            try:
                self._housekeeping()
                full = self.pending_samples() >= self.max_pending_samples
                job = None if full else self.uploads.take(timeout=0.1)
                drained = 0
                while job is not None:  # take what is queued, so one step sees every cohort that is ready
                    self._handle(job)
                    drained += 1
                    full = self.pending_samples() >= self.max_pending_samples
                    job = self.uploads.take(timeout=0) if drained < MAX_DRAIN and not full else None
            except (StoreError, BrokerUnavailable) as exc:  # the store or the broker is away: hold on, the data is safe where it is
                log.warning("worker waiting for its backends: %s", exc)
                self._stop.wait(1.0)
                continue
            except Exception:
                log.exception("worker loop failed; continuing")
                self._stop.wait(1.0)
                continue
            # over the bound, jobs stay in the (bounded) queue, so the front answers 429: memory stays
            # bounded and the delay moves to the devices' spools; meanwhile any cohort with samples steps
            ready = [cohort for cohort in list(self._pending) if self._ready(cohort, pressed=full)]
            if ready:
                try:
                    self._step(ready[: self.max_cohorts_per_step])
                except Exception:  # a bad step must not kill the worker
                    log.exception("adaptation step failed for cohorts %s", ready)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_frozen:
            self.frozen = set(self.store.frozen_cohorts())
            self._next_frozen = now + FROZEN_REFRESH_S
        if self.keeper is None:
            if self._resync_wanted:  # a refused commit: take its uploads back from the store
                self._resync_wanted = False
                self._resync(None)
            return
        self._follow_leases()
        if now >= self._next_resync or self._resync_wanted:
            self._resync_wanted = False
            for partition in sorted(self._partitions_held):
                self._resync(partition)
            self._next_resync = now + RESYNC_EVERY_S
        if now >= self._next_stats:
            self._publish_stats()
            self._next_stats = now + STATS_EVERY_S

    def _follow_leases(self) -> None:
        """Start reading partitions this worker gained, forget those it lost or gives back."""
        queue: PartitionedQueue = self.uploads  # type: ignore[assignment]
        for partition in self.keeper.surplus():
            self._drop_partition(partition)
            queue.release(partition)
            self.keeper.release(partition)
        held = {lease.partition: lease.epoch for lease in self.keeper.leases()}
        for partition, epoch in sorted(self._partitions_held.items()):
            if held.get(partition) != epoch:  # gone, or lost and taken again: what we knew may be stale
                log.warning("partition %d lost: forgetting its cohorts", partition)
                self._drop_partition(partition)
                queue.release(partition)
        for partition, epoch in sorted(held.items()):
            if partition not in self._partitions_held:
                queue.hold(partition)
                self._partitions_held[partition] = epoch
                self._resync(partition)

    def _drop_partition(self, partition: int) -> None:
        self._partitions_held.pop(partition, None)
        for cohort in [c for c in list(self._pending) + list(self._states)
                       if partition_of(c, self.partitions) == partition]:
            self._forget(cohort)

    def _forget(self, cohort: str) -> None:
        """Drop a cohort's samples and state from memory (not acked: they come back from the broker or store)."""
        pending = self._pending.pop(cohort, None)
        if pending is not None:
            self._holding.difference_update(job.upload_id for job, _ in pending.sources)
        self._states.pop(cohort, None)

    def _resync(self, partition: int | None) -> tuple[int, int] | None:
        """Take stored uploads no version has learnt from and this worker does not hold yet:
        after a restart, a partition change, or a broker that lost messages."""
        jobs = samples = 0
        room = max(0, self.max_pending_samples - self.pending_samples())
        for upload in self.store.pending_uploads(partition, exclude=self._holding, max_samples=room):
            job = StoredJob(upload.upload_id, upload.cohort, upload.device_id, upload.received_at,
                            partition_of(upload.cohort, self.partitions))
            added = self._add_stored(job, upload.body, upload.remaining)
            jobs, samples = jobs + bool(added), samples + added
        return (jobs, samples) if jobs else None

    def _handle(self, job: Job) -> None:
        if isinstance(job, ControlJob):
            with self._states_lock:
                self._control(job)
            self.uploads.ack(job)
        elif isinstance(job, StoredJob):
            if job.upload_id in self._holding:  # already here from the store: its first copy will be acked
                self.uploads.ack(job)
                return
            stored = self.store.unlearnt_upload(job.upload_id)  # the message names it; the store holds it
            if stored is None or not self._add_stored(job, stored[1], stored[0]):
                self.uploads.ack(job)
        else:
            self._add(job)

    def _add_stored(self, job: StoredJob, body: bytes, remaining: int) -> int:
        """Decode a stored upload's `body` and keep its last `remaining` samples (the ones not learnt yet)."""
        if remaining <= 0:
            return 0
        try:
            upload = parse_upload(body, self.descriptor, MAX_STORED_BODY, cohort=job.cohort,
                                  device_id=job.device_id, received_at=job.received_at, upload_id=job.upload_id)
        except UploadRejected as exc:  # it passed these checks once; a changed model may refuse it now
            log.error("dropping stored upload %d: %s", job.upload_id, exc)
            self.store.discard_upload(job.upload_id)
            return 0
        keep = slice(len(upload.images) - remaining, None)
        self._add(replace(upload, images=upload.images[keep], captured_at=upload.captured_at[keep],
                          partition=job.partition, receipt=job.receipt))
        return remaining

    def _add(self, job: UploadJob) -> None:
        pending = self._pending[job.cohort]
        if not pending.images:
            pending.first_at = time.monotonic()
        pending.images.append(job.images)
        pending.captured_at.append(job.captured_at)
        pending.sources.append([job, len(job.images)])
        if job.upload_id is not None:
            self._holding.add(job.upload_id)
        if job.norm_stats is not None and not job.batch_statistics:  # a batch's statistics go with its upload
            pending.keep_stats(job.device_id, job.norm_stats)

    def least_samples(self, batch_statistics: bool) -> int:
        """Fewest new samples a step takes before its max wait: a batch-statistics cohort's new
        group is normalised by its own batch statistics, which need BATCH_STATISTICS_MIN_SAMPLES
        (so such a step takes that many even where --new-per-step is smaller)."""
        if batch_statistics:
            return max(self.min_step_samples, BATCH_STATISTICS_MIN_SAMPLES)
        return self.min_step_samples

    def _ready(self, cohort: str, pressed: bool = False) -> bool:
        """A full step is ready at once; under overload (`pressed`), as soon as the front holds a
        step's minimum (`least_samples`), never fewer. Fewer than that step only once the oldest
        waited `max_wait_s` (and at least `min_step_samples`), so a trickle is never held forever
        (replay's lockstep uploads about 13 frames of each batch of 64 and waits for their delta).
        Such a batch-statistics trickle is normalised by its own batch statistics: measured on
        CIFAR-10 (BENCHMARKS.md), topping it up with the cohort's newest stored frames cost 2-3
        points, and eval mode under constant statistics collapsed the stream."""
        if cohort in self.frozen:  # its accepted uploads wait, on disk too, until it is unfrozen
            return False
        pending = self._pending[cohort]
        n = pending.count()
        if n == 0:
            return False
        least = self.least_samples(pending.sources[0][0].batch_statistics)
        if n >= max(self.engine.cfg.new_per_step, least):
            return True
        if pressed and pending.front_run(least) >= least:
            return True
        waited = time.monotonic() - pending.first_at
        return n >= self.min_step_samples and waited >= self.max_wait_s

    def _take(self, cohort: str) -> tuple[StepInput, np.ndarray, dict[int, int], list[Job]]:
        """The cohort's next step's samples (the rest wait), their capture times, how many
        samples each stored upload gave, and the jobs used up."""
        pending = self._pending[cohort]
        images = np.concatenate(pending.images)
        captured = np.concatenate(pending.captured_at)
        first = pending.sources[0][0]
        batch_statistics = first.batch_statistics
        stats = first.norm_stats if batch_statistics else pending.stats.get(first.device_id)
        least = self.least_samples(batch_statistics)
        limit = max(self.engine.cfg.new_per_step, least)
        run = pending.front_run(limit + least)
        take = limit if run >= limit + least else run  # a remainder below a step's minimum comes along
        consumed, finished = pending.consume(take)
        rest, rest_captured = images[take:], captured[take:]
        self._pending[cohort] = _Pending(
            [rest] if len(rest) else [], [rest_captured] if len(rest) else [], time.monotonic(), pending.stats,
            pending.sources,
        )
        item = StepInput(images[:take], self._state(cohort), stats, batch_statistics)
        return item, captured[:take], consumed, finished

    def _state(self, cohort: str) -> CohortState:
        """The cohort's state: in memory, else as the store kept it (a restart, another worker's
        partition), else the source. Least recently used states beyond the bound are dropped:
        the store has each one as of its last commit."""
        state = self._states.get(cohort)
        if state is None:
            saved = self.store.load_state(cohort)
            state = decode_state(saved, self.engine.cfg) if saved else self.engine.new_state()
            self._states[cohort] = state
        self._states.move_to_end(cohort)
        return state

    def state_bytes(self) -> int:
        """What the cohorts' states hold in memory, their replay and held-out images being nearly all of it."""
        return sum(_replay_bytes(state) for state in list(self._states.values()))

    def _evict(self) -> None:
        """Drop least recently stepped states until the rest fit the bound: each is in the store
        as of its last commit (its replay buffer refills from new uploads)."""
        total = self.state_bytes()
        while total > self.max_state_bytes and len(self._states) > 1:
            cohort, state = self._states.popitem(last=False)
            total -= _replay_bytes(state)
            log.info("cohort %s: state evicted from memory (%d cohorts, %.0f MB kept)", cohort, len(self._states),
                     total / 1e6)

    def _commit(self, cohort: str, tensors: dict[str, np.ndarray], newest_upload_at: float,
                state: bytes | None = None, consumed: dict[int, int] | None = None, learnt: int = 0) -> int:
        """Store what a step did in one transaction and announce the cohort's next version; 0 when
        the store refused it (the lease moved on, or another writer published first)."""
        lease = None
        if self.keeper is not None:
            lease = self.keeper.lease(partition_of(cohort, self.partitions))
            if lease is None:
                self._forget(cohort)
                return 0
        params = {k: Tensor.from_numpy(v) for k, v in tensors.items()}
        record = VersionRecord(cohort, self.store.version_number(cohort) + 1, time.time(), newest_upload_at,
                               params, tensors_digest(params))
        try:
            self.store.commit(cohort, record, state, consumed, learnt, lease=lease)
        except StoreError as exc:  # lease lost, another writer first, or the database away
            log.warning("cohort %s: v%d not published (%s: %s); its state and uploads are reloaded from the store",
                        cohort, record.version, type(exc).__name__, exc)
            self._forget(cohort)
            self._resync_wanted = True
            return 0
        self.announce(cohort, record.version)
        return record.version

    def _event(self, cohort: str, kind: str, detail: str) -> None:
        log.warning("cohort %s: %s (%s)", cohort, kind, detail)
        self.store.add_event(cohort, kind, detail)
        if self._on_event is not None:
            self._on_event(kind)

    def _step(self, cohorts: list[str]) -> None:
        """Step several cohorts at once: the teacher's forward pass is shared by all of them."""
        with self._states_lock:
            inputs, captured, consumed, finished = zip(*(self._take(cohort) for cohort in cohorts))
            started = time.perf_counter()
            results = self.engine.step_many(list(inputs))
            elapsed = time.perf_counter() - started
            samples = sum(len(item.images) for item in inputs)
            versions = []
            for cohort, result, times, item, used, done in zip(cohorts, results, captured, inputs, consumed, finished):
                unstored = len(item.images) - sum(used.values())  # samples with no store row (tests feed such)
                version = self._commit(cohort, result.tensors, float(times.max()), encode_state(item.state), used,
                                       unstored)
                versions.append(version)
                if not version:  # refused: these come back from the store or the broker
                    self._holding.difference_update(job.upload_id for job in done)
                else:
                    for job in done:
                        self._holding.discard(job.upload_id)
                        self.uploads.ack(job)
                    self._log_teacher(cohort, times, result)
                    if result.event is not None:
                        self._event(cohort, result.event, result.detail)
        self._evict()
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

    def _log_teacher(self, cohort: str, captured: np.ndarray, result: StepResult) -> None:
        """`--teacher-log`: one JSON line per committed step, the teacher's class for each of its
        samples by capture time (exact: json writes floats by repr), so an evaluation harness that
        knows the labels can score the teacher. No images; capped at TEACHER_LOG_MAX_BYTES."""
        if self.teacher_log is None or result.teacher_classes is None or self._teacher_log_full:
            return
        line = json.dumps({"cohort": cohort, "captured_at": captured.tolist(),
                           "teacher": result.teacher_classes.tolist()}) + "\n"
        try:
            self.teacher_log.parent.mkdir(parents=True, exist_ok=True)
            with self.teacher_log.open("a") as out:
                if out.tell() + len(line) > TEACHER_LOG_MAX_BYTES:
                    self._teacher_log_full = True
                    log.warning("teacher log %s reached %d bytes: no more lines", self.teacher_log, TEACHER_LOG_MAX_BYTES)
                    return
                out.write(line)
        except OSError as exc:
            log.warning("teacher log %s not written: %s", self.teacher_log, exc)

    def _publish_stats(self) -> None:
        """What API replicas show in the fleet report for this worker."""
        steps_per_s, samples_per_s = self.stats.rates()
        self.store.put_blob(WORKER_STATS_BLOB + self.keeper.owner, json.dumps({
            "at": time.time(), "pending_samples": self.pending_samples(), "steps_total": self.stats.steps,
            "samples_total": self.stats.samples, "steps_per_s": steps_per_s, "samples_per_s": samples_per_s,
            "partitions": sorted(self._partitions_held),
        }).encode())


def _replay_bytes(state: CohortState) -> int:
    return sum(group.images.nbytes for buffer in (state.replay, state.holdout) for group in buffer.groups)
