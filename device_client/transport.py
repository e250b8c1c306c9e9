"""The device's view of the server's HTTP API. Outgoing connections only."""
from __future__ import annotations

import hashlib
import random
import ssl
from dataclasses import dataclass, field

import httpx

from shared.codec import MSGPACK_MEDIA_TYPE, CodecError, decode
from shared.protocol import (
    Delta,
    ModelDescriptor,
    RegisterRequest,
    RegisterResponse,
    Telemetry,
    UploadAck,
)


class ServerError(Exception):
    """The server answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class Backoff:
    """Exponential backoff with jitter that honours Retry-After, so a fleet whose server
    comes back does not return as one synchronised retry storm."""

    base_s: float = 0.5
    cap_s: float = 30.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, retry_after: float | None = None) -> float:
        self.failures += 1
        if retry_after is not None:  # the server said when; spread the fleet above it, never below
            return retry_after * (1.0 + 0.25 * self.rng.random())
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 16))
        return ceiling * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        message = f"{body.get('error')}: {body.get('detail')}"
    except ValueError:
        message = response.text[:200]
    retry = response.headers.get("Retry-After")
    raise ServerError(
        f"HTTP {response.status_code} {message}",
        status=response.status_code,
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )


class ServerApi:
    """One httpx client per thread is the caller's business; this is stateless but for the token."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0, verify: str | bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, verify=context)

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _call(self, method: str, url: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        try:
            response = self._client.request(method, url, headers=self._headers() | (headers or {}), **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.base_url}: {exc}") from exc
        _raise_for(response)
        return response

    def register(self, request: RegisterRequest) -> RegisterResponse:
        response = self._call("POST", "/v1/devices", json=request.model_dump())
        reply = RegisterResponse.model_validate(response.json())
        self.token = reply.token
        return reply

    def descriptor(self) -> ModelDescriptor:
        return ModelDescriptor.model_validate(self._call("GET", "/v1/model").json())

    def download(self, part: str, expected_sha256: str) -> bytes:
        data = self._call("GET", f"/v1/model/{part}").content
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ServerError(f"{part} sha256 {actual[:12]} does not match the descriptor's {expected_sha256[:12]}")
        return data

    def upload(self, body: bytes) -> UploadAck:
        """Post one packed UploadBatch (the spool keeps bodies packed)."""
        response = self._call("POST", "/v1/uploads", content=body, headers={"Content-Type": MSGPACK_MEDIA_TYPE})
        return UploadAck.model_validate(response.json())

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
