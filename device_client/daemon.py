"""The device daemon's loop: frames from a source, through the model, into the sinks,
until the source ends or SIGTERM/SIGINT asks it to stop. Then it flushes what it can."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable

import numpy as np

from device_client.client import DeviceClient, Predictions
from device_client.sinks import Sink
from device_client.sources import Frames

log = logging.getLogger("driftsync.device")


def prediction_records(out: Predictions, ids: list[str], class_names: list[str], at: float,
                       extra: list[dict] | None = None) -> list[dict]:
    """One record per frame: what a sink receives."""
    return [
        {
            "id": ids[i], "prediction": int(out.labels[i]), "class": class_names[int(out.labels[i])],
            "confidence": round(float(out.confidence[i]), 5), "entropy": round(float(out.entropy[i]), 5),
            "uploaded": bool(out.uploaded[i]), "version": out.version, "time": at,
        } | (extra[i] if extra else {})
        for i in range(len(ids))
    ]


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the event: the loop ends at the next batch and flushes."""
    stop = threading.Event()

    def handle(signum: int, frame) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return stop


def run_live(
    client: DeviceClient, frames: Iterable[Frames], sinks: list[Sink], stop: threading.Event, fps: float | None = None
) -> int:
    """Predict every frame the source gives, optionally paced; returns the frames seen."""
    names = client.descriptor.class_names
    done = 0
    started = time.monotonic()
    for batch in frames:
        if fps:
            lag = started + done / fps - time.monotonic()
            if lag > 0 and stop.wait(lag):
                break
        now = time.time()
        out = client.predict(batch.images, np.full(len(batch.ids), now))
        records = prediction_records(out, batch.ids, names, now)
        for sink in sinks:
            sink.write(records)
        done += len(batch.ids)
        if stop.is_set():
            break
    return done
