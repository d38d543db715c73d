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
import os
import socket
import socketserver
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.driver import CommandError
from agent.event import valid_kind

if TYPE_CHECKING:
    from agent.runtime import Agent

log = logging.getLogger("wardpost.control")

MAX_REQUEST = 1024 * 1024
CONTROL_SOURCE = "control"


class ControlError(Exception):
    pass


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            if len(line) > MAX_REQUEST:
                self._reply({"ok": False, "error": "request too large"})
                return
            try:
                request = json.loads(line)
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
            kind = request.get("kind")
            if not isinstance(kind, str) or not valid_kind(kind):
                raise ControlError(
                    f"invalid event kind {kind!r}: use dotted lowercase words like 'gate.alarm'"
                )
            payload = request.get("payload") or {}
            if not isinstance(payload, dict):
                raise ControlError("payload must be a JSON object")
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


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ControlError(f"{name} must be an integer from {lo} to {hi}")
    return value


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
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ControlError("the agent closed the connection without answering")
    reply: dict[str, Any] = json.loads(data)
    return reply
