"""Guard patrol: tag maps, guards, rounds and missed windows (schedule logic and driver over a pty)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse_section
from agent.testing.serial_frames import rdm6300
from agent.testing.serial_pty import PtyDevice
from drivers.rfid_patrol import PatrolSchedule, RfidPatrolDriver, RoundConfig
from tests.support.context import RecordingContext

DAY = datetime(2026, 3, 14, tzinfo=UTC)


def at(hours: int, minutes: int = 0, days: int = 0) -> datetime:
    return DAY + timedelta(days=days, hours=hours, minutes=minutes)


NIGHT = RoundConfig(
    name="night", checkpoints=["East stairs", "Pharmacy"], times=["22:00"], window_minutes=30
)


def test_missed_checkpoint_is_reported_once_when_the_window_closes() -> None:
    schedule = PatrolSchedule([NIGHT], now=at(21))
    assert schedule.record("East stairs", at(22, 10)) == ["night"]
    assert schedule.due(at(22, 29)) == []
    [missed] = schedule.due(at(22, 31))
    assert (missed.round, missed.checkpoint, missed.read) == ("night", "Pharmacy", ("East stairs",))
    assert (missed.window_start, missed.window_end) == (at(22), at(22, 30))
    assert schedule.due(at(22, 40)) == []


def test_complete_round_misses_nothing_and_reads_outside_windows_serve_no_round() -> None:
    schedule = PatrolSchedule([NIGHT], now=at(21))
    assert schedule.record("Pharmacy", at(21, 59)) == []
    schedule.record("Pharmacy", at(22, 1))
    schedule.record("East stairs", at(22, 2))
    assert schedule.due(at(23)) == []


def test_window_opened_while_not_watching_is_not_judged() -> None:
    schedule = PatrolSchedule([NIGHT], now=at(22, 10))
    assert schedule.due(at(22, 31)) == []
    assert len(schedule.due(at(22, 31, days=1))) == 2  # the next night is watched in full


def test_restart_mid_window_keeps_the_reads(tmp_path: Path) -> None:
    state = tmp_path / "patrol.json"
    first = PatrolSchedule([NIGHT], now=at(21), state_path=state)
    first.due(at(22, 5))
    first.record("East stairs", at(22, 10))
    second = PatrolSchedule([NIGHT], now=at(22, 15), state_path=state)
    assert [m.checkpoint for m in second.due(at(22, 31))] == ["Pharmacy"]
    third = PatrolSchedule([NIGHT], now=at(22, 35), state_path=state)
    assert third.due(at(22, 40)) == []  # judged before the restart: not again


def test_window_across_midnight() -> None:
    late = RoundConfig(
        name="late", checkpoints=["East stairs", "Pharmacy"], times=["23:50"], window_minutes=20
    )
    schedule = PatrolSchedule([late], now=at(23))
    assert schedule.record("East stairs", at(0, 5, days=1)) == ["late"]
    assert [m.checkpoint for m in schedule.due(at(0, 11, days=1))] == ["Pharmacy"]


def test_unreadable_state_file_starts_afresh(tmp_path: Path) -> None:
    state = tmp_path / "patrol.json"
    state.write_text("{not json")
    schedule = PatrolSchedule([NIGHT], now=at(21), state_path=state)
    assert len(schedule.due(at(22, 31))) == 2


# -- the driver over a pty -------------------------------------------------------------

GUARD_FOB = bytes.fromhex("01001293D8")  # printed 0001217496
STAIRS_FOB = bytes.fromhex("0100CDA4EC")  # printed 0013477100
PHARMACY_FOB = bytes.fromhex("2900DEB30A")
STRANGER_FOB = bytes.fromhex("0A0B0C0D0E")

OPTIONS: dict[str, Any] = {
    "reconnect_min": 0.05,
    "read_timeout": 0.05,
    "check_interval": 0.05,
    "guards": {"0001217496": "guard-17"},
    "checkpoints": {"13477100": "East stairs", "2900deb30a": "Pharmacy"},
    "rounds": [
        {
            "name": "night",
            "checkpoints": ["East stairs", "Pharmacy"],
            "times": ["22:00"],
            "window_minutes": 10,
        }
    ],
}


class FakeClock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def patrol(
    tmp_path: Path,
) -> Iterator[tuple[RfidPatrolDriver, RecordingContext, PtyDevice, FakeClock]]:
    device = PtyDevice(tmp_path / "reader")
    ctx = RecordingContext(tmp_path, name="patrol")
    config = parse_section(
        RfidPatrolDriver.config_class, {"port": str(device.link), **OPTIONS}, "drivers.patrol"
    )
    driver = RfidPatrolDriver(ctx, config)
    clock = FakeClock(at(21, 59))
    driver.clock = clock
    driver.start()
    ctx.wait_for("device.online")
    yield driver, ctx, device, clock
    driver.stop()
    device.close()


def test_checkpoint_guard_and_unknown_tags(
    patrol: tuple[RfidPatrolDriver, RecordingContext, PtyDevice, FakeClock],
) -> None:
    driver, ctx, device, clock = patrol
    device.write(rdm6300(GUARD_FOB) * 3)
    [guard] = ctx.wait_for("patrol.guard")
    assert guard.payload["guard"] == "guard-17"
    clock.now = at(22, 1)
    device.write(rdm6300(STAIRS_FOB) * 20)  # held in front of the reader: one read
    device.write(rdm6300(STRANGER_FOB) + rdm6300(STAIRS_FOB)[:-2] + b"00\x03")
    [checkpoint] = ctx.wait_for("patrol.checkpoint")
    assert checkpoint.priority.label == "normal"
    assert checkpoint.payload["checkpoint"] == "East stairs"
    assert checkpoint.payload["guard"] == "guard-17"
    assert checkpoint.payload["rounds"] == ["night"]
    assert checkpoint.payload["printed"] == "0013477100"
    [unknown] = ctx.wait_for("patrol.unknown_tag")
    assert unknown.priority.label == "low"
    assert unknown.payload["tag"] == "0A0B0C0D0E"
    ctx.wait_for("serial.unparsed")  # the corrupted frame
    assert len([e for e in ctx.events if e.kind == "patrol.checkpoint"]) == 1
    assert "guard-17" in driver.health().detail


def test_missed_checkpoint_when_the_window_closes(
    patrol: tuple[RfidPatrolDriver, RecordingContext, PtyDevice, FakeClock],
) -> None:
    _, ctx, device, clock = patrol
    clock.now = at(22, 2)
    device.write(rdm6300(PHARMACY_FOB))
    ctx.wait_for("patrol.checkpoint")
    clock.now = at(22, 11)
    [missed] = ctx.wait_for("patrol.missed")
    assert missed.priority.label == "high"
    assert missed.payload["checkpoint"] == "East stairs"
    assert missed.payload["round"] == "night"
    assert missed.payload["read"] == ["Pharmacy"]


@pytest.mark.parametrize(
    ("options", "where"),
    [
        (
            {"rounds": [{"name": "r", "checkpoints": ["Roof"], "times": ["22:00"]}]},
            "drivers.p.rounds[0].checkpoints",
        ),
        (
            {"rounds": [{"name": "r", "checkpoints": ["A"], "times": ["25:00"]}]},
            "drivers.p.rounds[0].times[0]",
        ),
        (
            {"rounds": [{"name": "r", "checkpoints": ["A"], "times": []}]},
            "drivers.p.rounds[0].times",
        ),
        ({"guards": {"0001": "g"}, "checkpoints": {"1": "A"}}, "drivers.p.guards: tag '1' is both"),
    ],
)
def test_config_errors(options: dict[str, Any], where: str) -> None:
    table = {"port": "/dev/ttyUSB0", "checkpoints": {"AA": "A"}, **options}
    with pytest.raises(ConfigError) as err:
        parse_section(RfidPatrolDriver.config_class, table, "drivers.p")
    assert where in str(err.value)
