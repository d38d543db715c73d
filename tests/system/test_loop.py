"""The alarm loop end to end, as a hospital runs it (issue 12). One story, in file order.

See conftest.py for the parts and README.md for which test covers which defect.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from agent.testing.toml_writer import dumps
from tests.system.conftest import (
    ARC_ACCOUNT,
    CAMERA,
    DEADLINE,
    GATE,
    HOSTILE,
    PANIC,
    SITE,
    Loop,
    wait_for,
)
from tests.system.hostile import NOT_AUTHORIZED, HostileClient, poison, well_formed_event

pytestmark = pytest.mark.system


def button(loop: Loop) -> str:
    """The panic button's own account of its alarm (``wardpost status``): the LED follows it."""
    detail: str = loop.device_status(PANIC)["drivers"]["button"]["detail"]
    return detail


def device_event(loop: Loop, device: str, kind: str, **payload: Any) -> dict[str, Any] | None:
    """The newest event ``kind`` in the device's own outbox whose payload has ``payload``."""
    for event in reversed(loop.device_events(device)):
        if event["kind"] == kind and all(event["payload"].get(k) == v for k, v in payload.items()):
            return event
    return None


def stored(loop: Loop, device: str, kind: str, since: float = 0.0) -> list[Any]:
    return [e for e in loop.stored(site=SITE, device=device, kind=kind) if e.stored_at >= since]


def press(loop: Loop) -> float:
    """A nurse presses and releases the button (MockFactory pin, through ``wardpost simulate``).

    An alarm an earlier test left open is closed first at the button itself (``resolve``
    addressed to the driver), so each press raises a new alarm whatever failed before."""
    if not button(loop).endswith("idle"):
        loop.command(PANIC, "resolve", {"by": "test set-up"}, target="button")
        wait_for(lambda: button(loop).endswith("idle"), "the button idle before a new press")
    pressed = time.time()
    loop.device_cli(PANIC, "simulate", "button", "tap")
    return pressed


# ------------------------------------------------------------------ 1. press, ack, resolve


def test_press_is_stored_acknowledged_at_the_button_then_resolved(loop: Loop) -> None:
    since = press(loop)
    (event,) = wait_for(lambda: stored(loop, PANIC, "panic.pressed", since), "panic.pressed stored")
    alarm = wait_for(
        lambda: [a for a in loop.alarms() if a.id == event.id], "the alarm at the centre"
    )[0]
    assert alarm.state == "new" and alarm.kind == "panic.pressed"
    wait_for(lambda: f"alarm {event.id} delivered" in button(loop), "the LED to show delivered")

    done = loop.operator("ack", event.id, "--by", "control room 1")
    assert "acknowledged" in done.stdout
    # Defect 1: the device must understand the centre's ack: LED steady ("acknowledged").
    wait_for(
        lambda: f"alarm {event.id} acknowledged" in button(loop),
        lambda: f"the button to show the centre's ack; it says: {button(loop)}",
        timeout=20,
    )
    ack = device_event(loop, PANIC, "panic.acknowledged", alarm=event.id)
    assert ack is not None and ack["payload"]["by"] == "control room 1"

    acknowledged = next(a for a in loop.alarms() if a.id == event.id)
    assert getattr(acknowledged, "device_state", None) == "confirmed", acknowledged

    loop.operator("resolve", event.id, "--by", "guard 7")
    wait_for(lambda: button(loop).endswith("idle"), "the LED off (no active alarm)", timeout=20)
    resolved = device_event(loop, PANIC, "panic.resolved", alarm=event.id)
    assert resolved is not None and resolved["payload"]["acknowledged"] is True
    wait_for(lambda: stored(loop, PANIC, "panic.resolved", since), "panic.resolved at the centre")


# -------------------------------------------------------------- 2. face match, face.reject


def test_face_match_rejected_by_the_centre_is_not_repeated(loop: Loop) -> None:
    match = wait_for(
        lambda: stored(loop, CAMERA, "face.watchlist_match"), "a watchlist match at the centre"
    )[0]
    body = json.loads(match.body)
    assert body["payload"]["person_id"] == "W-17"
    result = loop.command(CAMERA, "face.reject", {"event_id": match.id})
    assert result.get("ok"), result
    rejected_at = time.time()

    def suppressed() -> float:
        counters = loop.device_status(CAMERA)["drivers"]["door"]["counters"]
        return float(counters.get("suppressed_rejected", 0))

    # The video loops: the same face comes back and is now recognised as "not W-17".
    wait_for(lambda: suppressed() >= 2, "the rejected face seen again and suppressed", timeout=60)
    later = [
        e for e in stored(loop, CAMERA, "face.watchlist_match") if e.event_time > rejected_at + 1
    ]
    assert later == [], f"{len(later)} matches of W-17 after face.reject"


# ------------------------------------------------------------------- 3. gate alarm, DC-09


def test_gate_alarm_reaches_the_alarm_receiving_centre(loop: Loop) -> None:
    since = time.time()
    loop.gate_port.write(b"ALARM ZONE 3 LEVEL 85\r\n")
    (event,) = wait_for(lambda: stored(loop, GATE, "gate.alarm", since), "gate.alarm stored")

    def forwarded() -> bool:
        state = loop.read(lambda store: store.forward_state(event.id))
        return state is not None and state[0] is not None

    # Defect 10: with the example's default receiver number pysiaalarm's ACK is accepted.
    wait_for(forwarded, "the bridge to record the ARC's ACK", timeout=30)
    # Contact ID 1 150 (new event, 24-hour auxiliary) in partition 2, per the example's map.
    reports = [
        (r.account, r.event_qualifier, r.event_type, r.partition) for r in loop.arc.received()
    ]
    assert (ARC_ACCOUNT, "1", "150", "02") in reports, reports
    assert [e for e in loop.stored(kind="dc09.link_down") if e.stored_at >= since] == []


# ------------------------------------------------------ 4. a hostile device: receipts


def test_only_the_receiver_may_publish_receipts(loop: Loop) -> None:
    forged = json.dumps({"ids": [well_formed_event(SITE, PANIC)["id"]]})
    with HostileClient(loop.broker, loop.pki, loop.identities[HOSTILE]) as device:
        assert device.publish(f"wardpost/{SITE}/{PANIC}/receipts", forged) == NOT_AUTHORIZED
        assert device.publish(f"wardpost/{SITE}/{HOSTILE}/receipts", forged) == NOT_AUTHORIZED
    # Defect 3: a leaked operator console key must not be able to forge receipts either.
    with HostileClient(
        loop.broker, loop.pki, loop.identities[loop.acl.console], "console"
    ) as console:
        code = console.publish(f"wardpost/{SITE}/{PANIC}/receipts", forged)
    assert code == NOT_AUTHORIZED, (
        f"console identity {loop.acl.console!r} may publish receipts (the ACL gives receipts and "
        f"commands to the same name)"
    )


def test_a_forged_receipt_releases_nothing_that_was_not_sent(loop: Loop) -> None:
    """Even with the receiver's own identity (a misconfigured ACL, a stolen key), a receipt
    for an event the device has accepted but not yet sent must not delete it (defect 3)."""
    loop.receiver.stop()
    try:
        for n in range(3):
            loop.device_cli(CAMERA, "emit", "sim.unsent", "--payload", json.dumps({"n": n}))
        pending = [e for e in loop.device_events(CAMERA) if e["kind"] == "sim.unsent"]
        ids = [e["id"] for e in sorted(pending, key=lambda e: e["payload"]["n"])]
        assert len(ids) == 3
        # The window holds one event; with no receiver nothing is receipted, so the last
        # one accepted is still waiting to be sent.
        wait_for(
            lambda: loop.device_status(CAMERA)["link"]["in_flight"] >= 1, "one event in flight"
        )
        with HostileClient(
            loop.broker, loop.pki, loop.identities[loop.acl.receiver], "forger"
        ) as forger:
            code = forger.publish(
                f"wardpost/{SITE}/{CAMERA}/receipts", json.dumps({"ids": [ids[-1]]})
            )
            assert code == 0
    finally:
        loop.start_receiver()
    wait_for(
        lambda: {e.id for e in stored(loop, CAMERA, "sim.unsent")} >= set(ids),
        lambda: f"all three events at the centre (got {len(stored(loop, CAMERA, 'sim.unsent'))})",
    )


# ---------------------------------------------------------- 5. commands: malformed, reload


def test_malformed_commands_leave_a_trace_at_the_centre(loop: Loop) -> None:
    since = time.time()
    topic = f"wardpost/{SITE}/{GATE}/cmd/ping"
    malformed = [
        b"{not json",
        b"\x00\xff\xfe binary",
        b'{"id": "c1", "issued_at": 1, "args": {"pad": "' + b"x" * (5 << 20) + b'"}}',
        b'{"id": "c2", "issued_at": 1, "args": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        b'{"id": "c3", "issued_at": 1' + b"0" * 5000 + b', "args": {}}',
    ]
    with HostileClient(
        loop.broker, loop.pki, loop.identities[loop.acl.console], "console"
    ) as console:
        for payload in malformed:
            assert console.publish(topic, payload) == 0

    def reported() -> list[Any]:
        return [
            e
            for e in stored(loop, GATE, "security.command_rejected", since)
            if "json" in json.loads(e.body)["payload"].get("reason", "").lower()
        ]

    wait_for(reported, "security.command_rejected for a command that is not JSON", timeout=20)
    log = loop.agents[GATE].log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:2000]


def test_reload_turning_signatures_on_takes_effect(loop: Loop) -> None:
    agent = loop.agents[GATE]
    doc = loop.configs[GATE]
    doc["commands"]["require_signature"] = False
    agent.config_path.write_text(dumps(doc))
    agent.terminate()
    agent.start(timeout=DEADLINE)
    doc["commands"]["require_signature"] = True
    agent.config_path.write_text(dumps(doc))
    reloaded = loop.device_cli(GATE, "reload").stdout
    # Defect 7: the change takes effect at once, or the reload says a restart is needed.
    if "require_signature" not in reloaded:
        result = loop.command(GATE, "ping", {}, key=False)
        assert not result.get("ok"), (
            f"an unsigned command was obeyed after `{reloaded.strip()}`: {result}"
        )
    assert loop.command(GATE, "ping", {}).get("ok")


def test_a_dead_link_is_noticed_while_an_event_waits(loop: Loop) -> None:
    """The gate's cable is cut silently (a blackhole: no RST, no FIN) at the default config."""
    loop.gate_link.blackhole()
    try:
        cut = time.monotonic()
        loop.device_cli(GATE, "emit", "gate.probe", "--priority", "high", "--test")
        wait_for(
            lambda: not loop.device_status(GATE)["link"]["connected"],
            "the gate to notice its dead link",
            timeout=40,
        )
        noticed = time.monotonic() - cut
    finally:
        loop.gate_link.set_pass()
    loop.figures["dead_link_noticed_s"] = round(noticed, 2)
    # Defect 6 asks for 5 s; the bound here is generous for a loaded CI box (figure reported).
    assert noticed < 10.0, f"a dead link took {noticed:.1f} s to notice"
    wait_for(lambda: loop.device_status(GATE)["link"]["connected"], "the gate back on the broker")


# ------------------------------------------------------------- 6. supervision: lost, stopped


def test_killed_device_is_lost_then_restored_and_a_stopped_one_is_not_lost(loop: Loop) -> None:
    # Both devices alive in the centre's eyes first (the dead-link test may have left the
    # gate marked lost), so each silence below is judged afresh.
    wait_for(
        lambda: all(not d.lost for d in loop.devices() if d.device in (GATE, PANIC)),
        "the gate and the button supervised as alive",
    )
    since = time.time()
    try:
        loop.agents[GATE].terminate()  # systemctl stop: status "stopped"
        loop.agents[PANIC].kill()  # power cut: the Last Will says offline
        wait_for(
            lambda: stored(loop, PANIC, "device.lost", since), "device.lost for the killed device"
        )
        # Supervision has judged both silences by now (same interval, checked every 0.2 s);
        # one more second of margin, then: a clean stop is not an alarm (defect 9).
        time.sleep(1.0)
        assert stored(loop, GATE, "device.lost", since) == [], (
            "a cleanly stopped device raised device.lost"
        )
    finally:
        for name in (PANIC, GATE):
            if not loop.agents[name].running:
                loop.agents[name].start(timeout=DEADLINE)
    wait_for(lambda: stored(loop, PANIC, "device.restored", since), "device.restored")


def test_a_device_with_a_new_sd_card_is_noticed(loop: Loop) -> None:
    """The gate comes back with empty state (new SD card, restored image): its numbering
    starts again at 1, which the centre must notice rather than take as repeats (defect 4)."""
    since = loop.new_numbering_since[GATE] = time.time()
    agent = loop.agents[GATE]
    agent.terminate()
    shutil.rmtree(Path(loop.configs[GATE]["agent"]["state_dir"]))
    agent.start(timeout=DEADLINE)
    wait_for(
        lambda: stored(loop, GATE, "sequence.restarted", since), "sequence.restarted for the gate"
    )
    wait_for(
        lambda: stored(loop, GATE, "agent.started", since), "the new numbering's first event stored"
    )


# ------------------------------------------------------------------- 7. broker outage


def test_broker_outage_while_the_receiver_is_down_loses_nothing(loop: Loop) -> None:
    """The broker restarts without persistence, so it holds no session for the centre; the
    agents' backlog must wait for the receiver's receipts (defect 5)."""
    loop.receiver.stop()
    loop.broker.stop()
    try:
        for n in range(20):
            loop.device_cli(PANIC, "emit", "sim.during_outage", "--payload", json.dumps({"n": n}))
        loop.broker.start()

        def sent_or_held() -> bool:
            status = loop.device_status(PANIC)
            return bool(status["link"]["connected"]) and (
                status["backlog"]["count"] == 0 or status["link"]["in_flight"] > 0
            )

        # Broker mode: the backlog drains into a broker nobody reads. Receipt mode: it waits.
        wait_for(sent_or_held, "the agent back on the broker, its backlog sent")
    finally:
        if not loop.broker.running:
            loop.broker.start()
        loop.start_receiver()
    wait_for(
        lambda: len(stored(loop, PANIC, "sim.during_outage")) >= 20,
        lambda: (
            f"all 20 events of the outage at the centre (got {len(stored(loop, PANIC, 'sim.during_outage'))})"
        ),
        timeout=30,
    )


# ----------------------------------------------------- 8. a hostile device: poison


def test_poison_from_a_hostile_device_stops_nothing(loop: Loop) -> None:
    since = time.time()
    base = f"wardpost/{SITE}/{HOSTILE}"
    with HostileClient(loop.broker, loop.pki, loop.identities[HOSTILE]) as hostile:
        payloads = poison(SITE, HOSTILE)
        for _round in range(4):  # past the broker's in-flight window towards the receiver
            for suffix, payload, what in payloads:
                code = hostile.publish(f"{base}/{suffix}", payload)
                assert code == 0, f"the ACL refused the device's own {what} ({code})"
        pressed = press(loop)
        (event,) = wait_for(
            lambda: stored(loop, PANIC, "panic.pressed", since),
            "a panic from another device stored despite the poison",
        )
    loop.figures["panic_stored_under_poison_s"] = round(event.stored_at - pressed, 3)
    assert event.stored_at - pressed < 10.0, loop.figures

    # Kept aside, visible, and the receiver is still up.
    assert loop.receiver.running, loop.receiver.text()[-3000:]
    report = loop.operator("report", "--json").stdout
    assert "quarantin" in report.lower() and HOSTILE in report, report[-2000:]
    wait_for(
        lambda: [e for e in loop.stored(kind="centre.quarantined") if HOSTILE in e.body],
        "a centre.quarantined event naming the hostile device",
        timeout=15,
    )

    # After a restart the poison is not replayed forever: new events still get in.
    loop.receiver.stop()
    loop.start_receiver()
    again = time.time()
    loop.device_cli(PANIC, "emit", "duress.pressed", "--priority", "critical", "--test")
    wait_for(
        lambda: stored(loop, PANIC, "duress.pressed", again), "an event stored after a restart"
    )


# ------------------------------------------------------------------- 9. invariants


def test_no_two_events_share_a_device_and_seq(loop: Loop) -> None:
    """Over the whole run (the button's agent was killed with SIGKILL, the broker killed):
    one event per (device, boot's numbering, seq), and no false gap reported (defect 4)."""
    seen: dict[tuple[str, str, int, bool], str] = {}
    seqs: dict[tuple[str, bool], set[int]] = {}
    for event in loop.stored():
        if event.origin != "device" or event.seq is None:
            continue
        # The gate's new SD card starts a second numbering: keep the two apart.
        numbering = event.stored_at >= loop.new_numbering_since.get(event.device, float("inf"))
        key = (event.site, event.device, event.seq, numbering)
        assert seen.setdefault(key, event.id) == event.id, (
            f"{key} is two events: {seen[key]}, {event.id}"
        )
        seqs.setdefault((event.device, numbering), set()).add(event.seq)
    # A gap must name an event the device accepted and the centre does not have; numbers
    # never used (reserved by an agent killed mid-write) or events that arrived are no loss.
    # The button's and the camera's outboxes are intact (the gate's was wiped) and say what
    # they accepted.
    false_gaps = []
    for device in (PANIC, CAMERA):
        accepted = {e["seq"] for e in loop.device_events(device, limit=10_000)}
        lost = accepted - seqs.get((device, False), set())
        for gap in loop.stored(kind="sequence.gap", device=device):
            body = json.loads(gap.body)["payload"]
            if not lost & set(range(body["first"], body["last"] + 1)):
                false_gaps.append((device, body))
    assert false_gaps == [], f"gaps reported where the device lost nothing: {false_gaps}"


def test_the_console_followed_the_loop(loop: Loop) -> None:
    assert loop.monitor.running, loop.monitor.text()[-3000:]
    records = [
        json.loads(line) for line in loop.monitor.text().splitlines() if line.startswith("{")
    ]
    kinds = {(r.get("device"), r.get("kind")) for r in records}
    assert (PANIC, "panic.pressed") in kinds and (GATE, "gate.alarm") in kinds, sorted(
        map(str, kinds)
    )[:40]
