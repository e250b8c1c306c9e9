"""Default student/teacher pair, trained on the embedded synthetic dataset and shipped with the package.

The trained weights are small (~0.6 MB and ~3 MB), so they ship in server/models/weights/ as plain
state dicts, loaded with torch.load(weights_only=True) and checked against the SHA-256 recorded in
PACKAGED: a first run trains nothing. `driftsync train` retrains them (deterministically, in a few
CPU minutes) into DRIFTSYNC_HOME/models, where a retrained copy takes precedence.
Training sees only clean images with generic augmentation (crop, flip, mild colour jitter):
the evaluation corruptions must stay unseen, otherwise there would be nothing to adapt to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from driftsync.config import home as driftsync_home
from driftsync.data import synthetic
from driftsync.progress import bar as progress_bar

# Normalisation applied by the registry's input wrapper; training uses the same constants.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ConvBNNet(nn.Module):
    """Plain conv-BN-ReLU stack with global average pooling: every conv has its own BN to adapt.

    plan lists (out_channels, stride, kernel_size) per conv.
    """

    def __init__(self, plan: tuple[tuple[int, int, int], ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, stride, k in plan:
            conv = nn.Conv2d(in_ch, out_ch, k, stride, k // 2, bias=False)
            layers += [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights; its hash names the cache file."""

    plan: tuple[tuple[int, int, int], ...]
    train_samples: int
    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    recipe: str = "adamw-onecycle-v1"  # bump when train()/augment() change behaviour

    def digest(self) -> str:
        """Config plus a fingerprint of the data, so a changed generator never reuses stale weights."""
        blob = json.dumps(asdict(self), sort_keys=True).encode() + _dataset_fingerprint(self.seed).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


CONFIGS: dict[str, TrainConfig] = {
    # ~145k params, full-resolution 3x3 stem: small and fast, and fragile under corruptions.
    "embedded-student": TrainConfig(
        plan=((16, 1, 3), (32, 2, 3), (32, 1, 3), (64, 2, 3), (64, 1, 3), (128, 2, 3)),
        train_samples=20_000,
        epochs=3,
    ),
    # ~770k params (5.3x): a 5x5 stride-2 stem averages out pixel noise and the width sits at
    # low resolution where it is cheap: markedly more robust for ~2x the training time.
    "embedded-teacher": TrainConfig(
        plan=((32, 2, 5), (64, 1, 3), (96, 2, 3), (96, 1, 3), (192, 2, 3), (256, 1, 3)),
        train_samples=20_000,
        epochs=3,
    ),
}


@dataclass(frozen=True)
class Packaged:
    """A shipped checkpoint: the TrainConfig digest it was trained under and the file's SHA-256."""

    digest: str
    sha256: str


WEIGHTS_DIR = Path(__file__).parent / "weights"
PACKAGED: dict[str, Packaged] = {
    "embedded-student": Packaged("4c281ecfe4bc", "e491ad11ab59906f111d67e5d5b994e2ca9c696bcbdd3776295028ca4a8d7941"),
    "embedded-teacher": Packaged("933d3654a89d", "7a0a9a40c7eacfc0c7513ec607f8af09e1a9a0824908427a4796a190397f9ca8"),
}


def build_embedded(name: str) -> ConvBNNet:
    """Untrained network for an embedded model name."""
    if name not in CONFIGS:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(CONFIGS)}")
    return ConvBNNet(CONFIGS[name].plan, len(synthetic.CLASS_NAMES))


def checkpoint_path(name: str, home: Path | None = None) -> Path:
    """Where a retrained state_dict for name lives (the config hash keeps stale ones apart)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(CONFIGS)}")
    return Path(home or driftsync_home()) / "models" / f"{name}-{CONFIGS[name].digest()}.pt"


def packaged_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def checkpoint(name: str, home: Path | None = None) -> Path:
    """The weights to load for name: a retrained copy in home, else the shipped one (hash-checked).

    Nothing trains here: a first run must not spend minutes of CPU. If the training recipe changed
    since the weights were shipped (a developer's edit; tests/test_models.py catches it), retrain
    and ship them again: `scripts/ship_embedded.py`.
    """
    path = checkpoint_path(name, home)
    if path.exists():
        return path
    if PACKAGED[name].digest != CONFIGS[name].digest():
        raise ValueError(f"the shipped {name} weights were trained under recipe {PACKAGED[name].digest}, "
                         f"not the current {CONFIGS[name].digest()}: run `driftsync train`")
    verify_packaged(name)
    return packaged_path(name)


def verify_packaged(name: str) -> None:
    """Refuse a shipped checkpoint whose bytes are not the ones recorded (a broken install)."""
    digest = hashlib.sha256(packaged_path(name).read_bytes()).hexdigest()
    if digest != PACKAGED[name].sha256:
        raise ValueError(f"{packaged_path(name)} has SHA-256 {digest[:12]}..., expected "
                         f"{PACKAGED[name].sha256[:12]}...: reinstall driftsync or run `driftsync train`")


def retrain(name: str, home: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Train name from scratch and save it into home, replacing an earlier retrained copy.

    A lock file serialises concurrent processes; the write itself is atomic (tmp + os.replace),
    so readers never see a partial file even where locking is unavailable.
    """
    path = checkpoint_path(name, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_suffix(".lock")):
        start = time.perf_counter()
        state = train(name, log=log)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log(f"[{name}] trained in {time.perf_counter() - start:.1f}s, saved {path}")
    return path


def load_trained(name: str, home: Path | None = None) -> ConvBNNet:
    """Trained embedded network (eval mode): shipped, or retrained into home."""
    net = build_embedded(name)
    net.load_state_dict(torch.load(checkpoint(name, home), map_location="cpu", weights_only=True))
    return net.eval()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); elsewhere the atomic rename alone keeps the cache valid."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@cache
def _dataset_fingerprint(seed: int) -> str:
    """Hash of a few generated images: detects any change to the synthetic generator."""
    x, y = synthetic.generate(0, 64, seed)
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]


@lru_cache(maxsize=2)
def _training_set(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean training images as uint8 NCHW (shared by student and teacher in one process)."""
    x, y = synthetic.generate(0, count, seed)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Generic augmentation on uint8 NCHW -> float [0, 1]: shift crop (edge padded), h-flip, mild colour gain.

    Deliberately nothing that resembles an evaluation corruption (no noise, blur, fog, jpeg).
    One nearest-neighbour grid_sample does crop and flip at once (integer shifts, so exact).
    """
    n, _, h, w = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen).float()
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shift[:, 0] / w
    theta[:, 1, 2] = 2 * shift[:, 1] / h
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x.float() / 255.0, grid, mode="nearest", padding_mode="border", align_corners=False)
    gain = 1.0 + 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    return (out * gain).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the network's input scale (same constants as the registry wrapper)."""
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def train(name: str, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Train an embedded model from scratch (seeded AdamW + one-cycle LR: fastest to converge here)."""
    cfg = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        net = build_embedded(name).to(memory_format=torch.channels_last)  # ~25% faster convs on CPU
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x_all, y_all = _training_set(cfg.train_samples, cfg.seed)
    log(f"[{name}] {sum(p.numel() for p in net.parameters())} params, {cfg.train_samples} samples "
        f"generated in {time.perf_counter() - t0:.1f}s")
    steps_per_epoch = cfg.train_samples // cfg.batch_size
    decay, no_decay = _split_decay(net)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.25
    )
    net.train()
    bar = progress_bar(cfg.epochs * steps_per_epoch, f"[train] {name}", unit="step")
    for epoch in range(cfg.epochs):
        perm = torch.randperm(cfg.train_samples, generator=gen)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = normalize(augment(x_all[idx], gen)).contiguous(memory_format=torch.channels_last)
            logits = net(xb)
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == y_all[idx]).sum())
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / (step + 1):.3f}",
                            acc=f"{100 * correct / ((step + 1) * cfg.batch_size):.1f}%", refresh=False)
    bar.close()
    return {k: v.detach().contiguous() for k, v in net.eval().state_dict().items()}


def _split_decay(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weight decay on conv/linear weights only; BN affine and biases stay free."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return decay, no_decay

