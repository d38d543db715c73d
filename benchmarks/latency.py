"""End-to-end latency measurement shared by the driver benchmarks (panic, serial).

A driver path (pin edge, serial bytes) is timed interleaved with the core's bare
``Agent.emit`` and a raw paho QoS 1 publish, one sample of each per round, so the three
share the machine's load; :func:`latency_table` prints them and returns the headline
rows (the driver path beside raw paho) for ``scripts/bench``'s one table.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing.broker import Broker
from benchmarks.report import Row, percentile


class Arrivals:
    """A subscriber in a process of its own that timestamps each message on its topics.

    Tagged by topic, or by a field of the JSON payload (``key``). Its own process: inside
    the benchmark's process it would wait for the interpreter behind the very threads it
    measures (the agent's outbox writer, its network thread) and add their time to the
    path's latency, which a centre on another machine never sees. ``time.perf_counter`` is
    ``CLOCK_MONOTONIC`` on Linux, one clock for every process, so its times and ours
    compare. Only the first arrival of a tag counts (a re-sent copy is not a new one)."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str, key: str = ""):
        self._cond = threading.Condition()
        self._arrived: dict[str, float] = {}
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.latency",
                "--subscribe",
                broker.host,
                str(broker.port),
                client_id,
                key,
                *topics,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "subscribed":
            self._proc.kill()
            raise RuntimeError("subscriber did not subscribe")
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, lines: IO[str]) -> None:
        for line in lines:
            tag, _, at = line.rstrip("\n").rpartition(" ")
            with self._cond:
                self._arrived.setdefault(tag, float(at))
                self._cond.notify_all()

    def clear(self, tag: str) -> None:
        with self._cond:
            self._arrived.pop(tag, None)

    def wait(self, tag: str, timeout: float = 5.0) -> float | None:
        """The arrival time of ``tag`` (taken by the subscriber), or None after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: tag in self._arrived, timeout):
                return None
            return self._arrived.pop(tag)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
        self._reader.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _subscribe(host: str, port: int, client_id: str, key: str, topics: list[str]) -> None:
    """The subscriber process: one line ``<tag> <perf_counter>`` per message."""
    out = sys.stdout

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        tag = str(json.loads(msg.payload)[key]) if key else msg.topic
        out.write(f"{tag} {now!r}\n")
        out.flush()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
    client.on_subscribe = lambda c, u, mid, rcs, p: print("subscribed", flush=True)
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect(host, port, 30)
    client.loop_forever()


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
    arrived = arrivals.wait(topic, timeout=2.0)
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


if __name__ == "__main__":
    if sys.argv[1:2] != ["--subscribe"] or len(sys.argv) < 7:
        sys.exit("usage: python -m benchmarks.latency --subscribe HOST PORT CLIENT_ID KEY TOPIC...")
    _subscribe(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:])
