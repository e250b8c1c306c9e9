"""The collaborative loop in one process, without HTTP: for comparing cloud and device
configurations quickly, on the embedded stream or a real npz (e.g. CIFAR-10's exact 1000).

The device is the student in torch, forward only, optionally folding each batch's
statistics into its running estimates (as the ONNX statistics graph does on a real
device). Selection and the cloud step are the product's own code; a step's delta is
applied before the device's next batch, so this is the loop with zero latency.

    python scripts/simulate_loop.py [--samples-per-domain 200] [--local-statistics 0.2] [--no-cloud]
    python scripts/simulate_loop.py --data ../shared/data/cifar10/test.npz --data-key x_exact1000 \\
        --label-key y_exact1000 --samples-per-domain 1000 --batch-size 200 \\
        --student resnet20:../shared/models/cifar10-resnet/resnet20-12fca82f.th \\
        --teacher resnet56:../shared/models/cifar10-resnet/resnet56-4bfd9763.th --device-norm batch

A prompted student (`--prompt lowres:8`, `--learn prompt`): the device adds the prompt the cloud
last shipped (its EMA, as in a delta) to every input. `--local-statistics 0 --device-norm running`
keeps the device on the source running statistics, never updated; with `--learn prompt` the
cloud then moves nothing but the prompt, so the student is frozen and only the prompt adapts.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from device_client.scoring import entropy, softmax
from device_client.selection import CemaSelector, SelectionConfig
from driftsync.config import POSITIVE_INT, auto_or
from driftsync.data import streams
from server.engine import LEARN_MODES, CemaConfig, CemaEngine, to_input
from server.main import mark_learnt
from server.models.registry import build_model, build_teacher, model_info
from server.norm import (
    load_replaceable_state,
    norm_layers,
    replaceable_state,
)
from server.prompt import InputPrompt, PromptedModel, parse_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-domain", type=int, default=200)
    parser.add_argument("--data", type=Path, default=None, help="npz base set (default: embedded)")
    parser.add_argument("--data-key", default="x")
    parser.add_argument("--label-key", default="y")
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--teacher", default="embedded-teacher")
    parser.add_argument("--device-norm", choices=("running", "batch", "sampled"), default="running",
                        help="device normalises with running estimates, with each batch's statistics, or with the "
                        "statistics of the batch's first --stats-sample frames (as `driftsync device --normalization sampled`)")
    parser.add_argument("--teacher-optimizer", default="sgd")
    parser.add_argument("--teacher-lr", type=float, default=2.5e-4)
    parser.add_argument("--teacher-augmentations", type=int, default=8)
    parser.add_argument("--no-teacher-adaptation", action="store_true")
    parser.add_argument("--distil-from", choices=("teacher", "ema", "both"), default="both")
    parser.add_argument("--teacher-ema", type=float, default=0.9)
    parser.add_argument("--student-steps", type=auto_or(POSITIVE_INT), default=None, help="SGD passes a step (default auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--e-max-factor", type=float, default=0.4)
    parser.add_argument("--dynamic-lambda", type=float, default=0.6, help="negative: static E_max")
    parser.add_argument("--e-min-factor", type=float, default=0.0, help="E_min = factor * ln C")
    parser.add_argument("--entropy-ema", type=float, default=0.8, help="negative: mean over the whole stream")
    parser.add_argument("--upload-share", type=float, default=0.2, help="upload budget as a share of frames; negative: "
                        "the entropy window alone (as `driftsync device --upload-share none`)")
    parser.add_argument("--local-statistics", type=float, default=0.2, help="device statistics momentum; 0: cloud-estimated")
    parser.add_argument("--stats-sample", type=int, default=0, help="running: fold the statistics of only this many "
                        "frames of a batch (its last ones), as a device on a compute budget does; 0: every frame. "
                        "sampled: the frames (the first ones) that measure each batch's statistics")
    parser.add_argument("--stats-every", type=int, default=1, help="running: fold statistics on every k-th batch only")
    parser.add_argument("--no-cloud", action="store_true", help="never step: what the device does alone")
    parser.add_argument("--student-lr", type=float, default=2.5e-3)
    parser.add_argument("--weight-entropy", type=float, default=3.0)
    parser.add_argument("--new-per-step", type=int, default=32)
    parser.add_argument("--replay-per-step", type=int, default=96)
    parser.add_argument("--upload-all", action="store_true", help="the device uploads every sample, no selection")
    parser.add_argument("--prompt", default=None, help="padding:W or lowres:R: the student adds an input prompt")
    parser.add_argument("--learn", choices=LEARN_MODES, default="auto", help="what the deltas move (as driftsync serve)")
    defaults = CemaConfig(num_classes=2)
    parser.add_argument("--conv-lr", type=float, default=defaults.conv_lr, help="as driftsync serve --conv-lr")
    parser.add_argument("--prompt-lr", type=float, default=defaults.prompt_lr)
    parser.add_argument("--prompt-consistency", type=float, default=defaults.prompt_consistency)
    parser.add_argument("--prompt-ema", type=float, default=defaults.prompt_ema)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    info = model_info(args.student)
    prompt = parse_prompt(args.prompt)

    def student() -> tuple[torch.nn.Module, str]:
        """The student, its convolutions marked learnt where the mode learns them, and the engine's mode."""
        model = build_model(args.student)
        model = model if prompt is None else PromptedModel(model, InputPrompt(*prompt, info.input_size))
        return model, mark_learnt(model, args.learn)

    learnt, learn = student()
    cfg = CemaConfig(num_classes=info.num_classes, student_lr=args.student_lr, weight_entropy=args.weight_entropy,
                     new_per_step=args.new_per_step, replay_per_step=args.replay_per_step,
                     teacher_optimizer=args.teacher_optimizer, teacher_lr=args.teacher_lr,
                     teacher_augmentations=args.teacher_augmentations, student_steps=args.student_steps,
                     distil_from=args.distil_from, teacher_ema=args.teacher_ema,
                     adapt_teacher=not args.no_teacher_adaptation, learn=learn, conv_lr=args.conv_lr,
                     prompt_lr=args.prompt_lr,
                     prompt_consistency=args.prompt_consistency, prompt_ema=args.prompt_ema)
    engine = CemaEngine(learnt, build_teacher(args.teacher), cfg)
    state = engine.new_state()
    device, source = student()[0].eval(), build_model(args.student).eval()
    selector = CemaSelector(SelectionConfig(
        num_classes=info.num_classes, e_max_factor=args.e_max_factor,
        dynamic_lambda=None if args.dynamic_lambda < 0 else args.dynamic_lambda,
        entropy_ema=None if args.entropy_ema < 0 else args.entropy_ema, e_min_factor=args.e_min_factor,
        upload_share=None if args.upload_share < 0 else args.upload_share,
    ))
    local = args.local_statistics > 0
    batch_statistics = args.device_norm in ("batch", "sampled")
    if args.data is None:
        images, labels = streams.embedded_base(args.samples_per_domain)
    else:
        images, labels = streams.npz_base(args.data, args.samples_per_domain, key=args.data_key, label_key=args.label_key)
    domains = streams.continual_domains(streams.parse_corruptions(args.corruptions), args.severity)
    source_of = streams.corrupting(images, labels)
    rows: dict[str, list[int]] = {}
    pending = np.zeros((0, *images.shape[1:]), np.uint8)
    pending_labels, pending_domains = np.zeros(0, np.int64), []
    teacher_rows: dict[str, list[int]] = {}  # domain: [labelled uploads, teacher wrong]
    uploaded = seen = 0
    for batch_index, chunk in enumerate(streams.replay(source_of, domains, args.batch_size)):
        x = to_input(chunk.images)
        with torch.no_grad():
            if args.device_norm == "batch":  # normalise with this batch's statistics (kept: its uploads carry them)
                for layer in norm_layers(device).values():
                    layer.train()
                    layer.momentum = 1.0
            if args.device_norm == "sampled":  # this batch's first frames measure the statistics for all of it
                for layer in norm_layers(device).values():
                    layer.train()
                    layer.momentum = 1.0
                device(x[: args.stats_sample])
                device.eval()
            probs = softmax(device(x).numpy())
            device.eval()
            wrong_source = int((source(x).argmax(1).numpy() != chunk.labels).sum())
            if local and args.device_norm == "running" and batch_index % args.stats_every == 0:
                for layer in norm_layers(device).values():  # fold this batch's statistics in after predicting
                    layer.train()
                    layer.momentum = args.local_statistics
                device(x[-args.stats_sample:] if args.stats_sample else x)
                device.eval()
        keep = np.ones(len(probs), bool) if args.upload_all else selector.select(probs, entropy(probs))
        row = rows.setdefault(chunk.domain.name, [0, 0, 0, 0, 0])
        row[0] += len(chunk.labels)
        row[1] += int((probs.argmax(1) != chunk.labels).sum())
        row[2] += wrong_source
        row[3] += int(keep.sum())
        row[4] += int((probs.argmax(1) != chunk.labels)[keep].sum())
        uploaded += int(keep.sum())
        seen += len(chunk.labels)
        pending = np.concatenate([pending, chunk.images[keep]])
        pending_labels = np.concatenate([pending_labels, chunk.labels[keep]])
        pending_domains += [chunk.domain.name] * int(keep.sum())
        stats = {k: v.copy() for k, v in replaceable_state(device).items() if "running" in k} if local else None
        # a batch-statistics device's uploads carry its batch's statistics: one step on each batch's
        # (as the worker steps them), else steps of --new-per-step
        step_size = len(pending) if batch_statistics and len(pending) else cfg.new_per_step
        while not args.no_cloud and len(pending) >= step_size:
            result = engine.step(pending[:step_size], state, stats, batch_statistics=batch_statistics)
            for name, wrong in zip(pending_domains, result.teacher_classes != pending_labels[:step_size]):
                tally = teacher_rows.setdefault(name, [0, 0])
                tally[0] += 1
                tally[1] += int(wrong)
            pending, pending_labels = pending[step_size:], pending_labels[step_size:]
            pending_domains = pending_domains[step_size:]
            load_replaceable_state(device, result.tensors)

    def teacher_error(name: str) -> str:
        n, wrong = teacher_rows.get(name, (0, 0))
        return f"{100 * wrong / n:.1f}" if n else "-"

    print("| domain | source error % | adapted error % | on uploads: student % | teacher % | selected |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (n, wrong, wrong_src, sel, wrong_sel) in rows.items():
        student_sel = f"{100 * wrong_sel / sel:.1f}" if sel else "-"
        print(f"| {name} | {100 * wrong_src / n:.1f} | {100 * wrong / n:.1f} | {student_sel} | {teacher_error(name)} | {sel / n:.2f} |")
    mean_src = np.mean([100 * r[2] / r[0] for r in rows.values()])
    mean = np.mean([100 * r[1] / r[0] for r in rows.values()])
    labelled = sum(n for n, _ in teacher_rows.values())
    teacher = f"{100 * sum(w for _, w in teacher_rows.values()) / labelled:.1f}" if labelled else "-"
    student_sel = 100 * sum(r[4] for r in rows.values()) / max(uploaded, 1)
    print(f"| **mean** | {mean_src:.1f} | {mean:.1f} | {student_sel:.1f} | {teacher} | {uploaded / seen:.2f} |")
    print(f"cloud steps: {state.steps}; settings: {dataclasses.asdict(cfg) | vars(args)}")


if __name__ == "__main__":
    main()
