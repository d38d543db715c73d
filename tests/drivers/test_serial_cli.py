"""Technician tools: serial-sniff on a real pty with --capture, serial-replay of the capture."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.testing.agent import DEADLINE
from agent.testing.serial_frames import rdm6300
from agent.testing.serial_pty import PtyDevice

WARDPOST = Path(sys.executable).with_name("wardpost")


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = DEADLINE) -> str:
    """What the process printed until ``needle``. Read from the descriptor itself: lines in
    the file object's buffer would be invisible to ``select`` (and ``communicate`` later reads
    the rest through that buffer, so it must stay empty)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
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
        # Stopped as a technician does (Ctrl-C) once it has shown the last frame: a fixed
        # --duration could end before a starved test process even wrote the bytes.
        out = read_until(proc, "rdm6300: rfid.read")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=DEADLINE)
        out += rest
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


def test_replay_explain_shows_framing_checksum_and_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "panel.bin"
    assert (
        main(
            [
                "serial-encode",
                "--dialect",
                "hdlc-panel",
                "--hex",
                "0110",
                "address=1",
                "zones=1,3",
                "intensity=126",
                "device_time=2026-01-29T21:15:30+00:00",
            ]
        )
        == 0
    )
    frame = bytes.fromhex(capsys.readouterr().out.split("|")[0])
    assert b"\x7d\x5e" in frame  # the intensity 0x7E travels escaped
    dump.write_bytes(frame)
    assert main(["serial-replay", str(dump), "--dialect", "hdlc-panel", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "frame: flag, 14 bytes on the wire, body 9 bytes 01 10 05 00 7e" in out
    assert "checksum CRC-16/X-25" in out and "verified" in out
    assert "zones: bytes 2-3 05 00 (bits_set) -> [1, 3]" in out
    assert "device_time: bytes 5-8 f2 cd 7b 69 (unix_time) -> '2026-01-29T21:15:30+00:00'" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--dialect", "nmea-gate", "--body", "GTTMP,DOOR"],
            ["$GTTMP,DOOR*60\\r\\n|", 'nmea-gate: gate.tamper {"detail": "DOOR"}'],
        ),
        (
            ["--dialect", "wiegand34-hex", "facility=1234", "card=42"],
            ["|209A40054\\r\\n|", '{"card": "00042", "facility": 1234, "tag": "209A40054"}'],
        ),
        (
            [
                "--dialect",
                "xray-binary",
                "--hex",
                "0001",
                "bag=2317",
                "threat=weapon",
                "operator=OP17",
                "tunnel_temperature=-5",
            ],
            ['"bag": "00002317"', '"threat": "weapon"', '"tunnel_temperature": -5'],
        ),
    ],
)
def test_encode_frames_a_body_and_decodes_it_back(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    assert main(["serial-encode", *args]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--dialect", "hdlc-panel", "adress=1"],
            "adress=1: expected FIELD=VALUE with a layout field (address, ",
        ),
        (
            ["--dialect", "hdlc-panel", "address=x"],
            "address=x: address: 'x' is not a value for uint",
        ),
        (
            ["--dialect", "hdlc-panel", "address=1"],
            "FIELD=VALUE: no value for zones, intensity, device_time",
        ),
        (
            ["--dialect", "hdlc-panel", "--rule", "7", "address=1"],
            "--rule: the dialect has rules 0..2",
        ),
        (["--dialect", "xray-binary", "--hex", "zz"], "body: must be hex digits"),
        (
            ["--dialect", "wiegand34-hex", "facility=70000", "card=1"],
            "cannot write these values: facility: 70000 does not fit in 16 bits",
        ),
        (
            [
                "--dialect",
                "xray-binary",
                "--hex",
                "0001",
                "bag=1",
                "threat=1",
                "operator=TOOLONG",
                "tunnel_temperature=0",
            ],
            "operator: 'TOOLONG' does not fit in 4 bytes",
        ),
        (
            [
                "--dialect",
                "xray-binary",
                "--hex",
                "0001",
                "bag=1",
                "threat=1",
                "operator=A",
                "tunnel_temperature=40000",
            ],
            "tunnel_temperature: 40000 does not fit in 16 signed bits",
        ),
    ],
)
def test_encode_errors_name_what_is_wrong(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["serial-encode", *args]) == 1
    assert message in capsys.readouterr().err


COOKBOOK = Path(__file__).parent / "cookbook"


@pytest.mark.parametrize(
    ("capture", "dialect"),
    [
        ("nmea.bin", "nmea-gate"),
        ("hdlc.bin", "hdlc-panel"),
        ("xray.bin", "xray-binary"),
        ("w34.bin", "wiegand34-hex"),
        ("zones.bin", "polled-zones"),
    ],
)
def test_cookbook_outputs_are_what_serial_replay_prints(
    capsys: pytest.CaptureFixture[str], capture: str, dialect: str
) -> None:
    readme = (Path(__file__).parents[2] / "drivers/serial_common/README.md").read_text()
    command = f"$ wardpost serial-replay {capture} --dialect {dialect} --explain\n"
    shown = readme.split(command, 1)[1].split("```", 1)[0]
    assert main(["serial-replay", str(COOKBOOK / capture), "--dialect", dialect, "--explain"]) == 0
    assert capsys.readouterr().out == shown
