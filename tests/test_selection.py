"""CEMA's upload filter and the bandwidth budget, as pure functions of their inputs."""
from __future__ import annotations

import math

import numpy as np

from device_client.scoring import entropy, softmax, to_model_input
from device_client.selection import (
    CemaSelector,
    SelectionConfig,
    TokenBucket,
    UploadBudget,
)


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
