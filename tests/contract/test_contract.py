"""Every payload a running agent publishes (and the console sends) matches contract/schemas."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

from agent.event import KIND_PATTERN, MAX_KIND_LENGTH
from agent.security import Signer, generate_keypair
from agent.testing.agent import DEADLINE, DEVICE, SITE, AgentHarness, Message, Recorder, wait_until
from agent.testing.broker import Broker
from central.alarms import command_message, unsigned

MALFORMED = b"{not json"  # sent on purpose; not part of any contract
CONTRACT = Path(__file__).resolve().parents[2] / "contract"
SCHEMAS = CONTRACT / "schemas"
BASE = f"wardpost/{SITE}/{DEVICE}"
#: Which schema each topic's payload must match.
TOPIC_SCHEMAS = [
    (re.compile(rf"^{BASE}/events/[a-z0-9_.]+$"), "event.json"),
    (re.compile(rf"^{BASE}/status$"), "status.json"),
    (re.compile(rf"^{BASE}/heartbeat$"), "heartbeat.json"),
    (re.compile(rf"^{BASE}/cmd_result/[A-Za-z0-9._:-]+$"), "cmd_result.json"),
    (re.compile(rf"^{BASE}/cmd/[a-z0-9_.]+$"), "command.json"),
    (re.compile(rf"^{BASE}/receipts$"), "receipts.json"),
]


def load_schemas() -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(SCHEMAS)): json.loads(p.read_text())
        for p in sorted(SCHEMAS.rglob("*.json"))
    }


class Contract:
    def __init__(self) -> None:
        self.schemas = load_schemas()
        self.registry: Registry[Any] = Registry().with_resources(
            (s["$id"], Resource.from_contents(s)) for s in self.schemas.values()
        )
        self.validators = {
            name: Draft7Validator(schema, registry=self.registry, format_checker=FormatChecker())
            for name, schema in self.schemas.items()
        }

    def schema_for(self, topic: str) -> str:
        for pattern, name in TOPIC_SCHEMAS:
            if pattern.match(topic):
                return name
        raise AssertionError(f"topic {topic} is not in the contract")

    def check(self, message: Message) -> None:
        name = self.schema_for(message.topic)
        errors = sorted(self.validators[name].iter_errors(message.json()), key=str)
        assert not errors, f"{message.topic} does not match {name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors
        )


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract()


# ---------------------------------------------------------------- the documents


def test_schemas_are_valid_draft7_with_unique_versioned_ids(contract: Contract) -> None:
    ids = [s["$id"] for s in contract.schemas.values()]
    assert len(ids) == len(set(ids))
    for name, schema in contract.schemas.items():
        Draft7Validator.check_schema(schema)
        assert schema["$id"] == f"https://wardpost.invalid/contract/1/{name}"


def test_every_reference_in_the_schemas_resolves(contract: Contract) -> None:
    for name, schema in contract.schemas.items():
        refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))
        resolver = contract.registry.resolver(base_uri=schema["$id"])
        for ref in refs:
            assert resolver.lookup(ref).contents, f"{name}: {ref}"


def test_the_agent_checks_kinds_with_the_contracts_own_pattern() -> None:
    schema = json.loads((SCHEMAS / "event.json").read_text())["properties"]["kind"]
    assert f"^{KIND_PATTERN.pattern}$" == schema["pattern"]
    assert schema["maxLength"] == MAX_KIND_LENGTH


def test_asyncapi_names_every_schema_and_topic() -> None:
    text = (CONTRACT / "asyncapi.yaml").read_text()
    assert text.startswith("asyncapi: 3.0.0\n")
    referenced = set(re.findall(r"\$ref: '\./schemas/([a-z_]+\.json)'", text))
    top_level = {p.name for p in SCHEMAS.glob("*.json")}
    assert referenced == top_level
    addresses = set(re.findall(r"address: (\S+)", text))
    assert addresses == {
        "wardpost/{site}/{device}/" + suffix
        for suffix in (
            "events/{kind}",
            "status",
            "heartbeat",
            "receipts",
            "cmd/{name}",
            "cmd_result/{id}",
        )
    }
    assert "version: 1.0.0" in text


def test_asyncapi_operations_point_at_declared_channels_and_messages() -> None:
    doc = yaml.safe_load((CONTRACT / "asyncapi.yaml").read_text())
    channels = doc["channels"]
    for name, operation in doc["operations"].items():
        channel = operation["channel"]["$ref"].rsplit("/", 1)[1]
        assert channel in channels, name
        for message in operation["messages"]:
            assert message["$ref"].rsplit("/", 1)[1] in channels[channel]["messages"], name


@pytest.mark.parametrize(
    ("kind", "payload", "problem"),
    [
        ("panic.pressed", {"mode": "press", "presses": 1}, "'location' is a required property"),
        (
            "agent.started",
            {"version": "1", "boot": 1, "config": "x", "drivers": [], "extra": 1},
            "Additional properties are not allowed",
        ),
        ("agent.invented", {}, "is not one of"),
    ],
)
def test_the_schemas_bite(
    contract: Contract, kind: str, payload: dict[str, Any], problem: str
) -> None:
    body = {
        "schema": 1,
        "id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "site": SITE,
        "device": DEVICE,
        "source": "agent" if kind.startswith("agent.") else "panic",
        "kind": kind,
        "priority": "critical",
        "time": "2026-01-05T10:11:12.000001Z",
        "boottime": 12.5,
        "boot_id": "x",
        "seq": 1,
        "test": False,
        "payload": payload,
    }
    message = Message(f"{BASE}/events/{kind}", json.dumps(body).encode(), False, 0.0)
    with pytest.raises(AssertionError, match=problem):
        contract.check(message)
    bad_priority = {**body, "kind": "gate.alarm", "source": "gate1", "priority": "urgent"}
    with pytest.raises(ValidationError):
        contract.validators["event.json"].validate(bad_priority)


# ------------------------------------------------------------------- live agent


@pytest.fixture
def traffic(tmp_path: Path, broker: Broker) -> Iterator[list[Message]]:
    """Everything one agent session puts on the wire: core, simulated and panic events,
    status, heartbeats, command results (ok, failed, malformed, rejected), and what the
    centre sends (signed commands, receipts)."""
    pytest.importorskip("drivers.panic_button")
    generate_keypair(tmp_path / "centre.key", tmp_path / "centre.pub")
    signer = Signer.from_file(str(tmp_path / "centre.key"))
    drivers = {
        "sim": {"type": "simulated", "rate": 0.0, "payload": {"zone": "A"}},
        "panic": {
            "type": "panic_button",
            "pin": 22,
            "location": {"ward": "3B", "room": "12"},
            "pin_factory": "mock",
            "bounce_time": 0.01,
        },
    }
    # A second button on the same pin: valid config, fails at start (agent.driver_failed).
    drivers["twin"] = drivers["panic"]
    with Recorder(broker, f"{BASE}/#", receipts=True) as rec:
        harness = AgentHarness(
            tmp_path,
            broker,
            drivers=drivers,
            commands={"require_signature": True, "public_keys": [str(tmp_path / "centre.pub")]},
        )
        agent = harness.start()

        def command(name: str, args: dict[str, Any] | None = None, signed: bool = True) -> str:
            message = command_message(
                SITE, DEVICE, name, args or {}, sign=signer.sign if signed else unsigned
            )
            rec.publish(f"{BASE}/cmd/{name}", message)
            rec.wait_for(
                lambda msgs: any(m.topic == f"{BASE}/cmd_result/{message['id']}" for m in msgs),
                10,
                f"the result of {name}",
            )
            return str(message["id"])

        agent.driver("sim").simulate("emit", {"count": 2})
        panic = agent.driver("panic")
        panic.simulate("press", {})
        alarm = rec.wait_events("panic.pressed")[0]["id"]
        panic.simulate("release", {})
        command("ack", {"alarm": alarm, "by": "desk-1"})
        command("resolve", {"alarm": alarm})
        command("ping")
        command("launch")
        command("ping", signed=False)
        rec.publish(f"{BASE}/cmd/ping", MALFORMED)
        rec.wait_for(
            lambda msgs: any(m.topic.endswith("/cmd_result/_invalid") for m in msgs), DEADLINE
        )
        command("reload")
        rec.wait_for(lambda msgs: any(m.topic.endswith("/heartbeat") for m in msgs), DEADLINE)
        wait_until(lambda: agent.outbox.backlog()[0] == 0, DEADLINE, "every event confirmed")
        harness.stop()
        rec.wait_for(
            lambda msgs: any(
                m.topic.endswith("/status") and m.json()["state"] == "stopped" for m in msgs
            ),
            5,
            "the stopped status",
        )
        yield [m for m in rec.messages if m.payload != MALFORMED]


def test_every_payload_on_the_wire_matches_the_contract(
    contract: Contract, traffic: list[Message]
) -> None:
    for message in traffic:
        contract.check(message)
    kinds = {m.json()["kind"] for m in traffic if "/events/" in m.topic}
    assert kinds >= {
        "agent.started",
        "agent.driver_failed",
        "agent.reloaded",
        "security.command_rejected",
        "sim.tick",
        "panic.pressed",
        "panic.released",
        "panic.acknowledged",
        "panic.resolved",
    }
    channels = {m.topic[len(BASE) + 1 :].split("/")[0] for m in traffic}
    assert channels == {"events", "status", "heartbeat", "cmd_result", "cmd", "receipts"}
    results = [m.json() for m in traffic if "/cmd_result/" in m.topic]
    assert {r["ok"] for r in results} == {True, False}


# ------------------------------------------------------------------- commands


def test_every_command_a_driver_or_the_core_registers_is_in_the_contract() -> None:
    """One vocabulary: a command handled at the edge must be defined in command_args/."""
    from contract.commands import command_names

    root = CONTRACT.parent
    registered = set()
    for path in [*root.glob("agent/*.py"), *root.glob("drivers/*/*.py")]:
        registered.update(
            re.findall(r'(?:on_command|register)\(\s*"([a-z][a-z0-9_.]*)"', path.read_text())
        )
    assert registered >= {"ack", "resolve", "silence", "test", "ping", "reload", "face.reject"}
    assert registered <= set(command_names()), registered - set(command_names())
    for name in command_names():
        schema = json.loads((SCHEMAS / "command_args" / f"{name}.json").read_text())
        assert schema["additionalProperties"] is False, f"{name}: args must be a closed object"
