"""Prometheus exposition: rendering, the agent's numbers, and a real scrape over loopback."""

from __future__ import annotations

import math
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator

import pytest

from agent.config import ConfigError, MetricsConfig, parse_section
from agent.driver import Health
from agent.metrics import (
    CONTENT_TYPE,
    Histogram,
    LabelledCounter,
    Metric,
    MetricsServer,
    agent_metrics,
    counter,
    gauge,
    render,
)
from agent.status import AgentStatus, Backlog, DriverStatus, Heartbeat, Link

# One exposition line: comment, or name{labels} value.
_SAMPLE = re.compile(
    r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|\+Inf|-Inf)"
)


def parse(text: str) -> dict[str, float]:
    """Sample lines as {'name{labels}': value}, checking every line is well formed."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert _SAMPLE.fullmatch(line), line
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


# ---------------------------------------------------------------- rendering


def test_render_counter_gauge_and_escaping() -> None:
    text = render(
        [
            counter("demo_total", "A counter.\nSecond line \\ ok", 3),
            gauge("demo_state", "Labelled.", {("gate 1", 'say "hi"\n'): 1.5}, ("driver", "note")),
        ]
    )
    assert text == (
        "# HELP demo_total A counter.\\nSecond line \\\\ ok\n"
        "# TYPE demo_total counter\n"
        "demo_total 3\n"
        "# HELP demo_state Labelled.\n"
        "# TYPE demo_state gauge\n"
        'demo_state{driver="gate 1",note="say \\"hi\\"\\n"} 1.5\n'
    )
    parse(text)


def test_special_values() -> None:
    text = render([gauge("g", "x", {("a",): math.nan, ("b",): math.inf, ("c",): 1e20}, ("k",))])
    samples = parse(text)
    assert math.isnan(samples['g{k="a"}'])
    assert 'g{k="b"} +Inf' in text
    assert samples['g{k="c"}'] == 1e20


def test_histogram_is_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0, 30.0):
        histogram.observe(value)
    samples = parse(render([histogram.metric("lat_seconds", "Latency.")]))
    assert samples == {
        'lat_seconds_bucket{le="0.1"}': 2,
        'lat_seconds_bucket{le="1"}': 3,
        'lat_seconds_bucket{le="+Inf"}': 5,
        "lat_seconds_sum": pytest.approx(32.65),
        "lat_seconds_count": 5,
    }


def test_histogram_rejects_bad_buckets() -> None:
    with pytest.raises(ValueError, match="ascending"):
        Histogram((1.0, 0.5))


def test_labelled_counter() -> None:
    events = LabelledCounter(("kind", "priority"))
    events.inc("panic.pressed", "critical")
    events.inc("panic.pressed", "critical")
    events.inc("gate.alarm", "high", amount=3)
    with pytest.raises(ValueError, match="expected 2 label values"):
        events.inc("gate.alarm")
    samples = parse(render([events.metric("wardpost_events_total", "Events.")]))
    assert samples == {
        'wardpost_events_total{kind="panic.pressed",priority="critical"}': 2,
        'wardpost_events_total{kind="gate.alarm",priority="high"}': 3,
    }


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


def test_agent_metrics_from_status() -> None:
    latency = Histogram()
    latency.observe(0.02)
    events = LabelledCounter(("kind", "priority"))
    events.inc("panic.pressed", "critical")
    samples = parse(render(agent_metrics(STATUS, latency=latency, events=events)))
    expected = {
        'wardpost_info{version="0.1.0",site="st-marys",device="ed-entrance"}': 1,
        "wardpost_uptime_seconds": 120.5,
        "wardpost_boot": 9,
        "wardpost_link_up": 1,
        "wardpost_in_flight_messages": 2,
        "wardpost_mqtt_connects_total": 3,
        "wardpost_mqtt_disconnects_total": 2,
        'wardpost_mqtt_messages_total{outcome="resent"}': 1,
        "wardpost_backlog_events": 3,
        "wardpost_backlog_oldest_age_seconds": 1.25,
        "wardpost_backlog_in_memory_events": 0,
        'wardpost_outbox_operations_total{operation="committed"}': 41,
        "wardpost_storage_fault": 0,
        'wardpost_commands_total{outcome="rejected"}': 1,
        'wardpost_driver_up{driver="gate1",type="serial_gate"}': 1,
        'wardpost_driver_up{driver="button",type="panic_button"}': 0,
        'wardpost_driver_state{driver="button",state="failed"}': 1,
        'wardpost_driver_state{driver="button",state="ok"}': 0,
        'wardpost_driver_state{driver="gate1",state="degraded"}': 1,
        'wardpost_driver_counter{driver="gate1",counter="frames"}': 7,
        'wardpost_publish_latency_seconds_bucket{le="0.025"}': 1,
        "wardpost_publish_latency_seconds_count": 1,
        'wardpost_events_total{kind="panic.pressed",priority="critical"}': 1,
    }
    for key, value in expected.items():
        assert samples.get(key) == value, key


def test_agent_metrics_of_an_empty_backlog_and_no_drivers() -> None:
    samples = parse(render(agent_metrics(_status(Backlog(0, None, 0), {}, {}))))
    assert samples["wardpost_backlog_oldest_age_seconds"] == 0
    assert samples["wardpost_mqtt_connects_total"] == 0
    assert not any(key.startswith("wardpost_driver_") for key in samples)


# ------------------------------------------------------------------ server


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    calls: list[int] = []

    def snapshot() -> Iterable[Metric]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("outbox closed")
        return agent_metrics(STATUS)

    s = MetricsServer(snapshot, "127.0.0.1", 0)
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
    assert parse(body)["wardpost_backlog_events"] == 3

    # A failing snapshot is a 500 for that scrape only.
    status, _, body = get(server.url)
    assert status == 500 and "RuntimeError" in body
    assert get(server.url)[0] == 200

    assert get(f"http://127.0.0.1:{server.port}/")[0] == 200
    assert get(f"http://127.0.0.1:{server.port}/other")[0] == 404


def test_busy_port_is_a_clear_error(server: MetricsServer) -> None:
    second = MetricsServer(lambda: [], "127.0.0.1", server.port)
    with pytest.raises(OSError, match=rf"cannot listen for metrics on 127.0.0.1:{server.port}"):
        second.start()


def test_stop_releases_the_port() -> None:
    s = MetricsServer(lambda: [gauge("x", "x", 1)], "127.0.0.1", 0)
    s.start()
    port = s.port
    s.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    s = MetricsServer(lambda: [gauge("x", "x", 1)], "::1", 0)
    try:
        s.start()
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert s.url.startswith("http://[::1]:")
        assert parse(get(s.url)[2]) == {"x": 1}
    finally:
        s.stop()
