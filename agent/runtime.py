"""The agent: builds the data path and supervises the drivers on it.

    driver ──emit──▶ Event ──▶ Delivery (outbox, publisher) ──▶ broker
       ▲                                                        │
       └──────── Dispatcher ◀──── cmd/<name> ◀──────────────────┘

:class:`Agent` owns one of each; :mod:`agent.delivery` keeps the delivery rules. Drivers are found through the registry, each
started in isolation: one that fails to start is marked failed, reported, and
retried with backoff while every other driver keeps running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent import __version__, homeassistant
from agent.backoff import Backoff
from agent.commands import Dispatcher, Verifier
from agent.config import (
    CORE_SECTIONS,
    DELIVERY_GUARANTEES,
    Config,
    ConfigError,
    DriverSection,
    changed_fields,
    load_config,
)
from agent.delivery import Delivery, Outbox, Publisher, StorageReport
from agent.driver import (
    Command,
    CommandError,
    CommandHandler,
    Driver,
    DriverContext,
    Emission,
    Health,
    Timer,
)
from agent.event import Event, Priority, valid_kind
from agent.registry import check_metrics_extra, driver_config, validate_drivers
from agent.security import verifier_for
from agent.status import AgentStatus, Backlog, DriverStatus, Heartbeat, Link

log = logging.getLogger("wardpost")

CORE = "agent"  # the source name of the core's own events and commands

#: Fields a reload applies to the running agent. Any other changed field is named in the
#: reload's ``restart_needed`` and keeps its running value until the restart.
LIVE_FIELDS = frozenset(
    {
        "agent.log_level",
        "agent.heartbeat_interval",
        "outbox.max_rows",  # read at each commit
        "outbox.max_bytes",
        "outbox.retention_hours",
        # A changed [commands] section replaces the verifier before the reload returns.
        "commands.enabled",
        "commands.require_signature",
        "commands.public_keys",
        "commands.max_age",
    }
)


def _set_root_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


_RETRY_MIN, _RETRY_MAX = 2.0, 300.0


class RepeatingTimer:
    """Calls ``callback`` every ``interval`` seconds on its own daemon thread."""

    def __init__(self, interval: float, callback: Callable[[], None], name: str):
        self._stop = threading.Event()
        self._callback = callback
        self._interval = interval
        self._name = name
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=f"timer-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic() + self._interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self._interval
            if next_at < time.monotonic():  # fell behind (suspend, overload): don't burst
                next_at = time.monotonic() + self._interval
            try:
                self._callback()
            except Exception:
                self.errors += 1
                log.exception("timer %s failed", self._name)

    def cancel(self) -> None:
        self._stop.set()


class EventBus:
    """Delivers every emitted event to watchers on one thread, off the emitting thread."""

    def __init__(self) -> None:
        self._watchers: list[tuple[str, Callable[[Event], None]]] = []
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="event-bus", daemon=True)
        self._thread.start()

    def add(self, owner: str, callback: Callable[[Event], None]) -> None:
        self._watchers.append((owner, callback))

    def remove_owner(self, owner: str) -> None:
        self._watchers = [(o, c) for o, c in self._watchers if o != owner]

    def post(self, event: Event) -> None:
        if self._watchers:
            self._queue.put(event)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(2)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            for owner, callback in list(self._watchers):
                try:
                    callback(event)
                except Exception:
                    log.exception("watcher of %s failed on %s", owner, event.kind)


@dataclass
class DriverSlot:
    """One configured driver instance and its supervision state."""

    section: DriverSection
    instance: Driver | None = None
    state: Literal["starting", "running", "failed", "stopped"] = "stopped"
    error: str = ""
    retry: Backoff = field(default_factory=lambda: Backoff(_RETRY_MIN, _RETRY_MAX))
    retry_at: float = 0.0
    timers: list[Timer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.section.name

    @property
    def failures(self) -> int:
        """Failed starts since it last ran."""
        return self.retry.failures

    def health(self) -> Health:
        if self.state == "failed":
            return Health("failed", self.error, {"failures": self.failures})
        if self.state != "running" or self.instance is None:
            return Health("stopped" if self.state == "stopped" else "starting", self.error)
        try:
            return self.instance.health()
        except Exception as exc:
            return Health("degraded", f"health() raised {type(exc).__name__}: {exc}")


class _Context(DriverContext):
    def __init__(self, agent: Agent, slot: DriverSlot):
        self._agent = agent
        self._slot = slot
        self.name = slot.name
        self.site = agent.config.agent.site
        self.device = agent.config.agent.device
        self.log = logging.getLogger(f"wardpost.driver.{slot.name}")
        self.state_dir = Path(agent.config.agent.state_dir) / "drivers" / slot.name
        self.delivery = agent.config.mqtt.delivery

    def emit(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.NORMAL,
        *,
        test: bool = False,
    ) -> Emission:
        return self._agent.emit(self.name, kind, payload, priority, test=test)

    def on_command(self, name: str, handler: CommandHandler) -> None:
        self._agent.dispatcher.register(name, self.name, handler)

    def watch(self, callback: Callable[[Event], None]) -> None:
        self._agent.bus.add(self.name, callback)

    def every(self, interval: float, callback: Callable[[], None]) -> Timer:
        timer = RepeatingTimer(interval, callback, self.name)
        self._slot.timers.append(timer)
        return timer


class Agent:
    """The running agent. ``start()``, then ``stop()``; ``run()`` does both around signals."""

    def __init__(
        self,
        config: Config,
        *,
        verifier: Verifier | None = None,
        on_transmitted: Callable[[float], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        apply_log_level: Callable[[str], None] = _set_root_level,
    ):
        """``on_transmitted(seconds)`` gets each accepted → confirmed time and ``on_event``
        each emitted event (both for metrics); neither may block. ``apply_log_level``
        applies a reloaded ``[agent] log_level``."""
        self.config = config
        self.apply_log_level = apply_log_level
        self.on_event = on_event
        self.started_at = time.monotonic()
        self.verifier: Verifier = verifier or verifier_for(config)
        self.bus = EventBus()
        self.delivery = Delivery(
            config, on_report=self._on_storage_report, on_transmitted=on_transmitted
        )
        self.outbox: Outbox = self.delivery.outbox
        self.dispatcher = Dispatcher(
            self.verifier, self.delivery.publish_command_result, self._report_core
        )
        self.slots: dict[str, DriverSlot] = {}
        self._timers: list[RepeatingTimer] = []
        self._heartbeat_timer: RepeatingTimer | None = None
        self._supervisor_stop = threading.Event()
        self._lock = threading.RLock()
        self.ready = threading.Event()
        self.emitted = 0
        self._pending_reports: list[StorageReport] = []

    # --------------------------------------------------------------- events

    def emit(
        self,
        source: str,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.NORMAL,
        *,
        test: bool = False,
    ) -> Emission:
        """Accept an event from ``source``. Never blocks on the disk or the network."""
        if not valid_kind(kind):
            raise ValueError(
                f"invalid event kind {kind!r}: use dotted lowercase words like 'gate.alarm'"
            )
        body = dict(payload or {})
        try:  # before numbering: an event that cannot be sent must not leave a hole in seq
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"payload of {kind!r} is not JSON: {exc}") from None
        event = Event(
            kind=kind,
            source=source,
            priority=Priority.parse(priority),
            site=self.config.agent.site,
            device=self.config.agent.device,
            seq=self.delivery.next_seq(),
            payload=body,
            test=test,
        )
        emission = self.delivery.submit(event)
        self.emitted += 1
        if self.on_event is not None:
            self.on_event(event)
        self.bus.post(event)
        return emission

    def _report_core(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.emit(CORE, kind, payload, Priority.HIGH)

    def _on_storage_report(self, report: StorageReport) -> None:
        if self.publisher is None:  # reported once the data path is up
            self._pending_reports.append(report)
        else:
            self.emit(CORE, report.kind, report.payload, report.priority)

    @property
    def publisher(self) -> Publisher | None:
        return self.delivery.publisher

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        state_dir = Path(self.config.agent.state_dir)
        with contextlib.suppress(OSError):
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._pending_reports.extend(self.delivery.open())
        self.delivery.start(
            status_extra=self._status_extra,
            on_command=self.dispatcher.submit,
            on_link_change=self._on_link_change,
        )
        self.dispatcher.register("reload", CORE, self._command_reload)
        self.dispatcher.register(
            "ping", CORE, lambda cmd: {"pong": time.time(), "version": __version__}
        )
        self.dispatcher.start()
        for report in self._pending_reports:
            self.emit(CORE, report.kind, report.payload, report.priority)
        self._pending_reports.clear()
        self.emit(
            CORE,
            "agent.started",
            {
                "version": __version__,
                "boot": self.outbox.boot,
                "config": self.config.digest,
                "drivers": [s.name for s in self.config.drivers if s.enabled],
                "delivery": self.config.mqtt.delivery,
                "seq_first": self.outbox.seqs.resumed_at,
                "seq_skipped": list(skipped) if (skipped := self.outbox.seqs.skipped) else None,
            },
        )
        for section in self.config.drivers:
            if section.enabled:
                slot = DriverSlot(section)
                self.slots[section.name] = slot
                self._start_slot(slot)
        self._start_heartbeat()
        self._timers.append(RepeatingTimer(1.0, self._supervise, "supervisor"))
        self._timers.append(RepeatingTimer(3600.0, self.outbox.prune, "retention"))
        self.outbox.prune()
        self.ready.set()
        log.info(
            "wardpost %s started: site %s device %s, %d drivers",
            __version__,
            self.config.agent.site,
            self.config.agent.device,
            len(self.slots),
        )
        delivery = self.config.mqtt.delivery
        log.log(
            logging.INFO if delivery == "receipt" else logging.WARNING,
            "delivery = %s: %s",
            delivery,
            DELIVERY_GUARANTEES[delivery],
        )

    def _start_heartbeat(self) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        self._heartbeat_timer = RepeatingTimer(
            self.config.agent.heartbeat_interval, self.publish_heartbeat, "heartbeat"
        )

    def stop(self, flush_timeout: float = 5.0) -> None:
        log.info("stopping")
        for timer in [*self._timers, self._heartbeat_timer]:
            if timer is not None:
                timer.cancel()
        with self._lock:
            for slot in list(self.slots.values()):
                self._stop_slot(slot)
        self.dispatcher.stop()
        self.delivery.stop(flush_timeout)
        self.bus.close()
        self.ready.clear()
        log.info("stopped")

    # -------------------------------------------------------------- drivers

    def _start_slot(self, slot: DriverSlot) -> None:
        slot.state = "starting"
        try:
            cls, options = driver_config(slot.section)
            context = _Context(self, slot)
            try:
                context.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as exc:  # a read-only disk must not stop a panic button
                log.error("driver %s has no state folder (%s); it runs without one", slot.name, exc)
            slot.instance = cls(context, options)
            slot.instance.start()
        except Exception as exc:
            self._driver_failed(slot, exc)
            return
        slot.state = "running"
        if slot.failures:
            log.info("driver %s recovered after %d failed starts", slot.name, slot.failures)
            self.emit(
                CORE,
                "agent.driver_recovered",
                {"driver": slot.name, "type": slot.section.type},
                Priority.HIGH,
            )
        slot.retry.reset()
        slot.error = ""

    def _driver_failed(self, slot: DriverSlot, exc: Exception) -> None:
        message = (
            str(exc)
            if isinstance(exc, (ConfigError, CommandError, OSError, ValueError, RuntimeError))
            else f"{type(exc).__name__}: {exc}"
        )
        if slot.instance is not None:
            with contextlib.suppress(Exception):
                slot.instance.stop()
        self._cleanup_slot(slot)
        slot.state = "failed"
        slot.retry_at = time.monotonic() + slot.retry.next()
        if slot.error != message:
            log.error("driver %s (%s) failed to start: %s", slot.name, slot.section.type, message)
            self.emit(
                CORE,
                "agent.driver_failed",
                {"driver": slot.name, "type": slot.section.type, "error": message},
                Priority.HIGH,
            )
        slot.error = message

    def _cleanup_slot(self, slot: DriverSlot) -> None:
        for timer in slot.timers:
            timer.cancel()
        slot.timers.clear()
        self.dispatcher.unregister_owner(slot.name)
        self.bus.remove_owner(slot.name)
        slot.instance = None

    def _stop_slot(self, slot: DriverSlot) -> None:
        if slot.instance is not None:
            try:
                slot.instance.stop()
            except Exception:
                log.exception("driver %s failed to stop cleanly", slot.name)
        self._cleanup_slot(slot)
        slot.state = "stopped"

    def _supervise(self) -> None:
        now = time.monotonic()
        with self._lock:
            for slot in self.slots.values():
                if slot.state == "failed" and now >= slot.retry_at:
                    self._start_slot(slot)

    def healthy(self, timeout: float = 5.0) -> bool:
        """True while the data path really works: the outbox writer commits and the
        publisher's threads run. Drives the systemd watchdog."""
        return self.delivery.healthy(timeout)

    def driver(self, name: str) -> Driver:
        slot = self.slots.get(name)
        if slot is None or slot.instance is None:
            raise KeyError(f"no running driver named {name!r}")
        return slot.instance

    # --------------------------------------------------------------- reload

    def reload(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Re-read the config and compare every field with the running one.

        Each changed field either takes effect now (:data:`LIVE_FIELDS`; drivers whose
        section changed are restarted) or is named in ``restart_needed`` and keeps its
        running value, so the running config always says what is in force. A config that
        fails validation, or whose ``[commands]`` cannot be put in force (an unreadable
        key), is rejected and the running one kept. The centre's public keys are read
        again on every reload, so a key replaced in the same file takes effect."""
        source = path or self.config.source
        try:
            new = load_config(source)
            validate_drivers(new)
            check_metrics_extra(new)
            changed = changed_fields(self.config, new)
            verifier = verifier_for(new)  # the key files are read again: a rotated key applies
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return {"ok": False, "error": str(exc)}
        applied = [f for f in changed if f in LIVE_FIELDS]
        restart_needed = [f for f in changed if f not in LIVE_FIELDS]
        old_sections = {s.name: s for s in self.config.drivers if s.enabled}
        new_sections = {s.name: s for s in new.drivers if s.enabled}
        stopped, started = [], []
        with self._lock:
            # Before any driver starts taking commands.
            self.verifier = self.dispatcher.verifier = verifier
            running = self.config
            self.config = dataclasses.replace(
                new,
                **{name: self._in_force(running, new, name, applied) for name in CORE_SECTIONS},
                sections=running.sections,
            )
            self.outbox.config = self.config.outbox
            for name, section in old_sections.items():
                if new_sections.get(name) != section:
                    self._stop_slot(self.slots.pop(name))
                    stopped.append(name)
            for name, section in new_sections.items():
                if old_sections.get(name) != section:
                    slot = DriverSlot(section)
                    self.slots[name] = slot
                    self._start_slot(slot)
                    started.append(name)
        if "agent.heartbeat_interval" in applied:
            self._start_heartbeat()
        if "agent.log_level" in applied:
            self.apply_log_level(self.config.agent.log_level)
        if restart_needed:
            log.warning("reload: %s take effect after a restart", ", ".join(restart_needed))
        result = {
            "ok": True,
            "stopped": stopped,
            "started": started,
            "applied": applied,
            "restart_needed": restart_needed,
            "config": new.digest,
        }
        log.info("reloaded %s: %s", source, result)
        self._announce_to_home_assistant()
        self.emit(CORE, "agent.reloaded", result, Priority.NORMAL)
        return result

    @staticmethod
    def _in_force(running: Config, new: Config, section: str, applied: list[str]) -> Any:
        """Section ``section`` as it runs after a reload: the running one, with the new
        values of the fields applied live (all of them top-level fields of the section)."""
        prefix = f"{section}."
        live = {f[len(prefix) :] for f in applied if f.startswith(prefix)}
        return dataclasses.replace(
            getattr(running, section),
            **{name: getattr(getattr(new, section), name) for name in live},
        )

    def _command_reload(self, command: Command) -> Mapping[str, Any]:
        result = self.reload()
        if not result["ok"]:
            raise CommandError(result["error"])
        return result

    # ---------------------------------------------------------------- status

    def _on_link_change(self, up: bool) -> None:
        log.info("broker link %s", "up" if up else "down")
        if up:
            self._announce_to_home_assistant()

    def _announce_to_home_assistant(self) -> None:
        publisher = self.publisher
        if publisher is None or not publisher.connected:
            return  # announced on the next connect
        try:
            homeassistant.announce(self.config, publisher.publish_retained)
        except Exception:  # discovery is a convenience: it must never disturb the data path
            log.exception("Home Assistant discovery failed")

    def _status_extra(self) -> dict[str, Any]:
        drivers = sorted(s.name for s in self.config.drivers if s.enabled)
        return {
            "drivers": drivers,
            "config": self.config.digest,
            "backlog": self.outbox.backlog()[0],
        }

    def drivers_health(self) -> dict[str, DriverStatus]:
        with self._lock:
            return {
                name: DriverStatus(slot.section.type, slot.health())
                for name, slot in self.slots.items()
            }

    def heartbeat(self) -> Heartbeat:
        count, oldest = self.outbox.backlog()
        pub = self.publisher
        return Heartbeat(
            uptime=round(time.monotonic() - self.started_at, 3),
            interval=self.config.agent.heartbeat_interval,
            backlog=Backlog(
                count=count,
                oldest_age=None if oldest is None else round(max(0.0, time.time() - oldest), 3),
                in_memory=self.outbox.in_memory,
            ),
            drivers=self.drivers_health(),
            transmission=pub.stats.summary() if pub else {},
            storage_fault=self.outbox.fault,
            boot=self.outbox.boot,
            connection=pub.connection if pub else 0,
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            delivery=self.config.mqtt.delivery,
        )

    def publish_heartbeat(self) -> None:
        self.delivery.publish_heartbeat(self.heartbeat().to_dict())

    def status(self) -> AgentStatus:
        pub = self.publisher
        return AgentStatus(
            version=__version__,
            site=self.config.agent.site,
            device=self.config.agent.device,
            config_path=str(self.config.source),
            config_digest=self.config.digest,
            link=Link(
                connected=bool(pub and pub.connected),
                broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}",
                delivery=self.config.mqtt.delivery,
                guarantee=DELIVERY_GUARANTEES[self.config.mqtt.delivery],
                in_flight=pub.in_flight() if pub else 0,
                last_error=pub.last_error if pub else None,
                counters=dict(pub.counters) if pub else {},
            ),
            outbox_path=str(self.config.outbox_path),
            outbox_counters=dict(self.outbox.counters),
            commands=dict(self.dispatcher.counters),
            heartbeat=self.heartbeat(),
        )
