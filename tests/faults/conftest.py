"""Fault-suite fixtures: a private broker per test, a rig around it, and the fault matrix.

Every fault test records one row (fault × iterations × accepted × lost × duplicated ×
order violations × max latency); at the end of the run the rows are printed as a
table; a full run (``scripts/fault-matrix``, which sets ``WARDPOST_FAULT_ITERATIONS``)
also writes them to ``benchmarks/results/faults-<date>.json`` (or the directory in
``WARDPOST_FAULT_RESULTS``), so the small CI-sized runs never overwrite its record.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from tests.faults.harness import ITERATIONS_ENV, OUTAGE_ENV, SEED_ENV, base_seed

REPO = Path(__file__).resolve().parents[2]
_ROWS: list[dict[str, Any]] = []
_SEED = base_seed()

COLUMNS = [
    ("fault", "fault", 34),
    ("iterations", "iter", 5),
    ("accepted", "accepted", 8),
    ("delivered", "delivered", 9),
    ("lost", "lost", 4),
    ("duplicated", "dup", 5),
    ("order_violations", "order", 5),
    ("max_latency_s", "max lat s", 9),
]


@pytest.fixture
def seed() -> int:
    """The run's base seed (``WARDPOST_FAULT_SEED`` replays a run)."""
    print(f"fault seed {_SEED} (replay: {SEED_ENV}={_SEED})")
    return _SEED


@pytest.fixture
def fault_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker only this test uses: outage tests kill and restart it."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def fault_matrix() -> Callable[[dict[str, Any]], None]:
    """Record one row of the fault matrix."""

    def record(row: dict[str, Any]) -> None:
        _ROWS.append({**row, "seed": _SEED})
        print("fault matrix row:", json.dumps(row))

    return record


def format_matrix(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "  ".join(
            f"{title:>{width}}" if key != "fault" else f"{title:<{width}}"
            for key, title, width in COLUMNS
        )
    ]
    for row in rows:
        cells = []
        for key, _title, width in COLUMNS:
            value = row.get(key)
            text = (
                "-"
                if value is None
                else (f"{value:.3f}" if isinstance(value, float) else str(value))
            )
            cells.append(f"{text:<{width}}" if key == "fault" else f"{text:>{width}}")
        lines.append("  ".join(cells))
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    terminalreporter.section("fault matrix")
    for line in format_matrix(_ROWS):
        terminalreporter.write_line(line)
    for row in _ROWS:
        extra = {k: v for k, v in row.items() if k not in {c[0] for c in COLUMNS} and k != "seed"}
        if extra:
            terminalreporter.write_line(f"  {row['fault']}: {json.dumps(extra)}")
    replay = f"seed {_SEED} (replay with {SEED_ENV}={_SEED})"
    if os.environ.get(ITERATIONS_ENV) or os.environ.get("WARDPOST_FAULT_RESULTS"):
        replay += f"; results in {_write_results()}"
    terminalreporter.write_line(replay)


def _write_results() -> Path:
    out_dir = Path(os.environ.get("WARDPOST_FAULT_RESULTS") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"faults-{time.strftime('%Y-%m-%d')}.json"
    # A partial run (one test file) updates its own rows and keeps the day's others.
    ours = {row["fault"] for row in _ROWS}
    kept: list[dict[str, Any]] = []
    if path.exists():
        try:
            kept = [row for row in json.loads(path.read_text())["rows"] if row["fault"] not in ours]
        except (ValueError, KeyError, TypeError):
            kept = []
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "seed": _SEED,
        "iterations_env": os.environ.get(ITERATIONS_ENV),
        "outage_env": os.environ.get(OUTAGE_ENV),
        "rows": kept + _ROWS,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MiB tmpfs mounted at ``tmp_path/small`` (root only); None where mounting is refused.

    Tests that get None fall back to a file-size limit (RLIMIT_FSIZE) on the agent."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(
            f"cannot mount a small filesystem ({result.stderr.strip()}); falling back to RLIMIT_FSIZE"
        )
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@dataclass
class Ext4:
    """A small ext4 filesystem on a loop device, mounted ``errors=remount-ro`` like a Pi's SD card."""

    image: Path
    mount_point: Path
    device: str = ""

    def mount(self) -> None:
        subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mount_point)],
            check=True,
            capture_output=True,
        )
        found = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(self.mount_point)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.device = Path(found.stdout.strip()).name

    def fail(self) -> None:
        """An I/O error as the kernel sees one: ext4 remounts itself read-only."""
        Path(f"/sys/fs/ext4/{self.device}/trigger_fs_error").write_text("1\n")

    def repair(self) -> None:
        """What a technician (or a reboot) does: unmount, fsck, mount again."""
        subprocess.run(["umount", "-l", str(self.mount_point)], check=True, capture_output=True)
        subprocess.run(["e2fsck", "-fy", str(self.image)], check=False, capture_output=True)
        self.mount()


@pytest.fixture
def sd_card(tmp_path: Path) -> Iterator[Ext4]:
    """A 64 MiB ext4 filesystem that the test can make fail (root and loop devices needed)."""
    fs = Ext4(tmp_path / "sd.img", tmp_path / "sd")
    fs.mount_point.mkdir()
    with open(fs.image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs.image)], check=True, capture_output=True)
    fs.mount()
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs.mount_point)], check=False, capture_output=True)


@pytest.fixture(scope="session")
def powercut_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/faults/powercut.c built for LD_PRELOAD (see there)."""
    library = tmp_path_factory.mktemp("powercut") / "libpowercut.so"
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            "-O2",
            "-o",
            str(library),
            str(Path(__file__).with_name("powercut.c")),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    return library
