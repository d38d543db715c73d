"""What the receiver makes of each MQTT message, without any I/O.

:class:`Intake` turns a batch of inbound messages into a :class:`~central.store.Batch`
(new events, device state, alarms, link changes, DC-09 forwards) plus the
receipts to publish once that batch is committed. :meth:`Intake.supervise`
adds what the passing of time reveals: lost devices and sequence gaps.

Rules, because operators act on what this module decides:

* every message is judged alone, before anything reaches the store: strict UTF-8
  (no UTF-16/32 guessing, no lone surrogates), at most :data:`MAX_MESSAGE_BYTES`,
  nesting at most :data:`MAX_DEPTH`, integers within 64 bits signed, finite numbers;
* an event is accepted only if it is well formed and its ``site``/``device``
  match its topic. Any message refused is **quarantined** (topic, raw bytes,
  reason, time, device) in the same transaction as the rest of its batch and
  acknowledged like the others, so it never blocks what follows nor returns after
  a restart; it is not receipted (the device keeps an event and the fault is
  visible at both ends). A device's quarantined messages raise one
  ``centre.quarantined`` event per ``quarantine_report_every`` seconds, with a count;
* a duplicate (same event id, stored earlier or earlier in the same batch) is
  receipted again but stored and acted on once;
* a status whose ``(boot, connection)`` is older than the one known is a stale
  Last Will (or a stale retained message) and is ignored;
* a device is alive when a heartbeat, an event or a *fresh* online status
  arrives; after ``lost_after`` times its heartbeat ``interval`` of silence it is
  lost (``device.lost``), and the next sign of life restores it
  (``device.restored``);
* a device that stops cleanly (status ``stopped``) is not lost: only silence or
  a Last Will (``offline``) makes it so;
* sequence numbers may arrive out of order (the edge sends by priority), so a
  hole becomes a ``sequence.gap`` only when the device's heartbeat reports an
  empty backlog ``gap_grace`` seconds after the hole opened, or after
  ``gap_timeout`` in any case. Numbers a crashed agent reserved and never stored,
  named by its next ``agent.started`` (``seq_skipped``), are not holes;
* a new event id with a ``seq`` already seen in the current numbering, or a fresh
  ``online`` status whose boot counter went backwards, means the device's
  numbering restarted (new SD card, restored image): ``sequence.restarted``, the
  holes of the old numbering are reported, and gap detection starts again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.event import Priority, utc_iso, uuid7, valid_kind
from central.config import ReceiverConfig
from central.store import Alarm, Batch, DeviceState, LinkChange, Quarantined, StoredEvent

log = logging.getLogger("wardpost.central.intake")

#: Bound on out-of-order sequence numbers remembered per device before holes are reported anyway.
MAX_OPEN_SEQUENCES = 10_000
CENTRE_SOURCE = "receiver"
AGENT_SOURCE = "agent"  # the edge core's own events (agent.started, ...)
#: Largest message judged at all (the agent's events are far smaller; watchlists go the other way).
MAX_MESSAGE_BYTES = 256 * 1024
#: Deepest nesting of objects and arrays accepted (the contract's deepest is 4).
MAX_DEPTH = 32
#: Integers must fit the store's BIGINT: 64 bits, signed.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT64_DIGITS = len(str(INT64_MIN))  # longest text of a 64-bit integer, sign included


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

    def merge(self, other: Outcome) -> None:
        """Add ``other`` (committed separately) to this outcome, for receipts and counters."""
        for key, ids in other.receipts.items():
            self.receipts.setdefault(key, []).extend(ids)
        self.rejected += other.rejected
        self.duplicates += other.duplicates
        mine, theirs = self.batch, other.batch
        mine.events += theirs.events
        mine.devices.update(theirs.devices)
        mine.alarms += theirs.alarms
        mine.links += theirs.links
        mine.forwards += theirs.forwards
        mine.command_results += theirs.command_results
        mine.quarantined += theirs.quarantined


class Rejected(ValueError):
    """A message the receiver will not store; the text says why."""


@dataclass
class _QuarantineNote:
    """A device's quarantined messages not yet reported in a ``centre.quarantined`` event."""

    count: int = 0
    reported_at: float = -math.inf
    last_topic: str = ""
    last_reason: str = ""


def _require(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise Rejected(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        raise Rejected(f"field 'time' is not an ISO timestamp: {text[:40]!r}") from None


def _int64(text: str) -> int:
    # Judged on its text first: converting a 5,000-digit number is slow and raises ValueError.
    if len(text) > _INT64_DIGITS or not INT64_MIN <= (value := int(text)) <= INT64_MAX:
        raise Rejected(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside 64 bits")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected(f"number {text[:24]} is out of range")
    return value


def _no_constant(text: str) -> float:
    raise Rejected(f"{text} is not JSON")


def strict_json(payload: bytes) -> Any:
    """The JSON document in ``payload``, or :class:`Rejected` saying what is wrong with it."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Rejected(f"payload is {len(payload)} bytes, limit {MAX_MESSAGE_BYTES}")
    try:
        # Decoded here: json.loads(bytes) would silently accept UTF-16 and UTF-32.
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        body = json.loads(text, parse_int=_int64, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise Rejected(f"payload nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise Rejected(f"payload is not JSON ({exc})") from None
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """Depth and text of every value: no deeper than MAX_DEPTH, no lone surrogates."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _unicode(value)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise Rejected(f"payload nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key in value:
                _unicode(key)
            stack.extend((v, depth + 1) for v in value.values())
        else:
            stack.extend((v, depth + 1) for v in value)


def _unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Rejected(f"text holds a lone surrogate ({text[exc.start]!r})") from None


def _column_text(value: Any) -> bool:
    """A string the store can keep in a column of its own (PostgreSQL refuses NUL)."""
    return isinstance(value, str) and "\x00" not in value


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
        #: Per device: when ``centre.quarantined`` was last raised, and what came since.
        self._quarantine_notes: dict[tuple[str, str], _QuarantineNote] = {}

    def reload(self, devices: Iterable[DeviceState]) -> None:
        """Forget what this process made of messages the store did not take: its state again."""
        self.devices = {d.key: d for d in devices}

    # --- messages ---
    def quarantined(self, msg: Inbound, reason: str, now: float) -> Outcome:
        """An outcome that only quarantines ``msg``."""
        out = Outcome()
        self._quarantine(msg, reason, out, now)
        return out

    def process(self, messages: Sequence[Inbound], now: float) -> Outcome:
        out = Outcome()
        parsed: list[tuple[Inbound, str, str, list[str], dict[str, Any] | None]] = []
        for msg in messages:  # first pass: validate events, so duplicates are found in one query
            with self._judged(msg, out, now):
                site, device, rest = self._split(msg.topic)
                body = self._event_body(msg, site, device, rest) if rest[0] == "events" else None
                parsed.append((msg, site, device, rest, body))
        known = self.known_ids([body["id"] for *_, body in parsed if body is not None])
        for msg, site, device, rest, body in parsed:  # second pass: in arrival order
            with self._judged(msg, out, now):
                if body is not None:
                    self._event(msg, body, site=site, device=device, known=known, now=now, out=out)
                elif rest == ["status"]:
                    self._status(site, device, self._json(msg), now, out.batch, retained=msg.retain)
                elif rest == ["heartbeat"]:
                    self._heartbeat(site, device, self._json(msg), now, out.batch)
                elif rest[0] == "cmd_result" and len(rest) == 2:
                    result = self._json(msg)
                    out.batch.command_results.append(
                        (rest[1], result.get("ok") is True, json.dumps(result), now)
                    )
                else:
                    raise Rejected("not a topic the receiver handles")
        return out

    @contextlib.contextmanager
    def _judged(self, msg: Inbound, out: Outcome, now: float) -> Iterator[None]:
        """Quarantine ``msg`` if judging it fails, whatever the reason: one message alone."""
        try:
            yield
        except Rejected as exc:
            self._quarantine(msg, str(exc), out, now)
        except Exception as exc:  # a case no rule foresaw must not hold the others back
            log.exception("could not judge the message on %s", msg.topic)
            self._quarantine(msg, f"internal error: {type(exc).__name__}: {exc}", out, now)

    def _quarantine(self, msg: Inbound, reason: str, out: Outcome, now: float) -> None:
        out.rejected += 1
        parts = msg.topic.split("/")
        site, device = (
            (parts[1], parts[2]) if len(parts) >= 4 and parts[1] and parts[2] else (None, None)
        )
        log.warning("quarantined message on %s (%d bytes): %s", msg.topic, len(msg.payload), reason)
        out.batch.quarantined.append(Quarantined(now, msg.topic, site, device, reason, msg.payload))
        if site is None or device is None:
            return
        note = self._quarantine_notes.setdefault((site, device), _QuarantineNote())
        note.count += 1
        note.last_topic, note.last_reason = msg.topic, reason
        if now - note.reported_at >= self.supervision.quarantine_report_every:
            self._report_quarantine(site, device, note, now, out.batch)

    def _report_quarantine(
        self, site: str, device: str, note: _QuarantineNote, now: float, batch: Batch
    ) -> None:
        payload = {
            "count": note.count,
            "topic": note.last_topic,
            "reason": note.last_reason,
            "every": self.supervision.quarantine_report_every,
        }
        log.warning("%s/%s: centre.quarantined %s", site, device, payload)
        self._store(
            centre_event("centre.quarantined", site, device, Priority.HIGH, payload, now=now), batch
        )
        note.count, note.reported_at = 0, now

    def _split(self, topic: str) -> tuple[str, str, list[str]]:
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != self.prefix or not parts[1] or not parts[2]:
            raise Rejected(f"topic is not {self.prefix}/<site>/<device>/...")
        return parts[1], parts[2], parts[3:]

    @staticmethod
    def _json(msg: Inbound) -> dict[str, Any]:
        body = strict_json(msg.payload)
        if not isinstance(body, dict):
            raise Rejected("payload is not a JSON object")
        return body

    def _event_body(self, msg: Inbound, site: str, device: str, rest: list[str]) -> dict[str, Any]:
        body = self._json(msg)
        event_id = _require(body, "id", str)
        if not 8 <= len(event_id) <= 64:
            raise Rejected(f"event id {event_id[:70]!r} has a bad length")
        if not _column_text(event_id):
            raise Rejected(f"event id {event_id!r} holds a NUL character")
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
        if not _column_text(_require(body, "source", str)):
            raise Rejected(f"event {event_id}: source holds a NUL character")
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
        receipts = out.receipts.setdefault((site, device), [])
        if event_id in known:
            out.duplicates += 1
            receipts.append(event_id)
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
        receipts.append(event_id)  # only once it is in the batch: never a receipt for less
        state = self._device(site, device, now, out.batch)
        self._alive(state, now, out.batch, "event")
        if stored.seq is not None:
            self._sequence(state, stored.seq, now, out.batch)
        if stored.kind == "agent.started" and stored.source == AGENT_SOURCE:
            self._skipped(state, body.get("payload", {}).get("seq_skipped"), now, out.batch)

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
        self,
        site: str,
        device: str,
        body: dict[str, Any],
        now: float,
        batch: Batch,
        *,
        retained: bool = False,
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
        if (
            counters is not None
            and known is not None
            and counters[0] < known[0]
            and state_name == "online"
            and not retained
        ):
            # Not a stale Will: the device itself says it is online with an older boot counter.
            self._restarted(
                state, now, batch, f"boot counter went back from {known[0]} to {counters[0]}"
            )
            known = None
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
        state.version = body["version"] if _column_text(body.get("version")) else state.version
        state.config = body["config"] if _column_text(body.get("config")) else state.config
        if isinstance(body.get("drivers"), list):
            state.drivers = body["drivers"]
        if isinstance(body.get("backlog"), int):
            state.backlog = body["backlog"]
        state.status_time = body["time"] if _column_text(body.get("time")) else None
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
        """Called for each NEW event id: a seq already counted means the numbering restarted."""
        if (
            state.seq_upto is not None
            and state.seq_first is not None
            and (state.seq_first <= seq <= state.seq_upto or seq in state.seq_above)
        ):
            self._restarted(state, now, batch, f"seq {seq} came again with a new event id", seq)
        if state.seq_upto is None:
            # First contact (or a new numbering): earlier numbers are not ours to miss.
            state.seq_upto, state.seq_first = seq - 1, seq
        if seq <= state.seq_upto or seq in state.seq_above:
            return
        self._count(state, [seq])
        if state.seq_above and state.hole_since is None:
            state.hole_since = now
        if len(state.seq_above) > MAX_OPEN_SEQUENCES:
            self._report_gaps(state, now, batch, "too many numbers out of order")

    def _skipped(self, state: DeviceState, skipped: Any, now: float, batch: Batch) -> None:
        """``agent.started`` names ``[from, to]``: numbers an earlier run reserved and never
        stored (it crashed). None of them is a lost event: count them as seen, so only real
        holes become gaps. One that was used (published, then the crash) arrived already."""
        if not (
            isinstance(skipped, list)
            and len(skipped) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in skipped)
            and 0 <= skipped[0] <= skipped[1]
            and state.seq_upto is not None
        ):
            return
        first = max(skipped[0], state.seq_upto + 1)
        # Bounded like any out-of-order numbers: a bigger reservation only waits a little longer.
        last = min(skipped[1], first + MAX_OPEN_SEQUENCES - len(state.seq_above) - 1)
        if first <= last:
            self._count(state, range(first, last + 1))
            batch.devices[state.key] = state

    @staticmethod
    def _count(state: DeviceState, numbers: Iterable[int]) -> None:
        """Numbers accounted for: seq_upto moves over every one now contiguous."""
        assert state.seq_upto is not None
        above = sorted({*state.seq_above, *numbers})
        upto = state.seq_upto
        while above and above[0] == upto + 1:
            upto = above.pop(0)
        state.seq_upto, state.seq_above = upto, above
        if not above:
            state.hole_since = None

    def _restarted(
        self, state: DeviceState, now: float, batch: Batch, why: str, seq: int | None = None
    ) -> None:
        """The device numbers its events afresh: report what the old numbering lost, start over."""
        if state.seq_above:
            self._report_gaps(state, now, batch, "the device's numbering restarted")
        self._raise(
            "sequence.restarted",
            state,
            Priority.HIGH,
            {"reason": why, "previous_seq": state.seq_upto, "seq": seq, "boot": state.boot},
            now=now,
            batch=batch,
        )
        state.seq_upto = state.seq_first = None
        state.seq_above, state.hole_since = [], None
        batch.devices[state.key] = state

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
        for key, note in self._quarantine_notes.items():
            if note.count and now - note.reported_at >= sup.quarantine_report_every:
                self._report_quarantine(*key, note, now, batch)
        for state in self.devices.values():
            # A device that stopped cleanly said goodbye: its silence is not a loss.
            if not state.lost and state.state != "stopped":
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
