"""Which deltas a device accepts: only newer versions whose payload checks out and whose
values are sane. Who sent them (the signature) is checked before, in device_client.trust."""
from __future__ import annotations

import numpy as np

from device_client.statistics import statistic_names
from shared.protocol import Delta, ModelDescriptor

# A delta value may move this many times its source tensor's scale (max |value|, at least 1) away
# from the source value. Test-time adaptation moves affine parameters by well under 1 and BN
# statistics by a small factor even under severe corruption (see BENCHMARKS.md); 50 leaves a wide
# margin while refusing the huge finite values that overflow a float32 forward pass to inf.
DEFAULT_MAX_REL = 50.0


# float16 halves a delta that carries convolution weights (server.norm.for_the_wire); the device
# computes in float32 and upcasts what it accepts.
DELTA_DTYPES = ("float32", "float16")


class DeltaRefused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def verify_delta(
    delta: Delta, applied_version: int, descriptor: ModelDescriptor, cohort: str | None = None, *,
    source: dict[str, np.ndarray] | None = None, max_rel: float | None = DEFAULT_MAX_REL,
) -> dict[str, np.ndarray]:
    """Return the decoded tensors, or raise DeltaRefused saying why.

    A delta may carry any subset of the replaceable tensors: with device-side
    statistics the cloud sends only the affine parameters, and it leaves out the
    convolution weights it has not moved. With `source` (the model's own values), the
    learnt tensors a delta leaves out come back at their source values, statistics
    excepted (those stay the device's own): a delta then sets every weight, whatever
    the device ran before (another track, another cohort). A delta from another
    cohort than `cohort` means the server moved this device (the caller has checked
    that the move is signed): that cohort's version line starts afresh, so any
    version is accepted, with every other check kept. With `source` (the model's own
    values), each value must lie within `max_rel` times its tensor's scale of them.
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
        if tuple(tensor.shape) != tuple(expected[name]) or tensor.dtype not in DELTA_DTYPES:
            raise DeltaRefused("bad_tensor", f"{name} is {tensor.dtype}{list(tensor.shape)}, "
                                             f"expected {' or '.join(DELTA_DTYPES)} {list(expected[name])}")
        try:
            params[name] = tensor.to_numpy().astype(np.float32, copy=False)
        except ValueError as exc:
            raise DeltaRefused("non_finite", f"{name}: {exc}") from exc
        check_bounds(name, params[name], None if source is None else source.get(name), max_rel)
    if source is not None:
        statistics = set(statistic_names(expected))
        params |= {name: source[name] for name in expected if name not in params and name not in statistics}
    return params


def check_bounds(name: str, value: np.ndarray, source: np.ndarray | None, max_rel: float | None) -> None:
    if name.endswith(".running_var") and not (value > 0).all():
        raise DeltaRefused("out_of_bounds", f"{name} has a variance <= 0 (min {float(value.min()):.3g})")
    if source is None or max_rel is None:
        return
    limit = max_rel * max(1.0, float(np.abs(source).max(initial=0.0)))
    worst = float(np.abs(value.astype(np.float64) - source).max(initial=0.0))
    if worst > limit:
        raise DeltaRefused("out_of_bounds", f"{name} moves {worst:.3g} from its source values, over the bound {limit:.3g}")
