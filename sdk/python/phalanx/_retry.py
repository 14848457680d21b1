"""How often and how long to repeat a request: backoff with full jitter,
the retry budget, and the adaptive write timeout (RFC 6298's smoothing of
the latency this client sees). The numbers are docs/sdk.md's, item 4.

Leaves to `_transport.py` whether a request is repeated at all.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

@dataclass
class RetryPolicy:
    """How often and how long to retry. Full jitter: AWS Architecture Blog, "Exponential Backoff And Jitter"."""

    retries_max: int = 8
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    # The jitter's ceiling when moving to another node (failover, not overload): an election
    # takes a few hundred milliseconds and the node's Retry-After already spaces the retries.
    failover_backoff_cap_s: float = 0.25
    # A server's Retry-After is honoured up to this long (docs/sdk.md, 4; as the Rust SDK).
    retry_after_max_s: float = 10.0

    def backoff_s(self, attempt: int, rng: random.Random, failover: bool = False) -> float:
        """Uniform in [0, min(cap, base * 2^attempt)]."""
        cap = self.failover_backoff_cap_s if failover else self.backoff_cap_s
        return rng.uniform(0.0, min(cap, self.backoff_base_s * (2 ** min(attempt, 30))))


class RetryBudget:
    """Token bucket over retries: every request earns `ratio` token, a retry
    spends one, and `floor_per_s` tokens trickle in each second so that a
    quiet client may still retry; at most `tokens_max` are kept."""

    def __init__(self, ratio: float = 0.1, floor_per_s: float = 1.0, tokens_max: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self.tokens_max = tokens_max
        self.tokens = tokens_max
        self._clock = clock
        self._refilled_at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.tokens_max, self.tokens + (now - self._refilled_at) * self.floor_per_s)
        self._refilled_at = now

    def on_request(self) -> None:
        with self._lock:
            self._refill()
            self.tokens = min(self.tokens_max, self.tokens + self.ratio)

    def try_retry(self) -> bool:
        with self._lock:
            self._refill()
            if self.tokens >= 1.0 - 1e-9:  # ten deposits of 0.1 make one token
                self.tokens = max(0.0, self.tokens - 1.0)
                return True
            return False



# The adaptive write timeout's floor: a new leader is elected about 0.25 s
# after the old one falls silent.
WRITE_TIMEOUT_FLOOR_S = 0.25

# docs/sdk.md, 4: how long a write attempt of the asyncio client may wait in all while its node keeps answering
# other requests (a slow node, not a lost one).
SLOW_NODE_WAIT_MAX_S = 2.0


@dataclass
class _Latency:
    """The latency of single write attempts, smoothed as RFC 6298 does."""

    smoothed_s: float = 0.0
    variation_s: float = 0.0
    samples: int = 0

    def record(self, seconds: float) -> None:
        if self.samples == 0:
            self.smoothed_s, self.variation_s = seconds, seconds / 2
        else:
            self.variation_s = 0.75 * self.variation_s + 0.25 * abs(self.smoothed_s - seconds)
            self.smoothed_s = 0.875 * self.smoothed_s + 0.125 * seconds
        self.samples += 1

    def timeout_s(self, floor_s: float, ceiling_s: float) -> float:
        """The timeout of one write attempt: none seen yet, the ceiling."""
        if self.samples == 0 or ceiling_s <= floor_s:
            return ceiling_s
        return min(ceiling_s, max(floor_s, self.smoothed_s + 4 * self.variation_s))


__all__ = ["RetryPolicy", "RetryBudget", "WRITE_TIMEOUT_FLOOR_S", "SLOW_NODE_WAIT_MAX_S"]
