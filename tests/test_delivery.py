"""End to end through a real mosquitto: the delivery guarantees of the core."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from agent.config import MQTTConfig
from agent.delivery.publisher import Window
from agent.event import boottime
from agent.runtime import Agent
from agent.testing.agent import DEADLINE, DEVICE, SITE, AgentHarness, Recorder, wait_until
from agent.testing.broker import Broker
from tests.support.proxy import TcpProxy

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
    """A receipt releases an event sent on this link, whether or not its PUBACK came;
    malformed receipts are ignored."""
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


def test_a_forged_receipt_never_releases_an_event_not_yet_sent(
    tmp_path: Path, broker: Broker
) -> None:
    """Only ids in flight on the current link are released; others are counted, not obeyed."""
    h = AgentHarness(
        tmp_path,
        broker,
        mqtt={"delivery": "receipt", "receipt_timeout": 600, "inflight_window": 1},
    )
    with Recorder(broker) as centre:  # sends no receipts by itself
        agent = h.start()
        publisher = agent.publisher
        assert publisher is not None
        started = centre.wait_events("agent.started")[0]
        centre.publish(f"{BASE}/receipts", {"ids": [started["id"]]})
        wait_until(lambda: agent.outbox.backlog()[0] == 0, 10, "agent.started released")
        first = agent.emit("t", "x.first", {}, "normal")
        centre.wait_events("x.first")  # the window (1) is now full: the next one waits
        held = agent.emit("t", "x.held", {}, "normal")
        assert held.wait_durable(5)
        centre.publish(f"{BASE}/receipts", {"ids": [held.event.id, "0193-no-such-event"]})

        def pending() -> set[str]:
            agent.outbox.flush()
            return {e["id"] for e in agent.outbox.recent(pending_only=True)}

        wait_until(
            lambda: (
                publisher.counters.get("receipt_ids_ignored", 0) >= 2
                or held.event.id not in pending()
            ),
            10,
            "the forged receipt handled",
        )
        assert held.event.id in pending(), "a forged receipt released an event never sent"
        assert not held.is_delivered
        assert agent.status().link.counters["receipt_ids_ignored"] >= 2
        centre.publish(f"{BASE}/receipts", {"ids": [first.event.id]})  # the genuine one
        assert first.wait_delivered(10)
        centre.wait_events("x.held", timeout=10)  # now it goes out
        centre.publish(f"{BASE}/receipts", {"ids": [held.event.id]})
        assert held.wait_delivered(10)
    h.stop()


def test_dead_link_noticed_fast_at_the_default_config_and_criticals_go_first(
    tmp_path: Path, broker: Broker
) -> None:
    """Blackholed link at the default keepalive and link_timeout: noticed within seconds
    while events wait for the broker, within about 2 x keepalive when idle; idle traffic
    stays a few bytes a second; after reconnect a critical event overtakes the backlog."""
    defaults = MQTTConfig()
    with TcpProxy(broker.host, broker.port) as proxy, Recorder(broker, receipts=True) as centre:
        h = AgentHarness(
            tmp_path,
            broker,
            mqtt={"port": proxy.port, "delivery": "receipt", "keepalive": defaults.keepalive},
        )  # heartbeats (QoS 0) every second: written, never answered
        agent = h.start()
        publisher = agent.publisher
        assert publisher is not None
        wait_until(lambda: agent.outbox.backlog()[0] == 0, 10, "start-up events released")

        # Idle: no probes, only the keepalive (and the heartbeats) flow.
        probes_before = proxy.bytes_forwarded
        time.sleep(3 * defaults.keepalive)
        beat = len(centre.on_topic("/heartbeat")[-1].payload)
        idle_rate = (proxy.bytes_forwarded - probes_before) / (3 * defaults.keepalive)
        assert idle_rate < beat + 50, f"idle link traffic {idle_rate:.1f} bytes/s"

        # Idle, then the link goes dead: keepalive notices.
        proxy.blackhole()
        cut = boottime()
        wait_until(lambda: not publisher.connected, 30, "the idle dead link noticed")
        idle_noticed = boottime() - cut
        proxy.set_pass()
        wait_until(lambda: publisher.connected, 30, "reconnected")

        # Busy: events wait for their PUBACK when the link dies.
        proxy.blackhole()
        cut = boottime()
        normals = [agent.emit("t", "x.backlog", {"n": i}, "normal") for i in range(20)]
        critical = agent.emit("t", "panic.pressed", {}, "critical")
        wait_until(lambda: not publisher.connected, 30, "the busy dead link noticed")
        busy_noticed = boottime() - cut
        proxy.set_pass()
        assert critical.wait_delivered(30)
        assert all(n.wait_delivered(30) for n in normals)
        arrivals = [e["id"] for e in centre.events() if e["kind"] in ("x.backlog", "panic.pressed")]
        assert arrivals.index(critical.event.id) < min(
            arrivals.index(n.event.id) for n in normals
        ), "the critical event went first after the reconnect"
        h.stop()
    print(f"dead link noticed after {busy_noticed:.2f} s busy, {idle_noticed:.2f} s idle")
    # Generous bounds for a loaded CI box; the fault matrix records the figures.
    assert busy_noticed < 8.0
    assert idle_noticed < 15.0
    assert publisher.counters["link_timeouts"] >= 1


def test_late_receipts_for_released_events_are_not_taken_as_forged(
    tmp_path: Path, broker: Broker
) -> None:
    """In broker mode the PUBACK releases an event and the centre's receipt follows it; a
    centre also answers every re-sent copy. Neither is a forged receipt."""
    with Recorder(broker, receipts=True) as centre:
        h = AgentHarness(tmp_path, broker, mqtt={"delivery": "broker"})
        agent = h.start()
        publisher = agent.publisher
        assert publisher is not None
        emissions = [agent.emit("t", "x.y", {"n": i}, "normal") for i in range(200)]
        assert all(e.wait_delivered(20) for e in emissions)
        receipts = f"{BASE}/receipts"
        centre.wait_for(
            lambda m: sum(1 for x in m if x.topic == receipts) >= 200, 20, "every receipt sent"
        )
        time.sleep(1.0)  # the agent takes in the last of them
        centre.publish(receipts, {"ids": ["0193-never-sent"]})
        wait_until(lambda: publisher.counters["receipt_ids_ignored"] >= 1, 10, "the unknown id")
        assert publisher.counters["receipt_ids_ignored"] == 1
        h.stop()


def test_a_command_result_is_kept_until_the_broker_has_it(
    tmp_path: Path, private_broker: Broker
) -> None:
    """A result produced with the link down survives a restart and goes out once it is up."""
    broker = private_broker
    broker.stop()
    h = AgentHarness(tmp_path, broker)
    agent = h.start(wait_connected=False)
    command = {"id": "c-kept", "issued_at": time.time()}
    agent.dispatcher.submit("ping", json.dumps(command).encode())
    wait_until(lambda: agent.dispatcher.counters.get("ok", 0) >= 1, 10, "ping handled")
    agent.outbox.flush()
    assert [r.topic for r in agent.outbox.pending_replies()] == [f"{BASE}/cmd_result/c-kept"]
    h.stop()
    broker.start()
    with Recorder(broker) as rec:
        agent = h.start()
        rec.wait_for(
            lambda m: any(x.topic == f"{BASE}/cmd_result/c-kept" for x in m), 20, "kept result"
        )
        result = next(x.json() for x in rec.messages if x.topic.endswith("/cmd_result/c-kept"))
        assert result["ok"] is True and result["result"]["version"]
        wait_until(lambda: not agent.outbox.pending_replies(), 10, "result dropped once acked")
    h.stop()


def test_the_in_flight_window_follows_what_the_centre_confirms_promptly() -> None:
    window = Window(256)
    assert window.size == 8, "a connection starts with a few events in flight"
    for _ in range(100):
        window.confirmed(0.002)  # the link's best round trip: nothing queues
    assert window.size == 108
    for _ in range(200):
        window.confirmed(0.040)  # 20x the best: most of the window waits in a queue
    queued = window.size * (1 - 0.002 / 0.040)
    assert 8 <= queued <= 17, f"settles with about 8-16 events queued, not {queued:.1f}"
    window.restart()
    assert window.size == 8
    fixed = Window(256, adapt=False)
    fixed.confirmed(1.0)
    assert fixed.size == 256, "without receipts the window stays at inflight_window"
