"""Reports: report.json (machine), report.md (people), report.png (online accuracy over the stream).

The plot is drawn with Pillow so that no plotting library is needed anywhere.
"""
from __future__ import annotations

import json
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


def markdown(report: dict) -> str:
    lines = [
        f"# driftsync report: {report['method']} on {report['dataset']} ({report['setting']}, severity {report['severity']})",
        "",
        f"Student `{report['student']}`, teacher `{report['teacher']}`, {report['devices']} device(s), {report['samples']} samples.",
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


PALETTE = ((30, 90, 200), (200, 60, 60), (40, 150, 70), (150, 80, 180), (230, 140, 20), (20, 160, 170), (120, 120, 120))


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


def plot(lines: dict[str, np.ndarray], domains: list[str], path: Path, title: str) -> None:
    """Online accuracy per named line over the stream, smoothed, with domain boundaries.

    Layout, top to bottom: title, legend row, plot, full domain names (rotated), x-axis title;
    the y-axis title runs up the left edge.
    """
    font, small = _font(14), _font(12)
    label_height = max((int(small.getlength(d)) for d in set(domains)), default=0) + 8
    width, left, right, top = 1100, 78, 20, 62
    ph = 330
    height = top + ph + label_height + 30
    pw = width - left - right
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black", font=font)
    x = left
    for name, colour in zip(lines, PALETTE):  # legend: its own row under the title
        draw.line([x, 41, x + 22, 41], fill=colour, width=3)
        draw.text((x + 28, 34), name, fill="black", font=small)
        x += 28 + int(small.getlength(name)) + 22
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
    img.paste(tag, (6, top + (ph - tag.height) // 2), tag)
    n = len(domains)
    if n:
        xs = np.linspace(left, left + pw, n)
        window = max(1, n // 60)
        for (name, values), colour in zip(lines.items(), PALETTE):
            if len(values) != n:
                continue
            ys = top + ph * (1 - _smooth(np.asarray(values, dtype=float), window))
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        step = pw / max(n - 1, 1)
        for domain, first, end in _segments(domains):
            x0 = left + first * step
            if first:
                draw.line([x0, top, x0, top + ph], fill=(150, 150, 150))
            label = Image.new("RGBA", (int(small.getlength(domain)) + 4, 16), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((0, 0), domain, fill="black", font=small)
            label = label.rotate(90, expand=True)
            centre = left + (first + end - 1) / 2 * step
            img.paste(label, (int(centre - label.width / 2), top + ph + 4), label)
    axis = "position in the stream (each band is one domain, in the order replayed)"
    draw.text((left + (pw - small.getlength(axis)) / 2, height - 22), axis, fill="black", font=small)
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
        f"pacing: {report.get('pacing')}.",
        "",
        "## Online error % per domain",
        "",
        "| method | mean | " + " | ".join(domains) + " |",
        "|---|---:|" + "---:|" * len(domains),
        f"| source (no adaptation) | {methods[0]['mean_error_source']:.1f} | "
        + " | ".join(f"{d['error_source']:.1f}" for d in methods[0]["domains"]) + " |",
    ]
    for m in methods:
        by_name = {d["name"]: d["error"] for d in m["domains"]}
        lines.append(f"| {m['method']} | **{m['mean_error']:.1f}** | "
                     + " | ".join(f"{by_name.get(d, float('nan')):.1f}" for d in domains) + " |")
    lines += [
        "",
        "## Cost",
        "",
        "| method | where | upload ratio | uplink B/sample | downlink B | deltas | freshness p50 / p95 s "
        "| device fwd/sample | device bwd/sample | prompt B | seconds |",
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
