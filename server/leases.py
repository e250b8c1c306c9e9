"""Which partitions this worker owns: leases in the store, kept alive by a thread.

Each worker heartbeats and aims at an even share, ceil(partitions / live workers). It
takes free or expired partitions up to that share and gives surplus ones back, so a new
worker gets work and a dead one's partitions move once its leases expire. The lease's
epoch is a fencing token: the store refuses a commit from a worker whose lease has
passed to another, so two workers can never both publish a cohort's next version.

Giving a partition back happens on the worker's thread, between steps (`surplus`,
then `release`), so no step is cut in half; renewal happens here, so a long step does not
lose its lease.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading

from server.store import Lease, Store, StoreError

log = logging.getLogger("driftsync.leases")


def preference(owner: str, partition: int) -> str:
    """Rendezvous order: every worker ranks partitions differently, so shares settle without talk."""
    return hashlib.sha256(f"{owner}/{partition}".encode()).hexdigest()


class LeaseKeeper:
    def __init__(self, store: Store, owner: str, partitions: int, ttl_s: float = 10.0) -> None:
        self.store, self.owner, self.partitions, self.ttl_s = store, owner, partitions, ttl_s
        self._leases: dict[int, Lease] = {}
        self._target = partitions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self.tick()
        self._thread.start()

    def stop(self) -> None:
        """Give every lease back, so another worker takes over at once rather than after the TTL."""
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)
        for lease in self.leases():
            try:
                self.store.release_lease(lease)
            except StoreError as exc:
                log.warning("could not release partition %d: %s", lease.partition, exc)
        with self._lock:
            self._leases.clear()

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def held(self) -> set[int]:
        with self._lock:
            return set(self._leases)

    def lease(self, partition: int) -> Lease | None:
        with self._lock:
            return self._leases.get(partition)

    def surplus(self) -> list[int]:
        """Partitions above this worker's share, least preferred first."""
        with self._lock:
            extra = len(self._leases) - self._target
            ranked = sorted(self._leases, key=lambda p: preference(self.owner, p), reverse=True)
        return ranked[:max(0, extra)]

    def release(self, partition: int) -> None:
        with self._lock:
            lease = self._leases.pop(partition, None)
        if lease is not None:
            self.store.release_lease(lease)
            log.info("released partition %d", partition)

    def tick(self) -> None:
        """Heartbeat, renew what is held, take free partitions up to the share."""
        self.store.worker_heartbeat(self.owner, self.ttl_s)
        live = max(1, len(self.store.live_workers()))
        with self._lock:
            self._target = math.ceil(self.partitions / live)
            held = dict(self._leases)
        for partition, lease in held.items():
            renewed = self.store.renew_lease(lease, self.ttl_s)
            with self._lock:
                if renewed is None:
                    self._leases.pop(partition, None)
                    log.warning("lost partition %d", partition)
                else:
                    self._leases[partition] = renewed
        free = sorted((p for p in range(self.partitions) if p not in held), key=lambda p: preference(self.owner, p))
        for partition in free:
            if len(self.held()) >= self._target:
                break
            lease = self.store.acquire_lease(partition, self.owner, self.ttl_s)
            if lease is not None:
                with self._lock:
                    self._leases[partition] = lease
                log.info("took partition %d (epoch %d)", partition, lease.epoch)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.tick()
            except StoreError as exc:  # the store is away: keep what we hold until the leases expire
                log.warning("lease upkeep failed: %s", exc)
            except Exception:
                log.exception("lease upkeep failed")
