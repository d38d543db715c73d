"""The local control socket: how ``wardpost status|events|emit|simulate|reload`` reach a running agent.

A Unix stream socket in the state directory (mode 0660: the ``wardpost`` user and
its group only). One JSON request per line, one JSON answer per line::

    {"op": "emit", "kind": "panic.pressed", "priority": "critical", "payload": {}}
    {"ok": true, "id": "0193...", "durable": true}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import socketserver
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.driver import CommandError
from agent.event import KIND_PATTERN, MAX_KIND_LENGTH, valid_kind

if TYPE_CHECKING:
    from agent.runtime import Agent

log = logging.getLogger("wardpost.control")

MAX_REQUEST = 1024 * 1024
#: Limits of an event payload injected with ``wardpost emit`` (as compact JSON).
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PAYLOAD_DEPTH = 32
CONTROL_SOURCE = "control"


class ControlError(Exception):
    pass


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        while True:
            # Bounded: a line longer than the limit is refused after MAX_REQUEST + 1 bytes,
            # never read whole into memory.
            line = self.rfile.readline(MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST:
                self._reply(
                    {"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"}
                )
                return
            try:
                request = strict_json(line, "request")
                if not isinstance(request, dict):
                    raise ControlError("request must be a JSON object")
                reply = self.server.dispatch(request)
            except (ControlError, CommandError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the control socket must never take the agent down
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            self._reply(reply)

    def _reply(self, body: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(body, default=str).encode() + b"\n")
            self.wfile.flush()


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, agent: Agent):
        self.agent = agent
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a killed agent
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o660)
        self._thread = threading.Thread(target=self.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def dispatch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        agent = self.agent
        if op == "status":
            return {"ok": True, "status": agent.status().to_dict()}
        if op == "events":
            limit = _int(request.get("limit", 20), "limit", 1, 10_000)
            return {
                "ok": True,
                "events": agent.outbox.recent(limit, bool(request.get("pending", False))),
            }
        if op == "emit":
            kind = check_kind(request.get("kind"))
            payload = check_payload(request.get("payload") or {})
            emission = agent.emit(
                CONTROL_SOURCE,
                kind,
                payload,
                str(request.get("priority", "normal")),
                test=bool(request.get("test", False)),
            )
            fate = emission.wait_accepted(10.0)
            return {
                "ok": fate is not None,
                "id": emission.event.id,
                "seq": emission.event.seq,
                "fate": None if fate is None else fate.value,
                "storage_fault": agent.outbox.fault,
            }
        if op == "simulate":
            name = request.get("driver")
            if not isinstance(name, str):
                raise ControlError("'driver' must be a driver name")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("'args' must be a JSON object")
            try:
                driver = agent.driver(name)
            except KeyError as exc:
                raise ControlError(
                    f"{exc.args[0]} (running: {', '.join(sorted(agent.slots)) or 'none'})"
                ) from None
            return {
                "ok": True,
                "result": dict(driver.simulate(str(request.get("action", "")), args)),
            }
        if op == "reload":
            return agent.reload()
        raise ControlError(f"unknown op {op!r} (status, events, emit, simulate, reload)")


def strict_json(text: str | bytes, what: str) -> Any:
    """Parse JSON as the standard defines it: NaN, Infinity and numbers too large for a
    float (which Python would read as infinity) are refused, as is runaway nesting."""

    def no_constant(name: str) -> Any:
        raise ControlError(f"{what}: {name} is not valid JSON (use null or a string)")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ControlError(f"{what}: the number {text} is too large")
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        raise ControlError(f"{what} is nested more than {MAX_PAYLOAD_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise ControlError(f"{what} is not JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ControlError(f"{what} is not usable JSON: {exc}") from None


def check_kind(kind: Any) -> str:
    """``kind`` if it matches the contract's pattern for event kinds, else a clear error."""
    if not isinstance(kind, str) or not valid_kind(kind):
        raise ControlError(
            f"invalid event kind {kind!r}: use dotted lowercase words of a-z, 0-9 and _, "
            f"like 'gate.alarm' (pattern {KIND_PATTERN.pattern}, at most {MAX_KIND_LENGTH} "
            "characters)"
        )
    return kind


def check_payload(payload: Any) -> dict[str, Any]:
    """An event payload for ``emit``: a JSON object, at most :data:`MAX_PAYLOAD_DEPTH`
    levels deep and :data:`MAX_PAYLOAD_BYTES` long as compact JSON."""
    if not isinstance(payload, dict):
        raise ControlError(f"payload must be a JSON object, got {type(payload).__name__}")
    if _too_deep(payload):
        raise ControlError(f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep")
    try:
        size = len(json.dumps(payload, separators=(",", ":"), allow_nan=False).encode())
    except ValueError:
        raise ControlError("payload contains NaN or Infinity, which JSON does not allow") from None
    if size > MAX_PAYLOAD_BYTES:
        raise ControlError(f"payload is {size} bytes as JSON (at most {MAX_PAYLOAD_BYTES} bytes)")
    return payload


def _too_deep(value: Any) -> bool:
    """Whether a parsed JSON value nests more than :data:`MAX_PAYLOAD_DEPTH` objects or
    arrays (``{}`` is one level), found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        if level > MAX_PAYLOAD_DEPTH:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ControlError(f"{name} must be an integer from {lo} to {hi}")
    return value


def read_answer(s: socket.socket) -> bytes:
    """One answer line from the agent (all that came if the connection closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def request(path: Path, body: Mapping[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Send one request to a running agent's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"no agent is running here: control socket {path} does not exist"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"no agent is listening on {path} (stale socket)") from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run as the wardpost user or a member of its group"
            ) from None
        s.sendall(json.dumps(body).encode() + b"\n")
        data = read_answer(s)
    if not data:
        raise ControlError("the agent closed the connection without answering")
    reply: dict[str, Any] = json.loads(data)
    return reply
