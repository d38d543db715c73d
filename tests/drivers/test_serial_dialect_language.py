"""The dialect language live on pseudo-terminals (state, keep-alive supervision,
binary framings), and its located errors for dialect mistakes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse_section
from agent.testing.serial_pty import PtyDevice
from drivers.rfid_patrol import RfidPatrolDriver
from drivers.serial_common.cli import encode_frame
from drivers.serial_common.dialect import load_dialect
from drivers.serial_common.driver import SerialDialectDriver
from drivers.serial_common.engine import DialectEngine
from drivers.serial_gate import SerialGateDriver
from drivers.xray import XrayDriver
from tests.support.context import RecordingContext

FAST = {"reconnect_min": 0.05, "reconnect_max": 0.2, "read_timeout": 0.05}
DEADLINE = 30.0


@pytest.fixture
def drivers() -> Iterator[list[SerialDialectDriver]]:
    started: list[SerialDialectDriver] = []
    yield started
    for driver in started:
        driver.stop()


def start(
    cls: type[SerialDialectDriver],
    ctx: RecordingContext,
    device: PtyDevice,
    started: list[SerialDialectDriver],
    **options: Any,
) -> Any:
    config = parse_section(
        cls.config_class, {"port": str(device.link), **FAST, **options}, "drivers.gate1"
    )
    driver = cls(ctx, config)
    driver.start()
    started.append(driver)
    ctx.wait_for("device.online", timeout=DEADLINE)
    return driver


def kinds(ctx: RecordingContext, kind: str) -> list[Any]:
    return [e for e in ctx.events if e.kind == kind]


def test_polled_zone_state_gives_one_alarm_per_change_and_one_cleared(
    ctx: RecordingContext, device: PtyDevice, drivers: list[SerialDialectDriver]
) -> None:
    gate = start(SerialGateDriver, ctx, device, drivers, dialect="polled-zones", poll_interval=0.1)
    assert device.read(3, timeout=DEADLINE) == b"ZS\r"  # the driver polls
    for answer in (b"ZA 01,04,05\r\n",) * 4 + (b"ZA 01,04\r\n", b"ZA NONE\r\n", b"ZA NONE\r\n"):
        device.write(answer)
    [cleared] = ctx.wait_for("gate.alarm_cleared", timeout=DEADLINE)
    assert cleared.payload["previous"] == {"zones": [1, 4]}
    deadline = time.monotonic() + DEADLINE
    while gate.health().counters.get("unchanged", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.payload["zones"] for e in kinds(ctx, "gate.alarm")] == [[1, 4, 5], [1, 4]]
    assert gate.health().counters["unchanged"] == 4  # 3 repeated alarms, 1 repeated "none"


def test_a_push_device_that_stops_its_keep_alives_is_reported_silent(
    ctx: RecordingContext, device: PtyDevice, drivers: list[SerialDialectDriver]
) -> None:
    gate = start(SerialGateDriver, ctx, device, drivers, dialect="nmea-gate", silent_after=0.4)
    device.write(b"$GTKAL*55\r\n")
    [offline] = ctx.wait_for("device.offline", timeout=DEADLINE)  # plugged in, but quiet
    assert offline.payload["reason"] == "no valid frame for 0.4s"
    assert gate.health().state == "degraded"
    device.write(b"$GTKAL*00\r\n")  # a corrupted keep-alive proves nothing
    device.write(b"$GTKAL*55\r\n")
    online = ctx.wait_for("device.online", 2, timeout=DEADLINE)[1]
    assert online.payload["reason"] == "sending valid frames again"
    assert gate.health().counters["bad_checksum"] == 1


def test_binary_length_frames_behind_a_false_start_are_delivered_without_more_bytes(
    ctx: RecordingContext, device: PtyDevice, drivers: list[SerialDialectDriver]
) -> None:
    xray = start(XrayDriver, ctx, device, drivers, dialect="xray-binary")
    framer = DialectEngine(load_dialect("xray-binary")).framer
    body = (
        bytes([0, 0x01])
        + bytes.fromhex("00002317")
        + bytes([2])
        + b"OP17"
        + (-5).to_bytes(2, "little", signed=True)
    )
    # "A5 30" claims 48 bytes: the real frame sits inside them, and nothing follows.
    device.write(b"\xa5\x30" + framer.frame(body))
    [alert] = ctx.wait_for("xray.alert", timeout=DEADLINE)
    assert alert.payload["bag"] == "00002317" and alert.payload["threat"] == "weapon"
    assert alert.payload["tunnel_temperature"] == -5
    assert xray.health().counters["incomplete"] == 1


def test_nmea_sentence_with_device_time_and_noise_before_it(
    ctx: RecordingContext, device: PtyDevice, drivers: list[SerialDialectDriver]
) -> None:
    start(SerialGateDriver, ctx, device, drivers, dialect="nmea-gate")
    device.write(b"\x00\xff$GT$GTALM,03,04,085,260129211530*63\r\n")
    [alarm] = ctx.wait_for("gate.alarm", timeout=DEADLINE)
    assert alarm.payload["device_time"] == "2026-01-29T21:15:30"
    assert alarm.payload["zones"] == [3, 4]


# -- located errors for dialect mistakes ------------------------------------------------

MISTAKES = [
    ('[framing]\nchecksum = "CRC-16/NOPE"', "framing.checksum: unknown checksum"),
    (
        '[framing]\ntype = "stx_etx"\nstx = 0x7E\netx = 0x7E',
        'framing.etx: stx and etx must differ (same byte both ends: type = "flag")',
    ),
    ('[framing]\ntype = "length"', "framing.sync: length framing needs a sync or a checksum"),
    ('[framing]\nchecksum = "crc"', 'framing.crc: checksum = "crc" needs a [framing.crc] table'),
    (
        '[framing]\nchecksum = "crc"\ncrc = { width = 8, poly = 0x1021 }',
        "framing.crc.poly: does not fit in 8 bits",
    ),
    ('[framing]\nescape = "0A"', "framing.escape: the escape byte cannot be a frame marker"),
    (
        '[framing]\nescape = "7D"\nescape_xor = 0',
        "framing.escape_xor: only stx_etx and flag framings",
    ),
    (
        '[framing]\nchecksum_separator = "*"',
        "framing.checksum_separator: a separator sits between body and checksum",
    ),
    (
        '[framing]\ntype = "fixed"\nlength = 2\nsync = "AA55"',
        "framing.length: fixed framing needs a length above",
    ),
    (
        '[[rules.layout]]\nname = "x"\nbits = [9, 3]',
        "rules[0].layout[0].bits: must be [first, last] bit numbers",
    ),
    (
        '[[rules.layout]]\nname = "x"\nbits = [0, 3]\ntype = "text"',
        "rules[0].layout[0].type: text reads whole bytes",
    ),
    (
        '[[rules.layout]]\nname = "x"\ntype = "float16"',
        "rules[0].layout[0].type: must be one of uint",
    ),
    (
        '[[rules.checks]]\ntype = "even_parity"\nbits = [1, 8]\nagainst = [0, 1]',
        "rules[0].checks[0].against: a parity check is one bit",
    ),
    (
        '[[rules.checks]]\ntype = "sum"\nbits = [0, 11]\nagainst = [16, 23]',
        "rules[0].checks[0].bits: bits must be whole 8-bit words",
    ),
    ("clears = true", "rules[0].clears: clears needs the state it clears"),
    ('state = "x"\nclears = true', "rules[0].state: no rule sets the state 'x' this one clears"),
    (
        '[[rules.layout]]\nname = "x"\noffset = 510\nsize = 4',
        "rules[0].layout[0]: reaches byte 513, beyond the longest frame (512 bytes",
    ),
    ('[[rules.layout]]\nname = "x"\nname2 = 1', "rules[0].layout[0].name2: unknown key 'name2'"),
    (
        '[[rules.layout]]\nname = "x"\n[[rules.layout]]\nname = "x"',
        "rules[0].layout[1].name: field 'x' is given twice",
    ),
    (
        '[[rules.checks]]\ntype = "odd_parity"\nbits = [0, 8]\nagainst = [9000, 9000]',
        "rules[0].checks[0]: reaches byte 1125",
    ),
    (
        'time_format = "%H%M"',
        "rules[0].time_format: no regex group or layout field named 'device_time'",
    ),
]


@pytest.mark.parametrize(("mistake", "message"), MISTAKES)
def test_every_dialect_mistake_names_the_file_and_the_field(
    tmp_path: Path, mistake: str, message: str
) -> None:
    rule = '[[rules]]\nmatch = "X"\nkind = "gate.alarm"\n'
    text = (
        f'name = "bad"\n{mistake}\n{rule}'
        if not mistake.startswith(("[[rules.", "clears", "state", "time_format"))
        else (f'name = "bad"\n{rule}{mistake}\n')
    )
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_dialect(str(path))
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)


def test_a_wiegand34_card_with_a_flipped_bit_is_never_taken_for_another_checkpoint(
    ctx: RecordingContext, device: PtyDevice, drivers: list[SerialDialectDriver]
) -> None:
    good = encode_frame("wiegand34-hex", "", "", 0, ["facility=1234", "card=42"])
    other = encode_frame("wiegand34-hex", "", "", 0, ["facility=1234", "card=43"])
    flipped = f"{int(good[:9], 16) ^ (1 << 1):09X}\r\n".encode()  # card 42 -> 43 on the wire
    tags = {good[:9].decode(): "East stairs", other[:9].decode(): "Pharmacy door"}
    patrol = start(
        RfidPatrolDriver,
        ctx,
        device,
        drivers,
        dialect="wiegand34-hex",
        checkpoints=tags,
        unparsed_burst=5,
    )
    device.write(flipped + good)
    [read] = ctx.wait_for("patrol.checkpoint", timeout=DEADLINE)
    assert read.payload["checkpoint"] == "East stairs"
    [unparsed] = ctx.wait_for("serial.unparsed", timeout=DEADLINE)
    assert unparsed.payload["code"] == "bad_parity"
    assert patrol.health().counters["bad_parity"] == 1
    assert len(kinds(ctx, "patrol.checkpoint")) == 1
