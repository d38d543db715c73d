"""Receivers in processes of their own (``python -m central run``), to kill and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.testing.toml_writer import dumps

REPO = Path(__file__).resolve().parents[2]


class ReceiverProcess:
    """One receiver service with its own config file and log; ``start()`` waits until it
    has subscribed, ``kill()`` sends SIGKILL (no goodbye) or another signal."""

    def __init__(self, workdir: Path, name: str, config: Mapping[str, Any]):
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(dumps(config))
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ReceiverProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "central", "run", "--config", str(self.config_path)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        deadline = time.monotonic() + timeout
        while b"subscribed to" not in self.log_path.read_bytes()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver {self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int | None:
        if not self.running:
            return None
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        return self.kill(signal.SIGTERM)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
