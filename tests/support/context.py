"""A real :class:`DriverContext` that records what a driver emits, for driver unit tests.

End-to-end tests use the full agent (``agent_factory`` fixture); this context lets
a driver's logic be tested without a broker, with the same API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from agent.driver import Command, CommandHandler, DriverContext, Emission, Timer
from agent.event import Event, Priority
from agent.testing.agent import DEADLINE


class _Repeating:
    def __init__(self, interval: float, callback: Callable[[], None]):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval, callback), daemon=True)
        self._thread.start()

    def _run(self, interval: float, callback: Callable[[], None]) -> None:
        while not self._stop.wait(interval):
            callback()

    def cancel(self) -> None:
        self._stop.set()


class RecordingContext(DriverContext):
    def __init__(
        self, state_dir: Path, name: str = "dev1", delivery: Literal["broker", "receipt"] = "broker"
    ):
        self.name = name
        self.site = "test-site"
        self.device = "test-device"
        self.log = logging.getLogger(f"wardpost.driver.{name}")
        self.state_dir = state_dir
        self.delivery = delivery
        self.emissions: list[Emission] = []
        self.handlers: dict[str, list[CommandHandler]] = {}
        self.watchers: list[Callable[[Event], None]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return [e.event for e in self.emissions]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def emit(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.NORMAL,
        *,
        test: bool = False,
    ) -> Emission:
        with self._cond:
            self._seq += 1
            event = Event(
                kind=kind,
                source=self.name,
                priority=Priority.parse(priority),
                site=self.site,
                device=self.device,
                seq=self._seq,
                payload=dict(payload or {}),
                test=test,
            )
            emission = Emission(event)
            emission.mark_durable()
            self.emissions.append(emission)
            self._cond.notify_all()
        for watcher in list(self.watchers):
            watcher(event)
        return emission

    def wait_for(self, kind: str, count: int = 1, timeout: float = DEADLINE) -> list[Event]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e.event for e in self.emissions if e.event.kind == kind]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        # self.kinds() would take the lock this thread holds
                        f"expected {count} {kind!r} events, got {len(found)}: "
                        f"{[e.event.kind for e in self.emissions]}"
                    )
                self._cond.wait(left)

    def on_command(self, name: str, handler: CommandHandler) -> None:
        self.handlers.setdefault(name, []).append(handler)

    def command(self, name: str, **args: Any) -> list[Mapping[str, Any] | None]:
        cmd = Command(id=f"c{time.monotonic_ns()}", name=name, issued_at=time.time(), args=args)
        return [h(cmd) for h in self.handlers.get(name, [])]

    def watch(self, callback: Callable[[Event], None]) -> None:
        self.watchers.append(callback)

    def every(self, interval: float, callback: Callable[[], None]) -> Timer:
        return _Repeating(interval, callback)
