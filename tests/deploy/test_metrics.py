"""Prometheus metrics: the agent's numbers as the collector exposes them, a real scrape over
loopback, and the error when ``[metrics]`` is enabled without the ``metrics`` extra."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import main
from agent.config import ConfigError, MetricsConfig, parse_section
from agent.driver import Health
from agent.event import Event, Priority
from agent.metrics import CONTENT_TYPE, AgentCollector, MetricsServer
from agent.status import AgentStatus, Backlog, DriverStatus, Heartbeat, Link
from agent.testing.agent import DEADLINE, agent_config, wait_until, write_config
from agent.testing.broker import Broker, free_port
from agent.testing.process import AgentProcess

Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[Key, float]]:
    """The exposition's families as {name: (type, help)} (counters by their ``_total``
    name, as they appear) and its samples as {key(name, **labels): value}."""
    families: dict[str, tuple[str, str]] = {}
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = (family.type, family.documentation)
        for sample in family.samples:
            samples[key(sample.name, **sample.labels)] = sample.value
    return families, samples


def exposition(collector: AgentCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


# ---------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    config = parse_section(MetricsConfig, {}, "metrics")
    assert config == MetricsConfig(enabled=False, listen="127.0.0.1:9108")
    assert config.address == ("127.0.0.1", 9108)
    assert parse_section(MetricsConfig, {"listen": "[::1]:9200"}, "metrics").address == (
        "::1",
        9200,
    )
    for bad, message in [
        ("9108", "expected host:port"),
        ("localhost:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be 1-65535"),
        ("::1:9108", "brackets"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_section(MetricsConfig, {"enabled": True, "listen": bad}, "metrics")
        assert str(info.value).startswith("metrics.listen: "), str(info.value)
        assert message in str(info.value)


CONFIG = """
[agent]
site = "st-marys"
device = "entrance-a"
state_dir = "{state}"

[metrics]
enabled = true
"""


def test_enabled_without_the_extra_names_section_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "wardpost.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err

    # As on a device installed without the extra: prometheus_client cannot be imported.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "agent.metrics")
    capsys.readouterr()
    expected = (
        f"{path}: metrics.enabled: the Prometheus endpoint needs the optional 'metrics' "
        "dependencies, which are not installed (No module named 'prometheus_client'): "
        "install them with sudo scripts/install --extras metrics "
        "(in a checkout: pip install -e '.[metrics]')"
    )
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert main(["--config", str(path), "run"]) == 2
    assert capsys.readouterr().err == f"wardpost: refusing to start: {expected}\n"

    path.write_text(CONFIG.format(state=tmp_path / "state").replace("true", "false"))
    assert main(["check-config", str(path)]) == 0, "disabled: the extra is not needed"


# ------------------------------------------------------------ agent numbers


def _status(
    backlog: Backlog, drivers: dict[str, DriverStatus], link: dict[str, int]
) -> AgentStatus:
    return AgentStatus(
        version="0.1.0",
        site="st-marys",
        device="ed-entrance",
        config_path="/etc/wardpost/wardpost.toml",
        config_digest="abc",
        link=Link(True, "broker:8883", "receipt", "", 2, None, link),
        outbox_path="/var/lib/wardpost/outbox.db",
        outbox_counters={"committed": 41, "evicted": 0},
        commands={"accepted": 2, "rejected": 1},
        heartbeat=Heartbeat(
            uptime=120.5,
            interval=30.0,
            backlog=backlog,
            drivers=drivers,
            transmission={},
            storage_fault=None,
            boot=9,
            connection=3,
            time="2026-11-29T12:00:00Z",
            delivery="receipt",
        ),
    )


STATUS = _status(
    Backlog(count=3, oldest_age=1.25, in_memory=0),
    {
        "gate1": DriverStatus("serial_gate", Health("degraded", "", {"frames": 7})),
        "button": DriverStatus("panic_button", Health("failed", "no pin")),
    },
    {"connects": 3, "disconnects": 2, "sent": 40, "confirmed": 38, "resent": 1},
)

#: Every family the agent exposes, with its type and help text.
FAMILIES = {
    "wardpost_info": ("gauge", "Agent identity; the value is always 1."),
    "wardpost_uptime_seconds": ("gauge", "Seconds since the agent started."),
    "wardpost_boot": ("gauge", "Agent start counter kept in the outbox."),
    "wardpost_link_up": ("gauge", "1 while connected to the broker."),
    "wardpost_in_flight_messages": ("gauge", "Published, not yet acknowledged."),
    "wardpost_mqtt_connects_total": (
        "counter",
        "Successful broker connections (reconnects included).",
    ),
    "wardpost_mqtt_disconnects_total": ("counter", "Broker link losses."),
    "wardpost_mqtt_messages_total": (
        "counter",
        "Event messages by outcome (sent, confirmed, resent, rejected).",
    ),
    "wardpost_backlog_events": ("gauge", "Events not yet confirmed delivered."),
    "wardpost_backlog_oldest_age_seconds": (
        "gauge",
        "Age of the oldest undelivered event (0 when none).",
    ),
    "wardpost_backlog_in_memory_events": (
        "gauge",
        "Events held in RAM because the database is unusable.",
    ),
    "wardpost_storage_fault": ("gauge", "1 while the outbox database is faulty."),
    "wardpost_outbox_operations_total": (
        "counter",
        "Outbox rows by operation (committed, released, evicted, ...).",
    ),
    "wardpost_commands_total": ("counter", "Commands from the centre by outcome."),
    "wardpost_driver_up": ("gauge", "1 while the driver runs (state ok or degraded)."),
    "wardpost_driver_state": ("gauge", "1 for the driver's current state."),
    "wardpost_driver_counter": ("gauge", "Counters reported by each driver."),
    "wardpost_publish_latency_seconds": (
        "histogram",
        "Time from event creation to broker acknowledgement.",
    ),
    "wardpost_events_total": ("counter", "Events emitted, by kind and priority."),
}


def event(kind: str, priority: Priority) -> Event:
    return Event(kind, "test", priority, "st-marys", "ed-entrance", 1)


def test_agent_metrics_from_status() -> None:
    collector = AgentCollector(lambda: STATUS)
    collector.latency.observe(0.02)
    collector.count_event(event("panic.pressed", Priority.CRITICAL))
    families, samples = parse(exposition(collector))
    assert families == FAMILIES
    expected = {
        key("wardpost_info", version="0.1.0", site="st-marys", device="ed-entrance"): 1,
        key("wardpost_uptime_seconds"): 120.5,
        key("wardpost_boot"): 9,
        key("wardpost_link_up"): 1,
        key("wardpost_in_flight_messages"): 2,
        key("wardpost_mqtt_connects_total"): 3,
        key("wardpost_mqtt_disconnects_total"): 2,
        key("wardpost_mqtt_messages_total", outcome="resent"): 1,
        key("wardpost_backlog_events"): 3,
        key("wardpost_backlog_oldest_age_seconds"): 1.25,
        key("wardpost_backlog_in_memory_events"): 0,
        key("wardpost_outbox_operations_total", operation="committed"): 41,
        key("wardpost_storage_fault"): 0,
        key("wardpost_commands_total", outcome="rejected"): 1,
        key("wardpost_driver_up", driver="gate1", type="serial_gate"): 1,
        key("wardpost_driver_up", driver="button", type="panic_button"): 0,
        key("wardpost_driver_state", driver="button", state="failed"): 1,
        key("wardpost_driver_state", driver="button", state="ok"): 0,
        key("wardpost_driver_state", driver="gate1", state="degraded"): 1,
        key("wardpost_driver_counter", driver="gate1", counter="frames"): 7,
        key("wardpost_publish_latency_seconds_bucket", le="0.025"): 1,
        key("wardpost_publish_latency_seconds_count"): 1,
        key("wardpost_events_total", kind="panic.pressed", priority="critical"): 1,
    }
    for k, value in expected.items():
        assert samples.get(k) == value, k
    # Only the agent's series: none of the _created ones prometheus-client would add.
    assert not [k for k in samples if k[0].endswith("_created")]


def test_latency_histogram_and_events_counted() -> None:
    collector = AgentCollector(lambda: STATUS)
    for seconds in (0.004, 0.02, 0.5, 400.0):
        collector.latency.observe(seconds)
    for kind, priority in [("panic.pressed", Priority.CRITICAL)] * 2 + [
        ("gate.alarm", Priority.HIGH)
    ]:
        collector.count_event(event(kind, priority))
    _, samples = parse(exposition(collector))
    buckets = {
        k[1][0][1]: v
        for k, v in samples.items()
        if k[0] == "wardpost_publish_latency_seconds_bucket"
    }
    # The bounds as prometheus-client writes them (and Prometheus 3 normalises them): 1.0, not 1.
    assert list(buckets) == [
        *("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"),
        *("10.0", "30.0", "60.0", "300.0", "+Inf"),
    ]
    assert buckets["0.005"] == 1 and buckets["0.025"] == 2 and buckets["0.5"] == 3
    assert buckets["300.0"] == 3 and buckets["+Inf"] == 4
    assert samples[key("wardpost_publish_latency_seconds_sum")] == pytest.approx(400.524)
    assert samples[key("wardpost_publish_latency_seconds_count")] == 4
    events = {k: v for k, v in samples.items() if k[0] == "wardpost_events_total"}
    assert events == {
        key("wardpost_events_total", kind="panic.pressed", priority="critical"): 2,
        key("wardpost_events_total", kind="gate.alarm", priority="high"): 1,
    }


def test_agent_metrics_of_an_empty_backlog_and_no_drivers() -> None:
    families, samples = parse(
        exposition(AgentCollector(lambda: _status(Backlog(0, None, 0), {}, {})))
    )
    assert samples[key("wardpost_backlog_oldest_age_seconds")] == 0
    assert samples[key("wardpost_mqtt_connects_total")] == 0
    assert "wardpost_mqtt_messages_total" not in families
    assert not any(name.startswith("wardpost_driver_") for name, _ in samples)
    # No events yet: the family is announced without samples.
    assert "wardpost_events_total" in families
    assert not any(name == "wardpost_events_total" for name, _ in samples)


# ------------------------------------------------------------------ server


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    calls: list[int] = []

    def status() -> AgentStatus:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("outbox closed")
        return STATUS

    s = MetricsServer(AgentCollector(status), "127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_scrape_over_loopback(server: MetricsServer) -> None:
    assert server.port != 0
    status, content_type, body = get(server.url)
    assert status == 200
    assert content_type == CONTENT_TYPE
    assert parse(body)[1][key("wardpost_backlog_events")] == 3

    # A failing snapshot is a 500 for that scrape only.
    status, _, body = get(server.url)
    assert status == 500 and "RuntimeError" in body
    assert get(server.url)[0] == 200

    assert get(f"http://127.0.0.1:{server.port}/")[0] == 200
    assert get(f"http://127.0.0.1:{server.port}/other")[0] == 404


def test_busy_port_is_a_clear_error(server: MetricsServer) -> None:
    second = MetricsServer(AgentCollector(lambda: STATUS), "127.0.0.1", server.port)
    with pytest.raises(OSError, match=rf"cannot listen for metrics on 127.0.0.1:{server.port}"):
        second.start()


def test_stop_releases_the_port() -> None:
    s = MetricsServer(AgentCollector(lambda: STATUS), "127.0.0.1", 0)
    s.start()
    port = s.port
    s.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    s = MetricsServer(AgentCollector(lambda: STATUS), "::1", 0)
    try:
        s.start()
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert s.url.startswith("http://[::1]:")
        assert parse(get(s.url)[2])[1][key("wardpost_boot")] == 9
    finally:
        s.stop()


def test_wardpost_run_serves_its_metrics(tmp_path: Path, broker: Broker) -> None:
    """The daemon as systemd runs it: events and publish latency counted as they happen,
    the status read on each scrape, and the port released on a clean stop."""
    port, sock = free_port(), tmp_path / "control.sock"
    doc = agent_config(
        tmp_path,
        broker,
        agent={"control_socket": str(sock)},
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
    )
    agent = AgentProcess(write_config(tmp_path / "wardpost.toml", doc), sock).start()
    try:
        assert agent.emit("panic.pressed", "critical")["ok"]
        url = f"http://127.0.0.1:{port}/metrics"
        samples: dict[Key, float] = {}

        def delivered() -> bool:
            nonlocal samples
            samples = parse(get(url)[2])[1]
            latency = samples.get(key("wardpost_publish_latency_seconds_count"), 0)
            return samples.get(key("wardpost_backlog_events")) == 0 and latency >= 1

        wait_until(delivered, DEADLINE, "the event delivered, as the metrics say")
        assert samples[key("wardpost_events_total", kind="panic.pressed", priority="critical")] == 1
        assert samples[key("wardpost_link_up")] == 1
        assert agent.terminate() == 0, agent.tail()
    finally:
        agent.kill()
    # Released: the next agent listens there again (the scrapes' TIME_WAIT allowed for).
    again = MetricsServer(AgentCollector(lambda: STATUS), "127.0.0.1", port)
    again.start()
    again.stop()
