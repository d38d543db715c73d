"""From a frame to face embeddings: detect, check quality, align, embed.

Each stage is a small class so the benchmark can time it alone and the
enrolment command can reuse it:

* :class:`FaceDetector` runs YuNet through ``cv2.FaceDetectorYN`` (boxes + 5 landmarks);
* :func:`align_face` maps the 5 landmarks onto the 112x112 ArcFace template with a
  similarity transform (rotation, uniform scale, shift: faces are not sheared);
* :func:`measure_quality` and :class:`QualityGate` set aside faces too small, blurred
  or turned away to be judged;
* :class:`FaceEmbedder` runs a TFLite face embedder and returns unit-length vectors,
  so a dot product is the cosine similarity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from drivers.camera_face.config import CameraFaceConfig, ModelFile
from drivers.camera_face.models import ModelError, Normalisation, verify_model

#: A BGR image as OpenCV gives it (uint8, height x width x 3).
Image = npt.NDArray[Any]
Vector = npt.NDArray[np.float32]

#: Where the eyes, nose tip and mouth corners of a frontal face sit in a 112x112
#: ArcFace crop (image left eye first, as YuNet orders its landmarks).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ALIGNED_SIZE = 112
#: Nose height between eye line (0) and mouth line (1) of a frontal face as YuNet places
#: the landmarks (median over LFW; YuNet puts the nose tip lower than the template does).
_FRONTAL_NOSE_HEIGHT = 0.56

QualityReason = Literal["score", "size", "blur", "pose", "norm", "align"]
#: The detector reports faces down to this score; the quality gate and weight take it
#: from there (a detector cut-off equal to the gate would hide every low score).
DETECTION_FLOOR = 0.5
#: Embedding norms (foamliu MobileFaceNet) from which a face counts little / fully.
_NORM_FLOOR = 8.0
_NORM_FULL = 18.0
#: Detector score from which a face counts fully.
_SCORE_FULL = 0.9


@dataclass(frozen=True)
class Face:
    """A detected face in frame pixels."""

    box: tuple[float, float, float, float]  #: x, y, width, height
    landmarks: npt.NDArray[np.float32]  #: 5x2: eyes, nose tip, mouth corners
    score: float

    @property
    def size(self) -> float:
        return min(self.box[2], self.box[3])


class FaceDetector:
    """YuNet face detection; frames wider than ``max_width`` are shrunk first.

    Detection on a shrunk frame finds faces as well but places the landmarks of
    small ones less precisely, and alignment needs them precise: a face smaller
    than ``refine_below`` pixels in the shrunk frame is detected again in a crop
    of the full frame around it (twice its size, fed to YuNet at ``refine_side``
    pixels: about 1 ms), and its landmarks come from there. On celeba_dev photos
    detected at half size this recovers part of the loss (TAR at FAR 1e-3 with one
    enrolment photo: 81.5 % at full size, 76.8 % at half size, 77.9 % refined, 79.7 %
    refining below 64 px at 128 px, which costs about three times as much; with three
    enrolment photos 91.4 % in every case but the unrefined 90.4 %).
    """

    def __init__(
        self,
        model: ModelFile,
        min_score: float = 0.8,
        max_width: int = 640,
        refine_below: int = 32,
        refine_side: int = 96,
    ):
        verify_model(model.path, model.sha256)
        self.max_width = max_width
        self.refine_below = refine_below
        self.refine_side = refine_side
        self._size = (320, 320)
        try:
            self._yunet = cv2.FaceDetectorYN.create(
                str(model.path), "", self._size, min_score, 0.3, 50
            )
            self._refiner = cv2.FaceDetectorYN.create(
                str(model.path), "", (refine_side, refine_side), min_score, 0.3, 5
            )
        except cv2.error as exc:
            raise ModelError(f"model file {model.path} is not a YuNet detector: {exc}") from None

    def detect(self, frame: Image) -> list[Face]:
        height, width = frame.shape[:2]
        scale = min(1.0, self.max_width / width)
        small = frame
        if scale < 1.0:
            size = (round(width * scale), round(height * scale))
            small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._yunet.setInputSize(size)
            self._size = size
        _, rows = self._yunet.detect(small)
        if rows is None:
            return []
        faces = []
        for row in rows:
            face = _face(row, 1 / scale, 0.0, 0.0)
            if scale < 1.0 and min(row[2], row[3]) < self.refine_below:
                face = self._refine(frame, face)
            faces.append(face)
        return faces

    def _refine(self, frame: Image, face: Face) -> Face:
        """The face detected again in a full-resolution crop around it (or as it was)."""
        x, y, w, h = face.box
        side = 2.0 * max(w, h)
        left = int(max(0, x + w / 2 - side / 2))
        top = int(max(0, y + h / 2 - side / 2))
        crop = frame[top : int(top + side), left : int(left + side)]
        if crop.shape[0] < 8 or crop.shape[1] < 8:
            return face
        # Pad to a square so one input size serves every crop.
        square = max(crop.shape[:2])
        padded = cv2.copyMakeBorder(
            crop, 0, square - crop.shape[0], 0, square - crop.shape[1], cv2.BORDER_REPLICATE
        )
        side = self.refine_side
        zoom = square / side
        _, rows = self._refiner.detect(
            cv2.resize(padded, (side, side), interpolation=cv2.INTER_LINEAR)
        )
        if rows is None:
            return face
        found = [_face(row, zoom, left, top) for row in rows]
        best = max(found, key=lambda f: overlap(f.box, face.box))
        return best if overlap(best.box, face.box) >= 0.3 else face


def _face(row: npt.NDArray[np.float32], zoom: float, left: float, top: float) -> Face:
    """A YuNet output row mapped to frame pixels (scaled by ``zoom``, then shifted)."""
    values = row[:14] * zoom
    values[0] += left
    values[1] += top
    values[4::2] += left
    values[5::2] += top
    return Face(
        box=(float(values[0]), float(values[1]), float(values[2]), float(values[3])),
        landmarks=values[4:14].reshape(5, 2).astype(np.float32),
        score=float(row[14]),
    )


Box = tuple[float, float, float, float]


def overlap(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def align_face(frame: Image, face: Face) -> Image | None:
    """The face warped onto the 112x112 template, or None if the landmarks are degenerate."""
    matrix, _ = cv2.estimateAffinePartial2D(face.landmarks, ARCFACE_TEMPLATE, method=cv2.LMEDS)
    if matrix is None:
        return None
    aligned: Image = cv2.warpAffine(
        frame,
        matrix,
        (ALIGNED_SIZE, ALIGNED_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return aligned


@dataclass(frozen=True)
class Quality:
    sharpness: float  #: variance of the Laplacian of the aligned grey face
    yaw: float  #: nose offset from the face midline, in eye distances (0 = frontal)
    pitch: float  #: nose height between eye and mouth lines, minus the frontal value
    norm: float  #: the embedding's length before normalisation (low: a poor face)


def measure_quality(face: Face, aligned: Image, norm: float) -> Quality:
    right_eye, left_eye, nose, right_mouth, left_mouth = face.landmarks.astype(np.float64)
    eyes = (right_eye + left_eye) / 2
    mouth = (right_mouth + left_mouth) / 2
    eye_distance = float(np.linalg.norm(left_eye - right_eye)) or 1e-6
    midline = mouth - eyes
    midline_length = float(np.linalg.norm(midline)) or 1e-6
    offset = nose - eyes
    # Signed distance of the nose from the eye-to-mouth line, and its height along it.
    yaw = float(midline[0] * offset[1] - midline[1] * offset[0]) / midline_length / eye_distance
    pitch = float(np.dot(offset, midline)) / midline_length**2 - _FRONTAL_NOSE_HEIGHT
    grey = cv2.cvtColor(aligned, cv2.COLOR_BGR2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_32F).var())
    return Quality(sharpness, yaw, pitch, norm)


def quality_weight(score: Any, norm: Any) -> Any:
    """How much a face counts within its track, from 0.02 (nearly nothing) to 1.

    The embedding's norm before normalisation and the detector's score are the
    two measures that best predict a wrong decision on the dev photo sets
    (``scripts/bench-face`` prints how each one sorts genuine scores); size,
    sharpness and pose predict much less once these two are known. Works on
    floats and on numpy arrays alike.
    """
    by_norm = np.clip((norm - _NORM_FLOOR) / (_NORM_FULL - _NORM_FLOOR), 0.02, 1.0)
    by_score = np.clip((score - DETECTION_FLOOR) / (_SCORE_FULL - DETECTION_FLOOR), 0.02, 1.0)
    return by_norm * by_score


@dataclass(frozen=True)
class QualityGate:
    """Limits below which a face is not judged (see :class:`CameraFaceConfig`).

    A face set aside is never matched; a face judged counts in its track with
    its :func:`quality_weight`. The defaults keep only the gates that remove
    more false alarms than they cost matches on the dev photo sets.
    """

    min_score: float = 0.6
    min_size: float = 0
    min_sharpness: float = 0.0
    max_yaw: float = 2.0
    max_pitch: float = 1.0
    min_norm: float = 0.0

    @classmethod
    def from_config(cls, config: CameraFaceConfig) -> QualityGate:
        return cls(
            config.min_detection_score,
            config.min_face_size,
            config.min_sharpness,
            config.max_yaw,
            config.max_pitch,
            config.min_embedding_norm,
        )

    def size_reason(self, face: Face) -> QualityReason | None:
        """The cheap checks, done before alignment."""
        if face.score < self.min_score:
            return "score"
        if face.size < self.min_size:
            return "size"
        return None

    def image_reason(self, quality: Quality) -> QualityReason | None:
        if abs(quality.yaw) > self.max_yaw or abs(quality.pitch) > self.max_pitch:
            return "pose"
        if quality.sharpness < self.min_sharpness:
            return "blur"
        if quality.norm < self.min_norm:
            return "norm"
        return None


def _interpreter_class() -> Callable[..., Any]:
    """LiteRT's interpreter, else tflite-runtime's (which needs numpy < 2)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except Exception as exc:  # tflite-runtime built for numpy 1 fails in odd ways
            raise ModelError(
                "no TFLite runtime: install ai-edge-litert (or tflite-runtime with numpy < 2): "
                f"{exc}"
            ) from None
    interpreter: Callable[..., Any] = Interpreter
    return interpreter


_SCALING: dict[Normalisation, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {
    # x * scale + offset, per RGB channel
    "imagenet": (
        (1 / (255 * np.array([0.229, 0.224, 0.225]))).astype(np.float32),
        (-np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])).astype(np.float32),
    ),
    "symmetric": (np.full(3, 1 / 128, np.float32), np.full(3, -127.5 / 128, np.float32)),
}


class FaceEmbedder:
    """A TFLite face embedder: aligned 112x112 BGR face in, unit-length vector out."""

    def __init__(self, model: ModelFile, threads: int = 1):
        verify_model(model.path, model.sha256)
        if model.normalisation is None:
            raise ModelError(f"the input scaling of {model.path} is unknown")
        self.model = model
        try:
            interpreter = _interpreter_class()
            self._interpreter = interpreter(model_path=str(model.path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except ValueError as exc:
            raise ModelError(f"model file {model.path} is not a TFLite model: {exc}") from None
        source = self._interpreter.get_input_details()[0]
        target = self._interpreter.get_output_details()[0]
        shape = [int(n) for n in source["shape"]]
        if shape != [1, ALIGNED_SIZE, ALIGNED_SIZE, 3] or source["dtype"] != np.float32:
            raise ModelError(
                f"model file {model.path} takes {source['dtype'].__name__} {shape}, "
                "not float32 [1, 112, 112, 3]"
            )
        self._input = source["index"]
        self._output = target["index"]
        self.dimension = int(target["shape"][-1])
        self._scale, self._offset = _SCALING[model.normalisation]
        self._batch = np.empty((1, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.float32)

    def prepare(self, aligned: Image) -> npt.NDArray[np.float32]:
        """The model input for one aligned BGR face (a reused buffer)."""
        np.multiply(aligned[:, :, ::-1], self._scale, out=self._batch[0], casting="unsafe")
        self._batch[0] += self._offset
        return self._batch

    def invoke(self, batch: npt.NDArray[np.float32]) -> Vector:
        """The bare model call: raw (not normalised) embedding."""
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        raw: Vector = self._interpreter.get_tensor(self._output)[0].astype(np.float32)
        return raw

    def embed(self, aligned: Image) -> Vector:
        return unit(self.invoke(self.prepare(aligned)))

    def embed_mirrored(self, aligned: Image) -> Vector:
        """Mean of the face's and its mirror image's embeddings: steadier, for enrolment."""
        return unit(self.embed(aligned) + self.embed(np.ascontiguousarray(aligned[:, ::-1])))


def unit(vector: Vector) -> Vector:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-9:
        raise ValueError("the embedding has no direction (zero or not finite)")
    result: Vector = (vector / norm).astype(np.float32)
    return result


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over the frames seen (for health and benchmarks)."""

    detect: float = 0.0
    align: float = 0.0
    embed: float = 0.0
    frames: int = 0
    embedded: int = 0  #: faces embedded


@dataclass(frozen=True)
class FaceSample:
    """One detected face of a frame, judged or not."""

    face: Face
    reason: QualityReason | None  #: why it was not judged; None when it was
    aligned: Image | None = None
    embedding: Vector | None = None
    quality: Quality | None = None


@dataclass
class FacePipeline:
    """Detector, gate and embedder together: ``analyse(frame)`` gives every face's verdict."""

    detector: FaceDetector
    embedder: FaceEmbedder
    gate: QualityGate = field(default_factory=QualityGate)
    times: StageTimes = field(default_factory=StageTimes)

    @classmethod
    def from_config(cls, config: CameraFaceConfig) -> FacePipeline:
        """Load and verify both models; raises :class:`ModelError` naming the bad file."""
        detector = FaceDetector(
            config.detector_file,
            min(DETECTION_FLOOR, config.min_detection_score),
            config.detect_max_width,
        )
        embedder = FaceEmbedder(config.embedder_file, config.threads)
        return cls(detector, embedder, QualityGate.from_config(config))

    def analyse(self, frame: Image) -> list[FaceSample]:
        clock = time.perf_counter
        started = clock()
        faces = self.detector.detect(frame)
        detected = clock()
        samples: list[FaceSample] = []
        align_time = embed_time = 0.0
        for face in faces:
            reason = self.gate.size_reason(face)
            if reason is not None:
                samples.append(FaceSample(face, reason))
                continue
            begin = clock()
            aligned = align_face(frame, face)
            aligned_at = clock()
            align_time += aligned_at - begin
            if aligned is None:
                samples.append(FaceSample(face, "align"))
                continue
            raw = self.embedder.invoke(self.embedder.prepare(aligned))
            embedded_at = clock()
            embed_time += embedded_at - aligned_at
            self.times.embedded += 1
            norm = float(np.linalg.norm(raw))
            quality = measure_quality(face, aligned, norm)
            align_time += clock() - embedded_at
            reason = self.gate.image_reason(quality)
            if reason is not None or not np.isfinite(norm) or norm < 1e-9:
                samples.append(FaceSample(face, reason or "norm", aligned, None, quality))
                continue
            samples.append(FaceSample(face, None, aligned, unit(raw), quality))
        self.times.detect += detected - started
        self.times.align += align_time
        self.times.embed += embed_time
        self.times.frames += 1
        return samples

    def enrolment_embedding(self, image: Image) -> tuple[Vector | None, int]:
        """The embedding of the largest face of an enrolment photo, and how many faces it has.

        Enrolment photos skip the live quality gates (an operator chose them) but
        use the mirror-averaged embedding, which is steadier.
        """
        faces = self.detector.detect(image)
        if not faces:
            return None, 0
        largest = max(faces, key=lambda f: f.box[2] * f.box[3])
        aligned = align_face(image, largest)
        if aligned is None:
            return None, len(faces)
        return self.embedder.embed_mirrored(aligned), len(faces)
