"""GPIO plumbing shared by the GPIO drivers (panic_button, outputs, contact_input).

* :func:`open_device` builds a gpiozero device on the configured pin factory
  and turns gpiozero's errors into messages that say which driver, which pin
  and how to fix it.
* :class:`Scheduler` runs a driver's timers (debounce settle, hold, stuck, LED
  journey) on one thread of its own, so gpiozero's pin threads and the core's
  publisher thread only ever do a few microseconds of work in our callbacks.
* :class:`Debouncer` is the driver's own contact debounce. gpiozero's
  ``bounce_time`` cannot be relied on: ``MockPin`` ignores it, and the real pin
  factories implement it differently (lgpio wants a stable level, native
  ignores edges for a window and can miss the final level; users report
  missed presses).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from gpiozero import BadPinFactory, Device, GPIOPinInUse, PinFactoryFallback
from gpiozero.pins.mock import MockFactory

PinFactoryChoice = Literal["default", "mock"]
PinName = int | str

D = TypeVar("D")


class GPIOUnavailable(RuntimeError):
    """The configured GPIO cannot be used; the message says why and how to fix it."""


def valid_pin(pin: PinName) -> bool:
    """A BCM number (0-53) or a gpiozero pin name such as ``"GPIO17"`` or ``"BOARD11"``."""
    if isinstance(pin, int):
        return 0 <= pin <= 53
    return bool(pin.strip()) and " " not in pin


PIN_MESSAGE = "must be a BCM GPIO number 0-53 or a pin name such as 'GPIO17' or 'BOARD11'"


@functools.cache
def _own_mock_factory() -> MockFactory:
    return MockFactory()


def mock_factory() -> MockFactory:
    """The process's one mock factory: gpiozero's global one if it is a mock, else ours.

    Tests install a ``MockFactory`` as ``Device.pin_factory`` and drive its pins;
    the drivers then share those very pins. On a Pi whose global factory is real,
    ``pin_factory = "mock"`` gets a separate mock so no real pin is touched.
    """
    current = Device.pin_factory
    if isinstance(current, MockFactory):
        return current
    factory = _own_mock_factory()
    if current is None:
        # Devices built without an explicit factory (gpiozero's default) see the same pins.
        Device.pin_factory = factory
    return factory


def open_device(
    factory_choice: PinFactoryChoice,
    driver: str,
    role: str,
    build: Callable[[Any], D],
) -> D:
    """Call ``build(pin_factory)`` and explain any failure in terms of the config.

    ``role`` names the option (``pin``, ``led_pin``) so the message points at it.
    """
    factory = mock_factory() if factory_choice == "mock" else None
    try:
        with warnings.catch_warnings():
            # gpiozero warns once per factory it cannot load; the error below says it all.
            warnings.simplefilter("ignore", PinFactoryFallback)
            return build(factory)
    except BadPinFactory as exc:
        raise GPIOUnavailable(
            f"driver {driver!r}: no GPIO on this machine ({exc}). On a Raspberry Pi install "
            f"lgpio (apt install python3-lgpio); to simulate buttons elsewhere set "
            f'pin_factory = "mock" in [drivers.{driver}]'
        ) from None
    except GPIOPinInUse as exc:
        raise GPIOUnavailable(
            f"driver {driver!r}: {role} is already used by another device or driver ({exc})"
        ) from None
    except Exception as exc:  # gpiozero raises many kinds for a bad pin name or a busy chip
        raise GPIOUnavailable(f"driver {driver!r}: cannot open {role}: {exc}") from exc


class ScheduledCall:
    """A handle to a pending :meth:`Scheduler.call_later`; :meth:`cancel` is idempotent."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """One daemon thread that runs short callbacks at their due time, in order.

    Callbacks must not block; an exception is logged and the thread carries on.
    """

    def __init__(self, name: str, log: logging.Logger):
        self._log = log
        self._heap: list[tuple[float, int, ScheduledCall]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, callback: Callable[[], None]) -> ScheduledCall:
        call = ScheduledCall(callback)
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), call))
            self._cond.notify()
        return call

    def call_soon(self, callback: Callable[[], None]) -> ScheduledCall:
        return self.call_later(0.0, callback)

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _next_call(self) -> ScheduledCall | None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0] - time.monotonic()
                if due <= 0:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(due)
            return None

    def _run(self) -> None:
        while (call := self._next_call()) is not None:
            if call.cancelled:
                continue
            try:
                call.callback()
            except Exception:
                self._log.exception("timer callback failed")


class Debouncer:
    """Leading-edge debounce with a settle check, for one contact input.

    The first edge is accepted at once (a panic press must not wait for the
    contact to settle), then edges are ignored for ``bounce_time``; when that
    window ends the real level is read again, and if it differs from what was
    accepted, the new level is accepted too. So bounce never doubles a press,
    and a press or release that ends inside the window is never lost.

    ``on_change(active)`` is called with the accepted level, under this
    debouncer's lock (one input's changes are reported strictly in order).
    """

    def __init__(
        self,
        bounce_time: float,
        read: Callable[[], bool],
        on_change: Callable[[bool], None],
        scheduler: Scheduler,
        initial: bool,
    ):
        self._bounce_time = bounce_time
        self._read = read
        self._on_change = on_change
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._level = initial
        self._settling: ScheduledCall | None = None
        #: Edges ignored as contact bounce (a health counter).
        self.filtered = 0

    @property
    def level(self) -> bool:
        return self._level

    def edge(self, active: bool) -> None:
        """A pin edge as reported by gpiozero (on gpiozero's thread)."""
        with self._lock:
            if self._settling is not None:
                self.filtered += 1
                return
            if active != self._level:
                self._accept(active)

    def cancel(self) -> None:
        with self._lock:
            if self._settling is not None:
                self._settling.cancel()
                self._settling = None

    def _accept(self, active: bool) -> None:
        self._level = active
        if self._bounce_time > 0:
            self._settling = self._scheduler.call_later(self._bounce_time, self._settle)
        self._on_change(active)

    def _settle(self) -> None:
        with self._lock:
            self._settling = None
            level = self._read()
            if level != self._level:
                self._accept(level)
