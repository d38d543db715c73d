"""A device that speaks the wire contract, for tests, benchmarks and demos of the receiver.

It is not the edge agent: no outbox, no drivers. It publishes events
(``events/<kind>``, QoS 1, with ``id``, ``seq``, ``time``...), a retained
``status`` with a Last Will carrying its ``(boot, connection)``, heartbeats, and
keeps every event until the centre's receipt names it, re-sending after
``resend_after`` seconds and after every reconnect, as the agent does with
``delivery = "receipt"``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.event import utc_iso, uuid7
from agent.mqttloop import disconnect_and_stop


class SimulatedDevice:
    """One simulated edge device on its own MQTT connection."""

    def __init__(
        self,
        host: str,
        port: int,
        site: str,
        device: str,
        *,
        prefix: str = "wardpost",
        boot: int = 1,
        resend_after: float = 2.0,
        heartbeat_interval: float | None = None,
        clock: Callable[[], float] = time.time,
        answer_commands: bool = False,
    ):
        self.site, self.device, self.boot = site, device, boot
        self.base = f"{prefix}/{site}/{device}"
        self.host, self.port = host, port
        self.resend_after = resend_after
        self.heartbeat_interval = heartbeat_interval
        self.clock = clock
        self.answer_commands = answer_commands  # publish an ok cmd_result, as the agent does
        self.connection = 0
        self.seq = 0
        self.pending: dict[str, tuple[str, str, float]] = {}  # id -> (topic, body, last sent)
        self.receipted: set[str] = set()
        self.receipt_times: dict[str, float] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.client = self._new_client()
        self._thread = threading.Thread(target=self._tick, name=f"sim-{device}", daemon=True)

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{self.site}-{self.device}",
            protocol=mqtt.MQTTv5,
        )
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(1, 1)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = lambda *a: self._connected.clear()
        return client

    def _status(self, state: str, connection: int) -> str:
        return json.dumps(
            {
                "state": state,
                "boot": self.boot,
                "connection": connection,
                "version": "sim",
                "drivers": ["sim"],
                "config": "0",
                "backlog": len(self.pending),
                "time": utc_iso(self.clock()),
            }
        )

    def start(self, timeout: float = 10.0) -> SimulatedDevice:
        self.client.will_set(
            f"{self.base}/status", self._status("offline", self.connection + 1), qos=1, retain=True
        )
        self.client.connect(self.host, self.port, keepalive=5)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"simulated device {self.device} did not connect")
        self._thread.start()
        return self

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connection += 1
        client.will_set(
            f"{self.base}/status", self._status("offline", self.connection + 1), qos=1, retain=True
        )
        client.subscribe([(f"{self.base}/receipts", 1), (f"{self.base}/cmd/+", 1)])
        client.publish(
            f"{self.base}/status", self._status("online", self.connection), qos=1, retain=True
        )
        self._connected.set()
        with self._lock:
            for topic, body, _ in self.pending.values():  # what was not receipted goes again
                client.publish(topic, body, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
            if msg.topic.endswith("/receipts"):
                now = time.time()
                with self._lock:
                    for event_id in body.get("ids", []):
                        if self.pending.pop(event_id, None) is not None:
                            self.receipt_times[event_id] = now
                        self.receipted.add(event_id)
            else:
                name = msg.topic.rsplit("/", 1)[1]
                self.commands.append((name, body))
                if self.answer_commands:
                    result = {
                        "id": body["id"],
                        "name": name,
                        "ok": True,
                        "result": {"simulated": True},
                        "error": None,
                        "handled_by": ["sim"],
                        "time": utc_iso(self.clock()),
                    }
                    client.publish(
                        f"{self.base}/cmd_result/{body['id']}", json.dumps(result), qos=1
                    )
        except Exception:  # a bad message must not kill paho's thread
            return

    def event(
        self,
        kind: str,
        priority: str = "normal",
        payload: dict[str, Any] | None = None,
        *,
        seq: int | None = None,
        test: bool = False,
        source: str = "sim",
    ) -> str:
        """Publish one event; returns its id. ``seq`` overrides the counter (to make gaps)."""
        with self._lock:
            self.seq = self.seq + 1 if seq is None else seq
            event_id = uuid7()
            body = json.dumps(
                {
                    "schema": 1,
                    "id": event_id,
                    "site": self.site,
                    "device": self.device,
                    "source": source,
                    "kind": kind,
                    "priority": priority,
                    "time": utc_iso(self.clock()),
                    "boottime": time.monotonic(),
                    "boot_id": "sim",
                    "seq": self.seq,
                    "test": test,
                    "payload": payload or {},
                },
                separators=(",", ":"),
            )
            topic = f"{self.base}/events/{kind}"
            self.pending[event_id] = (topic, body, time.monotonic())
        self.client.publish(topic, body, qos=1)
        return event_id

    def heartbeat(self, backlog: int | None = None, interval: float | None = None) -> None:
        count = len(self.pending) if backlog is None else backlog
        body = {
            "uptime": 1.0,
            "interval": interval or self.heartbeat_interval or 30.0,
            "backlog": {"count": count, "oldest_age": 0.0},
            "drivers": {"sim": {"state": "ok"}},
            "boot": self.boot,
            "connection": self.connection,
            "time": utc_iso(self.clock()),
        }
        self.client.publish(f"{self.base}/heartbeat", json.dumps(body), qos=1)

    def _tick(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            if self.heartbeat_interval and now >= next_beat:
                self.heartbeat()
                next_beat = now + self.heartbeat_interval
            if not self._connected.is_set():
                continue
            with self._lock:
                # ``pending`` is in the order of sending (a re-sent event moves to the end), so
                # only its due head is looked at: a backlog of thousands costs nothing per tick.
                due = []
                for event_id, (topic, body, sent) in self.pending.items():
                    if now - sent < self.resend_after:
                        break
                    due.append((event_id, topic, body))
                for event_id, topic, body in due:
                    del self.pending[event_id]
                    self.pending[event_id] = (topic, body, now)
            for _, topic, body in due:
                self.client.publish(topic, body, qos=1)

    def wait_receipted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.pending:
                    return True
            time.sleep(0.02)
        return False

    def stop(self, clean: bool = True) -> None:
        """``clean``: publish ``stopped``, disconnect; else drop the socket so the Will fires."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if clean:
            self.client.publish(
                f"{self.base}/status", self._status("stopped", self.connection), qos=1, retain=True
            ).wait_for_publish(2)
            disconnect_and_stop(self.client)
        else:
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()
