"""The upload codec: specs, round trips and bounds (shared, no torch); the server taking every
codec over real HTTP and refusing bad images; the uplink budget at 224 px with the default."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from driftsync.data.corruptions import corrupt
from shared.codec import pack
from shared.images import (
    DEFAULT_UPLOAD_CODEC,
    MIN_UPLOAD_SIDE,
    ImageDecodeError,
    UploadEncoding,
    decode_image,
    downscale,
    encode_image,
)
from shared.protocol import RegisterRequest, UploadBatch
from tests.conftest import wait_for

ALLOWED = ["auto", "webp-lossless", "webp:90", "webp:50", "jpeg", "jpeg:75", "png", "raw"]


def _scene(size: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with edges (what a camera sees), not noise, so lossy codecs behave as on photos."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("spec", ALLOWED)
def test_every_allowed_spec_parses_and_round_trips_at_the_model_size(spec):
    encoding = UploadEncoding.parse(spec)
    image = _scene(32)
    decoded = decode_image(encoding.encode(image), encoding.codec, (32, 32))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    if encoding.quality is None and spec != "jpeg":
        np.testing.assert_array_equal(decoded, image)  # lossless is exact
    else:
        assert np.abs(decoded.astype(int) - image).mean() < 12  # lossy, but the same picture


@pytest.mark.parametrize("spec", ["gif", "webp:0", "webp:101", "jpeg:x", "png:50", "raw:9", "webp-lossless:80", ""])
def test_bad_specs_are_refused_with_the_allowed_list(spec):
    with pytest.raises(ValueError, match="webp-lossless, webp:Q, jpeg:Q"):
        UploadEncoding.parse(spec)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="at least 8"):
        UploadEncoding.parse("webp:75", max_side=MIN_UPLOAD_SIDE - 1)
    with pytest.raises(ValueError, match="raw uploads carry no size"):
        UploadEncoding.parse("raw", max_side=16)
    assert UploadEncoding.parse(DEFAULT_UPLOAD_CODEC).name.split("@")[0] == DEFAULT_UPLOAD_CODEC


def test_auto_is_lossless_for_small_images_and_webp75_for_large_ones():
    """At 32 px lossy WebP cost the teacher 10 points on the uploads for 1.2 kB an image; at
    224 px it cost no error and saves 26 kB (BENCHMARKS.md)."""
    auto = UploadEncoding.parse("auto")
    small, large = _scene(32, seed=5), _scene(224, seed=5)
    np.testing.assert_array_equal(decode_image(auto.encode(small), auto.codec, (32, 32)), small)
    assert auto.encode(large) == UploadEncoding.parse("webp:75").encode(large)
    assert auto.encode(large) != UploadEncoding.parse("webp-lossless").encode(large)
    downscaled = UploadEncoding.parse("auto", max_side=32)  # the size that decides is the one sent
    assert downscaled.encode(large) == UploadEncoding.parse("webp-lossless", max_side=32).encode(large)
    assert downscaled.name == "auto@32px"


def test_lower_quality_and_downscale_cost_fewer_bytes():
    image = _scene(224, seed=3)
    sizes = [len(UploadEncoding.parse(s, side).encode(image))
             for s, side in (("webp-lossless", None), ("webp:90", None), ("webp:50", None), ("webp:50", 112))]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 4, sizes


def test_a_downscaled_upload_is_scaled_back_to_the_model_size():
    image = _scene(224, seed=1)
    encoding = UploadEncoding.parse("webp:90", max_side=112)
    data = encoding.encode(image)
    with Image.open(io.BytesIO(data)) as pil:
        assert pil.size == (112, 112)  # what travels is the small one
    decoded = decode_image(data, "webp", (224, 224))
    assert decoded.shape == (224, 224, 3)
    assert np.abs(decoded.astype(int) - image).mean() < 6  # a smooth scene survives a 2x round trip
    assert downscale(image, 300) is image  # already small enough: untouched


@pytest.mark.parametrize("shape, why", [
    ((64, 64), "larger than the model"),
    ((32, 16), "another aspect"),
    ((4, 4), "too small"),
])
def test_decode_refuses_sizes_that_are_not_the_model_or_a_downscale_of_it(shape, why):
    data = encode_image(np.zeros((*shape, 3), np.uint8), "png")
    with pytest.raises(ImageDecodeError, match="expected 32x32 or a downscale"):
        decode_image(data, "png", (32, 32))


def test_decode_refuses_the_wrong_format_and_broken_bytes():
    jpeg = encode_image(_scene(32), "jpeg", 75)
    with pytest.raises(ImageDecodeError, match="the batch says webp"):
        decode_image(jpeg, "webp", (32, 32))
    with pytest.raises(ImageDecodeError, match="cannot decode jpeg"):
        decode_image(jpeg[: len(jpeg) // 2], "jpeg", (32, 32))
    with pytest.raises(ImageDecodeError):
        decode_image(b"RIFF\x00\x00\x00\x00WEBPVP8 garbage", "webp", (32, 32))
    with pytest.raises(ImageDecodeError, match="unknown codec"):
        decode_image(jpeg, "gif", (32, 32))  # type: ignore[arg-type]


def test_a_huge_declared_image_is_refused_before_its_pixels_are_decompressed():
    big = encode_image(np.zeros((4000, 4000, 3), np.uint8), "png")  # ~50 kB on the wire, 48 MB decoded
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="4000x4000"):
        decode_image(big, "png", (224, 224))
    assert time.perf_counter() - started < 0.5


# -- the server over real HTTP ------------------------------------------------------------------

def _register(url: str) -> dict:
    r = httpx.post(f"{url}/v1/devices", json=RegisterRequest(device_name="codec").model_dump())
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}", "Content-Type": "application/msgpack"}


def _batch(codec: str, images: list[bytes]) -> bytes:
    return pack(UploadBatch(device_version=0, codec=codec, images=images, entropy=[0.5] * len(images),
                            captured_at=[time.time()] * len(images)))


@pytest.mark.parametrize("spec, side", [(s, None) for s in ALLOWED] + [("webp:75", 16), ("jpeg:75", 24)])
def test_server_accepts_and_learns_from_every_codec(tiny_server, spec, side):
    url, parts = tiny_server
    headers = _register(url)
    encoding = UploadEncoding.parse(spec, side)
    before = parts.worker.stats.samples
    r = httpx.post(f"{url}/v1/uploads", content=_batch(encoding.codec, [encoding.encode(_scene(32, i)) for i in range(8)]),
                   headers=headers)
    assert r.status_code == 202 and r.json()["accepted"] == 8, r.text
    wait_for(lambda: parts.worker.stats.samples >= before + 8, timeout=60, what="the upload learnt from")


def test_server_refuses_bad_images_with_a_json_error_and_keeps_serving(tiny_server):
    url, parts = tiny_server
    headers = _register(url)
    good = encode_image(_scene(32), "webp", 75)
    bad = {
        "malformed": _batch("webp", [good[:40]]),
        "oversize": _batch("png", [encode_image(np.zeros((64, 64, 3), np.uint8), "png")]),
        "wrong format": _batch("webp", [encode_image(_scene(32), "jpeg", 75)]),
        "wrong aspect": _batch("webp", [encode_image(np.zeros((32, 16, 3), np.uint8), "webp", 75)]),
        "one bad among good": _batch("webp", [good, good, b"not an image"]),
    }
    for why, body in bad.items():
        r = httpx.post(f"{url}/v1/uploads", content=body, headers=headers)
        assert r.status_code == 400, (why, r.text)
        assert r.json()["error"] == "bad_image" and r.json()["detail"], why
    assert parts.uploads.depth() == 0  # nothing of a refused batch was queued
    r = httpx.post(f"{url}/v1/uploads", content=_batch("webp", [good]), headers=headers)
    assert r.status_code == 202


# -- the uplink budget at 224 px -------------------------------------------------------------------

@pytest.fixture
def server_224(tmp_path):
    """The tiny fully convolutional pair, published at 224 px."""
    from server.app import ServerSettings, create_app
    from server.artifact import PublishedModel
    from server.engine import CemaConfig, CemaEngine
    from server.export import export_student
    from server.main import build_parts
    from server.store import SqliteStore
    from tests.conftest import serve_in_thread, tiny_pair

    (tmp_path / "server").mkdir()
    student, teacher = tiny_pair()
    engine = CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8),
                        student_input_shape=(3, 224, 224))
    model = PublishedModel("tiny224", [f"c{i}" for i in range(10)], (3, 224, 224), export_student(student, (3, 224, 224)))
    parts = build_parts(engine, model, SqliteStore(tmp_path / "server" / "state.sqlite"),
                        ServerSettings(device_samples_per_s=None), step_max_wait_s=0.2)
    with serve_in_thread(create_app(parts)) as url:
        yield url


def _frames_224(n: int) -> np.ndarray:
    """Camera-like 224-px frames: smooth scenes, half of them under severity-3 noise and blur."""
    scenes = np.stack([_scene(224, seed=i) for i in range(n)])
    rng = np.random.default_rng(0)
    noisy = corrupt(scenes[: n // 4], "gaussian_noise", 3, rng, constants="imagenet")
    blurred = corrupt(scenes[n // 4: n // 2], "defocus_blur", 3, rng, constants="imagenet")
    return np.concatenate([noisy, blurred, scenes[n // 2:]])


@pytest.mark.parametrize("codec, expect_drops", [(DEFAULT_UPLOAD_CODEC, False), ("webp-lossless", True)])
def test_the_uplink_budget_holds_at_224_px(server_224, tmp_path, codec, expect_drops):
    """7.5 uploads/s (30 frames/s, a quarter uploaded) on a 120 kB/s uplink: the default fits
    without dropping; lossless WebP does not, and the budget drops rather than overspends."""
    from device_client.selection import UploadBudget
    from device_client.spool import Spool
    from device_client.transport import ServerApi
    from device_client.uploader import Uploader

    budget_bytes_per_s, rate, seconds = 120_000.0, 7.5, 4.0
    token = _register(server_224)["Authorization"].removeprefix("Bearer ")
    budget = UploadBudget.from_rates(None, budget_bytes_per_s)
    burst = budget.bytes.burst
    uploader = Uploader(ServerApi(server_224, token), budget, Spool(tmp_path / codec.replace(":", "q"), 1 << 26),
                        encoding=UploadEncoding.parse(codec), batch_size=8, flush_s=0.2)
    uploader.start()
    frames = _frames_224(int(rate * seconds))
    started = time.monotonic()
    for i, frame in enumerate(frames):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        uploader.offer(frame[None], np.array([0.5]), np.array([time.time()]), 0)
    uploader.close(flush_timeout=30)
    elapsed = time.monotonic() - started
    stats = uploader.stats
    assert stats.offered == len(frames) and stats.refused == 0
    image_bytes = stats.sent_bytes  # request bytes: images plus the msgpack frame, at least what the budget counted
    assert image_bytes <= budget_bytes_per_s * elapsed + burst + 2000 * stats.requests, (image_bytes, elapsed)
    if expect_drops:
        assert stats.dropped_budget > 0
    else:
        assert stats.dropped_budget == 0 and stats.sent == len(frames)
        assert image_bytes / stats.sent < 15_000, image_bytes / stats.sent  # the bound per 224-px sample
