"""``wardpost monitor``: the operator console of the monitoring centre.

It shows the centre's ONE alarm model, the receiver's store: the alarms the
receiver raised from devices' events (and its own, such as ``device.lost``),
numbered ``#1``, ``#2``, … in the order this console first saw them, each with
its state ``new → acknowledged → resolved`` and where the device stands on it
(``ack sent, not confirmed`` → ``ack confirmed by device``). ``ack`` and
``resolve`` go through :class:`central.alarms.AlarmDesk`, exactly as
``wardpost receiver ack/resolve`` do: stored with who and when, sent to the device
signed with the centre's key (``--key``), and followed up by the receiver until
the device confirms. ``silence`` and ``test`` are sent as commands.

Beside the alarms it shows the live traffic from the broker: the event stream,
command results and the device table (online/stopped/offline from the retained
status and Last Will, last heartbeat, backlog, driver health; ``lost`` when a
heartbeat is overdue). The console never writes receipts: only the receiver,
which stores events first, may (see ``config/mosquitto/README.md``).

The parts are separate so they can be tested without a terminal:
:class:`LiveView` turns MQTT messages into records (no I/O), :class:`AlarmBoard`
reads the alarms from the store, :class:`Console` turns operator lines into
actions, :class:`TerminalView` renders, and :class:`Monitor` owns the connection.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import read_secret
from agent.mqttloop import disconnect_and_stop
from agent.security import Signer
from central.alarms import (
    AlarmDesk,
    AlarmError,
    Commander,
    MqttCommander,
    Signing,
    command_message,
    unsigned,
)
from central.store import Alarm, Store
from contract.commands import ContractError

log = logging.getLogger("wardpost.central.monitor")

LOST_AFTER_INTERVALS = 2.5
#: Closed alarms still listed, newest first, after the open ones.
CLOSED_ALARMS_SHOWN = 20
#: Resolved alarms older than this are not shown at all.
RESOLVED_SHOWN_FOR = 24 * 3600.0

_STYLE = {"critical": "bold white on red", "high": "bold red", "normal": "cyan", "low": "dim"}
_PRIORITY_ORDER = {"critical": 0, "high": 1, "normal": 2, "low": 3}
_STATE_STYLE = {"new": "bold white on red", "acknowledged": "bold yellow", "resolved": "green"}
_DEVICE_STYLE = {
    "sent": "yellow",
    "confirmed": "green",
    "refused": "bold red",
    "unconfirmed": "bold red",
}

Record = dict[str, Any]


def place(location: Any) -> str:
    """``{"ward": "3B", "room": "12", "floor": 2}`` → ``ward 3B, room 12, floor 2``."""
    if isinstance(location, Mapping):
        return ", ".join(f"{k} {v}" for k, v in location.items() if v not in ("", None))
    return "" if location is None else str(location)


# --------------------------------------------------------------------------- live traffic


@dataclass
class DeviceView:
    site: str
    device: str
    state: str = "unknown"
    boot: int = 0
    connection: int = 0
    last_heartbeat: float | None = None
    interval: float | None = None
    backlog: int | None = None
    drivers: dict[str, Any] = field(default_factory=dict)
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


class LiveView:
    """The broker's traffic as records (dicts with a ``type``): events, statuses, heartbeats,
    command results, and devices going quiet. No I/O and no clock: ``now`` is passed in."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], DeviceView] = {}

    def apply(self, topic: str, payload: bytes, now: float) -> list[Record]:
        """Records for one message; raises ``ValueError`` for one that is malformed."""
        parts = topic.split("/")
        if len(parts) < 4:
            return []
        site, device, channel = parts[1], parts[2], parts[3]
        if channel in ("receipts", "cmd"):
            return []  # the receiver's, ours, or another operator's
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
            return [{"type": "event", **body}]
        if channel == "cmd_result":
            return [{"type": "cmd_result", **where, **body}]
        return []

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

    def device(self, site: str, device: str) -> DeviceView:
        key = (site, device)
        if key not in self.devices:
            self.devices[key] = DeviceView(site, device)
        return self.devices[key]

    def device_rows(self, now: float) -> list[Record]:
        return [
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
            for dev in sorted(self.devices.values(), key=lambda d: (d.site, d.device))
        ]


# ---------------------------------------------------------------------------- alarms


@dataclass(frozen=True)
class AlarmOrigin:
    """What the event that raised an alarm says about it: which driver, and where."""

    source: str = ""
    location: Any = None


class AlarmBoard:
    """The store's alarms as this console shows them, numbered in the order first seen."""

    def __init__(self, store: Store, started: float):
        self.store = store
        self.started = started
        self.alarms: dict[str, Alarm] = {}
        self.numbers: dict[str, int] = {}
        self.origins: dict[str, AlarmOrigin] = {}

    def refresh(self) -> list[Record]:
        """Read the store again; an ``alarm`` record for each alarm new or changed since."""
        records = []
        shown = {a.id: a for a in self.store.live_alarms(self.started - RESOLVED_SHOWN_FOR)}
        for gone in self.alarms.keys() - shown.keys():  # resolved long ago: off the board
            del self.alarms[gone]
        for alarm in shown.values():
            before = self.alarms.get(alarm.id)
            self.alarms[alarm.id] = alarm
            if alarm.id not in self.numbers:
                self.numbers[alarm.id] = len(self.numbers) + 1
                self.origins[alarm.id] = self._origin(alarm.id)
            if before != alarm:
                records.append(self.record(alarm))
        return records

    def _origin(self, alarm_id: str) -> AlarmOrigin:
        event = self.store.event(alarm_id)
        if event is None:
            return AlarmOrigin()
        return AlarmOrigin(event.source, event.payload.get("location"))

    def where(self, alarm: Alarm) -> str:
        spot = place(self.origins.get(alarm.id, AlarmOrigin()).location)
        return f"{alarm.site}/{alarm.device}" + (f" {spot}" if spot else "")

    def record(self, alarm: Alarm) -> Record:
        return {
            "type": "alarm",
            "number": self.numbers[alarm.id],
            "id": alarm.id,
            "site": alarm.site,
            "device": alarm.device,
            "kind": alarm.kind,
            "priority": alarm.priority,
            "test": alarm.test,
            "state": alarm.state,
            "by": alarm.resolved_by or alarm.acknowledged_by,
            "where": self.where(alarm),
            "device_state": alarm.device_state,
            "at_device": alarm.at_device,
        }

    def listing(self) -> list[Alarm]:
        """Open alarms (most urgent, then oldest first), then the latest closed ones."""
        alarms = list(self.alarms.values())
        open_ = sorted(
            (a for a in alarms if a.state != "resolved"),
            key=lambda a: (_PRIORITY_ORDER.get(a.priority, 9), self.numbers[a.id]),
        )
        closed = sorted(
            (a for a in alarms if a.state == "resolved"), key=lambda a: -self.numbers[a.id]
        )[:CLOSED_ALARMS_SHOWN]
        return open_ + closed

    def by_number(self, number: int) -> Alarm | None:
        found = [i for i, n in self.numbers.items() if n == number and i in self.alarms]
        return self.alarms[found[0]] if found else None


# --------------------------------------------------------------------- operator lines


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
  ack [N]                    acknowledge: a responder is on the way (confirmed by the device)
  resolve [N]                close the alarm (confirmed by the device)
  silence [N]                silence sounders for the alarm
  test [N] | test SITE/DEVICE [DRIVER]   raise a test alarm (the alarm's button by default)
  help | ?                   this text               quit | q       leave the console"""


class Console:
    """Turns operator lines into actions on the alarm desk: the console's logic, no terminal."""

    def __init__(
        self,
        board: AlarmBoard,
        desk: AlarmDesk,
        commander: Commander,
        *,
        operator: str,
        lock: threading.Lock | None = None,
    ):
        self.board = board
        self.desk = desk
        self.commander = commander
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
        except (_Refused, AlarmError, ContractError) as exc:
            return Reply(str(exc), ok=False)
        except Exception as exc:  # the store or the link failed: say so, keep the console
            log.exception("operator line %r failed", line)
            return Reply(f"{verb} failed: {type(exc).__name__}: {exc}", ok=False)

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
            return Reply(self._describe(alarm, f"selected #{self.board.numbers[alarm.id]}"))
        if verb in ("ack", "resolve"):
            alarm = self._alarm(rest)
            self.selected = alarm.id
            move = self.desk.acknowledge if verb == "ack" else self.desk.resolve
            moved = move(alarm.id, self.operator)  # the board shows the change at its next tick
            number = self.board.numbers[alarm.id]
            return Reply(
                self._describe(moved, f"#{number} {moved.state} by {self.operator}"),
                record=self.board.record(moved),
            )
        if verb == "silence":
            alarm = self._alarm(rest)
            self.selected = alarm.id
            # The sounder belongs to another driver (outputs): a silence is for whoever has it.
            args = {"alarm": alarm.id, "by": self.operator}
            return self._send(alarm.site, alarm.device, "silence", args, target=None, alarm=alarm)
        if verb == "test":
            return self._test(rest)
        raise _Refused(f"unknown command {verb!r}; type help")

    def _describe(self, alarm: Alarm, head: str) -> str:
        at_device = f" ({alarm.at_device})" if alarm.at_device else ""
        return f"{head}: {alarm.kind} at {self.board.where(alarm)}, {alarm.state}{at_device}"

    def _test(self, rest: list[str]) -> Reply:
        if rest and "/" in rest[0]:
            site, _, device = rest[0].partition("/")
            if not site or not device:
                raise _Refused("give the device as SITE/DEVICE")
            target = rest[1] if len(rest) > 1 else None
            return self._send(site, device, "test", {}, target=target, alarm=None)
        alarm = self._alarm(rest, allow_closed=True)
        source = self.board.origins.get(alarm.id, AlarmOrigin()).source or None
        return self._send(alarm.site, alarm.device, "test", {}, target=source, alarm=alarm)

    def _send(
        self,
        site: str,
        device: str,
        name: str,
        args: dict[str, Any],
        *,
        target: str | None,
        alarm: Alarm | None,
    ) -> Reply:
        command_id = self.commander.send(site, device, name, args, target)
        number = self.board.numbers[alarm.id] if alarm else None
        about = f" for alarm #{number}" if number else ""
        record = {
            "type": "command_sent",
            "id": command_id,
            "name": name,
            "site": site,
            "device": device,
            "target": target,
            "args": args,
            "alarm_number": number,
        }
        return Reply(f"sent {name}{about} to {site}/{device} (command {command_id})", record=record)

    def _alarm(self, rest: list[str], allow_closed: bool = False) -> Alarm:
        board = self.board
        if rest:
            try:
                number = int(rest[0].lstrip("#"))
            except ValueError:
                raise _Refused(f"{rest[0]!r} is not an alarm number") from None
            alarm = board.by_number(number)
            if alarm is None:
                raise _Refused(f"there is no alarm #{number}")
        elif self.selected is not None and self.selected in board.alarms:
            alarm = board.alarms[self.selected]
        else:
            open_ = [a for a in board.alarms.values() if a.state != "resolved"]
            if len(open_) != 1:
                raise _Refused("which alarm? give its number" if open_ else "no open alarm")
            alarm = open_[0]
        if alarm.state == "resolved" and not allow_closed:
            raise _Refused(f"alarm #{board.numbers[alarm.id]} is already resolved")
        return alarm


class _Refused(Exception):
    """An operator line that cannot be carried out; the message says why."""


# ---------------------------------------------------------------------------- view


def escape(text: str) -> str:
    """Escape rich markup. rich is the centre's extra, imported only by the console, so that
    ``wardpost command`` and the rest of this module work on a device without it."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class TerminalView:
    """Renders records and tables with rich (plain text when not a terminal), or JSON lines."""

    def __init__(self, out: TextIO = sys.stdout, *, as_json: bool = False):
        try:
            from rich.console import Console as RichConsole
        except ImportError:
            raise ImportError(
                "the console needs rich, which comes with the centre's extra: "
                "pip install 'wardpost[central]'"
            ) from None
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
            self._json({**reply.record, "type": "reply", "ok": reply.ok, "text": reply.text})
        else:
            self.console.print(escape(reply.text) if reply.ok else f"[red]{escape(reply.text)}[/]")

    def alarms(self, board: AlarmBoard) -> None:
        alarms = board.listing()
        if self.as_json:
            self._json({"type": "alarms", "alarms": [board.record(a) for a in alarms]})
            return
        from rich.table import Table

        table = Table(title="alarms")
        for column in ("#", "state", "at the device", "priority", "where", "kind", "by"):
            table.add_column(column)
        for a in alarms:
            test = " [TEST]" if a.test else ""
            table.add_row(
                str(board.numbers[a.id]),
                f"[{_STATE_STYLE.get(a.state, '')}]{a.state}[/]",
                _styled(a.at_device, _DEVICE_STYLE.get(a.device_state or "", "")),
                f"[{_STYLE.get(a.priority, '')}]{a.priority}[/]",
                escape(board.where(a)),
                escape(a.kind + test),
                escape(a.resolved_by or a.acknowledged_by or ""),
            )
        self.console.print(table if alarms else "no alarms")

    def devices(self, live: LiveView, now: float) -> None:
        rows = live.device_rows(now)
        if self.as_json:
            self._json({"type": "devices", "devices": rows})
            return
        from rich.table import Table

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
            at_device = record.get("at_device") or ""
            device = (
                " " + _styled(at_device, _DEVICE_STYLE.get(record.get("device_state") or "", ""))
                if at_device
                else ""
            )
            return (
                f"[{style}]ALARM #{record['number']} {record['state'].upper()}[/]{test} "
                f"{escape(record['kind'])} at {escape(record['where'])}{by}{device}"
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
            return (
                f"command {escape(str(record.get('name')))} on {who}: {outcome} "
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


def _styled(text: str, style: str) -> str:
    """``text`` escaped for rich markup, in ``style`` when there is one."""
    return f"[{style}]{escape(text)}[/]" if style and text else escape(text)


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


def signing(signer: Signer | None) -> Signing:
    return signer.sign if signer is not None else unsigned


class Monitor:
    """The console's MQTT side and its loop: live traffic in, alarms from the store."""

    def __init__(
        self,
        options: BrokerOptions,
        store: Store,
        site: str = "+",
        *,
        signer: Signer | None = None,
        operator: str,
        view: TerminalView | None = None,
    ):
        self.options = options
        self.site = site
        self.signer = signer
        self.view = view or TerminalView()
        self.live = LiveView()
        self.board = AlarmBoard(store, time.time())
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = options.client("wardpost-monitor")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.connected.set()
        self.commander = MqttCommander(self.client, options.prefix, signing(signer))
        self.console = Console(
            self.board,
            AlarmDesk(store, self.commander),
            self.commander,
            operator=operator,
            lock=self._lock,
        )

    # -- MQTT --------------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe(f"{self.options.prefix}/{self.site}/+/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            with self._lock:
                records = self.live.apply(msg.topic, bytes(msg.payload), time.time())
            self.view.records(records)
        except Exception as exc:  # a malformed message must not stop the console
            self.view.records([{"type": "malformed", "topic": msg.topic, "error": str(exc)}])

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
        disconnect_and_stop(self.client)

    # -- operator ----------------------------------------------------------------------

    def execute(self, line: str) -> Reply:
        """Run one operator line and show its reply (and a table if it asks for one)."""
        reply = self.console.execute(line)
        self.view.reply(reply)
        with self._lock:
            if reply.show == "alarms":
                self.view.alarms(self.board)
            elif reply.show == "devices":
                self.view.devices(self.live, time.time())
        return reply

    def tick(self) -> None:
        """Alarms new or changed in the store; devices whose heartbeat went missing."""
        with self._lock:
            records = [*self.board.refresh(), *self.live.supervise(time.time())]
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
        self.tick()
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
                        self.view.devices(self.live, time.time())
                        self.view.alarms(self.board)
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
    args: dict[str, Any],
    target: str | None = None,
    timeout: float = 10.0,
    signer: Signer | None = None,
) -> dict[str, Any]:
    """Publish one command (checked against the contract first) and wait for its result on
    ``cmd_result/<id>``. :class:`~contract.commands.ContractError` if the contract refuses it."""
    from contract.commands import validate_args

    validate_args(name, args)
    message = command_message(site, device, name, args, target=target, sign=signing(signer))
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
        disconnect_and_stop(client)
    return result
