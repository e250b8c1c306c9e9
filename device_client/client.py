"""The device: provision, predict forward-only, upload the informative samples, apply deltas.

Sources and sinks stay outside this class: anything that yields uint8 image
batches can drive `predict`, which is what the replay runner and the daemon do.
Everything the server sends is checked against the key pinned at enrolment
(device_client.trust); every background thread runs under a supervisor.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_client.deltas import DEFAULT_MAX_REL, DeltaRefused, verify_delta
from device_client.fused import SwappableModel
from device_client.modelcheck import check_inference_model, check_statistics_model
from device_client.runtime import private_model, split_norm_file
from device_client.scoring import (
    cheap_views,
    entropy,
    softmax,
    to_model_input,
    view_variance,
)
from device_client.selection import (
    CemaSelector,
    SelectionConfig,
    ShareBudget,
    UgsConfig,
    UgsSelector,
    UploadBudget,
)
from device_client.spool import Spool
from device_client.state import DeviceStateDir, Identity
from device_client.statistics import (
    BatchStatisticsModel,
    RunningStatistics,
    SampledStatisticsModel,
    StatisticsProbe,
    statistic_names,
)
from device_client.supervisor import Supervisor
from device_client.transport import (
    RETRY_AFTER_MAX_S,
    Backoff,
    ServerApi,
    ServerError,
    server_urls,
)
from device_client.trust import check_delta, check_enrolment, check_key
from device_client.update_budget import UpdateBudget
from device_client.uploader import Uploader
from shared.images import DEFAULT_UPLOAD_CODEC, UploadEncoding
from shared.protocol import (
    Delta,
    RegisterRequest,
    RegisterResponse,
    Signature,
)
from shared.signing import (
    SignatureRefused,
    delta_fields,
    fingerprint,
    follow_rotations,
    model_file_fields,
    verify,
)
from shared.tensors import Tensor

log = logging.getLogger("driftsync.device")
# running: fused inference under running statistics that a background thread estimates from frames;
# batch: each batch normalised by its own statistics (needs batches of about 16 or more);
# cloud: the device measures nothing, the cloud re-estimates statistics from the uploads.
NORMALIZATIONS = ("running", "batch", "sampled", "cloud")
FRESHNESS_KEPT = 100_000
REENROL_BACKOFF_S = (5.0, 600.0)  # re-enrolment attempts: 5 s apart at first, then backing off to 10 min


@dataclass(frozen=True)
class DeviceConfig:
    server: str
    state_dir: Path
    name: str = "device"
    cohort: str | None = None
    enrolment_token: str | None = None
    codec: str = DEFAULT_UPLOAD_CODEC  # see shared.images.UploadEncoding.parse
    upload_max_side: int | None = None  # downscale uploads to this longer side (px) first
    upload_batch: int = 32
    upload_flush_s: float = 0.5
    spool_max_bytes: int = 64 * 1024 * 1024  # selected uploads kept on disk while the server is away
    ca_file: str | None = None  # PEM bundle to verify an https server against (default: the system's CAs)
    upload_samples_per_s: float | None = None
    upload_bytes_per_s: float | None = None
    e_max_factor: float = 0.4
    dynamic_lambda: float | None = 0.6
    entropy_ema: float | None = 0.8
    e_min_factor: float = 0.0
    redundancy_margin: float | None = None
    # at most this share of frames is uploaded, the most uncertain (ShareBudget); None: the policy alone decides
    # (CEMA's entropy window, or ugs_keep of each batch). `driftsync device` defaults to 0.2.
    upload_share: float | None = None
    poll_wait_s: float = 20.0
    threads: int = 0
    normalization: str = "running"  # see NORMALIZATIONS
    selection: str = "cema"  # or "ugs": the most uncertain share of each batch, by view variance
    ugs_views: int = 4
    ugs_keep: float = 0.25
    stats_momentum: float = 0.2
    stats_batch: int = 16
    stats_sample: int = 32  # sampled: frames of each batch that measure its statistics
    # running: statistics refreshes only while all update work (refreshes and delta installs) stays
    # within this share of inference time (UpdateBudget); None: every batch. `driftsync device` defaults to 0.04.
    stats_budget: float | None = None
    stats_every_s: float = 2.0  # how often an upload carries the device's statistics (0: every upload)
    server_key_fingerprint: str | None = None  # SHA-256 of the server's public key; None: trust it on first use
    delta_max_rel: float | None = DEFAULT_MAX_REL  # delta values within this many times their tensor's scale of the source
    retry_after_cap_s: float = RETRY_AFTER_MAX_S  # the longest a server's Retry-After may park a thread
    backoff_cap_s: float = 30.0  # the longest wait between retries when the server gave no Retry-After

    def __post_init__(self) -> None:
        UploadEncoding.parse(self.codec, self.upload_max_side)  # a bad setting fails at start-up, not in a thread
        if self.selection not in ("cema", "ugs"):
            raise ValueError(f"selection must be cema or ugs, not {self.selection!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {self.normalization!r}")


@dataclass
class HealthWindow:
    """Label-free health since the last telemetry report: mean entropy and confidence."""

    frames: int = 0
    entropy_sum: float = 0.0
    confidence_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def add(self, ent: np.ndarray, confidence: np.ndarray) -> None:
        """Only frames with a finite prediction enter the window: NaN must not reach telemetry."""
        finite = np.isfinite(ent) & np.isfinite(confidence)
        self.frames += int(finite.sum())
        self.entropy_sum += float(ent[finite].sum())
        self.confidence_sum += float(confidence[finite].sum())


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    uploaded: np.ndarray
    version: int


@dataclass
class DeltaLog:
    applied: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by reason: unsigned, bad_signature, expired, stale...
    bytes: int = 0
    # per uploaded sample: capture -> first delta with it; both bounded, so a device that runs for
    # months (or whose server is away) does not grow them without end
    freshness_s: deque[float] = field(default_factory=lambda: deque(maxlen=FRESHNESS_KEPT))
    newest_upload_at: float = 0.0  # capture time of the newest upload the applied parameters include
    awaiting: deque[float] = field(default_factory=lambda: deque(maxlen=FRESHNESS_KEPT))  # not yet in a delta

    def record(self, newest_upload_at: float, now: float) -> None:
        """A delta includes every upload captured up to its newest (the server steps in arrival order)."""
        while self.awaiting and self.awaiting[0] <= newest_upload_at:
            self.freshness_s.append(max(0.0, now - self.awaiting.popleft()))
        self.newest_upload_at = max(self.newest_upload_at, newest_upload_at)


class DeviceClient:
    def __init__(self, cfg: DeviceConfig, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.state = DeviceStateDir(cfg.state_dir)
        self.deltas = DeltaLog()
        self.downloaded_model = False
        self.forward_samples = 0  # inference passes; the statistics graph's are counted by `_running`
        self.frames = 0  # frames predicted
        self._window = HealthWindow()
        self._window_lock = threading.Lock()
        self._stop = stop or threading.Event()
        self._apply_lock = threading.RLock()  # no delta lands after stop() returns; re-enrolment takes it too
        self._running: RunningStatistics | None = None  # the `running` normalization's estimate
        self.supervisor = Supervisor()
        self.models_refused: Counter[str] = Counter()
        self.reenrolments = 0
        self.reenrolments_failed: Counter[str] = Counter()
        self._held: Signature | None = None  # signature of the delta the parameters come from
        self._enrol_lock = threading.Lock()
        self._next_enrol_at = 0.0
        self._enrol_backoff = Backoff(*REENROL_BACKOFF_S)

    # -- provisioning -------------------------------------------------------------
    def start(self) -> DeviceClient:
        """Provision (or reuse the saved identity and cached model: then no network is
        needed, and a device whose server is away starts predicting at once)."""
        identity = self.state.load_identity(self.cfg.server)
        api = self._plain_api(identity.token if identity else None)
        if identity is None:
            reply = self._until_reachable("register", lambda: api.register(self._register_request()))
            key = check_enrolment(reply, None, self.cfg.server_key_fingerprint, time.time())
            identity = Identity(
                server=",".join(server_urls(self.cfg.server)), device_id=reply.device_id, token=reply.token,
                cohort=reply.cohort, model=reply.model, server_key=key,
            )
            self.state.save_identity(identity)
            log.info("registered as %s in cohort %s; server key %s", identity.device_id, identity.cohort,
                     fingerprint(key))
        elif identity.server_key is None:  # enrolled before deltas were signed: pin the key now
            info = self._until_reachable("fetch the signing key", api.signing_key)
            identity = identity.model_copy(update={"server_key": check_key(info.key, self.cfg.server_key_fingerprint)})
            self.state.save_identity(identity)
            log.warning("pinned the server key %s on first use", fingerprint(info.key))
        else:  # the key pinned earlier must be the one the operator names now, if any
            check_key(identity.server_key, self.cfg.server_key_fingerprint)
        self.identity = identity
        self.descriptor = identity.model
        onnx_bytes = self._model_file(api, "student.onnx", self.descriptor.onnx_sha256)
        norm = self._model_file(api, "student.norm.bin", self.descriptor.norm_sha256)
        stats_onnx = self._model_file(api, "student.stats.onnx", self.descriptor.stats_sha256)
        api.close()
        check_inference_model(onnx_bytes, self.descriptor)
        check_statistics_model(stats_onnx, self.descriptor)
        self.onnx_path = private_model(self.state.root / "runtime" / "inference", onnx_bytes)
        stats_path = private_model(self.state.root / "runtime" / "statistics", stats_onnx)
        self.source_params = split_norm_file(norm, self.descriptor.parameters)
        params, version = self._saved_parameters()
        batch_norm = self.cfg.normalization in ("batch", "sampled")
        if self.cfg.normalization == "sampled":
            self.model = SampledStatisticsModel(self.onnx_path, stats_path, params, version, self.cfg.stats_sample,
                                                self.cfg.threads)
        elif batch_norm:
            self.model = BatchStatisticsModel(stats_path, params, version, self.cfg.threads)
        else:
            self.model = fused = SwappableModel(self.onnx_path, params, version, self.cfg.threads)
            if self.cfg.normalization == "running":
                self._running = RunningStatistics(
                    fused, StatisticsProbe(stats_path, self.cfg.threads, params), self.cfg.stats_batch,
                    self.cfg.stats_momentum, UpdateBudget(self.cfg.stats_budget))
        self.selector: CemaSelector | UgsSelector
        if self.cfg.selection == "ugs":
            budget = None if self.cfg.upload_share is None else ShareBudget(self.cfg.upload_share)
            self.selector = UgsSelector(UgsConfig(self.cfg.ugs_views, self.cfg.ugs_keep), budget)
        else:
            self.selector = CemaSelector(
                SelectionConfig(
                    num_classes=self.descriptor.num_classes,
                    e_max_factor=self.cfg.e_max_factor,
                    dynamic_lambda=self.cfg.dynamic_lambda,
                    entropy_ema=self.cfg.entropy_ema,
                    e_min_factor=self.cfg.e_min_factor,
                    redundancy_margin=self.cfg.redundancy_margin,
                    upload_share=self.cfg.upload_share,
                )
            )
        self.uploader = Uploader(
            self.open_api(),
            UploadBudget.from_rates(self.cfg.upload_samples_per_s, self.cfg.upload_bytes_per_s),
            Spool(self.state.root / "spool", self.cfg.spool_max_bytes),
            encoding=UploadEncoding.parse(self.cfg.codec, self.cfg.upload_max_side),
            batch_size=self.cfg.upload_batch,
            flush_s=self.cfg.upload_flush_s,
            stats_source=self._current_statistics if self.cfg.normalization == "running" else None,
            stats_every_s=self.cfg.stats_every_s,
            batch_statistics=batch_norm,
            backoff=self._backoff(),
            supervisor=self.supervisor,
        )
        self.uploader.start()
        if self._running is not None:
            self._statistics = self.supervisor.thread("statistics", lambda: self._running.loop(self._stop), self._stop)
            self._statistics.start()
        self._poller = self.supervisor.thread("delta-poller", self._poll_deltas, self._stop)
        self._poller.start()
        log.info("device ready at v%d", version)
        return self

    def open_api(self, timeout: float = 30.0) -> ServerApi:
        """A client for one thread, under the device's identity (it follows a re-enrolment).
        TLS is checked against `ca_file` when the server's certificate is not from a public CA
        (a self-signed one, say)."""
        return ServerApi(self.cfg.server, lambda: self.identity.token, timeout=timeout,
                         verify=self.cfg.ca_file or True, on_unknown_token=self._enrol_again)

    def _plain_api(self, token: str | None = None, timeout: float = 30.0) -> ServerApi:
        """A client for provisioning, enrolment and the signing key."""
        return ServerApi(self.cfg.server, token, timeout=timeout, verify=self.cfg.ca_file or True)

    def _backoff(self) -> Backoff:
        return Backoff(cap_s=self.cfg.backoff_cap_s, retry_after_cap_s=self.cfg.retry_after_cap_s)

    def _register_request(self) -> RegisterRequest:
        return RegisterRequest(device_name=self.cfg.name, cohort=self.cfg.cohort, enrolment_token=self.cfg.enrolment_token)

    def _saved_parameters(self) -> tuple[dict[str, np.ndarray], int]:
        """The source values with the last applied delta over them. That delta was fully checked
        when it arrived; its signature is checked again (not its expiry). A delta of another
        cohort (the device enrolled again since) keeps its values but not its version line."""
        saved = self.state.load_delta()
        if saved is None:
            return self.source_params, 0
        try:
            verify(self.identity.server_key, "delta", delta_fields(saved), saved.signature, None)
            params = verify_delta(saved, 0, self.descriptor, saved.cohort, source=self.source_params,
                                  max_rel=self.cfg.delta_max_rel)
        except (DeltaRefused, SignatureRefused) as exc:
            log.warning("ignoring the saved delta: %s", exc)
            return self.source_params, 0
        self._held = saved.signature
        return self.source_params | params, saved.new_version if saved.cohort == self.identity.cohort else 0

    def _until_reachable(self, what: str, call):
        """Retry while the server is unreachable or busy; a refusal (4xx) is final."""
        backoff = self._backoff()
        while True:
            try:
                return call()
            except ServerError as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                    raise
                delay = backoff.next_delay(exc.retry_after)
                log.warning("cannot %s yet (%s); retrying in %.1fs", what, exc, delay)
                if self._stop.wait(delay):
                    raise

    def _model_file(self, api: ServerApi, part: str, sha256: str) -> bytes:
        """Use the cached file when its hash matches the signed descriptor, so a restart needs no
        download. A download must carry the server's signature too; one that does not is refused,
        counted, and downloaded again after a backoff."""
        path = self.state.model_file(part)
        if path.exists():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            log.warning("cached %s does not match its hash; downloading again", part)
        backoff = self._backoff()
        while True:
            data, signature = self._until_reachable(f"download {part}", lambda: api.download(part, sha256))
            try:
                self._under_pinned_key(lambda signature=signature: verify(
                    self.identity.server_key, "model_file", model_file_fields(part, sha256), signature, time.time()))
                break
            except SignatureRefused as exc:
                self.models_refused[exc.reason] += 1
                delay = backoff.next_delay()
                log.warning("refused %s: %s; downloading again in %.1fs", part, exc, delay)
                if self._stop.wait(delay):
                    raise
        self.state.save_model_file(part, data)
        self.downloaded_model = True
        return data

    # -- trust ---------------------------------------------------------------------------
    def _under_pinned_key(self, check: Callable[[], None]) -> None:
        """Run a signature check; when the signer is a key the device does not know, follow the
        server's signed key rotation (if there is one) and check once more."""
        try:
            check()
        except SignatureRefused as exc:
            if exc.reason != "unknown_key" or not self._follow_rotation():
                raise
            check()

    def _follow_rotation(self) -> bool:
        """Pin the server's new key when a chain of rotations signed by the pinned key leads to it."""
        api = self._plain_api(timeout=10.0)
        try:
            info = api.signing_key()
            key = follow_rotations(self.identity.server_key, info.key, info.rotations)
        except (ServerError, SignatureRefused) as exc:
            log.warning("cannot follow the server's key rotation: %s", exc)
            return False
        finally:
            api.close()
        if key == self.identity.server_key:
            return False
        log.warning("server key rotated: now pinned to %s", fingerprint(key))
        self.identity = self.identity.model_copy(update={"server_key": key})
        self.state.save_identity(self.identity)
        return True

    def _enrol_again(self, failed_token: str | None) -> None:
        """The server answered "unknown device token": it lost its state. Enrol again under the
        pinned key (the spool and the parameters are kept) and start the new cohort's version
        line. Any thread may call this; one attempt runs at a time, and failed attempts back off
        (each one registers a device on the server: one that lost its key too is refused for good)."""
        with self._enrol_lock:
            if failed_token != self.identity.token or time.monotonic() < self._next_enrol_at:
                return
            self._next_enrol_at = time.monotonic() + self._enrol_backoff.next_delay()
            log.warning("the server no longer knows device %s; enrolling again", self.identity.device_id)
            api = self._plain_api(timeout=10.0)
            try:
                reply = api.register(self._register_request())
                self._check_reenrolment(reply)
            except (ServerError, SignatureRefused) as exc:
                self.reenrolments_failed[getattr(exc, "reason", "server_error")] += 1
                log.warning("enrolling again failed: %s", exc)
                return
            finally:
                api.close()
            self._enrol_backoff.reset()
            with self._apply_lock:
                self._install({}, reply.version, new_line=True)
                self.identity = self.identity.model_copy(update={
                    "device_id": reply.device_id, "token": reply.token, "cohort": reply.cohort})
                self.state.save_identity(self.identity)
                self._held = None
            self.reenrolments += 1
            log.warning("enrolled again as %s in cohort %s at v%d", reply.device_id, reply.cohort, reply.version)

    def _check_reenrolment(self, reply: RegisterResponse) -> None:
        self._under_pinned_key(lambda: check_enrolment(reply, self.identity.server_key, None, time.time()))
        if reply.model != self.descriptor:
            raise SignatureRefused("model_changed", "the server now serves another model; restart the device")

    # -- inference ------------------------------------------------------------------
    @property
    def stats_updates(self) -> int:
        return 0 if self._running is None else self._running.budget.refreshes

    def predict(self, images: np.ndarray, captured_at: np.ndarray | None = None) -> Predictions:
        x = to_model_input(images)
        statistics = None  # what a batch-statistics device normalised this batch with
        if isinstance(self.model, BatchStatisticsModel):
            logits, version, statistics = self.model.run_measured(x)
        else:
            logits, version = self.model.run(x) if self._running is None else self._running.run(x, images)
        self.forward_samples += len(images)
        self.frames += len(images)
        probs = softmax(logits)
        ent = entropy(probs)
        confidence = probs.max(axis=1)
        with self._window_lock:
            self._window.add(ent, confidence)
        if self.cfg.selection == "ugs":
            views = self.cfg.ugs_views
            view_logits, _ = self.model.run(to_model_input(cheap_views(images, views)))  # one call for all views
            self.forward_samples += views * len(images)
            keep = self.selector.select(view_variance(softmax(view_logits).reshape(views, len(images), -1)))
        else:
            keep = self.selector.select(probs, ent)
        if keep.any():
            now = np.full(len(images), time.time()) if captured_at is None else captured_at
            self.deltas.awaiting.extend(now[keep].tolist())
            self.uploader.offer(images[keep], ent[keep], now[keep], version, statistics)
        return Predictions(probs.argmax(axis=1), confidence, ent, keep, version)

    # -- local statistics ---------------------------------------------------------------
    def _current_statistics(self) -> dict[str, Tensor]:
        """Rides on an upload every few seconds, so the cloud distils under the device's own statistics."""
        params = self.model.params
        return {name: Tensor.from_numpy(params[name]) for name in statistic_names(self.descriptor.parameters)}

    # -- deltas ---------------------------------------------------------------------
    def apply_delta(self, delta: Delta) -> bool:
        """Verify, install and persist; a refusal is logged and counted, never raised."""
        with self._apply_lock:
            if self._stop.is_set():
                return False
            try:
                self._under_pinned_key(lambda: check_delta(delta, self.identity.server_key, self.identity.device_id,
                                                           self.identity.cohort, self._held, time.time()))
                params = verify_delta(delta, self.model.version, self.descriptor, self.identity.cohort,
                                      source=self.source_params, max_rel=self.cfg.delta_max_rel)
            except (SignatureRefused, DeltaRefused) as exc:
                self.deltas.refused[exc.reason] += 1
                log.warning("refused delta v%d for cohort %s: %s", delta.new_version, delta.cohort, exc)
                return False
            moved = delta.cohort != self.identity.cohort
            if not self._install(params, delta.new_version, new_line=moved):
                self.deltas.refused["stale"] += 1
                return False
            self.state.save_delta(delta)
            self._held = delta.signature
            if moved:
                log.info("moved from cohort %s to %s, now at its v%d", self.identity.cohort, delta.cohort, delta.new_version)
                self.identity = self.identity.model_copy(update={"cohort": delta.cohort})
                self.state.save_identity(self.identity)
            self.deltas.applied += 1
            self.deltas.record(delta.newest_upload_at, time.time())
            return True

    def _install(self, params: dict[str, np.ndarray], version: int, new_line: bool = False) -> bool:
        """In `running` mode a delta's install is spent from the statistics' budget."""
        install = self.model.install if self._running is None else self._running.install
        return install(params, version, new_line=new_line)

    def wait_for_delta_covering(self, captured_at: float, timeout: float) -> bool:
        """Block until the parameters include uploads captured up to `captured_at` (evaluation pacing)."""
        deadline = time.monotonic() + timeout
        while self.deltas.newest_upload_at < captured_at:
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(0.01)
        return True

    def _poll_deltas(self) -> None:
        api = self.open_api()
        backoff, refusals = self._backoff(), self._backoff()
        try:
            while not self._stop.is_set():
                try:
                    delta, size = api.poll_delta(self.identity.cohort, self.model.version, self.cfg.poll_wait_s)
                    backoff.reset()
                except ServerError as exc:
                    delay = backoff.next_delay(exc.retry_after)
                    log.warning("delta poll failed (%s); retrying in %.1fs", exc, delay)
                    self._stop.wait(delay)
                    continue
                if delta is not None:
                    self.deltas.bytes += size
                if delta is None or self.apply_delta(delta):
                    refusals.reset()
                else:  # refused, and whoever sent it would send it again at once: back off
                    self._stop.wait(refusals.next_delay())
        finally:
            api.close()

    def stop(self, flush_timeout: float = 10.0) -> None:
        self.uploader.close(flush_timeout)
        self._stop.set()
        with self._apply_lock:  # waits for a delta being installed right now
            pass
        if self._running is not None:  # onnxruntime must not be mid-call when the process exits
            self._running.wake()
            self._statistics.join(timeout=10)

    def _selection_thresholds(self) -> dict:
        budget = self.selector.budget
        shared = {} if budget is None else {"upload_share": budget.share, "threshold": budget.threshold}
        if isinstance(self.selector, UgsSelector):
            return {"policy": "ugs"} | (shared or {"keep": self.selector.cfg.keep})
        if budget is None:
            return {"policy": "cema", "e_max": self.selector.e_max(), "e_min": self.selector.e_min}
        return {"policy": "cema", "e_min": self.selector.e_min} | shared

    def take_health_window(self) -> HealthWindow:
        """The health since the last call, for a telemetry report; starts a new window."""
        with self._window_lock:
            window, self._window = self._window, HealthWindow()
        return window

    def status(self) -> dict:
        up = self.uploader.stats
        spool = self.uploader.spool
        return {
            "device_id": self.identity.device_id,
            "name": self.cfg.name,
            "cohort": self.identity.cohort,
            "version": self.model.version,
            "frames": self.frames,
            "model_downloaded": self.downloaded_model,
            "uploads": {
                "offered": up.offered, "sent": up.sent, "sent_bytes": up.sent_bytes, "requests": up.requests,
                "retries": up.retries, "queued": self.uploader.queued(), "spooled": spool.samples(),
                "spooled_batches": len(spool), "dropped": self.uploader.dropped(),
                "dropped_queue_full": up.dropped_queue_full, "dropped_budget": up.dropped_budget,
                "dropped_spool_full": spool.dropped_samples, "refused": up.refused,
            },
            "selection": dict(self.selector.counts) | self._selection_thresholds(),
            "statistics": {"normalization": self.cfg.normalization, "updates": 0} | (
                {} if self._running is None else self._running.summary()),
            "passes": {"forward_samples": self.forward_samples + (0 if self._running is None else self._running.measured),
                       "backward_samples": 0},
            "deltas": {"applied": self.deltas.applied, "refused": dict(self.deltas.refused), "bytes": self.deltas.bytes},
            "trust": {"server_key_fingerprint": fingerprint(self.identity.server_key),
                      "models_refused": dict(self.models_refused), "reenrolments": self.reenrolments,
                      "reenrolments_failed": dict(self.reenrolments_failed)},
            "threads": self.supervisor.health(),
        }
