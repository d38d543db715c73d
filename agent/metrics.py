"""Optional Prometheus metrics on a local port, rendered from a snapshot on each scrape.

Nothing here runs unless ``[metrics] enabled = true``. The server is the standard
library's HTTP server in a daemon thread, bound to loopback by default; each
``GET /metrics`` calls a snapshot function and renders the text exposition
format (version 0.0.4), so the numbers are exactly those ``wardpost status``
shows and no second bookkeeping can drift from them::

    latency = Histogram()                       # publisher: latency.observe(seconds)
    events = LabelledCounter(("kind", "priority"))  # emit: events.inc(kind, priority)

    def snapshot() -> list[Metric]:
        return agent_metrics(agent.status(), latency=latency, events=events)  # AgentStatus

    server = MetricsServer(snapshot, *config.address)
    server.start()        # raises OSError naming the address if it cannot listen
    ...
    server.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import typing
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from agent.driver import HealthState
from agent.status import AgentStatus, DriverStatus

log = logging.getLogger("wardpost.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Publish latency buckets in seconds: milliseconds on a healthy LAN up to
#: minutes for events that waited out a broker outage in the outbox.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


# ------------------------------------------------------------------ model

MetricType = Literal["counter", "gauge", "histogram", "untyped"]


@dataclass(frozen=True)
class Metric:
    """One metric family: a name, a type, help text and its samples.

    Each sample is ``(suffix, labels, value)``; the suffix is ``""`` except for a
    histogram's ``_bucket``/``_sum``/``_count`` lines.
    """

    name: str
    type: MetricType
    help: str
    samples: tuple[tuple[str, Mapping[str, str], float], ...] = field(default_factory=tuple)


def counter(
    name: str,
    help: str,
    value: float | Mapping[tuple[str, ...], float] = 0.0,
    labels: Sequence[str] = (),
) -> Metric:
    """A counter (name should end in ``_total``); ``value`` per label tuple when ``labels``."""
    return _simple(name, "counter", help, value, labels)


def gauge(
    name: str,
    help: str,
    value: float | Mapping[tuple[str, ...], float] = 0.0,
    labels: Sequence[str] = (),
) -> Metric:
    """A gauge; ``value`` per label tuple when ``labels`` are given."""
    return _simple(name, "gauge", help, value, labels)


def _simple(
    name: str,
    kind: MetricType,
    help: str,
    value: float | Mapping[tuple[str, ...], float],
    labels: Sequence[str],
) -> Metric:
    if isinstance(value, Mapping):
        samples = tuple(
            ("", dict(zip(labels, key, strict=True)), float(v)) for key, v in value.items()
        )
    else:
        samples = (("", {}, float(value)),)
    return Metric(name, kind, help, samples)


class Histogram:
    """A thread-safe cumulative histogram (``observe`` from any thread)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("histogram buckets must be distinct and ascending")
        self.buckets = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect_left(self.buckets, value)] += 1
            self._sum += value

    def metric(self, name: str, help: str) -> Metric:
        with self._lock:
            counts, total = list(self._counts), self._sum
        samples: list[tuple[str, Mapping[str, str], float]] = []
        running = 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            samples.append(("_bucket", {"le": _number(bound)}, float(running)))
        samples += [("_sum", {}, total), ("_count", {}, float(running))]
        return Metric(name, "histogram", help, tuple(samples))


class LabelledCounter:
    """Thread-safe counts by label values, e.g. events by (kind, priority)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = tuple(labels)
        self._counts: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def inc(self, *values: str, amount: int = 1) -> None:
        if len(values) != len(self.labels):
            raise ValueError(
                f"expected {len(self.labels)} label values {self.labels}, got {values}"
            )
        with self._lock:
            self._counts[values] = self._counts.get(values, 0) + amount

    def snapshot(self) -> dict[tuple[str, ...], int]:
        with self._lock:
            return dict(self._counts)

    def metric(self, name: str, help: str) -> Metric:
        return counter(name, help, {k: float(v) for k, v in self.snapshot().items()}, self.labels)


# -------------------------------------------------------------- exposition


def render(metrics: Iterable[Metric]) -> str:
    """The Prometheus text exposition format for ``metrics``."""
    out: list[str] = []
    for metric in metrics:
        out.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        out.append(f"# TYPE {metric.name} {metric.type}")
        for suffix, labels, value in metric.samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            braces = f"{{{label_text}}}" if label_text else ""
            out.append(f"{metric.name}{suffix}{braces} {_number(value)}")
    return "\n".join(out) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# ------------------------------------------------------------ agent numbers

_DRIVER_STATES: tuple[str, ...] = typing.get_args(HealthState)
_RUNNING_STATES = ("ok", "degraded")


def agent_metrics(
    status: AgentStatus,
    *,
    latency: Histogram | None = None,
    events: LabelledCounter | None = None,
) -> list[Metric]:
    """Metrics from the agent's status (the one ``wardpost status`` prints)."""
    link, beat = status.link, status.heartbeat
    counts = {k: float(v) for k, v in link.counters.items()}
    metrics = [
        gauge(
            "wardpost_info",
            "Agent identity; the value is always 1.",
            {(status.version, status.site, status.device): 1.0},
            ("version", "site", "device"),
        ),
        gauge("wardpost_uptime_seconds", "Seconds since the agent started.", beat.uptime),
        gauge("wardpost_boot", "Agent start counter kept in the outbox.", beat.boot),
        gauge("wardpost_link_up", "1 while connected to the broker.", float(link.connected)),
        gauge("wardpost_in_flight_messages", "Published, not yet acknowledged.", link.in_flight),
        counter(
            "wardpost_mqtt_connects_total",
            "Successful broker connections (reconnects included).",
            counts.pop("connects", 0.0),
        ),
        counter(
            "wardpost_mqtt_disconnects_total", "Broker link losses.", counts.pop("disconnects", 0.0)
        ),
    ]
    if counts:
        metrics.append(
            counter(
                "wardpost_mqtt_messages_total",
                "Event messages by outcome (sent, confirmed, resent, rejected).",
                {(k,): v for k, v in counts.items()},
                ("outcome",),
            )
        )
    metrics += [
        gauge("wardpost_backlog_events", "Events not yet confirmed delivered.", beat.backlog.count),
        gauge(
            "wardpost_backlog_oldest_age_seconds",
            "Age of the oldest undelivered event (0 when none).",
            beat.backlog.oldest_age or 0.0,
        ),
        gauge(
            "wardpost_backlog_in_memory_events",
            "Events held in RAM because the database is unusable.",
            beat.backlog.in_memory,
        ),
        gauge(
            "wardpost_storage_fault",
            "1 while the outbox database is faulty.",
            1.0 if beat.storage_fault else 0.0,
        ),
    ]
    if status.outbox_counters:
        metrics.append(
            counter(
                "wardpost_outbox_operations_total",
                "Outbox rows by operation (committed, released, evicted, ...).",
                {(k,): float(v) for k, v in status.outbox_counters.items()},
                ("operation",),
            )
        )
    if status.commands:
        metrics.append(
            counter(
                "wardpost_commands_total",
                "Commands from the centre by outcome.",
                {(k,): float(v) for k, v in status.commands.items()},
                ("outcome",),
            )
        )
    metrics += _driver_metrics(beat.drivers)
    if latency is not None:
        metrics.append(
            latency.metric(
                "wardpost_publish_latency_seconds",
                "Time from event creation to broker acknowledgement.",
            )
        )
    if events is not None:
        metrics.append(
            events.metric("wardpost_events_total", "Events emitted, by kind and priority.")
        )
    return metrics


def _driver_metrics(drivers: Mapping[str, DriverStatus]) -> list[Metric]:
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
    metrics = [
        gauge(
            "wardpost_driver_up",
            "1 while the driver runs (state ok or degraded).",
            up,
            ("driver", "type"),
        ),
        gauge(
            "wardpost_driver_state",
            "1 for the driver's current state.",
            states,
            ("driver", "state"),
        ),
    ]
    if counts:
        metrics.append(
            gauge(
                "wardpost_driver_counter",
                "Counters reported by each driver.",
                counts,
                ("driver", "counter"),
            )
        )
    return metrics


# ------------------------------------------------------------------ server


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a stalled client must not pin a thread
    server_version = "wardpost-metrics"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = render(self.server.snapshot()).encode("utf-8")
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

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], Iterable[Metric]]):
        self.address_family = socket.AF_INET6 if _is_ipv6(address[0]) else socket.AF_INET
        self.snapshot = snapshot
        super().__init__(address, _Handler)


class MetricsServer:
    """Serves ``snapshot()`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port; :attr:`port` holds the real one after :meth:`start`.
    """

    def __init__(
        self, snapshot: Callable[[], Iterable[Metric]], host: str = "127.0.0.1", port: int = 9108
    ):
        self.snapshot = snapshot
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen and serve; raises OSError naming the address when it cannot listen."""
        try:
            server = _Server((self.host, self.port), self.snapshot)
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
