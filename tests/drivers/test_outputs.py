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
from agent.testing.agent import wait_until
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


#: Timers never fire early, so configured times are lower bounds of what the pins show; how
#: much later a change comes depends on the machine's load and is not asserted here.
SLACK = 0.005  # rounding of the recorded timestamps


def durations(p: MockPin) -> list[float]:
    """Seconds each state lasted, from the first change on (on, off, on, ... for a blink):
    a mock pin records with each change how long the state before it lasted."""
    return [state.timestamp for state in p.states[2:]]


def silence(ctx: RecordingContext, target: str | None = None, **args: Any) -> list[Any]:
    cmd = Command(id="c1", name="silence", issued_at=time.time(), args=args, target=target)
    return [handler(cmd) for handler in ctx.handlers["silence"]]


def test_steady_for_a_duration_then_off(pins: MockFactory, make: Make) -> None:
    _, ctx = make({"kind": "panic.pressed", "output": "siren", "duration": 0.3})
    siren = pin(pins, SIREN)
    siren.clear_states()
    post(ctx, "panic.pressed")
    assert siren.state is True
    wait_until(lambda: siren.state is False, what="the siren off after its duration")
    assert [s.state for s in siren.states] == [False, True, False]
    assert durations(siren)[0] >= 0.3 - SLACK


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
    wait_until(lambda: len(strobe.states) >= 6, what="two and a half blinks")
    assert driver.health().detail == "strobe: blink"
    post(ctx, "panic.resolved")
    assert strobe.state is False
    states = [s.state for s in strobe.states]
    assert states[:6] == [False, True, False, True, False, True]
    on, off = durations(strobe)[0:4:2], durations(strobe)[1:4:2]
    assert min(on) >= 0.2 - SLACK and min(off) >= 0.1 - SLACK
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
    wait_until(lambda: len(siren.states) >= 7, what="three pulses")
    wait_until(lambda: driver.health().detail == "all off", what="the pulse train to end")
    time.sleep(0.3)  # longer than a pulse: no fourth one comes
    assert [s.state for s in siren.states] == [False, True, False, True, False, True, False]


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
    wait_until(lambda: len(siren.states) > 2, what="the siren blinking")
    assert silence(ctx, by="operator 7") == [{"silenced": ["siren"]}]
    (event,) = ctx.events
    assert event.kind == "outputs.silenced"
    assert event.payload == {"outputs": ["siren"], "command": "c1", "by": "operator 7"}
    siren_changes, strobe_changes = len(siren.states), len(strobe.states)
    wait_until(lambda: len(strobe.states) > strobe_changes + 2, what="the strobe blinking on")
    assert siren.state is False and len(siren.states) == siren_changes
    assert driver.health().detail == "strobe: blink"
    # A new alarm sounds again.
    post(ctx, "panic.pressed")
    wait_until(lambda: len(siren.states) > siren_changes, what="the siren sounding again")


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
