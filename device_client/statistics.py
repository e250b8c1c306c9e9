"""Normalization statistics estimated on the device, forward only.

The biggest single gain under drift is renormalising with the current domain's
statistics (RESEARCH.md: 48.0 -> 29.8 error for ResNet-20 on CIFAR-10-C). A
device can measure them itself with the exported statistics graph, over every
frame it sees, where the cloud would only see the entropy-filtered uploads.
"""
from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_client.fused import SwappableModel, folded_or_none
from device_client.modelcheck import inspect_model
from device_client.runtime import build_session
from device_client.scoring import to_model_input
from device_client.update_budget import UpdateBudget

STAT_FIELDS = ("running_mean", "running_var")


def statistic_names(parameters: dict[str, tuple[int, ...]]) -> list[str]:
    return [name for name in parameters if name.rsplit(".", 1)[1] in STAT_FIELDS]


def fold_batch_statistics(
    params: dict[str, np.ndarray], batch: dict[str, np.ndarray], momentum: float
) -> dict[str, np.ndarray]:
    """running <- (1 - m) running + m batch, per layer; other tensors pass through unchanged."""
    out = dict(params)
    for name, value in as_running(batch).items():
        if name in params:
            out[name] = ((1.0 - momentum) * params[name] + momentum * value).astype(np.float32)
    return out


def as_running(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's statistics (`<layer>.batch_mean`, `.batch_var`) under the names of the running ones."""
    fields = {"batch_mean": "running_mean", "batch_var": "running_var"}
    out = {}
    for name, value in batch.items():
        layer, field = name.rsplit(".", 1)
        if field in fields:
            out[f"{layer}.{fields[field]}"] = value
    return out


@dataclass(frozen=True)
class _Graph:
    """What a statistics graph's sessions share: its source, names and learnt weights' names."""
    source: bytes | Path
    threads: int
    inputs: frozenset[str]
    outputs: list[str]
    stats: list[str]
    weights: list[str]  # initializers the device supplies: learnt convolution weights, if any


class StatisticsProbe:
    """Runs the statistics graph with the affine tensors fed as inputs (no session rebuild).

    `run` gives the logits under the batch's own statistics together with those statistics.
    Learnt convolution weights are initializers of the graph instead (fed, they would cost
    onnxruntime its optimised layout): they are written into the optimised session in place
    (`FoldedSession`), so the weights in `params` run without a new session. Where the graph
    cannot be rewritten in place, a probe holds one set of them, given at creation, and
    `with_weights` gives the probe for other ones, with a new session only when they changed.
    """

    def __init__(self, stats_onnx: bytes | Path, threads: int = 0, params: dict[str, np.ndarray] | None = None) -> None:
        summary = inspect_model(stats_onnx.read_bytes() if isinstance(stats_onnx, Path) else stats_onnx)
        stats = [name for name in summary.outputs if name.endswith((".batch_mean", ".batch_var"))]
        self._graph = _Graph(stats_onnx, threads, frozenset(summary.inputs), [next(iter(summary.outputs)), *stats],
                             stats, sorted(summary.external))
        if self._graph.weights and params is None:
            raise ValueError(f"the statistics graph holds learnt weights ({self._graph.weights[0]}, ...): give their values")
        self._weights = {name: params[name] for name in self._graph.weights} if params else {}
        self.folded = folded_or_none(stats_onnx, params, threads, "new learnt weights build a new statistics session") \
            if self._graph.weights else None
        self._session = None if self.folded else build_session(stats_onnx, self._weights, threads)

    def with_weights(self, params: dict[str, np.ndarray]) -> StatisticsProbe:
        """This probe if it runs any weights, or if `params` hold the same learnt weights (the same
        arrays); else a new one for them."""
        if self.folded is not None or all(params[name] is self._weights[name] for name in self._graph.weights):
            return self
        probe = copy.copy(self)  # the same graph, read once: only the weights and the session are new
        probe._weights = {name: params[name] for name in self._graph.weights}
        probe._session = build_session(self._graph.source, probe._weights, self._graph.threads)
        return probe

    def run(self, x: np.ndarray, params: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Under `params`' learnt weights, or the probe's own where it cannot rewrite them: `params`
        supply the fed tensors."""
        if self.folded is not None:
            logits, *values = self.folded.run(x, params)  # every output, in the graph's order: the same list
        else:
            feeds = {"input": x} | {k: v for k, v in params.items() if k in self._graph.inputs}
            logits, *values = self._session.run(self._graph.outputs, feeds)
        return logits, dict(zip(self._graph.stats, values))

    def measure(self, x: np.ndarray, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(x, params)[1]


class BatchStatisticsModel:
    """Inference that normalises each batch by its own statistics: the `bn` reference, forward
    only, for streams that come in batches (about 16 frames or more). Same interface as
    `SwappableModel`; the affine tensors are feeds, so a delta rebuilds no session unless it
    carries learnt convolution weights (then `install` rebuilds it, off the inference path).
    Uploads say so (`batch_statistics`), and the cloud distils the same way.
    """

    def __init__(self, stats_onnx: bytes | Path, params: dict[str, np.ndarray], version: int, threads: int = 0) -> None:
        self._probe = StatisticsProbe(stats_onnx, threads, params)
        self._lock = threading.Lock()  # the probe, params and version change together
        self._install_lock = threading.Lock()
        self._version = version
        self._params = dict(params)

    @property
    def version(self) -> int:
        return self._version

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._params

    def run(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        logits, version, _ = self.run_measured(x)
        return logits, version

    def run_measured(self, x: np.ndarray) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
        """Also the statistics the batch was normalised with (`as_running`): its uploads carry
        them, so the cloud distils under exactly these."""
        with self._lock:
            probe, params, version = self._probe, self._params, self._version
        logits, stats = probe.run(x, params)
        return logits, version, as_running(stats)

    def install(self, params: dict[str, np.ndarray], version: int, new_line: bool = False) -> bool:
        with self._install_lock:  # serialised; inference keeps the old probe until the swap
            if version <= self._version and not new_line:
                return False
            merged = self._params | params
            probe = self._probe.with_weights(merged)
            with self._lock:
                self._probe, self._params, self._version = probe, merged, version
        return True


# sampled: a batch of at most this many times the sample is measured whole. At batch 64, 32 frames
# ran at about `batch`'s speed (0.80-0.82x) and gave 25.4% against 22.5% for the whole batch on
# continual CIFAR-10-C; at batch 200 they run at 0.96x (BENCHMARKS.md)
WHOLE_BATCH_FACTOR = 4


class SampledStatisticsModel(BatchStatisticsModel):
    """Each batch normalised by the statistics of its first `sample` frames, the rest at fused speed.

    The first frames go through the statistics graph (their logits, and the statistics); those
    statistics are folded into the fused session's weights in place (`FoldedSession`, no session
    rebuild) and the rest of the batch runs fused. At batch 200 on one core, 32 frames run at
    0.96x the static model's throughput and 100 at 0.92x, where `batch` runs at 0.75x; with the
    statistics on the wire (`run_measured`) the cloud distils under them, and the continual
    CIFAR-10-C error is 23.0% and 21.9% (BENCHMARKS.md, "the device's batch statistics travel
    with its uploads"). A batch of at most WHOLE_BATCH_FACTOR x `sample` frames runs
    as in `BatchStatisticsModel`, and so does every batch if onnxruntime's optimised student cannot
    be rewritten in place (logged once, at start).
    """

    def __init__(self, inference_onnx: bytes | Path, stats_onnx: bytes | Path, params: dict[str, np.ndarray], version: int,
                 sample: int, threads: int = 0) -> None:
        super().__init__(stats_onnx, params, version, threads)
        self.sample = sample
        self.fused = folded_or_none(inference_onnx, params, threads,
                                    "sampled statistics: every frame goes through the statistics graph")

    def run_measured(self, x: np.ndarray) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
        if self.fused is None or len(x) <= WHOLE_BATCH_FACTOR * self.sample:
            return super().run_measured(x)
        with self._lock:
            probe, params, version = self._probe, self._params, self._version
        head, stats = probe.run(x[: self.sample], params)
        tail = self.fused.run(x[self.sample:], fold_batch_statistics(params, stats, 1.0))[0]
        return np.concatenate([head, tail]), version, as_running(stats)


class RunningStatistics:
    """The `running` mode: fused inference on a `SwappableModel`, while a background loop folds
    the statistics of the newest frames into the running ones (the model folds them into its session).

    Every update (a refresh here, a delta install through `install`) is timed against inference
    in an `UpdateBudget`; the loop refreshes only when the budget allows, from the latest `batch`
    frames (older ones are dropped: the queue is bounded). Times are CPU seconds of the calling
    thread: with one intra-op thread (a one-core device) that is all of the work, and the other
    threads' share of the core does not count against it.
    """

    def __init__(self, model: SwappableModel, probe: StatisticsProbe, batch: int, momentum: float,
                 budget: UpdateBudget) -> None:
        self.model = model
        self.budget = budget
        self.measured = 0  # frames through the statistics graph, for the cost columns
        self._probe = probe
        self._batch = batch
        self._momentum = momentum
        self._frames: deque[np.ndarray] = deque(maxlen=4 * batch)
        self._ready = threading.Condition()

    def run(self, x: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, int]:
        """Inference on `x` (the model input of `frames`), timed; the frames join the queue."""
        started = time.thread_time()
        out = self.model.run(x)
        elapsed = time.thread_time() - started
        with self._ready:
            self.budget.inference(elapsed)
            self._frames.extend(frames)
            if self._due():  # only then: waking the loop on every frame would cost a core its time
                self._ready.notify()
        return out

    def install(self, params: dict[str, np.ndarray], version: int, new_line: bool = False) -> bool:
        """`SwappableModel.install`, its cost spent from the budget (a session rebuild where the student cannot fold)."""
        started = time.thread_time()
        try:
            return self.model.install(params, version, new_line)
        finally:
            elapsed = time.thread_time() - started
            with self._ready:
                self.budget.spent(elapsed)

    def loop(self, stop: threading.Event) -> None:
        """Refresh whenever a batch of frames is queued and the budget allows, until `stop` (then `wake`)."""
        while True:
            with self._ready:
                while not self._due() and not stop.is_set():
                    self._ready.wait(timeout=0.5)
                if stop.is_set():
                    return
                frames = np.stack(list(self._frames)[-self._batch:])
                self._frames.clear()
            started = time.thread_time()
            x = to_model_input(frames)
            self.model.refresh(self._folded(x))
            elapsed = time.thread_time() - started
            with self._ready:
                self.budget.spent(elapsed, refresh=True)
                self.measured += len(frames)

    def _folded(self, x: np.ndarray) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """The refresh of `x`'s statistics, measured under the current learnt weights (a delta may have moved them)."""
        def update(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self._probe = self._probe.with_weights(params)
            return fold_batch_statistics(params, self._probe.measure(x, params), self._momentum)
        return update

    def wake(self) -> None:
        """Let a waiting loop see that it must stop."""
        with self._ready:
            self._ready.notify_all()

    def summary(self) -> dict:
        with self._ready:
            return {"updates": self.budget.refreshes, "budget": self.budget.share,
                    "update_share": round(self.budget.spent_share(), 4)}

    def _due(self) -> bool:
        return len(self._frames) >= self._batch and self.budget.allows_refresh()
