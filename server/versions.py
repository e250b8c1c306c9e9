"""Which version each cohort is at, and the long polls waiting for the next one.

Torch-free: every HTTP front keeps one board. The worker in the same process, or the
broker's announcements from workers elsewhere, `publish` to it; a long poll that times
out takes its waiter with it, so abandoned polls leave nothing behind.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict


class VersionBoard:
    def __init__(self) -> None:
        self._latest: dict[str, int] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._generation = 0  # bumped by wake_all: a device's cohort may have changed
        self._closed = False
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """At shutdown: answer every long poll now and every later one at once."""
        self._closed = True
        self.wake_all()

    def latest(self, cohort: str) -> int:
        return self._latest.get(cohort, 0)

    def publish(self, cohort: str, version: int) -> None:
        """Versions only move forward: a late or repeated announcement changes nothing."""
        with self._lock:
            if version <= self._latest.get(cohort, 0):
                return
            self._latest[cohort] = version
            waiters = self._waiters.pop(cohort, set())
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

    def waiting(self) -> int:
        with self._lock:
            return sum(len(ws) for ws in self._waiters.values())

    async def wait_newer(self, cohort: str, since: int, timeout: float) -> int:
        """The cohort's latest version once it exceeds `since`, or at the timeout or a wake_all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            generation = self._generation
        while True:
            waiter = (asyncio.get_running_loop(), asyncio.Event())
            with self._lock:
                latest = self._latest.get(cohort, 0)
                if latest > since or self._generation != generation or self._closed:
                    return latest
                self._waiters[cohort].add(waiter)
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    await asyncio.wait_for(waiter[1].wait(), remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                with self._lock:
                    waiters = self._waiters.get(cohort)
                    if waiters is not None:
                        waiters.discard(waiter)
                        if not waiters:
                            del self._waiters[cohort]
            if time.monotonic() >= deadline:
                return self.latest(cohort)
