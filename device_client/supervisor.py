"""Device threads that survive any exception: a loop that raises is logged, counted and
restarted after a backoff, so a device never silently stops adapting or uploading.

Each thread's health (running, restarting, stopped; restarts; the last error) is what
the device's status reports under "threads".
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from device_client.transport import Backoff

log = logging.getLogger("driftsync.device.supervisor")


@dataclass
class ThreadHealth:
    state: str = "starting"  # running, restarting, stopped
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))


class Supervisor:
    """Makes supervised threads and keeps their health. Thread-safe."""

    def __init__(self, backoff_cap_s: float = 30.0) -> None:
        self.backoff_cap_s = backoff_cap_s
        self._health: dict[str, ThreadHealth] = {}
        self._lock = threading.Lock()

    def thread(self, name: str, body: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """A daemon thread (not started) that runs `body` until it returns; when it raises, the
        error is logged and `body` runs again after a backoff, unless `stop` is set meanwhile."""
        with self._lock:
            health = self._health[name] = ThreadHealth()

        def run() -> None:
            backoff = Backoff(base_s=0.5, cap_s=self.backoff_cap_s)
            while True:
                health.state = "running"
                started = time.monotonic()
                try:
                    body()
                except Exception as exc:  # that is the point: nothing ends the thread
                    health.restarts += 1
                    health.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    health.last_error_at = time.time()
                    if time.monotonic() - started > 60:  # it had been healthy a while: start over gently
                        backoff.reset()
                    delay = backoff.next_delay()
                    log.exception("thread %s failed; restarting it in %.1fs", name, delay)
                    health.state = "restarting"
                    if not stop.wait(delay):
                        continue
                health.state = "stopped"
                return

        return threading.Thread(target=run, name=name, daemon=True)

    def health(self) -> dict[str, dict]:
        with self._lock:
            return {name: h.as_dict() for name, h in self._health.items()}
