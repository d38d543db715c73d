"""The alarm lifecycle at the centre: new → acknowledged (who, when) → resolved.

:class:`AlarmDesk` is what an operator console (``wardpost monitor``) calls.
Each transition is stored with an audit event (``alarm.acknowledged`` /
``alarm.resolved``), and, for an alarm a device raised, a command goes back to
that device (``ack`` turns the panic button's LED steady, ``resolve`` turns it
off) through a :class:`Commander`. :class:`MqttCommander` publishes the command
on ``cmd/<name>``; its ``sign`` hook is where command signatures plug in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from agent.event import Priority, uuid7
from central.intake import centre_event
from central.store import Alarm, Store

#: ``sign(site, device, name, command) -> command with signature fields``
Signing = Callable[[str, str, str, dict[str, Any]], dict[str, Any]]


def unsigned(site: str, device: str, name: str, command: dict[str, Any]) -> dict[str, Any]:
    """No signature: for devices that do not verify commands (or tests)."""
    return command


class AlarmError(Exception):
    """The transition is not possible (unknown alarm, or already past that state)."""


class Commander(Protocol):
    def send(
        self, site: str, device: str, name: str, args: dict[str, Any], target: str | None = None
    ) -> str:
        """Send command ``name`` to a device; returns the command id."""


class MqttCommander:
    """Publishes ``{"id","issued_at","args","target"}`` on ``<prefix>/<site>/<device>/cmd/<name>``.

    ``sign(site, device, name, command)`` returns the command with its signature fields,
    e.g. :meth:`agent.security.Signer.sign` with the centre's private key.
    """

    def __init__(
        self,
        client: mqtt.Client,
        prefix: str = "wardpost",
        sign: Signing = unsigned,
    ):
        self.client = client
        self.prefix = prefix
        self.sign = sign

    def send(
        self, site: str, device: str, name: str, args: dict[str, Any], target: str | None = None
    ) -> str:
        command = self.sign(
            site,
            device,
            name,
            {"id": uuid7(), "issued_at": time.time(), "args": args, "target": target},
        )
        self.client.publish(f"{self.prefix}/{site}/{device}/cmd/{name}", json.dumps(command), qos=1)
        return str(command["id"])


class AlarmDesk:
    """Acknowledge and resolve alarms in the store, telling the device when it raised the alarm."""

    def __init__(self, store: Store, commander: Commander | None = None):
        self.store = store
        self.commander = commander

    def open_alarms(self, site: str | None = None) -> list[Alarm]:
        return [a for a in self.store.alarms(site=site) if a.state != "resolved"]

    def acknowledge(self, alarm_id: str, who: str, note: str | None = None) -> Alarm:
        return self._move(alarm_id, "acknowledged", "ack", who, note)

    def resolve(self, alarm_id: str, who: str, note: str | None = None) -> Alarm:
        return self._move(alarm_id, "resolved", "resolve", who, note)

    def _move(self, alarm_id: str, to: str, command: str, who: str, note: str | None) -> Alarm:
        if not who.strip():
            raise AlarmError("say who is acting (an operator name)")
        alarm = self.store.alarm(alarm_id)
        if alarm is None:
            raise AlarmError(f"no alarm {alarm_id!r}")
        audit = centre_event(
            f"alarm.{to}",
            alarm.site,
            alarm.device,
            Priority.NORMAL,
            {"alarm": alarm.id, "kind": alarm.kind, "by": who, "note": note},
            now=time.time(),
            test=alarm.test,
        )
        if not self.store.transition_alarm(alarm_id, to, who, note, audit):
            raise AlarmError(f"alarm {alarm_id} is {alarm.state}; it cannot become {to}")
        if self.commander is not None and alarm.origin == "device":
            args = {"event": alarm.id, "by": who}
            command_id = self.commander.send(alarm.site, alarm.device, command, args)
            self.store.record_command(
                command_id,
                alarm.site,
                alarm.device,
                command,
                args,
                issued_at=time.time(),
                alarm_id=alarm.id,
            )
        moved = self.store.alarm(alarm_id)
        assert moved is not None
        return moved
