"""The fused student, run under new parameters by rewriting its weights in place: new statistics
every batch and new deltas at full speed.

onnxruntime makes the student fast when it creates the session: it folds every BatchNormalization
into the convolution before it and reorders the folded weights into its blocked layout (NCHWc).
That takes 7 ms for ResNet-20 on a quiet core and 36 ms on a busy one, and a new session's first
run costs a few ms more. A device that normalises every batch by that batch's statistics cannot
pay it per batch. So the device lets onnxruntime optimise the student once, learns where every
weight went, and from then on does the fold itself, writing the folded weights into buffers the
session reads: `add_initializer` borrows them, and prepacking is off so that no kernel keeps a copy.

Where the weights went is measured, not assumed. The probe sets each of the student's tensors to
its own element numbers (base-4096 digits, one optimisation per digit) with every BatchNorm made
the identity; the numbers read back from the optimised initializers name each slot's source. A
student whose optimisation is anything else than that reordering, or a runtime that copies the
buffers after all, fails the check against a session built the ordinary way: `FoldingUnsupported`.
Then `SwappableModel` builds a session per parameter version instead, as before.
"""
from __future__ import annotations

import logging
import math
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_client.modelcheck import Node, graph_contents, inspect_model
from device_client.runtime import INPUT_NAME, build_session

log = logging.getLogger(__name__)
DIGIT = 4096  # a probe's values stay below this, so the identity fold keeps them exact integers


class FoldingUnsupported(RuntimeError):
    """The optimised student is not a reordering of its tensors that this module can write."""


@dataclass(frozen=True)
class _Norm:
    """A BatchNormalization that onnxruntime folds into the convolution before it."""
    scale: str
    shift: str
    mean: str
    var: str
    epsilon: float
    conv_bias: str | None


@dataclass(frozen=True)
class _Slots:
    """Elements of one optimised initializer that come from one source tensor."""
    source: str
    positions: np.ndarray  # flat positions in the optimised initializer
    indices: np.ndarray  # flat indices in the (folded) source tensor


def _folded_norms(nodes: list[Node]) -> dict[str, _Norm]:
    """Convolution weight name -> the BatchNorm right after that convolution (in inference mode:
    one that normalises by the batch's statistics, as in the statistics graph, is not folded)."""
    producer = {out: node for node in nodes for out in node.outputs}
    out: dict[str, _Norm] = {}
    for node in nodes:
        inference = node.op_type == "BatchNormalization" and not node.ints.get("training_mode", 0)
        conv = producer.get(node.inputs[0]) if inference else None
        if conv is not None and conv.op_type == "Conv":
            bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] else None
            out[conv.inputs[1]] = _Norm(*node.inputs[1:5], node.floats.get("epsilon", 1e-5), bias)
    return out


def _optimise(model: bytes, tensors: dict[str, np.ndarray], external: set[str], folder: Path, threads: int) -> bytes:
    """onnxruntime's optimised copy of `model` with `tensors` in it.

    Tensors stored in the model are written into its bytes (onnxruntime optimises with those, not
    with `add_initializer`'s); `external` ones, in the norm side file, are given as external."""
    patched = bytearray(model)
    for name, view in graph_contents(patched)[1].items():
        if name in tensors and name not in external:
            view[...] = tensors[name]
    source, target = folder / "probe.onnx", folder / "optimised.onnx"
    source.write_bytes(patched)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # it warns that the saved model is for this CPU only: it is
    given = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensors[name], np.float32)) for name in external}
    options.add_external_initializers(list(given), list(given.values()))
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target.read_bytes()


class FoldedSession:
    """A student graph's optimised session, run under any parameters by rewriting its weights in place.

    `run(x, params)` folds `params` (the descriptor's tensors: BatchNorm statistics and affine
    tensors, learnt convolution weights) into the session's buffers when they are not the ones
    written last, feeds those that are graph inputs (the statistics graph's affine tensors), and
    returns every output. Building it probes the optimisation once (a few sessions) and checks the
    result against a session built the ordinary way.
    """

    def __init__(self, model: bytes | Path, params: dict[str, np.ndarray], threads: int = 0) -> None:
        try:
            self._build(model, params, threads)
        except FoldingUnsupported:
            raise
        except Exception as exc:  # whatever fails here, the ordinary session is still there to fall back on
            raise FoldingUnsupported(f"{type(exc).__name__}: {exc}") from exc

    def _build(self, model: bytes | Path, params: dict[str, np.ndarray], threads: int) -> None:
        model_bytes = model.read_bytes() if isinstance(model, Path) else model
        summary = inspect_model(model_bytes)
        nodes, embedded = graph_contents(model_bytes)
        self._fed = [name for name in summary.inputs if name != INPUT_NAME]
        self._external = set(summary.external)  # initializers the side file holds: given, never read
        self._norms = _folded_norms(nodes)
        self._by_shift = {norm.shift: norm for norm in self._norms.values()}
        self._static = {name: v for name, v in embedded.items() if name not in params}
        values = self._static | {name: np.asarray(params[name], np.float32) for name in self._external}
        identity = {name for n in self._norms.values() for name in (n.scale, n.mean, n.var)}
        biases = {n.conv_bias for n in self._norms.values() if n.conv_bias}
        convs = {node.inputs[1] for node in nodes if node.op_type == "Conv"}
        coded = [name for name in values if name in (convs | set(self._by_shift) | self._external) - identity - biases]
        sizes = np.array([values[name].size for name in coded], np.int64)
        starts = np.concatenate([[1], 1 + np.cumsum(sizes)])  # code 0: padding the layout added
        digits = max(1, math.ceil(math.log(int(starts[-1]), DIGIT)))
        readings = []
        with tempfile.TemporaryDirectory(prefix="driftsync-fold-") as folder:
            for digit in range(digits):
                probe = {name: ((np.arange(size, dtype=np.int64) + start) // DIGIT**digit % DIGIT).astype(np.float32)
                         .reshape(values[name].shape) for name, size, start in zip(coded, sizes, starts)}
                for norm in self._norms.values():
                    probe[norm.scale] = np.full_like(values[norm.scale], np.sqrt(np.float32(norm.epsilon)))
                    probe[norm.mean] = np.zeros_like(values[norm.mean])
                    probe[norm.var] = np.zeros_like(values[norm.var])
                probe |= {name: np.zeros_like(values[name]) for name in biases}
                optimised = _optimise(model_bytes, probe, self._external, Path(folder), threads)
                readings.append(graph_contents(optimised)[1])
        self._slots = self._decode(readings, coded, starts, values)
        self._buffers = {name: np.zeros_like(value) for name, value in readings[0].items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")  # kernels read our buffers, no copies
        self._keepalive = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self._buffers.values()]
        for name, value in zip(self._buffers, self._keepalive):
            options.add_initializer(name, value)
        self._session = ort.InferenceSession(optimised, options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()
        self._written: dict[str, np.ndarray] | None = None
        self._check(model, params, threads)

    def _decode(self, readings: list[dict[str, np.ndarray]], coded: list[str], starts: np.ndarray,
                values: dict[str, np.ndarray]) -> dict[str, list[_Slots]]:
        slots: dict[str, list[_Slots]] = {}
        for name, first in readings[0].items():
            if name in values and name not in coded:  # a tensor the optimisation left alone: written as it is
                slots[name] = [_Slots(name, np.arange(first.size, dtype=np.int32), np.arange(first.size, dtype=np.int32))]
                continue
            digits = [reading.get(name) for reading in readings]
            if any(d is None or d.shape != first.shape for d in digits):
                raise FoldingUnsupported(f"the optimised initializer {name} differs between probes")
            rounded = [np.rint(d.reshape(-1)) for d in digits]
            if max(float(np.abs(d.reshape(-1) - r).max(initial=0.0)) for d, r in zip(digits, rounded)) > 0.01:
                if all(np.array_equal(d, first) for d in digits):  # made from fixed tensors only: a constant
                    self._static[name] = first.copy()
                    slots[name] = [_Slots(name, np.arange(first.size, dtype=np.int32), np.arange(first.size, dtype=np.int32))]
                    continue
                raise FoldingUnsupported(f"the optimised initializer {name} is not a reordering of the student's tensors")
            codes = sum(r.astype(np.int64) * DIGIT**k for k, r in enumerate(rounded))
            if codes.max(initial=0) >= starts[-1]:
                raise FoldingUnsupported(f"the optimised initializer {name} holds values no tensor has")
            source = np.searchsorted(starts, codes, side="right") - 1
            slots[name] = []
            for s in np.unique(source[codes > 0]):
                mine = (source == s) & (codes > 0)
                slots[name].append(_Slots(coded[s], np.flatnonzero(mine).astype(np.int32),
                                          (codes[mine] - starts[s]).astype(np.int32)))
        return slots

    def _folded(self, source: str, values: dict[str, np.ndarray]) -> np.ndarray:
        """`source`'s flat values as the fused graph holds them: as onnxruntime's Conv+BN fusion computes."""
        norm = self._norms.get(source) or self._by_shift.get(source)
        if norm is None:
            return values[source].reshape(-1)
        scale = values[norm.scale] / np.sqrt(values[norm.var] + np.float32(norm.epsilon))
        if source in self._norms:
            weight = values[source]
            return (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).reshape(-1)
        bias = values[norm.conv_bias] if norm.conv_bias else np.float32(0.0)
        return (values[norm.shift] + (bias - values[norm.mean]) * scale).reshape(-1)

    def _write(self, params: dict[str, np.ndarray]) -> None:
        values = self._static | params
        cache: dict[str, np.ndarray] = {}
        for name, parts in self._slots.items():
            flat = self._buffers[name].reshape(-1)
            for part in parts:
                if part.source not in cache:
                    cache[part.source] = self._folded(part.source, values).astype(np.float32, copy=False)
                flat[part.positions] = cache[part.source][part.indices]
        self._written = params

    def run(self, x: np.ndarray, params: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for `x` under `params` (folded in unless they are the ones written last)."""
        with self._lock:
            if params is not self._written:
                self._write(params)
            return self._session.run(None, {INPUT_NAME: x} | {name: params[name] for name in self._fed})

    def _check(self, model: bytes | Path, params: dict[str, np.ndarray], threads: int) -> None:
        """The session must give what an ordinary session gives, after its buffers were rewritten."""
        shape = self._session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in shape):
            raise FoldingUnsupported(f"the input shape {shape} is not fixed")
        x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
        self.run(x, params)
        moved = {name: (v * np.float32(1.5) if name.endswith("running_var") or v.ndim > 1 else
                        v + np.float32(0.1) if name.endswith("running_mean") else v) for name, v in params.items()}
        got = self.run(x, moved)
        ordinary = build_session(model, {name: moved[name] for name in self._external}, threads)
        want = ordinary.run(None, {INPUT_NAME: x} | {name: moved[name] for name in self._fed})
        for a, b in zip(got, want):
            if not np.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(b).max()))):
                raise FoldingUnsupported(f"rewritten in place, the session is {float(np.abs(a - b).max()):.3g} "
                                         "away from an ordinary session")


def folded_or_none(model: bytes | Path, params: dict[str, np.ndarray], threads: int, otherwise: str) -> FoldedSession | None:
    """A `FoldedSession`, or None (logged with what the caller does `otherwise`) where the graph cannot fold."""
    try:
        return FoldedSession(model, params, threads)
    except FoldingUnsupported as exc:
        log.warning("%s (%s)", otherwise, exc)
        return None


@dataclass(frozen=True)
class _Active:
    version: int
    params: dict[str, np.ndarray]
    session: ort.InferenceSession | None  # its own session, when the weights cannot be rewritten in place


class SwappableModel:
    """Inference reads one reference; an update replaces it.

    Two kinds of update: a cloud delta (a new version, some tensors replaced) and a local
    statistics refresh (same version). Updates are serialised by one lock that inference never
    takes; each computes its tensors from the latest ones. With a `FoldedSession` an update only
    swaps the tensors, and the next run folds them in (about 0.5 ms for ResNet-20); otherwise each
    update builds a session (7-36 ms), off the inference path.
    """

    def __init__(self, model: bytes | Path, params: dict[str, np.ndarray], version: int, threads: int = 0) -> None:
        self._onnx = model
        self._threads = threads
        self._update_lock = threading.Lock()
        self.folded = folded_or_none(model, params, threads, "every parameter update builds a new session")
        self._active = self._activate(version, dict(params))

    def _activate(self, version: int, params: dict[str, np.ndarray]) -> _Active:
        return _Active(version, params, None if self.folded else build_session(self._onnx, params, self._threads))

    @property
    def version(self) -> int:
        return self._active.version

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._active.params

    def run(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the version that produced them."""
        active = self._active
        if active.session is None:
            return self.folded.run(x, active.params)[0], active.version
        return active.session.run(None, {INPUT_NAME: x})[0], active.version

    def install(self, params: dict[str, np.ndarray], version: int, new_line: bool = False) -> bool:
        """Apply a delta's tensors over the current ones; refuses a version that is not newer,
        unless the device has moved to another cohort (`new_line`), whose versions start afresh."""
        with self._update_lock:
            if version <= self._active.version and not new_line:
                return False
            self._active = self._activate(version, self._active.params | params)
        return True

    def refresh(self, update) -> None:
        """Apply `update(current tensors)` at the same version (local statistics)."""
        with self._update_lock:
            active = self._active
            self._active = self._activate(active.version, update(active.params))
