"""The alarm lifecycle at the centre: new → acknowledged (who, when) → resolved.

:class:`AlarmDesk` is what every operator tool calls (``wardpost receiver ack``,
``wardpost monitor``). Each transition is stored with an audit event
(``alarm.acknowledged`` / ``alarm.resolved``), and, for an alarm a device raised,
a command goes back to that device (``ack`` turns the panic button's LED steady,
``resolve`` turns it off) through a :class:`Commander`. :class:`MqttCommander`
checks the arguments against the contract (``contract/schemas/command_args``) and
publishes the command on ``cmd/<name>``; its ``sign`` hook is where signatures plug in.

The alarm counts as acknowledged (or resolved) *at the device* only when the
device's ``cmd_result`` confirms it (see :meth:`central.store.Store.write`). Until
then :meth:`AlarmDesk.follow_up` sends the command again every
``[commands] retry_every`` seconds, each time as a NEW command with a fresh id and
signature: a device refuses a re-sent id as a replay and an old signature as
expired, and ``ack``/``resolve`` are idempotent at the device. After
``confirm_within`` seconds it gives up and says so (``alarm.unconfirmed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from agent.event import Priority, uuid7
from central.intake import centre_event
from central.store import Alarm, Store, StoredEvent
from contract.commands import arg, validate_args

#: The arguments of ``ack`` and ``resolve``, named as the contract (and the devices) name them.
ALARM_ARG = arg("alarm", "ack", "resolve")
BY_ARG = arg("by", "ack", "resolve")
#: The command that tells the device about each transition.
DEVICE_COMMANDS = {"acknowledged": "ack", "resolved": "resolve"}

#: ``sign(site, device, name, command) -> command with signature fields``
Signing = Callable[[str, str, str, dict[str, Any]], dict[str, Any]]


def unsigned(site: str, device: str, name: str, command: dict[str, Any]) -> dict[str, Any]:
    """No signature: for devices that do not verify commands (or tests)."""
    return command


class AlarmError(Exception):
    """The transition is not possible (unknown alarm, or already past that state)."""


#: Called with a command's id after it is made and before it leaves (see :class:`Commander`).
Record = Callable[[str], None]


class Commander(Protocol):
    def send(
        self,
        site: str,
        device: str,
        name: str,
        args: dict[str, Any],
        target: str | None = None,
        *,
        record: Record | None = None,
    ) -> str:
        """Send command ``name`` to a device; returns the command id. ``record(id)`` runs
        before the command is published: the device may answer before ``send`` returns, and
        its answer must find the command already in the store."""


def recorder(
    store: Store, site: str, device: str, name: str, args: dict[str, Any], *, alarm_id: str | None
) -> Record:
    """The ``record`` that keeps a command in ``store`` (for an alarm, one more attempt)."""
    return lambda command_id: store.record_command(
        command_id, site, device, name, args, issued_at=time.time(), alarm_id=alarm_id
    )


def command_message(
    site: str,
    device: str,
    name: str,
    args: dict[str, Any],
    *,
    target: str | None = None,
    sign: Signing = unsigned,
) -> dict[str, Any]:
    """The message of command ``name`` for ``site``/``device``: a fresh id, signed by ``sign``.
    Not checked against the contract (:meth:`MqttCommander.send` does that)."""
    message = {"id": uuid7(), "issued_at": time.time(), "args": args, "target": target}
    return sign(site, device, name, message)


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
        self,
        site: str,
        device: str,
        name: str,
        args: dict[str, Any],
        target: str | None = None,
        *,
        record: Record | None = None,
    ) -> str:
        """Publish command ``name``; :class:`~contract.commands.ContractError` if the contract
        does not allow ``args`` (nothing is sent then)."""
        validate_args(name, args)
        command = command_message(site, device, name, args, target=target, sign=self.sign)
        if record is not None:
            record(str(command["id"]))
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
        return self._move(alarm_id, "acknowledged", who, note)

    def resolve(self, alarm_id: str, who: str, note: str | None = None) -> Alarm:
        return self._move(alarm_id, "resolved", who, note)

    def _move(self, alarm_id: str, to: str, who: str, note: str | None) -> Alarm:
        if not who.strip():
            raise AlarmError("say who is acting (an operator name)")
        alarm = self.store.alarm(alarm_id)
        if alarm is None:
            raise AlarmError(f"no alarm {alarm_id!r}")
        audit = self._audit(f"alarm.{to}", alarm, {"by": who, "note": note})
        tell_device = self.commander is not None and alarm.origin == "device"
        command = DEVICE_COMMANDS[to] if tell_device else None
        if not self.store.transition_alarm(alarm_id, to, who, note, audit, device_command=command):
            raise AlarmError(f"alarm {alarm_id} is {alarm.state}; it cannot become {to}")
        if command is not None:
            self._send(alarm, command, who)
        return self._reread(alarm_id)

    def follow_up(self, now: float, retry_every: float, confirm_within: float) -> list[Alarm]:
        """Re-send unconfirmed ack/resolve commands that are due; give up on those past
        ``confirm_within``. Returns the alarms given up on."""
        given_up = []
        for alarm in self.store.awaiting_device():
            command = alarm.device_command
            assert command is not None and alarm.device_sent_at is not None
            waited = now - alarm.device_sent_at
            if waited >= confirm_within:
                detail = (
                    f"no confirmation within {confirm_within:g} s ({alarm.device_attempts} sent)"
                )
                audit = self._audit(
                    "alarm.unconfirmed",
                    alarm,
                    {"command": command, "reason": detail},
                    Priority.HIGH,
                )
                if self.store.device_unconfirmed(alarm.id, command, detail, audit):
                    given_up.append(self._reread(alarm.id))
            elif (
                self.commander is not None and now - (alarm.device_last_sent_at or 0) >= retry_every
            ):
                who = alarm.acknowledged_by if command == "ack" else alarm.resolved_by
                self._send(alarm, command, who or "")
        return given_up

    def _send(self, alarm: Alarm, command: str, who: str) -> None:
        assert self.commander is not None
        args = {ALARM_ARG: alarm.id, **({BY_ARG: who} if who else {})}
        self.commander.send(
            alarm.site,
            alarm.device,
            command,
            args,
            record=recorder(self.store, alarm.site, alarm.device, command, args, alarm_id=alarm.id),
        )

    @staticmethod
    def _audit(
        kind: str, alarm: Alarm, details: dict[str, Any], priority: Priority = Priority.NORMAL
    ) -> StoredEvent:
        return centre_event(
            kind,
            alarm.site,
            alarm.device,
            priority,
            {"alarm": alarm.id, "kind": alarm.kind, **details},
            now=time.time(),
            test=alarm.test,
        )

    def _reread(self, alarm_id: str) -> Alarm:
        moved = self.store.alarm(alarm_id)
        assert moved is not None
        return moved
