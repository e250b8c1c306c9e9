"""Drive a device with a labelled replay stream and tally its online error.

Online error: each prediction is scored with the parameters the device had
when it made it. A shadow session with the source parameters scores the same
frames, so one run gives both columns of the table.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device_client.client import DeviceClient
from device_client.runtime import build_session
from device_client.scoring import to_model_input
from driftsync.data.streams import Chunk

log = logging.getLogger("driftsync.device.replay")


@dataclass
class DomainTally:
    name: str
    severity: int
    samples: int = 0
    errors: int = 0
    errors_source: int = 0
    uploaded: int = 0
    uplink_bytes: int = 0


def run_replay(
    client: DeviceClient,
    chunks: Iterable[Chunk],
    *,
    fps: float | None,
    records_path: Path | None = None,
    total: int | None = None,
) -> dict:
    source = build_session(client.onnx_bytes, client.source_params, client.cfg.threads)
    tallies: dict[str, DomainTally] = {}
    curve: list[dict] = []
    current: DomainTally | None = None
    bytes_at_domain_start = 0
    records = records_path.open("w") if records_path else None
    started = time.monotonic()
    done = 0
    try:
        for chunk in chunks:
            if current is None or current.name != chunk.domain.name:
                if current is not None:
                    current.uplink_bytes += client.uploader.stats.sent_bytes - bytes_at_domain_start
                bytes_at_domain_start = client.uploader.stats.sent_bytes
                current = tallies.setdefault(chunk.domain.name, DomainTally(chunk.domain.name, chunk.domain.severity))
            if fps:
                lag = started + done / fps - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            now = time.time()
            out = client.predict(chunk.images, np.full(len(chunk.images), now))
            source_pred = source.run(None, {"input": to_model_input(chunk.images)})[0].argmax(axis=1)
            wrong = out.labels != chunk.labels
            current.samples += len(chunk.labels)
            current.errors += int(wrong.sum())
            current.errors_source += int((source_pred != chunk.labels).sum())
            current.uploaded += int(out.uploaded.sum())
            curve.append({
                "sample": done, "domain": chunk.domain.name, "version": out.version,
                "accuracy": float(1 - wrong.mean()), "accuracy_source": float((source_pred == chunk.labels).mean()),
            })
            if records is not None:
                for i in range(len(chunk.labels)):
                    records.write(json.dumps({
                        "domain": chunk.domain.name, "label": int(chunk.labels[i]), "prediction": int(out.labels[i]),
                        "confidence": round(float(out.confidence[i]), 5), "entropy": round(float(out.entropy[i]), 5),
                        "uploaded": bool(out.uploaded[i]), "version": out.version, "time": now,
                    }) + "\n")
            done += len(chunk.labels)
            if total and done % max(1, total // 10) < len(chunk.labels):
                log.info("replayed %d/%d samples, v%d, %d uploads", done, total, out.version, client.uploader.stats.offered)
    finally:
        if records is not None:
            records.close()
    client.stop()
    if current is not None:
        current.uplink_bytes += client.uploader.stats.sent_bytes - bytes_at_domain_start
    return {
        "domains": [asdict(t) for t in tallies.values()],
        "curve": curve,
        "status": client.status(),
        "freshness_s": client.deltas.freshness_s,
        "seconds": time.monotonic() - started,
    }
