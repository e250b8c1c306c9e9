"""Upload bodies on disk, oldest first, bounded in bytes.

Every selected batch is written here before it is sent, so what a device chose to
upload survives a dead server, a full network outage and a kill -9. When the
spool is full, the oldest batches go first and every dropped sample is counted.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from device_client.state import atomic_write

log = logging.getLogger("driftsync.device.spool")
SUFFIX = ".upload"


@dataclass(frozen=True)
class SpoolEntry:
    path: Path
    samples: int
    size: int


def _entry(path: Path) -> SpoolEntry | None:
    """Names are `<sequence>-<samples>.upload`; anything else in the folder is not ours."""
    seq, _, samples = path.stem.partition("-")
    if not (seq.isdigit() and samples.isdigit()):
        return None
    return SpoolEntry(path, int(samples), path.stat().st_size)


class Spool:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.dropped_samples = 0
        self.dropped_batches = 0
        self._lock = threading.Lock()
        self._entries: list[SpoolEntry] = sorted(
            (e for p in self.root.glob(f"*{SUFFIX}") if (e := _entry(p)) is not None), key=lambda e: e.path.name
        )
        self._next = 1 + max((int(e.path.stem.partition("-")[0]) for e in self._entries), default=0)
        if self._entries:
            log.info("spool holds %d batches (%d samples) from before the restart", len(self._entries), self.samples())

    def put(self, body: bytes, samples: int) -> None:
        """Write atomically, then drop the oldest batches while over the bound."""
        with self._lock:
            path = self.root / f"{self._next:012d}-{samples}{SUFFIX}"
            self._next += 1
            atomic_write(path, body)
            self._entries.append(SpoolEntry(path, samples, len(body)))
            while len(self._entries) > 1 and self.bytes() > self.max_bytes:
                oldest = self._entries.pop(0)
                oldest.path.unlink(missing_ok=True)
                self.dropped_samples += oldest.samples
                self.dropped_batches += 1
                log.warning("spool over %d bytes: dropped the oldest batch (%d samples)", self.max_bytes, oldest.samples)

    def oldest(self) -> SpoolEntry | None:
        with self._lock:
            return self._entries[0] if self._entries else None

    def remove(self, entry: SpoolEntry) -> None:
        with self._lock:
            if entry in self._entries:
                self._entries.remove(entry)
            entry.path.unlink(missing_ok=True)

    def samples(self) -> int:
        return sum(e.samples for e in self._entries)

    def bytes(self) -> int:
        return sum(e.size for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)
