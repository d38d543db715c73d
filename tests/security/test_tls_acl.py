"""Transport security with a real mosquitto running the shipped TLS listener and ACL."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.testing.agent import DEADLINE, DEVICE, SITE, AgentHarness, wait_until
from tests.security.conftest import TLSSetup
from tests.support.tls import Identity, TestPKI

OWN = f"wardpost/{SITE}/{DEVICE}"
OTHER = f"wardpost/{SITE}/other-device"


class Probe:
    """A bare MQTT 5 client that records CONNACK, PUBACK and SUBACK reason codes."""

    def __init__(
        self,
        tls: TLSSetup,
        identity: Identity | None,
        *,
        ca_file: Path | None = None,
        use_tls: bool = True,
    ):
        self.connacks: list[Any] = []
        self.pubacks: dict[int, Any] = {}
        self.subacks: list[Any] = []
        self.errors: list[str] = []
        self._event = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"probe-{id(self)}",
            protocol=mqtt.MQTTv5,
        )
        if use_tls:
            self.client.tls_set(
                ca_certs=str(ca_file or tls.pki.ca_file),
                certfile=str(identity.cert_file) if identity else None,
                keyfile=str(identity.key_file) if identity else None,
            )
        self.client.on_connect = lambda c, u, f, rc, p: self._note(self.connacks.append, rc)
        self.client.on_publish = lambda c, u, mid, rc, p: self._note(
            lambda r: self.pubacks.__setitem__(mid, r), rc
        )
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._note(self.subacks.extend, rcs)
        self.tls = tls

    def _note(self, store: Any, value: Any) -> None:
        store(value)
        self._event.set()

    def connect(self, seconds: float = 2.0) -> bool:
        """True once the broker accepted us; False if it refused or hung up (bounded)."""
        try:
            self.client.connect(self.tls.broker.host, self.tls.broker.port, 5)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(repr(exc))
            return False
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.connacks:
            rc = self.client.loop(0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.errors.append(mqtt.error_string(rc))
                return False
        return bool(self.connacks) and not self.connacks[0].is_failure

    def publish(self, topic: str, payload: str = "{}") -> Any:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 3
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            self.client.loop(0.05)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()


def test_agent_connects_over_tls_with_its_certificate(tmp_path: Path, tls: TLSSetup) -> None:
    with tls.recorder(f"{OWN}/#") as rec:
        harness = AgentHarness(tmp_path, tls.broker, mqtt=tls.agent_mqtt())
        agent = harness.start()
        try:
            emission = agent.emit("test", "probe.tick", {"n": 1})
            assert emission.wait_delivered(DEADLINE), "the broker acknowledged the event over TLS"
            rec.wait_for(
                lambda msgs: any(m.topic == f"{OWN}/events/probe.tick" for m in msgs),
                10,
                "the event at the centre",
            )
            rec.wait_for(
                lambda msgs: any(m.topic == f"{OWN}/heartbeat" for m in msgs),
                DEADLINE,
                "a heartbeat",
            )
            statuses = [m.json() for m in rec.on_topic(f"{OWN}/status")]
            assert statuses and statuses[-1]["state"] == "online"
            assert agent.publisher is not None and agent.publisher.counters["rejected"] == 0
        finally:
            harness.stop()


@pytest.mark.parametrize("case", ["no certificate", "certificate from another CA", "plain TCP"])
def test_a_client_without_a_valid_certificate_is_refused(
    tmp_path: Path, tls: TLSSetup, case: str
) -> None:
    if case == "no certificate":
        probe = Probe(tls, None)
    elif case == "certificate from another CA":
        stranger = TestPKI(tmp_path / "stranger").issue(f"{SITE}/{DEVICE}")
        probe = Probe(tls, stranger)
    else:
        probe = Probe(tls, None, use_tls=False)
    try:
        assert not probe.connect(), "the broker must not accept this client"
        assert not probe.connacks or probe.connacks[0].is_failure
    finally:
        probe.close()


def test_a_device_reaches_only_its_own_tree(tls: TLSSetup) -> None:
    probe = Probe(tls, tls.device)
    try:
        assert probe.connect()
        for topic in (f"{OWN}/events/probe.tick", f"{OWN}/heartbeat", f"{OWN}/cmd_result/x1"):
            assert not probe.publish(topic).is_failure, topic
        for topic in (
            f"{OTHER}/events/panic.pressed",
            f"{OTHER}/status",
            f"{OTHER}/cmd_result/x1",
            f"{OTHER}/cmd/ack",
            f"{OWN}/cmd/ack",
            f"{OTHER}/receipts",
            f"wardpost/elsewhere/{DEVICE}/events/panic.pressed",
        ):
            reason = probe.publish(topic)
            assert reason.value == 135, f"{topic}: {reason}"
    finally:
        probe.close()


def test_the_receiver_writes_receipts_and_commands_but_cannot_speak_as_a_device(
    tls: TLSSetup,
) -> None:
    probe = Probe(tls, tls.receiver)
    try:
        assert probe.connect()
        assert probe.publish(f"{OWN}/events/panic.pressed").value == 135
        assert probe.publish(f"{OWN}/status").value == 135
        assert not probe.publish(f"{OWN}/receipts", '{"ids": []}').is_failure
        assert not probe.publish(f"{OWN}/cmd/ping").is_failure
    finally:
        probe.close()


def test_a_console_sends_commands_but_cannot_forge_receipts(tls: TLSSetup) -> None:
    """A leaked console key must not be able to make a device delete undelivered events."""
    probe = Probe(tls, tls.console)
    try:
        assert probe.connect()
        assert not probe.publish(f"{OWN}/cmd/ack").is_failure
        assert probe.publish(f"{OWN}/receipts", '{"ids": []}').value == 135
        assert probe.publish(f"{OTHER}/receipts", '{"ids": []}').value == 135
        assert probe.publish(f"{OWN}/events/panic.pressed").value == 135
    finally:
        probe.close()


def test_the_old_centre_identity_has_no_rights(tls: TLSSetup) -> None:
    """The first example ACL gave one "centre" name receipts and commands; it is gone."""
    old = tls.pki.issue("centre")
    probe = Probe(tls, old)
    try:
        assert probe.connect()
        assert probe.publish(f"{OWN}/receipts", '{"ids": []}').value == 135
        assert probe.publish(f"{OWN}/cmd/ack").value == 135
    finally:
        probe.close()


def test_an_agent_speaking_as_another_device_is_refused_and_counts_it(
    tmp_path: Path, tls: TLSSetup
) -> None:
    """An agent configured as test-device but holding other-device's certificate (a copied
    or stolen config): every event is refused with reason 135 and nothing reaches the
    centre; the publisher counts the refusals and keeps the events in its outbox."""
    with tls.recorder("wardpost/#") as rec:
        harness = AgentHarness(tmp_path, tls.broker, mqtt=tls.agent_mqtt(tls.other_device))
        agent = harness.start()
        try:
            agent.emit("test", "panic.pressed", {"room": "12"}, "critical")
            assert agent.publisher is not None
            publisher = agent.publisher
            wait_until(lambda: publisher.counters["rejected"] >= 1, DEADLINE, "a refused publish")
            assert agent.outbox.backlog()[0] >= 1, "refused events stay in the outbox"
            assert publisher.counters["disconnects"] == 0, "a refusal is not a reason to drop us"
            time.sleep(0.3)
            assert not rec.on_topic("/events/panic.pressed")
        finally:
            harness.stop()
