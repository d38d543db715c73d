"""The ``simulated`` driver: events at a steady rate, or on demand."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import check
from agent.driver import CommandError, Driver, Health, Timer
from agent.event import Priority, valid_kind


def _priority_ok(value: str) -> bool:
    try:
        Priority.parse(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SimulatedConfig:
    """Options of ``[drivers.<name>] type = "simulated"``."""

    kind: str = field(
        default="sim.tick", metadata=check(valid_kind, "must be a dotted lowercase event kind")
    )
    priority: str = field(
        default="normal", metadata=check(_priority_ok, "must be critical, high, normal or low")
    )
    #: Events per second; 0 emits only on demand (``wardpost simulate <name> emit``).
    rate: float = field(default=1.0, metadata=check(minimum=0.0, maximum=100_000.0))
    payload: dict[str, Any] = field(default_factory=dict)


class SimulatedDriver(Driver):
    """Emits ``kind`` events at ``rate`` per second, each with a running ``count``."""

    config_class = SimulatedConfig
    summary = "emits configurable events at a rate or on demand (demo, benchmarks)"
    config: SimulatedConfig

    def __init__(self, ctx: Any, config: SimulatedConfig):
        super().__init__(ctx, config)
        self._count = 0
        self._lock = threading.Lock()
        self._timer: Timer | None = None

    def start(self) -> None:
        if self.config.rate > 0:
            self._timer = self.ctx.every(1.0 / self.config.rate, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._emit_one()

    def _emit_one(
        self,
        kind: str | None = None,
        priority: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        with self._lock:
            self._count += 1
            count = self._count
        payload = {**self.config.payload, **(extra or {}), "count": count}
        emission = self.ctx.emit(
            kind or self.config.kind, payload, priority or self.config.priority
        )
        return emission.event.id

    def health(self) -> Health:
        return Health("ok", counters={"emitted": self._count})

    def simulate(self, action: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        if action != "emit":
            raise CommandError(f"unknown action {action!r} (simulated drivers know: emit)")
        count = args.get("count", 1)
        if not isinstance(count, int) or not 1 <= count <= 100_000:
            raise CommandError("count must be an integer from 1 to 100000")
        kind = args.get("kind")
        if kind is not None and not (isinstance(kind, str) and valid_kind(kind)):
            raise CommandError(f"invalid event kind {kind!r}")
        ids = [
            self._emit_one(kind, args.get("priority"), args.get("payload")) for _ in range(count)
        ]
        return {"ids": ids}
