"""The centre's durable store: events, devices, alarms, link history, DC-09 forwards.

One interface, two engines with the same schema and the same SQL:

* :class:`SQLiteStore` (``sqlite:///path``): WAL with ``synchronous=FULL``, so a
  committed batch survives a power cut; the default for one hospital;
* :class:`PostgresStore` (``postgresql://user@host/db``, psycopg 3): for a
  hospital group or a city's many sites, optionally in its own ``schema``.

The receiver writes each batch of messages with :meth:`Store.write` in ONE
transaction and only then publishes the receipts, so a receipted event is on
disk. Event ids are the primary key: a re-sent event is never stored twice.
Every method is thread-safe (one connection behind a lock).
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from central.config import StoreConfig

SCHEMA_VERSION = 2

#: The first schema, created as it was; later versions are the steps in ``_MIGRATIONS``,
#: so a new store and an upgraded one take the same path.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, device TEXT NOT NULL, source TEXT NOT NULL,
        kind TEXT NOT NULL, priority TEXT NOT NULL, seq BIGINT, test INTEGER NOT NULL,
        event_time DOUBLE PRECISION NOT NULL, stored_at DOUBLE PRECISION NOT NULL,
        origin TEXT NOT NULL, body TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS events_by_device ON events (site, device, stored_at)""",
    """CREATE INDEX IF NOT EXISTS events_by_time ON events (stored_at)""",
    """CREATE TABLE IF NOT EXISTS devices (
        site TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL,
        boot BIGINT, connection BIGINT,
        version TEXT, config TEXT, drivers TEXT, backlog BIGINT, status_time TEXT,
        first_seen DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
        last_heartbeat DOUBLE PRECISION, heartbeat_interval DOUBLE PRECISION, heartbeat TEXT,
        lost INTEGER NOT NULL, seq_upto BIGINT, seq_above TEXT NOT NULL,
        hole_since DOUBLE PRECISION,
        PRIMARY KEY (site, device))""",
    """CREATE TABLE IF NOT EXISTS alarms (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
        priority TEXT NOT NULL, origin TEXT NOT NULL, test INTEGER NOT NULL,
        raised_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL, acknowledged_by TEXT, acknowledged_at DOUBLE PRECISION,
        resolved_by TEXT, resolved_at DOUBLE PRECISION, note TEXT)""",
    """CREATE INDEX IF NOT EXISTS alarms_open ON alarms (state, raised_at)""",
    """CREATE TABLE IF NOT EXISTS links (
        site TEXT NOT NULL, device TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, up INTEGER NOT NULL,
        reason TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS links_by_device ON links (site, device, at)""",
    """CREATE TABLE IF NOT EXISTS forwards (
        event_id TEXT PRIMARY KEY, queued_at DOUBLE PRECISION NOT NULL, sent_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL, last_error TEXT)""",
    """CREATE TABLE IF NOT EXISTS commands (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, device TEXT NOT NULL, name TEXT NOT NULL,
        args TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL, alarm_id TEXT,
        ok INTEGER, result TEXT, result_at DOUBLE PRECISION)""",
)

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: ack/resolve confirmed by the device; quarantined messages; sequence restarts.
    2: (
        "ALTER TABLE alarms ADD COLUMN device_command TEXT",
        "ALTER TABLE alarms ADD COLUMN device_state TEXT",
        "ALTER TABLE alarms ADD COLUMN device_sent_at DOUBLE PRECISION",
        "ALTER TABLE alarms ADD COLUMN device_last_sent_at DOUBLE PRECISION",
        "ALTER TABLE alarms ADD COLUMN device_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE alarms ADD COLUMN device_detail TEXT",
        "ALTER TABLE alarms ADD COLUMN device_confirmed_at DOUBLE PRECISION",
        "CREATE INDEX IF NOT EXISTS alarms_unconfirmed ON alarms (device_state)",
        "CREATE INDEX IF NOT EXISTS commands_by_alarm ON commands (alarm_id)",
        "ALTER TABLE devices ADD COLUMN seq_first BIGINT",
        # Numbers up to seq_upto were counted before seq_first existed: exact from here on.
        "UPDATE devices SET seq_first = seq_upto + 1 WHERE seq_upto IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS quarantine (
            at DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL, site TEXT, device TEXT,
            reason TEXT NOT NULL, size BIGINT NOT NULL, raw TEXT NOT NULL)""",
        """CREATE INDEX IF NOT EXISTS quarantine_by_device ON quarantine (site, device, at)""",
        """CREATE INDEX IF NOT EXISTS quarantine_by_time ON quarantine (at)""",
    ),
}

_EVENT_COLUMNS = (
    "id, site, device, source, kind, priority, seq, test, event_time, stored_at, origin, body"
)
_DEVICE_COLUMNS = (
    "site, device, state, boot, connection, version, config, drivers, backlog, status_time,"
    " first_seen, last_seen, last_heartbeat, heartbeat_interval, heartbeat, lost, seq_upto,"
    " seq_above, hole_since, seq_first"
)
_ALARM_COLUMNS = (
    "id, site, device, kind, priority, origin, test, raised_at, state, acknowledged_by,"
    " acknowledged_at,"
    " resolved_by, resolved_at, note, device_command, device_state, device_sent_at,"
    " device_last_sent_at, device_attempts, device_detail, device_confirmed_at"
)
#: What a device's cmd_result does to the alarm its command was about.
#: A late confirmation still counts, and one attempt's success outweighs another's refusal
#: (an attempt queued while the device was away may arrive expired, a later one not).
_CONFIRMED_FROM = ("sent", "unconfirmed", "refused")
_REFUSED_FROM = ("sent",)
#: Raw bytes kept of a quarantined message (its full size is recorded beside them).
QUARANTINE_RAW_KEPT = 16 * 1024


def _marks(count: int) -> str:
    return ", ".join("?" * count)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of ``events``: a device's event or one the centre raised (``origin="centre"``)."""

    id: str
    site: str
    device: str
    source: str
    kind: str
    priority: str
    seq: int | None
    test: bool
    event_time: float
    stored_at: float
    origin: str
    body: str

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.site,
            self.device,
            self.source,
            self.kind,
            self.priority,
            self.seq,
            int(self.test),
            self.event_time,
            self.stored_at,
            self.origin,
            self.body,
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredEvent:
        return cls(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            bool(row[7]),
            row[8],
            row[9],
            row[10],
            row[11],
        )

    @property
    def payload(self) -> dict[str, Any]:
        payload = json.loads(self.body).get("payload")
        return payload if isinstance(payload, dict) else {}


@dataclass(slots=True)
class DeviceState:
    """What the centre knows about one device; the receiver keeps these in memory too."""

    site: str
    device: str
    first_seen: float
    last_seen: float
    state: str = "unknown"  # online | stopped | offline from the retained status
    boot: int | None = None
    connection: int | None = None
    version: str | None = None
    config: str | None = None
    drivers: list[Any] = field(default_factory=list)
    backlog: int | None = None
    status_time: str | None = None
    last_heartbeat: float | None = None
    heartbeat_interval: float | None = None
    heartbeat: dict[str, Any] = field(default_factory=dict)
    lost: bool = False
    seq_upto: int | None = None
    seq_above: list[int] = field(default_factory=list)
    hole_since: float | None = None
    #: The first seq this epoch of the device's numbering: below it is not ours to miss,
    #: at or above it a new event id with a seq already seen means the numbering restarted.
    seq_first: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.site, self.device)

    def row(self) -> tuple[Any, ...]:
        return (
            self.site,
            self.device,
            self.state,
            self.boot,
            self.connection,
            self.version,
            self.config,
            json.dumps(self.drivers),
            self.backlog,
            self.status_time,
            self.first_seen,
            self.last_seen,
            self.last_heartbeat,
            self.heartbeat_interval,
            json.dumps(self.heartbeat),
            int(self.lost),
            self.seq_upto,
            json.dumps(self.seq_above),
            self.hole_since,
            self.seq_first,
        )

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> DeviceState:
        return cls(
            site=r[0],
            device=r[1],
            state=r[2],
            boot=r[3],
            connection=r[4],
            version=r[5],
            config=r[6],
            drivers=json.loads(r[7] or "[]"),
            backlog=r[8],
            status_time=r[9],
            first_seen=r[10],
            last_seen=r[11],
            last_heartbeat=r[12],
            heartbeat_interval=r[13],
            heartbeat=json.loads(r[14] or "{}"),
            lost=bool(r[15]),
            seq_upto=r[16],
            seq_above=json.loads(r[17] or "[]"),
            hole_since=r[18],
            seq_first=r[19],
        )


#: What the operator sees of a command the device must confirm, by ``device_state``.
_DEVICE_TEXT = {
    "sent": "{command} sent, not confirmed ({attempts} sent)",
    "confirmed": "{command} confirmed by device",
    "refused": "{command} refused by device: {detail}",
    "unconfirmed": "device did not confirm {command}: {detail}",
}


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm at the centre: ``new`` → ``acknowledged`` (who, when) → ``resolved``.

    ``state`` is the operators' decision. For an alarm a device raised, the ``device_*``
    fields follow the command that tells the device (``ack`` or ``resolve``): ``sent``
    until the device's ``cmd_result`` says ``confirmed`` (or ``refused``), or
    ``unconfirmed`` when it did not answer within ``[commands] confirm_within``.
    """

    id: str  # the id of the event that raised it
    site: str
    device: str
    kind: str
    priority: str
    origin: str  # "device", or "centre" for alarms the receiver raised (device.lost, ...)
    test: bool
    raised_at: float
    state: str = "new"
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    resolved_by: str | None = None
    resolved_at: float | None = None
    note: str | None = None
    device_command: str | None = None  # "ack" or "resolve"
    device_state: str | None = None  # sent | confirmed | refused | unconfirmed
    device_sent_at: float | None = None
    device_last_sent_at: float | None = None
    device_attempts: int = 0
    device_detail: str | None = None
    device_confirmed_at: float | None = None

    def row(self) -> tuple[Any, ...]:
        return tuple(
            int(v) if isinstance(v, bool) else v
            for v in (getattr(self, name) for name in self.__slots__)
        )

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Alarm:
        values = dict(zip(cls.__slots__, r, strict=True))
        values["test"] = bool(values["test"])
        values["device_attempts"] = int(values["device_attempts"] or 0)
        return cls(**values)

    @property
    def at_device(self) -> str:
        """Where the device stands: "ack sent, not confirmed (2 sent)", "" for centre alarms."""
        if self.device_state is None:
            return ""
        return _DEVICE_TEXT[self.device_state].format(
            command=self.device_command,
            attempts=self.device_attempts,
            detail=self.device_detail or "",
        )


@dataclass(frozen=True, slots=True)
class LinkChange:
    """Path availability changed: ``up`` false from lost/offline, true from heartbeat/online."""

    site: str
    device: str
    at: float
    up: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A message kept aside because of something in it: acknowledged, never stored as sent."""

    at: float
    topic: str
    site: str | None  # from the topic, when it has the form <prefix>/<site>/<device>/...
    device: str | None
    reason: str
    raw: bytes

    def row(self) -> tuple[Any, ...]:
        # MQTT topics are valid UTF-8 without NUL (the broker enforces it): stored as they are.
        kept = base64.b64encode(self.raw[:QUARANTINE_RAW_KEPT]).decode("ascii")
        return (self.at, self.topic, self.site, self.device, self.reason, len(self.raw), kept)


@dataclass(frozen=True, slots=True)
class QuarantineSummary:
    """Quarantined messages of one device (or of topics naming none: site/device None)."""

    site: str | None
    device: str | None
    count: int
    last_at: float
    last_reason: str


@dataclass
class Batch:
    """Everything one receiver cycle writes, committed together."""

    events: list[StoredEvent] = field(default_factory=list)
    devices: dict[tuple[str, str], DeviceState] = field(default_factory=dict)
    alarms: list[Alarm] = field(default_factory=list)
    links: list[LinkChange] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    command_results: list[tuple[str, bool, str, float]] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.quarantined
            or self.events
            or self.devices
            or self.alarms
            or self.links
            or self.forwards
            or self.command_results
        )


class Store(abc.ABC):
    """The store interface; subclasses supply the connection and the placeholder style."""

    engine = "abstract"
    #: Errors meaning "this batch holds a value the store will not take", not "the store is
    #: down": the receiver then quarantines the message at fault instead of waiting.
    refused_errors: tuple[type[BaseException], ...] = (OverflowError, UnicodeError, ValueError)

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def refuses(self, exc: BaseException) -> bool:
        return isinstance(exc, self.refused_errors)

    # --- engine hooks ---
    @abc.abstractmethod
    def _cursor(self) -> Any: ...

    @abc.abstractmethod
    def _begin(self) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _rollback(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def reconnect(self) -> None:  # noqa: B027 - optional hook; SQLite has nothing to reopen
        """After a failed write: reopen the connection if the engine has one to lose."""

    def _sql(self, sql: str) -> str:
        return sql

    # --- helpers ---
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._begin()
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            self._commit()

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self._cursor()
        cur.execute(self._sql(sql), tuple(params))
        return int(cur.rowcount)

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self._cursor().executemany(self._sql(sql), rows)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            cur = self._cursor()
            cur.execute(self._sql(sql), tuple(params))
            return [tuple(r) for r in cur.fetchall()]

    def _before_migration(self) -> None:  # noqa: B027 - optional hook
        """Runs first inside the migration transaction (PostgreSQL serialises migrations here)."""

    def migrate(self) -> None:
        """Create the first schema if missing, then apply each later step not yet applied."""
        with self.transaction():
            self._before_migration()
            for statement in _SCHEMA:
                self._exec(statement)
            self._exec(
                "INSERT INTO meta (key, value) VALUES ('schema', '1') ON CONFLICT (key) DO NOTHING"
            )
            found = int(self._rows("SELECT value FROM meta WHERE key = 'schema'")[0][0])
            if found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"store schema {found} is newer than this receiver ({SCHEMA_VERSION})"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    self._exec(statement)
                self._exec("UPDATE meta SET value = ? WHERE key = 'schema'", (str(version),))

    def schema_version(self) -> int:
        return int(self._rows("SELECT value FROM meta WHERE key = 'schema'")[0][0])

    # --- the receiver's write path ---
    def known_ids(self, ids: Sequence[str]) -> set[str]:
        """The ids among ``ids`` already stored."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                r[0]
                for r in self._rows(
                    f"SELECT id FROM events WHERE id IN ({_marks(len(chunk))})",  # noqa: S608
                    chunk,
                )
            )
        return found

    def write(self, batch: Batch) -> None:
        """Commit one batch atomically. Duplicate event ids are skipped, never doubled."""
        if not batch:
            return
        with self.transaction():
            self._many(
                f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({_marks(12)})"  # noqa: S608
                " ON CONFLICT (id) DO NOTHING",
                (e.row() for e in batch.events),
            )
            updates = ", ".join(
                f"{c.strip()} = excluded.{c.strip()}" for c in _DEVICE_COLUMNS.split(",")[2:]
            )
            self._many(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_marks(_DEVICE_COLUMNS.count(',') + 1)})"  # noqa: S608
                f" ON CONFLICT (site, device) DO UPDATE SET {updates}",
                (d.row() for d in batch.devices.values()),
            )
            self._many(
                f"INSERT INTO alarms ({_ALARM_COLUMNS}) VALUES ({_marks(_ALARM_COLUMNS.count(',') + 1)})"  # noqa: S608
                " ON CONFLICT (id) DO NOTHING",
                (a.row() for a in batch.alarms),
            )
            self._many(
                "INSERT INTO links (site, device, at, up, reason) VALUES (?, ?, ?, ?, ?)",
                ((c.site, c.device, c.at, int(c.up), c.reason) for c in batch.links),
            )
            now = time.time()
            self._many(
                "INSERT INTO forwards (event_id, queued_at, attempts) VALUES (?, ?, 0)"
                " ON CONFLICT (event_id) DO NOTHING",
                ((i, now) for i in batch.forwards),
            )
            self._many(
                "UPDATE commands SET ok = ?, result = ?, result_at = ? WHERE id = ?",
                ((int(ok), result, at, cid) for cid, ok, result, at in batch.command_results),
            )
            for command_id, ok, result, at in batch.command_results:
                self._confirm(command_id, ok, result, at)
            self._many(
                "INSERT INTO quarantine (at, topic, site, device, reason, size, raw)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (q.row() for q in batch.quarantined),
            )

    def _confirm(self, command_id: str, ok: bool, result: str, at: float) -> None:
        """A device's answer to an alarm's command: confirmed, or refused with its error."""
        allowed = _CONFIRMED_FROM if ok else _REFUSED_FROM
        detail = None
        if not ok:
            error = json.loads(result).get("error")
            detail = str(error) if error else "no reason given"
        self._exec(
            "UPDATE alarms SET device_state = ?, device_detail = ?,"  # noqa: S608
            " device_confirmed_at = CASE WHEN ? = 1 THEN ? ELSE device_confirmed_at END"
            " WHERE id = (SELECT alarm_id FROM commands WHERE id = ?)"
            " AND device_command = (SELECT name FROM commands WHERE id = ?)"
            f" AND device_state IN ({_marks(len(allowed))})",
            (
                "confirmed" if ok else "refused",
                detail,
                int(ok),
                at,
                command_id,
                command_id,
                *allowed,
            ),
        )

    # --- reading ---
    def devices(self) -> list[DeviceState]:
        return [
            DeviceState.from_row(r)
            for r in self._rows(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY site, device")  # noqa: S608
        ]

    def events(
        self,
        *,
        site: str | None = None,
        device: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[StoredEvent]:
        where, params = self._filters(site=site, device=device, kind=kind)
        if since is not None:
            where.append("stored_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return [
            StoredEvent.from_row(r)
            for r in self._rows(
                f"SELECT {_EVENT_COLUMNS} FROM events {clause} ORDER BY stored_at, id LIMIT ?",  # noqa: S608
                [*params, limit],
            )
        ]

    def event(self, event_id: str) -> StoredEvent | None:
        rows = self._rows(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,))  # noqa: S608
        return StoredEvent.from_row(rows[0]) if rows else None

    def count_events(self, *, origin: str | None = None) -> int:
        if origin is None:
            return int(self._rows("SELECT count(*) FROM events")[0][0])
        return int(self._rows("SELECT count(*) FROM events WHERE origin = ?", (origin,))[0][0])

    @staticmethod
    def _filters(**values: str | None) -> tuple[list[str], list[Any]]:
        pairs = [(k, v) for k, v in values.items() if v is not None]
        return [f"{k} = ?" for k, _ in pairs], [v for _, v in pairs]

    # --- alarms ---
    def alarms(self, state: str | None = None, site: str | None = None) -> list[Alarm]:
        where, params = self._filters(state=state, site=site)
        return self._alarms_where(" AND ".join(where), params)

    def _alarms_where(self, condition: str, params: Sequence[Any] = ()) -> list[Alarm]:
        clause = f"WHERE {condition}" if condition else ""
        return [
            Alarm.from_row(r)
            for r in self._rows(
                f"SELECT {_ALARM_COLUMNS} FROM alarms {clause} ORDER BY raised_at, id",  # noqa: S608
                params,
            )
        ]

    def live_alarms(self, resolved_since: float) -> list[Alarm]:
        """What a console shows: open alarms, those whose device has not confirmed yet, and
        those resolved since ``resolved_since``."""
        return self._alarms_where(
            "state <> 'resolved' OR device_state = 'sent' OR resolved_at >= ?", (resolved_since,)
        )

    def alarm(self, alarm_id: str) -> Alarm | None:
        rows = self._rows(f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE id = ?", (alarm_id,))  # noqa: S608
        return Alarm.from_row(rows[0]) if rows else None

    def transition_alarm(
        self,
        alarm_id: str,
        to: str,
        who: str,
        note: str | None,
        audit: StoredEvent,
        *,
        device_command: str | None = None,
    ) -> bool:
        """Move an alarm on (to acknowledged or resolved), storing ``audit``. False: not allowed.

        ``device_command``: the command that must now reach the device; the alarm waits
        for its confirmation (``device_state = "sent"`` once :meth:`record_command` ran).
        """
        allowed = {"acknowledged": ("new",), "resolved": ("new", "acknowledged")}[to]
        column = "acknowledged" if to == "acknowledged" else "resolved"
        with self.transaction():
            changed = self._exec(
                f"UPDATE alarms SET state = ?, {column}_by = ?, {column}_at = ?,"  # noqa: S608
                " note = coalesce(?, note), device_command = ?, device_state = NULL,"
                " device_sent_at = NULL, device_last_sent_at = NULL, device_attempts = 0,"
                " device_detail = NULL, device_confirmed_at = NULL"
                f" WHERE id = ? AND state IN ({_marks(len(allowed))})",
                (to, who, audit.stored_at, note, device_command, alarm_id, *allowed),
            )
            if changed:
                self._exec(
                    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({_marks(12)})",  # noqa: S608
                    audit.row(),
                )
        return changed > 0

    # --- commands to devices ---
    def record_command(
        self,
        command_id: str,
        site: str,
        device: str,
        name: str,
        args: dict[str, Any],
        *,
        issued_at: float,
        alarm_id: str | None,
    ) -> None:
        with self.transaction():
            self._exec(
                "INSERT INTO commands (id, site, device, name, args, issued_at, alarm_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (command_id, site, device, name, json.dumps(args), issued_at, alarm_id),
            )
            if alarm_id is not None:  # one more attempt at the command the alarm waits for
                self._exec(
                    "UPDATE alarms SET device_state = 'sent',"
                    " device_sent_at = coalesce(device_sent_at, ?), device_last_sent_at = ?,"
                    " device_attempts = device_attempts + 1"
                    " WHERE id = ? AND device_command = ?"
                    " AND (device_state IS NULL OR device_state = 'sent')",
                    (issued_at, issued_at, alarm_id, name),
                )

    def awaiting_device(self) -> list[Alarm]:
        """Alarms whose ack/resolve the device has not confirmed yet (state ``sent``)."""
        return self._alarms_where("device_state = 'sent'")

    def device_unconfirmed(
        self, alarm_id: str, command: str, detail: str, audit: StoredEvent
    ) -> bool:
        """``command`` of the alarm got no confirmation in time: say so, with ``audit``."""
        with self.transaction():
            changed = self._exec(
                "UPDATE alarms SET device_state = 'unconfirmed', device_detail = ?"
                " WHERE id = ? AND device_command = ? AND device_state = 'sent'",
                (detail, alarm_id, command),
            )
            if changed:
                self._exec(
                    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({_marks(12)})",  # noqa: S608
                    audit.row(),
                )
        return changed > 0

    def command(self, command_id: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT id, site, device, name, args, issued_at, alarm_id, ok, result, result_at"
            " FROM commands WHERE id = ?",
            (command_id,),
        )
        if not rows:
            return None
        keys = (
            "id",
            "site",
            "device",
            "name",
            "args",
            "issued_at",
            "alarm_id",
            "ok",
            "result",
            "result_at",
        )
        return dict(zip(keys, rows[0], strict=True))

    # --- quarantine ---
    def quarantine_summary(self) -> list[QuarantineSummary]:
        """Per device: how many messages were kept aside, and the latest reason."""
        rows = self._rows(
            "SELECT q.site, q.device, count(*), max(q.at),"
            " (SELECT r.reason FROM quarantine r WHERE r.site IS NOT DISTINCT FROM q.site"
            "  AND r.device IS NOT DISTINCT FROM q.device ORDER BY r.at DESC LIMIT 1)"
            " FROM quarantine q GROUP BY q.site, q.device ORDER BY q.site, q.device"
        )
        return [QuarantineSummary(r[0], r[1], int(r[2]), float(r[3]), str(r[4])) for r in rows]

    def quarantined(self, limit: int = 100) -> list[Quarantined]:
        """The latest quarantined messages, newest first, with the raw bytes kept."""
        return [
            Quarantined(float(r[0]), r[1], r[2], r[3], r[4], base64.b64decode(r[5]))
            for r in self._rows(
                "SELECT at, topic, site, device, reason, raw FROM quarantine"
                " ORDER BY at DESC LIMIT ?",
                (limit,),
            )
        ]

    # --- DC-09 forwarding ---
    def pending_forwards(
        self, limit: int = 50, retry_before: float | None = None
    ) -> list[StoredEvent]:
        """Events queued for the alarm receiving centre and not yet ACKed by it, oldest first."""
        cutoff = time.time() if retry_before is None else retry_before
        columns = ", ".join(f"e.{c.strip()}" for c in _EVENT_COLUMNS.split(","))
        return [
            StoredEvent.from_row(r)
            for r in self._rows(
                f"SELECT {columns} FROM forwards f JOIN events e ON e.id = f.event_id"  # noqa: S608
                " WHERE f.sent_at IS NULL AND (f.attempts = 0 OR f.queued_at <= ?)"
                " ORDER BY e.priority = 'critical' DESC, f.queued_at, e.id LIMIT ?",
                (cutoff, limit),
            )
        ]

    def mark_forward(self, event_id: str, ok: bool, error: str = "", retry_at: float = 0.0) -> None:
        """Record an attempt. A failed one is retried when ``retry_at`` has passed."""
        with self.transaction():
            if ok:
                self._exec(
                    "UPDATE forwards SET sent_at = ?, attempts = attempts + 1, last_error = NULL"
                    " WHERE event_id = ?",
                    (time.time(), event_id),
                )
            else:
                self._exec(
                    "UPDATE forwards SET attempts = attempts + 1, last_error = ?, queued_at = ?"
                    " WHERE event_id = ?",
                    (error, retry_at, event_id),
                )

    def forward_state(self, event_id: str) -> tuple[float | None, int, str | None] | None:
        rows = self._rows(
            "SELECT sent_at, attempts, last_error FROM forwards WHERE event_id = ?", (event_id,)
        )
        return (rows[0][0], int(rows[0][1]), rows[0][2]) if rows else None

    # --- statistics inputs ---
    def transmission_samples(self, since: float) -> list[tuple[str, str, float, float]]:
        """(site, device, device event time, stored at) for device events stored since ``since``."""
        return [
            (r[0], r[1], float(r[2]), float(r[3]))
            for r in self._rows(
                "SELECT site, device, event_time, stored_at FROM events"
                " WHERE origin = 'device' AND stored_at >= ?"
                " ORDER BY site, device, stored_at",
                (since,),
            )
        ]

    def link_history(self) -> list[LinkChange]:
        return [
            LinkChange(r[0], r[1], float(r[2]), bool(r[3]), r[4])
            for r in self._rows(
                "SELECT site, device, at, up, reason FROM links ORDER BY site, device, at"
            )
        ]


class SQLiteStore(Store):
    """SQLite in WAL mode with full fsync on commit."""

    engine = "sqlite"
    refused_errors = (*Store.refused_errors, sqlite3.IntegrityError, sqlite3.DataError)

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self.migrate()

    def _cursor(self) -> sqlite3.Cursor:
        return self._conn.cursor()

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresStore(Store):
    """PostgreSQL through psycopg 3; ``schema`` keeps the tables apart from others."""

    engine = "postgresql"

    def __init__(self, url: str, schema: str = ""):
        import psycopg

        super().__init__()
        self._psycopg = psycopg
        self.refused_errors = (*Store.refused_errors, psycopg.DataError, psycopg.IntegrityError)
        self.url = url
        self.schema = schema
        self._conn = self._open()
        self.migrate()

    def _open(self) -> Any:
        conn = self._psycopg.connect(self.url, autocommit=True)
        if self.schema:
            conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def _before_migration(self) -> None:
        # Two processes creating the same tables at once collide in PostgreSQL's catalogue
        # ("IF NOT EXISTS" is not atomic): take a lock for the migration transaction.
        self._exec("SELECT pg_advisory_xact_lock(hashtext('wardpost.central.migrate'))")
        if self.schema:
            self._exec(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')

    def reconnect(self) -> None:
        with self._lock:
            if not self._conn.closed and not self._conn.broken:
                return
            try:
                self._conn = self._open()
            except self._psycopg.OperationalError as exc:
                raise ConnectionError(f"PostgreSQL unreachable: {exc}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _cursor(self) -> Any:
        return self._conn.cursor()

    def _begin(self) -> None:
        self._conn.execute("BEGIN")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_store(config: StoreConfig) -> Store:
    """The engine the URL names, migrated and ready."""
    if config.url.startswith("sqlite:///"):
        return SQLiteStore(config.url[len("sqlite:///") :])
    return PostgresStore(config.url, config.schema)
