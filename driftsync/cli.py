"""driftsync: continual test-time adaptation for a fleet of edge devices and one cloud teacher.

Devices run a small ONNX student forward-only and upload their informative frames; the server
distils a large teacher into the student's normalization layers and sends small parameter deltas back.
Device commands import no torch, so they run on edge boxes.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from driftsync.config import (
    FILE,
    FRACTION,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    PORT,
    POSITIVE,
    POSITIVE_INT,
    SEVERITY,
    URLS,
    Parser,
    add,
    auto_or,
    bounded,
    checked,
    choice,
    comma_list,
    home,
    log_level,
    optional,
)
from driftsync.errors import UserError
from driftsync.fleet import add_fleet_parser, run_fleet_command
from driftsync.loadtest import add_loadtest_parser
from shared.images import DEFAULT_UPLOAD_CODEC, MIN_UPLOAD_SIDE, UploadEncoding

log = logging.getLogger("driftsync")


def _needs_torch(validate: Callable[[str], None]) -> Callable[[str], None]:
    """Check with torch where it is installed; an API replica (no torch) never uses these flags' values."""

    def check(text: str) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return
        validate(text)

    return check


def _model_spec(text: str) -> None:
    """NAME[:CHECKPOINT] with a known name and, when given, a checkpoint that exists (imports torch)."""
    from server.models.registry import parse_spec

    _, checkpoint = parse_spec(text)
    if checkpoint is not None and not checkpoint.is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")


def _teacher_spec(text: str) -> None:
    """A model spec, or several joined by "+" (an ensemble) whose members agree on classes and input size."""
    from server.models.registry import ENSEMBLE, teacher_info

    for part in text.split(ENSEMBLE):
        _model_spec(part)
    teacher_info(text)


def _prompt_spec(text: str) -> None:
    from server.prompt import parse_prompt

    parse_prompt(text)


def _corruptions(text: str) -> None:
    from driftsync.data.streams import parse_corruptions

    parse_corruptions(text)


def _sinks(text: str) -> None:
    from device_client.sinks import parse_sink

    if text.strip() not in ("", "none"):  # empty: none too (DRIFTSYNC_SINK= switches the stdout default off)
        for spec in filter(None, (s.strip() for s in text.split(","))):
            parse_sink(spec)


def _domain_offset(text: str) -> None:
    if text != "auto" and not text.isdigit():
        raise ValueError(f"expected 'auto' or a whole number, got {text!r}")


def _frame_size(text: str) -> None:
    from device_client.sources import parse_size

    parse_size(text)


def _torch_device(text: str) -> None:
    import torch

    if text == "auto":
        return
    try:
        torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, auto)") from exc


def _role(text: str) -> None:
    from server.options import ROLES

    if text not in ROLES:
        raise ValueError(f"expected one of {', '.join(ROLES)}; got {text!r}")


def _embedded_names() -> list[str]:
    from server.models.embedded import CONFIGS

    return list(CONFIGS)


def _replay_methods() -> tuple[str, ...]:
    from driftsync.replay import COLLABORATIVE, ON_DEVICE

    return COLLABORATIVE + ON_DEVICE


MODEL = checked(_needs_torch(_model_spec), "NAME[:CHECKPOINT]")
TEACHER = checked(_needs_torch(_teacher_spec), "NAME[:CHECKPOINT][+NAME[:CHECKPOINT]...]")
TORCH_DEVICE = checked(_needs_torch(_torch_device), "DEVICE")
PROMPT = checked(_needs_torch(_prompt_spec), "KIND:SIZE")
CORRUPTIONS = checked(_corruptions, "all|none|NAME,...")
UPLOAD_CODEC = checked(UploadEncoding.parse, "auto|webp-lossless|webp:Q|jpeg:Q|png|raw")
UPLOAD_SIDE = bounded(int, MIN_UPLOAD_SIDE)
SETTING = choice("continual", "reset_each_shift", "gradual", "mixed", "correlated")


def _serve_args(p: argparse.ArgumentParser) -> None:
    add(p, "--host", "127.0.0.1", help="address to bind")
    add(p, "--port", 8700, PORT, help="port to bind")
    add(p, "--state-dir", str(home() / "server"), help="SQLite state and caches")
    add(p, "--student", "embedded-student", MODEL, help="student model NAME[:CHECKPOINT]")
    add(p, "--teacher", "embedded-teacher", TEACHER, help="teacher model NAME[:CHECKPOINT], or several joined by + "
        "(an ensemble: their logits averaged)")
    add(p, "--enrolment-token", None, help="token(s) a device must present to register; comma-separated to rotate "
        "(unset: open enrolment)", secret=True)
    add(p, "--admin-token", None, help="token for fleet operations, the fleet API and the dashboard (unset: off)", secret=True)
    add(p, "--insecure-dev", False, bool, help="accept weak tokens (change-me, short, empty, none...) for a local "
        "test; they are refused otherwise")
    add(p, "--max-body-bytes", 8 * 1024 * 1024, POSITIVE_INT, help="largest accepted upload body")
    add(p, "--json-body-bytes", 64 * 1024, POSITIVE_INT, help="largest accepted body of every other route")
    add(p, "--body-timeout-s", 30.0, POSITIVE, help="a request body must have arrived this long after its headers (else 408)")
    add(p, "--device-samples-per-s", 100.0, optional(POSITIVE), help="per-device upload rate limit ('none': off)")
    add(p, "--device-burst-samples", 1000.0, POSITIVE, help="per-device upload burst above the rate")
    add(p, "--new-per-step", 32, POSITIVE_INT, help="new uploads per adaptation step (CEMA: 32)")
    add(p, "--replay-per-step", 96, NONNEGATIVE_INT, help="replayed uploads per step (CEMA: 96)")
    add(p, "--stats-momentum", 0.3, FRACTION, help="momentum of the student's BN statistics re-estimation")
    add(p, "--adapt-teacher", True, bool, help="adapt the teacher's norm layers too")
    add(p, "--teacher-optimizer", "sgd", choice("sgd", "adam"), help="teacher's optimizer: sgd (CEMA) or adam (TENT's CIFAR setting)")
    add(p, "--teacher-lr", 2.5e-4, POSITIVE, help="teacher learning rate (CEMA: 2.5e-4 with SGD)")
    add(p, "--teacher-augmentations", 8, NONNEGATIVE_INT, help="extra augmented views averaged into the teacher's soft labels")
    add(p, "--distil-from", "both", choice("teacher", "ema", "both"), help="soft labels from the adapting teacher, "
        "an EMA of its norm affine parameters (CoTTA's mean teacher), or both averaged (default: measured best)")
    add(p, "--teacher-ema", 0.9, FRACTION, help="EMA momentum per step for --distil-from ema|both")
    add(p, "--student-lr", 2.5e-3, POSITIVE, help="student distillation learning rate (CEMA: 2.5e-3)")
    add(p, "--conv-lr", 2.5e-5, POSITIVE, help="learning the convolutions: each weight's SGD rate is the student's, "
        "capped at this times the tensor's squared source norm, so that small-norm filters turn no faster than large "
        "ones (BENCHMARKS.md, convolution rates capped by the weight's norm)")
    add(p, "--student-steps", "auto", auto_or(POSITIVE_INT), help="SGD passes on each adaptation step's batch; auto: one per "
        "--new-per-step new uploads, rounded up (CEMA: 1 on 32; BENCHMARKS.md, student passes by the new uploads)")
    add(p, "--prompt", None, optional(PROMPT), help="give the student an input prompt: padding:WIDTH or lowres:SIZE")
    add(p, "--prompt-lr", 5e-3, POSITIVE, help="Adam learning rate of the prompt")
    add(p, "--learn", "auto", choice("auto", "norm", "norm+conv", "race", "prompt", "norm+prompt", "norm/prompt"),
        help="what deltas move: auto (norm+conv from devices that normalise by batch statistics, where convolution "
             "deltas fit what a device reads; else norm), norm "
             "(CEMA's affine parameters), norm+conv (and every convolution's weight; deltas about the size of the "
             "weights), race (norm and norm+conv trained side by side, the devices running whichever agrees more "
             "with the teacher), prompt, norm+prompt (jointly), norm/prompt (alternating steps)")
    add(p, "--guarded-push", False, bool, help="hold out every 8th upload and withhold a delta that agrees less "
        "with the teacher on the held-out ones than the devices' current parameters")
    add(p, "--guard-tolerance", 0.0, NONNEGATIVE, help="guarded push: agreement may drop by this much before a delta is withheld")
    add(p, "--collapse-marginal", 0.2, FRACTION, help="reset a cohort to source when the entropy of its predicted-class "
        "histogram falls below this x ln C (0: off)")
    add(p, "--collapse-window", 512, POSITIVE_INT, help="recent predictions on new uploads the collapse check looks at")
    add(p, "--batch-cohorts", 4, POSITIVE_INT, help="cohorts whose steps share one teacher pass (on a 2-core CPU more "
        "than 4 is slower: BENCHMARKS.md)")
    add(p, "--queue-max-jobs", 256, POSITIVE_INT, help="upload batches waiting for the worker before uploads get 429")
    add(p, "--max-pending-samples", 2048, POSITIVE_INT, help="samples the worker holds before it stops taking uploads "
        "(then the queue fills and uploads get 429): bounds memory and delay under overload")
    add(p, "--max-state-bytes", 1 << 30, POSITIVE_INT, help="replay images a worker keeps in memory over all its cohorts; "
        "beyond, the least recently stepped cohorts' states are dropped (each is in the store)")
    add(p, "--step-max-wait-s", 2.0, POSITIVE, help="step with fewer samples once the oldest waited this long")
    add(p, "--step-min-samples", 8, POSITIVE_INT, help="fewest new samples a step takes after waiting (before "
        "waiting, at least 16 for devices that normalise by batch statistics)")
    add(p, "--teacher-log", None, optional(str), help="evaluation aid for replay runs: append one JSON line per step "
        "with the teacher's class for each sample by capture time (no images; stops at 256 MiB)")
    add(p, "--torch-threads", 0, NONNEGATIVE_INT, help="torch intra-op threads (0: torch's default)")
    add(p, "--torch-device", "auto", TORCH_DEVICE, help="where the adaptation engine computes: cpu, cuda, cuda:N, or auto (cuda "
        "when torch sees a GPU)")
    add(p, "--role", "all", checked(_role, "{all,api,worker}"), help="all: one process (HTTP front + worker); api: a stateless HTTP replica (no torch); "
        "worker: an adaptation worker. api and worker need --broker and a shared --store")
    add(p, "--store", None, optional(str), help="postgresql://USER@HOST/DB, or a SQLite file (default: STATE_DIR/driftsync.sqlite)")
    add(p, "--broker", None, optional(str), help="redis://HOST:PORT/DB: Redis Streams between API replicas and workers "
        "(unset: the in-process queue of --role all)")
    add(p, "--partitions", 16, POSITIVE_INT, help="broker partitions (cohorts are hashed to one; fixed for a deployment)")
    add(p, "--lease-ttl-s", 10.0, POSITIVE, help="a worker's partition leases expire this long after its last renewal")
    add(p, "--device-expiry-s", None, optional(POSITIVE), help="remove devices not seen for this long, at least 120 "
        "('none': keep them forever); a device that comes back enrols again")
    add(p, "--worker-name", None, optional(str), help="this worker's name in leases and the consumer group "
        "(default: HOST-PID-RANDOM)")
    add(p, "--rotate-signing-key", False, bool, help="start with a new Ed25519 signing key, announced to "
        "devices signed by the old one (kept in STATE_DIR/signing_key, or in the --store with --broker)")
    add(p, "--ssl-certfile", None, optional(FILE), help="serve https with this PEM certificate (chain)")
    add(p, "--ssl-keyfile", None, optional(FILE), help="the certificate's private key")


def _device_args(p: argparse.ArgumentParser) -> None:
    add(p, "--server", "http://127.0.0.1:8700", URLS,
        help="server base URL, or a comma list of servers (replicas, a gateway and a fallback) to fail over between")
    add(p, "--name", "auto", help="device name shown to operators; 'auto': the hostname, plus the container's "
        "short id inside a container (replicas sharing a hostname stay distinct devices with their own state)")
    add(p, "--state-dir", str(home() / "device" / "{name}"),
        help="identity, cached model, applied delta, spool and status; '{name}' expands to --name")
    add(p, "--cohort", None, optional(str), help="share adaptation state with devices of this cohort")
    add(p, "--enrolment-token", None, optional(str), help="fleet enrolment token", secret=True)
    add(p, "--ca-file", None, optional(FILE), help="PEM CA bundle to verify an https server (e.g. its self-signed certificate)")
    add(p, "--server-key-fingerprint", None, optional(str), help="SHA-256 (hex) of the server's signing key: enrolment "
        "refuses any other ('none': trust the key the server sends at enrolment)")
    add(p, "--delta-max-rel", 50.0, optional(POSITIVE), help="refuse a delta value farther from its source value than this "
        "many times the tensor's scale (max |source|, at least 1; 'none': no bound)")
    add(p, "--source", "embedded", choice("folder", "video", "camera", "stdin", "embedded", "npz", "imagenet-c", "stream"),
        help="folder (watched), video (file or URL, needs driftsync[camera]), camera (index or "
        "rtsp:// URL, needs driftsync[camera]), stdin (raw RGB24 frames), or a labelled replay: embedded, npz, "
        "imagenet-c, stream (a stream file `driftsync replay` wrote)")
    add(p, "--data", None, optional(str), help="the source's path or URL: folder, video file, camera index/URL, npz file, "
        "ImageNet-C root, stream directory")
    add(p, "--frame-size", None, optional(checked(_frame_size, "WIDTHxHEIGHT")), help="stdin: WIDTHxHEIGHT of each raw RGB24 frame")
    add(p, "--reconnect-s", 5.0, optional(POSITIVE), help="camera: reopen a dropped stream after this long ('none': stop)")
    add(p, "--sink", "jsonl:-", checked(_sinks, "SINK,..."),
        help="where predictions go, comma list: jsonl:- (stdout, one JSON line per frame), jsonl:PATH, webhook:URL; none")
    add(p, "--status-file", None, optional(str), help="status JSON rewritten every 2 s (default: STATE_DIR/status.json)")
    add(p, "--health-check", False, bool, help="check that this device's own status file is fresh and running, "
        "exit 0 (healthy) or 1, and do nothing else: the container healthcheck")
    add(p, "--status-port", None, optional(PORT), help="serve the status on http://127.0.0.1:PORT/status (0: any free port)")
    add(p, "--telemetry-every-s", 5.0, optional(POSITIVE), help="send label-free health to the server this often ('none': never)")
    add(p, "--spool-max-bytes", 64 * 1024 * 1024, NONNEGATIVE_INT, help="uploads kept on disk while the server is away; oldest dropped beyond")
    add(p, "--data-key", "x", help="image key in the npz (e.g. x_exact1000; labels: y_exact1000)")
    add(p, "--class-index", None, optional(FILE), help="imagenet-c: the model's classes (wnids) in order, one a line (default: the model's own list)")
    add(p, "--corruptions", "all", CORRUPTIONS, help="comma list, 'all' (CoTTA order) or 'none'")
    add(p, "--severity", 5, SEVERITY, help="corruption severity 1-5 (gradual: the peak)")
    add(p, "--setting", "continual", SETTING, help="continual, reset_each_shift, gradual, mixed or correlated")
    add(p, "--dirichlet", 0.1, POSITIVE, help="label-burst concentration for the correlated setting")
    add(p, "--samples-per-domain", 200, optional(POSITIVE_INT), help="images per domain ('none': all)")
    add(p, "--image-offset", 0, NONNEGATIVE_INT, help="first embedded image index (devices see different scenes)")
    add(p, "--domain-offset", "0", checked(_domain_offset, "N|auto"), help="start the domain cycle this many domains in; 'auto': derived from --name, "
        "so each replica of a fleet drifts differently")
    add(p, "--repeat", False, bool, help="replay sources: loop the stream until stopped")
    add(p, "--batch-size", 16, POSITIVE_INT, help="frames per inference call")
    add(p, "--fps", 30.0, optional(POSITIVE), help="pace replay and file sources at this many frames/s ('none': as fast as possible)")
    add(p, "--lockstep-timeout-s", None, optional(POSITIVE),
        help="evaluation pacing: before each batch, wait up to this long for a delta that includes the uploads so far")
    add(p, "--seed", 0, int, help="corruption seed")
    add(p, "--codec", DEFAULT_UPLOAD_CODEC, UPLOAD_CODEC, help="upload image codec: auto (lossless WebP up to 64 px, "
        "webp:75 above), webp-lossless, webp:Q or jpeg:Q (lossy, quality Q 1-100), png or raw")
    add(p, "--upload-max-side", None, optional(UPLOAD_SIDE), help="downscale uploads so their longer side is at most "
        "this many px (the server scales them back up; 'none': the model's size)")
    add(p, "--upload-batch", 32, POSITIVE_INT, help="samples per upload request (batch normalization: each "
        "batch's selection goes whole, up to 256, and small ones share a request up to this)")
    add(p, "--upload-samples-per-s", None, optional(POSITIVE), help="uplink budget in samples/s")
    add(p, "--upload-bytes-per-s", None, optional(POSITIVE), help="uplink budget in bytes/s")
    add(p, "--upload-share", 0.2, optional(bounded(float, 0.0, 1.0, above=True)),
        help="upload at most this share of frames, the most uncertain ones (the threshold follows the stream; "
        "E_max then does not apply, E_min does; ugs ranks view variance alike); 'none': the entropy window "
        "(or --ugs-keep) alone decides")
    add(p, "--e-max-factor", 0.4, POSITIVE, help="E_max = factor * ln C (CEMA: 0.4; --upload-share none only)")
    add(p, "--dynamic-lambda", 0.6, optional(NONNEGATIVE), help="dynamic E_max factor lambda ('none': static; "
        "--upload-share none only)")
    add(p, "--entropy-ema", 0.8, optional(FRACTION), help="per-batch EMA for the dynamic E_max's mean entropy ('none': mean over "
        "the whole stream; --upload-share none only)")
    add(p, "--e-min-factor", 0.0, NONNEGATIVE, help="E_min = factor * ln C (0: off)")
    add(p, "--redundancy-margin", None, optional(FRACTION), help="EATA cosine margin ('none': off)")
    add(p, "--selection", "cema", choice("cema", "ugs"), help="upload policy: cema (entropy window) or ugs (variance over cheap views)")
    add(p, "--ugs-views", 4, POSITIVE_INT, help="ugs: augmented views per frame (one onnxruntime call)")
    add(p, "--ugs-keep", 0.25, bounded(float, 0.0, 1.0, above=True), help="ugs with --upload-share none: share of each batch uploaded, most uncertain first")
    add(p, "--summary", None, optional(str), help="replay sources: write the replay summary JSON here")
    add(p, "--threads", 0, NONNEGATIVE_INT, help="onnxruntime intra-op threads (0: all cores)")
    add(p, "--normalization", "running", choice("running", "batch", "sampled", "cloud"), help="running (fused, statistics estimated from frames in the background), "
        "batch (each batch by its own statistics, forward only; batches of 16+), sampled (each batch by the statistics of "
        "its first --stats-sample frames, the rest fused at full speed) or cloud (estimated from uploads)")
    add(p, "--stats-sample", 32, POSITIVE_INT, help="sampled: frames of each batch that measure its statistics "
        "(32: at batch 200, 0.96x the static model's throughput and 23.0%% on continual CIFAR-10-C; 100: 0.92x and "
        "21.9%%; a batch of up to 4x this is measured whole; BENCHMARKS.md 'the device's batch statistics travel with its uploads')")
    add(p, "--stats-momentum", 0.2, FRACTION, help="momentum of the device's statistics estimate, per batch")
    add(p, "--stats-budget", None, optional(POSITIVE), help="running: refresh the statistics only while all update work "
        "(statistics refreshes and delta installs) stays within this share of inference time (0.04: 0.92x the static "
        "model's throughput on one core with a delta every 160 frames); 'none' (default): every batch")
    add(p, "--stats-every-s", 2.0, NONNEGATIVE, help="send the device's statistics with an upload at most this often (0: every upload)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    add(p, "--devices", 2, POSITIVE_INT, help="simulated devices, each its own process")
    add(p, "--samples-per-domain", 200, POSITIVE_INT, help="images per domain per device")
    add(p, "--severity", 5, SEVERITY, help="corruption severity 1-5")
    add(p, "--corruptions", "all", CORRUPTIONS, help="comma list, 'all' (CoTTA order) or 'none'")
    add(p, "--out", "driftsync-demo", help="report directory")
    add(p, "--seed", 0, int, help="seed")
    add(p, "--fps", 30.0, optional(POSITIVE), help="frames/s per device ('none': as fast as possible)")
    add(p, "--batch-size", 16, POSITIVE_INT, help="frames per device inference call")
    add(p, "--port", 0, PORT, help="server port (0: a free one)")
    add(p, "--device-stats-momentum", 0.5, FRACTION, help="the devices' --stats-momentum, per batch (faster than the "
        "device default: the demo's domains are only --samples-per-domain frames long)")


def _replay_args(p: argparse.ArgumentParser) -> None:
    add(p, "--dataset", "embedded", choice("embedded", "cifar10", "cifar10-c", "imagenet-c", "folder"), help="embedded, cifar10 (npz x/y), cifar10-c, imagenet-c or folder (class per folder)")
    add(p, "--data", None, optional(str), help="dataset path (npz file, CIFAR-10-C or ImageNet-C root, image folder)")
    add(p, "--data-key", "x", help="npz image key; x_exact1000 selects CIFAR-10's 1000 bit-exact test images")
    add(p, "--class-index", None, optional(FILE), help="imagenet-c, folder: the model's classes (wnids) in order, one a line (default: the model's own list)")
    add(p, "--student", "embedded-student", MODEL, help="device model NAME[:CHECKPOINT]")
    add(p, "--teacher", "embedded-teacher", TEACHER, help="cloud model NAME[:CHECKPOINT], or several joined by + "
        "(an ensemble: their logits averaged)")
    add(p, "--method", "source,bn,tent,cema", comma_list(_replay_methods), help="comma list of cema (the server's default, --learn auto), cema-affine (CEMA as published: affine "
        "parameters only), cema+conv (convolution weights too), prompt, cema+prompt (joint), cema/prompt (alternating), each also with @ugs; "
        "source, bn, tent, eata, cotta, roid, sar")
    add(p, "--prompt", "lowres:8", PROMPT, help="input prompt of the prompt methods: lowres:SIZE or padding:WIDTH")
    add(p, "--setting", "continual", SETTING, help="continual, reset_each_shift, gradual, mixed or correlated")
    add(p, "--severity", 5, SEVERITY, help="corruption severity 1-5 (gradual: the peak)")
    add(p, "--corruptions", "all", CORRUPTIONS, help="comma list, 'all' (CoTTA order) or 'none' (clean)")
    add(p, "--samples-per-domain", 200, optional(POSITIVE_INT), help="images per domain ('none': all)")
    add(p, "--batch-size", 64, POSITIVE_INT, help="frames per batch, for every method")
    add(p, "--devices", 1, POSITIVE_INT, help="devices replaying the stream in one cohort (collaborative methods)")
    add(p, "--seed", 0, int, help="corruption and order seed")
    add(p, "--out", "driftsync-replay", help="report directory")
    add(p, "--fps", None, optional(POSITIVE), help="real-time pacing in frames/s per device ('none': lockstep)")
    add(p, "--lockstep-timeout-s", 60.0, POSITIVE, help="lockstep: longest wait for a delta before the next batch")
    add(p, "--normalization", "sampled", choice("sampled", "batch", "running", "cloud"), help="device normalization for collaborative "
        "methods: sampled (each batch by the statistics of its first 100 frames, the rest fused; batches of up to 100 as "
        "batch), batch, running or cloud (`driftsync device --normalization`)")
    add(p, "--stats-budget", None, optional(POSITIVE), help="the devices' --stats-budget (running normalization): update work "
        "as a share of inference time ('none': no budget)")
    add(p, "--dirichlet", 0.1, POSITIVE, help="label-burst concentration for the correlated setting")
    add(p, "--torch-threads", 0, NONNEGATIVE_INT, help="torch threads for the server and on-device methods (0: torch's default)")
    add(p, "--torch-device", "cpu", TORCH_DEVICE, help="torch device for the on-device references: cpu, cuda, cuda:N or auto")
    add(p, "--server-args", "", help="extra `driftsync serve` flags, e.g. '--teacher-augmentations 8'")
    add(p, "--device-args", "", help="extra `driftsync device` flags, e.g. '--e-min-factor 0.02'")
    add(p, "--health-timeout-s", 300.0, POSITIVE, help="longest wait for the server to load its models and answer /healthz")
    add(p, "--codec", DEFAULT_UPLOAD_CODEC, UPLOAD_CODEC, help="the devices' upload codec, as for `driftsync device --codec`")
    add(p, "--upload-max-side", None, optional(UPLOAD_SIDE), help="the devices' upload downscale, as for `driftsync device`")


def _db_args(p: argparse.ArgumentParser) -> None:
    upgrade = p.add_subparsers(dest="db_command", required=True).add_parser(
        "upgrade", help="apply the store's pending schema migrations (safe to run twice, or from two places at once)")
    add(upgrade, "--store", str(home() / "server" / "driftsync.sqlite"), help="postgresql://... URL or SQLite file")


def _db(args: argparse.Namespace) -> int:
    from server.store import StoreError, upgrade

    try:
        version, applied = upgrade(args.store)
    except StoreError as exc:
        print(f"driftsync db upgrade: {exc}", file=sys.stderr)
        return 1
    print(f"schema at version {version} (applied: {', '.join(map(str, applied)) or 'none, already up to date'})")
    return 0


EXAMPLES: dict[str, tuple[str, str, str]] = {  # name: (one-line help, description, examples)
    "serve": (
        "run the cloud server: teacher, adaptation, deltas (needs driftsync[server])",
        "Run the cloud server. Devices register, upload the samples they select, and long-poll for the "
        "parameter deltas the teacher distils into their normalization layers.",
        "driftsync serve                                      # the embedded pair on 127.0.0.1:8700\n"
        "driftsync serve --host 0.0.0.0 --enrolment-token s3cret --admin-token adm1n\n"
        "driftsync serve --guarded-push --no-adapt-teacher    # or DRIFTSYNC_GUARDED_PUSH=yes",
    ),
    "device": (
        "run a device: the daemon for folders, video, cameras, stdin and replays (no torch)",
        "Run a device: classify frames from a watched folder, a video, a camera, raw frames on stdin or a "
        "labelled replay with onnxruntime, write predictions to the sinks (JSONL on stdout by default), "
        "upload the informative frames and apply the server's deltas.",
        "driftsync device --server http://127.0.0.1:8700      # replay the embedded stream, JSONL on stdout\n"
        "driftsync device --source folder --data /srv/inbox --sink jsonl:/var/log/predictions.jsonl\n"
        "driftsync device --source camera --data 0 --sink webhook:http://127.0.0.1:9000/hook\n"
        "ffmpeg -i in.mp4 -f rawvideo -pix_fmt rgb24 - | driftsync device --source stdin --frame-size 1280x720",
    ),
    "demo": (
        "server + simulated devices on the embedded default, then a report",
        "Start a real server and N device processes on loopback; each device replays the 15 corruptions on "
        "the embedded dataset. Prints a per-domain table and writes report.{json,md,png}.",
        "driftsync demo\n"
        "driftsync demo --devices 3 --samples-per-domain 100 --corruptions fog,contrast,snow",
    ),
    "replay": (
        "evaluate methods side by side on one identical stream, with costs",
        "Replay one labelled stream through several methods (on-device baselines and the collaborative "
        "ones, through real server and device processes) and compare their error and cost.",
        "driftsync replay --method source,bn,tent,cema --samples-per-domain 100\n"
        "driftsync replay --dataset cifar10 --data test.npz --data-key x_exact1000 \\\n"
        "    --student resnet20:resnet20.th --teacher resnet56:resnet56.th",
    ),
    "export": (
        "export the student: ONNX graph, norm side file, statistics graph",
        "Write the student as the device gets it: student.onnx, student.norm.bin (its normalization "
        "parameters) and student.stats.onnx.",
        "driftsync export --out student-onnx\n"
        "driftsync export --student resnet20:resnet20.th --out r20-onnx",
    ),
    "corrupt": (
        "write an ImageNet-C-style tree from a class-per-folder image set",
        "Write <output>/<corruption>/<severity>/<class>/<stem>.JPEG from <input>/<class>/<images>.",
        "driftsync corrupt --input photos/ --output photos-c/ --severities 5\n"
        "driftsync corrupt --input photos/ --output photos-c/ --corruptions fog,snow --severities 1,3,5 --size 224",
    ),
    "db": (
        "the server's store: `db upgrade` applies schema migrations",
        "Maintain the server's store (SQLite file or PostgreSQL): `db upgrade` applies pending schema "
        "migrations, safely run twice or from two places at once.",
        "driftsync db upgrade --store postgresql://driftsync@db/driftsync\n"
        "driftsync db upgrade --store ~/.cache/driftsync/server/driftsync.sqlite",
    ),
    "train": (
        "retrain the embedded default models into DRIFTSYNC_HOME",
        "Retrain the embedded student and teacher from scratch (minutes of CPU). The package ships them "
        "trained; a retrained copy in DRIFTSYNC_HOME/models takes precedence over the shipped one.",
        "driftsync train\n"
        "DRIFTSYNC_HOME=/tmp/dshome driftsync train --models embedded-student",
    ),
}


def command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A subcommand's parser with its help line, description and examples."""
    help_line, description, examples = EXAMPLES[name]
    return sub.add_parser(name, help=help_line, description=description,
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.splitlines()))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="driftsync", description=__doc__,
        epilog="examples:\n  driftsync demo\n  driftsync serve --help\n\n"
               "Every flag can also be set as DRIFTSYNC_<FLAG> (e.g. DRIFTSYNC_PORT=8800); a flag on the "
               "command line wins.\nA switch --x has a --no-x; as a variable it takes yes/no (DRIFTSYNC_X=yes).",
    )
    add(parser, "--log-level", "INFO", log_level, help="logging level (debug also shows tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_args(command(sub, "serve"))
    _device_args(command(sub, "device"))
    _demo_args(command(sub, "demo"))
    _replay_args(command(sub, "replay"))
    add_fleet_parser(sub)
    add_loadtest_parser(sub)
    export = command(sub, "export")
    add(export, "--student", "embedded-student", MODEL, help="student model NAME[:CHECKPOINT]")
    add(export, "--out", "student-onnx", help="output directory")
    from driftsync.data.loaders import add_corrupt_args

    add_corrupt_args(command(sub, "corrupt"))
    train = command(sub, "train")
    add(train, "--models", "embedded-student,embedded-teacher", comma_list(_embedded_names), help="comma list")
    _db_args(command(sub, "db"))
    return parser


# Failures a user can act on: one line, no traceback (--log-level debug adds it).
EXPECTED = (UserError, ValueError, OSError, httpx.HTTPError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    handler = {"serve": _serve, "device": _device, "demo": _demo, "replay": _replay, "export": _export, "train": _train,
               "fleet": run_fleet_command, "loadtest": _loadtest, "corrupt": _corrupt, "db": _db}[args.command]
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print(f"driftsync {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as exc:
        log.debug("driftsync %s failed", args.command, exc_info=True)
        print(f"driftsync {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (UserError, ValueError)) else f"{type(exc).__name__}: {text}"


def _check_bindable(host: str, port: int) -> None:
    """Refuse an address that is taken before minutes of model loading, not after (in one line)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _serve_tokens(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The enrolment and admin tokens, refused when weak unless --insecure-dev (then said loudly)."""
    from server.tokens import GENERATE_HINT, weak_tokens

    problems = weak_tokens({"--enrolment-token": args.enrolment_token, "--admin-token": args.admin_token})
    if problems and not args.insecure_dev:
        raise SystemExit(f"driftsync serve: refusing weak tokens ({'; '.join(problems)}; env DRIFTSYNC_ENROLMENT_TOKEN, "
                         f"DRIFTSYNC_ADMIN_TOKEN). Use random ones of 16+ characters ({GENERATE_HINT}), "
                         "or pass --insecure-dev for a local test.")
    for problem in problems:
        logging.getLogger("driftsync.server").warning("INSECURE (--insecure-dev): weak token %s", problem)

    def unset_if_off(token: str | None) -> str | None:  # with --insecure-dev these still mean "no token"
        return None if token is not None and token.strip().lower() in {"", "none", "off"} else token

    return unset_if_off(args.enrolment_token), unset_if_off(args.admin_token)


def _serve(args: argparse.Namespace) -> int:
    # SIGTERM (docker stop) is a requested stop: uvicorn shuts down gracefully, then raises the signal
    # again once its handlers are gone; this one makes that (or a SIGTERM during startup) exit 0, not 143.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    _check_bindable(args.host, args.port)
    enrolment_token, admin_token = _serve_tokens(args)
    if enrolment_token is None:
        logging.getLogger("driftsync.server").warning("enrolment is open: any client that reaches the server can register")

    from server.options import ROLES, ServeOptions
    from server.serving import serve

    if args.role not in ROLES:
        raise SystemExit(f"driftsync serve: --role must be one of {', '.join(ROLES)}, not {args.role!r}")
    opts = ServeOptions(
        state_dir=Path(args.state_dir), student=args.student, teacher=args.teacher,
        enrolment_token=enrolment_token, admin_token=admin_token, max_body_bytes=args.max_body_bytes,
        json_body_bytes=args.json_body_bytes, body_timeout_s=args.body_timeout_s,
        device_samples_per_s=args.device_samples_per_s, device_burst_samples=args.device_burst_samples,
        new_per_step=args.new_per_step, replay_per_step=args.replay_per_step,
        stats_momentum=args.stats_momentum, adapt_teacher=args.adapt_teacher,
        teacher_optimizer=args.teacher_optimizer, teacher_lr=args.teacher_lr,
        teacher_augmentations=args.teacher_augmentations, distil_from=args.distil_from, teacher_ema=args.teacher_ema,
        student_lr=args.student_lr, conv_lr=args.conv_lr, student_steps=args.student_steps,
        step_max_wait_s=args.step_max_wait_s, step_min_samples=args.step_min_samples, torch_threads=args.torch_threads,
        prompt=args.prompt, learn=args.learn, prompt_lr=args.prompt_lr, guarded_push=args.guarded_push,
        guard_tolerance=args.guard_tolerance, collapse_marginal=args.collapse_marginal,
        collapse_window=args.collapse_window, batch_cohorts=args.batch_cohorts,
        max_pending_samples=args.max_pending_samples, queue_max_jobs=args.queue_max_jobs,
        role=args.role, store=args.store, broker=args.broker, partitions=args.partitions,
        lease_ttl_s=args.lease_ttl_s, worker_name=args.worker_name, torch_device=args.torch_device,
        max_state_bytes=args.max_state_bytes,
        rotate_signing_key=args.rotate_signing_key, device_expiry_s=args.device_expiry_s,
        teacher_log=Path(args.teacher_log) if args.teacher_log else None,
    )
    if args.role == "api":  # a replica imports no torch
        from server.api_role import build_api_app as build_app
    else:
        from server.main import build_app
    try:
        app = build_app(opts)
    except ValueError as exc:
        raise SystemExit(f"driftsync serve: {exc}") from exc
    # Pinned, not left to uvicorn's defaults: idle keep-alive connections close after 5 s and a request's
    # header block may not exceed 16 KiB (h11). Bodies are bounded in size and time by server/limits.py.
    serve(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, http="h11",
                timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _device(args: argparse.Namespace) -> int:
    from device_client.identity import resolve_name, state_dir_for

    args.name = resolve_name(args.name)
    if args.health_check:  # before the heavy imports: a healthcheck runs every few seconds
        from device_client.health import status_problem

        path = Path(args.status_file) if args.status_file else state_dir_for(args.state_dir, args.name) / "status.json"
        problem = status_problem(path, time.time())
        print(f"{args.name}: {problem or 'healthy'}")
        return 1 if problem else 0
    from driftsync.device import run_device

    return run_device(args)


def _loadtest(args: argparse.Namespace) -> int:
    from driftsync.loadtest import run_loadtest_command

    return run_loadtest_command(args)


def _demo(args: argparse.Namespace) -> int:
    from driftsync.demo import DemoOptions, run_demo

    report = run_demo(DemoOptions(
        devices=args.devices, samples_per_domain=args.samples_per_domain, severity=args.severity,
        corruptions=args.corruptions, out=Path(args.out), seed=args.seed, fps=args.fps,
        batch_size=args.batch_size, port=args.port, stats_momentum=args.device_stats_momentum,
    ))
    return 0 if report else 1


def _replay(args: argparse.Namespace) -> int:
    import shlex

    from driftsync.replay import ReplayOptions, run

    opts = ReplayOptions(
        dataset=args.dataset, data=Path(args.data) if args.data else None, data_key=args.data_key,
        class_index=Path(args.class_index) if args.class_index else None, student=args.student, teacher=args.teacher,
        methods=tuple(m.strip() for m in args.method.split(",") if m.strip()), setting=args.setting,
        severity=args.severity, corruptions=args.corruptions, samples_per_domain=args.samples_per_domain,
        batch_size=args.batch_size, devices=args.devices, seed=args.seed, out=Path(args.out), fps=args.fps,
        lockstep_timeout_s=args.lockstep_timeout_s, normalization=args.normalization, stats_budget=args.stats_budget, prompt=args.prompt,
        dirichlet=args.dirichlet,
        torch_threads=args.torch_threads, torch_device=args.torch_device, server_args=tuple(shlex.split(args.server_args)),
        device_args=tuple(shlex.split(args.device_args)), health_timeout_s=args.health_timeout_s, codec=args.codec,
        upload_max_side=args.upload_max_side,
    )
    run(opts)
    return 0


def _export(args: argparse.Namespace) -> int:
    from server.export import export_student
    from server.models.registry import build_model, model_info

    info = model_info(args.student)
    artifact = export_student(build_model(args.student), info.input_shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.onnx").write_bytes(artifact.onnx)
    (out / "student.norm.bin").write_bytes(artifact.norm)
    (out / "student.stats.onnx").write_bytes(artifact.stats_onnx)
    (out / "parameters.json").write_text(json.dumps({k: list(v) for k, v in artifact.parameters.items()}, indent=2))
    print(f"wrote {out}/student.onnx ({len(artifact.onnx)} B), student.norm.bin ({len(artifact.norm)} B) "
          f"and student.stats.onnx ({len(artifact.stats_onnx)} B)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from server.models.embedded import retrain

    for name in args.models.split(","):
        print(retrain(name.strip()))
    return 0


def _corrupt(args: argparse.Namespace) -> int:
    from driftsync.data.loaders import run_corrupt

    return run_corrupt(args)


if __name__ == "__main__":  # `python -m driftsync.cli` as well as `python -m driftsync`
    raise SystemExit(main())
