"""Uplink bytes per uploaded sample, per upload codec, on a corrupted stream's domains; with
`--replay`, also the accuracy each codec costs: one `driftsync replay --method cema` per codec on
the same stream, side by side against the first codec (lossless).

    python scripts/bench_codecs.py [--samples 256] [--severity 5] [--size 32] \\
        [--images embedded|cifar10:NPZ] [--codecs webp-lossless,webp:75,jpeg:75,webp:75@112,...] \\
        [--replay "--dataset cifar10 --data NPZ --student ... --teacher ..."] [--seeds 0,1,2] [--out DIR]

`--flips MODEL` (a registry spec, e.g. efficientnet-lite0 at 224 px) also counts the share of
images whose top-1 prediction changes when the model sees the decoded upload instead of the
original: a label-free upper bound of a codec's accuracy cost on a source model.

`--labelled-tree ROOT --model MODEL` measures it with labels instead, on an ImageNet-C-layout tree
(`driftsync corrupt`; folders named by the model's classes) and, with `--clean DIR`, its clean class
folder: every image encoded as the device uploads it and decoded as the server does (a downscale
scaled back to the model's input), then classified; top-1/top-5 error per codec against the first.
Models run as the device runs them: the server's ONNX export in onnxruntime.

A codec is an `driftsync device --codec` value, with `@PX` for `--upload-max-side PX`. `--size`
upscales the images (bilinear) before they are corrupted with the constants for that size, as a
224-px ImageNet-C tree would be.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from driftsync.data import loaders, streams
from driftsync.data.corruptions import CORRUPTIONS, constants_for_size, corrupt
from shared.codec import pack
from shared.images import UploadEncoding, decode_image
from shared.protocol import UploadBatch

CODECS = "raw,png,webp-lossless,webp:90,webp:75,webp:50,jpeg:90,jpeg:75,jpeg:50,webp:75@112,jpeg:75@112"


def parse(spec: str) -> UploadEncoding:
    codec, _, side = spec.partition("@")
    return UploadEncoding.parse(codec, int(side) if side else None)


def load_images(source: str, samples: int, size: int) -> np.ndarray:
    if source == "embedded":
        images, _ = streams.embedded_base(samples)
    else:
        kind, _, path = source.partition(":")
        if kind != "cifar10" or not path:
            raise SystemExit("--images is embedded or cifar10:NPZ")
        images = np.load(path)["x"][:samples]
    if size != images.shape[1]:
        images = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BILINEAR)) for x in images])
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def classifier(spec: str):
    """Logits of a registry model on uint8 NHWC images, through the server's ONNX export in
    onnxruntime, as a device runs it (imports torch only when asked)."""
    import onnxruntime as ort

    from server.export import export_onnx
    from server.models.registry import build_model, model_info

    session = ort.InferenceSession(export_onnx(build_model(spec), model_info(spec).input_shape),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def logits(images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        return np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])

    return logits


def predictor(spec: str):
    """Top-1 predictions of a registry model on uint8 NHWC images."""
    logits = classifier(spec)
    return lambda images: logits(images).argmax(1)


def measure_bytes(domains: dict[str, np.ndarray], encoding: UploadEncoding, size: int, predict=None) -> dict:
    image_bytes, request_bytes, psnrs, encode_s, decode_s, n, flips = [], [], [], 0.0, 0.0, 0, 0
    for batch in domains.values():
        t0 = time.perf_counter()
        encoded = [encoding.encode(x) for x in batch]
        t1 = time.perf_counter()
        decoded = [decode_image(b, encoding.codec, (size, size)) for b in encoded]
        decode_s += time.perf_counter() - t1
        encode_s += t1 - t0
        n += len(batch)
        psnrs += [psnr(d, x) for d, x in zip(decoded, batch)]
        if predict is not None:
            flips += int((predict(np.stack(decoded)) != predict(batch)).sum())
        image_bytes.append(np.mean([len(b) for b in encoded]))
        body = pack(UploadBatch(device_version=0, codec=encoding.codec, images=encoded[:32],
                                entropy=[0.5] * min(32, len(encoded)), captured_at=[0.0] * min(32, len(encoded))))
        request_bytes.append(len(body) / min(32, len(encoded)))
    finite = [p for p in psnrs if np.isfinite(p)]
    return {"codec": encoding.name, "image_bytes": float(np.mean(image_bytes)), "max_domain_bytes": float(np.max(image_bytes)),
            "request_bytes": float(np.mean(request_bytes)), "clean_bytes": float(image_bytes[0]),
            "psnr": float(np.mean(finite)) if finite else float("inf"),
            "encode_us": 1e6 * encode_s / n, "decode_us": 1e6 * decode_s / n,
            "flips_percent": 100.0 * flips / n if predict is not None else None}


def labelled_domains(root: Path, clean: Path | None, classes: list[str]):
    """(domain, file names, images, labels): the clean folder, then each <corruption>/<severity> of
    the tree in the benchmark's order, read one domain at a time."""
    if clean is not None:
        paths, _, _ = loaders._class_folder_files(clean)
        x, y, _ = loaders.load_class_folder(clean, loaders.IMAGENET_SIZE, seed=None, classes=classes)
        yield "clean", [p.stem for p in paths], x, y
    for name in [c for c in CORRUPTIONS if (root / c).is_dir()]:
        for severity in [s for s in loaders.SEVERITIES if (root / name / str(s)).is_dir()]:
            folder = loaders.ImageNetCFolder(root, name, severity, wnids=classes)
            x, y = folder.load_all()
            yield f"{name}/{severity}", [p.stem for p in folder.paths], x, y


def score_codecs(domains, encodings: list[UploadEncoding], logits) -> dict[str, dict[str, np.ndarray]]:
    """Per codec and image: upload bytes, top-1 and top-5 correct, its domain and base image."""
    columns: dict[str, dict[str, list]] = {e.name: {"bytes": [], "top1": [], "top5": [], "domain": [], "image": []}
                                           for e in encodings}
    for domain, names, images, labels in domains:
        size = images.shape[1:3]
        for encoding in encodings:
            encoded = [encoding.encode(x) for x in images]
            decoded = np.stack([decode_image(b, encoding.codec, size) for b in encoded])
            top5 = np.argsort(-logits(decoded), axis=1)[:, :5]
            col = columns[encoding.name]
            col["bytes"] += [len(b) for b in encoded]
            col["top1"] += list(top5[:, 0] == labels)
            col["top5"] += list((top5 == labels[:, None]).any(1))
            col["domain"] += [domain] * len(images)
            col["image"] += names
        print(f"[bench] {domain}: {len(images)} images", flush=True)
    return {name: {key: np.asarray(v) for key, v in col.items()} for name, col in columns.items()}


def paired_interval(delta: np.ndarray, groups: np.ndarray, rounds: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of a mean per-image difference, resampling whole base images (each
    with all its corrupted versions), since the versions of one image are not independent."""
    keys, group = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(group, delta, len(keys)), np.bincount(group, minlength=len(keys))
    picks = np.random.default_rng(0).integers(0, len(keys), (rounds, len(keys)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def labelled_table(scores: dict[str, dict[str, np.ndarray]], model: str) -> list[str]:
    """Markdown rows: error against the first codec's, bytes, bytes saved per point of top-1 error."""
    base = next(iter(scores.values()))
    n = len(base["top1"])
    lines = [("| codec | image bytes | top-1 error % | top-5 error % | top-1 delta (points, 95% CI) | top-5 delta "
             "| right→wrong / wrong→right (top-1) | bytes saved per point of top-1 error |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in scores.items():
        delta = 100.0 * (base["top1"].astype(float) - s["top1"])
        low, high = paired_interval(delta, s["image"])
        d1, d5 = delta.mean(), 100.0 * (base["top5"].mean() - s["top5"].mean())
        saved = base["bytes"].mean() - s["bytes"].mean()
        per_point = "-" if s is base else f"{saved / d1:.0f}" if d1 > 0 else "no cost measured"
        flips = f"{int((base['top1'] & ~s['top1']).sum())} / {int((~base['top1'] & s['top1']).sum())}"
        lines.append(f"| {name} | {s['bytes'].mean():.0f} | {100 * (1 - s['top1'].mean()):.2f} | "
                     f"{100 * (1 - s['top5'].mean()):.2f} | {d1:+.2f} [{low:+.2f}, {high:+.2f}] | {d5:+.2f} | "
                     f"{flips} | {per_point} |")
    severities = list(dict.fromkeys(d.rpartition("/")[2] or d for d in base["domain"]))
    lines += ["", f"top-1 delta (points) by severity, {n} images, {model}:", "",
              "| codec | " + " | ".join(severities) + " |", "|---|" + "---:|" * len(severities)]
    for name, s in scores.items():
        level = np.array([d.rpartition("/")[2] or d for d in s["domain"]])
        cells = [100.0 * (base["top1"][level == v].mean() - s["top1"][level == v].mean()) for v in severities]
        lines.append(f"| {name} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
    return lines


def replay(codec: str, replay_args: str, out: Path, seed: int) -> dict:
    """One `driftsync replay --method cema` with this codec and seed; its report's figures."""
    name, _, side = codec.partition("@")
    run_dir = out / f"{codec.replace(':', 'q').replace('@', '-')}-seed{seed}"
    cmd = [sys.executable, "-m", "driftsync", "replay", "--method", "cema", "--codec", name, "--seed", str(seed),
           "--upload-max-side", side or "none", "--out", str(run_dir), *shlex.split(replay_args)]
    print("[bench]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((run_dir / "report.json").read_text())["methods"][0]
    ratio = report["upload_ratio"]
    return {"error": report["mean_error"], "source_error": report["mean_error_source"], "upload_ratio": ratio,
            "bytes_per_upload": report["uplink_bytes_per_sample"] / ratio if ratio else 0.0,
            "dropped": report.get("uploads_dropped", 0), "seconds": report["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="upscale the images to SIZE px before corrupting")
    parser.add_argument("--images", default="embedded", help="embedded or cifar10:NPZ (its 'x')")
    parser.add_argument("--codecs", default=CODECS, help="comma list of --codec values, each with an optional @PX")
    parser.add_argument("--replay", default=None, help="`driftsync replay` flags: also measure each codec's cema error")
    parser.add_argument("--out", type=Path, default=Path("bench-codecs"))
    parser.add_argument("--seeds", default="0", help="replay seeds (stream and order); the table shows their mean")
    parser.add_argument("--flips", default=None, metavar="MODEL", help="count top-1 changes of this registry model")
    parser.add_argument("--labelled-tree", type=Path, default=None, metavar="ROOT",
                        help="an ImageNet-C-layout tree: measure each codec's top-1/top-5 error on it with --model")
    parser.add_argument("--clean", type=Path, default=None, metavar="DIR", help="with --labelled-tree: its clean class folder")
    parser.add_argument("--model", default="efficientnet-lite0", help="with --labelled-tree: the registry model")
    args = parser.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    specs = [s.strip() for s in args.codecs.split(",") if s.strip()]
    if args.labelled_tree is not None:
        from server.models.registry import model_info

        t0 = time.perf_counter()
        domains = labelled_domains(args.labelled_tree, args.clean, list(model_info(args.model).class_names))
        scores = score_codecs(domains, [parse(spec) for spec in specs], classifier(args.model))
        print(f"\n# {args.model} error per upload codec, against {specs[0]}: {args.labelled_tree}"
              f"{f' and {args.clean}' if args.clean else ''}, {len(next(iter(scores.values()))['top1'])} images, "
              f"{started}, {time.perf_counter() - t0:.0f} s, {platform.machine()}")
        print("\n".join(labelled_table(scores, args.model)))
        return
    images = load_images(args.images, args.samples, args.size)
    constants = constants_for_size(args.size, args.size)
    domains = {"clean": images} | {
        name: corrupt(images, name, args.severity, np.random.default_rng(k), constants=constants)
        for k, name in enumerate(CORRUPTIONS)
    }
    predict = predictor(args.flips) if args.flips else None
    rows = [measure_bytes(domains, parse(spec), args.size, predict) | {"spec": spec} for spec in specs]
    print(f"# upload codecs at {args.size} px, {len(images)} {args.images} images x {len(domains)} domains "
          f"(clean + 15 at severity {args.severity}, {constants} constants), {started}, {platform.machine()}")
    print("| codec | image bytes (mean over domains) | largest domain mean | request bytes per sample (batch 32) "
          f"| clean image bytes | PSNR dB | encode µs | decode µs |{f' {args.flips} top-1 changed % |' if predict else ''}")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if predict else ""))
    for r in rows:
        flips = f" {r['flips_percent']:.1f} |" if predict else ""
        print(f"| {r['codec']} | {r['image_bytes']:.0f} | {r['max_domain_bytes']:.0f} | {r['request_bytes']:.0f} | "
              f"{r['clean_bytes']:.0f} | {r['psnr']:.1f} | {r['encode_us']:.0f} | {r['decode_us']:.0f} |{flips}")
    if args.replay:
        args.out.mkdir(parents=True, exist_ok=True)
        seeds = [int(x) for x in args.seeds.split(",")]
        runs = {(spec, seed): replay(spec, args.replay, args.out, seed) for seed in seeds for spec in specs}
        results = {spec: {key: float(np.mean([runs[spec, seed][key] for seed in seeds]))
                          for key in ("error", "source_error", "upload_ratio", "bytes_per_upload", "seconds")}
                   | {"errors": [runs[spec, seed]["error"] for seed in seeds]} for spec in specs}
        base = results[specs[0]]
        print(f"\n# cema error per upload codec, against {specs[0]}, mean of seeds {args.seeds}: "
              f"driftsync replay {args.replay}")
        print("| codec | bytes per uploaded sample (request) | upload ratio | error % (per seed) | error delta (points) "
              "| bytes saved per point of error | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for spec, r in results.items():
            delta = r["error"] - base["error"]
            saved = base["bytes_per_upload"] - r["bytes_per_upload"]
            per_point = "-" if spec == specs[0] else f"{saved / delta:.0f}" if delta > 0 else "no cost"
            per_seed = " / ".join(f"{e:.1f}" for e in r["errors"])
            print(f"| {spec} | {r['bytes_per_upload']:.0f} | {r['upload_ratio']:.3f} | {r['error']:.1f} ({per_seed}) | "
                  f"{delta:+.1f} | {per_point} | {r['seconds']:.0f} |")
        (args.out / "results.json").write_text(json.dumps({"bytes": rows, "replay": results}, indent=2))


if __name__ == "__main__":
    main()
