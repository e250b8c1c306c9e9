"""An upload body, checked all the way down: msgpack, message, images, timestamps, statistics.

The HTTP front runs this before answering; a restarted server runs it again on the
bodies it had accepted, so both turn the same bytes into the same job.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from server.queueing import UploadJob
from shared.codec import CodecError, decode
from shared.images import ImageDecodeError, decode_image
from shared.protocol import ModelDescriptor, UploadBatch, statistic_problem


class UploadRejected(ValueError):
    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error


def parse_upload(
    body: bytes, descriptor: ModelDescriptor, max_bytes: int, *, cohort: str, device_id: str, received_at: float,
    upload_id: int | None = None, admit: Callable[[int], None] | None = None,
) -> UploadJob:
    """`admit(samples)` runs between the message check and the image decoding, the costly part:
    the HTTP front's rate limit, which raises to refuse."""
    try:
        batch = decode(body, UploadBatch, max_bytes=max_bytes)
    except CodecError as exc:
        raise UploadRejected("bad_msgpack", str(exc)) from exc
    if admit is not None:
        admit(len(batch.images))
    height, width = descriptor.input_shape[1:]
    try:
        images = np.stack([decode_image(b, batch.codec, (height, width)) for b in batch.images])
    except ImageDecodeError as exc:
        raise UploadRejected("bad_image", str(exc)) from exc
    captured = np.asarray(batch.captured_at, dtype=np.float64)
    if not np.isfinite(captured).all():
        raise UploadRejected("bad_timestamp", "captured_at contains NaN or Inf")
    return UploadJob(cohort, device_id, images, captured, received_at, device_statistics(batch, descriptor),
                     batch.batch_statistics, upload_id)


def device_statistics(batch: UploadBatch, descriptor: ModelDescriptor) -> dict[str, np.ndarray] | None:
    """Check the statistics a device sent: known names, right shapes, finite, variances positive;
    a batch's statistics (with `batch_statistics`) complete."""
    if batch.norm_stats is None:
        return None
    stats: dict[str, np.ndarray] = {}
    for name, tensor in batch.norm_stats.items():
        if name not in descriptor.parameters or not name.endswith((".running_mean", ".running_var")):
            raise UploadRejected("bad_statistics", f"{name!r} is not a normalization statistic of the model")
        if tuple(tensor.shape) != tuple(descriptor.parameters[name]) or tensor.dtype != "float32":
            raise UploadRejected("bad_statistics", f"{name} must be float32{list(descriptor.parameters[name])}")
        value = tensor.to_numpy(finite=False)
        if problem := statistic_problem(name, value):
            raise UploadRejected("bad_statistics", problem)
        stats[name] = value
    if batch.batch_statistics:  # the cloud normalises every layer by them: all or none
        missing = [name for name in descriptor.parameters if name.endswith((".running_mean", ".running_var"))
                   and name not in stats]
        if missing:
            raise UploadRejected("bad_statistics", f"a batch's statistics must name every layer; {missing[0]} is missing")
    return stats
