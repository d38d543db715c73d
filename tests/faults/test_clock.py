"""The wall clock jumps backwards and forwards (NTP/RTC steps) while events flow."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from tests.faults.harness import Emitter, Rig

pytestmark = pytest.mark.faults

GATE = {"gate": {"type": "simulated", "kind": "gate.alarm", "priority": "high", "rate": 100.0}}
DAY = 86400.0


def _step(offset_file: Path, seconds: float) -> None:
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(f"{seconds}\n")
    os.replace(tmp, offset_file)


def test_wall_clock_jumps(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    offset_file = tmp_path / "clock-offset"
    _step(offset_file, 0)
    rig = Rig(tmp_path, fault_broker, drivers=GATE)
    rig.agent.launcher = ["-m", "tests.faults.wallclock", str(offset_file)]
    rig.start()
    steady = Emitter(
        rig.agent,
        rig.ledger,
        kind="panic.pressed",
        priorities=("critical", "normal"),
        rate=40,
        persist=True,
    ).start()
    try:
        for seconds in (-3600.0, 2 * DAY, -DAY):  # back an hour, forward two days, back again
            time.sleep(1.0)
            _step(offset_file, seconds)
        time.sleep(1.0)
        rig.agent.terminate()  # restart with the clock a day behind the last events
        rig.agent.start()
        _step(offset_file, -2 * DAY)
        time.sleep(1.0)
        steady.stop()
        verdict = rig.finish()
    finally:
        steady.stop()
        rig.close()
    events = {e["id"]: e for e in rig.recorder.events()}
    seqs = sorted(int(e["seq"]) for e in events.values())
    stamps = [
        datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
        for e in events.values()
    ]
    fault_matrix(
        verdict.row(
            "wall clock steps",
            4,
            steps="-1h, +2d, -1d, restart at -2d",
            time_span_days=round((max(stamps) - min(stamps)) / DAY, 2),
        )
    )
    verdict.assert_promise()
    assert max(stamps) - min(stamps) > 2 * DAY, "the wall clock shim did not reach the agent"
    assert len(seqs) == len(set(seqs)), "seq reused across a clock step"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
        "seq has gaps: it must not depend on wall time"
    )
