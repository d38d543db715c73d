"""Patrol rounds: which checkpoints must be read in which time windows.

A round lists checkpoints and the local times it starts; each start opens a
window of ``window_minutes``. When a window closes, every checkpoint of the
round not read inside it is *missed*.

A window is judged only if the agent was watching when it opened (it started
after the schedule was created, or it was seen open before a restart and its
reads were saved to the state file). A window that opened while the agent was
down is not judged: its reads are unknown, and a false "missed" alarm would
send a guard supervisor chasing a round that was walked.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path

from agent.config import ConfigError, check


def parse_clock(text: str) -> time:
    """``"22:00"`` or ``"22:00:30"`` as a :class:`datetime.time`."""
    try:
        return time.fromisoformat(text)
    except ValueError:
        raise ValueError(f'{text!r} is not a time of day like "22:00"') from None


def _clock_ok(value: str) -> bool:
    try:
        parse_clock(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class RoundConfig:
    """``[[drivers.<name>.rounds]]``: one patrol round."""

    name: str = field(metadata=check(lambda v: bool(v.strip()), "must not be empty"))
    #: Checkpoint names (values of the driver's ``checkpoints`` map).
    checkpoints: list[str] = field(default_factory=list)
    #: Local times the round starts, e.g. ``["22:00", "02:00"]``.
    times: list[str] = field(default_factory=list)
    window_minutes: float = field(default=30.0, metadata=check(minimum=0.01, maximum=1440.0))

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ConfigError("a round needs at least one checkpoint", "checkpoints")
        if not self.times:
            raise ConfigError("a round needs at least one start time", "times")
        for i, value in enumerate(self.times):
            if not _clock_ok(value):
                raise ConfigError(f'{value!r} is not a time of day like "22:00"', f"times[{i}]")


@dataclass(frozen=True)
class Missed:
    """A checkpoint of a round not read within one window."""

    round: str
    checkpoint: str
    window_start: datetime
    window_end: datetime
    read: tuple[str, ...]


@dataclass(frozen=True)
class _Window:
    round: RoundConfig
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        return f"{self.round.name}@{self.start.isoformat()}"


class PatrolSchedule:
    """Tracks reads per window and reports missed checkpoints when windows close.

    Times are aware datetimes passed in by the caller (the driver's clock), so
    the logic is tested with any date, midnight and restarts included. Reads are
    saved to ``state_path`` (if given) so a restart mid-window keeps them.
    """

    def __init__(
        self,
        rounds: Sequence[RoundConfig],
        now: datetime,
        state_path: Path | None = None,
        log: logging.Logger | None = None,
    ):
        self.rounds = list(rounds)
        self.since = now
        self.state_path = state_path
        self.log = log or logging.getLogger("wardpost.patrol")
        self._lock = threading.Lock()
        self._reads: dict[str, list[str]] = {}
        self._judged: dict[str, str] = {}  # window key -> its end (for pruning)
        self._load()

    def _windows(self, now: datetime) -> Iterator[_Window]:
        """Every window starting yesterday or today (covers windows across midnight)."""
        for round_ in self.rounds:
            length = timedelta(minutes=round_.window_minutes)
            for day in (now.date() - timedelta(days=1), now.date()):
                for text in round_.times:
                    start = datetime.combine(day, parse_clock(text), tzinfo=now.tzinfo)
                    yield _Window(round_, start, start + length)

    def _watch_open(self, now: datetime) -> bool:
        """Start keeping reads for windows open at ``now``; True if the state changed."""
        changed = False
        for window in self._windows(now):
            if (
                self.since <= window.start <= now < window.end
                and window.key not in self._reads
                and window.key not in self._judged
            ):
                self._reads[window.key] = []
                changed = True
        return changed

    def record(self, checkpoint: str, at: datetime) -> list[str]:
        """Count a read of ``checkpoint``; returns the rounds whose open window it served."""
        served = []
        with self._lock:
            self._watch_open(at)
            for window in self._windows(at):
                if (
                    window.start <= at < window.end
                    and checkpoint in window.round.checkpoints
                    and window.key in self._reads
                ):
                    if checkpoint not in self._reads[window.key]:
                        self._reads[window.key].append(checkpoint)
                    served.append(window.round.name)
            self._save()
        return served

    def due(self, now: datetime) -> list[Missed]:
        """Judge every watched window that has closed; each is judged once."""
        missed: list[Missed] = []
        with self._lock:
            changed = self._watch_open(now)
            for window in self._windows(now):
                if window.end > now or window.key in self._judged:
                    continue
                if window.key not in self._reads and window.start < self.since:
                    continue  # opened while we were not watching
                read = self._reads.pop(window.key, [])
                self._judged[window.key] = window.end.isoformat()
                changed = True
                missed.extend(
                    Missed(window.round.name, c, window.start, window.end, tuple(read))
                    for c in window.round.checkpoints
                    if c not in read
                )
            horizon = (now - timedelta(days=3)).isoformat()
            for key in [k for k, end in self._judged.items() if end < horizon]:
                del self._judged[key]
            if changed:
                self._save()
        return missed

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            state = json.loads(self.state_path.read_text("utf-8"))
            self._reads = {str(k): [str(c) for c in v] for k, v in state.get("reads", {}).items()}
            self._judged = {str(k): str(v) for k, v in state.get("judged", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            self.log.warning(
                "patrol state %s unreadable, starting afresh: %s", self.state_path, exc
            )

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"reads": self._reads, "judged": self._judged}), "utf-8")
            os.replace(tmp, self.state_path)
        except OSError as exc:
            self.log.warning("patrol state %s not saved: %s", self.state_path, exc)
