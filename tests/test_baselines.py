"""On-device reference methods (server/baselines.py) on a tiny seeded BN CNN, plus one real check."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from server.augment import cotta_augment
from server.baselines import build_method, soft_likelihood_ratio
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
        build_method("rmt", tiny_net(), 10)


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


def test_published_settings_follow_the_class_count() -> None:
    cifar, imagenet = build_method("eata", tiny_net(), 10), build_method("eata", tiny_net(), 1000)
    assert isinstance(cifar.optimizer, torch.optim.Adam) and cifar.optimizer.defaults["lr"] == 1e-3
    assert (cifar.d_margin, cifar.fisher_alpha) == (0.4, 1.0)
    assert isinstance(imagenet.optimizer, torch.optim.SGD) and imagenet.optimizer.defaults["lr"] == 2.5e-4
    assert (imagenet.d_margin, imagenet.fisher_alpha) == (0.05, 2000.0)
    assert math.isclose(imagenet.e_margin, 0.4 * math.log(1000))
    roid, sar = build_method("roid", tiny_net(), 1000), build_method("sar", tiny_net(), 10)
    assert isinstance(roid.optimizer, torch.optim.SGD) and roid.optimizer.defaults["lr"] == 2.5e-4
    assert isinstance(sar.optimizer, torch.optim.SGD) and sar.optimizer.defaults["lr"] == 1e-3
    assert build_method("eata", tiny_net(), 10, d_margin=0.1).settings["d_margin"] == 0.1  # overrides win


def test_eata_without_fisher_images_reports_no_fisher_term() -> None:
    method = build_method("eata", tiny_net(), 10)
    assert method.fishers is None and method.settings["fisher_images"] == 0
    with_fisher = build_method("eata", tiny_net(), 10, fisher_images=images(32, seed=5))
    assert with_fisher.fishers and with_fisher.settings["fisher_images"] == 32


def test_roid_weights_zero_the_less_diverse_and_scale_by_certainty() -> None:
    method = build_method("roid", tiny_net(), 10)
    logits = torch.tensor([[8.0] + [0.0] * 9, [0.0, 8.0] + [0.0] * 8, [0.0] * 10, [0.0] * 9 + [1.0]])
    method.class_probs_ema = torch.tensor([1.0] + [0.0] * 9)  # the past favoured class 0
    w = method.weights(logits)
    assert w[0] == 0  # agrees with the past: redundant
    assert w[1] == pytest.approx(math.exp(3.0))  # new class and most certain: exp(1 * 1 / T), T = 1/3
    assert 0 < w[3] < w[1] and (w == 0).sum() >= 1
    # the loss is finite and decreasing in certainty, even for one-hot predictions (clipped at 0.99)
    slr = soft_likelihood_ratio(torch.tensor([[50.0] + [0.0] * 9, [1.0] + [0.0] * 9]))
    assert torch.isfinite(slr).all() and slr[0] < slr[1]


def test_roid_adapts_every_batch_ensembles_with_source_and_corrects_the_prior() -> None:
    raw = build_method("roid", tiny_net(), 10, prior_correction=False)
    method = build_method("roid", tiny_net(), 10)
    source = params(method.model)
    x = images()
    out_raw, out = raw.predict_and_adapt(x), method.predict_and_adapt(x)
    prior = out_raw.softmax(1).mean(0)
    smooth = max(1 / 16, 1 / 10) / prior.max()
    torch.testing.assert_close(out, out_raw * (prior + smooth) / (1 + smooth * 10))
    assert not torch.allclose(method.class_probs_ema, torch.full((10,), 0.1))  # the diversity EMA moved
    for step in range(3):  # past the first batch: every batch steps on its weighted samples
        before = params(method.model)
        backward = method.backward_passes
        method.predict_and_adapt(images(seed=20 + step))
        assert changed(before, method.model) and method.backward_passes > backward
    adrift = distance(method.model, source)
    anchored = build_method("roid", tiny_net(), 10, momentum_src=0.5)
    for step in range(4):
        anchored.predict_and_adapt(images(seed=20 + step) if step else x)
    assert 0 < distance(anchored.model, source) < adrift  # weight ensembling pulls back to the source
    method.reset()
    assert not changed(source, method.model) and torch.equal(method.class_probs_ema, torch.full((10,), 0.1))


def test_sar_sharpness_aware_step_and_recovery() -> None:
    skipped = build_method("sar", tiny_net(), 10)  # untrained: no sample under 0.4 ln C
    before = params(skipped.model)
    skipped.predict_and_adapt(images())
    assert not changed(before, skipped.model) and (skipped.forward_passes, skipped.backward_passes) == (16, 0)

    method = build_method("sar", tiny_net(logit_scale=30.0), 10, lr=1e-2)
    source = params(method.model)
    for step in range(3):  # past the first batch
        before = params(method.model)
        method.predict_and_adapt(images(seed=30 + step))
        assert changed(before, method.model)
    assert method.forward_passes == 2 * 3 * 16 and 0 < method.backward_passes <= 2 * 3 * 16
    assert method.ema is not None and method.recoveries == 0
    recovering = build_method("sar", tiny_net(logit_scale=30.0), 10, lr=1e-2, reset_constant=1e9)
    recovering.predict_and_adapt(images(seed=30))  # the loss EMA is under the threshold: back to the source
    assert recovering.recoveries == 1 and recovering.ema is None and not changed(source, recovering.model)


def test_real_resnet20_eata_roid_sar_adapt_past_the_first_batches() -> None:
    if reason := missing_shared(RESNET20_PATH, CIFAR_TEST_PATH):
        pytest.skip(reason)
    from driftsync.data.corruptions import corrupt
    from server.models.registry import build_model

    torch.set_num_threads(1)
    data = np.load(CIFAR_TEST, allow_pickle=False)
    x = corrupt(data["x_exact1000"][:300], "gaussian_noise", 5, np.random.default_rng(0), constants="cifar10")
    batches = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).split(100)
    clean = torch.from_numpy(data["x"][-500:]).permute(0, 3, 1, 2).float().div(255.0)  # not in the stream
    model = build_model(f"resnet20:{RESNET20}")
    bn = build_method("bn", model, 10)
    methods = {"eata": build_method("eata", model, 10, fisher_images=clean),
               "roid": build_method("roid", model, 10), "sar": build_method("sar", model, 10)}
    imagenet_eata = build_method("eata", model, 10, d_margin=0.05)  # the ImageNet margin: the old behaviour
    assert methods["eata"].settings["fisher_images"] == 500
    kept_first = {}
    for i, xb in enumerate(batches):
        expected = bn.predict_and_adapt(xb)
        imagenet_eata.predict_and_adapt(xb)
        if i == 0:
            kept_first = {"cifar": methods["eata"].num_samples_update_2, "imagenet": imagenet_eata.num_samples_update_2}
        for name, method in methods.items():
            before, backward = params(method.model), method.backward_passes
            out = method.predict_and_adapt(xb)
            if i > 0:
                assert method.backward_passes - backward >= 30, name  # a reasonable share keeps stepping
                assert changed(before, method.model), name
                assert not torch.allclose(out, expected, atol=1e-3), name  # not bn
    later_cifar = methods["eata"].num_samples_update_2 - kept_first["cifar"]
    later_imagenet = imagenet_eata.num_samples_update_2 - kept_first["imagenet"]
    assert later_imagenet < 0.1 * later_cifar, (later_imagenet, later_cifar)  # margin 0.05 starves after batch 1
