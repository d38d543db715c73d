"""Commands from the centre through the real broker: routing, results, malformed input."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.commands import (
    MAX_COMMAND_BYTES,
    REJECTION_WINDOW,
    REJECTIONS_PER_WINDOW,
    Dispatcher,
    RejectionReporter,
)
from agent.driver import Command, CommandError
from agent.testing.agent import DEADLINE, DEVICE, SITE, AgentHarness, Recorder
from agent.testing.broker import Broker

BASE = f"wardpost/{SITE}/{DEVICE}"


def result_for(rec: Recorder, command_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
    rec.wait_for(
        lambda m: any(x.topic == f"{BASE}/cmd_result/{command_id}" for x in m),
        timeout,
        f"result of {command_id}",
    )
    return next(x.json() for x in rec.messages if x.topic == f"{BASE}/cmd_result/{command_id}")


def send(rec: Recorder, name: str, command_id: str, **fields: Any) -> None:
    rec.publish(f"{BASE}/cmd/{name}", {"id": command_id, "issued_at": time.time(), **fields})


@pytest.fixture
def running(tmp_path: Path, broker: Broker):
    with (
        Recorder(broker, f"{BASE}/#") as rec,
        AgentHarness(tmp_path, broker, drivers={"sim": {"type": "simulated", "rate": 0.0}}) as h,
    ):
        yield h, rec


def test_ping_and_reload(running) -> None:
    _, rec = running
    send(rec, "ping", "p1")
    result = result_for(rec, "p1")
    assert result["ok"] and result["handled_by"] == ["agent"] and result["result"]["version"]
    send(rec, "reload", "r1")
    assert result_for(rec, "r1")["result"]["started"] == []


@pytest.mark.parametrize(
    ("topic_name", "payload", "result_id", "error"),
    [
        ("ping", b"{not json", "_invalid", "payload is not JSON"),
        ("ping", b"[1,2]", "_invalid", "must be a JSON object"),
        ("ping", json.dumps({"issued_at": 1}).encode(), "_invalid", "'id' must be"),
        ("ping", json.dumps({"id": "a/b", "issued_at": 1}).encode(), "_invalid", "'id' must be"),
        (
            "ping",
            json.dumps({"id": "m5", "issued_at": "yesterday"}).encode(),
            "m5",
            "'issued_at' must be",
        ),
        (
            "ping",
            json.dumps({"id": "m6", "issued_at": 1, "args": [1]}).encode(),
            "m6",
            "'args' must be an object",
        ),
        (
            "nonsense",
            json.dumps({"id": "m7", "issued_at": 1}).encode(),
            "m7",
            "unknown command 'nonsense'",
        ),
        (
            "ping",
            json.dumps({"id": "m8", "issued_at": 1, "target": "sim"}).encode(),
            "m8",
            "no handler for 'ping' on target 'sim'",
        ),
        (
            "Bad-Name",
            json.dumps({"id": "m9", "issued_at": 1}).encode(),
            "_invalid",
            "invalid command name",
        ),
    ],
)
def test_malformed_commands_get_error_results(
    running, topic_name: str, payload: bytes, result_id: str, error: str
) -> None:
    _, rec = running
    rec.publish(f"{BASE}/cmd/{topic_name}", payload)
    rec.wait_for(
        lambda m: any(
            x.topic == f"{BASE}/cmd_result/{result_id}" and error in x.payload.decode() for x in m
        ),
        5,
        error,
    )
    # the agent is still fine afterwards
    send(rec, "ping", f"after-{result_id}-{abs(hash(error))}")
    assert result_for(rec, f"after-{result_id}-{abs(hash(error))}")["ok"]


def test_dispatcher_routes_to_the_claiming_handler_and_survives_exceptions() -> None:
    published: list[tuple[str, Mapping[str, Any]]] = []
    d = Dispatcher(
        verifier=type("V", (), {"verify": lambda self, n, m, r: None})(),
        publish_result=lambda i, b: published.append((i, b)),
        report_rejection=lambda k, p: None,
    )

    def mine(cmd: Command) -> Mapping[str, Any] | None:
        return {"acked": cmd.args["alarm"]} if cmd.args.get("alarm") == "A1" else None

    def not_mine(cmd: Command) -> None:
        return None

    def broken(cmd: Command) -> None:
        raise ZeroDivisionError

    def refuses(cmd: Command) -> None:
        raise CommandError("alarm already resolved")

    d.register("ack", "b1", mine)
    d.register("ack", "b2", not_mine)
    body = d.handle(
        "ack", json.dumps({"id": "c1", "issued_at": 1, "args": {"alarm": "A1"}}).encode()
    )
    assert body["ok"] and body["result"] == {"acked": "A1"} and body["handled_by"] == ["b1"]
    body = d.handle(
        "ack", json.dumps({"id": "c2", "issued_at": 1, "args": {"alarm": "ZZ"}}).encode()
    )
    assert not body["ok"] and "no driver recognised" in body["error"]
    d.register("boom", "b3", broken)
    body = d.handle("boom", json.dumps({"id": "c3", "issued_at": 1}).encode())
    assert not body["ok"] and body["error"] == "b3: internal error (ZeroDivisionError)"
    d.register("resolve", "b1", refuses)
    body = d.handle("resolve", json.dumps({"id": "c4", "issued_at": 1}).encode())
    assert body["error"] == "b1: alarm already resolved"
    assert [i for i, _ in published] == ["c1", "c2", "c3", "c4"]
    d.unregister_owner("b1")
    assert d.known() == ["ack", "boom"]


DEEP = 40  # levels: beyond MAX_NESTING, far below the parser's recursion limit


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "payload is not JSON"),
        (bytes(range(256)) * 4, "payload is not JSON"),
        (b"{" + b" " * MAX_COMMAND_BYTES + b"}", "command too large"),
        (b"[" * 100_000 + b"]" * 100_000, "payload is not JSON"),  # the parser's recursion
        (
            b'{"id":"d1","issued_at":1,"args":{"a":' + b"[" * DEEP + b"]" * DEEP + b"}}",
            "levels deep",
        ),
        (b'{"id":"h1","issued_at":1' + b"0" * 5000 + b"}", "payload is not JSON"),
        (b'{"id":"h2","issued_at":1' + b"0" * 40 + b"}", "'issued_at' must be"),
        (b'{"id":"h3","issued_at":1e400}', "'issued_at' must be"),
        (b'{"id":"h4","issued_at":NaN}', "payload is not JSON"),
        (b'{"id":"u1","issued_at":1,"args":{"x":"\xff\xfe"}}', "payload is not JSON"),
    ],
    ids=[
        "invalid-json",
        "binary",
        "oversize",
        "deep-parser",
        "deep",
        "5000-digits",
        "huge-int",
        "float-overflow",
        "nan",
        "bad-utf8",
    ],
)
def test_malformed_commands_are_reported_to_the_centre_without_a_traceback(
    running, caplog: pytest.LogCaptureFixture, payload: bytes, reason: str
) -> None:
    _, rec = running
    rec.publish(f"{BASE}/cmd/ping", payload)
    rejected = rec.wait_events("security.command_rejected", timeout=15)[0]["payload"]
    assert rejected["command"] == "ping" and reason in rejected["reason"]
    assert rejected["suppressed"] == 0 and len(rejected["reason"]) < 400
    send(rec, "ping", "still-alive")
    assert result_for(rec, "still-alive")["ok"]
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage()[:200] for r in tracebacks]


def test_rejections_are_rate_limited_and_the_rest_counted() -> None:
    reported: list[dict[str, Any]] = []
    now = [1000.0]
    reporter = RejectionReporter(
        lambda kind, payload: reported.append(dict(payload)), lambda: now[0]
    )
    for i in range(REJECTIONS_PER_WINDOW + 7):
        reporter.report("ack", f"c{i}", "bad signature")
    assert len(reported) == REJECTIONS_PER_WINDOW and reporter.suppressed == 7
    reporter.flush()
    assert len(reported) == REJECTIONS_PER_WINDOW, "the window is not over yet"
    now[0] += REJECTION_WINDOW
    reporter.flush()
    assert reported[-1]["suppressed"] == 7 and reporter.suppressed == 0
    reporter.report("ack", None, "payload is not JSON")
    assert reported[-1] == {
        "command": "ack",
        "id": None,
        "reason": "payload is not JSON",
        "suppressed": 0,
    }
