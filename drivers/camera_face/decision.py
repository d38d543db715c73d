"""From per-frame faces to one decision per person passing by.

Single frames are noisy: one blurred frame of a stranger can score above the
threshold, and one person walking through the door is seen in fifty frames.
:class:`FaceTracker` follows each face across frames (a *track*, linked by box
overlap, or by centre distance when a face moves fast), and the track's
:class:`TrackScorer` aggregates its judged faces, each weighted by its
quality, into one embedding. From the ``min_frames``-th judged face on (or when
a shorter track ends) that embedding is searched in the watchlist; the track
gives at most one decision. A per-person cooldown then turns a person standing
in view into one event rather than one per walk-through.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from drivers.camera_face.pipeline import (
    Box,
    FacePipeline,
    FaceSample,
    Image,
    Vector,
    overlap,
    quality_weight,
    unit,
)
from drivers.camera_face.watchlist import Gallery, Match

#: Boxes overlapping at least this much (intersection over union) are the same face.
_SAME_FACE_IOU = 0.3
#: Or: centres closer than this many face widths, with a similar size (a fast walker
#: moves further between two analysed frames than IoU can follow).
_SAME_FACE_CENTRES = 0.6
_SAME_FACE_SIZE_RATIO = 1.5
#: A face whose embedding is less similar than this to its track's aggregate is someone
#: else who stepped into the same place: it starts a new track rather than joining one
#: that may have decided. On the dev sets, photos of one person taken years apart score
#: below it in 0.6 % (lfw_dev) and 9 % (celeba_dev) of pairs, frames seconds apart far
#: less; two different people score at or above it in about 4 % of pairs.
_SAME_PERSON = 0.2


class TrackScorer:
    """The quality-weighted mean embedding of one track's judged faces."""

    def __init__(self, min_frames: int):
        self.min_frames = min_frames
        self.frames = 0
        self._sum: Vector | None = None

    def add(self, embedding: Vector, weight: float) -> None:
        contribution = (embedding * np.float32(weight)).astype(np.float32)
        self._sum = contribution if self._sum is None else self._sum + contribution
        self.frames += 1

    @property
    def ready(self) -> bool:
        """Enough faces to decide before the track ends."""
        return self.frames >= self.min_frames

    def vector(self) -> Vector:
        assert self._sum is not None, "no face added"
        return unit(self._sum)


@dataclass(frozen=True)
class Decision:
    """A confirmed watchlist match of one track."""

    track: int
    match: Match
    sample: FaceSample  #: the track's best-quality face so far (for the crop and rejection)
    frames: int  #: judged faces aggregated
    embedding: Vector  #: the aggregated embedding that matched


@dataclass
class _Track:
    id: int
    box: Box
    last_seen: float
    scorer: TrackScorer
    best: FaceSample | None = None
    best_weight: float = -1.0
    decided: bool = False


def _near(a: Box, b: Box) -> bool:
    """Centres within a fraction of the face width, and sizes alike."""
    size_a, size_b = max(a[2], 1e-6), max(b[2], 1e-6)
    if max(size_a, size_b) / min(size_a, size_b) > _SAME_FACE_SIZE_RATIO:
        return False
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    return math.hypot(dx, dy) <= _SAME_FACE_CENTRES * max(size_a, size_b)


def _same_person(track: _Track, sample: FaceSample) -> bool:
    if sample.embedding is None or not track.scorer.frames:
        return True
    return float(track.scorer.vector() @ sample.embedding) >= _SAME_PERSON


@dataclass(frozen=True)
class TrackedFace:
    """One face of a frame with the track it belongs to."""

    track: _Track
    sample: FaceSample


class FaceTracker:
    """Links each frame's faces to tracks and gives each track at most one decision.

    ``cooldown``: seconds after a decision for a person during which another
    track of the same person gives no event (counted in ``cooled_down``).
    """

    def __init__(
        self, min_frames: int, cooldown: float, track_timeout: float, max_tracks: int = 32
    ):
        self.min_frames = min_frames
        self.cooldown = cooldown
        self.track_timeout = track_timeout
        self.max_tracks = max_tracks
        self._tracks: list[_Track] = []
        self._ids = itertools.count(1)
        self._last_decision: dict[str, float] = {}
        #: Tracks decided for a person while that person was in cooldown.
        self.cooled_down = 0

    @property
    def active_tracks(self) -> int:
        return len(self._tracks)

    def expire(self, now: float, everything: bool = False) -> list[_Track]:
        """Drop tracks not seen for ``track_timeout`` (or all); return those never decided."""
        ended = [t for t in self._tracks if everything or now - t.last_seen > self.track_timeout]
        self._tracks = [t for t in self._tracks if t not in ended]
        self._last_decision = {
            p: t for p, t in self._last_decision.items() if now - t < self.cooldown
        }
        return [t for t in ended if not t.decided and t.scorer.frames]

    def link(self, now: float, samples: list[FaceSample]) -> list[TrackedFace]:
        """Each face with its track (a new one when no track is close enough)."""
        claimed: set[int] = set()
        linked = []
        for sample in sorted(samples, key=lambda s: -s.face.size):
            track = self._track_for(sample, now, claimed)
            claimed.add(track.id)
            linked.append(TrackedFace(track, sample))
        return linked

    def _track_for(self, sample: FaceSample, now: float, claimed: set[int]) -> _Track:
        box = sample.face.box
        candidates = [
            (overlap(box, t.box), t)
            for t in self._tracks
            if t.id not in claimed and _same_person(t, sample)
        ]
        best = max(candidates, key=lambda c: c[0], default=None)
        if best is None or best[0] < _SAME_FACE_IOU:
            near = [t for _, t in candidates if _near(box, t.box)]
            best = (1.0, near[0]) if near else None
        if best is not None:
            track = best[1]
            track.box, track.last_seen = box, now
            return track
        track = _Track(next(self._ids), box, now, TrackScorer(self.min_frames))
        self._tracks.append(track)
        if len(self._tracks) > self.max_tracks:
            self._tracks.sort(key=lambda t: t.last_seen)
            self._tracks.pop(0)
        return track

    @staticmethod
    def add(track: _Track, sample: FaceSample, weight: float) -> None:
        assert sample.embedding is not None
        track.scorer.add(sample.embedding, weight)
        if weight > track.best_weight:
            track.best, track.best_weight = sample, weight

    def decide(self, track: _Track, match: Match, now: float) -> Decision | None:
        """The track's one decision, unless its person is in cooldown."""
        track.decided = True
        if match.person_id in self._last_decision:
            self.cooled_down += 1
            return None
        self._last_decision[match.person_id] = now
        assert track.best is not None
        return Decision(track.id, match, track.best, track.scorer.frames, track.scorer.vector())


@dataclass
class JudgeCounters:
    frames: int = 0
    faces: int = 0
    judged: int = 0
    tracks_searched: int = 0
    above_threshold: int = 0
    suppressed_rejected: int = 0
    quality_low: Counter[str] = field(default_factory=Counter)
    match_seconds: float = 0.0


class WatchlistJudge:
    """One frame's faces → tracks → aggregated search → decisions.

    The gallery is swapped whole (``judge.gallery = new``) when the watchlist
    changes, so a search never sees a half-updated list; so is the threshold,
    which may follow the list's size (see :func:`calibrated_threshold`).
    """

    def __init__(
        self, pipeline: FacePipeline, gallery: Gallery, threshold: float, tracker: FaceTracker
    ):
        self.pipeline = pipeline
        self.gallery = gallery
        self.threshold = threshold
        self.tracker = tracker
        self.counters = JudgeCounters()

    def judge(self, image: Image, now: float) -> list[Decision]:
        return self.decide(self.pipeline.analyse(image), now)

    def decide(self, samples: list[FaceSample], now: float) -> list[Decision]:
        """One frame's analysed faces into their tracks; the decisions this frame brings."""
        counters = self.counters
        counters.frames += 1
        counters.faces += len(samples)
        started = time.perf_counter()
        decisions = self.expire(now)
        for tracked in self.tracker.link(now, samples):
            sample, track = tracked.sample, tracked.track
            if sample.embedding is None or sample.quality is None:
                counters.quality_low[sample.reason or "align"] += 1
                continue
            counters.judged += 1
            if track.decided:
                continue
            weight = float(quality_weight(sample.face.score, sample.quality.norm))
            self.tracker.add(track, sample, weight)
            if track.scorer.ready and (decision := self._search(track, now)):
                decisions.append(decision)
        counters.match_seconds += time.perf_counter() - started
        return decisions

    def expire(self, now: float, everything: bool = False) -> list[Decision]:
        """Decide the tracks that ended without a decision (too short to be ready)."""
        ended = self.tracker.expire(now, everything)
        return [d for t in ended if (d := self._search(t, now))]

    def finish(self, now: float) -> list[Decision]:
        """Decide the tracks still open (end of a video file or of an image folder)."""
        return self.expire(now, everything=True)

    def _search(self, track: _Track, now: float) -> Decision | None:
        self.counters.tracks_searched += 1
        match = self.gallery.best(track.scorer.vector(), self.threshold)
        if match is None or match.score < self.threshold:
            return None
        self.counters.above_threshold += 1
        if match.rejected:
            self.counters.suppressed_rejected += 1
            track.decided = True
            return None
        return self.tracker.decide(track, match, now)
