"""What `driftsync serve` is asked to run, for every role. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.app import ServerSettings

ROLES = ("all", "api", "worker")


@dataclass(frozen=True)
class ServeOptions:
    state_dir: Path
    student: str = "embedded-student"
    teacher: str = "embedded-teacher"
    enrolment_token: str | None = None
    admin_token: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    json_body_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0
    device_samples_per_s: float | None = 100.0
    device_burst_samples: float = 1000.0
    queue_max_jobs: int = 256
    new_per_step: int = 32
    replay_per_step: int = 96
    stats_momentum: float = 0.3
    adapt_teacher: bool = True
    teacher_optimizer: str = "sgd"
    teacher_lr: float = 2.5e-4
    teacher_augmentations: int = 8  # measured: BENCHMARKS.md, issue 16 part 2
    distil_from: str = "both"
    teacher_ema: float = 0.9
    student_lr: float = 2.5e-3
    conv_lr: float = 2.5e-5  # a convolution weight's rate is at most this times its squared norm: server.engine.conv_rates
    student_steps: int | None = None  # None: one per new_per_step new uploads, rounded up
    step_max_wait_s: float = 2.0
    step_min_samples: int = 8
    batch_cohorts: int = 4
    max_pending_samples: int = 2048
    max_state_bytes: int = 1 << 30  # replay images a worker keeps over all its cohorts
    prompt: str | None = None  # "padding:W" or "lowres:R": the student gets an input prompt
    learn: str = "auto"  # norm+conv from batch-statistics devices where its deltas fit; measured: BENCHMARKS.md, "Convolution rates capped"
    prompt_lr: float = 5e-3
    guarded_push: bool = False
    guard_tolerance: float = 0.0
    collapse_marginal: float = 0.2
    collapse_window: int = 512
    torch_threads: int = 0
    torch_device: str = "auto"  # cpu, cuda, cuda:N; auto: cuda when torch sees one
    seed: int = 0
    role: str = "all"  # all | api | worker
    store: str | None = None  # sqlite path/URL or postgresql://...; default: STATE_DIR/driftsync.sqlite
    broker: str | None = None  # redis://...; needed by api and worker
    partitions: int = 16  # broker partition streams (fixed for a deployment)
    lease_ttl_s: float = 10.0
    worker_name: str | None = None
    rotate_signing_key: bool = False  # start with a new key, announced signed by the old one
    device_expiry_s: float | None = None  # devices unseen this long are removed (None: never)
    teacher_log: Path | None = None  # evaluation aid: the teacher's class per stepped sample, by capture time

    def settings(self) -> ServerSettings:
        return ServerSettings(max_body_bytes=self.max_body_bytes, json_body_bytes=self.json_body_bytes,
                              body_timeout_s=self.body_timeout_s, enrolment_token=self.enrolment_token,
                              admin_token=self.admin_token, device_samples_per_s=self.device_samples_per_s,
                              device_burst_samples=self.device_burst_samples,
                              device_expiry_s=self.device_expiry_s)
