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

Then the device's normalization modes, as a device runs them, relative to the static model:
- fused + deltas (the `cloud` mode's device): the fused session, with a delta installed every
  --delta-every frames on a background thread, as the device's poller does (160: one cloud
  step of 32 uploads at 20%);
- running: the same, plus the statistics thread (RunningStatistics) refreshing from every 16
  frames (no budget) or within --stats-budget of inference time (UpdateBudget);
- batch: every batch normalised by its own statistics (BatchStatisticsModel), same deltas;
- sampled: every batch normalised by the statistics of its first --stats-sample frames, folded
  into the fused session in place (SampledStatisticsModel), same deltas.
The whole process is pinned to one core (--cpu), so the background threads compete with
inference as on a one-core device.

    python scripts/bench_device.py [--student embedded-student] [--rounds 5] [--modes-only] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from datetime import date

import numpy as np
import onnx
import onnxruntime as ort
import torch

from device_client.fused import SwappableModel
from device_client.runtime import build_session, split_norm_file
from device_client.scoring import cheap_views, softmax, to_model_input, view_variance
from device_client.statistics import (
    BatchStatisticsModel,
    RunningStatistics,
    SampledStatisticsModel,
    StatisticsProbe,
    fold_batch_statistics,
)
from device_client.update_budget import UpdateBudget
from server.export import export_student
from server.models.registry import build_model, model_info
from server.norm import learn_conv_weights
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


def pin_to_one_core(cpu: int) -> None:
    """Every thread of the process on `cpu` (threads started later inherit it)."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), {cpu})


class DeltaFeed:
    """A delta every `every` frames, installed on a background thread as the device's poller does."""

    def __init__(self, install: Callable[[dict[str, np.ndarray], int], bool], deltas: list[dict[str, np.ndarray]],
                 every: int, versions) -> None:
        self._install, self._deltas, self._every, self._versions = install, deltas, every, versions
        self._due: queue.Queue[int | None] = queue.Queue()
        self._frames = 0
        self.installed = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def frames(self, count: int) -> None:
        before, self._frames = self._frames, self._frames + count
        for _ in range(self._frames // self._every - before // self._every):
            self._due.put(next(self._versions))

    def _run(self) -> None:
        while (version := self._due.get()) is not None:
            self.installed += self._install(self._deltas[version % len(self._deltas)], version)

    def close(self) -> None:
        """Pending deltas are dropped: the measured window is over."""
        while not self._due.empty():
            self._due.get_nowait()
        self._due.put(None)
        self._thread.join()


class ModeCase:
    """One normalization mode as the device runs it: `step` is the inference call of `predict`,
    `start`/`stop` bracket a measured window with the mode's background threads running."""

    def __init__(self, step: Callable[[np.ndarray, np.ndarray], object],
                 install: Callable[[dict[str, np.ndarray], int], bool] | None = None,
                 running: RunningStatistics | None = None) -> None:
        self.step, self.install, self.running = step, install, running
        self.deltas = 0
        self._feed: DeltaFeed | None = None

    def start(self, deltas: list[dict[str, np.ndarray]], every: int, versions) -> None:
        self._feed = None if self.install is None or every == 0 else DeltaFeed(self.install, deltas, every, versions)
        if self.running is not None:
            self._stop = threading.Event()
            self._loop = threading.Thread(target=self.running.loop, args=(self._stop,), daemon=True)
            self._loop.start()

    def frames(self, count: int) -> None:
        if self._feed is not None:
            self._feed.frames(count)

    def stop(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self.deltas += self._feed.installed
        if self.running is not None:
            self._stop.set()
            self.running.wake()
            self._loop.join()


def mode_cases(artifact, source: dict[str, np.ndarray], threads: int, budget: float,
               samples: list[int]) -> dict[str, ModeCase]:
    """Fresh models per batch size, so each mode's state (budget, versions) is its own."""
    static = build_session(artifact.onnx, source, threads)
    fused = SwappableModel(artifact.onnx, source, 0, threads)
    batch = BatchStatisticsModel(artifact.stats_onnx, source, 0, threads)
    sampled = {n: SampledStatisticsModel(artifact.onnx, artifact.stats_onnx, source, 0, n, threads) for n in samples}

    def running(share: float | None) -> ModeCase:
        stats = RunningStatistics(SwappableModel(artifact.onnx, source, 0, threads),
                                  StatisticsProbe(artifact.stats_onnx, threads, source), 16, 0.2, UpdateBudget(share))
        return ModeCase(stats.run, stats.install, stats)

    return {
        "static": ModeCase(lambda x, frames: static.run(None, {"input": x})),
        "fused + deltas (cloud)": ModeCase(lambda x, frames: fused.run(x), fused.install),
        "running, no budget": running(None),
        f"running, budget {budget:g}": running(budget),
        "batch statistics": ModeCase(lambda x, frames: batch.run(x), batch.install),
    } | {f"sampled statistics ({n})": ModeCase(lambda x, frames, m=m: m.run(x), m.install) for n, m in sampled.items()}


def measure_modes(args, info, artifact, source: dict[str, np.ndarray]) -> list[dict]:
    """Frames per second of every mode, interleaved rounds, medians (the ratios: the median of each
    round's ratio to that round's static); plus the refreshes and the update share.

    Two clocks: wall time, and the CPU time of the whole process (all its threads). On a busy
    shared machine the second is what a dedicated core would give: other processes' slices do
    not count, while every thread of the device's own does."""
    rng = np.random.default_rng(1)
    affine = [k for k in source if k.rsplit(".", 1)[1] in ("weight", "bias")]  # and learnt convolution weights
    deltas = [{k: (source[k] * rng.uniform(0.9, 1.1, source[k].shape)).astype(np.float32) for k in affine}
              for _ in range(2)]
    rows = []
    for batch in args.batches:
        frames = rng.integers(0, 256, size=(batch, *info.input_shape[1:], info.input_shape[0]), dtype=np.uint8)
        x = to_model_input(frames)
        cases = mode_cases(artifact, source, args.threads, args.stats_budget, args.stats_samples)
        versions = iter(range(1, 1 << 30))
        samples: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in cases} for clock in CLOCKS}
        for _ in range(args.rounds):
            for name, case in cases.items():
                case.step(x, frames)  # warm-up, outside the window
                case.start(deltas, args.delta_every, versions)
                count, started, cpu = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - started < args.seconds:
                    case.step(x, frames)
                    count += batch
                    case.frames(batch)
                samples["cpu"][name].append(count / (time.process_time() - cpu))
                samples["wall"][name].append(count / (time.perf_counter() - started))
                case.stop()
        row: dict = {"batch": batch}
        for clock in CLOCKS:
            medians = {k: float(np.median(v)) for k, v in samples[clock].items()}
            row[f"images_per_{clock}_s"] = medians
            static = np.array(samples[clock]["static"])  # each round against its own static: drift cancels
            row[f"over_static_{clock}"] = {k: float(np.median(np.array(v) / static)) for k, v in samples[clock].items()}
        rows.append(row | {
            "deltas": {k: c.deltas for k, c in cases.items() if c.install is not None},
            "refreshes": {k: c.running.budget.refreshes for k, c in cases.items() if c.running is not None},
            "update_share": {k: round(c.running.budget.spent_share(), 4) for k, c in cases.items() if c.running is not None},
            "refresh_ms": {k: round(1000 * c.running.budget.refresh_s / max(1, c.running.budget.refreshes), 2)
                           for k, c in cases.items() if c.running is not None},  # CPU: statistics graph + rebuild
            "install_ms": {k: round(1000 * (c.running.budget.update_s - c.running.budget.refresh_s) / c.deltas, 2)
                           for k, c in cases.items() if c.running is not None and c.deltas},  # CPU: a session rebuild
        })
    return rows


CLOCKS = ("cpu", "wall")


def print_modes(rows: list[dict], args, clock: str) -> None:
    names = list(rows[0][f"images_per_{clock}_s"])
    per = {"cpu": "images per CPU second of the process", "wall": "images per wall second"}[clock]
    print(f"\n# normalization modes on one core (cpu {args.cpu}), {args.student}, delta every {args.delta_every} frames, "
          f"median of {args.rounds} rounds of {args.seconds:g} s: {per} (x static)")
    print("| batch | " + " | ".join(names) + " | refreshes (no budget / budget) | update share (no budget / budget) |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for r in rows:
        cells = [f"{r[f'images_per_{clock}_s'][n]:.0f}" + ("" if n == "static" else f" ({r[f'over_static_{clock}'][n]:.3f}x)")
                 for n in names]
        refreshes = " / ".join(str(v) for v in r["refreshes"].values())
        shares = " / ".join(f"{v:.3f}" for v in r["update_share"].values())
        print(f"| {r['batch']} | " + " | ".join(cells) + f" | {refreshes} | {shares} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="embedded-student")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per case per round")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for ORT and torch")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the one core to run on")
    parser.add_argument("--delta-every", type=int, default=160, help="modes: a delta every this many frames (0: none)")
    parser.add_argument("--stats-budget", type=float, default=0.04, help="modes: the budgeted running mode's share")
    parser.add_argument("--modes-only", action="store_true", help="only the normalization modes table")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16, 64, 200],
                        help="modes: the batch sizes, comma-separated")
    parser.add_argument("--stats-samples", type=lambda s: [int(n) for n in s.split(",")], default=[100],
                        help="modes: the sampled mode's --stats-sample, one case each, comma-separated")
    parser.add_argument("--learn-conv", action="store_true", help="a student that learns its convolution weights "
                        "(`serve --learn norm+conv`): the deltas move them too")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pin_to_one_core(args.cpu)
    torch.set_num_threads(args.threads)

    info = model_info(args.student)
    model = build_model(args.student).eval()
    artifact = export_student(learn_conv_weights(model) if args.learn_conv else model, info.input_shape)
    source = split_norm_file(artifact.norm, artifact.parameters)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(), "pinned_cpu": args.cpu, "threads": args.threads, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "student": args.student, "delta_every": args.delta_every,
            "stats_budget": args.stats_budget, "learn_conv": args.learn_conv, "stats_samples": args.stats_samples}
    results = [] if args.modes_only else measure_kernels(args, info, model, artifact, source, meta)
    modes = measure_modes(args, info, artifact, source)
    for clock in CLOCKS:
        print_modes(modes, args, clock)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "modes": modes}, f, indent=2)


def measure_kernels(args, info, model, artifact, source: dict[str, np.ndarray], meta: dict) -> list[dict]:
    """The issue-2 cases: static vs adapted vs the alternatives, and the statistics' cost."""
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

    probe = StatisticsProbe(artifact.stats_onnx, args.threads, source)
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

    meta["delta_install_ms"] = round(install_ms, 1)
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
    return results


if __name__ == "__main__":
    main()
