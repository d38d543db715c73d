"""The ``panic_button`` driver: one duress button on a GPIO pin, and its LED.

One ``[drivers.<name>]`` table per button. The driver debounces the contact
itself, turns presses into alarms according to ``mode``, reports stuck buttons
and cut supervision loops, and drives the button's LED through the alarm's
journey::

    pressed ──► slow blink ──(delivered)──► fast blink ──(ack)──► steady ──(resolve)──► off
                 stored locally              centre has it         operator on it

The alarm id is the id of the alarm's ``panic.pressed`` event; every later
event about the alarm carries it as ``payload.alarm``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gpiozero import LED, DigitalInputDevice
from gpiozero.pins.mock import MockPin

from agent.config import ConfigError, check
from agent.driver import Command, CommandError, Driver, DriverContext, Emission, Health
from agent.event import Priority
from contract.commands import arg
from drivers.gpio_common import (
    PIN_MESSAGE,
    Debouncer,
    PinFactoryChoice,
    PinName,
    ScheduledCall,
    Scheduler,
    open_device,
    valid_pin,
)

PIN = check(valid_pin, PIN_MESSAGE)
#: How many presses within ``window`` make an alarm, per multi-press mode.
PRESSES_NEEDED = {"press": 1, "hold": 1, "double": 2, "triple": 3}
#: Closed alarm ids remembered so a late ``ack``/``resolve`` still finds its button.
CLOSED_ALARMS_KEPT = 64
#: Argument names of ``ack`` and ``resolve``, from the contract both sides share.
ALARM_ARG = arg("alarm", "ack", "resolve")
BY_ARG = arg("by", "ack", "resolve")

LedPattern = Literal["off", "slow", "fast", "steady"]
AlarmState = Literal["raised", "delivered", "acknowledged"]


@dataclass(frozen=True)
class Location:
    """Where the button is; copied into every event so responders know where to go."""

    ward: str = ""
    room: str = ""
    floor: str | int = ""

    def __post_init__(self) -> None:
        if not (self.ward.strip() or self.room.strip()):
            raise ConfigError("give at least ward or room: responders must know where to go")

    def to_dict(self) -> dict[str, Any]:
        return {"ward": self.ward, "room": self.room, "floor": self.floor}


@dataclass(frozen=True)
class PanicButtonConfig:
    """Options of ``[drivers.<name>] type = "panic_button"`` (one button per table)."""

    #: The button's input: BCM number or gpiozero pin name.
    pin: PinName = field(metadata=PIN)
    location: Location
    #: true: internal pull-up (button to GND); false: internal pull-down (button to 3V3);
    #: "off": no internal resistor (an external one is fitted; give active_state).
    pull_up: Literal[True, False, "off"] = True
    #: The level that means "pressed": defaults to "low" with pull_up = true and
    #: "high" with pull_up = false. A normally-closed button with a pull-up is "high".
    active_state: Literal["low", "high"] | None = None
    #: Seconds of contact bounce to ignore after an accepted edge (0 = none).
    bounce_time: float = field(default=0.02, metadata=check(minimum=0.0, maximum=1.0))
    #: press: at once; hold: held hold_time s; double/triple: presses within window s.
    mode: Literal["press", "hold", "double", "triple"] = "press"
    hold_time: float = field(default=2.0, metadata=check(minimum=0.05, maximum=30.0))
    window: float = field(default=2.0, metadata=check(minimum=0.1, maximum=10.0))
    #: Held longer than this is a fault: panic.stuck once, panic.unstuck on release (0 = off).
    stuck_after: float = field(default=60.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: Optional supervision input wired as a closed loop through the button's cable.
    loop_pin: PinName | None = field(default=None, metadata=PIN)
    #: true: the loop pulls loop_pin to GND when intact; false: to 3V3.
    loop_pull_up: bool = True
    led_pin: PinName | None = field(default=None, metadata=PIN)
    led_active_high: bool = True
    #: Seconds after which an alarm nobody resolved is closed locally and the LED goes off
    #: (a new press then raises a new alarm); 0 = never.
    led_timeout: float = field(default=600.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: Half-periods of the LED blinks: not yet delivered, and delivered.
    slow_blink: float = field(default=1.0, metadata=check(minimum=0.05, maximum=10.0))
    fast_blink: float = field(default=0.15, metadata=check(minimum=0.02, maximum=10.0))
    #: "mock": gpiozero's MockFactory (demos, tests, machines without GPIO).
    pin_factory: PinFactoryChoice = "default"

    def __post_init__(self) -> None:
        if self.pull_up == "off" and self.active_state is None:
            raise ConfigError('required when pull_up = "off" ("low" or "high")', "active_state")
        pins = [("pin", self.pin), ("loop_pin", self.loop_pin), ("led_pin", self.led_pin)]
        used = [(name, pin) for name, pin in pins if pin is not None]
        for i, (name, pin) in enumerate(used):
            for other, other_pin in used[:i]:
                if pin == other_pin:
                    raise ConfigError(f"is the same pin as {other} ({pin!r})", name)
        if self.mode == "hold" and 0 < self.stuck_after <= self.hold_time:
            raise ConfigError("must be longer than hold_time (or 0 to disable)", "stuck_after")

    @property
    def pressed_high(self) -> bool:
        """True when the pressed button drives the pin high."""
        if self.active_state is not None:
            return self.active_state == "high"
        return self.pull_up is False


@dataclass
class _Alarm:
    #: Held so the core keeps following it: it tracks live emissions weakly, and an
    #: emission nobody holds would never report its delivery (the LED would stay slow).
    emission: Emission
    test: bool
    presses: int
    state: AlarmState = "raised"
    expiry: ScheduledCall | None = None

    @property
    def id(self) -> str:
        return self.emission.event.id


class PanicButtonDriver(Driver):
    """A panic button: presses become ``panic.pressed`` alarms the centre can ack and resolve.

    Events (all carry ``payload.location``):

    * ``panic.pressed`` (critical): ``mode``, ``presses``; its id is the alarm id.
    * ``panic.released``: the activating press ended; ``alarm``, ``held`` seconds.
    * ``panic.acknowledged`` / ``panic.resolved`` (high): ``alarm``, ``presses``,
      ``command``, ``by``; resolved also says whether it was ``acknowledged``.
    * ``panic.expired``: nobody resolved the alarm within ``led_timeout``.
    * ``panic.stuck`` (high) / ``panic.unstuck``: held past ``stuck_after``.
    * ``panic.wiring_fault`` (high) / ``panic.wiring_restored``: supervision loop.

    Presses while an alarm is active do not raise new alarms; they are counted
    in the alarm's ``presses``. A ``test`` command raises a test alarm (events
    marked ``test``) that a real press replaces at once.
    """

    config_class = PanicButtonConfig
    summary = "a duress button on a GPIO pin, with an LED showing the alarm's journey"
    config: PanicButtonConfig

    def __init__(self, ctx: DriverContext, config: PanicButtonConfig):
        super().__init__(ctx, config)
        self._lock = threading.RLock()
        self._location = config.location.to_dict()
        self._scheduler: Scheduler | None = None
        self._button: DigitalInputDevice | None = None
        self._loop: DigitalInputDevice | None = None
        self._led: LED | None = None
        self._press: Debouncer | None = None
        self._loop_state: Debouncer | None = None
        self._counters: Counter[str] = Counter()
        self._alarm: _Alarm | None = None
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._press_token = 0
        self._pressed_at = 0.0
        self._hold: ScheduledCall | None = None
        self._stuck_check: ScheduledCall | None = None
        self._stuck = False
        self._release_alarm: str | None = None  # the alarm whose activating press is held
        self._sequence_start = 0.0
        self._sequence_count = 0
        self._wiring_fault = False
        self._led_pattern: LedPattern = "off"
        self._led_shown: LedPattern = "off"
        ctx.on_command("ack", self._handle_ack)
        ctx.on_command("resolve", self._handle_resolve)
        ctx.on_command("test", self._handle_test)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        cfg, name = self.config, self.ctx.name
        scheduler = self._scheduler = Scheduler(f"panic-{name}", self.ctx.log)
        # gpiozero's own notion of "active" for the pull chosen; we invert when the
        # configured pressed level differs (normally-closed contacts).
        gpiozero_active_high = cfg.pull_up is not True
        invert = cfg.pressed_high != gpiozero_active_high
        try:
            button = self._button = open_device(
                cfg.pin_factory,
                name,
                f"pin {cfg.pin!r}",
                lambda factory: DigitalInputDevice(
                    cfg.pin,
                    pull_up=None if cfg.pull_up == "off" else cfg.pull_up,
                    active_state=True if cfg.pull_up == "off" else None,
                    pin_factory=factory,
                ),
            )
            if cfg.loop_pin is not None:
                loop_pin = cfg.loop_pin
                self._loop = open_device(
                    cfg.pin_factory,
                    name,
                    f"loop_pin {loop_pin!r}",
                    lambda factory: DigitalInputDevice(
                        loop_pin, pull_up=cfg.loop_pull_up, pin_factory=factory
                    ),
                )
            if cfg.led_pin is not None:
                led_pin = cfg.led_pin
                self._led = open_device(
                    cfg.pin_factory,
                    name,
                    f"led_pin {led_pin!r}",
                    lambda factory: LED(
                        led_pin, active_high=cfg.led_active_high, pin_factory=factory
                    ),
                )
        except Exception:
            self.stop()
            raise

        press = self._press = Debouncer(
            cfg.bounce_time,
            lambda: bool(button.is_active) != invert,
            self._on_button,
            scheduler,
            initial=False,
        )
        button.when_activated = lambda: press.edge(not invert)
        button.when_deactivated = lambda: press.edge(invert)
        if self._loop is not None:
            loop = self._loop
            loop_state = self._loop_state = Debouncer(
                cfg.bounce_time,
                lambda: bool(loop.is_active),
                self._on_loop,
                scheduler,
                initial=True,
            )
            loop.when_activated = lambda: loop_state.edge(True)
            loop.when_deactivated = lambda: loop_state.edge(False)
            # An open loop at start is a fault to report now, not at the next edge.
            loop_state.edge(bool(loop.is_active))
        # A button already held at start is treated as a press: never miss a real one.
        press.edge(bool(button.is_active) != invert)

    def stop(self) -> None:
        for debouncer in (self._press, self._loop_state):
            if debouncer is not None:
                debouncer.cancel()
        if self._scheduler is not None:
            self._scheduler.close()
        for device in (self._button, self._loop, self._led):
            if device is not None:
                device.close()
        self._button = self._loop = self._led = None
        self._press = self._loop_state = None

    def health(self) -> Health:
        with self._lock:
            problems = []
            if self._stuck:
                problems.append("button stuck pressed")
            if self._wiring_fault:
                problems.append("supervision loop open (wiring fault)")
            alarm = self._alarm
            if alarm is None:
                status = "idle"
            else:
                kind = "test alarm" if alarm.test else "alarm"
                status = f"{kind} {alarm.id} {alarm.state}, {alarm.presses} presses"
            counters: dict[str, int | float] = dict(self._counters)
            counters["alarm_presses"] = alarm.presses if alarm else 0
            if self._press is not None:
                counters["bounces_filtered"] = self._press.filtered
        return Health("degraded" if problems else "ok", "; ".join([*problems, status]), counters)

    # -- inputs (gpiozero and scheduler threads; short, never blocking) ---------------------

    def _on_button(self, pressed: bool) -> None:
        with self._lock:
            now = time.monotonic()
            for timer in (self._hold, self._stuck_check):
                if timer is not None:
                    timer.cancel()
            self._hold = self._stuck_check = None
            if pressed:
                self._on_press(now)
                return
            held = round(now - self._pressed_at, 3)
            if self._release_alarm is not None:
                self._emit("panic.released", alarm=self._release_alarm, held=held)
                self._release_alarm = None
            if self._stuck:
                self._stuck = False
                self._emit("panic.unstuck", held=held)

    def _on_press(self, now: float) -> None:
        cfg = self.config
        self._counters["presses"] += 1
        self._press_token += 1
        self._pressed_at = now
        token = self._press_token
        scheduler = self._scheduler
        assert scheduler is not None
        if cfg.stuck_after > 0:
            self._stuck_check = scheduler.call_later(
                cfg.stuck_after, lambda: self._check_stuck(token)
            )
        alarm = self._alarm
        if alarm is not None and not alarm.test:
            alarm.presses += 1
            return
        if cfg.mode == "hold":
            self._hold = scheduler.call_later(cfg.hold_time, lambda: self._check_held(token))
            return
        needed = PRESSES_NEEDED[cfg.mode]
        if self._sequence_count and now - self._sequence_start <= cfg.window:
            self._sequence_count += 1
        else:
            self._sequence_start, self._sequence_count = now, 1
        if self._sequence_count >= needed:
            self._sequence_count = 0
            self._release_alarm = self._raise_alarm(presses=needed).id

    def _check_held(self, token: int) -> None:
        with self._lock:
            if token == self._press_token and self._pressed() and self._alarm_is_test_or_none():
                self._release_alarm = self._raise_alarm(presses=1).id

    def _check_stuck(self, token: int) -> None:
        with self._lock:
            if token != self._press_token or not self._pressed() or self._stuck:
                return
            self._stuck = True
            self._counters["stuck"] += 1
            held = round(time.monotonic() - self._pressed_at, 3)
            alarm = self._alarm.id if self._alarm else None
            self._emit("panic.stuck", Priority.HIGH, held=held, alarm=alarm)

    def _on_loop(self, intact: bool) -> None:
        with self._lock:
            if intact != self._wiring_fault:
                return
            self._wiring_fault = not intact
            if intact:
                self._emit("panic.wiring_restored", loop_pin=self.config.loop_pin)
            else:
                self._counters["wiring_faults"] += 1
                self._emit("panic.wiring_fault", Priority.HIGH, loop_pin=self.config.loop_pin)

    def _pressed(self) -> bool:
        return self._press is not None and self._press.level

    def _alarm_is_test_or_none(self) -> bool:
        return self._alarm is None or self._alarm.test

    # -- the alarm and its journey ---------------------------------------------------------

    def _emit(
        self,
        kind: str,
        priority: Priority = Priority.NORMAL,
        *,
        test: bool = False,
        **payload: Any,
    ) -> Emission:
        return self.ctx.emit(kind, {"location": self._location, **payload}, priority, test=test)

    def _raise_alarm(self, presses: int, test: bool = False) -> _Alarm:
        """Emit ``panic.pressed`` and start the LED journey (called under the lock)."""
        if self._alarm is not None:  # only a test alarm can be active here: a real one wins
            self._close(self._alarm, "superseded", "panic.resolved", reason="superseded")
        emission = self._emit(
            "panic.pressed", Priority.CRITICAL, test=test, mode=self.config.mode, presses=presses
        )
        alarm = self._alarm = _Alarm(emission, test, presses)
        self._counters["test_alarms" if test else "alarms"] += 1
        self._set_led("slow")
        if self.config.led_timeout > 0 and self._scheduler is not None:
            alarm.expiry = self._scheduler.call_later(
                self.config.led_timeout, lambda: self._expire(alarm)
            )
        emission.on_delivered(lambda _emission: self._delivered(alarm))
        return alarm

    def _delivered(self, alarm: _Alarm) -> None:
        with self._lock:
            if self._alarm is alarm and alarm.state == "raised":
                alarm.state = "delivered"
                self._set_led("fast")

    def _expire(self, alarm: _Alarm) -> None:
        with self._lock:
            if self._alarm is alarm:
                self._close(alarm, "expired", "panic.expired", state=alarm.state)

    def _close(self, alarm: _Alarm, final: str, kind: str, **payload: Any) -> None:
        if alarm.expiry is not None:
            alarm.expiry.cancel()
        self._alarm = None
        self._closed[alarm.id] = final
        while len(self._closed) > CLOSED_ALARMS_KEPT:
            self._closed.popitem(last=False)
        self._set_led("off")
        priority = Priority.NORMAL if final in ("expired", "superseded") else Priority.HIGH
        self._emit(
            kind, priority, test=alarm.test, alarm=alarm.id, presses=alarm.presses, **payload
        )

    def _set_led(self, pattern: LedPattern) -> None:
        self._led_pattern = pattern
        if self._led is not None and self._scheduler is not None:
            # gpiozero's blink() joins its previous thread: do it on our thread, not an input's.
            self._scheduler.call_soon(self._show_led)

    def _show_led(self) -> None:
        with self._lock:
            pattern, led = self._led_pattern, self._led
        if led is None or pattern == self._led_shown:
            return
        self._led_shown = pattern
        if pattern == "off":
            led.off()
        elif pattern == "steady":
            led.on()
        else:
            half = self.config.slow_blink if pattern == "slow" else self.config.fast_blink
            led.blink(on_time=half, off_time=half)

    # -- commands from the centre ----------------------------------------------------------

    def _addressed(self, cmd: Command) -> tuple[str, _Alarm | None] | None:
        """The alarm ``cmd`` names if it is this button's: (id, the active alarm or None
        when already closed); None when the command is for another driver."""
        if cmd.target is not None and cmd.target != self.ctx.name:
            return None
        alarm_id = cmd.args.get(ALARM_ARG)
        if alarm_id is not None and not (isinstance(alarm_id, str) and alarm_id):
            raise CommandError(
                f"args.{ALARM_ARG} must be an alarm id (the id of its panic.pressed event), "
                f"got {alarm_id!r}"
            )
        mine = cmd.target == self.ctx.name
        active = self._alarm
        if alarm_id is None:
            if not mine:
                return None
            if active is None:
                raise CommandError(f"{self.ctx.name} has no active alarm")
            return active.id, active
        if active is not None and active.id == alarm_id:
            return alarm_id, active
        if alarm_id in self._closed:
            return alarm_id, None
        if mine:
            raise CommandError(f"alarm {alarm_id} is not an alarm of {self.ctx.name}")
        return None

    def _result(self, alarm: _Alarm, state: str, changed: bool) -> dict[str, Any]:
        return {
            "alarm": alarm.id,
            "state": state,
            "changed": changed,
            "presses": alarm.presses,
            "test": alarm.test,
            "location": self._location,
        }

    def _operator(self, cmd: Command) -> dict[str, Any]:
        by = cmd.args.get(BY_ARG)
        return {"command": cmd.id, **({"by": by} if isinstance(by, str) and by else {})}

    def _handle_ack(self, cmd: Command) -> Mapping[str, Any] | None:
        with self._lock:
            found = self._addressed(cmd)
            if found is None:
                return None
            alarm_id, alarm = found
            if alarm is None:
                return {"alarm": alarm_id, "state": self._closed[alarm_id], "changed": False}
            changed = alarm.state != "acknowledged"
            if changed:
                alarm.state = "acknowledged"
                self._set_led("steady")
                self._emit(
                    "panic.acknowledged",
                    Priority.HIGH,
                    test=alarm.test,
                    alarm=alarm.id,
                    presses=alarm.presses,
                    **self._operator(cmd),
                )
            return self._result(alarm, "acknowledged", changed)

    def _handle_resolve(self, cmd: Command) -> Mapping[str, Any] | None:
        with self._lock:
            found = self._addressed(cmd)
            if found is None:
                return None
            alarm_id, alarm = found
            if alarm is None:
                return {"alarm": alarm_id, "state": self._closed[alarm_id], "changed": False}
            acknowledged = alarm.state == "acknowledged"
            self._close(
                alarm,
                "resolved",
                "panic.resolved",
                acknowledged=acknowledged,
                **self._operator(cmd),
            )
            return self._result(alarm, "resolved", True)

    def _handle_test(self, cmd: Command) -> Mapping[str, Any] | None:
        if cmd.target is not None and cmd.target != self.ctx.name:
            return None
        with self._lock:
            if self._button is None:
                raise CommandError(f"{self.ctx.name} is not running")
            if self._alarm is not None and not self._alarm.test:
                return {"tested": False, "reason": f"alarm {self._alarm.id} is active"}
            alarm = self._raise_alarm(presses=0, test=True)
            return {"tested": True, "alarm": alarm.id, "location": self._location}

    # -- simulation ------------------------------------------------------------------------

    def simulate(self, action: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """Drive the mock pin as a finger would: ``press``, ``release``, ``hold`` (args
        ``seconds``, default hold_time plus a little) and ``tap`` (args ``count``, default
        the presses the mode needs)."""
        button, scheduler = self._button, self._scheduler
        if self.config.pin_factory != "mock":
            raise CommandError(
                f"{self.ctx.name} uses real GPIO: press the button, or send the `test` command"
            )
        if button is None or scheduler is None:
            raise CommandError(f"{self.ctx.name} is not running")
        pin: MockPin = button.pin

        def drive(pressed: bool) -> None:
            if pressed == self.config.pressed_high:
                pin.drive_high()
            else:
                pin.drive_low()

        if action == "press":
            drive(True)
            return {"pressed": True}
        if action == "release":
            drive(False)
            return {"pressed": False}
        if action == "hold":
            seconds = _number(args, "seconds", self.config.hold_time + 0.2, 600.0)
            drive(True)
            scheduler.call_later(seconds, lambda: drive(False))
            return {"pressed": True, "release_after": seconds}
        if action == "tap":
            count = int(_number(args, "count", PRESSES_NEEDED[self.config.mode], 10))
            # Each edge must outlast the debounce window to count as a new press.
            step = self.config.bounce_time * 2 + 0.02
            for i in range(count):
                scheduler.call_later(2 * i * step, lambda: drive(True))
                scheduler.call_later((2 * i + 1) * step, lambda: drive(False))
            return {"taps": count, "seconds": round(2 * count * step, 3)}
        raise CommandError(
            f"unknown action {action!r} (panic buttons know: press, release, hold, tap)"
        )


def _number(args: Mapping[str, Any], key: str, default: float, maximum: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise CommandError(f"{key} must be a number above 0 and at most {maximum:g}")
    return float(value)
