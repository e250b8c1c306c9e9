"""Students and teachers by name: `NAME` or `NAME:CHECKPOINT`.

Every model is wrapped so that its input is float32 NCHW RGB in [0, 1]: the
normalisation is part of the graph, and a device only divides by 255.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from driftsync.data import synthetic
from server.models import embedded
from server.models.cifar_resnet import DEPTHS, load_cifar_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class InputNormalization(nn.Module):
    """[0, 1] RGB in, the network's normalised input on to `net`."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]


def _split(spec: str) -> tuple[str, str | None]:
    name, _, checkpoint = spec.partition(":")
    return name, checkpoint or None


def model_names() -> list[str]:
    return sorted(embedded.CONFIGS) + sorted(DEPTHS)


def model_info(spec: str) -> ModelInfo:
    name, _ = _split(spec)
    if name in embedded.CONFIGS:
        return ModelInfo(name, len(synthetic.CLASS_NAMES), synthetic.CLASS_NAMES, (3, 32, 32))
    if name in DEPTHS:
        return ModelInfo(name, 10, CIFAR10_CLASSES, (3, 32, 32))
    raise ValueError(f"unknown model {name!r}; choose from {model_names()}")


def build_model(spec: str, home: Path | None = None) -> InputNormalization:
    """The model in eval mode; embedded ones train on first use unless a checkpoint is given."""
    name, checkpoint = _split(spec)
    model_info(spec)
    if name in embedded.CONFIGS:
        if checkpoint:
            net = embedded.build_embedded(name)
            net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        else:
            net = embedded.load_trained(name, home)
        return InputNormalization(net, embedded.MEAN, embedded.STD).eval()
    if checkpoint is None:
        raise ValueError(f"{name} needs a checkpoint: {name}:PATH (akamaster .th format)")
    return InputNormalization(load_cifar_resnet(name, checkpoint), IMAGENET_MEAN, IMAGENET_STD).eval()
