"""The ``contact_input`` driver: relay and beacon outputs read as GPIO dry contacts.

Many gates and X-ray machines offer no data port, only an alarm relay. Wire it
**normally closed** through an isolated input to a GPIO with a pull-up: at rest
the circuit is closed; an alarm opens it, and so does a cut wire. That is the
fail-safe part: a cut wire can never hide an alarm, because it reads as one.
An open circuit is therefore reported at once as the mapped event, and if it
stays open longer than ``fault_after`` seconds (alarm relays pulse, they do
not hold for minutes) it is also reported as a fault: ``device.offline`` with
the reason, and ``device.online`` when the circuit closes again.

Debouncing is done here, not by gpiozero: its ``bounce_time`` differs between
pin factories and the mock factory ignores it. A level counts once it has been
stable for ``debounce`` seconds. A periodic check also catches an edge the
pin library missed.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

from gpiozero import DigitalInputDevice
from gpiozero.exc import BadPinFactory, GPIOZeroError

from agent.config import ConfigError, check
from agent.driver import CommandError, Driver, DriverContext, Health, HealthState, Timer
from agent.event import Priority, valid_kind
from drivers.gpio_common import mock_factory

#: Default priority of the kinds a contact is usually mapped to.
KIND_PRIORITIES = {
    "gate.alarm": "high",
    "xray.alert": "high",
    "tamper": "high",
    "door.open": "normal",
    "door.closed": "normal",
}
#: Default event when a contact returns to rest (none for alarms: they do not "end").
RESTORE_KINDS = {"door.open": "door.closed"}


def _priority_ok(value: str) -> bool:
    try:
        return not value or Priority.parse(value) is not None
    except ValueError:
        return False


def _kind_ok(value: str) -> bool:
    return not value or valid_kind(value)


@dataclass(frozen=True)
class ContactConfig:
    """``[[drivers.<name>.inputs]]``: one dry contact on one GPIO."""

    #: BCM GPIO number.
    pin: int = field(metadata=check(minimum=0, maximum=53))
    #: Event kind when the contact becomes active: gate.alarm, xray.alert, door.open, tamper, ...
    kind: str = field(metadata=check(valid_kind, "must be a dotted lowercase event kind"))
    #: Names this input in events and health (default ``gpio<pin>``).
    name: str = ""
    #: Kind when it returns to rest ("" = the default: door.closed after door.open, else none).
    restore_kind: str = field(default="", metadata=check(_kind_ok, "must be an event kind"))
    #: ``nc``: closed at rest, open = active (fail-safe). ``no``: open at rest, closed = active.
    wiring: Literal["nc", "no"] = "nc"
    #: The level of a closed contact: ``low`` with the pin pulled up (usual), ``high`` pulled down.
    closed_level: Literal["low", "high"] = "low"
    #: Seconds a level must hold before it counts.
    debounce: float = field(default=0.05, metadata=check(minimum=0.0, maximum=10.0))
    #: nc wiring: an open circuit lasting this long is also a fault (cut wire); 0 = never.
    fault_after: float = field(default=30.0, metadata=check(minimum=0.0, maximum=86400.0))
    priority: str = field(
        default="", metadata=check(_priority_ok, "must be critical, high, normal or low")
    )
    #: Constant fields added to this input's events (``{gate = "main entrance"}``).
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or f"gpio{self.pin}"


@dataclass(frozen=True)
class ContactInputConfig:
    """Options of ``[drivers.<name>] type = "contact_input"``."""

    inputs: list[ContactConfig] = field(default_factory=list)
    #: "" lets gpiozero pick the board's pin library; "mock" uses gpiozero's MockFactory
    #: (demos, tests: no hardware); or name one: "lgpio", "rpigpio", "pigpio", "native".
    pin_factory: Literal["", "mock", "lgpio", "rpigpio", "pigpio", "native"] = ""
    #: Seconds between checks for missed edges and long-open (faulted) circuits.
    check_interval: float = field(default=1.0, metadata=check(minimum=0.01, maximum=60.0))

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("at least one [[inputs]] table is needed", "inputs")
        pins: set[int] = set()
        labels: set[str] = set()
        for i, contact in enumerate(self.inputs):
            if contact.pin in pins:
                raise ConfigError(f"GPIO {contact.pin} is used by two inputs", f"inputs[{i}].pin")
            if contact.label in labels:
                raise ConfigError(
                    f"input name {contact.label!r} is used twice", f"inputs[{i}].name"
                )
            pins.add(contact.pin)
            labels.add(contact.label)


class NoGpioError(RuntimeError):
    """No pin library works on this machine and the mock was not asked for."""


def pin_factory(name: str) -> Any:
    """The gpiozero pin factory named in the config (None = gpiozero's own choice)."""
    if not name:
        return None
    if name == "mock":
        return mock_factory()
    factories = {ep.name: ep for ep in entry_points(group="gpiozero_pin_factories")}
    try:
        return factories[name].load()()
    except Exception as exc:
        raise NoGpioError(f"pin factory {name!r} is not usable here: {exc}") from exc


class _Contact:
    """One input's device and debounced state."""

    def __init__(self, config: ContactConfig, device: Any):
        self.config = config
        self.device = device
        self.active = False
        self.active_since = 0.0
        self.faulted = False
        self.timer: threading.Timer | None = None
        self.activations = 0
        self.edges = 0

    @property
    def circuit_closed(self) -> bool:
        return bool(self.device.is_active)

    def reads_active(self) -> bool:
        closed = self.circuit_closed
        return not closed if self.config.wiring == "nc" else closed


class ContactInputDriver(Driver):
    """Maps dry contacts to events: the configured kind when a contact becomes
    active, an optional restore kind, and ``device.offline``/``device.online``
    around a normally-closed circuit left open (a cut wire)."""

    config_class = ContactInputConfig
    summary = "dry-contact inputs on GPIO (relay/beacon outputs of gates, X-ray, doors)"
    config: ContactInputConfig

    def __init__(self, ctx: DriverContext, config: ContactInputConfig):
        super().__init__(ctx, config)
        self._lock = threading.RLock()
        self._contacts: list[_Contact] = []
        self._timer: Timer | None = None
        self.factory: Any = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.factory = pin_factory(self.config.pin_factory)
        try:
            # gpiozero warns about every pin library it falls back from; the error says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for cfg in self.config.inputs:
                    device = DigitalInputDevice(
                        cfg.pin, pull_up=cfg.closed_level == "low", pin_factory=self.factory
                    )
                    self._contacts.append(_Contact(cfg, device))
        except BadPinFactory:
            self._close_devices()
            raise NoGpioError(
                f"drivers.{self.ctx.name}: no GPIO pin library works on this machine (on a "
                "Raspberry Pi install python3-lgpio); for a demo without hardware set "
                'pin_factory = "mock"'
            ) from None
        except (GPIOZeroError, OSError, ValueError) as exc:
            self._close_devices()
            raise NoGpioError(f"drivers.{self.ctx.name}: cannot open GPIO {exc}") from exc
        now = time.monotonic()
        for contact in self._contacts:
            contact.device.when_activated = lambda c=contact: self._edge(c)
            contact.device.when_deactivated = lambda c=contact: self._edge(c)
            if contact.reads_active():  # fail-safe: an open circuit at start is reported
                self._become(contact, True, now, at_start=True)
        self._timer = self.ctx.every(self.config.check_interval, self.check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_devices()

    def _close_devices(self) -> None:
        with self._lock:
            for contact in self._contacts:
                if contact.timer is not None:
                    contact.timer.cancel()
                contact.device.close()
            self._contacts.clear()

    def health(self) -> Health:
        with self._lock:
            contacts = list(self._contacts)
        counters: dict[str, int | float] = {}
        states = []
        for c in contacts:
            counters[f"{c.config.label}.activations"] = c.activations
            counters[f"{c.config.label}.edges"] = c.edges
            shown = "FAULT (circuit open)" if c.faulted else "ACTIVE" if c.active else "rest"
            states.append(f"{c.config.label}: {shown}")
        if not contacts:
            return Health("starting", "GPIO not open", counters)
        state: HealthState = "degraded" if any(c.faulted for c in contacts) else "ok"
        return Health(state, ", ".join(states), counters)

    def simulate(self, action: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """``open``/``close`` input ``name`` (only with ``pin_factory = "mock"``)."""
        if self.config.pin_factory != "mock":
            raise CommandError('contact simulation needs pin_factory = "mock"')
        if action not in ("open", "close"):
            raise CommandError(f"unknown action {action!r} (contact inputs know: open, close)")
        contact = next((c for c in self._contacts if c.config.label == args.get("name")), None)
        if contact is None:
            names = ", ".join(c.config.label for c in self._contacts)
            raise CommandError(f"no input named {args.get('name')!r} (inputs: {names})")
        pin = self.factory.pin(contact.config.pin)
        closed_low = contact.config.closed_level == "low"
        if (action == "close") == closed_low:
            pin.drive_low()
        else:
            pin.drive_high()
        return {"input": contact.config.label, "circuit": action}

    # -- edges, debounce, faults ------------------------------------------------

    def _edge(self, contact: _Contact) -> None:
        """A level change from the pin library: settle once it holds for ``debounce``."""
        with self._lock:
            contact.edges += 1
            self._arm(contact)

    def _arm(self, contact: _Contact) -> None:
        if contact.timer is not None:
            contact.timer.cancel()
        if contact.config.debounce <= 0:
            contact.timer = None
            self._settle(contact)
            return
        contact.timer = threading.Timer(contact.config.debounce, self._settle, (contact,))
        contact.timer.daemon = True
        contact.timer.start()

    def _settle(self, contact: _Contact) -> None:
        with self._lock:
            contact.timer = None
            if contact not in self._contacts:
                return  # stopped meanwhile
            active = contact.reads_active()
            if active != contact.active:
                self._become(contact, active, time.monotonic())

    def check(self) -> None:
        """Periodic: catch missed edges and report circuits open for too long."""
        now = time.monotonic()
        with self._lock:
            for contact in self._contacts:
                if contact.timer is None and contact.reads_active() != contact.active:
                    self._arm(contact)
                limit = contact.config.fault_after
                if (
                    contact.config.wiring == "nc"
                    and contact.active
                    and not contact.faulted
                    and limit > 0
                    and now - contact.active_since >= limit
                ):
                    contact.faulted = True
                    self._emit(
                        contact,
                        "device.offline",
                        "high",
                        reason=f"circuit open for {limit:g} s: "
                        "cut wire, unplugged, or alarm output stuck",
                    )

    def _become(self, contact: _Contact, active: bool, now: float, at_start: bool = False) -> None:
        cfg = contact.config
        contact.active = active
        if active:
            contact.active_since = now
            contact.activations += 1
            extra = {"at_start": True} if at_start else {}
            self._emit(
                contact, cfg.kind, cfg.priority or KIND_PRIORITIES.get(cfg.kind, "high"), **extra
            )
            return
        if contact.faulted:
            contact.faulted = False
            self._emit(contact, "device.online", "normal", reason="circuit closed again")
        restore = cfg.restore_kind or RESTORE_KINDS.get(cfg.kind, "")
        if restore:
            self._emit(contact, restore, cfg.priority or KIND_PRIORITIES.get(restore, "normal"))

    def _emit(self, contact: _Contact, kind: str, priority: str, **extra: Any) -> None:
        cfg = contact.config
        payload = {**cfg.payload, "input": cfg.label, "pin": cfg.pin, "wiring": cfg.wiring, **extra}
        self.ctx.emit(kind, payload, priority)
