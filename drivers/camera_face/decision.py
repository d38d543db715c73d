"""From per-frame matches to one event per person passing by.

Single frames are noisy: one blurred frame of a stranger can score above the
threshold, and one person walking through the door is seen in fifty frames.
:class:`VoteTracker` follows each face across frames (a *track*, linked by box
overlap), lets every judged frame of the track vote for a watchlist person or
for "nobody", and decides on a match only when ``k`` of the track's last ``n``
votes agree. A per-person cooldown then turns a person standing in view into
one event rather than one per frame.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from drivers.camera_face.pipeline import FacePipeline, FaceSample, Image
from drivers.camera_face.watchlist import Gallery, Match

Box = tuple[float, float, float, float]
#: Boxes overlapping at least this much (intersection over union) are the same face.
_SAME_FACE_IOU = 0.3


@dataclass(frozen=True)
class Vote:
    """One judged frame of a track: a watchlist match above threshold, or None."""

    match: Match | None
    sample: FaceSample


@dataclass(frozen=True)
class Decision:
    """A confirmed watchlist match of one track."""

    track: int
    match: Match  #: the best-scoring agreeing vote
    sample: FaceSample  #: the face behind that vote
    agreeing: int
    judged: int
    mean_score: float


@dataclass
class _Track:
    id: int
    box: Box
    last_seen: float
    votes: deque[Vote] = field(default_factory=deque)


def overlap(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


class VoteTracker:
    """K-of-N votes per face track and a cooldown per person.

    ``update`` is called once per analysed frame with every face of the frame
    (judged or not: unjudged faces keep their track alive without voting).
    """

    def __init__(self, k: int, n: int, cooldown: float, track_timeout: float, max_tracks: int = 32):
        self.k = k
        self.n = n
        self.cooldown = cooldown
        self.track_timeout = track_timeout
        self.max_tracks = max_tracks
        self._tracks: list[_Track] = []
        self._ids = itertools.count(1)
        self._last_decision: dict[str, float] = {}
        #: Agreeing votes that reached ``k`` while the person was in cooldown.
        self.cooled_down = 0

    @property
    def active_tracks(self) -> int:
        return len(self._tracks)

    def update(self, now: float, faces: list[tuple[Box, Vote | None]]) -> list[Decision]:
        self._tracks = [t for t in self._tracks if now - t.last_seen <= self.track_timeout]
        self._last_decision = {
            p: t for p, t in self._last_decision.items() if now - t < self.cooldown
        }
        decisions = []
        claimed: set[int] = set()
        for box, vote in faces:
            track = self._track_for(box, now, claimed)
            claimed.add(track.id)
            if vote is None:
                continue
            track.votes.append(vote)
            while len(track.votes) > self.n:
                track.votes.popleft()
            decision = self._decide(track, now)
            if decision is not None:
                decisions.append(decision)
        return decisions

    def _track_for(self, box: Box, now: float, claimed: set[int]) -> _Track:
        candidates = [(overlap(box, t.box), t) for t in self._tracks if t.id not in claimed]
        best = max(candidates, key=lambda c: c[0], default=None)
        if best is not None and best[0] >= _SAME_FACE_IOU:
            track = best[1]
            track.box, track.last_seen = box, now
            return track
        track = _Track(next(self._ids), box, now)
        self._tracks.append(track)
        if len(self._tracks) > self.max_tracks:
            self._tracks.sort(key=lambda t: t.last_seen)
            self._tracks.pop(0)
        return track

    def _decide(self, track: _Track, now: float) -> Decision | None:
        counts = Counter(v.match.person_id for v in track.votes if v.match is not None)
        if not counts:
            return None
        person_id, agreeing = counts.most_common(1)[0]
        if agreeing < self.k:
            return None
        mine = [v for v in track.votes if v.match is not None and v.match.person_id == person_id]
        # The votes are used up either way: with a cooldown of 0 the next event
        # needs k fresh agreeing frames, not just one more.
        judged = len(track.votes)
        track.votes.clear()
        if person_id in self._last_decision:
            self.cooled_down += 1
            return None
        self._last_decision[person_id] = now
        best = max(mine, key=lambda v: v.match.score if v.match else 0.0)
        assert best.match is not None
        mean = sum(v.match.score for v in mine if v.match is not None) / len(mine)
        return Decision(track.id, best.match, best.sample, agreeing, judged, mean)


@dataclass
class JudgeCounters:
    frames: int = 0
    faces: int = 0
    judged: int = 0
    above_threshold: int = 0
    suppressed_rejected: int = 0
    quality_low: Counter[str] = field(default_factory=Counter)
    match_seconds: float = 0.0


class WatchlistJudge:
    """One frame's faces → watchlist search → votes → decisions.

    The gallery is swapped whole (``judge.gallery = new``) when the watchlist
    changes, so a search never sees a half-updated list.
    """

    def __init__(
        self, pipeline: FacePipeline, gallery: Gallery, threshold: float, tracker: VoteTracker
    ):
        self.pipeline = pipeline
        self.gallery = gallery
        self.threshold = threshold
        self.tracker = tracker
        self.counters = JudgeCounters()

    def judge(self, image: Image, now: float) -> list[Decision]:
        samples = self.pipeline.analyse(image)
        gallery = self.gallery
        counters = self.counters
        counters.frames += 1
        counters.faces += len(samples)
        started = time.perf_counter()
        faces: list[tuple[Box, Vote | None]] = []
        for sample in samples:
            if sample.embedding is None:
                counters.quality_low[sample.reason or "align"] += 1
                faces.append((sample.face.box, None))
                continue
            counters.judged += 1
            match = gallery.best(sample.embedding, self.threshold)
            if match is not None and match.score >= self.threshold:
                counters.above_threshold += 1
                if match.rejected:
                    counters.suppressed_rejected += 1
                    match = None
            else:
                match = None
            faces.append((sample.face.box, Vote(match, sample)))
        decisions = self.tracker.update(now, faces)
        counters.match_seconds += time.perf_counter() - started
        return decisions
