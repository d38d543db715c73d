"""Each message judged alone: poison is quarantined before the store; seq restarts; clean stops.

Every test runs on SQLite and PostgreSQL: a value one engine accepts and the other refuses is
exactly what slipped through before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from central.config import ReceiverConfig
from central.intake import MAX_DEPTH, MAX_MESSAGE_BYTES, Inbound
from central.store import Store
from tests.central.test_receiver import REPO
from tests.central.test_store import (
    T0,
    cycle,
    event_msg,
    heartbeat_msg,
    intake_for,
    kinds,
    status_msg,
)

GOOD_STATUS = {"state": "online", "boot": 1, "connection": 1, "version": "1", "drivers": []}


def event_text(**fields: object) -> str:
    """An event of device d1 with ``fields`` replaced, as JSON text (not yet bytes)."""
    body = json.loads(event_msg(seq=7).payload)
    body.update(fields)
    return json.dumps(body)


def poison() -> list[tuple[str, str, bytes, str]]:
    """(case, topic suffix, payload, expected reason) of every kind of poison."""
    event = "events/panic.pressed"
    deep = "[" * 100_000 + "]" * 100_000
    return [
        ("seq 2**64", event, event_text(seq=2**64).encode(), "outside 64 bits"),
        (
            "boot 2**70",
            "status",
            json.dumps({**GOOD_STATUS, "boot": 2**70}).encode(),
            "outside 64 bits",
        ),
        (
            "deep nesting",
            event,
            event_text(payload={"x": "PLACE"}).replace('"PLACE"', deep).encode(),
            "nests deeper",
        ),
        (
            "nesting just past the limit",
            "heartbeat",
            json.dumps({"uptime": 1, "drivers": {}, "x": "PLACE"})
            .replace('"PLACE"', "[" * MAX_DEPTH + "]" * MAX_DEPTH)
            .encode(),
            "nests deeper",
        ),
        ("UTF-16", event, event_text().encode("utf-16"), "not UTF-8"),
        (
            "lone surrogate",
            event,
            event_text().replace('"btn"', '"\\ud800"').encode(),
            "lone surrogate",
        ),
        (
            "5,000-digit integer",
            event,
            event_text(seq=7).replace('"seq": 7', '"seq": ' + "9" * 5000).encode(),
            "outside 64 bits",
        ),
        (
            "5,000-digit number",
            "heartbeat",
            ('{"uptime": 1' + "0" * 5000 + '.5, "drivers": {}}').encode(),
            "out of range",
        ),
        ("NaN", "heartbeat", b'{"uptime": NaN, "drivers": {}}', "NaN is not JSON"),
        ("not JSON", event, b"\x00\xff garbage", "not UTF-8"),
        ("not JSON at all", event, b"{{{{", "not JSON"),
        ("oversize", event, event_text(payload={"x": "y" * MAX_MESSAGE_BYTES}).encode(), "limit"),
        (
            "NUL in a column",
            "status",
            json.dumps({**GOOD_STATUS, "version": "1\x00"}).encode(),
            None,
        ),
        ("NUL in the source", event, event_text(source="b\x00").encode(), "NUL"),
    ]


@pytest.mark.parametrize(
    ("case", "suffix", "payload", "reason"), poison(), ids=[p[0] for p in poison()]
)
def test_poison_is_quarantined_and_good_messages_behind_it_are_stored(
    make_config: Callable[..., ReceiverConfig],
    store: Store,
    case: str,
    suffix: str,
    payload: bytes,
    reason: str | None,
) -> None:
    intake = intake_for(make_config(), store)
    good = event_msg(device="d2", seq=1)
    out = cycle(intake, store, [Inbound(f"wardpost/s1/d1/{suffix}", payload, T0), good], T0)
    assert out.receipts == {("s1", "d2"): [json.loads(good.payload)["id"]]}
    assert store.count_events(origin="device") == 1
    if reason is None:  # kept, but the value the store cannot hold is not taken
        assert store.devices()[0].version is None
        return
    (kept,) = store.quarantined()
    assert (kept.topic, kept.device) == (f"wardpost/s1/d1/{suffix}", "d1")
    assert reason in kept.reason, kept.reason
    assert kept.raw == payload[: len(kept.raw)] and len(kept.raw) <= 16 * 1024
    assert "centre.quarantined" in kinds(store)


def test_largest_accepted_values_are_stored(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    biggest = 2**63 - 1
    text = event_text(
        seq=biggest - 1,
        payload={"n": -(2**63), "deep": json.loads("[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2))},
    )
    out = cycle(
        intake,
        store,
        [
            Inbound("wardpost/s1/d1/events/panic.pressed", text.encode(), T0),
            Inbound(
                "wardpost/s1/d1/status", json.dumps({**GOOD_STATUS, "boot": biggest}).encode(), T0
            ),
        ],
        T0,
    )
    assert out.rejected == 0 and store.devices()[0].boot == biggest
    assert store.events(kind="panic.pressed")[0].seq == biggest - 1


def test_a_device_whose_numbering_restarts_is_reported_without_false_gaps(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"gap_grace": 0}), store)
    cycle(
        intake,
        store,
        [event_msg(seq=s, priority="normal", kind="gate.transit") for s in (1, 2, 3)],
        T0,
    )
    # The same events again (a re-send after a crash) are re-sends, not a restart.
    assert kinds(store) == []
    # A new SD card: seq 1 again, with new event ids.
    cycle(
        intake,
        store,
        [event_msg(seq=s, priority="normal", kind="gate.transit") for s in (1, 2)],
        T0 + 1,
    )
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0 + 2, supervise=True)
    assert kinds(store) == ["sequence.restarted"]
    (restart,) = store.events(kind="sequence.restarted")
    assert restart.payload["previous_seq"] == 3 and restart.payload["seq"] == 1
    device = store.devices()[0]
    assert (device.seq_first, device.seq_upto) == (1, 2)
    # A real loss in the new numbering is still reported.
    cycle(intake, store, [event_msg(seq=4, priority="normal", kind="gate.transit")], T0 + 3)
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0 + 4, supervise=True)
    (gap,) = store.events(kind="sequence.gap")
    assert (gap.payload["first"], gap.payload["last"]) == (3, 3)


def test_a_restored_image_reports_its_lost_holes_and_restarts_on_a_lower_boot(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"gap_grace": 3600}), store)
    cycle(intake, store, [status_msg("online", 5, 1)], T0)
    cycle(
        intake,
        store,
        [event_msg(seq=s, priority="normal", kind="gate.transit") for s in (10, 11, 13)],
        T0,
    )
    # The device itself (not a retained copy) says online with an older boot counter.
    restored = status_msg("online", 3, 1)
    live = Inbound(restored.topic, restored.payload, T0, retain=False)
    cycle(intake, store, [live], T0 + 1)
    assert kinds(store) == ["sequence.gap", "sequence.restarted"]
    assert store.events(kind="sequence.gap")[0].payload["first"] == 12
    assert (
        "boot counter went back from 5 to 3"
        in store.events(kind="sequence.restarted")[0].payload["reason"]
    )
    device = store.devices()[0]
    assert (device.state, device.boot, device.seq_upto) == ("online", 3, None)
    # A stale retained status with the old counters is still just ignored.
    cycle(intake, store, [status_msg("offline", 3, 0)], T0 + 2)
    assert store.devices()[0].state == "online"


def test_a_device_that_stops_cleanly_is_not_lost_but_a_will_or_silence_is(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    for device in ("clean", "will", "silent"):
        cycle(
            intake,
            store,
            [status_msg("online", 1, 1, device=device), heartbeat_msg(interval=1, device=device)],
            T0,
        )
    cycle(
        intake,
        store,
        [status_msg("stopped", 1, 1, device="clean"), status_msg("offline", 1, 1, device="will")],
        T0 + 0.5,
    )
    cycle(intake, store, [], T0 + 60, supervise=True)
    lost = sorted(e.device for e in store.events(kind="device.lost"))
    assert lost == ["silent", "will"]
    assert {a.device for a in store.alarms()} == {"silent", "will"}


def test_every_event_the_centre_raises_matches_the_contract(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    from jsonschema import Draft7Validator

    from central.alarms import AlarmDesk
    from tests.central.test_store import SentCommands, result_msg
    from tests.contract.test_contract import SCHEMAS

    definitions = json.loads((SCHEMAS / "payloads" / "centre.json").read_text())["definitions"]
    intake = intake_for(make_config(supervision={"gap_grace": 0}), store)
    cycle(
        intake,
        store,
        [heartbeat_msg(interval=1), Inbound("wardpost/s1/d1/status", b"[]", T0)]
        + [event_msg(seq=s) for s in (1, 3)],
        T0,
    )
    cycle(intake, store, [heartbeat_msg(interval=1)], T0 + 1, supervise=True)  # gap
    cycle(intake, store, [event_msg(seq=1)], T0 + 2)  # restarted
    cycle(intake, store, [], T0 + 60, supervise=True)  # lost
    cycle(intake, store, [heartbeat_msg(interval=1)], T0 + 61)  # restored
    desk = AlarmDesk(store, SentCommands())
    first, second, *_ = [a for a in store.alarms() if a.origin == "device"]
    desk.acknowledge(first.id, "desk 1", "on our way")
    desk.resolve(first.id, "desk 1")
    cycle(intake, store, [result_msg("cmd-2", ok=True)], T0 + 62)
    desk.acknowledge(second.id, "desk 1")
    desk.follow_up(10**10, retry_every=1, confirm_within=1)
    centre = [e for e in store.events(limit=10_000) if e.origin == "centre"]
    assert {e.kind for e in centre} == set(definitions) - {"dc09.link_down", "dc09.link_up"}
    for event in centre:
        errors = list(Draft7Validator(definitions[event.kind]).iter_errors(event.payload))
        assert not errors, f"{event.kind}: {[e.message for e in errors]}"


def started(seq: int, skipped: list[int] | None) -> Inbound:
    """The core's agent.started after a crash, naming the numbers it reserved and never stored."""
    body = json.loads(event_msg(seq=seq, kind="agent.started", priority="normal").payload)
    body.update(
        source="agent",
        payload={
            "version": "1",
            "boot": 2,
            "config": "c",
            "drivers": [],
            "seq_first": seq,
            "seq_skipped": skipped,
        },
    )
    return Inbound("wardpost/s1/d1/events/agent.started", json.dumps(body).encode(), T0)


@pytest.mark.parametrize(
    ("skipped", "gaps"),
    [([4, 6], []), ([4, 5], [(6, 6)]), (None, [(4, 6)])],
    ids=["all announced", "one really lost", "nothing announced"],
)
def test_numbers_a_crashed_run_reserved_and_never_stored_are_not_gaps(
    make_config: Callable[..., ReceiverConfig],
    store: Store,
    skipped: list[int] | None,
    gaps: list[tuple[int, int]],
) -> None:
    intake = intake_for(make_config(supervision={"gap_grace": 0}), store)
    cycle(
        intake,
        store,
        [event_msg(seq=s, priority="normal", kind="gate.transit") for s in (1, 2, 3)],
        T0,
    )
    cycle(intake, store, [started(7, skipped)], T0 + 1)
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0 + 2, supervise=True)
    found = [(e.payload["first"], e.payload["last"]) for e in store.events(kind="sequence.gap")]
    assert found == gaps
    assert "sequence.restarted" not in kinds(store)
    assert store.devices()[0].seq_upto == 7


def test_the_report_lists_quarantined_messages_per_device(
    make_config: Callable[..., ReceiverConfig],
    store: Store,
    store_section: dict[str, str],
    tmp_path: Path,
) -> None:
    intake = intake_for(make_config(), store)
    cycle(intake, store, [Inbound("wardpost/s1/evil/events/x.y", b"\xff\xfe{", T0)], T0)
    cycle(intake, store, [Inbound("wardpost/s1/evil/heartbeat", b"[]", T0 + 1)], T0 + 1)
    config = tmp_path / "central.toml"
    config.write_text("[store]\n" + "".join(f'{k} = "{v}"\n' for k, v in store_section.items()))
    done = subprocess.run(
        [sys.executable, "-m", "central", "report", "--json", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["quarantine"]
    assert (row["site"], row["device"], row["count"]) == ("s1", "evil", 2)
    assert row["last_reason"] == "payload is not a JSON object"
