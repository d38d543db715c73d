"""The receiver service: MQTT in, durable store, receipts out.

Threads:

* paho's network thread only queues each message (an exception in a paho
  callback can kill that thread, so nothing else happens there);
* the **writer** thread takes whatever has queued up (at most ``batch_max``),
  lets :class:`~central.intake.Intake` decide what it means, commits it in one
  transaction (holding those devices against other receivers and reading their
  state from the store), and only then publishes the receipts (``{"ids": [...]}`` per
  device) and acknowledges the MQTT messages (manual PUBACK). A receiver killed
  at any point therefore loses nothing: what was not committed is neither
  receipted nor PUBACKed, so the broker redelivers it on reconnect (persistent
  session) and the device re-sends it after its receipt timeout. Ids make the
  second copy harmless. Supervision runs on the same thread every
  ``check_every`` seconds, in the receiver holding the store's ``supervision``
  lease (one at a time; another takes over when its lease runs out);
* the optional DC-09 bridge (:mod:`central.bridge`) forwards from the store,
  claiming each forward so that no other receiver's bridge sends it too.

Several receivers share one PostgreSQL store and the devices' topics through an MQTT 5
shared subscription (``[mqtt] share_group``): each message reaches one of them. Every
receiver also gets every ``status`` (retained, for a fresh start) on a plain
subscription; a copy already applied by another receiver changes nothing.

Every message is judged alone (:mod:`central.intake`): one that cannot be stored for
a reason of its own is quarantined, committed and acknowledged like any other, so it
never blocks the messages behind it nor comes back after a restart.

Alarm commands the devices have not confirmed are followed up on the supervising
receiver's writer thread (:meth:`central.alarms.AlarmDesk.follow_up`), whichever
process sent them first.

If the store is down, the batch is kept and retried; nothing is receipted meanwhile.
If the store refuses a batch for what is in it (a value no rule foresaw), the
messages are judged again one by one from the store's state and the one refused
is quarantined with the store's reason: only an outage pauses intake.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backoff import Backoff
from agent.mqttloop import disconnect_and_stop
from central.alarms import AlarmDesk, MqttCommander, Signing, unsigned
from central.config import ReceiverConfig, ReceiverMQTTConfig
from central.intake import Inbound, Intake, Outcome
from central.store import Batch, Store, open_store

log = logging.getLogger("wardpost.central.receiver")

RECEIPT_CHUNK = 500  # ids per receipt message
#: The lease of the one receiver that supervises the devices and follows up alarm commands.
SUPERVISION_LEASE = "supervision"


@dataclass
class ReceiverStats:
    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    receipts: int = 0
    batches: int = 0
    store_errors: int = 0
    store_refusals: int = 0
    connects: int = 0
    supervising: bool = False  # holds the supervision lease now


def make_client(
    config: ReceiverMQTTConfig,
    client_id: str,
    *,
    persistent: bool,
    manual_ack: bool = False,
    password: str | None = None,
) -> mqtt.Client:
    """A paho 2.x client for the centre side, with TLS and credentials from the config."""
    v5 = config.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    client.reconnect_delay_set(1, 5)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    if config.username:
        client.username_pw_set(config.username, password)
    if config.tls.enabled:
        client.tls_set(
            ca_certs=config.tls.ca_file or None,
            certfile=config.tls.cert_file or None,
            keyfile=config.tls.key_file or None,
        )
        client.tls_insecure_set(not config.tls.server_hostname_check)
    return client


def command_signer(config: ReceiverConfig) -> Signing:
    """Signs with ``[commands] signing_key`` (the centre's Ed25519 key), or not at all."""
    if not config.commands.signing_key:
        return unsigned
    from agent.security import Signer

    return Signer.from_file(config.commands.signing_key).sign


def connect(client: mqtt.Client, config: ReceiverMQTTConfig, *, persistent: bool) -> None:
    """Start connecting (asynchronously; paho keeps reconnecting)."""
    properties = None
    if config.protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = config.session_expiry if persistent else 0
    client.connect_async(
        config.host,
        config.port,
        keepalive=config.keepalive,
        clean_start=not persistent if config.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    client.loop_start()


class Receiver:
    """Subscribes, stores, receipts, supervises. ``start()``/``stop()``; thread-safe to query."""

    def __init__(self, config: ReceiverConfig, store: Store | None = None):
        self.config = config
        self.store = store if store is not None else open_store(config.store)
        self._own_store = store is None
        try:
            self.store.claim_receiver()
        except Exception:
            if self._own_store:
                self.store.close()
            raise
        self.name = config.mqtt.client_id  # unique among the broker's clients, so among us
        self.stats = ReceiverStats()
        self.intake = Intake(config, self.store.devices(), self.store.known_ids)
        self.connected = threading.Event()
        self._inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._writer = threading.Thread(
            target=self._write_loop, name="receiver-writer", daemon=True
        )
        self._listeners: list[Callable[[Outcome], None]] = []
        self._refusal = ""  # why the store last refused a batch
        mq = config.mqtt
        # One receiver keeps a persistent session: the broker holds what arrives while it
        # restarts. A member of a share group must not: the broker would go on handing a
        # dead member its share of the messages (heartbeats too, so live devices would look
        # lost). Its session ends with its connection; what it had not acknowledged the
        # devices send again, since nothing was receipted.
        self._persistent = not mq.share_group
        self.client = make_client(
            mq,
            mq.client_id,
            persistent=self._persistent,
            manual_ack=True,
            password=config.password(),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        # Connected means subscribed: a message published before the SUBACK would be missed.
        self.client.on_subscribe = lambda *_: self.connected.set()
        self.bridge: Any = None
        if config.dc09.enabled:
            from central.bridge import Dc09Bridge

            self.bridge = Dc09Bridge(config, self.store, self.name)
        self.desk = AlarmDesk(self.store, self.commander())

    def commander(self) -> MqttCommander:
        """Commands over the receiver's connection, signed if ``[commands] signing_key`` is set."""
        return MqttCommander(
            self.client, self.config.mqtt.topic_prefix, command_signer(self.config)
        )

    def on_committed(self, listener: Callable[[Outcome], None]) -> None:
        """Call ``listener(outcome)`` on the writer thread after each committed batch."""
        self._listeners.append(listener)

    # --- lifecycle ---
    def start(self) -> Receiver:
        self._writer.start()
        connect(self.client, self.config.mqtt, persistent=self._persistent)
        if self.bridge is not None:
            self.bridge.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Commit and receipt what has arrived, disconnect.

        A receiver with its own persistent session stays subscribed: the broker keeps
        queueing what devices send while it restarts, and a message that arrives now and
        is not committed is never acknowledged, so the broker hands it over again on the
        next connection. A member of a share group leaves the group first, so that the
        others take the new messages at once."""
        if self.config.mqtt.share_group:
            self.client.unsubscribe(self._filters())
        self._stopping.set()
        self._writer.join(timeout=timeout)
        if self.bridge is not None:
            self.bridge.stop()
        if self.stats.supervising:  # hand supervision over now rather than when the lease ends
            self.store.release_lease(SUPERVISION_LEASE, self.name)
        disconnect_and_stop(self.client)
        if self._own_store:
            self.store.close()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    # --- paho callbacks: queue only ---
    def _filters(self) -> list[str]:
        mq = self.config.mqtt
        shared = f"$share/{mq.share_group}/" if mq.share_group else ""
        return [
            f"{shared if rest != 'status' else ''}{mq.topic_prefix}/{site}/+/{rest}"
            for site in mq.sites or ["+"]
            for rest in ("events/#", "status", "heartbeat", "cmd_result/+")
        ]

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        try:
            if reason.is_failure:
                log.error("broker refused the connection: %s", reason)
                return
            self.stats.connects += 1
            client.subscribe([(f, 1) for f in self._filters()])
            log.info(
                "connected to %s:%d, subscribed to %s",
                self.config.mqtt.host,
                self.config.mqtt.port,
                ", ".join(self._filters()),
            )
        except Exception:  # never let an exception kill paho's thread
            log.exception("on_connect failed")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put(
                Inbound(msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos, msg.retain)
            )
        except Exception:
            log.exception("could not queue a message on %s", msg.topic)

    # --- the writer ---
    def _write_loop(self) -> None:
        sup = self.config.supervision
        next_check = time.monotonic() + sup.check_every
        while True:
            messages: list[Inbound] = []
            try:
                messages.append(
                    self._inbox.get(
                        timeout=max(0.0, min(sup.check_every, next_check - time.monotonic()))
                    )
                )
                while len(messages) < self.config.store.batch_max:
                    messages.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if not messages and self._stopping.is_set():
                return
            try:
                self._cycle(messages, supervise=time.monotonic() >= next_check)
            except Exception:  # a bug must not silently end the only writer
                log.exception("receiver cycle failed; retrying")
                time.sleep(0.5)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + sup.check_every

    def _cycle(self, messages: list[Inbound], supervise: bool) -> None:
        now = time.time()
        outcome = self._commit(messages, now, report_quarantined=supervise)
        if outcome is None:
            outcome = self._one_by_one(messages, now)
        self._receipt(outcome)
        for msg in messages:
            if msg.qos > 0:
                self.client.ack(msg.mid, msg.qos)
        self.stats.messages += len(messages)
        self.stats.stored += sum(1 for e in outcome.batch.events if e.origin == "device")
        self.stats.duplicates += outcome.duplicates
        self.stats.quarantined += len(outcome.batch.quarantined)
        self.stats.batches += 1
        for listener in self._listeners:
            try:
                listener(outcome)
            except Exception:
                log.exception("on_committed listener failed")
        if self.bridge is not None and outcome.batch.forwards:
            self.bridge.wake()
        if supervise:  # after the acknowledgements: a failure here must not hold messages back
            self._supervise(now)

    def _supervise(self, now: float) -> None:
        """If this receiver holds (or can take) the supervision lease: lost devices, open
        sequence holes, unconfirmed alarm commands."""
        sup = self.config.supervision
        self.stats.supervising = self.store.hold_lease(SUPERVISION_LEASE, self.name, sup.lease)
        if not self.stats.supervising:
            return
        due = self.store.supervision_due(now, sup.lost_after, sup.default_interval, sup.gap_timeout)
        if due:
            with self.store.devices_locked(due) as stored:
                batch = Batch()
                self.intake.supervise(now, batch, self.intake.refresh(due, stored))
                self.store.write(batch)
        self._follow_up(now)

    def _follow_up(self, now: float) -> None:
        commands = self.config.commands
        for alarm in self.desk.follow_up(now, commands.retry_every, commands.confirm_within):
            log.warning(
                "%s/%s: alarm %s (%s): %s",
                alarm.site,
                alarm.device,
                alarm.id,
                alarm.kind,
                alarm.at_device,
            )

    def _commit(
        self,
        messages: list[Inbound],
        now: float,
        *,
        report_quarantined: bool = False,
        quarantine_for: str = "",
    ) -> Outcome | None:
        """Judge ``messages`` against their devices' stored state and commit the outcome,
        holding those devices against the other receivers meanwhile; retried while the store
        is down (nothing is receipted before). ``quarantine_for``: quarantine them all with
        this reason instead. None: the store refused the batch for what is in it."""
        retry = Backoff(0.1, 10.0)
        while True:
            try:
                keys = self.intake.device_keys(messages)
                with self.store.devices_locked(keys) as stored:
                    self.intake.refresh(keys, stored)
                    if quarantine_for:
                        outcome = Outcome()
                        for msg in messages:
                            outcome.merge(self.intake.quarantined(msg, quarantine_for, now))
                    else:
                        outcome = self.intake.process(messages, now)
                    if report_quarantined:
                        self.intake.report_quarantined(now, outcome.batch)
                    self.store.write(outcome.batch)
                return outcome
            except Exception as exc:
                if self.store.refuses(exc):
                    self.stats.store_refusals += 1
                    self._refusal = f"the store refused it ({type(exc).__name__}: {exc})"
                    log.error("%s", self._refusal)
                    return None
                self.stats.store_errors += 1
                delay = retry.next()
                log.error(
                    "store write failed (%s); nothing receipted, retrying in %.1f s", exc, delay
                )
                if self._stopping.is_set() and retry.failures > 6:  # ≈ 6 s of retries
                    raise
                time.sleep(delay)
                try:
                    self.store.reconnect()
                except ConnectionError as again:
                    log.error("%s", again)

    def _one_by_one(self, messages: list[Inbound], now: float) -> Outcome:
        """Each message of a refused batch alone, from the state the store holds; the one the
        store refuses again is quarantined with its reason."""
        total = Outcome()
        for msg in messages:
            one = self._commit([msg], now)
            if one is None:
                one = self._commit([msg], now, quarantine_for=self._refusal)
            if one is None:  # not even its quarantine row: log it, let it go
                log.error("dropped a message on %s the store refuses to keep", msg.topic)
                continue
            total.merge(one)
        return total

    def _receipt(self, outcome: Outcome) -> None:
        prefix = self.config.mqtt.topic_prefix
        for (site, device), ids in outcome.receipts.items():
            for start in range(0, len(ids), RECEIPT_CHUNK):
                body = json.dumps(
                    {"ids": ids[start : start + RECEIPT_CHUNK]}, separators=(",", ":")
                )
                self.client.publish(f"{prefix}/{site}/{device}/receipts", body, qos=1)
                self.stats.receipts += 1
