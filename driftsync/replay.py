"""`driftsync replay`: several methods on one identical stream, one table with what each cost.

The stream is built once and written to a stream file, so that every method sees
the same frames in the same order and batches:
- collaborative methods (`cema`) run as they would in production: `driftsync serve`
  and N `driftsync device` processes over HTTP, onnxruntime on the device;
- on-device references (`source`, `bn`, `tent`, `eata`, `cotta`, `roid`, `sar`) run in this
  process in torch, with full backprop, as a device that could afford it would. Their
  published per-dataset settings follow the student's class count (server/baselines.py,
  `preset_for`); EATA's Fisher regulariser is computed on clean images of the stream's base
  set where the dataset has one (embedded, cifar10, folder), and is left out, with a warning
  and `fisher_images: 0` in the report, where it has none (cifar10-c, imagenet-c).
Online error throughout: each prediction is scored with the parameters its device had
when it made it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from driftsync.config import home
from driftsync.data import streams
from driftsync.data.corruptions import constants_for_size, frost_source
from driftsync.data.labels import check_labels, class_order
from driftsync.processes import mean_curve, run_fleet
from driftsync.progress import bar
from driftsync.report import (
    build_report,
    markdown_methods,
    read_teacher_log,
    teacher_gap,
    with_teacher_gap,
    write_methods_report,
)
from shared.images import DEFAULT_UPLOAD_CODEC

if TYPE_CHECKING:
    import torch

DATASETS = ("embedded", "cifar10", "cifar10-c", "imagenet-c", "folder")
# "cema" runs the server's default (--learn auto: norm+conv for these students and batch-statistics
# devices); "cema-affine" is CEMA as published; "cema-race" the two tracks side by side
LEARNS = {"cema": "auto", "cema-affine": "norm", "cema+conv": "norm+conv", "cema-race": "race", "prompt": "prompt",
          "cema+prompt": "norm+prompt", "cema/prompt": "norm/prompt"}
UGS = "@ugs"  # suffix: the same method with uncertainty-guided sampling on the device
COLLABORATIVE = tuple(LEARNS) + tuple(f"{m}{UGS}" for m in LEARNS)
ON_DEVICE = ("source", "bn", "tent", "eata", "cotta", "roid", "sar")
TEACHER_LOG = Path("server-state") / "teacher-log.jsonl"  # in a collaborative run's work dir (cleared per run)

log = logging.getLogger("driftsync.replay")


@dataclass(frozen=True)
class ReplayOptions:
    dataset: str = "embedded"
    data: Path | None = None
    data_key: str = "x"
    class_index: Path | None = None  # class folders: the model's classes (wnids), one a line; default: the model's own list
    student: str = "embedded-student"
    teacher: str = "embedded-teacher"
    methods: tuple[str, ...] = ("source", "bn", "tent", "cema")
    setting: str = "continual"
    severity: int = 5
    corruptions: str = "all"
    samples_per_domain: int | None = 200
    batch_size: int = 64
    devices: int = 1
    seed: int = 0
    out: Path = Path("driftsync-replay")
    fps: float | None = None  # None: lockstep pacing
    lockstep_timeout_s: float = 60.0
    normalization: str = "sampled"
    stats_budget: float | None = None  # the devices' --stats-budget (running normalization); None: no budget
    prompt: str = "lowres:8"  # the input prompt of the prompt methods
    dirichlet: float = 0.1
    torch_threads: int = 0
    torch_device: str = "cpu"  # where the on-device references compute (cuda: CoTTA's 32 views are slow on CPU)
    server_args: tuple[str, ...] = ()
    device_args: tuple[str, ...] = ()
    health_timeout_s: float = 300.0  # the server's start-up (model loading) must end within this
    codec: str = DEFAULT_UPLOAD_CODEC  # the devices' upload codec (shared.images.UploadEncoding.parse)
    upload_max_side: int | None = None  # the devices' upload downscale

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {list(DATASETS)}")
        if self.dataset != "embedded" and self.data is None:
            raise ValueError(f"--dataset {self.dataset} needs --data PATH")
        unknown = [m for m in self.methods if m not in COLLABORATIVE + ON_DEVICE]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(COLLABORATIVE + ON_DEVICE)}")
        if not self.methods:
            raise ValueError("give at least one method")
        if self.setting not in streams.SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose from {list(streams.SETTINGS)}")
        if self.devices < 1 or self.batch_size < 1:
            raise ValueError("devices and batch size must be at least 1")
        if self.class_index is not None and self.dataset not in ("imagenet-c", "folder"):
            raise ValueError(f"--class-index names class folders (imagenet-c, folder); --dataset {self.dataset} "
                             "carries integer labels, in the model's class order already")


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class StreamSpec:
    source: streams.DomainSource
    samples_per_domain: int
    image_size: tuple[int, int]
    corruption_constants: str
    clean: np.ndarray | None = None  # the clean base images (uint8 NHWC), where the dataset has them


def _cached_corruption(images: np.ndarray, labels: np.ndarray, seed: int, cache_dir: Path) -> streams.DomainSource:
    """Each domain corrupted once into the on-disk cache and read back by rows, as the stream needs them."""
    from driftsync.data.loaders import corrupted_frames

    def source(domain: streams.Domain) -> streams.Frames:
        if domain.name == streams.CLEAN:
            return streams.ArrayFrames(images, labels)
        return corrupted_frames(images, labels, domain.name, domain.severity, seed, cache_dir)

    return source


def model_classes(opts: ReplayOptions) -> list[str]:
    """The student's class order, which every class folder's label indexes (driftsync.data.labels)."""
    from server.models.registry import model_info

    return class_order(model_info(opts.student).class_names, opts.class_index)


def stream_spec(opts: ReplayOptions, input_size: int, num_classes: int) -> StreamSpec:
    """Where each domain's images come from: corrupted on the fly (and cached), or read as released."""
    from driftsync.data import loaders

    count = opts.samples_per_domain
    cache = home() / "cache" / "corruptions"
    if opts.dataset in ("embedded", "cifar10", "folder"):
        if opts.dataset == "embedded":
            images, labels = streams.embedded_base(count or 200)
        elif opts.dataset == "cifar10":
            images, labels = streams.npz_base(opts.data, count, key=opts.data_key,
                                              label_key=streams.label_key_for(opts.data_key))
            labels = check_labels(labels, num_classes, opts.data)
        else:
            images, labels, _ = loaders.load_class_folder(opts.data, size=input_size, count=count, seed=opts.seed,
                                                          classes=model_classes(opts))
        source = _cached_corruption(images, labels, opts.seed, cache)
        h, w = images.shape[1:3]
        return StreamSpec(source, len(labels), (h, w), constants_for_size(h, w), clean=images)
    if opts.dataset == "cifar10-c":
        def read_cifar10c(domain: streams.Domain) -> streams.Frames:
            if domain.name == streams.CLEAN:
                raise ValueError("CIFAR-10-C has no clean split: use --dataset cifar10 for --corruptions none")
            frames = loaders.cifar10c_frames(opts.data, domain.name, domain.severity, count)
            check_labels(frames.labels, num_classes, opts.data / "labels.npy")
            return frames
        first = read_cifar10c(streams.Domain(_first_corruption(opts), opts.severity))
        return StreamSpec(read_cifar10c, len(first), first.shape[:2], "as released (CIFAR-10-C files)")
    wnids = model_classes(opts)
    _first_corruption(opts)  # refuses --corruptions none in its own words: the tree is corrupted already
    domains = streams.schedule(opts.setting, streams.parse_corruptions(opts.corruptions), opts.severity)
    source, samples = loaders.imagenet_c_source(opts.data, domains, wnids, count, opts.seed, input_size)
    return StreamSpec(source, samples, (input_size, input_size), "as released (ImageNet-C files)")


def _first_corruption(opts: ReplayOptions) -> str:
    corruptions = streams.parse_corruptions(opts.corruptions)
    if not corruptions:
        raise ValueError(f"--dataset {opts.dataset} is corrupted already: give --corruptions, not 'none'")
    return corruptions[0]


def frost_textures(opts: ReplayOptions) -> str | None:
    """What the stream's frost frames carry: the corrupt-tta photographs or the procedural
    stand-in when corrupted here, the released files' own otherwise; None without frost."""
    if "frost" not in streams.parse_corruptions(opts.corruptions):
        return None
    return "as released" if opts.dataset in ("cifar10-c", "imagenet-c") else frost_source()


def build_stream(opts: ReplayOptions, spec: StreamSpec, directory: Path) -> int:
    corruptions = streams.parse_corruptions(opts.corruptions)
    total = streams.stream_length(opts.setting, spec.samples_per_domain, corruptions, opts.severity)
    chunks = streams.stream(opts.setting, spec.source, corruptions, opts.severity, opts.batch_size,
                            seed=opts.seed, dirichlet=opts.dirichlet)
    with bar(total, "[replay] building the stream") as progress:
        return streams.write_stream(chunks, directory, lambda done: progress.update(done - progress.n))


# --------------------------------------------------------------------------- on-device methods


def source_predictions(opts: ReplayOptions, stream_dir: Path) -> np.ndarray:
    """The source model's predictions over the stream, once, for every method's source column."""
    return run_on_device("source", opts, stream_dir, None, label="source predictions (every method's reference)")["predictions"]


def method_overrides(name: str, opts: ReplayOptions, clean: np.ndarray | None, device: torch.device) -> dict:
    """EATA's Fisher regulariser: up to EATA_FISHER_IMAGES clean in-distribution images, as EATA takes
    from the clean validation set; here a seeded sample of the stream's clean base images."""
    from server.baselines import EATA_FISHER_IMAGES
    from server.engine import to_input

    if name != "eata":
        return {}
    if clean is None or len(clean) == 0:
        log.warning("eata: --dataset %s has no clean images, so no Fisher regulariser (EATA without its "
                     "anti-forgetting term)", opts.dataset)
        return {}
    count = min(EATA_FISHER_IMAGES, len(clean))
    pick = np.sort(np.random.default_rng(opts.seed).choice(len(clean), count, replace=False))
    log.info("eata: Fisher regulariser from %d clean base images", count)
    return {"fisher_images": to_input(clean[pick], device)}


def run_on_device(name: str, opts: ReplayOptions, stream_dir: Path, source_pred: np.ndarray | None,
                  label: str | None = None, clean: np.ndarray | None = None) -> dict:
    """An in-process torch reference, summarised like a device replay so one report covers both."""
    import torch

    from server.baselines import build_method
    from server.devices import resolve_torch_device
    from server.engine import to_input
    from server.models.registry import build_model, model_info

    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    torch.manual_seed(opts.seed)
    device = resolve_torch_device(opts.torch_device)
    method = build_method(name, build_model(opts.student).to(device), model_info(opts.student).num_classes,
                          **method_overrides(name, opts, clean, device))
    total = streams.stream_file_length(stream_dir)
    tallies: dict[str, dict] = {}
    curve: list[dict] = []
    predictions = np.empty(total, dtype=np.int64)
    done, started = 0, time.monotonic()
    progress = bar(total, f"[replay] {label or name}")
    for chunk in streams.read_stream(stream_dir):  # one batch decoded at a time
        if chunk.reset:
            method.reset()
        x = to_input(chunk.images, device)
        predicted = method.predict_and_adapt(x).argmax(dim=1).cpu().numpy()
        predictions[done : done + len(predicted)] = predicted
        src = source_pred[done : done + len(predicted)] if source_pred is not None else predicted
        for domain, wrong, wrong_src in zip(chunk.domain_names(), predicted != chunk.labels, src != chunk.labels):
            t = tallies.setdefault(domain, {"name": domain, "severity": chunk.domain.severity, "samples": 0, "errors": 0,
                                            "errors_source": 0, "uploaded": 0, "uplink_bytes": 0})
            t["samples"] += 1
            t["errors"] += int(wrong)
            t["errors_source"] += int(wrong_src)
        curve.append({"sample": done, "domain": chunk.domain.key, "version": 0,
                      "accuracy": float((predicted == chunk.labels).mean()),
                      "accuracy_source": float((src == chunk.labels).mean())})
        done += len(predicted)
        progress.update(len(predicted))
    progress.close()
    return {
        "domains": list(tallies.values()),
        "curve": curve,
        "freshness_s": [],
        "seconds": time.monotonic() - started,
        "predictions": predictions,
        "settings": method.settings,
        "status": {
            "uploads": {"sent": 0, "sent_bytes": 0, "dropped": 0},
            "deltas": {"applied": 0, "bytes": 0},
            "passes": {"forward_samples": method.forward_passes, "backward_samples": method.backward_passes},
        },
    }


# --------------------------------------------------------------------------- collaborative methods


def run_collaborative(name: str, opts: ReplayOptions, stream_dir: Path, work: Path) -> list[dict]:
    """A real server and N device processes on loopback, each device replaying the stream file.
    The server logs its teacher's class per stepped sample (work/TEACHER_LOG), for `teacher_gap`."""
    learn = LEARNS[name.removesuffix(UGS)]
    server = ["--student", opts.student, "--teacher", opts.teacher, "--torch-threads", str(opts.torch_threads),
              "--learn", learn, "--teacher-log", str(work / TEACHER_LOG)]
    if "prompt" in learn:
        server += ["--prompt", opts.prompt]
    if opts.fps is None:  # lockstep: step on whatever arrived, promptly
        server += ["--step-max-wait-s", "0.5", "--step-min-samples", "1"]
    pacing = ["--fps", str(opts.fps)] if opts.fps else ["--fps", "none", "--lockstep-timeout-s", str(opts.lockstep_timeout_s)]
    devices = [
        ["--name", f"replay-{i}", "--cohort", "replay", "--source", "stream", "--data", str(stream_dir),
         "--normalization", opts.normalization, "--stats-budget", str(opts.stats_budget or "none"),
         "--threads", "1", *pacing,
         *(["--selection", "ugs"] if name.endswith(UGS) else []), "--codec", opts.codec,
         "--upload-max-side", str(opts.upload_max_side or "none"), *opts.device_args]
        for i in range(opts.devices)
    ]
    return run_fleet([*server, *opts.server_args], devices, work,
                     frames=opts.devices * streams.stream_file_length(stream_dir), label=f"replay {name}",
                     health_timeout_s=opts.health_timeout_s)


# --------------------------------------------------------------------------- the run


def prompt_bytes(spec: str, input_size: tuple[int, int]) -> int:
    """float32 bytes of the prompt tensors a delta carries."""
    from server.prompt import InputPrompt, parse_prompt

    return 4 * sum(p.numel() for p in InputPrompt(*parse_prompt(spec), input_size).parameters())


def method_report(name: str, summaries: list[dict], meta: dict, gap: dict | None = None) -> dict:
    """One method's row: its errors and costs, and for a collaborative one the teacher's and the
    device's error on the same uploads (`gap`, from `teacher_gap`)."""
    report = with_teacher_gap(build_report(summaries, dict(meta, method=name)), gap)
    samples = report["samples"]
    forward = sum(s["status"].get("passes", {}).get("forward_samples", 0) for s in summaries)
    backward = sum(s["status"].get("passes", {}).get("backward_samples", 0) for s in summaries)
    report.update({
        "where": "collaborative" if name in COLLABORATIVE else "on-device",
        "forward_passes_per_sample": round(forward / samples, 2) if samples else 0.0,
        "backward_passes_per_sample": round(backward / samples, 2) if samples else 0.0,
        "seconds": round(max(s["seconds"] for s in summaries), 1),
        "lockstep_timeouts": sum(s.get("lockstep_timeouts", 0) for s in summaries),
    })
    return report


def run(opts: ReplayOptions) -> dict:
    from server.models.registry import model_info

    started = time.monotonic()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    info = model_info(opts.student)
    spec = stream_spec(opts, info.input_shape[1], info.num_classes)
    if tuple(spec.image_size) != tuple(info.input_shape[1:]):
        raise ValueError(f"the stream's images are {spec.image_size[0]}x{spec.image_size[1]} but {opts.student} "
                         f"takes {info.input_shape[1]}x{info.input_shape[2]}")
    stream_dir = out / "stream"
    total = build_stream(opts, spec, stream_dir)
    meta = {
        "dataset": opts.dataset, "data": str(opts.data) if opts.data else None, "setting": opts.setting,
        "severity": opts.severity, "student": opts.student, "teacher": opts.teacher,
        "corruption_constants": spec.corruption_constants, "frost": frost_textures(opts),
        "batch_size": opts.batch_size, "seed": opts.seed,
        "samples_per_domain": spec.samples_per_domain,
        "pacing": f"{opts.fps:g} frames/s" if opts.fps else "lockstep",
    }
    print(f"[replay] {total} samples; methods {', '.join(opts.methods)}", flush=True)
    source_pred = source_predictions(opts, stream_dir)
    reports: list[dict] = []
    curves: dict[str, list[dict]] = {}
    for name in opts.methods:
        gap = None
        if name in COLLABORATIVE:
            summaries = run_collaborative(name, opts, stream_dir, out / "runs" / name)
            gap = teacher_gap(summaries, read_teacher_log(out / "runs" / name / TEACHER_LOG))
            meta_m = dict(meta, devices=opts.devices, normalization=opts.normalization, stats_budget=opts.stats_budget,
                          prompt_bytes=prompt_bytes(opts.prompt, info.input_size) if "prompt" in name else 0)
        else:
            summary = run_on_device(name, opts, stream_dir, source_pred, clean=spec.clean)
            summary.pop("predictions")
            summaries = [summary]
            meta_m = dict(meta, devices=1, settings=summary.pop("settings"))
        reports.append(method_report(name, summaries, meta_m, gap))
        curves[name] = mean_curve(summaries)
        print(f"[replay] {name}: mean error {reports[-1]['mean_error']:.1f}% "
              f"(source {reports[-1]['mean_error_source']:.1f}%), upload ratio {reports[-1]['upload_ratio']:.3f}"
              + (f"; on {gap['uploads_joined']} uploads the teacher errs {gap['error_teacher_on_uploads']}%, the "
                 f"device {gap['error_device_on_uploads']}%" if gap else ""), flush=True)
        report = dict(reports[0])  # the demo's keys, for the first method; every method under "methods"
        report["methods"] = reports
        report["seconds_total"] = round(time.monotonic() - started, 1)
        write_methods_report(report, curves, out)  # after each method: a long run shows what it has so far
    print(markdown_methods(report))
    print(f"[replay] wrote {out}/report.json, report.md, report.png", flush=True)
    return report

