"""``wardpost console ...`` and the console inside ``wardpost receiver run``, as processes."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from agent.testing.broker import Broker, free_port

REPO = Path(__file__).parents[2]


def wardpost(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_operators_from_the_command_line_and_console_in_the_receiver(
    broker: Broker, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "central.toml"
    config.write_text(
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'client_id = "rx-{uuid.uuid4().hex[:6]}"\ntopic_prefix = "c{uuid.uuid4().hex[:6]}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "central.db"}"\n'
        f"[console]\nenabled = true\nport = {port}\n"
    )
    short = wardpost("console", "add-operator", "ada", "--config", str(config), stdin="short\n")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    added = wardpost(
        "console",
        "add-operator",
        "ada",
        "--role",
        "admin",
        "--config",
        str(config),
        stdin="a long enough password\n",
    )
    assert added.returncode == 0, added.stderr
    listed = wardpost("console", "operators", "--config", str(config))
    assert re.search(r"^ada\s+admin\s+since", listed.stdout, re.M), listed.stdout

    receiver = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "receiver", "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        for line in receiver.stdout:  # the log says where the console listens
            if f"console at http://127.0.0.1:{port}" in line:
                break
        else:
            raise AssertionError("the receiver ended without serving the console")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=30) as page:
            assert "Wardpost console" in page.read().decode()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/devices", timeout=30)
            raise AssertionError("the devices page answered without a login")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
    finally:
        receiver.terminate()
        assert receiver.wait(60) == 0
