"""Keeping noisy devices in bounds: flood folding, rate limits and aggregation.

All three take ``now`` from the caller (a monotonic clock in the driver, the
capture's timestamps in ``serial-replay``), so they are deterministic in tests.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

#: Fields that differ between repeats of the same message.
VOLATILE_FIELDS = frozenset({"msgno", "device_time"})


def message_key(kind: str, fields: Mapping[str, Any]) -> tuple[str, str]:
    """What makes two messages "the same alarm again" (the message number and the
    device's own clock do not)."""
    rest = {k: v for k, v in fields.items() if k not in VOLATILE_FIELDS}
    return kind, json.dumps(rest, sort_keys=True, default=str)


class FloodGate:
    """Lets the first of a run of identical messages through, folds the rest.

    A message whose key was admitted less than ``window`` seconds ago is a
    repeat: it is counted, not emitted. The next admitted message with that key
    carries how many repeats were folded before it, so the count reaches the
    centre; ``suppressed`` keeps the running total for health. At most
    ``max_keys`` keys are remembered (oldest forgotten first).
    """

    def __init__(self, window: float, max_keys: int = 256):
        self.window = window
        self.max_keys = max_keys
        self.suppressed = 0
        self._seen: OrderedDict[Hashable, list[float]] = OrderedDict()

    def admit(self, key: Hashable, now: float) -> int | None:
        """None for a repeat, else the number of repeats folded since the last admission."""
        if self.window <= 0:
            return 0
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            self.suppressed += 1
            return None
        repeats = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return repeats


class RateLimiter:
    """A token bucket: ``per_minute`` on average, bursts of up to ``burst``."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None
        self.dropped = 0
        self._dropped_since_allowed = 0

    def allow(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        self._dropped_since_allowed += 1
        return False

    def take_dropped(self) -> int:
        """How many were refused since the last call (to report alongside the next one allowed)."""
        count, self._dropped_since_allowed = self._dropped_since_allowed, 0
        return count


class RateLimitedLog:
    """Logs at most ``per_minute`` lines (burst ``burst``), saying how many it skipped."""

    def __init__(self, logger: logging.Logger, per_minute: float = 10, burst: int = 5):
        self.logger = logger
        self._limiter = RateLimiter(per_minute, burst)
        self._lock = threading.Lock()

    def warning(self, now: float, message: str, *args: Any) -> None:
        with self._lock:
            if not self._limiter.allow(now):
                return
            skipped = self._limiter.take_dropped()
        if skipped:
            message += f" ({skipped} similar messages not logged)"
        self.logger.warning(message, *args)


class Aggregator:
    """Sums integer fields of frequent low-value messages (transits) per interval.

    ``add`` folds a message in; ``drain`` returns one payload per kind with the
    summed integers, the latest value of every other field, how many messages
    were folded and over which span of ``now`` values.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, fields: Mapping[str, Any], now: float) -> None:
        with self._lock:
            bucket = self._pending.setdefault(kind, {"fields": {}, "messages": 0, "first": now})
            bucket["messages"] += 1
            bucket["last"] = now
            summed: dict[str, Any] = bucket["fields"]
            for name, value in fields.items():
                if isinstance(value, int) and not isinstance(value, bool) and name != "msgno":
                    summed[name] = summed.get(name, 0) + value
                else:
                    summed[name] = value

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return [
            (
                kind,
                {
                    **bucket["fields"],
                    "messages": bucket["messages"],
                    "span": round(bucket["last"] - bucket["first"], 3),
                },
            )
            for kind, bucket in pending.items()
        ]
