"""Pydantic models for every message that crosses the wire.

JSON is used for control messages (registration, errors); msgpack for the
bulky ones (uploads, deltas). Both are validated by the same models.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.tensors import Tensor, tensors_digest

PROTOCOL_VERSION = 1

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_SAMPLES_PER_UPLOAD = 256
MAX_IMAGE_BYTES = 256 * 1024
MAX_NAME_LENGTH = 128
MAX_VERSION = 2**53  # exact in JSON numbers and SQLite integers alike
MAX_COUNT = 2**53  # any counter a device reports: finite as a float, so rates never overflow

ImageCodec = Literal["png", "jpeg", "webp", "raw"]
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
COHORT_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_COHORT_LENGTH = 64
PRIVATE_COHORT_PREFIX = "device-"  # the server names each device's own cohort device-<id>; nobody else may

# The one rule for a cohort name, on every route: bodies, path parameters and queries.
CohortName = Annotated[str, Field(min_length=1, max_length=MAX_COHORT_LENGTH, pattern=COHORT_PATTERN)]


def _not_private(cohort: str) -> str:
    if cohort.startswith(PRIVATE_COHORT_PREFIX):
        raise ValueError(f"cohort names starting with {PRIVATE_COHORT_PREFIX!r} are reserved for devices' own cohorts")
    return cohort


# A cohort a device may ask for: not another device's private one.
SharedCohortName = Annotated[CohortName, AfterValidator(_not_private)]

HEX_KEY_PATTERN = r"^[0-9a-f]{64}$"  # an Ed25519 public key (32 bytes) or a SHA-256 fingerprint, lower-case hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Message):
    """Every 4xx/5xx body: a machine-readable code and a human message."""

    error: str
    detail: str


class ModelDescriptor(_Message):
    """What a device needs to run the student and to check what it downloaded."""

    name: str
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    onnx_sha256: str
    onnx_bytes: int
    norm_sha256: str
    stats_sha256: str
    parameters: dict[str, tuple[int, ...]] = Field(
        description="The replaceable tensors of the graph: the only names a delta may carry."
    )


class Signature(_Message):
    """An Ed25519 signature by the server over a statement's canonical encoding (shared.signing).
    The validity window is part of what is signed: a captured reply cannot be replayed later."""

    key_id: str = Field(pattern=HEX_KEY_PATTERN, description="SHA-256 fingerprint of the signing public key.")
    issued_at: float = Field(allow_inf_nan=False)
    expires_at: float = Field(allow_inf_nan=False)
    value: str = Field(pattern=r"^[0-9a-f]{128}$")


class KeyRotation(_Message):
    """The server's new public key, signed by the previous one: a pinned device follows the chain."""

    old_key: str = Field(pattern=HEX_KEY_PATTERN)
    new_key: str = Field(pattern=HEX_KEY_PATTERN)
    issued_at: float = Field(allow_inf_nan=False)
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class SigningKeyInfo(_Message):
    key: str = Field(pattern=HEX_KEY_PATTERN, description="The current Ed25519 public key, raw 32 bytes in hex.")
    fingerprint: str = Field(pattern=HEX_KEY_PATTERN, description="SHA-256 of the key: what --server-key-fingerprint takes.")
    rotations: list[KeyRotation] = Field(default_factory=list, description="Every rotation, oldest first.")


class RegisterRequest(_Message):
    protocol_version: int = PROTOCOL_VERSION
    device_name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    cohort: SharedCohortName | None = Field(
        default=None,
        description="Devices naming the same cohort share one adapted state; none means the device's own.",
    )
    enrolment_token: str | None = None


class RegisterResponse(_Message):
    protocol_version: int = PROTOCOL_VERSION
    device_id: str
    token: str
    cohort: str
    version: int
    model: ModelDescriptor
    server_key: str | None = Field(default=None, pattern=HEX_KEY_PATTERN, description="The key a device pins.")
    signature: Signature | None = Field(default=None, description="Over device id, cohort, version and descriptor.")


def statistic_problem(name: str, value: np.ndarray) -> str | None:
    """Why the cloud refuses a normalization statistic an upload carries, else None. One rule on
    both sides: the server answers such statistics with a 400, the device leaves them behind."""
    if not np.isfinite(value).all():
        return f"{name} has NaN or Inf"
    if name.endswith(".running_var") and (value <= 0).any():
        return f"{name} has non-positive variances"
    return None


class UploadBatch(_Message):
    """Selected samples, compressed. captured_at lets the server measure freshness."""

    protocol_version: int = PROTOCOL_VERSION
    device_version: int = Field(ge=0, le=MAX_VERSION, description="Parameter version the device predicted with.")
    codec: ImageCodec
    images: list[bytes] = Field(min_length=1, max_length=MAX_SAMPLES_PER_UPLOAD)
    entropy: list[float] = Field(max_length=MAX_SAMPLES_PER_UPLOAD)
    captured_at: list[float] = Field(max_length=MAX_SAMPLES_PER_UPLOAD)
    norm_stats: dict[str, Tensor] | None = Field(
        default=None, description="The device's own running statistics, when it estimates them; with "
        "batch_statistics, the statistics it normalised this batch with (the cloud distils under them)."
    )
    batch_statistics: bool = Field(
        default=False, description="The device normalises each batch by its own statistics (the cloud distils likewise)."
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> UploadBatch:
        n = len(self.images)
        if len(self.entropy) != n or len(self.captured_at) != n:
            raise ValueError("images, entropy and captured_at must have the same length")
        if any(len(b) > MAX_IMAGE_BYTES for b in self.images):
            raise ValueError(f"an image exceeds {MAX_IMAGE_BYTES} bytes")
        if any(not (e == e and abs(e) != float("inf")) for e in self.entropy):
            raise ValueError("entropy contains NaN or Inf")
        return self


class UploadAck(_Message):
    accepted: int
    queue_depth: int


class Telemetry(_Message):
    """A device's label-free health over the last few seconds, for the fleet dashboard.
    Mean entropy and confidence are its accuracy proxies: drift raises one and lowers the other."""

    protocol_version: int = PROTOCOL_VERSION
    version: int = Field(ge=0, le=MAX_VERSION, description="Parameter version the device runs.")
    window_s: float = Field(gt=0, le=3600, allow_inf_nan=False)
    frames: int = Field(ge=0, le=MAX_COUNT, description="Frames predicted in the window.")
    mean_entropy: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    mean_confidence: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    uploads_sent: int = Field(ge=0, le=MAX_COUNT, description="Samples the server accepted, since the device started.")
    uploads_spooled: int = Field(ge=0, le=MAX_COUNT, description="Samples waiting on the device's disk now.")
    uploads_dropped: int = Field(ge=0, le=MAX_COUNT, description="Samples dropped (queue, budget, spool), since the device started.")


class Delta(_Message):
    """A versioned parameter update: full values of the replaceable tensors it moves.

    Carrying values rather than differences makes a delta idempotent and lets
    a device skip intermediate versions; sha256 guards the payload end to end.
    A learnt tensor left out is at its source value (the cloud leaves out the
    convolution weights it has not moved); a statistic left out stays the device's.
    """

    protocol_version: int = PROTOCOL_VERSION
    cohort: str
    base_version: int = Field(ge=0)
    new_version: int = Field(ge=1)
    created_at: float
    newest_upload_at: float = Field(description="captured_at of the newest sample this version has learnt from")
    params: dict[str, Tensor]
    sha256: str
    device_id: str | None = Field(default=None, description="The device this copy was signed for.")
    moved_from: str | None = Field(default=None, description="Set when the delta moves the device: its old cohort.")
    signature: Signature | None = None

    @model_validator(mode="after")
    def _check_versions(self) -> Delta:
        if self.new_version <= self.base_version:
            raise ValueError("new_version must be greater than base_version")
        return self

    def payload_ok(self) -> bool:
        return tensors_digest(self.params) == self.sha256


class MoveRequest(_Message):
    """Admin: put a device in another cohort (one shared adapted state per cohort)."""

    cohort: CohortName


class TrendPoint(_Message):
    at: float
    version: int
    frames_per_s: float
    uploads_per_s: float
    mean_entropy: float | None
    mean_confidence: float | None
    spooled: int
    dropped: int


class DeviceSummary(_Message):
    device_id: str
    name: str
    cohort: str
    registered_at: float
    last_seen: float | None = Field(description="Last authenticated request from the device (server clock).")
    device_version: int | None = Field(description="Version the device last reported running.")
    cohort_version: int
    uploaded_samples: int = Field(description="Samples accepted since the server started.")
    trend: list[TrendPoint]
    may_upload: bool = True


class CohortSummary(_Message):
    cohort: str
    version: int
    devices: list[str]
    accepted_samples: int = Field(description="Uploaded samples the server acknowledged (2xx) for the cohort.")
    learnt_samples: int = Field(description="New uploads the cohort has learnt from, over all its versions.")
    frozen: bool = False


class ServerSummary(_Message):
    uptime_s: float
    queue_depth: int = Field(description="Upload batches waiting for the adaptation worker.")
    pending_samples: int
    steps_total: int
    samples_total: int
    steps_per_s: float = Field(description="Adaptation steps per second over the last minute.")
    samples_per_s: float


class FleetReport(_Message):
    """The fleet API and the dashboard's one data source; per-device detail lives here,
    not in Prometheus labels."""

    server: ServerSummary
    cohorts: list[CohortSummary]
    devices: list[DeviceSummary]


class PermissionsRequest(_Message):
    may_upload: bool = Field(description="False: the device follows its cohort's deltas but may not upload into it.")


class RollbackRequest(_Message):
    version: int = Field(ge=1, le=MAX_VERSION, description="An earlier version of the cohort; it is published again as the next one.")


class CohortAction(_Message):
    """Where a cohort stands after an operator's action."""

    cohort: str
    version: int
    frozen: bool


class EventOut(_Message):
    at: float
    cohort: str
    kind: str = Field(description="collapse_reset, withheld, rollback, frozen or unfrozen")
    detail: str
