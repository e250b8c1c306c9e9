"""Signed artifacts: the encoding, the server's key, and a man in the middle that rewrites
deltas and model files between a real device and a real server."""
from __future__ import annotations

import os
import stat
import threading
import time

import httpx
import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from server.signing import Signer, key_file, load_or_create_signing_key
from shared.codec import decode, pack
from shared.images import encode_image
from shared.protocol import Delta, RegisterRequest, UploadBatch
from shared.signing import (
    SIGNATURE_HEADER,
    SignatureRefused,
    canonical,
    fingerprint,
    follow_rotations,
    verify,
)
from shared.tensors import Tensor, tensors_digest
from tests.conftest import build_test_parts, serve_in_thread, wait_for
from tests.mitm import Proxy, Reply, settle

ADMIN = {"Authorization": "Bearer admin-secret"}


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# -- the encoding and the key ----------------------------------------------------------------
def test_canonical_encoding_ignores_key_order_and_refuses_objects():
    assert canonical({"b": 1, "a": {"y": [1, 2], "x": None}}) == canonical({"a": {"x": None, "y": [1, 2]}, "b": 1})
    with pytest.raises(TypeError):
        canonical({"a": object()})


def test_a_signature_binds_every_field_its_kind_and_its_window():
    signer = Signer.generate()
    fields = {"cohort": "c", "new_version": 3, "sha256": "ab"}
    sig = signer.sign("delta", fields, ttl_s=60)
    verify(signer.public_hex, "delta", fields, sig, time.time())
    for reason, kind, changed, sig2, now in [
        ("bad_signature", "delta", fields | {"new_version": 4}, sig, time.time()),
        ("bad_signature", "model_file", fields, sig, time.time()),  # a delta's signature is no model file's
        ("bad_signature", "delta", fields, sig.model_copy(update={"expires_at": sig.expires_at + 3600}), time.time()),
        ("expired", "delta", fields, sig, time.time() + 61),
        ("unsigned", "delta", fields, None, time.time()),
        ("unknown_key", "delta", fields, Signer.generate().sign("delta", fields, 60), time.time()),
    ]:
        with pytest.raises(SignatureRefused) as refused:
            verify(signer.public_hex, kind, changed, sig2, now)
        assert refused.value.reason == reason


def test_server_key_is_kept_in_a_0600_file_and_rotates_under_the_old_key(tmp_path):
    path = tmp_path / "state" / "signing_key"
    first = load_or_create_signing_key(*key_file(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_or_create_signing_key(*key_file(path))
    assert again.public_hex == first.public_hex and again.rotations == []
    rotated = load_or_create_signing_key(*key_file(path), rotate=True)
    assert rotated.public_hex != first.public_hex and len(rotated.rotations) == 1
    assert load_or_create_signing_key(*key_file(path)).public_hex == rotated.public_hex  # the rotation is kept
    twice = rotated.rotated()
    info = twice.key_info()
    assert follow_rotations(first.public_hex, info.key, info.rotations) == twice.public_hex  # a device offline for both
    with pytest.raises(SignatureRefused) as refused:  # a key that no rotation of the pinned one leads to
        follow_rotations(first.public_hex, Signer.generate().public_hex, info.rotations)
    assert refused.value.reason == "unsigned_key_change"
    forged = info.rotations[0].model_copy(update={"new_key": Signer.generate().public_hex})
    with pytest.raises(SignatureRefused):
        follow_rotations(first.public_hex, forged.new_key, [forged])
    with pytest.raises(ValueError):
        Signer.load(b"\x93not a key")


def test_replicas_sharing_a_store_sign_with_one_key(tmp_path):
    from server.signing import kept_signer
    from server.store import open_store

    url = str(tmp_path / "shared.sqlite")
    first, second = open_store(url, migrate=True), open_store(url, migrate=True)  # two API replicas
    a = kept_signer(first, tmp_path / "a", shared=True)
    b = kept_signer(second, tmp_path / "b", shared=True)
    assert a.public_hex == b.public_hex and not (tmp_path / "a" / "signing_key").exists()
    rotated = kept_signer(second, tmp_path / "b", shared=True, rotate=True)
    assert kept_signer(first, tmp_path / "a", shared=True).public_hex == rotated.public_hex != a.public_hex
    first.close()
    second.close()


# -- a man in the middle -------------------------------------------------------------------------
@pytest.fixture
def mitm(tmp_path):
    from server.app import create_app

    parts = build_test_parts(tmp_path / "server", max_body_bytes=256 * 1024, admin_token="admin-secret")
    with serve_in_thread(create_app(parts)) as url:
        proxy = Proxy(url)
        with serve_in_thread(proxy.app()) as proxied:
            yield url, proxied, proxy, parts


def _device(url: str, path, stop: threading.Event | None = None, **kw) -> DeviceClient:
    cfg = DeviceConfig(server=url, state_dir=path, e_max_factor=2.0, dynamic_lambda=None, upload_batch=8,
                       upload_flush_s=0.1, poll_wait_s=0.5, backoff_cap_s=1.0, **kw)
    return DeviceClient(cfg, stop=stop)


def _other_cohorts_delta(url: str) -> bytes:
    """A genuine signed delta, for another device in another cohort."""
    reg = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="other", cohort="other").model_dump()).json()
    auth = {"Authorization": f"Bearer {reg['token']}"}
    batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in _images(8, 99)],
                        entropy=[0.5] * 8, captured_at=[time.time()] * 8)
    assert httpx.post(f"{url}/v1/uploads", content=pack(batch), headers=auth).status_code == 202
    r = httpx.get(f"{url}/v1/deltas", params={"since": 0, "wait": 20}, headers=auth)
    assert r.status_code == 200
    return r.content


def test_a_device_behind_a_rewriting_proxy_keeps_its_parameters_and_says_why(mitm, tmp_path):
    url, proxied, proxy, parts = mitm
    device = _device(proxied, tmp_path / "device").start()
    assert device.status()["trust"]["server_key_fingerprint"] == fingerprint(parts.signer.public_hex)
    captured: list[bytes] = []

    def capture(method: str, path: str, reply: Reply) -> Reply:
        if path == "/v1/deltas" and reply.status == 200:
            captured.append(reply.body)
        return reply

    proxy.rewrite = capture
    for i in range(3):
        device.predict(_images(8, seed=i))
    wait_for(lambda: device.deltas.applied >= 1, what="a genuine delta through the proxy")
    other = _other_cohorts_delta(url)
    cohort = device.identity.cohort
    settle(device, lambda: parts.store.version_number(cohort))
    version, params = device.model.version, {k: v.copy() for k, v in device.model.params.items()}
    proxy.params = lambda path, p: p | {"since": "0"} if path == "/v1/deltas" else p  # the server always answers

    def rewrite_delta(change):
        def rewrite(method: str, path: str, reply: Reply) -> Reply:
            if path != "/v1/deltas" or reply.status != 200:
                return reply
            delta = decode(reply.body, Delta)
            return Reply(200, reply.headers, pack(change(delta)))
        return rewrite

    def bigger(delta: Delta) -> Delta:
        new = {k: Tensor.from_numpy(t.to_numpy() * 1.5) for k, t in delta.params.items()}
        return delta.model_copy(update={"params": new, "sha256": tensors_digest(new)})

    attacks = [
        ("bad_signature", rewrite_delta(bigger)),  # a new payload, its hash recomputed
        ("bad_signature", rewrite_delta(lambda d: d.model_copy(update={"new_version": d.new_version + 100,
                                                                        "base_version": d.new_version + 99}))),
        ("bad_signature", rewrite_delta(lambda d: d.model_copy(update={"cohort": "evil", "moved_from": cohort}))),
        ("unsigned", rewrite_delta(lambda d: d.model_copy(update={"signature": None}))),
        ("wrong_device", lambda m, p, r: Reply(200, r.headers, other) if p == "/v1/deltas" else r),  # rollback by cohort
        ("stale", lambda m, p, r: Reply(200, r.headers, captured[0]) if p == "/v1/deltas" else r),  # a replayed old one
    ]
    for reason, attack in attacks:
        before = device.deltas.refused[reason]
        proxy.rewrite = attack
        wait_for(lambda reason=reason, before=before: device.deltas.refused[reason] > before,
                 what=f"a refusal for {reason}")
        assert device.model.version == version and device.identity.cohort == cohort
        assert all(np.array_equal(device.model.params[k], v) for k, v in params.items())

    # expired: the proxy withholds a fresh, genuine delta until its signature runs out, then hands it on
    held: list[bytes] = []
    proxy.params = None
    proxy.rewrite = None
    parts.settings.signature_ttl_s = 0.5

    def hold(method: str, path: str) -> Reply | None:
        if path != "/v1/deltas":
            return None
        if held:
            time.sleep(0.2)
            return Reply(204, {}, b"")
        r = httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers={"Authorization": f"Bearer {device.identity.token}"})
        held.append(r.content)
        return Reply(204, {}, b"")

    proxy.intercept = hold
    wait_for(lambda: held, what="a withheld delta")
    parts.settings.signature_ttl_s = 600.0
    time.sleep(1.0)
    proxy.intercept = lambda m, p: Reply(200, {"content-type": "application/msgpack"}, held[0]) if p == "/v1/deltas" else None
    wait_for(lambda: device.deltas.refused["expired"] >= 1, what="an expired delta refused")
    assert device.model.version == version

    refused = device.status()["deltas"]["refused"]
    assert {"bad_signature", "unsigned", "wrong_device", "stale", "expired"} <= set(refused), refused
    assert device.status()["threads"]["delta-poller"]["state"] == "running"

    # the honest path still works: a signed move is followed...
    proxy.intercept = None
    moved = httpx.post(f"{url}/v1/devices/{device.identity.device_id}/cohort", json={"cohort": "fresh"}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    wait_for(lambda: device.identity.cohort == "fresh", what="the signed move followed")
    # ...and a genuine delta of the cohort it left, replayed, cannot move it back (a rollback by cohort change)
    version, before = device.model.version, device.deltas.refused["unsigned_move"]
    proxy.intercept = lambda m, p: Reply(200, {}, captured[0]) if p == "/v1/deltas" else None
    wait_for(lambda: device.deltas.refused["unsigned_move"] > before, what="an old cohort's delta refused")
    assert device.identity.cohort == "fresh" and device.model.version == version
    device.stop()


def test_model_files_and_enrolment_rewritten_on_the_way_are_refused(mitm, tmp_path):
    url, proxied, proxy, parts = mitm
    evil = b"\x08\x07" + os.urandom(64)

    def swap_model(method: str, path: str, reply: Reply) -> Reply:
        """Serve another student.onnx, and make the descriptor name its hash."""
        import hashlib
        import json
        if path == "/v1/devices":
            body = json.loads(reply.body)
            body["model"]["onnx_sha256"] = hashlib.sha256(evil).hexdigest()
            return Reply(reply.status, reply.headers, json.dumps(body).encode())
        if path == "/v1/model/student.onnx":
            return Reply(200, reply.headers | {"x-content-sha256": hashlib.sha256(evil).hexdigest()}, evil)
        return reply

    proxy.rewrite = swap_model
    with pytest.raises(SignatureRefused) as refused:
        _device(proxied, tmp_path / "a").start()
    assert refused.value.reason == "bad_signature"

    def strip_signature(method: str, path: str, reply: Reply) -> Reply:
        return Reply(reply.status, {k: v for k, v in reply.headers.items() if k.lower() != SIGNATURE_HEADER.lower()},
                     reply.body)

    proxy.rewrite = strip_signature
    stop = threading.Event()
    device = _device(proxied, tmp_path / "b", stop=stop)
    outcome: list[BaseException] = []
    starter = threading.Thread(target=lambda: _catch(device.start, outcome), daemon=True)
    starter.start()
    wait_for(lambda: device.models_refused["unsigned"] >= 2, what="unsigned model files refused, again and again")
    stop.set()
    starter.join(timeout=30)
    assert outcome and isinstance(outcome[0], SignatureRefused)
    assert not (tmp_path / "b" / "model" / "student.onnx").exists()  # nothing unsigned is kept

    proxy.rewrite = None  # the same device, once the path is clean, starts and predicts
    device = _device(proxied, tmp_path / "b").start()
    assert device.predict(_images(4)).labels.shape == (4,)
    device.stop()


def _catch(call, outcome: list[BaseException]) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (the test inspects it)
        outcome.append(exc)


def test_a_pinned_device_follows_a_signed_rotation_and_refuses_a_key_swap(mitm, tmp_path):
    url, proxied, proxy, parts = mitm
    device = _device(url, tmp_path / "d").start()
    old = device.identity.server_key
    parts.signer = parts.signer.rotated()  # what `driftsync serve --rotate-signing-key` does at start
    for i in range(3):
        device.predict(_images(8, seed=20 + i))
    wait_for(lambda: device.deltas.applied >= 1, what="a delta signed by the rotated key")
    assert device.identity.server_key == parts.signer.public_hex != old
    assert device.state.load_identity(url).server_key == parts.signer.public_hex  # pinned on disk too

    rotated = parts.signer.public_hex
    parts.signer = Signer.generate()  # a server (or an impostor) with an unrelated key
    for i in range(3):
        device.predict(_images(8, seed=30 + i))
    wait_for(lambda: device.deltas.refused["unknown_key"] >= 1, what="a delta under an unrelated key refused")
    assert device.identity.server_key == rotated  # still pinned to the last signed key
    assert device.state.load_delta().signature.key_id == fingerprint(rotated)  # nothing under the new key applied
    device.stop()


def test_enrolment_refuses_a_key_other_than_the_given_fingerprint(mitm, tmp_path):
    url, proxied, proxy, parts = mitm
    with pytest.raises(SignatureRefused) as refused:
        _device(url, tmp_path / "x", server_key_fingerprint="0" * 64).start()
    assert refused.value.reason == "key_mismatch"
    published = httpx.get(f"{url}/v1/signing-key").json()["fingerprint"]
    assert published == fingerprint(parts.signer.public_hex)
    device = _device(url, tmp_path / "y", server_key_fingerprint=published.upper()).start()
    assert device.identity.server_key == parts.signer.public_hex
    device.stop()
