"""Frost as in CIFAR-10-C and ImageNet-C: Hendrycks' photographs from the corrupt-tta package when it
is installed, the procedural stand-in otherwise (or with DRIFTSYNC_FROST=procedural), and every
report says which one its stream carries."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from driftsync.data import loaders
from driftsync.data.corruptions import (
    CONSTANTS,
    FROST_ENV,
    FROST_PHOTOGRAPHS,
    FROST_PROCEDURAL,
    corrupt,
    frost_source,
)
from tests.test_corruptions import synthetic_images

HAVE_PHOTOGRAPHS = importlib.util.find_spec("corrupt_tta") is not None
needs_photographs = pytest.mark.skipif(not HAVE_PHOTOGRAPHS, reason="corrupt-tta (driftsync[corruptions]) is not installed")


def _frost(images: np.ndarray, severity: int, seed: int = 0, constants: str = "cifar10") -> np.ndarray:
    return corrupt(images, "frost", severity, np.random.default_rng(seed), constants)


def _correlation_with(images: np.ndarray, out: np.ndarray) -> float:
    """Mean per-image Pearson correlation: a*x + b*F keeps less of x as b/a grows with severity."""
    a = images.reshape(len(images), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


@needs_photographs
@pytest.mark.parametrize(("constants", "size"), [("cifar10", 32), ("imagenet", 224)])
def test_frost_uses_the_photographs_when_installed(constants: str, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FROST_ENV, raising=False)
    assert frost_source() == FROST_PHOTOGRAPHS
    images = synthetic_images(6, size)
    photo = _frost(images, 5, constants=constants)
    np.testing.assert_array_equal(photo, _frost(images, 5, constants=constants))  # deterministic for a seed
    assert not np.array_equal(photo, _frost(images, 5, seed=1, constants=constants))
    monkeypatch.setenv(FROST_ENV, "procedural")
    assert frost_source() == FROST_PROCEDURAL
    assert np.abs(photo.astype(int) - _frost(images, 5, constants=constants)).mean() > 5  # not the stand-in
    monkeypatch.setenv(FROST_ENV, "photographs")
    assert frost_source() == FROST_PHOTOGRAPHS


@needs_photographs
def test_photograph_frost_grows_with_severity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FROST_ENV, raising=False)
    images = synthetic_images(16, 32, seed=2)
    kept = [_correlation_with(images, _frost(images, s)) for s in range(1, 6)]  # same crops at every severity
    assert all(later < earlier for earlier, later in zip(kept, kept[1:])), kept


@needs_photographs
def test_photograph_frost_is_hendrycks_formula_with_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_cifar_c.py's frost, written with cv2 as it is there (imread, resize fx=fy=0.2, crop,
    BGR to RGB), on the same random draws: equal to the last bit."""
    cv2 = pytest.importorskip("cv2")
    monkeypatch.delenv(FROST_ENV, raising=False)
    folder = Path(importlib.util.find_spec("corrupt_tta").submodule_search_locations[0]) / "assets" / "frost"
    files = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
    images = synthetic_images(8, 32, seed=3)
    for constants, shrink, size in (("cifar10", 0.2, 32), ("imagenet", 1.0, 224)):
        batch = images if size == 32 else synthetic_images(3, 224, seed=3)
        a, b = CONSTANTS[constants]["frost"][4]
        rng = np.random.default_rng(5)
        picks = rng.integers(5, size=len(batch))
        textures = [cv2.imread(str(folder / files[k])) for k in picks]
        if shrink != 1:
            textures = [cv2.resize(t, (0, 0), fx=shrink, fy=shrink) for t in textures]
        tops = rng.integers(0, [t.shape[0] - size for t in textures])
        lefts = rng.integers(0, [t.shape[1] - size for t in textures])
        frost = np.stack([t[r : r + size, q : q + size][..., [2, 1, 0]] for t, r, q in zip(textures, tops, lefts)])
        expected = np.clip(a * batch + b * frost, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(corrupt(batch, "frost", 5, np.random.default_rng(5), constants), expected)


def test_forced_procedural_frost_is_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FROST_ENV, "procedural")
    assert frost_source() == FROST_PROCEDURAL
    images = synthetic_images(6, 32)
    out = _frost(images, 5)
    np.testing.assert_array_equal(out, _frost(images, 5))
    kept = [_correlation_with(images, _frost(images, s)) for s in range(1, 6)]
    assert all(later < earlier for earlier, later in zip(kept, kept[1:])), kept
    monkeypatch.setenv(FROST_ENV, "icy")
    with pytest.raises(ValueError, match="DRIFTSYNC_FROST must be auto, photographs or procedural"):
        frost_source()


def test_the_corruption_cache_keeps_the_two_frosts_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    images = synthetic_images(2, 32)
    monkeypatch.setenv(FROST_ENV, "procedural")
    procedural = {name: loaders.cache_key(images, name, 5, 0, "cifar10") for name in ("frost", "fog")}
    monkeypatch.setenv(FROST_ENV, "auto")
    auto = {name: loaders.cache_key(images, name, 5, 0, "cifar10") for name in ("frost", "fog")}
    assert auto["fog"] == procedural["fog"]  # no other corruption's cache is thrown away
    assert (auto["frost"] != procedural["frost"]) == HAVE_PHOTOGRAPHS


@pytest.mark.parametrize("forced", [False, True])
def test_replay_report_says_which_frost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forced: bool) -> None:
    from driftsync.replay import ReplayOptions, run

    if forced:
        monkeypatch.setenv(FROST_ENV, "procedural")
    else:
        monkeypatch.delenv(FROST_ENV, raising=False)
    expected = FROST_PROCEDURAL if forced or not HAVE_PHOTOGRAPHS else FROST_PHOTOGRAPHS
    run(ReplayOptions(methods=("source",), corruptions="fog,frost", samples_per_domain=32, batch_size=16,
                      out=tmp_path, torch_threads=1))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frost"] == expected and report["methods"][0]["frost"] == expected
    assert f"frost: {expected}." in (tmp_path / "report.md").read_text()
    run(ReplayOptions(methods=("source",), corruptions="fog", samples_per_domain=32, batch_size=16,
                      out=tmp_path / "no-frost", torch_threads=1))
    assert json.loads((tmp_path / "no-frost" / "report.json").read_text())["frost"] is None
