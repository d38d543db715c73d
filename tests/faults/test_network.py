"""Partitions and slow links between the agent and its broker, through a proxy the test controls."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import MQTTConfig
from agent.testing.broker import Broker
from tests.faults.harness import Emitter, Rig, boottime, iterations
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.faults

GATE = {"gate": {"type": "simulated", "kind": "gate.alarm", "priority": "high", "rate": 100.0}}
KEEPALIVE = 2  # seconds; the rig's [mqtt] keepalive
ONE_WAY_DELAY = 0.3


def _run(rig: Rig, proxy: TcpProxy, fault: str) -> dict[str, Any]:
    """Apply ``fault`` once and clear it; returns what was measured."""
    if fault == "reset":
        proxy.reset()
        rig.ledger.fault_cleared()
        return {}
    if fault == "refuse":
        proxy.refuse()
        time.sleep(3.0)
        proxy.set_pass()
        rig.ledger.fault_cleared()
        return {}
    if fault == "blackhole":
        proxy.blackhole()
        cut = boottime()
        rig.agent.wait_for(
            lambda s: not s["link"]["connected"], 6 * KEEPALIVE, "the agent to notice the blackhole"
        )
        noticed = boottime() - cut
        proxy.set_pass()
        rig.ledger.fault_cleared()
        return {"noticed_s": round(noticed, 2)}
    if fault == "delay":
        proxy.set_pass(delay=ONE_WAY_DELAY)
        time.sleep(4.0)
        proxy.set_pass()
        return {"one_way_delay_s": ONE_WAY_DELAY}
    raise ValueError(fault)


@pytest.mark.parametrize("fault", ["reset", "blackhole", "delay", "refuse"])
def test_link_fault_under_load(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None], fault: str
) -> None:
    rounds = min(iterations(2), 10)
    measured: list[dict[str, Any]] = []
    with TcpProxy(fault_broker.host, fault_broker.port) as proxy:
        rig = Rig(tmp_path, fault_broker, drivers=GATE, mqtt_port=proxy.port).start()
        steady = Emitter(
            rig.agent,
            rig.ledger,
            kind="panic.pressed",
            priorities=("critical", "normal", "normal"),
            rate=40,
            persist=True,
        ).start()
        try:
            for _ in range(rounds):
                time.sleep(1.0)
                measured.append(_run(rig, proxy, fault))
            time.sleep(1.0)
            steady.stop()
            verdict = rig.finish()
        finally:
            steady.stop()
            rig.close()
    notes: dict[str, Any] = {}
    if fault == "blackhole":
        notes["noticed_s_max"] = max(m["noticed_s"] for m in measured)
    if fault == "delay":
        notes["one_way_delay_s"] = ONE_WAY_DELAY
    print(
        "worst critical:",
        verdict.worst_critical,
        "fault cleared at",
        [round(c, 3) for c in rig.ledger.clears],
    )
    fault_matrix(verdict.row(f"link {fault}", rounds, **notes))
    verdict.assert_promise()
    if fault == "blackhole":
        # Noticed only through keepalive: about 2 x keepalive; this bound is for correctness.
        assert notes["noticed_s_max"] < 4 * KEEPALIVE


@pytest.mark.parametrize("load", ["busy", "idle"])
def test_dead_link_noticed_at_the_default_config(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None], load: str
) -> None:
    """A blackholed link, with the default ``keepalive`` and ``link_timeout``: how long until
    the agent knows (status disconnected), while events wait for the broker and when idle."""
    rounds = min(iterations(3), 10)
    defaults = MQTTConfig()
    noticed: list[float] = []
    with TcpProxy(fault_broker.host, fault_broker.port) as proxy:
        rig = Rig(
            tmp_path,
            fault_broker,
            mqtt_port=proxy.port,
            mqtt={"keepalive": defaults.keepalive, "link_timeout": defaults.link_timeout},
        ).start()
        steady = None
        if load == "busy":
            steady = Emitter(
                rig.agent,
                rig.ledger,
                kind="panic.pressed",
                priorities=("critical", "normal"),
                rate=20,
                persist=True,
            ).start()
        try:
            for _ in range(rounds):
                rig.agent.wait_for(lambda s: s["link"]["connected"], 30, "the link up")
                time.sleep(2.0 * defaults.keepalive if load == "idle" else 1.0)
                proxy.blackhole()
                cut = boottime()
                rig.agent.wait_for(
                    lambda s: not s["link"]["connected"], 60, "the dead link noticed"
                )
                noticed.append(boottime() - cut)
                proxy.set_pass()
                rig.ledger.fault_cleared()
            if steady is not None:
                steady.stop()
            verdict = rig.finish()
        finally:
            if steady is not None:
                steady.stop()
            rig.close()
    fault_matrix(
        verdict.row(
            f"dead link noticed, default config, {load}",
            rounds,
            noticed_s_max=round(max(noticed), 2),
            noticed_s_mean=round(sum(noticed) / len(noticed), 2),
            keepalive=defaults.keepalive,
            link_timeout=defaults.link_timeout,
        )
    )
    verdict.assert_promise()
    # Required: 5 s busy, 10 s idle; the bounds here leave room for a loaded CI box.
    assert max(noticed) < (8.0 if load == "busy" else 15.0), noticed
