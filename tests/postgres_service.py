"""A private, throwaway PostgreSQL cluster for tests: initdb into a temp dir, postgres on a free port.

`postgres_service` (session): the running cluster (driftsync.localservices.PostgresCluster, the
same code `driftsync fleet` runs), with `.url`, `.stop()`, `.start()`, `.restart()` for fault tests;
`postgres_url` (session): its URL; `postgres_db`: the URL of a fresh empty database, so tests never
see each other's rows. Durability is not what these tests check, so fsync is off.
"""
from __future__ import annotations

import itertools
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from driftsync.localservices import PostgresCluster, postgres_bindir
from driftsync.processes import free_port

SKIP = "PostgreSQL not installed: apt-get install postgresql (.ci/run does this)"


class PostgresService(PostgresCluster):
    def __init__(self, root: Path) -> None:
        super().__init__(root, free_port(), fsync=False)
        self._names = itertools.count()
        self.init()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self) -> str:
        """A fresh empty database on this cluster; returns its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_service():
    if postgres_bindir() is None:
        pytest.skip(SKIP)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root and there is no `postgres` user to run it as")
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install 'driftsync[scale]'")
    service = PostgresService(Path(tempfile.mkdtemp(prefix="driftsync-pg-")))
    try:
        service.start()
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_service) -> str:
    """The cluster's maintenance database (postgres): for tests that manage their own databases."""
    return postgres_service.url


@pytest.fixture
def postgres_db(postgres_service) -> str:
    """The URL of a new empty database (the cluster is started again if a test left it stopped)."""
    if not postgres_service.running():
        postgres_service.start()
    return postgres_service.create_database()
