"""The student in onnxruntime, with normalization tensors swapped between runs.

Each parameter version gets its own session, built with the tensors given as
external initializers: they are constants at session creation, so onnxruntime
fuses Conv+BN exactly as for the static model and inference keeps full speed.
The new session is built off the inference path and swapped in atomically.
Sessions load their graph from a private folder that holds nothing but it
(`private_model`), so a path the graph might name resolves to nothing of the device's.
"""
from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_NAME = "input"


def split_norm_file(data: bytes, parameters: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The norm side file is the float32 tensors concatenated in descriptor order."""
    counts = [int(np.prod(shape)) for shape in parameters.values()]
    if 4 * sum(counts) != len(data):
        raise ValueError(f"norm file has {len(data)} bytes, the descriptor accounts for {4 * sum(counts)}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for (name, shape), count in zip(parameters.items(), counts):
        out[name] = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).astype(np.float32)
        offset += count * 4
    return out


MODEL_FILE = "model.onnx"


def private_model(folder: Path, data: bytes) -> Path:
    """Write `data` as the only file of `folder` (emptied first) and return its path."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    path = folder / MODEL_FILE
    path.write_bytes(data)
    return path


def build_session(model: bytes | Path, params: dict[str, np.ndarray], threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    names = list(params)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(params[n], dtype=np.float32)) for n in names]
    options.add_external_initializers(names, values)
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session._driftsync_keepalive = values  # ORT borrows the buffers; they must outlive the session
    return session


@dataclass(frozen=True)
class _Active:
    session: ort.InferenceSession
    version: int
    params: dict[str, np.ndarray]


class SwappableModel:
    """Inference reads one reference; an update replaces it. No lock on the hot path.

    Two kinds of update: a cloud delta (a new version, some tensors replaced) and a
    local statistics refresh (same version). Updates are serialised by one lock
    that inference never takes; each computes its tensors from the latest ones.
    """

    def __init__(self, model: bytes | Path, params: dict[str, np.ndarray], version: int, threads: int = 0) -> None:
        self._onnx = model
        self._threads = threads
        self._update_lock = threading.Lock()
        self._active = _Active(build_session(model, params, threads), version, dict(params))

    @property
    def version(self) -> int:
        return self._active.version

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._active.params

    def run(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the version that produced them."""
        active = self._active
        return active.session.run(None, {INPUT_NAME: x})[0], active.version

    def install(self, params: dict[str, np.ndarray], version: int, new_line: bool = False) -> bool:
        """Apply a delta's tensors over the current ones; refuses a version that is not newer,
        unless the device has moved to another cohort (`new_line`), whose versions start afresh."""
        with self._update_lock:
            if version <= self._active.version and not new_line:
                return False
            merged = self._active.params | params
            self._active = _Active(build_session(self._onnx, merged, self._threads), version, merged)
        return True

    def refresh(self, update) -> None:
        """Rebuild with `update(current tensors)` at the same version (local statistics)."""
        with self._update_lock:
            active = self._active
            merged = update(active.params)
            self._active = _Active(build_session(self._onnx, merged, self._threads), active.version, merged)
