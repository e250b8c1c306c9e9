"""Explicit tensor encoding for the wire: dtype, shape and little-endian bytes.

Both sides speak numpy only, so the device never needs torch and the server
never needs pickle.
"""
from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

DType = Literal["float32", "float16", "int64", "int32", "uint8"]
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
}
MAX_TENSOR_ELEMENTS = 1 << 24


class Tensor(BaseModel):
    """A dense array as it travels: the byte length must match dtype and shape."""

    model_config = ConfigDict(frozen=True)

    dtype: DType
    shape: tuple[int, ...]
    data: bytes

    @model_validator(mode="after")
    def _check_size(self) -> Tensor:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        count = math.prod(self.shape)
        if count > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"tensor of {count} elements exceeds the limit {MAX_TENSOR_ELEMENTS}")
        expected = count * _NUMPY_DTYPES[self.dtype].itemsize
        if len(self.data) != expected:
            raise ValueError(
                f"tensor data has {len(self.data)} bytes, {self.dtype}{list(self.shape)} needs {expected}"
            )
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        name = str(array.dtype)
        if name not in _NUMPY_DTYPES:
            raise ValueError(f"unsupported dtype {name}")
        le = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name])
        return cls(dtype=name, shape=tuple(int(d) for d in array.shape), data=le.tobytes())

    def to_numpy(self, *, finite: bool = True) -> np.ndarray:
        """Decode to a native-endian array; refuse NaN/Inf unless told otherwise."""
        array = np.frombuffer(self.data, dtype=_NUMPY_DTYPES[self.dtype]).reshape(self.shape)
        array = array.astype(array.dtype.newbyteorder("="), copy=True)
        if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError("tensor contains NaN or Inf")
        return array


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over a canonical byte layout, so both sides hash the same thing."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        header = f"{name}\0{t.dtype}\0{','.join(map(str, t.shape))}\0".encode()
        h.update(len(header).to_bytes(4, "little"))
        h.update(header)
        h.update(len(t.data).to_bytes(8, "little"))
        h.update(t.data)
    return h.hexdigest()
