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
from typing import Any

from drivers.serial_common.dialect import Dialect, Rule, text_to_bytes
from drivers.serial_common.framing import Frame, Unparsed, make_framer


@dataclass(frozen=True, slots=True)
class Message:
    """A frame a rule recognised: an event kind and its fields."""

    kind: str
    fields: dict[str, Any]
    raw: bytes
    #: The rule's priority override ("" = the driver's default for this kind).
    priority: str = ""


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
}


@dataclass
class _CompiledRule:
    rule: Rule
    pattern: re.Pattern[str]
    reply: bytes = b""
    converters: dict[str, Callable[[str], Any]] = field(default_factory=dict)


class DialectEngine:
    """Runs one dialect over one byte stream.

    ``feed(data, now)`` returns what the new bytes completed, in order.
    ``stats`` counts frames, messages and every kind of trouble by code
    (``bad_checksum``, ``overlong``, ``garbage``, ``no_rule``, ``duplicate`` ...).
    """

    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self.framer = make_framer(dialect.framing)
        self.stats: Counter[str] = Counter()
        self._rules = [
            _CompiledRule(
                rule,
                re.compile(rule.match),
                self.framer.encode(text_to_bytes(rule.reply)) if rule.reply else b"",
                {name: CONVERSIONS[conv] for name, conv in rule.fields.items()},
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
        out: list[Output] = []
        for item in self.framer.feed(data, now):
            if isinstance(item, Frame):
                self.stats["frames"] += 1
                self._decode(item, out)
            else:
                self.stats[item.code] += 1
                out.append(item)
        return out

    def flush(self) -> list[Output]:
        """Report whatever unfinished bytes are buffered, and forget them."""
        leftovers = self.framer.flush()
        for item in leftovers:
            self.stats[item.code] += 1
        return list(leftovers)

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
        if compiled.reply:
            out.append(Reply(compiled.reply))
        if rule.ignore:
            self.stats["ignored"] += 1
            return
        fields: dict[str, Any] = {}
        for name, value in match.groupdict().items():
            if value is None:
                continue
            convert = compiled.converters.get(name, str)
            try:
                fields[name] = convert(value)
            except ValueError:
                self.stats["bad_field"] += 1
                conversion = rule.fields.get(name, "str")
                out.append(
                    Unparsed.of(
                        "bad_field", f"field {name!r}: {value!r} is not {conversion}", frame.raw
                    )
                )
                return
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
        self.stats["messages"] += 1
        out.append(Message(rule.kind, fields, frame.raw, rule.priority))

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
