"""Core benchmarks: alarm latency, outbox ingest, backlog drain, idle cost, start-up.

Every figure is measured beside its bare baseline in the same run, on a private
mosquitto on loopback: raw paho publish → receive for latency, raw paho QoS 1
throughput for the drain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import OutboxConfig, load_config
from agent.control import ControlError, request
from agent.delivery.outbox import Outbox
from agent.driver import Emission
from agent.event import Event, Priority
from agent.mqttloop import disconnect_and_stop
from agent.runtime import Agent
from agent.testing.agent import agent_config, write_config
from agent.testing.broker import Broker
from benchmarks.latency import Arrivals
from benchmarks.report import Report, Row, percentile

PAYLOAD = {"location": {"ward": "3", "room": "12", "floor": "2"}, "mode": "press", "presses": 1}


def bare_client(broker: Broker, window: int = 0) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-bare-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.host, broker.port, 30)
    client.loop_start()
    connected.wait(5)
    return client


def bare_latency(broker: Broker, n: int, gap: float) -> list[float]:
    rx = Arrivals(broker, ["bench/bare/#"], f"bench-bare-rx-{os.getpid()}", key="k")
    tx = bare_client(broker)
    lat = []
    for i in range(n):
        body = json.dumps({"k": str(i), "payload": PAYLOAD, "pad": "x" * 300})
        t0 = time.perf_counter()
        tx.publish("bench/bare/panic", body, qos=1)
        lat.append(_arrival(rx, str(i)) - t0)
        time.sleep(gap)
    disconnect_and_stop(tx)
    rx.stop()
    return lat


def _arrival(rx: Arrivals, tag: str) -> float:
    arrived = rx.wait(tag)
    if arrived is None:
        raise RuntimeError(f"message {tag} not received")
    return arrived


def agent_latency(broker: Broker, tmp: Path, n: int, gap: float) -> tuple[list[float], list[float]]:
    """Critical emit → subscriber; returns (latencies, emit-call durations)."""
    doc = agent_config(tmp, broker)
    agent = Agent(load_config(write_config(tmp / "lat.toml", doc)))
    agent.start()
    deadline = time.monotonic() + 10
    while not (agent.publisher and agent.publisher.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    rx = Arrivals(broker, ["wardpost/+/+/events/#"], f"bench-agent-rx-{os.getpid()}", key="id")
    lat, call = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        emission = agent.emit("bench", "panic.pressed", PAYLOAD, Priority.CRITICAL)
        t1 = time.perf_counter()
        lat.append(_arrival(rx, emission.event.id) - t0)
        call.append(t1 - t0)
        time.sleep(gap)
    rx.stop()
    agent.stop()
    return lat, call


def outbox_ingest(tmp: Path, n: int, sync: str = "critical") -> float:
    config = OutboxConfig(max_rows=n * 2, sync=sync)  # type: ignore[arg-type]
    outbox = Outbox(tmp / f"ingest-{sync}.db", config)
    outbox.open()
    emissions = [
        Emission(
            Event(
                kind="gate.transit",
                source="b",
                priority=Priority.LOW,
                site="s",
                device="d",
                seq=outbox.next_seq(),
                payload={"in": 1, "out": 0},
            )
        )
        for _ in range(n)
    ]
    t0 = time.perf_counter()
    for e in emissions:
        outbox.submit(e)
    emissions[-1].wait_durable(120)
    elapsed = time.perf_counter() - t0
    outbox.close()
    return n / elapsed


def commit_latency(tmp: Path, n: int, priority: Priority, sync: str = "critical") -> list[float]:
    """Seconds from submit to durable, one event at a time (no group commit to share a sync)."""
    config = OutboxConfig(max_rows=n * 2, sync=sync)  # type: ignore[arg-type]
    outbox = Outbox(tmp / f"commit-{priority.label}-{sync}.db", config)
    outbox.open()
    seconds = []
    for _ in range(n):
        e = Emission(
            Event(
                kind="panic.pressed",
                source="b",
                priority=priority,
                site="s",
                device="d",
                seq=outbox.next_seq(),
                payload=PAYLOAD,
            )
        )
        t0 = time.perf_counter()
        outbox.submit(e)
        e.wait_durable(30)
        seconds.append(time.perf_counter() - t0)
    outbox.close()
    return seconds


def agent_ingest(broker: Broker, tmp: Path, n: int) -> float:
    """Events/s accepted through Agent.emit (id, seq, outbox commit), publisher connected."""
    doc = agent_config(tmp, broker)
    agent = Agent(load_config(write_config(tmp / "ingest.toml", doc)))
    agent.start()
    t0 = time.perf_counter()
    last = None
    for i in range(n):
        last = agent.emit("bench", "gate.transit", {"n": i}, Priority.LOW)
    assert last is not None
    last.wait_durable(120)
    elapsed = time.perf_counter() - t0
    agent.stop()
    return n / elapsed


def bare_throughput(broker: Broker, n: int, window: int) -> float:
    tx = bare_client(broker, window)
    done = threading.Event()
    acked = [0]

    def on_publish(*args: object) -> None:
        acked[0] += 1
        if acked[0] >= n:
            done.set()

    tx.on_publish = on_publish
    body = json.dumps({"payload": PAYLOAD, "pad": "x" * 300})
    t0 = time.perf_counter()
    for _ in range(n):
        tx.publish("bench/bare/drain", body, qos=1)
    done.wait(120)
    elapsed = time.perf_counter() - t0
    disconnect_and_stop(tx)
    return n / elapsed


def agent_drain(tmp: Path, n: int) -> float:
    broker = Broker(tmp / "drain-broker")
    doc = agent_config(tmp, broker)
    agent = Agent(load_config(write_config(tmp / "drain.toml", doc)))
    agent.start()  # broker not running: everything goes to the backlog
    last = None
    for i in range(n):
        last = agent.emit("bench", "gate.transit", {"n": i}, Priority.NORMAL)
    assert last is not None and last.wait_durable(120)
    broker.start()
    deadline = time.monotonic() + 60
    while not (agent.publisher and agent.publisher.connected) and time.monotonic() < deadline:
        time.sleep(0.001)
    t0 = time.perf_counter()
    # The publisher's count of released events, not the outbox's backlog: counting pending
    # rows in SQLite every few milliseconds would slow the very drain it measures.
    publisher = agent.publisher
    assert publisher is not None
    while publisher.counters["confirmed"] < n and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    agent.stop()
    broker.stop()
    return n / elapsed


def idle_and_startup(broker: Broker, tmp: Path, seconds: float) -> tuple[float, float, float]:
    """(start-to-ready s, idle RSS MB, idle CPU %) of a real `wardpost run` process."""
    doc = agent_config(tmp, broker, drivers={"sim": {"type": "simulated", "rate": 0.0}})
    doc["agent"]["heartbeat_interval"] = 30.0
    config = write_config(tmp / "idle.toml", doc)
    exe = Path(sys.executable).with_name("wardpost")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = Path(doc["agent"]["state_dir"]) / "control.sock"
    ready = None
    while time.perf_counter() - t0 < 30:
        try:
            if request(sock, {"op": "status"}, timeout=1)["status"]["link"]["connected"]:
                ready = time.perf_counter() - t0
                break
        except (ControlError, OSError):
            pass
        time.sleep(0.01)
    time.sleep(1.0)
    cpu0 = _cpu_seconds(proc.pid)
    time.sleep(seconds)
    cpu1 = _cpu_seconds(proc.pid)
    rss = _rss_mb(proc.pid)
    proc.terminate()
    proc.wait(10)
    return (ready or float("nan")), rss, 100.0 * (cpu1 - cpu0) / seconds


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(report: Report, quick: bool = False) -> None:
    n_lat = 300 if quick else 1000
    n_ingest = 20_000 if quick else 50_000
    n_drain = 5_000 if quick else 20_000
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker")
        broker.start()
        try:
            bare = bare_latency(broker, n_lat, 0.002)
            lat, call = agent_latency(broker, tmp / "lat", n_lat, 0.002)
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                a, b = percentile(lat, q) * 1000, percentile(bare, q) * 1000
                target = "≤ 2x bare and ≤ 5 ms" if name == "p99" else ""
                report.add(
                    Row(
                        "core",
                        f"critical emit → subscriber {name}",
                        a,
                        "ms",
                        "raw paho publish → receive (QoS 1)",
                        b,
                        target,
                        (a <= 2 * b and a <= 5) if name == "p99" else None,
                    )
                )
            report.add(
                Row(
                    "core",
                    "critical emit → subscriber max",
                    max(lat) * 1000,
                    "ms",
                    "raw paho publish → receive (QoS 1)",
                    max(bare) * 1000,
                    notes=f"n={n_lat}, 2 ms apart",
                )
            )
            report.add(
                Row("core", "emit() call p99 (driver's cost)", percentile(call, 0.99) * 1e6, "µs")
            )
            rate = outbox_ingest(tmp, n_ingest)
            report.add(
                Row(
                    "core",
                    "outbox ingest (group commit)",
                    rate,
                    "ev/s",
                    target="≥ 20,000 ev/s",
                    ok=rate >= 20_000,
                    lower_is_better=False,
                    notes=f"n={n_ingest}, WAL, critical batches fully synced",
                )
            )
            unsynced = commit_latency(tmp, n_lat // 2, Priority.NORMAL)
            synced = commit_latency(tmp, n_lat // 2, Priority.CRITICAL)
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                report.add(
                    Row(
                        "core",
                        f"fsync'd commit (critical) submit → durable {name}",
                        percentile(synced, q) * 1000,
                        "ms",
                        "unsynced commit (normal)",
                        percentile(unsynced, q) * 1000,
                        notes="one event at a time; [outbox] sync chooses the synced priorities",
                    )
                )
            rate_all = outbox_ingest(tmp, n_ingest, sync="all")
            report.add(
                Row(
                    "core",
                    'outbox ingest, sync = "all"',
                    rate_all,
                    "ev/s",
                    'default sync = "critical"',
                    rate,
                    lower_is_better=False,
                    notes="every batch fsync'd: group commit shares one sync per batch",
                )
            )
            rate = agent_ingest(broker, tmp / "ingest", n_ingest)
            report.add(
                Row(
                    "core",
                    "Agent.emit accepted (connected)",
                    rate,
                    "ev/s",
                    lower_is_better=False,
                    notes="the whole accept path from one thread (id, seq, event bus, commit) "
                    "while the publisher sends the same events: they share the GIL",
                )
            )
            bare_rate = bare_throughput(broker, n_drain, 256)
            drain = agent_drain(tmp / "drain", n_drain)
            report.add(
                Row(
                    "core",
                    "backlog drain after outage",
                    drain,
                    "ev/s",
                    "raw paho QoS 1, window 256",
                    bare_rate,
                    "≥ 0.9x bare",
                    drain >= 0.9 * bare_rate,
                    lower_is_better=False,
                    notes=f"n={n_drain}, released on PUBACK",
                )
            )
            ready, rss, cpu = idle_and_startup(broker, tmp / "idle", 5.0 if quick else 10.0)
            report.add(
                Row(
                    "core",
                    "start → ready and connected",
                    ready * 1000,
                    "ms",
                    target="≤ 500 ms",
                    ok=ready <= 0.5,
                )
            )
            report.add(
                Row("core", "idle RSS (wardpost run)", rss, "MB", target="≤ 50 MB", ok=rss <= 50)
            )
            report.add(Row("core", "idle CPU", cpu, "%"))
        finally:
            broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    report = Report("Wardpost core benchmark")
    run(report, args.quick)
    report.print()
    print(f"saved {report.save('core')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
