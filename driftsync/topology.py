"""The scale-out topology as local processes: API replicas and adaptation workers sharing one
store (PostgreSQL) and one broker (Redis), started with the commands a user runs.

Fault tests kill, stop and restart single processes of it; the scale benchmark varies how
many of each it starts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from driftsync.processes import cli, free_port, wait_healthy


@dataclass
class Member:
    role: str
    name: str
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Topology:
    store: str
    broker: str
    work: Path
    common: list[str] = field(default_factory=list)  # flags for every `driftsync serve`
    worker_args: list[str] = field(default_factory=list)
    api_launcher: list[str] | None = None  # how to run `driftsync` for API replicas (default: the CLI as usual)
    members: list[Member] = field(default_factory=list)

    def migrate(self) -> None:
        subprocess.run(cli("db", "upgrade", "--store", self.store), check=True, capture_output=True, timeout=120)

    def start(self, role: str, name: str, *extra: str, wait: bool = True) -> Member:
        port = free_port()
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        args = ["serve", "--role", role, "--port", str(port), "--store", self.store, "--broker", self.broker,
                "--state-dir", str(self.work / name), *self.common]
        if role == "worker":
            args += ["--worker-name", name, *self.worker_args]
        command = [*self.api_launcher, *args, *extra] if role == "api" and self.api_launcher else cli(*args, *extra)
        process = subprocess.Popen(command, stdout=(logs / f"{name}.log").open("a"),
                                   stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        member = Member(role, name, port, process)
        self.members.append(member)
        if wait:
            self.wait_healthy(member)
        return member

    def wait_healthy(self, member: Member, timeout: float = 300.0) -> None:
        wait_healthy(member.url, member.process, timeout)

    def apis(self) -> list[Member]:
        return [m for m in self.members if m.role == "api" and m.alive()]

    def workers(self) -> list[Member]:
        return [m for m in self.members if m.role == "worker" and m.alive()]

    def api_urls(self) -> str:
        return ",".join(m.url for m in self.apis())

    def partitions_of(self, member: Member) -> list[int]:
        return httpx.get(f"{member.url}/healthz", timeout=5).json()["partitions"]

    def kill(self, member: Member, sig: int = signal.SIGKILL) -> None:
        member.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            member.process.wait(timeout=60)

    def stop(self) -> None:
        for member in self.members:
            if member.alive():
                member.process.send_signal(signal.SIGCONT)
                member.process.terminate()
        deadline = time.monotonic() + 30
        for member in self.members:
            try:
                member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
