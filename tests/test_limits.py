"""server/limits.py on its own: a tiny ASGI app behind BodyLimits, driven by a real uvicorn."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from server.limits import BodyLimits, BodyLimitSettings
from tests.conftest import serve_in_thread
from tests.test_attacks import exchange, request_head


async def echo_length(scope, receive, send):
    """Reads the whole body and answers its length; /wait also waits for a disconnect, as a long poll may."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/wait":
        try:
            await asyncio.wait_for(receive(), timeout=1.5)  # longer than the body timeout
        except TimeoutError:
            pass
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def url():
    app = BodyLimits(echo_length, BodyLimitSettings(default_bytes=100, route_bytes={"/big": 1000}, timeout_s=1.0))
    with serve_in_thread(app) as base:
        yield base


def test_per_route_limits_by_length_and_by_count(url):
    assert httpx.post(f"{url}/small", content=b"x" * 100).json() == {"size": 100}
    assert httpx.post(f"{url}/big", content=b"x" * 1000).json() == {"size": 1000}
    declared = httpx.post(f"{url}/small", content=b"x" * 101)
    assert declared.status_code == 413 and declared.json()["error"] == "body_too_large"
    assert declared.headers["connection"] == "close"
    streamed = httpx.post(f"{url}/big", content=iter([b"x" * 600, b"x" * 600]))  # chunked: no Content-Length
    assert streamed.status_code == 413 and streamed.json() == {"error": "body_too_large", "detail": "body exceeds 1000 bytes"}


def test_a_slow_body_gets_408_and_a_complete_one_waits_freely(url):
    port = int(url.rsplit(":", 1)[1])

    def drip():
        for _ in range(5):
            yield b"x"
            time.sleep(0.5)

    reply = exchange(port, request_head("POST", "/small", {"Content-Length": "5"}), drip(), timeout=10)
    assert reply.status == 408 and json.loads(reply.body)["error"] == "body_timeout" and reply.seconds < 2
    # once the body is in, waiting longer than the body timeout (for a disconnect) is the route's business
    assert httpx.post(f"{url}/wait", content=b"x").json() == {"size": 1}
