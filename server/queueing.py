"""The seam between the HTTP front and the adaptation worker.

The front only `offer`s jobs; the worker only `take`s them. Another backend
(a broker stream, another process) implements the same two methods.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class UploadJob:
    cohort: str
    device_id: str
    images: np.ndarray  # uint8 N x H x W x 3
    captured_at: np.ndarray  # float64 N, device clock, seconds
    received_at: float
    norm_stats: dict[str, np.ndarray] | None = None  # the device's own statistics, if it sent them
    batch_statistics: bool = False  # the device normalises each batch by its own statistics
    upload_id: int | None = None  # its durable record in the store, deleted once learnt from


class UploadQueue(Protocol):
    def offer(self, job: UploadJob) -> bool: ...
    def take(self, timeout: float) -> UploadJob | None: ...
    def depth(self) -> int: ...


class InProcessQueue:
    """Bounded, so an overloaded worker turns into refusals rather than memory growth."""

    def __init__(self, max_jobs: int) -> None:
        self._queue: queue.Queue[UploadJob] = queue.Queue(maxsize=max_jobs)

    def offer(self, job: UploadJob) -> bool:
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def take(self, timeout: float) -> UploadJob | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def depth(self) -> int:
        return self._queue.qsize()
