"""A bounded background uploader: inference hands samples over and never waits.

Samples are encoded, budgeted and posted in batches on this thread. When the
queue is full the oldest samples go first; every drop is counted.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_client.selection import UploadBudget
from device_client.transport import ServerApi, ServerError
from shared.images import encode_image
from shared.protocol import ImageCodec, UploadBatch
from shared.tensors import Tensor

log = logging.getLogger("driftsync.device.uploader")


@dataclass
class UploadStats:
    offered: int = 0
    sent: int = 0
    sent_bytes: int = 0
    requests: int = 0
    dropped_queue_full: int = 0
    dropped_budget: int = 0
    dropped_failed: int = 0
    retries: int = 0


class Uploader:
    def __init__(
        self,
        api: ServerApi,
        budget: UploadBudget,
        *,
        codec: ImageCodec = "webp",
        batch_size: int = 32,
        flush_s: float = 0.5,
        max_queue: int = 2048,
        max_attempts: int = 5,
        stats_source: Callable[[], dict[str, Tensor]] | None = None,
        stats_every_s: float = 2.0,
        batch_statistics: bool = False,
    ) -> None:
        self.stats_source = stats_source
        self.batch_statistics = batch_statistics
        self.stats_every_s = stats_every_s
        self._stats_sent_at = float("-inf")
        self.api = api
        self.budget = budget
        self.codec = codec
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.max_attempts = max_attempts
        self.stats = UploadStats()
        self._queue: deque[tuple[np.ndarray, float, float, int]] = deque()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, images: np.ndarray, entropy: np.ndarray, captured_at: np.ndarray, version: int) -> None:
        with self._cond:
            for image, ent, ts in zip(images, entropy, captured_at):
                if len(self._queue) >= self._max_queue:
                    self._queue.popleft()
                    self.stats.dropped_queue_full += 1
                self._queue.append((image, float(ent), float(ts), version))
                self.stats.offered += 1
            self._cond.notify()

    def close(self, flush_timeout: float = 10.0) -> None:
        """Send what is queued, within the timeout, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=flush_timeout)

    def queued(self) -> int:
        return len(self._queue)

    def _next_batch(self) -> list[tuple[np.ndarray, float, float, int]]:
        with self._cond:
            deadline = time.monotonic() + self.flush_s
            while len(self._queue) < self.batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and self._queue:
                    break
                self._cond.wait(timeout=max(remaining, 0.05) if self._queue else 0.5)
            return [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._closing:
                    return
                continue
            self._send(batch)

    def _statistics_due(self, now: float) -> dict[str, Tensor] | None:
        """The device's statistics ride along at most every `stats_every_s`: the server keeps
        the latest per cohort, and sending them with every request cost ~40% of the uplink."""
        if self.stats_source is None or now - self._stats_sent_at < self.stats_every_s:
            return None
        self._stats_sent_at = now
        return self.stats_source()

    def _send(self, batch: list[tuple[np.ndarray, float, float, int]]) -> None:
        now = time.monotonic()
        images, entropy, captured = [], [], []
        for image, ent, ts, _ in batch:
            encoded = encode_image(image, self.codec)
            if not self.budget.allow(len(encoded), now):
                self.stats.dropped_budget += 1
                continue
            images.append(encoded)
            entropy.append(ent)
            captured.append(ts)
        if not images:
            return
        upload = UploadBatch(
            device_version=min(v for *_, v in batch),
            codec=self.codec,
            images=images,
            entropy=entropy,
            captured_at=captured,
            norm_stats=self._statistics_due(now),
            batch_statistics=self.batch_statistics,
        )
        for attempt in range(1, self.max_attempts + 1):
            try:
                _, body_bytes = self.api.upload(upload)
                self.stats.sent += len(images)
                self.stats.sent_bytes += body_bytes
                self.stats.requests += 1
                return
            except ServerError as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                    log.error("server refused an upload of %d samples: %s", len(images), exc)
                    break
                self.stats.retries += 1
                delay = exc.retry_after if exc.retry_after is not None else min(8.0, 0.25 * 2**attempt)
                delay *= 1 + 0.25 * random.random()
                log.warning("upload failed (%s); retry %d in %.1fs", exc, attempt, delay)
                if self._closing:
                    break
                time.sleep(delay)
        self.stats.dropped_failed += len(images)
