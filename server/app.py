"""The HTTP front: validates, authenticates, stores, enqueues and serves versions. It never trains.

Torch-free: with `--role api` it runs as a stateless replica that reads the model and
versions from the shared store and hands uploads to workers through the broker; with
`--role all` the worker runs in the same process behind an in-process queue.
"""
from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.artifact import PublishedModel, sha256_hex
from server.expiry import DeviceReaper, should_touch
from server.fleet import FleetView
from server.limits import BodyLimits, BodyLimitSettings
from server.metrics import Registry
from server.queueing import (
    BrokerUnavailable,
    ControlJob,
    StoredJob,
    UploadQueue,
    partition_of,
)
from server.ratelimit import RateLimiter
from server.signing import Signer
from server.store import DeviceRecord, Store, StoreError, StoreUnavailable
from server.uploads import UploadRejected, parse_upload
from server.versions import VersionBoard
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
    SigningKeyInfo,
    Telemetry,
    UploadAck,
)
from shared.signing import (
    SIGNATURE_HEADER,
    delta_fields,
    enrolment_fields,
    model_file_fields,
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
    signature_ttl_s: float = 600.0  # how long a signed delta, model file or enrolment stays valid
    device_expiry_s: float | None = None  # devices unseen this long are removed (None: kept forever)


@dataclass
class WorkerSummary:
    """What the fleet report says of adaptation: one in-process worker, or every live worker's blob."""

    pending_samples: int = 0
    steps_total: int = 0
    samples_total: int = 0
    steps_per_s: float = 0.0
    samples_per_s: float = 0.0


@dataclass
class ServerParts:
    """Everything the routes need; built by server.main for a role, or by a test."""

    settings: ServerSettings
    store: Store
    uploads: UploadQueue
    board: VersionBoard
    metrics: Registry
    fleet: FleetView
    model: Callable[[], PublishedModel | None]  # None until a worker has published it (API replicas)
    worker_summary: Callable[[], WorkerSummary]
    partitions: int = 1
    by_reference: bool = False  # the queue carries stored uploads by id (a broker), not decoded images
    wake_all: Callable[[], None] | None = None  # ends every long poll on every replica (default: this board)
    on_start: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    worker: object | None = None  # the in-process AdaptationWorker with --role all (tests reach into it)
    warming: Callable[[], bool] = lambda: False  # the in-process worker's warm-up step has not run yet
    started_at: float = field(default_factory=time.time)
    signer: Signer = field(default_factory=Signer.generate)  # server.main sets the kept key; a test's lives with it


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
    broker_errors = m.counter("driftsync_broker_errors_total", "Uploads stored but not handed to the broker "
                              "(Redis away); workers find them in the store.")
    limiter = (RateLimiter(parts.settings.device_samples_per_s, parts.settings.device_burst_samples)
               if parts.settings.device_samples_per_s else None)
    telemetry_reports = m.counter("driftsync_telemetry_reports_total", "Telemetry reports received from devices.")
    cohort_moves = m.counter("driftsync_cohort_moves_total", "Devices moved to another cohort.")
    m.gauge("driftsync_upload_queue_jobs", "Upload batches waiting for a worker.", parts.uploads.depth)
    m.gauge("driftsync_pending_samples", "Samples waiting to fill a step.", lambda: parts.worker_summary().pending_samples)
    m.gauge("driftsync_long_polls", "Device long polls waiting on this replica.", parts.board.waiting)
    m.gauge("driftsync_devices", "Registered devices.", lambda: len(parts.store.devices()))
    m.gauge("driftsync_cohorts", "Cohorts with at least one device.", lambda: len({d.cohort for d in parts.store.devices()}))
    frozen = _FrozenCache(parts.store)
    wake_all = parts.wake_all or parts.board.wake_all
    reaper = (DeviceReaper(parts.store, parts.settings.device_expiry_s, parts.fleet.forget)
              if parts.settings.device_expiry_s else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for start in parts.on_start:
            await run_in_threadpool(start)
        if reaper:
            reaper.start()
        try:
            yield
        finally:
            parts.board.close()  # every long poll answers now, so shutdown fits a stop grace period
            if reaper:
                await run_in_threadpool(reaper.stop)
            for stop in parts.on_stop:
                await run_in_threadpool(stop)

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

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        """The database is away (a restart, a failover): devices keep the request spooled and retry."""
        refused.inc(reason="store_unavailable")
        log.warning("store unavailable: %s", exc)
        status = 503 if isinstance(exc, StoreUnavailable) else 500
        return _error(status, "store_unavailable", "the server's database is unavailable; retry later",
                      {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        refused.inc(reason="invalid_request")
        return _error(422, "invalid_request", describe_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    def published() -> PublishedModel:
        model = parts.model()
        if model is None:
            raise ApiError(503, "model_unavailable", "no worker has published the model yet", {"Retry-After": "5"})
        return model

    def device_from_token(authorization: str | None = Header(default=None)) -> DeviceRecord:
        if not authorization or not authorization.startswith("Bearer "):
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
        device = parts.store.device_for_token(authorization.removeprefix("Bearer ").strip())
        if device is None:
            auth_failures.inc()
            raise ApiError(401, "unauthorized", "unknown device token", {"WWW-Authenticate": "Bearer"})
        parts.fleet.seen(device.device_id)
        now = time.time()
        if should_touch(device.last_seen_at, now):
            parts.store.touch_device(device.device_id, now)
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
        if frozen.contains(device.cohort):  # the device keeps it spooled until the cohort thaws
            retry = str(parts.settings.frozen_retry_after_s)
            raise ApiError(423, "cohort_frozen", f"adaptation of cohort {device.cohort} is frozen", {"Retry-After": retry})
        if limiter is None:
            return
        now = time.monotonic()
        wait = limiter.take(device.device_id, samples, now) if spend else limiter.check(device.device_id, samples, now)
        if wait is not None:
            raise ApiError(429, "rate_limited", f"device over {parts.settings.device_samples_per_s:g} samples/s",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    async def wait_for_version(cohort: str, above: int, timeout: float) -> int:
        """The cohort's version once it passes `above`, read from the store (the truth on every
        replica), woken early by the board's announcements."""
        deadline = time.monotonic() + timeout
        generation = parts.board.generation  # a wake_all (a cohort move) ends the wait too
        while True:
            latest = await run_in_threadpool(parts.store.version_number, cohort)
            parts.board.publish(cohort, latest)
            remaining = deadline - time.monotonic()
            if latest > above or remaining <= 0 or parts.board.closed or parts.board.generation != generation:
                return latest
            await parts.board.wait_newer(cohort, above, min(remaining, STORE_RECHECK_S))

    @app.get("/healthz")
    def healthz() -> Response:
        model = parts.model()
        if model is None:
            return JSONResponse({"status": "starting", "protocol_version": PROTOCOL_VERSION,
                                 "detail": "waiting for a worker to publish the model"}, status_code=503)
        return JSONResponse({"status": "ok", "protocol_version": PROTOCOL_VERSION, "model": model.name,
                             "warming": parts.warming()})

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
        descriptor = published().descriptor()
        record, token = parts.store.add_device(body.device_name, body.cohort)
        reply = RegisterResponse(
            device_id=record.device_id,
            token=token,
            cohort=record.cohort,
            version=parts.store.version_number(record.cohort),
            model=descriptor,
            server_key=parts.signer.public_hex,
        )
        signature = parts.signer.sign("enrolment", enrolment_fields(reply), parts.settings.signature_ttl_s)
        return reply.model_copy(update={"signature": signature})

    @app.get("/v1/signing-key", response_model=SigningKeyInfo)
    def signing_key() -> SigningKeyInfo:
        """The current public key and the signed rotations that lead to it (public: nothing secret)."""
        return parts.signer.key_info()

    @app.get("/v1/model", response_model=ModelDescriptor)
    def model_descriptor(device: DeviceRecord = Depends(device_from_token)) -> ModelDescriptor:
        return published().descriptor()

    @app.get("/v1/model/{part}", response_class=Response)
    def model_file(part: str, device: DeviceRecord = Depends(device_from_token)) -> Response:
        files = published().files()
        if part not in files:
            raise ApiError(404, "not_found", f"model part {part!r} does not exist; use one of {sorted(files)}")
        data = files[part]
        digest = sha256_hex(data)
        signature = parts.signer.sign("model_file", model_file_fields(part, digest), parts.settings.signature_ttl_s)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Content-SHA256": digest, SIGNATURE_HEADER: signature.model_dump_json()})

    @app.post("/v1/uploads", response_model=UploadAck, status_code=202)
    async def upload(request: Request, device: DeviceRecord = Depends(device_from_token)) -> UploadAck:
        admit_upload(device, 1, spend=False)  # the token was checked already; the body is not read yet
        body = await request.body()  # BodyLimits bounds its size and the time it may take

        def accept() -> int:
            """Check everything, store, then queue: a 2xx means the upload is in the store."""
            received_at = time.time()
            try:
                job = parse_upload(body, published().descriptor(), parts.settings.max_body_bytes, cohort=device.cohort,
                                   device_id=device.device_id, received_at=received_at,
                                   admit=lambda samples: admit_upload(device, samples, spend=True))
            except UploadRejected as exc:
                raise ApiError(400, exc.error, str(exc)) from exc
            partition = partition_of(device.cohort, parts.partitions)
            upload_id = parts.store.add_upload(device.cohort, device.device_id, body, len(job.images), partition)
            queued = (StoredJob(upload_id, device.cohort, device.device_id, received_at, partition)
                      if parts.by_reference else replace(job, upload_id=upload_id, partition=partition))
            try:
                offered = parts.uploads.offer(queued)
            except BrokerUnavailable as exc:  # stored: a worker's re-read of the store finds it
                log.warning("upload %d stored but not queued: %s", upload_id, exc)
                broker_errors.inc()
                offered = True
            if not offered:
                parts.store.discard_upload(upload_id)
                retry = str(parts.settings.queue_retry_after_s)
                raise ApiError(429, "queue_full", "adaptation queue is full; retry later", {"Retry-After": retry})
            return len(job.images)

        accepted = await run_in_threadpool(accept)
        uploads_total.inc(accepted)
        upload_bytes.inc(len(body))
        parts.fleet.seen(device.device_id, uploaded=accepted)
        return UploadAck(accepted=accepted, queue_depth=max(0, parts.uploads.depth()))

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
        latest = await run_in_threadpool(parts.store.version_number, device.cohort)
        moved = cohort is not None and cohort != device.cohort
        if not moved and since > latest:
            raise ApiError(409, "version_ahead", f"device is at v{since} but the server's latest is v{latest}")
        if not moved and latest <= since and wait > 0:
            await wait_for_version(device.cohort, since, min(wait, parts.settings.max_wait_s))
            device = await run_in_threadpool(parts.store.device, device.device_id) or device  # a move ends the wait too
            moved = cohort is not None and cohort != device.cohort
            latest = await run_in_threadpool(parts.store.version_number, device.cohort)
        moved_from = cohort if moved else None
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
            device_id=device.device_id,
            moved_from=moved_from,
        )
        signature = parts.signer.sign("delta", delta_fields(delta), parts.settings.signature_ttl_s)
        data = pack(delta.model_copy(update={"signature": signature}))
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
        return fleet_report(parts, frozen)

    def control(job: ControlJob) -> None:
        try:
            offered = parts.uploads.offer(job)
        except BrokerUnavailable as exc:
            raise ApiError(503, "broker_unavailable", f"cannot reach the workers: {exc}", {"Retry-After": "5"}) from exc
        if not offered:
            raise ApiError(429, "queue_full", "adaptation queue is full; retry later",
                           {"Retry-After": str(parts.settings.queue_retry_after_s)})

    @app.post("/v1/devices/{device_id}/cohort", response_model=FleetReport, dependencies=[Depends(admin)])
    async def move(device_id: str, body: MoveRequest) -> FleetReport:
        """Move a device to another cohort: it takes that cohort's latest version on its next poll
        (a cohort with no version yet is first seeded at the source parameters)."""
        if await run_in_threadpool(parts.store.device, device_id) is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        if await run_in_threadpool(parts.store.version_number, body.cohort) == 0:
            await run_in_threadpool(control, ControlJob(body.cohort, "seed",
                                                        partition=partition_of(body.cohort, parts.partitions)))
            await wait_for_version(body.cohort, 0, OPERATOR_WAIT_S)
        await run_in_threadpool(parts.store.move_device, device_id, body.cohort)
        wake_all()
        cohort_moves.inc()
        return await run_in_threadpool(fleet_report, parts, frozen)

    @app.post("/v1/devices/{device_id}/permissions", response_model=FleetReport, dependencies=[Depends(admin)])
    def permissions(device_id: str, body: PermissionsRequest) -> FleetReport:
        """Let a device write into its cohort (upload), or make it read-only: it still gets deltas."""
        if parts.store.set_may_upload(device_id, body.may_upload) is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        return fleet_report(parts, frozen)

    @app.post("/v1/cohorts/{cohort}/rollback", response_model=CohortAction, dependencies=[Depends(admin)])
    async def rollback(cohort: CohortPath, body: RollbackRequest) -> CohortAction:
        """Publish an earlier version's tensors again as the next version; adaptation goes on from there.
        The cohort's worker does it, in order with its uploads; this answers once it is published."""
        if await run_in_threadpool(parts.store.version, cohort, body.version) is None:
            raise ApiError(404, "not_found", f"cohort {cohort!r} has no stored version {body.version}")
        before = await run_in_threadpool(parts.store.version_number, cohort)
        await run_in_threadpool(control, ControlJob(cohort, "rollback", body.version,
                                                    partition=partition_of(cohort, parts.partitions)))
        if await wait_for_version(cohort, before, OPERATOR_WAIT_S) <= before:
            raise ApiError(504, "not_done", "the rollback is queued but no worker published it in time",
                           {"Retry-After": "5"})
        return _cohort_action(parts, cohort)

    def set_frozen(cohort: str, value: bool) -> CohortAction:
        parts.store.set_frozen(cohort, value)
        parts.store.add_event(cohort, "frozen" if value else "unfrozen", "by an operator")
        log.warning("cohort %s: %s by an operator", cohort, "frozen" if value else "unfrozen")
        frozen.invalidate()
        return _cohort_action(parts, cohort)

    @app.post("/v1/cohorts/{cohort}/freeze", response_model=CohortAction, dependencies=[Depends(admin)])
    def freeze(cohort: CohortPath) -> CohortAction:
        """Stop adapting the cohort: its devices keep their parameters and spool their uploads."""
        return set_frozen(cohort, True)

    @app.post("/v1/cohorts/{cohort}/unfreeze", response_model=CohortAction, dependencies=[Depends(admin)])
    def unfreeze(cohort: CohortPath) -> CohortAction:
        return set_frozen(cohort, False)

    @app.get("/v1/events", response_model=list[EventOut], dependencies=[Depends(admin)])
    def events_log(limit: int = Query(default=100, ge=1, le=1000)) -> list[EventOut]:
        """Collapse resets, withheld deltas, rollbacks and freezes, newest first."""
        return [EventOut(**vars(event)) for event in parts.store.events(limit)]

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text())

    return app


DASHBOARD = Path(__file__).with_name("dashboard.html")
STORE_RECHECK_S = 2.0  # a long poll re-reads the store this often, in case an announcement was missed
OPERATOR_WAIT_S = 30.0  # an operator's rollback or cohort seed waits this long for the worker


class _FrozenCache:
    """Frozen cohorts as the store has them, re-read at most once a second (uploads check it each time)."""

    def __init__(self, store: Store, ttl_s: float = 1.0) -> None:
        self._store, self._ttl = store, ttl_s
        self._at, self._cohorts = -math.inf, frozenset()

    def contains(self, cohort: str) -> bool:
        if time.monotonic() - self._at > self._ttl:
            self._cohorts = frozenset(self._store.frozen_cohorts())
            self._at = time.monotonic()
        return cohort in self._cohorts

    def invalidate(self) -> None:
        self._at = -math.inf


def _enrolment_ok(configured: str, given: str | None) -> bool:
    """Compared in constant time against every configured token, without stopping at a match."""
    tokens = [t.strip() for t in configured.split(",") if t.strip()]
    supplied = (given or "").encode()
    return sum(hmac.compare_digest(supplied, t.encode()) for t in tokens) > 0


def _cohort_action(parts: ServerParts, cohort: str) -> CohortAction:
    return CohortAction(cohort=cohort, version=parts.store.version_number(cohort),
                        frozen=cohort in parts.store.frozen_cohorts())


def fleet_report(parts: ServerParts, frozen: _FrozenCache) -> FleetReport:
    work = parts.worker_summary()
    devices, cohorts = [], {}
    for record in parts.store.devices():
        view = parts.fleet.get(record.device_id)
        cohorts.setdefault(record.cohort, []).append(record.device_id)
        devices.append(DeviceSummary(
            device_id=record.device_id, name=record.name, cohort=record.cohort, registered_at=record.created_at,
            last_seen=view.last_seen or None, device_version=view.version,
            cohort_version=parts.store.version_number(record.cohort), uploaded_samples=view.uploaded_samples,
            trend=list(view.trend), may_upload=record.may_upload,
        ))
    return FleetReport(
        server=ServerSummary(
            uptime_s=time.time() - parts.started_at, queue_depth=max(0, parts.uploads.depth()),
            pending_samples=work.pending_samples, steps_total=work.steps_total, samples_total=work.samples_total,
            steps_per_s=work.steps_per_s, samples_per_s=work.samples_per_s,
        ),
        cohorts=[CohortSummary(cohort=c, version=parts.store.version_number(c), devices=ids,
                               accepted_samples=parts.store.accepted_samples(c),
                               learnt_samples=parts.store.learnt_samples(c), frozen=frozen.contains(c))
                 for c, ids in sorted(cohorts.items())],
        devices=devices,
    )
