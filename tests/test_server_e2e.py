"""The loop over real HTTP: register, upload, adapt, deltas back; and every refusal path."""
from __future__ import annotations

import time

import httpx
import msgpack
import numpy as np

from device_client.client import DeviceClient, DeviceConfig
from shared.codec import pack
from shared.images import encode_image
from shared.protocol import Delta, RegisterRequest, UploadBatch
from shared.tensors import Tensor, tensors_digest
from tests.conftest import wait_for


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _register(url: str, name: str = "t", cohort: str | None = None) -> dict:
    r = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name=name, cohort=cohort).model_dump())
    assert r.status_code == 201, r.text
    return r.json()



def _device(url: str, tmp_path, **kw) -> DeviceClient:
    # an E_max above ln(10) keeps every sample: the tiny random student is very uncertain
    cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=2.0, dynamic_lambda=None,
                       upload_batch=8, upload_flush_s=0.1, poll_wait_s=2.0, **kw)
    return DeviceClient(cfg).start()


def test_device_registers_uploads_and_applies_deltas(tiny_server, tmp_path):
    url, parts = tiny_server
    device = _device(url, tmp_path)
    assert device.downloaded_model and device.model.version == 0
    for i in range(6):
        out = device.predict(_images(8, seed=i))
        assert out.labels.shape == (8,) and out.uploaded.all()
    wait_for(lambda: device.deltas.applied >= 1)
    assert device.deltas.applied >= 1 and device.deltas.bytes > 0
    status = device.status()
    assert status["uploads"]["sent"] > 0 and status["uploads"]["dropped"] == 0
    device.stop()
    metrics = httpx.get(f"{url}/metrics").text
    assert "driftsync_adaptation_steps_total" in metrics and "driftsync_upload_samples_total" in metrics


def test_restarted_device_resumes_at_last_delta_without_download(tiny_server, tmp_path):
    url, parts = tiny_server
    first = _device(url, tmp_path)
    for i in range(4):
        first.predict(_images(8, seed=10 + i))
    wait_for(lambda: first.deltas.applied >= 1)
    first.stop()
    applied = first.model.version
    saved = first.state.load_delta()
    assert saved is not None and saved.new_version == applied

    second = _device(url, tmp_path)
    assert second.identity.device_id == first.identity.device_id
    assert not second.downloaded_model
    assert second.model.version >= applied
    if second.model.version == applied:
        for name, tensor in saved.params.items():
            np.testing.assert_array_equal(second.model.params[name], tensor.to_numpy())
    second.stop()


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}


def _assert_json_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"]


def test_bad_requests_get_clear_json_errors_and_server_keeps_serving(tiny_server):
    url, parts = tiny_server
    token = _register(url)["token"]
    good = UploadBatch(device_version=0, codec="png", images=[encode_image(_images(1)[0], "png")],
                       entropy=[0.5], captured_at=[time.time()])

    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=b"\xc1\xff\x00garbage", headers=_auth(token)), 400)
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=b"\x00" * (300 * 1024), headers=_auth(token)), 413)
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=pack(good), headers=_auth("wrong-token")), 401)
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=pack(good)), 401)
    ext = msgpack.packb({"images": msgpack.ExtType(42, b"x")}, use_bin_type=True)
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=ext, headers=_auth(token)), 400)
    not_png = good.model_copy(update={"images": [b"definitely not a png"]})
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=pack(not_png), headers=_auth(token)), 400)
    wrong_size = good.model_copy(update={"images": [encode_image(np.zeros((64, 64, 3), np.uint8), "png")]})
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=pack(wrong_size), headers=_auth(token)), 400)
    body = good.model_dump()
    body["entropy"] = [float("nan")]
    _assert_json_error(httpx.post(f"{url}/v1/uploads", content=pack(body), headers=_auth(token)), 400)
    _assert_json_error(httpx.get(f"{url}/v1/deltas", params={"since": -1}, headers=_auth(token)), 422)
    _assert_json_error(httpx.get(f"{url}/v1/deltas", params={"since": 99}, headers=_auth(token)), 409)

    _assert_json_error(httpx.post(f"{url}/v1/devices", json={"device_name": "has space"}), 422)
    _assert_json_error(httpx.post(f"{url}/v1/devices", content=b"not json"), 422)

    r = httpx.post(f"{url}/v1/uploads", content=pack(good), headers=_auth(token))
    assert r.status_code == 202 and r.json()["accepted"] == 1
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=_auth(token)).status_code == 204
    assert "/v1/uploads" in httpx.get(f"{url}/openapi.json").json()["paths"]
    assert 'driftsync_auth_failures_total 2.0' in httpx.get(f"{url}/metrics").text


def _forged_delta(device: DeviceClient, new_version: int, scale: float = 1.0, params: dict | None = None,
                  sha256: str | None = None, signer=None) -> Delta:
    """A delta for `device`, signed by `signer` (the server's key) over whatever it holds."""
    from shared.signing import delta_fields

    params = params or {k: Tensor.from_numpy(v * scale) for k, v in device.source_params.items()}
    delta = Delta(cohort=device.identity.cohort, base_version=0, new_version=new_version, created_at=time.time(),
                  newest_upload_at=time.time(), params=params, sha256=sha256 or tensors_digest(params),
                  device_id=device.identity.device_id)
    return delta if signer is None else delta.model_copy(update={"signature": signer.sign("delta", delta_fields(delta), 600)})


def test_device_refuses_stale_tampered_and_malformed_deltas(tiny_server, tmp_path):
    """Payload checks, behind a valid signature: what a server bug, not an attacker, could send."""
    url, parts = tiny_server
    signer = parts.signer
    device = _device(url, tmp_path)
    assert device.apply_delta(_forged_delta(device, 5, signer=signer))
    assert device.model.version == 5

    assert not device.apply_delta(_forged_delta(device, 5, signer=signer))  # not newer
    assert not device.apply_delta(_forged_delta(device, 3, signer=signer))  # rollback
    good = _forged_delta(device, 9)
    name = next(iter(good.params))
    tampered = good.params | {name: Tensor.from_numpy(good.params[name].to_numpy() + 1.0)}
    assert not device.apply_delta(_forged_delta(device, 9, params=tampered, sha256=good.sha256, signer=signer))
    extra_params = good.params | {"evil.weight": Tensor.from_numpy(np.ones(3, np.float32))}
    assert not device.apply_delta(_forged_delta(device, 10, params=extra_params, signer=signer))
    nan_params = {k: Tensor.from_numpy(np.full(v.shape, np.nan, np.float32)) for k, v in device.source_params.items()}
    assert not device.apply_delta(_forged_delta(device, 11, params=nan_params, signer=signer))
    assert not device.apply_delta(_forged_delta(device, 12))  # unsigned

    assert device.model.version == 5
    assert device.deltas.refused == {"stale": 2, "hash_mismatch": 1, "unexpected_tensors": 1, "non_finite": 1,
                                     "unsigned": 1}
    device.stop()


def test_cohort_members_share_one_state(tiny_server, tmp_path):
    url, parts = tiny_server
    a = _register(url, "a", cohort="site-1")
    b = _register(url, "b", cohort="site-1")
    c = _register(url, "c")
    assert a["cohort"] == b["cohort"] == "site-1"
    assert c["cohort"] not in ("site-1", a["cohort"]) and c["cohort"].startswith("device-")
    batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in _images(8)],
                        entropy=[0.5] * 8, captured_at=[time.time()] * 8)
    assert httpx.post(f"{url}/v1/uploads", content=pack(batch), headers=_auth(a["token"])).status_code == 202
    r = httpx.get(f"{url}/v1/deltas", params={"since": 0, "wait": 20}, headers=_auth(b["token"]))
    assert r.status_code == 200
    assert httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=_auth(c["token"])).status_code == 204


def test_device_estimates_statistics_locally_and_gets_affine_only_deltas(tiny_server, tmp_path):
    url, parts = tiny_server
    device = _device(url, tmp_path)
    source_mean = {k: v.copy() for k, v in device.source_params.items() if k.endswith("running_mean")}
    bright = np.full((16, 32, 32, 3), 250, np.uint8)
    for _ in range(4):
        device.predict(bright)
    wait_for(lambda: device.stats_updates >= 1 and device.deltas.applied >= 1)  # batches may coalesce
    assert any(np.abs(device.model.params[k] - v).max() > 1e-3 for k, v in source_mean.items())
    token = device.identity.token
    r = httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=_auth(token))
    from shared.codec import decode
    delta = decode(r.content, Delta)
    assert delta.params and all(k.endswith((".weight", ".bias")) for k in delta.params)
    assert device.status()["statistics"]["updates"] >= 1
    device.stop()


def test_batch_statistics_device_predicts_as_train_mode_bn_and_gets_affine_only_deltas(tiny_server, tmp_path):
    """Forward-only `bn`: each batch normalised by its own statistics; the cloud distils the same way."""
    import torch

    from server.baselines import use_batch_statistics
    from server.engine import to_input
    from tests.conftest import tiny_pair, wait_for

    url, _ = tiny_server
    device = _device(url, tmp_path, normalization="batch")
    frames = _images(16, seed=3)
    out = device.predict(frames)
    with torch.no_grad():
        expected = use_batch_statistics(tiny_pair()[0])(to_input(frames)).softmax(dim=1)
    np.testing.assert_allclose(out.confidence, expected.max(dim=1).values.numpy(), atol=1e-4)
    wait_for(lambda: device.deltas.applied >= 1)
    r = httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=_auth(device.identity.token))
    from shared.codec import decode
    delta = decode(r.content, Delta)
    assert delta.params and all(k.endswith((".weight", ".bias")) for k in delta.params)
    after = device.predict(frames)
    assert after.version >= 1 and np.abs(after.confidence - out.confidence).max() > 0  # the delta is in use
    status = device.status()
    assert status["statistics"] == {"normalization": "batch", "updates": 0}
    assert status["passes"]["forward_samples"] == 32 and device.deltas.freshness_s
    device.stop()


def test_sampled_statistics_device_normalises_each_batch_by_its_first_frames(tiny_server, tmp_path):
    """`sampled`: the first --stats-sample frames as train-mode BN gives them; the rest fused (the
    weights rewritten in place) with those frames' statistics, as torch's eval mode with them as
    running statistics; the cloud distils with batch statistics, so the deltas are affine-only.
    A batch of at most WHOLE_BATCH_FACTOR samples is measured whole, as `batch` does."""
    import torch

    from server.baselines import use_batch_statistics
    from server.engine import to_input
    from server.norm import norm_layers
    from tests.conftest import tiny_pair

    url, _ = tiny_server
    from device_client.statistics import WHOLE_BATCH_FACTOR

    device = _device(url, tmp_path, normalization="sampled", stats_sample=8)
    small = _images(WHOLE_BATCH_FACTOR * 8, seed=5)
    with torch.no_grad():
        whole = use_batch_statistics(tiny_pair()[0])(to_input(small)).softmax(dim=1)
    np.testing.assert_allclose(device.predict(small).confidence, whole.max(dim=1).values.numpy(), atol=1e-4)
    frames = _images(WHOLE_BATCH_FACTOR * 8 + 8, seed=4)
    out = device.predict(frames)
    x = to_input(frames)
    student = tiny_pair()[0].eval()
    seen: dict[str, torch.Tensor] = {}
    for name, layer in norm_layers(student).items():
        layer.register_forward_hook(lambda mod, inputs, output, name=name: seen.__setitem__(name, inputs[0]))
    with torch.no_grad():
        head = use_batch_statistics(tiny_pair()[0])(x[:8]).softmax(dim=1)
        student.train()
        student(x[:8])
        student.eval()
        for name, layer in norm_layers(student).items():
            layer.running_mean = seen[name].mean(dim=(0, 2, 3))
            layer.running_var = seen[name].var(dim=(0, 2, 3), unbiased=False)
        rest = student(x[8:]).softmax(dim=1)
    np.testing.assert_allclose(out.confidence[:8], head.max(dim=1).values.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.confidence[8:], rest.max(dim=1).values.numpy(), atol=1e-4)
    from device_client.scoring import to_model_input
    measured = device.model.run_measured(to_model_input(frames))[2]  # what the batch's uploads carry
    assert set(measured) == {f"{name}.{field}" for name in seen for field in ("running_mean", "running_var")}
    for name, layer in norm_layers(student).items():
        np.testing.assert_allclose(measured[f"{name}.running_mean"], layer.running_mean.numpy(), atol=1e-4)
        np.testing.assert_allclose(measured[f"{name}.running_var"], layer.running_var.numpy(), rtol=1e-3)
    wait_for(lambda: device.deltas.applied >= 1)
    r = httpx.get(f"{url}/v1/deltas", params={"since": 0}, headers=_auth(device.identity.token))
    from shared.codec import decode
    delta = decode(r.content, Delta)
    assert delta.params and all(k.endswith((".weight", ".bias")) for k in delta.params)
    after = device.predict(frames)
    assert after.version >= 1 and np.abs(after.confidence[8:] - out.confidence[8:]).max() > 0  # the delta, folded in
    assert device.status()["statistics"] == {"normalization": "sampled", "updates": 0}
    device.stop()


def test_bad_device_statistics_are_refused(tiny_server):
    url, parts = tiny_server
    token = _register(url)["token"]
    name = next(k for k in parts.model().descriptor().parameters if k.endswith("running_var"))
    shape = parts.model().descriptor().parameters[name]
    base = UploadBatch(device_version=0, codec="png", images=[encode_image(_images(1)[0], "png")],
                       entropy=[0.5], captured_at=[time.time()])
    for stats in (
        {name: Tensor.from_numpy(np.full(shape, -1.0, np.float32))},
        {name: Tensor.from_numpy(np.full(shape, np.nan, np.float32))},
        {"net.0.weight": Tensor.from_numpy(np.ones(shape, np.float32))},
        {name: Tensor.from_numpy(np.ones((shape[0] + 1,), np.float32))},
    ):
        r = httpx.post(f"{url}/v1/uploads", content=pack(base.model_copy(update={"norm_stats": stats})), headers=_auth(token))
        _assert_json_error(r, 400)
        assert r.json()["error"] == "bad_statistics"
    partial = {name: Tensor.from_numpy(np.ones(shape, np.float32))}  # fine as running statistics, not as a batch's
    for batch_statistics, status in ((True, 400), (False, 202)):
        upload = base.model_copy(update={"norm_stats": partial, "batch_statistics": batch_statistics})
        r = httpx.post(f"{url}/v1/uploads", content=pack(upload), headers=_auth(token))
        assert r.status_code == status, r.text
    assert "must name every layer" in httpx.post(
        f"{url}/v1/uploads", content=pack(base.model_copy(update={"norm_stats": partial, "batch_statistics": True})),
        headers=_auth(token)).json()["detail"]


def test_device_keeps_predicting_and_spools_when_the_server_dies(tmp_path):
    from server.app import create_app
    from tests.conftest import build_test_parts, serve_in_thread

    with serve_in_thread(create_app(build_test_parts(tmp_path / "server"))) as url:
        device = _device(url, tmp_path)
    for i in range(4):  # the server is gone now
        out = device.predict(_images(8, seed=40 + i))
        assert out.labels.shape == (8,) and out.version == 0
    wait_for(lambda: device.uploader.stats.retries > 0 and device.status()["uploads"]["spooled"] == 32)
    status = device.status()
    assert status["uploads"]["sent"] == 0 and status["uploads"]["dropped"] == 0
    device.stop(flush_timeout=5)
    assert len(list((tmp_path / "device" / "spool").glob("*.upload"))) == status["uploads"]["spooled_batches"]


def test_replay_tallies_per_sample_domains_of_a_mixed_stream(tiny_server, tmp_path):
    from device_client.replay import run_replay
    from driftsync.data import streams

    url, _ = tiny_server
    device = _device(url, tmp_path)
    images, labels = streams.embedded_base(16)
    summary = run_replay(device, streams.stream("mixed", streams.corrupting(images, labels), ["fog", "contrast"], 5, 8), fps=None)
    rows = {d["name"]: d for d in summary["domains"]}
    assert set(rows) == {"fog", "contrast"}
    assert all(r["samples"] == 16 for r in rows.values())
    assert sum(r["uploaded"] for r in rows.values()) == summary["status"]["uploads"]["offered"]
    assert sum(r["uplink_bytes"] for r in rows.values()) == summary["status"]["uploads"]["sent_bytes"]


def test_device_fails_over_between_the_servers_it_is_given(tiny_server, tmp_path):
    """`--server A,B`: with A gone, the device enrols, uploads and adapts through B."""
    from driftsync.processes import free_port

    url, parts = tiny_server
    dead = f"http://127.0.0.1:{free_port()}"
    device = _device(f"{dead},{url}", tmp_path)
    for i in range(6):
        device.predict(_images(8, seed=i))
    wait_for(lambda: device.deltas.applied >= 1, what="a delta through the second server")
    assert device.status()["uploads"]["sent"] > 0
    device.stop()
    restarted = _device(f"{dead},{url}", tmp_path)  # the same list: the same identity, nothing downloaded again
    assert not restarted.downloaded_model
    restarted.stop()
