"""Home Assistant MQTT discovery: the device and its drivers appear in Home Assistant.

With ``[homeassistant] enabled = true`` the agent publishes, each time it connects, one
retained discovery message per entity under
``<discovery_prefix>/<component>/<node>/<object>/config``, as Home Assistant's MQTT
integration documents. Entities read the agent's own topics; nothing is published twice:

* every entity is *available* while the device's ``status`` says ``online``;
* the device has a ``backlog`` sensor and each driver a ``problem`` binary sensor, both
  read from the heartbeat;
* each driver describes its own entities (:meth:`agent.driver.Driver.home_assistant_entities`):
  an :class:`Entity` reads one event kind's topic and keeps only its driver's events.

The topics announced are remembered in ``<state_dir>/homeassistant.json``. An entity that
is no longer configured (a driver removed, or discovery switched off) is removed from Home
Assistant with an empty retained message on its topic, as the documentation prescribes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent import __version__
from agent.config import Config, ConfigError
from agent.registry import driver_config

log = logging.getLogger("wardpost.homeassistant")

Component = Literal["binary_sensor", "event", "sensor"]
#: Where the announced discovery topics are remembered (in the state directory).
STATE_FILE = "homeassistant.json"


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity of a driver instance, fed by one event kind.

    ``value`` is a Jinja expression over ``value_json``, the event as the contract defines
    it (``value_json.payload`` is its payload): a sensor's state, ``'ON'`` for a binary
    sensor (which turns off again after ``off_delay`` seconds, in ``options``), or an event
    entity's event type (one of ``event_types`` in ``options``). ``attributes`` are payload
    fields an event entity passes on to Home Assistant. ``options`` are further discovery
    keys of the component (``device_class``, ``icon``, ``unit_of_measurement`` ...).
    """

    component: Component
    key: str
    name: str
    kind: str
    value: str
    attributes: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


def _slug(text: str) -> str:
    """Home Assistant's node and object ids allow only [a-zA-Z0-9_-]."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)


def _text(value: str) -> str:
    """A Jinja string literal (JSON's double-quoted form is one)."""
    return json.dumps(value)


def _value_template(entity: Entity, driver: str) -> str:
    """Keep only ``driver``'s events on the kind's topic (every driver of a device shares it)."""
    mine = "{% if value_json.source == " + _text(driver) + " %}"
    if entity.component == "event":
        fields = [
            f'"event_type": ({entity.value})',
            '"event_id": value_json.id',
            '"priority": value_json.priority',
            '"test": value_json.test',
            *(f"{_text(a)}: value_json.payload.get({_text(a)})" for a in entity.attributes),
        ]
        return mine + "{{ {" + ", ".join(fields) + "} | tojson }}{% endif %}"
    if entity.component == "binary_sensor":
        # An empty result is ignored by Home Assistant: other drivers' events change nothing.
        return mine + "{{ " + entity.value + " }}{% endif %}"
    return mine + "{{ " + entity.value + " }}{% else %}{{ this.state }}{% endif %}"


def discovery_messages(
    config: Config, described: Mapping[str, Sequence[Entity]]
) -> dict[str, dict[str, Any]]:
    """Discovery topic -> payload for the device and ``described`` (driver name -> entities)."""
    ha = config.homeassistant
    site, device_name = config.agent.site, config.agent.device
    base = f"{config.mqtt.topic_prefix}/{site}/{device_name}"
    node = _slug(f"wardpost_{site}_{device_name}")
    common: dict[str, Any] = {
        "availability": [
            {
                "topic": f"{base}/status",
                # "stopped" (a clean stop) is as unavailable as the Last Will's "offline".
                "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "device": {
            "identifiers": [node],
            "name": ha.device_name or f"Wardpost {site}/{device_name}",
            "manufacturer": "Wardpost",
            "model": "Wardpost edge agent",
            "sw_version": __version__,
        },
        "origin": {"name": "wardpost", "sw_version": __version__},
        "qos": 1,
    }
    heartbeat = f"{base}/heartbeat"
    stale_after = round(3 * config.agent.heartbeat_interval)  # three missed heartbeats
    messages: dict[str, dict[str, Any]] = {}

    def add(component: Component, object_id: str, body: dict[str, Any]) -> None:
        object_id = _slug(object_id)
        topic = f"{ha.discovery_prefix}/{component}/{node}/{object_id}/config"
        messages[topic] = {**body, **common, "unique_id": f"{node}_{object_id}"}

    add(
        "sensor",
        "backlog",
        {
            "name": "Backlog",
            "state_topic": heartbeat,
            "value_template": "{{ value_json.backlog.count }}",
            "unit_of_measurement": "events",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "icon": "mdi:tray-full",
            "expire_after": stale_after,
        },
    )
    for driver, entities in sorted(described.items()):
        health = "value_json.drivers.get(" + _text(driver) + ", {}).get('state')"
        add(
            "binary_sensor",
            f"{driver}_problem",
            {
                "name": f"{driver} problem",
                "state_topic": heartbeat,
                "value_template": "{{ 'OFF' if " + health + " in ('ok', 'starting') else 'ON' }}",
                "device_class": "problem",
                "entity_category": "diagnostic",
                "expire_after": stale_after,
            },
        )
        for entity in entities:
            add(
                entity.component,
                f"{driver}_{entity.key}",
                {
                    **entity.options,
                    "name": f"{driver} {entity.name}",
                    "state_topic": f"{base}/events/{entity.kind}",
                    "value_template": _value_template(entity, driver),
                },
            )
    return messages


def described_entities(config: Config) -> dict[str, Sequence[Entity]]:
    """Driver name -> the entities its driver class describes, for every enabled driver."""
    described: dict[str, Sequence[Entity]] = {}
    for section in config.drivers:
        if not section.enabled:
            continue
        try:
            cls, options = driver_config(section)
        except ConfigError as exc:  # reported where the driver starts; announce the rest
            log.warning("no Home Assistant entities for driver %s: %s", section.name, exc)
            continue
        described[section.name] = tuple(cls.home_assistant_entities(options))
    return described


def announce(config: Config, publish: Callable[[str, str], object]) -> int:
    """Publish the discovery messages (retained) and remove what is no longer announced.

    ``publish(topic, payload)`` sends one retained QoS 1 message. Returns how many entities
    are announced (0 when discovery is off)."""
    state = Path(config.agent.state_dir) / STATE_FILE
    previous = _announced(state)
    messages = (
        discovery_messages(config, described_entities(config))
        if config.homeassistant.enabled
        else {}
    )
    for topic, body in messages.items():
        publish(topic, json.dumps(body, separators=(",", ":")))
    gone = sorted(previous - set(messages))
    for topic in gone:
        publish(topic, "")  # an empty retained config removes the entity
    if messages or gone:
        log.info(
            "Home Assistant discovery: %d entities announced, %d removed", len(messages), len(gone)
        )
    _remember(state, sorted(messages))
    return len(messages)


def _announced(state: Path) -> set[str]:
    try:
        topics = json.loads(state.read_text())["topics"]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "%s is unreadable (%s): entities removed since may stay in Home Assistant", state, exc
        )
        return set()
    return {t for t in topics if isinstance(t, str)}


def _remember(state: Path, topics: list[str]) -> None:
    if not topics:
        with contextlib.suppress(FileNotFoundError):
            state.unlink()
        return
    try:
        temporary = state.with_suffix(".tmp")
        temporary.write_text(json.dumps({"topics": topics}, indent=1))
        os.replace(temporary, state)
    except OSError as exc:  # a read-only disk must not stop the agent
        log.warning("cannot remember the Home Assistant entities in %s: %s", state, exc)
