"""Shared fixtures: small real models, a real uvicorn server on a free port."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
pytest_plugins = ["postgres_service", "redis_service"]  # private PostgreSQL and Redis for the scale-out tests


def missing_shared(*relative: str) -> str | None:
    """Why tests needing ../shared/<relative> must skip (None: all present). The product never needs them."""
    if not SHARED.is_dir():
        return "../shared (the team resource folder beside the clone) is absent"
    absent = [r for r in relative if not (SHARED / r).exists()]
    return f"../shared (the team resource folder) lacks {', '.join(absent)}" if absent else None


@pytest.fixture(scope="session", autouse=True)
def driftsync_home(tmp_path_factory: pytest.TempPathFactory):
    """A fresh DRIFTSYNC_HOME for the whole run, inherited by every process a test starts:
    tests never read or write the user's (~/.cache/driftsync), and use the shipped models."""
    home = tmp_path_factory.mktemp("driftsync-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFTSYNC_HOME", str(home))
        yield home


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll until `predicate()` is truthy and return its value; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:.0f}s"
        time.sleep(0.05)
    return value


@contextmanager
def serve_in_thread(app):
    """A real uvicorn server on loopback; yields its base URL."""
    import uvicorn

    from driftsync.processes import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_pair(seed: int = 0):
    """A small BN student and a wider teacher, random but fixed: fast enough for every test."""
    import torch
    from torch import nn

    def net(width: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )

    torch.manual_seed(seed)
    return net(8).eval(), net(24).eval()


def build_test_parts(state_dir: Path, queue_max_jobs: int = 256, **settings_kw):
    from server.app import ServerSettings
    from server.artifact import PublishedModel
    from server.engine import CemaConfig, CemaEngine
    from server.export import export_student
    from server.main import build_parts
    from server.store import SqliteStore

    state_dir.mkdir(parents=True, exist_ok=True)
    student, teacher = tiny_pair()
    engine = CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8))
    model = PublishedModel("tiny", [f"c{i}" for i in range(10)], (3, 32, 32), export_student(student, (3, 32, 32)))
    return build_parts(engine, model, SqliteStore(state_dir / "state.sqlite"), ServerSettings(**settings_kw),
                       step_max_wait_s=0.2, queue_max_jobs=queue_max_jobs)


@pytest.fixture
def tiny_server(tmp_path):
    from server.app import create_app

    parts = build_test_parts(tmp_path / "server", max_body_bytes=256 * 1024)
    with serve_in_thread(create_app(parts)) as url:
        yield url, parts
