"""Stream settings: every method given the same arguments sees the same frames, in the same order."""
from __future__ import annotations

import numpy as np
import pytest

from driftsync.data import streams


@pytest.fixture(scope="module")
def base():
    return streams.embedded_base(40)


def _collect(setting, base, corruptions=("gaussian_noise", "fog"), severity=5, batch_size=10, **kw):
    images, labels = base
    return list(streams.stream(setting, streams.corrupting(images, labels, 3), list(corruptions), severity, batch_size, seed=3, **kw))


def test_continual_visits_each_domain_once_in_order_on_the_same_images(base):
    chunks = _collect("continual", base)
    assert [c.domain.name for c in chunks] == ["gaussian_noise"] * 4 + ["fog"] * 4
    np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks[:4]]), base[1])
    assert not any(c.reset for c in chunks)
    assert streams.stream_length("continual", 40, ["gaussian_noise", "fog"], 5) == sum(len(c.labels) for c in chunks)


def test_streams_are_identical_for_identical_arguments(base):
    a, b = _collect("correlated", base), _collect("correlated", base)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)


def test_reset_each_shift_flags_the_first_batch_of_every_domain(base):
    chunks = _collect("reset_each_shift", base)
    assert [c.reset for c in chunks] == [True, False, False, False] * 2
    continual = _collect("continual", base)
    for x, y in zip(chunks, continual, strict=True):
        np.testing.assert_array_equal(x.images, y.images)


def test_gradual_ramps_severity_up_and_down_per_corruption(base):
    chunks = _collect("gradual", base, corruptions=("contrast",), severity=5, batch_size=40)
    assert [c.domain.severity for c in chunks] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert chunks[0].domain_names()[0] == "contrast@1" and chunks[4].domain.key == "contrast@5"
    spread = [float(c.images.std()) for c in chunks]
    assert spread[0] > spread[4]  # contrast at severity 5 flattens the images most
    assert streams.stream_length("gradual", 40, ["contrast"], 5) == 40 * 9


def test_mixed_shuffles_all_domains_together_and_keeps_per_sample_domains(base):
    chunks = _collect("mixed", base)
    names = [n for c in chunks for n in c.domain_names()]
    assert len(names) == 80 and names.count("gaussian_noise") == 40 and names.count("fog") == 40
    assert any(len(set(c.domain_names())) > 1 for c in chunks)
    assert all(c.domain.name == "mixed" for c in chunks)


def test_correlated_orders_labels_in_bursts(base):
    images, labels = streams.embedded_base(400)
    chunks = list(streams.stream("correlated", streams.corrupting(images, labels, 1), ["fog"], 5, 20, seed=1, dirichlet=0.05))
    continual = list(streams.stream("continual", streams.corrupting(images, labels, 1), ["fog"], 5, 20, seed=1))
    distinct = lambda cs: np.mean([len(np.unique(c.labels)) for c in cs])
    assert distinct(chunks) < 0.7 * distinct(continual)
    assert sorted(np.concatenate([c.labels for c in chunks]).tolist()) == sorted(labels.tolist())


def test_unknown_setting_is_refused(base):
    with pytest.raises(ValueError, match="unknown setting"):
        _collect("sideways", base)
