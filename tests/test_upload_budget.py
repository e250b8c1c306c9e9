"""The device's upload share budget end to end: `driftsync replay --method cema` with its defaults,
a real server and a real onnxruntime device process, uploads at most the budgeted share."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftsync.replay import ReplayOptions, run


def test_replay_cema_uploads_within_the_default_budget(tmp_path: Path) -> None:
    report = run(ReplayOptions(methods=("cema",), corruptions="gaussian_noise,fog,contrast", samples_per_domain=64,
                               batch_size=16, out=tmp_path, torch_threads=1))
    cema = report["methods"][0]
    assert 0.1 <= cema["upload_ratio"] <= 0.2, cema["upload_ratio"]
    status = json.loads(next((tmp_path / "runs" / "cema").rglob("status.json")).read_text())
    selection = status["selection"]
    assert selection["policy"] == "cema" and selection["upload_share"] == 0.2
    assert selection["over_budget"] > 0 and selection["unreliable"] == 0  # the budget, not E_max, decided


def test_upload_share_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from driftsync.cli import build_parser

    monkeypatch.delenv("DRIFTSYNC_UPLOAD_SHARE", raising=False)
    assert build_parser().parse_args(["device"]).upload_share == 0.2
    assert build_parser().parse_args(["device", "--upload-share", "none"]).upload_share is None
    monkeypatch.setenv("DRIFTSYNC_UPLOAD_SHARE", "0.05")
    assert build_parser().parse_args(["device"]).upload_share == 0.05
    for bad in ("0", "1.5", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["device", "--upload-share", bad])
    assert "--upload-share" in capsys.readouterr().err
