"""Loaders for the released on-disk formats, the corruption cache and the tree writer.

Fixtures are tiny copies of the real layouts: CIFAR-10-C .npy files, an ImageNet-C
JPEG tree, and a class-per-folder tree of mixed formats and sizes.
"""
from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from driftsync.data import loaders
from driftsync.data.corruptions import corrupt
from driftsync.data.loaders import (
    ImageNetCFolder,
    cache_key,
    corrupt_cached,
    corruption_rng,
    imagenet_c_wnids,
    load_cifar10c,
    load_class_folder,
    parse_severities,
    write_corrupted_tree,
)
from driftsync.data.streams import Domain, corrupting, replay
from shared.images import fit_image

PER_SEVERITY = 20
WNIDS = ["n01440764", "n01443537"]


def solid(value: int, size: tuple[int, int], channel_step: int = 0) -> Image.Image:
    """A flat colour survives JPEG almost exactly, so pixel values can identify files."""
    return Image.new("RGB", size, (value, value + channel_step, value + 2 * channel_step))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """Two corruptions of 5 * 20 rows; row i is filled with i (per corruption offset), label (3i) % 10."""
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    rows = np.arange(5 * PER_SEVERITY)
    for offset, name in ((0, "gaussian_noise"), (100, "fog")):
        x = np.broadcast_to((rows + offset).astype(np.uint8)[:, None, None, None], (len(rows), 32, 32, 3))
        np.save(root / f"{name}.npy", np.ascontiguousarray(x))
    np.save(root / "labels.npy", ((3 * rows) % 10).astype(np.uint8))  # uint8, as released
    return root


@pytest.fixture
def imagenet_c_dir(tmp_path: Path) -> Path:
    """<root>/<corruption>/<severity>/<wnid>/*.JPEG, 224x224; grey level = 60*class + 20*k + severity."""
    root = tmp_path / "ImageNet-C"
    for corruption in ("gaussian_noise", "contrast"):
        for severity in (1, 3):
            for c, wnid in enumerate(WNIDS):
                folder = root / corruption / str(severity) / wnid
                folder.mkdir(parents=True)
                for k in range(3):
                    value = 60 * c + 20 * k + severity
                    solid(value, (224, 224)).save(folder / f"ILSVRC2012_val_{c}{k:07d}.JPEG", quality=95)
    return root


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    """Mixed formats, sizes and suffix cases, plus a file that is not an image."""
    root = tmp_path / "photos"
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    solid(10, (40, 30)).save(root / "cat" / "a.png")
    solid(20, (50, 50)).save(root / "cat" / "b.JPG", quality=95)
    solid(30, (64, 48)).save(root / "dog" / "c.jpeg", quality=95)
    solid(40, (30, 60)).save(root / "dog" / "d.PNG")
    solid(50, (40, 40)).save(root / "dog" / "e.webp", lossless=True)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- CIFAR-10-C


def test_cifar10c_severity_picks_its_rows(cifar_dir: Path) -> None:
    for severity in range(1, 6):
        x, y = load_cifar10c(cifar_dir, "gaussian_noise", severity, None)
        rows = np.arange((severity - 1) * PER_SEVERITY, severity * PER_SEVERITY)
        assert x.shape == (PER_SEVERITY, 32, 32, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0, 0, 0], rows)
        np.testing.assert_array_equal(y, (3 * rows) % 10)
    x, _ = load_cifar10c(cifar_dir, "fog", 2, None)
    np.testing.assert_array_equal(x[:, 5, 5, 2], np.arange(PER_SEVERITY, 2 * PER_SEVERITY) + 100)


def test_cifar10c_count_and_result_is_an_owned_array(cifar_dir: Path) -> None:
    x, y = load_cifar10c(cifar_dir, "fog", 3, 5)
    assert len(x) == len(y) == 5
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.arange(40, 45) + 100)
    assert type(x) is np.ndarray and x.flags.writeable  # copied out of the memory map
    with pytest.raises(ValueError, match="exceeds the 20 images"):
        load_cifar10c(cifar_dir, "fog", 3, PER_SEVERITY + 1)


def test_cifar10c_bad_input(cifar_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"corruptions in .*\['fog', 'gaussian_noise'\]"):
        load_cifar10c(cifar_dir, "snow", 1, None)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(cifar_dir, "fog", 6, None)
    with pytest.raises(ValueError, match="plain name"):
        load_cifar10c(cifar_dir, "../fog", 1, None)

    np.save(cifar_dir / "contrast.npy", np.zeros((100, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_cifar10c(cifar_dir, "contrast", 1, None)
    np.save(cifar_dir / "contrast.npy", np.zeros((99, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="has 100 labels but"):
        load_cifar10c(cifar_dir, "contrast", 1, None)
    np.save(cifar_dir / "contrast.npy", np.array([{"not": "an array"}] * 100, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy"):
        load_cifar10c(cifar_dir, "contrast", 1, None)

    (cifar_dir / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        load_cifar10c(cifar_dir, "fog", 1, None)

    odd = tmp_path / "odd"
    odd.mkdir()
    np.save(odd / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    np.save(odd / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="multiple of 5"):
        load_cifar10c(odd, "fog", 1, None)
    np.save(odd / "labels.npy", np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="integer"):
        load_cifar10c(odd, "fog", 1, None)


# --------------------------------------------------------------------------- ImageNet-C


def test_imagenet_c_folder_labels_order_and_batches(imagenet_c_dir: Path) -> None:
    folder = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 3)
    assert len(folder) == 6 and folder.wnids == WNIDS
    np.testing.assert_array_equal(folder.labels, [0, 0, 0, 1, 1, 1])
    batches = list(folder.batches(4))
    assert [b[0].shape for b in batches] == [(4, 224, 224, 3), (2, 224, 224, 3)]
    x, y = folder.load_all()
    assert x.dtype == np.uint8 and y.dtype == np.int64
    expected = [60 * c + 20 * k + 3 for c in range(2) for k in range(3)]
    np.testing.assert_allclose(x.reshape(6, -1).mean(axis=1), expected, atol=2)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)


def test_imagenet_c_folder_decodes_lazily(imagenet_c_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real_read = loaders._read
    monkeypatch.setattr(loaders, "_read", lambda path, size: opened.append(path) or real_read(path, size))
    folder = ImageNetCFolder(imagenet_c_dir, "contrast", 1)
    batches = folder.batches(2)
    assert opened == []
    next(batches)
    assert len(opened) == 2


def test_imagenet_c_count_and_seeded_subsets(imagenet_c_dir: Path) -> None:
    first = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 1, count=4)
    assert [p.name for p in first.paths] == sorted(p.name for p in first.paths)
    np.testing.assert_array_equal(first.labels, [0, 0, 0, 1])

    a = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 1, count=4, seed=7)
    b = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 1, count=4, seed=7)
    other = ImageNetCFolder(imagenet_c_dir, "contrast", 3, count=4, seed=7)
    assert a.paths == b.paths
    # the same scenes under every corruption and severity
    assert [p.name for p in a.paths] == [p.name for p in other.paths]
    np.testing.assert_array_equal(a.labels, other.labels)
    subsets = {
        tuple(p.name for p in ImageNetCFolder(imagenet_c_dir, "contrast", 1, count=4, seed=s).paths) for s in range(4)
    }
    assert len(subsets) > 1
    with pytest.raises(ValueError, match="exceeds"):
        ImageNetCFolder(imagenet_c_dir, "contrast", 1, count=7)


def test_imagenet_c_class_index_spans_the_tree(imagenet_c_dir: Path) -> None:
    extra = imagenet_c_dir / "contrast" / "3" / "n00000001"
    extra.mkdir()
    solid(5, (224, 224)).save(extra / "x.JPEG")
    assert imagenet_c_wnids(imagenet_c_dir) == ["n00000001", *WNIDS]
    folder = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 1)  # has no n00000001 itself
    np.testing.assert_array_equal(folder.labels, [1, 1, 1, 2, 2, 2])
    given = ImageNetCFolder(imagenet_c_dir, "gaussian_noise", 1, wnids=list(reversed(WNIDS)))
    np.testing.assert_array_equal(given.labels, [0, 0, 0, 1, 1, 1])
    assert given.paths[0].parent.name == WNIDS[1]
    with pytest.raises(ValueError, match="not in the wnid list"):
        ImageNetCFolder(imagenet_c_dir, "contrast", 3, wnids=WNIDS)


def test_imagenet_c_bad_input(imagenet_c_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no corruption directory.*found \['contrast', 'gaussian_noise'\]"):
        ImageNetCFolder(imagenet_c_dir, "snow", 1)
    with pytest.raises(FileNotFoundError, match=r"no severity directory.*\['1', '3'\]"):
        ImageNetCFolder(imagenet_c_dir, "contrast", 2)
    with pytest.raises(ValueError, match="severity"):
        ImageNetCFolder(imagenet_c_dir, "contrast", 0)
    with pytest.raises(ValueError, match="batch_size"):
        next(ImageNetCFolder(imagenet_c_dir, "contrast", 1).batches(0))
    empty = tmp_path / "empty"
    (empty / "fog" / "5" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under"):
        ImageNetCFolder(empty, "fog", 5)


def test_fit_image_keeps_224_and_centre_crops_others() -> None:
    exact = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    np.testing.assert_array_equal(fit_image(exact, 224), np.asarray(exact))
    halves = np.zeros((256, 512, 3), np.uint8)
    halves[:, :256, 0] = 255  # left red, right blue; shorter side is already 256
    halves[:, 256:, 2] = 255
    out = fit_image(Image.fromarray(halves), 224)
    assert out.shape == (224, 224, 3)
    assert (out[:, :112, 0] == 255).all() and (out[:, 112:, 2] == 255).all()
    assert fit_image(Image.new("L", (300, 700)), 32).shape == (32, 32, 3)


# --------------------------------------------------------------------------- class folders


def test_class_folder_mixed_sizes_default_to_224(class_dir: Path) -> None:
    x, y, classes = load_class_folder(class_dir, None, None, seed=None)
    assert classes == ["cat", "dog"]
    assert x.shape == (5, 224, 224, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 1])
    np.testing.assert_allclose(x.reshape(5, -1).mean(axis=1), [10, 20, 30, 40, 50], atol=2)
    x32, _, _ = load_class_folder(class_dir, 32, None, seed=None)
    assert x32.shape == (5, 32, 32, 3)


def test_class_folder_equal_sizes_are_kept(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        for k in range(2):
            solid(10 * k, (40, 30)).save(tmp_path / name / f"{k}.png")
    x, y, classes = load_class_folder(tmp_path, None, None, seed=None)
    assert x.shape == (4, 30, 40, 3) and classes == ["a", "b"]
    np.testing.assert_array_equal(y, [0, 0, 1, 1])


def test_class_folder_seeded_subsets(class_dir: Path) -> None:
    x1, y1, _ = load_class_folder(class_dir, 32, 3, seed=5)
    x2, y2, _ = load_class_folder(class_dir, 32, 3, seed=5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    _, first, _ = load_class_folder(class_dir, 32, 3, seed=None)
    np.testing.assert_array_equal(first, [0, 0, 1])
    full, _, _ = load_class_folder(class_dir, 32, None, seed=5)
    assert sorted(full.reshape(5, -1).mean(axis=1).round()) == [10, 20, 30, 40, 50]


def test_class_folder_bad_input(tmp_path: Path, class_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_class_folder(tmp_path / "missing", None, None, 0)
    (tmp_path / "flat").mkdir()
    solid(1, (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        load_class_folder(tmp_path / "flat", None, None, 0)
    (class_dir / "empty").mkdir()
    with pytest.raises(ValueError, match=r"without images.*\['empty'\]"):
        load_class_folder(class_dir, None, None, 0)
    (class_dir / "empty").rmdir()
    with pytest.raises(ValueError, match="exceeds"):
        load_class_folder(class_dir, None, 6, 0)
    with pytest.raises(ValueError, match="count must be"):
        load_class_folder(class_dir, None, 0, 0)


# --------------------------------------------------------------------------- cache


def test_corrupt_cached_writes_then_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cache = tmp_path / "cache"
    first = corrupt_cached(images, "gaussian_noise", 3, 11, cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    # seeded as replay seeds it: a cached stream equals the replayed one
    chunk = next(replay(corrupting(images, np.zeros(6, np.int64), 11), [Domain("gaussian_noise", 3)], batch_size=6, seed=11))
    np.testing.assert_array_equal(first, chunk.images)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(loaders, "corrupt", fail)
    np.testing.assert_array_equal(corrupt_cached(images, "gaussian_noise", 3, 11, cache), first)
    monkeypatch.undo()

    other = corrupt_cached(images, "gaussian_noise", 3, 12, cache)
    assert len(list(cache.iterdir())) == 2  # different seed -> different key, and no temp files left
    assert not np.array_equal(other, first)
    key = cache_key(images, "gaussian_noise", 3, 11, "cifar10")
    assert key != cache_key(images, "gaussian_noise", 3, 12, "cifar10")
    assert key != cache_key(images[::-1], "gaussian_noise", 3, 11, "cifar10")
    assert key != cache_key(images, "gaussian_noise", 4, 11, "cifar10")
    assert key != cache_key(images, "gaussian_noise", 3, 11, "imagenet")
    np.testing.assert_array_equal(
        corrupt_cached(images, "gaussian_noise", 3, 11, None),
        corrupt(images, "gaussian_noise", 3, corruption_rng(11, "gaussian_noise", 3), "cifar10"),
    )


def test_corrupt_cached_recomputes_an_unreadable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = np.full((2, 16, 16, 3), 100, np.uint8)
    expected = corrupt_cached(images, "contrast", 2, 0, tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(corrupt_cached(images, "contrast", 2, 0, tmp_path), expected)
    assert "recomputing" in caplog.text
    assert np.load(path, allow_pickle=False).shape == images.shape  # repaired
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_cached(images, "rain", 2, 0, tmp_path)


# --------------------------------------------------------------------------- writing trees


def test_parse_severities() -> None:
    assert parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert parse_severities("3") == [3]
    assert parse_severities("1,3,5") == [1, 3, 5]
    assert parse_severities(" 5, 1-2 ,1") == [1, 2, 5]
    for bad in ("0", "6", "5-1", "a", "", "1-", "1,,2", "2-9"):
        with pytest.raises(ValueError):
            parse_severities(bad)


def test_write_corrupted_tree_round_trips(class_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    written = write_corrupted_tree(class_dir, out, ["gaussian_noise", "contrast"], [1, 4], seed=3)
    assert written == 5 * 2 * 2
    assert "20/20" in capsys.readouterr().err  # the progress bar, on stderr
    tree = out / "contrast" / "4"
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.JPEG")) == [
        "cat/a.JPEG", "cat/b.JPEG", "dog/c.JPEG", "dog/d.JPEG", "dog/e.JPEG",
    ]
    folder = ImageNetCFolder(out, "contrast", 4)
    assert folder.wnids == ["cat", "dog"] and len(folder) == 5
    np.testing.assert_array_equal(folder.labels, [0, 0, 1, 1, 1])
    x, _ = folder.load_all()
    assert x.shape == (5, 224, 224, 3)
    clean, _, _ = load_class_folder(class_dir, None, None, seed=None)
    assert np.abs(x.astype(int) - clean).max() > 0  # contrast moved the colours
    noisy, _ = ImageNetCFolder(out, "gaussian_noise", 1).load_all()
    assert noisy.std(axis=(1, 2, 3)).min() > 3  # noise on flat colours

    again = tmp_path / "again"
    write_corrupted_tree(class_dir, again, ["gaussian_noise"], [1], seed=3)
    same = (again / "gaussian_noise" / "1" / "dog" / "e.JPEG").read_bytes()
    assert same == (out / "gaussian_noise" / "1" / "dog" / "e.JPEG").read_bytes()


def test_write_corrupted_tree_bad_input(class_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corruptions"):
        write_corrupted_tree(class_dir, tmp_path / "o", ["rain"], [1], 0)
    with pytest.raises(ValueError, match="at least one"):
        write_corrupted_tree(class_dir, tmp_path / "o", ["contrast"], [], 0)
    solid(1, (8, 8)).save(class_dir / "cat" / "a.jpg")  # beside a.png
    with pytest.raises(ValueError, match=r"cat/a\.JPEG"):
        write_corrupted_tree(class_dir, tmp_path / "o", ["contrast"], [1], 0)


def test_corrupt_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in"
    for c, name in enumerate(("plane", "car")):
        (source / name).mkdir(parents=True)
        for k in range(2):
            solid(50 * c + 20 * k + 30, (32, 32), channel_step=10).save(source / name / f"{k}.png")
    out = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(out), "--corruptions", "brightness,pixelate",
            "--severities", "2-3", "--seed", "1"]
    from driftsync.cli import main

    assert main(["corrupt", *argv]) == 0  # through the `driftsync corrupt` entry point
    assert "wrote 16 files" in capsys.readouterr().out
    for corruption in ("brightness", "pixelate"):
        for severity in (2, 3):
            folder = ImageNetCFolder(out, corruption, severity, size=32)
            x, y = folder.load_all()
            assert x.shape == (4, 32, 32, 3)
            np.testing.assert_array_equal(y, [0, 0, 1, 1])  # car < plane

    everything = tmp_path / "all"
    assert main(["corrupt", "--input", str(source), "--output", str(everything), "--severities", "5"]) == 0
    assert len(list(everything.glob("*/5/*/*.JPEG"))) == 15 * 4

    (source / "empty").mkdir()  # a class folder without images: refused in one line, exit 1
    assert main(["corrupt", "--input", str(source), "--output", str(out)]) == 1
    assert "class folders without images" in capsys.readouterr().err
    for bad in (["--corruptions", "rain"], ["--severities", "0"], ["--size", "4"], ["--input", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["corrupt", "--input", str(source), "--output", str(out), *bad])
        assert exit_info.value.code == 2


def test_loaders_import_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None\nimport driftsync.data.loaders\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------- streaming from disk


def test_an_imagenet_c_stream_file_keeps_the_jpegs_and_decodes_as_the_folder_does(imagenet_c_dir: Path, tmp_path: Path) -> None:
    from driftsync.data import streams

    domains = [Domain("gaussian_noise", 3), Domain("contrast", 1)]
    source, samples = loaders.imagenet_c_source(imagenet_c_dir, domains, WNIDS, None, 5, 224)
    assert samples == 6
    for setting in ("continual", "mixed"):
        out = tmp_path / setting
        chunks = list(streams.stream(setting, source, ["gaussian_noise", "contrast"], 3, 4, seed=5))
        assert all(isinstance(c.frames, (ImageNetCFolder, streams.MixedFrames)) for c in chunks)  # indices, no pixels
        assert streams.write_stream(iter(chunks), out) == 12
        records = (out / "frames.bin").read_bytes()
        offsets = np.load(out / "offsets.npy")
        files = [p.read_bytes() for c in chunks for p in _paths(c)]
        assert [records[a:b] for a, b in itertools.pairwise(offsets)] == files  # the released bytes, not re-encoded
        for written, read in zip(chunks, streams.read_stream(out), strict=True):
            np.testing.assert_array_equal(read.images, written.images)
            np.testing.assert_array_equal(read.labels, written.labels)
            assert read.domain_names() == written.domain_names()


def _paths(chunk) -> list[Path]:
    from driftsync.data import streams

    if isinstance(chunk.frames, streams.MixedFrames):
        parts = chunk.frames.part_of(chunk.index)
        return [chunk.frames.parts[p].paths[i - chunk.frames.starts[p]] for p, i in zip(parts, chunk.index)]
    return [chunk.frames.paths[i] for i in chunk.index]


def test_a_stream_file_of_another_version_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    from driftsync.data import streams

    (tmp_path / "stream.json").write_text('{"version": 1, "domain_names": [], "chunks": []}')
    with pytest.raises(ValueError, match="version 1 stream file.*run `driftsync replay` again"):
        list(streams.read_stream(tmp_path))


def test_cifar10c_rows_are_read_by_index(cifar_dir: Path) -> None:
    frames = loaders.cifar10c_frames(cifar_dir, "fog", 2, 10)
    assert len(frames) == 10 and frames.shape == (32, 32, 3)
    x = frames.pixels(np.array([7, 0, 3]))
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.array([7, 0, 3]) + PER_SEVERITY + 100)
    np.testing.assert_array_equal(frames.labels[[7, 0, 3]], (3 * (np.array([7, 0, 3]) + PER_SEVERITY)) % 10)


def test_device_imagenet_c_source_streams_by_batches(imagenet_c_dir: Path) -> None:
    """`driftsync device --source imagenet-c`: every domain checked up front, then read batch by batch."""
    from types import SimpleNamespace

    from driftsync.cli import build_parser
    from driftsync.device import _replay_chunks

    descriptor = SimpleNamespace(input_shape=(3, 32, 32), class_names=list(WNIDS))
    args = build_parser().parse_args(["device", "--source", "imagenet-c", "--data", str(imagenet_c_dir),
                                      "--corruptions", "gaussian_noise,contrast", "--severity", "3", "--batch-size", "4",
                                      "--samples-per-domain", "none"])
    chunks, total = _replay_chunks(args, descriptor)
    chunks = list(chunks)
    assert total == 12 and [len(c) for c in chunks] == [4, 2, 4, 2]
    assert all(isinstance(c.frames, ImageNetCFolder) for c in chunks)
    assert chunks[0].images.shape == (4, 32, 32, 3)
    args.corruptions = "gaussian_noise,snow"
    with pytest.raises(loaders.UserError, match=r"lacks 1 of the 2 .*\(snow/3\); pass --corruptions gaussian_noise"):
        _replay_chunks(args, descriptor)


def test_corrupted_frames_are_the_cached_corruption_read_by_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6)
    frames = loaders.corrupted_frames(images, labels, "fog", 2, 4, tmp_path)
    expected = corrupt_cached(images, "fog", 2, 4)  # no cache: computed afresh
    np.testing.assert_array_equal(frames.pixels(np.array([5, 1])), expected[[5, 1]])
    np.testing.assert_array_equal(frames.labels, labels)
    monkeypatch.setattr(loaders, "corrupt", lambda *a, **k: pytest.fail("recomputed instead of reading the cache"))
    again = loaders.corrupted_frames(images, labels, "fog", 2, 4, tmp_path)
    np.testing.assert_array_equal(again.pixels(np.arange(6)), expected)
