"""Cloud adaptation throughput with the teacher batched across devices, against one cohort at a time.

N devices, each its own cohort (the default), each with a step's worth of new uploads
(32) ready at once. Batched: one `step_many` call, so one teacher forward/backward over
N x 32 images, then each cohort's student distils on its own. Sequential: N `step` calls.
Both run side by side, alternating, on the same engine and states; medians are reported.

    python scripts/bench_teacher_batching.py [--devices 1,4,16] [--per-device 32] [--rounds 5] \\
        [--student resnet20:CKPT --teacher resnet56:CKPT] [--teacher-augmentations 0] [--torch-device auto] [--json OUT]

`--per-device 8,32,128` also varies the step's batch size (new uploads per device per step).
The stream's images are resized to the student's input size (224 px for the ImageNet ResNets);
`--random-init` gives a model named without a checkpoint random weights (timing only):

    python scripts/bench_teacher_batching.py --student resnet18 --teacher resnet50 --random-init \
        --devices 1 --per-device 16 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from driftsync.data import streams
from server.devices import resolve_torch_device
from server.engine import CemaConfig, CemaEngine, StepInput
from server.models.imagenet_resnet import ARCHITECTURES, ImageNetResNet
from server.models.registry import build_model, model_info, parse_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--teacher", default="embedded-teacher")
    parser.add_argument("--teacher-augmentations", type=int, default=0)
    parser.add_argument("--per-device", default="32", help="new uploads per device per step, comma list (CEMA: 32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--torch-device", default="auto", help="cpu, cuda, cuda:N or auto, as for serve")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="then profile one batched step of the last setting "
                        "(torch.profiler: where its CPU and GPU time goes)")
    parser.add_argument("--random-init", action="store_true", help="ImageNet ResNets named without a checkpoint get "
                        "random weights (timing only)")
    args = parser.parse_args()
    if args.random_init:
        args.student, args.teacher = random_checkpoint(args.student), random_checkpoint(args.teacher)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_torch_device(args.torch_device)
    info = model_info(args.student)
    student, teacher = build_model(args.student), build_model(args.teacher)
    images, _ = streams.embedded_base(512 if info.input_size == (32, 32) else 64)
    fog = resized(streams.corrupted(images, streams.Domain("fog", 5), 0), info.input_size)
    rng = np.random.default_rng(0)
    rows = []
    for per_device in (int(b) for b in args.per_device.split(",")):
        cfg = CemaConfig(num_classes=info.num_classes, teacher_augmentations=args.teacher_augmentations,
                         new_per_step=per_device)
        engine = CemaEngine(student, teacher, cfg, student_input_shape=info.input_shape, torch_device=device)
        rows += measure(engine, fog, rng, per_device, [int(d) for d in args.devices.split(",")], args.rounds)
    print(f"\n# cloud adaptation throughput: {args.teacher} -> {args.student}, {args.teacher_augmentations} extra "
          f"teacher views, median of {args.rounds} rounds ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch device {device})")
    print("| uploads per device per step | devices | teacher samples/s, batched | teacher, one cohort at a time | speedup "
          "| whole step samples/s, batched | whole step, one at a time | speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['per_device']} | {r['devices']} | {r['teacher_batched_samples_per_s']} | "
              f"{r['teacher_sequential_samples_per_s']} | {r['teacher_speedup']}x | {r['step_batched_samples_per_s']} | "
              f"{r['step_sequential_samples_per_s']} | {r['step_speedup']}x |")
    for r in rows:
        print(f"step time per sample, {r['per_device']} per device x {r['devices']}: "
              f"{1 / r['step_batched_samples_per_s']:.3f} s (whole step), {1 / r['teacher_batched_samples_per_s']:.3f} s (teacher)")
    if args.profile:
        profile_step(engine, fog, rng, per_device, int(args.devices.split(",")[-1]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


def profile_step(engine: CemaEngine, pool: np.ndarray, rng: np.random.Generator, per_device: int, devices: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    states = [engine.new_state() for _ in range(devices)]
    inputs = [StepInput(pool[rng.choice(len(pool), per_device, replace=False)], s) for s in states]
    engine.step_many(inputs)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.step_many(inputs)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if engine.device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))


def random_checkpoint(spec: str) -> str:
    """'resnet50' -> 'resnet50:/tmp/.../resnet50.pth' holding random weights; other specs unchanged."""
    name, ckpt = parse_spec(spec)
    if ckpt is not None or name not in ARCHITECTURES:
        return spec
    path = Path(tempfile.mkdtemp()) / f"{name}.pth"
    torch.save(ImageNetResNet(name).state_dict(), path)
    return f"{name}:{path}"


def resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize(size[::-1], Image.Resampling.BILINEAR)) for x in images])


def measure(engine: CemaEngine, pool: np.ndarray, rng: np.random.Generator, per_device: int, device_counts: list[int],
            rounds: int) -> list[dict]:
    def uploads(n: int) -> list[np.ndarray]:
        return [pool[rng.choice(len(pool), per_device, replace=False)] for _ in range(n)]

    def now() -> float:
        """A clock read after the GPU's queued work is done (CUDA runs asynchronously)."""
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter()

    rows = []
    for n in device_counts:
        states = [engine.new_state() for _ in range(n)]
        timings = {"teacher_batched": [], "teacher_sequential": [], "step_batched": [], "step_sequential": []}
        engine.step_many([StepInput(x, s) for x, s in zip(uploads(n), states)])  # warm-up
        for _ in range(rounds):
            batch = uploads(n)
            t0 = now()
            engine.teacher_probs(list(zip(batch, states)))
            t1 = now()
            for x, s in zip(batch, states):
                engine.teacher_probs([(x, s)])
            t2 = now()
            engine.step_many([StepInput(x, s) for x, s in zip(batch, states)])
            t3 = now()
            for x, s in zip(batch, states):
                engine.step(x, s)
            t4 = now()
            for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timings[key].append(seconds)
        samples = n * per_device
        rate = {k: samples / statistics.median(v) for k, v in timings.items()}
        rows.append({"per_device": per_device, "devices": n, "samples_per_round": samples} | {f"{k}_samples_per_s": round(v, 3) for k, v in rate.items()}
                    | {"teacher_speedup": round(rate["teacher_batched"] / rate["teacher_sequential"], 2),
                       "step_speedup": round(rate["step_batched"] / rate["step_sequential"], 2)})
        print(f"[bench] {per_device} per device, {n} devices done", flush=True)
    return rows


if __name__ == "__main__":
    main()
