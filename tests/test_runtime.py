"""Driver supervision: one failing driver never takes the others down."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtime import Agent
from agent.testing.agent import DEADLINE, AgentHarness, Recorder, agent_config, wait_until
from agent.testing.broker import Broker


def test_failing_driver_is_isolated_reported_and_retried(tmp_path: Path, broker: Broker) -> None:
    doc = agent_config(
        tmp_path,
        broker,
        drivers={"good": {"type": "simulated", "rate": 20.0}, "bad": {"type": "not_installed"}},
    )
    agent = Agent(
        parse_config(doc, "test.toml")
    )  # skips driver validation, as a plug-in that breaks later would
    with Recorder(broker) as rec:
        agent.start()
        try:
            rec.wait_events("agent.driver_failed")
            failed = rec.events("agent.driver_failed")[0]
            assert (
                failed["payload"]["driver"] == "bad"
                and "unknown driver type 'not_installed'" in failed["payload"]["error"]
            )
            rec.wait_events("sim.tick", 5)
            health = agent.drivers_health()
            assert health["bad"].health.state == "failed" and health["good"].health.state == "ok"
            wait_until(lambda: agent.slots["bad"].failures >= 2, DEADLINE, "a retry")
            assert len(rec.events("agent.driver_failed")) == 1, "the same failure is reported once"
        finally:
            agent.stop()


def test_started_event_and_healthy(tmp_path: Path, broker: Broker) -> None:
    with (
        Recorder(broker) as rec,
        AgentHarness(tmp_path, broker, drivers={"sim": {"type": "simulated", "rate": 0.0}}) as h,
    ):
        started = rec.wait_events("agent.started")[0]
        assert started["payload"]["drivers"] == ["sim"] and started["source"] == "agent"
        assert h.agent is not None and h.agent.healthy()


def test_a_payload_that_cannot_be_sent_leaves_no_hole_in_seq(
    tmp_path: Path, broker: Broker
) -> None:
    with AgentHarness(tmp_path, broker) as h:
        assert h.agent is not None
        before = h.agent.emit("t", "x.y", {"n": 1}).event.seq
        with pytest.raises(ValueError, match=r"payload of 'x\.y' is not JSON"):
            h.agent.emit("t", "x.y", {"when": object()})
        assert h.agent.emit("t", "x.y", {"n": 2}).event.seq == before + 1
