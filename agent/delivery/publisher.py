"""The publisher: moves events from the outbox to the MQTT broker and releases them.

One thread, the **network thread**, does two jobs in turn:

* it runs the connection: connects and reconnects with jittered exponential backoff,
  drives paho's client through its external-loop API (:class:`~agent.mqttloop.NetworkLoop`)
  and turns paho callbacks into items on the pump's inbox (never doing work inside a
  paho callback: an exception there can kill paho's loop);
* after each turn of that loop it **pumps**: it owns every piece of delivery state
  (which event went out under which message id, which wait for a PUBACK or a receipt,
  the outbox cursor), fills a bounded in-flight window from the outbox, critical first
  then oldest first, and releases events once the centre has them. Other threads hand
  it items and wake its select. Critical events are sent the moment they are emitted,
  from the emitting thread (from memory, while their commit completes).

Why one thread and not a pump thread beside it: the two would hand the interpreter to
each other at every small socket read and write of the other (a convoy on the GIL), and
the drain of a backlog would stall on it; one thread drains as a bare paho client does.

An event is released (marked published in the outbox) on the broker's PUBACK with
``delivery = "broker"``, or on the centre's receipt with ``delivery = "receipt"``.
Anything not confirmed within its timeout is sent again with the same id: the
centre de-duplicates by id.

A dead link is noticed by the agent itself, not only by MQTT keepalive: while events
wait for the broker or the centre, a broker that has not answered anything for a
second is sent a probe (an UNSUBSCRIBE of a topic never subscribed, which every
broker answers at once and which changes nothing); with no answer at all for
``link_timeout`` seconds the socket is shut down and the link re-opened. Idle, the
keepalive's PINGREQ notices a dead link within about twice ``keepalive``.

Each connection gets a fresh paho client, thrown away with it (as aiomqtt does). After
a reconnect everything unconfirmed goes out again from the outbox, in order (critical
first, then oldest first); paho cannot re-send anything of its own ahead of or between
those sends, because the client that held its copies is gone. Nothing is sent on a new
connection until the pump has taken it in. Every item the network thread hands the
pump names its connection, so a late PUBACK of an old one never matches a message id
of the new one.

Command results are kept in the outbox too (:class:`~agent.delivery.outbox.Reply`) until the
broker has them, and go out again on the next connection if it did not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import ssl
import statistics
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from weakref import WeakValueDictionary

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.backoff import Backoff
from agent.config import Config
from agent.delivery.outbox import Outbox, PendingRow, Reply
from agent.driver import Emission
from agent.event import Priority, utc_iso
from agent.mqttloop import NetworkLoop

log = logging.getLogger("wardpost.publisher")

_START = (-1, -1)  # a cursor before every (rank, seq)
_PROBE_AFTER = 1.0  # seconds of silence from the broker, while events wait, before a probe
_PROBE_GRACE = 1.5  # a probe gets at least this long to be answered
_RECENTLY_RELEASED = 4096  # ids remembered so a late duplicate receipt is not taken as forged
_WINDOW_FLOOR = 8  # events in flight a connection starts with, and never goes below
# Events allowed to wait in a queue on the way (the broker's, the centre's): enough to
# keep the slowest stage busy, so the window never costs throughput.
_QUEUED_LOW, _QUEUED_HIGH = 8, 16


def _queue_only(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Registered for writing while the network thread publishes a batch: paho then queues."""


class Window:
    """How many events may be in flight: as many as keep the link busy, not more.

    Everything in flight when the agent is killed goes out again after the restart, and
    the centre sees it twice; a window kept full while the centre (or the broker)
    confirms more slowly than the agent sends adds only such duplicates and delay, never
    throughput. So, as TCP Vegas does, the window estimates how many of its events wait
    in a queue somewhere (``size × (1 − best round trip / this round trip)``) at each
    confirmation, grows by one while fewer than ``_QUEUED_LOW`` wait (doubling per round
    trip) and shrinks by one while more than ``_QUEUED_HIGH`` do. Each connection starts
    small; the window never exceeds ``[mqtt] inflight_window``. Without ``adapt`` it is
    always ``[mqtt] inflight_window``.
    """

    def __init__(self, ceiling: int, *, adapt: bool = True):
        self.ceiling = ceiling
        self.floor = min(ceiling, _WINDOW_FLOOR) if adapt else ceiling
        self.size = self.floor
        self._best = float("inf")

    def restart(self) -> None:
        """A new connection: its round trips are not the last one's."""
        self.size = self.floor
        self._best = float("inf")

    def confirmed(self, round_trip: float) -> None:
        if self.floor == self.ceiling:
            return  # a fixed window
        round_trip = max(round_trip, 1e-6)
        self._best = min(self._best, round_trip)
        queued = self.size * (1.0 - self._best / round_trip)
        if queued < _QUEUED_LOW:
            self.size = min(self.ceiling, self.size + 1)
        elif queued > _QUEUED_HIGH:
            self.size = max(self.floor, self.size - 1)


@dataclass
class _Unconfirmed:
    """An event sent on the current connection, waiting for its PUBACK or receipt."""

    row_id: str
    key: tuple[int, int]
    accepted: float
    sent: float


# What the network thread and the emitting threads hand the pump, in the order it happened.
# ``link`` numbers the paho client (one per connection) an item came from.
@dataclass(frozen=True, slots=True)
class _Published:
    link: int
    info: mqtt.MQTTMessageInfo
    row: PendingRow


@dataclass(frozen=True, slots=True)
class _ReceiptArrived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class _ReleaseStored:
    ids: list[str]


@dataclass(frozen=True, slots=True)
class _ReplyQueued:
    reply: Reply


@dataclass(frozen=True, slots=True)
class _Connected:
    link: int
    reason: ReasonCode


@dataclass(frozen=True, slots=True)
class _Disconnected:
    link: int
    reason: Any


_PumpItem = (
    _Published | _ReceiptArrived | _ReleaseStored | _ReplyQueued | _Connected | _Disconnected
)


class TransmissionStats:
    """Accepted → confirmed times over a sliding window (EN 50136 style figures)."""

    def __init__(
        self,
        window: float = 3600.0,
        max_samples: int = 10_000,
        on_sample: Callable[[float], None] | None = None,
    ):
        self.window = window
        self.on_sample = on_sample
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._lock:
            self._samples.append((time.monotonic(), seconds))
        if self.on_sample is not None:
            self.on_sample(seconds)

    def summary(self) -> dict[str, float | int | None]:
        cutoff = time.monotonic() - self.window
        with self._lock:
            values = sorted(v for t, v in self._samples if t >= cutoff)
        if not values:
            return {"count": 0, "mean": None, "p95": None, "max": None, "window": self.window}
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        return {
            "count": len(values),
            "mean": round(statistics.fmean(values), 6),
            "p95": round(p95, 6),
            "max": round(values[-1], 6),
            "window": self.window,
        }


class Topics:
    def __init__(self, prefix: str, site: str, device: str):
        self.base = f"{prefix}/{site}/{device}"
        self.status = f"{self.base}/status"
        self.heartbeat = f"{self.base}/heartbeat"
        self.receipts = f"{self.base}/receipts"
        self.commands = f"{self.base}/cmd/+"
        self.command_prefix = f"{self.base}/cmd/"
        self.event_prefix = f"{self.base}/events/"

    def event(self, kind: str) -> str:
        return f"{self.event_prefix}{kind}"

    def command_result(self, command_id: str) -> str:
        return f"{self.base}/cmd_result/{command_id}"


class Publisher:
    """Delivers the outbox to the broker. See the module docstring for the design."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        *,
        status_extra: Callable[[], Mapping[str, Any]] = dict,
        on_command: Callable[[str, bytes], None] = lambda name, payload: None,
        on_link_change: Callable[[bool], None] = lambda up: None,
        on_transmitted: Callable[[float], None] | None = None,
    ):
        self.config = config
        self.mqtt = config.mqtt
        self.outbox = outbox
        self.topics = Topics(config.mqtt.topic_prefix, config.agent.site, config.agent.device)
        self.status_extra = status_extra
        self.on_command = on_command
        self.on_link_change = on_link_change
        self.receipt_mode = config.mqtt.delivery == "receipt"
        self.stats = TransmissionStats(on_sample=on_transmitted)
        self.counters = {
            "sent": 0,
            "resent": 0,
            "confirmed": 0,
            "connects": 0,
            "disconnects": 0,
            "rejected": 0,
            "critical_direct": 0,  # published from the emitting thread
            "critical_queued": 0,  # waited for the outbox (link down, older ones first)
            "receipt_ids_ignored": 0,  # named no event in flight on this link
            "receipts_malformed": 0,
            "link_timeouts": 0,  # links re-opened because the broker stopped answering
        }
        self.boot = outbox.boot
        self.connection = outbox.get_meta("connection") or 0
        self.connected = False
        self.last_error: str | None = None
        # Link liveness: the last packet from the broker (set by the network thread) and
        # the probe sent for it (the pump).
        self._last_inbound = time.monotonic()
        self._probe_sent_at: float | None = None
        self._probe_topic = f"{self.topics.base}/link-probe"

        self._inbox: queue.SimpleQueue[_PumpItem] = queue.SimpleQueue()
        # PUBACKs as paho reports them: (link, mid, reason), under _send_lock.
        self._acks: list[tuple[int, int, ReasonCode]] = []
        # Set when another thread has woken the network thread for the pump, cleared by the
        # pump before it empties the inbox: one wake-up per burst of hand-offs.
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._live: WeakValueDictionary[str, Emission] = WeakValueDictionary()
        self._live_lock = threading.Lock()
        # Held around every call into the client (the network loop's reads and writes too)
        # and while the network thread swaps clients; a direct send and its record enter the
        # inbox together under it. With it, paho writes a publish on the calling thread at
        # once: an alarm is on the wire before another thread has to be scheduled.
        self._send_lock = threading.RLock()
        self._net = NetworkLoop(self._send_lock)
        self._client: mqtt.Client | None = None  # this connection's client (under lock)
        self._client_link = 0  # which connection it belongs to (under lock)
        self._sendable = False  # the pump has taken in the current connection (under lock)
        # The pump's state (network thread only):
        self._link = 0  # the connection the pump's maps below belong to
        self._by_mid: dict[int, _Unconfirmed] = {}
        self._inflight: dict[str, int] = {}  # event id -> mid, waiting for PUBACK
        self._awaiting: dict[str, _Unconfirmed] = {}  # event id -> sent, waiting for a receipt
        self._replies: dict[str, Reply] = {r.id: r for r in outbox.pending_replies()}
        self._reply_mids: dict[int, tuple[str, float]] = {}  # mid -> (reply id, sent)
        self._releasing: set[str] = set()  # released, until the outbox confirms
        self._recently_released: OrderedDict[str, None] = OrderedDict()
        self._cursor = _START
        self._db_exhausted = False
        # Only the centre's receipts are slow enough to queue behind a full window; the
        # broker's PUBACKs come back as fast as it reads, so with them the window stays open.
        self.window = Window(config.mqtt.inflight_window, adapt=self.receipt_mode)
        self._rewind_lock = threading.Lock()
        self._rewind_to: tuple[int, int] | None = None  # first key to look at again
        # Direct sends of new critical events wait until older critical rows from the
        # outbox are out, so one source's alarms never arrive out of order after an outage.
        # Every critical event is "held" (id -> key) from just before it is submitted until
        # it is sent; only the oldest held one may take the direct path, so one that had to
        # wait for the outbox keeps later ones behind it (both under _send_lock).
        self._criticals_caught_up = False
        self._held_criticals: dict[str, tuple[int, int]] = {}

        self._net_thread = threading.Thread(
            target=self._network_loop, name="mqtt-network", daemon=True
        )

    # ------------------------------------------------------------ lifecycle

    def _make_client(self, link: int) -> mqtt.Client:
        """A client for one connection (``userdata`` = ``link``), dropped when it ends."""
        v5 = self.mqtt.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            userdata=link,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(0)  # we bound the window ourselves
        client.max_queued_messages_set(0)
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self.config.password())
        tls = self.mqtt.tls
        if tls.enabled:
            client.tls_set(
                ca_certs=tls.ca_file or None,
                certfile=tls.cert_file or None,
                keyfile=tls.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            client.tls_insecure_set(not tls.server_hostname_check)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_answer
        client.on_unsubscribe = self._on_answer
        # paho writes to the socket from whichever thread calls publish(); two writers at once
        # could interleave packets, so every call into the client holds _send_lock.
        return client

    def start(self) -> None:
        self._net_thread.start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Publish ``stopped``, wait up to ``flush_timeout`` for in-flight events, disconnect."""
        deadline = time.monotonic() + flush_timeout
        while time.monotonic() < deadline and self.connected and self._inflight:
            time.sleep(0.02)
        with self._send_lock:
            client = self._client
            info = None
            if self.connected and client is not None:
                info = client.publish(
                    self.topics.status, self._status_payload("stopped"), qos=1, retain=True
                )
                self._net.sent(client)
        if info is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._stopping.set()
        with self._send_lock:
            if client is not None:
                client.disconnect()
        self._net.wake()  # the loop writes the DISCONNECT, or sees _stopping in its backoff
        self._net_thread.join(5)

    # -------------------------------------------------------- called by agent

    def expect(self, row: PendingRow) -> None:
        """Called before ``row`` goes to the outbox: a critical event holds its place in the
        order from here until it is sent, directly by :meth:`track` or from the outbox."""
        if row.rank == Priority.CRITICAL:
            with self._send_lock:
                self._held_criticals[row.id] = row.key

    def track(self, emission: Emission, row: PendingRow) -> None:
        """Follow a live emission so it can be marked delivered.

        A critical event is published right here, on the emitting thread, while its
        commit is still under way: the alarm waits for neither the disk nor another
        thread, and may exceed the in-flight window. Without a link it goes out from
        the outbox, critical first, as soon as the link is back."""
        with self._live_lock:
            self._live[emission.event.id] = emission
        if row.rank != Priority.CRITICAL:
            return
        with self._send_lock:
            if row.id not in self._held_criticals:
                return  # the pump has already sent it from the outbox
            if not (self._sendable and self._criticals_caught_up) or row.key != min(
                self._held_criticals.values()
            ):
                self.counters["critical_queued"] += 1
                return  # stays held: the pump sends it from the outbox, in order
            assert self._client is not None  # sendable
            del self._held_criticals[row.id]
            self.counters["critical_direct"] += 1
            # Written to the socket here, on the emitting thread (see _send_lock).
            info = self._client.publish(self.topics.event(row.kind), row.body, qos=1)
            self._net.sent(self._client)
            # No wake-up: the pump reads this record with the PUBACK, or within half a second.
            self._inbox.put(_Published(self._client_link, info, row))

    def committed(self, min_key: tuple[int, int]) -> None:
        """The outbox committed events starting at ``min_key``: look there again."""
        self._rewind(min_key)
        self._wake_pump()

    def released(self, ids: list[str]) -> None:
        """The outbox has stored these as released. Nothing waits on it (the pump only stops
        excluding them from its reads, which no longer return them), so the pump takes it
        on its next pass rather than being woken a second time per batch."""
        self._inbox.put(_ReleaseStored(ids))

    def publish_heartbeat(self, payload: Mapping[str, Any]) -> None:
        """A heartbeat (QoS 0, never kept: the next one says the same), if the link is up."""
        with self._send_lock:
            if self._sendable and self._client is not None:
                self._client.publish(
                    self.topics.heartbeat, json.dumps(payload, separators=(",", ":")), qos=0
                )
                self._net.sent(self._client)

    def publish_retained(self, topic: str, body: str) -> bool:
        """A retained QoS 1 message outside the event stream (Home Assistant discovery), on
        this link if it is up; False when it is not (the caller sends it on the next one)."""
        with self._send_lock:
            if not (self._sendable and self._client is not None):
                return False
            self._client.publish(topic, body, qos=1, retain=True)
            self._net.sent(self._client)
            return True

    def publish_command_result(self, command_id: str, payload: Mapping[str, Any]) -> None:
        """Kept in the outbox until the broker has it; sent on this link or the next."""
        reply = Reply(
            uuid.uuid4().hex,
            self.topics.command_result(command_id),
            json.dumps(payload, separators=(",", ":")),
            time.time(),
        )
        self.outbox.keep_reply(reply)
        self._hand_pump(_ReplyQueued(reply))

    def alive(self) -> bool:
        return self._net_thread.is_alive()

    def in_flight(self) -> int:
        return len(self._inflight) + len(self._awaiting)

    # -------------------------------------------------------- paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self._last_inbound = time.monotonic()
        self._hand_pump(_Connected(userdata, reason))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self._hand_pump(_Disconnected(userdata, reason))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        # Not evidence of a live link by itself: paho reports QoS 0 messages (heartbeats)
        # here as soon as they are written. An event's PUBACK counts (_handle_puback).
        # paho calls this while _send_lock is held (every call into the client holds it):
        # a plain list will do, and the pump, on this thread, takes it after the read.
        self._acks.append((userdata, mid, reason))

    def _hand_pump(self, item: _PumpItem) -> None:
        """Give the pump an item and make sure it looks soon. From paho's callbacks (the
        network thread itself) nothing more is needed: the pump runs after the loop has
        read everything that arrived, so a burst of PUBACKs is taken in one pass."""
        self._inbox.put(item)
        if threading.get_ident() != self._net_thread.ident:
            self._wake_pump()

    def _wake_pump(self) -> None:
        """The item goes in first and the pump clears the flag before it empties the inbox,
        so a flag still set means the pump has yet to look: one wake-up serves a burst."""
        if not self._wake.is_set():
            self._wake.set()
            self._net.wake()

    def _on_answer(self, client: mqtt.Client, userdata: Any, mid: int, *rest: Any) -> None:
        """SUBACK or UNSUBACK (a probe's answer): the broker is there."""
        self._last_inbound = time.monotonic()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._last_inbound = time.monotonic()
        try:
            if msg.topic == self.topics.receipts:
                self._hand_pump(_ReceiptArrived(bytes(msg.payload)))
            elif msg.topic.startswith(self.topics.command_prefix):
                self.on_command(msg.topic[len(self.topics.command_prefix) :], bytes(msg.payload))
        except Exception:  # never let an exception reach paho's loop
            log.exception("error handling a message on %s", msg.topic)

    # -------------------------------------------------------- network thread

    def _status_payload(self, state: str, connection: int | None = None) -> str:
        body: dict[str, Any] = {
            "state": state,
            "boot": self.boot,
            "connection": self.connection if connection is None else connection,
            "version": __version__,
            "time": utc_iso(time.time()),
        }
        if state == "online":
            body.update(self.status_extra())
        return json.dumps(body, separators=(",", ":"))

    def _network_loop(self) -> None:
        backoff = Backoff(self.mqtt.reconnect_min_delay, self.mqtt.reconnect_max_delay)
        link = 0
        while not self._stopping.is_set():
            link += 1
            client = self._make_client(link)
            # The Last Will carries the connection number it belongs to, so a console can
            # ignore an "offline" that arrives after this device already came back.
            client.will_set(
                self.topics.status,
                self._status_payload("offline", self.connection + 1),
                qos=1,
                retain=True,
            )
            try:
                client.connect(self.mqtt.host, self.mqtt.port, self.mqtt.keepalive)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._note_error(f"cannot connect to {self.mqtt.host}:{self.mqtt.port}: {exc}")
                self._stopping.wait(backoff.next())
                continue
            with self._send_lock:
                self._client, self._client_link = client, link
            rc = mqtt.MQTT_ERR_SUCCESS
            while rc == mqtt.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                # Half a second at most: also the resolution of ack and receipt timeouts.
                rc = self._net.run_once(client, timeout=0.5)
                self._pump()
                if self.connected:
                    backoff.reset()
            with self._send_lock:
                self._sendable = False
            if rc == mqtt.MQTT_ERR_SUCCESS:  # stopping on a client stop() did not see
                with self._send_lock:
                    client.disconnect()
                for _ in range(8):
                    if self._net.run_once(client, timeout=0.25) != mqtt.MQTT_ERR_SUCCESS:
                        break
            self._hand_pump(_Disconnected(link, rc))
            self._pump()  # the link is down: say so now, not after the backoff
            self._stopping.wait(backoff.next())
        self._net.close()

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("%s", text)
        self.last_error = text

    # ------------------------------------------------ the pump (network thread)

    def _pump(self) -> None:
        self._wake.clear()
        try:
            self._pump_once()
        except Exception:  # the network thread must never die
            log.exception("publisher pump error")
            time.sleep(0.1)

    def _pump_once(self) -> None:
        releases: list[str] = []
        items = []
        with self._send_lock:  # a direct send's PUBACK and its record are drained in one pass
            acks, self._acks = self._acks, []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        # PUBACKs first: everything else in the inbox (a connection's end, the next one)
        # came after them, except the records of direct sends, which may be read after.
        early_acks: dict[int, ReasonCode] = {}
        for link, mid, reason in acks:
            if link != self._link:
                continue  # from a connection the pump has already left behind
            if mid in self._by_mid or mid in self._reply_mids:
                self._handle_puback(mid, reason, releases)
            else:  # a direct send acknowledged before its record was read
                early_acks[mid] = reason
        receipts: list[bytes] = []
        for item in items:
            match item:
                case _Published(link=self._link):
                    if self._record(item.info, item.row) and item.info.mid in early_acks:
                        self._handle_puback(item.info.mid, early_acks.pop(item.info.mid), releases)
                case _ReceiptArrived():
                    # Judged after this pass's records: a receipt for a direct send can
                    # overtake its record into the inbox, never out of the drain.
                    receipts.append(item.payload)
                case _ReleaseStored():
                    self._releasing.difference_update(item.ids)
                case _ReplyQueued():
                    self._replies[item.reply.id] = item.reply
                case _Connected():
                    self._handle_connack(item.reason, item.link)
                case _Disconnected(link=self._link):
                    self._handle_disconnect(item.reason)
                # anything else came from a connection the pump has already left behind
        for payload in receipts:
            self._handle_receipt(payload, releases)
        if releases:
            self._release(releases)
        if not self.connected:
            return
        self._expire()
        if self._link_dead():
            return
        self._fill_window()
        self._send_replies()

    def _link_dead(self) -> bool:
        """Probe a silent broker while events wait; shut a link down that stays silent.

        Shutting the socket down makes paho's loop see the connection end at once; the
        network thread then reconnects as after any other loss."""
        if not (self._inflight or self._awaiting):
            self._probe_sent_at = None
            return False
        now = time.monotonic()
        silent = now - self._last_inbound
        probe = self._probe_sent_at
        if probe is not None and self._last_inbound >= probe:
            probe = self._probe_sent_at = None  # answered
        if silent >= self.mqtt.link_timeout and probe is not None and now - probe >= _PROBE_GRACE:
            self.counters["link_timeouts"] += 1
            log.warning(
                "no answer from the broker for %.1f s while %d events wait; re-opening the link",
                silent,
                self.in_flight(),
            )
            self._probe_sent_at = None
            with self._send_lock:
                sock = self._client.socket() if self._client is not None else None
            if isinstance(sock, socket.socket):  # TLS sockets too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return True
        if silent >= _PROBE_AFTER and probe is None:
            with self._send_lock:
                if self._client is not None:
                    self._client.unsubscribe(self._probe_topic)
            self._probe_sent_at = now
        return False

    def _handle_connack(self, reason: ReasonCode, link: int) -> None:
        if reason.is_failure:
            self._note_error(f"broker refused the connection: {reason}")
            return
        self._link = link
        self.connected = True
        self.last_error = None
        self.connection += 1
        self.counters["connects"] += 1
        self.outbox.set_meta("connection", self.connection)
        log.info(
            "connected to %s:%d (connection %d)", self.mqtt.host, self.mqtt.port, self.connection
        )
        # Whatever was unconfirmed on the last connection goes out again from the outbox,
        # critical first then oldest first (its client, with paho's copies, is gone).
        self._by_mid.clear()
        self._inflight.clear()
        self._awaiting.clear()
        self._reply_mids.clear()
        self.window.restart()
        self._cursor = _START
        self._db_exhausted = False
        self._probe_sent_at = None
        with self._send_lock:
            self._criticals_caught_up = False
            # A later connection may already be up: then its own item enables sends.
            current = link == self._client_link and self._client is not None
            self._sendable = current
            if current:
                assert self._client is not None
                self._client.subscribe([(self.topics.receipts, 1), (self.topics.commands, 1)])
                self._client.publish(
                    self.topics.status, self._status_payload("online"), qos=1, retain=True
                )
        self.on_link_change(True)

    def _handle_disconnect(self, reason: Any) -> None:
        if not self.connected:
            return
        self.connected = False
        self.counters["disconnects"] += 1
        log.warning("disconnected from broker: %s", reason)
        self.on_link_change(False)

    def _handle_puback(self, mid: int, reason: ReasonCode, releases: list[str]) -> None:
        reply = self._reply_mids.pop(mid, None)
        if reply is not None:
            if reason.is_failure:
                log.error("broker rejected a command result: %s (will retry)", reason)
            elif self._replies.pop(reply[0], None) is not None:
                self.outbox.drop_reply(reply[0])
            return
        sent = self._by_mid.pop(mid, None)
        if sent is None:
            return
        self._last_inbound = time.monotonic()
        if self._inflight.get(sent.row_id) == mid:
            del self._inflight[sent.row_id]
        if reason.is_failure:
            self.counters["rejected"] += 1
            log.error("broker rejected event %s: %s (will retry)", sent.row_id, reason)
            return
        if self.receipt_mode:
            if sent.row_id not in self._releasing:
                self._awaiting[sent.row_id] = sent
        else:
            releases.append(sent.row_id)
            self.window.confirmed(time.monotonic() - sent.sent)
            self.stats.add(time.time() - sent.accepted)

    def _handle_receipt(self, payload: bytes, releases: list[str]) -> None:
        """Release the named events that went out on this link and still wait for it.

        A receipt naming anything else (an event not sent yet, one from an earlier link,
        an unknown id) releases nothing: it may be forged, and releasing an event the
        centre never had would lose it. Such ids are counted; a receipt for an event
        released a moment ago (a duplicate, or one following the PUBACK in broker mode)
        is not."""
        try:
            ids = json.loads(payload)["ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError("ids must be a list of strings")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            self.counters["receipts_malformed"] += 1
            log.warning("ignoring malformed receipt on %s: %s", self.topics.receipts, exc)
            return
        now = time.time()
        ignored = 0
        for event_id in ids:
            sent = self._awaiting.pop(event_id, None)
            mid = self._inflight.pop(event_id, None)
            if mid is not None:
                sent = self._by_mid.pop(mid, None) or sent
            if sent is None:
                if event_id not in self._recently_released and event_id not in releases:
                    ignored += 1
                continue
            self.window.confirmed(time.monotonic() - sent.sent)
            self.stats.add(now - sent.accepted)
            releases.append(event_id)
        if ignored:
            self.counters["receipt_ids_ignored"] += ignored
            log.warning(
                "ignored %d receipt id(s) on %s naming no event in flight on this link "
                "(not sent yet, unknown or forged)",
                ignored,
                self.topics.receipts,
                extra={"repeat_key": "receipt ids ignored"},
            )

    def _release(self, ids: list[str]) -> None:
        self._releasing.update(ids)
        for event_id in ids:
            self._recently_released[event_id] = None
        while len(self._recently_released) > _RECENTLY_RELEASED:
            self._recently_released.popitem(last=False)
        self.counters["confirmed"] += len(ids)
        self.outbox.release(ids)
        with self._live_lock:
            emissions = [self._live.pop(i, None) for i in ids]
        for emission in emissions:
            if emission is not None:
                emission.mark_delivered()

    def _expire(self) -> None:
        now = time.monotonic()
        resend_from: tuple[int, int] | None = None
        ack_cutoff = now - self.mqtt.ack_timeout
        for mid, sent in list(self._by_mid.items()):
            if sent.sent >= ack_cutoff:
                break  # entries go in as they are sent: the rest are younger still
            del self._by_mid[mid]
            self._inflight.pop(sent.row_id, None)
            resend_from = sent.key if resend_from is None else min(resend_from, sent.key)
        receipt_cutoff = now - self.mqtt.receipt_timeout
        for event_id, sent in list(self._awaiting.items()):
            if sent.sent < receipt_cutoff:
                del self._awaiting[event_id]
                resend_from = sent.key if resend_from is None else min(resend_from, sent.key)
        if resend_from is not None:
            self.counters["resent"] += 1
            self._rewind(resend_from)
        for mid, (_, sent_at) in list(self._reply_mids.items()):
            if sent_at < ack_cutoff:  # sent again by the next _send_replies
                del self._reply_mids[mid]

    def _rewind(self, key: tuple[int, int]) -> None:
        """Make the next fill look at ``key`` and everything after it again."""
        with self._rewind_lock:
            self._rewind_to = key if self._rewind_to is None else min(self._rewind_to, key)

    def _fill_window(self) -> None:
        with self._rewind_lock:
            rewind, self._rewind_to = self._rewind_to, None
        if rewind is not None:
            self._cursor = min(self._cursor, (rewind[0], rewind[1] - 1))
            self._db_exhausted = False
        while not self._db_exhausted and self.connected:
            room = self.window.size - len(self._inflight) - len(self._awaiting)
            if room <= 0 or (room < self.window.size // 8 and self._cursor[0] > Priority.CRITICAL):
                return  # refill in batches: one read for many events, not one per PUBACK
            rows = self.outbox.fetch_pending(self._cursor, room, self._busy)
            if not self._send_batch(rows):
                return  # the link went; the next CONNACK starts over from the top
            if len(rows) < room:
                self._db_exhausted = True
            if self._db_exhausted or self._cursor[0] > Priority.CRITICAL:
                with self._send_lock:
                    self._criticals_caught_up = True

    def _busy(self, event_id: str) -> bool:
        """In flight, waiting for a receipt, or released but not yet stored as such: not to
        be read for sending again (only rows behind the cursor can be, after a rewind)."""
        return (
            event_id in self._inflight or event_id in self._awaiting or event_id in self._releasing
        )

    def _send_batch(self, rows: list[PendingRow]) -> bool:
        """Publish ``rows`` in order (False: no link to send them on).

        Queued, not written one by one as other threads' publishes are: this is the network
        thread, which writes the whole batch as soon as the pass is over. Paho queues when an
        external loop is registered for writing, so one is registered for the batch."""
        with self._send_lock:
            client = self._client
            if not self._sendable or client is None:
                return False
            client.on_socket_register_write = _queue_only
            try:
                for row in rows:
                    info = client.publish(self.topics.event(row.kind), row.body, qos=1)
                    self._held_criticals.pop(row.id, None)
                    self._record(info, row)
                    self._cursor = row.key
            finally:
                client.on_socket_register_write = None
        return True

    def _send_replies(self) -> None:
        """Command results not yet taken by the broker, after this pass's events."""
        waiting = {reply_id for reply_id, _ in self._reply_mids.values()}
        for reply in list(self._replies.values()):
            if reply.id in waiting:
                continue
            with self._send_lock:
                if not self._sendable or self._client is None:
                    return
                info = self._client.publish(reply.topic, reply.body, qos=1)
            self._reply_mids[info.mid] = (reply.id, time.monotonic())

    def _record(self, info: mqtt.MQTTMessageInfo, row: PendingRow) -> bool:
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish of %s failed: %s", row.id, mqtt.error_string(info.rc))
            return False
        sent = _Unconfirmed(row.id, row.key, row.accepted, time.monotonic())
        old = self._inflight.get(row.id)
        if old is not None:
            self._by_mid.pop(old, None)
            self.counters["resent"] += 1
        self._by_mid[info.mid] = sent
        self._inflight[row.id] = info.mid
        self.counters["sent"] += 1
        return True
