"""The dialect engine: bytes in, messages out. Pure (no I/O, no clock of its own).

The same engine runs inside the serial drivers, in ``wardpost serial-sniff``
and in ``wardpost serial-replay``, so what a technician sees offline is what
the agent will do. Garbage, bad checksums and unknown lines come out as
:class:`Unparsed` (never an exception), and every buffer is bounded.

    engine = DialectEngine(load_dialect("rdm6300"))
    engine.feed(b"\\x020100CDA4EC84\\x03", now=0.0)
    # -> [Message(kind="rfid.read",
    #             fields={"tag": "0100CDA4EC", "version": "01", "printed": "0013477100"}, ...)]
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from drivers.serial_common.dialect import DEVICE_TIME, Dialect, Rule, text_to_bytes
from drivers.serial_common.framing import Frame, Rejected, Unparsed, make_framer
from drivers.serial_common.layout import BodyReader
from drivers.serial_common.limits import message_key


class Message(NamedTuple):
    """A frame a rule recognised: an event kind and its fields (a named tuple: one
    is made per frame, and a tuple is the cheapest immutable record)."""

    kind: str
    fields: dict[str, Any]
    raw: bytes
    #: The rule's priority override ("" = the driver's default for this kind).
    priority: str = ""
    #: With ``explain``: how the frame was cut and checked and each field read.
    trace: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes the dialect wants sent back to the device (an acknowledgement)."""

    data: bytes


Output = Message | Unparsed | Reply

_TRUE_WORDS = frozenset({"1", "y", "yes", "true", "on", "t"})


def _int_list(text: str) -> list[int]:
    return [int(part) for part in re.split(r"[,;\s]+", text.strip()) if part]


def _bits(text: str) -> list[int]:
    """Set bits of a hex bitmask, numbered from 1 (zone bitmaps in binary frames)."""
    value = int(text, 16)
    return [i + 1 for i in range(value.bit_length()) if value >> i & 1]


CONVERSIONS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": lambda v: int(v.strip()),
    "float": lambda v: float(v.strip()),
    "hex_int": lambda v: int(v, 16),
    "hex_as_decimal": lambda v: f"{int(v, 16):010d}",
    "int_list": _int_list,
    "bits": _bits,
    "bool": lambda v: v.strip().lower() in _TRUE_WORDS,
    "id": lambda v: v.strip(" \t\x00"),
}

#: The trace of a message when not explaining: always empty, never appended to.
_NO_TRACE: list[str] = []


@dataclass
class _CompiledRule:
    rule: Rule
    pattern: re.Pattern[str]
    reply: bytes = b""
    converters: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    #: Has checks, layout fields or a device time (more than regex groups).
    derived: bool = False


class DialectEngine:
    """Runs one dialect over one byte stream.

    ``feed(data, now)`` returns what the new bytes completed, in order.
    ``stats`` counts frames, messages and every kind of trouble by code
    (``bad_checksum``, ``bad_parity``, ``overlong``, ``garbage``, ``no_rule``,
    ``duplicate`` ...). With ``explain`` every message carries a trace of its
    framing, checksum and fields (``serial-replay --explain``; slower).
    """

    def __init__(self, dialect: Dialect, explain: bool = False):
        self.dialect = dialect
        self.explain = explain
        self.framer = make_framer(dialect.framing)
        self.stats: Counter[str] = Counter()
        self._rules = [
            _CompiledRule(
                rule,
                re.compile(rule.match),
                self.framer.encode(text_to_bytes(rule.reply)) if rule.reply else b"",
                {name: CONVERSIONS[conv] for name, conv in rule.fields.items()},
                bool(rule.layout or rule.checks or rule.time_format),
            )
            for rule in dialect.rules
        ]
        self._message_number = (
            re.compile(dialect.message_number) if dialect.message_number else None
        )
        self._recent_numbers: deque[str] = deque(maxlen=dialect.duplicate_memory)
        self._counters: dict[int, dict[str, int]] = {}
        self._hex = dialect.framing.decode == "hex"
        self._encoding = dialect.framing.encoding
        self._hex_digits = dialect.framing.bytes_from == "hex_digits"
        #: state name -> (key, fields) of the condition in force, None once cleared
        #: (see ``Rule.state``).
        self._states: dict[str, tuple[tuple[str, str], dict[str, Any]] | None] = {}

    @property
    def buffered(self) -> int:
        """Bytes currently held for unfinished frames."""
        return self.framer.buffered

    def poll_request(self) -> bytes | None:
        """The framed poll request, or None if this dialect's device pushes by itself."""
        request = self.dialect.poll.request
        return self.framer.encode(text_to_bytes(request)) if request else None

    def feed(self, data: bytes, now: float) -> list[Output]:
        self.stats["bytes"] += len(data)
        return self._outputs(self.framer.feed(data, now))

    def flush(self) -> list[Output]:
        """Report whatever unfinished bytes are buffered, and forget them."""
        return self._outputs(self.framer.flush())

    def expire(self, now: float) -> list[Output]:
        """What a partial frame older than the gap timeout becomes, without new bytes
        (the driver asks on a timer, so a frame behind a false start is not kept waiting)."""
        return self._outputs(self.framer.expire(now))

    def _outputs(self, items: list[Frame | Unparsed]) -> list[Output]:
        out: list[Output] = []
        for item in items:
            if isinstance(item, Frame):
                self.stats["frames"] += 1
                self._decode(item, out)
            else:
                self.stats[item.code] += 1
                out.append(item)
        return out

    def _decode(self, frame: Frame, out: list[Output]) -> None:
        text = (
            frame.body.hex().upper() if self._hex else frame.body.decode(self._encoding, "replace")
        )
        number = None
        if self._message_number is not None:
            found = self._message_number.search(text)
            if found:
                number = found.group(1)
                if number in self._recent_numbers:
                    self.stats["duplicate"] += 1
                    return
        for index, compiled in enumerate(self._rules):
            match = compiled.pattern.search(text)
            if match is None:
                continue
            if number is not None:
                if compiled.rule.resets_counters:
                    self._recent_numbers.clear()
                self._recent_numbers.append(number)
            self._apply(
                index=index, compiled=compiled, match=match, frame=frame, number=number, out=out
            )
            return
        self.stats["no_rule"] += 1
        out.append(Unparsed.of("no_rule", "no rule matched", frame.raw))

    def _apply(
        self,
        *,
        index: int,
        compiled: _CompiledRule,
        match: re.Match[str],
        frame: Frame,
        number: str | None,
        out: list[Output],
    ) -> None:
        rule = compiled.rule
        if rule.ignore:
            if compiled.reply:
                out.append(Reply(compiled.reply))
            self.stats["ignored"] += 1
            return
        # Without explain the shared empty list is never appended to (hot path).
        trace = [self._describe(frame)] if self.explain else _NO_TRACE
        try:
            fields = self._group_fields(compiled, match)
            if compiled.derived or trace:
                self._derived_fields(compiled, match, frame, fields, trace)
        except Rejected as exc:  # a frame failing a check is never acknowledged
            self.stats[exc.code] += 1
            out.append(Unparsed.of(exc.code, exc.reason, frame.raw))
            return
        if compiled.reply:
            out.append(Reply(compiled.reply))
        fields.update(rule.constants)
        if number is not None:
            fields["msgno"] = number
        if rule.resets_counters:
            self.stats["device_reset"] += 1
            for key, previous in self._counters.items():
                self._counters[key] = dict.fromkeys(previous, 0)
        if rule.counters:
            self._diff_counters(index, rule, fields, frame, out)
            return
        if rule.state and not self._state_changed(rule, fields):
            self.stats["unchanged"] += 1
            return
        self.stats["messages"] += 1
        out.append(
            Message(rule.kind, fields, frame.raw, rule.priority, tuple(trace) if trace else ())
        )

    def _group_fields(self, compiled: _CompiledRule, match: re.Match[str]) -> dict[str, Any]:
        """The regex groups, converted; raises :class:`Rejected` for one that will not."""
        fields: dict[str, Any] = {}
        converters = compiled.converters
        for name, value in match.groupdict().items():
            if value is None:
                continue
            try:
                fields[name] = converters.get(name, str)(value)
            except ValueError:
                conversion = compiled.rule.fields.get(name, "str")
                raise Rejected(
                    "bad_field", f"field {name!r}: {value!r} is not {conversion}"
                ) from None
        return fields

    def _derived_fields(
        self,
        compiled: _CompiledRule,
        match: re.Match[str],
        frame: Frame,
        fields: dict[str, Any],
        trace: list[str],
    ) -> None:
        """Checks, layout fields and the device's time (and with explain, a trace line
        for every field); raises :class:`Rejected` for a failed check or a field that
        cannot be read."""
        rule = compiled.rule
        if trace:
            for name, value in match.groupdict().items():
                if value is not None:
                    conversion = rule.fields.get(name, "str")
                    trace.append(f"{name}: text {value!r} ({conversion}) -> {fields[name]!r}")
        if rule.layout or rule.checks:
            reader = BodyReader(self._payload(frame))
            for check in rule.checks:
                try:
                    verdict = reader.verify(check)
                except ValueError as exc:  # the frame is too short for the check
                    raise Rejected("bad_field", f"{check.type}: {exc}") from None
                if trace:
                    trace.append(f"check {verdict}")
            for spec in rule.layout:
                try:
                    fields[spec.name], where = reader.field(spec)
                except ValueError as exc:
                    raise Rejected("bad_field", f"field {spec.name!r}: {exc}") from None
                if trace:
                    trace.append(f"{spec.name}: {where} ({spec.type}) -> {fields[spec.name]!r}")
        if rule.time_format and DEVICE_TIME in fields:
            text = str(fields[DEVICE_TIME])
            try:
                fields[DEVICE_TIME] = datetime.strptime(text, rule.time_format).isoformat()
            except ValueError:
                raise Rejected(
                    "bad_field", f"{DEVICE_TIME}: {text!r} does not fit {rule.time_format!r}"
                ) from None
            if trace:
                trace.append(
                    f"{DEVICE_TIME}: {text!r} ({rule.time_format}) -> {fields[DEVICE_TIME]}"
                )

    def _payload(self, frame: Frame) -> bytes:
        """The bytes layout fields read: the body, or what its hex digits spell."""
        if not self._hex_digits:
            return frame.body
        digits = frame.body.strip(b" \t")
        try:
            return bytes.fromhex(("0" if len(digits) % 2 else "") + digits.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise Rejected("bad_field", "the frame is not hex digits") from None

    def _describe(self, frame: Frame) -> str:
        framing = self.dialect.framing
        text = (
            f"frame: {framing.type}, {len(frame.raw)} bytes on the wire, body {len(frame.body)}"
            f" bytes {frame.body.hex(' ')}"
        )
        if frame.check:
            text += f"; checksum {framing.checksum} {frame.check.hex(' ')} verified"
        return text

    def _state_changed(self, rule: Rule, fields: dict[str, Any]) -> bool:
        """Record a stateful message; False if it repeats the state (or clears a clear one)."""
        current = self._states.get(rule.state)
        if rule.clears:
            if current is None:
                return False
            self._states[rule.state] = None
            fields["previous"] = current[1]
            return True
        key = message_key(rule.kind, fields)
        if current is not None and current[0] == key:
            return False
        self._states[rule.state] = (key, dict(fields))
        return True

    def forget_states(self) -> None:
        """Forget every ``state`` (the device was away): its next answer is news again."""
        self._states.clear()

    def _diff_counters(
        self, index: int, rule: Rule, fields: dict[str, Any], frame: Frame, out: list[Output]
    ) -> None:
        """Turn absolute counters into increases; a decrease means the device was reset."""
        try:
            totals = {name: int(fields[name]) for name in rule.counters}
        except (KeyError, ValueError, TypeError):
            self.stats["bad_field"] += 1
            out.append(
                Unparsed.of(
                    "bad_field", f"counters {rule.counters} are not all integers", frame.raw
                )
            )
            return
        previous = self._counters.get(index)
        self._counters[index] = totals
        if previous is None:  # the first reading is a baseline, not traffic
            self.stats["baselines"] += 1
            return
        if any(totals[name] < previous.get(name, 0) for name in totals):
            self.stats["counter_reset"] += 1
            self.stats["messages"] += 1
            out.append(
                Message(
                    self.dialect.reset_kind,
                    {"reason": "counters went backwards", "before": previous, "after": totals},
                    frame.raw,
                )
            )
            increases = totals  # counted from zero since the reset
        else:
            increases = {name: totals[name] - previous.get(name, 0) for name in totals}
        if not any(increases.values()):
            return
        self.stats["messages"] += 1
        out.append(
            Message(rule.kind, {**fields, **increases, "totals": totals}, frame.raw, rule.priority)
        )
        for name, kind in rule.counter_events.items():
            if increases[name] > 0:
                self.stats["messages"] += 1
                event_fields = {**rule.constants, "count": increases[name], "counter": name}
                out.append(Message(kind, event_fields, frame.raw))
