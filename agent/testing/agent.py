"""End-to-end helpers: an in-process agent against a real broker, and a recording subscriber."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.mqttloop import disconnect_and_stop
from agent.runtime import Agent
from agent.testing.broker import Broker
from agent.testing.toml_writer import dumps

#: How long a test waits for something that should happen: generous, because CI runs on a
#: loaded 2-core machine; a passing test returns as soon as the condition holds.
DEADLINE = 30.0

SITE = "test-site"
DEVICE = "test-device"


def agent_config(
    tmp_path: Path, broker: Broker, drivers: Mapping[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    """A config document for a test agent; ``sections`` override/extend tables (mqtt={...})."""
    doc: dict[str, Any] = {
        "agent": {
            "site": SITE,
            "device": DEVICE,
            "state_dir": str(tmp_path / "state"),
            "heartbeat_interval": 1.0,
        },
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "keepalive": 5,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
        },
        "drivers": dict(drivers or {}),
        # Signature checks have their own tests (test_security.py); elsewhere commands are plain.
        "commands": {"require_signature": False},
    }
    for name, table in sections.items():
        doc[name] = {**doc.get(name, {}), **table}
    return doc


def write_config(path: Path, doc: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(doc))
    return path


class AgentHarness:
    """Runs :class:`agent.runtime.Agent` in this process from a config written to ``tmp_path``."""

    def __init__(
        self,
        tmp_path: Path,
        broker: Broker,
        drivers: Mapping[str, Any] | None = None,
        **sections: Any,
    ):
        self.tmp_path = tmp_path
        self.broker = broker
        self.doc = agent_config(tmp_path, broker, drivers, **sections)
        self.config_path = write_config(tmp_path / "wardpost.toml", self.doc)
        self.agent: Agent | None = None

    def start(self, wait_connected: bool = True, timeout: float = DEADLINE) -> Agent:
        """Start the agent; with ``wait_connected``, return once it is connected and (on a
        plain link) has announced itself online, so what a test sends it next is received."""
        agent = self.agent = Agent(load_config(self.config_path))
        agent.start()
        if wait_connected:
            wait_until(
                lambda: agent.publisher is not None and agent.publisher.connected,
                timeout,
                "agent connected",
            )
            if not agent.config.mqtt.tls.enabled:  # TLS tests connect their own clients
                self._wait_online(agent, timeout)
        return agent

    def _wait_online(self, agent: Agent, timeout: float) -> None:
        """Wait for this connection's "online" status at the broker. The agent subscribes to
        its commands and receipts before it publishes that status on the same connection,
        so once the broker has it, a command sent to the agent is never dropped for want of
        a subscription."""
        assert agent.publisher is not None
        connection = agent.publisher.connection
        with Recorder(self.broker, agent.publisher.topics.status) as rec:
            rec.wait_for(
                lambda msgs: any(
                    m.payload
                    and m.json().get("state") == "online"
                    and m.json().get("connection") == connection
                    for m in msgs
                ),
                timeout,
                f"the agent online (connection {connection})",
            )

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(flush_timeout=2.0)
            self.agent = None

    def __enter__(self) -> AgentHarness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = DEADLINE, what: str = "condition") -> T:
    """The first true value ``predicate()`` returns, polled until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float
    _parsed: Any = None

    def json(self) -> Any:
        if self._parsed is None:
            self._parsed = json.loads(self.payload)
        return self._parsed


class Recorder:
    """A real MQTT subscriber that records everything under ``topic`` (and can send receipts)."""

    def __init__(
        self,
        broker: Broker,
        topic: str = "wardpost/#",
        *,
        receipts: bool = False,
        client_id: str = "",
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.receipts = receipts
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"recorder-{id(self)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self._connected = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._connected.set()

    def start(self) -> Recorder:
        self.client.connect(self.broker.host, self.broker.port, 10)
        self.client.loop_start()
        if not self._connected.wait(DEADLINE):
            raise AssertionError("recorder did not subscribe")
        return self

    def stop(self) -> None:
        disconnect_and_stop(self.client)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        m = Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
        with self._cond:
            self.messages.append(m)
        if self.receipts and "/events/" in msg.topic:
            body = json.loads(msg.payload)
            base = msg.topic.split("/events/")[0]
            client.publish(f"{base}/receipts", json.dumps({"ids": [body["id"]]}), qos=1)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            msgs = list(self.messages)
        out = [m.json() for m in msgs if "/events/" in m.topic]
        return [e for e in out if kind is None or e["kind"] == kind]

    def on_topic(self, suffix: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(
        self,
        predicate: Callable[[list[Message]], bool],
        timeout: float = DEADLINE,
        what: str = "messages",
    ) -> None:
        # Poll a snapshot: evaluating the predicate under the lock on every arrival
        # would stall the MQTT thread delivering the messages.
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                snapshot = list(self.messages)
            if predicate(snapshot):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; got {len(snapshot)} messages: {[m.topic for m in snapshot[-10:]]}"
                )
            time.sleep(0.01)

    def wait_events(
        self, kind: str, count: int = 1, timeout: float = DEADLINE
    ) -> list[dict[str, Any]]:
        self.wait_for(
            lambda msgs: sum(1 for m in msgs if m.topic.endswith(f"/events/{kind}")) >= count,
            timeout,
            f"{count} {kind} events",
        )
        return self.events(kind)

    def publish(self, topic: str, payload: Any, qos: int = 1) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(topic, data, qos=qos).wait_for_publish(5)
