"""The driver API: the only surface a device driver sees of the core.

A driver is a class registered under the ``wardpost.drivers`` entry-point group.
The core builds one instance per ``[drivers.<name>]`` table::

    [drivers.entrance_button]
    type = "panic_button"      # the entry-point name
    pin = 17                   # everything else is validated by the driver's Config

and gives it a :class:`DriverContext`. Drivers produce events only through
:meth:`DriverContext.emit`, react to commands from the centre through
:meth:`DriverContext.on_command`, and may watch every local event (for output
rules) through :meth:`DriverContext.watch`. They never import the core's
publisher, outbox or MQTT client.

A minimal driver::

    @dataclass(frozen=True)
    class Config:
        interval: float = field(default=1.0, metadata=check(minimum=0.01))

    class Ticker(Driver):
        config_class = Config

        def start(self) -> None:
            self._timer = self.ctx.every(self.config.interval, self._tick)

        def _tick(self) -> None:
            self.ctx.emit("demo.tick", {"n": 1})

        def stop(self) -> None:
            self._timer.cancel()
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from agent.event import Event, Priority

if TYPE_CHECKING:
    from agent.homeassistant import Entity

HealthState = Literal["starting", "ok", "degraded", "failed", "stopped"]


@dataclass(frozen=True)
class Health:
    """A driver's self-report, shown in heartbeats, ``wardpost status`` and metrics."""

    state: HealthState
    detail: str = ""
    counters: Mapping[str, int | float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "counters": dict(self.counters)}


class Fate(enum.Enum):
    """Where an accepted event is kept until the centre has it."""

    #: Committed to the outbox on disk: survives a crash or restart (and a power cut for
    #: the priorities the outbox syncs, see ``[outbox] sync``).
    DURABLE = "durable"
    #: Held in memory only: storage is failing, or its last free space is kept for alarms.
    #: Still delivered while the agent runs; lost if it stops before the disk takes it.
    MEMORY = "memory"


class Emission:
    """The handle :meth:`DriverContext.emit` returns: follow one event's journey.

    The outbox decides the event's :class:`Fate` soon after the emit: ``DURABLE`` once
    committed to disk, ``MEMORY`` while storage cannot take it (an event held in memory
    becomes ``DURABLE`` when the disk takes it later). ``delivered`` is set once the
    centre has it: the broker's PUBACK with ``delivery = "broker"``, the centre's
    receipt with ``delivery = "receipt"``.
    """

    __slots__ = (
        "__weakref__",
        "_accepted",
        "_callbacks",
        "_delivered",
        "_durable",
        "_fate",
        "_lock",
        "event",
    )

    def __init__(self, event: Event):
        self.event = event
        self._fate: Fate | None = None
        self._accepted = threading.Event()
        self._durable = threading.Event()
        self._delivered = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Emission], None]] = []

    @property
    def fate(self) -> Fate | None:
        """None until the outbox has taken the event in."""
        return self._fate

    @property
    def is_durable(self) -> bool:
        return self._durable.is_set()

    @property
    def is_delivered(self) -> bool:
        return self._delivered.is_set()

    def wait_accepted(self, timeout: float | None = None) -> Fate | None:
        """Wait until the outbox has taken the event in; its fate, or None on time-out."""
        self._accepted.wait(timeout)
        return self._fate

    def wait_durable(self, timeout: float | None = None) -> bool:
        """Wait until the event is on disk (an event held in memory waits for the disk)."""
        return self._durable.wait(timeout)

    def wait_delivered(self, timeout: float | None = None) -> bool:
        return self._delivered.wait(timeout)

    def on_delivered(self, callback: Callable[[Emission], None]) -> None:
        """Call ``callback(emission)`` once delivered (at once if it already is).

        The emission stays alive until then even if the caller drops it: the core
        follows emissions weakly, and a callback is a promise to someone."""
        with self._lock:
            if not self._delivered.is_set():
                self._callbacks.append(callback)
                with _PINNED_LOCK:
                    _PINNED.add(self)
                return
        callback(self)

    # Called by the core only.
    def mark_durable(self) -> None:
        self._fate = Fate.DURABLE
        self._durable.set()
        self._accepted.set()

    def mark_in_memory(self) -> None:
        if self._fate is not Fate.DURABLE:
            self._fate = Fate.MEMORY
        self._accepted.set()

    def mark_delivered(self) -> None:
        with self._lock:
            self._delivered.set()
            callbacks, self._callbacks = self._callbacks, []
        with _PINNED_LOCK:
            _PINNED.discard(self)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logging.getLogger("wardpost.driver").exception(
                    "delivery callback for event %s failed", self.event.id
                )


# Emissions with delivery callbacks, kept alive until delivered (see Emission.on_delivered).
_PINNED: set[Emission] = set()
_PINNED_LOCK = threading.Lock()


class CommandError(Exception):
    """Raised by a command handler: the centre gets ``ok: false`` with this message."""


@dataclass(frozen=True)
class Command:
    """A command from the centre, after parsing and verification."""

    id: str
    name: str
    issued_at: float
    args: Mapping[str, Any]
    target: str | None = None  # a driver instance name, or None for "whoever handles it"


#: A command handler returns a result table, or None for "not mine" (another driver's alarm).
CommandHandler = Callable[[Command], Mapping[str, Any] | None]


class Timer(Protocol):
    def cancel(self) -> None: ...


class DriverContext(abc.ABC):
    """What the core gives each driver instance."""

    name: str
    site: str
    device: str
    log: logging.Logger
    state_dir: Path  # this instance's own folder, created by the core
    delivery: Literal["broker", "receipt"]

    @abc.abstractmethod
    def emit(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.NORMAL,
        *,
        test: bool = False,
    ) -> Emission:
        """Accept an event for delivery. Never blocks on the disk or the network."""

    @abc.abstractmethod
    def on_command(self, name: str, handler: CommandHandler) -> None:
        """Handle command ``name`` from the centre (``wardpost/<site>/<device>/cmd/<name>``)."""

    @abc.abstractmethod
    def watch(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every event any driver or the core emits, off the
        emitting thread (for local output rules)."""

    @abc.abstractmethod
    def every(self, interval: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` every ``interval`` seconds on a core thread until cancelled;
        exceptions are logged and counted, never fatal."""


class Driver(abc.ABC):
    """Base class of every device driver.

    Subclasses set ``config_class`` to a frozen dataclass describing their
    options (validated by :func:`agent.config.parse_section`, so errors name
    ``drivers.<name>.<field>``), and implement :meth:`start` and :meth:`stop`.
    :meth:`start` must not block: open devices, start threads, return. Raising
    from :meth:`start` marks this driver failed (the core retries with backoff)
    without affecting other drivers.
    """

    config_class: ClassVar[type[Any]]
    #: One line for ``wardpost drivers``.
    summary: ClassVar[str] = ""
    #: The Home Assistant entities of every instance (see :meth:`home_assistant_entities`).
    home_assistant: ClassVar[Sequence[Entity]] = ()

    def __init__(self, ctx: DriverContext, config: Any):
        self.ctx = ctx
        self.config = config

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def health(self) -> Health:
        return Health("ok")

    @classmethod
    def home_assistant_entities(cls, config: Any) -> Sequence[Entity]:
        """What Home Assistant shows of an instance with ``config`` (its validated options)
        when ``[homeassistant]`` discovery is on: entities fed by the driver's events. The
        core adds availability, the device and a problem sensor from the heartbeat. By
        default :attr:`home_assistant`; a driver whose entities depend on its options
        overrides this."""
        return cls.home_assistant

    def simulate(self, action: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """Act as the hardware would (``wardpost simulate <driver> <action>``, the demo)."""
        raise CommandError(f"driver {self.ctx.name!r} has no simulation")
