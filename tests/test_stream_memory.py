"""Replay memory is bounded by a batch, not by the stream: the real stream code (ImageNet-C tree ->
stream file -> batch-by-batch reads, as every method reads it) runs in a fresh process for N and
4N images per domain, and the peak resident memory of the two must be about the same.

Holding a domain's decoded pixels (the old `load_all` per domain, or `mixed` concatenating every
domain) costs 150 kB per extra 224-px image: 3N extra images per domain here is 45 MB in
`continual` and three times that in `mixed`, far over the bound below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

SIZE = 224
DOMAINS = ("fog", "contrast", "snow")
WNIDS = ("n00000000", "n00000001", "n00000002")
DISTINCT = 8  # real JPEGs per class; the rest are symlinks to them, as the measurement in BENCHMARKS.md
N = 100  # images per domain in the small stream; the large one has 4N
GROWTH_BOUND = 12 * 2**20  # bytes: far below one domain's extra 3N decoded images (45 MB)

# What `driftsync replay` does before and around its methods, without a model: the stream from
# the tree, written to a stream file, then read back batch by batch with every batch decoded.
READER = """
import json, resource, sys
from pathlib import Path
from driftsync.data import streams
from driftsync.replay import ReplayOptions, build_stream, stream_spec

root, n, setting, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
opts = ReplayOptions(dataset="imagenet-c", data=root, corruptions=sys.argv[5], severity=5, setting=setting,
                     samples_per_domain=n, batch_size=32, out=out, methods=("source",),
                     class_index=root / "classes.txt")
spec = stream_spec(opts, 224, 3)
total = build_stream(opts, spec, out / "stream")
seen, checksum = 0, 0.0
for chunk in streams.read_stream(out / "stream"):
    images = chunk.images
    seen += len(images)
    checksum += float(images[:, ::16, ::16].mean())
print(json.dumps({"total": total, "seen": seen, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/<corruption>/5/<wnid>/ with 4N files per class folder, DISTINCT of them real."""
    root = tmp_path_factory.mktemp("imagenet-c")
    rng = np.random.default_rng(0)
    per_class = -(-4 * N // len(WNIDS))
    originals = root / "originals"
    originals.mkdir()
    # the embedded student's 10 classes: the tree's 3 first, then 7 that no folder names
    (root / "classes.txt").write_text("\n".join([*WNIDS, *(f"n1000000{k}" for k in range(7))]) + "\n")
    for k in range(DISTINCT):  # smooth colours plus noise: JPEGs of a realistic size, not flat ones
        ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
        image = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                          np.full((SIZE, SIZE), 30.0 * k)], axis=2)
        image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(originals / f"{k}.JPEG", quality=85)
    for corruption in DOMAINS:
        for wnid in WNIDS:
            folder = root / corruption / "5" / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"ILSVRC2012_val_{i:08d}.JPEG").symlink_to(originals / f"{i % DISTINCT}.JPEG")
    return root


def peak_rss(tree: Path, n: int, setting: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", READER, str(tree), str(n), setting, str(out), ",".join(DOMAINS)],
                            check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["total"] == report["seen"] == n * len(DOMAINS)
    return report


@pytest.mark.parametrize("setting", ["continual", "mixed"])
def test_peak_memory_does_not_grow_with_the_stream(tree: Path, tmp_path: Path, setting: str) -> None:
    small = peak_rss(tree, N, setting, tmp_path / "small")
    large = peak_rss(tree, 4 * N, setting, tmp_path / "large")
    growth = (large["maxrss_kb"] - small["maxrss_kb"]) * 1024
    assert growth < GROWTH_BOUND, (small, large)
    small_file = (tmp_path / "small" / "stream" / "frames.bin").stat().st_size
    large_file = (tmp_path / "large" / "stream" / "frames.bin").stat().st_size
    assert large_file == pytest.approx(4 * small_file, rel=0.1)  # the JPEGs as they are: ~4x, not decoded pixels
    assert large_file < 4 * N * len(DOMAINS) * SIZE * SIZE * 3 / 4
