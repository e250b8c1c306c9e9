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
        "uploads_dropped": sum(
            s["status"]["uploads"][k] for s in summaries for k in ("dropped_queue_full", "dropped_budget", "dropped_failed")
        ),
    })
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# driftsync report: {report['method']} on {report['dataset']} ({report['setting']}, severity {report['severity']})",
        "",
        f"Student `{report['student']}`, teacher `{report['teacher']}`, {report['devices']} device(s), {report['samples']} samples.",
        "",
        "| domain | samples | source error % | adapted error % | uploaded | uplink bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["domains"]:
        lines.append(f"| {r['name']} | {r['samples']} | {r['error_source']:.1f} | {r['error']:.1f} | {r['uploaded']} | {r['uplink_bytes']} |")
    lines.append(f"| **mean** | {report['samples']} | **{report['mean_error_source']:.1f}** | **{report['mean_error']:.1f}** | | |")
    lines += [
        "",
        f"- upload ratio: {report['upload_ratio']:.3f}",
        f"- uplink bytes per stream sample: {report['uplink_bytes_per_sample']}",
        f"- deltas applied: {report['deltas_applied']}, downlink bytes: {report['downlink_bytes']} "
        f"({report['downlink_bytes_per_delta']} per delta)",
        f"- delta freshness p50/p95: {report['freshness_p50_s']} s / {report['freshness_p95_s']} s",
        "",
    ]
    return "\n".join(lines)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot(curve: list[dict], path: Path, title: str) -> None:
    """Online accuracy of adapted vs source, smoothed, with domain boundaries."""
    width, height, left, right, top, bottom = 1100, 460, 60, 20, 40, 90
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill="black", font=font)
    pw, ph = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph * (1 - frac)
        draw.line([left, y, left + pw, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{frac:.0%}", fill="black", font=font)
    if curve:
        n = len(curve)
        xs = np.linspace(left, left + pw, n)
        window = max(1, n // 60)
        for key, colour in (("accuracy_source", (200, 60, 60)), ("accuracy", (30, 90, 200))):
            ys = top + ph * (1 - _smooth(np.array([c[key] for c in curve], dtype=float), window))
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        previous = None
        for i, c in enumerate(curve):
            if c["domain"] != previous:
                x = float(xs[i])
                draw.line([x, top, x, top + ph], fill=(150, 150, 150))
                label = Image.new("RGBA", (80, 12), (255, 255, 255, 0))
                ImageDraw.Draw(label).text((0, 0), c["domain"][:13], fill="black", font=font)
                img.paste(label.rotate(90, expand=True), (int(x) - 6, top + ph + 4), label.rotate(90, expand=True))
                previous = c["domain"]
    draw.line([width - 260, 18, width - 240, 18], fill=(30, 90, 200), width=3)
    draw.text((width - 235, 12), "adapted (online)", fill="black", font=font)
    draw.line([width - 130, 18, width - 110, 18], fill=(200, 60, 60), width=3)
    draw.text((width - 105, 12), "source", fill="black", font=font)
    img.save(path)


def write_report(report: dict, curve: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(curve, out / "report.png", f"{report['method']} on {report['dataset']}: online accuracy (moving average)")
