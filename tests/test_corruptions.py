"""Tests for driftsync.data.corruptions on synthetic images (no external data)."""

from __future__ import annotations

import numpy as np
import pytest

from driftsync.data.corruptions import (
    CONSTANTS,
    CORRUPTIONS,
    constants_for_size,
    corrupt,
)

# Corruptions whose output does not depend on the rng.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
SET_SIZES = (("cifar10", 32), ("imagenet", 64))


def synthetic_images(n: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """Colour gradients, a disc, a bar and a fine ripple: texture without saturation."""
    width = height if width is None else width
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = yy / height, xx / width
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        a = rng.uniform(0.2, 0.8, 3)
        img = np.stack([a[0] * xx + 0.2, a[1] * yy + 0.1, 0.5 * a[2] * (xx + yy) + 0.15], axis=-1)
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0.1, 0.9, 3)
        by, bx = rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.5)
        img[(np.abs(yy - by) < 0.05) & (xx > bx)] = rng.uniform(0.1, 0.9, 3)
        fy, fx, phase = rng.uniform(3, 9), rng.uniform(3, 9), rng.uniform(0, 2 * np.pi)
        img += 0.08 * (np.sin(2 * np.pi * fx * xx + phase) * np.sin(2 * np.pi * fy * yy))[..., None]
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def test_tables_are_complete() -> None:
    assert len(CORRUPTIONS) == 15 and CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    for table in CONSTANTS.values():
        assert tuple(table) == CORRUPTIONS
        assert all(len(per_severity) == 5 for per_severity in table.values())


@pytest.mark.parametrize(("constants", "size"), SET_SIZES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_returns_changed_uint8(name: str, constants: str, size: int) -> None:
    images = synthetic_images(3, size)
    before = images.copy()
    for severity in range(1, 6):
        out = corrupt(images, name, severity, np.random.default_rng(severity), constants)
        assert out.dtype == np.uint8 and out.shape == images.shape
        # No table entry is a no-op on textured, unsaturated images.
        assert not np.array_equal(out, images), (name, severity)
    np.testing.assert_array_equal(images, before)  # input untouched


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seed_determinism(name: str) -> None:
    images = synthetic_images(2, 32)
    a = corrupt(images, name, 3, np.random.default_rng(7))
    b = corrupt(images, name, 3, np.random.default_rng(7))
    c = corrupt(images, name, 3, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert np.array_equal(a, c) == (name in DETERMINISTIC)


@pytest.mark.parametrize(("constants", "size"), SET_SIZES)
@pytest.mark.parametrize("name", ["gaussian_noise", "contrast", "pixelate", "jpeg_compression", "fog"])
def test_severity_monotone(name: str, constants: str, size: int) -> None:
    images = synthetic_images(8, size, seed=1)
    diffs = [mean_abs_diff(corrupt(images, name, s, np.random.default_rng(0), constants), images) for s in range(1, 6)]
    if name == "fog" and constants == "imagenet":
        # ImageNet fog amplitudes (2.5-3 from sev 3 on) swamp the image, so sev 3-5 differ
        # mostly in roughness and the mean change can dip a few percent with the fractal.
        assert diffs[4] > diffs[0]
        assert all(later > 0.9 * earlier for earlier, later in zip(diffs, diffs[1:])), diffs
    else:
        assert all(later > earlier for earlier, later in zip(diffs, diffs[1:])), diffs


def test_imagenet_constants_are_harsher() -> None:
    images = synthetic_images(4, 32)
    cifar = corrupt(images, "gaussian_noise", 5, np.random.default_rng(0), "cifar10")
    imagenet = corrupt(images, "gaussian_noise", 5, np.random.default_rng(0), "imagenet")
    assert mean_abs_diff(imagenet, images) > 2 * mean_abs_diff(cifar, images)
    assert CONSTANTS["cifar10"] != CONSTANTS["imagenet"]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_single_image_matches_batch_of_one(name: str) -> None:
    images = synthetic_images(1, 32)
    single = corrupt(images[0], name, 2, np.random.default_rng(3))
    batch = corrupt(images, name, 2, np.random.default_rng(3))
    assert single.shape == (32, 32, 3)
    np.testing.assert_array_equal(single, batch[0])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_non_square_images(name: str) -> None:
    images = synthetic_images(2, 40, 56)
    out = corrupt(images, name, 5, np.random.default_rng(0))
    assert out.shape == images.shape and not np.array_equal(out, images)


@pytest.mark.parametrize("name", ["fog", "frost", "zoom_blur", "elastic_transform", "snow"])
def test_imagenet_size(name: str) -> None:
    image = synthetic_images(1, 224)[0]
    out = corrupt(image, name, 5, np.random.default_rng(0), "imagenet")
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_fog_covers_images_larger_than_mapsize() -> None:
    image = synthetic_images(1, 300, 280)[0]
    out = corrupt(image, "fog", 3, np.random.default_rng(0), "imagenet")
    # The fractal must vary over the whole image, including beyond 256 px.
    residual = out.astype(np.float64) - image
    assert residual[260:, 260:].std() > 1


@pytest.mark.parametrize(
    ("images", "name", "severity", "constants"),
    [
        (synthetic_images(1, 32), "gaussian_blur", 1, "cifar10"),
        (synthetic_images(1, 32), "fog", 0, "cifar10"),
        (synthetic_images(1, 32), "fog", 6, "cifar10"),
        (synthetic_images(1, 32), "fog", 2.0, "cifar10"),
        (synthetic_images(1, 32), "fog", True, "cifar10"),
        (synthetic_images(1, 32), "fog", 1, "tinyimagenet"),
        (synthetic_images(1, 32).astype(np.float32), "fog", 1, "cifar10"),
        (synthetic_images(1, 32)[..., 0], "fog", 1, "cifar10"),
        (synthetic_images(1, 32)[..., :1], "fog", 1, "cifar10"),
        (np.zeros((2, 2, 32, 32, 3), np.uint8), "fog", 1, "cifar10"),
        (np.zeros((4, 4, 3), np.uint8), "fog", 1, "cifar10"),
        (synthetic_images(1, 32).tolist(), "fog", 1, "cifar10"),
    ],
)
def test_bad_input_raises(images: np.ndarray, name: str, severity: int, constants: str) -> None:
    with pytest.raises(ValueError):
        corrupt(images, name, severity, np.random.default_rng(0), constants)


def test_rng_must_be_generator() -> None:
    with pytest.raises(TypeError):
        corrupt(synthetic_images(1, 32), "fog", 1, 0)  # type: ignore[arg-type]


def test_constants_for_size() -> None:
    assert constants_for_size(32, 32) == "cifar10"
    assert constants_for_size(64, 48) == "cifar10"
    assert constants_for_size(65, 32) == "imagenet"
    assert constants_for_size(224, 224) == "imagenet"
    with pytest.raises(ValueError):
        constants_for_size(0, 32)
