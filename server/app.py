"""The HTTP front: validates, authenticates, enqueues and serves versions. It never trains."""
from __future__ import annotations

import hmac
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine import CemaEngine
from server.export import StudentArtifact, sha256_hex
from server.fleet import FleetView
from server.limits import BodyLimits, BodyLimitSettings
from server.metrics import Registry
from server.queueing import InProcessQueue, UploadJob, UploadQueue
from server.ratelimit import RateLimiter
from server.store import DeviceRecord, Store
from server.uploads import UploadRejected, parse_upload
from server.worker import AdaptationWorker, VersionBoard
from shared.codec import MAX_ERROR_CHARS, MSGPACK_MEDIA_TYPE, describe_errors, pack
from shared.protocol import (
    COHORT_PATTERN,
    MAX_BODY_BYTES,
    MAX_COHORT_LENGTH,
    MAX_VERSION,
    PROTOCOL_VERSION,
    CohortAction,
    CohortSummary,
    Delta,
    DeviceSummary,
    ErrorBody,
    EventOut,
    FleetReport,
    ModelDescriptor,
    MoveRequest,
    PermissionsRequest,
    RegisterRequest,
    RegisterResponse,
    RollbackRequest,
    ServerSummary,
    Telemetry,
    UploadAck,
)

log = logging.getLogger("driftsync.server")
CohortPath = Annotated[str, PathParam(min_length=1, max_length=MAX_COHORT_LENGTH, pattern=COHORT_PATTERN)]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


@dataclass
class ServerSettings:
    max_body_bytes: int = MAX_BODY_BYTES  # the upload route
    json_body_bytes: int = 64 * 1024  # every other route: control messages
    body_timeout_s: float = 30.0  # a request body must have fully arrived by then (slowloris)
    max_wait_s: float = 30.0
    enrolment_token: str | None = None  # one or more, comma-separated (rotate by adding the new one first)
    admin_token: str | None = None  # fleet operations and the fleet API; unset: they are refused
    queue_retry_after_s: int = 1
    frozen_retry_after_s: int = 30
    device_samples_per_s: float | None = 100.0  # per-device upload rate limit (None: off)
    device_burst_samples: float = 1000.0


@dataclass
class ServerParts:
    """Everything the routes need; built by server.main, or by a test."""

    settings: ServerSettings
    store: Store
    uploads: UploadQueue
    board: VersionBoard
    worker: AdaptationWorker
    artifact: StudentArtifact
    descriptor: ModelDescriptor
    metrics: Registry
    fleet: FleetView
    started_at: float


def build_parts(
    engine: CemaEngine,
    artifact: StudentArtifact,
    model_name: str,
    class_names: list[str],
    input_shape: tuple[int, int, int],
    store: Store,
    settings: ServerSettings,
    *,
    queue_max_jobs: int = 256,
    step_max_wait_s: float = 2.0,
    step_min_samples: int = 8,
    batch_cohorts: int = 4,
    max_pending_samples: int = 2048,
) -> ServerParts:
    uploads = InProcessQueue(queue_max_jobs)
    board = VersionBoard()
    for device in store.devices():
        latest = store.latest_version(device.cohort)
        if latest is not None:
            board.publish(device.cohort, latest.version)
    metrics = Registry()
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

    def on_event(kind: str) -> None:
        events.inc(kind=kind)

    worker = AdaptationWorker(engine, uploads, store, board, max_wait_s=step_max_wait_s,
                             min_step_samples=step_min_samples, max_cohorts_per_step=batch_cohorts,
                             max_pending_samples=max_pending_samples,
                             on_step=on_step, on_event=on_event)
    descriptor = ModelDescriptor(
        name=model_name,
        num_classes=len(class_names),
        class_names=class_names,
        input_shape=input_shape,
        onnx_sha256=sha256_hex(artifact.onnx),
        onnx_bytes=len(artifact.onnx),
        norm_sha256=sha256_hex(artifact.norm),
        stats_sha256=sha256_hex(artifact.stats_onnx),
        parameters=artifact.parameters,
    )
    metrics.gauge("driftsync_upload_queue_jobs", "Upload batches waiting for the worker.", uploads.depth)
    metrics.gauge("driftsync_pending_samples", "Samples waiting to fill a step.", worker.pending_samples)
    metrics.gauge("driftsync_devices", "Registered devices.", lambda: len(store.devices()))
    metrics.gauge("driftsync_cohorts", "Cohorts with at least one device.", lambda: len({d.cohort for d in store.devices()}))
    return ServerParts(settings, store, uploads, board, worker, artifact, descriptor, metrics, FleetView(), time.time())


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = detail if len(detail) <= MAX_ERROR_CHARS else detail[: MAX_ERROR_CHARS - 3] + "..."
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers)


def create_app(parts: ServerParts) -> FastAPI:
    m = parts.metrics
    uploads_total = m.counter("driftsync_upload_samples_total", "Samples accepted for adaptation.")
    upload_bytes = m.counter("driftsync_upload_bytes_total", "Bytes of accepted upload bodies.")
    refused = m.counter("driftsync_requests_refused_total", "Requests refused, by reason.")
    auth_failures = m.counter("driftsync_auth_failures_total", "Requests with a missing or wrong token.")
    deltas_served = m.counter("driftsync_deltas_served_total", "Deltas sent to devices.")
    delta_bytes = m.counter("driftsync_delta_bytes_total", "Bytes of deltas sent to devices.")
    limiter = (RateLimiter(parts.settings.device_samples_per_s, parts.settings.device_burst_samples)
               if parts.settings.device_samples_per_s else None)
    telemetry_reports = m.counter("driftsync_telemetry_reports_total", "Telemetry reports received from devices.")
    cohort_moves = m.counter("driftsync_cohort_moves_total", "Devices moved to another cohort.")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        recover_uploads(parts)
        parts.worker.start()
        try:
            yield
        finally:
            parts.worker.stop()
            parts.store.close()

    app = FastAPI(
        title="driftsync",
        version=str(PROTOCOL_VERSION),
        description="Cloud side of driftsync: uploads in, versioned normalization deltas out.",
        lifespan=lifespan,
    )
    app.state.parts = parts
    app.add_middleware(BodyLimits, settings=BodyLimitSettings(
        default_bytes=parts.settings.json_body_bytes, route_bytes={"/v1/uploads": parts.settings.max_body_bytes},
        timeout_s=parts.settings.body_timeout_s))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        refused.inc(reason=exc.error)
        return _error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        refused.inc(reason="invalid_request")
        return _error(422, "invalid_request", describe_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    def device_from_token(authorization: str | None = Header(default=None)) -> DeviceRecord:
        if not authorization or not authorization.startswith("Bearer "):
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
        device = parts.store.device_for_token(authorization.removeprefix("Bearer ").strip())
        if device is None:
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "unknown device token", {"WWW-Authenticate": "Bearer"})
        parts.fleet.seen(device.device_id)
        return device

    def admin(authorization: str | None = Header(default=None)) -> None:
        expected = parts.settings.admin_token
        if expected is None:
            raise ApiError(403, "admin_disabled", "fleet operations are off: start the server with --admin-token")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "missing or wrong admin token", {"WWW-Authenticate": "Bearer"})

    def admit_upload(device: DeviceRecord, samples: int, *, spend: bool) -> None:
        """Permission, freeze and rate limit: checked before the body is read (spend=False, one
        sample), and again with the declared sample count before any image is decoded."""
        if not device.may_upload:
            auth_failures.inc()
            raise ApiError(403, "upload_forbidden", "this device may read its cohort's deltas but not upload")
        if device.cohort in parts.worker.frozen:  # the device keeps it spooled until the cohort thaws
            retry = str(parts.settings.frozen_retry_after_s)
            raise ApiError(423, "cohort_frozen", f"adaptation of cohort {device.cohort} is frozen", {"Retry-After": retry})
        if limiter is None:
            return
        now = time.monotonic()
        wait = limiter.take(device.device_id, samples, now) if spend else limiter.check(device.device_id, samples, now)
        if wait is not None:
            raise ApiError(429, "rate_limited", f"device over {parts.settings.device_samples_per_s:g} samples/s",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "protocol_version": PROTOCOL_VERSION, "model": parts.descriptor.name}

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/devices", response_model=RegisterResponse, status_code=201)
    def register(body: RegisterRequest) -> RegisterResponse:
        if body.protocol_version != PROTOCOL_VERSION:
            raise ApiError(400, "protocol_mismatch", f"server speaks protocol {PROTOCOL_VERSION}")
        if parts.settings.enrolment_token is not None and not _enrolment_ok(parts.settings.enrolment_token, body.enrolment_token):
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "wrong enrolment token")
        record, token = parts.store.add_device(body.device_name, body.cohort)
        return RegisterResponse(
            device_id=record.device_id,
            token=token,
            cohort=record.cohort,
            version=parts.board.latest(record.cohort),
            model=parts.descriptor,
        )

    @app.get("/v1/model", response_model=ModelDescriptor)
    def model_descriptor(device: DeviceRecord = Depends(device_from_token)) -> ModelDescriptor:
        return parts.descriptor

    @app.get("/v1/model/{part}", response_class=Response)
    def model_file(part: str, device: DeviceRecord = Depends(device_from_token)) -> Response:
        files = {
            "student.onnx": parts.artifact.onnx,
            "student.norm.bin": parts.artifact.norm,
            "student.stats.onnx": parts.artifact.stats_onnx,
        }
        if part not in files:
            raise ApiError(404, "not_found", f"model part {part!r} does not exist; use one of {sorted(files)}")
        data = files[part]
        return Response(data, media_type="application/octet-stream", headers={"X-Content-SHA256": sha256_hex(data)})

    @app.post("/v1/uploads", response_model=UploadAck, status_code=202)
    async def upload(request: Request, device: DeviceRecord = Depends(device_from_token)) -> UploadAck:
        admit_upload(device, 1, spend=False)  # the token was checked already; the body is not read yet
        body = await request.body()  # BodyLimits bounds its size and the time it may take

        def accept() -> UploadJob:
            """Check everything, persist, then queue: a 2xx means the upload is on disk."""
            try:
                job = parse_upload(body, parts.descriptor, parts.settings.max_body_bytes, cohort=device.cohort,
                                   device_id=device.device_id, received_at=time.time(),
                                   admit=lambda samples: admit_upload(device, samples, spend=True))
            except UploadRejected as exc:
                raise ApiError(400, exc.error, str(exc)) from exc
            job = replace(job, upload_id=parts.store.add_upload(device.cohort, device.device_id, body, len(job.images)))
            if not parts.uploads.offer(job):
                parts.store.discard_upload(job.upload_id)
                retry = str(parts.settings.queue_retry_after_s)
                raise ApiError(429, "queue_full", "adaptation queue is full; retry later", {"Retry-After": retry})
            return job

        images = (await run_in_threadpool(accept)).images
        uploads_total.inc(len(images))
        upload_bytes.inc(len(body))
        parts.fleet.seen(device.device_id, uploaded=len(images))
        return UploadAck(accepted=len(images), queue_depth=parts.uploads.depth())

    @app.get(
        "/v1/deltas",
        response_class=Response,
        responses={200: {"content": {MSGPACK_MEDIA_TYPE: {}}}, 204: {"description": "no newer version"}},
    )
    async def deltas(
        since: int = Query(ge=0, le=MAX_VERSION),
        wait: float = Query(default=0.0, ge=0.0, le=120.0),
        cohort: str | None = Query(default=None, min_length=1, max_length=MAX_COHORT_LENGTH, pattern=COHORT_PATTERN,
                                   description="the cohort the device thinks it is in"),
        device: DeviceRecord = Depends(device_from_token),
    ) -> Response:
        latest = parts.board.latest(device.cohort)
        moved = cohort is not None and cohort != device.cohort
        if not moved and since > latest:
            raise ApiError(409, "version_ahead", f"device is at v{since} but the server's latest is v{latest}")
        if not moved and latest <= since and wait > 0:
            await parts.board.wait_newer(device.cohort, since, min(wait, parts.settings.max_wait_s))
            device = parts.store.device(device.device_id) or device  # a move ends the wait too
            moved = cohort is not None and cohort != device.cohort
            latest = parts.board.latest(device.cohort)
        if moved:
            since = 0  # the new cohort's version line is new to the device
        if latest <= since:
            return Response(status_code=204)
        record = await run_in_threadpool(parts.store.latest_version, device.cohort)
        delta = Delta(
            cohort=record.cohort,
            base_version=since,
            new_version=record.version,
            created_at=record.created_at,
            newest_upload_at=record.newest_upload_at,
            params=record.params,
            sha256=record.sha256,
        )
        data = pack(delta)
        deltas_served.inc()
        delta_bytes.inc(len(data))
        return Response(data, media_type=MSGPACK_MEDIA_TYPE)

    @app.post("/v1/telemetry", status_code=204, response_class=Response)
    def telemetry(body: Telemetry, device: DeviceRecord = Depends(device_from_token)) -> Response:
        parts.fleet.report(device.device_id, body)
        telemetry_reports.inc()
        return Response(status_code=204)

    @app.get("/v1/fleet", response_model=FleetReport, dependencies=[Depends(admin)])
    def fleet() -> FleetReport:
        return fleet_report(parts)

    @app.post("/v1/devices/{device_id}/cohort", response_model=FleetReport, dependencies=[Depends(admin)])
    def move(device_id: str, body: MoveRequest) -> FleetReport:
        """Move a device to another cohort: it takes that cohort's latest version on its next poll."""
        parts.worker.seed_cohort(body.cohort)
        if parts.store.move_device(device_id, body.cohort) is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        parts.board.wake_all()
        cohort_moves.inc()
        return fleet_report(parts)

    @app.post("/v1/devices/{device_id}/permissions", response_model=FleetReport, dependencies=[Depends(admin)])
    def permissions(device_id: str, body: PermissionsRequest) -> FleetReport:
        """Let a device write into its cohort (upload), or make it read-only: it still gets deltas."""
        if parts.store.set_may_upload(device_id, body.may_upload) is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        return fleet_report(parts)

    @app.post("/v1/cohorts/{cohort}/rollback", response_model=CohortAction, dependencies=[Depends(admin)])
    async def rollback(cohort: CohortPath, body: RollbackRequest) -> CohortAction:
        """Publish an earlier version's tensors again as the next version; adaptation goes on from there."""
        try:
            await run_in_threadpool(parts.worker.rollback, cohort, body.version)
        except KeyError as exc:
            raise ApiError(404, "not_found", str(exc.args[0])) from exc
        return _cohort_action(parts, cohort)

    @app.post("/v1/cohorts/{cohort}/freeze", response_model=CohortAction, dependencies=[Depends(admin)])
    def freeze(cohort: CohortPath) -> CohortAction:
        """Stop adapting the cohort: its devices keep their parameters and spool their uploads."""
        parts.worker.set_frozen(cohort, True)
        return _cohort_action(parts, cohort)

    @app.post("/v1/cohorts/{cohort}/unfreeze", response_model=CohortAction, dependencies=[Depends(admin)])
    def unfreeze(cohort: CohortPath) -> CohortAction:
        parts.worker.set_frozen(cohort, False)
        return _cohort_action(parts, cohort)

    @app.get("/v1/events", response_model=list[EventOut], dependencies=[Depends(admin)])
    def events_log(limit: int = Query(default=100, ge=1, le=1000)) -> list[EventOut]:
        """Collapse resets, withheld deltas, rollbacks and freezes, newest first."""
        return [EventOut(**vars(event)) for event in parts.store.events(limit)]

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text())

    return app


DASHBOARD = Path(__file__).with_name("dashboard.html")


def _enrolment_ok(configured: str, given: str | None) -> bool:
    """Compared in constant time against every configured token, without stopping at a match."""
    tokens = [t.strip() for t in configured.split(",") if t.strip()]
    supplied = (given or "").encode()
    return sum(hmac.compare_digest(supplied, t.encode()) for t in tokens) > 0


def _cohort_action(parts: ServerParts, cohort: str) -> CohortAction:
    return CohortAction(cohort=cohort, version=parts.store.version_number(cohort), frozen=cohort in parts.worker.frozen)


def recover_uploads(parts: ServerParts) -> None:
    """Hand the worker every upload accepted before a restart that no version has learnt from."""
    stored = parts.store.pending_uploads()
    for upload in stored:
        try:
            job = parse_upload(upload.body, parts.descriptor, parts.settings.max_body_bytes, cohort=upload.cohort,
                               device_id=upload.device_id, received_at=upload.received_at, upload_id=upload.upload_id)
        except UploadRejected as exc:  # it passed these checks once; a changed model may refuse it now
            log.error("dropping stored upload %d: %s", upload.upload_id, exc)
            parts.store.discard_upload(upload.upload_id)
            continue
        parts.worker.restore(job, upload.remaining)
    if stored:
        log.info("recovered %d accepted uploads (%d samples) from before the restart",
                 len(stored), sum(u.remaining for u in stored))


def fleet_report(parts: ServerParts) -> FleetReport:
    worker = parts.worker.stats
    steps_per_s, samples_per_s = worker.rates()
    devices, cohorts = [], {}
    for record in parts.store.devices():
        view = parts.fleet.get(record.device_id)
        cohorts.setdefault(record.cohort, []).append(record.device_id)
        devices.append(DeviceSummary(
            device_id=record.device_id, name=record.name, cohort=record.cohort, registered_at=record.created_at,
            last_seen=view.last_seen or None, device_version=view.version,
            cohort_version=parts.board.latest(record.cohort), uploaded_samples=view.uploaded_samples,
            trend=list(view.trend), may_upload=record.may_upload,
        ))
    return FleetReport(
        server=ServerSummary(
            uptime_s=time.time() - parts.started_at, queue_depth=parts.uploads.depth(),
            pending_samples=parts.worker.pending_samples(), steps_total=worker.steps, samples_total=worker.samples,
            steps_per_s=steps_per_s, samples_per_s=samples_per_s,
        ),
        cohorts=[CohortSummary(cohort=c, version=parts.board.latest(c), devices=ids,
                               accepted_samples=parts.store.accepted_samples(c),
                               learnt_samples=parts.store.learnt_samples(c), frozen=c in parts.worker.frozen)
                 for c, ids in sorted(cohorts.items())],
        devices=devices,
    )
