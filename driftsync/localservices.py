"""PostgreSQL, Redis and HAProxy as plain local processes, for `driftsync fleet` and the tests.

`driftsync fleet` runs a compose service whose image is one of these through
`python -m driftsync.localservices KIND ...`, so the scale-out profile runs without Docker.
PostgreSQL refuses to run as root: as root, initdb and postgres run as the `postgres`
system user (Debian's package creates it).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

KNOWN_IMAGES = ("postgres", "redis", "haproxy")


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


def as_postgres_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def let_postgres_reach(path: Path) -> None:
    """As root, postgres runs as the `postgres` user, which must be able to pass through every
    directory above its data (a 0700 temp directory stops it): add the search bit, nothing more."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class PostgresCluster:
    """One cluster in its own directory, on a loopback port; trust authentication (loopback only)."""

    def __init__(self, root: Path, port: int, *, user: str = "postgres", fsync: bool = True) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.root, self.port, self.user, self.fsync, self.bindir = root, port, user, fsync, bindir
        self.data, self.log = root / "data", root / "postgres.log"
        self.url = f"postgresql://{user}@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(as_postgres_user([str(self.bindir / tool), *args]), capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}{tail}")

    def init(self) -> None:
        """initdb once; later starts reuse the data directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            let_postgres_reach(self.root)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")

    def options(self) -> str:
        durable = "on" if self.fsync else "off"
        return (f"-p {self.port} -c unix_socket_directories= -c listen_addresses=127.0.0.1 -c fsync={durable}"
                f" -c full_page_writes={durable} -c max_connections=200")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", self.options(), "start")

    def stop(self, mode: str = "fast") -> None:
        """mode: fast (clients disconnected, clean shutdown) or immediate (like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> None:
        """Create `name` unless it exists (the official image does this for POSTGRES_DB)."""
        exists = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                                 "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
                                capture_output=True, text=True, timeout=30)
        if exists.stdout.strip() != "1":
            subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                            name], check=True, capture_output=True, timeout=30)

    def serve_foreground(self, database: str = "") -> int:
        """Run postgres in the foreground (for `driftsync fleet`): stops on SIGTERM like a container.
        A fresh cluster gets `database` first, so it exists once the server accepts connections."""
        fresh = not (self.data / "PG_VERSION").exists()
        self.init()
        if fresh and database:
            self.start()
            try:
                self.create_database(database)
            finally:
                self.stop()
        return _foreground(as_postgres_user([str(self.bindir / "postgres"), "-D", str(self.data),
                                             *self.options().split()]))


def _foreground(argv: list[str]) -> int:
    """Run a server in the foreground, passing SIGTERM/SIGINT on, and exit with its code."""
    process = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: process.send_signal(signal.SIGTERM))
    code = process.wait()
    return 0 if code in (0, -signal.SIGTERM) else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m driftsync.localservices", description=__doc__)
    parser.add_argument("kind", choices=KNOWN_IMAGES)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the service's volume directory")
    parser.add_argument("--user", default="postgres", help="postgres: the superuser initdb creates")
    parser.add_argument("--database", default="", help="postgres: a database to create when missing")
    parser.add_argument("--config", type=Path, help="haproxy: its configuration file")
    args, extra = parser.parse_known_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    if args.kind == "postgres":
        return PostgresCluster(args.data, args.port, user=args.user).serve_foreground(args.database)
    if args.kind == "redis":
        return _foreground([shutil.which("redis-server") or "redis-server", "--port", str(args.port),
                            "--bind", "127.0.0.1", "--dir", str(args.data), *extra])
    return _foreground([shutil.which("haproxy") or "haproxy", "-db", "-f", str(args.config)])


if __name__ == "__main__":
    sys.exit(main())
