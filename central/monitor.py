"""``wardpost monitor``: the reference console for the monitoring centre.

Subscribes to one site or all and shows

* the live event stream, confirming every event with a receipt so agents running
  with ``delivery = "receipt"`` release it;
* the **alarm list**: every critical event from a driver (``panic.pressed``,
  ``gate.alarm``, …) is an alarm, numbered ``#1``, ``#2``, … in arrival order, with
  its priority, location and state ``new → acknowledged → resolved`` (or
  ``expired``/``superseded``), taken only from what the device reports: events of
  kind ``*.acknowledged``, ``*.resolved`` and ``*.expired`` whose ``payload.alarm``
  names the alarm. A command result never changes an alarm by itself;
* the **device table**: online/stopped/offline from the retained status and Last
  Will, last heartbeat, backlog and driver health. A device whose heartbeat is
  overdue (``LOST_AFTER_INTERVALS`` times its announced interval) is shown as
  ``lost``, announced once when it goes missing and once when it is back. A Last
  Will older than the device's current boot/connection is ignored.

The operator types line commands (``help`` lists them): ``ack``, ``resolve``,
``silence`` and ``test`` go to the device as commands signed with the centre's key
(``--key``). ``--json`` prints one JSON object per line instead, for scripts.

The parts are separate so they can be tested without a terminal:
:class:`MonitorState` turns messages into state and records (no I/O),
:class:`Console` turns operator lines into commands, :class:`TerminalView`
renders, and :class:`Monitor` owns the MQTT connection.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console as RichConsole
from rich.markup import escape
from rich.table import Table

from agent.config import read_secret
from agent.event import uuid7
from agent.security import Signer

LOST_AFTER_INTERVALS = 2.5
#: Closed alarms still listed, newest first, after the open ones.
CLOSED_ALARMS_SHOWN = 20
#: Event ids remembered to recognise re-sends (the agent may send an event twice).
SEEN_IDS_KEPT = 100_000
CORE_SOURCE = "agent"

_STYLE = {"critical": "bold white on red", "high": "bold red", "normal": "cyan", "low": "dim"}
_PRIORITY_ORDER = {"critical": 0, "high": 1, "normal": 2, "low": 3}
_STATE_STYLE = {
    "new": "bold white on red",
    "acknowledged": "bold yellow",
    "resolved": "green",
    "expired": "dim",
    "superseded": "dim",
}
#: Alarm states by how far along they are: a late or re-sent event never moves one back.
_STATE_RANK = {"new": 0, "acknowledged": 1, "resolved": 2, "expired": 2, "superseded": 2}
_FOLLOW_UPS = {"acknowledged": "acknowledged", "resolved": "resolved", "expired": "expired"}

Record = dict[str, Any]


def place(location: Any) -> str:
    """``{"ward": "3B", "room": "12", "floor": 2}`` → ``ward 3B, room 12, floor 2``."""
    if isinstance(location, Mapping):
        return ", ".join(f"{k} {v}" for k, v in location.items() if v not in ("", None))
    return "" if location is None else str(location)


# --------------------------------------------------------------------------- state


@dataclass
class DeviceState:
    site: str
    device: str
    state: str = "unknown"
    boot: int = 0
    connection: int = 0
    last_heartbeat: float | None = None
    interval: float | None = None
    backlog: int | None = None
    drivers: dict[str, Any] = field(default_factory=dict)
    last_event: float | None = None
    reported_lost: bool = False

    def supervision(self, now: float) -> str:
        """The state shown: ``lost`` when an online device's heartbeat is overdue."""
        overdue = (
            self.state == "online"
            and self.last_heartbeat is not None
            and self.interval is not None
            and now - self.last_heartbeat > LOST_AFTER_INTERVALS * self.interval
        )
        return "lost" if overdue else self.state

    def apply_status(self, body: Mapping[str, Any]) -> bool:
        """Apply a retained status; returns False for a stale Last Will."""
        counter = (int(body.get("boot", 0)), int(body.get("connection", 0)))
        if body.get("state") == "offline" and counter < (self.boot, self.connection):
            return False
        self.state = str(body.get("state", "unknown"))
        self.boot, self.connection = max((self.boot, self.connection), counter)
        if "backlog" in body:
            self.backlog = body["backlog"]
        return True

    def unhealthy_drivers(self) -> list[str]:
        return [
            n
            for n, h in self.drivers.items()
            if isinstance(h, Mapping) and h.get("state") not in ("ok", None)
        ]


@dataclass
class Alarm:
    """One alarm as the centre sees it; ``id`` is the id of the event that raised it."""

    number: int
    id: str
    site: str
    device: str
    source: str
    kind: str
    priority: str
    location: Any
    raised: str
    test: bool = False
    state: str = "new"
    by: str | None = None
    updated: str = ""

    @property
    def open(self) -> bool:
        return self.state in ("new", "acknowledged")

    @property
    def where(self) -> str:
        spot = place(self.location)
        return f"{self.site}/{self.device}" + (f" {spot}" if spot else "")

    def to_dict(self) -> Record:
        return {**asdict(self), "open": self.open, "where": self.where}


@dataclass(frozen=True)
class PendingCommand:
    name: str
    site: str
    device: str
    alarm: int | None


class MonitorState:
    """Everything the console knows, built only from the messages it is given.

    :meth:`apply` takes one MQTT message and returns the records worth showing
    (dicts with a ``type``). No I/O and no clock of its own: ``now`` is passed in.
    Not thread-safe; :class:`Monitor` serialises access.
    """

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], DeviceState] = {}
        self.alarms: OrderedDict[str, Alarm] = OrderedDict()
        self.pending: dict[str, PendingCommand] = {}
        self.events_seen = 0
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._next_number = 1

    # -- input -------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, now: float) -> list[Record]:
        """Records for one message; raises ``ValueError`` for one that is malformed."""
        parts = topic.split("/")
        if len(parts) < 4:
            return []
        site, device, channel = parts[1], parts[2], parts[3]
        if channel in ("receipts", "cmd"):
            return []  # ours, or another operator's
        body = json.loads(payload) if payload else {}
        if not isinstance(body, dict):
            raise ValueError("payload is not a JSON object")
        dev = self.device(site, device)
        where = {"site": site, "device": device}
        if channel == "status":
            return [{"type": "status", **where, **body}] if dev.apply_status(body) else []
        if channel == "heartbeat":
            dev.last_heartbeat = now
            dev.interval = float(body.get("interval") or 0) or None
            backlog = body.get("backlog")
            dev.backlog = backlog.get("count") if isinstance(backlog, Mapping) else None
            dev.drivers = dict(body.get("drivers") or {})
            return [{"type": "heartbeat", **where, **body}]
        if channel == "events":
            dev.last_event = now
            return self._event(body)
        if channel == "cmd_result":
            pending = self.pending.pop(str(body.get("id")), None)
            alarm = {"alarm_number": pending.alarm} if pending and pending.alarm else {}
            return [{"type": "cmd_result", **where, **alarm, **body}]
        return []

    def _event(self, body: dict[str, Any]) -> list[Record]:
        event_id = body["id"]
        if not isinstance(event_id, str):
            raise ValueError("event id is not a string")
        if event_id in self._seen:
            return []  # a re-send: the centre de-duplicates by id
        self._remember(event_id)
        self.events_seen += 1
        records: list[Record] = [{"type": "event", **body}]
        alarm = self._alarm_change(body)
        if alarm is not None:
            records.append({"type": "alarm", **alarm.to_dict()})
        return records

    def _remember(self, event_id: str) -> None:
        self._seen.add(event_id)
        self._seen_order.append(event_id)
        if len(self._seen_order) > SEEN_IDS_KEPT:
            self._seen.discard(self._seen_order.popleft())

    def _alarm_change(self, body: Mapping[str, Any]) -> Alarm | None:
        """The alarm this event raises or moves on, if any."""
        payload = body.get("payload") or {}
        kind = str(body.get("kind", ""))
        follow_up = _FOLLOW_UPS.get(kind.rsplit(".", 1)[-1])
        referenced = payload.get("alarm") if isinstance(payload, Mapping) else None
        if follow_up and isinstance(referenced, str):
            if payload.get("reason") == "superseded":
                follow_up = "superseded"
            alarm = self.alarms.get(referenced) or self._new_alarm(referenced, body)
            if _STATE_RANK[follow_up] <= _STATE_RANK[alarm.state]:
                return None
            alarm.state = follow_up
            alarm.by = payload.get("by") or alarm.by
            alarm.updated = str(body.get("time", ""))
            return alarm
        if body.get("priority") == "critical" and body.get("source") != CORE_SOURCE:
            return self._new_alarm(str(body["id"]), body)
        return None

    def _new_alarm(self, alarm_id: str, body: Mapping[str, Any]) -> Alarm:
        payload = body.get("payload") or {}
        alarm = Alarm(
            number=self._next_number,
            id=alarm_id,
            site=str(body.get("site", "")),
            device=str(body.get("device", "")),
            source=str(body.get("source", "")),
            kind=str(body.get("kind", "")),
            priority=str(body.get("priority", "critical")),
            location=payload.get("location") if isinstance(payload, Mapping) else None,
            raised=str(body.get("time", "")),
            test=bool(body.get("test", False)),
            updated=str(body.get("time", "")),
        )
        self._next_number += 1
        self.alarms[alarm_id] = alarm
        return alarm

    def supervise(self, now: float) -> list[Record]:
        """``device_lost`` once when a heartbeat becomes overdue, ``device_back`` after."""
        records = []
        for dev in self.devices.values():
            lost = dev.supervision(now) == "lost"
            if lost != dev.reported_lost:
                dev.reported_lost = lost
                silent = None if dev.last_heartbeat is None else round(now - dev.last_heartbeat, 1)
                records.append(
                    {
                        "type": "device_lost" if lost else "device_back",
                        "site": dev.site,
                        "device": dev.device,
                        "silent_for": silent,
                    }
                )
        return records

    # -- queries -----------------------------------------------------------------------

    def device(self, site: str, device: str) -> DeviceState:
        key = (site, device)
        if key not in self.devices:
            self.devices[key] = DeviceState(site, device)
        return self.devices[key]

    def alarm_list(self) -> list[Alarm]:
        """Open alarms (most urgent, then oldest first), then the latest closed ones."""
        alarms = list(self.alarms.values())
        open_ = sorted(
            (a for a in alarms if a.open),
            key=lambda a: (_PRIORITY_ORDER.get(a.priority, 9), a.number),
        )
        closed = [a for a in reversed(alarms) if not a.open][:CLOSED_ALARMS_SHOWN]
        return open_ + closed

    def alarm_by_number(self, number: int) -> Alarm | None:
        return next((a for a in self.alarms.values() if a.number == number), None)

    def device_rows(self, now: float) -> list[Record]:
        rows = []
        for dev in sorted(self.devices.values(), key=lambda d: (d.site, d.device)):
            rows.append(
                {
                    "site": dev.site,
                    "device": dev.device,
                    "state": dev.supervision(now),
                    "boot": dev.boot,
                    "connection": dev.connection,
                    "heartbeat_age": None
                    if dev.last_heartbeat is None
                    else round(now - dev.last_heartbeat, 1),
                    "backlog": dev.backlog,
                    "drivers": len(dev.drivers),
                    "drivers_not_ok": dev.unhealthy_drivers(),
                }
            )
        return rows


# ------------------------------------------------------------------------- commands


def command_message(
    name: str,
    args: Mapping[str, Any],
    target: str | None,
    *,
    site: str,
    device: str,
    signer: Signer | None,
) -> dict[str, Any]:
    """A command for ``site``/``device`` with a fresh id, signed when ``signer`` is given."""
    message: dict[str, Any] = {
        "id": uuid7(),
        "issued_at": time.time(),
        "args": dict(args),
        "target": target,
    }
    return signer.sign(site, device, name, message) if signer is not None else message


class CommandSink(Protocol):
    """Where the :class:`Console` sends commands (the :class:`Monitor`, or a test double)."""

    def send(
        self,
        site: str,
        device: str,
        name: str,
        *,
        args: Mapping[str, Any],
        target: str | None,
        alarm: int | None = None,
    ) -> str:
        """Publish the command; return its id."""


@dataclass(frozen=True)
class Reply:
    """What the console answers an operator line with."""

    text: str
    ok: bool = True
    record: Record = field(default_factory=dict)
    show: str = ""  # "alarms" or "devices": render that table after the text
    quit: bool = False


_HELP = """\
commands (N is an alarm number; without it, the selected alarm, or the only open one):
  alarms | a                 the alarm list          devices | d    the device table
  select N | N               select alarm N
  ack [N]                    acknowledge: a responder is on the way
  resolve [N]                close the alarm
  silence [N]                silence sounders for the alarm
  test [N] | test SITE/DEVICE [DRIVER]   raise a test alarm (the alarm's button by default)
  help | ?                   this text               quit | q       leave the console"""


class Console:
    """Turns operator lines into signed commands: the console's logic, without a terminal."""

    def __init__(
        self,
        state: MonitorState,
        sink: CommandSink,
        *,
        operator: str = "",
        lock: threading.Lock | None = None,
    ):
        self.state = state
        self.sink = sink
        self.operator = operator
        self.selected: str | None = None
        self._lock = lock or threading.Lock()

    def execute(self, line: str) -> Reply:
        words = line.split()
        if not words:
            return Reply("")
        verb, rest = words[0].lower(), words[1:]
        try:
            with self._lock:
                return self._execute(verb, rest)
        except _Refused as exc:
            return Reply(str(exc), ok=False)

    def _execute(self, verb: str, rest: list[str]) -> Reply:
        if verb in ("help", "?"):
            return Reply(_HELP)
        if verb in ("quit", "q", "exit"):
            return Reply("bye", quit=True)
        if verb in ("alarms", "a"):
            return Reply("", show="alarms")
        if verb in ("devices", "d"):
            return Reply("", show="devices")
        if verb.isdigit() or verb == "select":
            alarm = self._alarm([verb] if verb.isdigit() else rest, allow_closed=True)
            self.selected = alarm.id
            return Reply(f"selected #{alarm.number} {alarm.kind} at {alarm.where} ({alarm.state})")
        if verb in ("ack", "resolve", "silence"):
            alarm = self._alarm(rest)
            self.selected = alarm.id
            args = {"alarm": alarm.id, **({"by": self.operator} if self.operator else {})}
            # The sounder belongs to another driver (outputs): a silence is for whoever has it.
            target = None if verb == "silence" else alarm.source
            return self._send(alarm.site, alarm.device, verb, args=args, target=target, alarm=alarm)
        if verb == "test":
            return self._test(rest)
        raise _Refused(f"unknown command {verb!r}; type help")

    def _test(self, rest: list[str]) -> Reply:
        if rest and "/" in rest[0]:
            site, _, device = rest[0].partition("/")
            if not site or not device:
                raise _Refused("give the device as SITE/DEVICE")
            target = rest[1] if len(rest) > 1 else None
            return self._send(site, device, "test", args={}, target=target, alarm=None)
        alarm = self._alarm(rest, allow_closed=True)
        return self._send(
            alarm.site, alarm.device, "test", args={}, target=alarm.source, alarm=alarm
        )

    def _send(
        self,
        site: str,
        device: str,
        name: str,
        *,
        args: Mapping[str, Any],
        target: str | None,
        alarm: Alarm | None,
    ) -> Reply:
        number = alarm.number if alarm else None
        command_id = self.sink.send(site, device, name, args=args, target=target, alarm=number)
        about = f" for alarm #{number}" if number else ""
        record = {
            "type": "command_sent",
            "id": command_id,
            "name": name,
            "site": site,
            "device": device,
            "target": target,
            "args": dict(args),
            "alarm_number": number,
        }
        return Reply(f"sent {name}{about} to {site}/{device} (command {command_id})", record=record)

    def _alarm(self, rest: list[str], allow_closed: bool = False) -> Alarm:
        if rest:
            try:
                number = int(rest[0].lstrip("#"))
            except ValueError:
                raise _Refused(f"{rest[0]!r} is not an alarm number") from None
            alarm = self.state.alarm_by_number(number)
            if alarm is None:
                raise _Refused(f"there is no alarm #{number}")
        elif self.selected is not None and self.selected in self.state.alarms:
            alarm = self.state.alarms[self.selected]
        else:
            open_ = [a for a in self.state.alarms.values() if a.open]
            if len(open_) != 1:
                raise _Refused("which alarm? give its number" if open_ else "no open alarm")
            alarm = open_[0]
        if not (alarm.open or allow_closed):
            raise _Refused(f"alarm #{alarm.number} is already {alarm.state}")
        return alarm


class _Refused(Exception):
    """An operator line that cannot be carried out; the message says why."""


# ---------------------------------------------------------------------------- view


class TerminalView:
    """Renders records and tables with rich (plain text when not a terminal), or JSON lines."""

    def __init__(self, out: TextIO = sys.stdout, *, as_json: bool = False):
        self.out = out
        self.as_json = as_json
        self.console = RichConsole(file=out, highlight=False, soft_wrap=True)
        self._lock = threading.Lock()

    def records(self, records: Iterable[Record]) -> None:
        for record in records:
            if self.as_json:
                self._json(record)
                continue
            text = self.line(record)
            if text:
                self.console.print(text)

    def reply(self, reply: Reply) -> None:
        if not reply.text:
            return
        if self.as_json:
            self._json({"type": "reply", "ok": reply.ok, "text": reply.text, **reply.record})
        else:
            self.console.print(escape(reply.text) if reply.ok else f"[red]{escape(reply.text)}[/]")

    def alarms(self, state: MonitorState) -> None:
        alarms = state.alarm_list()
        if self.as_json:
            self._json({"type": "alarms", "alarms": [a.to_dict() for a in alarms]})
            return
        table = Table(title="alarms")
        for column in ("#", "state", "priority", "where", "kind", "raised", "by"):
            table.add_column(column)
        for a in alarms:
            test = " [TEST]" if a.test else ""
            table.add_row(
                str(a.number),
                f"[{_STATE_STYLE.get(a.state, '')}]{a.state}[/]",
                f"[{_STYLE.get(a.priority, '')}]{a.priority}[/]",
                escape(a.where),
                escape(a.kind + test),
                a.raised[11:19],
                escape(a.by or ""),
            )
        self.console.print(table if alarms else "no alarms")

    def devices(self, state: MonitorState, now: float) -> None:
        rows = state.device_rows(now)
        if self.as_json:
            self._json({"type": "devices", "devices": rows})
            return
        table = Table(title="devices")
        for column in ("site", "device", "state", "boot", "heartbeat", "backlog", "drivers"):
            table.add_column(column)
        for r in rows:
            style = {"online": "green", "lost": "bold red", "offline": "red"}.get(
                r["state"], "yellow"
            )
            age = "-" if r["heartbeat_age"] is None else f"{r['heartbeat_age']:.0f}s ago"
            bad = r["drivers_not_ok"]
            drivers = f"{r['drivers']} ({', '.join(bad)} not ok)" if bad else str(r["drivers"])
            table.add_row(
                escape(r["site"]),
                escape(r["device"]),
                f"[{style}]{r['state']}[/]",
                str(r["boot"]),
                age,
                "-" if r["backlog"] is None else str(r["backlog"]),
                escape(drivers),
            )
        self.console.print(table if rows else "no devices seen yet")

    @staticmethod
    def line(record: Record) -> str:
        """One rich-markup line for a record ("" for those shown only in JSON)."""
        kind = record["type"]
        who = escape(f"{record.get('site')}/{record.get('device')}")
        if kind == "event":
            prio = str(record.get("priority", "normal"))
            payload = record.get("payload") or {}
            spot = place(payload.get("location")) if isinstance(payload, Mapping) else ""
            test = " [TEST]" if record.get("test") else ""
            text = escape(json.dumps(payload, default=str)[:160])
            return (
                f"[{_STYLE.get(prio, '')}]{prio.upper():8}[/] {record.get('time', '')} "
                f"{who}/{escape(str(record.get('source')))} "
                f"[bold]{escape(str(record.get('kind')))}[/]{escape(test)}"
                f"{escape(' @ ' + spot) if spot else ''} {text}"
            )
        if kind == "alarm":
            style = _STATE_STYLE.get(record["state"], "")
            by = f" by {escape(record['by'])}" if record.get("by") else ""
            test = " (test)" if record.get("test") else ""
            return (
                f"[{style}]ALARM #{record['number']} {record['state'].upper()}[/]{test} "
                f"{escape(record['kind'])} at {escape(record['where'])}{by}"
            )
        if kind == "status":
            return (
                f"[bold]{who}[/] is [bold]{escape(str(record.get('state')))}[/] "
                f"(boot {record.get('boot')}, connection {record.get('connection')})"
            )
        if kind == "cmd_result":
            outcome = (
                "[green]ok[/]"
                if record.get("ok")
                else f"[red]failed: {escape(str(record.get('error')))}[/]"
            )
            about = f" for alarm #{record['alarm_number']}" if record.get("alarm_number") else ""
            return (
                f"command {escape(str(record.get('name')))}{about} on {who}: {outcome} "
                f"(handled by {', '.join(record.get('handled_by') or []) or 'nobody'})"
            )
        if kind == "device_lost":
            return f"[bold red]LOST {who}: no heartbeat for {record['silent_for']}s[/]"
        if kind == "device_back":
            return f"[green]{who} heartbeat is back[/]"
        if kind == "malformed":
            return (
                f"[yellow]ignored malformed message on {escape(record['topic'])}: "
                f"{escape(record['error'])}[/]"
            )
        return ""

    def _json(self, record: Record) -> None:
        with self._lock:
            self.out.write(json.dumps(record, default=str) + "\n")
            self.out.flush()


# ------------------------------------------------------------------------- network


@dataclass
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    prefix: str = "wardpost"

    def client(self, name: str) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if self.username:
            password = (
                read_secret(self.password_file, "--password-file") if self.password_file else None
            )
            client.username_pw_set(self.username, password)
        if self.ca_file or self.cert_file:
            client.tls_set(
                ca_certs=self.ca_file or None,
                certfile=self.cert_file or None,
                keyfile=self.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        return client


class Monitor:
    """The console's MQTT side: feeds :class:`MonitorState`, sends receipts and commands."""

    def __init__(
        self,
        options: BrokerOptions,
        site: str = "+",
        *,
        receipts: bool = True,
        signer: Signer | None = None,
        operator: str = "",
        view: TerminalView | None = None,
    ):
        self.options = options
        self.site = site
        self.receipts = receipts
        self.signer = signer
        self.view = view or TerminalView()
        self.state = MonitorState()
        self._lock = threading.Lock()
        self.console = Console(self.state, self, operator=operator, lock=self._lock)
        self.connected = threading.Event()
        self.client = options.client("wardpost-monitor")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.connected.set()

    # -- MQTT --------------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe(f"{self.options.prefix}/{self.site}/+/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if self.receipts and "/events/" in msg.topic:
                self._receipt(msg.topic, bytes(msg.payload))
            with self._lock:
                records = self.state.apply(msg.topic, bytes(msg.payload), time.time())
            self.view.records(records)
        except Exception as exc:  # a malformed message must not stop the console
            self.view.records([{"type": "malformed", "topic": msg.topic, "error": str(exc)}])

    def _receipt(self, topic: str, payload: bytes) -> None:
        """Confirm every copy, re-sends too: the device waits for a receipt to release it."""
        base = topic.split("/events/", maxsplit=1)[0]
        event_id = json.loads(payload)["id"]
        self.client.publish(f"{base}/receipts", json.dumps({"ids": [event_id]}), qos=1)

    def send(
        self,
        site: str,
        device: str,
        name: str,
        *,
        args: Mapping[str, Any],
        target: str | None,
        alarm: int | None = None,
    ) -> str:
        message = command_message(name, args, target, site=site, device=device, signer=self.signer)
        self.state.pending[message["id"]] = PendingCommand(name, site, device, alarm)
        topic = f"{self.options.prefix}/{site}/{device}/cmd/{name}"
        self.client.publish(topic, json.dumps(message), qos=1)
        return str(message["id"])

    def start(self, timeout: float = 15.0) -> None:
        self.client.connect(self.options.host, self.options.port, 15)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise ConnectionError(
                f"no subscription on {self.options.host}:{self.options.port} "
                f"within {timeout:.0f}s (refused, or TLS failed)"
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- operator ----------------------------------------------------------------------

    def execute(self, line: str) -> Reply:
        """Run one operator line and show its reply (and a table if it asks for one)."""
        reply = self.console.execute(line)
        self.view.reply(reply)
        with self._lock:
            if reply.show == "alarms":
                self.view.alarms(self.state)
            elif reply.show == "devices":
                self.view.devices(self.state, time.time())
        return reply

    def tick(self) -> None:
        """Supervision: announce devices whose heartbeat went missing (or came back)."""
        with self._lock:
            records = self.state.supervise(time.time())
        self.view.records(records)

    def run(
        self,
        duration: float | None = None,
        table_every: float = 30.0,
        lines: Iterable[str] | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run until ``duration`` passes, ``stop()`` is true, ``quit`` or Ctrl-C."""
        quit_requested = threading.Event()
        self.start()
        if self.signer is None and lines is not None and not self.view.as_json:
            self.view.console.print(
                "[yellow]no --key: commands are sent unsigned and devices "
                "that require signatures will refuse them[/]"
            )
        if lines is not None:
            threading.Thread(
                target=self._read, args=(lines, quit_requested), name="monitor-input", daemon=True
            ).start()
        started = next_table = time.monotonic()
        try:
            while not (stop() or quit_requested.is_set()) and (
                duration is None or time.monotonic() - started < duration
            ):
                time.sleep(0.2)
                self.tick()
                if not self.view.as_json and time.monotonic() >= next_table + table_every:
                    next_table = time.monotonic()
                    with self._lock:
                        self.view.devices(self.state, time.time())
                        self.view.alarms(self.state)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return 0

    def _read(self, lines: Iterable[str], quit_requested: threading.Event) -> None:
        for line in lines:
            if self.execute(line.strip()).quit:
                break
        else:
            return  # end of input: keep watching
        quit_requested.set()


def send_command(
    options: BrokerOptions,
    site: str,
    device: str,
    name: str,
    *,
    args: Mapping[str, Any],
    target: str | None = None,
    timeout: float = 10.0,
    signer: Signer | None = None,
) -> dict[str, Any]:
    """Publish one command and wait for its result on ``cmd_result/<id>``."""
    message = command_message(name, args, target, site=site, device=device, signer=signer)
    command_id = str(message["id"])
    base = f"{options.prefix}/{site}/{device}"
    result: dict[str, Any] = {}
    done = threading.Event()
    client = options.client("wardpost-command")

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        result.update(json.loads(msg.payload))
        done.set()

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, props: Any) -> None:
        c.publish(f"{base}/cmd/{name}", json.dumps(message), qos=1)

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/cmd_result/{command_id}", qos=1)
    client.connect(options.host, options.port, 15)
    client.loop_start()
    try:
        if not done.wait(timeout):
            return {
                "id": command_id,
                "ok": False,
                "error": f"no result from {site}/{device} within {timeout}s",
            }
    finally:
        client.disconnect()
        client.loop_stop()
    return result
