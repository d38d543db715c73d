"""Ending a paho client that runs its network loop on paho's own thread (``loop_start``).

``loop_stop()`` in paho 2.x checks its thread, then joins it; a thread that ends in between
(as it does by itself right after ``disconnect()``) leaves ``None`` behind, and ``loop_stop``
raises ``AttributeError``. Seen in CI: ``wardpost receiver ack`` exited 1 with that traceback
after doing its work. The thread has ended either way, so here it counts as stopped.
"""

from __future__ import annotations

import contextlib

import paho.mqtt.client as mqtt


def disconnect_and_stop(client: mqtt.Client) -> None:
    """Send DISCONNECT and end the client's network thread (started with ``loop_start``)."""
    client.disconnect()
    with contextlib.suppress(AttributeError):  # the thread ended between check and join
        client.loop_stop()
