"""A private mosquitto broker on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A server the tests stop and start again (a broker outage) must find its port free when
    it comes back. A port from the ephemeral range can meanwhile be taken by any socket the
    kernel numbers itself: one bound to port 0 (paho's internal socket pair binds one on
    loopback), or a client's source port. Below the range only an explicit bind can take it.
    Seen once under load: mosquitto's restart failed with "Address already in use"."""
    low, _ = _ephemeral_ports()
    for _ in range(100):
        port = random.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between 10000 and {low}")


class Broker:
    """One mosquitto process we own; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = ""):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def write_config(self) -> None:
        listener = (
            ""
            if "listener " in self.extra_config
            else f"listener {self.port} {self.host}\nallow_anonymous true\n"
        )
        self.conf.write_text(
            f"{listener}"
            "persistence false\n"
            f"user {getpass.getuser()}\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\n"
            f"{self.extra_config}\n"
        )

    def start(self, timeout: float = 5.0) -> None:
        self.write_config()
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited: {err} {self.log.read_text() if self.log.exists() else ''}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self, kill: bool = True) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
