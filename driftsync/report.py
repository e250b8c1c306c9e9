"""Reports: report.json (machine), report.md (people), report.png (online accuracy over the stream).

The plot is drawn with Pillow so that no plotting library is needed anywhere.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPORT_KEYS = (
    "dataset", "setting", "severity", "method", "student", "teacher", "domains",
    "mean_error_source", "mean_error", "upload_ratio", "uplink_bytes_per_sample",
    "downlink_bytes", "deltas_applied",
)


def _pct(numerator: float, denominator: float) -> float:
    return round(100.0 * numerator / denominator, 2) if denominator else 0.0


def build_report(summaries: list[dict], meta: dict) -> dict:
    """Aggregate per-device replay summaries; domains keep their first-seen order."""
    domains: dict[str, dict] = {}
    for summary in summaries:
        for d in summary["domains"]:
            agg = domains.setdefault(d["name"], {"name": d["name"], "samples": 0, "errors": 0, "errors_source": 0, "uploaded": 0, "uplink_bytes": 0})
            for key in ("samples", "errors", "errors_source", "uploaded", "uplink_bytes"):
                agg[key] += d[key]
    rows = [
        {
            "name": a["name"], "samples": a["samples"],
            "error_source": _pct(a["errors_source"], a["samples"]), "error": _pct(a["errors"], a["samples"]),
            "uploaded": a["uploaded"], "uplink_bytes": a["uplink_bytes"],
        }
        for a in domains.values()
    ]
    samples = sum(r["samples"] for r in rows)
    sent = sum(s["status"]["uploads"]["sent"] for s in summaries)
    sent_bytes = sum(s["status"]["uploads"]["sent_bytes"] for s in summaries)
    deltas = sum(s["status"]["deltas"]["applied"] for s in summaries)
    downlink = sum(s["status"]["deltas"]["bytes"] for s in summaries)
    fresh = np.array([f for s in summaries for f in s["freshness_s"]], dtype=float)
    report = dict(meta)
    report.update({
        "domains": rows,
        "mean_error_source": round(float(np.mean([r["error_source"] for r in rows])), 2) if rows else 0.0,
        "mean_error": round(float(np.mean([r["error"] for r in rows])), 2) if rows else 0.0,
        "upload_ratio": round(sent / samples, 4) if samples else 0.0,
        "uplink_bytes_per_sample": round(sent_bytes / samples, 1) if samples else 0.0,
        "downlink_bytes": downlink,
        "deltas_applied": deltas,
        "downlink_bytes_per_delta": round(downlink / deltas, 1) if deltas else 0.0,
        "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3) if fresh.size else None,
        "freshness_p95_s": round(float(np.percentile(fresh, 95)), 3) if fresh.size else None,
        "devices": len(summaries),
        "samples": samples,
        "uploads_dropped": sum(s["status"]["uploads"]["dropped"] for s in summaries),
    })
    return report


def read_teacher_log(path: Path) -> dict[float, int]:
    """A server's --teacher-log as capture time -> the teacher's class (a sample stepped twice,
    after a refused commit, keeps its last label); empty when the server wrote none."""
    teacher: dict[float, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            teacher.update(zip(entry["captured_at"], entry["teacher"]))
    return teacher


def teacher_gap(summaries: list[dict], teacher: dict[float, int]) -> dict:
    """The teacher's and the device's error on the same uploads, per domain and as the mean over
    domains (as `mean_error`): each upload the devices recorded (capture time, label, domain,
    their prediction) joined by capture time to the label the teacher gave it. Uploads dropped
    before the server or never stepped on are not joined; `uploads_joined` says how many were."""
    tally: dict[str, list[int]] = {}
    for summary in summaries:
        for captured_at, label, domain, predicted in summary.get("uploads", []):
            t = tally.setdefault(domain, [0, 0, 0])  # joined, teacher wrong, device wrong
            if captured_at in teacher:
                t[0] += 1
                t[1] += int(teacher[captured_at] != label)
                t[2] += int(predicted != label)
    domains = {name: {"uploads_joined": n, "error_teacher_on_uploads": _pct(wt, n) if n else None,
                      "error_device_on_uploads": _pct(wd, n) if n else None}
               for name, (n, wt, wd) in tally.items()}
    scored = [d for d in domains.values() if d["uploads_joined"]]

    def mean(key: str) -> float | None:
        return round(float(np.mean([d[key] for d in scored])), 2) if scored else None

    return {"uploads_joined": sum(d["uploads_joined"] for d in domains.values()),
            "error_teacher_on_uploads": mean("error_teacher_on_uploads"),
            "error_device_on_uploads": mean("error_device_on_uploads"), "domains": domains}


def with_teacher_gap(report: dict, gap: dict | None) -> dict:
    """The gap's figures on a method report and its domain rows; None for a method without a
    teacher (on-device), which the tables show as '-'."""
    for key in ("uploads_joined", "error_teacher_on_uploads", "error_device_on_uploads"):
        report[key] = gap[key] if gap else None
        for row in report["domains"]:
            row[key] = gap["domains"].get(row["name"], {}).get(key) if gap else None
    return report


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict) -> str:
    lines = [
        f"# driftsync report: {report['method']} on {report['dataset']} ({report['setting']}, severity {report['severity']})",
        "",
        f"Student `{report['student']}`, teacher `{report['teacher']}`, {report['devices']} device(s), {report['samples']} samples"
        f"{_frost_note(report)}.",
        "",
        "| domain | samples | source error % | adapted error % | change (points) | uploaded | uplink bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["domains"]:
        change = r["error"] - r["error_source"]
        flag = " **worse**" if change > 0 else ""
        lines.append(f"| {r['name']} | {r['samples']} | {r['error_source']:.1f} | {r['error']:.1f} | {change:+.1f}{flag} "
                     f"| {r['uploaded']} | {r['uplink_bytes']} |")
    mean_change = report["mean_error"] - report["mean_error_source"]
    lines.append(f"| **mean** | {report['samples']} | **{report['mean_error_source']:.1f}** | **{report['mean_error']:.1f}** "
                 f"| **{mean_change:+.1f}** | | |")
    lines += [
        "",
        worse_than_source(report["domains"]),
        f"- upload ratio: {report['upload_ratio']:.3f}",
        f"- uplink bytes per stream sample: {report['uplink_bytes_per_sample']}",
        f"- deltas applied: {report['deltas_applied']}, downlink bytes: {report['downlink_bytes']} "
        f"({report['downlink_bytes_per_delta']} per delta)",
        f"- delta freshness p50/p95: {report['freshness_p50_s']} s / {report['freshness_p95_s']} s",
        "",
    ]
    return "\n".join(lines)


def _frost_note(report: dict) -> str:
    """Which frost the stream's frost frames carry: the photographs and the procedural stand-in
    differ by about 30 points of source error, so a table must say which it measured."""
    return f", frost: {report['frost']}" if report.get("frost") else ""


def worse_than_source(domains: list[dict]) -> str:
    """One line naming every domain where adaptation made the error worse than the source model's."""
    worse = [f"{d['name']} ({d['error_source']:.1f} -> {d['error']:.1f})" for d in domains if d["error"] > d["error_source"]]
    if not worse:
        return "- adaptation is at least as good as the source model on every domain"
    return f"- **worse than the source model on {len(worse)} domain(s): {', '.join(worse)}**"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


PALETTE = ((30, 90, 200), (200, 60, 60), (40, 150, 70), (150, 80, 180), (230, 140, 20), (20, 160, 170),
           (120, 120, 120), (140, 90, 40), (220, 100, 170), (110, 140, 20))  # cycled beyond ten lines
WIDTH, LEFT, RIGHT, PLOT_HEIGHT = 1100, 78, 20, 330


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _segments(domains: list[str]) -> list[tuple[str, int, int]]:
    """(domain, first index, end index) for each run of equal consecutive domains."""
    runs: list[tuple[str, int, int]] = []
    for i, domain in enumerate(domains):
        if runs and runs[-1][0] == domain:
            runs[-1] = (domain, runs[-1][1], i + 1)
        else:
            runs.append((domain, i, i + 1))
    return runs


@dataclass(frozen=True)
class Box:
    """A rectangle in image pixels: left, top, right, bottom."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


@dataclass(frozen=True)
class Layout:
    """Where every piece of report.png goes, decided before drawing so that tests can check it."""

    width: int
    height: int
    title: list[tuple[str, Box]]  # one entry per wrapped line
    legend: list[tuple[str, Box]]  # swatch and name, wrapped into rows
    plot: Box
    domains: list[tuple[str, Box]]  # full names, rotated; a label that would overlap its neighbour is left out


def _text_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(font.getbbox("Ag")[3]) + 2


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def layout(names: list[str], domains: list[str], title: str) -> Layout:
    """Top to bottom: the title (wrapped), the legend (wrapped into rows), the plot, the full domain
    names (rotated), the x-axis title; nothing overlaps and nothing leaves the image."""
    font, small = _font(14), _font(12)
    line_h, small_h = _text_height(font), _text_height(small)
    usable = WIDTH - LEFT - RIGHT
    y = 8
    title_lines = []
    for text in _wrap(title, font, usable):
        title_lines.append((text, Box(LEFT, y, LEFT + font.getlength(text), y + line_h)))
        y += line_h + 2
    y += 8
    x, legend = LEFT, []
    for name in names:
        w = 28 + small.getlength(name)
        if x > LEFT and x + w > WIDTH - RIGHT:
            x, y = LEFT, y + small_h + 6
        legend.append((name, Box(x, y, x + w, y + small_h)))
        x += w + 22
    top = y + small_h + 12
    plot_box = Box(LEFT, top, LEFT + usable, top + PLOT_HEIGHT)
    labels: list[tuple[str, Box]] = []
    step = usable / max(len(domains) - 1, 1)
    for domain, first, end in _segments(domains):
        centre = LEFT + (first + end - 1) / 2 * step
        box = Box(centre - small_h / 2, plot_box.y1 + 4, centre + small_h / 2, plot_box.y1 + 8 + small.getlength(domain))
        if not labels or not box.overlaps(labels[-1][1]):
            labels.append((domain, box))
    bottom = max((b.y1 for _, b in labels), default=plot_box.y1)
    return Layout(WIDTH, int(bottom) + 30, title_lines, legend, plot_box, labels)


def plot(lines: dict[str, np.ndarray], domains: list[str], path: Path, title: str) -> None:
    """Online accuracy per named line over the stream, smoothed, with domain boundaries, as ``layout`` places it;
    the y-axis title runs up the left edge."""
    font, small = _font(14), _font(12)
    at = layout(list(lines), domains, title)
    colours = dict(zip(lines, itertools.cycle(PALETTE)))
    img = Image.new("RGB", (at.width, at.height), "white")
    draw = ImageDraw.Draw(img)
    for text, box in at.title:
        draw.text((box.x0, box.y0), text, fill="black", font=font)
    for name, box in at.legend:
        middle = (box.y0 + box.y1) / 2
        draw.line([box.x0, middle, box.x0 + 22, middle], fill=colours[name], width=3)
        draw.text((box.x0 + 28, box.y0), name, fill="black", font=small)
    left, top, pw, ph = at.plot.x0, at.plot.y0, at.plot.x1 - at.plot.x0, at.plot.y1 - at.plot.y0
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph * (1 - frac)
        draw.line([left, y, left + pw, y], fill=(225, 225, 225))
        text = f"{frac:.0%}"
        draw.text((left - 6 - small.getlength(text), y - 7), text, fill="black", font=small)
    axis = "online accuracy (moving average)"
    tag = Image.new("RGBA", (int(small.getlength(axis)) + 4, 16), (255, 255, 255, 0))
    ImageDraw.Draw(tag).text((0, 0), axis, fill="black", font=small)
    tag = tag.rotate(90, expand=True)
    img.paste(tag, (6, int(top + (ph - tag.height) // 2)), tag)
    n = len(domains)
    if n:
        xs = np.linspace(left, left + pw, n)
        window = max(1, n // 60)
        for name, values in lines.items():
            if len(values) != n:
                continue
            ys = top + ph * (1 - _smooth(np.asarray(values, dtype=float), window))
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[name], width=2)
        step = pw / max(n - 1, 1)
        for _, first, _ in _segments(domains)[1:]:
            draw.line([left + first * step, top, left + first * step, top + ph], fill=(150, 150, 150))
        for domain, box in at.domains:
            label = Image.new("RGBA", (int(small.getlength(domain)) + 4, int(box.x1 - box.x0)), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((0, 0), domain, fill="black", font=small)
            label = label.rotate(90, expand=True)
            img.paste(label, (int(box.x0), int(box.y0)), label)
    axis = "position in the stream (each band is one domain, in the order replayed)"
    draw.text((left + (pw - small.getlength(axis)) / 2, at.height - 22), axis, fill="black", font=small)
    img.save(path)


def write_report(report: dict, curve: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    lines = {"adapted (online)": np.array([c["accuracy"] for c in curve]),
             "source": np.array([c["accuracy_source"] for c in curve])}
    plot(lines, [c["domain"] for c in curve], out / "report.png",
         f"{report['method']} on {report['dataset']}: online accuracy (moving average)")


def markdown_methods(report: dict) -> str:
    """One row per method: error per domain and mean, then what it cost."""
    methods = report["methods"]
    domains = [d["name"] for d in methods[0]["domains"]]
    lines = [
        f"# driftsync replay: {report['dataset']} ({report['setting']}, severity {report['severity']})",
        "",
        f"Student `{report['student']}`, teacher `{report['teacher']}`, batch {report.get('batch_size')}, "
        f"{report['samples']} samples, corruption constants: {report.get('corruption_constants')}, "
        f"pacing: {report.get('pacing')}{_frost_note(report)}.",
        "",
        "## Online error % per domain",
        "",
        ("Teacher and device error on uploads: both scored on the same uploaded frames, the ones the "
         "cloud's teacher labelled (collaborative methods; the gap is what distillation loses)."),
        "",
        "| method | mean | teacher error on uploads | device error on uploads | " + " | ".join(domains) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(domains),
        f"| source (no adaptation) | {methods[0]['mean_error_source']:.1f} | - | - | "
        + " | ".join(f"{d['error_source']:.1f}" for d in methods[0]["domains"]) + " |",
    ]
    for m in methods:
        by_name = {d["name"]: d["error"] for d in m["domains"]}
        lines.append(f"| {m['method']} | **{m['mean_error']:.1f}** | {_or_dash(m.get('error_teacher_on_uploads'))} | "
                     f"{_or_dash(m.get('error_device_on_uploads'))} | "
                     + " | ".join(f"{by_name.get(d, float('nan')):.1f}" for d in domains) + " |")
    taught = [m for m in methods if m.get("uploads_joined") is not None]
    if taught:
        lines += [
            "",
            "## Teacher / device error % on the uploads, per domain",
            "",
            "| method | uploads joined | " + " | ".join(domains) + " |",
            "|---|---:|" + "---:|" * len(domains),
        ]
        for m in taught:
            rows = {d["name"]: d for d in m["domains"]}
            cells = [f"{_or_dash(rows[d].get('error_teacher_on_uploads'))} / {_or_dash(rows[d].get('error_device_on_uploads'))}"
                     if d in rows else "-" for d in domains]
            lines.append(f"| {m['method']} | {m['uploads_joined']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost",
        "",
        "Uplink is bytes per frame of the stream (every frame, uploaded or not: `uplink_bytes_per_sample` "
        "in report.json); device passes are per frame too.",
        "",
        "| method | where | upload ratio | uplink B/frame | downlink B | deltas | freshness p50 / p95 s "
        "| device fwd/frame | device bwd/frame | prompt B | seconds |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in methods:
        fresh = f"{m['freshness_p50_s']} / {m['freshness_p95_s']}" if m["freshness_p50_s"] is not None else "-"
        lines.append(
            f"| {m['method']} | {m['where']} | {m['upload_ratio']:.3f} | {m['uplink_bytes_per_sample']} | "
            f"{m['downlink_bytes']} | {m['deltas_applied']} | {fresh} | {m['forward_passes_per_sample']} | "
            f"{m['backward_passes_per_sample']} | {m.get('prompt_bytes', 0)} | {m['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def write_methods_report(report: dict, curves: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_methods(report))
    first = next(iter(curves.values()))
    lines = {"source": np.array([c["accuracy_source"] for c in first])}
    lines |= {name: np.array([c["accuracy"] for c in curve]) for name, curve in curves.items()}
    plot(lines, [c["domain"] for c in first], out / "report.png",
         f"{report['dataset']}, {report['setting']}: online accuracy (moving average)")
