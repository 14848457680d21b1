"""Client-side adaptive throttling (docs/sdk.md, 10; Google's SRE book,
"Handling Overload"): per node and per priority class, a request is refused
locally with probability max(0, (requests - K * accepts) / (requests + 1)),
K = 2, over a sliding window of 10 s in buckets. A node that refuses
most of what it is sent is soon sent little more than it can serve. (Not the
book's two minutes: once the node serves again, what is sent grows by about K
times per window, so two minutes kept clients refusing their own calls for
minutes after an overload had passed.)

Pure: the clock is injected and the caller draws the random number, so tests
replay any sequence. Leaves what a local refusal does (the call fails fast)
to `_transport.py`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Literal

K = 2.0
WINDOW_S = 10.0
BUCKET_COUNT = 20
# Nodes x classes tracked at most; past it the least recently used is forgotten.
KEYS_MAX = 1024

Class = Literal["low", "normal", "high"]


def class_of_priority(priority: int) -> Class:
    """The door's classes (docs/api.md): 0-3 low, 4-6 normal, 7-9 high."""
    return "low" if priority <= 3 else "normal" if priority <= 6 else "high"


class _Window:
    def __init__(self) -> None:
        # bucket index -> [epoch, requests, accepts]
        self.buckets: list[list[int]] = [[-1, 0, 0] for _ in range(BUCKET_COUNT)]

    def bucket(self, epoch: int) -> list[int]:
        bucket = self.buckets[epoch % BUCKET_COUNT]
        if bucket[0] != epoch:
            bucket[0], bucket[1], bucket[2] = epoch, 0, 0
        return bucket

    def totals(self, epoch: int) -> tuple[int, int]:
        live = [b for b in self.buckets if epoch - BUCKET_COUNT < b[0] <= epoch]
        return sum(b[1] for b in live), sum(b[2] for b in live)


class AdaptiveThrottle:
    """One client's throttle: a window per (node, class)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._windows: OrderedDict[tuple[str, Class], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def _epoch(self) -> int:
        return int((self._clock() - self._start) / (WINDOW_S / BUCKET_COUNT))

    def _window(self, node: str, klass: Class) -> _Window:
        key = (node, klass)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= KEYS_MAX:
                self._windows.popitem(last=False)
            window = self._windows[key] = _Window()
        self._windows.move_to_end(key)
        return window

    def reject_probability(self, node: str, klass: Class) -> float:
        with self._lock:
            requests, accepts = self._window(node, klass).totals(self._epoch())
        return max(0.0, (requests - K * accepts) / (requests + 1))

    def admit(self, node: str, klass: Class, draw: float) -> bool:
        """Whether to send (`draw` uniform in [0, 1)). A local refusal counts as a request, as in the book."""
        if draw < self.reject_probability(node, klass):
            with self._lock:
                self._window(node, klass).bucket(self._epoch())[1] += 1
            return False
        return True

    def answered(self, node: str, klass: Class, accepted: bool) -> None:
        """A request the node answered: accepted unless refused for load. No answer is not recorded."""
        with self._lock:
            bucket = self._window(node, klass).bucket(self._epoch())
            bucket[1] += 1
            bucket[2] += int(accepted)


__all__ = ["AdaptiveThrottle", "K", "WINDOW_S", "class_of_priority"]
