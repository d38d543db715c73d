"""Fixtures for the web console: a real broker, receiver and console, Debian's chromium."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from central.config import parse_receiver_config
from central.console.server import ConsoleServer
from central.devicesim import SimulatedDevice
from central.receiver import Receiver
from central.testing.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.shared import missing_prerequisite

PASSWORD = "correct horse battery"
OPERATORS = {"olga": "operator", "sam": "supervisor", "ada": "admin"}
PLAN = "ER panic: send two guards, call the police hotline 5555."


@dataclass
class Centre:
    """A receiver with its console, the devices talking to it, and the URLs to visit."""

    broker: Broker
    receiver: Receiver
    server: ConsoleServer
    devices: list[SimulatedDevice] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.receiver.config.mqtt.topic_prefix

    @property
    def url(self) -> str:
        return self.server.url

    def device(self, name: str, **options: Any) -> SimulatedDevice:
        options.setdefault("answer_commands", True)
        device = SimulatedDevice(
            self.broker.host, self.broker.port, "er", name, prefix=self.prefix, **options
        ).start()
        self.devices.append(device)
        return device


def centre_config(broker: Broker, tmp_path: Path, **console: Any) -> dict[str, Any]:
    return {
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "client_id": f"receiver-{uuid.uuid4().hex[:8]}",
            # Each test's own topics: retained statuses of other tests' devices stay away.
            "topic_prefix": f"wp{uuid.uuid4().hex[:8]}",
        },
        "store": {"url": f"sqlite:///{tmp_path / 'central.db'}"},
        "supervision": {"check_every": 0.2, "lost_after": 3.0},
        "alarms": {"kinds": ["device.lost", "sequence.gap", "face.*"]},
        "console": {
            "host": "127.0.0.1",
            "port": 0,
            "escalate_after": 3600.0,
            "action_plans": {"er/panic.pressed": PLAN, "*": "Call the duty supervisor."},
            **console,
        },
    }


@pytest.fixture
def make_centre(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Centre]]:
    """``make_centre(**console_settings)``: receiver + console on a fresh store."""
    made: list[Centre] = []

    def make(sections: dict[str, Any] | None = None, **console: Any) -> Centre:
        data = centre_config(broker, tmp_path, **console)
        data.update(sections or {})
        config = parse_receiver_config(data, "<test>")
        receiver = Receiver(config).start()
        assert receiver.wait_connected(10)
        server = ConsoleServer(config, receiver.commander(), live_interval=0.5).start()
        receiver.on_committed(server.console.live.wake)
        for name, role in OPERATORS.items():
            server.console.add_operator(name, role, PASSWORD)
        centre = Centre(broker, receiver, server)
        made.append(centre)
        return centre

    yield make
    for centre in made:
        for device in centre.devices:
            device.stop(clean=False)
        centre.server.stop()
        centre.receiver.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        missing_prerequisite(f"{CHROMIUM} is missing: scripts/setup-env installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the test run saves its screenshots of the pages."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


def login(browser: Any, centre: Centre, name: str, *, width: int = 1920, height: int = 1080) -> Any:
    """A fresh browser context logged in as ``name``; returns its page on the alarm queue."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{centre.url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#operator")
    return page


# Both store engines for the table tests, as the receiver's own tests use them.
from tests.central.conftest import make_config, store, store_section  # noqa: E402, F401
