"""End to end through a real mosquitto: the delivery guarantees of the core."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from agent.runtime import Agent
from tests.support.agent import DEADLINE, DEVICE, SITE, AgentHarness, Recorder, wait_until
from tests.support.broker import Broker

BASE = f"wardpost/{SITE}/{DEVICE}"


def burst(
    agent: Agent,
    count: int,
    source: str = "load",
    kind: str = "load.tick",
    priority: str = "normal",
) -> list[str]:
    return [agent.emit(source, kind, {"n": i}, priority).event.id for i in range(count)]


def first_seen_order(events: list[dict]) -> dict[str, list[int]]:
    seen: set[str] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if e["id"] not in seen:
            seen.add(e["id"])
            order[(e["source"], e["priority"])].append(e["seq"])
    return order


def test_every_event_exactly_once_per_id(tmp_path: Path, broker: Broker) -> None:
    with Recorder(broker) as rec, AgentHarness(tmp_path, broker) as h:
        agent = h.agent
        assert agent is not None
        ids = burst(agent, 3000)
        rec.wait_for(
            lambda m: {e["id"] for e in rec.events("load.tick")} >= set(ids), 30, "all events"
        )
        wait_until(lambda: agent.outbox.backlog()[0] == 0, DEADLINE, "outbox drained")
        got = [e["id"] for e in rec.events("load.tick")]
        assert len(got) == len(set(got)) == 3000
        for key, seqs in first_seen_order(rec.events("load.tick")).items():
            assert seqs == sorted(seqs), f"order broken for {key}"
        event = rec.events("load.tick")[0]
        assert rec.on_topic("/events/load.tick")[0].topic == f"{BASE}/events/load.tick"
        assert {
            "id",
            "site",
            "device",
            "source",
            "kind",
            "priority",
            "time",
            "boottime",
            "boot_id",
            "seq",
            "test",
            "payload",
            "schema",
        } <= set(event)


def test_status_heartbeat_and_stop(tmp_path: Path, broker: Broker) -> None:
    with Recorder(broker, f"{BASE}/#") as rec:
        h = AgentHarness(tmp_path, broker, drivers={"sim": {"type": "simulated", "rate": 0.0}})
        h.start()
        rec.wait_for(
            lambda m: any(x.topic.endswith("/heartbeat") for x in m), DEADLINE, "a heartbeat"
        )
        h.stop()
        rec.wait_for(
            lambda m: any(
                x.topic.endswith("/status") and not x.retain and x.json()["state"] == "stopped"
                for x in m
            ),
            5,
            "stopped status",
        )
    statuses = [m.json() for m in rec.on_topic("/status") if not m.retain]  # not an earlier test's
    assert statuses[0]["state"] == "online" and statuses[0]["drivers"] == ["sim"]
    assert statuses[-1]["state"] == "stopped"
    assert statuses[0]["boot"] == statuses[-1]["boot"] >= 1 and statuses[0]["connection"] >= 1
    beat = rec.on_topic("/heartbeat")[0].json()
    assert (
        beat["drivers"]["sim"]["state"] == "ok"
        and beat["backlog"]["count"] >= 0
        and beat["interval"] == 1.0
    )


def test_receipt_mode_holds_events_until_the_centre_confirms(
    tmp_path: Path, broker: Broker
) -> None:
    with Recorder(broker) as silent:
        h = AgentHarness(tmp_path, broker, mqtt={"delivery": "receipt", "receipt_timeout": 0.5})
        agent = h.start()
        emission = agent.emit("t", "panic.pressed", {"room": "12"}, "critical")
        silent.wait_for(
            lambda m: (
                len([e for e in silent.events("panic.pressed") if e["id"] == emission.event.id])
                >= 3
            ),
            10,
            "re-sends",
        )
        sends = [e for e in silent.events("panic.pressed")]
        assert {e["id"] for e in sends} == {emission.event.id}, "re-sent with the same id"
        assert not emission.is_delivered
        assert agent.outbox.backlog()[0] >= 1
        with Recorder(broker, receipts=True):
            assert emission.wait_delivered(DEADLINE)
            # agent.started waits for its receipt too; it comes round with the next re-send.
            wait_until(lambda: agent.outbox.backlog()[0] == 0, DEADLINE, "released")
        summary = agent.publisher.stats.summary() if agent.publisher else {}
        assert summary["count"] >= 1 and summary["max"] >= summary["mean"] > 0
        h.stop()


def test_receipt_releases_even_a_never_acked_event(tmp_path: Path, broker: Broker) -> None:
    """A receipt that arrives for an event this run has not sent yet (sent before a restart)."""
    h = AgentHarness(tmp_path, broker, mqtt={"delivery": "receipt", "receipt_timeout": 60})
    agent = h.start()
    with Recorder(broker) as rec:
        e = agent.emit("t", "x.y", {}, "normal")
        rec.wait_events("x.y")
        rec.publish(f"{BASE}/receipts", {"ids": [e.event.id]})
        assert e.wait_delivered(DEADLINE)
        rec.publish(f"{BASE}/receipts", b"not json")  # ignored, logged
        rec.publish(f"{BASE}/receipts", {"ids": "nope"})
        e2 = agent.emit("t", "x.y", {}, "normal")
        rec.wait_events("x.y", 2)
        rec.publish(f"{BASE}/receipts", {"ids": [e2.event.id]})
        assert e2.wait_delivered(DEADLINE)
    h.stop()


def test_broker_outage_under_load_loses_nothing_and_keeps_order(
    tmp_path: Path, private_broker: Broker
) -> None:
    broker = private_broker
    h = AgentHarness(tmp_path, broker)
    agent = h.start()
    accepted: list[str] = []
    with Recorder(broker, receipts=False) as rec:
        accepted += burst(agent, 500, source="a")
        time.sleep(0.05)
        broker.stop()  # SIGKILL mid-stream
        for i in range(20):  # steady load while the broker is gone
            accepted += burst(agent, 100, source="a" if i % 2 else "b")
            time.sleep(0.05)
        critical = agent.emit("panic", "panic.pressed", {}, "critical")
        accepted.append(critical.event.id)
        assert critical.wait_durable(DEADLINE) and not critical.is_delivered
        rec.stop()
        broker.start()
    with Recorder(broker) as rec2:
        # The recorder must be subscribed before the agent reconnects to see the drain.
        rec2.wait_for(
            lambda m: {e["id"] for e in rec2.events()} >= set(accepted[500:]), 60, "backlog drained"
        )
        events = [e for e in rec2.events() if e["source"] in ("a", "b", "panic")]
        first = [e["id"] for e in events]
        # paho re-sends the window that was in flight when the link dropped the moment it
        # reconnects; the critical event overtakes everything else in the backlog.
        window = agent.config.mqtt.inflight_window
        assert first.index(critical.event.id) <= window < len(first) // 4, (
            "the critical event overtakes the backlog"
        )
        for key, seqs in first_seen_order(events).items():
            assert seqs == sorted(seqs), f"order broken for {key}"
    wait_until(lambda: agent.outbox.backlog()[0] == 0, 20, "outbox drained")
    assert agent.publisher is not None and agent.publisher.counters["disconnects"] >= 1
    h.stop()


def test_link_down_at_start_then_up(tmp_path: Path, private_broker: Broker) -> None:
    broker = private_broker
    broker.stop()
    h = AgentHarness(tmp_path, broker)
    agent = h.start(wait_connected=False)
    e = agent.emit("t", "panic.pressed", {}, "critical")
    assert e.wait_durable(DEADLINE)
    publisher = agent.publisher
    assert publisher is not None
    wait_until(lambda: "cannot connect" in (publisher.last_error or ""), what="a failed connect")
    assert not e.is_delivered
    broker.start()
    assert e.wait_delivered(DEADLINE)
    h.stop()


def test_restart_resends_what_was_not_confirmed(tmp_path: Path, broker: Broker) -> None:
    h = AgentHarness(tmp_path, broker, mqtt={"delivery": "receipt", "receipt_timeout": 60})
    agent = h.start()
    ids = burst(agent, 50)
    agent.outbox.flush()
    h.stop()
    with Recorder(broker, receipts=True) as rec:
        agent = h.start()
        rec.wait_for(
            lambda m: {e["id"] for e in rec.events("load.tick")} >= set(ids),
            20,
            "re-sent after restart",
        )
        wait_until(lambda: agent.outbox.backlog()[0] == 0, DEADLINE, "released by receipts")
        started = [
            json.loads(m.payload)
            for m in rec.on_topic("/status")
            if json.loads(m.payload)["state"] == "online"
        ]
        assert started and started[-1]["boot"] == 2
    h.stop()
