"""How much of the device's compute its background updates may take, as a share of inference.

On a one-core device every statistics-graph pass and every session rebuild is time that
inference does not get. Keeping update time within `share` x inference time keeps the whole
device at 1/(1 + share) of the static fused model's throughput or better (0.04: 0.96x).
Delta installs are not optional, so they only spend; statistics refreshes are what gives way.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UpdateBudget:
    """A credit account: inference time earns `share` of itself, update time spends it.

    A refresh is allowed when the credit covers it, its cost estimated by the last refresh's.
    Credit is banked for one refresh at most, so an idle spell cannot pay for a burst later.
    Not thread-safe: the caller serialises the calls. `share=None`: no budget, every refresh
    is allowed; the times are still counted, for the status.
    """

    share: float | None
    inference_s: float = 0.0
    update_s: float = 0.0
    refresh_s: float = 0.0  # the part of update_s spent on statistics refreshes
    refreshes: int = 0
    refresh_cost: float = 0.0  # the last refresh's: the estimate for the next
    _credit: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.share is not None and not self.share > 0:
            raise ValueError(f"the update budget is a share of inference time, above 0, not {self.share}")

    def inference(self, seconds: float) -> None:
        self.inference_s += seconds
        if self.share is not None:
            self._credit = min(self._credit + self.share * seconds, self.refresh_cost)

    def spent(self, seconds: float, refresh: bool = False) -> None:
        """Update work done: a statistics refresh (`refresh`) or any other rebuild (a delta install)."""
        self.update_s += seconds
        self._credit -= seconds
        if refresh:
            self.refreshes += 1
            self.refresh_s += seconds
            self.refresh_cost = seconds

    def allows_refresh(self) -> bool:
        return self.share is None or self._credit >= self.refresh_cost

    def spent_share(self) -> float:
        """Update time over inference time so far (0 before any inference)."""
        return self.update_s / self.inference_s if self.inference_s > 0 else 0.0
