"""A hostile device floods the real broker with poison: the receiver keeps storing the others.

Before, one such message failed its batch for ever (never acknowledged, never receipted), and
after ~20 of them the broker's in-flight window was full and nothing more arrived.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.testing.broker import Broker
from central.config import ReceiverConfig
from central.devicesim import SimulatedDevice
from central.receiver import Receiver
from tests.central.test_intake_judgement import poison
from tests.central.test_receiver import wait_until

ROUNDS = 4  # every kind of poison this many times: well past the broker's in-flight window


def test_poison_flood_is_quarantined_and_others_are_stored_across_a_restart(
    broker: Broker, make_config: Callable[..., ReceiverConfig]
) -> None:
    config = make_config(broker, supervision={"quarantine_report_every": 3600})
    hostile = SimulatedDevice(broker.host, broker.port, "s1", "hostile").start()
    nurse = SimulatedDevice(broker.host, broker.port, "s1", "ward3", resend_after=60).start()
    receiver = Receiver(config).start()
    try:
        assert receiver.wait_connected(10)
        cases = poison()
        for _ in range(ROUNDS):
            for _case, suffix, payload, _reason in cases:
                hostile.client.publish(f"{hostile.base}/{suffix}", payload, qos=1)
        first = nurse.event("panic.pressed", "critical")
        assert nurse.wait_receipted(30), "a panic behind the poison is stored and receipted"
        assert receiver.store.alarm(first) is not None
        expected = ROUNDS * sum(1 for c in cases if c[3] is not None)
        wait_until(lambda: receiver.stats.quarantined >= expected, 30, "every poison quarantined")
        (summary,) = [q for q in receiver.store.quarantine_summary() if q.device == "hostile"]
        assert summary.count == expected
        reports = receiver.store.events(kind="centre.quarantined", device="hostile")
        assert len(reports) == 1, "rate-limited: one event per device per interval"
    finally:
        receiver.stop()
    # Restarted with the same persistent session: nothing is replayed, new messages flow.
    receiver = Receiver(config).start()
    try:
        assert receiver.wait_connected(10)
        second = nurse.event("panic.pressed", "critical")
        assert nurse.wait_receipted(30)
        assert receiver.store.alarm(second) is not None
        # A replay would come first: the broker sends a session's queue before new messages,
        # and the one writer handles them in order, so by now it would have been counted.
        (summary,) = [q for q in receiver.store.quarantine_summary() if q.device == "hostile"]
        assert summary.count == expected and receiver.stats.quarantined == 0
    finally:
        receiver.stop()
        hostile.stop(clean=False)
        nurse.stop(clean=False)


def refuse_source(store_section: dict[str, str], source: str) -> None:
    """Make the real database refuse events from ``source`` (a trigger): a value that passes
    every rule of the intake and still cannot be stored."""
    url = store_section["url"]
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            conn.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.source = "
                f"'{source}' BEGIN SELECT RAISE(ABORT, 'this store refuses {source}'); END"
            )
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{store_section["schema"]}"')
        conn.execute(f"""CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
            IF NEW.source = '{source}' THEN
              RAISE EXCEPTION 'this store refuses {source}' USING ERRCODE = '22023';
            END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()"
        )


def test_a_message_the_store_itself_refuses_is_quarantined_not_retried_for_ever(
    broker: Broker, make_config: Callable[..., ReceiverConfig], store_section: dict[str, str]
) -> None:
    receiver = Receiver(make_config(broker)).start()
    device = SimulatedDevice(broker.host, broker.port, "s1", "ward3", resend_after=60).start()
    try:
        assert receiver.wait_connected(10)
        refuse_source(store_section, "cursed")
        before = device.event("gate.transit")
        cursed = device.event("gate.transit", source="cursed")
        after = device.event("panic.pressed", "critical")
        wait_until(lambda: {before, after} <= device.receipted, 30, "the others receipted")
        assert cursed not in device.receipted
        (kept,) = wait_until(receiver.store.quarantined, 30, "the quarantined message")
        assert kept.device == "ward3" and "this store refuses cursed" in kept.reason
        assert receiver.store.alarm(after) is not None
        assert receiver.store.event(cursed) is None and receiver.store.event(before) is not None
    finally:
        device.stop(clean=False)
        receiver.stop()
