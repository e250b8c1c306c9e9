"""Device inference speed: static fused ONNX vs after a delta vs the alternatives, side by side.

Cases, measured in interleaved rounds so machine noise hits them alike:
- static: the exported student as shipped (onnxruntime fuses Conv+BN);
- adapted: the session a device builds after a delta (external initializers, fused again);
- bn-inputs: the alternative where norm tensors are graph inputs fed per run (no fusion);
- torch: the same student in torch eager mode;
- prompted: the student with a low-res 8x8 input prompt (issue 6), fused as shipped;
- ugs-select: what uncertainty-guided sampling adds per frame: 4 cheap views, one
  onnxruntime call over them, and the variance (the frame's own prediction not included).
Also the cost of device-side statistics: one pass of the statistics graph and one
session rebuild per statistics update, both off the inference path.

    python scripts/bench_device.py [--student embedded-student] [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import numpy as np
import onnx
import onnxruntime as ort
import torch

from device_client.runtime import SwappableModel, build_session, split_norm_file
from device_client.scoring import cheap_views, softmax, to_model_input, view_variance
from device_client.statistics import StatisticsProbe, fold_batch_statistics
from server.export import export_student
from server.models.registry import build_model, model_info
from server.prompt import InputPrompt, PromptedModel


def norm_as_inputs(onnx_bytes: bytes, norm: bytes, parameters: dict) -> bytes:
    """Rewrite the graph so every norm tensor is a graph input (the slow alternative)."""
    model = onnx.load_from_string(onnx_bytes)
    names = set(parameters)
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, shape in parameters.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
    return model.SerializeToString()


def images_per_s(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per case per round")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for ORT and torch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    info = model_info(args.student)
    model = build_model(args.student).eval()
    artifact = export_student(model, info.input_shape)
    source = split_norm_file(artifact.norm, artifact.parameters)
    rng = np.random.default_rng(0)
    adapted_params = {k: (v * rng.uniform(0.9, 1.1, v.shape)).astype(np.float32) for k, v in source.items()}

    static = build_session(artifact.onnx, source, args.threads)
    swappable = SwappableModel(artifact.onnx, source, 0, args.threads)
    started = time.perf_counter()
    swappable.install(adapted_params, 1)
    install_ms = (time.perf_counter() - started) * 1000
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    inputs_session = ort.InferenceSession(norm_as_inputs(artifact.onnx, artifact.norm, artifact.parameters), options,
                                          providers=["CPUExecutionProvider"])

    probe = StatisticsProbe(artifact.stats_onnx, args.threads)
    prompted_model = PromptedModel(build_model(args.student), InputPrompt("lowres", 8, info.input_size)).eval()
    prompted_artifact = export_student(prompted_model, info.input_shape)
    prompted = build_session(prompted_artifact.onnx, split_norm_file(prompted_artifact.norm, prompted_artifact.parameters),
                             args.threads)

    def ugs_select(frames: np.ndarray) -> np.ndarray:
        logits = static.run(None, {"input": to_model_input(cheap_views(frames, 4))})[0]
        return view_variance(softmax(logits).reshape(4, len(frames), -1))

    results = []
    for batch in (1, 32):
        x = rng.random((batch, *info.input_shape), dtype=np.float32)
        frames = (x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        xt = torch.from_numpy(x)
        feeds = {"input": x} | adapted_params
        cases = {
            "static": lambda: static.run(None, {"input": x}),
            "adapted": lambda: swappable.run(x),
            "bn-inputs": lambda: inputs_session.run(None, feeds),
            "torch": lambda: model(xt),
            "stats-probe": lambda: probe.measure(x, adapted_params),
            "prompted": lambda: prompted.run(None, {"input": x}),
            "ugs-select": lambda: ugs_select(frames),
        }
        samples: dict[str, list[float]] = {k: [] for k in cases}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    samples[name].append(images_per_s(fn, batch, args.seconds))
        medians = {k: float(np.median(v)) for k, v in samples.items()}
        results.append({"batch": batch, "images_per_s": medians,
                        "adapted_over_static": medians["adapted"] / medians["static"],
                        "bn_inputs_over_static": medians["bn-inputs"] / medians["static"],
                        "torch_over_static": medians["torch"] / medians["static"]})
    rebuilds = []
    for _ in range(10):
        started = time.perf_counter()
        x16 = rng.random((16, *info.input_shape), dtype=np.float32)
        swappable.refresh(lambda p: fold_batch_statistics(p, probe.measure(x16, p), 0.2))
        rebuilds.append((time.perf_counter() - started) * 1000)

    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": __import__("os").cpu_count(), "threads": args.threads, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "student": args.student, "delta_install_ms": round(install_ms, 1)}
    print(f"# device throughput, {args.student}, {args.threads} thread(s), median of {args.rounds} rounds")
    meta["statistics_update_ms_batch16"] = round(float(np.median(rebuilds)), 1)
    print("| batch | static fused img/s | adapted img/s | adapted/static | bn-as-inputs img/s | torch eager img/s "
          "| statistics graph img/s | prompted img/s | UGS extra ms/frame |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["images_per_s"]
        print(f"| {r['batch']} | {m['static']:.0f} | {m['adapted']:.0f} | {r['adapted_over_static']:.3f} | "
              f"{m['bn-inputs']:.0f} | {m['torch']:.0f} | {m['stats-probe']:.0f} | {m['prompted']:.0f} | "
              f"{1000 / m['ugs-select']:.3f} |")
    print(f"\ndelta install (session rebuild, off the inference path): {install_ms:.1f} ms")
    print(f"statistics update per 16-frame batch (statistics graph + session rebuild, off the inference path): "
          f"{meta['statistics_update_ms_batch16']} ms median")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
