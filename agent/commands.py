"""One dispatcher for every command from the centre.

A command arrives on ``<prefix>/<site>/<device>/cmd/<name>`` as JSON::

    {"id": "c-42", "issued_at": 1763900000.5, "args": {"alarm": "0193..."}, "target": null}

The dispatcher parses and validates it, asks the :class:`Verifier` (signatures,
expiry, replay: see :mod:`agent.security`), then offers it to the handlers
registered for ``name`` — restricted to ``target`` when given. A handler returns a
result table, ``None`` for "not mine", or raises :class:`CommandError`. The outcome
is always published on ``cmd_result/<id>``; a malformed or failing command yields
an error result, never a crash. Every refusal (malformed, oversize, unverifiable)
is also reported to the centre as a ``security.command_rejected`` event: at most
``REJECTIONS_PER_WINDOW`` per ``REJECTION_WINDOW`` seconds, the rest counted and
reported as ``suppressed`` with the next one (or at the end of the window). Commands run on the dispatcher's own thread, in
arrival order, so a slow handler never stalls the MQTT network loop.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.driver import Command, CommandError, CommandHandler
from agent.event import utc_iso

log = logging.getLogger("wardpost.commands")

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_COMMAND_BYTES = 4 * 1024 * 1024  # watchlist updates carry embeddings or photos
INVALID_ID = "_invalid"
MAX_NESTING = 32  # levels of JSON arrays/objects in a command; watchlist updates need 4
REJECTIONS_PER_WINDOW = 10
REJECTION_WINDOW = 60.0  # seconds
_REASON_CHARS = 300  # a refusal's reason is cut here: it may quote what the sender sent


class CommandRejected(Exception):
    """The verifier refused a command (bad signature, expired, replayed)."""


class Verifier(Protocol):
    def verify(self, name: str, message: Mapping[str, Any], raw: bytes) -> None:
        """Raise :class:`CommandRejected` to refuse the command."""


class AcceptAll:
    """Used only when ``[commands] require_signature = false``: a lab setting."""

    def verify(self, name: str, message: Mapping[str, Any], raw: bytes) -> None:
        return None


class RejectAll:
    """Used when ``[commands] enabled = false``: the device takes no commands at all."""

    def verify(self, name: str, message: Mapping[str, Any], raw: bytes) -> None:
        raise CommandRejected("commands are disabled on this device ([commands] enabled = false)")


ResultPublisher = Callable[[str, Mapping[str, Any]], None]
SecurityReporter = Callable[[str, Mapping[str, Any]], None]


class Dispatcher:
    """Routes commands to handlers and publishes their results."""

    def __init__(
        self,
        verifier: Verifier,
        publish_result: ResultPublisher,
        report_rejection: SecurityReporter,
    ):
        self.verifier = verifier
        self.publish_result = publish_result
        self.rejections = RejectionReporter(report_rejection)
        self._handlers: dict[str, list[tuple[str, CommandHandler]]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self.counters = {
            "received": 0,
            "ok": 0,
            "failed": 0,
            "rejected": 0,
            "malformed": 0,
            "dropped": 0,
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def register(self, name: str, owner: str, handler: CommandHandler) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid command name {name!r}")
        with self._lock:
            self._handlers.setdefault(name, []).append((owner, handler))

    def unregister_owner(self, owner: str) -> None:
        with self._lock:
            for name in list(self._handlers):
                self._handlers[name] = [(o, h) for o, h in self._handlers[name] if o != owner]
                if not self._handlers[name]:
                    del self._handlers[name]

    def known(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    def submit(self, name: str, raw: bytes) -> None:
        """Queue a command (called from the MQTT thread; never blocks)."""
        self.counters["received"] += 1
        try:
            self._queue.put_nowait((name, raw))
        except queue.Full:
            self.counters["dropped"] += 1
            log.error("command queue full; dropped command %r", name)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self.rejections.flush()
                continue
            if item is None:
                self.rejections.flush()
                return
            name, raw = item
            try:
                self.handle(name, raw)
            except Exception:  # never let one command take the dispatcher down
                log.exception("unexpected error dispatching command %r", name)

    def handle(self, name: str, raw: bytes) -> Mapping[str, Any]:
        """Parse, verify, dispatch one command and publish its result; returns the result."""
        try:
            message = self._parse(name, raw)
            command_id = message["id"]
            command = Command(
                id=command_id,
                name=name,
                issued_at=float(message["issued_at"]),
                args=message.get("args") or {},
                target=message.get("target"),
            )
        except CommandError as exc:
            command_id = getattr(exc, "command_id", None)
            self.counters["malformed"] += 1
            self.rejections.report(name, command_id, f"malformed: {exc}")
            return self._finish(command_id or INVALID_ID, name, None, str(exc), [])
        try:
            self.verifier.verify(name, message, raw)
        except CommandRejected as exc:
            self.counters["rejected"] += 1
            self.rejections.report(name, command_id, str(exc))
            return self._finish(command_id, name, None, f"rejected: {exc}", [])
        return self._dispatch(command)

    def _parse(self, name: str, raw: bytes) -> dict[str, Any]:
        if not _NAME.match(name):
            raise CommandError(f"invalid command name {name[:64]!r}")
        if len(raw) > MAX_COMMAND_BYTES:
            raise CommandError(f"command too large ({len(raw)} bytes, limit {MAX_COMMAND_BYTES})")
        try:
            message = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit number
            raise CommandError(f"payload is not JSON: {exc}") from None
        depth = _nesting(message)
        if depth > MAX_NESTING:
            raise CommandError(f"payload nested {depth} levels deep (limit {MAX_NESTING})")
        if not isinstance(message, dict):
            raise CommandError("payload must be a JSON object")
        command_id = message.get("id")
        if not isinstance(command_id, str) or not _ID.match(command_id):
            raise CommandError(
                "'id' must be 1-128 characters of letters, digits, '.', '_', ':' or '-'"
            )
        issued = message.get("issued_at")
        if (
            not isinstance(issued, (int, float))
            or isinstance(issued, bool)
            or not 0 <= issued < 2**40  # also keeps float() below from overflowing
            or not math.isfinite(issued)
        ):
            raise _WithId(command_id, "'issued_at' must be a Unix time in seconds")
        args = message.get("args", {})
        if args is not None and not isinstance(args, dict):
            raise _WithId(command_id, "'args' must be an object")
        target = message.get("target")
        if target is not None and not isinstance(target, str):
            raise _WithId(command_id, "'target' must be a driver name or null")
        return message

    def _dispatch(self, command: Command) -> Mapping[str, Any]:
        with self._lock:
            handlers = list(self._handlers.get(command.name, []))
        if not handlers:
            known = ", ".join(self.known()) or "none"
            return self._finish(
                command.id,
                command.name,
                None,
                f"unknown command {command.name!r} (known: {known})",
                [],
            )
        if command.target is not None:
            handlers = [(o, h) for o, h in handlers if o == command.target]
            if not handlers:
                return self._finish(
                    command.id,
                    command.name,
                    None,
                    f"no handler for {command.name!r} on target {command.target!r}",
                    [],
                )
        results: dict[str, Any] = {}
        errors: list[str] = []
        handled_by: list[str] = []
        for owner, handler in handlers:
            try:
                result = handler(command)
            except CommandError as exc:
                errors.append(f"{owner}: {exc}")
                handled_by.append(owner)
                continue
            except Exception as exc:
                log.exception("command %r failed in %s", command.name, owner)
                errors.append(f"{owner}: internal error ({type(exc).__name__})")
                handled_by.append(owner)
                continue
            if result is not None:
                results[owner] = dict(result)
                handled_by.append(owner)
        if not handled_by:
            return self._finish(
                command.id, command.name, None, "no driver recognised this command's arguments", []
            )
        result_body = results[handled_by[0]] if len(results) == 1 and not errors else results
        return self._finish(
            command.id, command.name, result_body or None, "; ".join(errors) or None, handled_by
        )

    def _finish(
        self, command_id: str, name: str, result: Any, error: str | None, handled_by: list[str]
    ) -> Mapping[str, Any]:
        ok = error is None
        self.counters["ok" if ok else "failed"] += 1
        body = {
            "id": command_id,
            "name": name,
            "ok": ok,
            "result": result,
            "error": error,
            "handled_by": handled_by,
            "time": utc_iso(time.time()),
        }
        if not ok:
            log.info("command %s %r failed: %s", command_id, name, error)
        self.publish_result(command_id, body)
        return body


def _nesting(document: Any) -> int:
    """The deepest nesting of arrays and objects in a parsed JSON document, walked without
    recursion (code after the parser, signing included, recurses into it)."""
    deepest = 0
    stack = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class RejectionReporter:
    """Reports refused commands as ``security.command_rejected`` events, rate-limited.

    Up to ``REJECTIONS_PER_WINDOW`` per window are reported one by one; later ones in
    the window are counted, and the count goes out as ``suppressed`` with the next
    report, or by :meth:`flush` once the window is over. Each refusal is logged as one
    line (repeats folded by the log's own rate limit), never with a traceback."""

    def __init__(self, report: SecurityReporter, clock: Callable[[], float] = time.monotonic):
        self._report = report
        self._clock = clock
        self._window_start = -math.inf
        self._in_window = 0
        self.suppressed = 0

    def report(self, name: str, command_id: str | None, reason: str) -> None:
        reason = reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS] + "…"
        log.warning("refused command %s %r: %s", command_id or "(no id)", name[:64], reason)
        now = self._clock()
        if now - self._window_start >= REJECTION_WINDOW:
            self._window_start, self._in_window = now, 0
        if self._in_window >= REJECTIONS_PER_WINDOW:
            self.suppressed += 1
            return
        self._in_window += 1
        self._emit({"command": name[:64], "id": command_id, "reason": reason})

    def flush(self) -> None:
        """Report the count suppressed in a window that is over."""
        if self.suppressed and self._clock() - self._window_start >= REJECTION_WINDOW:
            self._window_start, self._in_window = self._clock(), 1
            self._emit({"command": None, "id": None, "reason": "suppressed refusals"})

    def _emit(self, payload: dict[str, Any]) -> None:
        payload["suppressed"], self.suppressed = self.suppressed, 0
        self._report("security.command_rejected", payload)


class _WithId(CommandError):
    """A parse error found after the id was read, so the result can go to ``cmd_result/<id>``."""

    def __init__(self, command_id: str, message: str):
        super().__init__(message)
        self.command_id = command_id
