"""Drive a device with a labelled replay stream and tally its online error.

Online error: each prediction is scored with the parameters the device had
when it made it. A shadow session with the source parameters scores the same
frames, so one run gives both columns of the table.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from device_client.client import DeviceClient
from device_client.daemon import prediction_records
from device_client.runtime import build_session
from device_client.scoring import to_model_input
from device_client.sinks import Sink
from driftsync.data.streams import Chunk

log = logging.getLogger("driftsync.device.replay")
CURVE_KEPT = 100_000
UPLOADS_KEPT = 200_000  # per-upload records for the teacher's score; bounded for a repeating device


@dataclass
class DomainTally:
    name: str
    severity: int
    samples: int = 0
    errors: int = 0
    errors_source: int = 0
    uploaded: int = 0
    uplink_bytes: int = 0


def _tally(
    tallies: dict[str, DomainTally], chunk: Chunk, names: tuple[str, ...], predicted: np.ndarray,
    source_pred: np.ndarray, uploaded: np.ndarray, sent_bytes: int,
) -> None:
    """Per-sample domains (a mixed stream has several per batch); bytes sent since the last
    batch are shared among this batch's domains in proportion to their samples."""
    unallocated = sent_bytes
    distinct = list(dict.fromkeys(names))
    for i, name in enumerate(distinct):
        mask = np.array([n == name for n in names])
        t = tallies.setdefault(name, DomainTally(name, chunk.domain.severity))
        t.samples += int(mask.sum())
        t.errors += int((predicted[mask] != chunk.labels[mask]).sum())
        t.errors_source += int((source_pred[mask] != chunk.labels[mask]).sum())
        t.uploaded += int(uploaded[mask].sum())
        share = unallocated if i == len(distinct) - 1 else sent_bytes * int(mask.sum()) // len(names)
        t.uplink_bytes += share
        unallocated -= share


def _chunks(chunks: Iterable[Chunk], repeat: bool) -> Iterable[Chunk]:
    """The stream once, or forever: the chunks are held (indices, not pixels) and decode each pass."""
    if not repeat:
        yield from chunks
        return
    held = list(chunks)
    while True:
        yield from held


def run_replay(
    client: DeviceClient,
    chunks: Iterable[Chunk],
    *,
    fps: float | None,
    sinks: Sequence[Sink] = (),
    total: int | None = None,
    lockstep_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    repeat: bool = False,
) -> dict:
    """Replay `chunks` through the device, paced in real time (`fps`) or in lockstep: before each
    batch, wait until a delta includes every upload so far (bounded by `lockstep_timeout_s`),
    which is the zero-latency protocol that research tables assume. `repeat` replays the
    stream again and again until `stop` is set (a simulated device in a fleet). The summary's
    `uploads` lists each frame offered for upload with its label and the device's prediction,
    by its capture time (distinct per frame), which the server's --teacher-log also names."""
    stop = stop or threading.Event()
    source = build_session(client.onnx_path, client.source_params, client.cfg.threads)
    tallies: dict[str, DomainTally] = {}
    curve: deque[dict] = deque(maxlen=CURVE_KEPT)  # bounded: a repeating device runs for days
    uploads: deque[list] = deque(maxlen=UPLOADS_KEPT)  # [captured_at, label, domain, predicted] per uploaded frame
    sent_before = 0
    started = time.monotonic()
    done = 0
    last_uploaded_at = 0.0
    lockstep_timeouts = 0
    for chunk in _chunks(chunks, repeat):
        if stop.is_set():
            break
        if fps:
            lag = started + done / fps - time.monotonic()
            if lag > 0 and stop.wait(lag):
                break
        if lockstep_timeout_s and last_uploaded_at and not client.wait_for_delta_covering(last_uploaded_at, lockstep_timeout_s):
            lockstep_timeouts += 1
        now = time.time()
        images = chunk.images  # decoded here, once per batch
        captured = now + 1e-6 * np.arange(len(images))  # distinct, so a delta's coverage is exact
        out = client.predict(images, captured)
        if out.uploaded.any():
            last_uploaded_at = float(captured[out.uploaded].max())
        source_pred = source.run(None, {"input": to_model_input(images)})[0].argmax(axis=1)
        names = chunk.domain_names()
        uploads.extend([float(captured[i]), int(chunk.labels[i]), names[i], int(out.labels[i])]
                       for i in np.flatnonzero(out.uploaded))
        sent_now = client.uploader.stats.sent_bytes
        _tally(tallies, chunk, names, out.labels, source_pred, out.uploaded, sent_now - sent_before)
        sent_before = sent_now
        wrong = out.labels != chunk.labels
        curve.append({
            "sample": done, "domain": chunk.domain.key, "version": out.version,
            "accuracy": float(1 - wrong.mean()), "accuracy_source": float((source_pred == chunk.labels).mean()),
        })
        if sinks:
            extra = [{"domain": names[i], "label": int(chunk.labels[i])} for i in range(len(names))]
            ids = [str(done + i) for i in range(len(names))]
            records = prediction_records(out, ids, client.descriptor.class_names, now, extra)
            for sink in sinks:
                sink.write(records)
        done += len(chunk.labels)
        if total and done % max(1, total // 10) < len(chunk.labels):
            log.info("replayed %d/%d samples, v%d, %d uploads", done, total, out.version, client.uploader.stats.offered)
    client.stop()
    if tallies:  # bytes still in flight at the end belong to the last domain played
        list(tallies.values())[-1].uplink_bytes += client.uploader.stats.sent_bytes - sent_before
    return {
        "domains": [asdict(t) for t in tallies.values()],
        "curve": list(curve),
        "status": client.status(),
        "freshness_s": list(client.deltas.freshness_s),
        "seconds": time.monotonic() - started,
        "lockstep_timeouts": lockstep_timeouts,
        "uploads": list(uploads),
    }
