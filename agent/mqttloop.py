"""Running paho clients: on a thread of our own (:class:`NetworkLoop`), or ending one that runs
on paho's own thread (:func:`disconnect_and_stop`).

:class:`NetworkLoop` drives a client with paho's external-loop API (``socket()``,
``want_write()``, ``loop_read()``, ``loop_write()``, ``loop_misc()``), selecting on the
client's socket and on a wake-up socket pair of its own. Why not ``client.loop()``: it makes
paho write a byte to an internal socket pair on *every* ``publish()`` from another thread, to
interrupt its select. With many events in flight that is one system call and one thread
hand-over (GIL included) per event.

Other threads send directly: every call into the client, by the loop and by its callers,
is made holding one lock, so paho writes a ``publish()`` on the caller's thread at once
(paho does that when no external loop is registered for writing) and the lock keeps to
one writer at a time. An alarm then reaches the wire without waiting for another thread
to be scheduled. A caller calls :meth:`NetworkLoop.sent` after its calls, which wakes the
loop only if a full socket buffer left bytes for it to write.

``loop_stop()`` in paho 2.x checks its thread, then joins it; a thread that ends in between
(as it does by itself right after ``disconnect()``) leaves ``None`` behind, and ``loop_stop``
raises ``AttributeError``. Seen in CI: ``wardpost receiver ack`` exited 1 with that traceback
after doing its work. The thread has ended either way, so here it counts as stopped.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode


def disconnect_and_stop(client: mqtt.Client) -> None:
    """Send DISCONNECT and end the client's network thread (started with ``loop_start``)."""
    client.disconnect()
    with contextlib.suppress(AttributeError):  # the thread ended between check and join
        client.loop_stop()


class NetworkLoop:
    """One thread's select loop for paho clients (one at a time), woken by other threads.

    Call ``run_once()`` repeatedly on one thread while ``MQTT_ERR_SUCCESS`` comes back;
    every other call into the client holds ``lock``. ``wake()`` (any thread) makes the
    current ``run_once()`` return early."""

    def __init__(self, lock: threading.Lock | threading.RLock) -> None:
        self._lock = lock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    def sent(self, client: mqtt.Client) -> None:
        """After calls into ``client`` (lock held): if the socket could not take everything,
        the rest is this loop's to write."""
        if client.want_write():
            self.wake()

    def run_once(self, client: mqtt.Client, timeout: float) -> MQTTErrorCode:
        """Wait up to ``timeout`` for the socket or a wake-up, then read, write and run
        paho's housekeeping (keepalive). Anything but ``MQTT_ERR_SUCCESS``: the link ended."""
        with self._lock:
            sock = client.socket()
            if sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            # Bytes TLS has already decrypted are not visible to select: read them first.
            buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            # What a full socket buffer left behind.
            writing = [sock] if client.want_write() else []
        try:
            readable, _, _ = select.select(
                [sock, self._wake_r], writing, [], 0.0 if buffered else timeout
            )
        except (OSError, ValueError, TypeError):  # the socket was closed under us
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r.recv(4096):
                    pass
        with self._lock:
            if sock in readable or buffered:
                rc = client.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
            if client.want_write():
                rc = client.loop_write()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
            return client.loop_misc()

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()
