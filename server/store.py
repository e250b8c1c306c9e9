"""Where the server keeps what must survive it, behind a small interface.

Devices, parameter versions, each cohort's adaptation state, and every accepted
upload until a published version has learnt from it: an upload answered 2xx is
written here first, so a kill -9 right after the answer loses nothing (it is
processed at least once). A step's version, the cohort state it produced and the
uploads it consumed are committed in one transaction. SQLite in WAL mode is the
embedded default; another backend only has to implement `Store`.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.codec import pack, unpack
from shared.tensors import Tensor


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    name: str
    cohort: str
    created_at: float
    may_upload: bool = True  # an operator can make a device read-only: it follows its cohort, never steers it


@dataclass(frozen=True)
class StoredUpload:
    upload_id: int
    cohort: str
    device_id: str
    received_at: float
    remaining: int  # samples no published version has learnt from yet
    body: bytes  # the UploadBatch exactly as the device sent it


@dataclass(frozen=True)
class EventRecord:
    at: float
    cohort: str
    kind: str  # collapse_reset, withheld, rollback, frozen, unfrozen
    detail: str


@dataclass(frozen=True)
class VersionRecord:
    cohort: str
    version: int
    created_at: float
    newest_upload_at: float
    params: dict[str, Tensor]
    sha256: str


class Store(Protocol):
    def add_device(self, name: str, cohort: str | None) -> tuple[DeviceRecord, str]: ...
    def device_for_token(self, token: str) -> DeviceRecord | None: ...
    def devices(self) -> list[DeviceRecord]: ...
    def device(self, device_id: str) -> DeviceRecord | None: ...
    def move_device(self, device_id: str, cohort: str) -> DeviceRecord | None: ...
    def set_may_upload(self, device_id: str, may_upload: bool) -> DeviceRecord | None: ...
    def commit(self, cohort: str, record: VersionRecord | None = None, state: bytes | None = None,
               consumed: dict[int, int] | None = None, learnt: int = 0) -> None: ...
    def latest_version(self, cohort: str) -> VersionRecord | None: ...
    def version(self, cohort: str, version: int) -> VersionRecord | None: ...
    def load_state(self, cohort: str) -> bytes | None: ...
    def learnt_samples(self, cohort: str) -> int: ...
    def accepted_samples(self, cohort: str) -> int: ...
    def add_upload(self, cohort: str, device_id: str, body: bytes, samples: int) -> int: ...
    def pending_uploads(self) -> list[StoredUpload]: ...
    def discard_upload(self, upload_id: int) -> None: ...
    def add_event(self, cohort: str, kind: str, detail: str) -> None: ...
    def set_frozen(self, cohort: str, frozen: bool) -> None: ...
    def frozen_cohorts(self) -> list[str]: ...
    def events(self, limit: int = 100) -> list[EventRecord]: ...
    def version_number(self, cohort: str) -> int: ...
    def close(self) -> None: ...


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    cohort TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    may_upload INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS versions (
    cohort TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    newest_upload_at REAL NOT NULL,
    params BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (cohort, version)
);
CREATE TABLE IF NOT EXISTS cohort_state (
    cohort TEXT PRIMARY KEY,
    state BLOB,
    learnt INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    frozen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    cohort TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id INTEGER PRIMARY KEY AUTOINCREMENT,
    cohort TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    remaining INTEGER NOT NULL,
    body BLOB NOT NULL
);
"""


class SqliteStore:
    """One connection guarded by a lock: writes are small and rare next to a training step."""

    def __init__(self, path: Path | str, keep_versions: int = 200) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(devices)")}
        if "may_upload" not in columns:  # a state directory from before device permissions
            self._conn.execute("ALTER TABLE devices ADD COLUMN may_upload INTEGER NOT NULL DEFAULT 1")
        self._lock = threading.Lock()
        self._keep = keep_versions

    def add_device(self, name: str, cohort: str | None) -> tuple[DeviceRecord, str]:
        """Register a device; without a named cohort it adapts on its own state."""
        token = secrets.token_urlsafe(32)
        device_id = uuid.uuid4().hex
        record = DeviceRecord(device_id, name, cohort or f"device-{device_id[:12]}", time.time())
        with self._lock:
            self._conn.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?, 1)",
                (record.device_id, name, record.cohort, hash_token(token), record.created_at),
            )
        return record, token

    def device_for_token(self, token: str) -> DeviceRecord | None:
        wanted = hash_token(token)
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, name, cohort, created_at, may_upload, token_hash FROM devices WHERE token_hash = ?",
                (wanted,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[5], wanted):
            return None
        return DeviceRecord(*row[:4], bool(row[4]))

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT device_id, name, cohort, created_at, may_upload FROM devices ORDER BY created_at"
            ).fetchall()
        return [DeviceRecord(*r[:4], bool(r[4])) for r in rows]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, name, cohort, created_at, may_upload FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return DeviceRecord(*row[:4], bool(row[4])) if row else None

    def set_may_upload(self, device_id: str, may_upload: bool) -> DeviceRecord | None:
        with self._lock:
            self._conn.execute("UPDATE devices SET may_upload = ? WHERE device_id = ?", (int(may_upload), device_id))
        return self.device(device_id)

    def move_device(self, device_id: str, cohort: str) -> DeviceRecord | None:
        """Put a device in another cohort; None when there is no such device."""
        with self._lock:
            self._conn.execute("UPDATE devices SET cohort = ? WHERE device_id = ?", (cohort, device_id))
        return self.device(device_id)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Everything in the block is committed together, or nothing is."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def commit(self, cohort: str, record: VersionRecord | None = None, state: bytes | None = None,
               consumed: dict[int, int] | None = None, learnt: int = 0) -> None:
        """One transaction for what a step did: the version it published (if any), the cohort
        state it left, the uploads it used up (upload id -> samples; deleted once nothing of
        them is left) and how many new samples it learnt from."""
        with self._transaction():
            if record is not None:
                blob = pack({k: v.model_dump() for k, v in record.params.items()})
                self._conn.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    (cohort, record.version, record.created_at, record.newest_upload_at, blob, record.sha256),
                )
                self._conn.execute(
                    "DELETE FROM versions WHERE cohort = ? AND version <= ?", (cohort, record.version - self._keep)
                )
            self._conn.execute(
                "INSERT INTO cohort_state (cohort, state, learnt) VALUES (?, ?, ?) ON CONFLICT (cohort) DO UPDATE "
                "SET state = COALESCE(excluded.state, state), learnt = learnt + excluded.learnt",
                (cohort, state, learnt),
            )
            for upload_id, samples in (consumed or {}).items():
                self._conn.execute("UPDATE uploads SET remaining = remaining - ? WHERE upload_id = ?", (samples, upload_id))
            self._conn.execute("DELETE FROM uploads WHERE remaining <= 0")

    def learnt_samples(self, cohort: str) -> int:
        """New uploads the cohort has learnt from, over all its versions."""
        with self._lock:
            row = self._conn.execute("SELECT learnt FROM cohort_state WHERE cohort = ?", (cohort,)).fetchone()
        return row[0] if row else 0

    def load_state(self, cohort: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT state FROM cohort_state WHERE cohort = ?", (cohort,)).fetchone()
        return row[0] if row else None

    def add_upload(self, cohort: str, device_id: str, body: bytes, samples: int) -> int:
        """Durable before the 2xx, and counted as accepted in the same transaction: returns its id."""
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO uploads (cohort, device_id, received_at, remaining, body) VALUES (?, ?, ?, ?, ?)",
                (cohort, device_id, time.time(), samples, body),
            )
            self._conn.execute(
                "INSERT INTO cohort_state (cohort, accepted) VALUES (?, ?) "
                "ON CONFLICT (cohort) DO UPDATE SET accepted = accepted + excluded.accepted",
                (cohort, samples),
            )
        return int(cursor.lastrowid)

    def accepted_samples(self, cohort: str) -> int:
        """Samples the server acknowledged (2xx) for the cohort, minus any it took back (a full queue)."""
        with self._lock:
            row = self._conn.execute("SELECT accepted FROM cohort_state WHERE cohort = ?", (cohort,)).fetchone()
        return row[0] if row else 0

    def set_frozen(self, cohort: str, frozen: bool) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO cohort_state (cohort, frozen) VALUES (?, ?) ON CONFLICT (cohort) DO UPDATE SET frozen = ?",
                (cohort, int(frozen), int(frozen)),
            )

    def frozen_cohorts(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT cohort FROM cohort_state WHERE frozen = 1")]

    def add_event(self, cohort: str, kind: str, detail: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO events (at, cohort, kind, detail) VALUES (?, ?, ?, ?)",
                               (time.time(), cohort, kind, detail))

    def events(self, limit: int = 100) -> list[EventRecord]:
        """The most recent events, newest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, cohort, kind, detail FROM events ORDER BY event_id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [EventRecord(*row) for row in rows]

    def discard_upload(self, upload_id: int) -> None:
        """An upload refused after all (queue full): it was never acknowledged."""
        with self._transaction():
            self._conn.execute(
                "UPDATE cohort_state SET accepted = accepted - (SELECT remaining FROM uploads WHERE upload_id = ?) "
                "WHERE cohort = (SELECT cohort FROM uploads WHERE upload_id = ?)", (upload_id, upload_id),
            )
            self._conn.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))

    def pending_uploads(self) -> list[StoredUpload]:
        """Accepted uploads not yet fully learnt from, oldest first (to replay after a restart)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT upload_id, cohort, device_id, received_at, remaining, body FROM uploads ORDER BY upload_id"
            ).fetchall()
        return [StoredUpload(*row) for row in rows]

    def version_number(self, cohort: str) -> int:
        """The cohort's latest version, 0 when it has none."""
        with self._lock:
            row = self._conn.execute("SELECT MAX(version) FROM versions WHERE cohort = ?", (cohort,)).fetchone()
        return row[0] or 0

    def latest_version(self, cohort: str) -> VersionRecord | None:
        return self.version(cohort, self.version_number(cohort))

    def version(self, cohort: str, version: int) -> VersionRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT cohort, version, created_at, newest_upload_at, params, sha256 FROM versions "
                "WHERE cohort = ? AND version = ?",
                (cohort, version),
            ).fetchone()
        if row is None:
            return None
        params = {k: Tensor.model_validate(v) for k, v in unpack(row[4], max_bytes=1 << 30).items()}
        return VersionRecord(row[0], row[1], row[2], row[3], params, row[5])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
