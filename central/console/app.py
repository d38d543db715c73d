"""The web console: a Starlette application over the centre's store.

Pages are rendered on the server (Jinja2); a few lines of plain JavaScript
(``static/console.js``) keep the queue live over server-sent events, bind the
keyboard shortcuts and sound the escalation tone. Nothing is fetched from
outside the console (closed control-room networks).

Security: passwords are argon2id hashes; the session cookie is random, HttpOnly,
SameSite=Strict (and Secure under TLS) and only its SHA-256 is stored; every
POST must carry the session's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``); roles are operator < supervisor < admin. Every action is in
the append-only audit log with the operator's name, and commands to devices are
signed on the server by the centre's key with the operator's name in ``args.by``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import functools
import hmac
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.event import Priority
from central.alarms import AlarmDesk, AlarmError, Commander, recorder
from central.config import ReceiverConfig
from central.console import figures
from central.console.alarmview import ESCALATED, FACE_MATCH, AlarmView
from central.console.live import Live, fingerprints
from central.console.tables import ROLES, ConsoleTables, Session
from central.intake import centre_event
from central.stats import DAY
from central.store import Alarm, Batch, Store

log = logging.getLogger("wardpost.console")

HERE = Path(__file__).parent
SESSION_COOKIE = "wardpost_session"
LOGIN_COOKIE = "wardpost_login"
DEVICE_COMMANDS = ("ping", "test", "reload")
KEEPALIVE = 15.0

Handler = Callable[[Request, Session, FormData | None], Response]


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def clock(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d}"


def _local(path: str) -> str:
    """Only paths on this console may be redirect targets."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


class Console:
    """The console's state (store, desk, live updates, escalation) and its web application."""

    def __init__(
        self,
        config: ReceiverConfig,
        store: Store,
        commander: Commander | None,
        *,
        live_interval: float = 0.5,
    ):
        self.config = config
        self.settings = config.console
        self.store = store
        self.tables = ConsoleTables(store)
        self.view = AlarmView(store, self.tables)
        self.commander = commander
        self.desk = AlarmDesk(store, commander)
        self.hasher = PasswordHasher()
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
        self.live = Live(lambda: fingerprints(store), live_interval)
        self._stop = threading.Event()
        self._escalator = threading.Thread(
            target=self._escalate_loop, name="console-escalation", daemon=True
        )
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(),
            auto_reload=False,
        )
        self.templates.filters.update(when=when, clock=clock, age=age)
        self.templates.globals.update(title="Wardpost", roles=ROLES)
        self.app = self._build()
        if self.settings.escalation_forward and not self._forward_escalations():
            log.warning(
                "[console] escalation_forward is on but alarm.escalated will not reach the ARC:"
                ' it needs [dc09] enabled = true and a [dc09.map."alarm.escalated"] entry'
            )

    def _forward_escalations(self) -> bool:
        return (
            self.settings.escalation_forward
            and self.config.dc09.enabled
            and ESCALATED in self.config.dc09.map
        )

    # --- lifecycle ---
    def start(self) -> Console:
        self.live.start()
        self._escalator.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._escalator.join(timeout=5)
        self.live.stop()

    # --- operators ---
    def add_operator(self, name: str, role: str, password: str) -> None:
        if not name.strip() or len(name) > 64:
            raise ValueError("an operator name is 1-64 characters")
        if len(password) < 8:
            raise ValueError("a password has at least 8 characters")
        self.tables.add_operator(name.strip(), role, self.hasher.hash(password))

    def check_password(self, name: str, password: str) -> bool:
        operator = self.tables.operator(name)
        if operator is None or not operator.active:
            # Same work either way, so timing does not tell which names exist.
            with contextlib.suppress(VerificationError):
                self.hasher.verify(self._dummy_hash, password)
            return False
        try:
            self.hasher.verify(operator.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        if self.hasher.check_needs_rehash(operator.password_hash):
            self.tables.set_password_hash(name, self.hasher.hash(password))
        return True

    # --- escalation ---
    def _escalate_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                if self.escalate(time.time()):
                    self.live.wake()
            except Exception:
                log.exception("escalation check failed")

    def escalate(self, now: float) -> int:
        """Raise ``alarm.escalated`` for every alarm new for longer than ``escalate_after``."""
        count = 0
        forward = self._forward_escalations()
        for alarm_id in self.tables.due_for_escalation(now - self.settings.escalate_after):
            alarm = self.store.alarm(alarm_id)
            if alarm is None:
                continue
            event = centre_event(
                ESCALATED,
                alarm.site,
                alarm.device,
                Priority.CRITICAL,
                {
                    "alarm": alarm.id,
                    "kind": alarm.kind,
                    "unacknowledged_for": round(now - alarm.raised_at, 1),
                },
                now=now,
                test=alarm.test,
            )
            # One id per alarm: after a crash between the two writes, the retry stores nothing twice.
            event_id = f"esc-{alarm.id}"
            body = json.loads(event.body)
            body["id"] = event_id
            event = dataclasses.replace(
                event, id=event_id, body=json.dumps(body, separators=(",", ":"))
            )
            self.store.write(Batch(events=[event], forwards=[event_id] if forward else []))
            self.tables.record_escalation(alarm.id, event_id, now)
            log.warning(
                "%s/%s: alarm %s (%s) escalated", alarm.site, alarm.device, alarm.id, alarm.kind
            )
            count += 1
        return count

    # --- commands with the audit trail ---
    def _command(
        self,
        operator: str,
        site: str,
        device: str,
        name: str,
        *,
        alarm: Alarm | None = None,
        args: dict[str, Any] | None = None,
    ) -> None:
        """Send command ``name`` signed by the centre with ``args.by`` = the operator; audit it."""
        if self.commander is None:
            raise AlarmError("this console has no connection to the devices")
        args = args or {}
        command_args = {**args, "by": operator}
        alarm_id = alarm.id if alarm else None
        command_id = self.commander.send(
            site,
            device,
            name,
            command_args,
            record=recorder(self.store, site, device, name, command_args, alarm_id=alarm_id),
        )
        self.tables.audit(
            operator,
            f"command {name}",
            {"command": command_id, **args},
            alarm_id=alarm.id if alarm else None,
            site=site,
            device=device,
        )

    def act(self, operator: str, alarm_id: str, action: str, note: str) -> None:
        """One operator action on an alarm (and the repeats folded into it)."""
        alarm = self.store.alarm(alarm_id)
        if alarm is None:
            raise AlarmError(f"no alarm {alarm_id!r}")
        note = note.strip()
        folded = self.view.folded_with(alarm) if alarm.state != "resolved" else [alarm]
        if action == "acknowledge":
            moved = [a for a in folded if a.state == "new"]
            if not moved:
                raise AlarmError(f"alarm {alarm_id} is already {alarm.state}")
            for a in moved:
                self.desk.acknowledge(a.id, operator, note or None)
                self._audit_alarm(operator, "acknowledged", a, note)
        elif action == "resolve":
            if not note:
                raise AlarmError("say what happened: resolving needs a note")
            for a in folded:
                self.desk.resolve(a.id, operator, note)
                self._audit_alarm(operator, "resolved", a, note)
        elif action == "silence":
            self._command(
                operator, alarm.site, alarm.device, "silence", alarm=alarm, args={"alarm": alarm.id}
            )
        elif action == "note":
            if not note:
                raise AlarmError("the note is empty")
            self.tables.add_note(alarm.id, operator, note, time.time())
            self._audit_alarm(operator, "note", alarm, note)
        elif action == "face-confirm":
            self._face(alarm)
            self._audit_alarm(operator, "face confirmed", alarm, note)
            if alarm.state == "new":
                self.desk.acknowledge(alarm.id, operator, note or "match confirmed")
                self._audit_alarm(operator, "acknowledged", alarm, note or "match confirmed")
        elif action == "face-reject":
            self._face(alarm)
            self._command(
                operator,
                alarm.site,
                alarm.device,
                "face.reject",
                alarm=alarm,
                args={"event_id": alarm.id},
            )
            if alarm.state != "resolved":
                self.desk.resolve(alarm.id, operator, note or "not this person")
                self._audit_alarm(operator, "resolved", alarm, note or "not this person")
        else:
            raise AlarmError(f"unknown action {action!r}")
        self.live.wake()

    def _audit_alarm(self, operator: str, action: str, alarm: Alarm, note: str) -> None:
        self.tables.audit(
            operator,
            action,
            {"note": note},
            alarm_id=alarm.id,
            site=alarm.site,
            device=alarm.device,
        )

    @staticmethod
    def _face(alarm: Alarm) -> None:
        if alarm.kind != FACE_MATCH:
            raise AlarmError(f"alarm {alarm.id} is a {alarm.kind}, not a face match")

    # --- the web application ---
    def _build(self) -> Starlette:
        routes = [
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._guard("operator", self._logout), methods=["POST"]),
            Route("/", self._guard("operator", self._queue_page)),
            Route("/stream", self._stream),
            Route("/alarms/{alarm_id}", self._guard("operator", self._alarm_page)),
            Route("/alarms/{alarm_id}/crop.jpg", self._guard("operator", self._crop)),
            Route(
                "/alarms/{alarm_id}/{action}",
                self._guard("operator", self._alarm_action),
                methods=["POST"],
            ),
            Route("/devices", self._guard("operator", self._devices_page)),
            Route(
                "/devices/{site}/{device}/{command}",
                self._guard("supervisor", self._device_command),
                methods=["POST"],
            ),
            Route("/reports", self._guard("supervisor", self._reports_page)),
            Route("/reports/alarms.csv", self._guard("supervisor", self._alarms_csv)),
            Route("/reports/audit.csv", self._guard("supervisor", self._audit_csv)),
            Route("/audit", self._guard("supervisor", self._audit_page)),
            Route("/admin/operators", self._guard("admin", self._operators_page)),
            Route("/admin/operators", self._guard("admin", self._operator_save), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(routes=routes)

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(
            now=time.time(), settings=self.settings, **context
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def _session(self, request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        return self.tables.session(
            token,
            time.time(),
            self.settings.session_idle,
            self.settings.session_max,
            touch=request.headers.get("x-live") != "1",  # the page refreshing itself
        )

    def _guard(self, role: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Session, role and (for POST) CSRF checks before ``handler`` runs on a worker thread."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = await run_in_threadpool(self._session, request)
            wants_html = request.method == "GET" and "text/html" in request.headers.get(
                "accept", ""
            )
            if session is None:
                expired = SESSION_COOKIE in request.cookies
                if wants_html:
                    return RedirectResponse(
                        f"/login?{'expired=1&' if expired else ''}next={request.url.path}", 303
                    )
                return PlainTextResponse(
                    "session expired: log in again" if expired else "log in first", 401
                )
            if not session.operator.may(role):
                await run_in_threadpool(
                    self.tables.audit,
                    session.operator.name,
                    "refused",
                    {"path": request.url.path, "needs": role},
                )
                return self.render(
                    "error.html",
                    403,
                    session=session,
                    message=f"This page is for the {role} role and above; you are {session.operator.role}.",
                )
            form = None
            if request.method == "POST":
                form = await request.form()
                sent = request.headers.get("x-csrf-token") or str(form.get("csrf") or "")
                if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                    return PlainTextResponse("refused: the CSRF token is missing or wrong", 403)
            return await run_in_threadpool(handler, request, session, form)

        return endpoint

    # --- login ---
    async def _login_page(self, request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        response = self.render(
            "login.html",
            login_csrf=token,
            expired="expired" in request.query_params,
            next=_local(request.query_params.get("next", "/")),
            error="",
        )
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=self.settings.tls,
            path="/login",
        )
        return response

    async def _login(self, request: Request) -> Response:
        form = await request.form()
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        sent = str(form.get("csrf") or "")
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return PlainTextResponse(
                "refused: the login form's CSRF token is missing or wrong", 403
            )
        name, password = str(form.get("name") or "").strip(), str(form.get("password") or "")
        target = _local(str(form.get("next") or "/"))
        if not await run_in_threadpool(self.check_password, name, password):
            await run_in_threadpool(
                self.tables.audit,
                name or "?",
                "login failed",
                {"from": request.client.host if request.client else ""},
            )
            return self.render(
                "login.html",
                401,
                login_csrf=cookie,
                expired=False,
                next=target,
                error="Wrong name or password.",
            )
        token, _ = await run_in_threadpool(self.tables.open_session, name, time.time())
        await run_in_threadpool(
            self.tables.audit,
            name,
            "logged in",
            {"from": request.client.host if request.client else ""},
        )
        response = RedirectResponse(target, 303)
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="strict", secure=self.settings.tls
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    def _logout(self, request: Request, session: Session, form: FormData | None) -> Response:
        self.tables.close_session(request.cookies[SESSION_COOKIE])
        self.tables.audit(session.operator.name, "logged out")
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # --- alarms ---
    def _queue_context(self) -> dict[str, Any]:
        rows = self.view.queue()
        device_count, lost_count = self.store.query("SELECT count(*), sum(lost) FROM devices")[0]
        return {
            "rows": rows,
            "new_count": sum(1 for r in rows if r.state == "new"),
            "escalated_count": sum(1 for r in rows if r.escalated_at is not None),
            "lost_count": int(lost_count or 0),
            "device_count": int(device_count),
        }

    def _queue_page(self, request: Request, session: Session, form: FormData | None) -> Response:
        # The page refreshing itself gets only its live part: less to send and to parse.
        live = request.headers.get("x-live") == "1"
        return self.render(
            "_queue.html" if live else "queue.html",
            session=session,
            page="queue",
            **self._queue_context(),
        )

    def _alarm_page(self, request: Request, session: Session, form: FormData | None) -> Response:
        alarm = self.store.alarm(request.path_params["alarm_id"])
        if alarm is None:
            return self.render("error.html", 404, session=session, message="No such alarm.")
        now = time.time()
        event = self.view.event(alarm.id)
        payload = event.payload if event is not None else {}
        return self.render(
            "alarm.html",
            session=session,
            page="queue",
            alarm=alarm,
            payload={k: v for k, v in payload.items() if k != "crop_jpeg"},
            has_crop="crop_jpeg" in payload,
            face=alarm.kind == FACE_MATCH,
            plan=self.settings.action_plan(alarm.site, alarm.kind),
            timeline=self.view.timeline(alarm, now),
            folded=len(self.view.folded_with(alarm)) if alarm.state != "resolved" else 1,
            escalated=alarm.id in self.tables.escalated(),
        )

    def _crop(self, request: Request, session: Session, form: FormData | None) -> Response:
        event = self.view.event(request.path_params["alarm_id"])
        crop = event.payload.get("crop_jpeg") if event is not None else None
        if not isinstance(crop, str):
            return PlainTextResponse("this alarm has no face crop", 404)
        try:
            image = base64.b64decode(crop, validate=True)
        except binascii.Error:
            return PlainTextResponse("the device sent a crop that is not base64", 422)
        return Response(
            image, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    def _alarm_action(self, request: Request, session: Session, form: FormData | None) -> Response:
        assert form is not None
        alarm_id, action = request.path_params["alarm_id"], request.path_params["action"]
        fetch = request.headers.get("x-requested-with") == "fetch"
        try:
            self.act(session.operator.name, alarm_id, action, str(form.get("note") or ""))
        except AlarmError as exc:
            if fetch:
                return JSONResponse({"error": str(exc)}, 409)
            return self.render("error.html", 409, session=session, message=str(exc))
        if fetch:
            return JSONResponse({"ok": True})
        return RedirectResponse(_local(str(form.get("next") or f"/alarms/{alarm_id}")), 303)

    # --- devices ---
    def _devices_page(self, request: Request, session: Session, form: FormData | None) -> Response:
        return self.render(
            "devices.html",
            session=session,
            page="devices",
            sites=figures.device_rows(self.store, time.time()),
            commands=DEVICE_COMMANDS,
        )

    def _device_command(
        self, request: Request, session: Session, form: FormData | None
    ) -> Response:
        site, device, name = (request.path_params[k] for k in ("site", "device", "command"))
        known = {(d.site, d.device) for d in self.store.devices()}
        if name not in DEVICE_COMMANDS or (site, device) not in known:
            return self.render(
                "error.html",
                404,
                session=session,
                message=f"No command {name} for {site}/{device}.",
            )
        try:
            self._command(session.operator.name, site, device, name)
        except AlarmError as exc:
            return self.render("error.html", 409, session=session, message=str(exc))
        self.live.wake()
        return RedirectResponse("/devices", 303)

    # --- reports and audit ---
    def _days(self, request: Request) -> int:
        try:
            return max(1, min(366, int(request.query_params.get("days", "7"))))
        except ValueError:
            return 7

    def _reports_page(self, request: Request, session: Session, form: FormData | None) -> Response:
        days = self._days(request)
        report = figures.alarm_report(
            self.store, time.time(), days, self.settings.ack_target, self.settings.resolve_target
        )
        return self.render(
            "reports.html", session=session, page="reports", days=days, report=report
        )

    def _csv(self, name: str, header: list[str], rows: list[list[Any]]) -> Response:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    def _alarms_csv(self, request: Request, session: Session, form: FormData | None) -> Response:
        since = time.time() - self._days(request) * DAY
        self.tables.audit(session.operator.name, "exported alarms", {"days": self._days(request)})
        rows = [
            [
                a.id,
                a.site,
                a.device,
                a.kind,
                a.priority,
                a.state,
                when(a.raised_at),
                when(a.acknowledged_at),
                a.acknowledged_by or "",
                when(a.resolved_at),
                a.resolved_by or "",
                a.note or "",
                int(a.test),
            ]
            for a in self.store.alarms()
            if a.raised_at >= since
        ]
        return self._csv(
            "alarms.csv",
            [
                "id",
                "site",
                "device",
                "kind",
                "priority",
                "state",
                "raised",
                "acknowledged",
                "acknowledged_by",
                "resolved",
                "resolved_by",
                "note",
                "test",
            ],
            rows,
        )

    def _audit_csv(self, request: Request, session: Session, form: FormData | None) -> Response:
        since = time.time() - self._days(request) * DAY
        self.tables.audit(session.operator.name, "exported audit", {"days": self._days(request)})
        rows = [
            [
                e.id,
                when(e.at),
                e.operator,
                e.action,
                e.alarm_id or "",
                e.site or "",
                e.device or "",
                json.dumps(e.detail),
            ]
            for e in self.tables.audit_log(since=since, limit=1_000_000)
        ]
        return self._csv(
            "audit.csv",
            ["id", "at", "operator", "action", "alarm", "site", "device", "detail"],
            rows,
        )

    def _audit_page(self, request: Request, session: Session, form: FormData | None) -> Response:
        return self.render(
            "audit.html", session=session, page="audit", entries=self.tables.audit_log(limit=500)
        )

    # --- operators (admin) ---
    def _operators_page(
        self,
        request: Request,
        session: Session,
        form: FormData | None,
        error: str = "",
        status: int = 200,
    ) -> Response:
        return self.render(
            "operators.html",
            status,
            session=session,
            page="operators",
            operators=self.tables.operators(),
            error=error,
        )

    def _operator_save(self, request: Request, session: Session, form: FormData | None) -> Response:
        assert form is not None
        name, role = str(form.get("name") or "").strip(), str(form.get("role") or "operator")
        if form.get("disable"):
            self.tables.set_active(name, False)
            self.tables.audit(session.operator.name, "disabled operator", {"operator": name})
        else:
            try:
                self.add_operator(name, role, str(form.get("password") or ""))
            except ValueError as exc:
                return self._operators_page(request, session, form, str(exc), 400)
            self.tables.audit(
                session.operator.name, "saved operator", {"operator": name, "role": role}
            )
        return RedirectResponse("/admin/operators", 303)

    # --- live updates ---
    async def _stream(self, request: Request) -> Response:
        session = await run_in_threadpool(self._session, request)
        if session is None:
            return PlainTextResponse("session expired: log in again", 401)
        token = request.cookies[SESSION_COOKIE]
        return StreamingResponse(
            self._events(request, token),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _events(self, request: Request, token: str) -> AsyncIterator[str]:
        seen = dict(self.live.versions)
        yield f"event: hello\ndata: {json.dumps(seen)}\n\n"
        while not self.live.stopping:
            versions = await self.live.next_change(seen, KEEPALIVE)
            if await request.is_disconnected():
                return
            changed = [topic for topic, v in versions.items() if v != seen.get(topic)]
            seen = versions
            if not changed:
                # Each keep-alive is also a session check, so a stream never outlives its login.
                alive = await run_in_threadpool(
                    functools.partial(
                        self.tables.session,
                        token,
                        time.time(),
                        self.settings.session_idle,
                        self.settings.session_max,
                        touch=False,
                    )
                )
                if alive is None:
                    yield "event: logout\ndata: {}\n\n"
                    return
                yield ": keep-alive\n\n"
            for topic in changed:
                yield f"event: {topic}\ndata: {versions[topic]}\n\n"
