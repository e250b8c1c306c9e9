"""Which deltas a device accepts: only newer versions whose payload checks out (TUF-style)."""
from __future__ import annotations

import numpy as np

from shared.protocol import Delta, ModelDescriptor


class DeltaRefused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def verify_delta(
    delta: Delta, applied_version: int, descriptor: ModelDescriptor, cohort: str | None = None
) -> dict[str, np.ndarray]:
    """Return the decoded tensors, or raise DeltaRefused saying why.

    A delta may carry any subset of the replaceable tensors: with device-side
    statistics the cloud sends only the affine parameters. A delta from another
    cohort than `cohort` means the server moved this device: that cohort's version
    line starts afresh, so any version is accepted, with every other check kept.
    """
    moved = cohort is not None and delta.cohort != cohort
    if delta.new_version <= applied_version and not moved:
        raise DeltaRefused("stale", f"v{delta.new_version} is not newer than the applied v{applied_version}")
    if not delta.payload_ok():
        raise DeltaRefused("hash_mismatch", f"payload does not hash to {delta.sha256[:12]}")
    expected = descriptor.parameters
    unknown = sorted(set(delta.params) - set(expected))
    if unknown or not delta.params:
        raise DeltaRefused("unexpected_tensors", f"unknown tensors {unknown[:3]}" if unknown else "no tensors")
    params: dict[str, np.ndarray] = {}
    for name, tensor in delta.params.items():
        if tuple(tensor.shape) != tuple(expected[name]) or tensor.dtype != "float32":
            raise DeltaRefused("bad_tensor", f"{name} is {tensor.dtype}{list(tensor.shape)}, expected float32{list(expected[name])}")
        try:
            params[name] = tensor.to_numpy()
        except ValueError as exc:
            raise DeltaRefused("non_finite", f"{name}: {exc}") from exc
    return params
