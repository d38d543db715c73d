"""agent.mqttloop.NetworkLoop against a real broker: publishes from other threads are written
on those threads, and what a full socket buffer leaves behind is written by the loop."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.mqttloop import NetworkLoop
from agent.testing.agent import DEADLINE, wait_until
from agent.testing.broker import Broker


def test_publishes_from_another_thread_all_arrive_even_past_a_full_socket_buffer(
    broker: Broker,
) -> None:
    lock = threading.RLock()
    loop = NetworkLoop(lock)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="mqttloop-test", protocol=mqtt.MQTTv5
    )
    acked: list[int] = []
    client.on_publish = lambda c, u, mid, rc, p: acked.append(mid)
    stop = threading.Event()
    client.connect(broker.host, broker.port, 30)

    def run() -> None:
        while not stop.is_set():
            if loop.run_once(client, timeout=0.5) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert wait_until(client.is_connected, DEADLINE)
        # 200 × 64 KiB from this thread: far more than a loopback socket buffer takes at once,
        # so some publishes find it full and leave bytes behind for the loop to write.
        body = b"x" * 65536
        with lock:
            for _ in range(200):
                client.publish("mqttloop/test", body, qos=1)
                loop.sent(client)
        assert wait_until(lambda: len(acked) == 200, DEADLINE), f"{len(acked)} of 200 acked"
    finally:
        stop.set()
        with lock:
            client.disconnect()
        loop.wake()
        thread.join(5)
        loop.close()
