"""CEMA's upload filter, a share budget and a bandwidth budget: which samples are worth the uplink.

Chen et al. (ICLR 2024): drop unreliable samples (entropy above a dynamic
E_max), optionally drop low-informative ones (entropy at or below E_min), and
drop samples redundant with what was recently uploaded (EATA's cosine test).

With a share budget (`upload_share`; `driftsync device` defaults it to 0.2) the entropy window no longer
decides alone: its E_max follows the stream, so the share of frames it passes moved with the
stream (and fell to nothing on a device that sees only hard frames). Under the budget a frame is
uploaded when its entropy is in the top `upload_share` of recent frames and the budget has credit
for it (`ShareBudget`): the most uncertain frames, at most that share, whatever the stream does.
E_max is then not applied (it would drop every frame of a hard stream; the cloud weights each
upload by exp(E_max - H), so an unreliable one is down-weighted there rather than dropped here;
whether that costs accuracy is for the replay table to show). E_min still applies: it is a floor, not a
ranking, so on a stream where every frame is confident nothing below it is sent, and the
budget is a ceiling rather than a quota. The redundancy test runs on what the budget chose, and
a frame it drops gives its credit back.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SelectionConfig:
    num_classes: int
    e_max_factor: float = 0.4
    dynamic_lambda: float | None = 0.6
    warmup_samples: int = 64
    e_min_factor: float = 0.0
    redundancy_margin: float | None = None
    redundancy_ema: float = 0.9
    entropy_ema: float | None = None
    upload_share: float | None = None  # None: the entropy window alone decides (CEMA as published)


_PPM = 1_000_000


@dataclass
class ShareBudget:
    """Upload at most `share` of the frames seen, the highest-scoring ones.

    Two parts, both needed. A threshold: the (1 - share) quantile of the last `window` finite
    scores, so a frame qualifies only among the most uncertain of recent frames, whatever level
    the stream is at (hard frames only, easy only, drifting, in label bursts); credit left
    unspent (the stream just turned easier than its recent past) lowers it, down to the
    (1 - 2 share) quantile, so the share does not sag below the budget either. A credit bucket:
    each frame seen earns `share` of an upload, each upload spends one, and unspent credit is
    capped at `burst` frames' worth; so over any n consecutive frames at most share * (n + burst)
    are uploaded, and over a whole stream at most share * n, however bursty its hard frames are.
    Within a batch the highest scores are served first.
    """

    share: float
    window: int = 256
    burst: int = 128
    credit_ppm: int = 0  # unspent credit in millionths of an upload: integers, so the bounds hold exactly
    recent: deque = field(default_factory=deque)
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"upload share must be in (0, 1], not {self.share!r}")
        self.recent = deque(self.recent, maxlen=self.window)

    @property
    def credit(self) -> float:
        return self.credit_ppm / _PPM

    def select(self, scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
        """The frames to upload among `eligible` ones; a non-finite score is never chosen or counted."""
        keep = np.zeros(len(scores), dtype=bool)
        finite = np.isfinite(scores)
        seen = int(finite.sum())
        if seen == 0:
            return keep
        self.recent.extend(scores[finite].tolist())
        per_frame = int(self.share * _PPM)  # rounded down: never more than the share
        saved = self.credit_ppm / (per_frame * self.burst)  # 0..1: how much unspent credit the stream left
        self.credit_ppm = min(self.credit_ppm + per_frame * seen, per_frame * (self.burst + seen))
        level = max(0.0, 1 - self.share * (1 + saved))  # credit left unspent widens the top share, up to twice
        self.threshold = float(np.quantile(np.fromiter(self.recent, float, len(self.recent)), level))
        with np.errstate(invalid="ignore"):
            candidates = np.flatnonzero(eligible & finite & (scores >= self.threshold))
        take = min(len(candidates), self.credit_ppm // _PPM)
        keep[candidates[np.argsort(-scores[candidates], kind="stable")[:take]]] = True
        self.credit_ppm -= take * _PPM
        return keep

    def refund(self, uploads: int) -> None:
        """Chosen frames that were not sent after all (redundant) leave their credit."""
        self.credit_ppm += uploads * _PPM


@dataclass
class CemaSelector:
    """Stateful across batches: the dynamic threshold follows the stream's entropy."""

    cfg: SelectionConfig
    seen: int = 0
    entropy_sum: float = 0.0
    recent_mean: float | None = None
    warmup_mean: float | None = None
    prob_ema: np.ndarray | None = None
    budget: ShareBudget | None = None
    counts: dict[str, int] = field(default_factory=lambda: {
        "unreliable": 0, "low_info": 0, "over_budget": 0, "redundant": 0, "non_finite": 0, "kept": 0})

    def __post_init__(self) -> None:
        if self.budget is None and self.cfg.upload_share is not None:
            self.budget = ShareBudget(self.cfg.upload_share)

    @property
    def e_max_static(self) -> float:
        return self.cfg.e_max_factor * math.log(self.cfg.num_classes)

    @property
    def e_min(self) -> float:
        return self.cfg.e_min_factor * math.log(self.cfg.num_classes)

    def e_max(self) -> float:
        """E_max,t = E_max · (mean H so far / mean H during warm-up) · λ.

        With `entropy_ema` set, "so far" is an exponential average over batches, so the
        window follows the current domain rather than the whole history.
        """
        if self.cfg.dynamic_lambda is None or self.warmup_mean is None or self.warmup_mean <= 0:
            return self.e_max_static
        mean_so_far = self.recent_mean if self.cfg.entropy_ema is not None else self.entropy_sum / max(self.seen, 1)
        return self.e_max_static * (mean_so_far / self.warmup_mean) * self.cfg.dynamic_lambda

    def select(self, probs: np.ndarray, ent: np.ndarray) -> np.ndarray:
        """A boolean mask of samples to upload; updates the running statistics. A sample with a
        NaN or infinite prediction is never kept and never enters the running means: one such
        batch would otherwise make E_max NaN, and nothing would be selected again."""
        finite = np.isfinite(ent) & np.isfinite(probs).all(axis=1)
        if finite.any():
            valid = ent[finite]
            self.seen += len(valid)
            self.entropy_sum += float(valid.sum())
            batch_mean = float(valid.mean())
            a = self.cfg.entropy_ema
            self.recent_mean = batch_mean if self.recent_mean is None or a is None else a * self.recent_mean + (1 - a) * batch_mean
            if self.warmup_mean is None and self.seen >= self.cfg.warmup_samples:
                self.warmup_mean = self.entropy_sum / self.seen
        with np.errstate(invalid="ignore"):
            reliable = finite & (ent < self.e_max()) if self.budget is None else finite
            informative = ent > self.e_min
        keep = reliable & informative
        self.counts["non_finite"] += int((~finite).sum())
        self.counts["unreliable"] += int((finite & ~reliable).sum())
        self.counts["low_info"] += int((reliable & ~informative).sum())
        if self.budget is not None:
            chosen = self.budget.select(np.where(finite, ent, np.nan), keep)
            self.counts["over_budget"] += int((keep & ~chosen).sum())
            keep = chosen
        if self.cfg.redundancy_margin is not None:
            unique = self._drop_redundant(probs, keep)
            if self.budget is not None:
                self.budget.refund(int(keep.sum() - unique.sum()))
            keep = unique
        self.counts["kept"] += int(keep.sum())
        return keep

    def _drop_redundant(self, probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
        keep = keep.copy()
        for i in np.flatnonzero(keep):
            p = probs[i]
            if self.prob_ema is not None:
                cos = float(p @ self.prob_ema) / (np.linalg.norm(p) * np.linalg.norm(self.prob_ema) + 1e-12)
                if abs(cos) >= self.cfg.redundancy_margin:
                    keep[i] = False
                    self.counts["redundant"] += 1
                    continue
            a = self.cfg.redundancy_ema
            self.prob_ema = p.copy() if self.prob_ema is None else a * self.prob_ema + (1 - a) * p
        return keep


@dataclass(frozen=True)
class UgsConfig:
    views: int = 4  # cheap augmented views per frame, run in one onnxruntime call
    keep: float = 0.25  # fraction of each batch uploaded: the most uncertain ones


@dataclass
class UgsSelector:
    """U-VPA's uncertainty-guided sampling: upload the frames whose prediction varies most over
    cheap augmentations. Without a share budget, a fixed share (`keep`) of each batch; with one,
    the budget ranks the variances as it ranks entropies for CEMA (rounding a share of each
    batch would exceed it: 2 of 8 frames is 25%)."""

    cfg: UgsConfig
    budget: ShareBudget | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"kept": 0, "below_rank": 0})

    def select(self, variance: np.ndarray) -> np.ndarray:
        keep = np.zeros(len(variance), dtype=bool)
        finite = np.isfinite(variance)  # a NaN is never "most uncertain"
        if self.budget is not None:
            keep = self.budget.select(variance, finite)
        else:
            k = min(int(round(self.cfg.keep * len(variance))), int(finite.sum()))
            keep[np.argsort(-np.where(finite, variance, -np.inf), kind="stable")[:k]] = True
        self.counts["kept"] += int(keep.sum())
        self.counts["below_rank"] += int((~keep).sum())
        return keep


@dataclass
class TokenBucket:
    """rate tokens per second, up to `burst`; None rate means unlimited."""

    rate: float | None
    burst: float
    tokens: float = 0.0
    updated: float | None = None

    def take(self, amount: float, now: float) -> bool:
        if self.rate is None:
            return True
        if self.updated is None:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount <= self.tokens:
            self.tokens -= amount
            return True
        return False


@dataclass
class UploadBudget:
    """Samples/s and bytes/s limits, checked together so neither is spent alone."""

    samples: TokenBucket
    bytes: TokenBucket

    @classmethod
    def from_rates(cls, samples_per_s: float | None, bytes_per_s: float | None, burst_s: float = 2.0) -> UploadBudget:
        return cls(
            TokenBucket(samples_per_s, (samples_per_s or 0) * burst_s + 1),
            TokenBucket(bytes_per_s, (bytes_per_s or 0) * burst_s + 65536),
        )

    def allow(self, n_bytes: int, now: float) -> bool:
        s, b = self.samples, self.bytes
        snapshot = (s.tokens, s.updated, b.tokens, b.updated)
        if s.take(1, now) and b.take(n_bytes, now):
            return True
        s.tokens, s.updated, b.tokens, b.updated = snapshot
        return False
