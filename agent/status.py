"""What the agent says about itself, typed once: the heartbeat and ``wardpost status``.

The running agent builds an :class:`AgentStatus` (which holds the :class:`Heartbeat`);
the metrics renderer reads its fields, and :meth:`AgentStatus.to_dict` /
:meth:`Heartbeat.to_dict` give the JSON the heartbeat topic and the control socket carry
(``contract/schemas/heartbeat.json``): one shape, so a field cannot be spelt two ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.driver import Health


@dataclass(frozen=True)
class Backlog:
    """Events accepted and not yet confirmed delivered."""

    count: int
    oldest_age: float | None  # seconds since the oldest was accepted; None when empty
    in_memory: int  # of them, held in memory because storage cannot take them


@dataclass(frozen=True)
class DriverStatus:
    type: str
    health: Health

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.health.to_dict()}


@dataclass(frozen=True)
class Heartbeat:
    uptime: float
    interval: float
    backlog: Backlog
    drivers: Mapping[str, DriverStatus]
    transmission: Mapping[str, float | int | None]  # accepted → confirmed times
    storage_fault: str | None
    boot: int
    connection: int
    time: str
    delivery: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "uptime": self.uptime,
            "interval": self.interval,
            "backlog": asdict(self.backlog),
            "drivers": {name: d.to_dict() for name, d in self.drivers.items()},
            "transmission": dict(self.transmission),
            "storage": {"fault": self.storage_fault},
            "boot": self.boot,
            "connection": self.connection,
            "time": self.time,
            "delivery": self.delivery,
        }


@dataclass(frozen=True)
class Link:
    connected: bool
    broker: str
    delivery: str
    guarantee: str
    in_flight: int
    last_error: str | None
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentStatus:
    version: str
    site: str
    device: str
    config_path: str
    config_digest: str
    link: Link
    outbox_path: str
    outbox_counters: Mapping[str, int]
    commands: Mapping[str, int]
    heartbeat: Heartbeat

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "site": self.site,
            "device": self.device,
            "config": {"path": self.config_path, "digest": self.config_digest},
            "link": {**asdict(self.link), "counters": dict(self.link.counters)},
            "outbox": {"path": self.outbox_path, "counters": dict(self.outbox_counters)},
            "commands": dict(self.commands),
            **self.heartbeat.to_dict(),
        }
