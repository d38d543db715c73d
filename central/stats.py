"""The figures EN 50136 asks integrators to show, from the store.

* **Transmission time** per device and UTC day: the device's event ``time``
  (when it was accepted at the edge) to the moment the centre stored it;
  mean, p95 and max, with the count.
* **Path availability** per device and 7-day window: the share of the known
  time in which the path was up, from the link history (down while the device
  is lost, offline or stopped; up on heartbeat or a fresh online status).
  Time before a device was first seen is not counted.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from central.store import LinkChange, Store

DAY = 86400.0
WEEK = 7 * DAY


@dataclass(frozen=True)
class TransmissionDay:
    site: str
    device: str
    day: str
    count: int
    mean: float
    p95: float
    max: float


@dataclass(frozen=True)
class Availability:
    site: str
    device: str
    start: float
    end: float
    known: float
    up: float

    @property
    def ratio(self) -> float | None:
        return self.up / self.known if self.known > 0 else None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def transmission_by_day(samples: Iterable[tuple[str, str, float, float]]) -> list[TransmissionDay]:
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for site, device, event_time, stored_at in samples:
        day = datetime.fromtimestamp(stored_at, UTC).strftime("%Y-%m-%d")
        groups[(site, device, day)].append(max(0.0, stored_at - event_time))
    rows = []
    for (site, device, day), values in sorted(groups.items()):
        values.sort()
        rows.append(
            TransmissionDay(
                site,
                device,
                day,
                len(values),
                statistics.fmean(values),
                percentile(values, 95),
                values[-1],
            )
        )
    return rows


def availability(
    history: Iterable[LinkChange], now: float, windows: int = 4, window: float = WEEK
) -> list[Availability]:
    """Per device, the last ``windows`` windows (7 days unless ``window``) to ``now``, newest first."""
    by_device: dict[tuple[str, str], list[LinkChange]] = defaultdict(list)
    for change in history:
        by_device[(change.site, change.device)].append(change)
    rows = []
    for (site, device), changes in sorted(by_device.items()):
        changes.sort(key=lambda c: c.at)
        segments = [
            (c.at, nxt.at if nxt else now, c.up)
            for c, nxt in zip(changes, [*changes[1:], None], strict=True)
        ]
        for k in range(windows):
            end, start = now - k * window, now - (k + 1) * window
            known = up = 0.0
            for seg_start, seg_end, is_up in segments:
                overlap = min(seg_end, end) - max(seg_start, start)
                if overlap > 0:
                    known += overlap
                    up += overlap if is_up else 0.0
            if known > 0:
                rows.append(Availability(site, device, start, end, known, up))
    return rows


def gather(
    store: Store, now: float, days: int = 7, windows: int = 4
) -> tuple[list[TransmissionDay], list[Availability]]:
    return transmission_by_day(store.transmission_samples(now - days * DAY)), availability(
        store.link_history(), now, windows
    )
