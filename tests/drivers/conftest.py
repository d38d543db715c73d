"""Fixtures of the serial driver tests: a pretend device on a real pty, and a
recording context for a driver named ``gate1``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testing.serial_pty import PtyDevice
from tests.support.context import RecordingContext


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "ttyDEVICE")
    yield dev
    dev.close()


@pytest.fixture
def ctx(tmp_path: Path) -> RecordingContext:
    return RecordingContext(tmp_path, name="gate1")
