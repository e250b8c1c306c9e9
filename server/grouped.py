"""One teacher forward for many cohorts.

Each cohort's slice of the batch is normalised with its own batch statistics and
scaled by its own affine parameters, so the result equals separate forwards per
cohort, while the convolutions (the cost) run once over the whole batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def grouped_batch_norm(
    model: nn.Module, bounds: list[tuple[int, int]], affine: list[dict[str, torch.Tensor]]
) -> Iterator[None]:
    """Within the block, every BatchNorm of `model` normalises rows a:b of its input with those
    rows' statistics and group g's `<layer>.weight` / `<layer>.bias` from `affine[g]`.
    Running statistics are neither used nor updated."""
    layers = norm_layers(model)

    def grouped(name: str, layer: nn.modules.batchnorm._BatchNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([
                F.batch_norm(x[a:b], None, None, affine[g].get(f"{name}.weight"), affine[g].get(f"{name}.bias"),
                             training=True, momentum=0.0, eps=layer.eps)
                for g, (a, b) in enumerate(bounds)
            ])
        return forward

    for name, layer in layers.items():
        layer.forward = grouped(name, layer)
    try:
        yield
    finally:
        for layer in layers.values():
            del layer.forward
