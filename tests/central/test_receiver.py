"""The receiver through a real mosquitto, SQLite and PostgreSQL: receipts, restart, supervision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.testing.agent import DEADLINE, wait_until
from agent.testing.broker import Broker
from central.config import ReceiverConfig, parse_receiver_config
from central.dc09_receiver import Dc09Receiver
from central.devicesim import SimulatedDevice
from central.receiver import Receiver
from central.store import Store, open_store

REPO = Path(__file__).parents[2]


@pytest.fixture
def devices(broker: Broker) -> Iterator[Callable[..., SimulatedDevice]]:
    started: list[SimulatedDevice] = []

    def make(name: str, **options: Any) -> SimulatedDevice:
        device = SimulatedDevice(broker.host, broker.port, "s1", name, **options).start()
        started.append(device)
        return device

    yield make
    for device in started:
        device.stop(clean=False)


@pytest.fixture
def receiver_for(
    broker: Broker, make_config: Callable[..., ReceiverConfig]
) -> Iterator[Callable[..., Receiver]]:
    running: list[Receiver] = []

    def make(**sections: Any) -> Receiver:
        receiver = Receiver(make_config(broker, **sections)).start()
        assert receiver.wait_connected(10)
        running.append(receiver)
        return receiver

    yield make
    for receiver in running:
        receiver.stop()


def test_events_stored_then_receipted_and_deduplicated(
    receiver_for: Callable[..., Receiver], devices: Callable[..., SimulatedDevice]
) -> None:
    receiver = receiver_for()
    stored_when_receipted: list[bool] = []
    receiver.on_committed(
        lambda out: stored_when_receipted.extend(
            bool(receiver.store.known_ids(ids)) for ids in out.receipts.values()
        )
    )
    device = devices("d1", resend_after=60)
    ids = [device.event("panic.pressed", "critical", {"zone": 3})] + [
        device.event("gate.transit") for _ in range(20)
    ]
    assert device.wait_receipted(10)
    assert all(stored_when_receipted)
    # A re-send (as after a lost receipt) is receipted again but not stored again.
    first = receiver.store.events(kind="gate.transit")[0]
    device.client.publish(f"{device.base}/events/gate.transit", first.body, qos=1)
    wait_until(lambda: receiver.stats.duplicates >= 1, DEADLINE, "the duplicate")
    assert receiver.store.count_events(origin="device") == 21
    assert set(ids) == {e.id for e in receiver.store.events(limit=100) if e.origin == "device"}
    (alarm,) = receiver.store.alarms()
    assert alarm.kind == "panic.pressed" and alarm.state == "new"
    state = wait_until(
        lambda: [d for d in receiver.store.devices() if d.state == "online"], 5, "device state"
    )
    assert (state[0].boot, state[0].connection) == (1, 1)


def test_supervision_lost_restored_and_stale_will(
    receiver_for: Callable[..., Receiver], devices: Callable[..., SimulatedDevice]
) -> None:
    # Lost after 5 missed heartbeats (2 s): a slow heartbeat thread on a loaded machine is
    # not mistaken for a lost device while it beats.
    receiver = receiver_for(supervision={"lost_after": 5.0, "check_every": 0.1})
    device = devices("d1", heartbeat_interval=0.4)
    wait_until(
        lambda: [d for d in receiver.store.devices() if d.heartbeat_interval == 0.4],
        DEADLINE,
        "a heartbeat",
    )
    time.sleep(1.5)  # beating: never lost
    assert not receiver.store.events(kind="device.lost")
    device.heartbeat_interval = None  # the heartbeat stops; the connection stays up
    lost = wait_until(lambda: receiver.store.events(kind="device.lost"), DEADLINE, "device.lost")
    # Never before 5 x 0.4 s of silence (how soon after is for scripts/bench-receiver).
    assert lost[0].payload["silent_for"] >= 2.0, lost[0].payload
    assert lost[0].payload["interval"] == 0.4
    device.heartbeat()
    wait_until(lambda: receiver.store.events(kind="device.restored"), DEADLINE, "device.restored")
    # The device drops its connection: its Will (this connection) marks it offline ...
    device.stop(clean=False)
    wait_until(
        lambda: receiver.store.devices()[0].state == "offline", DEADLINE, "offline from the Will"
    )
    # ... and a stale Will (older connection) arriving after a reconnect is ignored.
    again = devices("d1b")
    again.client.publish(
        "wardpost/s1/d1/status", '{"state":"online","boot":1,"connection":5}', qos=1, retain=True
    )
    again.client.publish(
        "wardpost/s1/d1/status", '{"state":"offline","boot":1,"connection":4}', qos=1, retain=True
    )
    time.sleep(0.5)
    state = wait_until(
        lambda: [d for d in receiver.store.devices() if d.device == "d1" and d.connection == 5],
        DEADLINE,
        "the newer connection",
    )
    assert state[0].state == "online"
    again.client.publish(
        "wardpost/s1/d1/status", b"", qos=1, retain=True
    )  # clear the retained status


def _write_config(path: Path, broker: Broker, store: dict[str, Any], client_id: str) -> Path:
    lines = (
        [
            "[mqtt]",
            f'host = "{broker.host}"',
            f"port = {broker.port}",
            f'client_id = "{client_id}"',
            "[store]",
        ]
        + [f'{k} = "{v}"' for k, v in store.items()]
        + ["[supervision]", "default_interval = 60.0"]
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(config: Path) -> subprocess.Popen[bytes]:
    """The receiver as a process, its log appended to ``<config>.log`` (a file, not a pipe:
    nobody reads a pipe while it runs, and a full one would stall the receiver)."""
    with _log(config).open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "central", "run", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def _log(config: Path) -> Path:
    return config.with_suffix(".log")


@pytest.mark.faults
def test_receiver_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    broker: Broker,
    store_section: dict[str, Any],
    tmp_path: Path,
    devices: Callable[..., SimulatedDevice],
) -> None:
    config = _write_config(
        tmp_path / "central.toml", broker, store_section, f"rx-{tmp_path.name[-12:]}"
    )
    receiver = _start(config)
    fleet = [devices(f"k{i}", resend_after=1.5) for i in range(4)]
    sent: list[str] = []
    try:
        store = wait_until(lambda: _try_open(store_section), DEADLINE, "the store")
        for round_ in range(60):
            for device in fleet:
                sent.append(device.event("gate.transit", payload={"round": round_}))
            time.sleep(0.01)
            if round_ == 20:
                wait_until(lambda: store.count_events() > 0, DEADLINE, "the first stored events")
                receiver.send_signal(signal.SIGKILL)  # mid-stream, no goodbye
                receiver.wait(10)
            if round_ == 40:
                receiver = _start(config)
        for device in fleet:
            assert device.wait_receipted(30), (
                f"{device.device}: {len(device.pending)} never receipted"
            )
        stored = store.events(limit=10_000)
        device_ids = [e.id for e in stored if e.origin == "device"]
        assert len(device_ids) == len(set(device_ids)) == len(sent)
        assert set(device_ids) == set(sent)
        store.close()
    finally:
        receiver.send_signal(signal.SIGTERM)
        assert receiver.wait(15) == 0, _log(config).read_text()


def test_events_sent_during_a_clean_restart_are_stored_at_once(
    broker: Broker,
    store_section: dict[str, Any],
    tmp_path: Path,
    devices: Callable[..., SimulatedDevice],
) -> None:
    """``systemctl restart``: the broker keeps the receiver's subscriptions, so what a device
    sends meanwhile is handed over on reconnect, not left to the device's re-send (here an
    hour away, so only the broker can deliver it)."""
    config = _write_config(
        tmp_path / "central.toml", broker, store_section, f"rx-{tmp_path.name[-12:]}"
    )
    receiver = _start(config)
    device = devices("r1", resend_after=1.0)  # until the receiver is up and subscribed
    try:
        store = wait_until(lambda: _try_open(store_section), DEADLINE, "the store")
        first = device.event("gate.transit")
        wait_until(
            lambda: store.count_events() > 0 and not device.pending, DEADLINE, "the first event"
        )
        device.resend_after = 3600.0
        receiver.send_signal(signal.SIGTERM)
        assert receiver.wait(15) == 0
        during = [device.event("panic.pressed", "critical") for _ in range(3)]
        receiver = _start(config)
        assert device.wait_receipted(DEADLINE), (
            f"{len(device.pending)} sent during the restart never stored"
        )
        ids = {e.id for e in store.events(limit=100)}
        assert {first, *during} <= ids
        store.close()
    finally:
        receiver.send_signal(signal.SIGTERM)
        assert receiver.wait(15) == 0, _log(config).read_text()


def _try_open(store_section: dict[str, Any]) -> Store | None:
    try:
        return open_store(parse_receiver_config({"store": store_section}).store)
    except Exception:
        return None


def test_panic_forwarded_to_the_alarm_receiving_centre(
    receiver_for: Callable[..., Receiver], devices: Callable[..., SimulatedDevice]
) -> None:
    with Dc09Receiver({"1234": None}) as arc:
        receiver = receiver_for(
            dc09={
                "enabled": True,
                "host": arc.host,
                "port": arc.port,
                "transport": "udp",
                "account": "1234",
                "timeout": 1.0,
                "retry_every": 0.5,
                "null_interval": 0.0,
            }
        )
        device = devices("d1")
        event_id = device.event("panic.pressed", "critical", {"zone": 12})
        device.event("gate.transit")
        frame = arc.wait_for(1, timeout=10)[0].frame
        assert frame is not None and (frame.id, frame.data) == ("ADM-CID", "#1234|1120 00 012")
        wait_until(
            lambda: (receiver.store.forward_state(event_id) or (None,))[0], 5, "forward marked sent"
        )
        assert len(arc.received) == 1  # the transit is not mapped, so not forwarded
