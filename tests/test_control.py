"""The control socket and the CLI commands that use it, against a running agent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agent.cli import main
from agent.testing.agent import AgentHarness, Recorder
from agent.testing.broker import Broker


@pytest.fixture
def agent_with_socket(tmp_path: Path, broker: Broker):
    from agent.control import ControlServer

    h = AgentHarness(tmp_path, broker, drivers={"sim": {"type": "simulated", "rate": 0.0}})
    agent = h.start()
    server = ControlServer(agent.config.agent.control_socket_path, agent)
    server.start()
    yield h, str(h.config_path)
    server.stop()
    h.stop()


def test_emit_status_events_simulate_reload(
    agent_with_socket, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config = agent_with_socket
    with Recorder(broker) as rec:
        assert (
            main(
                [
                    "--config",
                    config,
                    "emit",
                    "panic.pressed",
                    "--priority",
                    "critical",
                    "--payload",
                    '{"room": "7"}',
                    "--test",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert out.startswith("accepted ")
        event_id = out.split()[1]
        rec.wait_events("panic.pressed")
        event = rec.events("panic.pressed")[0]
        assert (
            event["id"] == event_id
            and event["test"] is True
            and event["source"] == "control"
            and event["payload"] == {"room": "7"}
        )

        assert main(["--config", config, "simulate", "sim", "emit", "--args", '{"count": 3}']) == 0
        assert len(json.loads(capsys.readouterr().out)["ids"]) == 3
        rec.wait_events("sim.tick", 3)

    assert main(["--config", config, "status"]) == 0
    out = capsys.readouterr().out
    assert "connected" in out and "sim" in out and "simulated" in out
    assert main(["--config", config, "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["link"]["connected"] and status["drivers"]["sim"]["state"] == "ok"

    assert main(["--config", config, "events", "--limit", "50"]) == 0
    assert "panic.pressed" in capsys.readouterr().out

    assert main(["--config", config, "reload"]) == 0
    assert "reloaded" in capsys.readouterr().out


def test_control_errors_are_clear(
    agent_with_socket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config = agent_with_socket
    assert main(["--config", config, "emit", "Bad Kind"]) == 1
    assert "invalid event kind 'Bad Kind'" in capsys.readouterr().err
    assert main(["--config", config, "simulate", "nope", "press"]) == 1
    assert "no running driver named 'nope' (running: sim)" in capsys.readouterr().err
    assert main(["--config", config, "simulate", "sim", "explode"]) == 1
    assert "unknown action 'explode'" in capsys.readouterr().err
    assert main(["--socket", str(tmp_path / "absent.sock"), "status"]) == 1
    assert "no agent is running here" in capsys.readouterr().err


def test_reload_with_changed_and_bad_config(
    agent_with_socket, capsys: pytest.CaptureFixture[str]
) -> None:
    h, config = agent_with_socket
    path = Path(config)
    original = path.read_text()
    path.write_text(
        original.replace('"rate" = 0.0', '"rate" = 0.5')
        + '\n[drivers.sim2]\n"type" = "simulated"\n"rate" = 0.0\n'
    )
    assert main(["--config", config, "reload"]) == 0
    assert "started ['sim', 'sim2'], stopped ['sim']" in capsys.readouterr().out
    assert h.agent is not None and sorted(h.agent.slots) == ["sim", "sim2"]
    path.write_text(original.replace('"rate" = 0.0', '"rate" = "fast"'))
    assert main(["--config", config, "reload"]) == 1
    assert "drivers.sim.rate: expected a number" in capsys.readouterr().err
    assert sorted(h.agent.slots) == ["sim", "sim2"], "a bad config keeps the running one"


@pytest.mark.parametrize("delivery", ["receipt", "broker"])
def test_the_delivery_guarantee_in_force_is_said_plainly(
    tmp_path: Path,
    broker: Broker,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    delivery: str,
) -> None:
    """check-config, the start-up log, status and the heartbeat all name the mode and what
    it guarantees; broker mode warns that a broker without the centre's session loses events."""
    from agent.config import DELIVERY_GUARANTEES
    from agent.control import ControlServer

    caplog.set_level(logging.INFO, "wardpost")
    h = AgentHarness(tmp_path, broker, mqtt={"delivery": delivery})
    assert main(["check-config", str(h.config_path)]) == 0
    assert f"delivery = {delivery}: {DELIVERY_GUARANTEES[delivery]}" in capsys.readouterr().out
    with Recorder(broker) as rec:
        agent = h.start()
        server = ControlServer(agent.config.agent.control_socket_path, agent)
        server.start()
        try:
            assert main(["--config", str(h.config_path), "status"]) == 0
            out = capsys.readouterr().out
            assert f"delivery {delivery}: {DELIVERY_GUARANTEES[delivery]}" in out
            beat = next(m.json() for m in _wait_heartbeat(rec) if m.topic.endswith("/heartbeat"))
            assert beat["delivery"] == delivery
            started = rec.wait_events("agent.started")[-1]["payload"]
            assert started["delivery"] == delivery
        finally:
            server.stop()
            h.stop()
    logged = [r for r in caplog.records if r.getMessage().startswith(f"delivery = {delivery}")]
    assert logged and (logged[0].levelname == ("INFO" if delivery == "receipt" else "WARNING"))
    assert ("discards it unseen" in logged[0].getMessage()) == (delivery == "broker")


def _wait_heartbeat(rec: Recorder) -> list:
    rec.wait_for(lambda m: any(x.topic.endswith("/heartbeat") for x in m), 10, "a heartbeat")
    return list(rec.messages)


def test_the_examples_deliver_end_to_end() -> None:
    """The example, demo and installed configs use receipt mode (the centre runs
    ``wardpost receiver`` or ``wardpost monitor``, both of which send receipts)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent / "config"
    for name in ("wardpost.example.toml", "demo.toml"):
        text = (root / name).read_text().replace("@PORT@", "1883")
        assert tomllib.loads(text)["mqtt"]["delivery"] == "receipt", name
