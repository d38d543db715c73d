"""A private PostgreSQL cluster for the tests: ``initdb`` into a temp dir, a free loopback port.

Never the machine's own server: the cluster lives in its own directory, listens on a
free port on 127.0.0.1 and keeps its unix socket in that directory. PostgreSQL refuses
to run as root, so under root the cluster runs as ``nobody`` (the process is still our
own child, stopped by its pid). Durability settings are off (``fsync``): the tests
check behaviour, not crash safety of PostgreSQL itself.

The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<v>/bin``);
``scripts/setup-env`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent.testing.broker import free_port

#: The unprivileged account the cluster runs as when the tests run as root.
UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian layout), or a clear error."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
        "run scripts/setup-env or apt-get install postgresql"
    )


class PostgresCluster:
    """One ``postgres`` process we own, in a directory we own; ``url(db)`` to connect."""

    def __init__(self) -> None:
        self.bin = postgres_bin_dir()
        self.host = "127.0.0.1"
        self.port = free_port()
        # Not under pytest's tmp dir: that is mode 0700 for root, which ``nobody`` cannot enter.
        self.directory = Path(tempfile.mkdtemp(prefix="wardpost-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam(UNPRIVILEGED_USER)
            self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(self.directory, account.pw_uid, account.pw_gid)

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            argv, capture_output=True, env=self._env(), check=False, timeout=120, **self._as_user
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
            )

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.directory)}

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    f"unix_socket_directories={self.directory}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                **self._as_user,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.proc.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(Exception):
                self._admin_execute("SELECT 1")
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"postgres did not accept connections within {timeout}s: {self.log_tail()}"
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _admin_execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.encode())  # test-made identifiers only; bytes: any query

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin_execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of our own postgres, then remove its directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
