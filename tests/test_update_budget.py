"""The running-statistics compute budget: the rule on its own, then inside a real device."""
from __future__ import annotations

import time

import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from device_client.update_budget import UpdateBudget


def test_a_refresh_waits_until_inference_has_earned_its_cost():
    budget = UpdateBudget(0.1)
    assert budget.allows_refresh()  # nothing known yet: the first refresh measures the cost
    budget.spent(1.0, refresh=True)
    assert not budget.allows_refresh()
    budget.inference(19.9)  # pays the first refresh back (10 s) and nearly the next one (10 s)
    assert not budget.allows_refresh()
    budget.inference(0.1)
    assert budget.allows_refresh()
    assert budget.refreshes == 1 and budget.spent_share() == pytest.approx(1.0 / 20.0) and budget.refresh_s == 1.0


def test_delta_installs_spend_the_same_budget_and_idle_credit_is_not_banked():
    budget = UpdateBudget(0.1)
    budget.spent(1.0, refresh=True)
    budget.inference(1000.0)  # a long spell with no refresh banks one refresh's worth, no more
    assert budget.allows_refresh()
    budget.spent(1.0, refresh=True)
    assert not budget.allows_refresh()
    budget.inference(10.0)
    assert budget.allows_refresh()
    budget.spent(0.5)  # a delta install: not a refresh, but the core's time all the same
    assert not budget.allows_refresh() and budget.refreshes == 2 and budget.refresh_cost == 1.0
    assert budget.update_s == 2.5 and budget.refresh_s == 2.0
    budget.inference(5.0)
    assert budget.allows_refresh()


def test_without_a_budget_every_refresh_is_allowed_and_still_counted():
    budget = UpdateBudget(None)
    for _ in range(3):
        assert budget.allows_refresh()
        budget.spent(1.0, refresh=True)
    budget.inference(2.0)
    assert budget.spent_share() == 1.5 and budget.refreshes == 3


@pytest.mark.parametrize("share", [0.0, -0.1])
def test_a_budget_must_be_a_positive_share(share):
    with pytest.raises(ValueError, match="above 0"):
        UpdateBudget(share)


def test_a_greedy_refresher_stays_within_the_budget_by_at_most_one_refresh():
    """Refreshing whenever allowed, with deltas landing as well, the spent update time never exceeds
    the budget by more than the deltas' own cost plus the last refresh's."""
    rng = np.random.default_rng(0)
    budget = UpdateBudget(0.04)
    installs = 0.0
    for frame in range(1, 20_001):
        budget.inference(1e-3 * rng.uniform(0.8, 1.2))
        if frame % 160 == 0:
            cost = 2e-3 * rng.uniform(0.5, 2.0)
            budget.spent(cost)
            installs += cost
        if frame % 16 == 0 and budget.allows_refresh():
            budget.spent(20e-3 * rng.uniform(0.5, 2.0), refresh=True)
            assert budget.update_s - installs <= 0.04 * budget.inference_s + budget.refresh_cost
    assert 5 < budget.refreshes < 20_000 // 16 / 10


def test_a_running_device_keeps_its_statistics_refreshes_within_the_budget(tiny_server, tmp_path):
    """A burst of frames through a real device: the statistics thread refreshes (more than once),
    but far less often than every batch, and its update time stays within the budget."""
    url, _ = tiny_server
    share = 0.1
    # E_max near 0: the uncertain tiny student uploads nothing, so no delta spends the budget here
    cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", e_max_factor=0.01, dynamic_lambda=None,
                       upload_flush_s=0.1, poll_wait_s=1.0, threads=1, normalization="running", stats_budget=share)
    device = DeviceClient(cfg).start()
    frames = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    deadline, batches = time.monotonic() + 30, 0
    while (device.stats_updates < 4 or batches < 200) and time.monotonic() < deadline:
        device.predict(frames)
        batches += 1
    budget = device._running.budget
    assert len(device._running._frames) <= 4 * cfg.stats_batch  # frames that arrived while it waited were dropped
    started = time.monotonic()
    device.stop()
    assert time.monotonic() - started < 2 and not device._statistics.is_alive()  # the waiting thread stops promptly
    assert device.deltas.applied == 0 and budget.refreshes >= 4
    assert budget.refreshes < batches / 4, (budget.refreshes, batches)  # the budget, not the frames, set the pace
    assert budget.update_s <= share * budget.inference_s + budget.refresh_cost
    status = device.status()["statistics"]
    assert status["normalization"] == "running" and status["budget"] == share
    assert status["updates"] == budget.refreshes and 0 < status["update_share"] <= 2 * share


def test_the_budget_is_a_device_and_replay_flag_with_an_env_default(monkeypatch):
    from driftsync.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["device", "--server", "http://x"]).stats_budget is None
    assert parser.parse_args(["device", "--server", "http://x", "--stats-budget", "0.04"]).stats_budget == 0.04
    monkeypatch.setenv("DRIFTSYNC_STATS_BUDGET", "0.1")
    assert build_parser().parse_args(["replay"]).stats_budget == 0.1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["device", "--server", "http://x", "--stats-budget", "0"])
