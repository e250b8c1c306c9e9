"""Normalization statistics estimated on the device, forward only.

The biggest single gain under drift is renormalising with the current domain's
statistics (RESEARCH.md: 48.0 -> 29.8 error for ResNet-20 on CIFAR-10-C). A
device can measure them itself with the exported statistics graph, over every
frame it sees, where the cloud would only see the entropy-filtered uploads.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

STAT_FIELDS = ("running_mean", "running_var")


def statistic_names(parameters: dict[str, tuple[int, ...]]) -> list[str]:
    return [name for name in parameters if name.rsplit(".", 1)[1] in STAT_FIELDS]


def fold_batch_statistics(
    params: dict[str, np.ndarray], batch: dict[str, np.ndarray], momentum: float
) -> dict[str, np.ndarray]:
    """running <- (1 - m) running + m batch, per layer; other tensors pass through unchanged."""
    out = dict(params)
    for layer_field, value in params.items():
        layer, field = layer_field.rsplit(".", 1)
        source = {"running_mean": "batch_mean", "running_var": "batch_var"}.get(field)
        if source is not None and f"{layer}.{source}" in batch:
            out[layer_field] = ((1.0 - momentum) * value + momentum * batch[f"{layer}.{source}"]).astype(np.float32)
    return out


class StatisticsProbe:
    """Runs the statistics graph with the given parameters fed as inputs (no session rebuild)."""

    def __init__(self, stats_onnx: bytes, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(stats_onnx, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs() if o.name.endswith((".batch_mean", ".batch_var"))]
        self._inputs = {i.name for i in self._session.get_inputs()}

    def measure(self, x: np.ndarray, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input": x} | {k: v for k, v in params.items() if k in self._inputs}
        values = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, values))
