"""The student's files in onnxruntime: the norm side file, the private model folder, sessions.

A session gets the replaceable tensors as external initializers: they are constants at
session creation, so onnxruntime fuses Conv+BN exactly as for the static model. Sessions
load their graph from a private folder that holds nothing but it (`private_model`), so a path
the graph might name resolves to nothing of the device's.
"""
from __future__ import annotations

import shutil
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
