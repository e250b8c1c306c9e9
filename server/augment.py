"""Test-time augmentations: CoTTA's CIFAR set, used by the on-device CoTTA baseline and by the
cloud teacher's augmentation-averaged soft labels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate chroma by 2*pi*shift in YIQ space (torchvision shifts H in HSV)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(2 * math.pi * shift), math.sin(2 * math.pi * shift)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,njhw->nihw", m.to(x), x).clamp(0, 1)


def cotta_augment(x: torch.Tensor, g: torch.Generator, noise_std: float = 0.005, blur: bool = True,
                  pad_mode: str = "replicate") -> torch.Tensor:
    """One draw of CoTTA's CIFAR test-time augmentation, shared by the batch (see docstring).

    ROID's consistency views are the same set without blur and noise, reflect-padded:
    `blur=False, noise_std=0, pad_mode="reflect"`."""
    n, _, h, w = x.shape
    x = x.clamp(0, 1)
    for op in torch.randperm(5, generator=g).tolist():  # ColorJitterPro: random order
        if op == 0:
            x = (x * _uniform(g, 0.6, 1.4)).clamp(0, 1)
        elif op == 1:
            f = _uniform(g, 0.7, 1.3)
            x = (f * x + (1 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
        elif op == 2:
            f = _uniform(g, 0.5, 1.5)
            x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        elif op == 3:
            x = _hue(x, _uniform(g, -0.06, 0.06))
        else:
            x = x.clamp(1e-8, 1.0) ** _uniform(g, 0.7, 1.3)
    pad = h // 2
    x = F.pad(x, (pad, pad, pad, pad), mode=pad_mode)
    size = x.shape[-1]
    angle = math.radians(_uniform(g, -15, 15))
    scale = _uniform(g, 0.9, 1.1)
    max_t = size / 16  # torchvision: translate fraction of the (padded) image size, in pixels
    tx, ty = (round(_uniform(g, -max_t, max_t)) * 2 / size for _ in range(2))
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # affine_grid maps output to input coordinates: the inverse of rotate-scale-then-translate.
    theta = torch.tensor([[cos, sin, -(cos * tx + sin * ty)], [-sin, cos, -(-sin * tx + cos * ty)]])
    grid = F.affine_grid(theta.to(x).expand(n, 2, 3), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if blur:
        sigma = _uniform(g, 0.001, 0.5)
        k = torch.exp(-((torch.arange(5, dtype=x.dtype) - 2) ** 2) / (2 * sigma**2))
        k = (k / k.sum()).to(x)
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
        x = F.conv2d(x, k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    x = x[..., pad : pad + h, pad : pad + w]
    if torch.rand((), generator=g).item() < 0.5:
        x = x.flip(dims=[3])
    if noise_std:
        x = x + noise_std * _normal_like(x, g)
    return x.clamp(0, 1)


def _normal_like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like `x`, drawn where `x` lives. On a GPU, drawing it on the
    CPU and copying it over took two thirds of a 224-px CEMA step (an H200, 8 teacher views); there
    a device generator seeded from `g` draws it, so a run stays reproducible from its seed."""
    if x.device.type == "cpu":
        return torch.randn(x.shape, generator=g, dtype=x.dtype)
    seed = int(torch.randint(0, 2**62, (), generator=g).item())
    return torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device, dtype=x.dtype)
