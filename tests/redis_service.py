"""A private, throwaway redis-server for tests, on a free loopback port.

`redis_service` (session): the running server with `.url`, `.stop()`, `.start()`, `.restart()`
for fault tests; `redis_url`: the URL of a database flushed for the test.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from driftsync.processes import free_port

SKIP = "redis-server not installed: apt-get install redis-server (.ci/run does this)"


class RedisService:
    """No persistence: a restart loses every stream, which the product must survive (the store has the uploads)."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root, self.binary = root, binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=(self.root / "redis.log").open("a"), stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-1000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


@pytest.fixture(scope="session")
def redis_service():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(SKIP)
    pytest.importorskip("redis", reason="the redis client is not installed: pip install 'driftsync[scale]'")
    service = RedisService(Path(tempfile.mkdtemp(prefix="driftsync-redis-")), binary)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        shutil.rmtree(service.root, ignore_errors=True)


@pytest.fixture
def redis_url(redis_service) -> str:
    import redis

    if not redis_service.running():
        redis_service.start()
    redis.Redis.from_url(redis_service.url).flushall()
    return redis_service.url
