"""The statistics graph's throughput against the fused inference graph, side by side on one core.

`batch` normalisation runs `student.stats.onnx` for every frame. Its BatchNorm nodes run in
ONNX's training mode (momentum 0), so onnxruntime computes the batch statistics inside its
normalisation kernel. This compares that graph with the same statistics built from explicit
nodes (ReduceMean, Sub, Mul; the graph before), both against the fused session, in
interleaved rounds, and checks that the two give the same logits and statistics.

    python scripts/bench_stats_graph.py [--student resnet20:CKPT] [--batches 1,16,200] \\
        [--rounds 5] [--seconds 1] [--cpu 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx

from device_client.runtime import build_session, split_norm_file
from device_client.statistics import StatisticsProbe
from server.export import export_student
from server.models.registry import build_model, model_info


def explicit_statistics_graph(stats_onnx: bytes) -> bytes:
    """The reference: each BatchNorm back in inference mode, fed the batch mean and biased
    variance computed by ReduceMean/Sub/Mul nodes in front of it."""
    model = onnx.load_from_string(stats_onnx)
    graph, helper = model.graph, onnx.helper
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            layer = node.output[1].removesuffix(".batch_mean")
            x, mean, var = node.input[0], node.output[1], node.output[2]
            nodes += [
                helper.make_node("ReduceMean", [x], [f"{layer}.ref_mean_nc11"], axes=[0, 2, 3], keepdims=1),
                helper.make_node("ReduceMean", [x], [mean], axes=[0, 2, 3], keepdims=0),
                helper.make_node("Sub", [x, f"{layer}.ref_mean_nc11"], [f"{layer}.ref_centred"]),
                helper.make_node("Mul", [f"{layer}.ref_centred", f"{layer}.ref_centred"], [f"{layer}.ref_sq"]),
                helper.make_node("ReduceMean", [f"{layer}.ref_sq"], [var], axes=[0, 2, 3], keepdims=0),
            ]
            node.input[3], node.input[4] = mean, var
            kept = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
            del node.attribute[:]
            node.attribute.extend(kept)
            del node.output[1:]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = [t for t in graph.initializer if not t.name.endswith(".stats_prior")]
    del graph.initializer[:]
    graph.initializer.extend(used)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def images_per_cpu_second(run: Callable[[], object], batch: int, seconds: float) -> float:
    run()
    done, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        run()
        done += batch
    return done / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--batches", default="1,16,200")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core (Linux)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    info = model_info(args.student)
    artifact = export_student(build_model(args.student).eval(), info.input_shape)
    params = split_norm_file(artifact.norm, artifact.parameters)
    fused = build_session(artifact.onnx, params, 1)
    kernel = StatisticsProbe(artifact.stats_onnx, 1)
    explicit = StatisticsProbe(explicit_statistics_graph(artifact.stats_onnx), 1)
    x = np.random.default_rng(0).random((16, *info.input_shape), dtype=np.float32)
    (logits_k, stats_k), (logits_e, stats_e) = kernel.run(x, params), explicit.run(x, params)
    logit_gap = float(np.abs(logits_k - logits_e).max())
    stat_gap = max(float(np.abs(stats_k[k] - stats_e[k]).max() / max(1e-6, np.abs(stats_e[k]).max())) for k in stats_e)
    print(f"# {args.student}: training-mode BN against explicit statistics: max logit difference "
          f"{logit_gap:.2e}, max relative statistic difference {stat_gap:.2e}")
    print(f"# images per CPU second, median of {args.rounds} interleaved rounds of {args.seconds} s, 1 thread")
    print("| batch | fused | statistics in the BN kernel | explicit statistics nodes |")
    print("|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        xb = np.random.default_rng(batch).random((batch, *info.input_shape), dtype=np.float32)
        cases = {"fused": lambda: fused.run(None, {"input": xb}), "kernel": lambda: kernel.run(xb, params),
                 "explicit": lambda: explicit.run(xb, params)}
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, run in cases.items():
                rates[name].append(images_per_cpu_second(run, batch, args.seconds))
        med = {name: statistics.median(values) for name, values in rates.items()}
        print(f"| {batch} | {med['fused']:.0f} | {med['kernel']:.0f} ({med['kernel'] / med['fused']:.3f}x) "
              f"| {med['explicit']:.0f} ({med['explicit'] / med['fused']:.3f}x) |")


if __name__ == "__main__":
    main()
