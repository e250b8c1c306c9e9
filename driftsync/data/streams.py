"""Drifting test streams: a base set of labelled images replayed through a schedule of domains.

Settings, as the practitioners' framework (mariodoebler/test-time-adaptation) names them:
- continual: each corruption once, CoTTA order, one severity, same base images, no reset;
- reset_each_shift: the same stream, with a reset flag on the first batch of each domain;
- gradual: per corruption, severity 1 -> 5 -> 1 (1,2,3,4,5,4,3,2,1), no reset;
- mixed: every corruption's images at one severity, shuffled together into one stream;
- correlated: the continual stream with labels ordered by a Dirichlet draw over time
  (RoTTA's protocol, concentration `dirichlet`, default 0.1): classes arrive in bursts.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driftsync.data import synthetic
from driftsync.data.corruptions import CORRUPTIONS, constants_for_size, corrupt

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


@dataclass(frozen=True)
class Chunk:
    domain: Domain
    images: np.ndarray  # uint8 N x H x W x 3
    labels: np.ndarray  # int64 N
    sample_domains: tuple[str, ...] | None = None  # per sample, where a batch mixes domains
    reset: bool = False  # methods that reset on a shift do it before this batch

    def domain_names(self) -> tuple[str, ...]:
        return self.sample_domains or (self.domain.key,) * len(self.labels)


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


DomainSource = Callable[[Domain], tuple[np.ndarray, np.ndarray]]
"""A domain's labelled images: corrupted on the fly from a base set, or read from disk (CIFAR-10-C)."""


def corrupting(images: np.ndarray, labels: np.ndarray, seed: int = 0,
               corrupt_fn: Callable[[np.ndarray, Domain, int], np.ndarray] = corrupted) -> DomainSource:
    return lambda domain: (corrupt_fn(images, domain, seed), labels)


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
    """Each domain's images in batches, in schedule order."""
    for domain in domains:
        x, y = source(domain)
        if dirichlet is not None:
            rng = np.random.default_rng([seed, 7919, len(y)])
            order = dirichlet_order(y, dirichlet, max(1, len(y) // batch_size), rng)
            x, y = x[order], y[order]
        for start in range(0, len(y), batch_size):
            yield Chunk(domain, x[start : start + batch_size], y[start : start + batch_size],
                        reset=reset_each_shift and start == 0)


def replay_mixed(source: DomainSource, domains: list[Domain], batch_size: int, seed: int = 0) -> Iterator[Chunk]:
    """All domains' images shuffled into one stream; each sample keeps its domain's name."""
    pairs = [source(d) for d in domains]
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    names = np.concatenate([np.full(len(p[1]), d.key) for d, p in zip(domains, pairs)])
    order = np.random.default_rng([seed, 104729]).permutation(len(y))
    mixed = Domain("mixed", domains[0].severity if domains else 0)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield Chunk(mixed, x[idx], y[idx], sample_domains=tuple(names[idx].tolist()))


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


def write_stream(chunks: Iterable[Chunk], directory: Path, progress: Callable[[int], None] | None = None) -> int:
    """Persist a stream exactly as replayed (images, labels, batch boundaries, domains, resets),
    so that every method, in this process or in a device process, replays identical frames.
    Images go to a .npy that readers memory-map. Returns the number of samples."""
    directory.mkdir(parents=True, exist_ok=True)
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        raise ValueError("the stream is empty")
    parts: list[dict] = []
    labels, domains = [], []
    total = 0
    frame_shape = first.images.shape[1:]
    with (directory / "images.npy").open("wb") as out:  # images stream straight to disk: bounded memory
        header_size = _npy_header(out, (0, *frame_shape))
        for chunk in itertools.chain([first], chunks):
            out.write(np.ascontiguousarray(chunk.images, dtype=np.uint8).tobytes())
            labels.append(chunk.labels.astype(np.int64))
            domains.extend(chunk.domain_names())
            parts.append({"size": len(chunk.labels), "domain": chunk.domain.name, "severity": chunk.domain.severity,
                          "label": chunk.domain.label, "reset": chunk.reset, "mixed": chunk.sample_domains is not None})
            total += len(chunk.labels)
            if progress is not None:
                progress(total)
        out.seek(0)
        if _npy_header(out, (total, *frame_shape)) != header_size:
            raise RuntimeError("the .npy header changed size; cannot finish the stream file in place")
    names = list(dict.fromkeys(domains))
    np.save(directory / "labels.npy", np.concatenate(labels), allow_pickle=False)
    np.save(directory / "domains.npy", np.array([names.index(d) for d in domains], dtype=np.int32), allow_pickle=False)
    (directory / STREAM_META).write_text(json.dumps({"version": 1, "domain_names": names, "chunks": parts}, indent=1))
    return total


def _npy_header(out, shape: tuple[int, ...]) -> int:
    """Write a uint8 .npy header for `shape`; its size is fixed by the 64-byte alignment, so the
    final count can overwrite the placeholder written before the count was known."""
    start = out.tell()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.tell() - start


def stream_file_length(directory: Path) -> int:
    return sum(c["size"] for c in json.loads((directory / STREAM_META).read_text())["chunks"])


def read_stream(directory: Path) -> Iterator[Chunk]:
    """The chunks `write_stream` saved, in order; images are memory-mapped, never unpickled."""
    meta_path = directory / STREAM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a stream file (no {STREAM_META}); `driftsync replay` writes them")
    meta = json.loads(meta_path.read_text())
    images = np.load(directory / "images.npy", mmap_mode="r", allow_pickle=False)
    labels = np.load(directory / "labels.npy", allow_pickle=False)
    domains = np.load(directory / "domains.npy", allow_pickle=False)
    names = meta["domain_names"]
    start = 0
    for part in meta["chunks"]:
        stop = start + part["size"]
        domain = Domain(part["domain"], part["severity"], part["label"])
        sample_domains = tuple(names[i] for i in domains[start:stop]) if part["mixed"] else None
        yield Chunk(domain, np.array(images[start:stop]), labels[start:stop], sample_domains, part["reset"])
        start = stop
