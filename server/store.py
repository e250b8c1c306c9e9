"""Where the server keeps what must survive it, behind a small interface.

Devices, parameter versions, each cohort's adaptation state, and every accepted
upload until a published version has learnt from it: an upload answered 2xx is
written here first, so a kill -9 right after the answer loses nothing (it is
processed at least once). A step's version, the cohort state it produced and the
uploads it consumed are committed in one transaction, which checks that the version
is the cohort's next one and, for a scaled-out worker, that it still holds the lease
on the uploads' partition (a fencing token: a worker that lost it writes nothing).

SQLite in WAL mode is the embedded default (`SqliteStore`); PostgreSQL
(`server.store_postgres.PostgresStore`, `open_store("postgresql://...")`) is shared by
API replicas and workers. Both run the same SQL (`SqlStore`) and the same numbered
migrations (`server.migrations`).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.migrations import (
    BOOKKEEPING,
    LATEST,
    MIGRATIONS,
    behind_message,
    sqlite_adopt_legacy,
)
from shared.codec import pack, unpack
from shared.protocol import PRIVATE_COHORT_PREFIX
from shared.tensors import Tensor

log = logging.getLogger("driftsync.store")


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    name: str
    cohort: str
    created_at: float
    may_upload: bool = True  # an operator can make a device read-only: it follows its cohort, never steers it
    last_seen_at: float = 0.0  # written at most every SEEN_WRITE_EVERY_S (server/app.py), read by expiry


@dataclass(frozen=True)
class StoredUpload:
    upload_id: int
    cohort: str
    device_id: str
    received_at: float
    remaining: int  # samples no published version has learnt from yet
    body: bytes  # the UploadBatch exactly as the device sent it
    partition: int = 0  # the worker partition it is queued on


@dataclass(frozen=True)
class EventRecord:
    at: float
    cohort: str
    kind: str  # collapse_reset, withheld, rollback, frozen, unfrozen, track (learn=auto switched)
    detail: str


@dataclass(frozen=True)
class VersionRecord:
    cohort: str
    version: int
    created_at: float
    newest_upload_at: float
    params: dict[str, Tensor]
    sha256: str


@dataclass(frozen=True)
class Lease:
    partition: int
    owner: str
    epoch: int  # fencing token: +1 every time the partition changes owner
    expires_at: float  # unix seconds, by the database's clock


class StoreError(Exception):
    """The store refused or failed an operation."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now (the caller answers 503 / retries)."""


class VersionConflict(StoreError):
    """A commit's version is not the cohort's latest + 1."""


class LeaseLost(StoreError):
    """The committing worker no longer holds the partition lease it named."""


class Store(Protocol):
    applied_migrations: list[int]  # the migrations this process applied when it opened the store
    def add_device(self, name: str, cohort: str | None) -> tuple[DeviceRecord, str]: ...
    def device_for_token(self, token: str) -> DeviceRecord | None: ...
    def devices(self) -> list[DeviceRecord]: ...
    def device(self, device_id: str) -> DeviceRecord | None: ...
    def move_device(self, device_id: str, cohort: str) -> DeviceRecord | None: ...
    def set_may_upload(self, device_id: str, may_upload: bool) -> DeviceRecord | None: ...
    def touch_device(self, device_id: str, at: float) -> None: ...
    def expire_devices(self, unseen_since: float) -> list[str]: ...
    def remove_orphaned_cohorts(self, idle_since: float) -> list[str]: ...
    def commit(self, cohort: str, record: VersionRecord | None = None, state: bytes | None = None,
               consumed: dict[int, int] | None = None, learnt: int = 0, *, lease: Lease | None = None) -> int: ...
    def latest_version(self, cohort: str) -> VersionRecord | None: ...
    def version(self, cohort: str, version: int) -> VersionRecord | None: ...
    def load_state(self, cohort: str) -> bytes | None: ...
    def learnt_samples(self, cohort: str) -> int: ...
    def accepted_samples(self, cohort: str) -> int: ...
    def add_upload(self, cohort: str, device_id: str, body: bytes, samples: int, partition: int = 0) -> int: ...
    def pending_uploads(self, partition: int | None = None, *, exclude: Collection[int] = (),
                        max_samples: int | None = None) -> list[StoredUpload]: ...
    def unlearnt_upload(self, upload_id: int) -> tuple[int, bytes] | None: ...
    def discard_upload(self, upload_id: int) -> None: ...
    def add_event(self, cohort: str, kind: str, detail: str) -> None: ...
    def set_frozen(self, cohort: str, frozen: bool) -> None: ...
    def frozen_cohorts(self) -> list[str]: ...
    def events(self, limit: int = 100) -> list[EventRecord]: ...
    def version_number(self, cohort: str) -> int: ...
    def acquire_lease(self, partition: int, owner: str, ttl_s: float) -> Lease | None: ...
    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None: ...
    def release_lease(self, lease: Lease) -> None: ...
    def leases(self) -> list[Lease]: ...
    def worker_heartbeat(self, owner: str, ttl_s: float) -> None: ...
    def live_workers(self) -> list[str]: ...
    def put_blob(self, key: str, data: bytes, *, replace: bool = True) -> None: ...
    def get_blob(self, key: str) -> bytes | None: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...


_DEVICE_COLUMNS = "device_id, name, cohort, created_at, may_upload, last_seen_at"


def _device_record(row: tuple) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5])


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


Execute = Callable[..., Any]  # (sql, params=()) -> a DB-API cursor, inside one transaction
WORKER_ROWS_KEPT_S = 3600.0  # a heartbeat row expired this long ago is deleted (worker names may be one-off)


class SqlStore(ABC):
    """The SQL every backend runs ('?' placeholders); a subclass supplies connections, transactions,
    the database clock and row locks. SQLite serializes writers on the whole file, so its row-lock
    suffixes are empty; PostgreSQL locks the rows a read-modify-write depends on."""

    DIALECT = ""
    NOW = ""  # SQL: the database's clock, unix seconds
    FOR_UPDATE = ""  # suffix of a SELECT whose rows the transaction will change
    FOR_SHARE = ""  # suffix of a SELECT whose rows must not change before the transaction commits
    INTEGRITY_ERRORS: tuple[type[Exception], ...] = ()
    TABLE_EXISTS = ""  # SQL with one parameter: a row when that table exists

    def __init__(self, url: str, keep_versions: int) -> None:
        self.url = url
        self._keep = keep_versions

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Execute]:
        """Everything executed in the block is committed together, or nothing is."""

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """One statement, committed on its own; its rows, if any."""
        with self._transaction() as execute:
            cursor = execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    def _lock_schema(self, execute: Execute) -> None:
        """First in each migration's transaction: other processes migrating wait until it commits."""

    def _before_migration(self, execute: Execute, version: int) -> None:
        """Inside a migration's transaction, before its statements (SQLite adopts old files here)."""

    # --- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The newest migration applied; 0 on an empty (or pre-versioning) database."""
        with self._transaction() as execute:
            if execute(self.TABLE_EXISTS, ("schema_migrations",)).fetchone() is None:
                return 0
            return execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0

    def migrate(self) -> list[int]:
        """Apply every pending migration, each in its own transaction; the versions applied now."""
        applied = []
        for migration in MIGRATIONS:
            with self._transaction() as execute:
                self._lock_schema(execute)
                execute(BOOKKEEPING[self.DIALECT])
                if execute("SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)).fetchone():
                    continue
                self._before_migration(execute, migration.version)
                for statement in migration.statements(self.DIALECT):
                    execute(statement)
                execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.name, time.time()))
            log.info("store schema: applied migration %d (%s)", migration.version, migration.name)
            applied.append(migration.version)
        return applied

    def _open_schema(self, migrate: bool) -> None:
        """Bring the schema to this code's version, or refuse to run on one that is behind."""
        self.applied_migrations = self.migrate() if migrate else []
        version = self.schema_version()
        if version < LATEST:
            raise StoreError(behind_message(version, self.url))
        if version > LATEST:
            log.warning("store schema is at version %d, newer than this driftsync's %d", version, LATEST)

    # --- devices ------------------------------------------------------------------------------------

    def add_device(self, name: str, cohort: str | None) -> tuple[DeviceRecord, str]:
        """Register a device; without a named cohort it adapts on its own state. Only the token's hash is kept."""
        token = secrets.token_urlsafe(32)
        device_id = uuid.uuid4().hex
        now = time.time()
        record = DeviceRecord(device_id, name, cohort or f"{PRIVATE_COHORT_PREFIX}{device_id[:12]}", now, last_seen_at=now)
        self._query(
            "INSERT INTO devices (device_id, name, cohort, token_hash, created_at, may_upload, last_seen_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.device_id, name, record.cohort, hash_token(token), record.created_at, True, now),
        )
        return record, token

    def device_for_token(self, token: str) -> DeviceRecord | None:
        wanted = hash_token(token)
        row = self._one(
            f"SELECT {_DEVICE_COLUMNS}, token_hash FROM devices WHERE token_hash = ?", (wanted,),
        )
        if row is None or not hmac.compare_digest(row[6], wanted):
            return None
        return _device_record(row)

    def devices(self) -> list[DeviceRecord]:
        return [_device_record(r) for r in self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY created_at")]

    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._one(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
        return _device_record(row) if row else None

    def touch_device(self, device_id: str, at: float) -> None:
        """The device was seen at `at` (never moves its time back: replicas may race)."""
        self._query("UPDATE devices SET last_seen_at = ? WHERE device_id = ? AND last_seen_at < ?", (at, device_id, at))

    def expire_devices(self, unseen_since: float) -> list[str]:
        """Forget the devices not seen since `unseen_since` (their tokens stop working: a device that
        comes back enrols again); the ids it removed."""
        return sorted(r[0] for r in self._query("DELETE FROM devices WHERE last_seen_at < ? RETURNING device_id",
                                                (unseen_since,)))

    def remove_orphaned_cohorts(self, idle_since: float) -> list[str]:
        """Delete the own cohorts (`device-<id>`) whose device is gone, that no device was moved
        into, and that have had no upload and no new version since `idle_since`: their state,
        versions and stored uploads; the names removed. No device can reach such a cohort again (a device that comes back after
        expiry enrols with a new id), so each expiry would otherwise leave up to `keep_versions`
        versions behind. Shared cohorts stay for the devices that join them later, and the event
        log keeps its history. A step committed meanwhile is removed by a later call."""
        orphaned = ("cohort LIKE ? AND cohort NOT IN (SELECT cohort FROM devices) "
                    "AND cohort NOT IN (SELECT ? || substr(device_id, 1, 12) FROM devices)")  # add_device's name
        with self._transaction() as execute:
            candidates = {row[0] for table in ("cohort_state", "versions", "uploads") for row in execute(
                f"SELECT DISTINCT cohort FROM {table} WHERE {orphaned}", (f"{PRIVATE_COHORT_PREFIX}%", PRIVATE_COHORT_PREFIX))}
            gone = [cohort for cohort in sorted(candidates) if not any(  # by the cohort's key: no scan of the blobs
                execute(f"SELECT 1 FROM {table} WHERE cohort = ? AND {at} >= ? LIMIT 1", (cohort, idle_since)).fetchone()
                for table, at in (("versions", "created_at"), ("uploads", "received_at")))]
            for cohort in gone:  # the state first: its row is the lock a concurrent commit takes
                for table in ("cohort_state", "versions", "uploads"):
                    execute(f"DELETE FROM {table} WHERE cohort = ?", (cohort,))
        return gone

    def set_may_upload(self, device_id: str, may_upload: bool) -> DeviceRecord | None:
        self._query("UPDATE devices SET may_upload = ? WHERE device_id = ?", (may_upload, device_id))
        return self.device(device_id)

    def move_device(self, device_id: str, cohort: str) -> DeviceRecord | None:
        """Put a device in another cohort; None when there is no such device."""
        self._query("UPDATE devices SET cohort = ? WHERE device_id = ?", (cohort, device_id))
        return self.device(device_id)

    # --- what a step did ----------------------------------------------------------------------------

    def commit(self, cohort: str, record: VersionRecord | None = None, state: bytes | None = None,
               consumed: dict[int, int] | None = None, learnt: int = 0, *, lease: Lease | None = None) -> int:
        """One transaction for what a step did: the version it published (if any; it must be the
        cohort's latest + 1, else VersionConflict), the cohort state it left, the uploads it used up
        (upload id -> samples; a row is deleted once nothing of it is left) and `learnt` samples that
        came with no stored upload. With a lease, the step is written only while that lease holds
        (else LeaseLost). Returns the samples newly learnt: an upload already learnt from (a
        duplicate delivery) counts for nothing."""
        with self._transaction() as execute:
            if lease is not None:
                held = execute(
                    f"SELECT 1 FROM leases WHERE partition = ? AND owner = ? AND epoch = ? AND expires_at > {self.NOW}"
                    + self.FOR_SHARE, (lease.partition, lease.owner, lease.epoch),
                ).fetchone()
                if held is None:
                    raise LeaseLost(f"partition {lease.partition}: {lease.owner} no longer holds epoch {lease.epoch}")
            # the cohort's row, locked: commits of one cohort take turns, so the version check below holds
            execute("INSERT INTO cohort_state (cohort) VALUES (?) ON CONFLICT (cohort) DO NOTHING", (cohort,))
            execute("SELECT cohort FROM cohort_state WHERE cohort = ?" + self.FOR_UPDATE, (cohort,))
            if record is not None:
                self._insert_version(execute, cohort, record)
            newly = max(0, learnt)
            for upload_id in sorted(consumed or {}):  # one lock order for every writer
                row = execute("SELECT remaining FROM uploads WHERE upload_id = ?" + self.FOR_UPDATE,
                              (upload_id,)).fetchone()
                if row is None:
                    continue  # learnt from already
                used = max(0, min(consumed[upload_id], row[0]))
                newly += used
                if used >= row[0]:
                    execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
                else:
                    execute("UPDATE uploads SET remaining = remaining - ? WHERE upload_id = ?", (used, upload_id))
            execute("UPDATE cohort_state SET state = COALESCE(?, state), learnt = learnt + ? WHERE cohort = ?",
                    (state, newly, cohort))
        return newly

    def _insert_version(self, execute: Execute, cohort: str, record: VersionRecord) -> None:
        latest = execute("SELECT MAX(version) FROM versions WHERE cohort = ?", (cohort,)).fetchone()[0] or 0
        if record.version != latest + 1:
            raise VersionConflict(f"cohort {cohort}: version {record.version} is not the next after {latest}")
        blob = pack({k: v.model_dump() for k, v in record.params.items()})
        try:
            execute(
                "INSERT INTO versions (cohort, version, created_at, newest_upload_at, params, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (cohort, record.version, record.created_at, record.newest_upload_at, blob, record.sha256),
            )
        except self.INTEGRITY_ERRORS as exc:  # the key backs the check above
            raise VersionConflict(f"cohort {cohort}: version {record.version} exists") from exc
        execute("DELETE FROM versions WHERE cohort = ? AND version <= ?", (cohort, record.version - self._keep))

    def learnt_samples(self, cohort: str) -> int:
        """New uploads the cohort has learnt from, over all its versions."""
        row = self._one("SELECT learnt FROM cohort_state WHERE cohort = ?", (cohort,))
        return row[0] if row else 0

    def load_state(self, cohort: str) -> bytes | None:
        row = self._one("SELECT state FROM cohort_state WHERE cohort = ?", (cohort,))
        return bytes(row[0]) if row and row[0] is not None else None

    # --- uploads ------------------------------------------------------------------------------------

    def add_upload(self, cohort: str, device_id: str, body: bytes, samples: int, partition: int = 0) -> int:
        """Durable before the 2xx, and counted as accepted in the same transaction: returns its id."""
        with self._transaction() as execute:
            upload_id = execute(
                "INSERT INTO uploads (cohort, device_id, received_at, remaining, body, partition) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING upload_id",
                (cohort, device_id, time.time(), samples, body, partition),
            ).fetchone()[0]
            execute(
                "INSERT INTO cohort_state (cohort, accepted) VALUES (?, ?) "
                "ON CONFLICT (cohort) DO UPDATE SET accepted = cohort_state.accepted + excluded.accepted",
                (cohort, samples),
            )
        return int(upload_id)

    def accepted_samples(self, cohort: str) -> int:
        """Samples the server acknowledged (2xx) for the cohort, minus any it took back (a full queue)."""
        row = self._one("SELECT accepted FROM cohort_state WHERE cohort = ?", (cohort,))
        return row[0] if row else 0

    def discard_upload(self, upload_id: int) -> None:
        """An upload refused after all (queue full): it was never acknowledged."""
        with self._transaction() as execute:
            row = execute("SELECT cohort FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
            if row is None:
                return
            # the same lock order as commit: the cohort's row, then the upload's
            execute("SELECT cohort FROM cohort_state WHERE cohort = ?" + self.FOR_UPDATE, (row[0],))
            remaining = execute("DELETE FROM uploads WHERE upload_id = ? RETURNING remaining", (upload_id,)).fetchone()
            if remaining is not None:
                execute("UPDATE cohort_state SET accepted = accepted - ? WHERE cohort = ?", (remaining[0], row[0]))

    def pending_uploads(self, partition: int | None = None, *, exclude: Collection[int] = (),
                        max_samples: int | None = None) -> list[StoredUpload]:
        """Accepted uploads not yet fully learnt from (of one partition, or all), oldest first,
        skipping `exclude` (what a worker holds already) and stopping once `max_samples` samples
        are gathered: bodies are read only for the uploads returned, so a backlog costs little."""
        where, params = ("WHERE partition = ? ", (partition,)) if partition is not None else ("", ())
        picked, samples = [], 0
        for upload_id, remaining in self._query(f"SELECT upload_id, remaining FROM uploads {where}ORDER BY upload_id",
                                                params):
            if max_samples is not None and samples >= max_samples:
                break
            if upload_id not in exclude:
                picked.append(upload_id)
                samples += remaining
        columns = "upload_id, cohort, device_id, received_at, remaining, body, partition"
        rows = []
        for start in range(0, len(picked), 500):
            chunk = picked[start:start + 500]
            rows += self._query(f"SELECT {columns} FROM uploads WHERE upload_id IN ({', '.join('?' * len(chunk))}) "
                                "ORDER BY upload_id", tuple(chunk))
        return [StoredUpload(*row[:5], bytes(row[5]), row[6]) for row in rows]

    def unlearnt_upload(self, upload_id: int) -> tuple[int, bytes] | None:
        """The upload's samples not learnt from yet and its body, as the device sent it; None once
        fully learnt or discarded (a broker message names the upload, the store holds it)."""
        row = self._one("SELECT remaining, body FROM uploads WHERE upload_id = ?", (upload_id,))
        return (row[0], bytes(row[1])) if row else None

    # --- cohorts and events -------------------------------------------------------------------------

    def set_frozen(self, cohort: str, frozen: bool) -> None:
        self._query("INSERT INTO cohort_state (cohort, frozen) VALUES (?, ?) "
                    "ON CONFLICT (cohort) DO UPDATE SET frozen = excluded.frozen", (cohort, frozen))

    def frozen_cohorts(self) -> list[str]:
        return [row[0] for row in self._query("SELECT cohort FROM cohort_state WHERE frozen = ? ORDER BY cohort",
                                              (True,))]

    def add_event(self, cohort: str, kind: str, detail: str) -> None:
        self._query("INSERT INTO events (at, cohort, kind, detail) VALUES (?, ?, ?, ?)", (time.time(), cohort, kind, detail))

    def events(self, limit: int = 100) -> list[EventRecord]:
        """The most recent events, newest first."""
        rows = self._query("SELECT at, cohort, kind, detail FROM events ORDER BY event_id DESC LIMIT ?", (limit,))
        return [EventRecord(*row) for row in rows]

    def version_number(self, cohort: str) -> int:
        """The cohort's latest version, 0 when it has none."""
        row = self._one("SELECT MAX(version) FROM versions WHERE cohort = ?", (cohort,))
        return row[0] or 0

    def latest_version(self, cohort: str) -> VersionRecord | None:
        return self.version(cohort, self.version_number(cohort))

    def version(self, cohort: str, version: int) -> VersionRecord | None:
        row = self._one(
            "SELECT cohort, version, created_at, newest_upload_at, params, sha256 FROM versions "
            "WHERE cohort = ? AND version = ?",
            (cohort, version),
        )
        if row is None:
            return None
        params = {k: Tensor.model_validate(v) for k, v in unpack(bytes(row[4]), max_bytes=1 << 30).items()}
        return VersionRecord(row[0], row[1], row[2], row[3], params, row[5])

    # --- leases, heartbeats, blobs (the database's clock decides expiry) -----------------------------

    def acquire_lease(self, partition: int, owner: str, ttl_s: float) -> Lease | None:
        """Take the partition if free or expired (a new epoch), or renew it if `owner` holds it
        (the same epoch); None while another owner holds it."""
        with self._transaction() as execute:
            # a row to lock even for a partition never leased: expired, owned by nobody, epoch 0
            execute("INSERT INTO leases (partition, owner, epoch, expires_at) VALUES (?, '', 0, 0) "
                    "ON CONFLICT (partition) DO NOTHING", (partition,))
            held_by, epoch, live = execute(
                f"SELECT owner, epoch, expires_at > {self.NOW} FROM leases WHERE partition = ?" + self.FOR_UPDATE,
                (partition,),
            ).fetchone()
            if live and held_by != owner:
                return None
            if not live:
                epoch += 1
            expires_at = execute(
                f"UPDATE leases SET owner = ?, epoch = ?, expires_at = {self.NOW} + ? WHERE partition = ? "
                "RETURNING expires_at", (owner, epoch, ttl_s, partition),
            ).fetchone()[0]
        return Lease(partition, owner, int(epoch), float(expires_at))

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        """The lease, extended by `ttl_s` from now; None if it was lost (expired or taken over)."""
        row = self._one(
            f"UPDATE leases SET expires_at = {self.NOW} + ? WHERE partition = ? AND owner = ? AND epoch = ? "
            f"AND expires_at > {self.NOW} RETURNING expires_at", (ttl_s, lease.partition, lease.owner, lease.epoch),
        )
        return Lease(lease.partition, lease.owner, lease.epoch, float(row[0])) if row else None

    def release_lease(self, lease: Lease) -> None:
        """Expire the lease now, if it is still ours; the row stays, so epochs keep rising."""
        self._query(f"UPDATE leases SET expires_at = {self.NOW} WHERE partition = ? AND owner = ? AND epoch = ? "
                    f"AND expires_at > {self.NOW}", (lease.partition, lease.owner, lease.epoch))

    def leases(self) -> list[Lease]:
        rows = self._query("SELECT partition, owner, epoch, expires_at FROM leases ORDER BY partition")
        return [Lease(int(p), o, int(e), float(x)) for p, o, e, x in rows]

    def worker_heartbeat(self, owner: str, ttl_s: float) -> None:
        with self._transaction() as execute:
            execute(f"INSERT INTO workers (owner, expires_at) VALUES (?, {self.NOW} + ?) "
                    "ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at", (owner, ttl_s))
            execute(f"DELETE FROM workers WHERE expires_at < {self.NOW} - ?", (WORKER_ROWS_KEPT_S,))

    def live_workers(self) -> list[str]:
        """Owners whose heartbeat has not expired, sorted."""
        return [row[0] for row in self._query(f"SELECT owner FROM workers WHERE expires_at > {self.NOW} ORDER BY owner")]

    def put_blob(self, key: str, data: bytes, *, replace: bool = True) -> None:
        """replace=False keeps a value already there: of writers racing to create it, the first wins."""
        conflict = "DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at" if replace else "DO NOTHING"
        self._query(f"INSERT INTO blobs (key, data, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) {conflict}",
                    (key, data, time.time()))

    def get_blob(self, key: str) -> bytes | None:
        row = self._one("SELECT data FROM blobs WHERE key = ?", (key,))
        return bytes(row[0]) if row else None

    @abstractmethod
    def close(self) -> None: ...


SQLITE_BUSY_TIMEOUT_MS = 5000


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another connection holds the file: SQLite answers this
    pragma 'database is locked' at once, without its busy handler (two servers starting together)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SqliteStore(SqlStore):
    """One connection guarded by a lock: writes are small and rare next to a training step."""

    DIALECT = "sqlite"
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    INTEGRITY_ERRORS = (sqlite3.IntegrityError,)
    TABLE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    def __init__(self, path: Path | str, keep_versions: int = 200, *, migrate: bool = True) -> None:
        super().__init__(f"sqlite:///{Path(path).resolve()}", keep_versions)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # another process upgrading the file: wait, then fail
        _enable_wal(self._conn)
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        try:
            self._open_schema(migrate)
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[Execute]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn.execute
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:  # one statement in autocommit mode is its own transaction
            cursor = self._conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def _before_migration(self, execute: Execute, version: int) -> None:
        if version == 1:
            sqlite_adopt_legacy(execute)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_store(url: str, *, migrate: bool, keep_versions: int = 200) -> Store:
    """'postgresql://...' / 'postgres://...' -> PostgresStore; 'sqlite:///abs/path' or a file path ->
    SqliteStore. With migrate, pending migrations are applied; without, a schema that is behind is
    refused with a StoreError saying to run `driftsync db upgrade`."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from server.store_postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(f"a PostgreSQL store needs psycopg: pip install 'driftsync[scale]' ({exc})") from exc
        return PostgresStore(url, migrate=migrate, keep_versions=keep_versions)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    if not path or "://" in path:
        raise StoreError(f"unsupported store URL {url!r}: expected postgresql://..., sqlite:///PATH or a file path")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return SqliteStore(path, keep_versions, migrate=migrate)
    except (OSError, sqlite3.OperationalError) as exc:
        raise StoreError(f"cannot open the SQLite store {path}: {exc}") from exc


def upgrade(url: str) -> tuple[int, list[int]]:
    """`driftsync db upgrade`: apply pending migrations; the schema's version and those applied now."""
    store = open_store(url, migrate=True)
    try:
        return store.schema_version(), store.applied_migrations
    finally:
        store.close()
