"""A private, throwaway PostgreSQL cluster for tests: initdb into a temp dir, postgres on a free port.

`postgres_service` (session): the running cluster, with `.url`, `.stop()`, `.start()`, `.restart()` for
fault tests; `postgres_url` (session): its URL; `postgres_db`: the URL of a fresh empty database, so
tests never see each other's rows.
As root, initdb and postgres run as the `postgres` system user (postgres refuses to run as root).
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from driftsync.processes import free_port

SKIP = "PostgreSQL not installed: apt-get install postgresql (.ci/run does this)"


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl live: pg_config's bindir, Debian's versioned dirs, or PATH."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).parent))
    for directory in candidates:
        if directory and (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


class PostgresService:
    """One cluster in its own temp dir; fsync off unless durability is what a test checks."""

    def __init__(self, root: Path, bindir: Path, *, fsync: bool = False) -> None:
        self.root, self.bindir, self.fsync = root, bindir, fsync
        self.data, self.sockets, self.log = root / "data", root / "sockets", root / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._names = itertools.count()
        self.sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*prefix, str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}{tail}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'}"
                   f" -c full_page_writes={'on' if self.fsync else 'off'} -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """mode: fast (clients disconnected, clean shutdown) or immediate (like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

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
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(SKIP)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL refuses to run as root and there is no `postgres` user to run it as")
    pytest.importorskip("psycopg", reason="psycopg not installed: pip install 'driftsync[scale]'")
    service = PostgresService(Path(tempfile.mkdtemp(prefix="driftsync-pg-")), bindir)
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
