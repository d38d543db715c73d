"""The ``outputs`` driver: LEDs, buzzers, sirens and strobe relays driven by event rules.

Each rule watches every local event (any driver's, through ``ctx.watch``) and,
when the event's kind and source match its globs, sets one output to a
pattern::

    [[drivers.ward3_outputs.rules]]
    kind = "panic.pressed"
    output = "siren"
    pattern = "blink"      # steady | blink | pulse | off
    on_time = 0.5
    off_time = 0.5
    duration = 120         # seconds; 0 = until an "off" rule or the silence command

The ``silence`` command turns off the audible outputs (buzzers, sirens) and
leaves lights and alarms alone: the alarm stays open until it is resolved.
"""

from __future__ import annotations

import fnmatch
import functools
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gpiozero import LED, Buzzer, DigitalOutputDevice

from agent.config import ConfigError, check
from agent.driver import Command, CommandError, Driver, DriverContext, Health
from agent.event import Event, Priority
from contract.commands import arg
from drivers.gpio_common import (
    PIN_MESSAGE,
    PinFactoryChoice,
    PinName,
    ScheduledCall,
    Scheduler,
    open_device,
    valid_pin,
)

DeviceKind = Literal["led", "buzzer", "siren", "strobe", "relay"]
Pattern = Literal["steady", "blink", "pulse", "off"]
#: Device kinds that make noise unless ``audible`` says otherwise.
AUDIBLE_BY_DEFAULT = frozenset({"buzzer", "siren"})
#: Argument names of ``silence``, from the contract both sides share.
OUTPUT_ARG = arg("output", "silence")
BY_ARG = arg("by", "silence")
_DEVICE_CLASSES: dict[str, type[DigitalOutputDevice]] = {"led": LED, "buzzer": Buzzer}


@dataclass(frozen=True)
class OutputSpec:
    """``[drivers.<name>.outputs.<output>]``: one output pin."""

    pin: PinName = field(metadata=check(valid_pin, PIN_MESSAGE))
    device: DeviceKind = "led"
    #: false when the pin drives a relay board or transistor that switches on a low level.
    active_high: bool = True
    #: Silenced by the ``silence`` command; defaults to true for buzzers and sirens.
    audible: bool | None = None

    @property
    def is_audible(self) -> bool:
        return self.device in AUDIBLE_BY_DEFAULT if self.audible is None else self.audible


@dataclass(frozen=True)
class Rule:
    """``[[drivers.<name>.rules]]``: on a matching event, set ``output`` to ``pattern``."""

    output: str
    #: Glob on the event kind, e.g. "panic.pressed" or "panic.*"; "" matches any kind.
    kind: str = ""
    #: Glob on the emitting driver's name, e.g. "ward3_*"; "" matches any source.
    source: str = ""
    pattern: Pattern = "steady"
    on_time: float = field(default=0.5, metadata=check(minimum=0.01, maximum=3600.0))
    off_time: float = field(default=0.5, metadata=check(minimum=0.01, maximum=3600.0))
    #: Pulses for pattern "pulse".
    count: int = field(default=1, metadata=check(minimum=1, maximum=1000))
    #: Seconds a steady or blink pattern lasts; 0 = until an "off" rule or silence.
    duration: float = field(default=0.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: Whether events marked test (the ``test`` command) trigger this rule.
    test_events: bool = True

    def __post_init__(self) -> None:
        if not (self.kind or self.source):
            raise ConfigError("give kind and/or source: a rule must say which events it is for")

    def matches(self, event: Event) -> bool:
        return (
            (not self.kind or fnmatch.fnmatchcase(event.kind, self.kind))
            and (not self.source or fnmatch.fnmatchcase(event.source, self.source))
            and (self.test_events or not event.test)
        )


@dataclass(frozen=True)
class OutputsConfig:
    """Options of ``[drivers.<name>] type = "outputs"``."""

    outputs: dict[str, OutputSpec]
    rules: list[Rule] = field(default_factory=list)
    pin_factory: PinFactoryChoice = "default"

    def __post_init__(self) -> None:
        if not self.outputs:
            raise ConfigError("define at least one output", "outputs")
        seen: dict[PinName, str] = {}
        for name, spec in self.outputs.items():
            if spec.pin in seen:
                raise ConfigError(
                    f"is the same pin as outputs.{seen[spec.pin]}", f"outputs.{name}.pin"
                )
            seen[spec.pin] = name
        for i, rule in enumerate(self.rules):
            if rule.output not in self.outputs:
                known = ", ".join(sorted(self.outputs))
                raise ConfigError(
                    f"no output named {rule.output!r} (outputs: {known})", f"rules[{i}].output"
                )


def _build_device(spec: OutputSpec, factory: Any) -> DigitalOutputDevice:
    cls = _DEVICE_CLASSES.get(spec.device, DigitalOutputDevice)
    return cls(spec.pin, active_high=spec.active_high, initial_value=False, pin_factory=factory)


@dataclass
class _Output:
    spec: OutputSpec
    device: DigitalOutputDevice
    pattern: Pattern = "off"
    since: float = 0.0
    ends: ScheduledCall | None = None


class OutputsDriver(Driver):
    """Drives outputs from event rules; handles the ``silence`` command.

    Events: ``outputs.silenced`` (normal) with the outputs turned off, the
    command id and ``by`` when the operator is named.
    """

    config_class = OutputsConfig
    summary = "LEDs, buzzers, sirens and strobes on GPIO, switched by event rules"
    config: OutputsConfig

    def __init__(self, ctx: DriverContext, config: OutputsConfig):
        super().__init__(ctx, config)
        self._lock = threading.Lock()
        self._outputs: dict[str, _Output] = {}
        self._scheduler: Scheduler | None = None
        self._counters: Counter[str] = Counter()
        ctx.watch(self._on_event)
        ctx.on_command("silence", self._handle_silence)

    def start(self) -> None:
        self._scheduler = Scheduler(f"outputs-{self.ctx.name}", self.ctx.log)
        try:
            for name, spec in self.config.outputs.items():
                device = open_device(
                    self.config.pin_factory,
                    self.ctx.name,
                    f"outputs.{name}.pin {spec.pin!r}",
                    functools.partial(_build_device, spec),
                )
                with self._lock:
                    self._outputs[name] = _Output(spec, device)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        with self._lock:
            outputs, self._outputs = self._outputs, {}
        for output in outputs.values():
            output.device.close()

    def health(self) -> Health:
        with self._lock:
            on = [f"{name}: {o.pattern}" for name, o in self._outputs.items() if o.pattern != "off"]
            counters: dict[str, int | float] = dict(self._counters)
        return Health("ok", ", ".join(on) or "all off", counters)

    # -- rules (on the core's event-bus thread) ---------------------------------------------

    def _on_event(self, event: Event) -> None:
        for rule in self.config.rules:
            if rule.matches(event):
                self._apply(rule)

    def _apply(self, rule: Rule) -> None:
        with self._lock:
            output = self._outputs.get(rule.output)
            if output is None:  # not started, or stopping
                return
            self._counters["activations"] += 1
            if output.ends is not None:
                output.ends.cancel()
                output.ends = None
            output.pattern, output.since = rule.pattern, time.monotonic()
            device = output.device
            if rule.pattern == "off":
                device.off()
            elif rule.pattern == "steady":
                device.on()
            elif rule.pattern == "blink":
                device.blink(on_time=rule.on_time, off_time=rule.off_time)
            else:
                device.blink(on_time=rule.on_time, off_time=rule.off_time, n=rule.count)
                # A pulse train ends by itself; remember it as "off" once done.
                length = rule.count * (rule.on_time + rule.off_time)
                output.ends = self._end_later(output, length, turn_off=False)
            if rule.duration > 0 and rule.pattern in ("steady", "blink"):
                output.ends = self._end_later(output, rule.duration, turn_off=True)

    def _end_later(self, output: _Output, delay: float, turn_off: bool) -> ScheduledCall | None:
        if self._scheduler is None:
            return None
        since = output.since

        def end() -> None:
            with self._lock:
                if output.since != since:  # a later rule took the output over
                    return
                output.pattern, output.ends = "off", None
                if turn_off:
                    output.device.off()

        return self._scheduler.call_later(delay, end)

    # -- commands ----------------------------------------------------------------------------

    def _handle_silence(self, cmd: Command) -> Mapping[str, Any] | None:
        if cmd.target is not None and cmd.target != self.ctx.name:
            return None
        only = cmd.args.get(OUTPUT_ARG)
        if only is not None and not isinstance(only, str):
            raise CommandError(f"args.{OUTPUT_ARG} must be an output name, got {only!r}")
        with self._lock:
            if only is not None and only not in self._outputs:
                if cmd.target == self.ctx.name:
                    known = ", ".join(sorted(self._outputs))
                    raise CommandError(f"{self.ctx.name} has no output {only!r} (outputs: {known})")
                return None
            silenced = []
            for name, output in self._outputs.items():
                if not output.spec.is_audible or (only is not None and name != only):
                    continue
                if output.ends is not None:
                    output.ends.cancel()
                    output.ends = None
                if output.pattern != "off":
                    silenced.append(name)
                output.pattern, output.since = "off", time.monotonic()
                output.device.off()
            self._counters["silenced"] += len(silenced)
        by = cmd.args.get(BY_ARG)
        operator = {"by": by} if isinstance(by, str) and by else {}
        self.ctx.emit(
            "outputs.silenced",
            {"outputs": silenced, "command": cmd.id, **operator},
            Priority.NORMAL,
        )
        return {"silenced": silenced}
