"""How far do real deltas move from the source values? The figure behind `--delta-max-rel`.

A real server (embedded models) and a real device in `cloud` normalization, so deltas carry
every tensor, BN statistics included; the device streams all 15 corruptions at severity 5 with
no bound, and after every applied delta we record, per tensor kind, the largest
|value - source| / max(1, max |source|) of any tensor: the ratio the bound compares.

    PYTHONPATH=. python scripts/bench_delta_bounds.py --per-domain 128 --pace-s 0.25
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from device_client.client import DeviceClient, DeviceConfig
from driftsync.data import streams
from server.main import build_app
from server.options import ServeOptions
from tests.conftest import serve_in_thread


def ratio(value: np.ndarray, source: np.ndarray) -> float:
    return float(np.abs(value.astype(np.float64) - source).max() / max(1.0, float(np.abs(source).max())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-domain", type=int, default=128)
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--pace-s", type=float, default=0.25, help="pause between batches of 16, so the server keeps up")
    args = parser.parse_args()
    images, _ = streams.embedded_base(args.per_domain)
    worst: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(ServeOptions(state_dir=Path(tmp) / "server", step_min_samples=8, step_max_wait_s=0.3))
        with serve_in_thread(app) as url:
            device = DeviceClient(DeviceConfig(server=url, state_dir=Path(tmp) / "device", normalization="cloud",
                                               delta_max_rel=None, poll_wait_s=1.0)).start()
            source, applied, started = device.source_params, 0, time.monotonic()
            for name in streams.parse_corruptions("all"):
                frames = streams.corrupted(images, streams.Domain(name, args.severity), 0)
                for i in range(0, len(frames), 16):
                    device.predict(frames[i:i + 16])
                    time.sleep(args.pace_s)
                    if device.deltas.applied != applied:
                        applied = device.deltas.applied
                        for tensor, value in device.model.params.items():
                            kind = tensor.rsplit(".", 1)[1]
                            worst[kind] = max(worst[kind], ratio(value, source[tensor]))
            device.stop()
    print(json.dumps({"deltas_applied": applied, "seconds": round(time.monotonic() - started, 1),
                      "worst_ratio_by_kind": {k: round(v, 3) for k, v in sorted(worst.items())}}, indent=2))


if __name__ == "__main__":
    main()
