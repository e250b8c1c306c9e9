"""The store on PostgreSQL, shared by API replicas and adaptation workers (`pip install 'driftsync[scale]'`).

The SQL is `SqlStore`'s; this module adds a small connection pool (psycopg 3), row locks for
read-modify-writes (a lease takeover, a commit's version check), the database's clock for leases
and heartbeats (so workers on machines with skewed clocks agree), and an advisory lock around
migrations (two processes upgrading at once take turns).

Durability: the server's default synchronous_commit=on is kept, so a committed upload row is
fsynced (in the WAL) before add_upload returns and the device gets its 2xx.

Every connection failure, and a pool with no connection free within a few seconds, raises
StoreUnavailable: a request answers 503 instead of hanging on a dead database. The pool checks a
connection before handing it out, so after PostgreSQL restarts the next call reconnects.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

from server.store import Execute, SqlStore, StoreUnavailable

CONNECT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 3.0  # longest wait for a free (or new) connection: then StoreUnavailable
# the pool's background reconnection backs off exponentially; giving up soon means the first request
# after PostgreSQL is back starts a fresh attempt at once instead of waiting out a long backoff
RECONNECT_TIMEOUT_S = 4.0
SCHEMA_LOCK = 0x6472696674  # pg_advisory_xact_lock key of migrations ("drift")
CONNECTION = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "application_name": "driftsync",
    # a peer that vanished without closing the socket is noticed in seconds, not at TCP's minutes
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class PostgresStore(SqlStore):
    DIALECT = "postgres"
    NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    FOR_UPDATE = " FOR UPDATE"
    FOR_SHARE = " FOR SHARE"
    INTEGRITY_ERRORS = (psycopg.errors.UniqueViolation,)
    TABLE_EXISTS = ("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                    "AND table_name = ?")

    def __init__(self, url: str, *, migrate: bool, keep_versions: int = 200, max_connections: int = 8) -> None:
        super().__init__(redact(url), keep_versions)
        try:  # fail at once, saying why (refused, no such database, bad password), rather than after a pool timeout
            psycopg.connect(url, **CONNECTION).close()
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, kwargs=CONNECTION,
                                    timeout=POOL_TIMEOUT_S, reconnect_timeout=RECONNECT_TIMEOUT_S,
                                    check=ConnectionPool.check_connection,
                                    name="driftsync-store", open=True)
        try:
            self._open_schema(migrate)
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[Execute]:
        try:
            with self._pool.connection() as conn:  # committed at the end of the block, rolled back on an error
                yield lambda sql, params=(): conn.execute(sql.replace("?", "%s"), params)
        except psycopg.OperationalError as exc:  # refused, dropped, shut down, pool timeout, deadlock victim
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"PostgreSQL at {self.url} is unavailable: {' '.join(str(exc).split())}")

    def _lock_schema(self, execute: Execute) -> None:
        execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def close(self) -> None:
        self._pool.close()
