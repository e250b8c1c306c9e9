"""One teacher forward for many cohorts.

Each cohort's slice of the batch is normalised with its own batch statistics and
scaled by its own affine parameters, so the result equals separate forwards per
cohort, while the convolutions (the cost) run once over the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from server.norm import norm_layers


def bounds_of(sizes: list[int]) -> list[tuple[int, int]]:
    """[3, 2] -> [(0, 3), (3, 5)]."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


Forward = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def _norm_forwards(model: nn.Module, forward_of: Callable[[str, nn.modules.batchnorm._BatchNorm], Forward]) -> Iterator[None]:
    """Within the block, each BatchNorm of `model` runs `forward_of(its name, itself)` instead of
    its own forward; leaving the block restores every layer, also after an exception."""
    layers = norm_layers(model)
    for name, layer in layers.items():
        layer.forward = forward_of(name, layer)
    try:
        yield
    finally:
        for layer in layers.values():
            del layer.forward


def grouped_batch_norm(
    model: nn.Module, bounds: list[tuple[int, int]], affine: list[dict[str, torch.Tensor]]
) -> AbstractContextManager[None]:
    """Within the block, every BatchNorm of `model` normalises rows a:b of its input with those
    rows' statistics and group g's `<layer>.weight` / `<layer>.bias` from `affine[g]`.
    Running statistics are neither used nor updated."""

    def grouped(name: str, layer: nn.modules.batchnorm._BatchNorm) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([
                F.batch_norm(x[a:b], None, None, affine[g].get(f"{name}.weight"), affine[g].get(f"{name}.bias"),
                             training=True, momentum=0.0, eps=layer.eps)
                for g, (a, b) in enumerate(bounds)
            ])
        return forward

    return _norm_forwards(model, grouped)


def device_batch_norm(model: nn.Module, stats: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
    """Within the block, every BatchNorm of `model` normalises by the statistics a device measured
    on its batch (`<layer>.running_mean` / `<layer>.running_var` in `stats`), while its gradient is
    train-mode BN's over the rows given (a straight-through estimate). The student distils on
    exactly what its device computed from the whole batch, not on the statistics of the few
    uncertain frames it uploaded, and still learns for a network that renormalises every batch
    (without that gradient the stream collapsed: `ReplayGroup`). Running statistics are neither
    used nor updated."""

    def straight_through(name: str, layer: nn.modules.batchnorm._BatchNorm) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            axes = [0, *range(2, x.dim())]
            mean, var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
            mean = mean + (stats[f"{name}.running_mean"] - mean).detach()
            var = var + (stats[f"{name}.running_var"] - var).detach()
            scale = torch.rsqrt(var + layer.eps)
            shape = [1, -1] + [1] * (x.dim() - 2)
            if layer.weight is not None:
                scale = scale * layer.weight
            shift = -mean * scale if layer.bias is None else layer.bias - mean * scale
            return x * scale.view(shape) + shift.view(shape)
        return forward

    return _norm_forwards(model, straight_through)
