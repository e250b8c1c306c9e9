"""report.md names every domain where adaptation is worse than the source; report.png keeps full names and
keeps its title, legend, plot and labels apart."""
from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from driftsync.data.corruptions import CORRUPTIONS
from driftsync.report import _font, build_report, layout, markdown, plot


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


def test_layout_keeps_the_title_legend_plot_and_full_domain_names_apart(tmp_path) -> None:
    """ImageNet-C's 15 domains and 14 methods under a title too long for one line: every piece has its own room."""
    domains = [d for d in CORRUPTIONS for _ in range(8)]
    names = ["source", "bn", "tent", "eata", "cotta"] + [f"{m}{u}" for m in ("cema", "prompt", "cema+prompt",
                                                                                "cema/prompt") for u in ("", "@ugs")]
    title = "imagenet-c, continual: online accuracy (moving average) of every method against the source model " * 2
    at = layout(names, domains, title)
    assert len(at.title) >= 2 and " ".join(text for text, _ in at.title) == title.strip()
    assert [name for name, _ in at.legend] == names  # every line in the legend, none dropped past the palette
    boxes = [b for _, b in at.title] + [b for _, b in at.legend] + [at.plot] + [b for _, b in at.domains]
    for i, box in enumerate(boxes):
        assert 0 <= box.x0 < box.x1 <= at.width and 0 <= box.y0 < box.y1 <= at.height, box
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), box
    assert max(b.y1 for _, b in at.title) < min(b.y0 for _, b in at.legend)
    assert max(b.y1 for _, b in at.legend) < at.plot.y0 and at.plot.y1 < min(b.y0 for _, b in at.domains)
    assert [d for d, _ in at.domains] == list(CORRUPTIONS)  # full names, each once
    small = _font(12)
    assert all(b.y1 - b.y0 >= small.getlength(d) for d, b in at.domains)  # room for the whole name
    plot({n: np.full(len(domains), 0.5) for n in names}, domains, tmp_path / "p.png", title)
    with Image.open(tmp_path / "p.png") as png:
        assert png.size == (at.width, at.height)


def test_labels_that_would_collide_are_left_out_not_overdrawn() -> None:
    domains = [CORRUPTIONS[i % 3] for i in range(300)]  # a mixed stream: a new domain every sample
    at = layout(["source"], domains, "mixed")
    shown = [b for _, b in at.domains]
    assert 1 < len(shown) < 300 and not any(a.overlaps(b) for a, b in itertools.pairwise(shown))
