"""A gate floods 1,000 alarms/s while a panic button is pressed: the panic still goes first."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from tests.faults.harness import Rig, boottime

pytestmark = pytest.mark.faults

DRIVERS = {
    "gate": {"type": "simulated", "kind": "gate.alarm", "priority": "high", "rate": 1000.0},
    "panic": {"type": "simulated", "kind": "panic.pressed", "priority": "critical", "rate": 0.0},
}
PRESSES = 10
LATENCY_BOUND = 1.0  # seconds; a correctness bound, the measured figures go to the matrix


def test_panic_during_a_gate_flood(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    rig = Rig(tmp_path, fault_broker, drivers=DRIVERS).start()
    presses: list[str] = []
    try:
        time.sleep(2.0)  # let the flood build up a backlog
        for _ in range(PRESSES):
            reply = rig.agent.simulate("panic")
            assert reply.get("ok"), reply
            presses.append(reply["result"]["ids"][0])
            time.sleep(0.4)
        flood_status = rig.agent.status()
        assert rig.wait_delivered(presses, timeout=10)
        verdict = rig.finish(timeout=120)
    finally:
        rig.close()
    latencies = []
    offset = boottime() - time.monotonic()
    first: dict[str, float] = {}
    for message in rig.recorder.messages:
        if "/events/panic.pressed" in message.topic:
            first.setdefault(message.json()["id"], message.received + offset)
    events = {e["id"]: e for e in rig.recorder.events("panic.pressed")}
    latencies = sorted(first[i] - events[i]["boottime"] for i in presses)
    gate_rate = sum(1 for e in rig.recorder.events("gate.alarm")) / max(1.0, flood_status["uptime"])
    fault_matrix(
        verdict.row(
            "flood 1000/s + panic presses",
            PRESSES,
            panic_latency_ms={
                "p50": round(latencies[len(latencies) // 2] * 1000, 1),
                "max": round(latencies[-1] * 1000, 1),
            },
            backlog_during_flood=flood_status["backlog"]["count"],
            gate_events_per_s=round(gate_rate),
        )
    )
    verdict.assert_promise()
    assert latencies[-1] < LATENCY_BOUND, f"panic took {latencies[-1]:.3f}s through the flood"
