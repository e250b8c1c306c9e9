"""On-device reference methods (server/baselines.py) on a tiny seeded BN CNN, plus one real check."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from server.augment import cotta_augment
from server.baselines import build_method
from server.engine import entropy
from server.norm import affine_parameters
from tests.conftest import SHARED, missing_shared

RESNET20_PATH, CIFAR_TEST_PATH = "models/cifar10-resnet/resnet20-12fca82f.th", "data/cifar10/test.npz"
RESNET20, CIFAR_TEST = SHARED / RESNET20_PATH, SHARED / CIFAR_TEST_PATH


def tiny_net(seed: int = 0, logit_scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    with torch.no_grad():
        net[-1].weight.mul_(logit_scale)
    return net.eval()


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def distance(a: nn.Module, b: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - b[n]).pow(2).sum()) for n, p in a.named_parameters()) ** 0.5


def test_unknown_name_rejected() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        build_method("sar", tiny_net(), 10)


def test_source_never_changes_parameters_or_caller_model() -> None:
    model = tiny_net()
    original = copy.deepcopy(model.state_dict())
    method = build_method("source", model, 10)
    before = params(method.model)
    x = images()
    out = method.predict_and_adapt(x)
    method.predict_and_adapt(images(seed=2))
    assert not changed(before, method.model)
    torch.testing.assert_close(out, model(x))
    assert (method.forward_passes, method.backward_passes) == (32, 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])


def test_bn_uses_batch_statistics_without_gradient() -> None:
    model = tiny_net()
    method = build_method("bn", model, 10)
    before = params(method.model)
    x = images()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = reference(x)
    for _ in range(2):  # running statistics are never used, so repeated calls agree
        torch.testing.assert_close(method.predict_and_adapt(x), expected)
    assert not changed(before, method.model)
    assert (method.forward_passes, method.backward_passes) == (32, 0)


def test_tent_updates_only_affine_and_lowers_entropy() -> None:
    method = build_method("tent", tiny_net(), 10, lr=1e-2)
    affine = {id(p) for p in affine_parameters(method.model)}
    affine_names = {n for n, p in method.model.named_parameters() if id(p) in affine}
    before = params(method.model)
    x = images()
    entropies = [float(entropy(method.predict_and_adapt(x)).mean()) for _ in range(5)]
    assert changed(before, method.model) == affine_names
    assert entropies[-1] < entropies[0]
    assert (method.forward_passes, method.backward_passes) == (80, 80)
    method.reset()
    assert not changed(before, method.model)


def test_tent_sgd_option() -> None:
    method = build_method("tent", tiny_net(), 10, optimizer="sgd")
    assert isinstance(method.optimizer, torch.optim.SGD) and method.optimizer.defaults["lr"] == 2.5e-4
    with pytest.raises(ValueError):
        build_method("tent", tiny_net(), 10, optimizer="rmsprop")


def test_eata_skips_unreliable_batch() -> None:
    method = build_method("eata", tiny_net(), 10)  # untrained: entropies near ln 10
    before = params(method.model)
    x = images()
    with torch.no_grad():
        assert float(entropy(method.model(x)).min()) > 0.4 * math.log(10)
    method.predict_and_adapt(x)
    assert not changed(before, method.model)
    assert (method.forward_passes, method.backward_passes) == (16, 0)
    assert method.num_samples_update_1 == 0


def test_eata_updates_reliable_samples_and_counts_them() -> None:
    method = build_method("eata", tiny_net(logit_scale=200.0), 10, optimizer="adam", lr=1e-2)
    before = params(method.model)
    method.predict_and_adapt(images())
    kept = method.num_samples_update_2
    assert 0 < kept <= 16 and method.backward_passes == kept
    assert changed(before, method.model)
    method.reset()
    assert method.current_model_probs is None and not changed(before, method.model)


def test_eata_fisher_keeps_parameters_near_source() -> None:
    loose = {"optimizer": "adam", "lr": 1e-2, "e_margin": 10.0, "d_margin": 2.0}  # every sample passes
    fisher_images = images(64, seed=7)
    dist = {}
    for alpha in (0.0, 1e8):  # Adam: the step size stays bounded for any alpha
        method = build_method("eata", tiny_net(), 10, fisher_images=fisher_images, fisher_alpha=alpha, **loose)
        source = params(method.model)
        for step in range(10):
            method.predict_and_adapt(images(seed=10 + step))
        dist[alpha] = distance(method.model, source)
    assert dist[1e8] < 0.5 * dist[0.0]


def test_cotta_updates_teacher_slowly_and_resets() -> None:
    method = build_method("cotta", tiny_net(), 10, n_augmentations=2)
    source = params(method.model)
    x = images()
    for _ in range(3):
        out = method.predict_and_adapt(x)
    assert out.shape == (16, 10)
    student, teacher = distance(method.model, source), distance(method.model_ema, source)
    assert student > 0 and teacher < 0.01 * student
    # untrained net: the anchor is never confident, so every batch uses the augmented teacher
    assert method.forward_passes == 3 * 16 * (3 + 2)
    assert method.backward_passes == 3 * 16
    method.reset()
    assert distance(method.model, source) == 0 and distance(method.model_ema, source) == 0


def test_cotta_skips_augmentations_when_anchor_confident() -> None:
    method = build_method("cotta", tiny_net(), 10, n_augmentations=2, ap=0.0)
    method.predict_and_adapt(images())
    assert method.forward_passes == 16 * 3


def test_cotta_augment_shapes_and_range() -> None:
    x = images(4, seed=3)
    y = cotta_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.equal(x, y)
    assert (y - x).abs().mean() < 0.5  # jitter, not a different image


def test_real_resnet20_bn_and_tent_beat_source() -> None:
    if reason := missing_shared(RESNET20_PATH, CIFAR_TEST_PATH):
        pytest.skip(reason)
    from driftsync.data.corruptions import corrupt
    from server.models.registry import build_model

    torch.set_num_threads(1)
    data = np.load(CIFAR_TEST, allow_pickle=False)
    x = corrupt(data["x_exact1000"][:200], "gaussian_noise", 5, np.random.default_rng(0), constants="cifar10")
    xs = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0)
    ys = torch.from_numpy(data["y_exact1000"][:200])
    model = build_model(f"resnet20:{RESNET20}")
    errors = {}
    for name in ("source", "bn", "tent"):
        method = build_method(name, model, 10)
        wrong = sum(int((method.predict_and_adapt(xb).argmax(1) != yb).sum())
                    for xb, yb in zip(xs.split(100), ys.split(100)))
        errors[name] = wrong / len(ys)
    assert errors["bn"] < errors["source"] and errors["tent"] < errors["source"], errors
