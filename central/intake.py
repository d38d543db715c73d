"""What the receiver makes of each MQTT message, without any I/O.

:class:`Intake` turns a batch of inbound messages into a :class:`~central.store.Batch`
(new events, device state, alarms, link changes, DC-09 forwards) plus the
receipts to publish once that batch is committed. :meth:`Intake.supervise`
adds what the passing of time reveals: lost devices and sequence gaps.

Rules, because operators act on what this module decides:

* an event is accepted only if it is well formed and its ``site``/``device``
  match its topic; anything else is logged with topic and reason and not
  receipted (the device keeps it and the fault is visible at both ends);
* a duplicate (same event id, stored earlier or earlier in the same batch) is
  receipted again but stored and acted on once;
* a status whose ``(boot, connection)`` is older than the one known is a stale
  Last Will (or a stale retained message) and is ignored;
* a device is alive when a heartbeat, an event or a *fresh* online status
  arrives; after ``lost_after`` times its heartbeat ``interval`` of silence it is
  lost (``device.lost``), and the next sign of life restores it
  (``device.restored``);
* sequence numbers may arrive out of order (the edge sends by priority), so a
  hole becomes a ``sequence.gap`` only when the device's heartbeat reports an
  empty backlog ``gap_grace`` seconds after the hole opened, or after
  ``gap_timeout`` in any case.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.event import Priority, utc_iso, uuid7, valid_kind
from central.config import ReceiverConfig
from central.store import Alarm, Batch, DeviceState, LinkChange, StoredEvent

log = logging.getLogger("wardpost.central.intake")

#: Bound on out-of-order sequence numbers remembered per device before holes are reported anyway.
MAX_OPEN_SEQUENCES = 10_000
CENTRE_SOURCE = "receiver"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One MQTT message as the receiver got it."""

    topic: str
    payload: bytes
    received_at: float
    mid: int = 0
    qos: int = 0
    retain: bool = False


@dataclass
class Outcome:
    """The result of one intake cycle: write ``batch``, then publish ``receipts``."""

    batch: Batch = field(default_factory=Batch)
    receipts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    rejected: int = 0
    duplicates: int = 0


class Rejected(ValueError):
    """A message the receiver will not store; the text says why."""


def _require(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise Rejected(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise Rejected(f"field 'time' is not an ISO timestamp: {text[:40]!r}") from None


def centre_event(
    kind: str,
    site: str,
    device: str,
    priority: Priority,
    payload: dict[str, Any],
    *,
    now: float,
    test: bool = False,
) -> StoredEvent:
    """An event the centre itself raises, stored like a device's (``origin="centre"``)."""
    event_id = uuid7()
    body = {
        "schema": 1,
        "id": event_id,
        "site": site,
        "device": device,
        "source": CENTRE_SOURCE,
        "kind": kind,
        "priority": priority.label,
        "time": utc_iso(now),
        "test": test,
        "payload": payload,
    }
    return StoredEvent(
        event_id,
        site,
        device,
        CENTRE_SOURCE,
        kind,
        priority.label,
        None,
        test,
        now,
        now,
        "centre",
        json.dumps(body, separators=(",", ":")),
    )


class Policy:
    """Which stored events open an alarm and which go to the alarm receiving centre."""

    def __init__(self, config: ReceiverConfig):
        self.alarms = config.alarms
        self.dc09 = config.dc09

    def apply(self, event: StoredEvent, batch: Batch) -> None:
        alarms = self.alarms
        if (not event.test or alarms.include_test) and (
            event.priority in alarms.priorities
            or any(fnmatch.fnmatchcase(event.kind, p) for p in alarms.kinds)
        ):
            batch.alarms.append(
                Alarm(
                    event.id,
                    event.site,
                    event.device,
                    event.kind,
                    event.priority,
                    event.origin,
                    event.test,
                    event.stored_at,
                )
            )
        if (
            self.dc09.enabled
            and event.kind in self.dc09.map
            and (not event.test or self.dc09.include_test)
        ):
            batch.forwards.append(event.id)


class Intake:
    """Turns inbound messages into store batches; holds the device table in memory."""

    def __init__(
        self,
        config: ReceiverConfig,
        devices: Iterable[DeviceState],
        known_ids: Callable[[Sequence[str]], set[str]],
        started: float | None = None,
    ):
        self.config = config
        self.prefix = config.mqtt.topic_prefix
        self.supervision = config.supervision
        self.policy = Policy(config)
        self.devices = {d.key: d for d in devices}
        self.known_ids = known_ids
        # Supervision windows start no earlier than now: our own downtime is not the devices' fault.
        self.started = time.time() if started is None else started

    # --- messages ---
    def process(self, messages: Sequence[Inbound], now: float) -> Outcome:
        out = Outcome()
        parsed: list[tuple[Inbound, str, str, list[str], dict[str, Any] | None]] = []
        for msg in messages:  # first pass: validate events, so duplicates are found in one query
            try:
                site, device, rest = self._split(msg.topic)
                body = self._event_body(msg, site, device, rest) if rest[0] == "events" else None
                parsed.append((msg, site, device, rest, body))
            except Rejected as exc:
                self._reject(msg, exc, out)
        known = self.known_ids([body["id"] for *_, body in parsed if body is not None])
        for msg, site, device, rest, body in parsed:  # second pass: in arrival order
            try:
                if body is not None:
                    self._event(msg, body, site=site, device=device, known=known, now=now, out=out)
                elif rest == ["status"]:
                    self._status(site, device, self._json(msg), now, out.batch)
                elif rest == ["heartbeat"]:
                    self._heartbeat(site, device, self._json(msg), now, out.batch)
                elif rest[0] == "cmd_result" and len(rest) == 2:
                    result = self._json(msg)
                    out.batch.command_results.append(
                        (rest[1], result.get("ok") is True, json.dumps(result), now)
                    )
                else:
                    raise Rejected("not a topic the receiver handles")
            except Rejected as exc:
                self._reject(msg, exc, out)
        return out

    @staticmethod
    def _reject(msg: Inbound, exc: Rejected, out: Outcome) -> None:
        out.rejected += 1
        log.warning("rejected message on %s: %s", msg.topic, exc)

    def _split(self, topic: str) -> tuple[str, str, list[str]]:
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != self.prefix or not parts[1] or not parts[2]:
            raise Rejected(f"topic is not {self.prefix}/<site>/<device>/...")
        return parts[1], parts[2], parts[3:]

    @staticmethod
    def _json(msg: Inbound) -> dict[str, Any]:
        try:
            body = json.loads(msg.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Rejected(f"payload is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise Rejected("payload is not a JSON object")
        return body

    def _event_body(self, msg: Inbound, site: str, device: str, rest: list[str]) -> dict[str, Any]:
        body = self._json(msg)
        event_id = _require(body, "id", str)
        if not 8 <= len(event_id) <= 64:
            raise Rejected(f"event id {event_id[:70]!r} has a bad length")
        if body.get("site") != site or body.get("device") != device:
            raise Rejected(
                f"event {event_id} names {body.get('site')}/{body.get('device')},"
                f" topic says {site}/{device}"
            )
        kind = _require(body, "kind", str)
        if not valid_kind(kind) or rest[1:] != [kind]:
            raise Rejected(f"event {event_id}: kind {kind!r} is invalid or differs from the topic")
        try:
            Priority.parse(_require(body, "priority", str))
        except ValueError as exc:
            raise Rejected(f"event {event_id}: {exc}") from None
        _require(body, "source", str)
        body["_time"] = parse_time(_require(body, "time", str))
        seq = body.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
            raise Rejected(f"event {event_id}: seq {seq!r} is not a non-negative integer")
        if not isinstance(body.get("payload", {}), dict):
            raise Rejected(f"event {event_id}: payload is not an object")
        return body

    def _event(
        self,
        msg: Inbound,
        body: dict[str, Any],
        *,
        site: str,
        device: str,
        known: set[str],
        now: float,
        out: Outcome,
    ) -> None:
        event_id = body["id"]
        out.receipts.setdefault((site, device), []).append(event_id)
        if event_id in known:
            out.duplicates += 1
            return
        known.add(event_id)
        event_time = body.pop("_time")
        stored = StoredEvent(
            event_id,
            site,
            device,
            body["source"],
            body["kind"],
            body["priority"],
            body.get("seq"),
            body.get("test") is True,
            event_time,
            now,
            "device",
            msg.payload.decode("utf-8"),
        )
        self._store(stored, out.batch)
        state = self._device(site, device, now, out.batch)
        self._alive(state, now, out.batch, "event")
        if stored.seq is not None:
            self._sequence(state, stored.seq, now, out.batch)

    def _store(self, event: StoredEvent, batch: Batch) -> None:
        batch.events.append(event)
        self.policy.apply(event, batch)

    def _raise(
        self,
        kind: str,
        state: DeviceState,
        priority: Priority,
        payload: dict[str, Any],
        *,
        now: float,
        batch: Batch,
    ) -> None:
        log.warning("%s/%s: %s %s", state.site, state.device, kind, payload)
        self._store(centre_event(kind, state.site, state.device, priority, payload, now=now), batch)

    # --- device state ---
    def _device(self, site: str, device: str, now: float, batch: Batch) -> DeviceState:
        state = self.devices.get((site, device))
        if state is None:
            state = DeviceState(site=site, device=device, first_seen=now, last_seen=now)
            self.devices[state.key] = state
            self._link(state, now, batch, "first seen")
        batch.devices[state.key] = state
        return state

    @staticmethod
    def available(state: DeviceState) -> bool:
        return state.state in ("online", "unknown") and not state.lost

    def _link(
        self, state: DeviceState, now: float, batch: Batch, reason: str, was: bool | None = None
    ) -> None:
        up = self.available(state)
        if was is None or was != up:
            batch.links.append(LinkChange(state.site, state.device, now, up, reason))

    def _alive(self, state: DeviceState, now: float, batch: Batch, why: str) -> None:
        state.last_seen = now
        if state.lost:
            was = self.available(state)
            state.lost = False
            self._raise("device.restored", state, Priority.HIGH, {"by": why}, now=now, batch=batch)
            self._link(state, now, batch, f"restored by {why}", was)

    def _status(
        self, site: str, device: str, body: dict[str, Any], now: float, batch: Batch
    ) -> None:
        state_name = body.get("state")
        if state_name not in ("online", "stopped", "offline"):
            raise Rejected(f"status state {state_name!r} is not online, stopped or offline")
        boot, connection = body.get("boot"), body.get("connection")
        counters = (
            (boot, connection) if isinstance(boot, int) and isinstance(connection, int) else None
        )
        state = self._device(site, device, now, batch)
        known = (
            (state.boot, state.connection)
            if state.boot is not None and state.connection is not None
            else None
        )
        if counters is not None and known is not None and counters < known:
            log.info(
                "%s/%s: ignoring stale %s status for boot %s connection %s (current %s)",
                site,
                device,
                state_name,
                boot,
                connection,
                known,
            )
            return
        fresh = counters is None or known is None or counters > known
        was = self.available(state)
        state.state = state_name
        if counters is not None:
            state.boot, state.connection = counters
        state.version = (
            body.get("version") if isinstance(body.get("version"), str) else state.version
        )
        state.config = body.get("config") if isinstance(body.get("config"), str) else state.config
        if isinstance(body.get("drivers"), list):
            state.drivers = body["drivers"]
        if isinstance(body.get("backlog"), int):
            state.backlog = body["backlog"]
        state.status_time = body.get("time") if isinstance(body.get("time"), str) else None
        if state_name == "online" and fresh:
            self._alive(state, now, batch, "status")
        self._link(state, now, batch, f"status {state_name}", was)

    def _heartbeat(
        self, site: str, device: str, body: dict[str, Any], now: float, batch: Batch
    ) -> None:
        state = self._device(site, device, now, batch)
        interval = body.get("interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            state.heartbeat_interval = float(interval)
        backlog = body.get("backlog")
        count = backlog.get("count") if isinstance(backlog, dict) else None
        if isinstance(count, int):
            state.backlog = count
        state.heartbeat = body
        state.last_heartbeat = now
        self._alive(state, now, batch, "heartbeat")
        if (
            count == 0
            and state.hole_since is not None
            and now - state.hole_since >= self.supervision.gap_grace
        ):
            self._report_gaps(state, now, batch, "device reports an empty backlog")

    # --- sequence numbers ---
    def _sequence(self, state: DeviceState, seq: int, now: float, batch: Batch) -> None:
        if state.seq_upto is None:
            state.seq_upto = seq - 1  # first contact: earlier numbers are not ours to miss
        if seq <= state.seq_upto or seq in state.seq_above:
            return
        above = sorted([*state.seq_above, seq])
        upto = state.seq_upto
        while above and above[0] == upto + 1:
            upto = above.pop(0)
        state.seq_upto, state.seq_above = upto, above
        if not above:
            state.hole_since = None
        elif state.hole_since is None:
            state.hole_since = now
        if len(above) > MAX_OPEN_SEQUENCES:
            self._report_gaps(state, now, batch, "too many numbers out of order")

    def _report_gaps(self, state: DeviceState, now: float, batch: Batch, why: str) -> None:
        assert state.seq_upto is not None
        upto, above = state.seq_upto, state.seq_above
        while above:
            first, last = upto + 1, above[0] - 1
            self._raise(
                "sequence.gap",
                state,
                Priority.HIGH,
                {"first": first, "last": last, "missing": last - first + 1, "reason": why},
                now=now,
                batch=batch,
            )
            upto = above.pop(0)
            while above and above[0] == upto + 1:
                upto = above.pop(0)
        state.seq_upto, state.seq_above, state.hole_since = upto, [], None
        batch.devices[state.key] = state

    # --- the passing of time ---
    def supervise(self, now: float, batch: Batch) -> None:
        """Mark devices lost whose heartbeat is overdue; report sequence holes open too long."""
        sup = self.supervision
        for state in self.devices.values():
            if not state.lost:
                interval = state.heartbeat_interval or sup.default_interval
                since = max(state.last_seen, self.started)
                if now - since > sup.lost_after * interval:
                    was = self.available(state)
                    state.lost = True
                    batch.devices[state.key] = state
                    self._raise(
                        "device.lost",
                        state,
                        Priority.CRITICAL,
                        {
                            "last_seen": utc_iso(state.last_seen),
                            "interval": interval,
                            "silent_for": round(now - state.last_seen, 3),
                            "status": state.state,
                        },
                        now=now,
                        batch=batch,
                    )
                    self._link(state, now, batch, "heartbeat missing", was)
            if state.hole_since is not None and now - state.hole_since > sup.gap_timeout:
                self._report_gaps(state, now, batch, f"hole open longer than {sup.gap_timeout:g} s")
