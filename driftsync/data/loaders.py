"""Benchmark test sets in their released on-disk formats, and a writer for new ImageNet-C-style trees.

Everything returns uint8 NHWC RGB in [0, 255] with int64 labels; normalisation is
left to the models (they take [0, 1] input). No torch: edge devices import this.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from driftsync.config import add, bounded, checked, optional
from driftsync.data.corruptions import (
    CORRUPTIONS,
    constants_for_size,
    corrupt,
    frost_source,
)
from driftsync.data.labels import folder_labels
from driftsync.data.streams import (
    CLEAN,
    Domain,
    DomainSource,
    corruption_rng,
    encode_png,
    parse_corruptions,
)
from driftsync.errors import UserError
from driftsync.progress import bar
from shared.images import fit_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
SEVERITIES = (1, 2, 3, 4, 5)
IMAGENET_SIZE = 224
JPEG_QUALITY = 85  # ImageNet-C saved every corrupted image at this quality
_WRITE_BATCH = 32  # images corrupted together by write_corrupted_tree (bounds memory)
_CACHE_VERSION = "1"  # bump when corrupt() changes its output for equal inputs


# --------------------------------------------------------------------------- helpers


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return int(severity)


def _check_count(count: int | None, available: int, what: str) -> int:
    """None means all; more than available is an error, not a silent truncation (the 5k-vs-50k pitfall)."""
    if count is None:
        return available
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count > available:
        raise ValueError(f"count {count} exceeds the {available} images in {what}")
    return count


def _select(n: int, count: int, seed: int | None) -> np.ndarray:
    """Indices of the first ``count`` items, or a seeded shuffled subset.

    Equal file lists and seeds give equal picks, so every corruption sees the same scenes.
    """
    if seed is None:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(n)[:count]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _image_files(directory: Path) -> list[Path]:
    """scandir, not Path.iterdir: directory entries carry their type, sparing 50,000 stat calls."""
    with os.scandir(directory) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and _is_image(Path(e.name)))


def _subdirs(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _read(path: Path, size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        return fit_image(image, size) if size is not None else np.asarray(image.convert("RGB"), dtype=np.uint8)


def _common_size(paths: Sequence[Path]) -> int | None:
    """None (keep as is) when every image has one size, else the ImageNet 224.

    Only headers are read."""
    sizes = set()
    for path in paths:
        with Image.open(path) as image:
            sizes.add(image.size)
        if len(sizes) > 1:
            return IMAGENET_SIZE
    return None


# --------------------------------------------------------------------------- CIFAR-10-C


def _map_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file; never unpickle (a dataset file should not run code)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a plain numeric .npy array: {exc}") from exc


@dataclass(frozen=True)
class NpyRows:
    """Rows of a uint8 (N, H, W, 3) .npy, read with pread for the indices asked (`streams.Frames`).

    Not a memory map: the pages of a mapped file that a reader touches count in its resident
    memory until the map goes, so a replay through a mapped domain would grow with it."""

    path: Path
    offset: int  # bytes to row 0 of the selection
    shape: tuple[int, int, int]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: np.ndarray) -> np.ndarray:
        row = int(np.prod(self.shape))
        out = np.empty((len(index), *self.shape), dtype=np.uint8)
        with self.path.open("rb") as f:
            for k, i in enumerate(index):
                out[k] = np.frombuffer(os.pread(f.fileno(), row, self.offset + int(i) * row), np.uint8).reshape(self.shape)
        return out

    def encoded(self, index: np.ndarray) -> list[bytes]:
        return [encode_png(image) for image in self.pixels(index)]


def cifar10c_frames(root: Path, corruption: str, severity: int, count: int | None = None) -> NpyRows:
    """Rows of one severity from ``<root>/<corruption>.npy`` and ``labels.npy``, read when asked.

    Severity s is the s-th fifth of the rows ([(s-1)*10000, s*10000) in the released files).
    """
    root = Path(root)
    severity = _check_severity(severity)
    if not corruption or Path(corruption).name != corruption:
        raise ValueError(f"corruption must be a plain name, got {corruption!r}")
    images_path, labels_path = root / f"{corruption}.npy", root / "labels.npy"
    if not images_path.is_file():
        available = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels") if root.is_dir() else []
        raise FileNotFoundError(f"no {images_path}; corruptions in {root}: {available}")
    if not labels_path.is_file():
        raise FileNotFoundError(f"no {labels_path}: a CIFAR-10-C directory needs labels.npy beside the corruptions")
    x, y = _map_npy(images_path), _map_npy(labels_path)  # headers and labels only: no image page is touched
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"{images_path} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(f"{labels_path} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"{labels_path} has {len(y)} labels but {images_path} has {len(x)} images")
    if len(x) == 0 or len(x) % len(SEVERITIES):
        raise ValueError(f"{images_path} has {len(x)} rows; expected a positive multiple of 5 (one block per severity)")
    per_severity = len(x) // len(SEVERITIES)
    n = _check_count(count, per_severity, f"{corruption} severity {severity}")
    start = (severity - 1) * per_severity
    row = int(np.prod(x.shape[1:]))
    return NpyRows(images_path, int(x.offset) + start * row, tuple(x.shape[1:]), np.array(y[start : start + n], dtype=np.int64))


def load_cifar10c(
    root: Path, corruption: str, severity: int, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every selected row of one severity at once (see `cifar10c_frames`)."""
    frames = cifar10c_frames(root, corruption, severity, count)
    return frames.pixels(np.arange(len(frames))), frames.labels


# --------------------------------------------------------------------------- ImageNet-C


def imagenet_c_wnids(root: Path) -> list[str]:
    """Sorted class folders over every ``<corruption>/<severity>`` of the tree, so a
    folder missing in one place cannot shift the class indices elsewhere."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C root {root} is not a directory")
    wnids: set[str] = set()
    for corruption in _subdirs(root):
        for severity in _subdirs(root / corruption):
            if severity.isdigit():
                wnids.update(_subdirs(root / corruption / severity))
    return sorted(wnids)


class ImageNetCFolder:
    """One ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` directory, read lazily in batches.

    Files are listed once; images are decoded only when a batch is asked for, so
    50,000 images never sit in memory together. Order is (class index, file name);
    with ``seed`` the ``count`` images are a seeded shuffled subset instead (on-disk
    order is label-sorted, which would make a label-correlated stream).
    """

    def __init__(
        self,
        root: Path,
        corruption: str,
        severity: int,
        wnids: Sequence[str] | None = None,
        count: int | None = None,
        seed: int | None = None,
        size: int = IMAGENET_SIZE,
    ) -> None:
        root = Path(root)
        severity = _check_severity(severity)
        if not (root / corruption).is_dir():
            available = _subdirs(root) if root.is_dir() else []
            raise FileNotFoundError(f"no corruption directory {root / corruption}; found {available}")
        directory = root / corruption / str(severity)
        if not directory.is_dir():
            raise FileNotFoundError(f"no severity directory {directory}; found {_subdirs(root / corruption)}")
        self.wnids = list(wnids) if wnids is not None else imagenet_c_wnids(root)
        index = {wnid: i for i, wnid in enumerate(self.wnids)}
        unknown = [d for d in _subdirs(directory) if d not in index]
        if unknown:
            raise ValueError(f"{directory} has class folders not in the wnid list: {unknown[:5]}")
        paths: list[Path] = []
        labels: list[int] = []
        for wnid in self.wnids:
            if (directory / wnid).is_dir():
                files = _image_files(directory / wnid)
                paths += files
                labels += [index[wnid]] * len(files)
        if not paths:
            raise ValueError(f"no images under {directory}")
        picks = _select(len(paths), _check_count(count, len(paths), str(directory)), seed)
        self.directory = directory
        self.size = size
        self.paths = [paths[i] for i in picks]
        self.labels = np.asarray(labels, dtype=np.int64)[picks]

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 NxHxWx3, int64 N) batches, decoded on demand."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self.paths), batch_size):
            stop = start + batch_size
            images = np.stack([_read(p, self.size) for p in self.paths[start:stop]])
            yield images, self.labels[start:stop]

    def pixels(self, index: np.ndarray) -> np.ndarray:
        """The images at `index`, decoded now (`streams.Frames`)."""
        return np.stack([_read(self.paths[i], self.size) for i in index])

    def encoded(self, index: np.ndarray) -> list[bytes]:
        """The files at `index` byte for byte: a stream file keeps ImageNet-C's JPEGs as released."""
        return [self.paths[i].read_bytes() for i in index]

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every selected image at once: for small subsets (tests); replays read by index instead."""
        x = np.empty((len(self), self.size, self.size, 3), dtype=np.uint8)
        for start, (images, _) in zip(range(0, len(self), 256), self.batches(256), strict=True):
            x[start : start + len(images)] = images
        return x, self.labels.copy()


def imagenet_c_source(
    root: Path, domains: Sequence[Domain], wnids: Sequence[str], count: int | None, seed: int | None, size: int,
) -> tuple[DomainSource, int]:
    """A replay source over an ImageNet-C tree and the sample count of its first domain.

    Every folder the schedule needs is checked up front, so a partial tree or too few images
    is one clear error before anything runs, not a failure minutes into the stream; a domain's
    files are listed again (not held) when it is replayed. Every class folder anywhere in the tree
    must name one of `wnids` (the model's class order)."""
    root = Path(root)
    folder_labels(imagenet_c_wnids(root), wnids, root)
    if any(d.name == CLEAN for d in domains):
        raise ValueError("ImageNet-C has no clean split; replay a class folder with --dataset folder instead")
    keys = list(dict.fromkeys((d.name, d.severity) for d in domains))
    missing = [(name, severity) for name, severity in keys if not (root / name / str(severity)).is_dir()]
    if missing:
        complete = [n for n in dict.fromkeys(n for n, _ in keys) if all(k[0] != n for k in missing)]
        hint = (f"pass --corruptions {','.join(complete)} to replay what is there" if complete
                else "build it with `driftsync corrupt` or pass --corruptions with the corruptions it has")
        raise UserError(f"{root} lacks {len(missing)} of the {len(keys)} corruption/severity folders the stream needs "
                        f"({', '.join(f'{n}/{s}' for n, s in missing)}); {hint}")

    def folder(name: str, severity: int, n: int | None) -> ImageNetCFolder:
        return ImageNetCFolder(root, name, severity, wnids=wnids, count=n, seed=seed, size=size)

    sizes = {key: len(folder(*key, None)) for key in keys}
    short = [f"{n}/{s} has {sizes[(n, s)]}" for n, s in keys if count is not None and sizes[(n, s)] < count]
    if short:
        raise UserError(f"--samples-per-domain {count} is more than a domain has ({', '.join(short)}); "
                        f"ask for at most {min(sizes.values())}, or 'none' for every image")
    return (lambda domain: folder(domain.name, domain.severity, count)), count or sizes[keys[0]]


# --------------------------------------------------------------------------- class folders


def _class_folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files in (class, name) order, their labels, and the sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")
    classes = _subdirs(root)
    if not classes:
        raise ValueError(f"{root} has no class folders; expected <root>/<class>/<image>")
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"class folders without images ({suffixes}) in {root}: {empty[:5]}")
    return paths, labels, classes


def load_class_folder(
    root: Path, size: int | None = None, count: int | None = None, seed: int | None = 0,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of a ``<root>/<class>/*.{jpg,png,...}`` tree as (uint8 NHWC, int64 labels, class names).

    ``size`` None keeps images as they are when all share one size, else 224.
    ``seed`` shuffles the order (on disk it is label-sorted); None keeps (class, name) order.
    Labels index ``classes`` (the model's class order; every folder must name one), else the
    sorted folder names.
    """
    paths, labels, folders = _class_folder_files(root)
    if classes is None:
        classes = folders
    else:
        mapping = folder_labels(folders, classes, root)
        labels = [mapping[folders[label]] for label in labels]
    picks = _select(len(paths), _check_count(count, len(paths), str(root)), seed)
    chosen = [paths[i] for i in picks]
    if size is None:
        size = _common_size(chosen)
    elif size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = np.stack([_read(p, size) for p in chosen])
    return x, np.asarray(labels, dtype=np.int64)[picks], list(classes)


# --------------------------------------------------------------------------- corruption cache


def cache_key(images: np.ndarray, name: str, severity: int, seed: int, constants: str) -> str:
    """sha256 over the image bytes (with shape and dtype) and every corruption input."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()
    frost = f"|{frost_source()}" if name == "frost" else ""  # the photographs and the procedural textures differ
    text = f"v{_CACHE_VERSION}|{images.dtype}|{images.shape}|{digest}|{name}|{severity}|{seed}|{constants}{frost}"
    return hashlib.sha256(text.encode()).hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_path(images: np.ndarray, name: str, severity: int, seed: int, cache_dir: Path) -> Path:
    constants = constants_for_size(images.shape[1], images.shape[2])
    return cache_dir / f"{name}_{severity}_{cache_key(images, name, severity, seed, constants)}.npy"


def corrupted_frames(
    images: np.ndarray, labels: np.ndarray, name: str, severity: int, seed: int, cache_dir: Path
) -> NpyRows:
    """A corrupted domain as `corrupt_cached` makes it, written to the cache once and then read
    by rows: a `mixed` stream over every corruption of a base set holds none of them in memory."""
    path = _cache_path(images, name, severity, seed, Path(cache_dir))
    try:
        cached = _map_npy(path) if path.is_file() else None  # the header only
    except ValueError:
        cached = None
    if cached is None or cached.dtype != np.uint8 or cached.shape != images.shape:
        corrupt_cached(images, name, severity, seed, cache_dir)  # computes and stores it; the array goes
        cached = _map_npy(path)
    return NpyRows(path, int(cached.offset), tuple(cached.shape[1:]), np.asarray(labels, dtype=np.int64))


def corrupt_cached(
    images: np.ndarray, name: str, severity: int, seed: int, cache_dir: Path | None = None
) -> np.ndarray:
    """``corrupt`` seeded as in ``replay``, memoised on disk: slow corruptions (glass
    blur at 224 px) are computed once per base set, not once per run."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    severity = _check_severity(severity)
    constants = constants_for_size(images.shape[1], images.shape[2])
    path = None
    if cache_dir is not None:
        path = _cache_path(images, name, severity, seed, Path(cache_dir))
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("unreadable cache file %s (%s); recomputing", path, exc)
            else:
                if cached.dtype == np.uint8 and cached.shape == images.shape:
                    return cached
                log.warning("cache file %s holds %s %s; recomputing", path, cached.dtype, cached.shape)
    out = corrupt(images, name, severity, corruption_rng(seed, name, severity), constants=constants)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(path, out)
    return out


# --------------------------------------------------------------------------- writing trees


def parse_severities(text: str) -> list[int]:
    """'1-5', '3', '1,3,5' (or mixes like '1-2,5') -> sorted unique severities in 1..5."""
    found: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"bad severity {part!r} in {text!r}; use e.g. '1-5', '3' or '1,3,5'") from None
        if not (1 <= first <= last <= 5):
            raise ValueError(f"severity {part!r} in {text!r} is outside 1..5 or reversed")
        found.update(range(first, last + 1))
    return sorted(found)


def write_corrupted_tree(
    input_dir: Path,
    output_dir: Path,
    corruptions: list[str],
    severities: list[int],
    seed: int,
    size: int | None = None,
) -> int:
    """Write ``<out>/<corruption>/<severity>/<class>/<stem>.JPEG`` (quality 85, as
    ImageNet-C) from a class-per-folder tree; returns the number of files written.

    Each input is decoded once per batch of 32 and corrupted for every (corruption,
    severity), each pair drawing from its own seeded generator; the constant set
    follows the output image size.
    """
    if not corruptions or not severities:
        raise ValueError("need at least one corruption and one severity")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(CORRUPTIONS)}")
    severities = [_check_severity(s) for s in severities]
    paths, labels, classes = _class_folder_files(Path(input_dir))
    clashes = [key for key, n in Counter(zip(labels, (p.stem for p in paths))).items() if n > 1]
    if clashes:
        label, stem = clashes[0]
        raise ValueError(f"two input files would both be written as {classes[label]}/{stem}.JPEG")
    if size is None:
        size = _common_size(paths)
    output_dir = Path(output_dir)
    pairs = [(c, s) for c in corruptions for s in severities]
    for corruption, severity in pairs:
        for name in classes:
            (output_dir / corruption / str(severity) / name).mkdir(parents=True, exist_ok=True)
    rngs = {(c, s): corruption_rng(seed, c, s) for c, s in pairs}
    total = len(paths) * len(pairs)
    written = 0
    progress = bar(total, "[corrupt] writing", unit="file")
    for start in range(0, len(paths), _WRITE_BATCH):
        batch_paths = paths[start : start + _WRITE_BATCH]
        images = np.stack([_read(p, size) for p in batch_paths])
        constants = constants_for_size(images.shape[1], images.shape[2])
        for corruption, severity in pairs:
            out = corrupt(images, corruption, severity, rngs[corruption, severity], constants=constants)
            for image, path, label in zip(out, batch_paths, labels[start : start + _WRITE_BATCH], strict=True):
                target = output_dir / corruption / str(severity) / classes[label] / f"{path.stem}.JPEG"
                Image.fromarray(image).save(target, format="JPEG", quality=JPEG_QUALITY)
            written += len(out)
            progress.update(len(out))
    progress.close()
    return written


def _severities(text: str) -> None:
    parse_severities(text)


def add_corrupt_args(p: argparse.ArgumentParser) -> None:
    """`driftsync corrupt`'s flags, checked at parse time."""
    add(p, "--input", None, checked(_existing_dir, "DIR"), help="class-per-folder image tree", required=True)
    add(p, "--output", None, help="where the corrupted tree goes", required=True)
    add(p, "--corruptions", "all", checked(parse_corruptions, "all|NAME,..."),
        help="comma list or 'all' (the 15 benchmark corruptions)")
    add(p, "--severities", "1-5", checked(_severities, "1-5|N|N,N"), help="'1-5', '3' or '1,3,5'")
    add(p, "--seed", 0, int, help="corruption seed")
    add(p, "--size", None, optional(bounded(int, 8)), help="output side, at least 8 ('none': keep if all equal, else 224)")


def _existing_dir(text: str) -> None:
    if not Path(text).is_dir():
        raise ValueError(f"{text} is not a directory")


def run_corrupt(args: argparse.Namespace) -> int:
    """``driftsync corrupt``: build an ImageNet-C-style tree from any class-per-folder image set."""
    corruptions = parse_corruptions(args.corruptions)
    try:
        written = write_corrupted_tree(Path(args.input), Path(args.output), corruptions,
                                       parse_severities(args.severities), args.seed, args.size)
    except (OSError, ValueError) as exc:
        raise UserError(f"corrupt failed: {exc}") from exc
    print(f"wrote {written} files to {args.output}" + (f" (frost: {frost_source()})" if "frost" in corruptions else ""))
    return 0
