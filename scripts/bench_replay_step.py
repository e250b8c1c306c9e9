"""One engine step's time with a full replay buffer: what replaying drawn samples costs.

Fills a cohort's buffer with `--capacity` samples in groups of `--group` (as stored steps), each
normalised by batch statistics (replay's default device) or by stored statistics, then times
`engine.step` on `--new` new uploads. Random pixels: timing only.

    python scripts/bench_replay_step.py [--student resnet20:CKPT --teacher resnet56:CKPT[+resnet44:CKPT...]] \\
        [--mode batch|running] [--learn norm|norm+conv] [--teacher-augmentations 0] \\
        [--capacity 10000] [--group 32] [--new 32] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from server.engine import CemaConfig, CemaEngine, ReplayGroup
from server.models.registry import build_model, build_teacher, model_info
from server.norm import learn_conv_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--teacher", default="embedded-teacher")
    parser.add_argument("--mode", choices=("batch", "running"), default="batch")
    parser.add_argument("--learn", choices=("norm", "norm+conv"), default="norm")
    parser.add_argument("--teacher-augmentations", type=int, default=0,
                        help="extra views averaged into the teacher's labels (`serve` uses 8)")
    parser.add_argument("--capacity", type=int, default=10_000)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = model_info(args.student)
    student = build_model(args.student)
    engine = CemaEngine(learn_conv_weights(student) if "conv" in args.learn else student, build_teacher(args.teacher),
                        CemaConfig(num_classes=info.num_classes, replay_capacity=args.capacity, learn=args.learn,
                                   teacher_augmentations=args.teacher_augmentations),
                        student_input_shape=info.input_shape)
    state = engine.new_state()
    rng = np.random.default_rng(0)
    _, h, w = info.input_shape

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)

    batch = args.mode == "batch"
    stats = None if batch else {k: v for k, v in state.student_norm.items() if k.endswith(("running_mean", "running_var"))}
    for _ in range(args.capacity // args.group):
        state.replay.add(ReplayGroup(images(args.group), np.full((args.group, info.num_classes), 0.1, np.float32),
                                     stats, batch))
    times = []
    for _ in range(args.rounds + 1):  # the first step pays one-off setup
        started = time.perf_counter()
        engine.step(images(args.new), state, stats, batch_statistics=batch)
        times.append(time.perf_counter() - started)
    print(f"{args.mode}: step median {1000 * statistics.median(times[1:]):.0f} ms over {args.rounds} "
          f"(buffer {state.replay.size} samples in groups of {args.group}, {args.new} new, {args.threads} thread(s); "
          f"teacher {args.teacher}, learn {args.learn})")


if __name__ == "__main__":
    main()
