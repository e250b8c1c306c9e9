"""The uplink: inference hands samples over and never waits.

Two threads. The encoder batches, budgets and encodes samples and writes each
batch to the disk spool; the sender posts the spool oldest first. A dead server
therefore only grows the spool (bounded, oldest dropped and counted), and what was
selected survives a restart. Retries back off with jitter and honour Retry-After.

A batch-statistics device's selection from one inference batch travels whole, in one
request (unless its bytes pass `max_request_bytes`): the cloud normalises it by its own
statistics, and a split at `batch_size` left remainders of 4-9 images that the teacher
normalised alone.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_client.selection import UploadBudget
from device_client.spool import Spool
from device_client.supervisor import Supervisor
from device_client.transport import Backoff, ServerApi, ServerError
from shared.codec import pack
from shared.images import DEFAULT_UPLOAD_CODEC, UploadEncoding
from shared.protocol import MAX_SAMPLES_PER_UPLOAD, UploadBatch, statistic_problem
from shared.tensors import Tensor

log = logging.getLogger("driftsync.device.uploader")
REFUSED_FOR_GOOD = (400, 413, 415, 422)  # the same body can never succeed; anything else is retried
# images per request at most this many bytes: half the server's default body bound (8 MiB), so a
# whole group of large, noisy images is split rather than refused with 413 and lost
MAX_REQUEST_IMAGE_BYTES = 4 * 1024 * 1024


@dataclass
class UploadStats:
    offered: int = 0
    sent: int = 0
    sent_bytes: int = 0
    requests: int = 0
    dropped_queue_full: int = 0
    dropped_budget: int = 0
    refused: int = 0
    retries: int = 0


@dataclass(frozen=True)
class _Queued:
    image: np.ndarray
    entropy: float
    captured_at: float
    version: int
    group: int  # the `offer` call it came in
    statistics: dict[str, np.ndarray] | None = None  # the group's batch statistics, if it sent them


class Uploader:
    def __init__(
        self,
        api: ServerApi,
        budget: UploadBudget,
        spool: Spool,
        *,
        encoding: UploadEncoding | None = None,
        batch_size: int = 32,
        flush_s: float = 0.5,
        max_queue: int = 2048,
        stats_source: Callable[[], dict[str, Tensor]] | None = None,
        stats_every_s: float = 2.0,
        batch_statistics: bool = False,
        max_request_bytes: int = MAX_REQUEST_IMAGE_BYTES,
        backoff: Backoff | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.api = api
        self.budget = budget
        self.spool = spool
        self.encoding = encoding or UploadEncoding.parse(DEFAULT_UPLOAD_CODEC)
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.stats_source = stats_source
        self.stats_every_s = stats_every_s
        self.batch_statistics = batch_statistics
        self.max_request_bytes = max_request_bytes
        self.backoff = backoff or Backoff()
        self.stats = UploadStats()
        self._stats_sent_at = float("-inf")
        self._queue: deque[_Queued] = deque()
        self._offers = 0
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._spooled = threading.Condition()
        self._closing = threading.Event()
        supervisor = supervisor or Supervisor()
        self._encoder = supervisor.thread("upload-encoder", self._encode_loop, self._closing)
        self._sender = supervisor.thread("upload-sender", self._send_loop, self._closing)

    def start(self) -> None:
        self._encoder.start()
        self._sender.start()

    def offer(self, images: np.ndarray, entropy: np.ndarray, captured_at: np.ndarray, version: int,
              statistics: dict[str, np.ndarray] | None = None) -> None:
        """One call's samples are one group: a batch-statistics device's group goes out whole,
        with the `statistics` its batch was normalised by, in requests of its own."""
        with self._cond:
            self._offers += 1
            for image, ent, ts in zip(images, entropy, captured_at):
                if len(self._queue) >= self._max_queue:
                    self._queue.popleft()
                    self.stats.dropped_queue_full += 1
                self._queue.append(_Queued(image, float(ent), float(ts), version, self._offers, statistics))
                self.stats.offered += 1
            self._cond.notify()

    def close(self, flush_timeout: float = 10.0) -> None:
        """Spool what is queued, try to send the spool within the timeout, then stop.
        Whatever is left stays on disk for the next start."""
        deadline = time.monotonic() + flush_timeout
        self._closing.set()
        with self._cond:
            self._cond.notify()
        self._encoder.join(timeout=flush_timeout)
        with self._spooled:
            self._spooled.notify()
        self._sender.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self._sender.is_alive():  # an open keep-alive connection would hold up a TLS server's shutdown
            self.api.close()

    def queued(self) -> int:
        return len(self._queue)

    def dropped(self) -> int:
        s = self.stats
        return s.dropped_queue_full + s.dropped_budget + s.refused + self.spool.dropped_samples

    # -- encoder: memory queue -> spool -------------------------------------------------
    def _next_batch(self) -> list[_Queued]:
        with self._cond:
            if self.batch_statistics:
                while not self._queue and not self._closing.is_set():
                    self._cond.wait(timeout=0.5)
                return self._whole_groups()
            deadline = time.monotonic() + self.flush_s
            while len(self._queue) < self.batch_size and not self._closing.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0 and self._queue:
                    break
                self._cond.wait(timeout=max(remaining, 0.05) if self._queue else 0.5)
            return [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]

    def _whole_groups(self) -> list[_Queued]:
        """The front group whole (up to a request's limit), then further whole groups while
        they fit in `batch_size` and carry no statistics of their own. Called under the lock."""
        batch: list[_Queued] = []
        while self._queue and len(batch) < MAX_SAMPLES_PER_UPLOAD:
            group = self._queue[0].group
            size = sum(1 for item in self._queue if item.group == group)
            if batch and (len(batch) + size > self.batch_size or batch[0].statistics is not None
                          or self._queue[0].statistics is not None):
                break
            while self._queue and self._queue[0].group == group and len(batch) < MAX_SAMPLES_PER_UPLOAD:
                batch.append(self._queue.popleft())
        return batch

    def _encode_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._spool(batch)
            elif self._closing.is_set():
                return

    def _statistics_due(self, now: float) -> dict[str, Tensor] | None:
        """The device's statistics ride along at most every `stats_every_s`: the server keeps
        the latest per cohort, and sending them with every request cost ~40% of the uplink."""
        if self.stats_source is None or now - self._stats_sent_at < self.stats_every_s:
            return None
        self._stats_sent_at = now
        return self.stats_source()

    def _statistics_of(self, item: _Queued, now: float) -> dict[str, Tensor] | None:
        """A batch-statistics group's own statistics, else the device's running ones when due.
        Statistics the server would refuse (a variance of 0, NaN) stay behind, logged: the group
        goes without them, and the cloud normalises it by its own batch statistics instead."""
        if item.statistics is None:
            return self._statistics_due(now)
        for name, value in item.statistics.items():
            if problem := statistic_problem(name, value):
                log.warning("a batch's statistics would be refused (%s); its uploads go without them", problem)
                return None
        return {name: Tensor.from_numpy(value) for name, value in item.statistics.items()}

    def _spool(self, batch: list[_Queued]) -> None:
        """Encode and budget the batch, then write it as one request, or as several when its
        images would pass `max_request_bytes` (a whole batch-statistics group of large images)."""
        now = time.monotonic()
        chunks: list[list[tuple[bytes, _Queued]]] = [[]]
        chunk_bytes = 0
        for item in batch:
            encoded = self.encoding.encode(item.image)
            if not self.budget.allow(len(encoded), now):
                self.stats.dropped_budget += 1
                continue
            if chunks[-1] and chunk_bytes + len(encoded) > self.max_request_bytes:
                chunks.append([])
                chunk_bytes = 0
            chunks[-1].append((encoded, item))
            chunk_bytes += len(encoded)
        for chunk in chunks:
            if not chunk:
                continue
            upload = UploadBatch(
                device_version=min(item.version for _, item in chunk),
                codec=self.encoding.codec,
                images=[encoded for encoded, _ in chunk],
                entropy=[item.entropy for _, item in chunk],
                captured_at=[item.captured_at for _, item in chunk],
                norm_stats=self._statistics_of(chunk[0][1], now),
                batch_statistics=self.batch_statistics,
            )
            self.spool.put(pack(upload), len(chunk))
        with self._spooled:
            self._spooled.notify()

    # -- sender: spool -> server ---------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            entry = self.spool.oldest()
            if entry is None:
                if self._closing.is_set() and not self._encoder.is_alive():
                    return
                with self._spooled:
                    self._spooled.wait(timeout=0.5)
                continue
            try:
                body = entry.path.read_bytes()
                self.api.upload(body)
            except FileNotFoundError:  # dropped by the bound while we were reading it
                continue
            except ServerError as exc:
                if exc.status in REFUSED_FOR_GOOD:
                    log.error("server refused a spooled batch of %d samples for good: %s", entry.samples, exc)
                    self.stats.refused += entry.samples
                    self.spool.remove(entry)
                    continue
                self.stats.retries += 1
                delay = self.backoff.next_delay(exc.retry_after)
                log.warning("upload failed (%s); %d samples spooled; retry in %.1fs", exc, self.spool.samples(), delay)
                if self._closing.wait(delay):
                    return  # shutting down: the spool keeps it for the next start
                continue
            self.backoff.reset()
            self.spool.remove(entry)
            self.stats.sent += entry.samples
            self.stats.sent_bytes += len(body)
            self.stats.requests += 1
