"""The driver every serial device family builds on: link + dialect + policy.

Bytes from :class:`SerialLink` go through the :class:`DialectEngine`; each
message then meets the driver's policy before :meth:`DriverContext.emit`:

* kinds listed in ``aggregate`` (gate transits) are summed and emitted once per
  ``aggregate_interval``;
* a message identical to one emitted less than ``dedup_window`` seconds ago is
  folded into a ``repeats`` count on the next one (floods, RFID tags held still);
* frames nothing could parse become rate-limited ``serial.unparsed`` events with
  the raw bytes in hex, and every kind of trouble is counted in ``health()``.

Subclasses (``serial_gate``, ``xray``, ``rfid_patrol``) only change defaults or
override :meth:`handle_message`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from agent.config import ConfigError, check
from agent.driver import CommandError, Driver, DriverContext, Health, Timer
from agent.event import Priority, valid_kind
from drivers.serial_common.dialect import Dialect, load_dialect
from drivers.serial_common.engine import DialectEngine, Message, Reply
from drivers.serial_common.framing import Unparsed
from drivers.serial_common.limits import (
    Aggregator,
    FloodGate,
    RateLimitedLog,
    RateLimiter,
    message_key,
)
from drivers.serial_common.transport import LinkChange, PortSettings, SerialLink

#: Priority of each kind unless a dialect rule or the driver's ``priorities`` says otherwise.
DEFAULT_PRIORITIES: dict[str, str] = {
    "gate.alarm": "high",
    "gate.tamper": "high",
    "gate.alarm_cleared": "normal",
    "gate.transit": "low",
    "xray.alert": "high",
    "xray.tamper": "high",
    "xray.tip": "normal",
    "patrol.checkpoint": "normal",
    "patrol.missed": "high",
    "patrol.guard": "normal",
    "patrol.unknown_tag": "low",
    "serial.unparsed": "low",
    "device.offline": "high",
    "device.online": "normal",
    "device.reset": "normal",
}


def _priority_table_ok(table: Mapping[str, str]) -> bool:
    try:
        return all(valid_kind(k) and Priority.parse(v) is not None for k, v in table.items())
    except ValueError:
        return False


def _nonempty(value: str) -> bool:
    return bool(value.strip())


@dataclass(frozen=True)
class SerialDriverConfig:
    """Options shared by every serial driver (``[drivers.<name>]``)."""

    #: ``/dev/serial/by-id/usb-...`` (preferred: survives renumbering), ``/dev/ttyUSB0``,
    #: or a URL such as ``socket://10.0.0.5:4001``.
    port: str = field(metadata=check(_nonempty, "must name a serial port"))
    #: A built-in dialect name or the path of a dialect ``.toml`` file.
    dialect: str = "text-gate"
    #: Port settings; 0 / "" means "as the dialect's ``[serial]`` table says".
    baudrate: int = field(default=0, metadata=check(minimum=0, maximum=4_000_000))
    bytesize: Literal[0, 5, 6, 7, 8] = 0
    parity: Literal["", "N", "E", "O", "M", "S"] = ""
    stopbits: float = field(
        default=0.0, metadata=check(lambda v: v in (0, 1, 1.5, 2), "must be 1, 1.5 or 2")
    )
    flow_control: Literal["", "none", "xonxoff", "rtscts"] = ""
    #: Take an advisory lock so a second program cannot read the same port.
    exclusive: bool = True
    read_timeout: float = field(default=0.2, metadata=check(minimum=0.01, maximum=5.0))
    reconnect_min: float = field(default=0.5, metadata=check(minimum=0.05, maximum=60.0))
    reconnect_max: float = field(default=30.0, metadata=check(minimum=0.1, maximum=3600.0))
    #: Identical messages within this many seconds are folded into a count (0 = off).
    dedup_window: float = field(default=2.0, metadata=check(minimum=0.0, maximum=3600.0))
    #: ``serial.unparsed`` events allowed per minute on average, and in a burst.
    unparsed_per_minute: float = field(default=6.0, metadata=check(minimum=0.0, maximum=6000.0))
    unparsed_burst: int = field(default=3, metadata=check(minimum=0, maximum=1000))
    #: Kinds summed and emitted once per ``aggregate_interval`` instead of one by one.
    aggregate: list[str] = field(default_factory=list)
    aggregate_interval: float = field(default=60.0, metadata=check(minimum=0.1, maximum=86400.0))
    #: Overrides the dialect's poll interval (0 = the dialect's).
    poll_interval: float = field(default=0.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: Kind -> priority, over the dialect's and the built-in defaults.
    priorities: dict[str, str] = field(
        default_factory=dict,
        metadata=check(_priority_table_ok, "must map event kinds to critical/high/normal/low"),
    )
    #: Push devices: no valid frame for this many seconds while the port is open
    #: -> device.offline (0 = as the dialect's ``silent_after`` says).
    silent_after: float = field(default=0.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: Field -> {value -> label}: ``labels = { zones = { "3" = "left knee" } }`` adds
    #: ``zones_labels = ["left knee"]`` (or ``<field>_label`` for a single value).
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            load_dialect(self.dialect, where="")
        except (
            ConfigError
        ) as exc:  # relocated: the dialect's own file and field stay in the message
            raise ConfigError(str(exc), "dialect") from None
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError("must not be below reconnect_min", "reconnect_max")

    def port_settings(self, dialect: Dialect) -> PortSettings:
        wanted = dialect.serial
        flow = self.flow_control or (
            "rtscts" if wanted.rtscts else "xonxoff" if wanted.xonxoff else "none"
        )
        return PortSettings(
            port=self.port,
            baudrate=self.baudrate or wanted.baudrate,
            bytesize=self.bytesize or wanted.bytesize,
            parity=self.parity or wanted.parity,
            stopbits=self.stopbits or wanted.stopbits,
            xonxoff=flow == "xonxoff",
            rtscts=flow == "rtscts",
            exclusive=self.exclusive,
            read_timeout=self.read_timeout,
            reconnect_min=self.reconnect_min,
            reconnect_max=self.reconnect_max,
        )


def printable(raw: bytes) -> str:
    """Bytes as text a technician can read: printable ASCII as is, the rest escaped."""
    return repr(raw)[2:-1]


class SerialDialectDriver(Driver):
    """A serial device whose wire format is a dialect file."""

    config_class: ClassVar[type[Any]] = SerialDriverConfig
    summary = "serial device described by a dialect file"
    config: SerialDriverConfig

    def __init__(self, ctx: DriverContext, config: SerialDriverConfig):
        super().__init__(ctx, config)
        self.dialect = load_dialect(config.dialect, f"drivers.{ctx.name}.dialect")
        self.engine = DialectEngine(self.dialect)
        self.flood = FloodGate(config.dedup_window)
        self.aggregator = Aggregator()
        self._unparsed_limit = RateLimiter(config.unparsed_per_minute, config.unparsed_burst)
        self._trouble_log = RateLimitedLog(ctx.log)
        self.link = SerialLink(
            config.port_settings(self.dialect), self._on_bytes, self._on_link, ctx.log
        )
        self._pipeline_lock = threading.Lock()
        self._timers: list[Timer] = []
        self._poll_request = self.engine.poll_request()
        self._poll_sent = False
        self._frames_at_poll = 0
        self._polls_unanswered = 0
        #: Why the device counts as silent ("": it is not).
        self._silent = ""
        self._silent_after = config.silent_after or self.dialect.silent_after
        self._frames_seen = 0
        self._last_frame_at = time.monotonic()
        self.emitted = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        if self._poll_request is not None:
            interval = self.config.poll_interval or self.dialect.poll.interval
            self._timers.append(self.ctx.every(interval, self._poll))
        if self.config.aggregate:
            self._timers.append(
                self.ctx.every(self.config.aggregate_interval, self.flush_aggregates)
            )
        if self._silent_after:
            self._timers.append(self.ctx.every(min(1.0, self._silent_after / 4), self.supervise))
        if self.engine.framer.expires_on_timer:
            gap = self.dialect.framing.gap_timeout
            self._timers.append(self.ctx.every(gap, self._expire))

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.link.stop()
        self.flush_aggregates()  # counts gathered so far are not lost on shutdown

    def health(self) -> Health:
        counters: dict[str, int | float] = {**self.engine.stats, **self.link.counters}
        counters.update(
            emitted=self.emitted,
            flood_suppressed=self.flood.suppressed,
            unparsed_rate_limited=self._unparsed_limit.dropped,
            buffered=self.engine.buffered,
        )
        if self.link.online is None:
            return Health("starting", f"opening {self.config.port}", counters)
        if not self.link.online:
            return Health("degraded", f"{self.config.port}: {self.link.reason}", counters)
        if self._silent:
            return Health("degraded", f"{self.config.port}: {self._silent}", counters)
        return Health(
            "ok", f"{self.config.port} -> {self.link.resolved} ({self.dialect.name})", counters
        )

    def simulate(self, action: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """``bytes``: handle ``text`` or ``hex`` as if the device had sent it."""
        if action != "bytes":
            raise CommandError(f"unknown action {action!r} (serial drivers know: bytes)")
        if isinstance(args.get("text"), str):
            data = args["text"].encode("latin-1", "replace")
        elif isinstance(args.get("hex"), str):
            try:
                data = bytes.fromhex(args["hex"])
            except ValueError:
                raise CommandError("hex must be pairs of hex digits") from None
        else:
            raise CommandError('give text="..." or hex="..."')
        before = self.emitted
        self._on_bytes(data, time.monotonic())
        return {"bytes": len(data), "events": self.emitted - before}

    # -- pipeline --------------------------------------------------------------

    def emit(self, kind: str, payload: Mapping[str, Any], rule_priority: str = "") -> None:
        priority = (
            self.config.priorities.get(kind)
            or rule_priority
            or DEFAULT_PRIORITIES.get(kind, "normal")
        )
        self.ctx.emit(kind, payload, priority)
        self.emitted += 1

    def _on_bytes(self, data: bytes, now: float) -> None:
        # One chunk at a time through engine and policy (the reader thread, or simulate()).
        with self._pipeline_lock:
            self._handle(self.engine.feed(data, now), now)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._pipeline_lock:
            self._handle(self.engine.expire(now), now)

    def _handle(self, outputs: list[Message | Unparsed | Reply], now: float) -> None:
        frames = self.engine.stats["frames"]
        if frames != self._frames_seen:
            self._frames_seen = frames
            self._last_frame_at = now
        for out in outputs:
            if isinstance(out, Message):
                self.handle_message(out, now)
            elif isinstance(out, Reply):
                self.link.write(out.data)
            else:
                self._unparsed(out, now)

    def handle_message(self, message: Message, now: float) -> None:
        """Aggregate, fold repeats, label and emit one recognised message."""
        if message.kind in self.config.aggregate:
            self.aggregator.add(message.kind, message.fields, now)
            return
        self.emit_folded(message.kind, self.payload(message), now, message.priority)

    def emit_folded(
        self, kind: str, payload: dict[str, Any], now: float, rule_priority: str = ""
    ) -> None:
        """Emit unless it repeats one emitted within ``dedup_window`` (then it is counted)."""
        repeats = self.flood.admit(message_key(kind, payload), now)
        if repeats is None:
            return
        if repeats:
            payload = {**payload, "repeats": repeats}
        self.emit(kind, payload, rule_priority)

    def payload(self, message: Message) -> dict[str, Any]:
        payload = dict(message.fields)
        for name, table in self.config.labels.items():
            value = payload.get(name)
            if isinstance(value, list):
                payload[f"{name}_labels"] = [table.get(str(v), str(v)) for v in value]
            elif value is not None and str(value) in table:
                payload[f"{name}_label"] = table[str(value)]
        payload["raw"] = message.raw.hex()
        return payload

    def _unparsed(self, item: Unparsed, now: float) -> None:
        self._trouble_log.warning(
            now,
            "%s: %s (%d bytes: %s)",
            self.config.port,
            item.reason,
            item.length,
            printable(item.raw[:64]),
        )
        if not self._unparsed_limit.allow(now):
            return
        payload = {
            "reason": item.reason,
            "code": item.code,
            "length": item.length,
            "hex": item.raw.hex(" "),
            "text": printable(item.raw),
            "truncated": item.length > len(item.raw),
            "dialect": self.dialect.name,
        }
        skipped = self._unparsed_limit.take_dropped()
        if skipped:
            payload["not_reported_before"] = skipped
        self.emit("serial.unparsed", payload)

    def flush_aggregates(self) -> None:
        for kind, payload in self.aggregator.drain():
            payload["interval"] = self.config.aggregate_interval
            self.emit(kind, payload)

    # -- link and poll supervision --------------------------------------------

    def _on_link(self, change: LinkChange) -> None:
        payload = {"port": change.port, "resolved": change.resolved}
        self._silent = ""
        self._poll_sent = False
        self._last_frame_at = time.monotonic()
        if change.online:
            with self._pipeline_lock:  # what the device reports now is news again
                self.engine.forget_states()
            self.emit("device.online", payload)
        else:
            self.emit("device.offline", {**payload, "reason": change.reason})

    def _poll(self) -> None:
        """Send the poll request; several unanswered in a row mean the device went quiet."""
        assert self._poll_request is not None
        frames = self.engine.stats["frames"]
        answered = frames != self._frames_at_poll
        self._frames_at_poll = frames
        if self._poll_sent:
            self._polls_unanswered = 0 if answered else self._polls_unanswered + 1
            limit = self.dialect.poll.offline_after
            if self._polls_unanswered >= limit:
                self._went_silent(f"no answer to {limit} polls in a row")
            elif answered:
                self._spoke_again("answering polls again")
        self._poll_sent = self.link.write(self._poll_request)

    def supervise(self) -> None:
        """Keep-alive supervision of a push device: silent too long -> device.offline."""
        if not self.link.online:
            return  # the link reports its own offline/online
        quiet = time.monotonic() - self._last_frame_at
        if quiet >= self._silent_after:
            self._went_silent(f"no valid frame for {self._silent_after:g}s")
        else:
            self._spoke_again("sending valid frames again")

    def _went_silent(self, reason: str) -> None:
        if self._silent:
            return
        self._silent = reason
        self.emit(
            "device.offline",
            {"port": self.config.port, "resolved": self.link.resolved, "reason": reason},
        )

    def _spoke_again(self, reason: str) -> None:
        if not self._silent:
            return
        self._silent = ""
        self.emit(
            "device.online",
            {"port": self.config.port, "resolved": self.link.resolved, "reason": reason},
        )
