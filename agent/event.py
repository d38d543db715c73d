"""The event model: what every driver produces and every consumer receives.

An :class:`Event` is immutable once created. Its ``id`` is a UUIDv7, so ids sort
by creation time and are unique across devices without coordination. Events
carry two clocks because a Raspberry Pi without a real-time clock can boot with
a wrong wall clock: ``time`` (UTC wall clock) and ``boottime`` (seconds since the
kernel booted, paired with the kernel's ``boot_id``), which stays right.
"""

from __future__ import annotations

import enum
import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1


class Priority(enum.IntEnum):
    """Delivery priority. Lower value is sent first and evicted last."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | Priority) -> Priority:
        if isinstance(value, Priority):
            return value
        try:
            return cls[value.upper()]
        except KeyError:
            names = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown priority {value!r} (expected one of {names})") from None


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


BOOT_ID = _read_boot_id()


def boottime() -> float:
    """Seconds since the kernel booted (counts suspend; immune to wall-clock jumps)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class _UUID7:
    """UUIDv7 strings: 48-bit Unix milliseconds then randomness, increasing per process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        rand = secrets.randbits(74)
        value = (
            (ms << 80)
            | (0x7 << 76)
            | ((rand >> 62) << 64)
            | (0b10 << 62)
            | (rand & ((1 << 62) - 1))
        )
        with self._lock:
            # Strictly increasing within this process even if the wall clock steps back.
            if value <= self._last:
                value = self._last + 1
            self._last = value
        return str(uuid.UUID(int=value))

    def reset(self) -> None:
        self._last = 0


uuid7 = _UUID7()
# A child forked from one parent must not continue the parent's sequence.
os.register_at_fork(after_in_child=uuid7.reset)


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened at the edge, as delivered to the centre."""

    kind: str
    source: str
    priority: Priority
    site: str
    device: str
    seq: int
    payload: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=uuid7)
    time: float = field(default_factory=time.time)
    boottime: float = field(default_factory=boottime)
    boot_id: str = BOOT_ID
    test: bool = False
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "id": self.id,
            "site": self.site,
            "device": self.device,
            "source": self.source,
            "kind": self.kind,
            "priority": self.priority.label,
            "time": utc_iso(self.time),
            "boottime": round(self.boottime, 6),
            "boot_id": self.boot_id,
            "seq": self.seq,
            "test": self.test,
            "payload": self.payload,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return cls(
            kind=data["kind"],
            source=data["source"],
            priority=Priority.parse(data["priority"]),
            site=data["site"],
            device=data["device"],
            seq=int(data["seq"]),
            payload=dict(data.get("payload") or {}),
            id=data["id"],
            time=datetime.fromisoformat(data["time"].replace("Z", "+00:00")).timestamp(),
            boottime=float(data.get("boottime", 0.0)),
            boot_id=data.get("boot_id", "unknown"),
            test=bool(data.get("test", False)),
            schema=int(data.get("schema", SCHEMA_VERSION)),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls.from_dict(json.loads(text))


#: Event kinds: dotted words of ASCII lowercase letters, digits and ``_`` (one MQTT topic
#: level); the same pattern as ``kind`` in contract/schemas/event.json.
KIND_PATTERN = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
MAX_KIND_LENGTH = 64


def valid_kind(kind: str) -> bool:
    """Kinds are dotted lowercase words, usable as one MQTT topic level."""
    return len(kind) <= MAX_KIND_LENGTH and KIND_PATTERN.fullmatch(kind) is not None


__all__ = [
    "BOOT_ID",
    "KIND_PATTERN",
    "MAX_KIND_LENGTH",
    "SCHEMA_VERSION",
    "Event",
    "Priority",
    "boottime",
    "utc_iso",
    "uuid7",
    "valid_kind",
]
