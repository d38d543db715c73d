"""Every detected face of a photo set, embedded once and cached on disk.

The face benchmark judges the same faces under many settings (gates, thresholds,
enrolment strategies, tracks). Detection and embedding are the slow part, so
they run once per photo set, model pair and detection size, and the result is
kept under ``/tmp`` (never in the repository: these are real people's faces,
as numbers).

Each face carries what the driver can know about it: box, detector score,
landmarks, pose and sharpness, the embedding's norm before normalisation, and
the unit embeddings of the face and of its mirror image.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from drivers.camera_face.pipeline import FacePipeline, align_face, measure_quality, unit

CACHE = Path(os.environ.get("WARDPOST_FACE_CACHE", Path(tempfile.gettempdir()) / "wardpost-face"))
#: Faces are detected down to this score so every gate above it can be replayed.
DETECT_FLOOR = 0.5

Array = npt.NDArray[Any]


@dataclass
class FaceSet:
    """Photos of one set and every face found in them (one row per face)."""

    identity: list[str]  #: per photo
    number: Array  #: per photo: n in <identity>/<n>.jpg
    shape: Array  #: per photo: height, width
    photo: Array  #: per face: index of its photo
    box: Array  #: x, y, w, h in photo pixels
    score: Array
    landmarks: Array  #: faces x 5 x 2
    yaw: Array
    pitch: Array
    sharpness: Array
    norm: Array  #: embedding norm before normalisation
    embedding: Array  #: unit, faces x d
    mirrored: Array  #: unit embedding of the mirror image

    @property
    def size(self) -> Array:
        return np.minimum(self.box[:, 2], self.box[:, 3])

    def faces_of(self, photo: int) -> Array:
        return np.flatnonzero(self.photo == photo)


def _photos(folder: Path, limit: int = 0) -> list[tuple[str, int, Path]]:
    """Every photo, by identity and number; ``limit`` keeps that many identities, evenly spread."""
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    if 0 < limit < len(people):
        people = [people[int(i * len(people) / limit)] for i in range(limit)]
    found = []
    for person in people:
        for path in sorted(person.glob("*.jpg"), key=lambda p: int(p.stem)):
            found.append((person.name, int(path.stem), path))
    return found


def _key(folder: Path, pipeline: FacePipeline, detect_width: int, limit: int, scale: float) -> str:
    digest = hashlib.sha256()
    detector = pipeline.detector
    for part in (
        str(folder.resolve()),
        pipeline.embedder.model.sha256,
        str(detect_width),
        str(DETECT_FLOOR),
        "v2" if not limit else f"v2-{limit}",
        # (the sets' photos are at most 400 px wide: no refinement at 640)
        *(
            ()
            if detect_width >= 640 or (detector.refine_below, detector.refine_side) == (64, 128)
            else (str(detector.refine_below), str(detector.refine_side))
        ),
        *(
            ()
            if scale == 1.0
            else (f"scale {scale}", str(detector.refine_below), str(detector.refine_side))
        ),
    ):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def load(
    folder: Path,
    pipeline: FacePipeline,
    detect_width: int = 640,
    *,
    limit: int = 0,
    progress: bool = True,
    scale: float = 1.0,
) -> FaceSet:
    """Every face of every photo under ``folder``, from the cache when it is there.

    ``detect_width``: photos wider than this are shrunk for detection only, as the
    driver does; alignment and embedding use the full photo. ``scale`` < 1 instead
    shrinks every photo by that factor for detection: the photos are then treated as
    frames of a camera whose frames the driver shrinks that much (320 of 640 px: 0.5).
    """
    path = CACHE / f"{folder.name}-{_key(folder, pipeline, detect_width, limit, scale)}.npz"
    photos = _photos(folder, limit)
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return FaceSet(
            identity=[i for i, _, _ in photos],
            **{k: data[k] for k in data.files if k != "identity"},
        )
    detector = pipeline.detector
    detector.max_width = detect_width
    embedder = pipeline.embedder
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "photo",
            "box",
            "score",
            "landmarks",
            "yaw",
            "pitch",
            "sharpness",
            "norm",
            "embedding",
            "mirrored",
        )
    }
    numbers, shapes = [], []
    for index, (_, number, photo_path) in enumerate(photos):
        image = cv2.imread(str(photo_path), cv2.IMREAD_COLOR)
        if scale < 1.0:
            detector.max_width = max(16, round(image.shape[1] * scale))
        numbers.append(number)
        shapes.append(image.shape[:2])
        for face in detector.detect(image):
            aligned = align_face(image, face)
            if aligned is None:
                continue
            raw = embedder.invoke(embedder.prepare(aligned))
            quality = measure_quality(face, aligned, float(np.linalg.norm(raw)))
            mirrored = embedder.invoke(embedder.prepare(np.ascontiguousarray(aligned[:, ::-1])))
            rows["photo"].append(index)
            rows["box"].append(face.box)
            rows["score"].append(face.score)
            rows["landmarks"].append(face.landmarks)
            rows["yaw"].append(quality.yaw)
            rows["pitch"].append(quality.pitch)
            rows["sharpness"].append(quality.sharpness)
            rows["norm"].append(quality.norm)
            rows["embedding"].append(unit(raw))
            rows["mirrored"].append(unit(mirrored))
        if progress and index % 500 == 499:
            print(f"  {folder.name}: {index + 1}/{len(photos)} photos", flush=True)
    arrays = {
        k: np.array(v, dtype=np.int32 if k == "photo" else np.float32) for k, v in rows.items()
    }
    arrays["number"] = np.array(numbers, np.int32)
    arrays["shape"] = np.array(shapes, np.int32)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    return FaceSet(identity=[i for i, _, _ in photos], **arrays)
