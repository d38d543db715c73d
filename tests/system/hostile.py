"""A hostile client on the loop's broker: a valid certificate, and bad intentions.

It connects with an identity the CA really issued (a device's, or a leaked console's)
and publishes what it likes; the broker's ACL decides what gets through, and MQTT 5
tells it: PUBACK reason 0 (accepted) or 135 (not authorized).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.event import Event, Priority
from agent.mqttloop import disconnect_and_stop
from agent.testing.broker import Broker
from tests.support.tls import Identity, TestPKI

NOT_AUTHORIZED = 135


class HostileClient:
    def __init__(self, broker: Broker, pki: TestPKI, identity: Identity, name: str = "hostile"):
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(pki.ca_file),
            certfile=str(identity.cert_file),
            keyfile=str(identity.key_file),
        )
        self.broker = broker
        self._acks: dict[int, int] = {}
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self._connected.set()
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = int(getattr(reason, "value", reason))
            self._cond.notify_all()

    def __enter__(self) -> HostileClient:
        self.client.connect(self.broker.host, self.broker.port, 30)
        self.client.loop_start()
        if not self._connected.wait(30):
            raise AssertionError("the hostile client could not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect_and_stop(self.client)

    def publish(self, topic: str, payload: bytes | str, timeout: float = 30.0) -> int:
        """QoS 1 publish; returns the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        with self._cond:
            while info.mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no PUBACK for {topic} within {timeout}s")
                self._cond.wait(left)
            return self._acks.pop(info.mid)


def well_formed_event(site: str, device: str, **overrides: Any) -> dict[str, Any]:
    """An event exactly as an agent would publish it, with fields overridden."""
    event = Event(
        kind="test.probe",
        source="probe",
        priority=Priority.NORMAL,
        site=site,
        device=device,
        seq=1,
        payload={},
    )
    return {**event.to_dict(), **overrides}


def poison(site: str, device: str) -> list[tuple[str, bytes, str]]:
    """(topic suffix, payload, what) for every kind of poison the issue lists."""
    deep = ('{"x":' * 100_000) + "1" + ("}" * 100_000)

    def event(**overrides: Any) -> bytes:
        return json.dumps(well_formed_event(site, device, **overrides)).encode()

    lone = json.dumps(well_formed_event(site, device, payload={"note": "X"})).replace(
        '"X"', '"\\ud800"'
    )
    huge = json.dumps(well_formed_event(site, device, payload={"n": 0})).replace(
        '"n": 0', '"n": ' + "9" * 5000
    )
    status = json.dumps(
        {
            "state": "online",
            "boot": 2**70,
            "connection": 1,
            "version": "0",
            "time": "2026-01-01T00:00:00Z",
        }
    ).encode()
    return [
        ("events/test.probe", event(seq=2**64), "seq 2**64"),
        ("status", status, "status with boot 2**70"),
        ("events/test.probe", deep.encode(), "100,000 levels of nesting"),
        (
            "events/test.probe",
            json.dumps(well_formed_event(site, device)).encode("utf-16"),
            "UTF-16",
        ),
        ("events/test.probe", lone.encode(), "a lone surrogate"),
        ("events/test.probe", huge.encode(), "a 5,000-digit number"),
        ("events/test.probe", b"\xff\xfenot json at all {", "not JSON"),
        ("events/test.probe", event(payload={"blob": "x" * (4 << 20)}), "4 MiB"),
    ]
