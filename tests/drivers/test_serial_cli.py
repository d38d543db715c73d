"""Technician tools: serial-sniff on a real pty with --capture, serial-replay of the capture."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.testing.serial_frames import rdm6300
from agent.testing.serial_pty import PtyDevice

WARDPOST = Path(sys.executable).with_name("wardpost")


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
    assert needle in seen, seen
    return seen


def test_sniff_shows_bytes_and_dialects_and_captures_for_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = PtyDevice(tmp_path / "ttyGATE")
    capture = tmp_path / "gate.jsonl"
    proc = subprocess.Popen(
        [
            str(WARDPOST),
            "serial-sniff",
            str(device.link),
            "--dialect",
            "text-gate",
            "--dialect",
            "rdm6300",
            "--capture",
            str(capture),
            "--duration",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        read_until(proc, " open")
        device.write(b"ALARM Z3 I85\r\n")
        time.sleep(0.2)
        device.write(b"PASS IN\r\n" + rdm6300(bytes.fromhex("0100CDA4EC")))
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
        device.close()
    assert proc.returncode == 0
    assert "41 4c 41 52 4d" in out  # the hex view
    assert 'text-gate: gate.alarm {"class": "standard", "intensity": 85, "zones": [3]}' in out
    assert 'rdm6300: rfid.read {"printed": "0013477100"' in out
    header = json.loads(capture.read_text().splitlines()[0])
    assert header["capture"] == 1 and header["baudrate"] == 9600

    assert main(["serial-replay", str(capture), "--dialect", "text-gate"]) == 0
    replay = capsys.readouterr().out
    assert "text-gate: gate.alarm" in replay
    assert "text-gate: gate.transit" in replay
    assert "text-gate: bytes 37" in replay


def test_replay_of_a_raw_dump_through_a_dialect_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "dump.bin"
    dump.write_bytes(b"BEEP4;BEEP5;noise;BEE")
    dialect = tmp_path / "lobby.toml"
    dialect.write_text(
        "[framing]\nterminators=[';']\n[[rules]]\nmatch='BEEP(?P<z>\\d)'\nkind='gate.alarm'\n"
    )
    assert main(["serial-replay", str(dump), "--dialect", str(dialect)]) == 0
    out = capsys.readouterr().out
    assert out.count("lobby: gate.alarm") == 2
    assert "unparsed (no rule matched" in out
    assert "unparsed (incomplete frame at the end" in out


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, ["--dialect", "rdm6300"], "capture file does not exist"),
        (
            '{"capture": 1}\n{"t": 0, "rx": "zz"}\n',
            ["--dialect", "rdm6300"],
            "line 2 is not a capture record",
        ),
        ("x", ["--dialect", "nope"], "unknown dialect 'nope'"),
    ],
)
def test_replay_errors_are_clear(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    args: list[str],
    message: str,
) -> None:
    path = tmp_path / "capture.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["serial-replay", str(path), *args]) == 1
    assert message in capsys.readouterr().err
