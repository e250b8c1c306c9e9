"""Per-device upload rate limits: the bucket, and 429 + Retry-After over real HTTP."""
from __future__ import annotations

import time

import httpx

from server.app import create_app
from server.ratelimit import RateLimiter
from shared.codec import pack
from shared.images import encode_image
from shared.protocol import RegisterRequest, UploadBatch
from tests.conftest import build_test_parts, serve_in_thread
from tests.test_engine import _images


def test_bucket_allows_bursts_then_the_rate_and_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate=10.0, burst=20.0)
    assert limiter.take("a", 20, now=0.0) is None
    assert limiter.take("a", 5, now=0.0) == 0.5  # 5 tokens at 10/s
    assert limiter.take("b", 5, now=0.0) is None  # another device has its own bucket
    assert limiter.take("a", 5, now=0.5) is None
    assert limiter.take("a", 50, now=100.0) is None  # larger than the burst: passes on a full bucket...
    assert limiter.take("a", 1, now=100.0) == 3.1  # ...and leaves it in debt
    small = RateLimiter(rate=1.0, burst=1.0, max_keys=2)
    for i in range(5):
        small.take(f"k{i}", 1, now=float(i * 10))
    assert len(small._buckets) <= 3  # refilled buckets are forgotten


def test_a_device_over_its_rate_gets_429_with_retry_after(tmp_path) -> None:
    parts = build_test_parts(tmp_path / "server", device_samples_per_s=4.0, device_burst_samples=8.0)
    with serve_in_thread(create_app(parts)) as url:
        token = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="fast").model_dump()).json()["token"]
        other = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="slow").model_dump()).json()["token"]
        batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in _images(8)],
                            entropy=[0.5] * 8, captured_at=[time.time()] * 8)
        headers = {"Content-Type": "application/msgpack"}

        def post(tok: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/uploads", content=pack(batch), headers=headers | {"Authorization": f"Bearer {tok}"})

        assert post(token).status_code == 202
        refused = post(token)
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert post(other).status_code == 202  # the limit is per device
        metrics = httpx.get(f"{url}/metrics").text
        assert 'driftsync_requests_refused_total{reason="rate_limited"} 1.0' in metrics
        stored = {u.device_id for u in parts.store.pending_uploads()}
        assert len(stored) <= 2  # the refused upload was never stored


def test_a_full_queue_turns_into_delay_not_loss(tmp_path) -> None:
    """Backpressure: a one-job queue, a device uploading as fast as it can. The server answers
    429 + Retry-After; the device keeps the batches spooled, backs off and gets them all in."""
    from device_client.client import DeviceClient, DeviceConfig

    parts = build_test_parts(tmp_path / "server", queue_max_jobs=1, queue_retry_after_s=1)
    parts.worker.max_pending_samples = 8  # the worker holds at most 8 (+ one batch) before it stops taking
    with serve_in_thread(create_app(parts)) as url:
        cfg = DeviceConfig(server=url, state_dir=tmp_path / "d", e_max_factor=2.0, dynamic_lambda=None,
                           upload_batch=4, upload_flush_s=0.01, poll_wait_s=1.0)
        device = DeviceClient(cfg).start()
        for i in range(16):
            device.predict(_images(4, seed=i))
        deadline = time.monotonic() + 90
        while device.status()["uploads"]["sent"] < 64:
            assert time.monotonic() < deadline, device.status()["uploads"]
            assert parts.worker.pending_samples() <= 8 + 4 and parts.uploads.depth() <= 1  # memory stays bounded
            time.sleep(0.02)
        uploads = device.status()["uploads"]
        assert uploads["dropped"] == 0 and uploads["spooled"] == 0
        metrics = httpx.get(f"{url}/metrics").text
        refused = [line for line in metrics.splitlines() if 'reason="queue_full"' in line]
        assert refused and float(refused[0].split()[-1]) >= 1, "the queue never filled: the test proves nothing"
        assert uploads["retries"] >= float(refused[0].split()[-1])  # every refusal was retried, after waiting
        assert parts.uploads.depth() <= 1
        device.stop()
        cohort = device.identity.cohort
        deadline = time.monotonic() + 60
        while parts.store.learnt_samples(cohort) < parts.store.accepted_samples(cohort):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert parts.store.accepted_samples(cohort) == 64


def test_check_is_take_without_spending() -> None:
    limiter = RateLimiter(rate=10.0, burst=20.0)
    assert limiter.check("a", 20, now=0.0) is None  # an unknown key has a full bucket
    assert limiter.take("a", 20, now=0.0) is None
    assert limiter.check("a", 5, now=0.0) == 0.5 and limiter.check("a", 5, now=0.0) == 0.5  # nothing spent
    assert limiter.check("a", 5, now=0.5) is None


def test_a_device_in_debt_gets_429_before_its_body_is_read(tmp_path) -> None:
    """The cheap admission: the server answers at once, though not a byte of the declared body was sent."""
    from tests.test_attacks import exchange, request_head

    parts = build_test_parts(tmp_path / "server", device_samples_per_s=0.5, device_burst_samples=8.0)
    with serve_in_thread(create_app(parts)) as url:
        token = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="fast").model_dump()).json()["token"]
        batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in _images(8)],
                            entropy=[0.5] * 8, captured_at=[time.time()] * 8)
        accepted = httpx.post(f"{url}/v1/uploads", content=pack(batch),
                              headers={"Content-Type": "application/msgpack", "Authorization": f"Bearer {token}"})
        assert accepted.status_code == 202  # the bucket is empty now; one sample takes 2 s to refill
        head = request_head("POST", "/v1/uploads", {"Authorization": f"Bearer {token}", "Content-Length": str(1 << 20)})
        reply = exchange(int(url.rsplit(":", 1)[1]), head, [], timeout=5)
        assert reply.status == 429 and reply.seconds < 1.5 and int(reply.headers["retry-after"]) >= 1
