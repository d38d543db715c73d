from __future__ import annotations

import uuid

import pytest

from agent.event import Event, Priority, uuid7, valid_kind


def test_uuid7_is_version_7_and_sorts_by_creation() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids[:10])


def test_event_round_trips_through_json() -> None:
    e = Event(
        kind="panic.pressed",
        source="b1",
        priority=Priority.CRITICAL,
        site="s",
        device="d",
        seq=7,
        payload={"room": "3"},
    )
    back = Event.from_json(e.to_json())
    assert back.id == e.id and back.priority is Priority.CRITICAL and back.payload == {"room": "3"}
    assert abs(back.time - e.time) < 1e-5
    body = e.to_dict()
    assert body["time"].endswith("Z") and body["schema"] == 1 and body["boot_id"]


def test_priority_parse() -> None:
    assert Priority.parse("Critical") is Priority.CRITICAL
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        Priority.parse("urgent")


@pytest.mark.parametrize("kind", ["panic.pressed", "gate.alarm", "agent.started", "x"])
def test_valid_kinds(kind: str) -> None:
    assert valid_kind(kind)


@pytest.mark.parametrize("kind", ["", "Panic", "a/b", "a+", ".a", "a.", "a b", "#"])
def test_invalid_kinds(kind: str) -> None:
    assert not valid_kind(kind)
