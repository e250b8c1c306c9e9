"""Server-side expiry of devices that are no longer seen (replicas taken down for good)."""
from __future__ import annotations

import time

import httpx
import pytest

from server.expiry import SEEN_WRITE_EVERY_S, DeviceReaper
from server.store import SqliteStore
from shared.protocol import RegisterRequest


def _register(url: str, name: str) -> dict:
    reply = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name=name).model_dump())
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_a_request_records_when_the_device_was_seen_and_expiry_removes_the_unseen(tiny_server) -> None:
    url, parts = tiny_server
    live, gone = _register(url, "replica-a"), _register(url, "replica-b")
    parts.store._query("UPDATE devices SET last_seen_at = 0")
    before = time.time()
    auth = {"Authorization": f"Bearer {live['token']}"}
    assert httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=auth).status_code in (200, 204)
    assert parts.store.device(live["device_id"]).last_seen_at >= before
    assert parts.store.device(gone["device_id"]).last_seen_at == 0
    parts.fleet.seen(gone["device_id"])

    reaper = DeviceReaper(parts.store, 3600.0, parts.fleet.forget)
    assert reaper.expire_once() == [gone["device_id"]]
    assert [d.device_id for d in parts.store.devices()] == [live["device_id"]]
    assert gone["device_id"] not in parts.fleet._devices
    refused = httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers={"Authorization": f"Bearer {gone['token']}"})
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"  # the device enrols again


def test_the_reaper_runs_on_its_own_and_stops(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    record, _ = store.add_device("old", None)
    expired: list[list[str]] = []
    reaper = DeviceReaper(store, 3600.0, expired.append, clock=lambda: time.time() + 7200)
    reaper.every_s = 0.05
    reaper.start()
    deadline = time.monotonic() + 10
    while not expired and time.monotonic() < deadline:
        time.sleep(0.05)
    reaper.stop()
    assert expired == [[record.device_id]] and store.devices() == []
    store.close()


def test_an_expiry_shorter_than_the_seen_write_interval_is_refused(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    with pytest.raises(ValueError, match="at least"):
        DeviceReaper(store, SEEN_WRITE_EVERY_S, lambda ids: None)
    store.close()


def test_the_reaper_removes_the_own_cohort_of_an_expired_device(tmp_path, caplog) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    gone, _ = store.add_device("gone", None)
    shared, _ = store.add_device("member", "lab")
    for record in (gone, shared):
        store.add_upload(record.cohort, record.device_id, b"body", 4)
        store.commit(record.cohort, state=b"state")
    reaper = DeviceReaper(store, 3600.0, lambda ids: None, clock=lambda: time.time() + 7200)
    with caplog.at_level("INFO", logger="driftsync.server"):
        assert reaper.expire_once() == sorted([gone.device_id, shared.device_id])
    assert store.load_state(gone.cohort) is None and store.pending_uploads()[0].cohort == "lab"
    assert store.load_state("lab") == b"state"  # a shared cohort keeps its state for devices that join it
    assert f"removed the state and versions of 1 cohort(s) of gone devices: {gone.cohort}" in caplog.text
    store.close()
