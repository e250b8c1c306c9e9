"""Who may do what: enrolment tokens, device tokens (hashed), read-only devices, admin."""
from __future__ import annotations

import sqlite3
import time

import httpx

from server.app import create_app
from shared.codec import pack
from shared.images import encode_image
from shared.protocol import RegisterRequest, UploadBatch
from tests.conftest import build_test_parts, serve_in_thread
from tests.test_engine import _images

ADMIN = {"Authorization": "Bearer adm"}


def _register(url: str, token: str | None, name: str = "cam") -> httpx.Response:
    return httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name=name, enrolment_token=token).model_dump())


def _upload(url: str, device_token: str) -> httpx.Response:
    batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in _images(4)],
                        entropy=[0.5] * 4, captured_at=[time.time()] * 4)
    return httpx.post(f"{url}/v1/uploads", content=pack(batch),
                      headers={"Authorization": f"Bearer {device_token}", "Content-Type": "application/msgpack"})


def test_tokens_and_permissions(tmp_path):
    parts = build_test_parts(tmp_path / "server", admin_token="adm", enrolment_token="old-fleet-token, new-fleet-token")
    with serve_in_thread(create_app(parts)) as url:
        for token in ("old-fleet-token", "new-fleet-token"):  # both tokens of a rotation enrol
            assert _register(url, token).status_code == 201
        for token in (None, "", "new-fleet", "old-fleet-token, new-fleet-token"):
            r = _register(url, token)
            assert r.status_code == 401 and r.json() == {"error": "unauthorized", "detail": "wrong enrolment token"}
        device = _register(url, "new-fleet-token", "reader").json()

        # device tokens are stored hashed: the database never holds one
        with sqlite3.connect(tmp_path / "server" / "state.sqlite") as db:
            stored = [row[0] for row in db.execute("SELECT token_hash FROM devices")]
        assert device["token"] not in stored and all(len(h) == 64 for h in stored)

        # a device token opens device routes only; the admin token is not a device token
        assert httpx.get(f"{url}/v1/fleet", headers={"Authorization": f"Bearer {device['token']}"}).status_code == 401
        assert _upload(url, "adm").status_code == 401
        assert _upload(url, device["token"]).status_code == 202

        # an operator makes the device read-only: it still reads deltas, but may not upload
        r = httpx.post(f"{url}/v1/devices/{device['device_id']}/permissions", json={"may_upload": False}, headers=ADMIN)
        assert r.status_code == 200
        assert next(d for d in r.json()["devices"] if d["device_id"] == device["device_id"])["may_upload"] is False
        refused = _upload(url, device["token"])
        assert refused.status_code == 403 and refused.json()["error"] == "upload_forbidden"
        assert httpx.get(f"{url}/v1/deltas", params={"since": 0},
                         headers={"Authorization": f"Bearer {device['token']}"}).status_code in (200, 204)
        httpx.post(f"{url}/v1/devices/{device['device_id']}/permissions", json={"may_upload": True}, headers=ADMIN)
        assert _upload(url, device["token"]).status_code == 202
        assert httpx.post(f"{url}/v1/devices/nope/permissions", json={"may_upload": True}, headers=ADMIN).status_code == 404

        failures = next(line for line in httpx.get(f"{url}/metrics").text.splitlines()
                        if line.startswith("driftsync_auth_failures_total "))
        assert float(failures.split()[1]) == 4 + 1 + 1 + 1  # enrolment, admin route, admin as device, read-only upload


def test_a_state_directory_from_before_permissions_is_migrated(tmp_path):
    from server.store import SqliteStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE devices (device_id TEXT PRIMARY KEY, name TEXT NOT NULL, cohort TEXT NOT NULL, "
                   "token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL)")
        db.execute("INSERT INTO devices VALUES ('d1', 'old', 'c', 'h', 1.0)")
    [device] = SqliteStore(path).devices()
    assert device.device_id == "d1" and device.may_upload is True
