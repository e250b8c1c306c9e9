"""Per-device token buckets: a device that uploads faster than its share gets 429 + Retry-After."""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`rate` samples per second per key, with bursts up to `burst`. Bounded in keys: a bucket
    that has refilled is as good as no bucket, so full ones are forgotten."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: float, now: float) -> float | None:
        """Spend `cost` tokens; None when allowed, else the seconds until it would be. A cost
        above the burst passes on a full bucket and leaves it in debt, so it is never stuck."""
        with self._lock:
            bucket = self._buckets.get(key) or _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if min(cost, self.burst) > bucket.tokens:
                self._buckets[key] = bucket
                return (min(cost, self.burst) - bucket.tokens) / self.rate
            bucket.tokens -= cost
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)
            return None

    def check(self, key: str, cost: float, now: float) -> float | None:
        """take() without spending: a cheap admission before a request's body is read."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return None
            tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            need = min(cost, self.burst)
            return None if need <= tokens else (need - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
