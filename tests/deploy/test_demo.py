"""scripts/demo, run as a newcomer would: it stops everything it started on every way out
(``DEMO_SECONDS`` time-out, Ctrl-C, an error), and its periodic press is a real tap."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testing.agent import DEADLINE

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo"
#: Installs (when needed), starts a broker and the agent: allow for a loaded machine.
RUN_LIMIT = 300.0

pytestmark = pytest.mark.slow


def run_demo(**env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(DEMO)],
        cwd=REPO,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
    )


def work_dir(output: str) -> Path:
    found = re.search(r"agent state in (/tmp/wardpost-demo\.\w+)/state", output)
    assert found, f"the demo did not say where it works:\n{output}"
    return Path(found.group(1))


def processes_using(work: Path) -> list[str]:
    """Command lines of running processes that name the demo's folder (broker, agent, presser)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited meanwhile
        if str(work) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def kinds_recorded(work: Path) -> list[str]:
    with sqlite3.connect(work / "state" / "outbox.db") as db:
        return [kind for (kind,) in db.execute("SELECT kind FROM events ORDER BY seq")]


@pytest.fixture
def demos() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # a failed assertion must not leave a demo behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_time_out_stops_everything_and_the_periodic_press_is_a_tap(
    demos: list[subprocess.Popen[str]],
) -> None:
    demo = run_demo(DEMO_SECONDS="12", DEMO_PRESS_EVERY="3")
    demos.append(demo)
    output, _ = demo.communicate(timeout=RUN_LIMIT)
    assert demo.returncode == 0, output
    assert "demo stopped" in output
    work = work_dir(output)
    assert processes_using(work) == []
    kinds = kinds_recorded(work)
    assert "panic.pressed" in kinds and "panic.released" in kinds, kinds
    assert "panic.stuck" not in kinds
    assert "stopped" in (work / "agent.log").read_text(), "the agent stopped cleanly (SIGTERM)"


def read_until(demo: subprocess.Popen[str], marker: str) -> str:
    assert demo.stdout is not None
    seen = []
    deadline = time.monotonic() + RUN_LIMIT
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from the demo:\n{''.join(seen)}")


def test_ctrl_c_stops_everything(demos: list[subprocess.Popen[str]]) -> None:
    demo = run_demo(DEMO_PRESS_EVERY="1")
    demos.append(demo)
    output = read_until(demo, "Live monitor")
    work = work_dir(output)
    assert processes_using(work), "the broker and the agent run while the demo does"
    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    rest, _ = demo.communicate(timeout=DEADLINE)
    assert demo.returncode == 130, output + rest
    assert "demo stopped" in rest
    assert processes_using(work) == []


def test_an_error_stops_everything(demos: list[subprocess.Popen[str]]) -> None:
    demo = run_demo(DEMO_SECONDS="soon")  # the monitor refuses this after all is started
    demos.append(demo)
    output, _ = demo.communicate(timeout=RUN_LIMIT)
    assert demo.returncode == 2, output
    assert "invalid float value: 'soon'" in output and "demo stopped" in output
    assert processes_using(work_dir(output)) == []
