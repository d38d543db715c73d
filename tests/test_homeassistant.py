"""Home Assistant MQTT discovery through a real broker: what Home Assistant would read.

The allowed keys below are those Home Assistant's MQTT discovery documentation lists for
each component (plus the options every MQTT entity shares); a key outside them would be
refused or ignored by Home Assistant, so a payload using one fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from agent.runtime import Agent
from agent.testing.agent import (
    DEADLINE,
    DEVICE,
    SITE,
    AgentHarness,
    Message,
    Recorder,
    wait_until,
    write_config,
)
from agent.testing.broker import Broker

# -- Home Assistant's documented discovery schema -------------------------------------------

#: Options of every MQTT entity (availability, device, identity, attributes, state).
COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "icon", "json_attributes_template", "json_attributes_topic", "name",
    "object_id", "origin", "payload_available", "payload_not_available", "platform", "qos",
    "state_topic", "unique_id", "value_template",
}  # fmt: skip
ALLOWED = {
    "binary_sensor": COMMON | {
        "device_class", "expire_after", "force_update", "off_delay", "payload_off", "payload_on",
    },
    "sensor": COMMON | {
        "device_class", "expire_after", "force_update", "last_reset_value_template", "options",
        "state_class", "suggested_display_precision", "unit_of_measurement",
    },
    "event": COMMON | {"device_class", "event_types"},
}  # fmt: skip
REQUIRED = {
    "binary_sensor": {"state_topic"},
    "sensor": {"state_topic"},
    "event": {"state_topic", "event_types"},
}
DEVICE_CLASSES = {
    "binary_sensor": {"problem", "safety", "tamper", "connectivity", "motion", "door"},
    "sensor": {"duration", "timestamp"},
    "event": {"button", "doorbell", "motion"},
}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
TOPIC = re.compile(
    r"^homeassistant/(?P<component>binary_sensor|event|sensor)/(?P<node>[a-zA-Z0-9_-]+)/"
    r"(?P<object>[a-zA-Z0-9_-]+)/config$"
)

# -- the device under test ------------------------------------------------------------------

BASE = f"wardpost/{SITE}/{DEVICE}"
#: Which component each driver's own entities use, by event kind.
EXPECTED = {
    "panic": {"panic.pressed": "event"},
    "gate": {"gate.alarm": "binary_sensor"},
    "xray": {"xray.alert": "event"},
    "patrol": {"patrol.checkpoint": "sensor", "patrol.missed": "event"},
    "camera": {"face.watchlist_match": "event"},
}


def drivers(tmp_path: Path) -> dict[str, Any]:
    """One of each kind of device; the serial ports and the camera need not be there: what
    Home Assistant is told comes from the config."""
    return {
        "panic": {
            "type": "panic_button",
            "pin": 17,
            "pin_factory": "mock",
            "location": {"ward": "3", "room": "12"},
        },
        "gate": {"type": "serial_gate", "port": str(tmp_path / "ttyGATE")},
        "xray": {"type": "xray", "port": str(tmp_path / "ttyXRAY")},
        "patrol": {
            "type": "rfid_patrol",
            "port": str(tmp_path / "ttyPATROL"),
            "checkpoints": {"0013477100": "East stairs"},
        },
        "camera": {"type": "camera_face", "source": str(tmp_path / "door.avi")},
    }


@pytest.fixture
def harness(tmp_path: Path, broker: Broker) -> Iterator[AgentHarness]:
    h = AgentHarness(tmp_path, broker, drivers(tmp_path), homeassistant={"enabled": True})
    h.start()
    yield h
    h.stop()


def retained_configs(broker: Broker) -> dict[str, Message]:
    """The discovery messages the broker keeps now, as Home Assistant gets them when it
    subscribes (the broker sends retained messages before anything published later)."""
    with Recorder(broker, "homeassistant/#") as rec:
        rec.publish("homeassistant/probe", "end of the retained messages", qos=1)
        rec.wait_for(lambda msgs: any(m.topic == "homeassistant/probe" for m in msgs))
        return {m.topic: m for m in rec.messages if m.topic.endswith("/config") and m.payload}


def wait_for_configs(broker: Broker, count: int) -> dict[str, dict[str, Any]]:
    found: dict[str, Message] = {}

    def enough() -> bool:
        found.update(retained_configs(broker))
        return len(found) >= count

    wait_until(enough, what=f"{count} discovery messages")
    return {topic: json.loads(m.payload) for topic, m in retained_configs(broker).items()}


# 1 backlog sensor + a problem sensor per driver + the drivers' own entities
ENTITY_COUNT = 1 + len(EXPECTED) + sum(len(kinds) for kinds in EXPECTED.values())


def test_every_device_appears_with_the_right_components_and_documented_keys(
    harness: AgentHarness, broker: Broker
) -> None:
    configs = wait_for_configs(broker, ENTITY_COUNT)
    assert len(configs) == ENTITY_COUNT, sorted(configs)
    nodes, unique_ids = set(), set()
    by_state_topic: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for topic, body in configs.items():
        match = TOPIC.match(topic)
        assert match, f"{topic} is not a discovery topic"
        component = match["component"]
        assert set(body) <= ALLOWED[component], f"{topic}: {set(body) - ALLOWED[component]}"
        assert REQUIRED[component] <= set(body), topic
        if "device_class" in body:
            assert body["device_class"] in DEVICE_CLASSES[component], topic
        assert set(body["device"]) <= DEVICE_KEYS and body["device"]["identifiers"]
        assert set(body["origin"]) <= ORIGIN_KEYS and body["origin"]["name"] == "wardpost"
        # Available exactly while the device says it is online (its status and Last Will).
        [availability] = body["availability"]
        assert set(availability) <= AVAILABILITY_KEYS
        assert availability["topic"] == f"{BASE}/status"
        assert "value_json.state == 'online'" in availability["value_template"]
        assert body["qos"] == 1 and body["unique_id"] not in unique_ids
        unique_ids.add(body["unique_id"])
        nodes.add((match["node"], json.dumps(body["device"], sort_keys=True)))
        by_state_topic.setdefault(body["state_topic"], []).append((component, body))
    assert len(nodes) == 1, "every entity belongs to one Home Assistant device"

    heartbeat = by_state_topic.pop(f"{BASE}/heartbeat")
    assert sorted(c for c, _ in heartbeat) == ["binary_sensor"] * len(EXPECTED) + ["sensor"]
    problems = [b for c, b in heartbeat if c == "binary_sensor"]
    assert {b["device_class"] for b in problems} == {"problem"}
    for driver in EXPECTED:
        assert any(f'value_json.drivers.get("{driver}"' in b["value_template"] for b in problems)

    for driver, kinds in EXPECTED.items():
        for kind, component in kinds.items():
            entities = by_state_topic.pop(f"{BASE}/events/{kind}")
            assert [c for c, _ in entities] == [component], kind
            template = entities[0][1]["value_template"]
            # Every driver of a device shares the kind's topic: each keeps only its own events.
            assert template.startswith(f'{{% if value_json.source == "{driver}" %}}'), template
            if component == "event":
                assert '"event_type": (' in template and "| tojson" in template
    assert by_state_topic == {}, "no entity reads a topic the agent does not publish"


def test_switching_discovery_off_removes_every_entity(
    tmp_path: Path, harness: AgentHarness, broker: Broker
) -> None:
    announced = wait_for_configs(broker, ENTITY_COUNT)
    harness.stop()
    harness.doc["homeassistant"] = {"enabled": False}
    write_config(harness.config_path, harness.doc)
    with Recorder(broker, "homeassistant/#") as rec:
        harness.start()
        # Removal, as Home Assistant documents it: an empty retained config message.
        rec.wait_for(
            lambda msgs: {m.topic for m in msgs if m.payload == b""} >= set(announced),
            DEADLINE,
            "an empty config for every entity",
        )
    assert retained_configs(broker) == {}
    assert not (tmp_path / "state" / "homeassistant.json").exists()


def test_a_driver_removed_by_reload_leaves_home_assistant(
    harness: AgentHarness, broker: Broker
) -> None:
    wait_for_configs(broker, ENTITY_COUNT)
    del harness.doc["drivers"]["xray"]
    write_config(harness.config_path, harness.doc)
    agent: Agent | None = harness.agent
    assert agent is not None and agent.reload()["ok"]

    def xray_gone() -> bool:
        return not any("xray" in topic for topic in retained_configs(broker))

    wait_until(xray_gone, what="the X-ray's entities removed")
    assert len(retained_configs(broker)) == ENTITY_COUNT - 2  # its alert and problem sensor


def test_the_section_is_optional_and_checked(tmp_path: Path) -> None:
    plain = write_config(tmp_path / "plain.toml", {"agent": {"site": SITE, "device": DEVICE}})
    assert load_config(plain).homeassistant.enabled is False
    bad = write_config(
        tmp_path / "bad.toml",
        {"agent": {"site": SITE, "device": DEVICE}, "homeassistant": {"discovery_prefix": "a/b"}},
    )
    with pytest.raises(
        ConfigError, match=r"homeassistant\.discovery_prefix: must be a non-empty word"
    ):
        load_config(bad)
