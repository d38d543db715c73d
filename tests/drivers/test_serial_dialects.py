"""Every built-in dialect with valid, split, corrupted and checksum-failing frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.testing.serial_frames import messages, multizone, rdm6300
from drivers.serial_common.checksums import CRC_ALIASES, CRC_CATALOGUE, find_checksum
from drivers.serial_common.dialect import builtin_dialects, load_dialect
from drivers.serial_common.engine import DialectEngine, Reply
from drivers.serial_common.framing import Unparsed


def engine(name: str) -> DialectEngine:
    return DialectEngine(load_dialect(name))


def unparsed(outputs: list[object]) -> list[str]:
    return [o.code for o in outputs if isinstance(o, Unparsed)]


# Published check values for b"123456789" (CRC RevEng catalogue), under the
# catalogue's names, its aliases and the short names older dialects use.
@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("xor", 0x31),
        ("sum8", 0xDD),
        ("sum16", 0x01DD),
        ("lrc", 0x23),
        ("crc8", 0xF4),
        ("crc8-maxim", 0xA1),
        ("CRC-8/CDMA2000", 0xDA),
        ("crc16-modbus", 0x4B37),
        ("CRC-16/MODBUS", 0x4B37),
        ("crc16-arc", 0xBB3D),
        ("crc16-ccitt-false", 0x29B1),
        ("CRC-16/CCITT-FALSE", 0x29B1),
        ("CRC-16/IBM-3740", 0x29B1),
        ("crc16-xmodem", 0x31C3),
        ("CRC-16/XMODEM", 0x31C3),
        ("crc16-kermit", 0x2189),
        ("CRC-16/KERMIT", 0x2189),
        ("crc16-x25", 0x906E),
        ("CRC-16/X-25", 0x906E),
        ("CRC-16/UMTS", 0xFEE8),
        ("CRC-16/BUYPASS", 0xFEE8),
        ("CRC-16/MAXIM-DOW", 0x44C2),
        ("CRC-16/USB", 0xB4C8),
        ("CRC-16/GENIBUS", 0xD64E),
        ("CRC-16/MCRF4XX", 0x6F91),
        ("CRC-16/AUG-CCITT", 0xE5CC),
        ("CRC-16/DNP", 0xEA82),
        ("CRC-16/EN-13757", 0xC2B7),
        ("CRC-16/CDMA2000", 0x4C06),
        ("CRC-32", 0xCBF43926),
        ("crc_16 modbus", 0x4B37),
    ],
)
def test_checksum_check_values(name: str, check: int) -> None:
    algorithm = find_checksum(name)
    assert algorithm is not None
    assert algorithm.compute(b"123456789") == check


def test_every_catalogue_name_is_known() -> None:
    for name in (*CRC_CATALOGUE, *CRC_ALIASES):
        assert find_checksum(name) is not None, name


def test_all_builtins_load_and_are_documented() -> None:
    names = builtin_dialects()
    assert {"text-gate", "multizone-gate", "polled-gate", "xray-alert", "rdm6300"} <= set(names)
    readme = (Path(__file__).parents[2] / "drivers/serial_common/README.md").read_text()
    for name in names:
        assert load_dialect(name).rules
        assert f"`{name}`" in readme, f"dialect {name} is not documented with example bytes"


@pytest.mark.parametrize(
    "name", ["nmea-gate", "hdlc-panel", "xray-binary", "wiegand34-hex", "polled-zones"]
)
def test_cookbook_shows_each_worked_dialect_as_shipped(name: str) -> None:
    folder = Path(__file__).parents[2] / "drivers/serial_common"
    text = (folder / "dialects" / f"{name}.toml").read_text()
    assert f"```toml\n{text}```" in (folder / "README.md").read_text()


# -- RDM6300: the published fob frames ------------------------------------------------


PUBLISHED_FOBS = [
    ("01001293D858", "01001293D8", "0001217496"),
    ("0100CDA4EC84", "0100CDA4EC", "0013477100"),
    ("2900DEB30A4E", "2900DEB30A", "0014594826"),
]


@pytest.mark.parametrize(("payload", "tag", "printed"), PUBLISHED_FOBS)
def test_rdm6300_published_frames(payload: str, tag: str, printed: str) -> None:
    out = engine("rdm6300").feed(b"\x02" + payload.encode() + b"\x03", 0.0)
    assert messages(out) == [("rfid.read", {"tag": tag, "version": tag[:2], "printed": printed})]
    assert rdm6300(bytes.fromhex(tag)) == b"\x02" + payload.encode() + b"\x03"


def test_rdm6300_every_split_point_gives_the_same_reads() -> None:
    stream = b"".join(rdm6300(bytes.fromhex(t)) for _, t, _ in PUBLISHED_FOBS)
    whole = messages(engine("rdm6300").feed(stream, 0.0))
    assert len(whole) == 3
    for cut in range(1, len(stream)):
        e = engine("rdm6300")
        assert messages(e.feed(stream[:cut], 0.0) + e.feed(stream[cut:], 0.01)) == whole, cut
        assert e.buffered == 0


def test_rdm6300_bad_checksum_and_corruption() -> None:
    e = engine("rdm6300")
    good = rdm6300(bytes.fromhex("0100CDA4EC"))
    bad_sum = good[:-3] + b"85\x03"
    flipped = good[:3] + b"F" + good[4:]  # a data digit changed in flight
    not_hex = good[:3] + b"Z" + good[4:]
    out = e.feed(b"\x00\xff" + bad_sum + flipped + not_hex + good, 0.0)
    assert messages(out) == [
        ("rfid.read", {"tag": "0100CDA4EC", "version": "01", "printed": "0013477100"})
    ]
    assert unparsed(out) == ["garbage", "bad_checksum", "bad_checksum", "bad_checksum"]
    assert e.stats["bad_checksum"] == 3


def test_rdm6300_frame_cut_by_a_new_frame_is_reported_not_glued() -> None:
    good = rdm6300(bytes.fromhex("2900DEB30A"))
    out = engine("rdm6300").feed(good[:6] + good, 0.0)
    assert unparsed(out) == ["incomplete"]
    assert len(messages(out)) == 1


# -- text gate ------------------------------------------------------------------------


def test_text_gate_lines() -> None:
    out = engine("text-gate").feed(
        b"ALARM ZONE 3,4 LEVEL 85\r\nALM Z=7 I=12\nALARM\rWARBLE\r\nTAMPER door\r\n"
        b"PASS IN\r\nPASS OUT\r\nREADY\r\n",
        0.0,
    )
    assert messages(out) == [
        ("gate.alarm", {"zones": [3, 4], "intensity": 85, "class": "standard"}),
        ("gate.alarm", {"zones": [7], "intensity": 12, "class": "standard"}),
        ("gate.alarm", {"class": "standard"}),
        ("gate.alarm", {"class": "warble"}),
        ("gate.tamper", {"detail": "door"}),
        ("gate.transit", {"in": 1}),
        ("gate.transit", {"out": 1}),
    ]
    assert unparsed(out) == []


def test_text_gate_garbled_by_wrong_baud_rate_is_unparsed() -> None:
    garbled = bytes([0xE6, 0x98, 0x1E, 0xF8, 0x80, 0x0D, 0x0A, 0x66, 0xFE, 0x86, 0x0A])
    e = engine("text-gate")
    out = e.feed(garbled, 0.0)
    assert messages(out) == []
    assert unparsed(out) == ["no_rule", "no_rule"]


def test_text_gate_line_split_anywhere() -> None:
    stream = b"ALARM Z3 I85\r\nTAMPER\r\n"
    whole = messages(engine("text-gate").feed(stream, 0.0))
    for cut in range(1, len(stream)):
        e = engine("text-gate")
        assert messages(e.feed(stream[:cut], 0.0) + e.feed(stream[cut:], 0.0)) == whole


# -- multizone gate: 7-bit, message numbers, checksum after ETX, counters, reset -------


def test_multizone_gate_alarm_duplicates_counters_and_reset() -> None:
    e = engine("multizone-gate")
    stream = (
        multizone(b"M0042 AL Z03,04,17 I072")
        + multizone(b"M0042 AL Z03,04,17 I072")  # repeated message number: a duplicate
        + multizone(b"M0043 TR IN000100 OUT000090")  # baseline
        + multizone(b"M0044 TR IN000105 OUT000091")
        + multizone(b"M0045 RS")
        + multizone(b"M0046 TR IN000002 OUT000000")
    )
    out = e.feed(stream, 0.0)
    assert messages(out) == [
        (
            "gate.alarm",
            {"zones": [3, 4, 17], "intensity": 72, "class": "standard", "msgno": "0042"},
        ),
        ("gate.transit", {"in": 5, "out": 1, "msgno": "0044", "totals": {"in": 105, "out": 91}}),
        ("device.reset", {"reason": "the gate reports a restart", "msgno": "0045"}),
        ("gate.transit", {"in": 2, "out": 0, "msgno": "0046", "totals": {"in": 2, "out": 0}}),
    ]
    assert e.stats["duplicate"] == 1
    replies = [o.data for o in out if isinstance(o, Reply)]
    assert replies == [multizone(b"RA")]


def test_multizone_checksum_failure_and_split() -> None:
    good = multizone(b"M0001 TP")
    bad = good[:-2] + b"00"
    out = engine("multizone-gate").feed(bad + good, 0.0)
    assert unparsed(out) == ["bad_checksum"]
    assert messages(out) == [("gate.tamper", {"msgno": "0001"})]
    for cut in range(1, len(good)):
        e = engine("multizone-gate")
        assert messages(e.feed(good[:cut], 0.0) + e.feed(good[cut:], 0.0)) == [
            ("gate.tamper", {"msgno": "0001"})
        ]


def test_multizone_message_numbers_restart_after_a_reset() -> None:
    e = engine("multizone-gate")
    out = e.feed(multizone(b"M0001 TP") + multizone(b"M0002 RS") + multizone(b"M0001 TP"), 0.0)
    assert [k for k, _ in messages(out)] == ["gate.tamper", "device.reset", "gate.tamper"]


# -- polled gate: counters diffed into transit and alarm events ------------------------


def test_polled_gate_counters() -> None:
    e = engine("polled-gate")
    assert e.poll_request() == b"AC\r"
    out = e.feed(b"AC\r\nP=001234 TA=000012 TR=0.97 MA=000003\r\n", 0.0)
    assert messages(out) == []  # echo ignored, first answer is the baseline
    out = e.feed(b"P=001240 TA=000014 TR=0.98 MA=000003\r\n", 1.0)
    assert messages(out) == [
        (
            "gate.transit",
            {
                "passages": 6,
                "alarms": 2,
                "alarm_ratio": 0.98,
                "mass_alarms": 3,
                "totals": {"passages": 1240, "alarms": 14},
            },
        ),
        ("gate.alarm", {"count": 2, "counter": "alarms"}),
    ]
    assert messages(e.feed(b"P=001240 TA=000014\r\n", 2.0)) == []  # nothing new: nothing emitted
    out = e.feed(b"P=000003 TA=000001\r\n", 3.0)  # the gate rebooted
    kinds = [k for k, _ in messages(out)]
    assert kinds == ["device.reset", "gate.transit", "gate.alarm"]
    assert messages(out)[1][1]["passages"] == 3


# -- X-ray -----------------------------------------------------------------------------


def test_xray_alert_lines() -> None:
    out = engine("xray-alert").feed(
        b"ALARM OPERATOR 17 BAG 000231\r\nTDR THREAT EXPLOSIVE BAG 000232\r\n"
        b"TAMPER COVER\r\nINTERLOCK OPEN\r\nTIP MISS OP 4\r\nSTANDBY\r\nXYZZY\r\n",
        0.0,
    )
    assert messages(out) == [
        ("xray.alert", {"operator": "17", "bag": "000231", "class": "operator"}),
        ("xray.alert", {"threat": "EXPLOSIVE", "bag": "000232", "class": "automatic"}),
        ("xray.tamper", {"source": "TAMPER", "detail": "COVER"}),
        ("xray.tamper", {"source": "INTERLOCK", "detail": "OPEN"}),
        ("xray.tip", {"result": "MISS", "operator": "4"}),
    ]
    assert unparsed(out) == ["no_rule"]


def test_wiegand26_hex() -> None:
    out = engine("wiegand26-hex").feed(b"CDA4EC\r", 0.0)
    assert messages(out) == [("rfid.read", {"tag": "CDA4EC", "printed": "0013477100"})]


# -- dialect files: errors are located -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[[rules]]\nmatch = '('\nkind = 'a.b'\n", "rules[0].match: invalid regular expression"),
        ("[[rules]]\nmatch = 'x'\nkind = 'Not A Kind'\n", "rules[0].kind"),
        (
            "[[rules]]\nmatch = 'x'\nkind = 'a.b'\nfields = { y = 'int' }\n",
            "rules[0].fields.y: the regex has no group",
        ),
        (
            "[[rules]]\nmatch = '(?P<y>x)'\nkind = 'a.b'\nfields = { y = 'octal' }\n",
            "rules[0].fields.y: unknown conversion",
        ),
        (
            "[framing]\nchecksum = 'md5'\n[[rules]]\nmatch = 'x'\nkind = 'a.b'\n",
            "framing.checksum: unknown checksum",
        ),
        (
            "[framing]\ntype = 'fixed'\nlength = 2\nsync = 'AA55'\n[[rules]]\nmatch = 'x'\nkind = 'a.b'\n",
            "framing.length",
        ),
        (
            "[serial]\nbaudrate = 'fast'\n[[rules]]\nmatch = 'x'\nkind = 'a.b'\n",
            "serial.baudrate: expected an integer",
        ),
        ("name = 'x'\n", "rules: a dialect needs at least one"),
        ("[[rules]]\nmatch = 'x'\nkind = 'a.b'\nreply = '\u20ac'\n", "rules[0].reply"),
        ("[[rules]\n", "not valid TOML"),
    ],
)
def test_dialect_file_errors_name_file_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_dialect(str(path))
    assert str(path) in str(err.value)
    assert where in str(err.value)


def test_unknown_dialect_lists_builtins() -> None:
    with pytest.raises(ConfigError, match=r"built-in: .*rdm6300"):
        load_dialect("no-such-gate")
