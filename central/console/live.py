"""Live updates: notice changes in the store and wake the browsers' event streams.

A thread compares cheap fingerprints of the alarm and device tables every
``interval`` seconds, or at once when :meth:`Live.wake` is called (the receiver
calls it after each committed batch when the console runs inside it; the
console calls it after each operator action). Each change bumps a version;
every server-sent-event stream waiting on it is woken through its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from central.store import Store

log = logging.getLogger("wardpost.console.live")

TOPICS = ("alarms", "devices")


def fingerprints(store: Store) -> dict[str, tuple[Any, ...]]:
    """What changes when the queue or the device list must be redrawn."""
    alarms = store.query(
        "SELECT count(*), max(raised_at), max(acknowledged_at), max(resolved_at) FROM alarms"
    )[0]
    commands = store.query("SELECT count(*), max(result_at) FROM commands")[0]
    console = store.query(
        "SELECT (SELECT count(*) FROM console_audit), (SELECT count(*) FROM console_escalations)"
    )[0]
    devices = store.query(
        "SELECT count(*), sum(lost), sum(CASE WHEN state = 'online' THEN 1 ELSE 0 END),"
        " max(boot) FROM devices"
    )[0]
    return {"alarms": (*alarms, *commands, *console), "devices": tuple(devices)}


class Live:
    """Versions per topic and the streams waiting for the next one."""

    def __init__(self, probe: Callable[[], dict[str, tuple[Any, ...]]], interval: float = 0.5):
        self.probe = probe
        self.interval = interval
        self.versions = dict.fromkeys(TOPICS, 0)
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._thread = threading.Thread(target=self._run, name="console-live", daemon=True)

    def start(self) -> Live:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._notify()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wake(self, *_: Any) -> None:
        """Look now (thread-safe; also usable as the receiver's ``on_committed`` listener)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                found = self.probe()
            except Exception:
                log.exception("cannot read the store for live updates")
                continue
            changed = [t for t in TOPICS if found[t] != self._seen.get(t)]
            if changed:
                with self._lock:
                    for topic in changed:
                        self.versions[topic] += 1
                self._seen = found
                self._notify()

    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its stream is gone
                self._waiters.discard((loop, event))

    async def next_change(self, seen: dict[str, int], timeout: float) -> dict[str, int]:
        """Wait until some version differs from ``seen`` (or ``timeout``); the current versions."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(entry)
        try:
            while self.versions == seen and not self.stopping:
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                except TimeoutError:
                    break
            with self._lock:
                return dict(self.versions)
        finally:
            with self._lock:
                self._waiters.discard(entry)
