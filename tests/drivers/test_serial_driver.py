"""Serial drivers over real pseudo-terminals, bytes written as the device would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse_section
from agent.driver import CommandError, Driver
from agent.testing.agent import wait_until
from agent.testing.serial_frames import multizone, odd_parity
from agent.testing.serial_pty import PtyDevice
from drivers.serial_common.driver import SerialDialectDriver
from drivers.serial_gate import SerialGateDriver
from drivers.xray import XrayDriver
from tests.support.context import RecordingContext

FAST = {"reconnect_min": 0.05, "reconnect_max": 0.2, "read_timeout": 0.05}

Starter = Callable[..., Any]


@pytest.fixture
def start(ctx: RecordingContext, device: PtyDevice) -> Iterator[Starter]:
    """Start a driver on the pty; every driver started is stopped afterwards."""
    started: list[Driver] = []

    def _start(cls: type[SerialDialectDriver], wait_online: bool = True, **options: Any) -> Any:
        config = parse_section(
            cls.config_class, {"port": str(device.link), **FAST, **options}, "drivers.gate1"
        )
        driver = cls(ctx, config)
        driver.start()
        started.append(driver)
        if wait_online:
            ctx.wait_for("device.online")
        return driver

    yield _start
    for driver in started:
        driver.stop()


def events(ctx: RecordingContext, kind: str) -> list[Any]:
    return [e for e in ctx.events if e.kind == kind]


def test_gate_alarm_transits_and_unparsed(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(SerialGateDriver, aggregate_interval=0.2)
    device.write(b"PASS IN\r\nPASS IN\r\nALARM ZONE 3,4 LEVEL 85\r\nPASS OUT\r\n\x8f\x99garble\r\n")
    [alarm] = ctx.wait_for("gate.alarm")
    assert alarm.priority.label == "high"
    assert alarm.payload["zones"] == [3, 4] and alarm.payload["intensity"] == 85
    assert bytes.fromhex(alarm.payload["raw"]) == b"ALARM ZONE 3,4 LEVEL 85\r\n"
    # The counts may straddle two aggregation intervals on a slow machine: add them up.
    wait_until(
        lambda: sum(t.payload["messages"] for t in events(ctx, "gate.transit")) >= 3,
        what="three transits counted",
    )
    transits = events(ctx, "gate.transit")
    assert {t.priority.label for t in transits} == {"low"}
    assert sum(t.payload["in"] for t in transits) == 2
    assert sum(t.payload["out"] for t in transits) == 1
    [unparsed] = ctx.wait_for("serial.unparsed")
    assert unparsed.priority.label == "low"
    assert unparsed.payload["hex"].startswith("8f 99 67")
    assert unparsed.payload["reason"] == "no rule matched"
    health = gate.health()
    assert health.state == "ok"
    assert health.counters["no_rule"] == 1 and health.counters["messages"] == 4


def test_flood_of_repeated_alarms_is_folded_and_counted(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    # The window must hold all 50 lines even when the reader runs late on a loaded machine.
    gate = start(SerialGateDriver, dedup_window=2.0)
    device.write(b"ALARM Z3 I85\r\n" * 50)
    ctx.wait_for("gate.alarm")
    # "messages" counts a read's lines before they are handled: wait for the last one folded.
    wait_until(lambda: gate.health().counters["flood_suppressed"] >= 49, what="49 alarms folded")
    assert len(events(ctx, "gate.alarm")) == 1
    assert gate.health().counters["flood_suppressed"] == 49
    time.sleep(2.1)  # past the window
    device.write(b"ALARM Z3 I85\r\n")
    second = ctx.wait_for("gate.alarm", 2)[1]
    assert second.payload["repeats"] == 49
    device.write(b"ALARM Z4 I85\r\n")  # a different alarm is never folded into another
    assert ctx.wait_for("gate.alarm", 3)[2].payload["zones"] == [4]


def test_garbage_flood_is_rate_limited_but_counted(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(SerialGateDriver, unparsed_per_minute=1, unparsed_burst=3)
    device.write(b"noise line\r\n" * 200 + b"TAMPER\r\n")
    ctx.wait_for("gate.tamper")
    assert len(events(ctx, "serial.unparsed")) == 3
    counters = gate.health().counters
    assert counters["no_rule"] == 200
    assert counters["unparsed_rate_limited"] == 197


def test_overlong_line_and_wrong_baud_rate_never_break_the_driver(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(SerialGateDriver)
    device.write(b"A" * 100_000)
    device.write(bytes(range(256)) * 20)
    device.write(b"\r\nALARM Z9\r\n")
    [alarm] = ctx.wait_for("gate.alarm")
    assert alarm.payload["zones"] == [9]
    counters = gate.health().counters
    assert counters["overlong"] >= 1
    assert counters["buffered"] <= 2 * 256 + 8


def test_unplug_and_replug_at_the_same_symlink(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(SerialGateDriver)
    device.unplug()
    [offline] = ctx.wait_for("device.offline")
    assert offline.priority.label == "high"
    assert offline.payload["reason"].startswith(("device disconnected", "device not present"))
    assert gate.health().state == "degraded"
    time.sleep(0.3)  # a few reconnect attempts fail while it is away
    device.plug()
    online = ctx.wait_for("device.online", 2)[1]
    assert online.payload["resolved"] == str(device.link.resolve())
    device.write(b"ALARM Z1\r\n")
    ctx.wait_for("gate.alarm")
    assert gate.health().state == "ok"
    assert gate.health().counters["disconnects"] == 1


def test_missing_port_at_start_does_not_block_and_is_reported(
    ctx: RecordingContext, tmp_path: Path, start: Starter
) -> None:
    absent = PtyDevice(tmp_path / "by-id-gate", plugged=False)
    began = time.monotonic()
    start(SerialGateDriver, wait_online=False, port=str(absent.link))
    assert time.monotonic() - began < 2.0  # start() returns; the reader retries
    [offline] = ctx.wait_for("device.offline")
    assert "not present" in offline.payload["reason"]
    absent.plug()
    try:
        ctx.wait_for("device.online")
        absent.write(b"TAMPER\r\n")
        ctx.wait_for("gate.tamper")
    finally:
        absent.close()


def test_seven_bit_odd_parity_gate_with_reply(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    start(SerialGateDriver, dialect="multizone-gate")
    device.write(odd_parity(multizone(b"M0007 AL Z01,02 I150") + multizone(b"M0008 RS")))
    [alarm] = ctx.wait_for("gate.alarm")
    assert alarm.payload["zones"] == [1, 2] and alarm.payload["msgno"] == "0007"
    ctx.wait_for("device.reset")
    assert device.read(len(multizone(b"RA"))) == multizone(b"RA")


def test_poll_mode_counters_and_silence(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(SerialGateDriver, dialect="polled-gate", poll_interval=0.1, aggregate_interval=0.2)
    assert device.read(3) == b"AC\r"
    device.write(b"P=000100 TA=000004\r\n")
    assert device.read(3) == b"AC\r"
    device.write(b"P=000103 TA=000005\r\n")
    [alarm] = ctx.wait_for("gate.alarm")
    assert alarm.payload == {"count": 1, "counter": "alarms", "raw": alarm.payload["raw"]}
    [transit] = ctx.wait_for("gate.transit")
    assert transit.payload["passages"] == 3
    # The gate stops answering: after offline_after (3) polls it is reported.
    offline = ctx.wait_for("device.offline")[0]
    assert offline.payload["reason"] == "no answer to 3 polls in a row"
    assert gate.health().state == "degraded"
    device.write(b"P=000103 TA=000005\r\n")
    ctx.wait_for("device.online", 2)
    assert gate.health().state == "ok"


def test_xray_alerts(ctx: RecordingContext, device: PtyDevice, start: Starter) -> None:
    start(XrayDriver)
    device.write(b"TDR THREAT KNIFE BAG 77\r\nINTERLOCK OPEN\r\n")
    [alert] = ctx.wait_for("xray.alert")
    assert alert.priority.label == "high"
    assert alert.payload["class"] == "automatic" and alert.payload["threat"] == "KNIFE"
    [tamper] = ctx.wait_for("xray.tamper")
    assert tamper.priority.label == "high"


def test_priorities_labels_and_simulate(
    ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    gate = start(
        SerialGateDriver,
        priorities={"gate.tamper": "critical"},
        labels={"zones": {"3": "left knee"}, "class": {"warble": "large object"}},
    )
    assert gate.simulate("bytes", {"text": "ALARM Z3,5\r\nWARBLE\r\nTAMPER\r\n"}) == {
        "bytes": 28,
        "events": 3,
    }
    alarm, warble = ctx.wait_for("gate.alarm", 2)
    assert alarm.payload["zones_labels"] == ["left knee", "5"]
    assert warble.payload["class_label"] == "large object"
    assert ctx.wait_for("gate.tamper")[0].priority.label == "critical"
    with pytest.raises(CommandError, match="hex"):
        gate.simulate("bytes", {"hex": "zz"})


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"dialect": "no-such-gate"}, "drivers.gate1.dialect: unknown dialect"),
        ({"port": ""}, "drivers.gate1.port: must name a serial port"),
        ({"priorities": {"gate.alarm": "urgent"}}, "drivers.gate1.priorities"),
        ({"baudrate": "fast"}, "drivers.gate1.baudrate: expected an integer"),
        ({"reconnect_min": 5.0, "reconnect_max": 1.0}, "drivers.gate1.reconnect_max"),
        ({"parity": "X"}, "drivers.gate1.parity"),
    ],
)
def test_config_errors_name_the_field(options: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_section(
            SerialGateDriver.config_class, {"port": "/dev/ttyUSB0", **options}, "drivers.gate1"
        )
    assert where in str(err.value)


def test_dialect_file_from_config(
    tmp_path: Path, ctx: RecordingContext, device: PtyDevice, start: Starter
) -> None:
    dialect = tmp_path / "lobby-gate.toml"
    dialect.write_text(
        "[framing]\nterminators = [';']\n[[rules]]\nmatch = 'BEEP(?P<zone>\\d)'\nkind = 'gate.alarm'\n"
        "fields = { zone = 'int' }\n"
    )
    start(SerialGateDriver, dialect=str(dialect))
    device.write(b"BEEP4;")
    assert ctx.wait_for("gate.alarm")[0].payload["zone"] == 4
