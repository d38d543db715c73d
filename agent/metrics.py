"""Optional Prometheus metrics on a local port, read from the agent's status on each scrape.

Nothing here runs unless ``[metrics] enabled = true``, and it needs the ``metrics`` extra
(prometheus-client; ``agent.registry.check_metrics_extra`` says so at start-up). On each
``GET /metrics``, :class:`AgentCollector` reads ``status()`` (the same :class:`AgentStatus`
``wardpost status`` prints, so no second bookkeeping can drift from it); only the publish
latency and the events by kind and priority are counted as they happen. The collector is
registered in a private registry, never prometheus-client's global one::

    collector = AgentCollector(agent.status)  # latency.observe(seconds), count_event(event)
    server = MetricsServer(collector, *config.metrics.address)
    server.start()        # raises OSError naming the address if it cannot listen
    ...
    server.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import typing
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.driver import HealthState
from agent.event import Event
from agent.status import AgentStatus, DriverStatus

log = logging.getLogger("wardpost.metrics")

#: The text format generate_latest writes for the agent's names (all legacy-valid).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Publish latency buckets in seconds: milliseconds on a healthy LAN up to
#: minutes for events that waited out a broker outage in the outbox.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_DRIVER_STATES: tuple[str, ...] = typing.get_args(HealthState)
_RUNNING_STATES = ("ok", "degraded")


class AgentCollector(Collector):
    """The agent's metrics: ``status()`` read on each scrape, plus :attr:`latency`
    (``observe(seconds)``) and :meth:`count_event`, which any thread may call."""

    def __init__(self, status: Callable[[], AgentStatus]) -> None:
        self.status = status
        self.latency = Histogram(
            "wardpost_publish_latency_seconds",
            "Time from event creation to broker acknowledgement.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.events = Counter(
            "wardpost_events_total",
            "Events emitted, by kind and priority.",
            ("kind", "priority"),
            registry=None,
        )

    def count_event(self, event: Event) -> None:
        self.events.labels(event.kind, event.priority.label).inc()

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        link, beat = status.link, status.heartbeat
        counts = dict(link.counters)
        yield _labelled(
            GaugeMetricFamily,
            "wardpost_info",
            "Agent identity; the value is always 1.",
            ("version", "site", "device"),
            {(status.version, status.site, status.device): 1},
        )
        yield GaugeMetricFamily(
            "wardpost_uptime_seconds", "Seconds since the agent started.", beat.uptime
        )
        yield GaugeMetricFamily(
            "wardpost_boot", "Agent start counter kept in the outbox.", beat.boot
        )
        yield GaugeMetricFamily(
            "wardpost_link_up", "1 while connected to the broker.", float(link.connected)
        )
        yield GaugeMetricFamily(
            "wardpost_in_flight_messages", "Published, not yet acknowledged.", link.in_flight
        )
        yield CounterMetricFamily(
            "wardpost_mqtt_connects_total",
            "Successful broker connections (reconnects included).",
            counts.pop("connects", 0),
        )
        yield CounterMetricFamily(
            "wardpost_mqtt_disconnects_total", "Broker link losses.", counts.pop("disconnects", 0)
        )
        if counts:
            yield _labelled(
                CounterMetricFamily,
                "wardpost_mqtt_messages_total",
                "Event messages by outcome (sent, confirmed, resent, rejected).",
                ("outcome",),
                {(k,): v for k, v in counts.items()},
            )
        yield GaugeMetricFamily(
            "wardpost_backlog_events", "Events not yet confirmed delivered.", beat.backlog.count
        )
        yield GaugeMetricFamily(
            "wardpost_backlog_oldest_age_seconds",
            "Age of the oldest undelivered event (0 when none).",
            beat.backlog.oldest_age or 0.0,
        )
        yield GaugeMetricFamily(
            "wardpost_backlog_in_memory_events",
            "Events held in RAM because the database is unusable.",
            beat.backlog.in_memory,
        )
        yield GaugeMetricFamily(
            "wardpost_storage_fault",
            "1 while the outbox database is faulty.",
            1.0 if beat.storage_fault else 0.0,
        )
        if status.outbox_counters:
            yield _labelled(
                CounterMetricFamily,
                "wardpost_outbox_operations_total",
                "Outbox rows by operation (committed, released, evicted, ...).",
                ("operation",),
                {(k,): v for k, v in status.outbox_counters.items()},
            )
        if status.commands:
            yield _labelled(
                CounterMetricFamily,
                "wardpost_commands_total",
                "Commands from the centre by outcome.",
                ("outcome",),
                {(k,): v for k, v in status.commands.items()},
            )
        yield from _driver_metrics(beat.drivers)
        for family in (*self.latency.collect(), *self.events.collect()):
            # Without the _created series prometheus-client adds: the agent's series only.
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _labelled(
    kind: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    help: str,
    labels: tuple[str, ...],
    values: Mapping[tuple[str, ...], float],
) -> Metric:
    family = kind(name, help, labels=labels)
    for key, value in values.items():
        family.add_metric(key, value)
    return family


def _driver_metrics(drivers: Mapping[str, DriverStatus]) -> Iterator[Metric]:
    up: dict[tuple[str, ...], float] = {}
    states: dict[tuple[str, ...], float] = {}
    counts: dict[tuple[str, ...], float] = {}
    for name, driver in drivers.items():
        state = driver.health.state
        up[(name, driver.type)] = 1.0 if state in _RUNNING_STATES else 0.0
        for known in dict.fromkeys((*_DRIVER_STATES, state)):
            states[(name, known)] = 1.0 if known == state else 0.0
        for key, value in driver.health.counters.items():
            counts[(name, key)] = float(value)
    yield _labelled(
        GaugeMetricFamily,
        "wardpost_driver_up",
        "1 while the driver runs (state ok or degraded).",
        ("driver", "type"),
        up,
    )
    yield _labelled(
        GaugeMetricFamily,
        "wardpost_driver_state",
        "1 for the driver's current state.",
        ("driver", "state"),
        states,
    )
    if counts:
        yield _labelled(
            GaugeMetricFamily,
            "wardpost_driver_counter",
            "Counters reported by each driver.",
            ("driver", "counter"),
            counts,
        )


# ------------------------------------------------------------------ server


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stalled client must not pin a thread
    server_version = "wardpost-metrics"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception as exc:  # the agent must survive a bad snapshot
                log.exception("metrics snapshot failed")
                self._reply(500, f"snapshot failed: {type(exc).__name__}\n".encode(), "text/plain")
                return
            self._reply(200, body, CONTENT_TYPE)
        elif path == "/":
            self._reply(200, b"Wardpost agent metrics: /metrics\n", "text/plain")
        else:
            self._reply(404, b"not found; try /metrics\n", "text/plain")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry):
        self.address_family = socket.AF_INET6 if _is_ipv6(address[0]) else socket.AF_INET
        self.registry = registry
        super().__init__(address, _Handler)


class MetricsServer:
    """Serves ``collector`` at ``http://host:port/metrics`` from a daemon thread, through a
    private registry.

    ``port=0`` picks a free port; :attr:`port` holds the real one after :meth:`start`.
    """

    def __init__(self, collector: Collector, host: str = "127.0.0.1", port: int = 9108):
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen and serve; raises OSError naming the address when it cannot listen."""
        try:
            server = _Server((self.host, self.port), self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for metrics on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._thread.start()
        if not _is_loopback(self.host):
            log.warning("metrics are served on %s:%d, beyond this machine", self.host, self.port)
        log.info("metrics on %s", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
