"""The seam between the HTTP front and the adaptation worker.

The front only `offer`s jobs; the worker `take`s them and `ack`s each once a committed
version has learnt from it (or it was handled). `InProcessQueue` serves one process;
`server.broker_redis.RedisBroker` serves API replicas and workers on several machines.
Every upload is also in the store before it is offered, so the store, not the queue,
is what makes an acknowledged upload durable.
"""
from __future__ import annotations

import queue
import zlib
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np


def partition_of(cohort: str, partitions: int) -> int:
    """A cohort's partition: stable across processes and machines (not Python's salted hash)."""
    return zlib.crc32(cohort.encode()) % partitions


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
    partition: int = 0
    receipt: str | None = None  # the broker's handle for `ack`


@dataclass(frozen=True)
class StoredJob:
    """An upload by reference (a broker message, or a store row read back after a restart or a
    partition change): the worker that takes it reads the body from the store, where the API
    wrote it before the 2xx."""

    upload_id: int
    cohort: str
    device_id: str
    received_at: float
    partition: int = 0
    receipt: str | None = None


@dataclass(frozen=True)
class ControlJob:
    """An operator's action on a cohort, run by the worker that owns the cohort, in order with its uploads."""

    cohort: str
    action: Literal["rollback", "seed"]
    version: int = 0  # rollback: the version whose tensors are published again
    partition: int = 0
    receipt: str | None = None


Job = UploadJob | StoredJob | ControlJob


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached right now (the store still holds every accepted upload)."""


class UploadQueue(Protocol):
    def offer(self, job: Job) -> bool: ...
    def take(self, timeout: float) -> Job | None: ...
    def ack(self, job: Job) -> None: ...
    def depth(self) -> int: ...


class InProcessQueue:
    """Bounded, so an overloaded worker turns into refusals rather than memory growth."""

    def __init__(self, max_jobs: int) -> None:
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_jobs)

    def offer(self, job: Job) -> bool:
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def take(self, timeout: float) -> Job | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, job: Job) -> None:
        """Nothing to do: the store deletes a learnt upload in the step's own transaction."""

    def depth(self) -> int:
        return self._queue.qsize()
