"""The student's replaceable tensors: normalization affine parameters and statistics, the
input prompt when there is one, and every convolution's weight when the student learns them.

These names are the contract between the server's torch model, the ONNX graph
and every delta: `<module path>.{weight,bias,running_mean,running_var}`, `prompt.<field>` and
`<conv module path>.weight`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from server.prompt import prompt_parameters

NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


LEARNT_CONVS = "_driftsync_learns_convs"  # marks a student whose deltas carry convolution weights


def learn_conv_weights(model: nn.Module, learn: bool = True) -> nn.Module:
    """Make every convolution's weight replaceable (or no longer, `learn=False`), so deltas move
    it. Affine parameters alone cannot undo a corruption the features already carry (noise above
    all); a small student's convolutions can, at the price of a delta about the size of the weights."""
    setattr(model, LEARNT_CONVS, learn)
    return model


def conv_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learnt convolution weights by delta name; none unless `learn_conv_weights` marked the model."""
    if not getattr(model, LEARNT_CONVS, False):
        return {}
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Only these receive gradients during adaptation."""
    params: list[nn.Parameter] = []
    for layer in norm_layers(model).values():
        params += [p for p in (layer.weight, layer.bias) if p is not None]
    return params


def replaceable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of every tensor a delta may replace, by its delta name."""
    state: dict[str, np.ndarray] = {}
    for name, layer in norm_layers(model).items():
        for field in NORM_FIELDS:
            value = getattr(layer, field)
            if value is not None:
                state[f"{name}.{field}"] = value.detach().cpu().numpy().astype(np.float32, copy=True)
    for name, param in (conv_weights(model) | prompt_parameters(model)).items():
        state[name] = param.detach().cpu().numpy().astype(np.float32, copy=True)
    return state


def for_the_wire(tensors: dict[str, np.ndarray], model: nn.Module) -> dict[str, np.ndarray]:
    """Learnt convolution weights travel as float16, everything else as float32. A conv delta is
    almost all convolution weights (ResNet-20: 1.08 MB in float32), and a device computes in
    float32 either way (it upcasts what it accepts). The cloud keeps float32 masters and rounds
    each version afresh, so rounding never accumulates; a weight float16 cannot hold stays float32."""
    convs = conv_weights(model)
    out = {}
    for name, value in tensors.items():
        if name in convs:
            with np.errstate(over="ignore"):
                half = value.astype(np.float16)
            value = half if np.isfinite(half).all() else value
        out[name] = value
    return out


@torch.no_grad()
def load_replaceable_state(model: nn.Module, state: dict[str, np.ndarray | torch.Tensor]) -> None:
    layers = norm_layers(model)
    whole = conv_weights(model) | prompt_parameters(model)
    for key, value in state.items():
        if key in whole:
            target = whole[key]
        else:
            layer_name, field = key.rsplit(".", 1)
            target = getattr(layers[layer_name], field)
        target.copy_(torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value)


def freeze_all_but_learnt(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but what deltas move: the affine parameters, and the marked convolutions'
    weights. Returns those."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = affine_parameters(model) + list(conv_weights(model).values())
    for p in params:
        p.requires_grad_(True)
    return params
