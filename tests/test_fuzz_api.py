"""Fuzz the live HTTP API: schemathesis against the app's own OpenAPI schema, and hypothesis
against the msgpack upload body the schema cannot describe. Nothing may answer 5xx."""
from __future__ import annotations

import json

import httpx
import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from shared.protocol import RegisterRequest
from tests.conftest import build_test_parts, serve_in_thread

ADMIN_TOKEN = "fuzz-admin"
ADMIN_PATHS = ("/v1/fleet", "/v1/cohorts", "/v1/events")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    parts = build_test_parts(tmp_path_factory.mktemp("fuzz"), admin_token=ADMIN_TOKEN, max_wait_s=0.2)
    with serve_in_thread(create_app(parts)) as url:
        token = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="fuzzer").model_dump()).json()["token"]
        yield url, token


def test_no_operation_answers_5xx(live):
    """Every operation in the app's OpenAPI schema, with schema-driven and schema-breaking inputs.
    (Driven through hypothesis directly: schemathesis's pytest plugin does not load under pytest 9.)"""
    url, device_token = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:
        admin = operation.path.startswith(ADMIN_PATHS) or operation.path.endswith("/cohort")
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN if admin else device_token}"}

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            response = case.call(base_url=url, headers=headers)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:  # every refusal is the JSON error body
                assert set(response.json()) == {"error", "detail"}, response.text[:300]

        check()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["images", "entropy", "captured_at", "codec", "device_version", "norm_stats", "batch_statistics"])


@given(body=st.binary(max_size=512) | st.dictionaries(fields, msgpack_values).map(lambda d: msgpack.packb(d)))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_upload_bodies_never_answer_5xx(live, body):
    url, token = live
    r = httpx.post(f"{url}/v1/uploads", content=body,
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, (r.status_code, r.text[:300])


def _deep(depth: int, inner: bytes = b"\x90") -> bytes:
    """msgpack arrays nested `depth` deep (msgpack-python refuses to pack past 512)."""
    return b"\x91" * depth + inner


def _upload_map(**extra: bytes) -> bytes:
    """A well-formed upload map with raw msgpack values added or replaced by name."""
    fields = {"device_version": msgpack.packb(0), "codec": msgpack.packb("raw"), "images": msgpack.packb([b"\0" * 3072]),
              "entropy": msgpack.packb([0.5]), "captured_at": msgpack.packb([0.0]), **extra}
    return b"\xde" + len(fields).to_bytes(2, "big") + b"".join(msgpack.packb(k) + v for k, v in fields.items())


HOSTILE_UPLOADS = {
    "depth 1000 in a field": _upload_map(norm_stats=_deep(1000)),
    "depth 100000 at the top": _deep(100_000),
    "depth 40 of maps": b"\x81\xa1k" * 40 + b"\x80",
    "huge array": _upload_map(entropy=b"\xdd" + (1 << 31).to_bytes(4, "big")),  # declares 2^31 items
    "huge map": b"\xdf" + (1 << 31).to_bytes(4, "big"),
    "5000-item array": _upload_map(captured_at=msgpack.packb([0.0] * 5000)),
    "5000-key map": msgpack.packb({f"k{i}": i for i in range(5000)}),
    "long string key": msgpack.packb({"x" * 100_000: 1}),
    "uint64 version": _upload_map(device_version=msgpack.packb(2**64 - 1)),
    "negative int64": _upload_map(device_version=msgpack.packb(-(2**63))),
    "inf entropy": _upload_map(entropy=msgpack.packb([float("inf")])),
    "nan timestamp": _upload_map(captured_at=msgpack.packb([float("nan")])),
    "300 entropies": _upload_map(entropy=msgpack.packb([0.5] * 300)),
    "timestamp ext": _upload_map(codec=b"\xd6\xff" + b"\0" * 4),
    "tensor shape overflow": _upload_map(norm_stats=msgpack.packb(
        {"0.running_mean": {"dtype": "float32", "shape": [2**62, 2**62], "data": b""}})),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_upload_bodies_get_a_small_4xx(live, name):
    url, token = live
    r = httpx.post(f"{url}/v1/uploads", content=HOSTILE_UPLOADS[name],
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, (r.status_code, r.text[:300])
    assert len(r.content) < 2048


HOSTILE_JSON = {
    "telemetry frames 10^400": ("/v1/telemetry", b'{"version": 0, "window_s": 5, "frames": 1' + b"0" * 400 +
                                b', "uploads_sent": 0, "uploads_spooled": 0, "uploads_dropped": 0}'),
    "telemetry version 2^64": ("/v1/telemetry", json.dumps({"version": 2**64, "window_s": 5, "frames": 0, "uploads_sent": 0,
                                                            "uploads_spooled": 0, "uploads_dropped": 0}).encode()),
    "telemetry window 1e400": ("/v1/telemetry", (b'{"version": 0, "window_s": 1e400, "frames": 0, "uploads_sent": 0, '
                                                 b'"uploads_spooled": 0, "uploads_dropped": 0}')),
    "register depth 20000": ("/v1/devices", b"[" * 20_000 + b"]" * 20_000),
    "register map depth": ("/v1/devices", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    "register protocol 10^400": ("/v1/devices", b'{"device_name": "d", "protocol_version": 1' + b"0" * 400 + b"}"),
    "register 3000 keys": ("/v1/devices", json.dumps({f"k{i}": i for i in range(3000)}).encode()),
    "register 60 KB cohort": ("/v1/devices", json.dumps({"device_name": "d", "cohort": "c" * 60_000}).encode()),
    "rollback version 10^400": ("/v1/cohorts/c/rollback", b'{"version": 1' + b"0" * 400 + b"}"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_hostile_json_bodies_get_a_small_4xx(live, name):
    url, token = live
    path, body = HOSTILE_JSON[name]
    bearer = ADMIN_TOKEN if path.startswith(ADMIN_PATHS) else token
    r = httpx.post(f"{url}{path}", content=body, headers={"Authorization": f"Bearer {bearer}",
                                                          "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, (r.status_code, r.text[:300])
    assert len(r.content) < 2048
