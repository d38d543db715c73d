"""End-to-end latency measurement shared by the driver benchmarks (panic, serial).

A driver path (pin edge, serial bytes) is timed interleaved with the core's bare
``Agent.emit`` and a raw paho QoS 1 publish, one sample of each per round, so the three
share the machine's load; :func:`latency_table` prints them and returns the headline
rows (the driver path beside raw paho) for ``scripts/bench``'s one table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqttloop import disconnect_and_stop
from agent.testing.broker import Broker
from benchmarks.report import Row, percentile


class Arrivals:
    """A subscriber that timestamps the next message on any of its topics."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str):
        self._cond = threading.Condition()
        self._arrived: dict[str, float] = {}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        if not subscribed.wait(5):
            raise RuntimeError("subscriber did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        with self._cond:
            self._arrived[msg.topic] = now
            self._cond.notify_all()

    def clear(self, topic: str) -> None:
        with self._cond:
            self._arrived.pop(topic, None)

    def wait(self, topic: str, timeout: float = 2.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while topic not in self._arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._arrived.pop(topic)

    def stop(self) -> None:
        disconnect_and_stop(self.client)


def raw_publisher(broker: Broker, client_id: str) -> mqtt.Client:
    """The bare baseline: a plain paho client, its loop running."""
    raw = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    raw.connect(broker.host, broker.port, 30)
    raw.loop_start()
    return raw


def timed(arrivals: Arrivals, topic: str, action: Callable[[], object]) -> float | None:
    """Milliseconds from ``action`` to the message's arrival, or None if it never came."""
    arrivals.clear(topic)
    start = time.perf_counter()
    action()
    arrived = arrivals.wait(topic)
    return None if arrived is None else (arrived - start) * 1000


def latency_table(
    section: str,
    samples: dict[str, list[float]],
    lost: dict[str, int],
    labels: dict[str, str],
    *,
    target_p99_ms: float | None = None,
    max_ratio: float | None = None,
) -> list[Row]:
    """Print p50/p99/max per path; return the first path's p50 and p99 beside raw paho's.

    ``samples`` holds the driver path first, then ``emit`` and ``raw``."""
    print(f"{'path':<34}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'lost':>6}{'p99 / raw':>11}")
    raw = samples["raw"]
    for name, values in samples.items():
        if not values:
            print(f"{labels[name]:<34}{'no samples':>27}{lost[name]:>6}")
            continue
        ratio = percentile(values, 0.99) / percentile(raw, 0.99) if raw else float("nan")
        print(
            f"{labels[name]:<34}{percentile(values, 0.5):>9.3f}{percentile(values, 0.99):>9.3f}"
            f"{max(values):>9.3f}{lost[name]:>6}{ratio:>10.2f}x"
        )
    subject = next(iter(samples))
    values = samples[subject]
    if not values or not raw:
        return []
    p99 = percentile(values, 0.99)
    raw_p99 = percentile(raw, 0.99)
    notes = f"{len(values)} rounds, {lost[subject]} lost"
    targets = [f"<= {max_ratio:g}x raw"] if max_ratio is not None else []
    targets += [f"<= {target_p99_ms:g} ms"] if target_p99_ms is not None else []
    met = (max_ratio is None or p99 <= max_ratio * raw_p99) and (
        target_p99_ms is None or p99 <= target_p99_ms
    )
    return [
        Row(
            section,
            f"{labels[subject]} p50",
            percentile(values, 0.5),
            "ms",
            "raw paho publish -> subscriber p50",
            percentile(raw, 0.5),
            notes=notes,
        ),
        Row(
            section,
            f"{labels[subject]} p99",
            p99,
            "ms",
            "raw paho publish -> subscriber p99",
            raw_p99,
            target=" and ".join(targets),
            ok=(met and not lost[subject]) if targets else None,
        ),
    ]
