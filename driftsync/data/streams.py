"""Drifting test streams: a base set of labelled images replayed through a schedule of domains.

Settings, as the practitioners' framework (mariodoebler/test-time-adaptation) names them:
- continual: each corruption once, CoTTA order, one severity, same base images, no reset;
- reset_each_shift: the same stream, with a reset flag on the first batch of each domain;
- gradual: per corruption, severity 1 -> 5 -> 1 (1,2,3,4,5,4,3,2,1), no reset;
- mixed: every corruption's images at one severity, shuffled together into one stream;
- correlated: the continual stream with labels ordered by a Dirichlet draw over time
  (RoTTA's protocol, concentration `dirichlet`, default 0.1): classes arrive in bursts.

Memory stays bounded by a batch, not the stream: a domain is a `Frames`, images addressed by
index (decoded files on disk, rows of a .npy, or an array corrupted in memory), and a `Chunk`
is a domain and the indices of one batch, decoded only when its `images` are read. `mixed` and
`correlated` permute indices; no pixels are concatenated.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from driftsync.data import synthetic
from driftsync.data.corruptions import CORRUPTIONS, constants_for_size, corrupt
from shared.images import fit_image

CLEAN = "clean"
EMBEDDED_TEST_START = 10**6  # far from the indices the embedded models train on


@dataclass(frozen=True)
class Domain:
    name: str  # the corruption, or "clean"
    severity: int
    label: str = ""  # how reports name it, where the name alone repeats (gradual)

    @property
    def key(self) -> str:
        return self.label or self.name


SETTINGS = ("continual", "reset_each_shift", "gradual", "mixed", "correlated")


class Frames(Protocol):
    """A domain's labelled images, addressed by index: pixels are made only for the indices asked."""

    labels: np.ndarray  # int64, one per image

    def __len__(self) -> int: ...

    def pixels(self, index: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3, in the order of `index`."""

    def encoded(self, index: np.ndarray) -> list[bytes]:
        """Each image as a file PIL reads (JPEG, PNG), for a stream file."""


def encode_png(image: np.ndarray) -> bytes:
    """Lossless and fast (compression level 1): stream files of generated images keep every pixel."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


STREAM_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # what a stream file's records may be (the loaders' suffixes)


def decode_frame(data: bytes, size: int) -> np.ndarray:
    """One stream record to uint8 size x size x 3, fitted exactly as the loaders fit files."""
    with Image.open(io.BytesIO(data), formats=STREAM_FORMATS) as image:
        return fit_image(image, size)


@dataclass(frozen=True)
class ArrayFrames:
    """Images already in memory (a base set corrupted on the fly, a small test set)."""

    images: np.ndarray  # uint8 N x H x W x 3
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: np.ndarray) -> np.ndarray:
        return self.images[index]

    def encoded(self, index: np.ndarray) -> list[bytes]:
        return [encode_png(self.images[i]) for i in index]


class MixedFrames:
    """Several domains' frames as one index space (domain after domain), nothing copied."""

    def __init__(self, parts: Sequence[Frames]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.labels = np.concatenate([p.labels for p in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def part_of(self, index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, index, side="right") - 1

    def _gather(self, index: np.ndarray, read: Callable[[Frames, np.ndarray], Sequence]) -> list:
        index = np.asarray(index)
        parts = self.part_of(index)
        out: list = [None] * len(index)
        for p in np.unique(parts):
            where = np.flatnonzero(parts == p)
            for k, item in zip(where, read(self.parts[p], index[where] - self.starts[p]), strict=True):
                out[k] = item
        return out

    def pixels(self, index: np.ndarray) -> np.ndarray:
        return np.stack(self._gather(index, lambda frames, i: frames.pixels(i)))

    def encoded(self, index: np.ndarray) -> list[bytes]:
        return self._gather(index, lambda frames, i: frames.encoded(i))


@dataclass(frozen=True)
class Chunk:
    """One batch: a domain's frames and the indices of this batch in them."""

    domain: Domain
    frames: Frames
    index: np.ndarray  # int64 into frames
    sample_domains: tuple[str, ...] | None = None  # per sample, where a batch mixes domains
    reset: bool = False  # methods that reset on a shift do it before this batch

    @property
    def labels(self) -> np.ndarray:
        return self.frames.labels[self.index]

    @property
    def images(self) -> np.ndarray:
        """uint8 N x H x W x 3, decoded on every read (a held chunk holds no pixels): read once per use."""
        return self.frames.pixels(self.index)

    def encoded(self) -> list[bytes]:
        return self.frames.encoded(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def domain_names(self) -> tuple[str, ...]:
        return self.sample_domains or (self.domain.key,) * len(self.index)


def parse_corruptions(text: str | None) -> list[str]:
    """'all' or None -> the CoTTA order; 'none' -> clean only; else a comma list."""
    if text is None or text == "all":
        return list(CORRUPTIONS)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(CORRUPTIONS)}")
    return names


def continual_domains(corruptions: list[str], severity: int) -> list[Domain]:
    if not corruptions:
        return [Domain(CLEAN, 0)]
    return [Domain(name, severity) for name in corruptions]


def rotate(domains: list, offset: int) -> list:
    """A different start in the same cycle: devices of one fleet drift out of step."""
    if not domains:
        return domains
    k = offset % len(domains)
    return domains[k:] + domains[:k]


def embedded_base(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out embedded images; devices given different offsets see different scenes."""
    return synthetic.generate(EMBEDDED_TEST_START + offset, count)


def npz_base(path: Path, count: int | None, key: str = "x", label_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        if key not in data or label_key not in data:
            raise ValueError(f"{path} has keys {sorted(data.files)}; expected {key!r} and {label_key!r}")
        x, y = data[key], data[label_key]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"{path}:{key} must be uint8 NxHxWx3, got {x.dtype} {x.shape}")
    if count is not None:
        x, y = x[:count], y[:count]
    return x, y.astype(np.int64)


def label_key_for(image_key: str) -> str:
    """x -> y, x_exact1000 -> y_exact1000: the npz convention of ../shared/data/cifar10."""
    return "y" + image_key[1:] if image_key.startswith("x") else "y"


def gradual_domains(corruptions: list[str], peak: int = 5) -> list[Domain]:
    ramp = list(range(1, peak + 1)) + list(range(peak - 1, 0, -1))
    return [Domain(name, severity, f"{name}@{severity}") for name in corruptions for severity in ramp]


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """One generator per (seed, corruption, severity): every method sees identical images."""
    return np.random.default_rng([seed, CORRUPTIONS.index(name), severity])


def corrupted(images: np.ndarray, domain: Domain, seed: int) -> np.ndarray:
    if domain.name == CLEAN:
        return images
    constants = constants_for_size(images.shape[1], images.shape[2])
    return corrupt(images, domain.name, domain.severity, corruption_rng(seed, domain.name, domain.severity), constants=constants)


DomainSource = Callable[[Domain], Frames]
"""A domain's labelled frames: corrupted on the fly from a base set, or read from disk (CIFAR-10-C, ImageNet-C)."""


def corrupting(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> DomainSource:
    """Each domain corrupted whole in memory when it is asked for (a corruption's random draws
    span the base set); `driftsync replay` reads them from its on-disk cache instead."""
    return lambda domain: ArrayFrames(corrupted(images, domain, seed), labels)


def dirichlet_order(labels: np.ndarray, concentration: float, slots: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation whose labels arrive in bursts: each class spreads over time slots by Dir(concentration)."""
    slot_of = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        weights = rng.dirichlet(np.full(slots, concentration))
        slot_of[members] = rng.choice(slots, size=len(members), p=weights)
    return np.lexsort((rng.random(len(labels)), slot_of))


def replay(
    source: DomainSource,
    domains: list[Domain],
    batch_size: int,
    seed: int = 0,
    *,
    reset_each_shift: bool = False,
    dirichlet: float | None = None,
) -> Iterator[Chunk]:
    """Each domain's images in batches, in schedule order; `dirichlet` reorders indices into label bursts."""
    for domain in domains:
        frames = source(domain)
        order = np.arange(len(frames))
        if dirichlet is not None:
            rng = np.random.default_rng([seed, 7919, len(frames)])
            order = dirichlet_order(frames.labels, dirichlet, max(1, len(frames) // batch_size), rng)
        for start in range(0, len(order), batch_size):
            yield Chunk(domain, frames, order[start : start + batch_size], reset=reset_each_shift and start == 0)


def replay_mixed(source: DomainSource, domains: list[Domain], batch_size: int, seed: int = 0) -> Iterator[Chunk]:
    """All domains' images shuffled into one stream by one permutation of their joint index;
    each sample keeps its domain's name."""
    frames = MixedFrames([source(d) for d in domains])
    names = [d.key for d in domains]
    order = np.random.default_rng([seed, 104729]).permutation(len(frames))
    mixed = Domain("mixed", domains[0].severity if domains else 0)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield Chunk(mixed, frames, idx, sample_domains=tuple(names[p] for p in frames.part_of(idx)))


def stream_length(setting: str, samples: int, corruptions: list[str], severity: int) -> int:
    if setting == "gradual" and corruptions:
        return samples * len(gradual_domains(corruptions, severity))
    return samples * max(1, len(corruptions))


def schedule(setting: str, corruptions: list[str], severity: int) -> list[Domain]:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    if setting == "gradual" and corruptions:
        return gradual_domains(corruptions, severity)
    return continual_domains(corruptions, severity)


def stream(
    setting: str,
    source: DomainSource,
    corruptions: list[str],
    severity: int,
    batch_size: int,
    seed: int = 0,
    dirichlet: float = 0.1,
) -> Iterator[Chunk]:
    """The stream for a named setting; every method given the same arguments sees the same frames."""
    domains = schedule(setting, corruptions, severity)
    if setting == "mixed":
        return replay_mixed(source, domains, batch_size, seed)
    return replay(source, domains, batch_size, seed, reset_each_shift=setting == "reset_each_shift",
                  dirichlet=dirichlet if setting == "correlated" else None)


# --------------------------------------------------------------------------- stream files

STREAM_META = "stream.json"
STREAM_VERSION = 2


def write_stream(chunks: Iterable[Chunk], directory: Path, progress: Callable[[int], None] | None = None) -> int:
    """Persist a stream exactly as replayed (images, labels, batch boundaries, domains, resets),
    so that every method, in this process or in a device process, replays identical frames.

    Layout (version 2), all in `directory`:
      frames.bin   every image back to back, each a complete image file: ImageNet-C's JPEGs
                   byte for byte as released (no re-encoding, no loss), generated images as PNG
      offsets.npy  int64 N+1: image i is frames.bin[offsets[i]:offsets[i+1]]
      labels.npy   int64 N;  domains.npy  int32 N (index into domain_names)
      stream.json  {"version", "frame_size", "domain_names", "chunks": [{"size", "domain",
                   "severity", "label", "reset", "mixed"}, ...]}
    Encoded bytes rather than a memory-mapped pixel array: pages of a mapped file count in a
    reader's resident memory once touched, so a replay would grow to the file's size; reading
    records with seek+read holds one batch. PNG, not raw rows, for generated images: lossless,
    and smaller on disk. Writing holds one batch too. Returns the number of samples."""
    directory.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = []
    offsets, labels, domains = [0], [], []
    frame_size = None
    with (directory / "frames.bin").open("wb") as out:
        for chunk in chunks:
            if frame_size is None:
                frame_size = int(chunk.frames.pixels(chunk.index[:1]).shape[1])  # one image: the side
            for data in chunk.encoded():
                out.write(data)
                offsets.append(offsets[-1] + len(data))
            labels.append(chunk.labels.astype(np.int64))
            domains.extend(chunk.domain_names())
            parts.append({"size": len(chunk), "domain": chunk.domain.name, "severity": chunk.domain.severity,
                          "label": chunk.domain.label, "reset": chunk.reset, "mixed": chunk.sample_domains is not None})
            if progress is not None:
                progress(len(offsets) - 1)
    if frame_size is None:
        raise ValueError("the stream is empty")
    names = list(dict.fromkeys(domains))
    np.save(directory / "offsets.npy", np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    np.save(directory / "labels.npy", np.concatenate(labels), allow_pickle=False)
    np.save(directory / "domains.npy", np.array([names.index(d) for d in domains], dtype=np.int32), allow_pickle=False)
    meta = {"version": STREAM_VERSION, "frame_size": frame_size, "domain_names": names, "chunks": parts}
    (directory / STREAM_META).write_text(json.dumps(meta, indent=1))
    return len(offsets) - 1


def _stream_meta(directory: Path) -> dict:
    meta_path = directory / STREAM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a stream file (no {STREAM_META}); `driftsync replay` writes them")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != STREAM_VERSION:
        raise ValueError(f"{directory} is a version {meta.get('version')} stream file; this driftsync reads version "
                         f"{STREAM_VERSION}: run `driftsync replay` again to rebuild it")
    return meta


def stream_file_length(directory: Path) -> int:
    return sum(c["size"] for c in _stream_meta(directory)["chunks"])


class StreamFileFrames:
    """The records of a stream file, read (seek + read) and decoded only for the indices asked."""

    def __init__(self, directory: Path, frame_size: int) -> None:
        self.path = directory / "frames.bin"
        self.offsets = np.load(directory / "offsets.npy", allow_pickle=False)
        self.labels = np.load(directory / "labels.npy", allow_pickle=False)
        self.frame_size = frame_size
        if len(self.offsets) != len(self.labels) + 1 or self.offsets[-1] != self.path.stat().st_size:
            raise ValueError(f"{directory}: frames.bin, offsets.npy and labels.npy disagree; rebuild the stream")

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, index: np.ndarray) -> list[bytes]:
        with self.path.open("rb") as f:
            return [os.pread(f.fileno(), int(self.offsets[i + 1] - self.offsets[i]), int(self.offsets[i]))
                    for i in index]

    def pixels(self, index: np.ndarray) -> np.ndarray:
        return np.stack([decode_frame(data, self.frame_size) for data in self.encoded(index)])


def read_stream(directory: Path) -> Iterator[Chunk]:
    """The chunks `write_stream` saved, in order; each decodes its batch when its images are read."""
    meta = _stream_meta(directory)
    frames = StreamFileFrames(directory, meta["frame_size"])
    domains = np.load(directory / "domains.npy", allow_pickle=False)
    names = meta["domain_names"]
    start = 0
    for part in meta["chunks"]:
        stop = start + part["size"]
        domain = Domain(part["domain"], part["severity"], part["label"])
        sample_domains = tuple(names[i] for i in domains[start:stop]) if part["mixed"] else None
        yield Chunk(domain, frames, np.arange(start, stop), sample_domains, part["reset"])
        start = stop
