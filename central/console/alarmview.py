"""What the console shows about alarms: the folded queue, one alarm's timeline.

Repeats fold: open alarms with the same site, device and kind are one row, the
oldest first, with a count; acting on the row acts on every alarm in it.
A row's device confirmation comes from the ``commands`` table (``ack``,
``resolve``, ``silence`` sent for the alarm, and the device's ``cmd_result``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from central.console.tables import ConsoleTables
from central.store import Alarm, Store, StoredEvent

PRIORITY_RANK = {"critical": 0, "high": 1, "normal": 2, "low": 3}
FACE_MATCH = "face.watchlist_match"
ESCALATED = "alarm.escalated"

_ALARM_FIELDS = [f.name for f in dataclasses.fields(Alarm)]
_ALARM_COLUMNS = ", ".join(f"a.{name}" for name in _ALARM_FIELDS)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """One command sent for an alarm and what the device answered (``ok`` None: no answer yet)."""

    name: str
    issued_at: float
    ok: bool | None
    result_at: float | None
    result: dict[str, Any]

    @property
    def state(self) -> str:
        """sent, confirmed or refused (the words of ``Alarm.device_state``)."""
        if self.ok is None:
            return "sent"
        return "confirmed" if self.ok else "refused"

    @property
    def label(self) -> str:
        return {"sent": "sent", "confirmed": "confirmed by device", "refused": "refused by device"}[
            self.state
        ]


@dataclass
class QueueRow:
    """One line of the queue: an open alarm and the repeats folded into it."""

    alarm: Alarm
    summary: str
    members: list[str] = field(default_factory=list)
    last_raised: float = 0.0
    state: str = "new"
    confirmations: dict[str, Confirmation] = field(default_factory=dict)
    escalated_at: float | None = None

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def version(self) -> str:
        """Changes whenever the row would render differently (the page keeps unchanged rows)."""
        a = self.alarm
        commands = ",".join(f"{n}:{c.state}" for n, c in sorted(self.confirmations.items()))
        return (
            f"{self.state}|{self.count}|{self.escalated_at is not None}|{a.acknowledged_by}"
            f"|{a.device_state}:{a.device_attempts}|{commands}"
        )

    @property
    def sort_key(self) -> tuple[int, int, float]:
        return (
            0 if self.state == "new" else 1,
            PRIORITY_RANK.get(self.alarm.priority, 9),
            self.alarm.raised_at,
        )


def summary(kind: str, payload: dict[str, Any]) -> str:
    """A few words saying where or what: location, threat class, person."""
    if kind == FACE_MATCH:
        return f"{payload.get('name', '?')} ({payload.get('list', '?')})"
    parts = [
        f"zone {payload[key]}" if key == "zone" else str(payload[key])
        for key in ("location", "place", "zone", "threat", "class", "camera", "reason")
        if key in payload and payload[key] not in (None, "")
    ]
    return " · ".join(parts[:3])


def _payload(body: str | None) -> dict[str, Any]:
    if not body:
        return {}
    payload = json.loads(body).get("payload")
    return payload if isinstance(payload, dict) else {}


class AlarmView:
    """Queries for the queue and the detail page, a few per page whatever the number of alarms."""

    def __init__(self, store: Store, tables: ConsoleTables):
        self.store = store
        self.tables = tables

    def queue(self) -> list[QueueRow]:
        rows = self.store.query(
            f"SELECT {_ALARM_COLUMNS}, e.body FROM alarms a LEFT JOIN events e ON e.id = a.id"  # noqa: S608
            " WHERE a.state <> 'resolved' ORDER BY a.raised_at, a.id"
        )
        folds: dict[tuple[str, str, str], QueueRow] = {}
        width = len(_ALARM_FIELDS)
        for r in rows:
            alarm = Alarm.from_row(r[:width])
            key = (alarm.site, alarm.device, alarm.kind)
            row = folds.get(key)
            if row is None:
                row = folds[key] = QueueRow(alarm, summary(alarm.kind, _payload(r[width])))
                row.state = alarm.state
            row.members.append(alarm.id)
            row.last_raised = alarm.raised_at
            if alarm.state == "new":
                row.state = "new"
        by_member = {m: row for row in folds.values() for m in row.members}
        for alarm_id, confirmation in self._confirmations(list(by_member)):
            by_member[alarm_id].confirmations[confirmation.name] = confirmation
        for alarm_id, at in self.tables.escalated().items():
            row = by_member.get(alarm_id)
            if row is not None and row.state == "new":
                row.escalated_at = min(at, row.escalated_at or at)
        return sorted(folds.values(), key=lambda row: row.sort_key)

    def _confirmations(self, alarm_ids: Sequence[str]) -> list[tuple[str, Confirmation]]:
        """The latest command of each name per alarm, oldest first (so later ones win)."""
        if not alarm_ids:
            return []
        wanted = set(alarm_ids)
        return [
            (
                r[0],
                Confirmation(
                    r[1],
                    float(r[2]),
                    None if r[3] is None else bool(r[3]),
                    r[4],
                    json.loads(r[5] or "{}"),
                ),
            )
            for r in self.store.query(
                "SELECT c.alarm_id, c.name, c.issued_at, c.ok, c.result_at, c.result"
                " FROM commands c JOIN alarms a ON a.id = c.alarm_id"
                " WHERE a.state <> 'resolved' OR c.issued_at > a.resolved_at - 1"
                " ORDER BY c.issued_at"
            )
            if r[0] in wanted
        ]

    def folded_with(self, alarm: Alarm) -> list[Alarm]:
        """The open alarms folded into the same queue row as ``alarm`` (itself included)."""
        folded = [
            Alarm.from_row(r)
            for r in self.store.query(
                f"SELECT {_ALARM_COLUMNS} FROM alarms a WHERE a.site = ? AND a.device = ?"  # noqa: S608
                " AND a.kind = ? AND a.state <> 'resolved' ORDER BY a.raised_at, a.id",
                (alarm.site, alarm.device, alarm.kind),
            )
        ]
        return folded or [alarm]

    def event(self, event_id: str) -> StoredEvent | None:
        found = self.store.query(
            "SELECT id, site, device, source, kind, priority, seq, test, event_time, stored_at,"
            " origin, body FROM events WHERE id = ?",
            (event_id,),
        )
        return StoredEvent.from_row(found[0]) if found else None

    def timeline(self, alarm: Alarm, now: float) -> list[dict[str, Any]]:
        """Everything that happened to the alarm, oldest first: ``{"at", "what", "who", "text"}``."""
        entries: list[dict[str, Any]] = []
        end = alarm.resolved_at if alarm.resolved_at is not None else now
        for event in self.store.events(
            site=alarm.site, device=alarm.device, since=alarm.raised_at - 1, limit=200
        ):
            if event.stored_at > end + 1 or event.kind in ("alarm.acknowledged", "alarm.resolved"):
                continue  # the audit log says the same with the operator's words
            if event.kind == ESCALATED and event.payload.get("alarm") != alarm.id:
                continue
            own = event.id == alarm.id
            entries.append(
                {
                    "at": event.stored_at,
                    "what": "raised"
                    if own
                    else f"{'repeat' if event.kind == alarm.kind else 'event'}: {event.kind}",
                    "who": f"{event.site}/{event.device}" if event.origin == "device" else "centre",
                    "text": summary(event.kind, event.payload),
                    "class": "raised" if own else "event",
                }
            )
        for _, c in self._confirmations([alarm.id]):
            entries.append(
                {
                    "at": c.issued_at,
                    "what": f"command {c.name} sent",
                    "who": "centre",
                    "text": "",
                    "class": "command",
                }
            )
            if c.result_at is not None:
                error = c.result.get("error") or ""
                entries.append(
                    {
                        "at": c.result_at,
                        "what": f"{c.name} {c.label}",
                        "who": f"{alarm.site}/{alarm.device}",
                        "text": str(error),
                        "class": "confirmed" if c.ok else "refused",
                    }
                )
        for entry in self.tables.audit_log(alarm_id=alarm.id):
            text = entry.detail.get("note") or ""
            entries.append(
                {
                    "at": entry.at,
                    "what": entry.action,
                    "who": entry.operator,
                    "text": text,
                    "class": "operator",
                }
            )
        for note in self.tables.notes(alarm.id):
            entries.append(
                {
                    "at": note.at,
                    "what": "note",
                    "who": note.operator,
                    "text": note.text,
                    "class": "note",
                }
            )
        forward = self.store.forward_state(alarm.id)
        if forward is not None:
            sent_at, attempts, error = forward
            entries.append(
                {
                    "at": sent_at or alarm.raised_at,
                    "what": "DC-09 forward "
                    + ("acknowledged by the ARC" if sent_at else "pending"),
                    "who": "bridge",
                    "text": f"{attempts} attempt(s) {error or ''}".strip(),
                    "class": "forward",
                }
            )
        entries.sort(key=lambda e: e["at"])
        return entries
