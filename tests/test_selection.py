"""CEMA's upload filter and the bandwidth budget, as pure functions of their inputs."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import pytest

from device_client.scoring import entropy, softmax, to_model_input
from device_client.selection import (
    CemaSelector,
    SelectionConfig,
    ShareBudget,
    TokenBucket,
    UploadBudget,
)
from driftsync.data import streams
from tests.conftest import SHARED, missing_shared


def _probs_with_entropy(values: list[float], classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Build probability rows by temperature so their entropies span low to high."""
    logits = np.zeros((len(values), classes))
    logits[:, 0] = values
    probs = softmax(logits)
    return probs, entropy(probs)


def test_scoring_matches_definitions():
    probs = softmax(np.array([[0.0, 0.0], [100.0, 0.0]]))
    np.testing.assert_allclose(probs[0], [0.5, 0.5])
    np.testing.assert_allclose(entropy(probs), [math.log(2), 0.0], atol=1e-9)
    x = to_model_input(np.full((1, 2, 2, 3), 255, np.uint8))
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32 and x.max() == 1.0


def test_static_window_keeps_only_entropy_between_e_min_and_e_max():
    selector = CemaSelector(SelectionConfig(num_classes=10, dynamic_lambda=None, e_min_factor=0.02))
    probs, ent = _probs_with_entropy([20.0, 6.0, 4.0, 2.0, 0.0])
    keep = selector.select(probs, ent)
    expected = (ent < 0.4 * math.log(10)) & (ent > 0.02 * math.log(10))
    np.testing.assert_array_equal(keep, expected)
    assert keep.any() and not keep.all()
    assert selector.counts["unreliable"] == int((ent >= 0.4 * math.log(10)).sum())
    assert selector.counts["low_info"] == int(((ent <= 0.02 * math.log(10))).sum())


def test_dynamic_e_max_follows_the_stream_entropy():
    selector = CemaSelector(SelectionConfig(num_classes=10, dynamic_lambda=0.6, warmup_samples=4))
    probs, ent = _probs_with_entropy([3.0] * 4)
    selector.select(probs, ent)
    assert math.isclose(selector.e_max(), 0.4 * math.log(10) * 0.6)  # mean so far == warm-up mean
    hi_probs, hi_ent = _probs_with_entropy([1.0] * 12)
    selector.select(hi_probs, hi_ent)
    assert selector.e_max() > 0.4 * math.log(10) * 0.6  # harder stream, wider window


def test_redundancy_filter_drops_repeats_of_recent_uploads():
    selector = CemaSelector(SelectionConfig(num_classes=10, dynamic_lambda=None, e_max_factor=2.0, redundancy_margin=0.99))
    probs, ent = _probs_with_entropy([3.0] * 5)
    keep = selector.select(probs, ent)
    assert keep.sum() == 1 and selector.counts["redundant"] == 4
    other = np.roll(probs, 3, axis=1)
    assert selector.select(other, entropy(other)).sum() >= 1


def test_token_bucket_limits_rate_and_refills():
    bucket = TokenBucket(rate=10.0, burst=10.0)
    assert sum(bucket.take(1, now=0.0) for _ in range(20)) == 10
    assert not bucket.take(1, now=0.05)
    assert bucket.take(1, now=0.2)
    assert TokenBucket(rate=None, burst=0).take(10**9, now=0.0)


def test_budget_needs_both_samples_and_bytes():
    budget = UploadBudget.from_rates(samples_per_s=100.0, bytes_per_s=1000.0, burst_s=1.0)
    assert budget.allow(60_000, now=0.0)  # the first burst covers one large sample
    assert not budget.allow(60_000, now=0.0)
    sample_tokens = budget.samples.tokens
    assert not budget.allow(10**6, now=0.0)
    assert budget.samples.tokens == sample_tokens  # a refused sample spends nothing


def test_cheap_views_and_their_variance() -> None:
    from device_client.scoring import cheap_views, view_variance

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    views = cheap_views(images, 4)
    assert views.shape == (12, 8, 8, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[:3], images[:, :, ::-1])  # view 0: the flip
    np.testing.assert_array_equal(views[3:6, :-2], images[:, 2:])  # view 1: shifted by 2 rows
    same = np.tile(np.eye(4)[None, :2], (5, 1, 1))  # 5 views agreeing: no variance
    split = np.stack([np.eye(4)[[0, 1]], np.eye(4)[[0, 2]]])  # sample 1 flips between classes
    assert np.allclose(view_variance(same), 0)
    assert view_variance(split)[0] == 0 and view_variance(split)[1] > 0


def test_ugs_keeps_the_most_uncertain_share() -> None:
    from device_client.selection import UgsConfig, UgsSelector

    selector = UgsSelector(UgsConfig(views=4, keep=0.25))
    variance = np.array([0.1, 0.9, 0.0, 0.5, 0.3, 0.8, 0.2, 0.05])
    keep = selector.select(variance)
    assert keep.tolist() == [False, True, False, False, False, True, False, False]
    assert selector.counts == {"kept": 2, "below_rank": 6}
    assert not UgsSelector(UgsConfig(keep=0.0)).select(variance).any()


# --------------------------------------------------------------------------- the share budget

BUDGET = 0.2


def _budgeted(ent: np.ndarray, batch: int = 16, **cfg) -> np.ndarray:
    """Run a default budgeted CEMA selector over an entropy sequence in device batches; the kept mask."""
    selector = CemaSelector(SelectionConfig(num_classes=10, upload_share=BUDGET, **cfg))
    probs = np.full((len(ent), 10), 0.1)  # the budget ranks by entropy; the probabilities only feed redundancy
    return np.concatenate([selector.select(probs[i : i + batch], ent[i : i + batch]) for i in range(0, len(ent), batch)])


def _assert_within_budget(ent: np.ndarray, keep: np.ndarray, what: str) -> None:
    share = keep.mean()
    assert share <= BUDGET + 1e-9, f"{what}: uploaded {share:.3f} of frames, over the {BUDGET} budget"
    assert share >= 0.75 * BUDGET, f"{what}: uploads collapsed to {share:.3f} of frames"
    assert ent[keep].mean() > ent[~keep].mean(), f"{what}: the uploads are not the more uncertain frames"


def test_share_budget_holds_on_a_device_that_sees_only_hard_frames() -> None:
    ent = np.random.default_rng(0).uniform(0.85, 1.0, 2000) * math.log(10)  # every frame near maximum entropy
    keep = _budgeted(ent)
    _assert_within_budget(ent, keep, "hard frames only")
    window = CemaSelector(SelectionConfig(num_classes=10))  # the entropy window alone uploads none of them
    assert not window.select(np.full((len(ent), 10), 0.1), ent).any()


def test_share_budget_caps_a_burst_of_hard_frames_after_a_quiet_stretch() -> None:
    rng = np.random.default_rng(1)
    ent = np.concatenate([rng.uniform(0.0, 0.1, 3008), rng.uniform(2.0, 2.3, 1008)])
    keep = _budgeted(ent, e_min_factor=0.05)  # the quiet stretch is all below E_min: nothing sent, credit capped
    assert not keep[:3008].any()
    cap = ShareBudget(BUDGET).burst
    for n in (64, 256, 1000):  # saved-up credit buys at most `burst` frames' worth more, over any span
        assert keep[3008 : 3008 + n].sum() <= BUDGET * (n + cap)
    assert keep[3008 : 3008 + 64].sum() > BUDGET * 64  # ...which it does spend on the burst
    assert keep.mean() <= BUDGET


def test_share_budget_serves_frame_at_a_time_devices_and_skips_nan() -> None:
    ent = np.random.default_rng(2).uniform(0.1, 2.0, 1000)
    ent[::7] = np.nan
    keep = _budgeted(ent, batch=1)
    assert not keep[np.isnan(ent)].any()
    finite = ~np.isnan(ent)
    _assert_within_budget(ent[finite], keep[finite], "frame at a time")


def test_share_budget_keeps_e_min_as_a_floor() -> None:
    """A stream of confident frames sends nothing under E_min: the budget is a ceiling, not a quota."""
    ent = np.random.default_rng(3).uniform(0.0, 0.04, 500)
    assert not _budgeted(ent, e_min_factor=0.02).any()
    assert _budgeted(ent).mean() > 0  # without E_min the budget still sends the least confident


def test_redundant_frames_give_their_credit_back() -> None:
    selector = CemaSelector(SelectionConfig(num_classes=10, upload_share=0.5, redundancy_margin=0.99))
    probs, ent = _probs_with_entropy([3.0] * 8)
    assert selector.select(probs, ent).sum() == 1  # four chosen by the budget, three of them repeats
    assert selector.counts["redundant"] == 3 and selector.budget.credit == 3.0


def test_ugs_under_the_budget_ranks_view_variance_within_it() -> None:
    from device_client.selection import UgsConfig, UgsSelector

    variance = np.random.default_rng(4).uniform(0, 1, 800)
    selector = UgsSelector(UgsConfig(keep=0.25), ShareBudget(BUDGET))  # batches of 8: 2 of 8 would be 25%
    keep = np.concatenate([selector.select(variance[i : i + 8]) for i in range(0, len(variance), 8)])
    _assert_within_budget(variance, keep, "ugs in batches of 8")
    assert selector.counts["kept"] == keep.sum()


def test_share_budget_refuses_a_share_outside_zero_to_one() -> None:
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="upload share"):
            ShareBudget(share)


# Real score sequences: the real stream schedules, scored by a real model as the device would.
_RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
_CIFAR = SHARED / "data" / "cifar10" / "test.npz"
_MODELS = [
    pytest.param("embedded-student", id="embedded"),
    pytest.param(f"resnet20:{_RESNET20}", id="resnet20", marks=pytest.mark.skipif(
        missing_shared("models/cifar10-resnet/resnet20-12fca82f.th", "data/cifar10/test.npz") is not None,
        reason=missing_shared("models/cifar10-resnet/resnet20-12fca82f.th", "data/cifar10/test.npz") or "")),
]


@functools.lru_cache(maxsize=2)
def _scores_of(spec: str) -> Callable[[streams.Domain], streams.Frames]:
    """A domain source whose "frames" are the model's entropies on the domain's real corrupted
    images (32 base images): the real stream code then orders them as a device would see them."""
    import torch

    from server.models.registry import build_model

    if spec == "embedded-student":
        images, labels = streams.embedded_base(32)
    else:
        images, labels = streams.npz_base(_CIFAR, 32, key="x_exact1000", label_key="y_exact1000")
    corrupt = streams.corrupting(images, labels)
    model = build_model(spec).eval()
    cache: dict[str, streams.Frames] = {}

    def source(domain: streams.Domain) -> streams.Frames:
        if domain.key not in cache:
            with torch.no_grad():
                logits = model(torch.from_numpy(to_model_input(corrupt(domain).images))).numpy()
            cache[domain.key] = streams.ArrayFrames(entropy(softmax(logits.astype(np.float64))), labels)
        return cache[domain.key]

    return source


@pytest.mark.parametrize("spec", _MODELS)
@pytest.mark.parametrize("setting", streams.SETTINGS)
def test_share_budget_holds_on_every_stream_setting(spec: str, setting: str) -> None:
    corruptions = ["gaussian_noise", "fog", "frost"] if setting == "gradual" else streams.parse_corruptions("all")
    ent = np.concatenate([c.images for c in streams.stream(setting, _scores_of(spec), corruptions, 5, batch_size=16)])
    keep = _budgeted(ent)
    _assert_within_budget(ent, keep, f"{setting} stream")
