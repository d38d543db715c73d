"""Forward selected stored events to an alarm receiving centre over SIA DC-09 (Contact ID).

The receiver queues an event for forwarding (table ``forwards``) in the same
transaction that stores it, so a forward survives a restart. This thread sends
the queue oldest first, critical events ahead, marks each one ACKed by the
centre, and retries failures every ``retry_every`` seconds. While the centre
does not answer, the receiver raises ``dc09.link_down`` (critical, an alarm)
once, and ``dc09.link_up`` when it answers again. NULL messages supervise the
link while it is idle.

With several receivers on one store, each runs a bridge: a bridge claims the
forwards it is about to send (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so each is
sent by one bridge; the link's state is kept in the store, so of several bridges
noticing the same change exactly one raises it.
"""

from __future__ import annotations

import logging
import threading
import time

from agent.event import Priority
from central.config import ReceiverConfig
from central.dc09 import (
    Dc09Rejected,
    Dc09Sender,
    Dc09Unavailable,
    NullSupervisor,
    TcpTransport,
    UdpTransport,
)
from central.intake import Policy, centre_event
from central.store import Batch, Store

log = logging.getLogger("wardpost.central.bridge")

CLAIM_BATCH = 5  # forwards claimed at once
LINK_STATE = "dc09.link"
LINK_RECHECK = 5.0  # seconds a bridge trusts its own idea of the link's stored state


class Dc09Bridge:
    """One sender thread draining the store's forward queue."""

    def __init__(self, config: ReceiverConfig, store: Store, name: str = "dc09-bridge"):
        cfg = config.dc09
        self.config = cfg
        self.store = store
        self.name = name  # the holder of its claims, unique among the receivers
        # A claim outlives the sends of a whole claimed batch, so no other bridge takes it over.
        self.claim_for = CLAIM_BATCH * cfg.timeout * cfg.attempts + cfg.retry_every
        self.policy = Policy(config)
        transport = (
            TcpTransport(cfg.host, cfg.port)
            if cfg.transport == "tcp"
            else UdpTransport(cfg.host, cfg.port)
        )
        self.sender = Dc09Sender(
            transport,
            cfg.account,
            key=cfg.key(),
            receiver=cfg.receiver or None,
            line=cfg.line,
            timeout=cfg.timeout,
            attempts=cfg.attempts,
            sequence=lambda: store.dc09_sequence()[0],
        )
        self.link_up: bool | None = None
        self._link_checked = -LINK_RECHECK
        self._link_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dc09-bridge", daemon=True)
        self._null = (
            NullSupervisor(self.sender, cfg.null_interval, self._link)
            if cfg.null_interval > 0
            else None
        )

    def start(self) -> None:
        self._thread.start()
        if self._null is not None:
            self._null.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.config.timeout * self.config.attempts + 2)
        if self._null is not None:
            self._null.stop()
        self.sender.close()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.config.retry_every / 2)
            self._wake.clear()
            try:
                self.drain()
            except Exception:
                log.exception("DC-09 bridge cycle failed")

    def drain(self) -> int:
        """Send every due forward; returns how many the centre ACKed."""
        sent = 0
        while not self._stop.is_set():
            claimed = self.store.claim_forwards(self.name, self.claim_for, CLAIM_BATCH)
            if not claimed:
                return sent
            for index, (event, seq) in enumerate(claimed):
                report = self.config.map[event.kind].report(event.payload)
                try:
                    self.sender.send_contact_id(report, seq)
                except Dc09Rejected as exc:
                    log.error("DC-09 centre rejected event %s (%s): %s", event.id, event.kind, exc)
                    self.store.mark_forward(
                        event.id, False, str(exc), time.time() + max(300.0, self.config.retry_every)
                    )
                    continue
                except Dc09Unavailable as exc:
                    retry_at = time.time() + self.config.retry_every
                    for unsent, _ in claimed[index:]:  # give the claims back, due again later
                        self.store.mark_forward(unsent.id, False, str(exc), retry_at)
                    self._link(False, str(exc))
                    return sent
                self.store.mark_forward(event.id, True)
                self._link(True, "")
                sent += 1
        return sent

    def _link(self, up: bool, detail: str) -> None:
        with self._link_lock:
            # Another receiver's bridge may have switched the stored state: look again now
            # and then, not at every frame.
            if self.link_up == up and time.monotonic() - self._link_checked < LINK_RECHECK:
                return
            self.link_up, self._link_checked = up, time.monotonic()
        kind, priority = (
            ("dc09.link_up", Priority.HIGH) if up else ("dc09.link_down", Priority.CRITICAL)
        )

        def raised(previous: str | None) -> Batch:
            if previous is None and up:  # the first answer: nothing came back
                return Batch()
            event = centre_event(
                kind,
                "centre",
                "dc09",
                priority,
                {"host": self.config.host, "port": self.config.port, "detail": detail},
                now=time.time(),
            )
            batch = Batch(events=[event])
            self.policy.apply(event, batch)
            batch.forwards.clear()  # the link's own state is not forwarded over the link
            return batch

        if self.store.switch_state(LINK_STATE, "up" if up else "down", raised):
            log.log(
                logging.INFO if up else logging.ERROR,
                "DC-09 link %s %s",
                "up" if up else "DOWN",
                detail,
            )
