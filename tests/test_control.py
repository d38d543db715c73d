"""The control socket and the CLI commands that use it, against a running agent."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
from pathlib import Path

import pytest

from agent.cli import main
from agent.control import MAX_REQUEST, read_answer
from agent.testing.agent import DEADLINE, AgentHarness, Recorder
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


# -- emit: strict JSON, the contract's kinds, limits --------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ('{"level": NaN}', "NaN is not valid JSON"),
        ('{"level": -Infinity}', "-Infinity is not valid JSON"),
        ('{"level": 1e999}', "the number 1e999 is too large"),
        ("[1, 2]", "payload must be a JSON object, got list"),
        ('{"a": ', "--payload is not JSON"),
        ('{"a": ' * 40 + "1" + "}" * 40, "payload is nested more than 32 levels deep"),
        ("[" * 200_000 + "]" * 200_000, "too large"),
        ('{"x": "' + "y" * 70_000 + '"}', "payload is 70008 bytes as JSON (at most 65536 bytes)"),
    ],
)
def test_emit_refuses_what_json_or_the_limits_do_not_allow(
    agent_with_socket, payload: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config = agent_with_socket
    assert main(["--config", config, "emit", "test.event", "--payload", payload]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_emit_refuses_nesting_too_deep_for_the_parser(agent_with_socket, capsys) -> None:
    _, config = agent_with_socket
    payload = "[" * 20_000 + "]" * 20_000  # under the size limit, deeper than Python parses
    assert main(["--config", config, "emit", "test.event", "--payload", payload]) == 1
    assert "--payload is nested more than 32 levels deep" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind", ["gate..alarm", ".gate", "gate.", "Gate.alarm", "café.open", "a" * 65, "gate alarm"]
)
def test_emit_refuses_kinds_the_contract_forbids(
    agent_with_socket, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, config = agent_with_socket
    assert main(["--config", config, "emit", kind]) == 1
    err = capsys.readouterr().err
    assert f"invalid event kind {kind!r}" in err and "[a-z0-9_]+" in err


def test_emit_reads_the_payload_from_a_file_or_stdin(
    agent_with_socket,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, config = agent_with_socket
    big = {"note": "z" * 60_000, "nested": {"list": [1, 2.5, None, True]}}
    payload_file = tmp_path / "payload.json"
    payload_file.write_text(json.dumps(big))
    with Recorder(broker) as rec:
        assert (
            main(["--config", config, "emit", "file.event", "--payload-file", str(payload_file)])
            == 0
        )
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"from": "stdin"}')))
        assert main(["--config", config, "emit", "stdin.event", "--payload-file", "-"]) == 0
        assert rec.wait_events("file.event")[0]["payload"] == big
        assert rec.wait_events("stdin.event")[0]["payload"] == {"from": "stdin"}
    capsys.readouterr()
    assert (
        main(["--config", config, "emit", "x.y", "--payload-file", str(tmp_path / "absent.json")])
        == 1
    )
    assert "cannot read --payload-file" in capsys.readouterr().err


# -- the control socket itself -----------------------------------------------------------


def raw_request(path: Path, data: bytes) -> dict[str, object]:
    """Send ``data`` as it is (no newline added) and read one answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return json.loads(read_answer(s))


def test_a_line_over_the_limit_is_refused_without_waiting_for_its_end(agent_with_socket) -> None:
    h, _ = agent_with_socket
    path = h.agent.config.agent.control_socket_path
    # No newline, and the connection stays open: the agent must answer once the limit is
    # passed rather than keep reading (a 256 MiB line once grew the agent to 470 MB).
    reply = raw_request(path, b"x" * (MAX_REQUEST + 4096))
    assert reply == {"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"}
    # ... and it still serves the next client.
    assert raw_request(path, b'{"op": "status"}\n')["ok"] is True


def test_the_socket_itself_refuses_non_standard_json(agent_with_socket) -> None:
    h, _ = agent_with_socket
    path = h.agent.config.agent.control_socket_path
    nan = b'{"op": "emit", "kind": "x.y", "payload": {"v": NaN}}\n'
    assert raw_request(path, nan) == {
        "ok": False,
        "error": "request: NaN is not valid JSON (use null or a string)",
    }
    deep = b'{"op": "emit", "kind": "x.y", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    reply = raw_request(path, deep)
    assert reply["ok"] is False and "request is nested more than 32 levels deep" in str(
        reply["error"]
    )
    bad_kind = b'{"op": "emit", "kind": "gate..alarm"}\n'
    assert "invalid event kind 'gate..alarm'" in str(raw_request(path, bad_kind)["error"])
