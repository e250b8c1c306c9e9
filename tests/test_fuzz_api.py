"""Fuzz the live HTTP API: schemathesis against the app's own OpenAPI schema, and hypothesis
against the msgpack upload body the schema cannot describe. Nothing may answer 5xx."""
from __future__ import annotations

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
