"""Drifting test streams: a base set of labelled images replayed through a schedule of domains.

The continual protocol (CoTTA) visits each corruption once, in a fixed order,
at one severity, on the same base images, with no reset.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from driftsync.data import synthetic
from driftsync.data.corruptions import CORRUPTIONS, constants_for_size, corrupt

CLEAN = "clean"
EMBEDDED_TEST_START = 10**6  # far from the indices the embedded models train on


@dataclass(frozen=True)
class Domain:
    name: str
    severity: int


@dataclass(frozen=True)
class Chunk:
    domain: Domain
    images: np.ndarray  # uint8 N x H x W x 3
    labels: np.ndarray  # int64 N


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


def rotate(domains: list[Domain], offset: int) -> list[Domain]:
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


def replay(
    images: np.ndarray,
    labels: np.ndarray,
    domains: list[Domain],
    batch_size: int,
    seed: int = 0,
) -> Iterator[Chunk]:
    """Corrupt the base set once per domain (seeded by domain name) and yield it in batches."""
    constants = constants_for_size(images.shape[1], images.shape[2])
    for domain in domains:
        if domain.name == CLEAN:
            corrupted = images
        else:
            rng = np.random.default_rng([seed, CORRUPTIONS.index(domain.name), domain.severity])
            corrupted = corrupt(images, domain.name, domain.severity, rng, constants=constants)
        for start in range(0, len(images), batch_size):
            yield Chunk(domain, corrupted[start : start + batch_size], labels[start : start + batch_size])
