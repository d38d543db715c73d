"""Log lines: journald priorities, plain timestamps, structured fields, repeats, secrets."""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import (
    RedactSecrets,
    RepeatLimiter,
    flush_repeats,
    redact,
    register_secret,
    setup_logging,
    syslog_priority,
    under_journald,
)
from agent.logs import fields as log_fields
from agent.testing.agent import DEADLINE

log = logging.getLogger("wardpost.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def journal_stream(level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, stream, journal=True)
    return stream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(
    limit: int = 3, window: float = 60.0, **kw: int
) -> tuple[io.StringIO, Clock, logging.Logger]:
    """A private logger whose handler has only a RepeatLimiter with a test clock."""
    stream, clock = io.StringIO(), Clock()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RepeatLimiter(handler.handle, limit, window, clock=clock, **kw))
    logger = logging.getLogger(f"wardpost.test.limited.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return stream, clock, logger


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# ---------------------------------------------------------------- formats


def test_journal_lines_carry_syslog_priorities() -> None:
    stream = journal_stream()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert lines(stream) == [
        "<7>wardpost.test: d",
        "<6>wardpost.test: i",
        "<4>wardpost.test: w",
        "<3>wardpost.test: e",
        "<2>wardpost.test: c",
    ]


def test_custom_levels_round_down() -> None:
    assert syslog_priority(logging.INFO + 5) == 6
    assert syslog_priority(5) == 7
    assert syslog_priority(logging.CRITICAL + 10) == 2


def test_every_traceback_line_keeps_the_priority() -> None:
    stream = journal_stream()
    try:
        raise RuntimeError("port vanished")
    except RuntimeError:
        log.exception("driver gate1 failed")
    out = lines(stream)
    assert out[0] == "<3>wardpost.test: driver gate1 failed"
    assert out[-1] == "<3>RuntimeError: port vanished"
    assert all(line.startswith("<3>") for line in out)


def test_plain_lines_have_utc_timestamps_and_levels() -> None:
    stream = io.StringIO()
    setup_logging("info", stream, journal=False)
    log.debug("hidden")
    log.warning("link down")
    (line,) = lines(stream)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING wardpost\.test: link down", line
    ), line


def test_structured_fields() -> None:
    stream = journal_stream()
    log.info(
        "event queued",
        extra=log_fields(
            kind="panic.pressed", priority="critical", note="two words", seq=3, test=False
        ),
    )
    assert lines(stream) == [
        '<6>wardpost.test: event queued kind=panic.pressed priority=critical note="two words" '
        "seq=3 test=false"
    ]


def test_unknown_level_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup_logging("loud", io.StringIO())


def test_setup_again_replaces_the_handler() -> None:
    first = io.StringIO()
    setup_logging("info", first, journal=True)
    second = io.StringIO()
    handler = setup_logging("warning", second, journal=True)
    log.info("not shown")
    log.warning("shown once")
    assert first.getvalue() == ""
    assert lines(second) == ["<4>wardpost.test: shown once"]
    assert logging.getLogger().handlers.count(handler) == 1


def test_bad_log_call_does_not_raise() -> None:
    stream = io.StringIO()
    # Only our handler: pytest's own capture handler re-raises formatting errors.
    private = logging.getLogger(f"wardpost.test.{uuid.uuid4().hex}")
    private.propagate = False
    private.addHandler(setup_logging("info", stream, journal=True))
    private.info("%d drivers", "three")
    (line,) = lines(stream)
    assert "bad log call" in line and "three" in line


# ---------------------------------------------------------- journald detection


def test_under_journald_compares_the_stream(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = (tmp_path / "a").stat()
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(a, env)
        assert not under_journald(b, env)
        assert not under_journald(a, {})
        assert not under_journald(a, {"JOURNAL_STREAM": "garbage"})
    assert under_journald(io.StringIO(), env)


def test_setup_follows_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    stream = io.StringIO()
    setup_logging("info", stream)
    log.info("ready")
    assert lines(stream) == ["<6>wardpost.test: ready"]


# ------------------------------------------------------------------ secrets


def test_registered_secret_never_reaches_the_log() -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    register_secret(secret)
    register_secret("")  # ignored, must not blank every line
    stream = journal_stream()
    log.info("connecting with %s", secret)
    log.info("event", extra=log_fields(detail={"nested": [secret]}, auth=secret))
    try:
        raise ConnectionError(f"broker refused {secret}")
    except ConnectionError:
        log.exception("connect failed")
    text = stream.getvalue()
    assert secret not in text
    assert text.count("***") >= 4
    assert "connect failed" in text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("password=hunter2 user=bob", "password=*** user=bob"),
        ("mqtt.password: 'hunter 2'", "mqtt.password: ***"),
        ('{"token": "abc.def", "kind": "x"}', '{"token": ***, "kind": "x"}'),
        ("api_key=XYZ123&x=1", "api_key=***&x=1"),
        ("HMAC_KEY = 00ff", "HMAC_KEY = ***"),
        ("mqtts://bob:hunter2@broker:8883", "mqtts://bob:***@broker:8883"),
        ("Authorization: Bearer eyJhbGciOi.x-y", "Authorization: Bearer ***"),
        # Paths to secret files are what technicians need to see.
        ("key_file=/etc/wardpost/client.key", "key_file=/etc/wardpost/client.key"),
        (
            "mqtt.password_file: secret file '/x' is empty",
            "mqtt.password_file: secret file '/x' is empty",
        ),
        ("required key is missing", "required key is missing"),
    ],
)
def test_redact_patterns(raw: str, expected: str) -> None:
    assert redact(raw) == expected


def test_secret_named_fields_are_hidden() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.wardpost_fields = {"password": 1234, "psk": b"raw", "port": 1883}
    RedactSecrets().filter(record)
    assert record.wardpost_fields == {"password": "***", "psk": "***", "port": 1883}


# ---------------------------------------------------------------- repeats


def test_repeats_are_limited_then_summarised() -> None:
    stream, clock, logger = limited(limit=3, window=60)
    for _ in range(10):
        logger.warning("garbage on /dev/ttyUSB0")
    assert lines(stream) == ["WARNING garbage on /dev/ttyUSB0"] * 3
    clock.now += 61
    logger.warning("garbage on /dev/ttyUSB0")
    assert lines(stream)[3:] == [
        "WARNING suppressed 7 repeats of 'garbage on /dev/ttyUSB0' in 60 s",
        "WARNING garbage on /dev/ttyUSB0",
    ]


def test_flush_writes_the_summary_without_a_new_line() -> None:
    stream, clock, logger = limited(limit=1, window=10)
    for _ in range(4):
        logger.info("tick")
    limiter = logger.handlers[0].filters[0]
    assert isinstance(limiter, RepeatLimiter)
    limiter.flush()
    assert lines(stream) == ["INFO tick"]  # window still open
    clock.now += 10
    limiter.flush()
    assert lines(stream) == ["INFO tick", "INFO suppressed 3 repeats of 'tick' in 10 s"]
    clock.now += 100
    limiter.flush()
    assert len(lines(stream)) == 2  # no summary without suppressed lines


def test_different_messages_and_levels_are_separate() -> None:
    stream, _, logger = limited(limit=1)
    logger.error("driver %s failed", "gate1")
    logger.error("driver %s failed", "gate2")
    logger.warning("driver %s failed", "gate1")
    logger.error("driver %s failed", "gate1")
    assert lines(stream) == [
        "ERROR driver gate1 failed",
        "ERROR driver gate2 failed",
        "WARNING driver gate1 failed",
    ]


def test_repeat_key_groups_varying_messages() -> None:
    stream, _, logger = limited(limit=2)
    for n in range(5):
        logger.warning("garbage byte %d", n, extra={"repeat_key": "gate1-garbage"})
    assert lines(stream) == ["WARNING garbage byte 0", "WARNING garbage byte 1"]


def test_critical_is_never_suppressed() -> None:
    stream, _, logger = limited(limit=1)
    for _ in range(5):
        logger.critical("outbox disk fault")
    assert len(lines(stream)) == 5


def test_tracked_windows_are_bounded() -> None:
    stream, _, logger = limited(limit=1, max_keys=2)
    logger.info("a")
    logger.info("a")  # suppressed
    logger.info("b")
    logger.info("c")  # evicts "a", whose summary comes out early
    assert lines(stream) == [
        "INFO a",
        "INFO b",
        "INFO suppressed 1 repeats of 'a' in 60 s",
        "INFO c",
    ]


def test_setup_logging_limits_and_flushes_repeats() -> None:
    stream = io.StringIO()
    # A real 1 s window: the five lines below fit in it even when this thread runs late.
    setup_logging("info", stream, journal=True, repeat_limit=2, repeat_window=1.0)
    for _ in range(5):
        log.info("same")
    assert lines(stream) == ["<6>wardpost.test: same"] * 2
    # Wait for the window to end, then flush.
    deadline = time.monotonic() + DEADLINE
    while "suppressed" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
        flush_repeats()
    assert lines(stream)[2] == "<6>wardpost.test: suppressed 3 repeats of 'same' in 1 s"


def test_warnings_are_logged() -> None:
    stream = journal_stream()
    warnings.warn("deprecated option", UserWarning, stacklevel=1)
    assert "<4>py.warnings:" in stream.getvalue()
