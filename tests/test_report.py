"""report.md names every domain where adaptation is worse than the source; report.png keeps full names."""
from __future__ import annotations

import numpy as np
from PIL import Image

from driftsync.report import build_report, markdown, plot


def _summary(rows: list[tuple[str, int, int]]) -> dict:
    """One device's replay summary: (domain, errors adapted, errors source) out of 100 samples each."""
    return {
        "domains": [{"name": n, "samples": 100, "errors": e, "errors_source": s, "uploaded": 10, "uplink_bytes": 1000}
                    for n, e, s in rows],
        "status": {"uploads": {"sent": 30, "sent_bytes": 3000, "dropped": 0}, "deltas": {"applied": 2, "bytes": 500}},
        "freshness_s": [1.0, 2.0],
    }


META = {"dataset": "embedded", "setting": "continual", "severity": 5, "method": "cema", "student": "s", "teacher": "t"}


def test_markdown_flags_each_domain_worse_than_source() -> None:
    report = build_report([_summary([("gaussian_noise", 20, 50), ("brightness", 7, 3), ("pixelate", 8, 6)])], META)
    text = markdown(report)
    assert "| brightness | 100 | 3.0 | 7.0 | +4.0 **worse** |" in text
    assert "| gaussian_noise | 100 | 50.0 | 20.0 | -30.0 |" in text
    assert "worse than the source model on 2 domain(s): brightness (3.0 -> 7.0), pixelate (6.0 -> 8.0)" in text


def test_markdown_says_so_when_no_domain_got_worse() -> None:
    text = markdown(build_report([_summary([("fog", 10, 40)])], META))
    assert "at least as good as the source model on every domain" in text and "**worse**" not in text


def test_plot_makes_room_for_the_longest_domain_name(tmp_path) -> None:
    heights = {}
    for name in ("fog", "jpeg_compression_with_a_very_long_name"):
        domains = ["gaussian_noise"] * 10 + [name] * 10
        plot({"adapted": np.full(20, 0.8), "source": np.full(20, 0.5)}, domains, tmp_path / "p.png", "title")
        with Image.open(tmp_path / "p.png") as png:
            heights[name] = png.size[1]
            assert png.size[0] == 1100
    assert heights["jpeg_compression_with_a_very_long_name"] > heights["fog"] + 100  # labels are never cut
