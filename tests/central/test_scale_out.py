"""Several receivers on one PostgreSQL behind an MQTT 5 shared subscription, with faults.

Three receiver processes, 50 simulated devices, a real mosquitto, the tests' own
PostgreSQL, a DC-09 receiver: one receiver killed (SIGKILL) in the middle of a burst and
restarted, then the supervising one killed and kept down longer than a supervision
period while a device falls silent. Nothing may be lost, stored twice, alarmed twice or
forwarded twice, and the silent device must be reported lost by another receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.config import ConfigError
from agent.event import Priority
from agent.testing.agent import wait_until
from agent.testing.broker import Broker
from central.config import ReceiverConfig, parse_receiver_config
from central.dc09_receiver import Dc09Receiver
from central.devicesim import SimulatedDevice
from central.intake import centre_event
from central.receiver import SUPERVISION_LEASE, Receiver
from central.store import Batch, StoreBusy, open_store
from central.testing.receivers import REPO, ReceiverProcess

DEVICES = 50
EVENTS_PER_DEVICE = 30
HEARTBEAT = 1.0  # seconds between a simulated device's heartbeats
LOST_AFTER = 5.0  # heartbeats: the supervision period is LOST_AFTER * HEARTBEAT
LEASE = 1.0
PERIOD = LOST_AFTER * HEARTBEAT


def test_a_second_receiver_on_one_sqlite_store_is_refused(broker: Broker, tmp_path: Path) -> None:
    def config(name: str) -> ReceiverConfig:
        return parse_receiver_config(
            {
                "mqtt": {"host": broker.host, "port": broker.port, "client_id": name},
                "store": {"url": f"sqlite:///{tmp_path / 'central.db'}"},
            }
        )

    first = Receiver(config("rx-1")).start()
    try:
        with pytest.raises(StoreBusy, match=r"another receiver \(pid \d+\).*PostgreSQL"):
            Receiver(config("rx-2"))
        # The service says so and exits, rather than starting a second writer.
        second = ReceiverProcess(
            tmp_path,
            "rx",
            {
                "mqtt": {"host": broker.host, "port": broker.port, "client_id": "rx"},
                "store": {"url": f"sqlite:///{tmp_path / 'central.db'}"},
            },
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "central",
                "run",
                "--config",
                str(second.config_path),
                "--instance",
                "2",
                "--duration",
                "5",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 2
        assert f"another receiver (pid {os.getpid()}) already runs" in done.stderr
    finally:
        first.stop()
    Receiver(config("rx-3")).start().stop()  # the first one's lock went with it


def test_shared_subscriptions_need_mqtt_5_and_postgresql() -> None:
    with pytest.raises(ConfigError, match=r"mqtt.share_group: a shared subscription needs"):
        parse_receiver_config(
            {
                "mqtt": {"share_group": "centre", "protocol": "3.1.1"},
                "store": {"url": "postgresql://wardpost@db/wardpost"},
            }
        )
    with pytest.raises(ConfigError, match=r"mqtt.share_group: .*SQLite serves one receiver"):
        parse_receiver_config({"mqtt": {"share_group": "centre"}})
    with pytest.raises(ConfigError, match=r"supervision.lease: must be longer than check_every"):
        parse_receiver_config({"supervision": {"lease": 1.0, "check_every": 1.0}})


def test_one_supervisor_at_a_time_and_each_forward_claimed_once(postgres_url: str) -> None:
    config = parse_receiver_config({"store": {"url": postgres_url, "schema": "wardpost"}})
    first, second = open_store(config.store), open_store(config.store)
    try:
        assert first.hold_lease(SUPERVISION_LEASE, "rx-1", 0.5)
        assert not second.hold_lease(SUPERVISION_LEASE, "rx-2", 0.5)
        assert first.hold_lease(SUPERVISION_LEASE, "rx-1", 0.5)  # renewed
        time.sleep(0.6)
        assert second.hold_lease(SUPERVISION_LEASE, "rx-2", 0.5)  # rx-1 stopped renewing
        assert not first.hold_lease(SUPERVISION_LEASE, "rx-1", 0.5)
        second.release_lease(SUPERVISION_LEASE, "rx-2")
        assert first.hold_lease(SUPERVISION_LEASE, "rx-1", 0.5)

        events = [
            centre_event("panic.pressed", "s1", f"d{i}", Priority.CRITICAL, {}, now=time.time())
            for i in range(6)
        ]
        first.write(Batch(events=events, forwards=[e.id for e in events]))
        mine = first.claim_forwards("rx-1", 0.5, limit=4)
        theirs = second.claim_forwards("rx-2", 60.0, limit=4)
        assert len(mine) == 4 and len(theirs) == 2  # what one claimed, the other skipped
        assert not {e.id for e, _ in mine} & {e.id for e, _ in theirs}
        numbers = [seq for _, seq in mine + theirs]
        assert len(set(numbers)) == 6  # one DC-09 counter for both
        for event, _ in mine[1:]:
            first.mark_forward(event.id, True)
        assert second.claim_forwards("rx-2", 60.0) == []  # rx-1's last claim still holds
        time.sleep(0.6)  # rx-1 "died" after sending mine[0], before recording it
        (again,) = second.claim_forwards("rx-2", 60.0)
        assert again == mine[0]  # the same event with the same sequence number: a retransmission
    finally:
        first.close()
        second.close()


def test_sequence_gaps_are_exact_when_a_device_is_split_over_receivers(
    private_broker: Broker, postgres_url: str
) -> None:
    """Two receivers share one device's events: holes are judged from the store's state,
    so each gap is reported once, and numbers the other receiver stored are no gap.
    (A broker of its own: other tests' retained statuses would bring their devices in.)"""
    broker = private_broker

    def config(name: str) -> ReceiverConfig:
        return parse_receiver_config(
            {
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "client_id": name,
                    "share_group": "gaps",
                },
                "store": {"url": postgres_url, "schema": "wardpost"},
                "supervision": {"gap_grace": 0.5, "check_every": 0.2, "lease": 1.0},
            }
        )

    receivers = [Receiver(config(f"gap-rx-{i}")).start() for i in (1, 2)]
    device = None
    try:
        assert all(r.wait_connected(10) for r in receivers)
        device = SimulatedDevice(broker.host, broker.port, "s1", "split").start()
        for seq in (n for n in range(1, 41) if n not in (7, 19, 20)):
            device.event("gate.transit", seq=seq)
        assert device.wait_receipted(30)
        assert all(r.stats.stored > 0 for r in receivers), "both receivers took a share"
        time.sleep(0.6)  # the holes are older than gap_grace
        device.heartbeat(backlog=0)
        store = receivers[0].store
        wait_until(lambda: len(store.events(kind="sequence.gap")) >= 2, 30, "two gaps")
        device.heartbeat(backlog=0)
        time.sleep(1.0)
        gaps = sorted(
            (g.payload["first"], g.payload["last"]) for g in store.events(kind="sequence.gap")
        )
        assert gaps == [(7, 7), (19, 20)]
        assert not store.events(kind="sequence.restarted")
    finally:
        if device is not None:
            device.stop()
        for receiver in receivers:
            receiver.stop()


# --- the fault test ---


@pytest.fixture
def arc() -> Iterator[Dc09Receiver]:
    with Dc09Receiver({"1234": None}) as receiver:
        yield receiver


def receiver_config(
    broker: Broker, postgres_url: str, arc: Dc09Receiver, name: str
) -> dict[str, Any]:
    return {
        "log_level": "info",
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "client_id": name,
            "share_group": "centre",
        },
        "store": {"url": postgres_url, "schema": "wardpost", "batch_max": 200},
        "supervision": {
            "lost_after": LOST_AFTER,
            "default_interval": HEARTBEAT,
            "check_every": 0.2,
            "lease": LEASE,
        },
        "dc09": {
            "enabled": True,
            "host": arc.host,
            "port": arc.port,
            "transport": "tcp",
            "account": "1234",
            "timeout": 2.0,
            "retry_every": 1.0,
            "null_interval": 0.0,
        },
    }


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute('SET search_path TO "wardpost"')
        return conn.execute(sql).fetchall()


@pytest.mark.faults
def test_three_receivers_kill_and_long_stop_lose_and_double_nothing(
    private_broker: Broker, postgres_url: str, arc: Dc09Receiver, tmp_path: Path
) -> None:
    broker = private_broker  # no retained statuses of other tests' devices
    receivers = [
        ReceiverProcess(tmp_path, f"rx-{i}", receiver_config(broker, postgres_url, arc, f"rx-{i}"))
        for i in range(1, 4)
    ]
    fleet: list[SimulatedDevice] = []
    store = None
    try:
        for receiver in receivers:
            receiver.start()
        store = open_store(
            parse_receiver_config({"store": {"url": postgres_url, "schema": "wardpost"}}).store
        )
        fleet = [
            SimulatedDevice(
                broker.host,
                broker.port,
                "s1",
                f"d{i:02d}",
                resend_after=3.0,
                heartbeat_interval=HEARTBEAT,
            ).start()
            for i in range(DEVICES)
        ]
        sent: list[str] = []
        panics = 0

        silent: SimulatedDevice | None = None  # publishes nothing while it plays dead

        def burst(rounds: range) -> None:
            nonlocal panics
            for round_ in rounds:
                for device in fleet:
                    if device is silent:
                        continue
                    if round_ % 15 == 0:  # two panics per device, each its own Contact ID zone
                        panics += 1
                        sent.append(device.event("panic.pressed", "critical", {"zone": panics}))
                    else:
                        sent.append(device.event("gate.transit", payload={"round": round_}))
                time.sleep(0.05)

        # 1. SIGKILL one receiver in the middle of a burst, restart it while the burst goes on.
        killer = threading.Thread(target=burst, args=(range(EVENTS_PER_DEVICE),))
        killer.start()
        wait_until(lambda: len(sent) >= DEVICES * EVENTS_PER_DEVICE // 3, 60, "a third sent")
        receivers[0].kill()
        wait_until(lambda: len(sent) >= DEVICES * EVENTS_PER_DEVICE // 2, 60, "half sent")
        receivers[0].start()
        killer.join(120)
        for device in fleet:
            assert device.wait_receipted(60), (
                f"{device.device}: {len(device.pending)} never receipted"
            )

        # 2. Kill the supervising receiver and keep it down longer than a supervision period,
        # while one device falls silent: another receiver must take supervision over.
        holder = wait_until(lambda: store.lease_holder(SUPERVISION_LEASE), 30, "a supervisor")
        supervisor = next(r for r in receivers if r.name == holder[0])
        silent = fleet[7]
        silent.heartbeat_interval = None
        silent_since = time.time()
        supervisor.kill()
        burst(range(EVENTS_PER_DEVICE, EVENTS_PER_DEVICE + 5))  # the others keep storing
        lost = wait_until(lambda: store.events(kind="device.lost"), 4 * PERIOD + 30, "device.lost")
        time.sleep(max(0.0, silent_since + PERIOD + LEASE + 1.0 - time.time()))
        supervisor.start()
        new_holder = store.lease_holder(SUPERVISION_LEASE)
        assert new_holder is not None and new_holder[0] != supervisor.name
        silent.heartbeat_interval = HEARTBEAT  # back: restored
        wait_until(lambda: store.events(kind="device.restored"), 30, "device.restored")
        burst(range(EVENTS_PER_DEVICE + 5, EVENTS_PER_DEVICE + 10))
        for device in fleet:
            assert device.wait_receipted(60), (
                f"{device.device}: {len(device.pending)} never receipted"
            )
        wait_until(
            lambda: not query(postgres_url, "SELECT 1 FROM forwards WHERE sent_at IS NULL"),
            60,
            "every forward sent",
        )
        time.sleep(2 * PERIOD)  # room for anything raised twice to show up

        # 0 lost, 0 stored twice.
        stored = [e for e in store.events(limit=100_000) if e.origin == "device"]
        assert Counter(e.id for e in stored) == Counter(sent)
        assert not query(
            postgres_url,
            "SELECT device, seq FROM events WHERE origin = 'device'"
            " GROUP BY device, seq HAVING count(*) > 1",
        )
        # Each alarm once: the silent device lost once and restored once, nothing else.
        centre = Counter(
            (e.kind, e.device) for e in store.events(limit=100_000) if e.origin == "centre"
        )
        assert centre == {("device.lost", silent.device): 1, ("device.restored", silent.device): 1}
        (lost_event,) = lost
        # Supervised throughout: reported within one period of becoming due, lease handover
        # and one check included.
        assert lost_event.stored_at - silent_since <= 2 * PERIOD + LEASE + 1.0
        assert Counter(a.kind for a in store.alarms()) == Counter(
            {"panic.pressed": panics, "device.lost": 1}
        )
        first_seen = Counter(
            (link.device, link.reason)
            for link in store.link_history()
            if link.reason == "first seen"
        )
        assert set(first_seen.values()) == {1} and len(first_seen) == DEVICES
        # Each DC-09 forward sent once: one message (sequence number) per panic zone, one
        # for the loss, one for the restore. A frame repeated with its sequence number is a
        # retransmission (an ACK not recorded before a kill), which the ARC recognises.
        messages = {
            (r.frame.seq, r.frame.data.split("|")[1])
            for r in arc.received
            if r.frame and "|" in r.frame.data
        }
        per_report = Counter(report for _, report in messages)
        assert set(per_report.values()) == {1}, [f for f, n in per_report.items() if n > 1]
        assert len(per_report) == panics + 2
    finally:
        for receiver in receivers:
            receiver.stop()
        for device in fleet:
            device.stop(clean=False)
        if store is not None:
            store.close()
