"""A reduced `driftsync demo`: the same code path as the README's first command."""
from __future__ import annotations

import json

from PIL import Image

from driftsync.demo import DemoOptions, run_demo
from driftsync.report import REPORT_KEYS


def test_reduced_demo_runs_processes_over_http_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    stale = out / "server-state" / "driftsync.sqlite"  # a previous run's adapted state must not leak in
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a database")
    (out / "devices" / "0").mkdir(parents=True)
    (out / "devices" / "0" / "status.json").write_text('{"frames": 99999, "version": 77}')
    report = run_demo(DemoOptions(
        devices=2, samples_per_domain=96, corruptions="gaussian_noise,fog,contrast", out=out, fps=24.0, batch_size=16,
    ))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(REPORT_KEYS) <= set(on_disk)
    assert [d["name"] for d in on_disk["domains"]] == ["gaussian_noise", "fog", "contrast"]
    for d in on_disk["domains"]:
        assert d["samples"] == 2 * 96
        assert 0.0 <= d["error"] <= 100.0 and 0.0 <= d["error_source"] <= 100.0
    assert on_disk["deltas_applied"] >= 1 and on_disk["downlink_bytes"] > 0
    assert 0.0 < on_disk["upload_ratio"] <= 1.0 and on_disk["uplink_bytes_per_sample"] > 0
    assert "| **mean** |" in (out / "report.md").read_text()
    with Image.open(out / "report.png") as png:
        assert png.size[0] > 500 and png.format == "PNG"
    for i in range(2):
        summary = json.loads((out / "devices" / str(i) / "summary.json").read_text())
        assert summary["status"]["uploads"]["dropped"] == 0
        assert summary["status"]["frames"] == 3 * 96
