"""Retry delays, the same way everywhere: exponential, capped, jittered.

Jitter matters on a hospital network: after a switch reboots, every device's retries
would otherwise land on the broker in the same instant. Each delay is drawn from the
upper half of the current step, so a retry never comes sooner than half the step and
the steps still double.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays ``first``, ``2 × first``, … up to ``ceiling`` seconds, each jittered."""

    def __init__(self, first: float, ceiling: float, *, jitter: bool = True):
        if not 0 < first <= ceiling:
            raise ValueError(f"backoff needs 0 < first ({first}) <= ceiling ({ceiling})")
        self.first = first
        self.ceiling = ceiling
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        step = min(self.ceiling, self.first * 2 ** min(self.failures, 64))
        self.failures += 1
        return random.uniform(step / 2, step) if self.jitter else step

    def reset(self) -> None:
        """The last attempt worked: the next failure waits ``first`` again."""
        self.failures = 0
