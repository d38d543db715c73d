"""The benchmark scripts run and hand their figures to ``scripts/bench``'s one table.

Nothing here judges speed (that is the benchmarks' job); these runs are small and only
prove that each script still imports, measures and reports after the code it drives
has moved on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import ROWS_ENV

REPO = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, *argv: str) -> tuple[str, list[dict[str, object]]]:
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, ROWS_ENV: str(rows_file)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads(rows_file.read_text())


def test_panic_benchmark_reports_pin_to_subscriber_beside_raw_paho(tmp_path: Path) -> None:
    out, rows = run_script(tmp_path, "scripts/bench-panic", "--presses", "30")
    assert "pin edge -> panic.pressed" in out
    metrics = {r["metric"]: r for r in rows}
    p99 = metrics["pin edge -> panic.pressed p99"]
    assert p99["baseline_name"] == "raw paho publish -> subscriber p99"
    assert p99["value"] > 0 and p99["baseline"] > 0 and p99["target"] == "<= 2.5x raw and <= 5 ms"
    assert "30 rounds, 0 lost" in metrics["pin edge -> panic.pressed p50"]["notes"]


def test_serial_benchmark_reports_every_dialect_and_the_latency(tmp_path: Path) -> None:
    _out, rows = run_script(tmp_path, "scripts/bench-serial", "--frames", "300", "--alarms", "20")
    metrics = {r["metric"] for r in rows}
    for dialect in (
        "text-gate",
        "multizone-gate",
        "polled-gate",
        "xray-alert",
        "rdm6300",
        "wiegand26-hex",
    ):
        assert f"{dialect} engine" in metrics
    assert {"pty bytes -> gate.alarm p50", "pty bytes -> gate.alarm p99"} <= metrics
    assert all(r["baseline"] for r in rows)


def test_receiver_benchmark_drains_a_backlog_beside_a_bare_subscriber(tmp_path: Path) -> None:
    out, rows = run_script(
        tmp_path, "scripts/bench-receiver", "--devices", "3", "--events", "20", "--runs", "sqlite"
    )
    assert "drain: bare paho QoS 1 -> counting subscriber" in out
    [row] = rows
    assert row["metric"] == "drain: 1 receiver, SQLite, stored + receipted"
    assert row["baseline"] and row["value"]
    assert "60 of 60" in str(row["notes"])  # every event stored and receipted


@pytest.mark.parametrize(
    "script", ["scripts/bench", "scripts/bench-face", "scripts/bench-receiver", "scripts/fleet-sim"]
)
def test_other_benchmark_scripts_import_and_explain_themselves(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_console_benchmark_reports_press_to_browser_beside_mqtt(tmp_path: Path) -> None:
    out, rows = run_script(
        tmp_path,
        "scripts/bench-console",
        "--presses",
        "5",
        "--open",
        "40",
        "--devices",
        "20",
        "--loaded-presses",
        "3",
    )
    assert "versions: starlette" in out
    metrics = {r["metric"]: r for r in rows}
    p99 = metrics["press → visible p99 (5 presses)"]
    assert p99["baseline_name"] == "MQTT publish → plain subscriber"
    assert p99["value"] >= p99["baseline"] > 0 and p99["target"] == "p99 <= 1000 ms"
    assert "queue page load, 40 rows (40 alarms)" in metrics
