"""The agent as a real subprocess: ``python -m agent.cli --config X run``.

Fault tests need what an in-process agent cannot give: SIGKILL at any instant, a
process-wide file-size limit, a wall clock that jumps. :class:`AgentProcess` starts
the daemon exactly as systemd would, waits until its control socket answers, talks
to it the way ``wardpost emit``/``status`` do, and kills it by its own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from agent.control import ControlError, request

REPO = Path(__file__).resolve().parents[2]


class AgentProcess:
    """One ``wardpost run`` subprocess on ``config_path``; restartable on the same state.

    ``file_size_limit`` sets RLIMIT_FSIZE on the child (and ignores SIGXFSZ, so an
    oversized write fails with EFBIG as on a full disk instead of killing it);
    ``launcher`` replaces ``-m agent.cli`` (e.g. a module that shifts the wall clock).
    """

    def __init__(
        self,
        config_path: Path,
        control_socket: Path,
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        file_size_limit: int | None = None,
        launcher: Sequence[str] = ("-m", "agent.cli"),
    ):
        self.config_path = config_path
        self.control_socket = control_socket
        self.log_path = log_path or config_path.with_suffix(".log")
        self.env = dict(env or {})
        self.file_size_limit = file_size_limit
        self.launcher = list(launcher)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: BinaryIO | None = None
        self.control = ControlClient(control_socket)

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 20.0) -> AgentProcess:
        """Start the daemon and return once its control socket answers ``status``."""
        if self.running:
            raise RuntimeError("agent already running")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self._log.write(
            f"\n===== start {self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode()
        )
        self._log.flush()
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *self.launcher,
                "--config",
                str(self.config_path),
                "run",
                "--log-level",
                "info",
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limits if self.file_size_limit is not None else None,  # noqa: PLW1509
        )
        self.starts += 1
        self.wait_ready(timeout)
        return self

    def _limits(self) -> None:  # runs in the child between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = self.file_size_limit or 0
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Poll the control socket until the agent answers (a stale socket refuses)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self.returncode} before it was ready; log:\n{self.tail()}"
                )
            try:
                return self.status(timeout=2.0)
            except (ControlError, OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.02)
        raise RuntimeError(f"agent not ready within {timeout}s ({last}); log:\n{self.tail()}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        """Send ``sig`` to our own child and reap it; returns its exit code."""
        self.control.close()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def terminate(self, timeout: float = 15.0) -> int | None:
        """A clean stop, as ``systemctl stop`` does it."""
        return self.kill(signal.SIGTERM, timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("agent not running")
        return self.proc.pid

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # ------------------------------------------------------- control socket

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        reply = request(self.control_socket, {"op": "status"}, timeout)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        status: dict[str, Any] = reply["status"]
        return status

    def emit(
        self, kind: str, priority: str = "normal", payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``wardpost emit``; the reply's ``ok``/``durable`` say whether the event was accepted."""
        return self.control.emit(kind, priority, payload)

    def simulate(
        self, driver: str, action: str = "emit", args: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return self.control.ask(
            {"op": "simulate", "driver": driver, "action": action, "args": dict(args or {})}
        )

    def client(self) -> ControlClient:
        """A control connection of its own (one per emitting thread)."""
        return ControlClient(self.control_socket)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll ``status`` until ``predicate(status)``."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(ControlError, OSError, ValueError):
                status = self.status()
                if predicate(status):
                    return status
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; last status: {json.dumps(status)[:800]}"
        )


class ControlClient:
    """Requests on one kept-open control-socket connection (reopened after errors).

    Not thread-safe: give each thread its own. Raises :class:`OSError` or
    :class:`ControlError` when the agent dies mid-request; the caller must then treat
    the request as *not* accepted."""

    def __init__(self, path: Path, timeout: float = 15.0):
        self.path = path
        self.timeout = timeout
        self._conn: socket.socket | None = None
        self._file: Any = None

    def emit(
        self, kind: str, priority: str = "normal", payload: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return self.ask(
            {"op": "emit", "kind": kind, "priority": priority, "payload": dict(payload or {})}
        )

    def ask(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self._conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(self.timeout)
            try:
                conn.connect(str(self.path))
            except OSError:
                conn.close()
                raise
            self._conn, self._file = conn, conn.makefile("rb")
        try:
            self._conn.sendall(json.dumps(body).encode() + b"\n")
            line = self._file.readline()
        except OSError:
            self.close()
            raise
        if not line:
            self.close()
            raise ControlError("the agent closed the control connection without answering")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        for closable in (self._file, self._conn):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()
        self._conn = self._file = None
