"""On-device reference methods on a real stream, for comparison with RESEARCH.md's table.

Runs server.baselines methods in-process over driftsync's own stream (the product's
corruptions and settings), so the numbers check both against the peer framework's.

    python scripts/bench_baselines.py --data ../shared/data/cifar10/test.npz --data-key x_exact1000 \\
        --label-key y_exact1000 --model resnet20:../shared/models/cifar10-resnet/resnet20-12fca82f.th \\
        --methods source,bn,tent,eata --batch-size 200 --out /tmp/baselines.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from driftsync.data import streams
from server.baselines import build_method
from server.engine import to_input
from server.models.registry import build_model, model_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--data-key", default="x")
    parser.add_argument("--label-key", default="y")
    parser.add_argument("--model", required=True, help="NAME[:CHECKPOINT]")
    parser.add_argument("--methods", default="source,bn,tent,eata")
    parser.add_argument("--setting", default="continual")
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda for cotta's 32 augmentations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels = streams.npz_base(args.data, args.count, key=args.data_key, label_key=args.label_key)
    corruptions = streams.parse_corruptions(args.corruptions)
    info = model_info(args.model)
    chunks = list(streams.stream(args.setting, streams.corrupting(images, labels, args.seed), corruptions, args.severity, args.batch_size, seed=args.seed))
    results = {}
    for name in args.methods.split(","):
        method = build_method(name, build_model(args.model).to(args.device), info.num_classes)
        errors: dict[str, list[int]] = {}
        started = time.perf_counter()
        for chunk in chunks:
            if chunk.reset:
                method.reset()
            x = to_input(chunk.images).to(args.device)
            predicted = method.predict_and_adapt(x).argmax(dim=1).cpu().numpy()
            for domain, wrong in zip(chunk.domain_names(), predicted != chunk.labels):
                row = errors.setdefault(domain, [0, 0])
                row[0] += 1
                row[1] += int(wrong)
        seen = sum(r[0] for r in errors.values())
        per_domain = {d: round(100 * w / n, 1) for d, (n, w) in errors.items()}
        results[name] = {
            "per_domain": per_domain,
            "mean": round(float(np.mean(list(per_domain.values()))), 1),
            "forward_passes_per_sample": round(method.forward_passes / seen, 2),
            "backward_passes_per_sample": round(method.backward_passes / seen, 2),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{name}: mean {results[name]['mean']}% ({results[name]['seconds']} s)", flush=True)

    domains = list(next(iter(results.values()))["per_domain"])
    print("\n| method | mean | " + " | ".join(d[:6] for d in domains) + " | fwd/sample | bwd/sample |")
    print("|---|---:|" + "---:|" * len(domains) + "---:|---:|")
    for name, r in results.items():
        cells = " | ".join(f"{r['per_domain'][d]:.1f}" for d in domains)
        print(f"| {name} | {r['mean']:.1f} | {cells} | {r['forward_passes_per_sample']} | {r['backward_passes_per_sample']} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
