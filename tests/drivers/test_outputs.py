"""The outputs driver: rule patterns observed on gpiozero MockFactory output pins."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from agent.config import ConfigError, parse_section
from agent.driver import Command, CommandError
from agent.event import Event, Priority
from drivers.gpio_common import mock_factory
from drivers.outputs import OutputsConfig, OutputsDriver
from tests.support.context import RecordingContext

SIREN, STROBE, LAMP = 5, 6, 13
OUTPUTS = {
    "siren": {"pin": SIREN, "device": "siren"},
    "strobe": {"pin": STROBE, "device": "strobe"},
    "lamp": {"pin": LAMP, "device": "led", "active_high": False},
}

Make = Callable[..., tuple[OutputsDriver, RecordingContext]]


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = mock_factory()
    factory.reset()
    yield factory
    factory.reset()


@pytest.fixture
def make(pins: MockFactory, tmp_path: Path) -> Iterator[Make]:
    started: list[OutputsDriver] = []

    def make(*rules: dict[str, Any]) -> tuple[OutputsDriver, RecordingContext]:
        table = {"outputs": OUTPUTS, "rules": list(rules), "pin_factory": "mock"}
        config = parse_section(OutputsConfig, table, "drivers.out")
        ctx = RecordingContext(tmp_path, name="out")
        driver = OutputsDriver(ctx, config)
        driver.start()
        started.append(driver)
        return driver, ctx

    yield make
    for driver in started:
        driver.stop()


def post(ctx: RecordingContext, kind: str, source: str = "ward3_bed1", test: bool = False) -> None:
    """Deliver an event from another driver to the watchers, as the core's bus does."""
    event = Event(
        kind=kind, source=source, priority=Priority.CRITICAL, site="s", device="d", seq=1, test=test
    )
    for watcher in ctx.watchers:
        watcher(event)


def pin(pins: MockFactory, number: int) -> MockPin:
    return pins.pin(number)


def silence(ctx: RecordingContext, target: str | None = None, **args: Any) -> list[Any]:
    cmd = Command(id="c1", name="silence", issued_at=time.time(), args=args, target=target)
    return [handler(cmd) for handler in ctx.handlers["silence"]]


def test_steady_for_a_duration_then_off(pins: MockFactory, make: Make) -> None:
    _, ctx = make({"kind": "panic.pressed", "output": "siren", "duration": 0.3})
    siren = pin(pins, SIREN)
    siren.clear_states()
    post(ctx, "panic.pressed")
    assert siren.state is True
    time.sleep(0.5)
    assert siren.state is False
    siren.assert_states_and_times([(0.0, False), (0.0, True), (0.3, False)])


def test_blink_follows_on_and_off_times_until_an_off_rule(pins: MockFactory, make: Make) -> None:
    driver, ctx = make(
        {
            "kind": "panic.pressed",
            "output": "strobe",
            "pattern": "blink",
            "on_time": 0.2,
            "off_time": 0.1,
        },
        {"kind": "panic.resolved", "output": "strobe", "pattern": "off"},
    )
    strobe = pin(pins, STROBE)
    strobe.clear_states()
    post(ctx, "panic.pressed")
    time.sleep(0.75)
    assert driver.health().detail == "strobe: blink"
    post(ctx, "panic.resolved")
    assert strobe.state is False
    strobe.assert_states_and_times(
        [(0.0, False), (0.0, True), (0.2, False), (0.1, True), (0.2, False), (0.1, True)]
    )
    count = len(strobe.states)
    time.sleep(0.4)
    assert len(strobe.states) == count  # stays off
    assert driver.health().detail == "all off"


def test_pulse_gives_count_pulses_then_stays_off(pins: MockFactory, make: Make) -> None:
    driver, ctx = make(
        {
            "kind": "panic.acknowledged",
            "output": "siren",
            "pattern": "pulse",
            "on_time": 0.05,
            "off_time": 0.05,
            "count": 3,
        }
    )
    siren = pin(pins, SIREN)
    siren.clear_states()
    post(ctx, "panic.acknowledged")
    time.sleep(0.6)
    assert [s.state for s in siren.states] == [False, True, False, True, False, True, False]
    assert driver.health().detail == "all off"


def test_active_low_output_is_inverted_on_the_pin(pins: MockFactory, make: Make) -> None:
    _, ctx = make({"kind": "panic.*", "output": "lamp"})
    lamp = pin(pins, LAMP)
    assert lamp.state is True  # off means high for an active-low relay board
    post(ctx, "panic.stuck")
    assert lamp.state is False


def test_source_glob_and_test_events(pins: MockFactory, make: Make) -> None:
    _, ctx = make(
        {"kind": "panic.pressed", "source": "ward3_*", "output": "siren", "test_events": False},
        {"source": "ward4_*", "output": "strobe"},
    )
    siren, strobe = pin(pins, SIREN), pin(pins, STROBE)
    post(ctx, "panic.pressed", source="ward4_bed2")
    assert (siren.state, strobe.state) == (False, True)
    post(ctx, "panic.pressed", source="ward3_bed1", test=True)
    assert siren.state is False
    post(ctx, "panic.pressed", source="ward3_bed1")
    assert siren.state is True


def test_silence_stops_audible_outputs_and_leaves_lights_on(pins: MockFactory, make: Make) -> None:
    driver, ctx = make(
        {
            "kind": "panic.pressed",
            "output": "siren",
            "pattern": "blink",
            "on_time": 0.05,
            "off_time": 0.05,
        },
        {
            "kind": "panic.pressed",
            "output": "strobe",
            "pattern": "blink",
            "on_time": 0.05,
            "off_time": 0.05,
        },
    )
    siren, strobe = pin(pins, SIREN), pin(pins, STROBE)
    post(ctx, "panic.pressed")
    time.sleep(0.2)
    assert silence(ctx, by="operator 7") == [{"silenced": ["siren"]}]
    (event,) = ctx.events
    assert event.kind == "outputs.silenced"
    assert event.payload == {"outputs": ["siren"], "command": "c1", "by": "operator 7"}
    siren_changes, strobe_changes = len(siren.states), len(strobe.states)
    time.sleep(0.3)
    assert siren.state is False and len(siren.states) == siren_changes
    assert len(strobe.states) > strobe_changes + 2
    assert driver.health().detail == "strobe: blink"
    # A new alarm sounds again.
    post(ctx, "panic.pressed")
    time.sleep(0.15)
    assert len(siren.states) > siren_changes


def test_silence_addressing(make: Make) -> None:
    _, ctx = make({"kind": "panic.pressed", "output": "siren"})
    assert silence(ctx, target="other") == [None]
    assert silence(ctx, output="elsewhere") == [None]
    assert silence(ctx, output="siren") == [{"silenced": []}]
    with pytest.raises(CommandError, match="out has no output 'elsewhere'"):
        silence(ctx, target="out", output="elsewhere")
    with pytest.raises(CommandError, match=r"args\.output must be an output name"):
        silence(ctx, output=3)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"outputs": OUTPUTS, "rules": [{"kind": "panic.*", "output": "bell"}]},
            r"drivers\.out\.rules\[0\]\.output: no output named 'bell'",
        ),
        (
            {"outputs": OUTPUTS, "rules": [{"output": "siren"}]},
            r"drivers\.out\.rules\[0\]: give kind and/or source",
        ),
        (
            {"outputs": OUTPUTS, "rules": [{"kind": "x", "output": "siren", "pattern": "wail"}]},
            r"drivers\.out\.rules\[0\]\.pattern: expected one of",
        ),
        (
            {"outputs": {"a": {"pin": 5}, "b": {"pin": 5}}},
            r"drivers\.out\.outputs\.b\.pin: is the same pin as outputs\.a",
        ),
        ({"outputs": {}}, r"drivers\.out\.outputs: define at least one output"),
    ],
)
def test_config_errors_name_the_field(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section(OutputsConfig, table, "drivers.out")
