"""Devices that have not been seen for a while expire: a simulated fleet that is taken down and up
again, or a replaced box, does not leave dead devices behind, nor the state and versions of their
own cohorts. A device that comes back later finds its token unknown and enrols again
(device_client re-enrols on 401)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from server.store import Store

log = logging.getLogger("driftsync.server")
SEEN_WRITE_EVERY_S = 60.0  # a device's last_seen_at is rewritten at most this often (not on every request)
MIN_EXPIRY_S = 2 * SEEN_WRITE_EVERY_S  # shorter would expire devices that are talking to the server


def should_touch(last_seen_at: float, now: float) -> bool:
    return now - last_seen_at >= SEEN_WRITE_EVERY_S


class DeviceReaper:
    """A thread that expires unseen devices every `every_s` (any number of API replicas may run one:
    the delete is idempotent)."""

    def __init__(self, store: Store, expiry_s: float, on_expired: Callable[[list[str]], None],
                 clock: Callable[[], float] = time.time) -> None:
        if expiry_s < MIN_EXPIRY_S:
            raise ValueError(f"--device-expiry-s must be at least {MIN_EXPIRY_S:.0f} s (last-seen times are "
                             f"written every {SEEN_WRITE_EVERY_S:.0f} s), not {expiry_s:g}")
        self.store, self.expiry_s, self.on_expired, self.clock = store, expiry_s, on_expired, clock
        self.every_s = min(expiry_s / 4, SEEN_WRITE_EVERY_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-reaper", daemon=True)

    def expire_once(self) -> list[str]:
        """Expire the unseen devices (their ids), then remove the own cohorts of gone devices once
        they have been idle as long."""
        cutoff = self.clock() - self.expiry_s
        expired = self.store.expire_devices(cutoff)
        if expired:
            log.info("expired %d device(s) unseen for %.0f s: %s", len(expired), self.expiry_s, ", ".join(expired))
            self.on_expired(expired)
        removed = self.store.remove_orphaned_cohorts(cutoff)
        if removed:
            log.info("removed the state and versions of %d cohort(s) of gone devices: %s", len(removed), ", ".join(removed))
        return expired

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.expire_once()
            except Exception as exc:  # noqa: BLE001 (the store away: try again next round)
                log.warning("device expiry skipped: %s", exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
