"""SIA DC-09 frames byte by byte, encryption, Contact ID, sender against the minimal receiver.

Worked examples. The DC-09 standard text is not public; its CRC is CRC-16/ARC,
whose catalogued check value is crc("123456789") = 0xBB3D. The frames below were
captured from real panels (PROSEC and Hikvision communicators, and an encrypted
NULL from an Ajax hub with the 16-byte key "AAAAAAAAAAAAAAAA") and published in
open-source DC-09 receivers; each carries the panel's own CRC and length, so
they check our CRC, length, layout and AES handling against independent senders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.testing.broker import free_port
from central.config import Dc09Config
from central.dc09 import (
    ContactId,
    Dc09Error,
    Dc09Rejected,
    Dc09Sender,
    Dc09Unavailable,
    Frame,
    NullSupervisor,
    TcpTransport,
    UdpTransport,
    crc16,
    decode,
    encode,
    nak,
    parse_key,
)
from central.dc09_receiver import Dc09Receiver

CAPTURED = [
    b'\nB0970029"NULL"0000L000#0809[]_21:00:01,02-20-2024\r',
    b'\nF68B003B"ADM-CID"0028L0#9757[#9757|1602 00 000]_20:59:45,02-20-2024\r',
    b'\nB4330036"SIA-DCS"0442L000#36214[36214|NRP]_00:00:00,02-21-2024\r',
    b'\n3F60003C"SIA-DCS"0001L0#51449[#51449|Nri0000/LR]_21:26:19,12-20-2023\r',
    b'\n99820040"ADM-CID"1937R15L1#21401[#21401|1602 00 000]_20:59:59,02-20-2024\r',
    b'\n37070047"SIA-DCS"0038R0L0#10303117[#10303117|Nri0001/BH005]_13:44:48,08-17-2022\r',
]
ENCRYPTED_NULL = (
    b'\n76D80055"*NULL"0000R0L0#AAAB[B4BC8B40D0E6D959D6BEA78E88CC0B2155741A3C'
    b"44FBB96D476A3E557CAD64D9\r"
)
AJAX_KEY = b"AAAAAAAAAAAAAAAA"
KEYS = {
    128: parse_key("00112233445566778899AABBCCDDEEFF"),
    192: parse_key("000102030405060708090A0B0C0D0E0F1011121314151617"),
    256: parse_key("603DEB1015CA71BE2B73AEF0857D77811F352C073B6108D72D9810A30914DFF4"),
}


def test_crc_is_crc16_arc_check_value() -> None:
    assert crc16(b"123456789") == 0xBB3D
    assert crc16(b"") == 0


@pytest.mark.parametrize("raw", CAPTURED, ids=lambda r: r[9:20].decode())
def test_captured_frames_decode_and_re_encode_byte_for_byte(raw: bytes) -> None:
    frame = decode(raw)
    assert encode(frame) == raw
    body = raw[9:-1]
    assert raw[1:5] == f"{crc16(body):04X}".encode()
    assert int(raw[5:9], 16) == len(body)


def test_captured_contact_id_fields() -> None:
    frame = decode(CAPTURED[4])
    assert (frame.id, frame.seq, frame.receiver, frame.line, frame.account) == (
        "ADM-CID",
        1937,
        "15",
        "1",
        "21401",
    )
    assert frame.timestamp == datetime(2024, 2, 20, 20, 59, 59, tzinfo=UTC)
    assert ContactId.parse(frame.data) == ContactId(602, zone=0, partition=0, qualifier=1)


def test_encrypted_null_from_a_real_panel_decrypts_and_re_encodes() -> None:
    frame = decode(ENCRYPTED_NULL, lambda account: AJAX_KEY if account == "AAAB" else None)
    assert frame.encrypted and frame.id == "NULL" and frame.account == "AAAB" and frame.data == ""
    assert frame.timestamp == datetime(2020, 7, 5, 18, 24, 52, tzinfo=UTC)
    # Its plaintext was "ppppppppppp]_18:24:52,07-05-2020": the same pad gives the same bytes.
    assert encode(frame, AJAX_KEY, pad="p" * 11) == ENCRYPTED_NULL


def test_building_a_frame_matches_the_captured_layout() -> None:
    frame = Frame(
        "ADM-CID",
        28,
        account="9757",
        data=ContactId(602).data("9757"),
        line="0",
        timestamp=datetime(2024, 2, 20, 20, 59, 45, tzinfo=UTC),
    )
    assert encode(frame) == CAPTURED[1]


@pytest.mark.parametrize("bits", sorted(KEYS))
def test_encryption_round_trip(bits: int) -> None:
    key = KEYS[bits]
    frame = Frame(
        "ADM-CID",
        17,
        account="1234",
        data=ContactId(120, zone=5, partition=1).data("1234"),
        timestamp=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        encrypted=True,
    )
    raw = encode(frame, key)
    assert raw.startswith(b"\n") and raw.endswith(b"\r") and b'"*ADM-CID"0017L0#1234[' in raw
    assert b"1120" not in raw  # the report itself travels encrypted
    assert decode(raw, lambda account: key) == frame
    with pytest.raises(Dc09Error):
        decode(raw, lambda account: KEYS[128] if bits != 128 else KEYS[256][:16][::-1])


def test_decode_errors_name_what_is_wrong() -> None:
    good = CAPTURED[1]
    with pytest.raises(Dc09Error, match="CRC mismatch"):
        decode(good.replace(b"9757|1602", b"9757|1120"))
    with pytest.raises(Dc09Error, match="length field"):
        decode(good.replace(b"003B", b"003C"))
    with pytest.raises(Dc09Error, match="without a key"):
        decode(ENCRYPTED_NULL)
    body = b'"ADM-CID"XX28L0#9757[]'
    with pytest.raises(Dc09Error, match="bad header"):
        decode(b"\n" + f"{crc16(body):04X}{len(body):04X}".encode() + body + b"\r")


def test_contact_id_data_and_limits() -> None:
    assert ContactId(121, zone=12, partition=3).data("ABC1") == "#ABC1|1121 03 012"
    assert ContactId(381, qualifier=3).data("1234") == "#1234|3381 00 000"
    with pytest.raises(ValueError, match="out of range"):
        ContactId(1200)
    with pytest.raises(ValueError, match="qualifier"):
        ContactId(120, qualifier=2)


def test_nak_layout_carries_the_receiver_time() -> None:
    raw = encode(nak(datetime(2024, 2, 20, 21, 0, 1, tzinfo=UTC)))
    assert raw[9:-1] == b'"NAK"0000R0L0A0[]_21:00:01,02-20-2024'
    assert decode(raw).timestamp == datetime(2024, 2, 20, 21, 0, 1, tzinfo=UTC)


@pytest.fixture
def receiver() -> Dc09Receiver:
    with Dc09Receiver({"1234": None, "BEEF": KEYS[256]}) as r:
        yield r


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_sender_gets_ack_over_tcp_and_udp(receiver: Dc09Receiver, transport: str) -> None:
    link = TcpTransport if transport == "tcp" else UdpTransport
    sender = Dc09Sender(link(receiver.host, receiver.port), "1234", timeout=2)
    ack = sender.send_contact_id(ContactId(120, zone=7, partition=1))
    assert ack.id == "ACK" and ack.seq == 1 and ack.account == "1234"
    assert sender.send_null().seq == 2
    frames = receiver.wait_for(2)
    assert frames[0].frame is not None and frames[0].frame.data == "#1234|1120 01 007"
    assert (
        frames[0].transport == transport
        and frames[1].frame is not None
        and frames[1].frame.id == "NULL"
    )
    sender.close()


def test_encrypted_message_gets_an_encrypted_ack(receiver: Dc09Receiver) -> None:
    sender = Dc09Sender(
        TcpTransport(receiver.host, receiver.port), "BEEF", key=KEYS[256], timeout=2
    )
    ack = sender.send_contact_id(ContactId(137, zone=2))
    assert ack.encrypted and ack.timestamp is not None
    received = receiver.wait_for(1)[0]
    assert (
        received.frame is not None
        and received.frame.encrypted
        and received.frame.data == "#BEEF|1137 00 002"
    )
    sender.close()


def test_nak_with_receiver_time_makes_the_sender_correct_its_clock(receiver: Dc09Receiver) -> None:
    receiver.clock_offset = 3600.0  # the receiving centre's clock is an hour ahead of ours
    sender = Dc09Sender(UdpTransport(receiver.host, receiver.port), "1234", timeout=2)
    ack = sender.send_contact_id(ContactId(120))
    assert ack.id == "ACK"
    assert [r.reply for r in receiver.received] == ["NAK", "ACK"]
    assert "outside the window" in receiver.received[0].error
    assert sender.stats.naks == 1 and abs(sender.stats.clock_offset - 3600) <= 1
    accepted = receiver.received[1].frame
    assert accepted is not None and accepted.timestamp is not None
    assert abs(accepted.timestamp.timestamp() - (time.time() + 3600)) < 5
    sender.send_null()  # the learnt offset is kept: no second NAK
    assert sender.stats.naks == 1


def test_retry_after_timeout_then_unavailable(receiver: Dc09Receiver) -> None:
    sender = Dc09Sender(TcpTransport(receiver.host, receiver.port), "1234", timeout=0.3, attempts=3)
    receiver.ignore_next = 1
    assert sender.send_contact_id(ContactId(602)).id == "ACK"
    assert sender.stats.timeouts == 1
    receiver.ignore_next = 3
    with pytest.raises(Dc09Unavailable, match="not acknowledged after 3 attempts"):
        sender.send_contact_id(ContactId(602))
    sender.close()


def test_unknown_account_gets_duh(receiver: Dc09Receiver) -> None:
    sender = Dc09Sender(TcpTransport(receiver.host, receiver.port), "9999", timeout=1)
    with pytest.raises(Dc09Rejected, match="DUH"):
        sender.send_contact_id(ContactId(120))
    assert receiver.received[-1].reply == "DUH" and "unknown account" in receiver.received[-1].error
    sender.close()


def test_sequence_wraps_from_9999_to_0001(receiver: Dc09Receiver) -> None:
    sender = Dc09Sender(UdpTransport(receiver.host, receiver.port), "1234", timeout=1)
    sender._seq = 9998
    assert [sender.send_null().seq for _ in range(3)] == [9999, 1, 2]


def test_null_messages_supervise_an_idle_link(receiver: Dc09Receiver) -> None:
    sender = Dc09Sender(UdpTransport(receiver.host, receiver.port), "1234", timeout=1)
    results: list[bool] = []
    supervisor = NullSupervisor(sender, 0.2, lambda ok, detail: results.append(ok))
    supervisor.start()
    try:
        frames = receiver.wait_for(3, timeout=5)
    finally:
        supervisor.stop()
    assert all(r.frame is not None and r.frame.id == "NULL" for r in frames)
    assert results[:3] == [True, True, True]


# ------------------------------------------------- against pysiaalarm (Home Assistant's library)


def _pysiaalarm_sender(port: int, key: bytes | None = None, **options: Any) -> Dc09Sender:
    defaults = Dc09Config()
    return Dc09Sender(
        TcpTransport("127.0.0.1", port),
        "1234",
        key=key,
        receiver=options.get("receiver", defaults.receiver) or None,
        line=defaults.line,
        timeout=2.0,
        attempts=2,
    )


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_the_default_frame_is_acked_by_pysiaalarm(encrypted: bool) -> None:
    """Home Assistant's SIA integration answers with the frame's receiver; without one it
    wrote "None" into its ACK, which no sender can read, so the default names receiver 0.
    Its AES key is the ASCII text itself; Wardpost's key_file holds the same bytes in hex."""
    from pysiaalarm import SIAAccount, SIAClient, SIAEvent

    ascii_key = "ABCDEFGHIJKLMNOP"  # as typed into Home Assistant
    hex_key = ascii_key.encode("ascii").hex().upper()  # as written in Wardpost's key_file
    port = free_port()
    received: list[SIAEvent] = []
    account = SIAAccount("1234", ascii_key if encrypted else None)
    with SIAClient("127.0.0.1", port, [account], received.append):
        sender = _pysiaalarm_sender(port, parse_key(hex_key) if encrypted else None)
        try:
            ack = wait_for_listener(lambda: sender.send_contact_id(ContactId(120, zone=3)))
        finally:
            sender.close()
        assert ack.id == "ACK" and ack.receiver == "0"
        assert [(e.code, e.ri, e.account) for e in received] == [("PA", "3", "1234")]


def test_no_receiver_field_is_not_acked_readably_by_pysiaalarm() -> None:
    """What the old default (receiver = "") did: every attempt fails, the event is re-sent."""
    from pysiaalarm import SIAAccount, SIAClient

    port = free_port()
    with SIAClient("127.0.0.1", port, [SIAAccount("1234")], lambda event: None):
        sender = _pysiaalarm_sender(port, receiver="")
        try:
            with pytest.raises(Dc09Unavailable, match="unreadable reply"):
                wait_for_listener(lambda: sender.send_contact_id(ContactId(120, zone=3)))
        finally:
            sender.close()


def wait_for_listener(send: Callable[[], Frame]) -> Frame:
    """pysiaalarm listens from its own thread: retry while the port still refuses connections."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return send()
        except Dc09Unavailable as exc:
            if "refused" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
