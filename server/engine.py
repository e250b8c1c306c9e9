"""CEMA's cloud side: the teacher adapts, then distils into the student's norm layers.

Pure torch, no I/O: a step takes uint8 images and a cohort's state, and returns
the student's new normalization tensors. Chen et al., ICLR 2024; the weights,
learning rates and replay sizes default to the paper's (see RESEARCH.md).
"""
from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from server.augment import cotta_augment
from server.grouped import bounds_of, device_batch_norm, grouped_batch_norm
from server.norm import (
    conv_weights,
    for_the_wire,
    freeze_all_but_learnt,
    load_replaceable_state,
    norm_layers,
    replaceable_state,
)
from server.prompt import PREFIX as PROMPT_PREFIX
from server.prompt import prompt_parameters

# "/": alternate steps, "+": jointly; "conv": every convolution's weight too (a student marked by
# `server.norm.learn_conv_weights`), trained with the affine parameters; "auto": norm+conv from devices
# that normalise by batch statistics, norm from the others (`CemaEngine._active_parts`); "race": norm and
# norm+conv side by side, the devices running whichever agrees more with the teacher (`_choose_track`).
LEARN_MODES = ("norm", "prompt", "norm+prompt", "norm/prompt", "norm+conv", "auto", "race")
TRACKS = ("norm", "norm+conv")  # what "race" chooses between; the first is where a cohort starts
DISTIL_SOURCES = ("teacher", "ema", "both")


def other_track(track: str) -> str:
    return TRACKS[1 - TRACKS.index(track)]


def learns_norm(learn: str) -> bool:
    return "norm" in learn or learn in ("auto", "race")


def learns_conv(learn: str) -> bool:
    """Whether the student's convolutions must be replaceable (`server.norm.learn_conv_weights`)."""
    return "conv" in learn or learn in ("auto", "race")


def learns_prompt(learn: str) -> bool:
    return "prompt" in learn


@dataclass(frozen=True)
class CemaConfig:
    num_classes: int
    e_max_factor: float = 0.4
    weight_entropy: float = 3.0
    weight_kl: float = 3.0
    weight_ce: float = 1.0
    temperature: float = 1.0
    student_lr: float = 2.5e-3
    conv_lr: float = 2.5e-5  # a convolution weight's rate is at most this times its squared source norm (`conv_rates`)
    teacher_lr: float = 2.5e-4
    momentum: float = 0.9
    adapt_teacher: bool = True
    teacher_optimizer: str = "sgd"  # CEMA: SGD 2.5e-4; "adam" is TENT's CIFAR setting (use lr 1e-3)
    teacher_flip_average: bool = True
    teacher_augmentations: int = 0  # extra CoTTA-style views averaged into the soft labels
    distil_from: str = "teacher"  # soft labels from the adapting teacher, its EMA, or both averaged
    teacher_ema: float = 0.9  # per step, on the teacher's affine parameters (CoTTA's mean teacher)
    student_steps: int | None = None  # SGD passes a step; None: `student_passes`' rule
    new_per_step: int = 32  # CEMA's new uploads per step; learning convolutions, a smaller step's rate shrinks with it
    replay_per_step: int = 96
    replay_capacity: int = 10_000
    replay_min: int = 256
    stats_momentum: float = 0.3
    learn: str = "norm"  # what the deltas move: "norm" (CEMA), "prompt" (U-VPA style), both jointly or alternately, norm+conv, auto or race
    track_memory: float = 0.999  # race: per new upload, on the evidence that the other track agrees more with the teacher
    track_z: float = 2.0  # race: the other track is published once its lead is this many standard errors above zero
    prompt_lr: float = 5e-3  # Adam, on the input-space prompt
    prompt_consistency: float = 1.0  # confident uploads keep the prompted prediction on the plain one
    prompt_ema: float = 0.9  # deltas carry this EMA of the prompt, so a quiet stream cannot drag it away
    holdout_every: int = 0  # guarded push: every n-th new upload is held out, never trained on (0: off)
    holdout_samples: int = 128  # recent held-out uploads a candidate delta is checked on
    guard_min_holdout: int = 64  # fewer held-out uploads than this say too little: no check yet
    guard_tolerance: float = 0.0  # withhold a delta whose teacher agreement on them drops by more than this
    collapse_window: int = 512  # student predictions on new uploads watched for collapse
    collapse_marginal: float = 0.2  # reset to source when their class marginal's entropy < this · ln C (0: off)

    def __post_init__(self) -> None:
        if self.learn not in LEARN_MODES:
            raise ValueError(f"learn must be one of {LEARN_MODES}, not {self.learn!r}")
        if self.distil_from not in DISTIL_SOURCES:
            raise ValueError(f"distil_from must be one of {DISTIL_SOURCES}, not {self.distil_from!r}")

    @property
    def e_max(self) -> float:
        return self.e_max_factor * math.log(self.num_classes)


def prompt_loss(
    prompted_logits: torch.Tensor, plain_logits: torch.Tensor, teacher_probs: torch.Tensor, cfg: CemaConfig
) -> torch.Tensor:
    """VPLU, uncertainty-guided: the student's own uncertainty u = H / ln C on each upload
    weights how much the teacher drives the prompt there (u · KL(teacher‖prompted)); confident
    uploads regularise it instead ((1 - u) · KL(plain‖prompted)), so the prompt fixes what the
    student gets wrong without moving what it already gets right."""
    log_p = prompted_logits.log_softmax(dim=1)
    plain = plain_logits.softmax(dim=1)
    u = (entropy(plain_logits) / math.log(plain_logits.shape[1])).clamp(0, 1)
    teacher_probs = teacher_probs.clamp_min(1e-8)
    drive = (teacher_probs * (teacher_probs.log() - log_p)).sum(dim=1)
    keep = (plain * (plain.clamp_min(1e-8).log() - log_p)).sum(dim=1)
    return (u * drive).mean() + cfg.prompt_consistency * ((1 - u) * keep).mean()


def conv_rates(weights: list[nn.Parameter], student_lr: float, conv_lr: float) -> dict[nn.Parameter, float]:
    """Each convolution weight's SGD rate: the student's rate, lowered to `conv_lr` times the
    tensor's squared source norm where that is smaller.

    A convolution followed by a normalisation layer computes the same function at any scale of
    its weight, and its gradient shrinks as 1 / |w|: at one SGD rate a small-norm tensor's
    filters turn by far larger angles than a large one's (by the rate over |w|²). The cap bounds
    that angular rate, whatever the student. Measured (BENCHMARKS.md, "Convolution rates capped
    by the weight's norm"): the embedded student's tensors are 1.1-18x smaller than ResNet-20's
    typical one; at ResNet-20's rate its convolutions cost it 10 points, capped they gain 0.3.
    Uncapped rates by the norm (raising ResNet-20's large tensors too) cost ResNet-20 0.5-3.5."""
    return {w: min(student_lr, conv_lr * float(w.detach().pow(2).sum())) for w in weights}


def _same_groups(opt: torch.optim.Optimizer, saved: dict) -> bool:
    """Whether a stored optimizer state has this optimizer's parameter groups, size for size."""
    groups = saved.get("param_groups", [])
    return [len(g["params"]) for g in groups] == [len(g["params"]) for g in opt.param_groups]


def student_passes(new_samples: int, cfg: CemaConfig) -> int:
    """SGD passes over a step's batch: `student_steps` if set, else one per `new_per_step` new
    uploads, rounded up. CEMA steps once on 32 new uploads; a step that brings more (a batch-
    statistics group cannot be split below its minimum, so batch-200 devices bring 40 at a
    time) then trains each upload as often. Measured (BENCHMARKS.md, "Student passes by the
    new uploads"): two passes on 40 beat one at batch 200; one pass stays best on 13 (batch 64)
    and on 32 (the demo)."""
    if cfg.student_steps is not None:
        return cfg.student_steps
    return max(1, math.ceil(new_samples / cfg.new_per_step))


def fair_differences(published: np.ndarray, rival: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per upload, +1 where the rival track's class is the teacher's and the published track's is
    not, -1 the reverse, 0 otherwise; only on uploads the rival is as unsure of as the published
    track (its entropy within the range of the published track's on these uploads). The devices
    upload what the published track is unsure of, where it errs most, so on all the uploads any
    rival looks better (measured: the tracks swapped back and forth); the uploads both are unsure
    of treat them alike."""
    unsure, rival_unsure = _entropy_of(published), _entropy_of(rival)
    alike = (rival_unsure >= unsure.min()) & (rival_unsure <= unsure.max())
    rival_right, published_right = rival.argmax(axis=1) == teacher, published.argmax(axis=1) == teacher
    return (rival_right.astype(float) - published_right)[alike]


def rival_leads(lead: float, squares: float, differences: np.ndarray, memory: float, z: float) -> tuple[float, float, bool]:
    """A paired test that forgets: `differences` are per upload (+1 the rival is right where the
    published track is not, -1 the reverse). Their decayed sum must exceed z times its standard
    error (the root of the decayed sum of squares), so one lucky batch of hard uploads does not
    flip what the devices run. Returns the new sums and whether the rival leads."""
    decay = memory ** len(differences)
    lead = decay * lead + float(differences.sum())
    squares = decay * squares + float((differences**2).sum())
    return lead, squares, lead > 0 and lead > z * math.sqrt(squares)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def reliability_weight(ent: torch.Tensor, e_max: float) -> torch.Tensor:
    """exp(E_max - H): confident samples count more; no gradient flows through it."""
    return torch.exp(e_max - ent.detach())


def teacher_loss(teacher_logits: torch.Tensor, e_max: float) -> torch.Tensor:
    ent = entropy(teacher_logits)
    return (reliability_weight(ent, e_max) * ent).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, cfg: CemaConfig
) -> torch.Tensor:
    """3·entropy + 3·KL(teacher‖student) + 1·CE(teacher argmax), CEMA's weights."""
    t = cfg.temperature
    student_ent = entropy(student_logits)
    loss_ent = (reliability_weight(student_ent, cfg.e_max) * student_ent).mean()
    teacher_probs = teacher_probs.clamp_min(1e-8)
    teacher_ent = -(teacher_probs * teacher_probs.log()).sum(dim=1)
    w_teacher = reliability_weight(teacher_ent, cfg.e_max)
    log_ps = (student_logits / t).log_softmax(dim=1)
    kl = (teacher_probs * (teacher_probs.log() - log_ps)).sum(dim=1) * t * t
    ce = F.cross_entropy(student_logits, teacher_probs.argmax(dim=1), reduction="none")
    return (
        cfg.weight_entropy * loss_ent
        + cfg.weight_kl * (w_teacher * kl).mean()
        + cfg.weight_ce * (w_teacher * ce).mean()
    )


BATCH_STATISTICS_MIN_SAMPLES = 16
"""Fewest images whose batch statistics the cloud normalises a batch-statistics device's uploads
with: per-channel mean and variance from 1-7 images are noise, and a student that learns affine
parameters under them learns them for a normalisation the device (which normalises whole batches
of frames) never applies. The worker never splits such a cohort's step below it before its max
wait (server/worker.py `least_samples`); a held-out upload is checked together with this many
frames of its step (`ReplayGroup.context`)."""


@dataclass(frozen=True)
class ReplayGroup:
    """One step's uploads with the teacher's soft labels and the device statistics they were
    seen under: a replayed sample must be normalised as its device normalised it, not with
    today's statistics (which belong to another domain and wreck the distillation).

    A batch-statistics group is normalised in train mode by the batch statistics of its images
    together with its `context` (frames of the same batch that are not scored: a held-out
    upload's step). Replay keeps batch-statistics groups whole (`ReplayBuffer.sample`): one
    train-mode batch of samples from many groups mixes domains' statistics as no device batch
    does, and eval mode under constant statistics collapsed the stream (no gradient flows
    through them, so the student learns affine parameters for a network that does not renormalise).
    A new group whose device sent the statistics it normalised the batch with (`stats`) is
    normalised by those, with train-mode BN's gradient (`device_batch_norm`); stored in replay or
    held out it keeps its own batch statistics: later steps have moved the weights those
    statistics were measured under."""

    images: np.ndarray
    probs: np.ndarray
    stats: dict[str, np.ndarray] | None
    batch_statistics: bool = False  # the device normalised with each batch's own statistics
    context: np.ndarray | None = None  # frames of the same batch: in its batch statistics, not scored


class ReplayBuffer:
    """FIFO of upload groups, bounded in samples, kept as uint8 images to bound memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.groups: deque[ReplayGroup] = deque()
        self.size = 0

    def add(self, group: ReplayGroup) -> None:
        self.groups.append(group)
        self.size += len(group.images)
        while self.size > self.capacity:
            self.size -= len(self.groups.popleft().images)

    def sample(self, count: int, rng: np.random.Generator) -> list[ReplayGroup]:
        """About `count` samples (all, when fewer are stored), each stored sample equally likely,
        as CEMA replays. Samples stored under fixed statistics are drawn one by one and come back
        grouped by the group each came from, so each keeps the statistics it was stored with.
        A batch-statistics sample is normalised by its batch, so those come as whole stored
        groups, each drawn with probability proportional to its size (every sample equally
        likely) and cut to no fewer than BATCH_STATISTICS_MIN_SAMPLES. One train-mode batch of
        samples from many groups (CEMA's replay batch) mixes domains' statistics as no device
        batch does: 27.5% against 26.6% for whole groups drawn as before this sampler
        (BENCHMARKS.md, issue 16 part 2)."""
        count = min(count, self.size)
        if count <= 0:
            return []
        sizes = np.array([len(g.images) for g in self.groups])
        batch = np.array([g.batch_statistics for g in self.groups])
        batch_count = int(round(count * sizes[batch].sum() / self.size))
        out = self._whole_groups(np.flatnonzero(batch), sizes, batch_count, rng)
        fixed = np.flatnonzero(~batch)
        if len(fixed) and count > batch_count:
            ends = np.cumsum(sizes[fixed])
            picks = np.sort(rng.choice(int(ends[-1]), size=min(count - batch_count, int(ends[-1])), replace=False))
            owner = np.searchsorted(ends, picks, side="right")
            for k in np.unique(owner):
                group = self.groups[fixed[k]]
                idx = picks[owner == k] - (ends[k] - len(group.images))
                out.append(replace(group, images=group.images[idx], probs=group.probs[idx]))
        return out

    def _whole_groups(self, candidates: np.ndarray, sizes: np.ndarray, count: int, rng: np.random.Generator) -> list[ReplayGroup]:
        out: list[ReplayGroup] = []
        if count <= 0 or not len(candidates):
            return out
        order = rng.choice(candidates, size=len(candidates), replace=False, p=sizes[candidates] / sizes[candidates].sum())
        for g in order:
            group = self.groups[g]
            take = min(len(group.images), max(count, BATCH_STATISTICS_MIN_SAMPLES))
            idx = np.sort(rng.choice(len(group.images), size=take, replace=False))
            out.append(replace(group, images=group.images[idx], probs=group.probs[idx]))
            count -= take
            if count <= 0:
                break
        return out


@dataclass(frozen=True)
class StepInput:
    """One cohort's new uploads for a step, and how its devices normalised them."""

    images: np.ndarray
    state: CohortState
    device_stats: dict[str, np.ndarray] | None = None
    batch_statistics: bool = False


@dataclass
class CohortState:
    """Everything that makes one cohort's adaptation differ from another's."""

    student_norm: dict[str, np.ndarray]
    teacher_norm: dict[str, np.ndarray]
    teacher_ema: dict[str, np.ndarray] = field(default_factory=dict)  # EMA of the teacher's affine; empty: its source
    student_opt: dict = field(default_factory=dict)
    teacher_opt: dict = field(default_factory=dict)
    prompt_opt: dict = field(default_factory=dict)
    prompt_ema: dict[str, np.ndarray] = field(default_factory=dict)
    replay: ReplayBuffer | None = None
    steps: int = 0
    published: dict[str, np.ndarray] = field(default_factory=dict)  # what the devices run: the last delta sent
    holdout: ReplayBuffer | None = None  # recent held-out uploads, for the guarded push
    predictions: deque[int] = field(default_factory=deque)  # the student's recent classes on new uploads
    learning: str = ""  # learn="race": the track student_norm holds, the one the devices run (TRACKS)
    rival_norm: dict[str, np.ndarray] = field(default_factory=dict)  # race: the other track's tensors
    rival_opt: dict = field(default_factory=dict)
    rival_lead: float = 0.0  # race: decayed sum, over new uploads, of (rival agrees with the teacher) - (published one does)
    rival_lead_squares: float = 0.0  # race: the same sum of squares, for the lead's standard error

    def swap_tracks(self) -> None:
        """learn="race": publish the other track from now on; each keeps its tensors and optimizer."""
        self.student_norm, self.rival_norm = self.rival_norm, self.student_norm
        self.student_opt, self.rival_opt = self.rival_opt, self.student_opt
        self.learning = other_track(self.learning)
        self.rival_lead = self.rival_lead_squares = 0.0  # switching back takes fresh evidence

    def restart_from(self, tensors: dict[str, np.ndarray]) -> None:
        """Continue adapting from a delta's tensors (a withheld candidate, a rollback), with fresh
        optimizer state; the masters stay float32 whatever precision the delta travelled in."""
        self.student_norm.update({k: v.astype(np.float32) for k, v in tensors.items()})
        self.prompt_ema.update({k: v.astype(np.float32) for k, v in tensors.items() if _is_prompt(k)})
        self.student_opt, self.prompt_opt = {}, {}


@dataclass(frozen=True)
class StepResult:
    """What one cohort's step produced: the tensors the next version carries (when the guard
    withheld the candidate, what the devices already run, so the version still says which
    uploads were processed); and what happened, for the event log ("withheld", "collapse_reset")."""

    tensors: dict[str, np.ndarray]
    event: str | None = None
    detail: str = ""
    teacher_classes: np.ndarray | None = None  # the teacher's label for each new upload, in input order


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] on `device`, the models' input contract. The uint8
    images cross to the device, a quarter of the bytes of the floats made there."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _set_norm_mode(model: nn.Module, train: bool, momentum: float | None = None) -> None:
    model.eval()
    for layer in norm_layers(model).values():
        layer.train(train)
        if momentum is not None:
            layer.momentum = momentum


class CemaEngine:
    """One student and one teacher module shared by every cohort; states are swapped in.

    Both modules compute on `torch_device`. A cohort's tensors and replay buffers stay on the
    CPU as numpy; its optimizers' state is whatever `state_dict()` gave (device tensors), and
    `load_state_dict` moves a CPU copy (a decoded state) onto the device. Each step sends its
    uint8 images over and brings soft labels and deltas back. Random draws come from CPU
    generators, so a seed gives the same augmentations and replay samples on every device."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, cfg: CemaConfig, seed: int = 0,
        student_input_shape: tuple[int, int, int] = (3, 32, 32), torch_device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.student_input_shape = student_input_shape
        self.device = torch.device(torch_device)
        self.student = copy.deepcopy(student).to(self.device)
        self.teacher = copy.deepcopy(teacher).to(self.device)
        learnt = freeze_all_but_learnt(self.student)
        self._prompt_params = list(prompt_parameters(self.student).values())
        if learns_prompt(cfg.learn) and not self._prompt_params:
            raise ValueError(f"learn={cfg.learn!r} needs a prompted student (serve --prompt padding:W or lowres:R)")
        convs = conv_weights(self.student)
        self._conv_params, self._conv_names = list(convs.values()), frozenset(convs)
        self._conv_rates = conv_rates(self._conv_params, cfg.student_lr, cfg.conv_lr)
        if learns_conv(cfg.learn) != bool(self._conv_params):
            raise ValueError(f"learn={cfg.learn!r} needs a student whose convolutions are marked learnt "
                             "(server.norm.learn_conv_weights) exactly when it includes conv")
        self._student_params = learnt if learns_norm(cfg.learn) else []
        for p in learnt:
            p.requires_grad_(learns_norm(cfg.learn))
        for p in self._prompt_params:
            p.requires_grad_(learns_prompt(cfg.learn))
        freeze_all_but_learnt(self.teacher)
        self._source_student = replaceable_state(self.student)
        self._source_teacher = replaceable_state(self.teacher)
        self._teacher_affine = [name for name in self._source_teacher if not _is_statistic(name)]
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator().manual_seed(seed)

    def new_state(self) -> CohortState:
        return CohortState(
            student_norm={k: v.copy() for k, v in self._source_student.items()},
            teacher_norm={k: v.copy() for k, v in self._source_teacher.items()},
            replay=ReplayBuffer(self.cfg.replay_capacity),
            published=self.source_delta(),
            holdout=ReplayBuffer(self.cfg.holdout_samples),
            learning=TRACKS[0] if self.cfg.learn == "race" else "",
            rival_norm={k: v.copy() for k, v in self._source_student.items()} if self.cfg.learn == "race" else {},
        )

    def source_delta(self) -> dict[str, np.ndarray]:
        """The tensors a delta carries, at their source values: a new cohort's first version."""
        fresh = CohortState({k: v.copy() for k, v in self._source_student.items()}, {})
        return self._delta_tensors(fresh, cloud_statistics=False)

    def teacher_probs(self, batches: list[tuple[np.ndarray, CohortState]]) -> list[torch.Tensor]:
        """The teacher's soft labels for several cohorts' uploads in ONE forward pass (each
        cohort under its own test-batch statistics and affine parameters: `grouped_batch_norm`),
        adapting each cohort's teacher if configured.

        The cloud can afford what a device cannot: averaging over a flip and over
        `teacher_augmentations` random views makes the labels it distils markedly better.
        `distil_from` "ema" or "both" labels with (or also with) an EMA of the teacher's affine
        parameters, CoTTA's mean teacher, which smooths over the noisy single-step updates.
        """
        cfg = self.cfg
        affine = [
            {name: torch.tensor(state.teacher_norm[name], device=self.device, requires_grad=cfg.adapt_teacher) for name in self._teacher_affine}
            for _, state in batches
        ]
        bounds = bounds_of([len(images) for images, _ in batches])
        x = to_input(np.concatenate([images for images, _ in batches]), self.device)
        with grouped_batch_norm(self.teacher, bounds, affine):
            with torch.set_grad_enabled(cfg.adapt_teacher):
                logits = self.teacher(x)
                if cfg.adapt_teacher:  # group g's loss reaches only group g's parameters
                    sum(teacher_loss(logits[a:b], cfg.e_max) for a, b in bounds).backward()
                    for (_, state), params in zip(batches, affine):
                        opt = self._optimizer(list(params.values()), cfg.teacher_optimizer, cfg.teacher_lr)
                        if state.teacher_opt:
                            opt.load_state_dict(state.teacher_opt)
                        opt.step()
                        state.teacher_opt = opt.state_dict()
            with torch.no_grad():
                probs = []
                if cfg.distil_from in ("teacher", "both"):
                    probs.append(self._averaged_views(x, logits.detach().softmax(dim=1)))
        for (_, state), params in zip(batches, affine):
            state.teacher_norm.update({name: p.detach().cpu().numpy().copy() for name, p in params.items()})
            if cfg.distil_from != "teacher":
                previous = state.teacher_ema or self._source_teacher
                state.teacher_ema = {name: cfg.teacher_ema * previous[name] + (1 - cfg.teacher_ema) * state.teacher_norm[name]
                                     for name in self._teacher_affine}
        if cfg.distil_from != "teacher":
            ema = [{name: torch.tensor(state.teacher_ema[name], device=self.device) for name in self._teacher_affine}
                   for _, state in batches]
            with grouped_batch_norm(self.teacher, bounds, ema), torch.no_grad():
                probs.append(self._averaged_views(x, None))
        probs = torch.stack(probs).mean(dim=0).cpu()
        return [probs[a:b] for a, b in bounds]

    def _averaged_views(self, x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        """The teacher's probabilities averaged over the image (`first`, when already computed),
        its flip and `teacher_augmentations` random views, under the norm state in force."""
        views = [self.teacher(x).softmax(dim=1) if first is None else first]
        if self.cfg.teacher_flip_average:
            views.append(self.teacher(x.flip(dims=[3])).softmax(dim=1))
        for _ in range(self.cfg.teacher_augmentations):
            views.append(self.teacher(cotta_augment(x, self._generator)).softmax(dim=1))
        return torch.stack(views).mean(dim=0)

    def _optimizer(self, params: list[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
        if kind == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum)
        raise ValueError(f"unknown optimizer {kind!r}; choose sgd or adam")

    def step(
        self, images: np.ndarray, state: CohortState, device_stats: dict[str, np.ndarray] | None = None,
        batch_statistics: bool = False,
    ) -> StepResult:
        """One adaptation step of one cohort; see `step_many`."""
        return self.step_many([StepInput(images, state, device_stats, batch_statistics)])[0]

    def step_many(self, inputs: list[StepInput]) -> list[StepResult]:
        """One adaptation step for each of several cohorts; returns what each delta must carry.
        The teacher's forward pass is batched across all of them (the fleet's gain); each
        student distils on its own, then passes the collapse check and the guard.

        The student copy must normalise each sample the way its device did, or the affine
        parameters it learns do the wrong thing on the device (measured: the stream collapses
        to 80% error). So each group of uploads is distilled under the device's running
        statistics from when it was sent (`device_stats`), or, when the device normalises
        every batch by its own statistics (`batch_statistics`), with batch statistics too
        (replayed ones by their whole stored group: `ReplayBuffer.sample`).
        Either way only the affine parameters go back. Without device statistics the cloud
        re-estimates them from the (filtered, so biased) uploads and sends them too.
        """
        probs = self.teacher_probs([(item.images, item.state) for item in inputs])
        results = []
        for item, p in zip(inputs, probs):
            candidate, switched = self._distil(item, p)
            result = self._checked(item, candidate)
            if switched and result.event is None:
                result = replace(result, event="track", detail=switched)
            results.append(replace(result, teacher_classes=p.argmax(dim=1).numpy()))
        return results

    def _checked(self, item: StepInput, candidate: dict[str, np.ndarray]) -> StepResult:
        """Reset a collapsed cohort to the source; withhold a delta the held-out uploads say is worse."""
        state, cfg = item.state, self.cfg
        if cfg.collapse_marginal > 0:
            group = ReplayGroup(item.images, np.zeros((len(item.images), 1)), item.device_stats, item.batch_statistics)
            state.predictions.extend(self._predict(candidate, state, [group]).argmax(axis=1).tolist())
            while len(state.predictions) > cfg.collapse_window:
                state.predictions.popleft()
            if len(state.predictions) == cfg.collapse_window:
                marginal = class_marginal_entropy(np.fromiter(state.predictions, int), cfg.num_classes)
                if marginal < cfg.collapse_marginal * math.log(cfg.num_classes):
                    fresh = self.new_state()
                    vars(state).update(vars(fresh))
                    detail = f"class-marginal entropy {marginal:.3f} < {cfg.collapse_marginal} ln C over {cfg.collapse_window} uploads"
                    return StepResult(dict(state.published), "collapse_reset", detail)
        if cfg.holdout_every and state.holdout.size >= cfg.guard_min_holdout:
            groups = list(state.holdout.groups)
            before = agreement(self._predict(state.published, state, groups), groups)
            after = agreement(self._predict(candidate, state, groups), groups)
            if after < before - cfg.guard_tolerance:  # the devices keep what they run; so does the student
                state.restart_from(state.published)
                detail = f"teacher agreement {after:.3f} < {before:.3f} on {state.holdout.size} held-out uploads"
                return StepResult({k: v.copy() for k, v in state.published.items()}, "withheld", detail)
        state.published = {k: v.copy() for k, v in candidate.items()}
        return StepResult(candidate)

    @torch.no_grad()
    def _predict(self, tensors: dict[str, np.ndarray], state: CohortState, groups: list[ReplayGroup]) -> np.ndarray:
        """The student's probabilities with `tensors` over its state, each group normalised as
        its devices normalised it."""
        out = []
        for group in groups:
            load_replaceable_state(self.student, state.student_norm | tensors)
            out.append(self._logits(group, _group_input(group, self.device)).softmax(dim=1).cpu().numpy())
        _set_norm_mode(self.student, train=False)
        load_replaceable_state(self.student, state.student_norm)
        return np.concatenate(out)

    def _distil(self, item: StepInput, probs_new: torch.Tensor) -> tuple[dict[str, np.ndarray], str]:
        """The step's candidate delta, and, when learn="race" switched tracks, what it switched to and why."""
        cfg = self.cfg
        images, state, device_stats, batch_statistics = item.images, item.state, item.device_stats, item.batch_statistics
        self._conform(state)
        probs = probs_new.numpy()
        stored_stats = None if batch_statistics else device_stats  # see ReplayGroup
        if cfg.holdout_every:  # every n-th upload is only ever used to check deltas
            held = np.arange(len(images)) % cfg.holdout_every == cfg.holdout_every - 1
            context = images[~held][: BATCH_STATISTICS_MIN_SAMPLES] if batch_statistics else None
            state.holdout.add(ReplayGroup(images[held].copy(), probs[held], stored_stats, batch_statistics,
                                          context.copy() if context is not None else None))
            images, probs = images[~held], probs[~held]
        new = ReplayGroup(images.copy(), probs, device_stats, batch_statistics)
        groups = [new]
        replay = state.replay
        if replay.size >= cfg.replay_min and cfg.replay_per_step > 0:
            groups += replay.sample(cfg.replay_per_step, self._rng)
        replay.add(replace(new, stats=stored_stats))
        xs = [_group_input(g, self.device) for g in groups]  # each group crosses to the device once a step

        cloud_statistics = device_stats is None and not batch_statistics
        state.student_norm = self._with_statistics(state.student_norm, stored_stats, cloud_statistics, xs[0])
        switched = ""
        if cfg.learn == "race":
            state.rival_norm = self._with_statistics(state.rival_norm, stored_stats, cloud_statistics, xs[0])
            switched = self._choose_track(state, new)
        passes = student_passes(len(new.images), cfg)
        learn = state.learning or cfg.learn
        saved = {"student_opt": state.student_opt, "prompt_opt": state.prompt_opt}
        state.student_norm, trained = self._train(state.student_norm, saved,
                                                  self._active_parts(learn, state.steps, batch_statistics), groups, xs, passes)
        for name, opt_state in trained.items():
            setattr(state, name, opt_state)
        if cfg.learn == "race":
            state.rival_norm, trained = self._train(state.rival_norm, {"student_opt": state.rival_opt}, other_track(learn),
                                                    groups, xs, passes)
            state.rival_opt = trained["student_opt"]
        state.steps += 1
        return self._delta_tensors(state, cloud_statistics), switched

    def _conform(self, state: CohortState) -> None:
        """A state stored under another --learn (a server upgraded to a new default, a changed flag)
        continues under this one: tensors this student does not replace are dropped, missing ones
        start at the source, an optimizer over other tensors starts afresh, and `race` starts its
        tracks from the stored student, published as the affine track."""
        source = self._source_student
        if set(state.student_norm) != set(source):
            state.student_norm = {k: state.student_norm.get(k, v) for k, v in source.items()}
            state.student_opt = {}
        if self.cfg.learn != "race":
            if state.learning and state.learning != self.cfg.learn:  # its optimizer moved another set of tensors
                state.student_opt = {}
            state.learning, state.rival_norm, state.rival_opt = "", {}, {}
            state.rival_lead = state.rival_lead_squares = 0.0
        elif state.learning not in TRACKS:
            state.learning = TRACKS[0]
            state.rival_norm = {k: v.copy() for k, v in state.student_norm.items()}
            state.rival_opt, state.student_opt = {}, {}
            state.rival_lead = state.rival_lead_squares = 0.0

    def _with_statistics(self, tensors: dict[str, np.ndarray], device_stats: dict[str, np.ndarray] | None,
                         cloud_statistics: bool, x_new: torch.Tensor) -> dict[str, np.ndarray]:
        """The tensors under the statistics the new uploads were seen with: the device's, or, when
        the cloud keeps them, re-estimated from the new domain only."""
        if device_stats is not None:
            tensors = tensors | device_stats
        if not cloud_statistics or not learns_norm(self.cfg.learn):
            return tensors
        load_replaceable_state(self.student, tensors)
        with torch.no_grad():
            _set_norm_mode(self.student, train=True, momentum=self.cfg.stats_momentum)
            self.student(x_new)
        _set_norm_mode(self.student, train=False)
        return replaceable_state(self.student)

    def _choose_track(self, state: CohortState, new: ReplayGroup) -> str:
        """learn="race": score both tracks on the new uploads before either trains on them (does
        each pick the teacher's class?) and publish the other track once its lead is significant
        (`rival_leads`). Which one wins depends on the student and the stream (BENCHMARKS.md,
        "Choosing what the student learns"): the convolutions gain on real CIFAR-10-C and lose on
        the embedded student, whose devices then keep the affine track.

        Only uploads both tracks are unsure of count (`fair_differences`)."""
        cfg, rival = self.cfg, other_track(state.learning)
        differences = fair_differences(self._predict({}, state, [new]), self._predict(state.rival_norm, state, [new]),
                                       new.probs.argmax(axis=1))
        state.rival_lead, state.rival_lead_squares, leads = rival_leads(
            state.rival_lead, state.rival_lead_squares, differences, cfg.track_memory, cfg.track_z)
        if not leads:
            return ""
        detail = (f"devices now run {rival}: it agrees with the teacher on {state.rival_lead:.1f} more recent uploads "
                  f"(standard error {np.sqrt(state.rival_lead_squares):.1f})")
        state.swap_tracks()
        return detail

    def _train(self, tensors: dict[str, np.ndarray], saved: dict[str, dict], active: str,
               groups: list[ReplayGroup], xs: list[torch.Tensor], passes: int) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """`passes` SGD passes of the student from `tensors` over the step's groups, training what
        `active` names; the new tensors (statistics as they came) and optimizer states."""
        for p in self._conv_params:
            p.requires_grad_("conv" in active)
        load_replaceable_state(self.student, tensors)
        _set_norm_mode(self.student, train=False)
        opts = self._student_optimizers(saved, active, len(groups[0].images))
        total = sum(len(g.images) for g in groups)
        for _ in range(passes):
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            for group, x in zip(groups, xs):
                (self._group_loss(group, x, active) * (len(group.images) / total)).backward()
            for opt in opts.values():
                opt.step()
        _set_norm_mode(self.student, train=False)
        load_replaceable_state(self.student, {k: v for k, v in tensors.items() if _is_statistic(k)})
        return replaceable_state(self.student), {name: opt.state_dict() for name, opt in opts.items()}

    def _active_parts(self, learn: str, step: int, batch_statistics: bool) -> str:
        """What this step trains: everything `learn` names, or, alternating, norm on even steps and
        prompt on odd. Under "auto" the convolutions learn only from devices that normalise each
        batch by its own statistics: running statistics lag behind a delta that moves the weights
        (the demo's devices lost 2.7 points with them: BENCHMARKS.md, "Convolution rates capped by
        the weight's norm"), so their cohorts learn the affine parameters, as CEMA does."""
        if learn == "norm/prompt":
            return "norm" if step % 2 == 0 else "prompt"
        if learn == "auto":
            return "norm+conv" if batch_statistics else "norm"
        return learn

    def _student_optimizers(self, saved: dict[str, dict], active: str, new_samples: int) -> dict[str, torch.optim.Optimizer]:
        """SGD on the affine parameters (CEMA's) and, when `active` includes conv, the convolution
        weights; Adam on the prompt; keyed by their state field, resumed from `saved`.

        Learning the convolutions too, each weight tensor has its own rate (`conv_rates`), and a
        step's SGD rates scale with the new uploads it brings, up to `new_per_step`: the weights
        then move by as much per uploaded frame whether a step comes every 64 frames or every 200
        (in lockstep the cloud steps once per device batch; at batch 64, full-rate steps on about
        13 uploads each gave 30.6% against 24.6% at batch 200). A stored optimizer state whose
        groups differ (saved before the convolutions had their own rates) starts afresh."""
        opts: dict[str, torch.optim.Optimizer] = {}
        rates: list[float] = []
        if self._student_params and "norm" in active:
            affine = [p for p in self._student_params if p.requires_grad and p not in self._conv_rates]
            share = min(1.0, new_samples / self.cfg.new_per_step) if "conv" in active else 1.0
            groups = [{"params": affine, "lr": self.cfg.student_lr * share}]
            if "conv" in active:
                groups += [{"params": [p], "lr": rate * share} for p, rate in self._conv_rates.items()]
            rates = [g["lr"] for g in groups]
            opts["student_opt"] = torch.optim.SGD(groups, lr=self.cfg.student_lr, momentum=self.cfg.momentum)
        if "prompt" in active:
            opts["prompt_opt"] = torch.optim.Adam(self._prompt_params, lr=self.cfg.prompt_lr)
        for name, opt in opts.items():
            if saved.get(name) and _same_groups(opt, saved[name]):
                opt.load_state_dict(saved[name])
        if rates:
            for group, rate in zip(opts["student_opt"].param_groups, rates):
                group["lr"] = rate
        return opts

    def _logits(self, group: ReplayGroup, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The student's logits on the group's images (`x`: its `_group_input`), normalised as
        its devices normalised them: by their batch statistics (context included; the device's
        own when the group carries them), or in eval mode under the statistics they were sent
        with (else the student's own)."""
        if group.batch_statistics:
            _set_norm_mode(self.student, train=True, momentum=0.0)
            if group.stats is not None:
                stats = {name: torch.from_numpy(value).to(self.device) for name, value in group.stats.items()}
                with device_batch_norm(self.student, stats):
                    return (model or self.student)(x)[: len(group.images)]
        else:
            _set_norm_mode(self.student, train=False)
            if group.stats is not None:
                load_replaceable_state(self.student, group.stats)
        return (model or self.student)(x)[: len(group.images)]

    def _group_loss(self, group: ReplayGroup, x: torch.Tensor, active: str) -> torch.Tensor:
        probs = torch.from_numpy(group.probs).to(self.device)
        plain = None
        if "prompt" in active:  # first: a train-mode pass writes the norm buffers that the graph's backward reads
            with torch.no_grad():
                plain = self._logits(group, x, self.student.model)  # the same student without its prompt
        logits = self._logits(group, x)
        loss = distillation_loss(logits, probs, self.cfg) if "norm" in active else logits.new_zeros(())
        if plain is not None:
            loss = loss + prompt_loss(logits, plain, probs, self.cfg)
        return loss

    def _delta_tensors(self, state: CohortState, cloud_statistics: bool) -> dict[str, np.ndarray]:
        """What moved: affine parameters and/or the prompt's EMA, plus statistics the cloud estimated,
        in their wire precision (`for_the_wire`). Convolution weights at their source values stay
        off the wire (a device takes a weight a delta leaves out from its model file): under
        `race` the affine track's deltas are then as small as `norm`'s."""
        out = {}
        for name, value in state.student_norm.items():
            if name in self._conv_names and np.array_equal(value, self._source_student[name]):
                continue
            if _is_prompt(name):
                if learns_prompt(self.cfg.learn):
                    previous = state.prompt_ema.get(name, self._source_student[name])
                    state.prompt_ema[name] = self.cfg.prompt_ema * previous + (1 - self.cfg.prompt_ema) * value
                    out[name] = state.prompt_ema[name].astype(np.float32)
            elif _is_statistic(name):
                if cloud_statistics and learns_norm(self.cfg.learn):
                    out[name] = value
            elif learns_norm(self.cfg.learn):
                out[name] = value
        return for_the_wire(out, self.student)


def _group_input(group: ReplayGroup, device: torch.device) -> torch.Tensor:
    """The group's images, then its context, as the model's input on `device`."""
    images = group.images if group.context is None else np.concatenate([group.images, group.context])
    return to_input(images, device)


def _entropy_of(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)


def class_marginal_entropy(classes: np.ndarray, num_classes: int) -> float:
    """Entropy of the predicted-class histogram: ln C when predictions spread evenly, 0 when the
    model answers one class for everything (a collapse)."""
    p = np.bincount(classes, minlength=num_classes) / max(len(classes), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def agreement(probs: np.ndarray, groups: list[ReplayGroup]) -> float:
    """Share of samples on which the student's top class is the teacher's."""
    teacher = np.concatenate([g.probs for g in groups]).argmax(axis=1)
    return float((probs.argmax(axis=1) == teacher).mean())


def _is_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[1] in ("running_mean", "running_var")


def _is_prompt(name: str) -> bool:
    return name.startswith(f"{PROMPT_PREFIX}.")
