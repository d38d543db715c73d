"""The delivery room: everything between an accepted event and the centre having it.

    Agent.emit ──submit(event)──▶ Delivery ──▶ Outbox (SQLite) ──▶ Publisher ──▶ broker
                                     │                                  ▲
                                     └──── critical: published at once ─┘

The rest of the agent sees one small API: :meth:`Delivery.submit` takes an event and
returns its :class:`~agent.driver.Emission`, which tells the event's fate (``DURABLE``
on disk or ``MEMORY`` while storage fails, then delivered: the broker's PUBACK, or the
centre's receipt with ``delivery = "receipt"``). Command results and heartbeats go out
through :meth:`publish_command_result` and :meth:`publish_heartbeat`.

The rules the room keeps, stated here once:

* **Accepted means kept.** An event is accepted when :meth:`submit` returns; it stays
  in the outbox (or, while the disk fails, in memory) until released by a PUBACK or a
  receipt. Everything unconfirmed on a connection goes out again on the next one, from
  the outbox, with the same id (the centre de-duplicates by id). Command results are
  kept the same way until the broker has them.
* **Order.** Within one source and priority, events reach the broker in ``seq`` order:
  the outbox hands out pending events by ``(rank, seq)``, critical first, then oldest
  first; and each connection has its own paho client, so nothing paho held from an
  old connection can be sent out of turn on a new one.
* **Critical first, without a detour.** A critical event is published on the emitting
  thread the moment it is submitted, while its commit is still under way, unless an
  older critical event is still waiting (the link was down, or its commit is behind):
  then it waits its turn and goes out from the outbox, in order. To make that decision
  safe, the publisher hears of the event (:meth:`Publisher.expect`) *before* the outbox
  can hand it out, and takes the direct path (:meth:`Publisher.track`) only after the
  outbox has it: so a critical event is sent once by whichever path comes first, and
  never overtakes an older one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.config import Config
from agent.delivery.outbox import Outbox, PendingRow, Reply, StorageReport
from agent.delivery.publisher import Publisher
from agent.driver import Emission
from agent.event import Event

__all__ = ["Delivery", "Outbox", "PendingRow", "Publisher", "Reply", "StorageReport"]


class Delivery:
    """Owns the outbox and the publisher. ``open()``, ``start(...)``, then ``stop()``."""

    def __init__(
        self,
        config: Config,
        *,
        on_report: Callable[[StorageReport], None] = lambda report: None,
        on_transmitted: Callable[[float], None] | None = None,
    ):
        """``on_report`` gets what storage has to tell the centre (emitted as events by the
        agent); ``on_transmitted(seconds)`` each accepted → confirmed time. Neither may block."""
        self.config = config
        self.on_transmitted = on_transmitted
        self.outbox = Outbox(
            config.outbox_path,
            config.outbox,
            on_committed=self._committed,
            on_released=self._released,
            on_report=on_report,
        )
        self.publisher: Publisher | None = None

    def open(self) -> list[StorageReport]:
        """Open the outbox (recovering it if needed); returns what storage has to report."""
        return self.outbox.open()

    def start(
        self,
        *,
        status_extra: Callable[[], Mapping[str, Any]] = dict,
        on_command: Callable[[str, bytes], None] = lambda name, payload: None,
        on_link_change: Callable[[bool], None] = lambda up: None,
    ) -> None:
        """Start publishing what the outbox holds, and what is submitted from now on."""
        self.publisher = Publisher(
            self.config,
            self.outbox,
            status_extra=status_extra,
            on_command=on_command,
            on_link_change=on_link_change,
            on_transmitted=self.on_transmitted,
        )
        self.publisher.start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Commit what was submitted, give in-flight events ``flush_timeout`` to be
        confirmed, say ``stopped``, disconnect, close the outbox."""
        self.outbox.flush(flush_timeout)
        if self.publisher is not None:
            self.publisher.stop(flush_timeout)
        self.outbox.close()

    # ------------------------------------------------------------------ API

    def next_seq(self) -> int:
        return self.outbox.next_seq()

    def submit(self, event: Event) -> Emission:
        """Accept ``event``; never blocks on the disk or the network."""
        emission = Emission(event)
        row = PendingRow.of(event)  # serialised once, for the disk and the wire
        publisher = self.publisher
        if publisher is not None:
            publisher.expect(row)
        self.outbox.submit(emission, row)
        if publisher is not None:
            publisher.track(emission, row)
        return emission

    def publish_command_result(self, command_id: str, body: Mapping[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish_command_result(command_id, body)

    def publish_heartbeat(self, body: Mapping[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish_heartbeat(body)

    def healthy(self, timeout: float = 5.0) -> bool:
        """The outbox writer commits and the publisher's threads run."""
        publisher = self.publisher
        return publisher is not None and publisher.alive() and self.outbox.flush(timeout)

    # ------------------------------------------------------- outbox → publisher

    def _committed(self, min_key: tuple[int, int]) -> None:
        if self.publisher is not None:
            self.publisher.committed(min_key)

    def _released(self, ids: list[str]) -> None:
        if self.publisher is not None:
            self.publisher.released(ids)
