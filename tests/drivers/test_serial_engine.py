"""Dialect engine mechanics: framing edge cases, parity, binary frames, limits."""

from __future__ import annotations

from typing import Any

from agent.config import parse_section
from agent.testing.serial_frames import messages, odd_parity
from drivers.serial_common.checksums import find_checksum
from drivers.serial_common.dialect import Dialect
from drivers.serial_common.engine import DialectEngine
from drivers.serial_common.framing import SAMPLE_BYTES, Unparsed
from drivers.serial_common.limits import Aggregator, FloodGate, RateLimiter, message_key

ECHO = [{"match": "(?P<text>.+)", "kind": "test.line"}]


def make(
    framing: dict[str, Any], rules: list[dict[str, Any]] | None = None, **top: Any
) -> DialectEngine:
    return DialectEngine(
        parse_section(Dialect, {"name": "t", "framing": framing, "rules": rules or ECHO, **top})
    )


def codes(outputs: list[Any]) -> list[str]:
    return [o.code for o in outputs if isinstance(o, Unparsed)]


def test_overlong_line_is_reported_once_and_memory_stays_bounded() -> None:
    e = make({"max_length": 16})
    out = []
    for _ in range(100):
        out += e.feed(b"x" * 50, 0.0)
        assert e.buffered <= 16
    out += e.feed(b"tail\r\nok\r\n", 0.0)
    assert codes(out) == ["overlong"]
    assert messages(out) == [("test.line", {"text": "ok"})]
    assert len(out[0].raw) <= SAMPLE_BYTES


def test_partial_line_left_by_a_device_reset_is_not_glued_to_the_next() -> None:
    e = make({"gap_timeout": 0.5})
    assert e.feed(b"ALA", 0.0) == []
    out = e.feed(b"ALARM\r\n", 2.0)
    assert codes(out) == ["incomplete"]
    assert messages(out) == [("test.line", {"text": "ALARM"})]


def test_software_odd_parity_checks_and_strips_bit_7() -> None:
    e = make({"parity": "odd"})
    good = odd_parity(b"ALARM\r\n")
    bad = bytearray(odd_parity(b"TAMPER\r\n"))
    bad[2] ^= 0x80  # one flipped parity bit
    out = e.feed(good + bytes(bad), 0.0)
    assert messages(out) == [("test.line", {"text": "ALARM"})]
    assert codes(out) == ["parity_error"]
    assert make({"parity": "odd"}).framer.encode(b"AC") == odd_parity(b"AC")


def test_stx_etx_crc16_modbus_raw_little_endian_after_etx() -> None:
    body = b"ALARM 3"
    crc = find_checksum("crc16-modbus").compute(body).to_bytes(2, "little")
    e = make({"type": "stx_etx", "checksum": "crc16-modbus", "checksum_byteorder": "little"})
    frame = b"\x02" + body + b"\x03" + crc
    out = e.feed(frame + frame[:-1] + bytes([frame[-1] ^ 1]), 0.0)
    assert messages(out) == [("test.line", {"text": "ALARM 3"})]
    assert codes(out) == ["bad_checksum"]
    assert e.framer.encode(body) == frame


def test_stx_etx_checksum_covering_framing_bytes() -> None:
    body = b"T1"
    value = find_checksum("xor").compute(b"\x02" + body + b"\x03")
    e = make({"type": "stx_etx", "checksum": "xor", "checksum_covers": "all"})
    assert messages(e.feed(b"\x02" + body + b"\x03" + bytes([value]), 0.0)) == [
        ("test.line", {"text": "T1"})
    ]


def test_stx_etx_overlong_frame_without_etx() -> None:
    e = make({"type": "stx_etx", "max_length": 20})
    out = e.feed(b"\x02" + b"A" * 100, 0.0)
    assert codes(out) == ["overlong"]
    assert e.buffered == 0
    assert messages(e.feed(b"\x02OK\x03", 0.0)) == [("test.line", {"text": "OK"})]


BINARY_RULES = [
    {
        "match": "^10(?P<zones>[0-9A-F]{4})(?P<intensity>[0-9A-F]{2})$",
        "kind": "gate.alarm",
        "fields": {"zones": "bits", "intensity": "hex_int"},
    }
]


def test_fixed_frames_with_sync_resynchronise_after_garbage_and_bad_checksum() -> None:
    e = make(
        {"type": "fixed", "sync": "AA55", "length": 7, "checksum": "sum8", "decode": "hex"},
        BINARY_RULES,
    )
    body = bytes([0x10, 0x00, 0x05, 0x40])  # zones 1 and 3, intensity 64
    frame = b"\xaa\x55" + body + bytes([sum(body) & 0xFF])
    corrupt = b"\xaa\x55" + body + b"\x00"
    out = []
    stream = b"\x01\x02" + corrupt + frame + frame
    for i in range(len(stream)):  # one byte per read, as a slow UART delivers them
        out += e.feed(stream[i : i + 1], 0.0)
    assert messages(out) == [("gate.alarm", {"zones": [1, 3], "intensity": 64})] * 2
    assert "bad_checksum" in codes(out)


def test_fixed_frames_without_sync_slide_until_the_checksum_agrees() -> None:
    word = [{"match": "^(?P<word>[0-9A-F]{8})$", "kind": "test.word"}]
    e = make({"type": "fixed", "length": 5, "checksum": "crc8", "decode": "hex"}, word)
    body = b"\x10\x20\x30\x40"
    frame = body + bytes([find_checksum("crc8").compute(body)])
    out = e.feed(b"\x99" + frame + frame, 0.0)
    assert messages(out) == [("test.word", {"word": "10203040"})] * 2
    assert codes(out) == ["garbage"]


def test_bad_field_conversion_is_unparsed_not_an_exception() -> None:
    e = make({}, [{"match": "N=(?P<n>\\w+)", "kind": "test.n", "fields": {"n": "int"}}])
    out = e.feed(b"N=12\r\nN=zz\r\n", 0.0)
    assert messages(out) == [("test.n", {"n": 12})]
    assert codes(out) == ["bad_field"]


def test_message_number_dedup_remembers_a_bounded_window() -> None:
    e = make(
        {},
        [{"match": "#(?P<n>\\d+)", "kind": "test.n"}],
        message_number="#(\\d+)",
        duplicate_memory=2,
    )
    out = e.feed(b"#1\r\n#2\r\n#2\r\n#3\r\n#1\r\n", 0.0)
    assert [f["msgno"] for _, f in messages(out)] == ["1", "2", "3", "1"]
    assert e.stats["duplicate"] == 1


def test_flood_gate_folds_repeats_within_the_window_and_counts_them() -> None:
    gate = FloodGate(window=2.0)
    key = message_key("gate.alarm", {"zones": [3], "msgno": "1"})
    assert key == message_key("gate.alarm", {"zones": [3], "msgno": "2"})
    assert gate.admit(key, 0.0) == 0
    assert [gate.admit(key, t) for t in (0.5, 1.0, 1.9)] == [None, None, None]
    assert gate.admit(message_key("gate.alarm", {"zones": [4]}), 1.0) == 0
    assert gate.admit(key, 2.1) == 3
    assert gate.suppressed == 3


def test_flood_gate_remembers_a_bounded_number_of_keys() -> None:
    gate = FloodGate(window=100.0, max_keys=10)
    for i in range(1000):
        gate.admit(("k", str(i)), 0.0)
    assert len(gate._seen) == 10


def test_rate_limiter_burst_then_rate() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.take_dropped() == 2
    assert limiter.allow(1.0)
    assert limiter.dropped == 2


def test_aggregator_sums_integers_and_keeps_the_latest_rest() -> None:
    agg = Aggregator()
    agg.add("gate.transit", {"in": 1, "msgno": "1"}, 10.0)
    agg.add("gate.transit", {"in": 2, "out": 1, "ratio": 0.5, "msgno": "2"}, 12.5)
    assert agg.drain() == [
        (
            "gate.transit",
            {"in": 3, "out": 1, "ratio": 0.5, "msgno": "2", "messages": 2, "span": 2.5},
        )
    ]
    assert agg.drain() == []


def test_stx_etx_raw_crc16_before_etx_even_when_it_contains_stx_or_etx() -> None:
    e = make({"type": "stx_etx", "checksum": "crc16-xmodem", "checksum_position": "before_etx"})
    bodies = [b"A%d" % i for i in range(400)]
    frames = [e.framer.encode(body) for body in bodies]
    assert any(b"\x02" in f[1:-1] for f in frames)  # some checksums contain an STX byte
    assert any(b"\x03" in f[1:-1] for f in frames)  # and some an ETX byte
    stream = b"".join(frames)
    whole = e.feed(stream, 0.0)
    assert [fields["text"] for _, fields in messages(whole)] == [b.decode() for b in bodies]
    split = make({"type": "stx_etx", "checksum": "crc16-xmodem", "checksum_position": "before_etx"})
    out = [o for i in range(0, len(stream), 7) for o in split.feed(stream[i : i + 7], 0.0)]
    assert messages(out) == messages(whole)
    bad = frames[0][:-2] + bytes([frames[0][-2] ^ 0x40]) + b"\x03"
    assert codes(e.feed(bad + frames[1], 0.0)) == ["bad_checksum"]


def test_fixed_frames_without_sync_report_a_bad_checksum_right_after_a_good_frame() -> None:
    word = [{"match": "^(?P<word>[0-9A-F]{8})$", "kind": "test.word"}]
    e = make({"type": "fixed", "length": 5, "checksum": "crc8", "decode": "hex"}, word)
    good = e.framer.encode(b"\x10\x20\x30\x40")
    bad = bytearray(good)
    bad[1] ^= 0x08  # one flipped bit: reported as what it is, not as garbage
    out = e.feed(good + bytes(bad) + good, 0.0)
    assert messages(out)[0] == ("test.word", {"word": "10203040"})
    assert codes(out)[0] == "bad_checksum"
    assert messages(out)[-1] == ("test.word", {"word": "10203040"})


def test_stx_etx_trailer_after_the_checksum_is_part_of_the_frame() -> None:
    e = make({"type": "stx_etx", "checksum": "xor", "checksum_encoding": "hex", "trailer": "0D0A"})
    frame = e.framer.encode(b"T1")
    assert frame == b"\x02T1\x03" + b"%02X" % (ord("T") ^ ord("1")) + b"\r\n"
    out = e.feed(frame + frame[:-1] + b"X" + frame, 0.0)
    assert messages(out) == [("test.line", {"text": "T1"})] * 2
    assert codes(out) == ["bad_trailer"]
    # A frame missing its trailer never costs the frame after it.
    out = e.feed(frame[:-2] + frame, 0.0)
    assert messages(out) == [("test.line", {"text": "T1"})]
    assert codes(out) == ["bad_trailer"]


def test_fields_and_checks_beyond_a_short_frame_are_bad_fields_not_exceptions() -> None:
    rules = [
        {
            "kind": "test.bits",
            "checks": [{"type": "odd_parity", "bits": [1, 16], "against": [0, 0]}],
            "layout": [{"name": "when", "offset": 0, "size": 8, "type": "unix_time"}],
        }
    ]
    e = make({"type": "fixed", "sync": "AA", "length": 9, "decode": "hex"}, rules)
    short = make({"decode": "text"}, rules)
    assert codes(short.feed(b"A\r\n", 0.0)) == ["bad_field"]  # 8 bits, the check needs 17
    frame = b"\xaa" + b"\x00" + b"\xff" * 7  # parity holds (9 ones); the time is out of range
    out = e.feed(frame, 0.0)
    assert codes(out) == ["bad_field"]
    assert "is not a time" in out[0].reason


def test_checksum_over_a_byte_range_of_the_body() -> None:
    # "ID" and the last byte are outside the checksum (as a manual may say: "sum of bytes 2..n-1").
    e = make(
        {"checksum": "sum8", "checksum_encoding": "hex", "checksum_start": 2, "checksum_stop": -1}
    )
    body = b"IDabc!"
    line = body + b"%02X" % (sum(b"abc") & 0xFF) + b"\r\n"
    assert e.framer.frame(body) == line
    assert messages(e.feed(line, 0.0)) == [("test.line", {"text": "IDabc!"})]
    assert messages(e.feed(b"IXabc?" + line[6:], 0.0)) == [("test.line", {"text": "IXabc?"})]
    assert codes(e.feed(b"IDabd!" + line[6:], 0.0)) == ["bad_checksum"]
