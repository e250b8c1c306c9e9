"""Request-body limits in front of every route: size and time, checked while the body streams in.

ASGI middleware, so it runs before any route, dependency or parser: a declared Content-Length
over the route's limit is refused before a byte of the body is read, a body that grows past it
is refused at the chunk that crosses it, and a body that has not fully arrived by the deadline
(a slowloris client) is refused instead of holding its connection. Refusals are the API's JSON
error body with `Connection: close`.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class BodyLimitSettings:
    default_bytes: int  # every route not named below (JSON control messages)
    route_bytes: Mapping[str, int]  # exact path -> limit (the upload route)
    timeout_s: float  # the whole body must have arrived this long after the request line


class _Refused(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class BodyLimits:
    """See the module docstring. Whatever the route answers after a refusal is dropped: the
    client gets the refusal, not the route's reaction to a truncated body."""

    def __init__(self, app: ASGIApp, settings: BodyLimitSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.route_bytes.get(scope["path"], self.settings.default_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_refusal(send, _Refused(413, "body_too_large", f"body of {declared} bytes exceeds {limit}"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        received = 0
        refusal: _Refused | None = None
        started = complete = False

        async def limited_receive() -> Message:
            nonlocal received, refusal, complete
            if refusal is not None:
                raise refusal
            if complete:  # later calls wait for a disconnect (a long poll may): no deadline for those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                refusal = _Refused(408, "body_timeout", f"request body not received within {self.settings.timeout_s:g} s")
                raise refusal from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refusal = _Refused(413, "body_too_large", f"body exceeds {limit} bytes")
                    raise refusal
                complete = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None and not started:
                return  # the route's answer to a body it never fully got
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None or started:
                raise
        if refusal is not None and not started:
            await _send_refusal(send, refusal)


def _content_length(scope: Scope) -> int | None:
    """The declared length (the HTTP server has refused malformed or conflicting ones already)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


async def _send_refusal(send: Send, refusal: _Refused) -> None:
    body = json.dumps({"error": refusal.error, "detail": refusal.detail}).encode()
    await send({
        "type": "http.response.start",
        "status": refusal.status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
