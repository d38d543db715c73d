"""Honest face-matching figures from a cached :class:`~benchmarks.face_data.FaceSet`.

Counting follows ISO/IEC 19795-1: every probe photo counts. A probe in which
no face was judged (none detected, or every face set aside by a gate) is a
*failure to acquire*: a miss for mated probes, and it cannot raise a false
alarm. Every judged face of a photo is scored, as the driver judges every face
of a frame: a mated probe is identified when any of its faces is decided as the
right person; a non-mated probe is a false alarm when any of its faces is
decided as anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.face_data import FaceSet
from drivers.camera_face.decision import FaceTracker
from drivers.camera_face.pipeline import Face, FaceSample, Quality, QualityGate, quality_weight

Array = npt.NDArray[Any]
MISSING = -2.0  #: the score of a probe with no judged face: below every threshold


@dataclass(frozen=True)
class Protocol:
    """How a set is split and judged."""

    gate: QualityGate
    enrol_photos: int = 1  #: the first n photos of each enrolled person
    enrol_mode: str = "set"  #: "set": one template per photo; "mean": one averaged template
    mirror: bool = True  #: enrol with the mean of the face and its mirror image
    track_length: int = 5  #: frames of one walk-through in the track-level figures
    min_frames: int = 3  #: a track is searched from its n-th judged face on


def judged_faces(faces: FaceSet, gate: QualityGate) -> Array:
    """Mask of the faces the driver would judge (its own gate, face by face)."""
    judged = np.zeros(len(faces.photo), bool)
    for row in range(len(faces.photo)):
        face = Face(tuple(faces.box[row]), faces.landmarks[row], float(faces.score[row]))
        quality = Quality(
            float(faces.sharpness[row]),
            float(faces.yaw[row]),
            float(faces.pitch[row]),
            float(faces.norm[row]),
        )
        judged[row] = gate.size_reason(face) is None and gate.image_reason(quality) is None
    return judged


def by_identity(faces: FaceSet) -> dict[str, list[int]]:
    photos: dict[str, list[int]] = {}
    for index, name in enumerate(faces.identity):
        photos.setdefault(name, []).append(index)
    return photos


def largest_face(faces: FaceSet, photo: int) -> int | None:
    """The face the enrolment takes from a photo (the largest), or None."""
    rows = faces.faces_of(photo)
    if not len(rows):
        return None
    return int(rows[np.argmax(faces.box[rows, 2] * faces.box[rows, 3])])


def enrol_vector(faces: FaceSet, row: int, mirror: bool) -> Array:
    vector = faces.embedding[row] + (faces.mirrored[row] if mirror else 0.0)
    result: Array = vector / np.linalg.norm(vector)
    return result


@dataclass
class Gallery:
    """Templates of the enrolled persons: ``matrix`` rows, ``owner`` the person index of each."""

    names: list[str]
    matrix: Array
    owner: Array

    def person_scores(self, vectors: Array) -> Array:
        """Per vector and person, the best score over the person's templates."""
        raw = vectors @ self.matrix.T
        out = np.full((len(vectors), len(self.names)), -1.0, np.float32)
        np.maximum.at(out.T, self.owner, raw.T)
        return out


def build_gallery(
    faces: FaceSet, names: list[str], protocol: Protocol, photos: dict[str, list[int]]
) -> tuple[Gallery, set[int]]:
    """Templates from the first ``enrol_photos`` photos of each name; also the photos used."""
    rows, owners, used = [], [], set()
    kept = []
    for name in names:
        vectors = []
        for photo in photos[name][: protocol.enrol_photos]:
            used.add(photo)
            face = largest_face(faces, photo)
            if face is not None:
                vectors.append(enrol_vector(faces, face, protocol.mirror))
        if not vectors:
            continue  # a failure to enrol: the person is not on the list
        index = len(kept)
        kept.append(name)
        if protocol.enrol_mode == "mean":
            mean = np.sum(vectors, axis=0)
            vectors = [mean / np.linalg.norm(mean)]
        rows += vectors
        owners += [index] * len(vectors)
    return Gallery(kept, np.vstack(rows).astype(np.float32), np.array(owners)), used


def tar_at_far(genuine: Array, impostor: Array, far: float) -> tuple[float, float]:
    """True accept rate and threshold where the false accept rate is at most ``far``."""
    ordered = np.sort(impostor)[::-1]
    allowed = int(np.floor(far * len(ordered)))
    threshold = float(ordered[allowed]) + 1e-6 if allowed < len(ordered) else -1.0
    return float(np.mean(genuine >= threshold)), threshold


def verification(faces: FaceSet, protocol: Protocol) -> dict[str, float]:
    """Enrol every person with more photos than ``enrol_photos``; the rest are probes.

    Genuine: each probe photo against its own person; impostor: against every
    other enrolled person. A probe's score is its best judged face.
    """
    photos = by_identity(faces)
    names = [n for n, p in photos.items() if len(p) > protocol.enrol_photos]
    gallery, used = build_gallery(faces, names, protocol, photos)
    judged = judged_faces(faces, protocol.gate)
    position = {n: i for i, n in enumerate(gallery.names)}
    probe_photos = [p for n in gallery.names for p in photos[n] if p not in used]
    owner = np.array([position[faces.identity[p]] for p in probe_photos])
    best = np.full((len(probe_photos), len(gallery.names)), MISSING, np.float32)
    face_rows = np.flatnonzero(judged)
    face_scores = gallery.person_scores(faces.embedding[face_rows])
    row_of_photo = {p: i for i, p in enumerate(probe_photos)}
    for k, face in enumerate(face_rows):
        i = row_of_photo.get(int(faces.photo[face]))
        if i is not None:
            np.maximum(best[i], face_scores[k], out=best[i])
    genuine = best[np.arange(len(probe_photos)), owner]
    mask = np.ones_like(best, dtype=bool)
    mask[np.arange(len(probe_photos)), owner] = False
    impostor = best[mask]
    acquired = genuine > MISSING
    out = {
        "probes": float(len(probe_photos)),
        "enrolled": float(len(gallery.names)),
        "fta": float(np.mean(~acquired)),
    }
    for far in (1e-2, 1e-3):
        out[f"tar@{far:g}"], out[f"t@{far:g}"] = tar_at_far(genuine, impostor, far)
    return out


def watchlist_split(faces: FaceSet, protocol: Protocol) -> tuple[list[str], list[str]]:
    """Every other person with enough photos is enrolled; the others are strangers."""
    photos = by_identity(faces)
    enough = [n for n, p in photos.items() if len(p) > protocol.enrol_photos]
    watched = enough[::2]
    strangers = [n for n in photos if n not in set(watched)]
    return watched, strangers


Searches = list[tuple[bool, float]]  #: one track's searches in order: (right person?, score)


@dataclass
class Outcomes:
    """Per mated probe (a photo or a walk-through), its tracks' searches; per non-mated
    probe, its best score against anyone. A track decides once, at its first search at
    or above the threshold: a mated probe is identified when one of its tracks decides
    for the right person.

    Non-mated scores are those of the labelled stranger's face (the largest face of a
    photo, the walker of a walk-through); ``stranger_every`` also counts the other faces
    in the photos, whose identity is unknown: in these news and celebrity photos they
    are often people on the list, so their alarms are not all false.
    """

    mated: list[list[Searches]]
    stranger_score: Array
    mated_fta: Array
    stranger_every: Array

    def identified(self, threshold: float) -> Array:
        out = np.zeros(len(self.mated), bool)
        for index, tracks in enumerate(self.mated):
            for searches in tracks:
                first = next((right for right, score in searches if score >= threshold), False)
                if first:
                    out[index] = True
                    break
        return out


def dir_at_fpir(outcomes: Outcomes, fpir: float) -> tuple[float, float]:
    """Detection-and-identification rate and the threshold where FPIR is at most ``fpir``."""
    ordered = np.sort(outcomes.stranger_score)[::-1]
    allowed = int(np.floor(fpir * len(ordered)))
    threshold = float(ordered[allowed]) + 1e-6 if allowed < len(ordered) else -1.0
    return dir_at(outcomes, threshold)[0], threshold


def dir_at(outcomes: Outcomes, threshold: float) -> tuple[float, float]:
    """DIR and FPIR at a threshold."""
    return (
        float(np.mean(outcomes.identified(threshold))),
        float(np.mean(outcomes.stranger_score >= threshold)),
    )


def _sample(faces: FaceSet, row: int, box: tuple[float, float, float, float]) -> FaceSample:
    face = Face(box, faces.landmarks[row], float(faces.score[row]))
    quality = Quality(
        float(faces.sharpness[row]),
        float(faces.yaw[row]),
        float(faces.pitch[row]),
        float(faces.norm[row]),
    )
    return FaceSample(face, None, None, faces.embedding[row], quality)


def walk_through(
    faces: FaceSet, photos: list[int], judged: Array, gallery: Gallery, min_frames: int
) -> tuple[Searches, list[Searches], list[float]]:
    """A person's photos as frames of one walk-through, through the driver's tracker.

    The largest judged face of each photo is the walker (the nearest to the camera)
    and keeps one place in the frame, so the tracker links it by position unless its
    embedding says it is someone else; other faces are bystanders far from it. Each
    track is searched as the driver does: after each face from the ``min_frames``-th
    on, or once at its end if it never got there. Returns the walker's first track's
    searches, the walker's other tracks', and the bystanders' best scores.
    """
    tracker = FaceTracker(min_frames, cooldown=0.0, track_timeout=1.0)
    searches: dict[int, list[tuple[int, float]]] = {}
    walker_tracks: list[int] = []
    walker_box = (1000.0, 1000.0, 100.0, 100.0)

    def search(vector: Array) -> tuple[int, float]:
        scores = gallery.person_scores(vector[None])[0]
        return int(scores.argmax()), float(scores.max())

    for step, photo in enumerate(photos):
        rows = [int(r) for r in faces.faces_of(photo) if judged[r]]
        if not rows:
            continue
        walker = max(rows, key=lambda r: faces.box[r, 2] * faces.box[r, 3])
        samples = [
            _sample(faces, r, walker_box if r == walker else tuple(faces.box[r])) for r in rows
        ]
        for tracked in tracker.link(step * 0.1, samples):
            track, sample = tracked.track, tracked.sample
            if sample.face.box == walker_box and track.id not in walker_tracks:
                walker_tracks.append(track.id)
            assert sample.quality is not None
            tracker.add(
                track, sample, float(quality_weight(sample.face.score, sample.quality.norm))
            )
            if track.scorer.ready:
                searches.setdefault(track.id, []).append(search(track.scorer.vector()))
    for track in tracker.expire(1e9, everything=True):
        if not track.scorer.ready:
            searches.setdefault(track.id, []).append(search(track.scorer.vector()))
    walker_searches = [searches.get(t, []) for t in walker_tracks]
    bystanders = [
        max(s for _, s in found) for t, found in searches.items() if t not in walker_tracks
    ]
    return walker_searches[0] if walker_searches else [], walker_searches[1:], bystanders


def photo_outcomes(
    faces: FaceSet, protocol: Protocol, gallery: Gallery, used: set[int], strangers: list[str]
) -> Outcomes:
    """Single-frame watchlist outcomes: every judged face of a photo is a one-frame track."""
    photos = by_identity(faces)
    judged = judged_faces(faces, protocol.gate)
    position = {n: i for i, n in enumerate(gallery.names)}
    mated = [p for n in gallery.names for p in photos.get(n, []) if p not in used]
    others = [p for n in strangers for p in photos[n]]
    rows = np.flatnonzero(judged)
    scores = gallery.person_scores(faces.embedding[rows])
    by_photo: dict[int, list[int]] = {}
    for k, face in enumerate(rows):
        by_photo.setdefault(int(faces.photo[face]), []).append(k)
    decisions = []
    for p in mated:
        person = position[faces.identity[p]]
        decisions.append(
            [
                [(bool(scores[k].argmax() == person), float(scores[k].max()))]
                for k in by_photo.get(p, [])
            ]
        )
    every = [float(scores[by_photo[p]].max()) if p in by_photo else MISSING for p in others]
    stranger = []
    for p in others:
        ks = by_photo.get(p, [])
        largest = max(ks, key=lambda k: faces.box[rows[k], 2] * faces.box[rows[k], 3], default=None)
        stranger.append(MISSING if largest is None else float(scores[largest].max()))
    return Outcomes(
        decisions, np.array(stranger), np.array([not d for d in decisions]), np.array(every)
    )


def track_outcomes(
    faces: FaceSet, protocol: Protocol, gallery: Gallery, used: set[int], strangers: list[str]
) -> Outcomes:
    """Track-level outcomes: each person's photos, ``track_length`` at a time, as one
    walk-through (:func:`walk_through`). A stranger's walk-through is a false alarm when
    any of its tracks, walker or bystander, decides for anyone."""
    photos = by_identity(faces)
    judged = judged_faces(faces, protocol.gate)
    position = {n: i for i, n in enumerate(gallery.names)}
    length = protocol.track_length

    def walks(name: str) -> list[list[int]]:
        mine = [p for p in photos[name] if p not in used]
        return [mine[i : i + length] for i in range(0, len(mine), length)]

    decisions, fta = [], []
    for name in gallery.names:
        if name not in photos:
            continue  # a person of another photo set on the same list
        person = position[name]
        for walk in walks(name):
            first, others, _ = walk_through(faces, walk, judged, gallery, protocol.min_frames)
            fta.append(not first)
            decisions.append(
                [
                    [(index == person, score) for index, score in searches]
                    for searches in [first, *others]
                ]
            )
    stranger, every = [], []
    for name in strangers:
        for walk in walks(name):
            first, others, bystanders = walk_through(
                faces, walk, judged, gallery, protocol.min_frames
            )
            scores = [s for searches in [first, *others] for _, s in searches]
            stranger.append(max(scores, default=MISSING))
            every.append(max(scores + bystanders, default=MISSING))
    return Outcomes(decisions, np.array(stranger), np.array(fta), np.array(every))


def summarise(outcomes: Outcomes, default_threshold: float) -> dict[str, float]:
    out = {
        "mated": float(len(outcomes.mated)),
        "non_mated": float(len(outcomes.stranger_score)),
        "fta": float(np.mean(outcomes.mated_fta)),
    }
    for fpir in (1e-2, 1e-3):
        out[f"dir@{fpir:g}"], out[f"t@{fpir:g}"] = dir_at_fpir(outcomes, fpir)
    out["dir@default"], out["fpir@default"] = dir_at(outcomes, default_threshold)
    out["fpir_every@default"] = float(np.mean(outcomes.stranger_every >= default_threshold))
    return out


def merge(galleries: list[Gallery]) -> Gallery:
    """One list from several (persons of different photo sets)."""
    names: list[str] = []
    matrices, owners = [], []
    for gallery in galleries:
        owners.append(gallery.owner + len(names))
        names += gallery.names
        matrices.append(gallery.matrix)
    return Gallery(names, np.vstack(matrices), np.concatenate(owners))


def lfw_pairs(faces: FaceSet, pairs_file: Path) -> tuple[float | None, int, int]:
    """LFW View-2 folds accuracy (threshold chosen on the other folds), usable and total pairs.

    A photo's face is its largest detected one (plain embedding). The accuracy is
    given only when every pair of the protocol is usable; otherwise None.
    """
    lines = pairs_file.read_text().split("\n")
    folds, per = (int(x) for x in lines[0].split())
    rows = [line.split() for line in lines[1:] if line.strip()][: folds * 2 * per]
    photo_of = {
        (name, int(number)): index
        for index, (name, number) in enumerate(zip(faces.identity, faces.number, strict=True))
    }
    scores, labels, fold_of = [], [], []
    for index, row in enumerate(rows):
        a, b = (
            ((row[0], int(row[1])), (row[0], int(row[2])))
            if len(row) == 3
            else ((row[0], int(row[1])), (row[2], int(row[3])))
        )
        face_a = largest_face(faces, photo_of[a]) if a in photo_of else None
        face_b = largest_face(faces, photo_of[b]) if b in photo_of else None
        if face_a is None or face_b is None:
            continue
        scores.append(float(faces.embedding[face_a] @ faces.embedding[face_b]))
        labels.append(len(row) == 3)
        fold_of.append(index // (2 * per))
    if len(scores) < len(rows):
        return None, len(scores), len(rows)
    s, y, f = np.array(scores), np.array(labels), np.array(fold_of)
    accuracies = []
    for fold in range(folds):
        train, test = f != fold, f == fold
        candidates = np.unique(s[train])
        best = max(candidates, key=lambda t: np.mean((s[train] >= t) == y[train]))
        accuracies.append(float(np.mean((s[test] >= best) == y[test])))
    return float(np.mean(accuracies)), len(scores), len(rows)
