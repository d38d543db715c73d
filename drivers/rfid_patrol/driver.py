"""The ``rfid_patrol`` driver: guards prove their rounds by reading tags at checkpoints.

Every ``rfid.read`` from the reader's dialect is looked up in two maps from the
config: ``guards`` (a guard's own badge: the guard is "current" for
``guard_minutes``) and ``checkpoints`` (tag -> checkpoint name). A tag may be
written as the reader reports it (``"0100CDA4EC"``) or as the number printed on
the fob (``"0013477100"``, leading zeros optional).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.config import ConfigError, check
from agent.driver import DriverContext, Health
from agent.homeassistant import Entity
from drivers.rfid_patrol.schedule import PatrolSchedule, RoundConfig
from drivers.serial_common import Message, SerialDialectDriver, SerialDriverConfig

#: The kind the reader dialects produce for one tag read.
READ_KIND = "rfid.read"


def normalise_tag(text: str) -> str:
    """One spelling per tag: printed numbers without leading zeros, hex in upper case."""
    text = text.strip()
    return str(int(text)) if text.isdigit() else text.upper()


def read_keys(fields: Mapping[str, Any]) -> list[str]:
    """Every way a read can name its tag (reader id, printed number)."""
    return [normalise_tag(str(fields[name])) for name in ("tag", "printed") if fields.get(name)]


@dataclass(frozen=True)
class RfidPatrolConfig(SerialDriverConfig):
    """Options of ``[drivers.<name>] type = "rfid_patrol"``: the shared serial options
    (default dialect ``rdm6300``; a tag held at the reader counts once per
    ``dedup_window``), the tag maps and the rounds."""

    dialect: str = "rdm6300"
    dedup_window: float = field(default=5.0, metadata=check(minimum=0.0, maximum=3600.0))
    #: Tag -> checkpoint name.
    checkpoints: dict[str, str] = field(default_factory=dict)
    #: Tag -> guard id (a guard's own badge, read at the start of a round).
    guards: dict[str, str] = field(default_factory=dict)
    #: How long after reading a guard badge that guard is named on checkpoint reads.
    guard_minutes: float = field(default=240.0, metadata=check(minimum=0.0, maximum=1440.0))
    rounds: list[RoundConfig] = field(default_factory=list)
    #: How often closed windows are judged for missed checkpoints (seconds).
    check_interval: float = field(default=10.0, metadata=check(minimum=0.05, maximum=3600.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        known = set(self.checkpoints.values())
        for i, round_ in enumerate(self.rounds):
            for name in round_.checkpoints:
                if name not in known:
                    raise ConfigError(
                        f"checkpoint {name!r} is not a value of the checkpoints map",
                        f"rounds[{i}].checkpoints",
                    )
        both = {normalise_tag(t) for t in self.checkpoints} & {
            normalise_tag(t) for t in self.guards
        }
        if both:
            raise ConfigError(
                f"tag {sorted(both)[0]!r} is both a checkpoint and a guard badge", "guards"
            )


def local_now() -> datetime:
    return datetime.now().astimezone()


class RfidPatrolDriver(SerialDialectDriver):
    """Emits ``patrol.checkpoint`` (normal: checkpoint, tag, guard if known, rounds served),
    ``patrol.missed`` (high) when a round's window closes without a checkpoint read,
    ``patrol.guard`` when a guard badges in, ``patrol.unknown_tag`` (low) for tags in no map."""

    config_class = RfidPatrolConfig
    summary = "guard-patrol RFID reader on a serial port: checkpoints and missed rounds"

    home_assistant = (
        Entity(
            "sensor",
            "checkpoint",
            "last checkpoint",
            "patrol.checkpoint",
            "value_json.payload.checkpoint",
            options={"icon": "mdi:map-marker-check"},
        ),
        Entity(
            "event",
            "missed",
            "missed checkpoint",
            "patrol.missed",
            "'missed'",
            attributes=("checkpoint",),
            options={"event_types": ["missed"], "icon": "mdi:map-marker-alert"},
        ),
    )

    config: RfidPatrolConfig
    #: Wall clock for schedules (local time); tests replace it.
    clock: Callable[[], datetime] = staticmethod(local_now)

    def __init__(self, ctx: DriverContext, config: RfidPatrolConfig):
        super().__init__(ctx, config)
        self._checkpoints = {normalise_tag(t): name for t, name in config.checkpoints.items()}
        self._guards = {normalise_tag(t): guard for t, guard in config.guards.items()}
        self._guard: tuple[str, float] | None = None
        self.schedule: PatrolSchedule | None = None

    def start(self) -> None:
        if self.config.rounds:
            self.schedule = PatrolSchedule(
                self.config.rounds, self.clock(), self.ctx.state_dir / "patrol.json", self.ctx.log
            )
            self._timers.append(self.ctx.every(self.config.check_interval, self.check_rounds))
        super().start()

    def health(self) -> Health:
        health = super().health()
        guard = self._current_guard(time.monotonic())
        detail = f"{health.detail}; guard {guard}" if guard else health.detail
        return Health(health.state, detail, health.counters)

    def _current_guard(self, now: float) -> str | None:
        """The guard who badged in last, unless that was over ``guard_minutes`` ago."""
        if self._guard is None:
            return None
        guard, since = self._guard
        if now - since > self.config.guard_minutes * 60:
            return None
        return guard

    def handle_message(self, message: Message, now: float) -> None:
        if message.kind != READ_KIND:
            super().handle_message(message, now)
            return
        keys = read_keys(message.fields)
        tag: dict[str, Any] = {
            name: message.fields[name] for name in ("tag", "printed") if name in message.fields
        }
        guard = next((self._guards[k] for k in keys if k in self._guards), None)
        if guard is not None:
            self._guard = (guard, now)
            self.emit_folded("patrol.guard", {"guard": guard, **tag}, now)
            return
        checkpoint = next((self._checkpoints[k] for k in keys if k in self._checkpoints), None)
        if checkpoint is None:
            self.emit_folded("patrol.unknown_tag", tag, now)
            return
        payload: dict[str, Any] = {"checkpoint": checkpoint, **tag}
        current = self._current_guard(now)
        if current is not None:
            payload["guard"] = current
        if self.flood.admit(("patrol.read", checkpoint), now) is None:
            return  # the tag is still in front of the reader
        if self.schedule is not None:
            rounds = self.schedule.record(checkpoint, self.clock())
            if rounds:
                payload["rounds"] = rounds
        self.emit("patrol.checkpoint", payload)

    def check_rounds(self) -> None:
        """Report every checkpoint of a just-closed window that was not read."""
        if self.schedule is None:
            return
        for missed in self.schedule.due(self.clock()):
            payload: dict[str, Any] = {
                "round": missed.round,
                "checkpoint": missed.checkpoint,
                "window_start": missed.window_start.isoformat(),
                "window_end": missed.window_end.isoformat(),
                "read": list(missed.read),
            }
            guard = self._current_guard(time.monotonic())
            if guard is not None:
                payload["guard"] = guard
            self.emit("patrol.missed", payload)
