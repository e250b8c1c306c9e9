"""Uplink bytes per uploaded sample, per upload codec, on a corrupted stream's domains; with
`--replay`, also the accuracy each codec costs: one `driftsync replay --method cema` per codec on
the same stream, side by side against the first codec (lossless).

    python scripts/bench_codecs.py [--samples 256] [--severity 5] [--size 32] \\
        [--images embedded|cifar10:NPZ] [--codecs webp-lossless,webp:75,jpeg:75,webp:75@112,...] \\
        [--replay "--dataset cifar10 --data NPZ --student ... --teacher ..."] [--seeds 0,1,2] [--out DIR]

`--flips MODEL` (a registry spec, e.g. efficientnet-lite0 at 224 px) also counts the share of
images whose top-1 prediction changes when the model sees the decoded upload instead of the
original: a label-free upper bound of a codec's accuracy cost on a source model.

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

from driftsync.data import streams
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


def predictor(spec: str):
    """Top-1 predictions of a registry model on uint8 NHWC images (imports torch only when asked)."""
    import torch

    from server.models.registry import build_model

    model = build_model(spec)

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
            return np.concatenate([model(chunk).argmax(1).numpy() for chunk in x.split(32)])

    return predict


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
    args = parser.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    images = load_images(args.images, args.samples, args.size)
    constants = constants_for_size(args.size, args.size)
    domains = {"clean": images} | {
        name: corrupt(images, name, args.severity, np.random.default_rng(k), constants=constants)
        for k, name in enumerate(CORRUPTIONS)
    }
    specs = [s.strip() for s in args.codecs.split(",") if s.strip()]
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
