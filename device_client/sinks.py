"""Where predictions go: JSON lines (stdout or a file) and an HTTP webhook.

A record: id, prediction (index and class name), confidence, entropy, whether it
was uploaded, the parameter version that made it, and a timestamp. A sink never
blocks inference: the webhook posts from its own thread, bounded, and counts drops.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Protocol, TextIO

import httpx

from device_client.supervisor import Supervisor
from device_client.transport import Backoff

log = logging.getLogger("driftsync.device.sinks")


class Sink(Protocol):
    def write(self, records: list[dict]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, target: str) -> None:
        self._owned = target != "-"
        self._out: TextIO = Path(target).open("a", encoding="utf-8") if self._owned else sys.stdout

    def write(self, records: list[dict]) -> None:
        self._out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._out.flush()

    def close(self) -> None:
        if self._owned:
            self._out.close()
        else:
            self._out.flush()


class WebhookSink:
    """POSTs JSON arrays of records. While the endpoint is down, records wait in a bounded
    queue (oldest dropped and counted) and retries back off."""

    def __init__(self, url: str, max_records: int = 10_000, batch: int = 256, timeout_s: float = 10.0,
                 supervisor: Supervisor | None = None) -> None:
        self.url, self.batch = url, batch
        self.sent = 0
        self.dropped = 0
        self._queue: deque[dict] = deque()
        self._max = max_records
        self._cond = threading.Condition()
        self._closing = threading.Event()  # no more records will come: exit once the queue is empty
        self._abandon = threading.Event()  # the close timeout passed: stop retrying
        self._client = httpx.Client(timeout=timeout_s)
        self._thread = (supervisor or Supervisor()).thread("webhook-sink", self._run, self._abandon)
        self._thread.start()

    def write(self, records: list[dict]) -> None:
        with self._cond:
            for record in records:
                if len(self._queue) >= self._max:
                    self._queue.popleft()
                    self.dropped += 1
                self._queue.append(record)
            self._cond.notify()

    def _run(self) -> None:
        backoff = Backoff(cap_s=10.0)
        while True:
            with self._cond:
                while not self._queue and not self._closing.is_set():
                    self._cond.wait(timeout=0.5)
                if not self._queue:
                    return
                batch = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
                dropped_before = self.dropped
            try:
                self._client.post(self.url, json=batch).raise_for_status()
            except httpx.HTTPError as exc:
                delay = backoff.next_delay()
                log.warning("webhook %s failed (%s); retrying in %.1fs", self.url, exc, delay)
                if self._abandon.wait(delay):
                    return
                continue
            backoff.reset()
            with self._cond:  # records dropped meanwhile were the oldest: part of this batch
                for _ in range(max(0, len(batch) - (self.dropped - dropped_before))):
                    self._queue.popleft()
            self.sent += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within the timeout; the rest is dropped and counted."""
        self._closing.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout)
        self._abandon.set()
        self._thread.join(1.0)
        with self._cond:
            self.dropped += len(self._queue)
            self._queue.clear()
        self._client.close()


def parse_sink(spec: str) -> tuple[str, str]:
    """jsonl:- (stdout), jsonl:PATH, or webhook:URL -> (kind, target); checked before anything opens."""
    kind, _, target = spec.partition(":")
    if (kind == "jsonl" and target) or (kind == "webhook" and target.startswith(("http://", "https://"))):
        return kind, target
    raise ValueError(f"unknown sink {spec!r}; use jsonl:-, jsonl:PATH, webhook:URL or none")


def open_sink(spec: str, supervisor: Supervisor | None = None) -> Sink:
    kind, target = parse_sink(spec)
    return JsonlSink(target) if kind == "jsonl" else WebhookSink(target, supervisor=supervisor)
