"""`driftsync demo`: a real server and N device processes on loopback, then a report.

Everything goes through the same commands a user runs (`driftsync serve`,
`driftsync device`), as separate processes talking HTTP.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from driftsync.data.corruptions import frost_source
from driftsync.data.streams import parse_corruptions
from driftsync.processes import mean_curve, run_fleet
from driftsync.report import build_report, markdown, write_report

STUDENT, TEACHER = "embedded-student", "embedded-teacher"


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 2
    samples_per_domain: int = 200
    severity: int = 5
    corruptions: str = "all"
    out: Path = Path("driftsync-demo")
    seed: int = 0
    fps: float | None = 30.0
    batch_size: int = 16
    port: int = 0
    # Per batch of 16. A demo domain is 200 frames, so the devices' statistics must track a shift
    # within a few batches: at the device default (0.2, for long camera streams) a new domain is
    # normalised with the previous one's statistics for about 80 frames (BENCHMARKS.md).
    stats_momentum: float = 0.5
    server_args: tuple[str, ...] = ()



def run_demo(opts: DemoOptions) -> dict:
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    domains = max(1, len(parse_corruptions(opts.corruptions)))
    frames = opts.devices * domains * opts.samples_per_domain
    pace = f" at {opts.fps:g} frames/s each (about {domains * opts.samples_per_domain / opts.fps:.0f} s)" if opts.fps else ""
    print(f"[demo] {opts.devices} device(s) x {domains} domain(s) x {opts.samples_per_domain} images{pace}",
          file=sys.stderr, flush=True)
    devices = [
        ["--name", f"demo-{i}", "--source", "embedded", "--image-offset", str(i * opts.samples_per_domain),
         "--corruptions", opts.corruptions, "--severity", str(opts.severity),
         "--samples-per-domain", str(opts.samples_per_domain), "--batch-size", str(opts.batch_size),
         "--fps", str(opts.fps) if opts.fps else "none", "--seed", str(opts.seed + i), "--threads", "1",
         "--stats-momentum", str(opts.stats_momentum)]
        for i in range(opts.devices)
    ]
    summaries = run_fleet(
        ["--torch-threads", "1", "--student", STUDENT, "--teacher", TEACHER, *opts.server_args], devices, out,
        port=opts.port, frames=frames, label="demo",
    )
    report = build_report(summaries, {
        "dataset": "embedded", "setting": "continual", "severity": opts.severity, "method": "cema",
        "student": STUDENT, "teacher": TEACHER, "corruption_constants": "cifar10",
        "frost": frost_source() if "frost" in parse_corruptions(opts.corruptions) else None,  # the devices corrupt alike
        "seconds": round(time.monotonic() - started, 1),
    })
    write_report(report, mean_curve(summaries), out)
    print(markdown(report))
    print(f"[demo] wrote {out}/report.json, report.md, report.png", file=sys.stderr, flush=True)
    return report
