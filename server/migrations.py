"""The store's schema, as numbered migrations: SQLite and PostgreSQL side by side, so they stay in step.

Migration N is applied once, in one transaction with its row in `schema_migrations`. Migration 1 is
the schema from before versioning (its SQLite form adopts such a database: every table IF NOT EXISTS).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: str
    postgres: str

    def statements(self, dialect: str) -> list[str]:
        """The migration's statements, one by one (no semicolon appears inside one)."""
        script = self.sqlite if dialect == "sqlite" else self.postgres
        return [s.strip() for s in script.split(";") if s.strip()]


BOOKKEEPING = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_migrations "
              "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)",
    "postgres": "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
}

MIGRATIONS = [
    Migration(1, "devices, versions, cohort state, events, uploads", sqlite="""
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
        )
    """, postgres="""
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            cohort TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            may_upload BOOLEAN NOT NULL DEFAULT TRUE
        );
        CREATE TABLE versions (
            cohort TEXT NOT NULL,
            version BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            newest_upload_at DOUBLE PRECISION NOT NULL,
            params BYTEA NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (cohort, version)
        );
        CREATE TABLE cohort_state (
            cohort TEXT PRIMARY KEY,
            state BYTEA,
            learnt BIGINT NOT NULL DEFAULT 0,
            accepted BIGINT NOT NULL DEFAULT 0,
            frozen BOOLEAN NOT NULL DEFAULT FALSE
        );
        CREATE TABLE events (
            event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            cohort TEXT NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE TABLE uploads (
            upload_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            cohort TEXT NOT NULL,
            device_id TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            remaining BIGINT NOT NULL,
            body BYTEA NOT NULL
        )
    """),
    Migration(2, "upload partitions, partition leases, worker heartbeats, blobs", sqlite="""
        ALTER TABLE uploads ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX uploads_by_partition ON uploads (partition, upload_id);
        CREATE TABLE leases (
            partition INTEGER PRIMARY KEY,
            owner TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE TABLE workers (owner TEXT PRIMARY KEY, expires_at REAL NOT NULL);
        CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL, updated_at REAL NOT NULL)
    """, postgres="""
        ALTER TABLE uploads ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX uploads_by_partition ON uploads (partition, upload_id);
        CREATE TABLE leases (
            partition INTEGER PRIMARY KEY,
            owner TEXT NOT NULL,
            epoch BIGINT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE workers (owner TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL);
        CREATE TABLE blobs (key TEXT PRIMARY KEY, data BYTEA NOT NULL, updated_at DOUBLE PRECISION NOT NULL)
    """),
    Migration(3, "when each device was last seen, so unseen devices expire", sqlite="""
        ALTER TABLE devices ADD COLUMN last_seen_at REAL NOT NULL DEFAULT 0;
        UPDATE devices SET last_seen_at = created_at;
        CREATE INDEX devices_by_last_seen ON devices (last_seen_at)
    """, postgres="""
        ALTER TABLE devices ADD COLUMN last_seen_at DOUBLE PRECISION NOT NULL DEFAULT 0;
        UPDATE devices SET last_seen_at = created_at;
        CREATE INDEX devices_by_last_seen ON devices (last_seen_at)
    """),
]
LATEST = MIGRATIONS[-1].version


def sqlite_adopt_legacy(execute) -> None:
    """Before migration 1 on SQLite: a database from before device permissions lacks may_upload."""
    columns = {row[1] for row in execute("PRAGMA table_info(devices)").fetchall()}
    if columns and "may_upload" not in columns:
        execute("ALTER TABLE devices ADD COLUMN may_upload INTEGER NOT NULL DEFAULT 1")


def behind_message(version: int, url: str) -> str:
    return (f"the store's schema is at version {version}, this driftsync needs {LATEST}: "
            f"run `driftsync db upgrade --store {url}`")
