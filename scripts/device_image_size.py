"""Estimate the size of the device image (docker/device.Dockerfile) from the installed packages.

The closure of `driftsync[device]` is resolved from this environment's metadata
(importlib.metadata): Requires-Dist followed recursively, markers evaluated for this
interpreter, extras of the dependencies not followed. Each distribution counts the installed
size of its files (its RECORD), so run this in a venv where `pip install -e .[device]` (or a
superset, such as the dev extra) is installed. driftsync itself counts once: the image holds only
its installed copy in /opt/venv (the builder stage's source tree stays behind). The base image is
a documented constant; scripts/compose_e2e.sh measures the real image (BENCHMARKS.md, issue 13).

    python scripts/device_image_size.py
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "driftsync"
EXTRA = "device"
REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = ("driftsync", "shared", "device_client")  # what device.Dockerfile installs
# python:3.11-slim (Debian bookworm, linux/amd64), uncompressed, as `docker image ls` reports it.
# An estimate: Docker Hub lists about 45 MB compressed, and it unpacks to about 125-130 MB,
# changing a little with every patch release. Not measured here (no registry); the local debootstrap
# base that scripts/compose_e2e.sh builds measures 155 MB, and the device image on it 367 MB.
BASE_IMAGE = "python:3.11-slim"
BASE_IMAGE_MB = 130.0
MB = 1e6


def _requirements(dist: metadata.Distribution, extra: str) -> list[Requirement]:
    """dist's requirements whose markers hold here, with `extra` set (or '' for none)."""
    env = {**default_environment(), "extra": extra}
    reqs = [Requirement(text) for text in dist.requires or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def closure(root: str = ROOT, extra: str = EXTRA) -> dict[str, metadata.Distribution]:
    """Every installed distribution root[extra] needs, by canonical name; root included.

    A requirement of root on root itself (`driftsync[device]` inside the server extra) is
    followed with that extra; dependencies' own extras are not followed."""
    found = {canonicalize_name(root): metadata.distribution(root)}
    todo = [(found[canonicalize_name(root)], extra)]
    while todo:
        dist, with_extra = todo.pop()
        for req in _requirements(dist, with_extra):
            name = canonicalize_name(req.name)
            if name == canonicalize_name(root):
                todo.extend((found[name], e) for e in req.extras)
                continue
            if name in found:
                continue
            try:
                found[name] = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"{req.name} (needed by {dist.metadata['Name']}) is not installed here") from None
            todo.append((found[name], ""))
    return found


def installed_bytes(dist: metadata.Distribution) -> int:
    """Sum of the sizes of the distribution's installed files (RECORD), compiled bytecode included."""
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def source_bytes(packages: tuple[str, ...] = DEVICE_PACKAGES) -> int:
    """driftsync's own code as the image holds it: installed once, in the venv."""
    files = [p for pkg in packages for p in (REPO / pkg).rglob("*.py")]
    return sum(p.stat().st_size for p in files)


def main() -> int:
    dists = closure()
    if "torch" in dists:
        print("error: torch is in the device closure", file=sys.stderr)
        return 1
    rows = []
    for name, dist in dists.items():
        size = source_bytes() if name == canonicalize_name(ROOT) else installed_bytes(dist)
        rows.append((dist.metadata["Name"], dist.version, size / MB))
    rows.sort(key=lambda row: -row[2])
    packages = sum(row[2] for row in rows)
    print(f"Device image estimate: {ROOT}[{EXTRA}] closure from {sys.prefix}, "
          f"Python {sys.version_info.major}.{sys.version_info.minor}\n")
    print("| package | version | MB |")
    print("|---|---|---:|")
    for name, version, size in rows:
        print(f"| {name} | {version} | {size:.1f} |")
    print(f"| **packages ({len(rows)})** | | **{packages:.1f}** |")
    print(f"| {BASE_IMAGE} (base, estimate) | | {BASE_IMAGE_MB:.0f} |")
    print(f"| **total** | | **{packages + BASE_IMAGE_MB:.0f}** |")
    print("\ntorch: not in the closure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
