"""The panic-button driver against gpiozero MockFactory pins driven like real contacts."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPin

from agent.config import ConfigError, parse_section
from agent.driver import Command, CommandError
from agent.event import Priority
from agent.testing.agent import DEADLINE, wait_until
from drivers.gpio_common import GPIOUnavailable, mock_factory
from drivers.panic_button import PanicButtonConfig, PanicButtonDriver
from tests.support.context import RecordingContext

BUTTON, LOOP, LED_PIN = 17, 27, 22
LOCATION = {"ward": "A3", "room": "12", "floor": 2}
EXPECTED_LOCATION = {"ward": "A3", "room": "12", "floor": 2}


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    factory = mock_factory()
    factory.reset()
    yield factory
    factory.reset()


@pytest.fixture
def make(
    pins: MockFactory, tmp_path: Path
) -> Iterator[Callable[..., tuple[PanicButtonDriver, RecordingContext]]]:
    started: list[PanicButtonDriver] = []

    def make(**options: Any) -> tuple[PanicButtonDriver, RecordingContext]:
        table = {
            "pin": BUTTON,
            "location": LOCATION,
            "pin_factory": "mock",
            "bounce_time": 0.01,
            **options,
        }
        config = parse_section(PanicButtonConfig, table, "drivers.button1")
        ctx = RecordingContext(tmp_path, name="button1")
        driver = PanicButtonDriver(ctx, config)
        driver.start()
        started.append(driver)
        return driver, ctx

    yield make
    for driver in started:
        driver.stop()


def pin(number: int) -> MockPin:
    return Device.pin_factory.pin(number)  # type: ignore[union-attr]


def tap(driver: PanicButtonDriver) -> None:
    """A clean press and release of the active-low button, each held until the driver has
    taken it in: however late its threads run, a tap is never merged into the next one."""
    counters = driver.health().counters
    presses, releases = counters.get("presses", 0), counters.get("releases", 0)
    pin(BUTTON).drive_low()
    wait_until(lambda: driver.health().counters.get("presses", 0) > presses, what="the press")
    pin(BUTTON).drive_high()
    wait_until(lambda: driver.health().counters.get("releases", 0) > releases, what="the release")


def bounce(p: MockPin, final_low: bool, edges: int = 5) -> None:
    """A burst of contact bounce, all inside the 10 ms debounce window, ending at a level."""
    for i in range(edges):
        if (i % 2 == 0) == final_low:
            p.drive_low()
        else:
            p.drive_high()
    if final_low:
        p.drive_low()
    else:
        p.drive_high()


def command(ctx: RecordingContext, name: str, target: str | None = None, **args: Any) -> list[Any]:
    cmd = Command(
        id=f"c-{time.monotonic_ns()}", name=name, issued_at=time.time(), args=args, target=target
    )
    return [handler(cmd) for handler in ctx.handlers[name]]


def wait_for(
    ctx: RecordingContext, kind: str, count: int = 1, timeout: float = DEADLINE
) -> list[Any]:
    """Events of ``kind`` once there are ``count`` of them (polling: fails, never hangs)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in ctx.events if e.kind == kind]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, (
                f"expected {count} {kind!r}, got {[e.kind for e in ctx.events]}"
            )
            return found
        time.sleep(0.005)


def settle(seconds: float = 0.1) -> None:
    time.sleep(seconds)


# -- activation --------------------------------------------------------------------------


def test_press_raises_a_critical_alarm_with_location_and_release_follows(make: Any) -> None:
    _driver, ctx = make()
    pin(BUTTON).drive_low()
    (pressed,) = wait_for(ctx, "panic.pressed")
    assert pressed.priority is Priority.CRITICAL
    assert pressed.payload == {"location": EXPECTED_LOCATION, "mode": "press", "presses": 1}
    assert pressed.source == "button1" and pressed.test is False
    time.sleep(0.05)
    pin(BUTTON).drive_high()
    (released,) = wait_for(ctx, "panic.released")
    assert released.payload["alarm"] == pressed.id
    assert released.payload["location"] == EXPECTED_LOCATION
    assert released.payload["held"] >= 0.04


def test_contact_bounce_makes_one_press_and_one_release(make: Any) -> None:
    # A wide window: each burst of bounce must fall inside it even on a loaded machine.
    driver, ctx = make(bounce_time=0.5)
    bounce(pin(BUTTON), final_low=True)
    wait_for(ctx, "panic.pressed")
    bounce(pin(BUTTON), final_low=False)
    wait_for(ctx, "panic.released")
    settle(0.6)  # past the last window: nothing more comes
    assert ctx.kinds() == ["panic.pressed", "panic.released"]
    assert driver.health().counters["bounces_filtered"] >= 8
    assert driver.health().counters["presses"] == 1


def test_a_release_that_ends_inside_the_bounce_window_is_not_lost(make: Any) -> None:
    driver, ctx = make(bounce_time=0.5)
    p = pin(BUTTON)
    p.drive_low()
    p.drive_high()  # ignored as bounce: the settle check must still see the release
    wait_for(ctx, "panic.released")
    # And a press that ends a bounce burst on "pressed" after a release is seen too.
    p.drive_low()
    p.drive_high()
    p.drive_low()
    wait_until(lambda: driver.health().counters["presses"] == 2, what="the second press")
    settle(0.6)  # past the last window: the burst stays one press
    assert driver.health().counters["presses"] == 2


def test_normally_closed_button_with_external_pull_up_pressed_means_pin_high(make: Any) -> None:
    # An external pull-up and a normally-closed contact to GND: at rest the contact holds the
    # line low (a floating mock pin starts low); pressing opens it and the resistor pulls high.
    _driver, ctx = make(pull_up="off", active_state="high")
    p = pin(BUTTON)
    settle()
    assert ctx.kinds() == []
    p.drive_high()
    wait_for(ctx, "panic.pressed")
    p.drive_low()
    wait_for(ctx, "panic.released")


def test_pin_with_external_resistor_needs_active_state() -> None:
    with pytest.raises(ConfigError, match=r"drivers\.b\.active_state: required when pull_up"):
        parse_section(
            PanicButtonConfig, {"pin": 5, "location": LOCATION, "pull_up": "off"}, "drivers.b"
        )


def test_hold_mode_ignores_a_short_tap_and_raises_on_a_hold(make: Any) -> None:
    # The tap must end well inside hold_time even when this thread is slow to run.
    driver, ctx = make(mode="hold", hold_time=1.0)
    tap(driver)
    settle(1.2)
    assert "panic.pressed" not in ctx.kinds()
    pin(BUTTON).drive_low()
    (pressed,) = wait_for(ctx, "panic.pressed")
    assert pressed.payload["mode"] == "hold"
    pin(BUTTON).drive_high()
    wait_for(ctx, "panic.released")


@pytest.mark.parametrize(("mode", "needed"), [("double", 2), ("triple", 3)])
def test_multi_press_modes_need_their_presses_within_the_window(
    make: Any, mode: str, needed: int
) -> None:
    driver, ctx = make(mode=mode, window=10.0)  # the widest window: a slow thread stays in it
    for _ in range(needed - 1):
        tap(driver)
    assert "panic.pressed" not in ctx.kinds()
    tap(driver)
    (pressed,) = wait_for(ctx, "panic.pressed")
    assert pressed.payload["presses"] == needed


@pytest.mark.parametrize("mode", ["double", "triple"])
def test_presses_spread_wider_than_the_window_raise_nothing(make: Any, mode: str) -> None:
    driver, ctx = make(mode=mode, window=0.2)
    for _ in range(3):
        tap(driver)
        settle(0.3)
    assert driver.health().counters["presses"] == 3
    assert "panic.pressed" not in ctx.kinds()


def test_presses_while_an_alarm_is_active_are_counted_not_new_alarms(make: Any) -> None:
    driver, ctx = make()
    for _ in range(4):
        tap(driver)
    (pressed,) = wait_for(ctx, "panic.pressed")
    assert driver.health().counters["alarm_presses"] == 4
    assert "4 presses" in driver.health().detail
    (result,) = command(ctx, "ack", alarm=pressed.id)
    assert result["presses"] == 4
    (resolved,) = command(ctx, "resolve", alarm=pressed.id)
    assert resolved["presses"] == 4
    assert wait_for(ctx, "panic.resolved")[0].payload["presses"] == 4
    # Once resolved, the next press is a new alarm.
    tap(driver)
    assert len(wait_for(ctx, "panic.pressed", count=2)) == 2


def test_button_held_at_start_counts_as_a_press(make: Any) -> None:
    # A floating mock pin starts low: with an external pull-up that is "pressed".
    _driver, ctx = make(pull_up="off", active_state="low")
    wait_for(ctx, "panic.pressed")


# -- faults ------------------------------------------------------------------------------


def test_stuck_button_is_reported_once_then_unstuck(make: Any) -> None:
    driver, ctx = make(stuck_after=0.2)
    pin(BUTTON).drive_low()
    (stuck,) = wait_for(ctx, "panic.stuck")
    settle(0.3)
    assert ctx.kinds().count("panic.stuck") == 1
    assert stuck.priority is Priority.HIGH
    assert stuck.payload["alarm"] == wait_for(ctx, "panic.pressed")[0].id
    assert driver.health().state == "degraded"
    assert "stuck" in driver.health().detail
    pin(BUTTON).drive_high()
    (unstuck,) = wait_for(ctx, "panic.unstuck")
    assert unstuck.payload["held"] >= 0.2
    assert driver.health().state == "ok"


def test_supervision_loop_reports_wiring_fault_and_restore(make: Any) -> None:
    driver, ctx = make(loop_pin=LOOP)
    loop = pin(LOOP)  # pulled up: intact means the loop holds it low
    loop.drive_low()
    settle()
    assert ctx.kinds() == ["panic.wiring_fault", "panic.wiring_restored"][: len(ctx.kinds())]
    before = ctx.kinds().count("panic.wiring_fault")
    loop.drive_high()  # cable cut
    faults = wait_for(ctx, "panic.wiring_fault", count=before + 1)
    assert faults[-1].priority is Priority.HIGH
    assert faults[-1].payload == {"location": EXPECTED_LOCATION, "loop_pin": LOOP}
    assert driver.health().state == "degraded"
    loop.drive_low()
    wait_for(ctx, "panic.wiring_restored", count=before + 1)
    assert driver.health().state == "ok"


def test_open_supervision_loop_at_start_is_reported_at_once(pins: MockFactory, make: Any) -> None:
    # Nothing holds the loop low: the pull-up reads high, i.e. the loop is open.
    _driver, ctx = make(loop_pin=LOOP)
    wait_for(ctx, "panic.wiring_fault")


# -- the LED journey and the acknowledgement loop -----------------------------------------


def led_changes(p: MockPin, seconds: float) -> int:
    """How often the LED changed during the next ``seconds``."""
    mark = len(p.states)
    time.sleep(seconds)
    return len(p.states) - mark


# Blink rates are told apart by counting changes over a window: a slow blink of 0.5 s can
# never change more than twice in 0.5 s, however loaded the machine (a sleep never ends
# early), while a fast one shows many changes in some window long before the deadline.
# Exact blink periods are measured by scripts/bench-panic, not asserted here.


def test_led_shows_stored_delivered_acknowledged_resolved(make: Any) -> None:
    driver, ctx = make(led_pin=LED_PIN, slow_blink=0.5, fast_blink=0.02)
    led = pin(LED_PIN)
    assert led.state is False
    pin(BUTTON).drive_low()
    wait_for(ctx, "panic.pressed")
    wait_until(lambda: led_changes(led, 0.6) >= 1, what="the LED blinking")
    assert led_changes(led, 0.5) <= 2, "not yet delivered: the slow blink"

    ctx.emissions[0].mark_delivered()  # the broker's PUBACK or the centre's receipt
    wait_until(lambda: led_changes(led, 0.5) >= 5, what="the fast blink after delivery")

    alarm = ctx.events[0].id
    (result,) = command(ctx, "ack", alarm=alarm, by="operator 7")
    assert result["state"] == "acknowledged" and result["changed"] is True
    (acked,) = wait_for(ctx, "panic.acknowledged")
    assert acked.payload["alarm"] == alarm and acked.payload["by"] == "operator 7"
    wait_until(lambda: led.state is True and led_changes(led, 0.3) == 0, what="a steady LED")

    command(ctx, "resolve", alarm=alarm)
    (resolved,) = wait_for(ctx, "panic.resolved")
    assert resolved.payload["acknowledged"] is True
    wait_until(lambda: led.state is False, what="the LED off")
    assert driver.health().detail == "idle"


def test_delivery_before_the_led_thread_runs_still_ends_fast(make: Any) -> None:
    _driver, ctx = make(led_pin=LED_PIN, slow_blink=0.5, fast_blink=0.03)
    pin(BUTTON).drive_low()
    wait_for(ctx, "panic.pressed")
    ctx.emissions[0].mark_delivered()
    wait_until(lambda: led_changes(pin(LED_PIN), 0.5) >= 5, what="the fast blink")


def test_the_alarm_keeps_its_emission_alive_for_the_delivery_report(make: Any) -> None:
    # The core follows live emissions through weak references only.
    _, ctx = make()
    pin(BUTTON).drive_low()
    wait_for(ctx, "panic.pressed")
    emission = weakref.ref(ctx.emissions[0])
    ctx.emissions.clear()
    gc.collect()
    assert emission() is not None


def test_led_timeout_closes_the_alarm_and_a_new_press_raises_a_new_one(make: Any) -> None:
    driver, ctx = make(led_pin=LED_PIN, led_timeout=0.3)
    tap(driver)
    first = wait_for(ctx, "panic.pressed")[0]
    (expired,) = wait_for(ctx, "panic.expired")
    assert expired.payload["alarm"] == first.id and expired.payload["state"] == "raised"
    wait_until(lambda: pin(LED_PIN).state is False, what="the LED off")
    tap(driver)
    assert wait_for(ctx, "panic.pressed", count=2)[1].id != first.id
    # A late ack of the expired alarm is answered, not an error.
    (late,) = command(ctx, "ack", alarm=first.id)
    assert late == {"alarm": first.id, "state": "expired", "changed": False}


def test_ack_is_idempotent_and_resolve_without_ack_is_allowed(make: Any) -> None:
    driver, ctx = make()
    tap(driver)
    alarm = wait_for(ctx, "panic.pressed")[0].id
    assert command(ctx, "ack", alarm=alarm)[0]["changed"] is True
    assert command(ctx, "ack", alarm=alarm)[0]["changed"] is False
    assert ctx.kinds().count("panic.acknowledged") == 1
    (result,) = command(ctx, "resolve", target="button1")
    assert result["state"] == "resolved"
    assert command(ctx, "resolve", alarm=alarm) == [
        {"alarm": alarm, "state": "resolved", "changed": False}
    ]


def test_commands_for_other_buttons_are_not_ours(make: Any) -> None:
    driver, ctx = make()
    tap(driver)
    wait_for(ctx, "panic.pressed")
    assert command(ctx, "ack", alarm="0190a1b2-0000-7000-8000-000000000000") == [None]
    assert command(ctx, "ack", target="button2") == [None]
    assert command(ctx, "ack") == [None]  # no alarm, no target: nothing named
    assert command(ctx, "test", target="button2") == [None]
    assert "panic.acknowledged" not in ctx.kinds()


@pytest.mark.parametrize(
    ("target", "args", "message"),
    [
        (None, {"alarm": 42}, "args.alarm must be an alarm id"),
        (None, {"alarm": ""}, "args.alarm must be an alarm id"),
        ("button1", {"alarm": "nope"}, "not an alarm of button1"),
        ("button1", {}, "button1 has no active alarm"),
    ],
)
def test_malformed_or_impossible_commands_raise_command_errors(
    make: Any, target: str | None, args: dict[str, Any], message: str
) -> None:
    _driver, ctx = make()
    with pytest.raises(CommandError, match=message):
        command(ctx, "ack", target=target, **args)


def test_test_command_travels_as_a_test_and_a_real_press_takes_over(make: Any) -> None:
    driver, ctx = make(led_pin=LED_PIN)
    (result,) = command(ctx, "test")
    assert result["tested"] is True
    (pressed,) = wait_for(ctx, "panic.pressed")
    assert (
        pressed.test is True and pressed.id == result["alarm"] and pressed.payload["presses"] == 0
    )
    (_acked,) = command(ctx, "ack", alarm=pressed.id)
    assert wait_for(ctx, "panic.acknowledged")[0].test is True

    tap(driver)  # a real emergency during the test
    real = wait_for(ctx, "panic.pressed", count=2)[1]
    assert real.test is False
    (superseded,) = wait_for(ctx, "panic.resolved")
    assert superseded.test is True and superseded.payload["reason"] == "superseded"
    (refused,) = command(ctx, "test")
    assert refused == {"tested": False, "reason": f"alarm {real.id} is active"}


# -- simulation and setup -------------------------------------------------------------------


def test_simulate_drives_the_mock_pin(make: Any) -> None:
    # No debounce and the widest window: the simulated edges count however late they run.
    driver, ctx = make(mode="triple", window=10.0, bounce_time=0.0)
    assert driver.simulate("tap", {}) == {"taps": 3, "seconds": pytest.approx(0.12)}
    wait_for(ctx, "panic.pressed")
    wait_until(lambda: driver.health().counters["releases"] == 3, what="the third release")
    driver.simulate("press", {})
    assert pin(BUTTON).state is False
    driver.simulate("release", {})
    assert pin(BUTTON).state is True
    assert driver.simulate("hold", {"seconds": 0.1})["release_after"] == 0.1
    assert pin(BUTTON).state is False
    wait_until(lambda: pin(BUTTON).state is True, what="the release after the hold")
    with pytest.raises(CommandError, match="unknown action 'wiggle'"):
        driver.simulate("wiggle", {})
    with pytest.raises(CommandError, match="seconds must be a number"):
        driver.simulate("hold", {"seconds": "long"})


def test_simulate_refuses_on_real_gpio(pins: MockFactory, tmp_path: Path) -> None:
    config = parse_section(PanicButtonConfig, {"pin": BUTTON, "location": LOCATION}, "drivers.b")
    driver = PanicButtonDriver(RecordingContext(tmp_path, name="b"), config)
    with pytest.raises(CommandError, match="uses real GPIO"):
        driver.simulate("press", {})


def test_no_gpio_and_no_mock_refuses_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    config = parse_section(
        PanicButtonConfig, {"pin": BUTTON, "location": LOCATION}, "drivers.lobby"
    )
    driver = PanicButtonDriver(RecordingContext(tmp_path, name="lobby"), config)
    with pytest.raises(GPIOUnavailable) as info:
        driver.start()
    message = str(info.value)
    assert (
        "'lobby'" in message and 'pin_factory = "mock"' in message and "[drivers.lobby]" in message
    )


def test_a_pin_used_twice_is_a_clear_error(make: Any) -> None:
    make()
    with pytest.raises(GPIOUnavailable, match="pin 17 is already used"):
        make()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"location": {}}, r"drivers\.b\.location: give at least ward or room"),
        ({"led_pin": BUTTON}, r"drivers\.b\.led_pin: is the same pin as pin"),
        ({"pin": 99}, r"drivers\.b\.pin: must be a BCM GPIO number"),
        ({"mode": "quadruple"}, r"drivers\.b\.mode: expected one of"),
        (
            {"mode": "hold", "hold_time": 5, "stuck_after": 3},
            r"drivers\.b\.stuck_after: must be longer",
        ),
        ({"location": {"ward": "A", "bed": 3}}, r"drivers\.b\.location\.bed: unknown key"),
    ],
)
def test_config_errors_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section(
            PanicButtonConfig, {"pin": BUTTON, "location": LOCATION, **options}, "drivers.b"
        )


# -- end to end through the real agent and a private broker ----------------------------------


def test_end_to_end_press_ack_resolve_over_mqtt(
    pins: MockFactory, broker: Any, tmp_path: Path
) -> None:
    from agent.testing.agent import DEVICE, SITE, AgentHarness, Recorder, wait_until

    base = f"wardpost/{SITE}/{DEVICE}"
    button = {
        "type": "panic_button",
        "pin": BUTTON,
        "location": LOCATION,
        "pin_factory": "mock",
        "bounce_time": 0.01,
        "led_pin": LED_PIN,
        "slow_blink": 0.3,
        "fast_blink": 0.04,
    }
    with Recorder(broker) as recorder, AgentHarness(tmp_path, broker, {"bed1": button}):
        led = pin(LED_PIN)

        def send(name: str, command_id: str, payload: Any) -> dict[str, Any]:
            recorder.publish(f"{base}/cmd/{name}", payload)
            recorder.wait_for(
                lambda msgs: any(m.topic == f"{base}/cmd_result/{command_id}" for m in msgs),
                what=f"result of {command_id}",
            )
            return recorder.on_topic(f"/cmd_result/{command_id}")[-1].json()  # type: ignore[no-any-return]

        pin(BUTTON).drive_low()
        (pressed,) = recorder.wait_events("panic.pressed")
        assert pressed["source"] == "bed1" and pressed["priority"] == "critical"
        assert pressed["payload"]["location"] == EXPECTED_LOCATION
        alarm = pressed["id"]
        # Broker PUBACK (delivery = "broker") turns the slow blink fast.
        wait_until(lambda: led_changes(led, 0.2) >= 4, DEADLINE, "fast LED blink after delivery")

        ack = send(
            "ack",
            "ack-1",
            {"id": "ack-1", "issued_at": time.time(), "args": {"alarm": alarm, "by": "desk 1"}},
        )
        assert ack["ok"] is True and ack["handled_by"] == ["bed1"]
        assert ack["result"]["state"] == "acknowledged"
        (acked,) = recorder.wait_events("panic.acknowledged")
        assert acked["payload"]["alarm"] == alarm and acked["payload"]["by"] == "desk 1"
        wait_until(
            lambda: led.state is True and led_changes(led, 0.3) == 0,
            DEADLINE,
            "steady LED after ack",
        )

        pin(BUTTON).drive_high()
        recorder.wait_events("panic.released")
        resolved = send(
            "resolve",
            "res-1",
            {"id": "res-1", "issued_at": time.time(), "target": "bed1", "args": {}},
        )
        assert resolved["ok"] is True and resolved["result"]["alarm"] == alarm
        (event,) = recorder.wait_events("panic.resolved")
        assert event["payload"]["acknowledged"] is True
        assert event["payload"]["location"] == EXPECTED_LOCATION
        wait_until(
            lambda: led.state is False and led_changes(led, 0.2) == 0,
            DEADLINE,
            "LED off after resolve",
        )

        bad_alarm = send(
            "ack", "bad-1", {"id": "bad-1", "issued_at": time.time(), "args": {"alarm": 5}}
        )
        assert bad_alarm["ok"] is False and "args.alarm must be an alarm id" in bad_alarm["error"]
        not_ours = send(
            "ack", "bad-2", {"id": "bad-2", "issued_at": time.time(), "args": {"alarm": "x-1"}}
        )
        assert not_ours["ok"] is False and not_ours["handled_by"] == []
        garbage = send("resolve", "_invalid", b"{not json")
        assert garbage["ok"] is False and "not JSON" in garbage["error"]
        assert len(recorder.events("panic.pressed")) == 1
