"""Which deltas a device accepts: only newer versions whose payload checks out (TUF-style)."""
from __future__ import annotations

import numpy as np

from shared.protocol import Delta, ModelDescriptor


class DeltaRefused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def verify_delta(delta: Delta, applied_version: int, descriptor: ModelDescriptor) -> dict[str, np.ndarray]:
    """Return the decoded tensors, or raise DeltaRefused saying why."""
    if delta.new_version <= applied_version:
        raise DeltaRefused("stale", f"v{delta.new_version} is not newer than the applied v{applied_version}")
    if not delta.payload_ok():
        raise DeltaRefused("hash_mismatch", f"payload does not hash to {delta.sha256[:12]}")
    expected = descriptor.parameters
    if set(delta.params) != set(expected):
        unknown = sorted(set(delta.params) - set(expected))[:3]
        missing = sorted(set(expected) - set(delta.params))[:3]
        raise DeltaRefused("unexpected_tensors", f"unknown {unknown}, missing {missing}")
    params: dict[str, np.ndarray] = {}
    for name, tensor in delta.params.items():
        if tuple(tensor.shape) != tuple(expected[name]) or tensor.dtype != "float32":
            raise DeltaRefused("bad_tensor", f"{name} is {tensor.dtype}{list(tensor.shape)}, expected float32{list(expected[name])}")
        try:
            params[name] = tensor.to_numpy()
        except ValueError as exc:
            raise DeltaRefused("non_finite", f"{name}: {exc}") from exc
    return {name: params[name] for name in expected}
