"""Property-based fuzzing of the dialect engine: nothing escapes, memory stays bounded,
and how bytes are split across reads never changes what comes out."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import parse_section
from agent.testing.serial_frames import messages, multizone, rdm6300
from drivers.serial_common.dialect import Dialect, builtin_dialects, load_dialect
from drivers.serial_common.engine import DialectEngine, Message, Reply
from drivers.serial_common.framing import SAMPLE_BYTES, Rejected, Unparsed
from drivers.serial_common.layout import BodyReader

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes biased towards what the framers care about.
interesting = st.sampled_from(
    [
        b"\x02",
        b"\x03",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xaa\x55",
        b"ALARM Z3 I9",
        b"M0001 ",
        b"0",
        b"~",
        b"}",
        b"\x10",
        b"\xa5",
        b"$",
        b"*",
    ]
)
noisy = st.lists(st.one_of(st.binary(max_size=64), interesting), max_size=40).map(b"".join)


# Framings no built-in uses, so they are fuzzed too.
EXTRA_DIALECTS = {
    "fixed-sync-crc16": {
        "framing": {
            "type": "fixed",
            "sync": "AA55",
            "length": 8,
            "checksum": "crc16-modbus",
            "decode": "hex",
            "max_length": 64,
        }
    },
    "fixed-nosync-crc8": {
        "framing": {
            "type": "fixed",
            "length": 5,
            "checksum": "crc8",
            "decode": "hex",
            "max_length": 64,
        }
    },
    "line-odd-parity": {"framing": {"type": "line", "parity": "odd", "max_length": 64}},
    "flag-escaped-crc16": {
        "framing": {"type": "flag", "escape": "7D", "checksum": "CRC-16/X-25", "max_length": 64}
    },
    "stx-dle-escaped": {
        "framing": {"type": "stx_etx", "escape": "10", "escape_xor": 0, "max_length": 64}
    },
    "length-escaped-crc16": {
        "framing": {
            "type": "length",
            "sync": "A5",
            "escape": "7D",
            "checksum": "CRC-16/MODBUS",
            "decode": "hex",
            "max_length": 64,
        }
    },
    "length-nosync-crc8": {
        "framing": {
            "type": "length",
            "length_counts": "data",
            "checksum": "CRC-8",
            "max_length": 64,
        }
    },
    "line-start-checksum": {
        "framing": {
            "type": "line",
            "start": "$",
            "checksum": "xor",
            "checksum_separator": "*",
            "checksum_encoding": "hex",
            "max_length": 64,
        }
    },
    "stx-raw-before-etx": {
        "framing": {
            "type": "stx_etx",
            "checksum": "crc16-xmodem",
            "checksum_position": "before_etx",
            "max_length": 64,
        }
    },
}


# Every layout type and check over frames of any length (no checksum guards them).
LAYOUT_RULE = {
    "kind": "test.layout",
    "checks": [
        {"type": "even_parity", "bits": [1, 12], "against": [0, 0]},
        {"type": "sum", "bits": [0, 15], "against": [16, 23], "bit_order": "lsb0"},
    ],
    "layout": [
        {"name": "u", "offset": 0, "size": 2},
        {"name": "i", "offset": 1, "size": 2, "type": "int", "byteorder": "little"},
        {"name": "b", "offset": 2, "size": 2, "type": "bcd", "digits": 4},
        {"name": "d", "offset": 3, "size": 3, "type": "ascii_dec"},
        {"name": "h", "offset": 4, "size": 2, "type": "ascii_hex"},
        {"name": "t", "offset": -4, "size": 3, "type": "text"},
        {"name": "x", "offset": 5, "size": 0, "type": "hex"},
        {"name": "z", "bits": [3, 20], "type": "bits_set", "bit_order": "lsb0"},
        {"name": "f", "bits": [7, 7], "type": "bool"},
        {"name": "ts", "offset": 0, "size": 8, "type": "unix_time"},
        {"name": "l", "bits": [0, 3], "lookup": {"1": "one"}},
    ],
}
LAYOUT_DIALECTS = {
    "line-layout-all-types": {"framing": {"type": "line", "max_length": 64}},
    "line-hex-digits-layout": {
        "framing": {"type": "line", "max_length": 64, "bytes_from": "hex_digits"}
    },
}


def dialect(name: str) -> Dialect:
    if name in LAYOUT_DIALECTS:
        return parse_section(
            Dialect, {"name": name, "rules": [LAYOUT_RULE], **LAYOUT_DIALECTS[name]}
        )
    if name in EXTRA_DIALECTS:
        rules = [{"match": "^(?P<body>.*)$", "kind": "test.frame"}]
        return parse_section(Dialect, {"name": name, "rules": rules, **EXTRA_DIALECTS[name]})
    return load_dialect(name)


@pytest.mark.parametrize("name", [*builtin_dialects(), *EXTRA_DIALECTS, *LAYOUT_DIALECTS])
@FUZZ
@given(chunks=st.lists(noisy, max_size=20), gaps=st.lists(st.floats(0, 2), max_size=20))
def test_no_exception_and_bounded_memory(name: str, chunks: list[bytes], gaps: list[float]) -> None:
    engine = DialectEngine(dialect(name))
    limit = engine.dialect.framing.max_length
    now = 0.0
    for i, chunk in enumerate(chunks):
        now += gaps[i] if i < len(gaps) else 0.0
        for out in engine.feed(chunk, now):
            assert isinstance(out, Message | Unparsed | Reply)
            if isinstance(out, Unparsed):
                assert len(out.raw) <= SAMPLE_BYTES
        # An unfinished frame (max_length + a checksum) and a sample of garbage (< max_length).
        assert engine.buffered <= 2 * limit + 8, engine.buffered
    assert engine.stats["bytes"] == sum(map(len, chunks))


valid_streams = st.one_of(
    st.lists(st.binary(min_size=5, max_size=5).map(rdm6300), min_size=1, max_size=6).map(
        lambda frames: ("rdm6300", b"".join(frames))
    ),
    st.lists(
        st.tuples(
            st.integers(0, 9999),
            st.lists(st.integers(1, 33), min_size=1, max_size=5),
            st.integers(0, 999),
        ),
        min_size=1,
        max_size=6,
    ).map(
        lambda alarms: (
            "multizone-gate",
            b"".join(
                multizone(f"M{n:04d} AL Z{','.join(map(str, zones))} I{level:03d}".encode())
                for n, zones, level in alarms
            ),
        )
    ),
)


@FUZZ
@given(case=valid_streams, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_splitting_across_reads_never_changes_the_result(
    case: tuple[str, bytes], cuts: list[int]
) -> None:
    name, stream = case
    whole = messages(DialectEngine(load_dialect(name)).feed(stream, 0.0))
    engine = DialectEngine(load_dialect(name))
    pieces, last = [], 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        pieces.append(stream[last:cut])
        last = cut
    pieces.append(stream[last:])
    split = [m for piece in pieces for m in messages(engine.feed(piece, 0.0))]
    assert split == whole
    assert engine.buffered == 0


@FUZZ
@given(body=st.binary(max_size=40))
def test_layout_fields_read_any_body_or_say_why(body: bytes) -> None:
    """Whatever a frame holds, a field is read or fails with ValueError (which the
    engine reports as bad_field), and a check passes or is Rejected."""
    rule = dialect("line-layout-all-types").rules[0]
    reader = BodyReader(body)
    for spec in rule.layout:
        with contextlib.suppress(ValueError):
            reader.field(spec)
    for layout_check in rule.checks:
        with contextlib.suppress(Rejected, ValueError):
            reader.verify(layout_check)
