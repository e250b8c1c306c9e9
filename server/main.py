"""Assemble a server from options: models, export, store, worker, app."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI

from server.app import ServerSettings, build_parts, create_app
from server.engine import CemaConfig, CemaEngine
from server.export import export_student
from server.models.registry import build_model, model_info
from server.prompt import InputPrompt, PromptedModel, parse_prompt
from server.store import SqliteStore

log = logging.getLogger("driftsync.server")
GUARD_HOLDOUT_EVERY = 8  # the guarded push trains on 7 of every 8 uploads and checks deltas on the 8th


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
    teacher_augmentations: int = 0
    student_lr: float = 2.5e-3
    student_steps: int = 1
    step_max_wait_s: float = 2.0
    step_min_samples: int = 8
    batch_cohorts: int = 4
    max_pending_samples: int = 2048
    prompt: str | None = None  # "padding:W" or "lowres:R": the student gets an input prompt
    learn: str = "norm"
    prompt_lr: float = 5e-3
    guarded_push: bool = False
    guard_tolerance: float = 0.0
    collapse_marginal: float = 0.2
    collapse_window: int = 512
    torch_threads: int = 0
    seed: int = 0


def build_app(opts: ServeOptions) -> FastAPI:
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    torch.manual_seed(opts.seed)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    student = build_model(opts.student)
    teacher = build_model(opts.teacher)
    info = model_info(opts.student)
    prompt = parse_prompt(opts.prompt)
    if prompt is not None:
        student = PromptedModel(student, InputPrompt(*prompt, info.input_size))
    artifact = export_student(student, info.input_shape)
    cfg = CemaConfig(
        num_classes=info.num_classes,
        adapt_teacher=opts.adapt_teacher,
        new_per_step=opts.new_per_step,
        replay_per_step=opts.replay_per_step,
        stats_momentum=opts.stats_momentum,
        teacher_optimizer=opts.teacher_optimizer,
        teacher_lr=opts.teacher_lr,
        teacher_augmentations=opts.teacher_augmentations,
        student_lr=opts.student_lr,
        student_steps=opts.student_steps,
        learn=opts.learn,
        prompt_lr=opts.prompt_lr,
        holdout_every=GUARD_HOLDOUT_EVERY if opts.guarded_push else 0,
        guard_tolerance=opts.guard_tolerance,
        collapse_marginal=opts.collapse_marginal,
        collapse_window=opts.collapse_window,
    )
    engine = CemaEngine(student, teacher, cfg, seed=opts.seed, student_input_shape=info.input_shape)
    store = SqliteStore(opts.state_dir / "driftsync.sqlite")
    settings = ServerSettings(max_body_bytes=opts.max_body_bytes, json_body_bytes=opts.json_body_bytes,
                              body_timeout_s=opts.body_timeout_s, enrolment_token=opts.enrolment_token,
                              admin_token=opts.admin_token, device_samples_per_s=opts.device_samples_per_s,
                              device_burst_samples=opts.device_burst_samples)
    parts = build_parts(
        engine, artifact, opts.student, list(info.class_names), info.input_shape, store, settings,
        queue_max_jobs=opts.queue_max_jobs, step_max_wait_s=opts.step_max_wait_s,
        step_min_samples=opts.step_min_samples, batch_cohorts=opts.batch_cohorts,
        max_pending_samples=opts.max_pending_samples,
    )
    log.info("student %s (%d norm tensors), teacher %s", opts.student, len(artifact.parameters), opts.teacher)
    return create_app(parts)
