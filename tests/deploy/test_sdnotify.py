"""sd_notify client: messages captured on the test's own unix datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


class Listener:
    """A stand-in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, address: str):
        self.sock = sock
        self.address = address

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode("utf-8").split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


def _listen(bind_to: str, address: str) -> Listener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(bind_to)
    sock.settimeout(5)
    return Listener(sock, address)


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = str(tmp_path / "notify.sock")
    listener = _listen(path, path)
    yield listener
    listener.sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"wardpost-test-{uuid.uuid4().hex}"
    listener = _listen("\0" + name, "@" + name)
    yield listener
    listener.sock.close()


def test_inert_without_notify_socket() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_ready_with_status_is_one_datagram(path_listener: Listener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.address})
    assert notifier.enabled
    assert notifier.ready("link up, backlog 0, drivers 3/3 ok")
    assert path_listener.receive() == ["READY=1", "STATUS=link up, backlog 0, drivers 3/3 ok"]
    assert path_listener.nothing_pending()
    notifier.close()


def test_abstract_socket(abstract_listener: Listener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_listener.address})
    assert notifier.watchdog()
    assert abstract_listener.receive() == ["WATCHDOG=1"]
    notifier.close()


def test_each_message(path_listener: Listener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.address})
    notifier.status("link down\nbacklog 12")
    assert path_listener.receive() == ["STATUS=link down backlog 12"]
    notifier.stopping()
    assert path_listener.receive() == ["STOPPING=1"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading("reloading config")
    lines = path_listener.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    assert lines[2] == "STATUS=reloading config"
    notifier.ready()
    assert path_listener.receive() == ["READY=1"]
    notifier.close()


def test_send_failure_is_reported_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.INFO, logger="wardpost.sdnotify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "cannot notify systemd" in caplog.text

    # The manager comes back (e.g. after daemon-reexec): notifications resume.
    listener = _listen(str(tmp_path / "gone.sock"), str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.INFO, logger="wardpost.sdnotify"):
        assert notifier.watchdog()
    assert listener.receive() == ["WATCHDOG=1"]
    assert "works again" in caplog.text
    listener.sock.close()
    notifier.close()


def test_full_socket_does_not_block(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    listener = _listen(path, path)  # never read: its queue fills up
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    results = [notifier.status("x" * 200) for _ in range(5000)]
    assert results[0] is True
    assert results[-1] is False
    listener.sock.close()
    notifier.close()


def test_not_a_unix_socket_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wardpost.sdnotify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a unix socket path" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_reads_the_process_environment(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval() == 2.0
    assert notifier.ready()
    assert path_listener.receive() == ["READY=1"]
    notifier.close()
