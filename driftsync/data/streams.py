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


def dirichlet_order(labels: np.ndarray, concentration: float, slots: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation whose labels arrive in bursts: each class spreads over time slots by Dir(concentration)."""
    slot_of = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        weights = rng.dirichlet(np.full(slots, concentration))
        slot_of[members] = rng.choice(slots, size=len(members), p=weights)
    return np.lexsort((rng.random(len(labels)), slot_of))


def replay(
    images: np.ndarray,
    labels: np.ndarray,
    domains: list[Domain],
    batch_size: int,
    seed: int = 0,
    *,
    reset_each_shift: bool = False,
    dirichlet: float | None = None,
) -> Iterator[Chunk]:
    """Corrupt the base set once per domain and yield it in batches, in schedule order."""
    for domain in domains:
        x, y = corrupted(images, domain, seed), labels
        if dirichlet is not None:
            rng = np.random.default_rng([seed, 7919, len(labels)])
            order = dirichlet_order(labels, dirichlet, max(1, len(labels) // batch_size), rng)
            x, y = x[order], y[order]
        for start in range(0, len(images), batch_size):
            yield Chunk(domain, x[start : start + batch_size], y[start : start + batch_size],
                        reset=reset_each_shift and start == 0)


def replay_mixed(
    images: np.ndarray, labels: np.ndarray, domains: list[Domain], batch_size: int, seed: int = 0
) -> Iterator[Chunk]:
    """All domains' images shuffled into one stream; each sample keeps its domain's name."""
    xs = [corrupted(images, d, seed) for d in domains]
    x, y = np.concatenate(xs), np.tile(labels, len(domains))
    names = np.repeat([d.key for d in domains], len(labels))
    order = np.random.default_rng([seed, 104729]).permutation(len(y))
    mixed = Domain("mixed", domains[0].severity if domains else 0)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield Chunk(mixed, x[idx], y[idx], sample_domains=tuple(names[idx].tolist()))


def stream_length(setting: str, samples: int, corruptions: list[str], severity: int) -> int:
    if setting == "gradual" and corruptions:
        return samples * len(gradual_domains(corruptions, severity))
    return samples * max(1, len(corruptions))


def stream(
    setting: str,
    images: np.ndarray,
    labels: np.ndarray,
    corruptions: list[str],
    severity: int,
    batch_size: int,
    seed: int = 0,
    dirichlet: float = 0.1,
) -> Iterator[Chunk]:
    """The stream for a named setting; every method given the same arguments sees the same frames."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    if setting == "gradual":
        domains = gradual_domains(corruptions, severity) if corruptions else continual_domains([], severity)
        return replay(images, labels, domains, batch_size, seed)
    domains = continual_domains(corruptions, severity)
    if setting == "mixed":
        return replay_mixed(images, labels, domains, batch_size, seed)
    return replay(images, labels, domains, batch_size, seed, reset_each_shift=setting == "reset_each_shift",
                  dirichlet=dirichlet if setting == "correlated" else None)
