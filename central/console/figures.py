"""Figures for the devices and reports pages, and the small inline SVG charts they draw.

Charts are SVG written on the server: no chart library, nothing to fetch.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from markupsafe import Markup

from central.stats import DAY, availability, percentile
from central.store import LinkChange, Store

HOUR = 3600.0


def svg_bars(values: list[float], *, width: int = 144, height: int = 26, label: str = "") -> Markup:
    """A bar per value (e.g. per hour), scaled to the largest."""
    top = max(values, default=0.0) or 1.0
    step = width / max(1, len(values))
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - max(1.0, v / top * height):.1f}"'
        f' width="{max(1.0, step - 1):.1f}" height="{max(1.0, v / top * height):.1f}"'
        f' class="{"bar" if v else "bar zero"}"/>'
        for i, v in enumerate(values)
    )
    title = f"<title>{html.escape(label)}</title>" if label else ""
    return Markup(  # noqa: S704 - built from numbers and an escaped title
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f' role="img">{title}{bars}</svg>'
    )


def svg_strip(
    changes: list[LinkChange], start: float, end: float, *, width: int = 144, height: int = 10
) -> Markup:
    """Up (green) and down (red) over [start, end]; grey before the device was known."""
    parts = []
    for change, following in zip(changes, [*changes[1:], None], strict=True):
        a, b = max(change.at, start), min(following.at if following else end, end)
        if b <= a:
            continue
        x = (a - start) / (end - start) * width
        w = max(0.5, (b - a) / (end - start) * width)
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}"'
            f' class="{"up" if change.up else "down"}"/>'
        )
    return Markup(  # noqa: S704 - numbers only
        f'<svg class="strip" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" class="unknown"/>{"".join(parts)}</svg>'
    )


@dataclass
class DeviceRow:
    site: str
    device: str
    status: str
    last_heartbeat: float | None
    backlog: int | None
    boot: int | None
    version: str | None
    drivers: dict[str, str]
    p95: float | None
    availability: float | None
    events_chart: Markup
    link_chart: Markup


def device_rows(store: Store, now: float) -> list[tuple[str, list[DeviceRow]]]:
    """Per site, every device with its EN 50136 figures over the last 24 h."""
    since = now - DAY
    transmission: dict[tuple[str, str], list[float]] = defaultdict(list)
    hourly: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * 24)
    for site, device, event_time, stored_at in store.transmission_samples(since):
        transmission[(site, device)].append(max(0.0, stored_at - event_time))
        hour = min(23, int((stored_at - since) // HOUR))
        hourly[(site, device)][hour] += 1
    links = store.link_history()
    history: dict[tuple[str, str], list[LinkChange]] = defaultdict(list)
    for change in links:
        history[(change.site, change.device)].append(change)
    ratios = {(a.site, a.device): a.ratio for a in availability(links, now, 1, DAY)}
    sites: dict[str, list[DeviceRow]] = defaultdict(list)
    for d in store.devices():
        key = (d.site, d.device)
        values = sorted(transmission.get(key, []))
        drivers = d.heartbeat.get("drivers") if isinstance(d.heartbeat, dict) else None
        health = {
            str(name): str(info.get("state", "?")) if isinstance(info, dict) else str(info)
            for name, info in (drivers.items() if isinstance(drivers, dict) else [])
        }
        sites[d.site].append(
            DeviceRow(
                d.site,
                d.device,
                "lost" if d.lost else d.state,
                d.last_heartbeat,
                d.backlog,
                d.boot,
                d.version,
                health,
                percentile(values, 95) if values else None,
                ratios.get(key),
                svg_bars(hourly[key], label="events per hour, last 24 h"),
                svg_strip(history.get(key, []), since, now),
            )
        )
    return sorted(sites.items())


@dataclass
class Timing:
    """Time to acknowledge or resolve, against a target."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    within: float | None = None  # share within the target

    @classmethod
    def of(cls, values: list[float], target: float) -> Timing:
        if not values:
            return cls()
        values = sorted(values)
        return cls(
            len(values),
            percentile(values, 50),
            percentile(values, 95),
            sum(1 for v in values if v <= target) / len(values),
        )


@dataclass
class AlarmReport:
    days: int
    per_day: list[tuple[str, str, str, int]] = field(default_factory=list)  # day, site, kind, n
    per_kind: list[tuple[str, int, Timing, Timing]] = field(default_factory=list)
    overall: tuple[int, Timing, Timing] = (0, Timing(), Timing())
    availability: list[tuple[str, str, float | None]] = field(default_factory=list)
    ack_target: float = 30.0
    resolve_target: float = 900.0


def alarm_report(
    store: Store, now: float, days: int, ack_target: float, resolve_target: float
) -> AlarmReport:
    """Alarms per day, site and kind; times to acknowledge and resolve; availability."""
    since = now - days * DAY
    alarms = [a for a in store.alarms() if a.raised_at >= since and not a.test]
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    acks: dict[str, list[float]] = defaultdict(list)
    resolves: dict[str, list[float]] = defaultdict(list)
    for a in alarms:
        day = datetime.fromtimestamp(a.raised_at, UTC).strftime("%Y-%m-%d")
        counts[(day, a.site, a.kind)] += 1
        if a.acknowledged_at is not None:
            acks[a.kind].append(a.acknowledged_at - a.raised_at)
        if a.resolved_at is not None:
            resolves[a.kind].append(a.resolved_at - a.raised_at)
    kinds: dict[str, int] = defaultdict(int)
    for a in alarms:
        kinds[a.kind] += 1
    every_ack = [v for values in acks.values() for v in values]
    every_resolve = [v for values in resolves.values() for v in values]
    return AlarmReport(
        days,
        sorted(((*k, n) for k, n in counts.items()), reverse=True),
        [
            (kind, n, Timing.of(acks[kind], ack_target), Timing.of(resolves[kind], resolve_target))
            for kind, n in sorted(kinds.items())
        ],
        (len(alarms), Timing.of(every_ack, ack_target), Timing.of(every_resolve, resolve_target)),
        [
            (a.site, a.device, a.ratio)
            for a in availability(store.link_history(), now, 1, days * DAY)
        ],
        ack_target,
        resolve_target,
    )
