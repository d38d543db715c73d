"""Reload compares every field: each change takes effect now or is named in restart_needed.

The walk goes over every field of the core's config classes, starting from
``config/wardpost.example.toml``: a new field with no reload rule (or no way to change
it here) fails this test until it gets one.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    CORE_SECTIONS,
    EXTRA_SECTIONS,
    Config,
    core_field_paths,
    load_config,
    lookup,
)
from agent.runtime import Agent
from agent.security import Signer, generate_keypair
from agent.testing.agent import write_config
from agent.testing.broker import Broker

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "wardpost.example.toml"


def _field_type(path: str) -> Any:
    """The declared type of dotted config field ``path`` (core or extra section)."""
    section, *names = path.split(".")
    cls: Any = {**typing.get_type_hints(Config), **EXTRA_SECTIONS}[section]
    for name in names:
        cls = typing.get_type_hints(cls)[name]
    return cls


class Rig:
    """The example config, pointed at the test broker and a private state dir, run in-process."""

    def __init__(self, tmp_path: Path, broker: Broker):
        self.tmp_path = tmp_path
        doc = tomllib.loads(EXAMPLE.read_text())
        doc["agent"]["state_dir"] = str(tmp_path / "state")
        doc["mqtt"].update(host=broker.host, port=broker.port)
        self.base = doc
        self.path = write_config(tmp_path / "wardpost.toml", doc)
        self.secret = tmp_path / "password"
        self.secret.write_text("hunter2\n")
        self.key = tmp_path / "centre.key"
        generate_keypair(self.key, tmp_path / "centre.pub")
        self.agent = Agent(load_config(self.path))

    def changed(self, path: str, current: Any) -> Any:
        """Another valid value for field ``path``."""
        special: dict[str, Any] = {
            "agent.site": "other-site",
            "agent.device": "other-device",
            "agent.state_dir": str(self.tmp_path / "other-state"),
            "agent.control_socket": str(self.tmp_path / "other.sock"),
            "mqtt.host": "127.0.0.2",
            "mqtt.client_id": "other-client",
            "mqtt.username": "someone",
            "mqtt.password_file": str(self.secret),
            "mqtt.topic_prefix": "other",
            "mqtt.tls.ca_file": str(self.tmp_path / "ca.crt"),
            "mqtt.tls.cert_file": str(self.tmp_path / "device.crt"),
            "mqtt.tls.key_file": str(self.tmp_path / "device.key"),
            "outbox.path": str(self.tmp_path / "other.db"),
            "commands.public_keys": [str(self.tmp_path / "centre.pub")],
            "metrics.listen": "127.0.0.1:9199",
            "homeassistant.discovery_prefix": "ha-test",
            "homeassistant.device_name": "Entrance A",
        }
        if path in special:
            return special[path]
        tp = _field_type(path)
        if tp is bool:
            return not current
        if tp is int:
            return current + 1
        if tp is float:
            return current + 1.5
        if typing.get_origin(tp) is typing.Literal:
            return next(choice for choice in typing.get_args(tp) if choice != current)
        raise AssertionError(f"no way to change {path} ({tp}): add one to this test")

    def write(self, path: str | None = None, value: Any = None) -> None:
        doc = copy.deepcopy(self.base)
        if path is not None:
            *tables, leaf = path.split(".")
            table = doc
            for name in tables:
                table = table.setdefault(name, {})
            table[leaf] = value
        write_config(self.path, doc)


@pytest.fixture
def rig(tmp_path: Path, broker: Broker) -> Iterator[Rig]:
    level = logging.getLogger().level  # reloads of [agent] log_level set it
    r = Rig(tmp_path, broker)
    r.agent.start()
    yield r
    r.agent.stop(flush_timeout=1.0)
    logging.getLogger().setLevel(level)


def test_every_field_takes_effect_or_is_named_for_a_restart(rig: Rig) -> None:
    agent = rig.agent
    paths = core_field_paths()
    for section in CORE_SECTIONS:  # the example documents every field of the core
        assert any(p.startswith(f"{section}.") for p in paths)
    text = EXAMPLE.read_text()
    undocumented = [p for p in paths if f"{p.rsplit('.', 1)[1]} =" not in text]
    assert not undocumented, f"fields missing from {EXAMPLE.name}: {undocumented}"
    walked = []
    for path in paths:
        before = lookup(agent.config, path)
        value = rig.changed(path, before)
        rig.write(path, value)
        result = agent.reload()
        assert result["ok"], (path, result)
        assert sorted(result["applied"] + result["restart_needed"]) == [path], (
            f"{path}: reload reported {result}"
        )
        expected = value if path in result["applied"] else before
        assert lookup(agent.config, path) == expected, f"{path}: the running config lies"
        rig.write()
        restored = agent.reload()
        assert restored["ok"] and restored["applied"] + restored["restart_needed"] in ([], [path])
        assert lookup(agent.config, path) == before, f"{path} was not restored"
        walked.append((path, "live" if path in result["applied"] else "restart"))
    print(json.dumps(walked))
    # Never silently weaker: the command checks and the metrics endpoint.
    assert ("commands.require_signature", "live") in walked
    assert ("metrics.enabled", "restart") in walked and ("metrics.listen", "restart") in walked


def test_require_signature_switched_on_by_reload_takes_effect(rig: Rig) -> None:
    agent = rig.agent
    rig.base["commands"].update(require_signature=False)
    rig.write()
    assert agent.reload()["ok"]

    def ping(command_id: str, signer: Signer | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"id": command_id, "issued_at": time.time()}
        if signer is not None:
            site, device = agent.config.agent.site, agent.config.agent.device
            message = signer.sign(site, device, "ping", message)
        return dict(agent.dispatcher.handle("ping", json.dumps(message).encode()))

    assert ping("unsigned-1")["ok"], "lab setting: unsigned commands accepted"
    rig.base["commands"].update(
        require_signature=True, public_keys=[str(rig.tmp_path / "centre.pub")]
    )
    rig.write()
    result = agent.reload()
    assert result["ok"] and "commands.require_signature" in result["applied"]
    refused = ping("unsigned-2")
    assert not refused["ok"] and "unsigned command" in refused["error"]
    old_signer = Signer.from_file(str(rig.key))
    assert ping("signed-1", old_signer)["ok"]
    # A key rotated in the same file: same config, new key in force after the reload.
    rotated = rig.tmp_path / "rotated.key"
    generate_keypair(rotated, rig.tmp_path / "rotated.pub")
    (rig.tmp_path / "centre.pub").write_bytes((rig.tmp_path / "rotated.pub").read_bytes())
    assert agent.reload()["ok"]
    assert not ping("signed-2", old_signer)["ok"], "the replaced key still accepted"
    assert ping("signed-3", Signer.from_file(str(rotated)))["ok"]


def test_a_reload_keeps_what_needs_a_restart_in_force(rig: Rig) -> None:
    """[metrics] and [mqtt] stay as they run until a restart; the running config says so."""
    agent = rig.agent
    rig.base["metrics"] = {"enabled": True, "listen": "127.0.0.1:9177"}
    rig.write()
    result = agent.reload()
    assert sorted(result["restart_needed"]) == ["metrics.enabled", "metrics.listen"]
    assert agent.config.metrics.enabled is False, "not in force until a restart"
    rig.base["drivers"]["heartbeat_test"]["enabled"] = True  # an unrelated change
    rig.write()
    result = agent.reload()
    assert result["started"] == ["heartbeat_test"]
    assert result["restart_needed"] == ["metrics.enabled", "metrics.listen"], (
        "still pending, never silently dropped"
    )
