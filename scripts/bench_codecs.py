"""Uplink bytes per uploaded sample, per image codec, on the embedded stream's domains.

    python scripts/bench_codecs.py [--samples 256] [--severity 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from driftsync.data import streams
from driftsync.data.corruptions import CORRUPTIONS, corrupt
from shared.codec import pack
from shared.images import decode_image, encode_image
from shared.protocol import UploadBatch

CODECS = ("raw", "png", "webp", "jpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--severity", type=int, default=5)
    args = parser.parse_args()
    images, _ = streams.embedded_base(args.samples)
    domains = {"clean": images} | {
        name: corrupt(images, name, args.severity, np.random.default_rng(k)) for k, name in enumerate(CORRUPTIONS)
    }
    rows = []
    for codec in CODECS:
        sizes, encode_s, decode_s, max_err = [], 0.0, 0.0, 0
        for batch in domains.values():
            t0 = time.perf_counter()
            encoded = [encode_image(x, codec) for x in batch]
            t1 = time.perf_counter()
            decoded = [decode_image(b, codec, (32, 32)) for b in encoded]
            decode_s += time.perf_counter() - t1
            encode_s += t1 - t0
            max_err = max(max_err, max(int(np.abs(d.astype(int) - x).max()) for d, x in zip(decoded, batch)))
            body = pack(UploadBatch(device_version=0, codec=codec, images=encoded[:32],
                                    entropy=[0.5] * 32, captured_at=[0.0] * 32).model_dump())
            sizes.append((np.mean([len(b) for b in encoded]), len(body) / 32))
        n = len(domains) * len(images)
        rows.append((codec, np.mean([s[0] for s in sizes]), np.mean([s[1] for s in sizes]),
                     sizes[0][0], 1e6 * encode_s / n, 1e6 * decode_s / n, max_err))
    print(f"# upload codecs, {len(images)} embedded images x {len(domains)} domains (clean + 15 at severity {args.severity})")
    print("| codec | image bytes (mean over domains) | request bytes per sample (batch 32) | clean image bytes | encode µs | decode µs | max abs pixel error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for codec, img, req, clean, enc, dec, err in rows:
        print(f"| {codec} | {img:.0f} | {req:.0f} | {clean:.0f} | {enc:.0f} | {dec:.0f} | {err} |")


if __name__ == "__main__":
    main()
