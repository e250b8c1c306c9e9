"""Where the server keeps devices and parameter versions, behind a small interface.

SQLite in WAL mode is the embedded default; another backend only has to
implement `Store`.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
import uuid
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
    def put_version(self, record: VersionRecord) -> None: ...
    def latest_version(self, cohort: str) -> VersionRecord | None: ...
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
    created_at REAL NOT NULL
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
"""


class SqliteStore:
    """One connection guarded by a lock: writes are small and rare next to a training step."""

    def __init__(self, path: Path | str, keep_versions: int = 200) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._keep = keep_versions

    def add_device(self, name: str, cohort: str | None) -> tuple[DeviceRecord, str]:
        """Register a device; without a named cohort it adapts on its own state."""
        token = secrets.token_urlsafe(32)
        device_id = uuid.uuid4().hex
        record = DeviceRecord(device_id, name, cohort or f"device-{device_id[:12]}", time.time())
        with self._lock:
            self._conn.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?)",
                (record.device_id, name, record.cohort, hash_token(token), record.created_at),
            )
        return record, token

    def device_for_token(self, token: str) -> DeviceRecord | None:
        wanted = hash_token(token)
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, name, cohort, created_at, token_hash FROM devices WHERE token_hash = ?",
                (wanted,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[4], wanted):
            return None
        return DeviceRecord(*row[:4])

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT device_id, name, cohort, created_at FROM devices ORDER BY created_at"
            ).fetchall()
        return [DeviceRecord(*r) for r in rows]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, name, cohort, created_at FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return DeviceRecord(*row) if row else None

    def move_device(self, device_id: str, cohort: str) -> DeviceRecord | None:
        """Put a device in another cohort; None when there is no such device."""
        with self._lock:
            self._conn.execute("UPDATE devices SET cohort = ? WHERE device_id = ?", (cohort, device_id))
        return self.device(device_id)

    def put_version(self, record: VersionRecord) -> None:
        blob = pack({k: v.model_dump() for k, v in record.params.items()})
        with self._lock:
            self._conn.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                (record.cohort, record.version, record.created_at, record.newest_upload_at, blob, record.sha256),
            )
            self._conn.execute(
                "DELETE FROM versions WHERE cohort = ? AND version <= ?",
                (record.cohort, record.version - self._keep),
            )

    def version_number(self, cohort: str) -> int:
        """The cohort's latest version, 0 when it has none."""
        with self._lock:
            row = self._conn.execute("SELECT MAX(version) FROM versions WHERE cohort = ?", (cohort,)).fetchone()
        return row[0] or 0

    def latest_version(self, cohort: str) -> VersionRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT cohort, version, created_at, newest_upload_at, params, sha256 FROM versions "
                "WHERE cohort = ? ORDER BY version DESC LIMIT 1",
                (cohort,),
            ).fetchone()
        if row is None:
            return None
        params = {k: Tensor.model_validate(v) for k, v in unpack(row[4], max_bytes=1 << 30).items()}
        return VersionRecord(row[0], row[1], row[2], row[3], params, row[5])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
