"""A hostile server: between a real device and a real server, a proxy answers every device
request with each bad reply from issue 11 in turn. The device must survive every one, and
go on uploading, adapting and reporting once the server behaves again."""
from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from device_client.status import StatusReporter
from tests.conftest import build_test_parts, serve_in_thread, wait_for
from tests.mitm import Proxy, Reply, settle

JSON = {"content-type": "application/json"}
DEVICE_PATHS = ("/v1/deltas", "/v1/uploads", "/v1/telemetry")
BAD_REPLIES = {
    "json array error body": Reply(500, JSON, b'["error", 1]'),
    "Retry-After superscript two": Reply(503, JSON | {"retry-after": "\u00b2"}, b'{"error": "busy", "detail": "x"}'),
    "huge Retry-After": Reply(429, JSON | {"retry-after": "999999999999"}, b'{"error": "slow", "detail": "down"}'),
    "Retry-After beyond any number": Reply(429, JSON | {"retry-after": "9" * 400}, b'{"error": "slow", "detail": "d"}'),
    "Retry-After HTTP date in 2100": Reply(503, JSON | {"retry-after": "Fri, 01 Jan 2100 00:00:00 GMT"}, b"{}"),
    "non-JSON 2xx": Reply(200, {"content-type": "text/html"}, b"<html>captive portal</html>"),
    "non-UTF-8 error body": Reply(502, {}, b"\xff\xfe\xfa"),
    "NaN in a 2xx": Reply(202, JSON, b'{"accepted": NaN, "queue_depth": NaN}'),
    "msgpack NaN delta": Reply(200, {"content-type": "application/msgpack"}, msgpack.packb({"cohort": float("nan")})),
    "error body that is a JSON string": Reply(500, JSON, b'"no"'),
}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def hostile(tmp_path):
    from server.app import create_app

    parts = build_test_parts(tmp_path / "server", max_body_bytes=256 * 1024)
    with serve_in_thread(create_app(parts)) as url:
        proxy = Proxy(url)
        with serve_in_thread(proxy.app()) as proxied:
            yield proxied, proxy, parts


def test_device_survives_every_bad_reply_and_adapts_once_the_server_behaves(hostile, tmp_path):
    url, proxy, parts = hostile
    cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=2.0, dynamic_lambda=None,
                       upload_batch=8, upload_flush_s=0.1, poll_wait_s=0.5, retry_after_cap_s=1.0,
                       backoff_cap_s=1.0)
    device = DeviceClient(cfg).start()
    reporter = StatusReporter(device, tmp_path / "status.json", every_s=0.1, telemetry_every_s=0.1).start()
    seed = 0

    def feed(seconds: float) -> None:
        nonlocal seed
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            device.predict(_images(4, seed))
            seed += 1
            time.sleep(0.2)

    for name, reply in BAD_REPLIES.items():
        proxy.intercept = lambda method, path, reply=reply: reply if path in DEVICE_PATHS else None
        feed(0.8)
        threads = device.status()["threads"]
        assert all(h["state"] != "stopped" for h in threads.values()), (name, threads)
    hit = {(path, status) for _, path, status in proxy.requests}
    assert {("/v1/deltas", 500), ("/v1/uploads", 429), ("/v1/telemetry", 502)} <= hit

    # the server forgot the device: the device enrols again, keeping what it has spooled
    old_id = device.identity.device_id
    spooled = device.uploader.spool.samples()
    assert spooled > 0
    forgot = Reply(401, JSON | {"www-authenticate": "Bearer"},
                   json.dumps({"error": "unauthorized", "detail": "unknown device token"}).encode())
    proxy.intercept = lambda method, path: forgot if path in DEVICE_PATHS else None
    wait_for(lambda: device.reenrolments >= 1, timeout=30, what="re-enrolment after an unknown token")
    assert device.identity.device_id != old_id and device.uploader.spool.samples() >= spooled

    # the server behaves again: everything spooled goes out, deltas come in, telemetry flows
    proxy.intercept = None
    sent, applied, reports = device.uploader.stats.sent, device.deltas.applied, reporter.telemetry_sent
    feed(1.0)
    wait_for(lambda: device.uploader.spool.samples() == 0 and device.uploader.stats.sent > sent,
             timeout=60, what="the spool drained")
    wait_for(lambda: device.deltas.applied > applied, timeout=60, what="adaptation resumed")
    wait_for(lambda: reporter.telemetry_sent > reports, timeout=30, what="telemetry resumed")
    status = reporter.snapshot()
    assert status["uploads"]["refused"] == 0  # nothing dropped for good on a bad reply
    assert status["device_id"] == device.identity.device_id
    assert {"delta-poller", "upload-sender", "upload-encoder", "statistics", "status"} <= set(status["threads"])
    assert all(h["state"] == "running" for h in status["threads"].values()), status["threads"]
    reporter.stop()
    device.stop()


def test_nan_predictions_neither_stop_telemetry_nor_selection(tiny_server, tmp_path):
    """A model that overflows to NaN for a while: nothing NaN is uploaded or reported, the
    status thread lives, and selection resumes when the predictions are finite again."""
    url, _ = tiny_server
    cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=2.0, dynamic_lambda=0.6,
                       upload_batch=8, upload_flush_s=0.1, poll_wait_s=0.5)
    device = DeviceClient(cfg).start()
    reporter = StatusReporter(device, tmp_path / "status.json", every_s=0.1, telemetry_every_s=0.1).start()
    good = dict(device.model.params)
    name = next(n for n in good if n.endswith(".bias"))
    device.model.install({name: np.full_like(good[name], np.nan)}, device.model.version, new_line=True)
    for i in range(8):
        out = device.predict(_images(8, 100 + i))
        assert np.isnan(out.entropy).all() and not out.uploaded.any()
    reports = reporter.telemetry_sent
    wait_for(lambda: reporter.telemetry_sent > reports + 2, timeout=20, what="telemetry during NaN predictions")
    assert device.status()["selection"]["non_finite"] == 64
    assert device.status()["threads"]["status"] == {"state": "running", "restarts": 0, "last_error": None,
                                                     "last_error_at": None}
    device.model.install(good, device.model.version, new_line=True)
    kept = sum(device.predict(_images(8, 200 + i)).uploaded.sum() for i in range(8))
    assert kept > 0 and np.isfinite(device.selector.e_max())
    reporter.stop()
    device.stop()


def test_a_server_that_lost_its_state_is_joined_again_but_not_one_that_lost_its_key(tmp_path):
    """A real server restarted on an empty store: with its signing key kept, the device enrols
    again and adapts, keeping its spool; with a new key, the device refuses it and keeps its
    parameters (only a signed rotation may change the key)."""
    from server.app import create_app

    first = build_test_parts(tmp_path / "first")
    with serve_in_thread(create_app(first)) as upstream:
        proxy = Proxy(upstream)
        with serve_in_thread(proxy.app()) as url:
            cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=2.0, dynamic_lambda=None,
                               upload_batch=8, upload_flush_s=0.1, poll_wait_s=0.5, backoff_cap_s=1.0,
                               normalization="cloud")  # parameters change only by deltas
            device = DeviceClient(cfg).start()
            for i in range(3):
                device.predict(_images(8, 300 + i))
            wait_for(lambda: device.deltas.applied >= 1, what="a first delta")
            old_id = device.identity.device_id

            wiped = build_test_parts(tmp_path / "wiped")  # the database is gone; the key was kept
            wiped.signer = first.signer
            with serve_in_thread(create_app(wiped)) as fresh:
                proxy.upstream = fresh
                for i in range(3):
                    device.predict(_images(8, 310 + i))
                wait_for(lambda: device.reenrolments == 1, timeout=30, what="re-enrolment")
                assert device.identity.device_id != old_id
                applied = device.deltas.applied
                for i in range(3):
                    device.predict(_images(8, 320 + i))
                wait_for(lambda: device.deltas.applied > applied and device.uploader.spool.samples() == 0,
                         timeout=60, what="adapting on the restarted server")

                settle(device, lambda: wiped.store.version_number(device.identity.cohort))
            version, params = device.model.version, {k: v.copy() for k, v in device.model.params.items()}
            lost = build_test_parts(tmp_path / "lost")  # the key is gone too
            with serve_in_thread(create_app(lost)) as other:
                proxy.upstream = other
                for i in range(3):
                    device.predict(_images(8, 330 + i))
                wait_for(lambda: device.reenrolments_failed["unknown_key"] >= 1, timeout=30,
                         what="an enrolment under another key refused")
                time.sleep(2.0)
                assert device.reenrolments == 1 and device.model.version == version
                assert all(np.array_equal(device.model.params[k], v) for k, v in params.items())
                assert len(lost.store.devices()) <= 2  # attempts back off: no registration storm
                assert device.status()["trust"]["reenrolments_failed"] == dict(device.reenrolments_failed)
            device.stop()
