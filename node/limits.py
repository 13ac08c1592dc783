"""Per-peer request rate limits: a token bucket per peer."""

from __future__ import annotations

import time

MAX_TRACKED_PEERS = 10_000


class RequestRate:
    """Allows each peer `rate` requests per second on average, in bursts of up to 2 x rate."""

    def __init__(self, rate: float):
        self.rate, self.burst = rate, 2 * rate
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when counted)

    def allow(self, peer: str) -> bool:
        now = time.monotonic()
        tokens, then = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self._buckets) > MAX_TRACKED_PEERS:  # forget peers whose buckets are full again
            self._buckets = {p: b for p, b in self._buckets.items() if b[0] + (now - b[1]) * self.rate < self.burst}
        if tokens < 1:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1, now)
        return True
