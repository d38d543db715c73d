"""scripts/setup-env says what it does and installs nothing when nothing changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAMP = REPO / ".venv" / "wardpost-setup.stamp"


def setup_env(*extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / "setup-env"), *extras],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # only a first install takes long
        check=False,
    )


def test_a_second_run_reinstalls_nothing_and_says_so() -> None:
    # The extras scripts/test asks for: it installs only if the venv lacks something.
    first = setup_env("test,camera,central,console")
    assert first.returncode == 0, first.stdout + first.stderr
    stamp = STAMP.read_text()
    again = setup_env("test,camera,central,console")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == [
        "setup: system packages present",
        "setup: Python packages up to date (pyproject.toml unchanged; extras: camera,central,console,test)",
        "setup: ready: .venv/bin/wardpost",
    ]
    assert again.stderr == "", "no setuptools or apt noise"
    # Fewer extras (the demo asks for none) are covered by what is installed.
    assert "up to date" in setup_env().stdout
    assert STAMP.read_text() == stamp
