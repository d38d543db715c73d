"""A mosquitto started with the shipped TLS listener and ACL (config/mosquitto/), and its PKI."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.security import generate_keypair
from agent.testing.agent import DEVICE, SITE, Recorder
from agent.testing.broker import Broker, free_port
from central.monitor import BrokerOptions
from tests.support.tls import MOSQUITTO_DIR, Identity, TestPKI, shipped_broker_config


@dataclass
class TLSSetup:
    broker: Broker
    pki: TestPKI
    device: Identity  # CN "test-site/test-device"
    other_device: Identity  # CN "test-site/other-device"
    receiver: Identity  # CN "receiver": the only writer of receipts
    console: Identity  # CN "console-1": an operator console, commands only
    centre_key: Path  # the centre's Ed25519 command-signing key
    centre_pub: Path

    def agent_mqtt(self, identity: Identity | None = None) -> dict[str, Any]:
        """The ``[mqtt]`` table of an agent that connects with ``identity`` (default: its own)."""
        who = identity or self.device
        return {
            "port": self.broker.port,
            "tls": {
                "enabled": True,
                "ca_file": str(self.pki.ca_file),
                "cert_file": str(who.cert_file),
                "key_file": str(who.key_file),
            },
        }

    def options(self, identity: Identity | None = None) -> BrokerOptions:
        """Broker options of an operator console (default: console-1)."""
        who = identity or self.console
        return BrokerOptions(
            host=self.broker.host,
            port=self.broker.port,
            ca_file=str(self.pki.ca_file),
            cert_file=str(who.cert_file),
            key_file=str(who.key_file),
        )

    def recorder(self, topic: str = "wardpost/#", identity: Identity | None = None) -> Recorder:
        """A :class:`Recorder` that connects over TLS (as the receiver unless told otherwise)."""
        who = identity or self.receiver
        rec = Recorder(self.broker, topic)
        rec.client.tls_set(
            ca_certs=str(self.pki.ca_file), certfile=str(who.cert_file), keyfile=str(who.key_file)
        )
        return rec


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSetup]:
    root = tmp_path_factory.mktemp("tls")
    pki = TestPKI(root / "pki")
    pki.issue("broker", server=True)
    shutil.copy(MOSQUITTO_DIR / "wardpost.acl", pki.directory / "wardpost.acl")
    port = free_port()
    broker = Broker(
        root / "broker", port=port, extra_config=shipped_broker_config(pki.directory, port)
    )
    broker.start()
    generate_keypair(root / "centre.key", root / "centre.pub")
    setup = TLSSetup(
        broker=broker,
        pki=pki,
        device=pki.issue(f"{SITE}/{DEVICE}"),
        other_device=pki.issue(f"{SITE}/other-device"),
        receiver=pki.issue("receiver"),
        console=pki.issue("console-1"),
        centre_key=root / "centre.key",
        centre_pub=root / "centre.pub",
    )
    yield setup
    broker.stop()
