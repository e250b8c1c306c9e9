"""The exported student as the HTTP front serves it: bytes, digests and the descriptor.

Torch-free, so an API replica can serve the model a worker exported and stored
(`encode_model`/`decode_model` through the store) without importing torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.codec import pack, unpack
from shared.protocol import ModelDescriptor

MODEL_BLOB = "model"  # the store key under which a worker publishes the exported student
MAX_MODEL_BYTES = 1 << 30


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StudentArtifact:
    """The ONNX graph, its normalization tensors (concatenated in `parameters` order), and
    the statistics graph a device runs to estimate the normalization statistics itself."""

    onnx: bytes
    norm: bytes
    parameters: dict[str, tuple[int, ...]]
    stats_onnx: bytes


@dataclass(frozen=True)
class PublishedModel:
    """What devices download: the artifact plus the names that make its outputs meaningful."""

    name: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    artifact: StudentArtifact

    def files(self) -> dict[str, bytes]:
        return {"student.onnx": self.artifact.onnx, "student.norm.bin": self.artifact.norm,
                "student.stats.onnx": self.artifact.stats_onnx}

    def descriptor(self) -> ModelDescriptor:
        a = self.artifact
        return ModelDescriptor(
            name=self.name, num_classes=len(self.class_names), class_names=self.class_names,
            input_shape=self.input_shape, onnx_sha256=sha256_hex(a.onnx), onnx_bytes=len(a.onnx),
            norm_sha256=sha256_hex(a.norm), stats_sha256=sha256_hex(a.stats_onnx), parameters=a.parameters,
        )


def encode_model(model: PublishedModel) -> bytes:
    a = model.artifact
    return pack({"name": model.name, "class_names": list(model.class_names), "input_shape": list(model.input_shape),
                 "onnx": a.onnx, "norm": a.norm, "stats_onnx": a.stats_onnx,
                 "parameters": [[k, list(v)] for k, v in a.parameters.items()]})


def decode_model(data: bytes) -> PublishedModel:
    raw = unpack(data, max_bytes=MAX_MODEL_BYTES)
    artifact = StudentArtifact(raw["onnx"], raw["norm"], {k: tuple(v) for k, v in raw["parameters"]}, raw["stats_onnx"])
    return PublishedModel(raw["name"], list(raw["class_names"]), tuple(raw["input_shape"]), artifact)
