"""`driftsync serve --role api`: a stateless HTTP replica, and the backends every role opens.

An API replica imports no torch. It reads the model a worker exported from the store,
stores each upload before its 2xx, hands it to the workers through the broker, and hears
of new versions on the broker's channel; any replica can answer any device.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from fastapi import FastAPI

from server.app import ServerParts, WorkerSummary, create_app
from server.artifact import (
    MODEL_BLOB,
    PublishedModel,
    decode_model,
    encode_model,
    sha256_hex,
)
from server.fleet import FleetView
from server.metrics import Registry
from server.options import ServeOptions
from server.signing import kept_signer
from server.store import Store, StoreError, open_store
from server.versions import VersionBoard

log = logging.getLogger("driftsync.server")
MODEL_DIGEST_BLOB = MODEL_BLOB + ".sha256"
WORKER_STATS_BLOB = "worker-stats/"  # + worker name: each worker's figures for the fleet report
MODEL_POLL_S = 5.0


def store_url(opts: ServeOptions) -> str:
    return opts.store or str(opts.state_dir / "driftsync.sqlite")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_backends(opts: ServeOptions):
    """The store (SQLite migrates itself; PostgreSQL wants `driftsync db upgrade` first) and the
    broker (None without --broker: the single-process default)."""
    url = store_url(opts)
    if not is_postgres(url):
        opts.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(url, migrate=not is_postgres(url))
    broker = None
    if opts.broker:
        from server.broker_redis import RedisBroker

        broker = RedisBroker(opts.broker, opts.partitions, max_jobs_per_partition=opts.queue_max_jobs)
    return store, broker


def publish_model(store: Store, model: PublishedModel) -> None:
    """Make the exported student available to API replicas (written only when it changed)."""
    data = encode_model(model)
    digest = sha256_hex(data).encode()
    if store.get_blob(MODEL_DIGEST_BLOB) != digest:
        store.put_blob(MODEL_BLOB, data)
        store.put_blob(MODEL_DIGEST_BLOB, digest)


class ModelFollower:
    """The model as the store has it: loaded once a worker has published it, reloaded if it changes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._model: PublishedModel | None = None
        self._digest: bytes | None = None
        self._stop = threading.Event()

    def __call__(self) -> PublishedModel | None:
        return self._model

    def refresh(self) -> None:
        digest = self._store.get_blob(MODEL_DIGEST_BLOB)
        if digest is None or digest == self._digest:
            return
        data = self._store.get_blob(MODEL_BLOB)
        if data is not None and sha256_hex(data).encode() == digest:
            self._model, self._digest = decode_model(data), digest
            log.info("serving model %s (%s)", self._model.name, digest.decode()[:12])

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(MODEL_POLL_S if self._model else 0.5):
                try:
                    self.refresh()
                except StoreError as exc:
                    log.warning("cannot read the model from the store: %s", exc)

        try:
            self.refresh()
        except StoreError as exc:
            log.warning("cannot read the model from the store yet: %s", exc)
        threading.Thread(target=run, name="model-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def summary_of(worker) -> WorkerSummary:
    steps_per_s, samples_per_s = worker.stats.rates()
    return WorkerSummary(worker.pending_samples(), worker.stats.steps, worker.stats.samples, steps_per_s, samples_per_s)


def live_worker_summary(store: Store, stale_s: float = 30.0) -> WorkerSummary:
    """Summed over the workers whose heartbeat is live, from the figures each one stores."""
    total = WorkerSummary()
    for owner in store.live_workers():
        data = store.get_blob(WORKER_STATS_BLOB + owner)
        if data is None:
            continue
        stats = json.loads(data)
        if time.time() - stats["at"] > stale_s:
            continue
        total.pending_samples += stats["pending_samples"]
        total.steps_total += stats["steps_total"]
        total.samples_total += stats["samples_total"]
        total.steps_per_s += stats["steps_per_s"]
        total.samples_per_s += stats["samples_per_s"]
    return total


def api_parts(opts: ServeOptions, *, store: Store | None = None, broker=None,
              model: PublishedModel | None = None) -> ServerParts:
    """The parts of a replica that hands uploads to workers through the broker."""
    if store is None:
        store, broker = open_backends(opts)
    if broker is None:
        raise ValueError("--role api needs --broker redis://HOST:PORT (and a shared --store postgresql://...)")
    board, stop = VersionBoard(), threading.Event()
    follower = None if model is not None else ModelFollower(store)

    def wake_all() -> None:
        board.wake_all()
        broker.wake_all()

    parts = ServerParts(
        opts.settings(), store, broker, board, Registry(), FleetView(),
        model=(lambda: model) if follower is None else follower,
        worker_summary=lambda: live_worker_summary(store), partitions=opts.partitions, by_reference=True,
        wake_all=wake_all,
    )
    parts.on_start.append(lambda: broker.listen(board, stop))
    if follower is not None:
        parts.on_start.append(follower.start)
        parts.on_stop.append(follower.stop)
    parts.on_stop += [stop.set, broker.close, store.close]
    return parts


def build_api_app(opts: ServeOptions) -> FastAPI:
    parts = api_parts(opts)
    parts.signer = kept_signer(parts.store, opts.state_dir, shared=True, rotate=opts.rotate_signing_key)
    return create_app(parts)
