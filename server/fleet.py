"""What the operator sees of the fleet: last-seen times and each device's telemetry trend.

Kept in memory, bounded per device: it is a view for the dashboard and the JSON API,
not state the adaptation depends on. Prometheus gets only fleet-wide aggregates.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from shared.protocol import Telemetry, TrendPoint

TREND_POINTS = 120


@dataclass
class DeviceView:
    last_seen: float = 0.0
    uploaded_samples: int = 0
    version: int | None = None  # as the device last reported it
    trend: deque[TrendPoint] = field(default_factory=lambda: deque(maxlen=TREND_POINTS))
    _last_sent: int | None = None


class FleetView:
    def __init__(self) -> None:
        self._devices: dict[str, DeviceView] = {}
        self._lock = threading.Lock()

    def _view(self, device_id: str) -> DeviceView:
        return self._devices.setdefault(device_id, DeviceView())

    def seen(self, device_id: str, uploaded: int = 0) -> None:
        with self._lock:
            view = self._view(device_id)
            view.last_seen = time.time()
            view.uploaded_samples += uploaded

    def report(self, device_id: str, t: Telemetry) -> None:
        """Rates come from the device's own counters over its window, so a lost report costs
        one point, not a wrong rate."""
        with self._lock:
            view = self._view(device_id)
            sent_since = 0 if view._last_sent is None else max(0, t.uploads_sent - view._last_sent)
            view._last_sent = t.uploads_sent
            view.version = t.version
            view.last_seen = time.time()
            view.trend.append(TrendPoint(
                at=view.last_seen, version=t.version, frames_per_s=t.frames / t.window_s,
                uploads_per_s=sent_since / t.window_s, mean_entropy=t.mean_entropy,
                mean_confidence=t.mean_confidence, spooled=t.uploads_spooled, dropped=t.uploads_dropped,
            ))

    def forget(self, device_ids: list[str]) -> None:
        with self._lock:
            for device_id in device_ids:
                self._devices.pop(device_id, None)

    def get(self, device_id: str) -> DeviceView:
        with self._lock:
            view = self._view(device_id)
            return DeviceView(view.last_seen, view.uploaded_samples, view.version, deque(view.trend, maxlen=TREND_POINTS))
