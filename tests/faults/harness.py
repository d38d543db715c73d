"""What every fault test shares: a rig (broker, recording centre, agent subprocess),
a ledger of what was accepted, and the check of the promise against what arrived.

The promise under test: every accepted event — a control-socket ``emit`` whose reply
said ``ok``/``durable``, or any event the outbox committed (its row is in the
database) — reaches the recording subscriber at least once; after de-duplication by
id each is seen exactly once (raw duplicates are counted, not failed: delivery is
at-least-once); per-source order is kept within a priority; critical goes first.

All times here are ``CLOCK_BOOTTIME`` seconds: system-wide, the clock the agent
stamps into ``boottime``, and immune to the wall-clock jumps some tests make.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.control import ControlError
from agent.testing.agent import SITE, Recorder, agent_config, write_config
from agent.testing.broker import Broker
from agent.testing.outbox import outbox_rows
from agent.testing.process import AgentProcess, ControlClient

SEED_ENV = "WARDPOST_FAULT_SEED"
ITERATIONS_ENV = "WARDPOST_FAULT_ITERATIONS"
OUTAGE_ENV = "WARDPOST_FAULT_OUTAGE"


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _monotonic_to_boottime() -> float:
    """Offset that turns this machine's CLOCK_MONOTONIC (the Recorder's stamps) into boottime."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()


def iterations(default: int) -> int:
    return max(1, int(os.environ.get(ITERATIONS_ENV, default)))


def outage_seconds(default: float) -> float:
    return float(os.environ.get(OUTAGE_ENV, default))


def base_seed() -> int:
    """The run's seed: ``WARDPOST_FAULT_SEED`` to replay a run, else fresh (and printed)."""
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 2**31))


# ----------------------------------------------------------------- the ledger


@dataclass
class Accepted:
    id: str
    priority: str
    kind: str
    at: float  # boottime when the agent answered "durable"
    tag: str = ""  # which iteration / phase accepted it


@dataclass
class Verdict:
    """The promise checked against what the subscriber saw."""

    expected: int
    delivered: int
    lost: list[str]
    raw_duplicates: int
    order_violations: list[str]
    critical_latency_max: float | None
    critical_latency_count: int
    worst_critical: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, fault: str, iterations: int, **notes: Any) -> dict[str, Any]:
        return {
            "fault": fault,
            "iterations": iterations,
            "accepted": self.expected,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "duplicated": self.raw_duplicates,
            "order_violations": len(self.order_violations),
            "max_latency_s": None
            if self.critical_latency_max is None
            else round(self.critical_latency_max, 4),
            **self.extra,
            **notes,
        }

    def assert_promise(self, *, order: bool = True) -> None:
        assert not self.lost, (
            f"{len(self.lost)} of {self.expected} accepted events never reached the centre: {self.lost[:10]}"
        )
        if order:
            assert not self.order_violations, (
                f"per-source order broken: {self.order_violations[:5]}"
            )


class Ledger:
    """Every event the agent accepted, from the control socket's replies and the outbox itself."""

    def __init__(self) -> None:
        self.accepted: dict[str, Accepted] = {}
        self.committed: dict[
            str, tuple[int, int, str]
        ] = {}  # id -> (rank, seq, kind), read from outbox.db
        self.unanswered = 0  # emits cut off by a fault: not accepted, so not promised
        self.rejected = 0  # replies with ok = false
        self.held: dict[str, Accepted] = {}  # accepted into memory only (storage failing)
        self.promise_held = True
        self.clears: list[float] = []  # boottimes at which a fault ended
        self._lock = threading.Lock()

    def accept(self, reply: Mapping[str, Any], priority: str, kind: str, tag: str = "") -> bool:
        """Record an emit's reply: on disk (promised), held in memory (promised only while
        the agent runs: see ``held``), or refused."""
        with self._lock:
            entry = Accepted(reply.get("id", ""), priority, kind, boottime(), tag)
            if reply.get("ok") and reply.get("fate") == "durable":
                self.accepted[entry.id] = entry
                return True
            if reply.get("ok") and reply.get("fate") == "memory":
                self.held[entry.id] = entry
                if self.promise_held:
                    self.accepted[entry.id] = entry
                return True
            self.rejected += 1
            return False

    def forget_held(self) -> None:
        """The agent is about to be killed: events held only in memory are no longer promised."""
        with self._lock:
            self.promise_held = False
            for event_id in self.held:
                self.accepted.pop(event_id, None)

    def fault_cleared(self) -> None:
        self.clears.append(boottime())

    def read_outbox(self, db_path: Path) -> int:
        """Add every row of a stopped agent's outbox (all were committed, so all are promised)."""
        rows = outbox_rows(db_path)
        for event_id, rank, seq, kind, _published in rows:
            self.committed[event_id] = (rank, seq, kind)
        return len(rows)

    def expected_ids(self) -> set[str]:
        return set(self.accepted) | set(self.committed)

    def verdict(self, recorder: Recorder, ignore_kinds: Iterable[str] = ()) -> Verdict:
        offset = _monotonic_to_boottime()
        first: dict[str, tuple[float, dict[str, Any]]] = {}
        copies: dict[str, int] = defaultdict(int)
        arrivals: list[tuple[float, dict[str, Any]]] = []
        for message in list(recorder.messages):
            if "/events/" not in message.topic:
                continue
            body = message.json()
            copies[body["id"]] += 1
            if body["id"] not in first:
                at = message.received + offset
                first[body["id"]] = (at, body)
                arrivals.append((at, body))
        expected = self.expected_ids()
        ignored = set(ignore_kinds)
        lost = sorted(i for i in expected if i not in first and self._kind(i) not in ignored)
        duplicates = sum(n - 1 for n in copies.values())
        order = _order_violations(arrivals)
        latencies = []
        worst: dict[str, Any] = {}
        for at, body in arrivals:
            if body["priority"] == "critical":
                start = max([body["boottime"], *(c for c in self.clears if c <= at)])
                latencies.append(at - start)
                if at - start >= max(latencies):
                    worst = {
                        "id": body["id"],
                        "kind": body["kind"],
                        "latency": round(at - start, 4),
                        "emitted": round(body["boottime"], 3),
                        "arrived": round(at, 3),
                        "copies": copies[body["id"]],
                    }
        return Verdict(
            expected=len(expected),
            delivered=len(expected & first.keys()),
            lost=lost,
            raw_duplicates=duplicates,
            order_violations=order,
            critical_latency_max=max(latencies) if latencies else None,
            critical_latency_count=len(latencies),
            worst_critical=worst,
        )

    def _kind(self, event_id: str) -> str:
        if event_id in self.accepted:
            return self.accepted[event_id].kind
        return self.committed[event_id][2]


def _order_violations(arrivals: list[tuple[float, dict[str, Any]]]) -> list[str]:
    """Within each stream and priority, first arrivals must come in ``seq`` order.

    A stream is a source, except that the control socket is one source shared by
    concurrent clients with no order between them; the fault tests give each emitting
    client its own kind, so (source, kind) names a stream there."""
    last: dict[tuple[str, ...], int] = {}
    recent: dict[tuple[str, ...], list[int]] = defaultdict(list)
    problems = []
    for _at, body in arrivals:
        key = (
            body["device"],
            body["source"],
            body["kind"] if body["source"] == "control" else "",
            body["priority"],
        )
        seq = int(body["seq"])
        recent[key] = [*recent[key][-11:], seq]
        if key in last and seq < last[key]:
            problems.append(
                f"{key}: seq {seq} ({body['kind']} {body['id']}) arrived after seq {last[key]}; "
                f"arrival order there: {recent[key]}"
            )
        last[key] = max(seq, last.get(key, seq))
    return problems


def remount(mount_point: Path, mode: str) -> None:
    """Remount the ``small_fs`` fixture's tmpfs read-only (``"ro"``) or read-write (``"rw"``)."""
    subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(mount_point)], check=True, capture_output=True
    )


def fill_disk(directory: Path) -> int:
    """Write a ballast file until the filesystem under ``directory`` is full; returns its size."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    written += f.write(b"\xff" * chunk)
    return written


# -------------------------------------------------------------------- the rig


class Emitter:
    """A thread emitting through its own control connection until stopped or cut off.

    ``priorities`` cycles; each reply marked durable goes into the ledger. A request the
    agent never answers (killed, socket gone) is counted as unanswered and ends the thread
    unless ``persist`` (keep trying through restarts)."""

    def __init__(
        self,
        agent: AgentProcess,
        ledger: Ledger,
        *,
        kind: str = "fault.burst",
        priorities: Iterable[str] = ("normal",),
        rate: float = 0.0,
        limit: int = 1_000_000,
        tag: str = "",
        persist: bool = False,
    ):
        self.client: ControlClient = agent.client()
        self.ledger = ledger
        self.kind = kind
        self.priorities = list(priorities)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.limit = limit
        self.tag = tag
        self.persist = persist
        self.sent = 0
        self.accepted = 0
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"emitter-{kind}", daemon=True)

    def start(self) -> Emitter:
        self.thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        self.client.close()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_flag.is_set() and self.sent < self.limit:
            priority = self.priorities[self.sent % len(self.priorities)]
            self.sent += 1
            try:
                reply = self.client.emit(self.kind, priority, {"n": self.sent, "tag": self.tag})
            except (OSError, ControlError, ValueError):
                self.ledger.unanswered += 1
                if not self.persist:
                    return
                self.stop_flag.wait(0.05)
                continue
            if self.ledger.accept(reply, priority, self.kind, self.tag):
                self.accepted += 1
            if self.interval:
                next_at += self.interval
                self.stop_flag.wait(max(0.0, next_at - time.monotonic()))


class Rig:
    """A private broker, a recording centre sending receipts, and one agent subprocess."""

    def __init__(
        self,
        tmp_path: Path,
        broker: Broker,
        *,
        drivers: Mapping[str, Any] | None = None,
        state_dir: Path | None = None,
        mqtt_port: int | None = None,
        **sections: Any,
    ):
        self.tmp_path = tmp_path
        self.broker = broker
        self.state_dir = state_dir or tmp_path / "state"
        self.control_socket = (
            tmp_path / "control.sock"
        )  # outside the state dir: that one may be read-only
        mqtt = {
            "keepalive": 2,
            "delivery": "receipt",
            "receipt_timeout": 3.0,
            "ack_timeout": 3.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            **sections.pop("mqtt", {}),
        }
        if mqtt_port is not None:
            mqtt["port"] = mqtt_port
        agent_section = {
            "state_dir": str(self.state_dir),
            "control_socket": str(self.control_socket),
            **sections.pop("agent", {}),
        }
        self.doc = agent_config(
            tmp_path, broker, drivers, agent=agent_section, mqtt=mqtt, **sections
        )
        self.config_path = write_config(tmp_path / "wardpost.toml", self.doc)
        self.ledger = Ledger()
        self.recorder = Recorder(
            broker,
            f"wardpost/{SITE}/#",
            receipts=True,
            client_id=f"centre-{os.getpid()}-{id(self)}",
        )
        # paho types the delays as int but computes with floats; a 1 s floor would slow every outage test.
        self.recorder.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        self.agent = AgentProcess(
            self.config_path, self.control_socket, log_path=tmp_path / "agent.log"
        )
        self._seen: set[str] = set()
        self._parsed = 0

    @property
    def db_path(self) -> Path:
        return self.state_dir / "outbox.db"

    def start(self) -> Rig:
        self.recorder.start()
        self.agent.start()
        return self

    def close(self) -> None:
        self.agent.kill()
        with contextlib.suppress(Exception):
            self.recorder.stop()

    def wait_drained(self, timeout: float = 60.0) -> dict[str, Any]:
        """Until the agent has nothing pending and nothing in flight."""
        return self.agent.wait_for(
            lambda s: (
                s["backlog"]["count"] == 0
                and s["link"]["in_flight"] == 0
                and s["link"]["connected"]
            ),
            timeout,
            "the backlog to drain",
        )

    def seen_ids(self) -> set[str]:
        """Ids of every event message received so far (parsed incrementally)."""
        messages = self.recorder.messages
        while self._parsed < len(messages):
            message = messages[self._parsed]
            self._parsed += 1
            if "/events/" in message.topic:
                self._seen.add(message.json()["id"])
        return self._seen

    def wait_delivered(self, ids: Iterable[str], timeout: float = 60.0) -> bool:
        """Poll until every id in ``ids`` has reached the centre; False on timeout."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while not wanted <= self.seen_ids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def quiesce(self) -> None:
        """Disable every driver by a config reload, so the backlog can reach zero."""
        doc = {
            **self.doc,
            "drivers": {
                name: {**table, "enabled": False} for name, table in self.doc["drivers"].items()
            },
        }
        write_config(self.config_path, doc)
        reply = self.agent.control.ask({"op": "reload"})
        assert reply.get("ok"), reply
        write_config(self.config_path, self.doc)

    def finish(self, timeout: float = 60.0) -> Verdict:
        """Stop the drivers, drain, stop cleanly, read every committed row, and judge."""
        if self.doc["drivers"]:
            self.quiesce()
        self.wait_drained(timeout)
        self.agent.terminate()
        self.ledger.read_outbox(self.db_path)
        self.wait_delivered(self.ledger.expected_ids(), timeout=10)
        return self.ledger.verdict(self.recorder)


def arrival_index(recorder: Recorder) -> dict[str, int]:
    """Event id -> position of its first arrival among all event messages."""
    order: dict[str, int] = {}
    for message in list(recorder.messages):
        if "/events/" in message.topic:
            order.setdefault(message.json()["id"], len(order))
    return order
