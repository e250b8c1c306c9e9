"""The device's view of the server's HTTP API. Outgoing connections only.

Whatever comes back, a caller sees either a validated message or a ServerError:
an error body that is not the JSON object we expect, a Retry-After that is not a
number, a 2xx that does not parse, all become ServerError, never an exception
that would end the thread that made the call.
"""
from __future__ import annotations

import email.utils
import hashlib
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from shared.codec import MSGPACK_MEDIA_TYPE, CodecError, decode
from shared.protocol import (
    Delta,
    ModelDescriptor,
    RegisterRequest,
    RegisterResponse,
    Signature,
    SigningKeyInfo,
    Telemetry,
    UploadAck,
)
from shared.signing import SIGNATURE_HEADER

RETRY_AFTER_MAX_S = 300.0  # a server (or a middlebox) cannot park a device for longer than this
UNKNOWN_TOKEN = "unknown device token"  # the server's 401 detail once it has forgotten the device
M = TypeVar("M", bound=BaseModel)


class ServerError(Exception):
    """The server answered with an error, or could not be reached, or its reply did not parse."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.detail = detail

    @property
    def unknown_token(self) -> bool:
        """The server no longer knows this device (it lost its state): enrol again."""
        return self.status == 401 and self.detail == UNKNOWN_TOKEN


def parse_retry_after(value: str | None, now: float | None = None, cap_s: float = RETRY_AFTER_MAX_S) -> float | None:
    """Seconds to wait from a Retry-After header: ASCII digits or an HTTP date, clamped to
    [0, cap_s]; anything else (`²`, `1e9`, `-5`) is ignored. str.isdigit() is not enough:
    it accepts superscripts and other Unicode digits that float() refuses."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        return cap_s if len(value) > 9 else min(float(value), cap_s)  # 400 digits must not become a float
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - (time.time() if now is None else now)), cap_s)


@dataclass
class Backoff:
    """Exponential backoff with jitter that honours Retry-After, so a fleet whose server
    comes back does not return as one synchronised retry storm."""

    base_s: float = 0.5
    cap_s: float = 30.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)
    retry_after_cap_s: float = RETRY_AFTER_MAX_S

    def next_delay(self, retry_after: float | None = None) -> float:
        self.failures += 1
        if retry_after is not None:  # the server said when; spread the fleet above it, never below
            wait = min(max(retry_after, self.base_s), self.retry_after_cap_s)  # "0" or a past date: no busy loop
            return wait * (1.0 + 0.25 * self.rng.random())
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 16))
        return ceiling * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    detail = None
    try:
        body = response.json()
    except ValueError:  # not JSON, or not UTF-8
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        detail = body["detail"]
        message = f"{body.get('error')}: {detail}"[:300]
    else:
        message = response.content[:200].decode("utf-8", errors="replace")
    raise ServerError(
        f"HTTP {response.status_code} {message}",
        status=response.status_code,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        detail=detail,
    )


def _parse(response: httpx.Response, model: type[M]) -> M:
    """A 2xx JSON reply as `model`, or a ServerError."""
    try:
        return model.model_validate_json(response.content)
    except (ValidationError, ValueError) as exc:
        raise ServerError(f"unreadable {model.__name__} reply: {str(exc)[:200]}", status=response.status_code) from exc


FAILOVER_STATUSES = (502, 503, 504)  # "not this replica, not now": the next server in the list may answer


def server_urls(spec: str) -> list[str]:
    """`--server`: one base URL, or a comma list of replicas (or a gateway and a fallback)."""
    urls = [url.strip().rstrip("/") for url in spec.split(",") if url.strip()]
    if not urls:
        raise ValueError("--server needs at least one URL")
    return urls


class ServerApi:
    """One httpx client per thread is the caller's business; this is stateless but for the token
    and which server of the list it is talking to.

    `base_url` may list several servers, comma-separated: a request that cannot connect, or gets
    502/503/504, moves this client to the next one for its following requests (the caller's
    backoff retries). `token` may be a callable, read on every request, so that every client of a
    device follows a re-enrolment; `on_unknown_token(token)` is told when the server says it
    forgot the token.
    """

    def __init__(self, base_url: str, token: str | Callable[[], str | None] | None = None, timeout: float = 30.0,
                 verify: str | bool = True, on_unknown_token: Callable[[str | None], None] | None = None) -> None:
        self.urls = server_urls(base_url)
        self._current = 0
        self.token = token
        self.on_unknown_token = on_unknown_token
        context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._client = httpx.Client(timeout=timeout, verify=context)

    @property
    def base_url(self) -> str:
        return self.urls[self._current]

    def _fail_over(self) -> None:
        if len(self.urls) > 1:
            self._current = (self._current + 1) % len(self.urls)

    def close(self) -> None:
        self._client.close()

    def _current_token(self) -> str | None:
        return self.token() if callable(self.token) else self.token

    def _call(self, method: str, url: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        token = self._current_token()
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        base = self.base_url
        try:
            response = self._client.request(method, base + url, headers=auth | (headers or {}), **kwargs)
        except httpx.HTTPError as exc:
            self._fail_over()
            raise ServerError(f"cannot reach {base}: {exc}") from exc
        if response.status_code in FAILOVER_STATUSES:
            self._fail_over()
        try:
            _raise_for(response)
        except ServerError as exc:
            if exc.unknown_token and self.on_unknown_token is not None:
                self.on_unknown_token(token)
            raise
        return response

    def register(self, request: RegisterRequest) -> RegisterResponse:
        reply = _parse(self._call("POST", "/v1/devices", json=request.model_dump()), RegisterResponse)
        self.token = reply.token
        return reply

    def descriptor(self) -> ModelDescriptor:
        return _parse(self._call("GET", "/v1/model"), ModelDescriptor)

    def signing_key(self) -> SigningKeyInfo:
        return _parse(self._call("GET", "/v1/signing-key"), SigningKeyInfo)

    def download(self, part: str, expected_sha256: str) -> tuple[bytes, Signature | None]:
        """The file and the server's signature over its name and hash (None when it sent none)."""
        response = self._call("GET", f"/v1/model/{part}")
        data = response.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ServerError(f"{part} sha256 {actual[:12]} does not match the descriptor's {expected_sha256[:12]}")
        header = response.headers.get(SIGNATURE_HEADER)
        try:
            return data, None if header is None else Signature.model_validate_json(header)
        except ValidationError:
            return data, None

    def upload(self, body: bytes) -> UploadAck:
        """Post one packed UploadBatch (the spool keeps bodies packed)."""
        response = self._call("POST", "/v1/uploads", content=body, headers={"Content-Type": MSGPACK_MEDIA_TYPE})
        return _parse(response, UploadAck)

    def telemetry(self, report: Telemetry) -> None:
        self._call("POST", "/v1/telemetry", json=report.model_dump())

    def poll_delta(self, cohort: str, since: int, wait: float) -> tuple[Delta | None, int]:
        """(delta or None, bytes received). When the server has moved this device to another
        cohort, the reply is that cohort's latest delta whatever `since` says.
        Decoding errors surface as ServerError."""
        response = self._call(
            "GET", "/v1/deltas", params={"cohort": cohort, "since": since, "wait": wait}, timeout=wait + 30.0
        )
        if response.status_code == 204:
            return None, 0
        try:
            return decode(response.content, Delta), len(response.content)
        except CodecError as exc:
            raise ServerError(f"undecodable delta: {exc}") from exc
