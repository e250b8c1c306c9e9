"""A real HTTP proxy on loopback, for tests that sit between a device and its server:
it forwards every request, and a test can answer in its place (`intercept`) or
rewrite what the server answered (`rewrite`). And `settle`, to start an attack from a
quiet state."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.conftest import wait_for

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive", "host"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Proxy:
    upstream: str
    intercept: Callable[[str, str], Reply | None] | None = None  # (method, path) -> a reply instead of the server's
    rewrite: Callable[[str, str, Reply], Reply] | None = None  # (method, path, server's reply) -> what the device gets
    params: Callable[[str, dict[str, str]], dict[str, str]] | None = None  # rewrite query parameters
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status sent)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(request: Request, path: str) -> Response:
            path = "/" + path
            reply = self.intercept(request.method, path) if self.intercept else None
            if reply is None:
                params = dict(request.query_params)
                if self.params is not None:
                    params = self.params(path, params)
                headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
                async with httpx.AsyncClient(timeout=120) as client:
                    upstream = await client.request(request.method, self.upstream + path, params=params,
                                                    content=await request.body(), headers=headers)
                reply = Reply(upstream.status_code,
                              {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
                              upstream.content)
                if self.rewrite is not None:
                    reply = self.rewrite(request.method, path, reply)
            self.requests.append((request.method, path, reply.status))
            return Response(reply.body, status_code=reply.status, headers=reply.headers)

        return app


def settle(device, server_version: Callable[[], int]) -> None:
    """Until every upload is learnt and the device holds the server's latest version, for a second."""
    def settled() -> bool:
        return device.uploader.spool.samples() == 0 and device.model.version == server_version()

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        wait_for(settled, what="the device at the server's latest version")
        time.sleep(1.0)
        if settled():
            return
    raise AssertionError("the server kept publishing versions")
