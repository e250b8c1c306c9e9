"""`driftsync device`: the device daemon, assembled from its command-line options.

Torch-free: this is what `pip install driftsync[device]` runs on an edge box.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from device_client.client import DeviceClient, DeviceConfig
from device_client.daemon import run_live, stop_on_signals
from device_client.identity import state_dir_for
from device_client.replay import run_replay
from device_client.sinks import open_sink
from device_client.sources import (
    FolderSource,
    OpenCvSource,
    RawStdinSource,
    parse_size,
)
from device_client.state import atomic_write
from device_client.status import StatusReporter
from driftsync.data import loaders, streams
from driftsync.data.labels import class_order
from shared.protocol import ModelDescriptor

log = logging.getLogger("driftsync.device")


def run_device(args: argparse.Namespace) -> int:
    """Provision, run the source into the sinks until it ends or a signal stops it, flush."""

    log = logging.getLogger("driftsync.device")
    state_dir = state_dir_for(args.state_dir, args.name)
    cfg = DeviceConfig(
        server=args.server, state_dir=state_dir, name=args.name, cohort=args.cohort,
        enrolment_token=args.enrolment_token, ca_file=args.ca_file, codec=args.codec, upload_batch=args.upload_batch,
        upload_max_side=args.upload_max_side,
        upload_samples_per_s=args.upload_samples_per_s, upload_bytes_per_s=args.upload_bytes_per_s,
        spool_max_bytes=args.spool_max_bytes,
        e_max_factor=args.e_max_factor, dynamic_lambda=args.dynamic_lambda, entropy_ema=args.entropy_ema,
        e_min_factor=args.e_min_factor, redundancy_margin=args.redundancy_margin, upload_share=args.upload_share,
        threads=args.threads,
        selection=args.selection, ugs_views=args.ugs_views, ugs_keep=args.ugs_keep,
        normalization=args.normalization, stats_sample=args.stats_sample, stats_momentum=args.stats_momentum, stats_budget=args.stats_budget,
        stats_every_s=args.stats_every_s, server_key_fingerprint=args.server_key_fingerprint,
        delta_max_rel=args.delta_max_rel,
    )
    stop = stop_on_signals()
    client = DeviceClient(cfg, stop=stop)  # a signal during provisioning ends its retries too
    try:
        client.start()
    except Exception as exc:  # noqa: BLE001 (a refusal or a stop while provisioning: say why and exit)
        if stop.is_set():  # asked to stop (docker compose down) before the server answered: a clean exit
            log.info("stopped while provisioning: %s", exc)
            return 0
        log.error("device not started: %s", exc)
        return 1
    specs = [] if args.sink.strip() == "none" else [spec.strip() for spec in args.sink.split(",") if spec.strip()]
    sinks = [open_sink(spec, client.supervisor) for spec in specs]
    reporter = StatusReporter(
        client, Path(args.status_file) if args.status_file else state_dir / "status.json",
        telemetry_every_s=args.telemetry_every_s, port=args.status_port,
    ).start()
    try:
        if args.source in REPLAY_SOURCES:
            chunks, total = _replay_chunks(args, client.descriptor)
            summary = run_replay(client, chunks, fps=args.fps, sinks=sinks, total=total,
                                 lockstep_timeout_s=args.lockstep_timeout_s, stop=stop, repeat=args.repeat)
            if args.summary:
                atomic_write(Path(args.summary), json.dumps(summary).encode())
        else:
            frames = run_live(client, _live_source(args, client.descriptor, state_dir).frames(stop), sinks, stop,
                              fps=args.fps if args.source == "video" else None)
            log.info("source ended after %d frames", frames)
    finally:
        client.stop()  # flushes uploads into the spool and sends what it can
        for sink in sinks:
            sink.close()
        reporter.stop()
    status = client.status()
    log.info("stopped at v%d: %d uploaded, %d spooled, %d deltas applied", status["version"],
             status["uploads"]["sent"], status["uploads"]["spooled"], status["deltas"]["applied"])
    return 0


REPLAY_SOURCES = ("embedded", "npz", "imagenet-c", "stream")


def _domain_offset(text: str, name: str, domains: int) -> int:
    """'auto': a stable offset from the device's name, so replicas of one fleet drift differently:
    a name ending in -N (device-3) starts N domains in, any other name at a hash of it."""
    if text != "auto":
        return int(text)
    stem, _, number = name.rpartition("-")
    index = int(number) if stem and number.isdigit() else int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return index % max(domains, 1)


def _replay_chunks(args: argparse.Namespace, descriptor: ModelDescriptor) -> tuple[Iterable[streams.Chunk], int]:
    """A labelled stream, as `driftsync replay` builds it, for evaluation and simulated fleets."""
    if args.source == "stream":
        if not args.data:
            raise SystemExit("--source stream needs --data DIR (a stream `driftsync replay` wrote)")
        return streams.read_stream(Path(args.data)), streams.stream_file_length(Path(args.data))
    corruptions = streams.parse_corruptions(args.corruptions)
    corruptions = streams.rotate(corruptions, _domain_offset(args.domain_offset, args.name, len(corruptions)))
    count = args.samples_per_domain
    if args.source == "imagenet-c":
        if not args.data:
            raise SystemExit("--source imagenet-c needs --data ROOT (<corruption>/<severity>/<wnid>/*.JPEG)")
        wnids = class_order(descriptor.class_names, Path(args.class_index) if args.class_index else None)
        source, samples = loaders.imagenet_c_source(Path(args.data), streams.schedule(args.setting, corruptions, args.severity),
                                                    wnids, count, args.seed, descriptor.input_shape[1])
    else:
        if args.source == "embedded":
            images, labels = streams.embedded_base(count or 200, args.image_offset)
        else:
            if not args.data:
                raise SystemExit("--source npz needs --data PATH")
            images, labels = streams.npz_base(Path(args.data), count, key=args.data_key,
                                              label_key=streams.label_key_for(args.data_key))
        source, samples = streams.corrupting(images, labels, args.seed), len(labels)
    chunks = streams.stream(args.setting, source, corruptions, args.severity, args.batch_size, seed=args.seed,
                            dirichlet=args.dirichlet)
    return chunks, streams.stream_length(args.setting, samples, corruptions, args.severity)


def _live_source(args: argparse.Namespace, descriptor, state_dir: Path):

    size = descriptor.input_shape[1]
    if args.source == "folder":
        if not args.data:
            raise SystemExit("--source folder needs --data DIR (the folder to watch)")
        return FolderSource(Path(args.data), size, batch=args.batch_size, seen_path=state_dir / "folder_seen.txt")
    if args.source in ("video", "camera"):
        if not args.data:
            raise SystemExit(f"--source {args.source} needs --data (a file, an rtsp:// URL or a camera index)")
        return OpenCvSource(args.data, size, batch=1 if args.source == "camera" else args.batch_size,
                            reconnect_s=args.reconnect_s if args.source == "camera" else None)
    if args.source == "stdin":
        if not args.frame_size:
            raise SystemExit("--source stdin needs --frame-size WIDTHxHEIGHT")
        return RawStdinSource(parse_size(args.frame_size), size, batch=1)
    raise SystemExit(f"unknown --source {args.source!r}")
