"""Logging for a daemon that runs for years: readable, level-preserving, bounded, secret-free.

:func:`setup_logging` installs one handler on the root logger that writes

* under journald (``$JOURNAL_STREAM`` names our stream) ``<4>wardpost.driver.gate1: port
  vanished``: the ``<N>`` syslog priority prefix lets journald keep the level, and
  journald adds the time itself;
* otherwise ``2025-01-31T12:00:00.123Z WARNING wardpost.driver.gate1: port vanished``.

Structured fields travel as ``extra=fields(kind="panic.pressed", id=...)`` and are
appended as ``key=value`` pairs, so a line stays one grep-able line.

Two filters sit on the handler, so every record passes them whatever logger it
came from:

* :class:`RedactSecrets` replaces every value given to :func:`register_secret`
  and ``password=...``/``token: ...``/``key=...`` style assignments with ``***``,
  in the message, the traceback and the fields;
* :class:`RepeatLimiter` lets at most ``limit`` identical messages per ``window``
  seconds through, then writes one ``suppressed K repeats`` line when the window
  ends (on the next log line or :func:`flush_repeats`), so a chattering serial
  port cannot wear out the SD card or bury the line that matters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

#: Python level -> syslog priority (RFC 5424): crit, err, warning, info, debug.
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

REDACTED = "***"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_FIELDS_ATTR = "wardpost_fields"
_REPEAT_KEY_ATTR = "repeat_key"
_SUMMARY_ATTR = "wardpost_repeat_summary"


def fields(**values: object) -> dict[str, Any]:
    """Structured fields for one log call: ``log.info("queued", extra=fields(kind=k))``."""
    return {_FIELDS_ATTR: values}


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a Python level (custom levels round down to the next known)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.DEBUG]


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream named by ``$JOURNAL_STREAM`` (``dev:inode``).

    A stream without a file descriptor (tests) counts as the journal when the variable is set.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


# ------------------------------------------------------------------ redaction

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

_SENSITIVE_NAME = r"[\w.-]*?(?:password|passwd|passphrase|pwd|secret|token|psk|credentials?|key)"
_ASSIGNMENT = re.compile(
    rf"""(?ix)
    (?P<name>\b{_SENSITIVE_NAME}\b["']?)       # password, mqtt.password, api_key, "token"
    (?P<sep>\s*[=:]\s*)
    (?P<value>"[^"]*"|'[^']*'|[^\s,;&)}}\]]+)
    """
)
_URL_CREDENTIALS = re.compile(r"(?P<head>://[^:/\s@]+:)[^@/\s]+@")
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)[\w.~+/=-]+")


def register_secret(value: str) -> None:
    """Never let ``value`` reach the log (MQTT password, HMAC key...). Ignores empty values."""
    if value:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets and ``password=``-style values replaced by ``***``."""
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
    for secret in known:
        text = text.replace(secret, REDACTED)
    text = _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}{REDACTED}@", text)
    return _BEARER.sub(lambda m: f"{m['head']}{REDACTED}", text)


def _is_secret_name(name: str) -> bool:
    return re.fullmatch(_SENSITIVE_NAME, name, re.IGNORECASE) is not None


class RedactSecrets(logging.Filter):
    """Rewrites each record so no secret survives: message, traceback and fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(message_of(record))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        values = getattr(record, _FIELDS_ATTR, None)
        if isinstance(values, Mapping):
            setattr(record, _FIELDS_ATTR, _redact_value(values))
        return True


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _is_secret_name(str(k)) else _redact_value(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


def message_of(record: logging.LogRecord) -> str:
    """``record.getMessage()``, but a bad format call is logged instead of raising."""
    try:
        return record.getMessage()
    except Exception as exc:  # a logging call must never crash the agent
        return f"{record.msg!r} % {record.args!r} (bad log call: {type(exc).__name__}: {exc})"


# ------------------------------------------------------------ repeat limiting


@dataclass
class _Window:
    started: float
    passed: int
    suppressed: int
    sample: logging.LogRecord


class RepeatLimiter(logging.Filter):
    """At most ``limit`` identical messages per ``window`` seconds, then one summary line.

    Records are identical when logger, level and final message text match; pass
    ``extra={"repeat_key": "..."}`` to group messages whose text varies (garbage
    bytes from one serial port). Records at ``exempt_level`` and above always pass.
    Summaries go to ``emit`` (the handler's ``handle``). At most ``max_keys``
    windows are tracked; the oldest is closed early when more arrive.
    """

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        limit: int = 10,
        window: float = 60.0,
        *,
        exempt_level: int = logging.CRITICAL,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if limit < 1 or window <= 0:
            raise ValueError("repeat limit must be at least 1 and the window positive")
        self.limit = limit
        self.window = window
        self.exempt_level = exempt_level
        self.max_keys = max_keys
        self._emit = emit
        self._clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY_ATTR, False):
            return True
        now = self._clock()
        with self._lock:
            closed = self._close_expired(now)
            allowed = record.levelno >= self.exempt_level or self._admit(record, now, closed)
        for window in closed:
            self._emit(self._summary(window))
        return allowed

    def flush(self) -> None:
        """Write the summaries of windows that have ended (call it from a periodic tick)."""
        with self._lock:
            closed = self._close_expired(self._clock())
        for window in closed:
            self._emit(self._summary(window))

    def _admit(self, record: logging.LogRecord, now: float, closed: list[_Window]) -> bool:
        key = (
            record.name,
            record.levelno,
            str(getattr(record, _REPEAT_KEY_ATTR, message_of(record))),
        )
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(now, 1, 0, record)
            while len(self._windows) > self.max_keys:
                oldest = self._windows.popitem(last=False)[1]
                if oldest.suppressed:
                    closed.append(oldest)
            return True
        if window.passed < self.limit:
            window.passed += 1
            return True
        window.suppressed += 1
        return False

    def _close_expired(self, now: float) -> list[_Window]:
        # Windows sit in the order they opened, so expired ones are at the front.
        closed = []
        while self._windows:
            window = next(iter(self._windows.values()))
            if now - window.started < self.window:
                break
            self._windows.popitem(last=False)
            if window.suppressed:
                closed.append(window)
        return closed

    def _summary(self, window: _Window) -> logging.LogRecord:
        sample = window.sample
        record = logging.LogRecord(
            sample.name,
            sample.levelno,
            sample.pathname,
            sample.lineno,
            "suppressed %d repeats of %r in %.0f s",
            (window.suppressed, message_of(sample), self.window),
            None,
        )
        setattr(record, _SUMMARY_ATTR, True)
        return record


# ------------------------------------------------------------------ formatting


class LineFormatter(logging.Formatter):
    """One line per record (traceback lines follow), journal or plain style."""

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {message_of(record)}"
        values = getattr(record, _FIELDS_ATTR, None)
        if isinstance(values, Mapping) and values:
            text += " " + " ".join(f"{k}={_field_text(v)}" for k, v in values.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        if self.journal:
            # journald splits on newlines: every line carries the priority.
            prefix = f"<{syslog_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{self.formatTime(record)} {record.levelname} {text}"


def _field_text(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text)
    return text


# ------------------------------------------------------------------ set-up


class _Installed:
    """The handler and repeat limiter of the latest :func:`setup_logging` call."""

    lock = threading.Lock()
    handler: logging.Handler | None = None
    limiter: RepeatLimiter | None = None


def setup_logging(
    level: str | int = "info",
    stream: TextIO | None = None,
    *,
    journal: bool | None = None,
    repeat_limit: int = 10,
    repeat_window: float = 60.0,
) -> logging.Handler:
    """Send all logging to ``stream`` (default stderr), replacing an earlier call's handler.

    ``level`` is a name from ``[agent] log_level`` or a number. ``journal`` forces
    the journald style on or off; by default it follows :func:`under_journald`.
    Call it again on reload to change the level.
    """
    out = sys.stderr if stream is None else stream
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r} (known: {', '.join(_LEVELS)})")
        level = _LEVELS[level.lower()]
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter(under_journald(out) if journal is None else journal))
    limiter = RepeatLimiter(handler.handle, repeat_limit, repeat_window)
    # Redact first so the repeat summaries quote only redacted text.
    handler.addFilter(RedactSecrets())
    handler.addFilter(limiter)
    root = logging.getLogger()
    with _Installed.lock:
        if _Installed.handler is not None and _Installed.limiter is not None:
            root.removeHandler(_Installed.handler)
            _Installed.limiter.flush()
            _Installed.handler.close()
        root.addHandler(handler)
        root.setLevel(level)
        _Installed.handler, _Installed.limiter = handler, limiter
    logging.captureWarnings(True)
    return handler


def flush_repeats() -> None:
    """Write pending ``suppressed K repeats`` lines now (the runtime's periodic tick, shutdown)."""
    with _Installed.lock:
        limiter = _Installed.limiter
    if limiter is not None:
        limiter.flush()
