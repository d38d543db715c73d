"""The control socket and the CLI commands that use it, against a running agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from tests.support.agent import AgentHarness, Recorder
from tests.support.broker import Broker


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
