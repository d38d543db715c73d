"""Fixtures for the receiver: both store engines, a receiver config, simulated devices."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from central.config import ReceiverConfig, parse_receiver_config
from central.store import Store, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_section(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A ``[store]`` table for each engine. PostgreSQL: a fresh database of the tests' own
    cluster (central/testing/postgres.py), with the tables in a schema of their own."""
    if request.param == "sqlite":
        yield {"url": f"sqlite:///{tmp_path / 'central.db'}"}
        return
    yield {"url": request.getfixturevalue("postgres_url"), "schema": "wardpost"}


@pytest.fixture
def make_config(store_section: dict[str, Any]) -> Callable[..., ReceiverConfig]:
    """``make_config(broker, supervision={...}, ...)``: a validated receiver config."""

    def make(broker: Broker | None = None, **sections: Any) -> ReceiverConfig:
        data: dict[str, Any] = {"store": {**store_section, **sections.pop("store", {})}}
        if broker is not None:
            data["mqtt"] = {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"receiver-{uuid.uuid4().hex[:8]}",
                **sections.pop("mqtt", {}),
            }
        data.update(sections)
        return parse_receiver_config(data, "<test>")

    return make


@pytest.fixture
def store(make_config: Callable[..., ReceiverConfig]) -> Iterator[Store]:
    s = open_store(make_config().store)
    yield s
    s.close()
