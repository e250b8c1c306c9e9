"""Assemble a server for its role: `all` (one process), `api` (a stateless HTTP replica)
or `worker` (an adaptation worker), from options.

Only `all` and `worker` import torch; `api` builds from server.api_role, which does not.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.api_role import api_parts, open_backends, publish_model, summary_of
from server.app import ServerParts, ServerSettings, create_app
from server.artifact import PublishedModel
from server.devices import resolve_torch_device
from server.engine import CemaConfig, CemaEngine, learns_conv
from server.export import export_student
from server.fleet import FleetView
from server.leases import LeaseKeeper
from server.metrics import Registry
from server.models.registry import build_model, build_teacher, model_info
from server.norm import for_the_wire, learn_conv_weights, replaceable_state
from server.options import ROLES, ServeOptions
from server.prompt import InputPrompt, PromptedModel, parse_prompt
from server.queueing import InProcessQueue, UploadQueue
from server.signing import kept_signer
from server.store import Store
from server.versions import VersionBoard
from server.worker import AdaptationWorker
from shared.protocol import MAX_BODY_BYTES

# a delta is one msgpack body, which a device reads up to MAX_BODY_BYTES; leave room for the envelope
MAX_DELTA_TENSOR_BYTES = MAX_BODY_BYTES // 2

log = logging.getLogger("driftsync.server")
GUARD_HOLDOUT_EVERY = 8  # the guarded push trains on 7 of every 8 uploads and checks deltas on the 8th


def build_app(opts: ServeOptions) -> FastAPI:
    """The HTTP app for `--role all` (worker in-process) or `--role api` (no torch)."""
    if opts.role not in ROLES:
        raise ValueError(f"--role must be one of {', '.join(ROLES)}, not {opts.role!r}")
    if opts.role == "api":
        return create_app(_with_signing_key(api_parts(opts), opts))
    if opts.role == "worker":
        return build_worker_app(opts)
    store, broker = open_backends(opts)
    engine, model = build_engine(opts)
    publish_model(store, model)
    if broker is None:
        return create_app(_with_signing_key(build_parts(
            engine, model, store, opts.settings(), queue_max_jobs=opts.queue_max_jobs,
            step_max_wait_s=opts.step_max_wait_s, step_min_samples=opts.step_min_samples,
            batch_cohorts=opts.batch_cohorts, max_pending_samples=opts.max_pending_samples,
            max_state_bytes=opts.max_state_bytes, teacher_log=opts.teacher_log), opts))
    parts = _with_signing_key(api_parts(opts, store=store, broker=broker, model=model), opts)
    worker = _distributed_worker(opts, engine, model, store, broker, parts.metrics, parts.board)
    parts.worker = worker
    parts.warming = lambda: worker.warming
    parts.worker_summary = lambda: summary_of(worker)
    parts.on_start.append(worker.start)
    parts.on_stop.insert(0, worker.stop)
    return create_app(parts)


def _with_signing_key(parts: ServerParts, opts: ServeOptions) -> ServerParts:
    parts.signer = kept_signer(parts.store, opts.state_dir, shared=opts.broker is not None,
                               rotate=opts.rotate_signing_key)
    return parts


def full_delta_bytes(student: torch.nn.Module) -> int:
    """The bytes of tensors in a delta that carries everything the student lets deltas replace."""
    return sum(v.nbytes for v in for_the_wire(replaceable_state(student), student).values())


def check_delta_size(student: torch.nn.Module, what: str) -> None:
    """Refuse at start-up a student whose full delta a device could not read."""
    delta_bytes = full_delta_bytes(student)
    if delta_bytes > MAX_DELTA_TENSOR_BYTES:
        raise ValueError(f"deltas of {what} would carry {delta_bytes / 2**20:.1f} MiB of tensors, over the "
                         f"{MAX_DELTA_TENSOR_BYTES / 2**20:.0f} MiB a device reads: learn fewer")


def mark_learnt(student: torch.nn.Module, learn: str) -> str:
    """Mark the student's convolutions learnt where `learn` needs them; returns the learn mode to
    run. "auto", the default, and "race" learn the convolutions only where a delta carrying them
    fits what a device reads (ResNet-20: 0.5 MiB); a larger student (ImageNet's ResNets: 21 MiB
    and more) learns its affine parameters alone, as "norm"."""
    if not learns_conv(learn):
        return learn
    learn_conv_weights(student)
    if learn in ("auto", "race") and full_delta_bytes(student) > MAX_DELTA_TENSOR_BYTES:
        log.info("--learn %s: convolution deltas of this student would not fit what a device reads; learning norm", learn)
        learn_conv_weights(student, learn=False)
        return "norm"
    return learn


def build_engine(opts: ServeOptions) -> tuple[CemaEngine, PublishedModel]:
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    torch.manual_seed(opts.seed)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    student = build_model(opts.student)
    teacher = build_teacher(opts.teacher)
    info = model_info(opts.student)
    prompt = parse_prompt(opts.prompt)
    if prompt is not None:
        student = PromptedModel(student, InputPrompt(*prompt, info.input_size))
    learn = mark_learnt(student, opts.learn)
    check_delta_size(student, f"{opts.student} with --learn {learn}")
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
        distil_from=opts.distil_from,
        teacher_ema=opts.teacher_ema,
        student_lr=opts.student_lr,
        conv_lr=opts.conv_lr,
        student_steps=opts.student_steps,
        learn=learn,
        prompt_lr=opts.prompt_lr,
        holdout_every=GUARD_HOLDOUT_EVERY if opts.guarded_push else 0,
        guard_tolerance=opts.guard_tolerance,
        collapse_marginal=opts.collapse_marginal,
        collapse_window=opts.collapse_window,
    )
    torch_device = resolve_torch_device(opts.torch_device)
    engine = CemaEngine(student, teacher, cfg, seed=opts.seed, student_input_shape=info.input_shape,
                        torch_device=torch_device)
    log.info("student %s (%d replaceable tensors, %.0f KiB), teacher %s, on %s", opts.student, len(artifact.parameters),
             len(artifact.norm) / 1024, opts.teacher, torch_device)
    return engine, PublishedModel(opts.student, list(info.class_names), info.input_shape, artifact)


def build_parts(
    engine: CemaEngine,
    model: PublishedModel,
    store: Store,
    settings: ServerSettings,
    *,
    queue_max_jobs: int = 256,
    step_max_wait_s: float = 2.0,
    step_min_samples: int = 8,
    batch_cohorts: int = 4,
    max_pending_samples: int = 2048,
    max_state_bytes: int = 1 << 30,
    teacher_log: Path | None = None,
) -> ServerParts:
    """One process: the HTTP front and the worker share an in-process queue and a version board."""
    uploads = InProcessQueue(queue_max_jobs)
    board = VersionBoard()
    metrics = Registry()
    worker = AdaptationWorker(engine, uploads, store, model, board.publish, max_wait_s=step_max_wait_s,
                              min_step_samples=step_min_samples, max_cohorts_per_step=batch_cohorts,
                              max_pending_samples=max_pending_samples, max_state_bytes=max_state_bytes,
                              teacher_log=teacher_log, **_worker_metrics(metrics))
    return ServerParts(settings, store, uploads, board, metrics, FleetView(), model=lambda: model,
                       worker_summary=lambda: summary_of(worker), on_start=[worker.start],
                       on_stop=[worker.stop, store.close], worker=worker, warming=lambda: worker.warming)


def build_worker_app(opts: ServeOptions) -> FastAPI:
    """`--role worker`: adapts the partitions it holds; its HTTP side is only /healthz and /metrics."""
    store, broker = open_backends(opts)
    if broker is None:
        raise ValueError("--role worker needs --broker redis://HOST:PORT (and a shared --store postgresql://...)")
    engine, model = build_engine(opts)
    publish_model(store, model)
    metrics, board = Registry(), VersionBoard()
    worker = _distributed_worker(opts, engine, model, store, broker, metrics, board)
    started = threading.Event()

    def start() -> None:
        worker.start()
        started.set()

    app = FastAPI(title="driftsync worker", lifespan=_lifespan(start, [worker.stop, broker.close, store.close]))
    metrics.gauge("driftsync_pending_samples", "Samples waiting to fill a step.", worker.pending_samples)
    metrics.gauge("driftsync_partitions_held", "Broker partitions this worker holds.",
                  lambda: len(worker.keeper.held()) if worker.keeper else 0)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok" if started.is_set() else "starting", "role": "worker", "warming": worker.warming,
                "worker": worker.keeper.owner if worker.keeper else None,
                "partitions": sorted(worker.keeper.held()) if worker.keeper else []}

    @app.get("/metrics")
    def render_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _distributed_worker(opts: ServeOptions, engine: CemaEngine, model: PublishedModel, store: Store,
                        broker: UploadQueue, metrics: Registry, board: VersionBoard) -> AdaptationWorker:
    owner = opts.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    broker.consumer = owner  # type: ignore[attr-defined]
    keeper = LeaseKeeper(store, owner, opts.partitions, opts.lease_ttl_s)

    def announce(cohort: str, version: int) -> None:
        board.publish(cohort, version)
        broker.announce(cohort, version)  # type: ignore[attr-defined]

    log.info("worker %s: %d partitions, lease %.0f s", owner, opts.partitions, opts.lease_ttl_s)
    return AdaptationWorker(engine, broker, store, model, announce, keeper=keeper, partitions=opts.partitions,
                            max_wait_s=opts.step_max_wait_s, min_step_samples=opts.step_min_samples,
                            max_cohorts_per_step=opts.batch_cohorts, max_pending_samples=opts.max_pending_samples,
                            max_state_bytes=opts.max_state_bytes, teacher_log=opts.teacher_log,
                            **_worker_metrics(metrics))


def _worker_metrics(metrics: Registry) -> dict:
    step_hist = metrics.histogram(
        "driftsync_adaptation_step_seconds", "Wall time of one worker step (all cohorts it batched).",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )
    steps = metrics.counter("driftsync_adaptation_steps_total", "Cohort adaptation steps run (versions published).")
    adapted = metrics.counter("driftsync_adaptation_samples_total", "New samples adapted on.")
    events = metrics.counter("driftsync_cohort_events_total", "Collapse resets, withheld deltas, rollbacks, freezes.")

    def on_step(cohorts: int, samples: int, seconds: float) -> None:
        step_hist.observe(seconds)
        steps.inc(cohorts)
        adapted.inc(samples)

    return {"on_step": on_step, "on_event": lambda kind: events.inc(kind=kind)}


def _lifespan(start, stops):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(start)
        try:
            yield
        finally:
            for stop in stops:
                await run_in_threadpool(stop)

    return lifespan
