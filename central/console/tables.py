"""The console's own tables in the centre's store: operators, sessions, audit, notes, escalations.

They live beside the receiver's tables (same database, same engine) with their own
schema version (``meta.console_schema``), so the receiver's schema is untouched.
The audit log is append-only: there is no method to change it, and the database
refuses UPDATE and DELETE on it (a trigger on either engine).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from agent.event import uuid7
from central.store import Store

CONSOLE_SCHEMA_VERSION = 1
ROLES = ("operator", "supervisor", "admin")
#: Seconds between writes of a session's last activity.
TOUCH_EVERY = 5.0

_TABLES = (
    """CREATE TABLE IF NOT EXISTS console_operators (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, active INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS console_sessions (
        token_hash TEXT PRIMARY KEY, operator TEXT NOT NULL, csrf TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS console_audit (
        id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, operator TEXT NOT NULL,
        action TEXT NOT NULL, alarm_id TEXT, site TEXT, device TEXT, detail TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS console_audit_by_time ON console_audit (at)""",
    """CREATE INDEX IF NOT EXISTS console_audit_by_alarm ON console_audit (alarm_id)""",
    """CREATE TABLE IF NOT EXISTS console_notes (
        id TEXT PRIMARY KEY, alarm_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
        operator TEXT NOT NULL, text TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS console_notes_by_alarm ON console_notes (alarm_id)""",
    """CREATE TABLE IF NOT EXISTS console_escalations (
        alarm_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, event_id TEXT NOT NULL)""",
)

_APPEND_ONLY = {
    "sqlite": (
        """CREATE TRIGGER IF NOT EXISTS console_audit_no_update BEFORE UPDATE ON console_audit
           BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TRIGGER IF NOT EXISTS console_audit_no_delete BEFORE DELETE ON console_audit
           BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    ),
    "postgresql": (
        """CREATE OR REPLACE FUNCTION console_audit_append_only() RETURNS trigger
           LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$""",
        """DROP TRIGGER IF EXISTS console_audit_append_only ON console_audit""",
        """CREATE TRIGGER console_audit_append_only BEFORE UPDATE OR DELETE ON console_audit
           FOR EACH ROW EXECUTE FUNCTION console_audit_append_only()""",
    ),
}


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    role: str
    password_hash: str
    created_at: float
    active: bool

    def may(self, role: str) -> bool:
        """True if this operator's role is ``role`` or above (operator < supervisor < admin)."""
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True, slots=True)
class Session:
    operator: Operator
    csrf: str
    created_at: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    at: float
    operator: str
    action: str
    alarm_id: str | None
    site: str | None
    device: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Note:
    alarm_id: str
    at: float
    operator: str
    text: str


def _token_hash(token: str) -> str:
    # The cookie holds the token; the store only its hash, so a copy of the database logs no one in.
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleTables:
    """Reads and writes the console's tables through a :class:`~central.store.Store`."""

    def __init__(self, store: Store):
        self.store = store
        self.migrate()

    def migrate(self) -> None:
        with self.store.transaction():
            for statement in (*_TABLES, *_APPEND_ONLY[self.store.engine]):
                self.store.execute(statement)
            self.store.execute(
                "INSERT INTO meta (key, value) VALUES ('console_schema', ?)"
                " ON CONFLICT (key) DO NOTHING",
                (str(CONSOLE_SCHEMA_VERSION),),
            )
        found = int(self.store.query("SELECT value FROM meta WHERE key = 'console_schema'")[0][0])
        if found > CONSOLE_SCHEMA_VERSION:
            raise RuntimeError(
                f"console schema {found} is newer than this console ({CONSOLE_SCHEMA_VERSION})"
            )

    # --- operators ---
    def add_operator(self, name: str, role: str, password_hash: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO console_operators (name, role, password_hash, created_at, active)"
                " VALUES (?, ?, ?, ?, 1) ON CONFLICT (name) DO UPDATE SET role = excluded.role,"
                " password_hash = excluded.password_hash, active = 1",
                (name, role, password_hash, time.time()),
            )

    def set_active(self, name: str, active: bool) -> bool:
        with self.store.transaction():
            changed = self.store.execute(
                "UPDATE console_operators SET active = ? WHERE name = ?", (int(active), name)
            )
            if not active:
                self.store.execute("DELETE FROM console_sessions WHERE operator = ?", (name,))
        return changed > 0

    def set_password_hash(self, name: str, password_hash: str) -> None:
        with self.store.transaction():
            self.store.execute(
                "UPDATE console_operators SET password_hash = ? WHERE name = ?",
                (password_hash, name),
            )

    def operator(self, name: str) -> Operator | None:
        rows = self.store.query(
            "SELECT name, role, password_hash, created_at, active FROM console_operators"
            " WHERE name = ?",
            (name,),
        )
        if not rows:
            return None
        name_, role, password_hash, created_at, active = rows[0]
        return Operator(name_, role, password_hash, created_at, bool(active))

    def operators(self) -> list[Operator]:
        return [
            Operator(r[0], r[1], r[2], r[3], bool(r[4]))
            for r in self.store.query(
                "SELECT name, role, password_hash, created_at, active FROM console_operators"
                " ORDER BY name"
            )
        ]

    # --- sessions ---
    def open_session(self, operator: str, now: float) -> tuple[str, str]:
        """A new session: (cookie token, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO console_sessions (token_hash, operator, csrf, created_at, last_seen)"
                " VALUES (?, ?, ?, ?, ?)",
                (_token_hash(token), operator, csrf, now, now),
            )
        return token, csrf

    def session(
        self, token: str, now: float, idle: float, longest: float, *, touch: bool = True
    ) -> Session | None:
        """The live session for ``token``, or None; expired ones are removed.

        ``touch``: the operator did something (a page, an action), so the idle time restarts;
        automatic refreshes do not touch, so an unattended screen still logs out.
        """
        key = _token_hash(token)
        rows = self.store.query(
            "SELECT s.operator, s.csrf, s.created_at, s.last_seen, o.role, o.password_hash,"
            " o.created_at, o.active FROM console_sessions s"
            " JOIN console_operators o ON o.name = s.operator WHERE s.token_hash = ?",
            (key,),
        )
        if not rows:
            return None
        name, csrf, created, seen, role, password_hash, op_created, active = rows[0]
        if not active or now - seen > idle or now - created > longest:
            self.close_session(token)
            return None
        # No write per click: the idle clock only needs to be about right.
        if not touch or now - seen < min(TOUCH_EVERY, idle / 10):
            return Session(
                Operator(name, role, password_hash, op_created, True), csrf, created, seen
            )
        with self.store.transaction():
            self.store.execute(
                "UPDATE console_sessions SET last_seen = ? WHERE token_hash = ?", (now, key)
            )
        return Session(Operator(name, role, password_hash, op_created, True), csrf, created, now)

    def close_session(self, token: str) -> None:
        with self.store.transaction():
            self.store.execute(
                "DELETE FROM console_sessions WHERE token_hash = ?", (_token_hash(token),)
            )

    # --- audit ---
    def audit(
        self,
        operator: str,
        action: str,
        detail: dict[str, Any] | None = None,
        *,
        alarm_id: str | None = None,
        site: str | None = None,
        device: str | None = None,
        now: float | None = None,
    ) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO console_audit (id, at, operator, action, alarm_id, site, device,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uuid7(),
                    time.time() if now is None else now,
                    operator,
                    action,
                    alarm_id,
                    site,
                    device,
                    json.dumps(detail or {}, separators=(",", ":")),
                ),
            )

    def audit_log(
        self, *, alarm_id: str | None = None, since: float = 0.0, limit: int = 500
    ) -> list[AuditEntry]:
        where: list[str] = ["at >= ?"]
        params: list[Any] = [since]
        if alarm_id is not None:
            where.append("alarm_id = ?")
            params.append(alarm_id)
        rows = self.store.query(
            "SELECT id, at, operator, action, alarm_id, site, device, detail FROM console_audit"  # noqa: S608
            f" WHERE {' AND '.join(where)} ORDER BY at DESC, id DESC LIMIT ?",
            [*params, limit],
        )
        return [
            AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows
        ]

    # --- notes ---
    def add_note(self, alarm_id: str, operator: str, text: str, now: float) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO console_notes (id, alarm_id, at, operator, text)"
                " VALUES (?, ?, ?, ?, ?)",
                (uuid7(), alarm_id, now, operator, text),
            )

    def notes(self, alarm_id: str) -> list[Note]:
        return [
            Note(*r)
            for r in self.store.query(
                "SELECT alarm_id, at, operator, text FROM console_notes WHERE alarm_id = ?"
                " ORDER BY at, id",
                (alarm_id,),
            )
        ]

    # --- escalations ---
    def escalated(self) -> dict[str, float]:
        """alarm id -> when it escalated, for alarms still open."""
        return {
            r[0]: float(r[1])
            for r in self.store.query(
                "SELECT e.alarm_id, e.at FROM console_escalations e"
                " JOIN alarms a ON a.id = e.alarm_id WHERE a.state <> 'resolved'"
            )
        }

    def due_for_escalation(self, before: float) -> list[str]:
        """New alarms raised before ``before`` that have not escalated yet."""
        return [
            r[0]
            for r in self.store.query(
                "SELECT a.id FROM alarms a LEFT JOIN console_escalations e ON e.alarm_id = a.id"
                " WHERE a.state = 'new' AND a.raised_at < ? AND e.alarm_id IS NULL"
                " ORDER BY a.raised_at",
                (before,),
            )
        ]

    def record_escalation(self, alarm_id: str, event_id: str, now: float) -> None:
        with self.store.transaction():
            self.store.execute(
                "INSERT INTO console_escalations (alarm_id, at, event_id) VALUES (?, ?, ?)"
                " ON CONFLICT (alarm_id) DO NOTHING",
                (alarm_id, now, event_id),
            )
