"""Property tests per framing, with an encoder built from the same dialect.

For every framing: random valid frames decode back to the fields they were
built from, however the stream is split; every single-bit corruption of a
checksummed frame is rejected with its reason (a corrupted frame is never
accepted with other fields); random noise between frames never costs a frame.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import parse_section
from drivers.serial_common.cli import encode_frame
from drivers.serial_common.dialect import Dialect, load_dialect
from drivers.serial_common.engine import DialectEngine, Message
from drivers.serial_common.framing import Unparsed
from drivers.serial_common.layout import as_hex_digits, layout_size, write_body

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LETTERS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=6)

# name -> (framing table, layout, value strategies)
BINARY_LAYOUT = [
    {"name": "number", "offset": 1, "size": 2},
    {"name": "level", "offset": 3, "size": 2, "type": "int", "byteorder": "little"},
    {"name": "serial", "offset": 5, "size": 2, "type": "bcd"},
    {"name": "zones", "bits": [56, 63], "type": "bits_set"},
    {"name": "armed", "bits": [64, 64], "type": "bool"},
    {"name": "mode", "bits": [65, 67]},
]
BINARY_VALUES = {
    "number": st.integers(0, 0xFFFF),
    "level": st.integers(-0x8000, 0x7FFF),
    "serial": st.integers(0, 9999),
    "zones": st.sets(st.integers(1, 8)).map(sorted),
    "armed": st.booleans(),
    "mode": st.integers(0, 7),
}
TEXT_LAYOUT = [
    {"name": "count", "offset": 0, "size": 5, "type": "ascii_dec"},
    {"name": "word", "offset": 5, "size": 6, "type": "text"},
]
TEXT_VALUES = {"count": st.integers(0, 99999), "word": LETTERS}

FRAMINGS: dict[str, tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = {
    "line-nmea": (
        {
            "type": "line",
            "terminators": ["\r\n"],
            "start": "$",
            "checksum": "xor",
            "checksum_separator": "*",
            "checksum_encoding": "hex",
        },
        TEXT_LAYOUT,
        TEXT_VALUES,
    ),
    "line-escaped-binary": (
        {
            "type": "line",
            "terminators": ["\n"],
            "start": "\x01",
            "escape": "1B",
            "escape_xor": 0x40,
            "checksum": "CRC-16/KERMIT",
        },
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
    "stx-crc-before-etx-dle": (
        {
            "type": "stx_etx",
            "checksum": "CRC-16/XMODEM",
            "checksum_position": "before_etx",
            "escape": "10",
            "escape_xor": 0,
        },
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
    "stx-hex-after-etx-trailer": (
        {
            "type": "stx_etx",
            "checksum": "sum8",
            "checksum_encoding": "hex",
            "trailer": "0D0A",
        },
        TEXT_LAYOUT,
        TEXT_VALUES,
    ),
    "flag-hdlc": (
        {
            "type": "flag",
            "escape": "7D",
            "checksum": "CRC-16/X-25",
            "checksum_byteorder": "little",
        },
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
    "length-escaped-crc": (
        {
            "type": "length",
            "sync": "A5",
            "length_counts": "rest",
            "escape": "7D",
            "checksum": "CRC-16/MODBUS",
            "checksum_byteorder": "little",
        },
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
    "length-data-count-crc32": (
        {
            "type": "length",
            "sync": "55AA",
            "length_offset": 1,
            "length_size": 2,
            "length_counts": "data",
            "length_adjust": 1,
            "checksum": "crc",
            "crc": {
                "width": 32,
                "poly": 0x04C11DB7,
                "init": 0xFFFFFFFF,
                "refin": True,
                "refout": True,
                "xorout": 0xFFFFFFFF,
            },
            "checksum_covers": "start_data",
        },
        [
            {**f, "offset": f["offset"] + 2}
            if "offset" in f
            else {**f, "bits": [b + 16 for b in f["bits"]]}
            for f in BINARY_LAYOUT
        ],
        BINARY_VALUES,
    ),
    "length-frame-count-hex-sum": (
        {
            "type": "length",
            "sync": "7E7E",
            "length_counts": "frame",
            "checksum": "sum16",
            "checksum_encoding": "hex",
            "checksum_covers": "all",
            "trailer": "0D",
        },
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
    "fixed-sync-crc8": (
        {"type": "fixed", "sync": "AA55", "length": 12, "checksum": "CRC-8", "escape": "7D"},
        BINARY_LAYOUT,
        BINARY_VALUES,
    ),
}
#: What a corrupted frame may be reported as, depending on which byte was hit.
REJECTIONS = {
    "bad_checksum",
    "bad_length",
    "bad_escape",
    "bad_trailer",
    "bad_parity",
    "garbage",
    "incomplete",
    "no_rule",
    "bad_field",
}


def dialect(name: str) -> Dialect:
    framing, layout, _ = FRAMINGS[name]
    rule = {"kind": "test.frame", "layout": layout}
    return parse_section(
        Dialect, {"name": name, "framing": {"max_length": 64, **framing}, "rules": [rule]}
    )


def values(name: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(FRAMINGS[name][2])


def encode(d: Dialect, fields: dict[str, Any]) -> bytes:
    """A frame of dialect ``d`` carrying ``fields``: the rule's layout, then the framing."""
    rule = d.rules[0]
    engine = DialectEngine(d)
    body = write_body(rule.layout, rule.checks, fields, layout_size(rule.layout))
    return engine.framer.frame(body)


def run(d: Dialect, pieces: list[bytes]) -> list[Message | Unparsed]:
    engine = DialectEngine(d)
    out = [o for piece in pieces for o in engine.feed(piece, 0.0)]
    out += engine.flush()
    assert engine.buffered == 0
    return [o for o in out if isinstance(o, Message | Unparsed)]


def decoded(outputs: list[Message | Unparsed]) -> list[dict[str, Any]]:
    return [o.fields for o in outputs if isinstance(o, Message)]


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


@pytest.mark.parametrize("name", FRAMINGS)
@PROPERTY
@given(data=st.data(), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_encoded_frames_decode_to_their_fields(
    name: str, data: st.DataObject, cuts: list[int]
) -> None:
    d = dialect(name)
    sent = data.draw(st.lists(values(name), min_size=1, max_size=6))
    stream = b"".join(encode(d, fields) for fields in sent)
    assert decoded(run(d, split(stream, cuts))) == sent


@pytest.mark.parametrize("name", FRAMINGS)
@PROPERTY
@given(data=st.data())
def test_every_single_bit_corruption_is_rejected(name: str, data: st.DataObject) -> None:
    d = dialect(name)
    original, follower = data.draw(values(name)), data.draw(values(name))
    frame = bytearray(encode(d, original))
    bit = data.draw(st.integers(0, 8 * len(frame) - 1))
    frame[bit // 8] ^= 0x80 >> (bit % 8)
    out = run(d, [bytes(frame) + encode(d, follower)])
    got = decoded(out)
    assert got[-1:] == [follower], "a corrupted frame cost the frame after it"
    # A flip the framing ignores (hex digit case) may decode to the same fields;
    # a corrupted frame must never decode to other fields (a checksum collision).
    assert all(fields == original for fields in got[:-1]), got
    if not got[:-1]:
        reasons = {o.code for o in out if isinstance(o, Unparsed)}
        assert reasons and reasons <= REJECTIONS, reasons


@pytest.mark.parametrize("name", FRAMINGS)
@PROPERTY
@given(data=st.data(), cuts=st.lists(st.integers(0, 4000), max_size=10))
def test_noise_between_frames_never_costs_a_frame(
    name: str, data: st.DataObject, cuts: list[int]
) -> None:
    d = dialect(name)
    sent = data.draw(st.lists(values(name), min_size=1, max_size=5))
    noise = data.draw(
        st.lists(st.binary(max_size=80), min_size=len(sent) + 1, max_size=len(sent) + 1)
    )
    stream = noise[0] + b"".join(
        encode(d, fields) + gap for fields, gap in zip(sent, noise[1:], strict=True)
    )
    got = iter(decoded(run(d, split(stream, cuts))))
    # Every frame sent arrives, in order (noise may add frames of its own only
    # by a checksum collision, which a 64-byte sample makes vanishingly rare).
    assert all(fields in got for fields in sent)


# -- Wiegand-34: parity over bit ranges ------------------------------------------------


def wiegand34(facility: int, card: int) -> bytes:
    rule = load_dialect("wiegand34-hex").rules[0]
    body = write_body(rule.layout, rule.checks, {"facility": facility, "card": f"{card:05d}"}, 5)
    return as_hex_digits(rule.layout, rule.checks, body) + b"\r"


@PROPERTY
@given(facility=st.integers(0, 0xFFFF), card=st.integers(0, 0xFFFF), bit=st.integers(0, 33))
def test_wiegand34_every_flipped_card_bit_fails_its_parity(
    facility: int, card: int, bit: int
) -> None:
    engine = DialectEngine(load_dialect("wiegand34-hex"))
    good = wiegand34(facility, card)
    fields = decoded(engine.feed(good, 0.0))
    assert fields == [{"tag": good[:9].decode(), "facility": facility, "card": f"{card:05d}"}]
    flipped = int(good[:9], 16) ^ (1 << bit)
    out = engine.feed(f"{flipped:09X}\r".encode(), 0.0)
    assert decoded(out) == []
    assert [o.code for o in out if isinstance(o, Unparsed)] == ["bad_parity"]


# -- built-in binary dialects, through serial-encode's encoder ----------------------------


@PROPERTY
@given(
    address=st.integers(0, 255),
    zones=st.sets(st.integers(1, 16)).map(sorted),
    intensity=st.integers(0, 255),
    clock=st.integers(0, 2**32 - 1),
)
def test_hdlc_panel_alarms_round_trip(
    address: int, zones: list[int], intensity: int, clock: int
) -> None:
    values = [
        f"address={address}",
        f"zones={','.join(map(str, zones))}",
        f"intensity={intensity}",
        f"device_time={clock}",
    ]
    frame = encode_frame("hdlc-panel", "", "0110", 0, values)
    assert decoded(run(load_dialect("hdlc-panel"), [frame])) == [
        {
            "address": address,
            "zones": zones,
            "intensity": intensity,
            "class": "standard",
            "device_time": datetime.fromtimestamp(clock, UTC).isoformat(),
        }
    ]


@PROPERTY
@given(
    bag=st.integers(0, 99_999_999),
    threat=st.sampled_from(["explosive", "weapon", "liquid", "dense object"]),
    operator=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=4),
    temperature=st.integers(-0x8000, 0x7FFF),
)
def test_xray_binary_alerts_round_trip(
    bag: int, threat: str, operator: str, temperature: int
) -> None:
    values = [
        f"bag={bag}",
        f"threat={threat}",
        f"operator={operator}",
        f"tunnel_temperature={temperature}",
    ]
    frame = encode_frame("xray-binary", "", "0001", 0, values)
    assert decoded(run(load_dialect("xray-binary"), [frame])) == [
        {
            "bag": f"{bag:08d}",
            "threat": threat,
            "operator": operator,
            "tunnel_temperature": temperature,
            "class": "automatic",
        }
    ]
